"""HL7 v2 listener: MLLP framing over asyncio, the message handler in a thread pool.

Why this shape: one event loop in its own thread serves every connection, so a
slow or silent sender costs a coroutine and a timer, never a thread, and cannot
stall the listener or other senders. The handler (:func:`gateway.hl7_inbound.handle_message`)
is synchronous and touches the disk and the database, so it runs in a thread pool
executor and the loop never blocks on it. Each connection is served in order: a
frame's ACK is written only after the handler returned it, i.e. after the durable
write (see ``gateway.hl7_inbound``).

MLLP (HL7 v2 Appendix C): a frame is ``0x0B payload 0x1C 0x0D``. This decoder is
lenient where it costs nothing and strict where it protects the listener:

- bytes outside a frame that are not 0x0B are discarded (logged at debug, counted);
- a 0x0B inside an open frame restarts the frame (the partial one is discarded);
- a 0x1C not followed by 0x0D still ends the frame;
- a frame larger than ``max_message_bytes`` is not buffered: its first bytes are
  kept (to read MSH-10), the rest is discarded until the end of the frame, and the
  sender gets AR "message too large" on the same, still open, connection;
- a frame not closed within ``frame_timeout_s`` and a connection without a complete
  frame for ``idle_timeout_s`` are closed;
- connections from outside ``allowed_addresses`` and beyond ``max_connections`` are
  closed at accept.

Logs carry peers, MSH-10 control ids and internal message ids, never message content.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Union

from ecgbridge.core.live import SettingsSource, current
from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.settings import MllpListener
from ecgbridge.core.store import MessageStore
from ecgbridge.core.tls import listener_context
from ecgbridge.mapping.hl7_common import CARRIAGE_RETURN, END_BLOCK, START_BLOCK, frame

__all__ = [
    "Frame",
    "OversizeFrame",
    "MllpDecoder",
    "MllpServer",
    "MllpGateway",
]

log = logging.getLogger("ecgbridge.mllp")

_CR = CARRIAGE_RETURN[0]

#: Bytes of an oversized frame kept to answer it (the MSH segment is at the start).
OVERSIZE_HEAD_BYTES = 64 * 1024
_READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Frame:
    """A complete MLLP frame's payload."""

    payload: bytes


@dataclass(frozen=True)
class OversizeFrame:
    """A frame over the size limit: its first bytes and its full size."""

    head: bytes
    size: int


Decoded = Union[Frame, OversizeFrame]


