"""Over-reads end to end: a cardiologist's read in over MLLP, DICOM or the inbox -> a versioned label on its ECG.

Real parts only: the MLLP and DICOM listeners on real sockets (in this process, with the real
handlers), python-hl7's ``mllp_send`` as the HL7 sender, pynetdicom as the DICOM sender, a real
redis-server for the ECGs' analysis queue, the message store on SQLite and on PostgreSQL. ECGs
are a real PTB-XL record (as an HL7 waveform ORU or a DICOM ECG object); the SRs are built with
pydicom; the inbox file is a real confirmed Philips export. Each bad input of issue #13 is a
test: an unknown ECG, conflicting reads, unknown statements, a preliminary read, a flood of
repeats, a malformed SR, and an ORU without waveform from a source that sends no reads.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from ecgbridge.core import labels
from ecgbridge.core.queue import Dispatcher, make_celery
from ecgbridge.core.settings import Settings, default_settings
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.gateway.dicom_scp import DicomGateway
from ecgbridge.gateway.inbox import InboxWatcher
from ecgbridge.gateway.mllp import MllpGateway
from ecgbridge.mapping.ecg import Ecg, Patient, Study
from ecgbridge.mapping.wfdb_record import read_wfdb
from tests.support.dicom_writer import ecg_to_dataset
from tests.support.hl7_waveform_writer import build_oru_waveform
from tests.support.overreads import build_sr, code_item, overread_oru, text_item
from tests.support.peers import need
from tests.support.processes import REPO, RedisServer
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration

WFDB = REPO / "tests" / "fixtures" / "wfdb" / "00024_lr.hea"  # PTB-XL, 100 Hz: the HL7 ECGs
WFDB_500 = REPO / "tests" / "fixtures" / "wfdb" / "E07506.hea"  # CinC 2021, 500 Hz: the DICOM ECGs
CONFIRMED_PHILIPS = REPO / "tests" / "fixtures" / "vendor" / "ad4d3d80-d165_1-04_orig.xml"
MLLP_SEND = Path(sys.executable).with_name("mllp_send")
READ_AE = "MUSEDCM"
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


def _id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8].upper()}"


@dataclass
class Deployment:
    store: MessageStore
    mllp: MllpGateway
    dicom: DicomGateway
    inbox: InboxWatcher
    inbox_dir: Path
    tmp: Path
    ecg: Ecg
    ecg_500: Ecg

    # ----- senders -------------------------------------------------------------------------------------
    def send_hl7(self, *messages: str) -> list[str]:
        """python-hl7's mllp_send over one connection; the ACKs' MSA-1 codes (and MSA-3 text), one per message."""
        if not MLLP_SEND.exists():
            need("python-hl7's mllp_send is not installed (pip install hl7)")
        path = self.tmp / f"send-{uuid.uuid4().hex[:8]}.hl7"
        path.write_bytes(b"".join(b"\x0b" + m.encode("utf-8") + b"\x1c\r" for m in messages))
        out = subprocess.run(
            [str(MLLP_SEND), "--file", str(path), "-p", str(self.mllp.port), "127.0.0.1"],
            capture_output=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr.decode(errors="replace")
        acks = [a.strip(b"\x0b\n").decode("utf-8") for a in out.stdout.split(b"\x1c\r") if a.strip(b"\x0b\n")]
        assert len(acks) == len(messages), acks
        return acks

    def hl7_ecg(self, *, patient_id: str, acquired_at: datetime, placer: str | None = None) -> str:
        """An ECG as an HL7 waveform ORU from a cart; its message id."""
        ecg = replace(self.ecg, patient=Patient(id=patient_id), study=Study(acquired_at=acquired_at))
        text = build_oru_waveform(ecg, control_id=_id("E"), placer_order_number=placer, encoding="UNICODE UTF-8")
        assert msa(self.send_hl7(text)[0]) == "AA"
        return self.by_bytes(text.encode("utf-8")).id

    def dicom_ecg(
        self,
        *,
        patient_id: str,
        acquired_at: datetime,
        accession: str | None = None,
        annotations: tuple[str, ...] = (),
        ae: str = "CART1",
    ) -> tuple[int, str]:
        """An ECG object over DICOM; (status, SOP Instance UID)."""
        uid = f"2.25.{uuid.uuid4().int}"
        ds = ecg_to_dataset(
            self.ecg_500,
            patient=Patient(id=patient_id),
            study=Study(sop_instance_uid=uid, acquired_at=acquired_at, accession_number=accession),
        )
        if annotations:
            items = []
            for text in annotations:
                item = Dataset()
                item.UnformattedTextValue = text
                item.ReferencedWaveformChannels = [1, 0]
                item.AnnotationGroupNumber = 0
                items.append(item)
            ds.WaveformAnnotationSequence = DicomSequence(items)
        return send_dicom(self.dicom.port, [ds], ae_title=ae)[0], uid

    def send_sr(self, ds: Dataset, ae: str = READ_AE) -> int:
        return send_dicom(self.dicom.port, [ds], ae_title=ae)[0]

    # ----- looking -------------------------------------------------------------------------------------
    def by_bytes(self, data: bytes) -> MessageRow:
        """The message stored for these bytes (an HL7 message by its MSH-10: senders may trim the last CR)."""
        if data.startswith(b"MSH"):
            control = data.split(b"\r", 1)[0].split(b"|")[9]
            rows = [
                r for r in self.store.list(limit=0) if control in self.store.read_blob(r.blob_sha256).split(b"\r")[0]
            ]
        else:
            rows = [r for r in self.store.list(limit=0) if r.blob_sha256 == hashlib.sha256(data).hexdigest()]
        assert len(rows) == 1, rows
        return rows[0]

    def by_uid(self, uid: str) -> MessageRow:
        rows = [r for r in self.store.list(limit=0) if r.sop_instance_uid == uid]
        assert len(rows) == 1, rows
        return rows[0]

    def events(self, message_id: str, kind: str) -> list[str]:
        return [e.detail for e in self.store.events(message_id) if e.kind == kind]


def msa(ack: str) -> str:
    return next(s.split("|")[1] for s in ack.split("\r") if s.startswith("MSA"))


@pytest.fixture
def deployment(tmp_path: Path, database_url: str | None, redis_server: RedisServer) -> Iterator[Deployment]:
    data = default_settings().model_dump(exclude={"source_file"})
    data["data_dir"] = str(tmp_path / "data")
    data["listeners"]["mllp"].update({"port": 0})
    data["listeners"]["dicom"].update({"port": 0})
    inbox_dir = tmp_path / "inbox"
    inbox_dir.mkdir()
    data["listeners"]["inbox"] = {"enabled": True, "path": str(inbox_dir), "settle_s": 0}
    data["broker"] = {"url": redis_server.url}
    data["overreads"] = {
        "hl7_sending_applications": ["MUSE"],
        "dicom_calling_ae_titles": [READ_AE],
        "inbox": True,
        "link_window_min": 10,
    }
    settings = Settings.model_validate(data)
    store = MessageStore(database_url or f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "data")
    store.create_schema()
    dispatcher = Dispatcher(make_celery(settings))
    mllp = MllpGateway(settings, store, dispatcher)
    dicom = DicomGateway(settings, store, dispatcher)
    mllp.start()
    dicom.start()
    ecgs = read_wfdb(WFDB), read_wfdb(WFDB_500)
    try:
        yield Deployment(store, mllp, dicom, InboxWatcher(settings, store, dispatcher), inbox_dir, tmp_path, *ecgs)
    finally:
        mllp.stop()
        dicom.stop()
        store.engine.dispose()


# ----- linking -----------------------------------------------------------------------------------------
def test_an_oru_read_is_acknowledged_and_labels_the_ecg_of_its_order(deployment: Deployment) -> None:
    placer = _id("PL")
    ecg_id = deployment.hl7_ecg(patient_id="MRN-A", acquired_at=T0, placer=placer)
    read = overread_oru(_id("R"), ["SINUS RHYTHM", "ANTERIOR INFARCT, AGE UNDETERMINED"], placer=placer)
    assert msa(deployment.send_hl7(read)[0]) == "AA"
    carrier = deployment.by_bytes(read.encode())
    assert carrier.state == "processed" and "overread" in carrier.flags
    current = labels.current_label(deployment.store, ecg_id)
    assert current is not None and current.message_id == carrier.id and current.link_rule == "order"
    assert current.labels == {"NORM": 0, "MI": 1, "STTC": 0, "CD": 0, "HYP": 0}
    assert (current.severity4, current.reader) == ("major_nonurgent", "Heart Anna")
    assert deployment.events(ecg_id, "overread_linked") and deployment.events(carrier.id, "overread_recorded")
    assert deployment.store.get(ecg_id).state == "queued"  # the ECG itself is analysed as before


def test_an_oru_read_links_by_the_sop_instance_uid_it_names(deployment: Deployment) -> None:
    status, uid = deployment.dicom_ecg(patient_id="MRN-B", acquired_at=T0)
    assert status == 0
    read = overread_oru(_id("R"), ["RIGHT BUNDLE BRANCH BLOCK"], sop_instance_uid=uid, patient_id="MRN-B")
    assert msa(deployment.send_hl7(read)[0]) == "AA"
    current = labels.current_label(deployment.store, deployment.by_uid(uid).id)
    assert current is not None and current.link_rule == "sop_instance_uid" and current.labels["CD"] == 1


def test_an_oru_read_links_by_patient_and_acquisition_time_within_the_window(
    deployment: Deployment, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="ecgbridge")
    ecg_id = deployment.hl7_ecg(patient_id="MRN-C", acquired_at=T0)
    deployment.hl7_ecg(patient_id="MRN-OTHER", acquired_at=T0 + timedelta(minutes=1))  # another patient, same time
    read = overread_oru(
        _id("R"), ["LEFT BUNDLE BRANCH BLOCK"], patient_id="MRN-C", acquired_at=T0 + timedelta(minutes=4)
    )
    late = overread_oru(_id("R"), ["NORMAL ECG"], patient_id="MRN-C", acquired_at=T0 + timedelta(minutes=25))
    assert [msa(a) for a in deployment.send_hl7(read, late)] == ["AA", "AA"]
    current = labels.current_label(deployment.store, ecg_id)
    assert current is not None and current.link_rule == "patient_time" and current.labels["CD"] == 1
    outside = labels.overread_of_message(deployment.store, deployment.by_bytes(late.encode()).id)
    assert outside is not None and outside.ecg_message_id is None
    assert outside.unlinked_reason == "no ECG found by its patient within 10 min of its acquisition time"
    assert "MRN-C" not in caplog.text and "Doe" not in caplog.text  # the patient is compared, never logged
    assert "over-read" in caplog.text


def test_two_ecgs_of_the_patient_in_the_window_leave_the_read_unlinked_as_ambiguous(deployment: Deployment) -> None:
    first = deployment.hl7_ecg(patient_id="MRN-D", acquired_at=T0)
    second = deployment.hl7_ecg(patient_id="MRN-D", acquired_at=T0 + timedelta(minutes=6))  # a repeated tracing
    read = overread_oru(_id("R"), ["SINUS RHYTHM"], patient_id="MRN-D", acquired_at=T0 + timedelta(minutes=3))
    assert msa(deployment.send_hl7(read)[0]) == "AA"
    stored = labels.overread_of_message(deployment.store, deployment.by_bytes(read.encode()).id)
    assert stored is not None and stored.ecg_message_id is None
    assert stored.unlinked_reason == "ambiguous: 2 ECGs of the patient within 10 min"
    assert (
        labels.current_label(deployment.store, first) is None and labels.current_label(deployment.store, second) is None
    )


def test_a_read_of_an_unknown_ecg_is_stored_unlinked_reported_and_linked_once_the_ecg_comes(
    deployment: Deployment,
) -> None:
    placer = _id("PL")
    read = overread_oru(_id("R"), ["LEFT VENTRICULAR HYPERTROPHY"], placer=placer)
    assert msa(deployment.send_hl7(read)[0]) == "AA"
    carrier = deployment.by_bytes(read.encode())
    stored = labels.overread_of_message(deployment.store, carrier.id)
    assert stored is not None and stored.state == "unlinked"
    assert stored.unlinked_reason == "no ECG found by its order or accession number"
    assert deployment.events(carrier.id, "overread_unlinked")
    assert [r.id for r in labels.overreads(deployment.store, unlinked=True)] == [stored.id]
    assert labels.counts(deployment.store)["unlinked"] == 1
    ecg_id = deployment.hl7_ecg(patient_id="MRN-E", acquired_at=T0, placer=placer)
    assert labels.relink(deployment.store, window_min=10) == [stored.id]
    current = labels.current_label(deployment.store, ecg_id)
    assert current is not None and current.id == stored.id and current.labels["HYP"] == 1


# ----- versions ----------------------------------------------------------------------------------------
def test_a_corrected_read_supersedes_the_final_one_and_the_history_is_kept(deployment: Deployment) -> None:
    placer = _id("PL")
    ecg_id = deployment.hl7_ecg(patient_id="MRN-F", acquired_at=T0, placer=placer)
    final = overread_oru(_id("R"), ["NORMAL ECG"], placer=placer, read_at=T0 + timedelta(hours=1))
    corrected = overread_oru(
        _id("R"), ["INFERIOR INFARCT, AGE UNDETERMINED"], placer=placer, status="C", read_at=T0 + timedelta(hours=2)
    )
    older = overread_oru(  # a read signed before both, arriving last: it must not displace them
        _id("R"), ["LEFT BUNDLE BRANCH BLOCK"], placer=placer, read_at=T0 + timedelta(minutes=30)
    )
    assert [msa(a) for a in deployment.send_hl7(final, corrected, older)] == ["AA", "AA", "AA"]
    history = labels.history(deployment.store, ecg_id)
    assert [(r.status, r.state) for r in history] == [("F", "superseded"), ("F", "superseded"), ("C", "current")]
    assert [r.statements[0]["text"] for r in history] == [
        "LEFT BUNDLE BRANCH BLOCK",
        "NORMAL ECG",
        "INFERIOR INFARCT, AGE UNDETERMINED",
    ]
    assert history[0].superseded_by == history[1].id and history[1].superseded_by == history[2].id
    current = labels.current_label(deployment.store, ecg_id)
    assert current is not None and current.status == "C" and current.labels["MI"] == 1 and current.labels["NORM"] == 0
    # two conflicting final reads: the latest wins
    latest = overread_oru(_id("R"), ["NORMAL ECG", "SINUS RHYTHM"], placer=placer, read_at=T0 + timedelta(hours=3))
    assert msa(deployment.send_hl7(latest)[0]) == "AA"
    current = labels.current_label(deployment.store, ecg_id)
    assert current is not None and current.status == "F" and current.labels["NORM"] == 1
    assert [e.ecg_message_id for e in labels.labelled_ecgs(deployment.store)] == [ecg_id]


def test_a_preliminary_read_is_stored_acknowledged_and_never_a_label(deployment: Deployment) -> None:
    placer = _id("PL")
    ecg_id = deployment.hl7_ecg(patient_id="MRN-G", acquired_at=T0, placer=placer)
    read = overread_oru(_id("R"), ["ATRIAL FIBRILLATION"], placer=placer, status="P")
    assert msa(deployment.send_hl7(read)[0]) == "AA"
    assert labels.current_label(deployment.store, ecg_id) is None
    [stored] = labels.history(deployment.store, ecg_id)
    assert (stored.status, stored.is_label, stored.state) == ("P", False, "not a label")
    assert labels.labelled_ecgs(deployment.store) == []


def test_statements_no_table_knows_are_counted_and_listed(deployment: Deployment) -> None:
    placer = _id("PL")
    ecg_id = deployment.hl7_ecg(patient_id="MRN-H", acquired_at=T0, placer=placer)
    read = overread_oru(_id("R"), ["SINUS RHYTHM", "WOBBLY BASELINE HUMPS", "LEFT AXIS DEVIATION"], placer=placer)
    assert msa(deployment.send_hl7(read)[0]) == "AA"
    current = labels.current_label(deployment.store, ecg_id)
    assert current is not None and current.unmatched == ["WOBBLY BASELINE HUMPS"] and current.severity4 is None
    assert labels.unmatched_statements(deployment.store) == [("WOBBLY BASELINE HUMPS", 1)]
    assert labels.counts(deployment.store)["with_unmatched"] == 1
    assert deployment.events(deployment.by_bytes(read.encode()).id, "overread_unmatched")
    [entry] = labels.labelled_ecgs(deployment.store)
    assert entry.complete is False and entry.labels is None  # names no diagnostic class


def test_a_flood_of_twenty_identical_reads_is_one_label_and_nineteen_duplicates(deployment: Deployment) -> None:
    placer = _id("PL")
    ecg_id = deployment.hl7_ecg(patient_id="MRN-I", acquired_at=T0, placer=placer)
    flood = [overread_oru(_id("R"), ["SINUS RHYTHM", "FIRST DEGREE AV BLOCK"], placer=placer) for _ in range(20)]
    assert {msa(a) for a in deployment.send_hl7(*flood)} == {"AA"}
    history = labels.history(deployment.store, ecg_id)
    assert len(history) == 20
    originals = [r for r in history if r.duplicate_of is None]
    assert len(originals) == 1 and originals[0].current
    assert all(r.duplicate_of == originals[0].id and r.state == "duplicate" for r in history if r is not originals[0])
    assert labels.counts(deployment.store)["duplicates"] == 19
    # the same bytes again (a sender that missed the ACK): caught before the read, recorded once
    assert msa(deployment.send_hl7(flood[0])[0]) == "AA"
    assert len(labels.history(deployment.store, ecg_id)) == 20
    assert deployment.events(deployment.by_bytes(flood[0].encode()).id, "duplicate_received")


# ----- what is refused --------------------------------------------------------------------------------
def test_an_oru_without_waveform_from_a_source_not_named_is_still_refused(deployment: Deployment) -> None:
    read = overread_oru(_id("R"), ["SINUS RHYTHM"], sending="CARTS")
    [ack] = deployment.send_hl7(read)
    assert msa(ack) == "AR" and "carries no waveform" in ack
    assert deployment.by_bytes(read.encode()).state == "rejected" and labels.counts(deployment.store)["total"] == 0


# ----- DICOM -------------------------------------------------------------------------------------------
def test_an_sr_over_dicom_is_the_label_of_the_ecg_it_references(deployment: Deployment) -> None:
    status, uid = deployment.dicom_ecg(patient_id="MRN-J", acquired_at=T0)
    assert status == 0
    sr = build_sr(
        [text_item("SINUS RHYTHM"), code_item("164873001", "SCT", "Left ventricular hypertrophy")],
        referenced=("1.2.840.10008.5.1.4.1.1.9.1.1", uid),
        patient_id="MRN-J",
    )
    assert deployment.send_sr(sr) == 0x0000
    assert deployment.send_sr(sr) == 0x0000  # sent again: answered, recorded once
    carrier = deployment.by_uid(str(sr.SOPInstanceUID))
    assert carrier.state == "processed" and carrier.sop_class_uid == SR_CLASS
    current = labels.current_label(deployment.store, deployment.by_uid(uid).id)
    assert current is not None and current.kind == "sr" and current.link_rule == "sop_instance_uid"
    assert current.labels["HYP"] == 1 and current.reader == "Heart Anna"
    assert len(labels.history(deployment.store, deployment.by_uid(uid).id)) == 1


def test_an_sr_links_by_accession_number(deployment: Deployment) -> None:
    accession = _id("A")
    status, uid = deployment.dicom_ecg(patient_id="MRN-K", acquired_at=T0, accession=accession)
    assert status == 0
    sr = build_sr([text_item("ATRIAL FLUTTER")], accession=accession, patient_id="MRN-K")
    assert deployment.send_sr(sr) == 0x0000
    current = labels.current_label(deployment.store, deployment.by_uid(uid).id)
    assert current is not None and current.link_rule == "order" and current.severity4 == "major_nonurgent"


def test_an_sr_with_a_malformed_content_tree_is_refused_with_a_clear_status_and_an_error_record(
    deployment: Deployment,
) -> None:
    sr = build_sr([text_item("SINUS RHYTHM")])
    del sr.ContentSequence[1].ContentSequence[0].ValueType
    assert deployment.send_sr(sr) == 0xA900
    row = deployment.by_uid(str(sr.SOPInstanceUID))
    assert row.state == "rejected" and "has no ValueType" in (row.error or "")
    assert deployment.events(row.id, "ReportError") and labels.counts(deployment.store)["total"] == 0


def test_an_sr_from_an_ae_that_sends_no_reads_is_refused(deployment: Deployment) -> None:
    sr = build_sr([text_item("SINUS RHYTHM")])
    assert deployment.send_sr(sr, ae="CART1") == 0x0122
    row = deployment.by_uid(str(sr.SOPInstanceUID))
    assert row.state == "rejected" and deployment.events(row.id, "UnsupportedInputError")


def test_an_annotated_ecg_from_an_overread_source_is_analysed_and_is_its_own_read(deployment: Deployment) -> None:
    status, uid = deployment.dicom_ecg(
        patient_id="MRN-L", acquired_at=T0, annotations=("SINUS RHYTHM", "LEFT BUNDLE BRANCH BLOCK"), ae=READ_AE
    )
    assert status == 0
    row = deployment.by_uid(uid)
    assert row.state == "queued" and "overread" in row.flags
    current = labels.current_label(deployment.store, row.id)
    assert current is not None and current.link_rule == "self" and current.labels["CD"] == 1
    status, plain = deployment.dicom_ecg(patient_id="MRN-L", acquired_at=T0, annotations=("SINUS RHYTHM",))
    assert status == 0 and labels.current_label(deployment.store, deployment.by_uid(plain).id) is None  # a cart's


# ----- inbox -------------------------------------------------------------------------------------------
def test_a_confirmed_philips_export_in_the_inbox_is_an_ecg_and_its_read(deployment: Deployment) -> None:
    shutil.copy(CONFIRMED_PHILIPS, deployment.inbox_dir / "confirmed.xml")
    assert deployment.inbox.scan_once() == 1
    row = deployment.by_bytes(CONFIRMED_PHILIPS.read_bytes())
    assert row.state == "queued"
    current = labels.current_label(deployment.store, row.id)
    assert current is not None and current.kind == "philips_xml" and current.link_rule == "self"
    assert current.labels == {"NORM": 1, "MI": 0, "STTC": 0, "CD": 0, "HYP": 0}
    assert current.reader and current.severity4 == "minor_abnormality"
    assert (deployment.inbox_dir / "done" / "confirmed.xml").exists()
