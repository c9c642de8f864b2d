"""Golden and round-trip tests for mapping.hl7_oru (why: the EHR files exactly these bytes).

The golden files hold the exact bytes that go inside the MLLP frame (UTF-8, segments
ended by CR). Regenerate with ``UPDATE_GOLDEN=1`` and review the diff
(``tr '\\r' '\\n' < tests/golden/hl7_oru_basic.er7``). Round trips parse the message
back with hl7apy (strict, v2.5.1) and, as an independent reader, python-hl7.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import hl7
import numpy as np
import pytest

from ecgbridge.core.settings import Hl7Destination
from ecgbridge.errors import MappingError
from ecgbridge.mapping.ecg import (
    NOT_FOR_CLINICAL_USE,
    Attachment,
    Ecg,
    Finding,
    ModelOutput,
    Patient,
    Study,
)
from ecgbridge.mapping.hl7_common import unescape
from ecgbridge.mapping.hl7_oru import LOCAL_CODING_SYSTEM, build_oru_r01, validate_er7
from ecgbridge.outbound.mllp_client import parse_ack
from tests.support.results import sample_findings, sample_result

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
NOW = datetime(2024, 3, 1, 10, 20, 0, tzinfo=UTC)
ACQUIRED = datetime(2024, 3, 1, 11, 15, 0, tzinfo=timezone(timedelta(hours=1)))
CONTROL = "3F2A9C41D07B5E6A8C11"
PDF_BYTES = b"%PDF-1.4\n% ecgbridge test report\n%%EOF\n"
PDF = base64.b64encode(PDF_BYTES).decode()


def pdf_attachment(data: bytes = PDF_BYTES) -> tuple[Attachment, dict[str, bytes]]:
    """The result's PDF attachment and the bytes the caller reads from the blob store."""
    sha = hashlib.sha256(data).hexdigest()
    return Attachment("application/pdf", "ECG analysis report", sha, len(data)), {sha: data}


DEST = Hl7Destination(
    name="ehr",
    type="hl7",
    host="127.0.0.1",
    port=2575,
    sending_facility="CARDIOLOGY",
    receiving_application="EPIC",
    receiving_facility="MAIN^1.2.3.4^ISO",
)
ORDER: dict[str, Any] = {
    "placer_order_number": "PLC-7781",
    "filler_order_number": "FIL-0042",
    "placer_group_number": "GRP-1",
    "order_control": "NW",
    "order_status": "SC",
    "ordering_provider": "1234^Smith^John^^^Dr",
    "universal_service_id": "93000^EKG 12 lead^CPT",
    "visit_number": "V-5531^^^MAIN",
    "patient_class": "O",
    "patient_identifier": "MRN-0042^^^HOSPITAL-A&1.2.3.4.5&ISO^MR",
    "requested_at": "20240301090000",
    "sending_application": "EPIC",
    "sending_facility": "MAIN",
}


findings = sample_findings
make_result = sample_result


def make_ecg(patient: Patient | None = None, study: Study | None = None) -> Ecg:
    return Ecg(
        signals=np.zeros((2, 10), dtype=np.float32),
        leads=("I", "II"),
        fs=500.0,
        patient=patient
        or Patient(id="MRN-0042", id_issuer="HOSPITAL-A", name="Doe^Jane", birth_date="1961-07-14", sex="female"),
        study=study
        or Study(
            sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
            acquired_at=ACQUIRED,
            placer_order_number="ECG-PLC",
            filler_order_number="ECG-FIL",
        ),
    )


def build(**kw: Any) -> str:
    args: dict[str, Any] = dict(
        ecg=make_ecg(), order=ORDER, destination=DEST, message_id="msg-000123", control_id=CONTROL, now=NOW
    )
    result = kw.pop("result", None) or make_result()
    args.update(kw)
    return build_oru_r01(result, **args)


def segments(er7: str) -> list[list[str]]:
    return [s.split("|") for s in er7.split("\r") if s]


def seg(er7: str, name: str, n: int = 0) -> list[str]:
    return [s for s in segments(er7) if s[0] == name][n]


