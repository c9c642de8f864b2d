"""deliver_report against a real FHIR R4 server (Medplum fhir-router, tests/fhir_server).

Why: conditional create, Location parsing and search encoding are only proven by a
server that implements them; the unit tests fake the transport.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from ecgbridge.mapping.codes import SUPERCLASS_DISPLAY, SUPERCLASS_SNOMED
from ecgbridge.mapping.ecg import AnalysisResult, Finding, ModelOutput, Patient, Study
from ecgbridge.mapping.fhir_report import ReportBundle, build_report
from ecgbridge.outbound.fhir_client import BearerAuth, FhirClient
from ecgbridge.outbound.fhir_sender import deliver_report
from tests.support.fhir_server import FhirServer, require_node

UID = "1.2.826.0.1.3680043.8.498.99887766554433221100"
MODEL = "ptbxl-superclass"
VERSION = "1.2.0"
TOKEN = "integration-test-token"


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    require_node()
    # validate=True: Medplum also checks our resources against the R4 StructureDefinitions.
    with FhirServer(bearer=TOKEN, validate=True) as srv:
        yield srv


def fhir_client(server: Any) -> FhirClient:
    return FhirClient(server.base_url, auth=BearerAuth(TOKEN))


def entries(found: Any) -> list[dict[str, Any]]:
    """The matched resources, whether the helper returns a Bundle or a list."""
    if isinstance(found, dict):
        return [
            e["resource"] for e in found.get("entry") or [] if (e.get("search") or {}).get("mode", "match") == "match"
        ]
    return [r.get("resource", r) for r in found]


def make_bundle(uid: str = UID, message_id: str = "msg-int-1") -> ReportBundle:
    probs = {"NORM": 0.07, "MI": 0.91, "STTC": 0.55, "CD": 0.2, "HYP": 0.1}
    findings = tuple(
        Finding(code, SUPERCLASS_DISPLAY[code], p, 0.5, p >= 0.5, snomed=SUPERCLASS_SNOMED[code][0])
        for code, p in probs.items()
    )
    result = AnalysisResult(
        message_id, (ModelOutput(MODEL, VERSION, "diagnosis", findings),), ecg_flags=("derived_leads:III,aVR,aVL,aVF",)
    )
    return build_report(
        result,
        patient=Patient(id="MRN-INT-1", id_issuer="HOSP"),
        study=Study(sop_instance_uid=uid, acquired_at=datetime(2024, 5, 2, 8, 30, tzinfo=UTC)),
        message_id=message_id,
        issued=datetime(2024, 5, 2, 8, 31, tzinfo=UTC),
    )


def test_deliver_twice_creates_once(server: Any) -> None:
    bundle = make_bundle()
    with fhir_client(server) as client:
        first = deliver_report(client, bundle)
        log_mark = len(server.logs().splitlines())
        second = deliver_report(client, bundle)
        second_run = server.logs().splitlines()[log_mark:]
        stored = client.read("DiagnosticReport", first.split("/", 1)[1])
    assert first == second
    # The second delivery only found things: conditional creates answered 200, none 201.
    posts = [line for line in second_run if " POST " in line]
    assert len(posts) == 1 + 5 + 1, second_run  # Device, 5 Observations, report; no Provenance
    assert all(" 200 " in line for line in posts), posts

    reports = entries(server.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{UID}"))
    assert len(reports) == 1
    report = reports[0]
    assert f"DiagnosticReport/{report['id']}" == first
    assert report["category"][0]["coding"][0]["code"] == "EC"
    assert report["code"]["coding"][0]["code"] == "34534-8"
    assert stored["status"] == "preliminary"
    assert stored["meta"]["security"][0]["code"] == "AIAST"

    result_refs = [r["reference"] for r in report["result"]]
    assert len(result_refs) == 5
    for code in probs_codes():
        obs = entries(
            server.search("Observation", identifier=f"urn:ecgbridge:result|urn:oid:{UID}/{MODEL}/{VERSION}/{code}")
        )
        assert len(obs) == 1, code
        assert f"Observation/{obs[0]['id']}" in result_refs
        assert obs[0]["device"]["reference"].startswith("Device/")

    devices = entries(server.search("Device", identifier=f"urn:ecgbridge:model|{MODEL}@{VERSION}"))
    assert len(devices) == 1
    provenances = entries(server.search("Provenance", target=first))
    assert len(provenances) == 1
    assert provenances[0]["agent"][0]["who"]["reference"] == f"Device/{devices[0]['id']}"


def test_second_ecg_reuses_device(server: Any) -> None:
    with fhir_client(server) as client:
        ref = deliver_report(client, make_bundle(uid=UID + ".2", message_id="msg-int-2"))
    assert ref.startswith("DiagnosticReport/")
    assert len(entries(server.search("Device", identifier=f"urn:ecgbridge:model|{MODEL}@{VERSION}"))) == 1


def probs_codes() -> tuple[str, ...]:
    return ("NORM", "MI", "STTC", "CD", "HYP")


def test_transaction_mode_writes_the_report_in_one_post_and_stays_idempotent(server: Any) -> None:
    uid = UID + ".77"
    bundle = make_bundle(uid=uid, message_id="msg-int-tx")
    with fhir_client(server) as client:
        log_mark = len(server.logs().splitlines())
        first = deliver_report(client, bundle, mode="transaction")
        first_run = server.logs().splitlines()[log_mark:]
        second = deliver_report(client, bundle, mode="transaction")
        individually = deliver_report(client, bundle)  # the other mode finds the same resources
    assert first == second == individually
    posts = [line for line in first_run if " POST " in line]
    assert len(posts) == 2, first_run  # the transaction, then the Provenance
    reports = entries(server.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{uid}"))
    assert len(reports) == 1 and f"DiagnosticReport/{reports[0]['id']}" == first
    refs = [r["reference"] for r in reports[0]["result"]]
    assert len(refs) == 5 and all(r.startswith("Observation/") for r in refs)
    for ref in refs:  # the server resolved every urn:uuid placeholder
        obs = server.read(*ref.split("/"))
        assert obs["device"]["reference"].startswith("Device/")
    assert len(entries(server.search("Device", identifier=f"urn:ecgbridge:model|{MODEL}@{VERSION}"))) == 1
    assert len(entries(server.search("Provenance", target=first))) == 1


def test_the_measurements_panel_is_one_observation_and_stays_idempotent(server: Any) -> None:
    """``measurements: panel``: the eight global measurements in one Observation; fewer requests, same facts."""
    measured = {"heart_rate": 61.0, "pr_interval": 156.0, "qrs_duration": 71.0, "qt_interval": 379.0}
    measured |= {"qtc_interval": 382.3, "p_axis": 76.9, "qrs_axis": 48.0, "t_axis": 57.9}
    posts = {}
    for panel in (False, True):
        uid = UID + (".91" if panel else ".90")
        findings = (Finding("MI", SUPERCLASS_DISPLAY["MI"], 0.9, 0.5, True, snomed=SUPERCLASS_SNOMED["MI"][0]),)
        result = AnalysisResult(
            f"msg-panel-{panel}",
            (
                ModelOutput(MODEL, VERSION, "diagnosis", findings),
                ModelOutput("ecgbridge-measurements", "0.1.0", "measurements", (), extra={"measurements": measured}),
            ),
        )
        bundle = build_report(
            result,
            patient=Patient(id="MRN-INT-1", id_issuer="HOSP"),
            study=Study(sop_instance_uid=uid, acquired_at=datetime(2024, 5, 2, 8, 30, tzinfo=UTC)),
            message_id=f"msg-panel-{panel}",
            measurements_panel=panel,
        )
        with fhir_client(server) as client:
            mark = len(server.logs().splitlines())
            first = deliver_report(client, bundle)
            posts[panel] = sum(" POST " in line for line in server.logs().splitlines()[mark:])
            assert deliver_report(client, bundle) == first  # a redelivery finds what it wrote
        report = server.read(*first.split("/"))
        observations = [server.read(*r["reference"].split("/")) for r in report["result"]]
        codes = [o["code"]["coding"][0]["code"] for o in observations]
        if panel:
            (panel_obs,) = [o for o in observations if o["code"]["coding"][0]["code"] == "34534-8"]
            assert len(panel_obs["component"]) == 8 and len(observations) == 2
        else:
            assert len(observations) == 9 and "34534-8" not in codes
    assert posts[True] == posts[False] - 7, posts  # eight measurement Observations became one


def test_auto_write_mode_follows_the_servers_capability_statement(server: Any, monkeypatch: Any) -> None:
    """``write_mode: auto`` (the default): what /metadata lists, best first (transaction, batch, one by one), asked once."""
    from ecgbridge.core.settings import FhirDestination
    from ecgbridge.outbound.fhir_sender import FhirSender
    from tests.support.http_peers import FaultProxy

    monkeypatch.setenv("FHIR_TEST_TOKEN", TOKEN)
    auth = {"type": "bearer", "token_env": "FHIR_TEST_TOKEN"}
    assert FhirDestination(name="ehr", base_url=server.base_url).write_mode == "auto"

    def sender_for(base_url: str) -> FhirSender:
        return FhirSender(FhirDestination(name="ehr", base_url=base_url, auth=auth))

    medplum = sender_for(server.base_url)
    try:
        assert medplum.write_mode(medplum.client()) == "transaction"  # its CapabilityStatement lists transaction
    finally:
        medplum.close()
    batch_only = {
        "resourceType": "CapabilityStatement",
        "rest": [{"mode": "server", "interaction": [{"code": "batch"}]}],
    }
    missing = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}
    for answer, mode in (((200, batch_only), "batch"), ((404, missing), "individual")):
        with FaultProxy(server.origin, faults={"metadata": answer}) as proxy:
            sender = sender_for(proxy.base_url)
            try:
                assert sender.write_mode(sender.client()) == mode
                asked = len(proxy.requests)
                assert sender.write_mode(sender.client()) == mode  # the answer is kept, not asked again
                assert len(proxy.requests) == asked == 1
            finally:
                sender.close()
    explicit = FhirSender(
        FhirDestination(name="ehr", base_url="http://127.0.0.1:9/fhir", write_mode="individual", auth=auth)
    )
    assert explicit.write_mode(explicit.client()) == "individual"  # a configured mode asks nothing (port 9: no server)


def _two_model_result(message_id: str) -> AnalysisResult:
    """Two models' findings: 10 Observations, 2 Devices and the report, more than Medplum takes in one transaction."""
    probs = {"NORM": 0.07, "MI": 0.91, "STTC": 0.55, "CD": 0.2, "HYP": 0.1}
    findings = tuple(
        Finding(code, SUPERCLASS_DISPLAY[code], p, 0.5, p >= 0.5, snomed=SUPERCLASS_SNOMED[code][0])
        for code, p in probs.items()
    )
    outputs = (
        ModelOutput(MODEL, VERSION, "diagnosis", findings),
        ModelOutput(MODEL + "-b", VERSION, "diagnosis", findings),
    )
    return AnalysisResult(message_id, outputs)


