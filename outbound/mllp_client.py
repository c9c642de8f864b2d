"""Send one HL7 v2 message over MLLP and turn the receiver's ACK into a delivery outcome.

Why the standard library and not python-hl7's client: a Celery worker is synchronous,
and one blocking socket with explicit deadlines (connect, then one overall deadline
for send + ACK) is the whole job; python-hl7's asyncio client would need an event
loop per send for no gain, and its blocking ``MLLPClient`` has no timeouts at all and
does one ``send()`` and one ``recv()`` (a partial send or an ACK split across TCP
segments is lost). python-hl7 stays a test dependency: it plays the EHR.
One connection per message: nothing to keep alive between retries that may be
minutes apart, and a receiver that closed an idle connection cannot eat a message.

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
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ecgbridge.errors import Hl7Error, PermanentDeliveryError, TransientDeliveryError
from ecgbridge.mapping.hl7_common import FRAME_END as _FRAME_END
from ecgbridge.mapping.hl7_common import START_BLOCK, Separators, frame, read_header, unescape

if TYPE_CHECKING:
    from ecgbridge.core.settings import Hl7Destination

__all__ = ["Ack", "parse_ack", "send_oru", "send_message", "MAX_ACK_BYTES"]

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


def _read_frame(sock: socket.socket, deadline: float, where: str, timeout_s: float) -> bytes:
    """One MLLP block before ``deadline``; bytes before 0x0B are ignored."""
    buffer = bytearray()
    started = False
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
            raise TransientDeliveryError(f"connection to {where} failed while waiting for the ACK: {exc}") from exc
        if not chunk:
            state = "in the middle of the ACK" if started else "before an ACK"
            raise TransientDeliveryError(f"{where} closed the connection {state}")
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


def send_message(
    host: str,
    port: int,
    message: str,
    *,
    connect_timeout_s: float,
    ack_timeout_s: float,
    tls: ssl.SSLContext | None = None,
) -> Ack:
    """Send one MLLP-framed message and return the parsed ACK (transport errors are transient).

    With ``tls``, MLLP over TLS: the receiver's certificate is verified (a failed handshake is
    transient: a certificate renewed on the receiver's side fixes it without a resend).
    """
    where = f"{host}:{port}"
    try:
        data_out = frame(message.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise PermanentDeliveryError(f"the message cannot be encoded as UTF-8 at position {exc.start}") from exc
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout_s)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
    except TimeoutError:
        raise TransientDeliveryError(f"could not connect to {where} within {connect_timeout_s:g} s") from None
    except ssl.SSLError as exc:
        raise TransientDeliveryError(f"TLS with {where} failed: {exc.reason or type(exc).__name__}") from exc
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise TransientDeliveryError(f"could not connect to {where}: {reason}") from exc
    with sock:
        deadline = time.monotonic() + ack_timeout_s
        try:
            sock.settimeout(ack_timeout_s)
            sock.sendall(data_out)
        except TimeoutError:
            raise TransientDeliveryError(f"sending to {where} did not finish within {ack_timeout_s:g} s") from None
        except OSError as exc:
            raise TransientDeliveryError(f"connection to {where} failed while sending: {exc.strerror or exc}") from exc
        data = _read_frame(sock, deadline, where, ack_timeout_s)
    try:
        return parse_ack(data)
    except ValueError as exc:
        raise TransientDeliveryError(f"{where} answered with something that is not an ACK: {exc}") from exc


def send_oru(destination: Hl7Destination, message: str, *, tls: ssl.SSLContext | None = None) -> str:
    """Deliver ``message`` to an HL7 destination; ``"ACK:<receiver MSH-10>"`` on AA / CA.

    Raises TransientDeliveryError (retry) or PermanentDeliveryError (AR / CR) as the
    module docstring tabulates. ``tls``: the destination's TLS context (MLLP over TLS).
    """
    control = _control_id(message)
    name = destination.name
    try:
        ack = send_message(
            destination.host,
            destination.port,
            message,
            connect_timeout_s=destination.connect_timeout_s,
            ack_timeout_s=destination.ack_timeout_s,
            tls=tls,
        )
    except TransientDeliveryError as exc:
        log.warning("ORU %s to %s: no ACK (%s)", control, name, exc)
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
