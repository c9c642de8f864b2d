"""FhirClient status classification and idempotent delivery, faked only at the transport."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from ecgbridge.errors import PermanentDeliveryError, TransientDeliveryError
from ecgbridge.mapping.codes import SUPERCLASS_DISPLAY, SUPERCLASS_SNOMED
from ecgbridge.mapping.ecg import AnalysisResult, Finding, ModelOutput, Patient, Study
from ecgbridge.mapping.fhir_report import build_report
from ecgbridge.outbound.fhir_client import BearerAuth, FhirClient
from ecgbridge.outbound.fhir_sender import deliver_report

BASE = "https://ehr.example/fhir/R4"
OBS = {"resourceType": "Observation", "status": "preliminary", "code": {"text": "x"}}


def client(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> FhirClient:
    return FhirClient(BASE, transport=httpx.MockTransport(handler), **kw)


def oo(diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "diagnostics": diagnostics}],
    }


def test_201_with_location_and_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(201, headers={"Location": f"{BASE}/Observation/abc/_history/1"})

    ref, created = client(handler, auth=BearerAuth("s3cret")).conditional_create(OBS, "identifier=a%7Cb")
    assert (ref, created) == ("Observation/abc", True)
    req = seen[0]
    assert req.method == "POST" and str(req.url) == f"{BASE}/Observation"
    assert req.headers["Authorization"] == "Bearer s3cret"
    assert req.headers["Accept"] == "application/fhir+json"
    assert req.headers["Content-Type"] == "application/fhir+json"
    assert req.headers["If-None-Exist"] == "identifier=a%7Cb"
    assert json.loads(req.content) == OBS
    assert "s3cret" not in repr(BearerAuth("s3cret"))


def test_201_id_from_body() -> None:
    ref, created = client(lambda r: httpx.Response(201, json={**OBS, "id": "7"})).conditional_create(OBS, None)
    assert (ref, created) == ("Observation/7", True)


def test_200_means_exists() -> None:
    ref, created = client(lambda r: httpx.Response(200, json={**OBS, "id": "old"})).conditional_create(
        OBS, "identifier=a%7Cb"
    )
    assert (ref, created) == ("Observation/old", False)


def test_200_without_id_falls_back_to_search() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            return httpx.Response(200)
        assert dict(parse_qsl(req.url.query.decode())) == {"identifier": "a|b"}
        return httpx.Response(
            200, json={"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {**OBS, "id": "found"}}]}
        )

    assert client(handler).conditional_create(OBS, "identifier=a%7Cb") == ("Observation/found", False)


def test_412_multiple_matches_is_permanent() -> None:
    with pytest.raises(PermanentDeliveryError) as info:
        client(lambda r: httpx.Response(412, json=oo("Multiple resources found"))).conditional_create(
            OBS, "identifier=a%7Cb"
        )
    assert info.value.status == 412  # type: ignore[attr-defined]
    assert not info.value.retry


def test_400_carries_operation_outcome() -> None:
    with pytest.raises(PermanentDeliveryError) as info:
        client(lambda r: httpx.Response(400, json=oo("Observation.status: missing"))).conditional_create(OBS, None)
    assert "Observation.status: missing" in str(info.value)
    assert "400" in str(info.value)


def test_503_is_transient() -> None:
    with pytest.raises(TransientDeliveryError) as info:
        client(lambda r: httpx.Response(503, text="busy")).search("Observation", {"code": "x"})
    assert info.value.retry
    assert info.value.retry_after_s is None  # type: ignore[attr-defined]


def test_429_honours_retry_after() -> None:
    with pytest.raises(TransientDeliveryError) as info:
        client(lambda r: httpx.Response(429, headers={"Retry-After": "12"})).read("Patient", "1")
    assert info.value.retry_after_s == 12.0  # type: ignore[attr-defined]


def test_retry_after_http_date() -> None:
    when = "Wed, 21 Oct 2099 07:28:00 GMT"
    with pytest.raises(TransientDeliveryError) as info:
        client(lambda r: httpx.Response(503, headers={"Retry-After": when})).read("Patient", "1")
    assert info.value.retry_after_s > 1000  # type: ignore[attr-defined]


def test_connection_error_and_timeout_are_transient() -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    def slow(req: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=req)

    for handler in (refuse, slow):
        with pytest.raises(TransientDeliveryError):
            client(handler).conditional_create(OBS, None)


def test_real_closed_port_is_transient() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransientDeliveryError):
        FhirClient(f"http://127.0.0.1:{port}/fhir", timeout_s=2).read("Patient", "1")


def test_find_one() -> None:
    def bundle(*ids: str) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": {**OBS, "id": i}, "search": {"mode": "match"}} for i in ids]
            + [{"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}}],
        }

    answers = iter([bundle(), bundle("1"), bundle("1", "2")])
    c = client(lambda r: httpx.Response(200, json=next(answers)))
    assert c.find_one("Observation", {"identifier": "a|b"}) is None
    assert c.find_one("Observation", {"identifier": "a|b"})["id"] == "1"  # type: ignore[index]
    with pytest.raises(PermanentDeliveryError):
        c.find_one("Observation", {"identifier": "a|b"})


def test_update_and_read() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "PUT":
            assert req.url.path.endswith("/Observation/5")
            return httpx.Response(200, json={**json.loads(req.content), "meta": {"versionId": "2"}})
        if req.url.path.endswith("/Observation/404"):
            return httpx.Response(404, json=oo("not found"))
        return httpx.Response(200, json={**OBS, "id": "5"})

    c = client(handler)
    assert c.update({**OBS, "id": "5"})["meta"]["versionId"] == "2"
    assert c.read("Observation", "5")["id"] == "5"
    with pytest.raises(PermanentDeliveryError) as info:
        c.read("Observation", "404")
    assert info.value.status == 404  # type: ignore[attr-defined]


def test_logs_no_bodies_or_queries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="ecgbridge.fhir")
    c = client(lambda r: httpx.Response(400, json=oo("MRN-0042 bad")))
    with pytest.raises(PermanentDeliveryError):
        c.search("Patient", {"identifier": "urn:x|MRN-0042"})
    assert "GET Patient -> 400" in caplog.text
    assert "MRN-0042" not in caplog.text


class FakeServer:
    """Just enough FHIR to prove deliver_report is idempotent (the real one is in integration)."""

    def __init__(self) -> None:
        self.store: dict[str, dict[str, Any]] = {}
        self.ids = itertools.count(1)

    def _matches(self, rtype: str, query: list[tuple[str, str]]) -> list[dict[str, Any]]:
        out = []
        for r in self.store.values():
            if r["resourceType"] != rtype:
                continue
            ok = True
            for key, value in query:
                if key == "identifier":
                    ok &= any(f"{i['system']}|{i['value']}" == value for i in r.get("identifier", []))
                elif key == "target":
                    ok &= any(t.get("reference") == value for t in r.get("target", []))
            if ok:
                out.append(r)
        return out

    def __call__(self, req: httpx.Request) -> httpx.Response:
        rtype = req.url.path.rsplit("/", 1)[-1]
        if req.method == "GET":
            found = self._matches(rtype, parse_qsl(req.url.query.decode()))
            return httpx.Response(
                200, json={"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in found]}
            )
        body = json.loads(req.content)
        cond = req.headers.get("If-None-Exist")
        if cond:
            found = self._matches(rtype, parse_qsl(cond))
            if len(found) > 1:
                return httpx.Response(412)
            if found:
                return httpx.Response(200, json=found[0])
        body["id"] = str(next(self.ids))
        self.store[f"{rtype}/{body['id']}"] = body
        return httpx.Response(201, json=body)


def make_bundle() -> Any:
    findings = tuple(
        Finding(c, SUPERCLASS_DISPLAY[c], p, 0.5, p >= 0.5, snomed=SUPERCLASS_SNOMED[c][0])
        for c, p in zip(("NORM", "MI", "STTC", "CD", "HYP"), (0.1, 0.9, 0.6, 0.2, 0.05))
    )
    result = AnalysisResult("m-1", (ModelOutput("net", "1.0", "diagnosis", findings),))
    return build_report(
        result,
        patient=Patient(id="P1"),
        study=Study(sop_instance_uid="1.2.3"),
        message_id="m-1",
        issued=datetime(2024, 1, 1, tzinfo=UTC),
    )


def test_deliver_report_is_idempotent() -> None:
    server = FakeServer()
    c = client(server)
    bundle = make_bundle()
    ref = deliver_report(c, bundle)
    assert ref.startswith("DiagnosticReport/")
    count = len(server.store)
    assert count == 1 + 5 + 1 + 1  # device, observations, report, provenance
    assert deliver_report(c, bundle) == ref
    assert len(server.store) == count
    report = server.store[ref]
    obs_refs = [r["reference"] for r in report["result"]]
    assert all(r.startswith("Observation/") and r in server.store for r in obs_refs)
    device_ref = next(k for k in server.store if k.startswith("Device/"))
    assert all(server.store[r]["device"]["reference"] == device_ref for r in obs_refs)
    prov = next(v for k, v in server.store.items() if k.startswith("Provenance/"))
    assert prov["target"][0] == {"reference": ref}
    assert prov["agent"][0]["who"]["reference"] == device_ref
    assert "urn:uuid:" not in json.dumps(server.store)


# ----- paging search and SMART Backend Services (transport faked only) -------------


def _page(ids: list[str], next_url: str | None) -> dict[str, Any]:
    links = [{"relation": "self", "url": f"{BASE}/Observation"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 5,
        "link": links,
        "entry": [{"resource": {**OBS, "id": i}, "search": {"mode": "match"}} for i in ids]
        + [{"resource": {"resourceType": "OperationOutcome"}, "search": {"mode": "outcome"}}],
    }


def _pager(pages: dict[str, dict[str, Any]], seen: list[str]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url))
        offset = dict(parse_qsl(req.url.query.decode())).get("_offset", "0")
        return httpx.Response(200, json=pages[offset])

    return handler


PAGES = {
    "0": _page(["1", "2"], f"{BASE}/Observation?_count=2&_offset=2"),
    "2": _page(["3", "4"], f"{BASE}/Observation?_count=2&_offset=4"),
    "4": _page(["5"], None),
}


def test_search_all_follows_next_links() -> None:
    seen: list[str] = []
    results = client(_pager(PAGES, seen)).search_all("Observation", [("code", "a"), ("code", "b")], max_pages=10)
    assert [r["id"] for r in results] == ["1", "2", "3", "4", "5"]
    assert (results.pages, results.total, results.truncated) == (3, 5, False)
    assert seen[0] == f"{BASE}/Observation?code=a&code=b"  # repeated parameters kept
    assert seen[1] == f"{BASE}/Observation?_count=2&_offset=2"


def test_search_all_stops_at_the_page_cap_and_says_so() -> None:
    results = client(_pager(PAGES, [])).search_all("Observation", None, max_pages=2)
    assert [r["id"] for r in results] == ["1", "2", "3", "4"]
    assert results.truncated and "2 page(s)" in (results.why or "")


def test_search_all_refuses_a_next_link_to_another_server() -> None:
    pages = {"0": _page(["1"], "https://elsewhere.example/fhir/R4/Observation?_offset=1")}
    seen: list[str] = []
    results = client(_pager(pages, seen), auth=BearerAuth("s3cret")).search_all("Observation", None)
    assert [r["id"] for r in results] == ["1"] and len(seen) == 1
    assert results.truncated and "outside" in (results.why or "")


def test_search_page_retries_transient_errors_within_the_deadline() -> None:
    import time

    answers = iter(
        [
            httpx.Response(503),
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.Response(200, json=_page(["1"], None)),
        ]
    )
    c = client(lambda r: next(answers))
    assert c.search_page("Observation", retries=2)["entry"][0]["resource"]["id"] == "1"
    with pytest.raises(TransientDeliveryError):
        client(lambda r: httpx.Response(503)).search_page("Observation", retries=1)
    with pytest.raises(TransientDeliveryError) as info:
        c.search_page("Observation", deadline=time.monotonic() - 1)
    assert "time limit" in str(info.value)


def _rsa_pem() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def test_smart_backend_auth_assertion_cache_and_401_refresh() -> None:
    import jwt

    from ecgbridge.outbound.fhir_auth import SmartBackendAuth

    private, public = _rsa_pem()
    token_url = "https://auth.example/token"
    issued: list[dict[str, Any]] = []
    fhir_calls: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if str(req.url) == token_url:
            form = dict(parse_qsl(req.content.decode()))
            assert form["grant_type"] == "client_credentials" and form["scope"] == "system/Patient.rs"
            assert jwt.get_unverified_header(form["client_assertion"])["kid"] == "k1"
            claims = jwt.decode(form["client_assertion"], public, algorithms=["RS384"], audience=token_url)
            issued.append(claims)
            return httpx.Response(200, json={"access_token": f"t{len(issued)}", "expires_in": 600})
        fhir_calls.append(req.headers["Authorization"])
        if req.headers["Authorization"] == "Bearer t1" and len(fhir_calls) > 2:
            return httpx.Response(401)  # t1 revoked after two calls
        return httpx.Response(200, json=_page([], None))

    transport = httpx.MockTransport(handler)
    auth = SmartBackendAuth(
        client_id="c",
        private_key_pem=private,
        key_id="k1",
        scope="system/Patient.rs",
        token_url=token_url,
        transport=transport,
    )
    c = FhirClient(BASE, auth=auth, transport=transport)
    for _ in range(3):
        c.search("Patient")
    assert fhir_calls == ["Bearer t1", "Bearer t1", "Bearer t1", "Bearer t2"]
    assert len(issued) == 2 and issued[0]["jti"] != issued[1]["jti"]
    assert issued[0]["iss"] == issued[0]["sub"] == "c" and 0 < issued[0]["exp"] - issued[0]["iat"] <= 300
    assert auth.algorithm == "RS384" and "t1" not in repr(auth) and "t2" not in repr(auth)


def test_smart_backend_auth_token_errors_and_key_types() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ecgbridge.outbound.fhir_auth import SmartBackendAuth

    private, _ = _rsa_pem()
    refuse = httpx.MockTransport(
        lambda r: httpx.Response(400, json={"error": "invalid_scope", "error_description": "no such scope"})
    )
    auth = SmartBackendAuth(
        client_id="c", private_key_pem=private, key_id="k", scope="s", token_url="https://a/token", transport=refuse
    )
    with pytest.raises(PermanentDeliveryError) as info:
        FhirClient(BASE, auth=auth, transport=refuse).search("Patient")
    assert str(info.value) == "SMART token endpoint -> 400: invalid_scope: no such scope"
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="P-384"):
        SmartBackendAuth(client_id="c", private_key_pem=p256, key_id="k", scope="s", token_url="https://a/t")


def test_transaction_answers_that_do_not_match_the_request_are_permanent_errors() -> None:
    """A server that drops entries or answers a batch-response must not leave a half-known report."""
    planned = len(make_bundle().all_planned())
    sent: list[dict[str, Any]] = []

    def short(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        entries = [
            {"response": {"status": "201 Created", "location": f"{e['request']['url']}/1/_history/1"}}
            for e in body["entry"]
        ][:-1]
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": entries})

    with pytest.raises(PermanentDeliveryError, match=f"transaction-response with {planned} entries"):
        deliver_report(client(short), make_bundle(), mode="transaction")
    (body,) = sent
    assert body["type"] == "transaction" and len(body["entry"]) == planned
    assert all(e["fullUrl"].startswith("urn:uuid:") and e["request"]["method"] == "POST" for e in body["entry"])
    assert all("ifNoneExist" in e["request"] for e in body["entry"])

    def refused(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json=oo("Transaction requires strict isolation but has too many entries"))

    with pytest.raises(PermanentDeliveryError, match="too many entries"):
        deliver_report(client(refused), make_bundle(), mode="transaction")
