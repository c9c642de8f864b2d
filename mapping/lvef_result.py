"""What an LVEF tier result says, in one place for the FHIR, HL7 and PDF writers (pure).

The LVEF model (:mod:`inference.lvef`) returns a :class:`~mapping.ecg.ModelOutput` with
``task == "lvef"``: one finding per tier (``present`` only for the predicted tier) and
``extra`` holding ``tier``, ``probabilities``, ``variant`` ("ecg+ehr" | "ecg-only"),
``ehr_status``, ``missing_context``, ``attributions`` (tree SHAP contributions towards the
predicted tier, each with ``feature``, ``display``, ``kind`` ("ecg" | "ehr"), ``value``,
``unit``, ``contribution``) and a ``notice`` (synthetic training labels).

The explanation is built from those fields only, so the three writers cannot tell three
different stories.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ecgbridge.mapping.ecg import AnalysisResult, Finding, ModelOutput

__all__ = [
    "LVEF_TASK",
    "Attribution",
    "lvef_output",
    "predicted_tier",
    "attributions",
    "format_value",
    "explanation_lines",
    "explanation_text",
    "tier_interpretation",
]

LVEF_TASK = "lvef"

#: Tier upper bound (% EF) -> HL7 v3 ObservationInterpretation (N normal, L low, LL critically low).
_INTERPRETATION_BY_LOWER_BOUND: tuple[tuple[float, str, str], ...] = (
    (50.0, "N", "Normal"),
    (30.0, "L", "Low"),
    (-math.inf, "LL", "Critical low"),
)


#: UCUM codes as a reader writes them.
_UNIT_DISPLAY = {"mm[Hg]": "mmHg", "mL/min/{1.73_m2}": "mL/min/1.73 m2", "a": "years", "kg/m2": "kg/m2"}

#: Units under which 1 / 0 mean yes / no.
_FLAG_UNITS = (None, "", "flag", "1/0", "yes/no")


@dataclass(frozen=True)
class Attribution:
    feature: str
    display: str
    kind: str  # ecg | ehr
    value: Any
    unit: str | None
    contribution: float  # log-odds towards the predicted tier


def lvef_output(result: AnalysisResult) -> ModelOutput | None:
    """The result's LVEF output, if the route ran the LVEF model."""
    return next((o for o in result.outputs if o.task == LVEF_TASK), None)


def predicted_tier(output: ModelOutput) -> Finding | None:
    """The tier the model chose (the present finding; else the most probable)."""
    present = [f for f in output.findings if f.present]
    if present:
        return present[0]
    return max(output.findings, key=lambda f: f.probability, default=None)


def attributions(output: ModelOutput) -> list[Attribution]:
    """The stored attributions, largest effect first; malformed entries are skipped."""
    out: list[Attribution] = []
    for item in output.extra.get("attributions") or ():
        if not isinstance(item, Mapping):
            continue
        try:
            contribution = float(item["contribution"])
        except (KeyError, TypeError, ValueError):
            continue
        if not math.isfinite(contribution):
            continue
        out.append(
            Attribution(
                feature=str(item.get("feature", "?")),
                display=str(item.get("display") or item.get("feature", "?")),
                kind=str(item.get("kind", "ecg")),
                value=item.get("value"),
                unit=item.get("unit"),
                contribution=contribution,
            )
        )
    return sorted(out, key=lambda a: -abs(a.contribution))


def format_value(a: Attribution) -> str:
    """``"NT-proBNP 2400 pg/mL"``, ``"prior myocardial infarction: yes"``, ``"... not known"``."""
    value = a.value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return f"{a.display}: not known"
    if isinstance(value, bool) or (a.unit in _FLAG_UNITS and isinstance(value, (int, float)) and value in (0, 1)):
        return f"{a.display}: {'yes' if bool(value) else 'no'}"
    if a.unit == "probability" and isinstance(value, (int, float)):
        return f"{a.display} p={float(value):.2f}"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"
    else:
        text = str(value)
    shown = _UNIT_DISPLAY.get(a.unit or "", a.unit)
    unit = f" {shown}" if shown and a.unit not in ("1", *_FLAG_UNITS) else ""
    return f"{a.display} {text}{unit}"


def _tier_text(tier: Finding) -> str:
    return f"{tier.display} (probability {tier.probability:.2f})"


def explanation_lines(output: ModelOutput, *, top: int = 5) -> list[str]:
    """Plain-language lines: the tier, which variant, what pushed for and against it, what was missing."""
    tier = predicted_tier(output)
    lines: list[str] = []
    if tier is None:
        return ["The LVEF model gave no tier."]
    variant = str(output.extra.get("variant") or "ecg-only")
    source = (
        "ECG features and the patient's EHR record" if variant == "ecg+ehr" else "ECG features only (no EHR context)"
    )
    lines.append(f"Estimated LVEF tier: {_tier_text(tier)}, from {source}.")
    attrs = attributions(output)
    toward = [a for a in attrs if a.contribution > 0][:top]
    against = [a for a in attrs if a.contribution < 0][: max(1, top // 2)]
    if toward:
        lines.append(
            "Pointing to this tier: " + "; ".join(f"{format_value(a)} ({a.kind.upper()})" for a in toward) + "."
        )
    if against:
        lines.append(
            "Pointing away from it: " + "; ".join(f"{format_value(a)} ({a.kind.upper()})" for a in against) + "."
        )
    missing = [str(m) for m in output.extra.get("missing_context") or () if m]
    status = output.extra.get("ehr_status")
    if variant != "ecg+ehr" and status:
        lines.append(f"EHR context: {str(status).replace('_', ' ')}.")
    if missing:
        shown = missing[:4]
        more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
        lines.append("Missing context: " + "; ".join(shown) + more + ".")
    notice = output.extra.get("notice")
    if notice:
        lines.append(str(notice))
    return lines


def explanation_text(output: ModelOutput, *, top: int = 5) -> str:
    return " ".join(explanation_lines(output, top=top))


def _lower_bound(tier: Finding, output: ModelOutput) -> float | None:
    """The tier's lower EF bound (%), from ``extra["tier_bounds"]`` or the tier's order."""
    bounds = output.extra.get("tier_bounds")
    if isinstance(bounds, Mapping) and isinstance(bounds.get(tier.code), Sequence):
        low = bounds[tier.code][0]
        return -math.inf if low is None else float(low)
    order = [f.code for f in output.findings]  # convention: normal first, most reduced last
    defaults = (50.0, 40.0, 30.0, -math.inf)
    if tier.code in order and len(order) == 4:
        return defaults[order.index(tier.code)]
    return None


def tier_interpretation(tier: Finding, output: ModelOutput) -> tuple[str, str] | None:
    """(HL7 v3 ObservationInterpretation code, display) for the tier: N, L or LL."""
    low = _lower_bound(tier, output)
    if low is None:
        return None
    for bound, code, display in _INTERPRETATION_BY_LOWER_BOUND:
        if low >= bound:
            return code, display
    return None