def obx_by_type(er7: str, value_type: str) -> list[list[str]]:
    return [s for s in segments(er7) if s[0] == "OBX" and s[2] == value_type]


def check_golden(name: str, er7: str) -> None:
    path = GOLDEN_DIR / name
    data = er7.encode("utf-8")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_bytes(data)
    assert path.exists(), f"golden {name} missing: run with UPDATE_GOLDEN=1 and review the file"
    assert data == path.read_bytes(), f"{name} differs (UPDATE_GOLDEN=1 to accept, then review the diff)"


# --------------------------------------------------------------------------- golden bytes


def test_golden_basic() -> None:
    check_golden("hl7_oru_basic.er7", build())


def test_golden_full_with_measurements_tiers_and_pdf() -> None:
    lvef = ModelOutput(
        "lvef-ecg",
        "0.3.1",
        "screening",
        (
            Finding(
                code="LOW_EF",
                display="Reduced ejection fraction",
                probability=0.71,
                threshold=0.5,
                present=True,
                tier="moderately_reduced",
            ),
        ),
        extra={"measurements": {"qtc_interval": 452.4, "heart_rate": 71, "qrs_axis": -30, "pr_interval": 168.0}},
    )
    attachment, data = pdf_attachment()
    result = make_result(outputs=(make_result().outputs[0], lvef), attachments=(attachment,))
    check_golden("hl7_oru_full.er7", build(result=result, attachments_data=data))


def test_golden_minimal_without_patient_order_or_times() -> None:
    ecg = make_ecg(patient=Patient(), study=Study())
    result = make_result(quality_flags=(), ecg_flags=())
    check_golden("hl7_oru_minimal.er7", build(result=result, ecg=ecg, order=None))


# --------------------------------------------------------------------------- round trips


def test_round_trip_through_hl7apy_strict() -> None:
    er7 = build()
    msg = validate_er7(er7)
    assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert msg.msh.msh_10.to_er7() == CONTROL
    assert msg.msh.msh_11.to_er7() == "P"
    assert msg.msh.msh_12.to_er7() == "2.5.1"
    assert msg.msh.msh_18.to_er7() == "UNICODE UTF-8"
    assert msg.msh.msh_7.to_er7() == "20240301102000+0000"
    result = msg.oru_r01_patient_result
    pid = result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "MRN-0042^^^HOSPITAL-A&1.2.3.4.5&ISO^MR"
    assert pid.pid_5.to_er7() == "Doe^Jane"
    assert pid.pid_7.to_er7() == "19610714"
    assert pid.pid_8.to_er7() == "F"
    pv1 = result.oru_r01_patient.oru_r01_visit.pv1
    assert (pv1.pv1_2.to_er7(), pv1.pv1_19.to_er7()) == ("O", "V-5531^^^MAIN")
    order = result.oru_r01_order_observation
    assert order.orc.orc_1.to_er7() == "RE"
    assert (order.orc.orc_2.to_er7(), order.orc.orc_3.to_er7()) == ("PLC-7781", "FIL-0042")
    assert order.orc.orc_12.to_er7() == "1234^Smith^John^^^Dr"
    obr = order.obr
    assert (obr.obr_2.to_er7(), obr.obr_3.to_er7()) == ("PLC-7781", "FIL-0042")
    assert obr.obr_4.to_er7() == "93000^EKG 12 lead^CPT"
    assert obr.obr_7.to_er7() == "20240301111500+0100"
    assert obr.obr_22.to_er7() == "20240301102000+0000"
    assert (obr.obr_24.to_er7(), obr.obr_25.to_er7()) == ("EC", "P")
    assert order.nte[0].nte_3.to_er7() == NOT_FOR_CLINICAL_USE
    groups = order.children.get("ORU_R01_OBSERVATION")
    assert len(groups) == 2 + 5  # two findings present, five probabilities
    for group in groups:
        assert group.obx.obx_11.to_er7() == "P"
        assert group.obx.obx_17.to_er7() == f"ptbxl-superclass@1.2.0^ptbxl-superclass 1.2.0^{LOCAL_CODING_SYSTEM}"
        assert group.nte.nte_3.to_er7() == NOT_FOR_CLINICAL_USE


