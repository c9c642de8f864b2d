"""One error hierarchy for ecgbridge.

Every error knows how it is answered at a protocol boundary and whether the
operation that raised it is worth retrying::

    EcgBridgeError                 (base; retry=False)
    ├── ConfigError                bad YAML / settings; names file, line, field
    ├── InputError                 the inbound data is wrong (never retried)
    │   ├── DecodeError            bytes are not a decodable object (DIMSE 0xC210)
    │   ├── WaveformError          decodable, but not a usable ECG (DIMSE 0xC211)
    │   ├── UnsupportedInputError  a format/SOP class we do not take (DIMSE 0xA900)
    │   ├── ReportError            a clinician's report (over-read) that cannot be read, e.g. a
    │   │                          structured report whose content tree is malformed (DIMSE 0xA900)
    │   └── Hl7Error               an HL7 message refused: table-0357 code + ERR location (AR/AE)
    ├── StorageError               the durable store failed (DIMSE 0xA700 when out of space)
    ├── ModelError                 a model is missing, malformed or failed to run
    ├── MappingError               a result cannot be written as valid FHIR / HL7 (never retried)
    └── DeliveryError              sending a result to a destination failed
        ├── TransientDeliveryError network down, 5xx, 429, timeout (retry=True)
        └── PermanentDeliveryError 4xx / validation: retrying cannot help
"""

from __future__ import annotations

__all__ = [
    "EcgBridgeError",
    "ConfigError",
    "InputError",
    "DecodeError",
    "WaveformError",
    "UnsupportedInputError",
    "ReportError",
    "Hl7Error",
    "StorageError",
    "ModelError",
    "MappingError",
    "DeliveryError",
    "TransientDeliveryError",
    "PermanentDeliveryError",
]


class EcgBridgeError(Exception):
    """Base of every error ecgbridge raises on purpose."""

    #: DIMSE status a DICOM listener answers with when this error escapes a handler.
    dimse_status: int = 0xC001
    #: HL7 v2 MSA-1 acknowledgment code for this error (AE: error, AR: reject).
    hl7_ack_code: str = "AE"
    #: Whether the failed operation may succeed when tried again.
    retry: bool = False

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


class ConfigError(EcgBridgeError):
    """A configuration problem; ``problems`` lists each as 'file:line: field: why'."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return self.message + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class InputError(EcgBridgeError):
    """The inbound data itself is wrong; resending it unchanged will fail again."""

    dimse_status = 0xC000
    hl7_ack_code = "AR"


class DecodeError(InputError):
    dimse_status = 0xC210


class WaveformError(InputError):
    dimse_status = 0xC211
    hl7_ack_code = "AE"


class UnsupportedInputError(InputError):
    dimse_status = 0xA900


class ReportError(InputError):
    """A cardiologist's read (over-read) we cannot take: its structure is broken, not its ECG.

    A DICOM SR whose content tree violates the SR IOD (no root CONTAINER, an item without a
    value type, a CODE item without its code) is answered 0xA900: the data set does not
    match its SOP class.
    """

    dimse_status = 0xA900


class Hl7Error(InputError):
    """An HL7 v2 message we refuse or could not take, with what its ERR segment says.

    ``code`` is from HL7 table 0357; ``location`` an ERL (segment, sequence, field,
    repetition, component) as far as known; ``hl7_ack_code`` AR or AE.
    """

    def __init__(
        self, message: str, *, code: int, location: tuple[str | int, ...] = (), ack: str = "AR", kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.location = tuple(location)
        self.hl7_ack_code = ack
        self.kind = kind or "hl7_rejected"


class StorageError(EcgBridgeError):
    dimse_status = 0xA700
    retry = True


class ModelError(EcgBridgeError):
    pass


class MappingError(EcgBridgeError):
    """A pure conversion cannot produce a valid message from this result; resending cannot fix it.

    Raised by :mod:`ecgbridge.mapping`; a sender that meets it fails the delivery for good.
    """


class DeliveryError(EcgBridgeError):
    pass


class TransientDeliveryError(DeliveryError):
    retry = True


class DestinationBusy(TransientDeliveryError):
    """This process's sends to the destination were all busy for longer than a send may wait.

    Nothing was sent: the delivery is tried again later without spending an attempt (the
    receiver is slow, not failing; its own errors count).
    """

    retry_after_s = 5.0


class PermanentDeliveryError(DeliveryError):
    pass
