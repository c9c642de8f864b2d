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

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

__all__ = [
    "EHR_VALUE_NAMES",
    "EHR_CONDITION_NAMES",
    "EHR_MEDICATION_NAMES",
    "EhrValue",
    "EhrContext",
    "ContextStatus",
    "LOINC",
    "SNOMED",
    "UCUM",
    "RXNORM",
    "ATC",
    "ICD10_SYSTEMS",
    "EHR_VALUE_LOINC",
    "EHR_PANEL_LOINC",
    "EHR_UNIT_FACTORS",
    "EHR_CONDITION_SNOMED",
    "EHR_CONDITION_ICD10",
    "EHR_MEDICATION_RXNORM",
    "EHR_MEDICATION_ATC",
    "EHR_MEDICATION_NAMES_MATCHED",
    "observation_loinc_codes",
    "parse_fhir_datetime",
    "age_at",
    "normalise_unit",
    "convert_unit",
    "latest_values",
    "condition_flags",
    "condition_history",
    "medication_classes",
    "medication_use",
    "context_from_resources",
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
        return bool(self.values or self.conditions or self.medications or self.age_years is not None or self.sex)

    def to_dict(self) -> dict[str, Any]:
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
    def from_dict(cls, data: dict[str, Any]) -> EhrContext:
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
    def missing(cls, status: ContextStatus, problem: str, *, source: str | None = None) -> EhrContext:
        """A context that holds nothing, saying why (the ECG is still analysed, ECG-only)."""
        return cls(status=status, problems=(problem,), source=source)


# =====================================================================================
# FHIR resources -> EhrContext (pure). Code tables first, then the functions.
# =====================================================================================

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
#: ICD-10-CM (US) and WHO ICD-10: many EHRs code problems in one of them, not SNOMED CT.
ICD10_SYSTEMS: tuple[str, ...] = ("http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10")

#: LOINC codes per numeric variable (the unit in valueQuantity decides any conversion).
EHR_VALUE_LOINC: dict[str, tuple[str, ...]] = {
    # NT-proBNP: mass/volume S/P, by immunoassay; moles/volume S/P and blood (pmol/L, converted)
    "nt_probnp": ("33762-6", "83107-3", "33763-4", "71425-3"),
    # BNP: mass/volume in serum or plasma, in blood
    "bnp": ("30934-4", "42637-9"),
    # troponin I / T (high-sensitivity first), serum/plasma and blood
    "troponin": ("89579-7", "67151-1", "10839-9", "6598-7", "42757-5", "48425-3", "6597-9", "49563-0"),
    "potassium": ("2823-3", "6298-4"),  # serum/plasma, blood
    "sodium": ("2951-2", "2947-0"),  # serum/plasma, blood
    # creatinine mass/volume S/P, in blood, moles/volume S/P (umol/L)
    "creatinine": ("2160-0", "38483-4", "14682-9"),
    # eGFR: MDRD, CKD-EPI 2009, CKD-EPI 2021 (race-free), MDRD non-black / black, CKD-EPI black
    "egfr": ("33914-3", "62238-1", "98979-8", "48642-3", "48643-1", "88293-6"),
    "hemoglobin": ("718-7",),
    "systolic_bp": ("8480-6",),
    "diastolic_bp": ("8462-4",),
    "heart_rate": ("8867-4",),
    "weight": ("29463-7", "3141-9"),  # body weight, body weight measured
    "height": ("8302-2",),
    "bmi": ("39156-5",),
}

#: Panels whose components carry variables (blood pressure panel, its older form).
EHR_PANEL_LOINC: tuple[str, ...] = ("85354-9", "55284-4")

_LOINC_VARIABLE: dict[str, str] = {code: name for name, codes in EHR_VALUE_LOINC.items() for code in codes}


def observation_loinc_codes() -> tuple[str, ...]:
    """Every LOINC code the Observation search asks for (variables and panels)."""
    return tuple(_LOINC_VARIABLE) + EHR_PANEL_LOINC


_MASS_CONC = {"pg/ml": 1.0, "ng/l": 1.0, "ng/ml": 1000.0, "ug/l": 1000.0, "mcg/l": 1000.0}
_MONOVALENT = {"mmol/l": 1.0, "meq/l": 1.0}
_EGFR = {
    u: 1.0
    for u in (
        "ml/min/{1.73_m2}",
        "ml/min/1.73m2",
        "ml/min/1.73_m2",
        "ml/min/{1.73m2}",
        "ml/min/1.73.m2",
        "ml/min/1.73m^2",
        "ml/min/1.73m²",
        "ml/min/1.73",
    )
}
_MMHG = {"mm[hg]": 1.0, "mmhg": 1.0, "kpa": 7.50062}

#: Factor from each accepted unit (lower-cased, no spaces, µ -> u) to the canonical unit.
EHR_UNIT_FACTORS: dict[str, dict[str, float]] = {
    # NT-proBNP 8457 g/mol, BNP-32 3464 g/mol: pmol/L x MW/1000 = pg/mL
    "nt_probnp": {**_MASS_CONC, "pmol/l": 8.457},
    "bnp": {**_MASS_CONC, "pmol/l": 3.464},
    "troponin": {**_MASS_CONC, "ng/dl": 10.0},
    "potassium": dict(_MONOVALENT),
    "sodium": dict(_MONOVALENT),
    # creatinine 113.12 g/mol: 1 mg/dL = 88.42 umol/L
    "creatinine": {"mg/dl": 1.0, "mg/l": 0.1, "umol/l": 1 / 88.42, "mmol/l": 1000 / 88.42},
    "egfr": _EGFR,
    # hemoglobin counted per Fe monomer (16 114 g/mol): 1 mmol/L = 1.6114 g/dL
    "hemoglobin": {"g/dl": 1.0, "g/l": 0.1, "mg/dl": 0.001, "mmol/l": 1.6114},
    "systolic_bp": dict(_MMHG),
    "diastolic_bp": dict(_MMHG),
    "heart_rate": {u: 1.0 for u in ("/min", "1/min", "{beats}/min", "{beat}/min", "beats/min", "beat/min", "bpm")},
    "weight": {
        "kg": 1.0,
        "g": 0.001,
        "[lb_av]": 0.45359237,
        "lb": 0.45359237,
        "lbs": 0.45359237,
        "[oz_av]": 0.028349523125,
    },
    "height": {"cm": 1.0, "m": 100.0, "mm": 0.1, "[in_i]": 2.54, "in": 2.54, "[ft_i]": 30.48},
    "bmi": {u: 1.0 for u in ("kg/m2", "kg/m^2", "kg/m²")},
}

#: SNOMED CT concept and the descendants sites commonly code (no terminology server here).
EHR_CONDITION_SNOMED: dict[str, frozenset[str]] = {
    "heart_failure": frozenset(
        {
            "84114007",  # heart failure
            "42343007",  # congestive heart failure
            "85232009",  # left heart failure
            "88805009",  # chronic congestive heart failure
            "417996009",  # systolic heart failure
            "418304008",  # diastolic heart failure
            "446221000",  # heart failure with normal ejection fraction
            "703272007",  # heart failure with reduced ejection fraction
            "788950000",  # heart failure with mid range ejection fraction
            "48447003",  # chronic heart failure
            "56675007",  # acute heart failure
            "10633002",  # acute congestive heart failure
            "128404006",  # right heart failure
            "367363000",  # right ventricular failure
        }
    ),
    "myocardial_infarction": frozenset(
        {
            "22298006",  # myocardial infarction
            "57054005",  # acute myocardial infarction
            "401303003",  # acute ST segment elevation myocardial infarction
            "401314000",  # acute non-ST segment elevation myocardial infarction
            "54329005",  # acute myocardial infarction of anterior wall
            "73795002",  # acute myocardial infarction of inferior wall
            "304914007",  # acute Q wave myocardial infarction
            "70422006",  # acute subendocardial infarction
            "233843008",  # silent myocardial infarction
            "1755008",  # old myocardial infarction
            "399211009",  # history of myocardial infarction (situation)
        }
    ),
    "atrial_fibrillation": frozenset(
        {
            "49436004",  # atrial fibrillation
            "282825002",  # paroxysmal atrial fibrillation
            "426749004",  # chronic atrial fibrillation
            "440059007",  # persistent atrial fibrillation
            "440028005",  # permanent atrial fibrillation
            "706923002",  # longstanding persistent atrial fibrillation
            "314208002",  # rapid atrial fibrillation
        }
    ),
    "hypertension": frozenset(
        {
            "38341003",  # hypertensive disorder
            "59621000",  # essential hypertension
            "1201005",  # benign essential hypertension
            "78975002",  # malignant essential hypertension
            "10725009",  # benign hypertension
            "70272006",  # malignant hypertension
            "31992008",  # secondary hypertension
            "56218007",  # systolic hypertension
            "48146000",  # diastolic hypertension
            "371125006",  # labile essential hypertension
        }
    ),
    "diabetes": frozenset(
        {
            "73211009",  # diabetes mellitus
            "44054006",  # type 2 diabetes mellitus
            "46635009",  # type 1 diabetes mellitus
            "8801005",  # secondary diabetes mellitus
        }
    ),
    "chronic_kidney_disease": frozenset(
        {
            "709044004",  # chronic kidney disease
            "431855005",  # CKD stage 1
            "431856006",  # CKD stage 2
            "433144002",  # CKD stage 3
            "700378005",  # CKD stage 3A
            "700379002",  # CKD stage 3B
            "431857002",  # CKD stage 4
            "433146000",  # CKD stage 5
            "46177005",  # end-stage renal disease
            "90688005",  # chronic renal failure syndrome
        }
    ),
}

#: ICD-10(-CM) code prefixes, dots removed (I50.9 -> I509). A code may set several flags:
#: I11.0 hypertensive heart disease with heart failure is hypertension and heart failure.
EHR_CONDITION_ICD10: dict[str, tuple[str, ...]] = {
    "heart_failure": ("I50", "I110", "I130", "I132", "I0981", "I9713"),
    "myocardial_infarction": ("I21", "I22", "I23", "I252"),
    # I48.3 / I48.4 / I48.92 are atrial flutter, not fibrillation
    "atrial_fibrillation": ("I480", "I481", "I482", "I4891"),
    "hypertension": ("I10", "I11", "I12", "I13", "I15", "I16"),
    "diabetes": ("E08", "E09", "E10", "E11", "E12", "E13", "E14"),
    "chronic_kidney_disease": ("N18", "I12", "I13"),
}

#: Condition clinicalStatus codes that count (a past MI is history, so resolved counts for it).
_ACTIVE_STATUSES = frozenset({"active", "recurrence", "relapse"})
_HISTORY_STATUSES: dict[str, frozenset[str]] = {
    "myocardial_infarction": _ACTIVE_STATUSES | {"inactive", "resolved", "remission"},
}
_REFUTED = frozenset({"refuted", "entered-in-error"})

#: RxNorm ingredient RXCUIs per medication class.
EHR_MEDICATION_RXNORM: dict[str, dict[str, str]] = {
    "loop_diuretic": {"4603": "furosemide", "1808": "bumetanide", "38413": "torsemide", "4109": "ethacrynic acid"},
    "beta_blocker": {
        "6918": "metoprolol",
        "20352": "carvedilol",
        "19484": "bisoprolol",
        "1202": "atenolol",
        "31555": "nebivolol",
        "8787": "propranolol",
        "6185": "labetalol",
        "7226": "nadolol",
        "9947": "sotalol",
    },
    "ace_inhibitor_or_arb": {
        "29046": "lisinopril",
        "3827": "enalapril",
        "35296": "ramipril",
        "1998": "captopril",
        "54552": "perindopril",
        "35208": "quinapril",
        "18867": "benazepril",
        "50166": "fosinopril",
        "38454": "trandolapril",
        "52175": "losartan",
        "69749": "valsartan",
        "214354": "candesartan",
        "83818": "irbesartan",
        "73494": "telmisartan",
        "321064": "olmesartan",
        "83515": "eprosartan",
    },
    "mineralocorticoid_antagonist": {"9997": "spironolactone", "298869": "eplerenone"},
}

#: Names matched in coding.display / text, for product codes (SCD/SBD) or uncoded drugs:
#: an RxNorm clinical drug's display names its ingredients ("furosemide 40 MG Oral Tablet").
EHR_MEDICATION_NAMES_MATCHED: dict[str, tuple[str, ...]] = {
    cls: tuple(sorted(set(codes.values()) | extra))
    for cls, codes, extra in (
        ("loop_diuretic", EHR_MEDICATION_RXNORM["loop_diuretic"], {"frusemide", "torasemide", "etacrynic acid"}),
        ("beta_blocker", EHR_MEDICATION_RXNORM["beta_blocker"], {"acebutolol", "pindolol"}),
        ("ace_inhibitor_or_arb", EHR_MEDICATION_RXNORM["ace_inhibitor_or_arb"], {"azilsartan", "sacubitril"}),
        ("mineralocorticoid_antagonist", EHR_MEDICATION_RXNORM["mineralocorticoid_antagonist"], {"finerenone"}),
    )
}

#: ATC prefixes: C03C high-ceiling diuretics, C07 beta blockers, C09A-D ACE inhibitors and
#: ARBs (plain and combined, C09DX04 sacubitril/valsartan; not C09X renin inhibitors),
#: C03DA aldosterone antagonists.
EHR_MEDICATION_ATC: dict[str, tuple[str, ...]] = {
    "loop_diuretic": ("C03C",),
    "beta_blocker": ("C07",),
    "ace_inhibitor_or_arb": ("C09A", "C09B", "C09C", "C09D"),
    "mineralocorticoid_antagonist": ("C03DA",),
}

_OK_OBSERVATION = frozenset({"final", "amended", "corrected", "preliminary"})
_NAME_PATTERNS: dict[str, re.Pattern[str]] = {
    cls: re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b", re.IGNORECASE)
    for cls, names in EHR_MEDICATION_NAMES_MATCHED.items()
}


# ----- small readers ---------------------------------------------------------------


def parse_fhir_datetime(text: Any) -> datetime | None:
    """A FHIR date/dateTime/instant as an aware UTC datetime (partial dates at their start).

    A date without a time (or a time without an offset, which FHIR forbids) is read as UTC.
    """
    if not isinstance(text, str) or not text:
        return None
    s = text.strip()
    try:
        if re.fullmatch(r"\d{4}", s):
            dt = datetime(int(s), 1, 1)
        elif re.fullmatch(r"\d{4}-\d{2}", s):
            dt = datetime(int(s[:4]), int(s[5:7]), 1)
        else:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.astimezone(UTC)
    except (ValueError, OverflowError):  # not a date, or one that leaves year 1-9999 in UTC
        return None


def age_at(birth_date: Any, when: datetime) -> float | None:
    """Age in years at ``when``; a partial birthDate (YYYY, YYYY-MM) counts from mid-period."""
    if not isinstance(birth_date, str):
        return None
    s = birth_date.strip()[:10]
    try:
        if re.fullmatch(r"\d{4}", s):
            born = date(int(s), 7, 2)
        elif re.fullmatch(r"\d{4}-\d{2}", s):
            born = date(int(s[:4]), int(s[5:7]), 15)
        else:
            born = date.fromisoformat(s)
    except ValueError:
        return None
    at = when.astimezone(UTC).date() if when.tzinfo else when.date()
    if born > at:
        return None
    return round((at - born).days / 365.2425, 2)


def normalise_unit(unit: str) -> str:
    return unit.strip().replace(" ", "").replace("µ", "u").replace("μ", "u").lower()


def convert_unit(variable: str, value: float, unit: str | None) -> float | None:
    """``value`` in ``unit`` -> the variable's canonical unit, or None when not convertible."""
    if unit is None:
        return None
    factor = EHR_UNIT_FACTORS.get(variable, {}).get(normalise_unit(unit))
    return None if factor is None else value * factor


def _codings(concept: Any) -> list[dict[str, Any]]:
    coding = concept.get("coding") if isinstance(concept, dict) else None
    return [c for c in coding if isinstance(c, dict)] if isinstance(coding, list) else []


def _status_code(concept: Any) -> str | None:
    for c in _codings(concept):
        code = c.get("code")
        if isinstance(code, str):
            return code
    return None


def _reference(resource: dict[str, Any]) -> str | None:
    rid = resource.get("id")
    return f"{resource.get('resourceType')}/{rid}" if rid else None


# ----- observations ----------------------------------------------------------------


@dataclass
class _Notes:
    """Counts of what was ignored, turned into plain-language problems at the end."""

    units: dict[tuple[str, str], int] = field(default_factory=dict)
    no_time: dict[str, int] = field(default_factory=dict)
    comparator: dict[str, int] = field(default_factory=dict)
    not_finite: dict[str, int] = field(default_factory=dict)
    med_references: int = 0

    def problems(self) -> list[str]:
        out = []
        for (name, unit), n in sorted(self.units.items()):
            out.append(
                f"{name}: unit {unit!r} not convertible to {EHR_VALUE_NAMES[name]}, "
                f"{n} value{'s' if n > 1 else ''} ignored"
            )
        for name, n in sorted(self.no_time.items()):
            out.append(f"{name}: {n} value{'s' if n > 1 else ''} without an effective time ignored")
        for name, n in sorted(self.not_finite.items()):
            out.append(f"{name}: {n} value{'s' if n > 1 else ''} not a finite number ignored")
        for name, _n in sorted(self.comparator.items()):
            out.append(f"{name}: latest value carries a comparator (< or >) and is taken at its bound")
        if self.med_references:
            out.append(
                f"MedicationStatement: {self.med_references} refer to a Medication resource "
                "without a code or display; not classified"
            )
        return out


def _observation_time(obs: dict[str, Any]) -> datetime | None:
    period = obs.get("effectivePeriod") or {}
    for text in (
        obs.get("effectiveDateTime"),
        obs.get("effectiveInstant"),
        period.get("start") if isinstance(period, dict) else None,
        period.get("end") if isinstance(period, dict) else None,
        obs.get("issued"),
    ):
        when = parse_fhir_datetime(text)
        if when is not None:
            return when
    return None


def _candidates(obs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(variable, loinc, valueQuantity) from the Observation and its components."""
    out = []
    components = obs.get("component")
    parts = [obs] + ([c for c in components if isinstance(c, dict)] if isinstance(components, list) else [])
    for part in parts:
        quantity = part.get("valueQuantity")
        if not isinstance(quantity, dict):
            continue
        for coding in _codings(part.get("code")):
            code = coding.get("code")
            if coding.get("system") == LOINC and isinstance(code, str) and code in _LOINC_VARIABLE:
                out.append((_LOINC_VARIABLE[coding["code"]], coding["code"], quantity))
                break
    return out


def _quantity_value(variable: str, quantity: dict[str, Any], notes: _Notes) -> tuple[float, str] | None:
    """(canonical value, source unit) or None; unconvertible units are counted in ``notes``."""
    raw = quantity.get("value")
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return None
    try:
        number = float(raw)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        notes.not_finite[variable] = notes.not_finite.get(variable, 0) + 1
        return None
    units = []
    if quantity.get("system") == UCUM and isinstance(quantity.get("code"), str):
        units.append(quantity["code"])
    if isinstance(quantity.get("unit"), str):
        units.append(quantity["unit"])
    if not units and isinstance(quantity.get("code"), str):
        units.append(quantity["code"])
    for unit in units:
        converted = convert_unit(variable, number, unit)
        if converted is not None and not math.isfinite(converted):  # finite, until the unit factor
            notes.not_finite[variable] = notes.not_finite.get(variable, 0) + 1
            return None
        if converted is not None:
            return converted, unit
    shown = units[0] if units else "(none)"
    notes.units[(variable, shown)] = notes.units.get((variable, shown), 0) + 1
    return None


def latest_values(
    observations: Iterable[dict[str, Any]], *, reference_time: datetime, window_days: int, notes: _Notes | None = None
) -> dict[str, EhrValue]:
    """The latest usable value per variable measured inside ``[t - window, t]``.

    Usable: status final/amended/corrected/preliminary, a valueQuantity in a unit that
    converts to the variable's canonical unit, and a time. Later values are ignored: the
    model sees what the EHR knew when the ECG was taken.
    """
    notes = notes if notes is not None else _Notes()
    try:
        start = reference_time - timedelta(days=window_days)
    except OverflowError:  # a window reaching before year 1: everything up to the ECG counts
        start = datetime.min.replace(tzinfo=UTC)
    best: dict[str, tuple[EhrValue, str | None]] = {}
    for obs in observations:
        status = obs.get("status") if isinstance(obs, dict) else None
        if not isinstance(status, str) or status not in _OK_OBSERVATION:
            continue
        candidates = _candidates(obs)
        if not candidates:
            continue
        when = _observation_time(obs)
        for variable, loinc, quantity in candidates:
            if when is None:
                notes.no_time[variable] = notes.no_time.get(variable, 0) + 1
                continue
            if not start <= when <= reference_time:
                continue
            got = _quantity_value(variable, quantity, notes)
            if got is None:
                continue
            if variable in best and best[variable][0].effective >= when:  # type: ignore[operator]
                continue
            value, unit = got
            canonical = EHR_VALUE_NAMES[variable]
            best[variable] = (
                EhrValue(
                    name=variable,
                    value=round(value, 6),
                    unit=canonical,
                    loinc=loinc,
                    effective=when,
                    reference=_reference(obs),
                    source_unit=None if normalise_unit(unit) == normalise_unit(canonical) else unit,
                ),
                quantity.get("comparator") if isinstance(quantity.get("comparator"), str) else None,
            )
    for variable, (_, comparator) in best.items():
        if comparator:
            notes.comparator[variable] = 1
    return {name: best[name][0] for name in EHR_VALUE_NAMES if name in best}


# ----- conditions ------------------------------------------------------------------


def condition_flags(concept: Any) -> set[str]:
    """Which EHR_CONDITION_NAMES a Condition.code means (SNOMED CT or ICD-10 codings)."""
    flags: set[str] = set()
    for coding in _codings(concept):
        code = coding.get("code")
        if not isinstance(code, str):
            continue
        system = coding.get("system")
        if system == SNOMED:
            flags.update(n for n, codes in EHR_CONDITION_SNOMED.items() if code.strip() in codes)
        elif system in ICD10_SYSTEMS:
            compact = code.replace(".", "").strip().upper()
            flags.update(n for n, prefixes in EHR_CONDITION_ICD10.items() if compact.startswith(prefixes))
    return flags


def _condition_time(cond: dict[str, Any]) -> datetime | None:
    period = cond.get("onsetPeriod")
    onset = parse_fhir_datetime(cond.get("onsetDateTime")) or (
        parse_fhir_datetime(period.get("start")) if isinstance(period, dict) else None
    )
    return onset or parse_fhir_datetime(cond.get("recordedDate"))


def condition_history(conditions: Iterable[dict[str, Any]], *, reference_time: datetime) -> dict[str, bool]:
    """Every EHR_CONDITION_NAMES key: True when a counting Condition says so, else False.

    Counting: clinicalStatus active/recurrence/relapse (MI: also inactive/resolved/remission)
    or absent, verificationStatus not refuted/entered-in-error, onset (else recordedDate)
    not after the ECG.
    """
    flags = dict.fromkeys(EHR_CONDITION_NAMES, False)
    for cond in conditions:
        if not isinstance(cond, dict) or _status_code(cond.get("verificationStatus")) in _REFUTED:
            continue
        names = condition_flags(cond.get("code"))
        if not names:
            continue
        when = _condition_time(cond)
        if when is not None and when > reference_time:
            continue
        clinical = _status_code(cond.get("clinicalStatus"))
        for name in names:
            if clinical is None or clinical in _HISTORY_STATUSES.get(name, _ACTIVE_STATUSES):
                flags[name] = True
    return flags


# ----- medications -----------------------------------------------------------------


def medication_classes(concept: Any) -> set[str]:
    """Which EHR_MEDICATION_NAMES a medication concept belongs to (RxNorm, ATC, or its name)."""
    classes: set[str] = set()
    texts = []
    if isinstance(concept, dict) and isinstance(concept.get("text"), str):
        texts.append(concept["text"])
    for coding in _codings(concept):
        code = coding.get("code")
        if isinstance(coding.get("display"), str):
            texts.append(coding["display"])
        if not isinstance(code, str):
            continue
        if coding.get("system") == RXNORM:
            classes.update(c for c, codes in EHR_MEDICATION_RXNORM.items() if code in codes)
        elif coding.get("system") == ATC:
            classes.update(c for c, prefixes in EHR_MEDICATION_ATC.items() if code.upper().startswith(prefixes))
    for text in texts:
        classes.update(c for c, pattern in _NAME_PATTERNS.items() if pattern.search(text))
    return classes


def _taken_at(stmt: dict[str, Any], when: datetime) -> bool:
    """active (and not started after the ECG), or completed/stopped over a period covering it."""
    raw_period = stmt.get("effectivePeriod")
    period: dict[str, Any] = raw_period if isinstance(raw_period, dict) else {}
    start = parse_fhir_datetime(stmt.get("effectiveDateTime")) or parse_fhir_datetime(period.get("start"))
    end = parse_fhir_datetime(period.get("end"))
    if start is not None and start > when:
        return False
    status = stmt.get("status")
    if status == "active":
        return end is None or end >= when
    if status in ("completed", "stopped"):
        return start is not None and end is not None and end >= when
    return False


def medication_use(
    statements: Iterable[dict[str, Any]], *, reference_time: datetime, notes: _Notes | None = None
) -> dict[str, bool]:
    """Every EHR_MEDICATION_NAMES key: True when a MedicationStatement says it was taken at ECG time."""
    notes = notes if notes is not None else _Notes()
    taken = dict.fromkeys(EHR_MEDICATION_NAMES, False)
    for stmt in statements:
        if not isinstance(stmt, dict) or not _taken_at(stmt, reference_time):
            continue
        concept = stmt.get("medicationCodeableConcept")
        if concept is None:
            ref = stmt.get("medicationReference")
            display = ref.get("display") if isinstance(ref, dict) else None
            if not isinstance(display, str):
                notes.med_references += 1
                continue
            concept = {"text": display}
        for cls in medication_classes(concept):
            taken[cls] = True
    return taken


# ----- the whole context -----------------------------------------------------------


def _in_utc(acquired_at: datetime | None) -> datetime | None:
    """``acquired_at`` in UTC (naive: this machine's zone); None when absent or not placeable in UTC."""
    if acquired_at is None:
        return None
    try:
        if acquired_at.tzinfo is None or acquired_at.utcoffset() is None:
            return acquired_at.astimezone().astimezone(UTC)
        return acquired_at.astimezone(UTC)
    except (ValueError, OverflowError):  # year 1 or 9999 pushed out of range by the offset
        return None


def context_from_resources(
    patient: dict[str, Any] | None,
    observations: Iterable[dict[str, Any]] | None,
    conditions: Iterable[dict[str, Any]] | None,
    medications: Iterable[dict[str, Any]] | None,
    *,
    acquired_at: datetime | None,
    window_days: int,
    source: str | None,
    status: ContextStatus = "complete",
    problems: Iterable[str] = (),
) -> EhrContext:
    """The EhrContext for one ECG from already-fetched resources.

    ``None`` for a resource list means "not asked or the query failed": those keys stay
    absent (not known). An empty list means the EHR answered with nothing: condition and
    medication flags are then present and False. ``acquired_at`` None uses now (and says so);
    a naive time is read in this machine's zone, as for the reports.
    """
    notes = _Notes()
    extra = list(problems)
    reference_time = _in_utc(acquired_at)
    if reference_time is None:
        reference_time = datetime.now(UTC)
        if acquired_at is None:
            extra.append("ECG acquisition time unknown: the window ends now")
        else:
            extra.append("ECG acquisition time out of range (year 1-9999 in UTC): the window ends now")
    if patient is None:
        return EhrContext(status="no_patient" if status == "complete" else status, problems=tuple(extra), source=source)
    gender = patient.get("gender")
    values = (
        latest_values(observations, reference_time=reference_time, window_days=window_days, notes=notes)
        if observations is not None
        else {}
    )
    flags = condition_history(conditions, reference_time=reference_time) if conditions is not None else {}
    drugs = medication_use(medications, reference_time=reference_time, notes=notes) if medications is not None else {}
    return EhrContext(
        status=status,
        patient_reference=_reference(patient),
        age_years=age_at(patient.get("birthDate"), reference_time),
        sex=gender if gender in ("male", "female", "other", "unknown") else None,
        values=values,
        conditions=flags,
        medications=drugs,
        problems=tuple(extra + notes.problems()),
        source=source,
    )