def test_obx_layout() -> None:
    er7 = build()
    cwe = obx_by_type(er7, "CWE")
    assert [o[3] for o in cwe] == ["8601-7^EKG impression^LN"] * 2
    assert [o[4] for o in cwe] == ["1", "2"]  # sub-ids keep repeated OBX-3 apart
    assert [o[5].split("^")[0] for o in cwe] == ["164865005", "428750005"]
    assert cwe[0][5] == "164865005^Electrocardiographic myocardial infarction^SCT^MI^Myocardial infarction^ECGBRIDGE"
    assert [o[9] for o in cwe] == ["0.8731", "0.6100"]  # OBX-9: the model's probability
    nm = obx_by_type(er7, "NM")
    assert [o[3].split("^")[0] for o in nm] == ["NORM", "MI", "STTC", "CD", "HYP"]
    assert nm[1][3] == "MI^Myocardial infarction probability^ECGBRIDGE"
    assert all(o[6] == "1^^UCUM" for o in nm)
    assert [o[5] for o in nm] == ["0.0812", "0.8731", "0.6100", "0.1200", "0.0500"]
    # A: the decision points away from normal (NORM below its threshold counts as abnormal).
    assert [o[8] for o in nm] == ["A", "A", "A", "N", "N"]
    assert [o[7] for o in nm] == ["0.5000-1", "0-0.4200", "0-0.4000", "0-0.3500", "0-0.3000"]
    assert [int(o[1]) for o in segments(er7) if o[0] == "OBX"] == list(range(1, 8))


def test_measurements_tiers_and_pdf() -> None:
    output = ModelOutput(
        "lvef-ecg",
        "0.3.1",
        "screening",
        (
            Finding(
                code="LOW_EF",
                display="Reduced ejection fraction",
                probability=0.71,
                threshold=0.5,
                present=True,
                tier="moderately_reduced",
            ),
        ),
        extra={
            "measurements": {
                "heart_rate": 71.04,
                "qt_interval": 398,
                "t_axis": 45.0,
                "lvef": 34.5,
                "st_slope": 1.0,
                "p_axis": float("nan"),
            }
        },
    )
    attachment, data = pdf_attachment()
    result = make_result(outputs=(output,), attachments=(attachment,))
    er7 = build(result=result, attachments_data=data)
    nm = {o[3].split("^")[0]: o for o in obx_by_type(er7, "NM")}
    assert (nm["8867-4"][5], nm["8867-4"][6]) == ("71", "/min^per minute^UCUM")
    assert (nm["8634-8"][5], nm["8634-8"][6]) == ("398", "ms^millisecond^UCUM")
    assert (nm["8638-9"][5], nm["8638-9"][6]) == ("45", "deg^degree^UCUM")
    assert (nm["10230-1"][5], nm["10230-1"][6]) == ("34.5", "%^percent^UCUM")
    assert "8626-4" not in nm  # NaN is not sent
    (tier,) = [o for o in obx_by_type(er7, "CWE") if o[3].startswith("LOW_EF-tier")]
    assert tier[5] == "moderately_reduced^moderately reduced^ECGBRIDGE"
    (ed,) = obx_by_type(er7, "ED")
    assert ed[5] == f"^Application^PDF^Base64^{PDF}"
    assert ed[17] == "lvef-ecg@0.3.1^lvef-ecg 0.3.1^ECGBRIDGE"
    notes = " ".join(s[3] for s in segments(er7) if s[0] == "NTE")
    assert "measurement_unmapped:st_slope" in notes and "measurement_unusable:p_axis" in notes
    validate_er7(er7)

    no_pdf = build(
        result=result, attachments_data=data, destination=DEST.model_copy(update={"include_report_pdf": False})
    )
    assert not obx_by_type(no_pdf, "ED") and "report_pdf_unavailable" not in no_pdf
    missing = build(result=result)  # the caller could not read the blob
    assert not obx_by_type(missing, "ED") and "report_pdf_unavailable" in missing
    tampered = build(result=result, attachments_data={attachment.blob_sha256: b"%PDF-1.4 other"})
    assert not obx_by_type(tampered, "ED") and "report_pdf_hash_mismatch" in tampered
    no_attachment = build(result=make_result(outputs=(output,)), attachments_data=data)
    assert not obx_by_type(no_attachment, "ED") and "report_pdf" not in no_attachment
    # extra["report_pdf_base64"] is no longer read: the PDF comes from the result's attachment only
    legacy = replace(output, extra={"report_pdf_base64": PDF})
    assert not obx_by_type(build(result=make_result(outputs=(legacy,))), "ED")


