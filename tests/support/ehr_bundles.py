"""Realistic (synthetic) EHR patients seeded into the FHIR test server for the EHR context tests.

Each ``seed_*`` function posts one transaction Bundle (Patient plus its Observations,
Conditions and MedicationStatements, linked by ``urn:uuid`` references) and returns the
identifier the ECG would carry. Every patient gets a fresh identifier, so one server can
hold all of them. Times are relative to :data:`ECG_TIME`, the acquisition time the tests
pass to the fetcher. No real person is described here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

ECG_TIME = datetime(2025, 3, 10, 9, 30, tzinfo=UTC)
ID_SYSTEM = "urn:ecgbridge:patient-id"

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"


@dataclass(frozen=True)
class Seeded:
    """What a test needs about a seeded patient: the ECG's identifier and the server's id."""

    identifier: str
    patient_id: str
    seconds: float  # how long the transaction took


def _when(days: float = 0, hours: float = 0) -> str:
    return (ECG_TIME + timedelta(days=days, hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _patient(identifier: str, **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": ID_SYSTEM, "value": identifier}],
        "name": [{"family": "Synthetic", "given": ["Test"]}],
        **fields,
    }


def observation(
    subject: str,
    loinc: str,
    value: float | None,
    unit: str,
    when: str,
    *,
    status: str = "final",
    ucum: bool = True,
    display: str | None = None,
    components: list[tuple[str, float, str]] | None = None,
) -> dict[str, Any]:
    """A lab or vital-sign Observation (valueQuantity, or components for a panel)."""
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": status,
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs" if components or loinc in VITALS else "laboratory",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": loinc, **({"display": display} if display else {})}]},
        "subject": {"reference": subject},
        "effectiveDateTime": when,
    }
    quantity = lambda v, u: {"value": v, "unit": u, **({"system": UCUM, "code": u} if ucum else {})}  # noqa: E731
    if value is not None:
        obs["valueQuantity"] = quantity(value, unit)
    if components:
        obs["component"] = [
            {"code": {"coding": [{"system": LOINC, "code": c}]}, "valueQuantity": quantity(v, u)}
            for c, v, u in components
        ]
    return obs


VITALS = {"8480-6", "8462-4", "8867-4", "29463-7", "3141-9", "8302-2", "39156-5", "85354-9"}


def condition(
    subject: str,
    codings: list[tuple[str, str, str]],
    *,
    clinical: str | None = "active",
    verification: str = "confirmed",
    onset: str | None = None,
) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "resourceType": "Condition",
        "verificationStatus": {"coding": [{"system": _VERIFICATION, "code": verification}]},
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}
                ]
            }
        ],
        "code": {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]},
        "subject": {"reference": subject},
    }
    if clinical:
        cond["clinicalStatus"] = {"coding": [{"system": _CLINICAL, "code": clinical}]}
    if onset:
        cond["onsetDateTime"] = onset
    return cond


def medication(
    subject: str, concept: dict[str, Any], *, status: str = "active", start: str | None = None, end: str | None = None
) -> dict[str, Any]:
    stmt: dict[str, Any] = {
        "resourceType": "MedicationStatement",
        "status": status,
        "medicationCodeableConcept": concept,
        "subject": {"reference": subject},
    }
    if start or end:
        stmt["effectivePeriod"] = {k: v for k, v in (("start", start), ("end", end)) if v}
    return stmt


def transaction(
    base_url: str, patient: dict[str, Any], others: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> tuple[str, float]:
    """POST Patient + resources as one transaction; returns (patient id, seconds)."""
    placeholder = f"urn:uuid:{uuid.uuid4()}"
    entries = [{"fullUrl": placeholder, "resource": patient, "request": {"method": "POST", "url": "Patient"}}]
    for resource in others:
        body = dict(resource, subject={"reference": placeholder})
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": body,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
        )
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    started = time.monotonic()
    resp = httpx.post(
        base_url.rstrip("/") + "/",
        json=bundle,
        timeout=120,
        headers={"Content-Type": "application/fhir+json", **(headers or {})},
    )
    seconds = time.monotonic() - started
    resp.raise_for_status()
    first = resp.json()["entry"][0]["response"]["location"]  # "Patient/<id>"
    return first.split("/")[1], seconds


def _new_id() -> str:
    return f"ecg-{uuid.uuid4().hex[:12]}"


S = "urn:uuid:subject"  # replaced by the transaction's Patient placeholder


def seed_heart_failure(base_url: str, headers: dict[str, str] | None = None) -> Seeded:
    """(a) HFrEF, old MI, paroxysmal AF (ICD-10-CM), hypertension; furosemide + carvedilol."""
    ident = _new_id()
    others = [
        observation(S, "33762-6", 900, "pg/mL", _when(days=-200)),
        observation(S, "33762-6", 1850, "pg/mL", _when(days=-2), display="NT-proBNP"),
        observation(S, "89579-7", 0.034, "ng/mL", _when(hours=-3)),  # hs troponin I, ng/mL -> 34 ng/L
        observation(S, "14682-9", 132.6, "umol/L", _when(days=-2)),  # creatinine -> 1.4997 mg/dL
        observation(S, "2823-3", 4.1, "mmol/L", _when(days=-2)),
        observation(S, "2823-3", 6.9, "mmol/L", _when(days=-1), status="entered-in-error"),
        observation(S, "2951-2", 136, "mmol/L", _when(days=-2)),
        observation(S, "2951-2", 128, "mmol/L", _when(days=1)),  # after the ECG: not used
        observation(S, "718-7", 128, "g/L", _when(days=-2)),  # -> 12.8 g/dL
        observation(
            S, "85354-9", None, "", _when(hours=-1), components=[("8480-6", 118, "mm[Hg]"), ("8462-4", 72, "mm[Hg]")]
        ),
        observation(S, "8867-4", 88, "/min", _when(hours=-1)),
        observation(S, "29463-7", 187, "[lb_av]", _when(days=-30)),  # -> 84.82 kg
        observation(S, "8302-2", 178, "cm", _when(days=-300)),
        condition(S, [(SNOMED, "703272007", "Heart failure with reduced ejection fraction")], onset="2021-04"),
        condition(S, [(SNOMED, "1755008", "Old myocardial infarction")], clinical="resolved", onset="2019-11-02"),
        condition(S, [(ICD10CM, "I48.0", "Paroxysmal atrial fibrillation")], onset="2023-01-15"),
        condition(S, [(SNOMED, "59621000", "Essential hypertension")]),
        condition(S, [(SNOMED, "44054006", "Diabetes mellitus type 2")], verification="refuted"),
        medication(
            S,
            {
                "coding": [{"system": RXNORM, "code": "4603", "display": "furosemide"}],
                "text": "Furosemide 40 mg tablet",
            },
            start="2021-04-20",
        ),
        medication(
            S,
            {
                "coding": [{"system": ATC, "code": "C07AG02", "display": "carvedilol"}],
                "text": "Carvedilol 12.5 mg tablet",
            },
            start="2021-05-01",
        ),
        medication(S, {"text": "Spironolactone 25 mg tablet"}, status="stopped", start="2022-01-01", end="2022-06-01"),
    ]
    pid, seconds = transaction(base_url, _patient(ident, gender="male", birthDate="1950-06-15"), others, headers)
    return Seeded(ident, pid, seconds)


def seed_bare(base_url: str, headers: dict[str, str] | None = None) -> Seeded:
    """(b) A Patient and nothing else (partial birthDate)."""
    ident = _new_id()
    pid, seconds = transaction(base_url, _patient(ident, gender="female", birthDate="1961"), [], headers)
    return Seeded(ident, pid, seconds)


#: In the 2,000-observation patient: the newest heart rate, and the creatinine that only
#: the last search page holds (it is the oldest of all).
MANY_LATEST_HEART_RATE = 61.0
MANY_CREATININE = 1.1


def seed_many(base_url: str, count: int = 2000, headers: dict[str, str] | None = None) -> Seeded:
    """(c) ``count`` observations: hourly heart rates (newest first wins) and a few old creatinines."""
    ident = _new_id()
    others = [
        observation(S, "8867-4", MANY_LATEST_HEART_RATE if i == 1 else 60 + (i % 40), "/min", _when(hours=-i))
        for i in range(1, count - 3)
    ]
    others += [
        observation(S, "2160-0", MANY_CREATININE if d == 100 else 2.0, "mg/dL", _when(days=-d))
        for d in (100, 101, 102, 103)
    ]
    pid, seconds = transaction(base_url, _patient(ident, gender="male", birthDate="1970-01-01"), others, headers)
    return Seeded(ident, pid, seconds)


def seed_odd_unit(base_url: str, headers: dict[str, str] | None = None) -> Seeded:
    """(d) Hemoglobin in a unit nothing converts (%), next to a normal sodium."""
    ident = _new_id()
    others = [observation(S, "718-7", 45, "%", _when(days=-3)), observation(S, "2951-2", 140, "mmol/L", _when(days=-3))]
    pid, seconds = transaction(base_url, _patient(ident, gender="female", birthDate="1980-02-29"), others, headers)
    return Seeded(ident, pid, seconds)


def seed_duplicate(base_url: str, headers: dict[str, str] | None = None) -> Seeded:
    """Two Patients with the same identifier (a merge the EHR has not done yet)."""
    ident = _new_id()
    pid, _ = transaction(base_url, _patient(ident), [], headers)
    _, seconds = transaction(base_url, _patient(ident), [], headers)
    return Seeded(ident, pid, seconds)
