"""No patient data in any log line or audit row, whatever path a message takes.

Every piece of patient data sent (names, ids, birth dates, order numbers, free texts, and
what peers quote back about the patient) is a marker: one run token (letters that never
occur in hex ids, UUIDs or UIDs) plus what it is and which message carried it, so a leak
names its path. The messages go through every listener for real: DICOM by pynetdicom,
HL7 ORU, ORM, ADT and refused messages over MLLP, files in the inbox. They reach the
failure paths too: rejections (broken waveforms, an object with no waveform, a bad MSH,
a broken OBX, an unsupported type, an oversized frame), an EHR context source that is
down and one that refuses quoting the patient, a FHIR destination refusing with an
OperationOutcome quoting the patient, another answering 503 likewise until dead-lettered,
an HL7 destination answering AE quoting the patient until dead-lettered, identical and
changed resends, and an over-long order number (on PostgreSQL an unexpected database
error, the one unexpected-exception path real input reaches). An admin then looks at
everything in the console and acts on it.

Gateway and worker run at DEBUG. Then the WHOLE log of every process is read (not the
tail ``Stack.logs()`` shows) and every audit row, and no marker may be in any of them.
"""

from __future__ import annotations

import copy
import random
import socket
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.conftest import FIXTURES
from tests.support.console import PASSWORD, login
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.http_peers import FaultProxy, closed_port_url
from tests.support.processes import REPO, wait_for
from tests.support.stack import Stack, send_dicom

pytestmark = pytest.mark.integration

WFDB = REPO / "tests" / "fixtures" / "wfdb" / "00024_lr.hea"
PHILIPS = FIXTURES / "vendor" / "129DYPRG.XML"
#: Upper-case letters outside A-F: no hex digest, UUID, UID or timestamp can contain the token.
RUN = "ZQ" + "".join(random.choices("GHJKMNPRSTUVWXY", k=6))
BORN = date(1900 + random.randrange(5, 40), random.randrange(1, 13), random.randrange(1, 29))
#: The birth date as it may be written: DICOM / HL7, ISO, and the two common local forms.
BORN_FORMS = (
    BORN.strftime("%Y%m%d"),
    BORN.isoformat(),
    BORN.strftime("%d.%m.%Y"),
    BORN.strftime("%m/%d/%Y"),
)
MAX_HL7_BYTES = 256 * 1024
LONG = "X" * 70  # longer than any order-number column (64)


def phi(what: str, path: str) -> str:
    """A marker: the run token, what it stands for, the message that carries it."""
    return f"{RUN}{what}{path}"


def peer_quote(path: str) -> str:
    """What an EHR says when it quotes the patient back (diagnostics, ERR-8)."""
    return (
        f"Patient {phi('FAM', path)}^{phi('GIV', path)} ({phi('MRN', path)}, born {BORN.isoformat()}) "
        f"has no open order {phi('PLC', path)}: {phi('TXT', path)}"
    )


def outcome(path: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": peer_quote(path)}],
    }


# ----- DICOM ---------------------------------------------------------------------------------------------
def _dicom(path: Path, tag: str, *, placer: str | None = None, born: str | None = None) -> Dataset:
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = f"{phi('FAM', tag)}^{phi('GIV', tag)}"
    ds.PatientID = phi("MRN", tag)
    ds.OtherPatientIDs = phi("OID", tag)
    ds.PatientBirthDate = born or BORN.strftime("%Y%m%d")
    ds.PlacerOrderNumberImagingServiceRequest = placer or phi("PLC", tag)
    ds.FillerOrderNumberImagingServiceRequest = phi("FIL", tag)
    ds.AccessionNumber = phi("ACC", tag)
    ds.ReferringPhysicianName = phi("DOC", tag)
    ds.PatientComments = f"free text {phi('TXT', tag)}"
    ds.AdditionalPatientHistory = f"history {phi('HIS', tag)}"
    ds.StudyDescription = phi("DSC", tag)
    return ds


