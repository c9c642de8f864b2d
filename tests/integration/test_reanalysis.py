"""Re-analysis end to end: deliver version 1, an operator asks the console for a re-analysis, and the
destinations are updated by the documented rule.

Real parts only: a redis-server, real ``ecgbridge gateway`` (with its console) and ``ecgbridge
worker`` processes, pynetdicom as the cart, Medplum's FHIR server as one EHR and python-hl7's MLLP
server (``tests.support.hl7_receiver``) as another. The request goes through the console's JSON API
over HTTP, signed in like an operator. Assertions are on what the receivers hold: the same
DiagnosticReport (one per identifier), now ``amended``, and an ORU^R01 with result status C under
its own MSH-10.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import hl7
import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from ecgbridge.core.accounts import AccountStore, Role
from ecgbridge.mapping.ecg import ModelOutput, Patient, Study
from ecgbridge.mapping.fhir_report import RESULT_VERSION_SYSTEM, build_report
from ecgbridge.mapping.hl7_oru import validate_er7
from ecgbridge.outbound.fhir_client import FhirClient
from ecgbridge.outbound.fhir_sender import deliver_report, deliver_revision
from ecgbridge.outbound.hl7_sender import control_id
from tests.support.console import PASSWORD, login
from tests.support.fhir_server import FhirServer, require_node
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.processes import wait_for
from tests.support.results import sample_findings, sample_result
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration


def _reports(fhir: Any, sop_uid: str) -> list[dict[str, Any]]:
    bundle = fhir.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{sop_uid}")
    return [e["resource"] for e in bundle.get("entry", [])]


def _deliveries_at(store: Any, message_id: str, version: int) -> bool:
    rows = store.deliveries(message_id)
    return bool(rows) and all(d.version == version and d.state == "delivered" for d in rows)


def test_reanalysis_amends_the_fhir_report_and_sends_a_corrected_oru(
    make_stack: Any, fhir_server: Any, waveform_ecg_path: Any, database_url: str | None
) -> None:
    with Hl7Receiver("AA") as lis:
        stack = make_stack(
            fhir_base_url=fhir_server.base_url,
            database_url=database_url,
            extra={
                "destinations": [
                    {"name": "ehr", "type": "fhir", "base_url": fhir_server.base_url, "timeout_s": 5},
                    {
                        "name": "lis",
                        "type": "hl7",
                        "host": "127.0.0.1",
                        "port": lis.port,
                        "ack_timeout_s": 10,
                        "receiving_application": "TESTEHR",
                    },
                ],
                "routes": [{"name": "all-ecg", "models": ["diagnosis"], "destinations": ["ehr", "lis"]}],
            },
        )
        store = stack.store()
        store.create_schema()
        AccountStore(store).create_user("olivia", PASSWORD, Role.OPERATOR)
        stack.start_worker()
        stack.start_gateway()
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = "Doe^Janet", "MRN7784512"
        assert send_dicom(stack.port, [ds]) == [0x0000]
        (row,) = stack.wait_state("delivered", timeout_s=90)

        (first,) = _reports(fhir_server, ds.SOPInstanceUID)
        assert first["status"] == "preliminary"
        (oru1,) = lis.wait_received(1)

        with httpx.Client(base_url=f"http://127.0.0.1:{stack.console_port}", timeout=30) as console:
            csrf = login(console, "olivia")
            asked = [
                console.post(
                    f"/api/messages/{row.id}/reanalyse", params={"reason": "new model"}, headers={"X-CSRF-Token": csrf}
                )
                for _ in range(2)  # a double click
            ]
        assert [a.status_code for a in asked] == [200, 200], asked[0].text
        assert [(a.json()["version"], a.json()["joined"]) for a in asked] == [(2, False), (2, True)]

        wait_for(lambda: _deliveries_at(store, row.id, 2), 90, 0.3, "both deliveries at result version 2")
        stack.wait_state("delivered", timeout_s=30)
        assert [v.version for v in store.result_versions(row.id)] == [1, 2]  # one version for two clicks
        assert len(store.deliveries(row.id)) == 2

        # FHIR: the same report, found by its identifier, updated in place
        (report,) = _reports(fhir_server, ds.SOPInstanceUID)
        assert report["id"] == first["id"] and report["status"] == "amended"
        assert report["meta"]["versionId"] != first["meta"]["versionId"]
        assert {"system": RESULT_VERSION_SYSTEM, "code": "2"} in [
            {k: t[k] for k in ("system", "code")} for t in report["meta"]["tag"]
        ]
        observations = [fhir_server.read(*ref["reference"].split("/")) for ref in report["result"]]
        assert observations and {o["status"] for o in observations} == {"amended"}
        for obs in observations:  # one Observation per identifier: updated, not duplicated
            ident = obs["identifier"][0]
            found = fhir_server.search("Observation", identifier=f"{ident['system']}|{ident['value']}")
            assert found["total"] == 1
        provenances = fhir_server.search("Provenance", target=f"DiagnosticReport/{report['id']}")["entry"]
        activities = sorted(p["resource"]["activity"]["coding"][0]["code"] for p in provenances)
        assert activities == ["CREATE", "UPDATE"]
        assert store.delivery(row.id, "ehr").remote_ref == f"DiagnosticReport/{report['id']}"

        # HL7: a correction with its own control id, after the original
        (_, oru2) = lis.wait_received(2)
        validate_er7(oru2)
        msg1, msg2 = hl7.parse(oru1), hl7.parse(oru2)
        assert str(msg1.segment("MSH")(10)) == control_id(row.id, "lis")
        assert str(msg2.segment("MSH")(10)) == control_id(row.id, "lis", 2)
        assert str(msg1.segment("OBR")(25)) == "P" and str(msg2.segment("OBR")(25)) == "C"
        assert {str(s(11)) for s in msg2.segments("OBX")} == {"C"}
        assert str(msg2.segment("OBR")(3)) == str(msg1.segment("OBR")(3))  # the same filler order number
        assert len(lis.received) == 2

        kinds = [e.kind for e in store.events(row.id)]
        assert kinds.count("reanalysis_requested") == 1 and kinds.count("reanalysed") == 1
        assert kinds.count("delivery_superseded") == 2
        logs = stack.full_logs()
        assert "MRN7784512" not in logs and "Janet" not in logs, "PHI in the logs"


# --------------------------------------------------------------------------- the FHIR rule, sender only


def _bundles(version: int, model_version: str = "1.2.0", uid: str = "1.2.826.0.1.3680043.8.498.77") -> Any:
    result = sample_result(outputs=(ModelOutput("ptbxl-superclass", model_version, "diagnosis", sample_findings()),))
    return build_report(
        result,
        patient=Patient(id="MRN-1"),
        study=Study(sop_instance_uid=uid, acquired_at=datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        message_id="m",
        version=version,
    )


def test_the_revision_rule_against_a_validating_fhir_server() -> None:
    require_node()
    with FhirServer(validate=True) as srv, FhirClient(srv.base_url) as client:
        ref = deliver_report(client, _bundles(1))
        assert deliver_revision(client, _bundles(2)) == ref
        assert deliver_revision(client, _bundles(2)) == ref  # a repeat after a crash: same end state
        report = srv.read(ref)
        assert report["status"] == "amended"
        provenances = srv.search("Provenance", target=ref)["entry"]
        assert sorted(p["resource"]["activity"]["coding"][0]["code"] for p in provenances) == ["CREATE", "UPDATE"]
        old = {r["reference"] for r in report["result"]}

        # version 3 from another model version: new Observations listed, the earlier ones left as they were
        assert deliver_revision(client, _bundles(3, model_version="2.0.0")) == ref
        report = srv.read(ref)
        assert not {r["reference"] for r in report["result"]} & old
        assert {srv.read(r)["status"] for r in old} == {"amended"}
        ident = report["identifier"][0]
        assert srv.search("DiagnosticReport", identifier=f"{ident['system']}|{ident['value']}")["total"] == 1
        assert len(srv.search("Provenance", target=ref)["entry"]) == 3

        # a revision of a report that never arrived (version 1 failed for good) creates it, amended
        fresh = deliver_revision(client, _bundles(2, uid="1.2.826.0.1.3680043.8.498.78"))
        assert fresh != ref and srv.read(fresh)["status"] == "amended"