class MllpDecoder:
    """Incremental MLLP decoder: ``feed`` bytes as they arrive, get the frames completed.

    Pure and synchronous so that framing can be tested without sockets; memory is
    bounded by ``max_message_bytes`` whatever the sender does.
    """

    def __init__(self, max_message_bytes: int, head_bytes: int = OVERSIZE_HEAD_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self.head_bytes = min(head_bytes, max_message_bytes)
        self.in_frame = False
        self.discarded = 0  # bytes outside frames, or of abandoned partial frames
        self.restarted = 0  # frames abandoned because a new start block came
        self._buf = bytearray()
        self._size = 0
        self._oversize = False
        self._expect_cr = False

    def feed(self, data: bytes) -> list[Decoded]:
        out: list[Decoded] = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._expect_cr:
                self._expect_cr = False
                if view[pos] == _CR:
                    pos += 1
                    continue
                log.debug("MLLP end block without carriage return")
            if not self.in_frame:
                start = data.find(START_BLOCK, pos)
                skipped = (end if start < 0 else start) - pos
                if skipped:
                    self.discarded += skipped
                    log.debug("MLLP: discarded %d byte(s) outside a frame", skipped)
                if start < 0:
                    break
                self._open()
                pos = start + 1
                continue
            stop = data.find(END_BLOCK, pos)
            restart = data.find(START_BLOCK, pos, stop if stop >= 0 else end)
            if restart >= 0:
                self._append(view[pos:restart])
                self.discarded += self._size
                self.restarted += 1
                log.debug("MLLP: start block inside a frame; %d byte(s) of the partial frame discarded", self._size)
                self._open()
                pos = restart + 1
                continue
            if stop < 0:
                self._append(view[pos:end])
                break
            self._append(view[pos:stop])
            out.append(self._close())
            self._expect_cr = True
            pos = stop + 1
        return out

    def _open(self) -> None:
        self.in_frame = True
        self._buf = bytearray()
        self._size = 0
        self._oversize = False

    def _append(self, chunk: memoryview) -> None:
        n = len(chunk)
        if not n:
            return
        self._size += n
        if self._oversize:
            return
        if self._size > self.max_message_bytes:
            self._oversize = True
            room = self.head_bytes - len(self._buf)
            if room > 0:
                self._buf += chunk[:room]
            del self._buf[self.head_bytes :]
            return
        self._buf += chunk

    def _close(self) -> Decoded:
        self.in_frame = False
        data, self._buf = bytes(self._buf), bytearray()
        if self._oversize:
            return OversizeFrame(data, self._size)
        return Frame(data)


#: ``handler(payload, peer) -> ACK bytes`` (b"" sends nothing) and
#: ``oversize_handler(head, size, peer) -> ACK bytes``; both synchronous.
Handler = Callable[[bytes, str], bytes]
OversizeHandler = Callable[[bytes, int, str], bytes]


def _networks(values: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


def _allowed(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if not networks:
        return True
    try:
        addr = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


class MllpServer:
    """An asyncio MLLP server in its own thread, calling synchronous handlers in a pool.

    Generic over the handlers so the framing and timeouts can be exercised alone;
    :class:`MllpGateway` wires it to the HL7 inbound handler.
    """

    def __init__(
        self, config: MllpListener, handler: Handler, oversize_handler: OversizeHandler, *, workers: int | None = None
    ) -> None:
        self.config = config
        self.handler = handler
        self.oversize_handler = oversize_handler
        self.stats: Counter[str] = Counter()
        self._networks = _networks(config.allowed_addresses)
        #: MLLP over TLS (mutual when the config asks for client certificates); None: plain TCP.
        self._ssl = listener_context(config.tls, "listeners.mllp.tls")
        self._workers = workers or max(1, min(16, config.max_connections))
        self._pool: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = 0
        self._port: int | None = None

    # ----- lifecycle (called from any thread) ------------------------------------
    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the MLLP listener is not started")
        return self._port

    def start(self) -> None:
        """Bind and serve; returns once the socket is bound (raises if it cannot be)."""
        ready = threading.Event()
        failure: list[BaseException] = []
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="mllp-handler")
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(
                    asyncio.start_server(
                        self._serve,
                        self.config.host,
                        self.config.port,
                        limit=_READ_CHUNK,
                        reuse_address=True,
                        ssl=self._ssl,
                        ssl_handshake_timeout=self.config.frame_timeout_s if self._ssl else None,
                    )
                )
                self._port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                self._loop.close()
                return
            ready.set()
            try:
                self._loop.run_forever()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="mllp-listener", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._pool.shutdown(wait=False)
            raise failure[0]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, close connections, let running handlers finish."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout_s)
        except Exception:
            log.warning("MLLP listener did not shut down cleanly", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._port = None
        log.info("MLLP listener stopped (%s)", self._stats_text())

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    def _stats_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items())) or "no traffic"

    # ----- one connection (in the loop thread) -------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peername[0]}:{peername[1]}"
        if not _allowed(str(peername[0]), self._networks):
            self.stats["refused_address"] += 1
            log.warning("refused MLLP connection from %s: address not allowed", peername[0])
            await self._close(writer)
            return
        if self._active >= self.config.max_connections:
            self.stats["refused_busy"] += 1
            log.warning("refused MLLP connection from %s: %d connections already open", peer, self._active)
            await self._close(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._active += 1
        self.stats["connections"] += 1
        log.debug("MLLP connection from %s", peer)
        try:
            await self._connection(reader, writer, peer)
        except asyncio.CancelledError:
            pass
        except (ConnectionError, OSError) as exc:
            log.info("MLLP connection from %s lost: %s", peer, type(exc).__name__)
        except Exception:
            log.exception("MLLP connection from %s failed", peer)
        finally:
            self._active -= 1
            self._tasks.discard(task)
            await self._close(writer)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        decoder = MllpDecoder(cfg.max_message_bytes)
        idle_since = loop.time()
        frame_since: float | None = None
        while True:
            if decoder.in_frame:
                deadline, why = (frame_since or idle_since) + cfg.frame_timeout_s, "frame_timeout"
            else:
                deadline, why = idle_since + cfg.idle_timeout_s, "idle_timeout"
            try:
                data = await asyncio.wait_for(reader.read(_READ_CHUNK), max(0.0, deadline - loop.time()))
            except TimeoutError:
                self.stats[why] += 1
                log.info(
                    "MLLP connection from %s closed: %s",
                    peer,
                    "frame not completed in time" if why == "frame_timeout" else "idle",
                )
                return
            if not data:
                if decoder.in_frame:
                    log.info("MLLP connection from %s closed by the peer inside a frame", peer)
                return
            before = decoder.discarded
            items = decoder.feed(data)
            if decoder.discarded != before:
                self.stats["discarded_bytes"] += decoder.discarded - before
            for item in items:
                await self._answer(item, writer, peer)
                idle_since = loop.time()
            if not decoder.in_frame:
                frame_since = None
            elif frame_since is None or items:
                frame_since = loop.time()

    async def _answer(self, item: Decoded, writer: asyncio.StreamWriter, peer: str) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(item, OversizeFrame):
            self.stats["oversize"] += 1
            log.warning(
                "MLLP message from %s too large: %d bytes (limit %d)", peer, item.size, self.config.max_message_bytes
            )
            ack = await loop.run_in_executor(self._pool, self.oversize_handler, item.head, item.size, peer)
        else:
            self.stats["frames"] += 1
            ack = await loop.run_in_executor(self._pool, self.handler, item.payload, peer)
        if ack:
            writer.write(frame(ack))
            await asyncio.wait_for(writer.drain(), self.config.frame_timeout_s)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        try:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), 2)
        except (TimeoutError, ConnectionError, OSError, asyncio.CancelledError):
            pass


class MllpGateway:
    """The HL7 v2 MLLP listener of the gateway, bound to a store and a dispatcher."""

    def __init__(self, settings: SettingsSource, store: MessageStore, dispatcher: Dispatcher) -> None:
        from ecgbridge.gateway.hl7_inbound import InboundContext, handle_message, handle_oversize

        self.config = current(settings).listeners.mllp
        self.context = InboundContext(settings, store, dispatcher)
        ctx = self.context
        limit = self.config.max_message_bytes
        self.server = MllpServer(
            self.config,
            lambda raw, peer: handle_message(raw, peer, ctx),
            lambda head, size, peer: handle_oversize(head, size, limit, peer, ctx),
        )

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def stats(self) -> Counter[str]:
        return self.server.stats

    @property
    def running(self) -> bool:
        """Whether the listener thread is serving (the console's listener-up indicator)."""
        thread = getattr(self.server, "_thread", None)
        return thread is not None and thread.is_alive()

    def start(self) -> None:
        self.server.start()
        log.info("MLLP listener on %s:%d", self.config.host, self.port)

    def stop(self) -> None:
        self.server.stop()
