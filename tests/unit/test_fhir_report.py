"""Golden and round-trip tests for mapping.fhir_report (why: the EHR sees exactly this JSON)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.provenance import Provenance

from ecgbridge.errors import MappingError
from ecgbridge.mapping.ecg import NOT_FOR_CLINICAL_USE, Attachment, Finding, ModelOutput, Patient, Study
from ecgbridge.mapping.fhir_report import (
    ReportBundle,
    build_report,
    identifier_query,
    operation_outcome_text,
    resolve_references,
)
from tests.support.results import lvef_output, sample_result

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "fhir_report_basic.json"
ISSUED = datetime(2024, 3, 1, 10, 20, 0, tzinfo=UTC)
UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
MODELS = {
    "Device": Device,
    "DiagnosticReport": DiagnosticReport,
    "Observation": Observation,
    "Provenance": Provenance,
}


make_result = sample_result


PATIENT = Patient(id="MRN-0042", id_issuer="HOSPITAL-A", name="Doe^Jane", sex="female")
STUDY = Study(
    sop_instance_uid=UID,
    acquired_at=datetime(2024, 3, 1, 11, 15, 0, tzinfo=timezone(timedelta(hours=1))),
)


def build(**kw: Any) -> ReportBundle:
    args: dict[str, Any] = dict(patient=PATIENT, study=STUDY, message_id="msg-000123", issued=ISSUED)
    result = kw.pop("result", None) or make_result()
    args.update(kw)
    return build_report(result, **args)


def snapshot(bundle: ReportBundle) -> dict[str, Any]:
    def planned(p: Any) -> dict[str, Any]:
        return {"if_none_exist": p.if_none_exist, "placeholder": p.placeholder, "resource": p.resource}

    return {
        "devices": [planned(d) for d in bundle.devices],
        "observations": [planned(o) for o in bundle.observations],
        "report": planned(bundle.report),
        "provenance_query": bundle.provenance_query("DiagnosticReport/example"),
        "provenance": bundle.provenance_for("DiagnosticReport/example"),
    }


def all_resources(bundle: ReportBundle) -> list[dict[str, Any]]:
    return [p.resource for p in bundle.all_planned()] + [bundle.provenance_for("DiagnosticReport/x")]


def test_golden_basic() -> None:
    got = snapshot(build())
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert GOLDEN.exists(), "golden missing: run with UPDATE_GOLDEN=1 and review the file"
    assert got == json.loads(GOLDEN.read_text(encoding="utf-8"))


def test_round_trip_through_r4b_models() -> None:
    for resource in all_resources(build()):
        model_cls = MODELS[resource["resourceType"]]
        model = model_cls.model_validate(resource)
        text = model.model_dump_json()
        assert json.loads(text) == resource, resource["resourceType"]
        again = model_cls.model_validate_json(text)
        assert again == model


def test_report_contents() -> None:
    b = build()
    rep = b.report.resource
    assert rep["status"] == "preliminary"
    assert rep["category"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
        "code": "EC",
        "display": "Electrocardiac",
    }
    assert rep["code"]["coding"][0]["code"] == "34534-8"
    assert rep["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"}]
    assert rep["effectiveDateTime"] == "2024-03-01T11:15:00+01:00"
    assert rep["issued"] == "2024-03-01T10:20:00Z"
    assert rep["result"] == [{"reference": o.placeholder} for o in b.observations]
    assert rep["meta"]["security"][0]["code"] == "AIAST"
    assert {c["coding"][0]["code"] for c in rep["conclusionCode"]} == {"164865005", "428750005"}
    assert "derived_leads:III,aVR,aVL,aVF" in rep["conclusion"]
    assert "baseline_wander:V1" in rep["conclusion"]
    assert NOT_FOR_CLINICAL_USE in rep["conclusion"]
    # PHI minimisation: the name stays out unless asked for.
    assert "Doe" not in json.dumps(all_resources(b))
    assert build(include_patient_name=True).report.resource["subject"]["display"] == "Doe^Jane"


def test_observations() -> None:
    b = build()
    assert len(b.observations) == 5
    for planned in b.observations:
        obs = planned.resource
        assert obs["status"] == "preliminary"
        assert obs["meta"]["security"][0]["code"] == "AIAST"
        assert NOT_FOR_CLINICAL_USE in obs["note"][0]["text"]
        assert obs["device"]["reference"] == b.device.placeholder
        assert 0.0 <= obs["valueQuantity"]["value"] <= 1.0
        assert obs["valueQuantity"]["code"] == "1"
    interp = {
        o.resource["code"]["coding"][1]["code"]: o.resource["interpretation"][0]["coding"][0]["code"]
        for o in b.observations
    }
    assert interp == {"NORM": "NEG", "MI": "POS", "STTC": "POS", "CD": "NEG", "HYP": "NEG"}


def test_if_none_exist_strings() -> None:
    b = build()
    assert b.report.if_none_exist == f"identifier=urn%3Adicom%3Auid%7Curn%3Aoid%3A{UID}"
    assert dict(parse_qsl(b.report.if_none_exist)) == {"identifier": f"urn:dicom:uid|urn:oid:{UID}"}
    assert dict(parse_qsl(b.device.if_none_exist or "")) == {"identifier": "urn:ecgbridge:model|ptbxl-superclass@1.2.0"}
    assert dict(parse_qsl(b.observations[1].if_none_exist or "")) == {
        "identifier": f"urn:ecgbridge:result|urn:oid:{UID}/ptbxl-superclass/1.2.0/MI"
    }
    assert b.provenance_query("DiagnosticReport/7") == "target=DiagnosticReport%2F7"
    # FHIR search separators in a value are escaped, then URL-encoded.
    assert dict(parse_qsl(identifier_query("s", "a,b|c"))) == {"identifier": "s|a\\,b\\|c"}


def test_no_sop_uid_uses_message_id() -> None:
    b = build(study=Study(acquired_at=STUDY.acquired_at))
    assert b.report.resource["identifier"] == [{"system": "urn:ecgbridge:result", "value": "msg-000123"}]
    assert dict(parse_qsl(b.report.if_none_exist or "")) == {"identifier": "urn:ecgbridge:result|msg-000123"}
    assert "entity" not in b.provenance_for("DiagnosticReport/1")


def test_no_patient_id_still_valid_and_flagged() -> None:
    b = build(patient=Patient())
    rep = b.report.resource
    assert "subject" not in rep
    assert "no_patient_id" in rep["conclusion"]
    for resource in all_resources(b):
        MODELS[resource["resourceType"]].model_validate(resource)
        assert "subject" not in resource


def test_literal_patient_reference_wins() -> None:
    b = build(patient_reference="Patient/123", patient_identifier_system="urn:oid:1.2.3")
    assert b.report.resource["subject"] == {"reference": "Patient/123"}
    b2 = build(patient_identifier_system="urn:oid:1.2.3")
    assert b2.report.resource["subject"]["identifier"]["system"] == "urn:oid:1.2.3"
    assert b2.report.resource["subject"]["identifier"]["assigner"] == {"display": "HOSPITAL-A"}


def test_naive_acquisition_time_converted_to_utc_and_flagged() -> None:
    naive = Study(sop_instance_uid=UID, acquired_at=datetime(2024, 3, 1, 11, 15))
    b = build(study=naive, assume_tz=timezone(timedelta(hours=1)))
    assert b.report.resource["effectiveDateTime"] == "2024-03-01T10:15:00Z"
    assert "acquisition_time_without_offset" in b.report.resource["conclusion"]


def test_no_finding_present() -> None:
    f = Finding("NORM", "Normal ECG", 0.2, 0.5, False, snomed="164854000")
    b = build(result=make_result(outputs=(ModelOutput("m", "1", "diagnosis", (f,)),)))
    assert "conclusionCode" not in b.report.resource
    assert "no finding above its threshold" in b.report.resource["conclusion"]


def _attachment(content_type: str, title: str, data: bytes) -> tuple[Attachment, dict[str, bytes]]:
    sha = hashlib.sha256(data).hexdigest()
    return Attachment(content_type, title, sha, len(data)), {sha: data}


def test_presented_form_carries_pdf_then_png_with_sha1_hash() -> None:
    png, png_data = _attachment("image/png", "ECG with heatmap", b"\x89PNG\r\n\x1a\n fake png")
    pdf, pdf_data = _attachment("application/pdf", "ECG analysis report", b"%PDF-1.4 fake report %%EOF")
    result = make_result(attachments=(png, pdf))
    rep = build(result=result, attachments_data={**png_data, **pdf_data}).report.resource
    forms = rep["presentedForm"]
    assert [f["contentType"] for f in forms] == ["application/pdf", "image/png"]
    pdf_form = forms[0]
    raw = base64.b64decode(pdf_form["data"])
    assert raw == pdf_data[pdf.blob_sha256] and pdf_form["size"] == len(raw)
    assert pdf_form["hash"] == base64.b64encode(hashlib.sha1(raw).digest()).decode()
    assert pdf_form["title"] == "ECG analysis report"
    DiagnosticReport.model_validate(rep)  # R4B Attachment: base64Binary data, unsignedInt size
    assert "attachment_" not in rep["conclusion"]

    # without the bytes nothing is attached, and the report says so
    rep = build(result=result).report.resource
    assert "presentedForm" not in rep
    assert "attachment_unavailable:application/pdf" in rep["conclusion"]
    # bytes that do not match the recorded hash are never sent
    rep = build(result=result, attachments_data={pdf.blob_sha256: b"other", **png_data}).report.resource
    assert [f["contentType"] for f in rep["presentedForm"]] == ["image/png"]
    assert "attachment_hash_mismatch:application/pdf" in rep["conclusion"]
    # no attachments: the report is the golden one, byte for byte
    assert "presentedForm" not in build().report.resource


def test_two_models_two_devices() -> None:
    f = Finding("URGENT", "Urgent ECG", 0.7, 0.5, True, tier="moderately reduced")
    outputs = make_result().outputs + (ModelOutput("lvef-net", "0.3.1", "triage", (f,)),)
    b = build(result=make_result(outputs=outputs))
    assert [d.resource["identifier"][0]["value"] for d in b.devices] == ["ptbxl-superclass@1.2.0", "lvef-net@0.3.1"]
    assert b.observations[-1].resource["device"]["reference"] == b.devices[1].placeholder
    assert len(b.provenance_for("DiagnosticReport/1")["agent"]) == 2
    assert "tier moderately reduced" in b.report.resource["conclusion"]


def test_bad_probability_is_permanent() -> None:
    f = Finding("MI", "MI", 1.7, 0.5, True)
    with pytest.raises(MappingError):
        build(result=make_result(outputs=(ModelOutput("m", "1", "diagnosis", (f,)),)))


def test_invalid_fhir_is_permanent() -> None:
    # A blank model name makes an invalid FHIR code (meta.tag) that R4B rejects.
    f = Finding("MI", "MI", 0.7, 0.5, True)
    with pytest.raises(MappingError) as info:
        build(result=make_result(outputs=(ModelOutput(" ", "1", "diagnosis", (f,)),)))
    assert "validation" in str(info.value)


def test_resolve_references() -> None:
    b = build()
    refs = {b.device.placeholder: "Device/9"}
    obs = resolve_references(b.observations[0].resource, refs)
    assert obs["device"]["reference"] == "Device/9"
    assert b.observations[0].resource["device"]["reference"] == b.device.placeholder  # not mutated


def test_operation_outcome_text() -> None:
    oo = {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "error",
                "code": "invalid",
                "diagnostics": "Missing status",
                "details": {"text": "Observation.status is required"},
                "expression": ["Observation.status"],
            },
            {"severity": "warning", "code": "informational"},
        ],
    }
    text = operation_outcome_text(oo)
    assert text == (
        "error/invalid: Missing status Observation.status is required at Observation.status; warning/informational"
    )
    assert operation_outcome_text(None) == ""
    assert operation_outcome_text({"resourceType": "Patient"}) == ""
    assert (
        len(
            operation_outcome_text(
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "diagnostics": "x" * 2000}]}
            )
        )
        == 500
    )


_lvef_output = lvef_output


def test_lvef_tier_is_one_loinc_10230_1_observation_with_explanation() -> None:
    outputs = make_result().outputs + (_lvef_output(),)
    b = build(result=make_result(outputs=outputs))
    lvef = [o.resource for o in b.observations if o.resource["code"]["coding"][0]["code"] == "10230-1"]
    assert len(lvef) == 1
    obs = lvef[0]
    assert obs["valueCodeableConcept"]["coding"][0]["code"] == "LVEF_30_40"
    assert obs["interpretation"][0]["coding"][0]["code"] == "L"
    assert {c["code"]["coding"][0]["code"]: c["valueQuantity"]["value"] for c in obs["component"]} == {
        "LVEF_GT50": 0.1,
        "LVEF_40_50": 0.15,
        "LVEF_30_40": 0.6,
        "LVEF_LT30": 0.15,
    }
    note = obs["note"][0]["text"]
    assert "NT-proBNP 2400 pg/mL (EHR)" in note and "QRS duration 152 ms (ECG)" in note
    assert "Age 44" in note.split("Pointing away from it:")[1]
    assert "synthetic" in note and "NOT FOR CLINICAL USE" in obs["note"][1]["text"]
    assert obs["meta"]["security"][0]["code"] == "AIAST"
    assert "Estimated LVEF tier: LVEF 30-40 %" in b.report.resource["conclusion"]
    # re-building gives the same identifier (idempotent delivery)
    again = [
        o
        for o in build(result=make_result(outputs=outputs)).observations
        if o.resource["code"]["coding"][0]["code"] == "10230-1"
    ][0]
    assert again.if_none_exist == [o for o in b.observations if o.resource is obs][0].if_none_exist


def test_measurements_become_loinc_observations_in_the_report() -> None:
    measured = ModelOutput(
        "ecgbridge-measurements",
        "0.1.0",
        "measurements",
        (),
        {
            "measurements": {"heart_rate": 71.0, "qrs_duration": 96.0, "qtc_interval": 420.0},
            "features": {"qtc_fridericia": 410.0, "qtc_bazett": 420.0},
        },
    )
    b = build(result=make_result(outputs=make_result().outputs + (measured,)))
    codes = [o.resource["code"]["coding"][0]["code"] for o in b.observations]
    assert {"8867-4", "8633-0", "8636-3", "76634-5"} <= set(codes)
    assert len(b.report.resource["result"]) == len(b.observations)
    hr = next(o.resource for o in b.observations if o.resource["code"]["coding"][0]["code"] == "8867-4")
    assert hr["valueQuantity"] == {"value": 71.0, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}
    assert hr["device"]["reference"] == b.devices[-1].placeholder


def test_a_triage_output_names_its_severity_tier_in_the_conclusion() -> None:
    f = Finding("urgent", "Urgent ECG", 0.81, 0.5, True)
    triage = ModelOutput(
        "triage", "0.1.0", "triage", (f,), {"severity": "urgent", "severity_display": "Urgent ECG (AI triage)"}
    )
    b = build(result=make_result(outputs=make_result().outputs + (triage,)))
    assert "Severity tier: Urgent ECG (AI triage)." in b.report.resource["conclusion"]


def test_a_triage_tier_is_one_coded_ekg_impression_for_worklists() -> None:
    findings = (
        Finding("abnormal", "Abnormal ECG", 0.9, 0.38, True, snomed="102594003"),
        Finding("major", "Major abnormality or urgent", 0.7, 0.33, True),
        Finding("urgent", "Urgent ECG", 0.4, 0.13, True),
    )
    triage = ModelOutput(
        "triage",
        "0.1.0",
        "triage",
        findings,
        {"severity": "urgent", "severity_display": "Urgent", "severity4": "urgent", "severity_rule": "worst flag wins"},
    )
    b = build(result=make_result(outputs=make_result().outputs + (triage,)))
    impressions = [o.resource for o in b.observations if o.resource["code"]["coding"][0]["code"] == "8601-7"]
    assert len(impressions) == 1
    obs = impressions[0]
    codings = obs["valueCodeableConcept"]["coding"]
    assert codings[0] == {
        "system": "http://snomed.info/sct",
        "code": "102594003",
        "display": "Electrocardiogram abnormal",
    }
    assert codings[1]["system"] == "urn:ecgbridge:severity" and codings[1]["code"] == "urgent"
    assert codings[2]["code"] == "4tier-urgent"
    assert obs["interpretation"][0]["coding"][0]["code"] == "AA"
    assert (
        len([o for o in b.observations if o.resource["device"]["display"] == "triage 0.1.0"]) == 4
    )  # tier + 3 probabilities
    report_codes = [c["coding"][0]["code"] for c in b.report.resource["conclusionCode"]]
    assert report_codes.count("102594003") == 1  # the tier, not the "abnormal" output again
