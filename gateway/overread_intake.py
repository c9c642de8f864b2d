"""Over-reads that arrive by DICOM or as files: SR objects, annotated ECG objects, confirmed vendor XML.

The HL7 path is in :mod:`ecgbridge.gateway.hl7_inbound`; the rules (what a label is, how a
read finds its ECG, versions, duplicates) are :mod:`ecgbridge.core.labels`'. Here:

- :func:`accept_sr`: a DICOM SR (Basic Text, Enhanced, Comprehensive) from a calling AE title
  named in ``overreads.dicom_calling_ae_titles`` is stored (bytes already fsync'ed by the
  listener), recorded ``received``, its read stored, then ``processed``; only then 0x0000.
  From another AE it is refused 0x0122 (SOP class not supported: we take SRs only from
  over-read sources); a content tree that is not a valid SR tree 0xA900 (the data set does
  not match its SOP class), unreadable bytes 0xC210; each with a ``rejected`` message and its
  error event. The identical SR sent again (same SOP Instance, same bytes) is answered 0x0000
  and recorded once.
- :func:`record_self_read`: an ECG (DICOM object from an over-read AE, vendor XML export in the
  inbox) that carries its confirmed statements is admitted and analysed as any ECG, *and* those
  statements are stored as a read of that very ECG (it references its own SOP Instance UID).
  Idempotent: a message whose read is stored already gets no second one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.labels import Recorded, overread_of_message, record_overread, self_read
from ecgbridge.core.states import MessageState, Source
from ecgbridge.errors import DecodeError, InputError
from ecgbridge.mapping.dicom_waveform import read_bytes
from ecgbridge.mapping.ecg import Ecg
from ecgbridge.mapping.overread_readers import Read, read_sr

__all__ = ["SrOutcome", "accept_sr", "record_self_read", "SOP_CLASS_NOT_SUPPORTED"]

log = logging.getLogger("ecgbridge.overreads")

#: C-STORE failure "Refused: SOP Class not supported" (PS3.7 C.4.2.1.3 / 9.1.1.1.9).
SOP_CLASS_NOT_SUPPORTED = 0x0122


@dataclass(frozen=True)
class SrOutcome:
    """The DIMSE status to answer, its comment, and the message (None when nothing was recorded)."""

    status: int
    comment: str
    message_id: str | None = None


def accept_sr(intake: Intake, data: bytes, arrival: Arrival, calling: str) -> SrOutcome:
    """One stored SR object -> its read stored, and the answer (see the module docstring)."""
    overread_settings = intake.settings.overreads
    if not overread_settings.dicom_source(calling):
        error = (
            f"a structured report from calling AE {calling[:16]!r}, which overreads.dicom_calling_ae_titles does not "
            "name: SRs are taken only from over-read sources"
        )
        mid = intake.reject(arrival, error, "UnsupportedInputError")
        return SrOutcome(SOP_CLASS_NOT_SUPPORTED, "SR taken only from over-read sources", mid)
    store = intake.store
    for row in store.find_by_blob(arrival.blob_sha256, Source.DICOM):
        if row.sop_instance_uid == arrival.sop_instance_uid and row.state == MessageState.PROCESSED:
            store.add_event(
                row.id,
                "duplicate_received",
                f"the same SR was received again from {arrival.remote}; answered success, not recorded again",
                level="info",
            )
            return SrOutcome(0x0000, "", row.id)
    try:
        ds = read_bytes(data)
        read = read_sr(ds)
    except InputError as exc:
        mid = intake.reject(arrival, str(exc), type(exc).__name__)
        log.warning("SR %s from %s rejected: %s", arrival.sop_instance_uid, calling, type(exc).__name__)
        return SrOutcome(exc.dimse_status, str(exc), mid)
    except Exception as exc:  # pydicom on a data set it cannot walk
        failure = DecodeError(f"the SR could not be read ({type(exc).__name__})")
        mid = intake.reject(arrival, str(failure), "DecodeError")
        return SrOutcome(failure.dimse_status, str(failure), mid)
    mid = store.record_message(
        source=Source.DICOM,
        remote=arrival.remote,
        sop_class_uid=arrival.sop_class_uid,
        sop_instance_uid=arrival.sop_instance_uid,
        blob_sha256=arrival.blob_sha256,
        blob_size=arrival.blob_size,
        state=MessageState.RECEIVED,
        flags=["overread"],
    )
    recorded = record_overread(
        store, read, message_id=mid, source=Source.DICOM, sender=calling, window_min=overread_settings.link_window_min
    )
    store.set_state(mid, MessageState.PROCESSED)
    log.info(
        "SR %s from %s stored as message %s: over-read %d (%s)",
        arrival.sop_instance_uid,
        calling,
        mid,
        recorded.overread.id,
        recorded.outcome,
    )
    return SrOutcome(0x0000, "", mid)


def record_self_read(
    intake: Intake, message_id: str, read: Read, ecg: Ecg, *, source: str, sender: str | None
) -> Recorded | None:
    """Store ``read`` (carried inside the ECG of ``message_id``) as a read of that ECG, once."""
    if overread_of_message(intake.store, message_id) is not None:
        return None
    linked = self_read(read, ecg.study.sop_instance_uid, ecg.study.acquired_at, ecg.patient.id, ecg.patient.id_issuer)
    intake.store.add_flags(message_id, ["overread"])
    return record_overread(
        intake.store,
        linked,
        message_id=message_id,
        source=source,
        sender=sender,
        window_min=intake.settings.overreads.link_window_min,
        of_itself=True,
    )
