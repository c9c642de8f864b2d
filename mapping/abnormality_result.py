"""Clinical abnormalities predicted from the ECG: what the FHIR, HL7 and PDF writers say about them (pure).

A signal model whose manifest has ``explanations`` (the knowledge-transfer model,
``training.kt``) reads its ``abnormalities`` output into ``ModelOutput.extra[PREDICTED_KEY]``
(``inference.models.LoadedModel.run``): per head ``code``, ``display`` (it completes "ECG
pattern associated with ..."), ``loinc`` and ``variable`` (the clinical variable the head was
trained against), ``criterion`` (the cut-off in words), ``probability``, ``threshold``,
``present`` (``probability >= threshold``) and ``measured: False``.

They are the model's explanation of its findings and predictions only. No writer codes one
with the variable's LOINC (an EHR would chart it as that lab result) or puts it beside the
measured EHR values; every one says "predicted from the ECG, not measured". The sentences
are built here once, so the FHIR report, the HL7 ORU and the PDF say the same thing.

A poor-quality ECG carries none: ``inference.quality.cap_for_quality`` moves them to
``extra["quality_gate"][WITHHELD_KEY]`` and the writers say they were withheld.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ecgbridge.errors import MappingError
from ecgbridge.mapping.ecg import ModelOutput

__all__ = [
    "ABNORMALITIES_OUTPUT",
    "PREDICTED_KEY",
    "WITHHELD_KEY",
    "SECTION_TITLE",
    "PREDICTED_ABNORMALITY_SYSTEM",
    "METHOD_SYSTEM",
    "METHOD_CODE",
    "PredictedAbnormality",
    "predicted_abnormalities",
    "withheld_reason",
    "sentence",
    "method_text",
    "detail_text",
    "summary_lines",
]

#: The ONNX output role (``Manifest.outputs`` key) whose columns the ``explanations`` name.
ABNORMALITIES_OUTPUT = "abnormalities"
#: ``ModelOutput.extra`` key of the predictions.
PREDICTED_KEY = "predicted_abnormalities"
#: ``extra["quality_gate"]`` key holding the predictions a poor-quality ECG did not carry.
WITHHELD_KEY = "explanations_withheld"
#: The heading every writer uses.
SECTION_TITLE = "Predicted from the ECG (not measured)"
#: FHIR code system of a predicted pattern (``Observation.code``); the code is the head's code.
PREDICTED_ABNORMALITY_SYSTEM = "urn:ecgbridge:predicted-abnormality"
#: FHIR code system of ``Observation.method`` (and the component codes of a prediction).
METHOD_SYSTEM = "urn:ecgbridge:method"
METHOD_CODE = "ecg-model-prediction"


@dataclass(frozen=True)
class PredictedAbnormality:
    """One head's prediction (never a measured value of ``variable``)."""

    code: str
    display: str
    loinc: str
    variable: str
    criterion: str
    probability: float
    threshold: float
    present: bool

    @property
    def pattern(self) -> str:
        """The name of what was predicted: "ECG pattern associated with elevated NT-proBNP"."""
        return f"ECG pattern associated with {self.display}"


def predicted_abnormalities(output: ModelOutput, *, strict: bool = True) -> list[PredictedAbnormality]:
    """The output's predictions, in the manifest's order; empty when it has none.

    ``strict``: a malformed entry or a probability outside [0, 1] raises
    :class:`MappingError` (a result that cannot be written truthfully); otherwise it is skipped.
    """
    extra = output.extra if isinstance(output.extra, Mapping) else {}
    raw = extra.get(PREDICTED_KEY) or []
    out: list[PredictedAbnormality] = []
    for item in raw if isinstance(raw, list) else [raw]:
        try:
            if not isinstance(item, Mapping):
                raise TypeError("not a mapping")
            p, t = float(item["probability"]), float(item.get("threshold", 0.5))
            for name, v in (("probability", p), ("threshold", t)):
                if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                    raise ValueError(f"{name} {v!r} is not in [0, 1]")
            if item.get("measured", False):
                raise ValueError("a predicted abnormality marked as measured")
            out.append(
                PredictedAbnormality(
                    code=str(item["code"]),
                    display=str(item.get("display") or item["code"]),
                    loinc=str(item["loinc"]),
                    variable=str(item.get("variable") or item.get("display") or item["code"]),
                    criterion=str(item.get("criterion") or ""),
                    probability=p,
                    threshold=t,
                    present=p >= t,
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            if strict:
                raise MappingError(
                    f"{output.model} {output.version}: predicted abnormality {_code_of(item)} is unusable: {exc}"
                ) from exc
    return out


def _code_of(item: object) -> str:
    return str(item.get("code", "?")) if isinstance(item, Mapping) else "?"


def withheld_reason(output: ModelOutput) -> str | None:
    """The quality rule that withheld the output's predictions (``poor_quality`` / ``too_short``), or None."""
    extra = output.extra if isinstance(output.extra, Mapping) else {}
    gate = extra.get("quality_gate")
    if isinstance(gate, Mapping) and gate.get(WITHHELD_KEY):
        return str(gate.get("rule") or "poor_quality")
    return None


_WITHHELD_WHY = {
    "poor_quality": "the ECG's signal quality is poor",
    "too_short": "the recording is too short",
}


def sentence(a: PredictedAbnormality) -> str:
    """The one sentence per prediction: ``ECG pattern associated with elevated NT-proBNP, p=0.81 (predicted ...)``."""
    return f"{a.pattern}, p={a.probability:.2f} (predicted from the ECG, not measured)"


def method_text(output: ModelOutput) -> str:
    """What produced the value, for ``Observation.method`` and the notes."""
    return f"Predicted from the ECG by model {output.model} version {output.version}; not a measurement"


def detail_text(a: PredictedAbnormality, output: ModelOutput) -> str:
    """What the probability is a probability of, and that it is not the variable's value."""
    criterion = f" {a.criterion}" if a.criterion else ""
    return (
        f"Probability that the ECG shows the pattern the model learned for {a.variable}{criterion} "
        f"(LOINC {a.loinc}); pattern called present at p >= {a.threshold:.2f}. "
        f"{method_text(output)} of {a.variable}."
    )


def summary_lines(output: ModelOutput) -> list[str]:
    """The report-level line (FHIR conclusion, HL7 report NTE, PDF): the predictions or why they were withheld."""
    reason = withheld_reason(output)
    if reason is not None:
        why = _WITHHELD_WHY.get(reason, reason.replace("_", " "))
        return [f"{SECTION_TITLE}, model {output.model} {output.version}: withheld, {why}."]
    found = predicted_abnormalities(output, strict=False)
    if not found:
        return []
    listed = "; ".join(f"{a.pattern}, p={a.probability:.2f}" for a in found)
    return [f"{SECTION_TITLE}, model {output.model} {output.version}: {listed}."]
