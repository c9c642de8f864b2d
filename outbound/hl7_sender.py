"""HL7 v2 destinations: the result as an ORU^R01 over MLLP, delivered when the receiver answers AA.

MSH-10 is derived from the message id and the destination, so every retry carries the
same control id and a receiver can drop a duplicate. The ACK decides: AA / CA
delivered, AE / CE / no answer retried, AR / CR failed for good
(:func:`ecgbridge.outbound.mllp_client.send_oru`).
"""

from __future__ import annotations

import hashlib
from typing import cast

from ecgbridge.core.settings import Hl7Destination
from ecgbridge.errors import MappingError, PermanentDeliveryError
from ecgbridge.mapping.hl7_oru import build_oru_r01
from ecgbridge.outbound.mllp_client import send_oru
from ecgbridge.outbound.sender import Outgoing, Sender, register_sender

__all__ = ["Hl7Sender", "control_id"]


def control_id(message_id: str, destination: str) -> str:
    """MSH-10 for a result: the same on every retry, so a receiver can drop a duplicate."""
    return hashlib.sha1(f"{message_id}/{destination}".encode()).hexdigest()[:20].upper()


@register_sender
class Hl7Sender(Sender):
    """An HL7 v2 receiver (the EHR's interface engine) taking ORU^R01 over MLLP."""

    type = "hl7"
    config_class = Hl7Destination

    def send(self, outgoing: Outgoing) -> str:
        dest = cast(Hl7Destination, self.config)
        try:
            message = build_oru_r01(
                outgoing.result,
                ecg=outgoing.ecg,
                order=outgoing.order,
                destination=dest,
                message_id=outgoing.message_id,
                control_id=control_id(outgoing.message_id, dest.name),
                attachments_data=outgoing.attachments,
            )
        except MappingError as exc:
            raise PermanentDeliveryError(str(exc)) from exc
        return send_oru(dest, message)