def test_large_pdf_passes_validation() -> None:
    big = os.urandom(300_000)
    attachment, data = pdf_attachment(big)
    er7 = build(result=make_result(attachments=(attachment,)), attachments_data=data)
    (ed,) = obx_by_type(er7, "ED")
    assert ed[5].endswith(base64.b64encode(big).decode())
    assert validate_er7(er7) is not None


def test_independent_reader_unescapes_special_characters() -> None:
    """python-hl7 reads back what hl7apy encoded: separators in text survive as text."""
    nasty = "A|B^C~D&E\\F\\G"
    ecg = make_ecg(
        patient=Patient(
            id="MRN|7", id_issuer="ISS&UER", name="O'Brien & Sons^Zoë\\^^Dr", birth_date="1970-01-02", sex="male"
        )
    )
    result = make_result(quality_flags=(nasty, "line\rbreak"))
    er7 = build(result=result, ecg=ecg, order=None)
    validate_er7(er7)
    msg = hl7.parse(er7)
    pid = msg.segment("PID")
    assert msg.unescape(str(pid(3)(0)(1))) == "MRN|7"
    assert msg.unescape(str(pid(3)(0)(4)(1))) == "ISS&UER"
    assert msg.unescape(str(pid(5)(0)(1)(1))) == "O'Brien & Sons"
    assert msg.unescape(str(pid(5)(0)(2))) == "Zoë\\"
    assert str(pid(5)(0)(5)) == "Dr"  # DICOM prefix -> XPN-5
    notes = [msg.unescape(str(s(3))) for s in msg.segments("NTE")]
    assert any(nasty in n for n in notes), notes
    assert any("line break" in n for n in notes)  # a CR inside text must not end the segment
    assert unescape("A\\F\\B\\S\\C\\R\\D\\T\\E\\E\\F\\E\\G") == nasty
    assert "Zoë".encode() in er7.encode("utf-8")


# --------------------------------------------------------------------------- orders and identity


def test_order_links_numbers_provider_visit_and_service() -> None:
    er7 = build()
    orc, obr = seg(er7, "ORC"), seg(er7, "OBR")
    assert (orc[2], orc[3], obr[2], obr[3]) == ("PLC-7781", "FIL-0042", "PLC-7781", "FIL-0042")
    assert orc[4] == "GRP-1" and orc[12] == obr[16] == "1234^Smith^John^^^Dr"
    assert obr[4] == "93000^EKG 12 lead^CPT" and obr[6] == "20240301090000"
    assert seg(er7, "PV1")[2] == "O" and seg(er7, "PV1")[19] == "V-5531^^^MAIN"


def test_without_order_the_ecg_numbers_are_used() -> None:
    er7 = build(order=None)
    orc, obr = seg(er7, "ORC"), seg(er7, "OBR")
    assert (orc[2], orc[3], obr[2], obr[3]) == ("ECG-PLC", "ECG-FIL", "ECG-PLC", "ECG-FIL")
    assert obr[4] == "34534-8^12 lead EKG panel^LN"
    assert seg(er7, "PV1")[2] == "U"
    assert seg(er7, "PID")[3] == "MRN-0042^^^HOSPITAL-A"


