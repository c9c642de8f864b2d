"""Send one HL7 v2 message over MLLP and turn the receiver's ACK into a delivery outcome.

Why the standard library and not python-hl7's client: a Celery worker is synchronous,
and one blocking socket with explicit deadlines (connect, then one overall deadline
for send + ACK) is the whole job; python-hl7's asyncio client would need an event
loop per send for no gain, and its blocking ``MLLPClient`` has no timeouts at all and
does one ``send()`` and one ``recv()`` (a partial send or an ACK split across TCP
segments is lost). python-hl7 stays a test dependency: it plays the EHR.

Connections: :func:`send_message` opens one per message. :class:`MllpConnection` keeps
one open per destination for the messages that follow (the HL7 sender's default), one
message at a time under a lock, so frames and ACKs never interleave and the messages to
a receiver go out in order. It is checked before each reuse; when the receiver had
closed it (an idle timeout on its side), the message goes out on a new connection. A
send on a reused connection that fails before a byte of an answer came back (the
receiver had closed or reset it just then) is sent once more on a new connection: the
receiver never acknowledged it, and the same MSH-10 lets it drop a duplicate. A timeout,
an answer cut short, something that is not an ACK or an ACK for another message drop the
connection (the stream can no longer be trusted) and fail the send as usual, for the
delivery retries; nothing is resent within the call. An idle connection is closed after
``idle_close_s``.

Outcomes (original and enhanced acknowledgment codes alike)::

    MSA-1 AA / CA                          -> "ACK:<receiver MSH-10>"
    MSA-1 AE / CE                          -> TransientDeliveryError (retried, then dead-lettered)
    no connection, timeout, closed early,
    no MSA, ACK for another message        -> TransientDeliveryError
    MSA-1 AR / CR                          -> PermanentDeliveryError with the ERR text

The message body is never logged (it carries PHI); the log names the control id,
the destination and the outcome.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ecgbridge.errors import DestinationBusy, Hl7Error, PermanentDeliveryError, TransientDeliveryError
from ecgbridge.mapping.hl7_common import FRAME_END as _FRAME_END
from ecgbridge.mapping.hl7_common import START_BLOCK, Separators, frame, read_header, unescape

if TYPE_CHECKING:
    from ecgbridge.core.settings import Hl7Destination

__all__ = ["Ack", "parse_ack", "send_oru", "send_message", "MllpConnection", "MAX_ACK_BYTES"]

log = logging.getLogger("ecgbridge.mllp_client")

#: An ACK larger than this is not an ACK (and must not fill the worker's memory).
MAX_ACK_BYTES = 1024 * 1024

_ACCEPT = {"AA", "CA"}
_ERROR = {"AE", "CE"}
_REJECT = {"AR", "CR"}


@dataclass(frozen=True)
class Ack:
    """What a receiver said: MSA-1/2/3, its own MSH-10, and the ERR segments as text."""

    code: str
    acked_control_id: str
    control_id: str
    text: str = ""
    errors: tuple[str, ...] = field(default_factory=tuple)

    def error_text(self) -> str:
        """ERR text (user message, diagnostics, code, location), else MSA-3, else the code."""
        parts = list(self.errors) or ([self.text] if self.text else [])
        return "; ".join(parts) or f"MSA-1 {self.code} without an error text"


def _field(fields: list[str], index: int) -> str:
    return fields[index] if len(fields) > index else ""


def _components(value: str, seps: Separators) -> list[str]:
    return [unescape(c, seps) for c in value.split(seps.repetition, 1)[0].split(seps.component)]


def _err_text(fields: list[str], seps: Separators) -> str:
    """One ERR segment as text: v2.5 ERR-8 / ERR-7 / ERR-3 / ERR-2, or v2.3 ERR-1."""
    user = unescape(_field(fields, 8), seps).strip()
    diagnostic = unescape(_field(fields, 7), seps).strip()
    code = _components(_field(fields, 3), seps)
    location = "^".join(c for c in _components(_field(fields, 2), seps) if c)
    legacy = _field(fields, 1).split(seps.repetition, 1)[0].split(seps.component)  # ELD (v2.3)
    words: list[str] = []
    if user:
        words.append(user)
    if diagnostic and diagnostic != user:
        words.append(diagnostic)
    code_text = " ".join(c for c in code[:2] if c)
    if code_text:
        words.append(f"(error {code_text})" if words else f"error {code_text}")
    if location:
        words.append(f"at {location}")
    if not words and any(legacy):  # ELD: segment^sequence^field^code&text&system
        where = "^".join(unescape(c, seps) for c in legacy[:3] if c)
        coded = [unescape(p, seps) for p in legacy[3].split(seps.subcomponent)] if len(legacy) > 3 else []
        if len(coded) > 1 and coded[1]:
            words.append(coded[1])
        if coded and coded[0]:
            words.append(f"(error {coded[0]})" if words else f"error {coded[0]}")
        if where:
            words.append(f"at {where}")
    return " ".join(words)


def parse_ack(data: bytes) -> Ack:
    """A tolerant reading of an ACK (any v2.x, any separators); ValueError when it is none."""
    text = data.decode("utf-8", errors="replace")
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    start = text.find("MSH")
    if start < 0:
        raise ValueError("the reply is not an HL7 message (no MSH segment)")
    text = text[start:]
    try:
        header = read_header(text)  # the one MSH reader; its separators split the whole ACK
    except Hl7Error as exc:
        raise ValueError(f"the reply's MSH is unusable: {exc}") from exc
    seps = header.separators
    msa: list[str] | None = None
    errors: list[str] = []
    for segment in text.split("\r")[1:]:
        fields = segment.split(seps.field)
        name = fields[0].strip()
        if name == "MSA" and msa is None:
            msa = fields
        elif name == "ERR":
            described = _err_text(fields, seps)
            if described:
                errors.append(described)
    if msa is None:
        raise ValueError("the reply has no MSA segment")
    return Ack(
        code=_field(msa, 1).strip().upper(),
        acked_control_id=unescape(_field(msa, 2), seps).strip(),
        control_id=unescape(header.control_id, seps).strip(),
        text=unescape(_field(msa, 3), seps).strip(),
        errors=tuple(errors),
    )


def _control_id(message: str) -> str:
    """MSH-10 of our own message, read by the same MSH reader as everything else."""
    try:
        control = read_header(message).control_id
    except Hl7Error as exc:
        raise PermanentDeliveryError(f"the message to send has no usable MSH segment: {exc}") from exc
    if not control:
        raise PermanentDeliveryError("the message to send has no MSH-10 control id")
    return control


class _ConnectionLost(TransientDeliveryError):
    """The connection failed before a byte of an answer came back: while sending, or closed / reset by the peer."""


def _read_frame(sock: socket.socket, deadline: float, where: str, timeout_s: float) -> bytes:
    """One MLLP block before ``deadline``; bytes before 0x0B are ignored.

    A connection closed or reset before any byte arrived raises :class:`_ConnectionLost`.
    """
    buffer = bytearray()
    started = False
    got_any = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransientDeliveryError(f"no ACK from {where} within {timeout_s:g} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise TransientDeliveryError(f"no ACK from {where} within {timeout_s:g} s") from None
        except OSError as exc:
            error = _ConnectionLost if not got_any else TransientDeliveryError
            raise error(f"connection to {where} failed while waiting for the ACK: {exc}") from exc
        if not chunk:
            state = "in the middle of the ACK" if started else "before an ACK"
            error = _ConnectionLost if not got_any else TransientDeliveryError
            raise error(f"{where} closed the connection {state}")
        got_any = True
        buffer += chunk
        if not started:
            index = buffer.find(START_BLOCK)
            if index < 0:
                buffer.clear()
                continue
            del buffer[: index + 1]
            started = True
        end = buffer.find(_FRAME_END)
        if end >= 0:
            return bytes(buffer[:end])
        if len(buffer) > MAX_ACK_BYTES:
            raise TransientDeliveryError(f"{where} sent more than {MAX_ACK_BYTES} bytes without ending the ACK frame")


def _encode(message: str) -> bytes:
    try:
        return frame(message.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise PermanentDeliveryError(f"the message cannot be encoded as UTF-8 at position {exc.start}") from exc


def _connect(host: str, port: int, connect_timeout_s: float, tls: ssl.SSLContext | None) -> socket.socket:
    """A new connection (TLS handshake done when ``tls``); failures are transient."""
    where = f"{host}:{port}"
    raw: socket.socket | None = None
    try:
        raw = socket.create_connection((host, port), timeout=connect_timeout_s)
        return raw if tls is None else tls.wrap_socket(raw, server_hostname=host)
    except TimeoutError:
        _close_quietly(raw)
        raise TransientDeliveryError(f"could not connect to {where} within {connect_timeout_s:g} s") from None
    except ssl.SSLError as exc:
        _close_quietly(raw)
        raise TransientDeliveryError(f"TLS with {where} failed: {exc.reason or type(exc).__name__}") from exc
    except OSError as exc:
        _close_quietly(raw)
        reason = exc.strerror or type(exc).__name__
        raise TransientDeliveryError(f"could not connect to {where}: {reason}") from exc


def _close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _round_trip(sock: socket.socket, data_out: bytes, where: str, ack_timeout_s: float) -> Ack:
    """Send one framed message on ``sock`` and read its ACK, within ``ack_timeout_s`` in all."""
    deadline = time.monotonic() + ack_timeout_s
    try:
        sock.settimeout(ack_timeout_s)
        sock.sendall(data_out)
    except TimeoutError:
        raise TransientDeliveryError(f"sending to {where} did not finish within {ack_timeout_s:g} s") from None
    except OSError as exc:
        raise _ConnectionLost(f"connection to {where} failed while sending: {exc.strerror or exc}") from exc
    data = _read_frame(sock, deadline, where, ack_timeout_s)
    try:
        return parse_ack(data)
    except ValueError as exc:
        raise TransientDeliveryError(f"{where} answered with something that is not an ACK: {exc}") from exc


def _still_open(sock: socket.socket) -> bool:
    """Whether an idle connection is still usable: nothing to read yet (no close, no reset, no stray bytes)."""
    try:
        sock.setblocking(False)
        try:
            sock.recv(1)  # b"": closed by the receiver; a byte: an answer nobody asked for (out of step)
        finally:
            sock.setblocking(True)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return True  # nothing arrived: open (a TLS 1.3 session ticket read on the way is fine too)
    except OSError:
        return False  # reset, or a TLS alert
    return False


def send_message(
    host: str,
    port: int,
    message: str,
    *,
    connect_timeout_s: float,
    ack_timeout_s: float,
    tls: ssl.SSLContext | None = None,
) -> Ack:
    """Send one MLLP-framed message on a new connection and return the parsed ACK (transport errors are transient).

    With ``tls``, MLLP over TLS: the receiver's certificate is verified (a failed handshake is
    transient: a certificate renewed on the receiver's side fixes it without a resend).
    """
    data_out = _encode(message)
    sock = _connect(host, port, connect_timeout_s, tls)
    with sock:
        return _round_trip(sock, data_out, f"{host}:{port}", ack_timeout_s)


class MllpConnection:
    """One MLLP connection to a receiver, kept open across messages and used by one send at a time.

    Thread-safe: :meth:`exchange` holds a lock for the whole send and ACK, so threads
    sharing the connection take turns (in the order the lock grants it). Opened on first
    use, checked before each reuse, closed after ``idle_close_s`` unused and by :meth:`close`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout_s: float,
        ack_timeout_s: float,
        idle_close_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout_s = connect_timeout_s
        self.ack_timeout_s = ack_timeout_s
        self.idle_close_s = idle_close_s
        self.tls = tls
        self.where = f"{host}:{port}"
        #: Connections opened so far (for tests and logs).
        self.opened = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._last_used = 0.0
        self._closed = False
        self._timer: threading.Timer | None = None
        self._timer_generation = 0

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def exchange(self, message: str, control: str) -> Ack:
        """Send ``message`` (MSH-10 ``control``) and return its ACK; transport failures are transient.

        An ACK for another message (MSA-2 is not ``control``) drops the connection and is transient.
        """
        data_out = _encode(message)
        # Bounded: a delivery's claim (delivery.claim_s, 120 s) must outlast the wait and the send.
        wait_s = self.connect_timeout_s + self.ack_timeout_s
        if not self._lock.acquire(timeout=wait_s):
            raise DestinationBusy(f"{self.where}: the connection was busy with other sends for {wait_s:.0f} s")
        try:
            try:
                ack = self._exchange(data_out)
                if ack.acked_control_id != control:
                    raise TransientDeliveryError(
                        f"ACK for another message: MSA-2 is {ack.acked_control_id!r}, we sent {control!r}"
                    )
            except BaseException:
                self._drop()  # a connection out of step, timed out or broken is never used again
                raise
            self._last_used = time.monotonic()
            if self._closed:
                self._drop()
            else:
                self._schedule_idle_close(self.idle_close_s)
            return ack
        finally:
            self._lock.release()

    def _exchange(self, data_out: bytes) -> Ack:
        sock, reused = self._ready_socket()
        try:
            return _round_trip(sock, data_out, self.where, self.ack_timeout_s)
        except _ConnectionLost as exc:
            if not reused:
                raise
            # Nothing came back on a connection that had served before: the receiver closed or reset it
            # just now. It did not acknowledge the message, so it goes out once more on a new connection.
            log.info("connection to %s was lost before an answer (%s); sending again on a new one", self.where, exc)
            self._drop()
            sock = self._open()
            return _round_trip(sock, data_out, self.where, self.ack_timeout_s)

    def _ready_socket(self) -> tuple[socket.socket, bool]:
        """The open connection if it is still usable (and whether it is a reused one), else a new one."""
        sock = self._sock
        if sock is not None:
            idle = time.monotonic() - self._last_used
            if idle < self.idle_close_s and _still_open(sock):
                return sock, True
            log.debug("connection to %s closed by the receiver or idle for %.0f s; opening a new one", self.where, idle)
            self._drop()
        return self._open(), False

    def _open(self) -> socket.socket:
        sock = _connect(self.host, self.port, self.connect_timeout_s, self.tls)
        self._sock = sock
        self.opened += 1
        log.debug("MLLP connection %d to %s opened", self.opened, self.where)
        return sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self._cancel_timer()
        _close_quietly(sock)

    # ----- idle close ----------------------------------------------------------------
    # One timer thread per idle period, not per message: it fires idle_close_s after it was set,
    # and closes the connection if it was unused since, else sets itself for the time left.
    def _schedule_idle_close(self, delay_s: float) -> None:
        if self._timer is not None:
            return
        timer = threading.Timer(delay_s, self._idle_check, args=(self._timer_generation,))
        timer.daemon = True
        timer.name = f"mllp-idle-{self.where}"
        self._timer = timer
        timer.start()

    def _cancel_timer(self) -> None:
        self._timer_generation += 1  # a timer already running finds itself outdated
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _idle_check(self, generation: int) -> None:
        with self._lock:  # waits for a send under way
            if generation != self._timer_generation:
                return  # cancelled: the connection was dropped (and maybe opened again with its own timer)
            self._timer = None
            if self._sock is None:
                return
            idle = time.monotonic() - self._last_used
            if self._closed or idle >= self.idle_close_s:
                log.debug("MLLP connection to %s idle for %.0f s: closed", self.where, idle)
                self._drop()
            else:
                self._schedule_idle_close(self.idle_close_s - idle)

    def close(self) -> None:
        """Close the connection now, or when the send under way is done; a later send opens a new one."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._lock.release()


def send_oru(
    destination: Hl7Destination,
    message: str,
    *,
    tls: ssl.SSLContext | None = None,
    connection: MllpConnection | None = None,
) -> str:
    """Deliver ``message`` to an HL7 destination; ``"ACK:<receiver MSH-10>"`` on AA / CA.

    Raises TransientDeliveryError (retry) or PermanentDeliveryError (AR / CR) as the
    module docstring tabulates. ``tls``: the destination's TLS context (MLLP over TLS).
    ``connection``: the destination's persistent connection (its own TLS context applies);
    None: a new connection for this message.
    """
    control = _control_id(message)
    name = destination.name
    try:
        if connection is not None:
            ack = connection.exchange(message, control)
        else:
            ack = send_message(
                destination.host,
                destination.port,
                message,
                connect_timeout_s=destination.connect_timeout_s,
                ack_timeout_s=destination.ack_timeout_s,
                tls=tls,
            )
    except TransientDeliveryError as exc:
        log.warning("ORU %s to %s: no usable ACK (%s)", control, name, exc)
        raise
    if ack.acked_control_id != control:
        log.warning("ORU %s to %s: ACK %s is for message %r", control, name, ack.code, ack.acked_control_id)
        raise TransientDeliveryError(f"ACK for another message: MSA-2 is {ack.acked_control_id!r}, we sent {control!r}")
    if ack.code in _ACCEPT:
        log.info("ORU %s to %s: %s (receiver control id %s)", control, name, ack.code, ack.control_id or "-")
        return f"ACK:{ack.control_id or '-'}"
    if ack.code in _REJECT:
        log.warning("ORU %s to %s: rejected (%s)", control, name, ack.code)
        raise PermanentDeliveryError(f"{name} rejected the message ({ack.code}): {ack.error_text()}")
    if ack.code in _ERROR:
        log.warning("ORU %s to %s: application error (%s), will retry", control, name, ack.code)
        raise TransientDeliveryError(f"{name} answered {ack.code}: {ack.error_text()}")
    log.warning("ORU %s to %s: unknown acknowledgment code %r", control, name, ack.code)
    raise TransientDeliveryError(f"{name} answered with unknown acknowledgment code {ack.code!r}")
