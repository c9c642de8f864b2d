"""Results linked in the chart: the report ``basedOn`` the EHR's ServiceRequest, tiers coded (Medplum peer).

Why against a real server: the order is found by a FHIR token search (OR-ed identifiers,
escaping) and the link is only useful if the EHR's own searches follow it
(``DiagnosticReport?based-on=ServiceRequest/<id>``, ``Observation?component-value-concept=``);
Medplum runs with validate=True, so it also checks the new elements against the R4
StructureDefinitions.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from ecgbridge.core.settings import FhirDestination
from ecgbridge.errors import TransientDeliveryError
from ecgbridge.mapping.ecg import STANDARD_LEADS, AnalysisResult, Ecg, ModelOutput, Patient, Study
from ecgbridge.outbound.fhir_sender import FhirSender
from ecgbridge.outbound.sender import Outgoing
from tests.support.fhir_server import FhirServer, require_node
from tests.support.http_peers import FaultProxy
from tests.support.results import sample_findings

TOKEN = "order-link-token"
PLACER_SYSTEM = "urn:oid:2.16.840.1.113883.3.999.1"
ACCESSION_SYSTEM = "urn:oid:2.16.840.1.113883.3.999.3"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
RISK_TIER = "urn:ecgbridge:risk-tier"


@pytest.fixture(scope="module")
def server() -> Iterator[FhirServer]:
    require_node()
    with FhirServer(bearer=TOKEN, validate=True) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDER_LINK_TOKEN", TOKEN)


def sender(base_url: str) -> FhirSender:
    return FhirSender(
        FhirDestination(
            name="ehr",
            base_url=base_url,
            auth={"type": "bearer", "token_env": "ORDER_LINK_TOKEN"},
            order_identifier_systems={"placer": PLACER_SYSTEM, "accession": ACCESSION_SYSTEM},
        )
    )


def matches(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry") or [] if (e.get("search") or {}).get("mode", "match") == "match"]


def create(server: FhirServer, resource: dict[str, Any]) -> str:
    response = server.request("POST", resource["resourceType"], json=resource)
    assert response.status_code == 201, response.text
    return f"{resource['resourceType']}/{response.json()['id']}"


def seed_order(server: FhirServer, patient_ref: str, **identifiers: str) -> str:
    """A ServiceRequest for an ECG, as the EHR holds it: typed identifiers, subject, status active."""
    types = {"placer": ("PLAC", PLACER_SYSTEM), "accession": ("ACSN", ACCESSION_SYSTEM)}
    return create(
        server,
        {
            "resourceType": "ServiceRequest",
            "identifier": [
                {"type": {"coding": [{"system": V2_0203, "code": types[k][0]}]}, "system": types[k][1], "value": v}
                for k, v in identifiers.items()
            ],
            "status": "active",
            "intent": "order",
            "code": {"coding": [{"system": "http://loinc.org", "code": "34534-8"}], "text": "12 lead ECG"},
            "subject": {"reference": patient_ref},
        },
    )


def seed_patient(server: FhirServer, mrn: str) -> str:
    return create(
        server, {"resourceType": "Patient", "identifier": [{"system": "urn:ecgbridge:patient-id", "value": mrn}]}
    )


def outgoing(uid: str, mrn: str, *, order: dict[str, Any] | None = None, version: int = 1, **study: Any) -> Outgoing:
    findings = sample_findings(MI="high", STTC="moderate", NORM="low")
    result = AnalysisResult(f"msg-{uid}", (ModelOutput("ptbxl-superclass", "1.2.0", "diagnosis", findings),))
    ecg = Ecg(
        signals=np.zeros((12, 500), dtype=np.float32),
        leads=STANDARD_LEADS,
        fs=500.0,
        patient=Patient(id=mrn),
        study=Study(sop_instance_uid=uid, acquired_at=datetime(2024, 6, 1, 9, 0, tzinfo=UTC), **study),
    )
    return Outgoing(f"msg-{uid}", result, ecg, {}, order=order, version=version)


def test_the_report_is_based_on_the_ehrs_order_and_the_ehr_finds_it_by_it(server: FhirServer) -> None:
    patient = seed_patient(server, "MRN-LINK-1")
    order = seed_order(server, patient, placer="ORD-1001")
    seed_order(server, patient, placer="ORD-OTHER")  # another order of the same patient
    uid = "1.2.826.0.1.3680043.8.498.7001"
    send = sender(server.base_url)
    try:
        log_mark = len(server.logs().splitlines())
        ref = send.send(outgoing(uid, "MRN-LINK-1", order={"placer_order_number": "ORD-1001"}))
        searches = [
            line for line in server.logs().splitlines()[log_mark:] if "GET" in line and "ServiceRequest" in line
        ]
        again = send.send(outgoing(uid, "MRN-LINK-1", order={"placer_order_number": "ORD-1001"}))
    finally:
        send.close()
    assert again == ref  # the order search does not touch idempotency
    assert len(searches) == 1, searches  # one search per report
    report = server.read(ref)
    (based_on,) = report["basedOn"]
    assert based_on["reference"] == order
    assert based_on["identifier"]["system"] == PLACER_SYSTEM and based_on["identifier"]["value"] == "ORD-1001"
    assert based_on["identifier"]["type"]["coding"][0]["code"] == "PLAC"
    assert report["subject"]["reference"] == patient
    # the EHR joins the order and the AI result with its own search
    (found,) = matches(server.search("DiagnosticReport", {"based-on": order}))
    assert f"DiagnosticReport/{found['id']}" == ref

    # the tiers are coded and searchable
    high = matches(server.search("Observation", {"component-value-concept": f"{RISK_TIER}|high"}))
    mine = [o for o in high if f"Observation/{o['id']}" in {r["reference"] for r in report["result"]}]
    (mi,) = mine
    assert mi["code"]["coding"][0]["code"] == "164865005"  # MI
    assert mi["interpretation"][1]["coding"][0] == {"system": RISK_TIER, "code": "high", "display": "High risk tier"}
    assert "tier high" in mi["note"][0]["text"]


def test_a_revision_keeps_the_order_link_and_the_coded_tiers(server: FhirServer) -> None:
    patient = seed_patient(server, "MRN-LINK-2")
    order = seed_order(server, patient, placer="ORD-2002")
    uid = "1.2.826.0.1.3680043.8.498.7002"
    ecg_order = {"placer_order_number": "ORD-2002"}
    send = sender(server.base_url)
    try:
        first = send.send(outgoing(uid, "MRN-LINK-2", order=ecg_order))
        revised = send.send(outgoing(uid, "MRN-LINK-2", order=ecg_order, version=2))
    finally:
        send.close()
    assert revised == first  # the same report, updated in place
    report = server.read(revised)
    assert report["status"] == "amended"
    assert report["basedOn"][0]["reference"] == order
    tiers = {
        server.read(r["reference"])["component"][0]["valueCodeableConcept"]["coding"][0]["code"]
        for r in report["result"]
        if "component" in server.read(r["reference"])
    }
    assert tiers == {"high", "moderate", "low"}


def test_a_dicom_accession_number_finds_the_order_too(server: FhirServer) -> None:
    patient = seed_patient(server, "MRN-LINK-3")
    order = seed_order(server, patient, accession="ACC-3003")
    send = sender(server.base_url)
    try:
        ref = send.send(outgoing("1.2.826.0.1.3680043.8.498.7003", "MRN-LINK-3", accession_number="ACC-3003"))
    finally:
        send.close()
    (based_on,) = server.read(ref)["basedOn"]
    assert based_on["reference"] == order
    assert based_on["identifier"]["type"]["coding"][0]["code"] == "ACSN"


def test_an_order_the_ehr_does_not_hold_is_named_by_identifier(server: FhirServer) -> None:
    seed_patient(server, "MRN-LINK-4")
    send = sender(server.base_url)
    try:
        ref = send.send(
            outgoing(
                "1.2.826.0.1.3680043.8.498.7004",
                "MRN-LINK-4",
                order={"placer_order_number": "ORD-UNKNOWN", "filler_order_number": "F-4"},
            )
        )
    finally:
        send.close()
    report = server.read(ref)
    assert report["basedOn"] == [
        {
            "type": "ServiceRequest",
            "identifier": {
                "type": {"coding": [{"system": V2_0203, "code": "PLAC", "display": "Placer Identifier"}]},
                "system": PLACER_SYSTEM,
                "value": "ORD-UNKNOWN",
            },
        }
    ]
    assert "order_" not in report["conclusion"]


def test_no_order_no_search_and_no_based_on(server: FhirServer) -> None:
    seed_patient(server, "MRN-LINK-5")
    send = sender(server.base_url)
    try:
        log_mark = len(server.logs().splitlines())
        ref = send.send(outgoing("1.2.826.0.1.3680043.8.498.7005", "MRN-LINK-5"))
        lines = server.logs().splitlines()[log_mark:]
    finally:
        send.close()
    assert "basedOn" not in server.read(ref)
    assert not [line for line in lines if "ServiceRequest" in line]


def test_a_server_without_service_request_search_still_gets_the_report(server: FhirServer) -> None:
    """404 on the search: the reference is by identifier, and the sender does not ask that server again."""
    unsupported = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported"}]}
    with FaultProxy(server.origin, faults={"ServiceRequest": (404, unsupported)}) as proxy:
        send = sender(proxy.base_url)
        try:
            refs = [
                send.send(
                    outgoing(
                        f"1.2.826.0.1.3680043.8.498.701{n}", "MRN-LINK-6", order={"placer_order_number": f"ORD-6{n}"}
                    )
                )
                for n in range(2)
            ]
        finally:
            send.close()
    asked = [path for _method, path in proxy.requests if "/ServiceRequest" in path]
    assert len(asked) == 1, asked
    for n, ref in enumerate(refs):
        (based_on,) = server.read(ref)["basedOn"]
        assert "reference" not in based_on and based_on["identifier"]["value"] == f"ORD-6{n}"


def test_a_transient_failure_of_the_search_retries_the_delivery(server: FhirServer) -> None:
    busy = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}
    uid = "1.2.826.0.1.3680043.8.498.7020"
    with FaultProxy(server.origin, faults={"ServiceRequest": (503, busy)}) as proxy:
        send = sender(proxy.base_url)
        try:
            with pytest.raises(TransientDeliveryError):
                send.send(outgoing(uid, "MRN-LINK-7", order={"placer_order_number": "ORD-7"}))
        finally:
            send.close()
    # nothing was written: the retry writes the report with its link
    assert not matches(server.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{uid}"))
