"""A clinical abnormality predicted from the ECG -> one FHIR R4 Observation (pure).

The knowledge-transfer model explains its findings by clinical abnormalities its ECG
embedding predicts (:mod:`mapping.abnormality_result`). An EHR must never mistake one for the
lab or vital sign it names, so, decisions:

* **code**: the head's code in :data:`~mapping.abnormality_result.PREDICTED_ABNORMALITY_SYSTEM`
  (``urn:ecgbridge:predicted-abnormality|nt_probnp_high``), text "ECG pattern associated with
  elevated NT-proBNP (predicted from the ECG, not measured)" -- never the variable's LOINC
  (``Observation?code=http://loinc.org|33762-6`` must find the measured NT-proBNP values only);
* **category** ``procedure`` like every ECG Observation (never ``laboratory`` / ``vital-signs``);
* **value** the probability (UCUM ``1``, 0..1), never a concentration;
* **interpretation** POS / NEG at the head's threshold (never H / L: those say a measured value
  is outside its reference range), with a text saying it is a prediction;
* **method** ``urn:ecgbridge:method|ecg-model-prediction``, text "Predicted from the ECG by model
  X version Y; not a measurement";
* **component** the clinical variable *as a value*: code ``predicted-variable`` (method system),
  ``valueCodeableConcept`` the variable's LOINC (so ``component-value-concept=http://loinc.org|33762-6``
  finds the predictions about NT-proBNP on purpose, while no search by code does), and code
  ``predicted-criterion`` with the cut-off as ``valueString``;
* **derivedFrom** the finding Observations of the same model output: the explanation comes out
  of the same model call and explains those findings;
* **note** what the probability is a probability of, and the "not for clinical use" label; the
  AI security label and the model tag like every model Observation; status preliminary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ecgbridge.mapping.abnormality_result import (
    METHOD_CODE,
    METHOD_SYSTEM,
    PREDICTED_ABNORMALITY_SYSTEM,
    PredictedAbnormality,
    detail_text,
    method_text,
)
from ecgbridge.mapping.codes import SYSTEM
from ecgbridge.mapping.ecg import NOT_FOR_CLINICAL_USE, ModelOutput
from ecgbridge.mapping.fhir_observation import observation_base

__all__ = ["abnormality_observation", "abnormality_identifier"]


def abnormality_identifier(identifier_base: str, a: PredictedAbnormality) -> str:
    """The Observation's business identifier value: ``<report>/<model>/<version>/predicted/<code>``."""
    return f"{identifier_base}/predicted/{a.code}"


def abnormality_observation(
    a: PredictedAbnormality,
    output: ModelOutput,
    *,
    identifier_base: str,
    subject: Mapping[str, Any] | None,
    effective: str | None,
    issued: str | None,
    device_ref: str | None,
    derived_from: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
    label: str = NOT_FOR_CLINICAL_USE,
) -> dict[str, Any]:
    """The Observation as a dict (the caller validates it with the rest of the report)."""
    obs = observation_base(
        identifier_value=abnormality_identifier(identifier_base, a),
        code={
            "coding": [{"system": PREDICTED_ABNORMALITY_SYSTEM, "code": a.code, "display": a.pattern}],
            "text": f"{a.pattern} (predicted from the ECG, not measured)",
        },
        subject=subject,
        effective=effective,
        issued=issued,
        meta=meta,
    )
    obs["valueQuantity"] = {
        "value": round(a.probability, 4),
        "unit": "probability",
        "system": SYSTEM["ucum"],
        "code": "1",
    }
    called = "pattern predicted" if a.present else "pattern not predicted"
    obs["interpretation"] = [
        {
            "coding": [
                {
                    "system": SYSTEM["obs_interpretation"],
                    "code": "POS" if a.present else "NEG",
                    "display": "Positive" if a.present else "Negative",
                }
            ],
            "text": f"{called} (p {'>=' if a.present else '<'} {a.threshold:.2f}); predicted from the ECG, not measured",
        }
    ]
    obs["note"] = [{"text": detail_text(a, output)}, {"text": label}]
    obs["method"] = {
        "coding": [{"system": METHOD_SYSTEM, "code": METHOD_CODE, "display": "Predicted from the ECG by a model"}],
        "text": method_text(output),
    }
    if device_ref is not None:
        obs["device"] = {"reference": device_ref, "display": f"{output.model} {output.version}"}
    if derived_from:
        obs["derivedFrom"] = [{"reference": ref} for ref in derived_from]
    obs["component"] = [
        {
            "code": {
                "coding": [
                    {
                        "system": METHOD_SYSTEM,
                        "code": "predicted-variable",
                        "display": "Clinical variable the predicted pattern is associated with",
                    }
                ],
                "text": "Associated clinical variable (not measured here)",
            },
            "valueCodeableConcept": {
                "coding": [{"system": SYSTEM["loinc"], "code": a.loinc, "display": a.variable}],
                "text": a.variable,
            },
        }
    ]
    if a.criterion:
        obs["component"].append(
            {
                "code": {
                    "coding": [
                        {
                            "system": METHOD_SYSTEM,
                            "code": "predicted-criterion",
                            "display": "Criterion the model was trained to predict",
                        }
                    ],
                    "text": "Criterion (training label, not a result)",
                },
                "valueString": f"{a.variable} {a.criterion}",
            }
        )
    return obs
