"""Per-patient delivery order: a later ECG of a patient waits while an earlier one may still go first.

Why: two worker processes analyse two ECGs of one patient side by side and the later one can
finish first; an EHR interface that files ORUs as they come would then hold the older ECG as
the patient's latest. Real parts: the store on SQLite and PostgreSQL, an MLLP receiver
(python-hl7's server) that records the order in which the ORUs came.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from ecgbridge.core.ordering import KEY_FILE, PATIENT_KEY_LENGTH, PatientKeys
from ecgbridge.core.settings import load_settings
from ecgbridge.core.states import DeliveryState, MessageState
from ecgbridge.core.store import MessageRow
from ecgbridge.worker.delivery import DeliveryClaimed, dead_letter, deliver_message
from ecgbridge.worker.jobs import WorkerContext, analyse_message
from tests.support.hl7_receiver import Hl7Receiver

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dicom" / "ptbxl_00024_norm_12lead.dcm"
EHR = "ehr-hl7"


def _ecg(patient_id: str) -> bytes:
    """The fixture ECG as a new SOP Instance of ``patient_id``."""
    ds = pydicom.dcmread(FIXTURE)
    ds.PatientID = patient_id
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def receiver() -> Iterator[Hl7Receiver]:
    with Hl7Receiver("AA") as r:
        yield r


def _context(tmp_path: Path, database_url: str | None, port: int, ordering: str = "per_patient") -> WorkerContext:
    config = tmp_path / "ecgbridge.yaml"
    storage = f"storage: {{database_url: '{database_url}'}}\n" if database_url else ""
    config.write_text(
        f"""data_dir: {tmp_path / "data"}
{storage}destinations:
  - {{name: {EHR}, type: hl7, host: 127.0.0.1, port: {port}, include_report_pdf: false, ordering: {ordering},
      connection: per_message}}
routes:
  - {{name: all-ecg, destinations: [{EHR}]}}
