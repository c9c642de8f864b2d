"""A triage output's severity tier as one coded value, shared by the FHIR and HL7 writers (pure).

The triage model (:mod:`inference.triage`) puts the 3-tier code in ``extra["severity"]``
(and the 4-tier one in ``extra["severity4"]``). An EHR drives worklists from one coded
impression, not from three cumulative probabilities, so both writers send the tier as an
"EKG impression" (LOINC 8601-7): SNOMED CT normal / abnormal ECG plus the ecgbridge tier
code, with the interpretation flag N / A / AA (HL7 table 0078 = FHIR v3
ObservationInterpretation).
"""

from __future__ import annotations

from dataclasses import dataclass

from ecgbridge.mapping.codes import (
    SEVERITY4_DISPLAY,
    SEVERITY_DISPLAY,
    SEVERITY_INTERPRETATION,
    SEVERITY_SNOMED,
    SEVERITY_SYSTEM,
)
from ecgbridge.mapping.ecg import ModelOutput

__all__ = ["TRIAGE_TASK", "Severity", "severity_of_output"]

TRIAGE_TASK = "triage"


@dataclass(frozen=True)
class Severity:
    code: str  # 3-tier code
    display: str
    snomed: tuple[str, str]  # (code, display)
    flag: tuple[str, str]  # (N | A | AA, display)
    code4: str | None = None  # 4-tier code, when the model has one
    display4: str | None = None
    system: str = SEVERITY_SYSTEM


def severity_of_output(output: ModelOutput) -> Severity | None:
    """The tier of a triage output; None for other outputs or an unknown code."""
    if output.task != TRIAGE_TASK:
        return None
    code = output.extra.get("severity")
    if code not in SEVERITY_DISPLAY:
        return None
    code4 = output.extra.get("severity4")
    return Severity(
        code=str(code),
        display=SEVERITY_DISPLAY[code],
        snomed=SEVERITY_SNOMED[code],
        flag=SEVERITY_INTERPRETATION[code],
        code4=str(code4) if code4 in SEVERITY4_DISPLAY else None,
        display4=SEVERITY4_DISPLAY.get(str(code4)) if code4 else None,
    )