def _send_dicom(stack: Stack, ecg_path: Path, long_values_fail: bool) -> None:
    good = _dicom(ecg_path, "D1")
    truncated = _dicom(ecg_path, "D2")
    truncated.WaveformSequence[0].WaveformData = truncated.WaveformSequence[0].WaveformData[:1000]
    no_waveform = _dicom(ecg_path, "D3")  # an ECG SOP class holding no ECG
    del no_waveform.WaveformSequence
    long_order = _dicom(ecg_path, "D4", placer=phi("PLC", "D4") + LONG)
    bad_birth = _dicom(ecg_path, "D5", born=phi("DOB", "D5"))
    changed = copy.deepcopy(good)  # the same SOP Instance, other content
    changed.PatientComments = f"corrected {phi('TXT', 'D6')}"
    statuses = send_dicom(stack.port, [good, truncated, no_waveform, long_order, bad_birth, good, changed])
    assert statuses[0] == 0x0000
    assert 0xC000 <= statuses[1] <= 0xCFFF and 0xC000 <= statuses[2] <= 0xCFFF, [hex(s) for s in statuses]
    assert statuses[3] == (0xC001 if long_values_fail else 0x0000), hex(statuses[3])
    assert statuses[4:] == [0x0000, 0x0000, 0x0000]


# ----- HL7 over MLLP ---------------------------------------------------------------------------------------
def _pid(tag: str, born: str | None = None) -> str:
    return (
        f"PID|1||{phi('MRN', tag)}^^^HOSP^MR~{phi('OID', tag)}^^^OTHER^PI||{phi('FAM', tag)}^{phi('GIV', tag)}"
        f"||{born or BORN.strftime('%Y%m%d')}|F|||{phi('ADR', tag)} Street^^Springfield||555{phi('TEL', tag)}"
    )


def _oru(tag: str, *, placer: str | None = None, born: str | None = None) -> str:
    """An ORU^R01 with a real 12-lead (PTB-XL) waveform, patient and order fields all markers."""
    from ecgbridge.mapping.ecg import Patient
    from ecgbridge.mapping.wfdb_record import read_wfdb
    from tests.support.hl7_waveform_writer import build_oru_waveform

    patient = Patient(id=phi("MRN", tag), name=f"{phi('FAM', tag)}^{phi('GIV', tag)}", birth_date=BORN.isoformat())
    text = build_oru_waveform(
        replace(read_wfdb(WFDB), patient=patient),
        control_id=f"C{tag}{uuid.uuid4().hex[:8]}",
        placer_order_number=placer or phi("PLC", tag),
        filler_order_number=phi("FIL", tag),
    )
    segments = text.rstrip("\r").split("\r")
    segments = [_pid(tag, born) if s.startswith("PID|") else s for s in segments]
    at = next(i for i, s in enumerate(segments) if s.startswith("OBR|"))
    segments.insert(at + 1, f"NTE|1||chest pain since Tuesday, {phi('TXT', tag)}")
    return "\r".join(segments) + "\r"