def test_without_any_filler_number_ecgbridge_is_the_filler() -> None:
    ecg = make_ecg(study=Study(acquired_at=ACQUIRED))
    er7 = build(order=None, ecg=ecg)
    assert seg(er7, "ORC")[2] == "" and seg(er7, "OBR")[3] == "msg-000123^ECGBRIDGE"


def test_order_patient_id_fills_in_and_a_mismatch_is_flagged() -> None:
    er7 = build(ecg=make_ecg(patient=Patient(name="Doe^Jane")))
    assert seg(er7, "PID")[3] == "MRN-0042^^^HOSPITAL-A&1.2.3.4.5&ISO^MR"
    er7 = build(ecg=make_ecg(patient=Patient(id="OTHER-1")))
    assert seg(er7, "PID")[3] == "OTHER-1"
    assert "patient_id_differs_from_order" in er7


def test_unusable_order_fields_are_left_out_and_flagged() -> None:
    er7 = build(order={**ORDER, "requested_at": "yesterday", "patient_class": None})
    assert seg(er7, "OBR")[6] == ""
    assert "order_field_unusable:requested_at" in er7
    assert seg(er7, "PV1")[2] == "U"
    validate_er7(er7)


def test_no_patient_id_leaves_out_the_patient_group_and_flags_it() -> None:
    er7 = build(ecg=make_ecg(patient=Patient(name="Doe^Jane")), order=None)
    assert not [s for s in segments(er7) if s[0] in ("PID", "PV1")]
    assert "no_patient_id" in er7
    validate_er7(er7)


def test_unknown_name_is_sent_as_unspecified() -> None:
    er7 = build(ecg=make_ecg(patient=Patient(id="X1")), order=None)
    assert seg(er7, "PID")[5] == "^^^^^^U"


# --------------------------------------------------------------------------- times, ids, stability


def test_same_input_same_bytes_and_control_id_is_msh10() -> None:
    assert build() == build()
    other = build(control_id="OTHER-CONTROL-ID")
    assert seg(other, "MSH")[9] == "OTHER-CONTROL-ID"


def test_timestamps_carry_an_offset() -> None:
    er7 = build(now=None)
    assert seg(er7, "MSH")[6].endswith("+0000") and len(seg(er7, "MSH")[6]) == 19
    naive_now = build(now=datetime(2024, 3, 1, 10, 20))
    assert seg(naive_now, "MSH")[6] == "20240301102000+0000"  # a naive `now` is UTC
    study = Study(acquired_at=datetime(2024, 3, 1, 11, 15))
    er7 = build(ecg=make_ecg(study=study), assume_tz=timezone(timedelta(hours=1)))
    assert seg(er7, "OBR")[7] == "20240301101500+0000"
    assert "acquisition_time_without_offset" in er7


def test_flags_and_summary_in_the_report_notes() -> None:
    er7 = build()
    notes = [s[3] for s in segments(er7) if s[0] == "NTE"][:3]
    assert notes[0] == NOT_FOR_CLINICAL_USE
    assert notes[1].startswith("AI ECG analysis by ptbxl-superclass 1.2.0 (diagnosis): Myocardial infarction")
    assert notes[2] == "Flags: baseline_wander:V1; derived_leads:III,aVR,aVL,aVF."


# --------------------------------------------------------------------------- failures


def test_bad_probability_is_permanent() -> None:
    bad = replace(findings()[0], probability=1.7)
    output = replace(make_result().outputs[0], findings=(bad,))
    with pytest.raises(MappingError, match="probability 1.7"):
        build(result=make_result(outputs=(output,)))


def test_no_outputs_is_permanent() -> None:
    with pytest.raises(MappingError, match="no model outputs"):
        build(result=make_result(outputs=()))


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda s: s.replace("|ORU^R01^ORU_R01|", "||"), "MSH-9"),
        (lambda s: s.replace("|0.8731|1^^UCUM|", "|high|1^^UCUM|"), "NM"),
        (lambda s: s.replace("|2.5.1|", "|2.3|", 1), "version"),
        (lambda s: s.replace("\rOBR|", "\rZZZ|"), "OBR"),
    ],
)
def test_validation_failures_are_permanent(mutate: Any, why: str) -> None:
    with pytest.raises(MappingError, match="failed HL7 v2.5.1 validation"):
        validate_er7(mutate(build()))


