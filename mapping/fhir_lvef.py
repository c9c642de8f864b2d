"""An LVEF tier result -> one FHIR R4 Observation, LOINC 10230-1 (pure).

Decisions:

* **code** LOINC 10230-1 "Left ventricular Ejection fraction", **value** the tier as a
  CodeableConcept (local system ``urn:ecgbridge:lvef-tier``) — a model that predicts a
  range must not send a number an EHR would chart as a measured EF;
* **interpretation**: the HL7 v3 code (N for > 50 %, L for 30-50 %, LL for < 30 %) and
  the tier itself;
* **component**: one per tier, its probability (UCUM ``1``), so the EHR can show how sure
  the model was; plus the variant (ECG + EHR or ECG only);
* **note**: the plain-language explanation (:mod:`mapping.lvef_result`: the tier, the top
  ECG features and EHR variables with their values, what context was missing, the
  synthetic-label notice) and the not-for-clinical-use label;
* **method**: "ECG + EHR gradient-boosted trees" or "ECG only", and the AI security
  label like every model Observation; status preliminary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ecgbridge.mapping.codes import LOINC, SYSTEM
from ecgbridge.mapping.ecg import NOT_FOR_CLINICAL_USE, ModelOutput
from ecgbridge.mapping.fhir_observation import observation_base
from ecgbridge.mapping.lvef_result import explanation_text, predicted_tier, tier_interpretation

__all__ = ["LVEF_TIER_SYSTEM", "lvef_observation"]

LVEF_TIER_SYSTEM = "urn:ecgbridge:lvef-tier"
_VARIANT_SYSTEM = "urn:ecgbridge:lvef-variant"


def lvef_observation(
    output: ModelOutput,
    *,
    subject: Mapping[str, Any] | None,
    effective: str | None,
    device_ref: str | None,
    identifier_value: str,
    issued: str | None,
    meta: Mapping[str, Any] | None = None,
    label: str = NOT_FOR_CLINICAL_USE,
) -> dict[str, Any]:
    """The Observation as a dict (the caller validates it with the rest of the report)."""
    tier = predicted_tier(output)
    if tier is None:
        raise ValueError(f"{output.model} {output.version}: LVEF output without tiers")
    code, display = LOINC["lvef"]
    tier_coding = {"system": LVEF_TIER_SYSTEM, "code": tier.code, "display": tier.display}
    variant = str(output.extra.get("variant") or "ecg-only")
    obs = observation_base(
        identifier_value=identifier_value,
        code={
            "coding": [{"system": SYSTEM["loinc"], "code": code, "display": display}],
            "text": "LVEF tier estimated from the ECG (model)",
        },
        subject=subject,
        effective=effective,
        issued=issued,
        meta=meta,
    )
    obs["valueCodeableConcept"] = {"coding": [tier_coding], "text": tier.display}
    interpretation = [{"coding": [dict(tier_coding)], "text": tier.display}]
    v3 = tier_interpretation(tier, output)
    if v3 is not None:
        interpretation.insert(
            0, {"coding": [{"system": SYSTEM["obs_interpretation"], "code": v3[0], "display": v3[1]}]}
        )
    obs["interpretation"] = interpretation
    obs["note"] = [{"text": explanation_text(output)}, {"text": label}]
    obs["method"] = {
        "coding": [{"system": _VARIANT_SYSTEM, "code": variant}],
        "text": (
            "Gradient-boosted trees over ECG features and EHR variables"
            if variant == "ecg+ehr"
            else "Gradient-boosted trees over ECG features only (no EHR context)"
        ),
    }
    if device_ref is not None:
        obs["device"] = {"reference": device_ref, "display": f"{output.model} {output.version}"}
    obs["component"] = [
        {
            "code": {
                "coding": [{"system": LVEF_TIER_SYSTEM, "code": f.code, "display": f.display}],
                "text": f"Probability of {f.display}",
            },
            "valueQuantity": {
                "value": round(float(f.probability), 4),
                "unit": "probability",
                "system": SYSTEM["ucum"],
                "code": "1",
            },
        }
        for f in output.findings
    ]
    return obs
