"""HL7 v2 destinations: the result as an ORU^R01 over MLLP, delivered when the receiver answers AA.

MSH-10 is derived from the message id and the destination (and, for a re-analysis, the
result version), so every retry carries the same control id and a receiver can drop a
duplicate, while a corrected result (version 2, 3, ...; OBR-25 / OBX-11 ``C``) is a new
message to it. The ACK decides: AA / CA
delivered, AE / CE / no answer retried, AR / CR failed for good
(:func:`ecgbridge.outbound.mllp_client.send_oru`).

``connection: persistent`` (the default): one MLLP connection per destination and worker
process, kept open for the next message and used by one send at a time
(:class:`~ecgbridge.outbound.mllp_client.MllpConnection`): a delivery worker's threads
take turns on it, so the messages to this receiver go out one after another, in order
(what an interface engine filing results per patient needs). ``per_message``: a new
connection for each message, several at once (up to ``max_in_flight``).
"""

from __future__ import annotations

import hashlib
import ssl
import threading
from typing import cast

from ecgbridge.core.settings import DestinationConfig, Hl7Destination
from ecgbridge.core.tls import connection_context
from ecgbridge.errors import MappingError, PermanentDeliveryError
from ecgbridge.mapping.hl7_oru import build_oru_r01
from ecgbridge.outbound.mllp_client import MllpConnection, send_oru
from ecgbridge.outbound.sender import Outgoing, Sender, register_sender

__all__ = ["Hl7Sender", "control_id"]


def control_id(message_id: str, destination: str, version: int = 1) -> str:
    """MSH-10 for a result version: the same on every retry, so a receiver can drop a duplicate.

    Version 1 keeps the id of every earlier release; each later version gets its own.
    """
    key = f"{message_id}/{destination}" + (f"/v{version}" if version > 1 else "")
    return hashlib.sha1(key.encode()).hexdigest()[:20].upper()


@register_sender
class Hl7Sender(Sender):
    """An HL7 v2 receiver (the EHR's interface engine) taking ORU^R01 over MLLP."""

    type = "hl7"
    config_class = Hl7Destination
    _context: ssl.SSLContext | None = None

    def __init__(self, config: DestinationConfig) -> None:
        super().__init__(config)
        self._setup_lock = threading.Lock()
        self._connection: MllpConnection | None = None

    def send(self, outgoing: Outgoing) -> str:
        dest = cast(Hl7Destination, self.config)
        version = outgoing.version
        try:
            message = build_oru_r01(
                outgoing.result,
                ecg=outgoing.ecg,
                order=outgoing.order,
                destination=dest,
                message_id=outgoing.message_id,
                control_id=control_id(outgoing.message_id, dest.name, version),
                attachments_data=outgoing.attachments,
                version=version,
            )
        except MappingError as exc:
            raise PermanentDeliveryError(str(exc)) from exc
        return send_oru(dest, message, tls=self._tls(), connection=self.connection())

    def connection(self) -> MllpConnection | None:
        """The destination's persistent MLLP connection (made on first use); None for ``per_message``."""
        dest = cast(Hl7Destination, self.config)
        if dest.connection != "persistent":
            return None
        with self._setup_lock:
            if self._connection is None:
                self._connection = MllpConnection(
                    dest.host,
                    dest.port,
                    connect_timeout_s=dest.connect_timeout_s,
                    ack_timeout_s=dest.ack_timeout_s,
                    idle_close_s=dest.idle_close_s,
                    tls=self._tls_locked(),
                )
            return self._connection

    def close(self) -> None:
        with self._setup_lock:
            connection = self._connection
        if connection is not None:
            connection.close()

    def _tls(self) -> ssl.SSLContext | None:
        """The destination's TLS context, built once per sender (MLLP over TLS); None for plain TCP."""
        with self._setup_lock:
            return self._tls_locked()

    def _tls_locked(self) -> ssl.SSLContext | None:
        dest = cast(Hl7Destination, self.config)
        if dest.tls is None:
            return None
        if self._context is None:
            self._context = connection_context(dest.tls, f"destination {dest.name}")
        return self._context
