"""Fuzz: the EHR FHIR mapping (context_from_resources) on generated FHIR-ish JSON."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from hypothesis import example, given

from tests.fuzz.harness import ci_settings
from tests.fuzz.targets import by_name

EHR = by_name("ehr.resources")
_BASE: dict[str, Any] = {
    "patient": {"resourceType": "Patient", "id": "p1", "birthDate": "1955-03-14", "gender": "female"},
    "observations": [],
    "conditions": [],
    "medications": [],
    "acquired_at": datetime(2021, 3, 14, 10, 34, 12),
    "window_days": 365,
    "source": "ehr",
    "status": "complete",
    "problems": [],
}


@ci_settings(EHR.ci_examples)
@given(EHR.strategy)
@example(_BASE)
@example({**_BASE, "observations": None, "conditions": None, "medications": None, "patient": None})
def test_ehr_mapping_never_raises(kwargs: dict[str, Any]) -> None:
    EHR.run(kwargs)
