"""Analysis results for the mapping tests (FHIR report, HL7 ORU, the printout): one set of made-up findings."""

from __future__ import annotations

from typing import Any

from ecgbridge.mapping.codes import SUPERCLASS_DISPLAY, SUPERCLASS_SNOMED
from ecgbridge.mapping.ecg import AnalysisResult, Finding, ModelOutput

#: (class, probability, threshold) of the sample diagnosis output: MI and STTC present.
SAMPLE_PROBABILITIES = (
    ("NORM", 0.0812, 0.5),
    ("MI", 0.8731, 0.42),
    ("STTC", 0.61, 0.4),
    ("CD", 0.12, 0.35),
    ("HYP", 0.05, 0.3),
)


def sample_findings(**tiers: str) -> tuple[Finding, ...]:
    """The five superclass findings, with risk tiers where given (e.g. ``MI="high"``)."""
    return tuple(
        Finding(
            code=c,
            display=SUPERCLASS_DISPLAY[c],
            probability=p,
            threshold=t,
            present=p >= t,
            snomed=SUPERCLASS_SNOMED[c][0],
            tier=tiers.get(c),
        )
        for c, p, t in SAMPLE_PROBABILITIES
    )


def sample_result(**kw: Any) -> AnalysisResult:
    """A diagnosis result with flags; keyword arguments replace its fields."""
    defaults: dict[str, Any] = dict(
        message_id="msg-000123",
        outputs=(ModelOutput("ptbxl-superclass", "1.2.0", "diagnosis", sample_findings()),),
        quality_flags=("baseline_wander:V1",),
        ecg_flags=("derived_leads:III,aVR,aVL,aVF",),
    )
    defaults.update(kw)
    return AnalysisResult(**defaults)


def lvef_output(variant: str = "ecg+ehr") -> ModelOutput:
    tiers = [
        ("LVEF_GT50", "LVEF > 50 % (normal)", 0.1),
        ("LVEF_40_50", "LVEF 40-50 % (mildly reduced)", 0.15),
        ("LVEF_30_40", "LVEF 30-40 % (moderately reduced)", 0.6),
        ("LVEF_LT30", "LVEF < 30 % (severely reduced)", 0.15),
    ]
    findings = tuple(Finding(c, d, p, 0.0, c == "LVEF_30_40") for c, d, p in tiers)
    extra = {
        "tier": "LVEF_30_40",
        "variant": variant,
        "ehr_status": "complete",
        "missing_context": ["bnp: not in the EHR"],
        "probabilities": {c: p for c, _, p in tiers},
        "notice": "Trained on synthetic LVEF labels.",
        "attributions": [
            {
                "feature": "nt_probnp",
                "display": "NT-proBNP",
                "kind": "ehr",
                "value": 2400.0,
                "unit": "pg/mL",
                "contribution": 0.9,
            },
            {
                "feature": "qrs_duration",
                "display": "QRS duration",
                "kind": "ecg",
                "value": 152.0,
                "unit": "ms",
                "contribution": 0.4,
            },
            {"feature": "age", "display": "Age", "kind": "ehr", "value": 44.0, "unit": "a", "contribution": -0.2},
        ],
    }
    return ModelOutput("lvef-synthetic", "0.1.0", "lvef", findings, extra)
