"""The report's link to its order (``basedOn``) and the coded risk tiers (mapping.fhir_report).

Why: an EHR joins the order, the AI result and the cardiologist's over-read only through
coded, machine-readable links; a tier written in a note or an order number in the text
cannot be searched. The EHR side (search, linking) is proven against Medplum in
tests/integration/test_fhir_order_link.py; here the mapping's rules, checked with the
``fhir.resources.R4B`` models the EHR's validator mirrors.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from ecgbridge.core.settings import FhirDestination
from ecgbridge.mapping.codes import RISK_TIER_SYSTEM
from ecgbridge.mapping.ecg import ModelOutput, Patient, Study
from ecgbridge.mapping.fhir_report import (
    OrderIdentifier,
    OrderLink,
    ReportBundle,
    build_report,
    link_order,
    order_identifiers,
    order_search_query,
)
from tests.support.results import sample_findings, sample_result

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
UID = "1.2.826.0.1.3680043.8.498.55501"
PLACER = OrderIdentifier("placer", "urn:oid:1.2.3.4.5", "ORD-1001")
FILLER = OrderIdentifier("filler", "urn:oid:1.2.3.4.6", "F-77")
ACCESSION = OrderIdentifier("accession", "urn:oid:1.2.3.4.7", "ACC-9")
SYSTEMS = {"placer_system": PLACER.system, "filler_system": FILLER.system, "accession_system": ACCESSION.system}


def build(order: OrderLink | None = None, *, version: int = 1, **tiers: str) -> ReportBundle:
    result = sample_result(outputs=(ModelOutput("ptbxl-superclass", "1.2.0", "diagnosis", sample_findings(**tiers)),))
    return build_report(
        result,
        patient=Patient(id="MRN-0042"),
        study=Study(sop_instance_uid=UID, acquired_at=datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        message_id="msg-order-1",
        patient_reference="Patient/p1",
        issued=datetime(2024, 3, 1, 10, 5, tzinfo=UTC),
        order=order,
        version=version,
    )


def observation(bundle: ReportBundle, code: str) -> dict[str, Any]:
    (obs,) = [o.resource for o in bundle.observations if o.resource["identifier"][0]["value"].endswith(f"/{code}")]
    return obs


# ----------------------------------------------------------------------- which identifiers


def test_the_orders_numbers_come_first_then_the_ecgs_and_the_accession_number() -> None:
    study = Study(placer_order_number="ECG-PLACER", filler_order_number="ECG-FILLER", accession_number="ACC-9")
    got = order_identifiers({"placer_order_number": "ORD-1001", "filler_order_number": None}, study, **SYSTEMS)
    assert got == (
        OrderIdentifier("placer", PLACER.system, "ORD-1001"),  # the linked order's
        OrderIdentifier("filler", FILLER.system, "ECG-FILLER"),  # the order has none: the ECG's
        ACCESSION,
    )
    assert order_identifiers(None, Study(accession_number=" ACC-9 "), **SYSTEMS) == (ACCESSION,)
    assert order_identifiers(None, Study(sop_instance_uid=UID), **SYSTEMS) == ()  # no order: no search, no basedOn


def test_one_search_finds_the_order_by_any_of_its_identifiers_escaped() -> None:
    odd = OrderIdentifier("placer", "urn:oid:1.2.3.4.5", "P,1|x")
    query = dict(parse_qsl(order_search_query([odd, FILLER])))
    # a comma between values is FHIR's OR; inside a value it is escaped, as | and \ are
    assert query == {"identifier": "urn:oid:1.2.3.4.5|P\\,1\\|x,urn:oid:1.2.3.4.6|F-77"}
    with pytest.raises(ValueError):
        order_search_query([])


# ----------------------------------------------------------------------- basedOn


def test_a_found_service_request_is_a_literal_reference_that_keeps_the_order_identifier() -> None:
    plain = build()
    link = link_order([PLACER, FILLER], [{"resourceType": "ServiceRequest", "id": "sr1", "status": "active"}])
    bundle = build(link)
    report = bundle.report.resource
    assert report["basedOn"] == [
        {
            "reference": "ServiceRequest/sr1",
            "type": "ServiceRequest",
            "identifier": {
                "type": {"coding": [{"system": V2_0203, "code": "PLAC", "display": "Placer Identifier"}]},
                "system": PLACER.system,
                "value": "ORD-1001",
            },
        }
    ]
    assert list(report)[:4] == ["resourceType", "meta", "identifier", "basedOn"]  # FHIR's element order
    DiagnosticReport.model_validate(report)
    # the order changes nothing of the report's identity: the same conditional create, the same identifier
    assert bundle.report.if_none_exist == plain.report.if_none_exist
    assert report["identifier"] == plain.report.resource["identifier"]
    assert "basedOn" not in plain.report.resource


@pytest.mark.parametrize(
    ("identifiers", "code"),
    [([PLACER, FILLER, ACCESSION], "PLAC"), ([FILLER, ACCESSION], "FILL"), ([ACCESSION], "ACSN")],
)
def test_without_a_service_request_the_order_is_named_by_identifier(
    identifiers: list[OrderIdentifier], code: str
) -> None:
    for matches in (None, []):  # the EHR could not be searched / has no such ServiceRequest
        report = build(link_order(identifiers, matches)).report.resource
        (ref,) = report["basedOn"]
        assert "reference" not in ref and ref["type"] == "ServiceRequest"
        assert ref["identifier"]["type"]["coding"][0]["code"] == code
        assert ref["identifier"]["value"] == identifiers[0].value
        assert "order_" not in report["conclusion"]  # not finding the order is no fault: no flag
        DiagnosticReport.model_validate(report)


def test_only_one_live_service_request_of_the_same_patient_is_linked() -> None:
    def sr(rid: str, **kw: Any) -> dict[str, Any]:
        return {"resourceType": "ServiceRequest", "id": rid, "status": "active", **kw}

    ids = [PLACER]
    # a ServiceRequest entered in error is not the order
    assert link_order(ids, [sr("a", status="entered-in-error"), sr("b")]).reference == "ServiceRequest/b"
    assert link_order(ids, [sr("a", status="entered-in-error")]) == OrderLink((PLACER,))
    # two orders carry the numbers (or more pages of them): which one is a person's call
    assert link_order(ids, [sr("a"), sr("b")]) == OrderLink((PLACER,), flag="order_ambiguous")
    assert link_order(ids, [sr("a")], complete=False).flag == "order_ambiguous"
    # the order is another patient's: never linked, flagged
    other = sr("a", subject={"reference": "Patient/p2"})
    assert link_order(ids, [other], patient_reference="Patient/p1") == OrderLink(
        (PLACER,), flag="order_patient_differs"
    )
    same = sr("a", subject={"reference": "https://ehr.example/fhir/Patient/p1"})
    assert link_order(ids, [same], patient_reference="Patient/p1").reference == "ServiceRequest/a"
    # the flag reaches the reader, the identifier the EHR
    report = build(link_order(ids, [sr("a"), sr("b")])).report.resource
    assert "order_ambiguous" in report["conclusion"]
    assert report["basedOn"][0]["identifier"]["value"] == "ORD-1001" and "reference" not in report["basedOn"][0]


# ----------------------------------------------------------------------- coded risk tiers


def test_a_findings_risk_tier_is_coded_beside_its_note() -> None:
    bundle = build(MI="high", NORM="low")
    mi = observation(bundle, "MI")
    tier = {"system": RISK_TIER_SYSTEM, "code": "high", "display": "High risk tier"}
    assert mi["interpretation"][0]["coding"][0]["code"] == "POS"  # the decision stays first
    assert mi["interpretation"][1] == {"coding": [tier], "text": "Myocardial infarction: high risk tier"}
    assert mi["component"] == [
        {
            "code": {
                "coding": [
                    {
                        "system": "urn:ecgbridge:model:ptbxl-superclass",
                        "code": "MI-tier",  # the code of HL7's tier OBX-3
                        "display": "Myocardial infarction risk tier",
                    }
                ],
                "text": "Myocardial infarction risk tier",
            },
            "valueCodeableConcept": {"coding": [tier], "text": "High risk tier"},
        }
    ]
    assert "tier high" in mi["note"][0]["text"]  # the text stays
    norm = observation(bundle, "NORM")
    assert norm["component"][0]["valueCodeableConcept"]["coding"][0]["code"] == "low"
    sttc = observation(bundle, "STTC")  # no tier: nothing invented
    assert "component" not in sttc and len(sttc["interpretation"]) == 1
    for obs in (mi, norm, sttc):
        assert json.loads(Observation.model_validate(obs).model_dump_json()) == obs


def test_a_model_tier_outside_the_table_is_sent_as_the_model_names_it() -> None:
    obs = observation(build(MI="very_high"), "MI")
    coding = obs["component"][0]["valueCodeableConcept"]["coding"][0]
    assert coding == {"system": RISK_TIER_SYSTEM, "code": "very_high", "display": "very high"}
    Observation.model_validate(obs)


def test_a_revision_keeps_the_order_link_and_the_coded_tiers() -> None:
    link = link_order([PLACER], [{"resourceType": "ServiceRequest", "id": "sr1", "status": "active"}])
    first, revised = build(link, MI="high"), build(link, version=2, MI="high")
    assert revised.report.resource["status"] == "amended"
    assert revised.report.resource["basedOn"] == first.report.resource["basedOn"]
    assert revised.report.if_none_exist == first.report.if_none_exist
    mi = observation(revised, "MI")
    assert mi["status"] == "amended"
    assert mi["component"] == observation(first, "MI")["component"]
    assert mi["interpretation"] == observation(first, "MI")["interpretation"]


# ----------------------------------------------------------------------- configuration


def test_a_destination_names_its_order_identifier_systems() -> None:
    default = FhirDestination(name="ehr", base_url="https://ehr.example/fhir").order_identifier_systems
    assert (default.placer, default.filler, default.accession) == (
        "urn:ecgbridge:placer-order",
        "urn:ecgbridge:filler-order",
        "urn:ecgbridge:accession",
    )
    dest = FhirDestination(
        name="ehr",
        base_url="https://ehr.example/fhir",
        order_identifier_systems={"placer": "urn:oid:1.2.3.4.5"},
    )
    assert dest.order_identifier_systems.placer == "urn:oid:1.2.3.4.5"
    assert dest.order_identifier_systems.filler == "urn:ecgbridge:filler-order"
    with pytest.raises(ValidationError):
        FhirDestination(name="ehr", base_url="https://ehr.example/fhir", order_identifier_systems={"placr": "x"})