# --------------------------------------------------------------------------- ACK parsing (client side)


def test_parse_ack_v251_with_err() -> None:
    ack = parse_ack(
        b"MSH|^~\\&|EHR|H|ECGBRIDGE||20240301||ACK^R01^ACK|A1|P|2.5.1\r"
        b"MSA|AR|CTRL1\r"
        b"ERR||PID^1^3|204^Unknown key identifier^HL70357|E||||Patient \\T\\ visit unknown\r"
    )
    assert (ack.code, ack.acked_control_id, ack.control_id) == ("AR", "CTRL1", "A1")
    assert ack.error_text() == "Patient & visit unknown (error 204 Unknown key identifier) at PID^1^3"


def test_parse_ack_v23_style_and_newlines() -> None:
    ack = parse_ack(
        b"MSH|^~\\&|EHR||||||ACK|A2|P|2.3\nMSA|AE|CTRL2|Database busy\nERR|PID^1^3^101&Required field missing\n"
    )
    assert (ack.code, ack.acked_control_id) == ("AE", "CTRL2")
    assert ack.error_text() == "Required field missing (error 101) at PID^1^3"
    assert parse_ack(b"MSH|^~\\&|E||||||ACK|A3|P|2.5\rMSA|AE|C3|Database busy").error_text() == "Database busy"
    with pytest.raises(ValueError):
        parse_ack(b"MSH|^~\\&|E||||||ACK|A3|P|2.5\r")
    with pytest.raises(ValueError):
        parse_ack(b"garbage")


def test_lvef_tier_goes_out_as_loinc_10230_1_with_its_explanation() -> None:
    from tests.support.results import lvef_output as _lvef_output

    result = make_result(outputs=make_result().outputs + (_lvef_output(),))
    er7 = build(result=result)
    lvef = [s for s in segments(er7) if s[0] == "OBX" and s[3].startswith("10230-1^")]
    assert len(lvef) == 1
    assert lvef[0][2] == "CWE" and lvef[0][5].startswith("LVEF_30_40^LVEF 30-40 % (moderately reduced)^ECGBRIDGE")
    assert lvef[0][8] == "L"
    lines = er7.split("\r")
    at = next(i for i, line in enumerate(lines) if line.startswith("OBX|") and "|10230-1^" in line)
    notes = [line.split("|")[3] for line in lines[at + 1 :] if line.startswith("NTE|")][:6]
    assert "NOT FOR CLINICAL USE" in notes[0]
    assert any("NT-proBNP 2400 pg/mL (EHR)" in n for n in notes)
    # no "EKG impression" OBX for an LVEF tier; its four tier probabilities are NM OBX
    impressions = [s for s in obx_by_type(er7, "CWE") if s[3].startswith("8601-7^")]
    assert all("LVEF" not in s[5] for s in impressions)
    assert len([s for s in obx_by_type(er7, "NM") if s[3].startswith("LVEF_")]) == 4


def test_a_triage_tier_is_one_impression_obx_flagged_aa_when_urgent() -> None:
    triage = ModelOutput(
        "triage",
        "0.1.0",
        "triage",
        (
            Finding("abnormal", "Abnormal ECG", 0.9, 0.38, True, snomed="102594003"),
            Finding("urgent", "Urgent ECG", 0.4, 0.13, True),
        ),
        {"severity": "urgent"},
    )
    er7 = build(result=make_result(outputs=make_result().outputs + (triage,)))
    tier = [s for s in obx_by_type(er7, "CWE") if s[3].startswith("8601-7^") and "urgent^" in s[5]]
    assert len(tier) == 1
    assert (
        tier[0][5]
        == "102594003^Electrocardiogram abnormal^SCT^urgent^Urgent: possible emergency, review now (AI triage)^ECGBRIDGE"
    )
    assert tier[0][8] == "AA"
    assert not [s for s in obx_by_type(er7, "CWE") if s[5].startswith("urgent^")]  # no per-output impression