""",
        encoding="utf-8",
    )
    ctx = WorkerContext.create(load_settings(config))
    ctx.store.create_schema()
    return ctx


def _receive_key(ctx: WorkerContext, data: bytes) -> str | None:
    from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg

    patient = to_ecg(read_bytes(data)).patient
    return ctx.store.patient_keys.key_for(patient.id, patient.id_issuer)


def _receive(ctx: WorkerContext, data: bytes) -> str:
    """Record an ECG as the DICOM listener does (keyed by its patient), not yet analysed."""
    sha, size = ctx.store.save_blob(data)
    return ctx.store.record_message(
        source="dicom",
        blob_sha256=sha,
        blob_size=size,
        route="all-ecg",
        state=MessageState.QUEUED,
        patient_key=_receive_key(ctx, data),
    )


def _patient_ids(messages: list[str]) -> list[str]:
    """The PID-3 identifier of each received ORU, in the order they came."""
    ids = []
    for text in messages:
        pid = next(seg for seg in text.replace("\n", "\r").split("\r") if seg.startswith("PID|"))
        ids.append(pid.split("|")[3].split("^")[0])
    return ids


def test_a_later_ecg_waits_for_the_earlier_one_of_its_patient(
    tmp_path: Path, database_url: str | None, receiver: Hl7Receiver
) -> None:
    ctx = _context(tmp_path, database_url, receiver.port)
    first = _receive(ctx, _ecg("PAT-1"))
    second = _receive(ctx, _ecg("PAT-1"))
    other = _receive(ctx, _ecg("PAT-2"))

    # The later ECG is analysed first (another worker process is still on the earlier one).
    assert analyse_message(ctx, second) == [EHR]
    with pytest.raises(DeliveryClaimed):
        deliver_message(ctx, second, EHR)
    waiting = [e for e in ctx.store.events(second) if e.kind == "delivery_waiting"]
    assert len(waiting) == 1 and first in waiting[0].detail
    assert ctx.store.delivery(second, EHR).attempts == 0  # waiting spends no attempt
    # and the recovery sweep leaves it to its own task's retry instead of enqueuing copies of it
    assert (second, EHR) not in {(w.message_id, w.destination) for w in ctx.store.unfinished()}

    # Another patient's ECG is not held up by it.
    assert analyse_message(ctx, other) == [EHR]
    deliver_message(ctx, other, EHR)

    # Analysed but not yet delivered, the earlier ECG still holds the later one.
    assert analyse_message(ctx, first) == [EHR]
    with pytest.raises(DeliveryClaimed):
        deliver_message(ctx, second, EHR)
    assert len([e for e in ctx.store.events(second) if e.kind == "delivery_waiting"]) == 1  # said once

    deliver_message(ctx, first, EHR)
    deliver_message(ctx, second, EHR)
    assert _patient_ids(receiver.wait_received(3)) == ["PAT-2", "PAT-1", "PAT-1"]
    sent = receiver.received
    assert ctx.store.delivery(second, EHR).state == DeliveryState.DELIVERED
    # the two PAT-1 ORUs came in the order the ECGs were received
    assert _msh10(sent[1]) == _msh10_of(ctx, first) and _msh10(sent[2]) == _msh10_of(ctx, second)


def _msh10(text: str) -> str:
    return text.split("\r")[0].split("|")[9]


def _msh10_of(ctx: WorkerContext, message_id: str) -> str:
    from ecgbridge.outbound.hl7_sender import control_id

    return control_id(message_id, EHR, ctx.store.delivery(message_id, EHR).version or 1)


def test_an_earlier_ecg_that_failed_for_good_holds_nothing_up(
    tmp_path: Path, database_url: str | None, receiver: Hl7Receiver
) -> None:
    ctx = _context(tmp_path, database_url, receiver.port)
    first = _receive(ctx, _ecg("PAT-1"))
    second = _receive(ctx, _ecg("PAT-1"))
    assert analyse_message(ctx, first) == [EHR] and analyse_message(ctx, second) == [EHR]
    dead_letter(ctx, first, EHR, "the EHR was down for a day")
    deliver_message(ctx, second, EHR)
    assert len(receiver.wait_received(1)) == 1


def test_an_amended_result_of_an_earlier_ecg_holds_nothing_up(
    tmp_path: Path, database_url: str | None, receiver: Hl7Receiver
) -> None:
    """A re-analysis of last week's ECG (result version 2, pending) is a correction: today's ECG goes."""
    ctx = _context(tmp_path, database_url, receiver.port)
    first = _receive(ctx, _ecg("PAT-1"))
    second = _receive(ctx, _ecg("PAT-1"))
    assert analyse_message(ctx, first) == [EHR]
    deliver_message(ctx, first, EHR)
    ctx.store.revise_deliveries(first, [EHR], 2)  # its amended result waits to be sent
    assert ctx.store.delivery(first, EHR).state == DeliveryState.PENDING
    assert analyse_message(ctx, second) == [EHR]
    deliver_message(ctx, second, EHR)
    assert len(receiver.wait_received(2)) == 2
    assert not [e for e in ctx.store.events(second) if e.kind.startswith("delivery_waiting")]


def test_after_the_longest_wait_the_later_ecg_goes_and_says_so(
    tmp_path: Path, database_url: str | None, receiver: Hl7Receiver
) -> None:
    ctx = _context(tmp_path, database_url, receiver.port)
    first = _receive(ctx, _ecg("PAT-1"))
    second = _receive(ctx, _ecg("PAT-1"))
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    with ctx.store.session() as s, s.begin():  # the earlier ECG has sat unanalysed for an hour
        s.execute(update(MessageRow).where(MessageRow.id == first).values(received_at=long_ago))
    assert analyse_message(ctx, second) == [EHR]
    deliver_message(ctx, second, EHR)
    assert len(receiver.wait_received(1)) == 1
    ahead = [e for e in ctx.store.events(second) if e.kind == "delivery_out_of_order"]
    assert len(ahead) == 1 and first in ahead[0].detail


def test_ordering_none_sends_when_ready(tmp_path: Path, receiver: Hl7Receiver) -> None:
    ctx = _context(tmp_path, None, receiver.port, ordering="none")
    _receive(ctx, _ecg("PAT-1"))
    second = _receive(ctx, _ecg("PAT-1"))
    assert analyse_message(ctx, second) == [EHR]
    deliver_message(ctx, second, EHR)
    assert len(receiver.wait_received(1)) == 1


def test_a_file_without_a_key_is_keyed_by_the_worker(tmp_path: Path, receiver: Hl7Receiver) -> None:
    ctx = _context(tmp_path, None, receiver.port)
    data = _ecg("PAT-9")
    sha, size = ctx.store.save_blob(data)
    mid = ctx.store.record_message(source="file", blob_sha256=sha, blob_size=size, route="all-ecg")
    assert ctx.store.get(mid).patient_key is None
    analyse_message(ctx, mid)
    issuer = pydicom.dcmread(io.BytesIO(data)).get("IssuerOfPatientID")
    assert ctx.store.get(mid).patient_key == ctx.store.patient_keys.key_for("PAT-9", issuer)
    assert ctx.store.get(mid).patient_key == _receive_key(ctx, data)  # the key the DICOM listener gives it


def test_the_site_key_is_made_once_private_and_shared(tmp_path: Path) -> None:
    a, b = PatientKeys(tmp_path), PatientKeys(tmp_path)
    key = a.key_for("12345", "HOSP")
    assert key is not None and len(key) == PATIENT_KEY_LENGTH and "12345" not in key
    assert b.key_for("12345", "HOSP") == key  # a second process reads the same key
    assert a.key_for("12345", "OTHER") != key and a.key_for(" ", None) is None
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert PatientKeys(tmp_path / "elsewhere").key_for("12345", "HOSP") != key  # another site, other keys
    assert not [p for p in (tmp_path / KEY_FILE).parent.iterdir() if p.name.startswith(".")]  # no temp files left
    assert os.path.getsize(tmp_path / KEY_FILE) == 32
