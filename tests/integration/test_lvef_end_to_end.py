"""Issue #4 acceptance: an ECG for a patient the EHR knows ends in an LVEF tier that names EHR variables.

Real parts only: pynetdicom as the cart, `ecgbridge gateway` and `ecgbridge worker` processes on
a real redis-server, Medplum's FHIR server as both the EHR the context is read from and the
destination the DiagnosticReport is written to (seeded with a heart-failure patient's labs,
vitals, conditions and medications).
"""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support import ehr_bundles as seed
from tests.support.http_peers import closed_port_url
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration

LVEF_LOINC = "10230-1"
EHR_DISPLAYS = (
    "NT-proBNP",
    "troponin",
    "creatinine",
    "potassium",
    "sodium",
    "haemoglobin",
    "hemoglobin",
    "blood pressure",
    "weight",
    "height",
    "age",
    "sex",
    "heart failure",
    "myocardial infarction",
    "atrial fibrillation",
    "hypertension",
    "diuretic",
    "beta blocker",
    "bmi",
    "egfr",
)


def _config(base_url: str, ehr_url: str) -> dict:
    return {
        "models": [{"name": "diagnosis"}, {"name": "lvef"}],
        "ehr": [{"name": "epic", "base_url": ehr_url, "timeout_s": 5, "total_timeout_s": 20}],
        "destinations": [{"name": "ehr", "base_url": base_url, "timeout_s": 10}],
        "routes": [
            {"name": "all-ecg", "models": ["diagnosis", "lvef"], "destinations": ["ehr"], "ehr_context": "epic"}
        ],
    }


def _ecg_for(path, identifier: str):
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = identifier
    ds.PatientName = "Synthetic^Test"
    ds.AcquisitionDateTime = seed.ECG_TIME.strftime("%Y%m%d%H%M%S+0000")
    return ds


def _lvef_observation(fhir_server, sop_uid: str) -> tuple[dict, dict]:
    bundle = fhir_server.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{sop_uid}")
    (report,) = [e["resource"] for e in bundle.get("entry", [])]
    observations = [fhir_server.read(*r["reference"].split("/")) for r in report["result"]]
    lvef = [o for o in observations if o["code"]["coding"][0]["code"] == LVEF_LOINC]
    assert len(lvef) == 1, [o["code"] for o in observations]
    return report, lvef[0]


def test_seeded_patient_gets_an_lvef_tier_explained_by_ehr_variables(
    make_stack, fhir_server, waveform_ecg_path, database_url
):
    patient = seed.seed_heart_failure(fhir_server.base_url)
    stack = make_stack(extra=_config(fhir_server.base_url, fhir_server.base_url), database_url=database_url)
    stack.start_worker()
    stack.start_gateway()
    ds = _ecg_for(waveform_ecg_path, patient.identifier)
    assert send_dicom(stack.port, [ds]) == [0x0000]
    stack.wait_state("delivered", timeout_s=120)

    report, obs = _lvef_observation(fhir_server, ds.SOPInstanceUID)
    assert obs["valueCodeableConcept"]["coding"][0]["system"] == "urn:ecgbridge:lvef-tier"
    assert obs["method"]["coding"][0]["code"] == "ecg+ehr"
    assert len(obs["component"]) == 4
    assert abs(sum(c["valueQuantity"]["value"] for c in obs["component"]) - 1.0) < 0.01
    note = obs["note"][0]["text"]
    ehr_part = [part for part in note.split(";") if "(EHR)" in part]
    assert ehr_part, f"the explanation names no EHR variable: {note}"
    assert any(name.lower() in note.lower() for name in EHR_DISPLAYS), note
    assert "synthetic" in note.lower() and "NOT FOR CLINICAL USE" in obs["note"][1]["text"]
    assert "Estimated LVEF tier" in report["conclusion"]
    # the stored result keeps what the EHR said, and an event records the fetch (no values in it)
    store = stack.store()
    (row,) = store.list()
    view = store.view(row.id)
    events = [e for e in view.events if e["kind"] == "ehr_context"]
    assert events and events[0]["detail"].startswith("complete")
    lvef = [o for o in store.get_result(row.id).result["outputs"] if o["task"] == "lvef"][0]
    assert lvef["extra"]["ehr_context"]["values"]["nt_probnp"]["value"] == pytest.approx(1850.0)
    assert patient.identifier not in stack.full_logs(), "patient identifier in the logs"


def test_unreachable_ehr_still_gives_an_ecg_only_tier_that_says_why(make_stack, fhir_server, waveform_ecg_path):
    stack = make_stack(extra=_config(fhir_server.base_url, closed_port_url()))
    stack.start_worker()
    stack.start_gateway()
    ds = _ecg_for(waveform_ecg_path, "NOT-IN-ANY-EHR")
    assert send_dicom(stack.port, [ds]) == [0x0000]
    stack.wait_state("delivered", timeout_s=120)

    _, obs = _lvef_observation(fhir_server, ds.SOPInstanceUID)
    assert obs["method"]["coding"][0]["code"] == "ecg-only"
    note = obs["note"][0]["text"]
    assert "EHR context: unavailable" in note and "Missing context:" in note
    store = stack.store()
    (row,) = store.list()
    assert [e for e in store.view(row.id).events if e["kind"] == "ehr_context"][0]["level"] == "warning"