def _break_one_channel(message: str) -> str:
    """Halve the samples of the last NA/MA OBX: a waveform the reader must refuse (AE)."""
    segments = message.split("\r")
    i = [n for n, s in enumerate(segments) if s.startswith("OBX|") and s.split("|")[2] in ("NA", "MA")][-1]
    parts = segments[i].split("|")
    rep = "~" if "~" in parts[5] else "^"
    values = parts[5].split(rep)
    parts[5] = rep.join(values[: len(values) // 2])
    segments[i] = "|".join(parts)
    return "\r".join(segments)


def _msh(kind: str, control: str, sep: str = "^~\\&") -> str:
    return f"MSH|{sep}|HIS|HOSP|ECGBRIDGE|CARDIO|20260301101500+0100||{kind}|{control}|P|2.5.1"


def _orm(tag: str) -> str:
    return (
        "\r".join(
            [
                _msh("ORM^O01^ORM_O01", f"O{tag}{uuid.uuid4().hex[:8]}"),
                _pid(tag),
                f"PV1|1|O|CARD^101^1||||{phi('DOC', tag)}^Smith^John||||||||||||VN{phi('VIS', tag)}^^^HOSP^VN",
                f"ORC|NW|{phi('PLC', tag)}^HIS|{phi('FIL', tag)}^ECG||SC||||20260301100000|||1234^{phi('DOC', tag)}",
                f"OBR|1|{phi('PLC', tag)}^HIS|{phi('FIL', tag)}^ECG|93000^EKG 12 lead^CPT",
                f"NTE|1||{phi('TXT', tag)}",
            ]
        )
        + "\r"
    )


def _hl7_messages() -> list[tuple[str, bytes, str]]:
    """(tag, bytes, the MSA-1 expected) for every HL7 path."""
    good = _oru("H1")
    big_obx = "OBX|9|ED|PDF^Report^L||^application^pdf^Base64^" + "QUJD" * (MAX_HL7_BYTES // 4 + 10)
    return [
        ("H1", good.encode(), "AA"),
        ("H1", good.encode(), "AA"),  # resent unchanged: acknowledged, not recorded again
        ("H2", _orm("H2").encode(), "AA"),
        ("H3", (_msh("ORU^R01^ORU_R01", "M3", sep="^~") + "\r" + _pid("H3") + "\r").encode(), "AR"),
        ("H4", _break_one_channel(_oru("H4")).encode(), "AE"),
        (
            "H5",
            (_msh("QRY^A19^QRY_A19", "U5") + f"\rQRD|20260301|R|I|Q1|||1^RD|{phi('MRN', 'H5')}|DEM\r").encode(),
            "AR",
        ),
        ("H6", (_msh("ADT^A08^ADT_A01", "A6") + "\rEVN|A08\r" + _pid("H6") + "\r").encode(), "AA"),
        ("H7", _oru("H7", placer=phi("PLC", "H7") + LONG).encode(), "AA"),  # AE on PostgreSQL
        ("H8", _oru("H8", born=phi("DOB", "H8")).encode(), "AA"),
        ("H9", (_oru("H9").rstrip("\r") + "\r" + big_obx + "\r").encode(), "AR"),  # over max_message_bytes
    ]


def _frame(payload: bytes) -> bytes:
    return b"\x0b" + payload + b"\x1c\r"


def _mllp(port: int, messages: list[bytes]) -> list[str]:
    """Send each message over one connection; the MSA-1 of each ACK."""
    codes = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for raw in messages:
            sock.sendall(_frame(raw))
            buf = b""
            while not buf.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                assert chunk, "the gateway closed the connection before its ACK"
                buf += chunk
            ack = buf.strip(b"\x0b").removesuffix(b"\x1c\r").decode("latin-1")
            msa = next(s for s in ack.split("\r") if s.startswith("MSA|")).split("|")
            codes.append(msa[1])
    return codes


# ----- the inbox --------------------------------------------------------------------------------------------
def _philips(tag: str) -> bytes:
    xml = PHILIPS.read_text(encoding="utf-8")
    edits = {
        "<patientid>1112010721168bdc</patientid>": f"<patientid>{phi('MRN', tag)}</patientid>",
        "<lastname></lastname>": f"<lastname>{phi('FAM', tag)}</lastname>",
        "<firstname></firstname>": f"<firstname>{phi('GIV', tag)}</firstname>",
        "<age><years>50</years></age>": f"<age><years>50</years><dateofbirth>{BORN.isoformat()}</dateofbirth></age>",
        "<value>1112010721168bdc</value>": f"<value>{phi('TXT', tag)}</value>",
    }
    for old, new in edits.items():
        assert old in xml, old
        xml = xml.replace(old, new)
    return xml.encode("utf-8")


def _drop(folder: Path, name: str, data: bytes) -> None:
    partial = folder / (name + ".part")
    partial.write_bytes(data)
    partial.replace(folder / name)


# ----- the console ------------------------------------------------------------------------------------------
def _look_and_act(stack: Stack) -> None:
    """What an admin does in the console: search by order number, open everything, retry, re-analyse, explain."""
    from ecgbridge.core.accounts import AccountStore, Role

    AccountStore(stack.store()).create_user("admin", PASSWORD, Role.ADMIN)
    store = stack.store()
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.console_port}", timeout=60) as client:
        csrf = login(client, "admin")
        headers = {"X-CSRF-Token": csrf}
        for q in (phi("PLC", "D1"), phi("MRN", "D1")):
            assert client.get("/api/messages", params={"q": q}).status_code == 200
            assert client.get("/messages", params={"q": q}).status_code == 200
        for row in store.list(limit=1000):
            assert client.get(f"/api/messages/{row.id}").status_code == 200
            assert client.get(f"/messages/{row.id}").status_code == 200
            assert client.get(f"/api/messages/{row.id}/raw").status_code in (200, 410)
            if store.get_result(row.id) is not None:
                assert client.get(f"/api/messages/{row.id}/ecg").status_code == 200
                if store.get_result(row.id).result.get("attachments"):
                    assert client.get(f"/api/messages/{row.id}/attachments/0").status_code == 200
                else:  # no destination of its route carried a report: a person asking has one drawn
                    assert client.post(f"/api/messages/{row.id}/report", headers=headers).status_code == 202
        dead = [
            (r.id, d.destination) for r in store.list(limit=1000) for d in store.deliveries(r.id) if d.state == "dead"
        ]
        assert dead, "no dead letter to retry"
        message_id, destination = dead[0]
        answer = client.post(f"/api/messages/{message_id}/deliveries/{destination}/retry", headers=headers)
        assert answer.status_code == 200, answer.text
        analysed = next(r for r in store.list(limit=1000) if r.placer_order_number == phi("PLC", "H1"))
        answer = client.post(f"/api/messages/{analysed.id}/reanalyse", headers=headers)
        assert answer.status_code == 200, answer.text
        upload = _oru("E1").encode()
        explain = "/api/routes/explain"
        assert client.post(explain, content=upload, headers=headers).status_code == 200
        assert client.post(explain, content=upload[:3000], headers=headers).status_code in (200, 422)
        assert client.post(explain, params={"message_id": analysed.id}, headers=headers).status_code == 200
        assert client.get("/api/audit").status_code == 200
        assert client.get("/audit").status_code == 200


# ----- waiting and looking -------------------------------------------------------------------------------------
def _settled(stack: Stack, expected: int) -> bool:
    """Every message in a final state and every delivery finished (failed or dead-lettered here)."""
    store = stack.store()
    rows = store.list(limit=1000)
    if len(rows) < expected:
        return False
    if any(r.state in ("received", "queued", "analysed") for r in rows):
        return False
    if any(v["state"] not in ("analysed", "failed") for r in rows for v in (store.view(r.id).versions or [])):
        return False
    return all(d.state in ("failed", "dead") for r in rows for d in store.deliveries(r.id))


def _wait_settled(stack: Stack, expected: int, timeout_s: float = 300) -> None:
    try:
        wait_for(lambda: _settled(stack, expected), timeout_s, 1.0, f"{expected} messages settled")
    except AssertionError as exc:
        store = stack.store()
        rows = [
            (r.id[:8], r.source, r.state, [(d.destination, d.state) for d in store.deliveries(r.id)])
            for r in store.list()
        ]
        raise AssertionError(f"{exc}; messages: {rows}\n{stack.logs()}") from None


def _leaks(text: str) -> list[str]:
    """The lines of ``text`` holding a marker or the birth date, for the failure message."""
    return [line for line in text.splitlines() if RUN in line or any(b in line for b in BORN_FORMS)]


@pytest.fixture
def peers() -> Iterator[dict[str, Any]]:
    nowhere = closed_port_url().rsplit("/fhir", 1)[0]
    refusing = FaultProxy(nowhere, otherwise=(400, outcome("FHIR")))
    failing = FaultProxy(nowhere, otherwise=(503, outcome("DOWN")))
    ehr_refusing = FaultProxy(nowhere, otherwise=(400, outcome("EHR")))
    receiver = Hl7Receiver("AE", error_text=peer_quote("AE"))
    for peer in (refusing, failing, ehr_refusing, receiver):
        peer.start()
    yield {"refusing": refusing, "failing": failing, "ehr_refusing": ehr_refusing, "receiver": receiver}
    for peer in (refusing, failing, ehr_refusing, receiver):
        peer.stop()


def test_no_patient_data_in_any_log_or_audit_row(
    make_stack, peers: dict[str, Any], waveform_ecg_path: Path, database_url: str | None, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    destinations = ["fhir-refuses", "fhir-down", "hl7-ae"]
    stack = make_stack(
        database_url=database_url,
        mllp_options={"enabled": True, "max_message_bytes": MAX_HL7_BYTES},
        inbox_options={"enabled": True, "path": str(inbox), "poll_interval_s": 0.2, "settle_s": 0.5},
        extra={
            "log_level": "DEBUG",
            "models": [{"name": "diagnosis"}, {"name": "lvef"}],
            "ehr": [
                {"name": "down", "base_url": closed_port_url(), "timeout_s": 2, "total_timeout_s": 5, "retries": 0},
                {"name": "refusing", "base_url": peers["ehr_refusing"].base_url, "timeout_s": 5, "retries": 0},
            ],
            "destinations": [
                {"name": "fhir-refuses", "base_url": peers["refusing"].base_url, "timeout_s": 5},
                {"name": "fhir-down", "base_url": peers["failing"].base_url, "timeout_s": 5},
                {
                    "name": "hl7-ae",
                    "type": "hl7",
                    "host": "127.0.0.1",
                    "port": peers["receiver"].port,
                    "ack_timeout_s": 5,
                    "connect_timeout_s": 2,
                },
            ],
            "routes": [
                {
                    "name": "cart-and-files",
                    "match": {"sources": ["dicom", "file"]},
                    "models": ["diagnosis", "lvef"],
                    "destinations": destinations,
                    "ehr_context": "down",
                },
                {
                    "name": "hl7",
                    "match": {"sources": ["hl7"]},
                    "models": ["diagnosis", "lvef"],
                    "destinations": destinations,
                    "ehr_context": "refusing",
                },
            ],
            "delivery": {"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
        },
    )
    # Order numbers up to 199 characters (HL7 EI.1) are stored on every database since the columns
    # were widened; before, PostgreSQL refused them and SQLAlchemy's error quoted them in the log.
    long_values_fail = False
    stack.start_worker()
    gateway = stack.start_gateway()
    gateway.wait_for_log("inbox listener", 30)

    _send_dicom(stack, waveform_ecg_path, long_values_fail)
    hl7 = _hl7_messages()
    codes = _mllp(stack.mllp_port, [raw for _, raw, _ in hl7])
    expected_codes = [("AE" if long_values_fail and tag == "H7" else code) for tag, _, code in hl7]
    assert codes == expected_codes, list(zip([t for t, _, _ in hl7], codes))
    _drop(inbox, f"{phi('FAM', 'F1')}_{phi('MRN', 'F1')}.XML", _philips("F1"))
    _drop(inbox, f"{phi('FAM', 'F2')}_{BORN.isoformat()}.xml", _philips("F2")[:5000])
    wait_for(lambda: not any(p.is_file() for p in inbox.iterdir()), 60, 0.3, "the inbox files taken")

    # stored: DICOM D1-D6 but D4 on PostgreSQL; HL7 H1-H9 (H9 as its head) but H7 on PostgreSQL; files F1, F2
    expected = 17 - (2 if long_values_fail else 0)
    _wait_settled(stack, expected)
    store = stack.store()
    assert peers["receiver"].received and peers["refusing"].requests and peers["failing"].requests
    assert peers["ehr_refusing"].requests, "the EHR context was never asked for"
    assert any(d.state == "dead" for r in store.list() for d in store.deliveries(r.id))
    events = {e.kind for r in store.list() for e in store.events(r.id)}
    assert {"ehr_context", "dead_letter", "delivery_failed", "duplicate_received", "resent_changed"} <= events, events
    # The markers did reach the product: the peers' quotes are kept for IT staff, the bad birth dates flagged.
    errors = " ".join(d.last_error or "" for r in store.list() for d in store.deliveries(r.id))
    assert all(phi("MRN", peer) in errors for peer in ("FHIR", "DOWN", "AE")), errors[:2000]
    flagged = {r.placer_order_number for r in store.list() if "invalid_birth_date" in (r.flags or [])}
    assert {phi("PLC", "D5"), phi("PLC", "H8")} <= flagged, flagged

    _look_and_act(stack)  # the retry and the re-analysis it asks for are pending when it returns
    _wait_settled(stack, expected)
    stack.stop()  # everything written, shutdown lines included

    logs = stack.full_logs()
    assert "DEBUG" in logs and "ecgbridge.worker" in logs, "the processes did not log at DEBUG"
    leaked = _leaks(logs)
    assert not leaked, "patient data in the logs:\n" + "\n".join(leaked[:40])

    from ecgbridge.core.accounts import AccountStore

    rows = AccountStore(stack.store()).audit_log(limit=1000)
    assert {"view_message", "download_inbound", "view_ecg", "retry_delivery", "reanalyse"} <= {r.action for r in rows}
    text = "\n".join(
        repr((r.actor, r.role, r.action, r.target, r.outcome, r.remote_addr, r.detail, r.note)) for r in rows
    )
    leaked = _leaks(text)
    assert not leaked, "patient data in the audit log:\n" + "\n".join(leaked[:40])
