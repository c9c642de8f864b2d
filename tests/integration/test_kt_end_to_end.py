"""Issue #14 acceptance: a result from the knowledge-transfer model, sent through DICOM, carries the
predicted-abnormality explanation in the FHIR report and the HL7 ORU.

Real parts only: pynetdicom as the cart, ``ecgbridge gateway`` and ``ecgbridge worker`` processes on
a real redis-server, the KT model the real recipe exported (``tests/fixtures/models/diagnosis-kt-tiny``,
written by ``tests/fixtures/make_kt_model.py``), named by the route through ``models[].path``,
Medplum's FHIR server checking every resource against the R4 StructureDefinitions, python-hl7's
MLLP server as the EHR's interface engine, and the console page over HTTP. The second test writes a
KT report in every FHIR write mode, twice, then amends it: one Observation per prediction each time.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from ecgbridge.core.accounts import AccountStore, Role
from ecgbridge.mapping.abnormality_result import PREDICTED_ABNORMALITY_SYSTEM, SECTION_TITLE
from ecgbridge.mapping.ecg import AnalysisResult, ModelOutput, Patient, Study
from ecgbridge.mapping.fhir_report import build_report
from ecgbridge.mapping.hl7_oru import validate_er7
from ecgbridge.outbound.fhir_client import FhirClient
from ecgbridge.outbound.fhir_sender import deliver_report, deliver_revision
from tests.support.console import PASSWORD, login
from tests.support.fhir_server import FhirServer, require_node
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.results import sample_findings
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KT_MODEL = FIXTURES / "models" / "diagnosis-kt-tiny"
ECG_FILE = FIXTURES / "dicom" / "ptbxl_00622_mi_12lead.dcm"
HEAD_LOINCS = {"30525-0", "39156-5", "46098-0"}  # age, BMI, sex: what the fixture's heads were trained on


@pytest.fixture(scope="module")
def fhir() -> Iterator[FhirServer]:
    require_node()
    with FhirServer(validate=True) as server:  # Medplum checks our resources against R4 too
        yield server


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry") or []]


def _is_predicted(obs: dict[str, Any]) -> bool:
    return obs["code"]["coding"][0]["system"] == PREDICTED_ABNORMALITY_SYSTEM


def test_a_kt_result_sent_through_dicom_carries_the_predicted_abnormalities_to_fhir_and_hl7(
    make_stack: Any, fhir: FhirServer
) -> None:
    with Hl7Receiver("AA") as lis:
        stack = make_stack(
            extra={
                "models": [{"name": "diagnosis-kt", "path": str(KT_MODEL)}],
                "destinations": [
                    {"name": "ehr", "type": "fhir", "base_url": fhir.base_url, "timeout_s": 10},
                    {"name": "lis", "type": "hl7", "host": "127.0.0.1", "port": lis.port, "ack_timeout_s": 10},
                ],
                "routes": [{"name": "all-ecg", "models": ["diagnosis-kt"], "destinations": ["ehr", "lis"]}],
            },
        )
        store = stack.store()
        store.create_schema()
        AccountStore(store).create_user("vera", PASSWORD, Role.VIEWER)
        stack.start_worker()
        stack.start_gateway()
        ds = dcmread(ECG_FILE)
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = "Kt^Synthetic", "MRN-KT-0141"
        assert send_dicom(stack.port, [ds]) == [0x0000]
        (row,) = stack.wait_state("delivered", timeout_s=120)

        # what the worker stored: predictions, never measured values
        view = store.view(row.id)
        (kt,) = [o for o in view.result["outputs"] if o["model"] == "diagnosis-kt-tiny"]
        stored = kt["extra"]["predicted_abnormalities"]
        assert [p["code"] for p in stored] == ["age_over_65", "bmi_over_30", "male_sex"]
        assert {p["measured"] for p in stored} == {False}
        by_code = {p["code"]: p for p in stored}

        # FHIR: one Observation per prediction in the report, linked to the findings, in the conclusion
        (report,) = _entries(fhir.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{ds.SOPInstanceUID}"))
        observations = {r["reference"]: fhir.read(r["reference"]) for r in report["result"]}
        predicted = {ref: o for ref, o in observations.items() if _is_predicted(o)}
        assert sorted(o["code"]["coding"][0]["code"] for o in predicted.values()) == sorted(by_code)
        findings = {
            ref for ref, o in observations.items() if o["code"]["coding"][0]["system"] == "http://snomed.info/sct"
        }
        assert len(findings) == 5
        for obs in predicted.values():
            head = by_code[obs["code"]["coding"][0]["code"]]
            assert obs["method"]["text"] == (
                "Predicted from the ECG by model diagnosis-kt-tiny version 0.0.1; not a measurement"
            )
            assert obs["valueQuantity"]["code"] == "1"
            assert obs["valueQuantity"]["value"] == pytest.approx(head["probability"], abs=1e-4)
            assert obs["category"][0]["coding"][0]["code"] == "procedure"
            assert {d["reference"] for d in obs["derivedFrom"]} == findings  # resolved to the finding Observations
            assert "NOT FOR CLINICAL USE" in " ".join(n["text"] for n in obs["note"])
            assert obs["component"][0]["valueCodeableConcept"]["coding"][0]["code"] == head["loinc"]
        for loinc in HEAD_LOINCS:  # no Observation an EHR would chart as age, BMI or sex
            assert fhir.search("Observation", code=f"http://loinc.org|{loinc}").get("total", 0) == 0
        found = fhir.search("Observation", code=f"{PREDICTED_ABNORMALITY_SYSTEM}|age_over_65")
        assert len(_entries(found)) == 1
        age = by_code["age_over_65"]
        assert (
            f"{SECTION_TITLE}, model diagnosis-kt-tiny 0.0.1: ECG pattern associated with age over 65 years, "
            f"p={age['probability']:.2f};" in report["conclusion"]
        )
        assert [f["contentType"] for f in report.get("presentedForm", [])][:1] == ["application/pdf"]

        # HL7: an NM OBX per prediction, its NTE in the same words
        (oru,) = lis.wait_received(1)
        validate_er7(oru)
        segments = [str(s).split("|") for s in hl7.parse(oru)]
        obx = [s for s in segments if s[0] == "OBX" and s[3].split("^")[0].endswith("-predicted")]
        assert [s[3].split("^")[0] for s in obx] == [f"{c}-predicted" for c in by_code]
        notes = [s[3] for s in segments if s[0] == "NTE"]
        for code, head in by_code.items():
            wording = (
                f"ECG pattern associated with {head['display']}, p={head['probability']:.2f} "
                "(predicted from the ECG, not measured)"
            )
            assert wording in notes, (code, notes)
        assert not any(s[3].split("^")[0] in HEAD_LOINCS for s in obx)

        # the console's message page shows them under their heading
        with httpx.Client(base_url=f"http://127.0.0.1:{stack.console_port}", timeout=30) as console:
            login(console, "vera")
            page = console.get(f"/messages/{row.id}").text
        assert "Predicted from the ECG (not measured)" in page and "age over 65 years" in page

        logs = stack.full_logs()
        assert "MRN-KT-0141" not in logs and "Synthetic" not in logs, "PHI in the logs"


def _kt_bundle(uid: str, version: int = 1) -> Any:
    """A KT result small enough for Medplum's transactions (at most 8 conditional entries): 2 findings, 2 heads."""
    findings = tuple(f for f in sample_findings() if f.code in ("MI", "NORM"))
    predicted = [
        {
            "code": "nt_probnp_high",
            "display": "elevated NT-proBNP",
            "loinc": "33762-6",
            "variable": "NT-proBNP",
            "criterion": "above 300 pg/mL",
            "probability": 0.81,
            "threshold": 0.5,
            "present": True,
            "measured": False,
        },
        {
            "code": "troponin_t_high",
            "display": "elevated troponin T",
            "loinc": "6598-7",
            "variable": "Troponin T",
            "criterion": "above 0.014 ng/mL",
            "probability": 0.2,
            "threshold": 0.5,
            "present": False,
            "measured": False,
        },
    ]
    output = ModelOutput("diagnosis-kt", "0.1.0", "diagnosis", findings, {"predicted_abnormalities": predicted})
    return build_report(
        AnalysisResult(f"msg-{uid}", (output,)),
        patient=Patient(id="MRN-KT-2"),
        study=Study(sop_instance_uid=uid, acquired_at=datetime(2024, 5, 2, 8, 30, tzinfo=UTC)),
        message_id=f"msg-{uid}",
        version=version,
    )


