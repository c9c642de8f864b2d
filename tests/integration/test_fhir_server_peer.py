"""The test FHIR R4 peer (Medplum fhir-router, in memory) behaves as the suite relies on.

These tests pin down the peer itself, not ecgbridge: conditional create is idempotent,
identifier/reference search works, bearer auth is enforced, transactions are atomic and
a stopped server comes back on the same port.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

try:
    from tests.support.fhir_server import FhirServer, FhirServerError, node_available
    from tests.support.peers import needs
except ImportError:  # plain `pytest` without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.support.fhir_server import FhirServer, FhirServerError, node_available
    from tests.support.peers import needs

pytestmark = needs(node_available())

FHIR_JSON = "application/fhir+json"
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.999.1"
ECG_SYSTEM = "urn:ecgbridge:test:ecg-result"


def _patient(mrn: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
        "name": [{"family": "Test", "given": ["Peer"]}],
    }


def _observation(result_id: str, patient_ref: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "identifier": [{"system": ECG_SYSTEM, "value": result_id}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": "2024-05-01T10:00:00Z",
        "valueQuantity": {"value": 72, "unit": "/min"},
    }


@pytest.fixture(scope="module")
def server() -> Iterator[FhirServer]:
    with FhirServer() as srv:
        yield srv


@pytest.fixture()
def client(server: FhirServer) -> Iterator[httpx.Client]:
    with server.client(headers={"Content-Type": FHIR_JSON}) as c:
        yield c


def _create_if_none_exist(client: httpx.Client, resource: dict[str, Any], condition: str) -> httpx.Response:
    return client.post(resource["resourceType"], json=resource, headers={"If-None-Exist": condition})


def test_metadata_is_a_capability_statement(server: FhirServer) -> None:
    resp = server.request("GET", "metadata")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith(FHIR_JSON)
    body = resp.json()
    assert body["resourceType"] == "CapabilityStatement"
    assert body["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in body["rest"][0]["resource"]}
    assert {"Patient", "Observation", "DiagnosticReport", "DocumentReference"} <= types


def test_conditional_create_twice_gives_one_resource(server: FhirServer, client: httpx.Client) -> None:
    condition = f"identifier={MRN_SYSTEM}|MRN-COND-1"

    first = _create_if_none_exist(client, _patient("MRN-COND-1"), condition)
    assert first.status_code == 201, first.text
    created = first.json()
    location = first.headers["Location"]
    assert location.startswith(f"{server.base_url}/Patient/{created['id']}/_history/")
    assert first.headers["ETag"] == f'W/"{created["meta"]["versionId"]}"'

    second = _create_if_none_exist(client, _patient("MRN-COND-1"), condition)
    assert second.status_code == 200, second.text
    assert second.json()["id"] == created["id"]
    assert "Location" not in second.headers

    bundle = server.search("Patient", identifier=f"{MRN_SYSTEM}|MRN-COND-1")
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    assert bundle["total"] == 1
    assert len(bundle["entry"]) == 1
    assert bundle["entry"][0]["resource"]["id"] == created["id"]
    assert bundle["entry"][0]["fullUrl"] == f"{server.base_url}/Patient/{created['id']}"


def test_conditional_create_is_safe_under_concurrency(server: FhirServer) -> None:
    condition = f"identifier={MRN_SYSTEM}|MRN-RACE"

    def post(_: int) -> int:
        with server.client(headers={"Content-Type": FHIR_JSON}) as c:
            return _create_if_none_exist(c, _patient("MRN-RACE"), condition).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(post, range(16)))
    assert statuses == [200] * 15 + [201]
    assert server.search("Patient", identifier=f"{MRN_SYSTEM}|MRN-RACE")["total"] == 1


def test_conditional_create_with_several_matches_is_412(client: httpx.Client) -> None:
    for _ in range(2):
        assert client.post("Patient", json=_patient("MRN-DUP")).status_code == 201
    resp = _create_if_none_exist(client, _patient("MRN-DUP"), f"identifier={MRN_SYSTEM}|MRN-DUP")
    assert resp.status_code == 412
    assert resp.json()["resourceType"] == "OperationOutcome"


def test_search_by_identifier_and_subject(server: FhirServer, client: httpx.Client) -> None:
    patient = client.post("Patient", json=_patient("MRN-SEARCH")).json()
    ref = f"Patient/{patient['id']}"
    for i in range(3):
        assert client.post("Observation", json=_observation(f"ecg-{i}", ref)).status_code == 201

    by_id = server.search("Observation", identifier=f"{ECG_SYSTEM}|ecg-1")
    assert by_id["total"] == 1
    assert by_id["entry"][0]["resource"]["identifier"][0]["value"] == "ecg-1"

    assert server.search("Observation", identifier=f"{ECG_SYSTEM}|no-such")["total"] == 0
    assert server.search("Observation", identifier="urn:other|ecg-1")["total"] == 0

    by_subject = server.search("Observation", subject=ref, _count=2)
    assert by_subject["total"] == 3
    assert len(by_subject["entry"]) == 2
    assert any(link["relation"] == "next" for link in by_subject["link"])

    assert server.search("Observation", patient=ref, code="http://loinc.org|8867-4")["total"] == 3
    assert server.search("Observation", params={"date": "ge2024-01-01"}, subject=ref)["total"] == 3
    assert server.search("Observation", subject=ref, _summary="count")["total"] == 3

    read_back = server.read(ref)
    assert read_back["id"] == patient["id"]


def test_request_log_line_is_written_before_the_response(server: FhirServer, client: httpx.Client) -> None:
    # Tests count requests in server.logs(); the line must be there once the answer is.
    for i in range(5):
        assert client.get(f"Patient/log-probe-{i}").status_code == 404
        last = server.logs().splitlines()[-1]
        assert f" GET /fhir/R4/Patient/log-probe-{i} 404 " in last, last


def test_unknown_search_parameter_is_rejected_not_silently_empty(server: FhirServer) -> None:
    resp = server.request("GET", "Observation", params={"no-such-param": "x"})
    assert resp.status_code == 400
    assert resp.json()["resourceType"] == "OperationOutcome"
    with pytest.raises(FhirServerError):
        server.search("Observation", params={"value-quantity": "72"})


def test_read_update_delete(server: FhirServer, client: httpx.Client) -> None:
    created = client.post("Patient", json=_patient("MRN-RUD")).json()
    path = f"Patient/{created['id']}"

    updated = client.put(path, json={**created, "active": True})
    assert updated.status_code == 200
    assert updated.json()["meta"]["versionId"] != created["meta"]["versionId"]
    assert server.read(path)["active"] is True

    put_create = client.put("Patient/client-assigned-1", json={"resourceType": "Patient", "id": "client-assigned-1"})
    assert put_create.status_code == 201
    assert put_create.headers["Location"].startswith(f"{server.base_url}/Patient/client-assigned-1/_history/")

    assert client.delete(path).status_code == 200
    gone = client.get(path)
    assert gone.status_code == 410
    assert gone.json()["resourceType"] == "OperationOutcome"

    missing = client.get("Patient/does-not-exist")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith(FHIR_JSON)
    assert missing.json()["resourceType"] == "OperationOutcome"


def test_transaction_bundle_is_atomic_and_resolves_references(server: FhirServer, client: httpx.Client) -> None:
    patient_urn = "urn:uuid:6f1c3f0e-2a4b-4c8d-9e0f-1a2b3c4d5e6f"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_urn,
                "resource": _patient("MRN-TX"),
                "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={MRN_SYSTEM}|MRN-TX"},
            },
            {
                "resource": _observation("ecg-tx", patient_urn),
                "request": {"method": "PUT", "url": f"Observation?identifier={ECG_SYSTEM}|ecg-tx"},
            },
        ],
    }
    first = client.post("", json=bundle)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == ["201", "201"]
    patient_id = body["entry"][0]["resource"]["id"]
    assert body["entry"][0]["response"]["location"] == f"Patient/{patient_id}"
    assert body["entry"][1]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"

    again = client.post("", json=bundle).json()
    assert [e["response"]["status"] for e in again["entry"]] == ["200", "200"]
    assert server.search("Patient", identifier=f"{MRN_SYSTEM}|MRN-TX")["total"] == 1
    assert server.search("Observation", identifier=f"{ECG_SYSTEM}|ecg-tx")["total"] == 1

    failing = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": _patient("MRN-TX-ROLLBACK"), "request": {"method": "POST", "url": "Patient"}},
            {
                # id in the URL does not match the body: the whole transaction must fail
                "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
                "request": {"method": "PUT", "url": "Observation/mismatch"},
            },
        ],
    }
    resp = client.post("", json=failing)
    assert resp.status_code == 400
    assert resp.json()["resourceType"] == "OperationOutcome"
    assert server.search("Patient", identifier=f"{MRN_SYSTEM}|MRN-TX-ROLLBACK")["total"] == 0


def test_errors_are_operation_outcomes(client: httpx.Client) -> None:
    bad_json = client.post("Patient", content=b"{not json")
    assert bad_json.status_code == 400
    assert bad_json.json()["resourceType"] == "OperationOutcome"

    wrong_type = client.post("Patient", json={"resourceType": "Observation"})
    assert wrong_type.status_code == 400

    unknown_type = client.get("NoSuchType")
    assert unknown_type.status_code == 404
    assert unknown_type.json()["resourceType"] == "OperationOutcome"


def test_bearer_required() -> None:
    with FhirServer(bearer="peer-test-token") as srv:
        # readiness probe: /metadata stays public, like a SMART-on-FHIR server
        assert httpx.get(f"{srv.base_url}/metadata").status_code == 200

        missing = httpx.get(f"{srv.base_url}/Patient")
        assert missing.status_code == 401
        assert missing.json()["resourceType"] == "OperationOutcome"
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")

        wrong = httpx.get(f"{srv.base_url}/Patient", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401

        post = httpx.post(f"{srv.base_url}/Patient", json=_patient("MRN-AUTH"))
        assert post.status_code == 401

        assert srv.search("Patient")["total"] == 0  # helper sends the token
        assert srv.request("POST", "Patient", json=_patient("MRN-AUTH")).status_code == 201


def test_stop_then_start_on_same_port() -> None:
    srv = FhirServer()
    try:
        srv.start()
        port, base = srv.port, srv.base_url
        srv.request("POST", "Patient", json=_patient("MRN-RESTART"))
        assert srv.search("Patient", identifier=f"{MRN_SYSTEM}|MRN-RESTART")["total"] == 1

        srv.stop()
        assert not srv.running
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/metadata", timeout=2.0)

        srv.start()
        assert srv.port == port and srv.base_url == base
        assert srv.search("Patient", identifier=f"{MRN_SYSTEM}|MRN-RESTART")["total"] == 0  # in memory only
        assert "GET /fhir/R4/Patient 200" in srv.logs()
    finally:
        srv.stop()


def test_start_failure_reports_server_stderr() -> None:
    broken = FhirServer(env={"FHIR_SEARCH_HANDLING": "bogus"}, startup_timeout=15)
    with pytest.raises(FhirServerError) as info:
        broken.start()
    message = str(info.value)
    assert "exited with status 2" in message
    assert "FHIR_SEARCH_HANDLING must be strict or lenient" in message  # the server's stderr
    assert not broken.running


def test_port_in_use_is_a_clear_error(server: FhirServer) -> None:
    clash = FhirServer(port=server.port)
    with pytest.raises(FhirServerError, match="already in use"):
        clash.start()


LOINC = "http://loinc.org"


def _coded(patient_ref: str, code: str, when: str, system: str | None = LOINC, tag: str = "") -> dict[str, Any]:
    coding = {"code": code, **({"system": system} if system else {})}
    return {
        "resourceType": "Observation",
        "status": "final",
        "identifier": [{"system": "urn:test:obs", "value": f"{code}-{when}{tag}"}],
        "code": {"coding": [coding]},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": when,
    }


def test_search_indexes_answer_exactly_as_the_scan_does() -> None:
    """The peer's search indexes (server.mjs ``search``) change speed, never answers.

    The same writes go to a server with the indexes and one without (``FHIR_SEARCH_INDEX=0``,
    Medplum's own scan): patients and observations, an update that changes an identifier, a
    delete, and a transaction that fails and must leave nothing behind. Every search shape then
    gets the same ids in the same order from both: identifier, code and reference parameters in
    each token form, comma lists, negation, dates, sorts, paging and totals.
    """
    patient_searches = [
        {"identifier": f"{MRN_SYSTEM}|A1"},
        {"identifier": f"{MRN_SYSTEM}|a1"},  # Medplum matches tokens case-insensitively; so must the index
        {"identifier": "A1"},
        {"identifier": f"{MRN_SYSTEM}|B2"},
        {"identifier": f"{MRN_SYSTEM}|C3"},
        {"identifier": "urn:other|A1"},
        {"identifier": f"{MRN_SYSTEM}|"},
        {"identifier": "|A1"},
        {"identifier": "|"},
        {"identifier": "A1,D4,B2-moved"},
        {"identifier:not": f"{MRN_SYSTEM}|A1"},
        {"identifier": "nothing-like-it"},
        {"identifier": "T1"},  # written by the failed transaction: must not be there
    ]
    observation_searches = [
        {"code": f"{LOINC}|8867-4"},
        {"code": "8867-4"},
        {"code": "|8867-4"},  # only the one without a system
        {"code": f"{LOINC}|"},
        {"code": f"{LOINC}|8867-4,{LOINC}|10230-1", "_sort": "-date"},
        {"code": f"{LOINC}|8867-4", "_sort": "date", "_count": "2", "_offset": "1"},
        {"patient": "PATIENT_A1"},
        {"subject": "PATIENT_A1", "code": f"{LOINC}|10230-1"},
        {"patient": "PATIENT_A1", "code": f"{LOINC}|8867-4", "date": "ge2026-03-01", "_sort": "-date"},
        {"patient": "PATIENT_D4,PATIENT_A1", "_sort": "date"},
        {"patient": "Patient/unknown"},
        {"identifier": "urn:test:obs|8867-4-2026-02-01"},
        {"_sort": "-date"},
    ]

    def run(index: str) -> list[list[str]]:
        with FhirServer(env={"FHIR_SEARCH_INDEX": index}) as srv, srv.client() as client:
            ids = {}
            for mrn in ("A1", "B2", "C3", "D4"):
                resp = client.post("/Patient", json=_patient(mrn), headers={"Content-Type": FHIR_JSON})
                ids[mrn] = resp.json()["id"]
            refs = {f"PATIENT_{mrn}": f"Patient/{pid}" for mrn, pid in ids.items()}
            client.get("/Patient", params={"identifier": f"{MRN_SYSTEM}|B2"})  # index built before the changes
            client.get("/Observation", params={"code": "8867-4", "patient": refs["PATIENT_A1"]})
            observations = [
                _coded(refs["PATIENT_A1"], "8867-4", "2026-02-01"),
                _coded(refs["PATIENT_A1"], "8867-4", "2026-04-01"),
                _coded(refs["PATIENT_A1"], "10230-1", "2026-03-15"),
                _coded(refs["PATIENT_D4"], "8867-4", "2026-01-10"),
                _coded(refs["PATIENT_D4"], "8867-4", "2026-05-10", system=None),
                _coded(refs["PATIENT_A1"], "8867-4", "2026-03-01", tag="-x"),
            ]
            for obs in observations:
                assert client.post("/Observation", json=obs, headers={"Content-Type": FHIR_JSON}).status_code == 201
            moved = {**_patient("B2-moved"), "id": ids["B2"]}
            assert client.put(f"/Patient/{ids['B2']}", json=moved, headers={"Content-Type": FHIR_JSON}).is_success
            assert client.delete(f"/Patient/{ids['C3']}").is_success
            failing = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {"resource": _patient("T1"), "request": {"method": "POST", "url": "Patient"}},
                    {
                        "resource": {**_patient("A1-changed"), "id": ids["A1"]},
                        "request": {"method": "PUT", "url": f"Patient/{ids['A1']}"},
                    },
                    {"request": {"method": "DELETE", "url": f"Patient/{ids['D4']}"}},
                    {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
                ],
            }
            assert client.post("", json=failing, headers={"Content-Type": FHIR_JSON}).status_code == 404
            names = {v: k for k, v in ids.items()}
            answers = []
            for params in patient_searches:
                bundle = client.get("/Patient", params=params).json()
                answers.append([names[e["resource"]["id"]] for e in bundle.get("entry", [])])
            for params in observation_searches:
                concrete = {k: ",".join(refs.get(p, p) for p in v.split(",")) for k, v in params.items()}
                bundle = client.get("/Observation", params=concrete).json()
                answers.append(
                    [e["resource"]["identifier"][0]["value"] for e in bundle.get("entry", [])] + [bundle["total"]]
                )
            return answers

    with_index, scanned = run("1"), run("0")
    assert with_index == scanned
    assert with_index[0] == ["A1"] and with_index[3] == [] and with_index[4] == [] and with_index[12] == []
    assert with_index[len(patient_searches) + 8] == ["8867-4-2026-04-01", "8867-4-2026-03-01-x", 2]
