"""A test EHR: python-hl7's asyncio MLLP server, answering as a test tells it to.

It is deliberately not ecgbridge code (``hl7.mllp.start_hl7_server`` frames and reads,
``hl7.Message.create_ack`` builds the ACK), so a framing or ACK-handling mistake in
our client cannot hide behind the same mistake in the receiver. It runs in a
background thread on a free port and records every message it received, raw.

Answer modes, per message:

* ``"AA"`` / ``"AE"`` / ``"AR"`` (and ``"CA"`` / ``"CE"`` / ``"CR"``): that ACK; AE and
  AR (CE, CR) carry an ERR segment with ``error_text`` in ERR-8;
* ``"silent"``: read the message, never answer (the connection stays open);
* ``"close"``: close the connection on receipt, no answer;
* ``"wrong_id"``: an AA whose MSA-2 names another message.

``first`` lists answers for the first messages, ``mode`` answers the rest:
``Hl7Receiver("AA", first=["AE", "AE"])`` is "AE twice, then AA". ``ack_delay_s`` holds
every answer that long (a slow EHR interface).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from types import TracebackType

import hl7
import hl7.mllp

__all__ = ["Hl7Receiver", "MODES"]

MODES = ("AA", "AE", "AR", "CA", "CE", "CR", "silent", "close", "wrong_id")


class Hl7Receiver:
    """Background MLLP receiver; ``.port`` once started, ``.received`` the raw messages."""

    def __init__(
        self,
        mode: str = "AA",
        *,
        first: Sequence[str] = (),
        error_text: str = "Rejected by the test EHR",
        host: str = "127.0.0.1",
        ack_delay_s: float = 0.0,
    ) -> None:
        for m in (mode, *first):
            if m not in MODES:
                raise ValueError(f"unknown receiver mode {m!r} (one of {', '.join(MODES)})")
        self.mode = mode
        self.ack_delay_s = ack_delay_s
        self.error_text = error_text
        self.host = host
        self.port: int = 0
        self._first = list(first)
        self._lock = threading.Lock()
        self._received: list[str] = []
        self._answers: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._error: BaseException | None = None

    # ----- what it saw ------------------------------------------------------------
    @property
    def received(self) -> list[str]:
        """Every message received, decoded as UTF-8, in arrival order."""
        with self._lock:
            return list(self._received)

    @property
    def answers(self) -> list[str]:
        """The answer given to each received message (a mode name)."""
        with self._lock:
            return list(self._answers)

    def wait_received(self, count: int, timeout_s: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.received
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"test EHR got {len(self.received)} message(s) in {timeout_s:.0f} s, expected {count}")

    # ----- lifecycle --------------------------------------------------------------
    def start(self) -> Hl7Receiver:
        self._thread = threading.Thread(target=self._run, name=f"hl7-receiver-{self.mode}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the test HL7 receiver did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the test HL7 receiver failed to start: {self._error}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        thread.join(10)
        self._thread = None

    def __enter__(self) -> Hl7Receiver:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ----- internals --------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                hl7.mllp.start_hl7_server(self._handle, self.host, 0, encoding="utf-8", limit=64 * 1024 * 1024)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        assert self._loop is not None
        self._loop.stop()

    def _next_answer(self) -> str:
        return self._first.pop(0) if self._first else self.mode

    async def _handle(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    block = await reader.readblock()
                except (asyncio.IncompleteReadError, ConnectionError, hl7.mllp.InvalidBlockError, ValueError):
                    return
                raw = block.decode("utf-8", errors="replace")
                with self._lock:
                    answer = self._next_answer()
                    self._received.append(raw)
                    self._answers.append(answer)
                if answer == "close":
                    return
                if answer == "silent":
                    continue
                if self.ack_delay_s:
                    await asyncio.sleep(self.ack_delay_s)
                writer.writemessage(self._ack(raw, answer, len(self._received)))
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()

    def _ack(self, raw: str, answer: str, n: int) -> hl7.Message:
        message = hl7.parse(raw.replace("\n", "\r"))
        code = "AA" if answer == "wrong_id" else answer
        ack = message.create_ack(code, message_id=f"EHR{n:05d}", application="TESTEHR", facility="TEST")
        if answer == "wrong_id":
            ack.segment("MSA").assign_field("SOMEONE-ELSES-MESSAGE", 2)
        if code in ("AE", "AR", "CE", "CR"):
            err = ack.create_segment([ack.create_field(["ERR"])])
            err.assign_field("PID", 2, 1, 1)
            err.assign_field("1", 2, 1, 2)
            err.assign_field("3", 2, 1, 3)
            err.assign_field("204", 3, 1, 1)
            err.assign_field("Unknown key identifier", 3, 1, 2)
            err.assign_field("HL70357", 3, 1, 3)
            err.assign_field("E", 4)
            err.assign_field(ack.escape(self.error_text), 8)
            ack.append(err)
        return ack