def test_batch_mode_writes_a_layer_per_request_and_stays_idempotent(server: Any) -> None:
    from ecgbridge.mapping.fhir_report import build_report

    uid = UID + ".88"
    bundle = build_report(
        _two_model_result("msg-int-batch"),
        patient=Patient(id="MRN-INT-1", id_issuer="HOSP"),
        study=Study(sop_instance_uid=uid, acquired_at=datetime(2024, 5, 2, 8, 30, tzinfo=UTC)),
        message_id="msg-int-batch",
        issued=datetime(2024, 5, 2, 8, 31, tzinfo=UTC),
    )
    with fhir_client(server) as client:
        log_mark = len(server.logs().splitlines())
        first = deliver_report(client, bundle, mode="batch")
        first_run = server.logs().splitlines()[log_mark:]
        assert deliver_report(client, bundle, mode="batch") == first == deliver_report(client, bundle)
    posts = [line for line in first_run if " POST " in line]
    assert len(posts) == 4, first_run  # Devices, Observations, the report, then the Provenance
    (report,) = entries(server.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{uid}"))
    refs = [r["reference"] for r in report["result"]]
    assert len(refs) == 10 and all(r.startswith("Observation/") for r in refs)
    devices = {server.read(*ref.split("/"))["device"]["reference"] for ref in refs}
    assert len(devices) == 2 and all(d.startswith("Device/") for d in devices)


def test_auto_falls_back_to_batch_when_the_server_refuses_the_transaction(server: Any, monkeypatch: Any) -> None:
    """Medplum lists transactions but refuses one of more than 8 conditional entries: the report goes as batches."""
    from ecgbridge.core.settings import FhirDestination
    from ecgbridge.mapping.readers import read_ecg_file
    from ecgbridge.outbound.fhir_sender import FhirSender
    from ecgbridge.outbound.sender import Outgoing
    from tests.conftest import FIXTURES

    monkeypatch.setenv("FHIR_TEST_TOKEN", TOKEN)
    dest = FhirDestination(
        name="ehr", base_url=server.base_url, auth={"type": "bearer", "token_env": "FHIR_TEST_TOKEN"}
    )
    sender = FhirSender(dest)
    ecg = read_ecg_file(FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm")

    def send(n: int) -> str:
        mid = f"msg-auto-{n}"
        study = replace(ecg.study, sop_instance_uid=f"{UID}.55{n}")  # one report per thread
        own = replace(ecg, study=study)
        return sender.send(Outgoing(message_id=mid, result=_two_model_result(mid), ecg=own, attachments={}))

    try:
        with ThreadPoolExecutor(4) as pool:  # the delivery worker's threads: all refused at once, all fall back
            refs = list(pool.map(send, range(4)))
        assert sender.write_mode(sender.client()) == "batch"  # the refusal is remembered
    finally:
        sender.close()
    for n, ref in enumerate(refs):
        (report,) = entries(server.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{UID}.55{n}"))
        assert len(report["result"]) == 10 and ref == f"DiagnosticReport/{report['id']}"
