"""EHR context fetch against real servers: the Medplum FHIR peer, a slow peer, a
fault-injecting proxy and a real SMART token endpoint (no HTTP mocks)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ecgbridge.core.settings import EhrSource
from ecgbridge.mapping.ecg import Patient
from ecgbridge.mapping.ehr_context import EHR_CONDITION_NAMES, EHR_MEDICATION_NAMES, EhrContext
from ecgbridge.outbound.ehr_fetch import EhrFetcher, fetch_context
from ecgbridge.outbound.fhir_client import FhirClient
from tests.support import ehr_bundles as seed
from tests.support.fhir_server import FhirServer, require_node
from tests.support.http_peers import FaultProxy, SlowPeer, SmartTokenEndpoint, closed_port_url

pytestmark = pytest.mark.integration

TOKEN = "static-ehr-token-for-tests"
ECG = seed.ECG_TIME


def source(base_url: str, **kw: object) -> EhrSource:
    return EhrSource.model_validate({"name": "ehr", "base_url": base_url, **kw})


def fetch(src: EhrSource, identifier: str | None) -> EhrContext:
    return fetch_context(src, Patient(id=identifier), ECG)


@pytest.fixture(scope="module")
def secured() -> Iterator[FhirServer]:
    require_node()
    with FhirServer(bearer=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def heart_failure(fhir_server: FhirServer) -> seed.Seeded:
    return seed.seed_heart_failure(fhir_server.base_url)


# ----- seeded patients ------------------------------------------------------------


def test_heart_failure_patient(fhir_server: FhirServer, heart_failure: seed.Seeded) -> None:
    ctx = fetch(source(fhir_server.base_url), heart_failure.identifier)
    assert ctx.status == "complete", ctx.problems
    assert ctx.problems == ()
    assert ctx.patient_reference == f"Patient/{heart_failure.patient_id}" and ctx.source == "ehr"
    assert ctx.sex == "male" and ctx.age_years == pytest.approx(74.73, abs=0.01)
    v = {k: x.value for k, x in ctx.values.items()}
    assert v["nt_probnp"] == 1850  # the newer of two
    assert v["troponin"] == pytest.approx(34.0) and ctx.values["troponin"].source_unit == "ng/mL"
    assert v["creatinine"] == pytest.approx(132.6 / 88.42) and ctx.values["creatinine"].loinc == "14682-9"
    assert v["potassium"] == 4.1  # the entered-in-error 6.9 is ignored
    assert v["sodium"] == 136  # the 128 taken after the ECG is ignored
    assert v["hemoglobin"] == pytest.approx(12.8)
    assert (v["systolic_bp"], v["diastolic_bp"]) == (118, 72)  # panel components
    assert v["heart_rate"] == 88
    assert v["weight"] == pytest.approx(187 * 0.45359237) and ctx.values["weight"].unit == "kg"
    assert v["height"] == 178
    assert set(ctx.values) == {
        "nt_probnp",
        "troponin",
        "creatinine",
        "potassium",
        "sodium",
        "hemoglobin",
        "systolic_bp",
        "diastolic_bp",
        "heart_rate",
        "weight",
        "height",
    }
    assert ctx.conditions == {
        "heart_failure": True,
        "myocardial_infarction": True,
        "atrial_fibrillation": True,
        "hypertension": True,
        "diabetes": False,
        "chronic_kidney_disease": False,
    }
    assert ctx.medications == {
        "loop_diuretic": True,
        "beta_blocker": True,
        "ace_inhibitor_or_arb": False,
        "mineralocorticoid_antagonist": False,
    }
    assert EhrContext.from_dict(ctx.to_dict()) == ctx


def test_patient_with_nothing_but_patient(fhir_server: FhirServer) -> None:
    bare = seed.seed_bare(fhir_server.base_url)
    ctx = fetch(source(fhir_server.base_url), bare.identifier)
    assert ctx.status == "complete" and ctx.values == {}
    assert ctx.sex == "female" and ctx.age_years == pytest.approx(63.69, abs=0.01)  # born "1961": mid-year
    assert ctx.conditions == dict.fromkeys(EHR_CONDITION_NAMES, False)
    assert ctx.medications == dict.fromkeys(EHR_MEDICATION_NAMES, False)


def test_medications_can_be_left_out(fhir_server: FhirServer, heart_failure: seed.Seeded) -> None:
    ctx = fetch(source(fhir_server.base_url, fetch_medications=False), heart_failure.identifier)
    assert ctx.status == "complete" and ctx.medications == {}
    assert "MedicationStatement" not in fhir_server.logs().splitlines()[-1]


def test_unconvertible_unit_is_reported_not_mixed(fhir_server: FhirServer) -> None:
    odd = seed.seed_odd_unit(fhir_server.base_url)
    ctx = fetch(source(fhir_server.base_url), odd.identifier)
    assert ctx.status == "complete"
    assert "hemoglobin" not in ctx.values and ctx.values["sodium"].value == 140
    assert ctx.problems == ("hemoglobin: unit '%' not convertible to g/dL, 1 value ignored",)


@pytest.fixture(scope="module")
def many(fhir_server: FhirServer) -> seed.Seeded:
    seeded = seed.seed_many(fhir_server.base_url)
    assert seeded.seconds < 10, f"seeding 2,000 observations took {seeded.seconds:.1f}s"
    return seeded


def test_two_thousand_observations_are_paged(
    fhir_server: FhirServer, many: seed.Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="ecgbridge.ehr")
    started = time.monotonic()
    # 500 per page: still four pages, at a quarter of the in-memory server's per-page sorting cost
    ctx = fetch(source(fhir_server.base_url, total_timeout_s=300, timeout_s=120, page_size=500), many.identifier)
    elapsed = time.monotonic() - started
    assert ctx.status == "complete", ctx.problems
    assert ctx.values["heart_rate"].value == seed.MANY_LATEST_HEART_RATE
    # the creatinines are the oldest observations: only the last page has them
    assert ctx.values["creatinine"].value == seed.MANY_CREATININE
    assert "EHR Observation search: 2000 resources in 4 page(s)" in caplog.text
    assert many.identifier not in caplog.text and many.patient_id not in caplog.text
    print(f"seeded 2000 observations in {many.seconds:.2f}s; fetched in {elapsed:.1f}s")


def test_page_cap_is_reported(fhir_server: FhirServer, many: seed.Seeded) -> None:
    ctx = fetch(
        source(fhir_server.base_url, max_observation_pages=1, total_timeout_s=120, timeout_s=60, page_size=500),
        many.identifier,
    )
    assert ctx.status == "complete"
    assert ctx.values["heart_rate"].value == seed.MANY_LATEST_HEART_RATE  # newest first: still right
    assert "creatinine" not in ctx.values
    assert "Observation search: stopped after 1 page(s), the configured maximum; older results not read" in ctx.problems


# ----- no patient -----------------------------------------------------------------


def test_unknown_patient_and_missing_identifier(fhir_server: FhirServer) -> None:
    ctx = fetch(source(fhir_server.base_url), "no-such-patient")
    assert ctx.status == "no_patient" and not ctx.has_data
    assert "no-such-patient" not in " ".join(ctx.problems)
    assert fetch(source(fhir_server.base_url), None).status == "no_patient"


def test_two_patients_with_one_identifier_is_ambiguous(fhir_server: FhirServer) -> None:
    dup = seed.seed_duplicate(fhir_server.base_url)
    ctx = fetch(source(fhir_server.base_url), dup.identifier)
    assert ctx.status == "no_patient" and "ambiguous" in ctx.problems[0]


# ----- EHR trouble ----------------------------------------------------------------


def test_unreachable_server_is_unavailable_fast() -> None:
    started = time.monotonic()
    ctx = fetch(source(closed_port_url()), "p1")
    assert time.monotonic() - started < 3
    assert ctx.status == "unavailable" and "connection failed" in ctx.problems[0]


class TimeoutRecorder(httpx.HTTPTransport):
    """A real transport that notes the read timeout each request was sent with."""

    def __init__(self) -> None:
        super().__init__()
        self.read_timeouts: list[float] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.read_timeouts.append(float(request.extensions["timeout"]["read"]))
        return super().handle_request(request)


def test_slow_server_is_unavailable_within_total_timeout() -> None:
    """The deadline, not the retry count, ends the fetch: counted requests and their timeouts, not the clock.

    A 1 s request timeout under a 2 s total: the first try gets 1 s, the retry (after a 0.2 s pause) only
    what is left (at most 0.8 s), and no third try starts although ``retries`` allows five.
    """
    with SlowPeer(delay_s=3) as peer:
        src = source(f"{peer.origin}/fhir/R4", timeout_s=1.0, total_timeout_s=2.0, retries=5)
        recorder = TimeoutRecorder()
        with FhirClient(src.base_url, timeout_s=src.timeout_s, transport=recorder) as client:
            ctx = fetch_context(src, Patient(id="p1"), ECG, client=client)
        requests = list(peer.requests)
    assert ctx.status == "unavailable"
    assert ctx.problems == ("Patient search failed: timed out",), ctx.problems
    assert len(requests) == len(recorder.read_timeouts) == 2, (requests, recorder.read_timeouts)
    first, retry = recorder.read_timeouts
    assert first == src.timeout_s
    assert 0 < retry <= src.total_timeout_s - src.timeout_s - 0.2 + 1e-6, retry  # cut to the time left


def test_401_without_or_with_a_wrong_token(secured: FhirServer, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = fetch(source(secured.base_url), "p1")
    assert ctx.status == "unavailable" and ctx.problems == (
        "Patient search failed: HTTP 401 (credentials refused), OperationOutcome login",
    )
    monkeypatch.setenv("EHR_TOKEN", "wrong")
    ctx = fetch(source(secured.base_url, auth={"type": "bearer", "token_env": "EHR_TOKEN"}), "p1")
    assert ctx.status == "unavailable" and "HTTP 401" in ctx.problems[0]
    monkeypatch.delenv("EHR_TOKEN")
    ctx = fetch(source(secured.base_url, auth={"type": "bearer", "token_env": "EHR_TOKEN"}), "p1")
    assert ctx.status == "unavailable" and "EHR_TOKEN" in ctx.problems[0]


def test_right_bearer_token(secured: FhirServer, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = seed.seed_heart_failure(secured.base_url, headers=secured.headers)
    monkeypatch.setenv("EHR_TOKEN", TOKEN)
    ctx = fetch(source(secured.base_url, auth={"type": "bearer", "token_env": "EHR_TOKEN"}), hf.identifier)
    assert ctx.status == "complete" and ctx.values["nt_probnp"].value == 1850


NOT_FOUND = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "not-found", "diagnostics": "MedicationStatement is not supported"}],
}
PROCESSING = {
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "processing", "diagnostics": "Condition index is rebuilding"}],
}


def test_one_query_failing_gives_partial(fhir_server: FhirServer, heart_failure: seed.Seeded) -> None:
    faults = {"MedicationStatement": (404, NOT_FOUND), "Condition": (400, PROCESSING)}
    with FaultProxy(fhir_server.origin, faults=faults) as proxy:
        ctx = fetch(source(proxy.base_url), heart_failure.identifier)
    assert ctx.status == "partial"
    assert ctx.values["nt_probnp"].value == 1850 and ctx.age_years is not None
    assert ctx.conditions == {} and ctx.medications == {}  # not known, rather than "none"
    assert ctx.problems == (
        "Condition search failed: HTTP 400, OperationOutcome processing",
        "MedicationStatement search failed: HTTP 404 (not found), OperationOutcome not-found",
    )


# ----- SMART Backend Services -----------------------------------------------------


def _rsa_key(tmp_path: Path) -> tuple[Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _write(tmp_path / "rsa.pem", key)


def _ec_key(tmp_path: Path) -> tuple[Path, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    return _write(tmp_path / "ec.pem", key)


def _write(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[Path, bytes]:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, public


def _smart(base_url: str, key_file: Path, token_url: str | None, **kw: object) -> EhrSource:
    auth = {
        "type": "smart-backend",
        "client_id": "ecgbridge-test",
        "private_key_file": str(key_file),
        "key_id": "key-1",
        **({"token_url": token_url} if token_url else {}),
    }
    return source(base_url, auth=auth, **kw)


@pytest.fixture(scope="module")
def secured_patient(secured: FhirServer) -> seed.Seeded:
    return seed.seed_heart_failure(secured.base_url, headers=secured.headers)


def test_smart_backend_rs384_end_to_end_and_token_reuse(
    secured: FhirServer, secured_patient: seed.Seeded, tmp_path: Path
) -> None:
    key_file, public = _rsa_key(tmp_path)
    with SmartTokenEndpoint(
        public_key_pem=public, client_id="ecgbridge-test", key_id="key-1", tokens=[TOKEN]
    ) as endpoint:
        src = _smart(secured.base_url, key_file, endpoint.token_url)
        with EhrFetcher() as fetcher:
            first = fetcher.fetch(src, Patient(id=secured_patient.identifier), ECG)
            second = fetcher.fetch(src, Patient(id=secured_patient.identifier), ECG)
    assert first.status == second.status == "complete", first.problems
    assert first.values["nt_probnp"].value == 1850
    assert endpoint.issued == 1  # cached across fetches
    claims = endpoint.claims[0]
    assert claims["iss"] == claims["sub"] == "ecgbridge-test" and claims["exp"] - claims["iat"] <= 300
    assert endpoint.scopes[0] == (
        "system/Patient.rs system/Observation.rs system/Condition.rs system/MedicationStatement.rs"
    )


def test_smart_backend_es384_with_discovery(secured: FhirServer, secured_patient: seed.Seeded, tmp_path: Path) -> None:
    key_file, public = _ec_key(tmp_path)
    with SmartTokenEndpoint(
        public_key_pem=public, client_id="ecgbridge-test", key_id="key-1", tokens=[TOKEN]
    ) as endpoint:
        config = {
            "token_endpoint": endpoint.token_url,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        }
        with FaultProxy(secured.origin, smart_configuration=config) as proxy:
            ctx = fetch(_smart(proxy.base_url, key_file, None), secured_patient.identifier)
    assert ctx.status == "complete", ctx.problems
    assert endpoint.issued == 1 and ctx.values["weight"].value == pytest.approx(84.82, abs=0.01)


def test_smart_token_refused_by_fhir_is_fetched_again_once(
    secured: FhirServer, secured_patient: seed.Seeded, tmp_path: Path
) -> None:
    key_file, public = _rsa_key(tmp_path)
    with SmartTokenEndpoint(
        public_key_pem=public, client_id="ecgbridge-test", key_id="key-1", tokens=["revoked-token", TOKEN]
    ) as endpoint:
        ctx = fetch(_smart(secured.base_url, key_file, endpoint.token_url), secured_patient.identifier)
    assert ctx.status == "complete", ctx.problems
    assert endpoint.issued == 2


def test_smart_wrong_key_is_unavailable_naming_the_token_error(secured: FhirServer, tmp_path: Path) -> None:
    key_file, _ = _rsa_key(tmp_path)
    _, other_public = _write(tmp_path / "other.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with SmartTokenEndpoint(
        public_key_pem=other_public, client_id="ecgbridge-test", key_id="key-1", tokens=[TOKEN]
    ) as endpoint:
        ctx = fetch(_smart(secured.base_url, key_file, endpoint.token_url), "p1")
    assert ctx.status == "unavailable"
    assert ctx.problems[0].startswith("Patient search not sent: SMART token endpoint -> 401: invalid_client:")
    assert "Signature verification failed" in ctx.problems[0]
    assert endpoint.issued == 0