@pytest.mark.parametrize("mode", ["transaction", "batch", "individual"])
def test_every_write_mode_carries_the_predictions_once(fhir: FhirServer, mode: str) -> None:
    uid = generate_uid()
    bundle = _kt_bundle(uid)
    with FhirClient(fhir.base_url) as client:
        first = deliver_report(client, bundle, mode=mode)  # type: ignore[arg-type]
        assert deliver_report(client, bundle, mode=mode) == first  # type: ignore[arg-type]
        report = fhir.read(first)
        refs = [r["reference"] for r in report["result"]]
        observations = {ref: fhir.read(ref) for ref in refs}
        predicted = [o for o in observations.values() if _is_predicted(o)]
        assert len(refs) == 4 and len(predicted) == 2
        finding_refs = {ref for ref, o in observations.items() if not _is_predicted(o)}
        for obs in predicted:
            assert {d["reference"] for d in obs["derivedFrom"]} == finding_refs
        for planned in bundle.observations:
            ident = planned.resource["identifier"][0]
            assert fhir.search("Observation", identifier=f"{ident['system']}|{ident['value']}")["total"] == 1
        # a re-analysis amends the same Observations
        assert deliver_revision(client, _kt_bundle(uid, version=2)) == first
    amended = fhir.read(first)
    assert amended["status"] == "amended"
    for ref in amended["result"]:
        assert fhir.read(ref["reference"])["status"] == "amended"
    for planned in bundle.observations:
        ident = planned.resource["identifier"][0]
        assert fhir.search("Observation", identifier=f"{ident['system']}|{ident['value']}")["total"] == 1
