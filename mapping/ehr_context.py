"""EHR FHIR resources -> the patient context the LVEF model reads (pure).

The contract between the EHR side (``gateway.ehr_fetch`` fetches the resources) and the
models (``inference.lvef_features`` turns an :class:`EhrContext` into model inputs).
Nothing here talks to a server; everything is a function of resources already fetched,
so a bundle saved from a site's EHR can be replayed in a test.

Variable names (keys of :attr:`EhrContext.values`, :attr:`EhrContext.conditions`,
:attr:`EhrContext.medications`) are fixed in :data:`EHR_VALUE_NAMES`,
:data:`EHR_CONDITION_NAMES` and :data:`EHR_MEDICATION_NAMES`: models are trained on
those names and a renamed key would silently become "missing".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

__all__ = [
    "EHR_VALUE_NAMES",
    "EHR_CONDITION_NAMES",
    "EHR_MEDICATION_NAMES",
    "EhrValue",
    "EhrContext",
    "ContextStatus",
]

#: Numeric variables, each in one canonical UCUM unit (the unit is part of the contract).
EHR_VALUE_NAMES: dict[str, str] = {
    "nt_probnp": "pg/mL",
    "bnp": "pg/mL",
    "troponin": "ng/L",  # troponin I or T, high-sensitivity units
    "potassium": "mmol/L",
    "sodium": "mmol/L",
    "creatinine": "mg/dL",
    "egfr": "mL/min/{1.73_m2}",
    "hemoglobin": "g/dL",
    "systolic_bp": "mm[Hg]",
    "diastolic_bp": "mm[Hg]",
    "heart_rate": "/min",
    "weight": "kg",
    "height": "cm",
    "bmi": "kg/m2",
}

#: History flags from Condition resources (SNOMED CT, descendants listed in the fetcher's table).
EHR_CONDITION_NAMES: tuple[str, ...] = (
    "heart_failure",
    "myocardial_infarction",
    "atrial_fibrillation",
    "hypertension",
    "diabetes",
    "chronic_kidney_disease",
)

#: Medication classes from MedicationStatement / MedicationRequest (RxNorm / ATC), when fetched.
EHR_MEDICATION_NAMES: tuple[str, ...] = (
    "loop_diuretic",
    "beta_blocker",
    "ace_inhibitor_or_arb",
    "mineralocorticoid_antagonist",
)

#: complete: every query answered; partial: some queries failed (see problems);
#: unavailable: the EHR could not be asked (down, 401, timeout); no_patient: the EHR has no
#: patient with the ECG's identifier (or the ECG carries none); not_configured: the route
#: names no EHR.
ContextStatus = Literal["complete", "partial", "unavailable", "no_patient", "not_configured"]


@dataclass(frozen=True)
class EhrValue:
    """One numeric variable: the latest value inside the window, in its canonical unit."""

    name: str  # a key of EHR_VALUE_NAMES
    value: float
    unit: str  # EHR_VALUE_NAMES[name]
    loinc: str  # the code the source Observation carried
    effective: datetime | None  # when it was measured (timezone-aware when the source says)
    reference: str | None = None  # "Observation/<id>" on the EHR, for provenance (not PHI by itself)
    source_unit: str | None = None  # the unit as the EHR sent it, when it was converted


@dataclass(frozen=True)
class EhrContext:
    """The patient's EHR context at ECG time (PHI: never log values with identifiers)."""

    status: ContextStatus
    patient_reference: str | None = None  # "Patient/<id>" on the EHR
    age_years: float | None = None  # at ECG acquisition time
    sex: str | None = None  # FHIR administrative gender
    values: dict[str, EhrValue] = field(default_factory=dict)
    #: name -> True when an active (or resolved, for MI) Condition says so; absent = not known.
    conditions: dict[str, bool] = field(default_factory=dict)
    medications: dict[str, bool] = field(default_factory=dict)
    #: Plain-language notes on what was missing, converted or ignored (no PHI), e.g.
    #: "creatinine: unit 'furlongs' not convertible to mg/dL, 1 value ignored".
    problems: tuple[str, ...] = ()
    source: str | None = None  # the configured EHR's name

    @property
    def has_data(self) -> bool:
        """Whether anything beyond nothing was learned (decides ECG-only vs ECG+EHR)."""
        return bool(
            self.values or self.conditions or self.medications or self.age_years is not None or self.sex
        )

    def to_dict(self) -> dict:
        """JSON-safe form stored with the result (``extra["ehr_context"]``)."""
        return {
            "status": self.status,
            "source": self.source,
            "patient_reference": self.patient_reference,
            "age_years": self.age_years,
            "sex": self.sex,
            "values": {
                k: {
                    "value": v.value,
                    "unit": v.unit,
                    "loinc": v.loinc,
                    "effective": v.effective.isoformat() if v.effective else None,
                    "reference": v.reference,
                    "source_unit": v.source_unit,
                }
                for k, v in self.values.items()
            },
            "conditions": dict(self.conditions),
            "medications": dict(self.medications),
            "problems": list(self.problems),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "EhrContext":
        return cls(
            status=data["status"],
            source=data.get("source"),
            patient_reference=data.get("patient_reference"),
            age_years=data.get("age_years"),
            sex=data.get("sex"),
            values={
                k: EhrValue(
                    name=k,
                    value=float(v["value"]),
                    unit=v["unit"],
                    loinc=v["loinc"],
                    effective=datetime.fromisoformat(v["effective"]) if v.get("effective") else None,
                    reference=v.get("reference"),
                    source_unit=v.get("source_unit"),
                )
                for k, v in (data.get("values") or {}).items()
            },
            conditions=dict(data.get("conditions") or {}),
            medications=dict(data.get("medications") or {}),
            problems=tuple(data.get("problems") or ()),
        )

    @classmethod
    def missing(cls, status: ContextStatus, problem: str, *, source: str | None = None) -> "EhrContext":
        """A context that holds nothing, saying why (the ECG is still analysed, ECG-only)."""
        return cls(status=status, problems=(problem,), source=source)
