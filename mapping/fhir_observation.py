"""The part every Observation ecgbridge writes shares (pure): one place, so they cannot drift.

``status`` preliminary (a machine result no clinician has reviewed), category
``procedure`` (electrodiagnostics, per the observation-category definition), a business
identifier that makes re-delivery a conditional create, and the patient / time / issued
fields when known. Callers add the value, interpretation, note and device.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ecgbridge.mapping.codes import SYSTEM

__all__ = ["observation_base"]


def observation_base(
    *,
    identifier_value: str,
    code: Mapping[str, Any],
    subject: Mapping[str, Any] | None,
    effective: str | None,
    issued: str | None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A new Observation dict with the shared fields, in FHIR's element order."""
    obs: dict[str, Any] = {"resourceType": "Observation"}
    if meta:
        obs["meta"] = copy.deepcopy(dict(meta))
    obs["identifier"] = [{"system": SYSTEM["ecgbridge_result"], "value": identifier_value}]
    obs["status"] = "preliminary"
    obs["category"] = [{"coding": [{"system": SYSTEM["obs_category"], "code": "procedure", "display": "Procedure"}]}]
    obs["code"] = copy.deepcopy(dict(code))
    if subject is not None:
        obs["subject"] = copy.deepcopy(dict(subject))
    if effective is not None:
        obs["effectiveDateTime"] = effective
    if issued is not None:
        obs["issued"] = issued
    return obs
