"""The LVEF model's inputs: one feature row from ECG measurements, diagnosis probabilities and EHR context.

:func:`lvef_feature_row` is the ONLY place where model inputs are built; training
(``training.datasets.lvef``) and serving (``inference.lvef``) both call it, so a model
never sees inputs built differently from the ones it was trained on.

Inputs:

* ``measurement_features``: :meth:`inference.features.Measurements.features` (the dict the
  worker stores in ``extra["features"]``), or ``None`` / ``{}`` when the measurements failed;
* ``diagnosis``: ``{class code: probability}`` of the diagnosis model (NORM, MI, STTC, CD,
  HYP; :func:`diagnosis_probabilities` turns its :class:`~mapping.ecg.ModelOutput` into that),
  or ``None``;
* ``ehr``: the :class:`~mapping.ehr_context.EhrContext` (or ``None``).

Output: ``{feature name: float}`` in :data:`FEATURE_NAMES` order, ``NaN`` for anything
missing (the gradient-boosted trees route missing values themselves; nothing is imputed).
EHR values are kept raw, in the units of :data:`mapping.ehr_context.EHR_VALUE_NAMES`
(trees are invariant to monotone transforms such as a log, and raw values make the
attributions readable). Flags are 1 / 0 / NaN: a condition or medication is 1 when the
context says True, 0 when it says False and NaN when the context does not mention it
(``EhrContext`` documents "absent = not known"). ``sex_female`` is 1 for female, 0 for male,
NaN otherwise.

A source flagged ``units:zscore`` (the PTB-XL subset) has no millivolts, so every
amplitude feature (voltages, Q waves, ST, T inversion, fragmentation, low voltage, axis)
is NaN for it: the measurements module leaves them out, and this module does not invent them.

The LVEF tiers (:data:`LVEF_TIERS`, :func:`tier_index`): normal > 50 %, mildly reduced
40-50 % (both ends included), moderately reduced 30 % to < 40 %, severely reduced < 30 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ecgbridge.mapping.ecg import ModelOutput
from ecgbridge.mapping.ehr_context import EHR_CONDITION_NAMES, EHR_MEDICATION_NAMES, EHR_VALUE_NAMES, EhrContext

__all__ = [
    "FeatureSpec",
    "LvefTier",
    "LVEF_TIERS",
    "FEATURE_SPECS",
    "FEATURE_NAMES",
    "ECG_FEATURE_NAMES",
    "EHR_FEATURE_NAMES",
    "DIAGNOSIS_CLASSES",
    "FEATURES_SCHEMA_VERSION",
    "tier_index",
    "diagnosis_probabilities",
    "lvef_feature_row",
    "missing_context_notes",
]

#: Bumped whenever a feature's name, order or meaning changes (models record it in their manifest).
FEATURES_SCHEMA_VERSION = "1"

#: Diagnosis model classes whose probabilities are LVEF features, in feature order.
DIAGNOSIS_CLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")


@dataclass(frozen=True)
class FeatureSpec:
    """One model input: its name (the key in the row), where it comes from, its unit and a plain name."""

    name: str
    kind: Literal["ecg", "ehr"]
    unit: str
    display: str


@dataclass(frozen=True)
class LvefTier:
    """One LVEF tier: ``lower <= EF`` (``lower_inclusive``) and ``EF <= upper`` (``upper_inclusive``)."""

    index: int
    code: str
    display: str
    lower: float | None
    upper: float | None
    lower_inclusive: bool
    upper_inclusive: bool

    def contains(self, ef: float) -> bool:
        if self.lower is not None and (ef < self.lower or (ef == self.lower and not self.lower_inclusive)):
            return False
        if self.upper is not None and (ef > self.upper or (ef == self.upper and not self.upper_inclusive)):
            return False
        return True


#: Model output order (class index = tier index), from normal to severely reduced.
LVEF_TIERS: tuple[LvefTier, ...] = (
    LvefTier(0, "LVEF_GT50", "LVEF normal (> 50 %)", 50.0, None, False, True),
    LvefTier(1, "LVEF_40_50", "LVEF mildly reduced (40-50 %)", 40.0, 50.0, True, True),
    LvefTier(2, "LVEF_30_40", "LVEF moderately reduced (30 to < 40 %)", 30.0, 40.0, True, False),
    LvefTier(3, "LVEF_LT30", "LVEF severely reduced (< 30 %)", None, 30.0, True, False),
)


def tier_index(ef_percent: float) -> int:
    """The tier (0 = normal ... 3 = severely reduced) of an LVEF in percent."""
    if not math.isfinite(ef_percent):
        raise ValueError(f"LVEF {ef_percent!r} is not a number")
    for tier in LVEF_TIERS:
        if tier.contains(float(ef_percent)):
            return tier.index
    raise AssertionError(f"no tier for LVEF {ef_percent}")  # the tiers cover the real line


_VALUE_DISPLAY: dict[str, str] = {
    "nt_probnp": "NT-proBNP",
    "bnp": "BNP",
    "troponin": "Troponin (high-sensitivity)",
    "potassium": "Potassium",
    "sodium": "Sodium",
    "creatinine": "Creatinine",
    "egfr": "eGFR",
    "hemoglobin": "Haemoglobin",
    "systolic_bp": "Systolic blood pressure",
    "diastolic_bp": "Diastolic blood pressure",
    "heart_rate": "Heart rate (EHR vitals)",
    "weight": "Weight",
    "height": "Height",
    "bmi": "Body-mass index",
}
_CONDITION_DISPLAY: dict[str, str] = {
    "heart_failure": "heart failure",
    "myocardial_infarction": "myocardial infarction",
    "atrial_fibrillation": "atrial fibrillation",
    "hypertension": "hypertension",
    "diabetes": "diabetes",
    "chronic_kidney_disease": "chronic kidney disease",
}
_MEDICATION_DISPLAY: dict[str, str] = {
    "loop_diuretic": "loop diuretic",
    "beta_blocker": "beta blocker",
    "ace_inhibitor_or_arb": "ACE inhibitor or ARB",
    "mineralocorticoid_antagonist": "mineralocorticoid receptor antagonist",
}
_DIAGNOSIS_DISPLAY: dict[str, str] = {
    "NORM": "normal ECG",
    "MI": "myocardial infarction",
    "STTC": "ST/T change",
    "CD": "conduction disturbance",
    "HYP": "hypertrophy",
}

_ECG_SPECS: tuple[FeatureSpec, ...] = (
    FeatureSpec("ecg_heart_rate", "ecg", "/min", "Heart rate (ECG)"),
    FeatureSpec("pr_interval", "ecg", "ms", "PR interval"),
    FeatureSpec("qrs_duration", "ecg", "ms", "QRS duration"),
    FeatureSpec("qtc_fridericia", "ecg", "ms", "QTc (Fridericia)"),
    FeatureSpec("qrs_axis", "ecg", "deg", "QRS axis"),
    FeatureSpec("sokolow_lyon", "ecg", "mV", "Sokolow-Lyon voltage"),
    FeatureSpec("cornell", "ecg", "mV", "Cornell voltage"),
    FeatureSpec("q_wave_leads", "ecg", "leads", "Leads with pathological Q waves"),
    FeatureSpec("st_depression_max", "ecg", "mV", "Largest ST depression (J+60 ms, not aVR)"),
    FeatureSpec("st_elevation_max", "ecg", "mV", "Largest ST elevation (J+60 ms, not aVR)"),
    FeatureSpec("t_inversion_leads", "ecg", "leads", "Leads with T-wave inversion"),
    FeatureSpec("fragmented_qrs_leads", "ecg", "leads", "Leads with fragmented QRS"),
    FeatureSpec("low_voltage", "ecg", "1/0", "Low QRS voltage (limb or precordial)"),
    FeatureSpec("lbbb", "ecg", "1/0", "Left bundle branch block pattern"),
    FeatureSpec("rbbb", "ecg", "1/0", "Right bundle branch block pattern"),
    FeatureSpec("p_wave_inconsistent", "ecg", "1/0", "No consistent P wave (e.g. atrial fibrillation)"),
    *(
        FeatureSpec(f"p_{code}", "ecg", "probability", f"Diagnosis model: {_DIAGNOSIS_DISPLAY[code]}")
        for code in DIAGNOSIS_CLASSES
    ),
)

_EHR_SPECS: tuple[FeatureSpec, ...] = (
    FeatureSpec("age_years", "ehr", "years", "Age"),
    FeatureSpec("sex_female", "ehr", "1/0", "Sex (1 = female, 0 = male)"),
    *(FeatureSpec(name, "ehr", unit, _VALUE_DISPLAY.get(name, name)) for name, unit in EHR_VALUE_NAMES.items()),
    *(
        FeatureSpec(f"hx_{name}", "ehr", "1/0", f"History of {_CONDITION_DISPLAY.get(name, name.replace('_', ' '))}")
        for name in EHR_CONDITION_NAMES
    ),
    *(
        FeatureSpec(f"med_{name}", "ehr", "1/0", f"Takes {_MEDICATION_DISPLAY.get(name, name.replace('_', ' '))}")
        for name in EHR_MEDICATION_NAMES
    ),
)

#: Every feature, in the fixed model input order (ECG features first, then EHR variables).
FEATURE_SPECS: tuple[FeatureSpec, ...] = _ECG_SPECS + _EHR_SPECS
FEATURE_NAMES: tuple[str, ...] = tuple(s.name for s in FEATURE_SPECS)
#: The inputs of the ECG-only variant (a prefix of FEATURE_NAMES).
ECG_FEATURE_NAMES: tuple[str, ...] = tuple(s.name for s in _ECG_SPECS)
EHR_FEATURE_NAMES: tuple[str, ...] = tuple(s.name for s in _EHR_SPECS)

_NAN = float("nan")


def _num(value: Any) -> float:
    """A finite float or NaN (None, bools-as-None, strings and infinities are missing)."""
    if value is None or isinstance(value, bool):
        return _NAN
    try:
        x = float(value)
    except (TypeError, ValueError):
        return _NAN
    return x if math.isfinite(x) else _NAN


def _flag(value: bool | None) -> float:
    if value is None:
        return _NAN
    return 1.0 if value else 0.0


def _count(value: Any) -> float:
    return float(len(value)) if isinstance(value, (list, tuple)) else _NAN


def diagnosis_probabilities(output: ModelOutput | Mapping[str, float] | None) -> dict[str, float] | None:
    """``{code: probability}`` from the diagnosis model's output (or a mapping, passed through)."""
    if output is None:
        return None
    if isinstance(output, ModelOutput):
        return {f.code: float(f.probability) for f in output.findings}
    return {str(k): float(v) for k, v in output.items()}


def _ecg_part(mf: Mapping[str, Any]) -> dict[str, float]:
    st = mf.get("st_deviation")
    st_vals = [float(v) for k, v in st.items() if k != "aVR"] if isinstance(st, Mapping) and st else None
    lv_limb, lv_prec = mf.get("low_voltage_limb"), mf.get("low_voltage_precordial")
    if lv_limb is True or lv_prec is True:
        low_voltage = 1.0
    elif lv_limb is False and lv_prec is False:
        low_voltage = 0.0
    else:
        low_voltage = _NAN
    morph = mf.get("qrs_morphology")
    flags = mf.get("flags") or ()
    measured = mf.get("qrs_duration") is not None  # the median beat was delineated
    if "p_wave_inconsistent" in flags:
        p_incons = 1.0
    elif measured:
        p_incons = 0.0
    else:
        p_incons = _NAN
    return {
        "ecg_heart_rate": _num(mf.get("heart_rate")),
        "pr_interval": _num(mf.get("pr_interval")),
        "qrs_duration": _num(mf.get("qrs_duration")),
        "qtc_fridericia": _num(mf.get("qtc_fridericia")),
        "qrs_axis": _num(mf.get("qrs_axis")),
        "sokolow_lyon": _num(mf.get("sokolow_lyon")),
        "cornell": _num(mf.get("cornell")),
        "q_wave_leads": _count(mf.get("q_waves")),
        "st_depression_max": max(0.0, -min(st_vals)) if st_vals else _NAN,
        "st_elevation_max": max(0.0, max(st_vals)) if st_vals else _NAN,
        "t_inversion_leads": _count(mf.get("t_inversion")),
        "fragmented_qrs_leads": _count(mf.get("fragmented_qrs")),
        "low_voltage": low_voltage,
        "lbbb": _NAN if morph is None else float(morph == "LBBB"),
        "rbbb": _NAN if morph is None else float(morph == "RBBB"),
        "p_wave_inconsistent": p_incons,
    }


def _sex_female(sex: str | None) -> float:
    if sex is None:
        return _NAN
    s = str(sex).strip().lower()
    return 1.0 if s == "female" else 0.0 if s == "male" else _NAN


def lvef_feature_row(
    measurement_features: Mapping[str, Any] | None,
    diagnosis: Mapping[str, float] | ModelOutput | None,
    ehr: EhrContext | None,
) -> dict[str, float]:
    """The model input row (see the module docstring): ``{name: float}`` in FEATURE_NAMES order, NaN = missing."""
    row: dict[str, float] = dict(_ecg_part(measurement_features or {}))
    probs = diagnosis_probabilities(diagnosis) or {}
    for code in DIAGNOSIS_CLASSES:
        row[f"p_{code}"] = _num(probs.get(code))
    if ehr is not None:
        row["age_years"] = _num(ehr.age_years)
        row["sex_female"] = _sex_female(ehr.sex)
        for name in EHR_VALUE_NAMES:
            value = ehr.values.get(name)
            row[name] = _num(value.value) if value is not None else _NAN
        for name in EHR_CONDITION_NAMES:
            row[f"hx_{name}"] = _flag(ehr.conditions.get(name))
        for name in EHR_MEDICATION_NAMES:
            row[f"med_{name}"] = _flag(ehr.medications.get(name))
    return {name: row.get(name, _NAN) for name in FEATURE_NAMES}


def missing_context_notes(ehr: EhrContext | None) -> list[str]:
    """Plain-language notes on the EHR context the model did not get (no values, no PHI)."""
    if ehr is None:
        return ["no EHR context (none configured for this route): the ECG-only model was used"]
    if not ehr.has_data:
        return [f"the EHR gave nothing (status {ehr.status}): the ECG-only model was used", *ehr.problems]
    notes: list[str] = []
    absent = [_VALUE_DISPLAY.get(n, n) for n in EHR_VALUE_NAMES if n not in ehr.values]
    if ehr.age_years is None:
        absent.insert(0, "age")
    if _sex_female(ehr.sex) != _sex_female(ehr.sex):  # NaN: not male / female
        absent.insert(0, "sex")
    if absent:
        notes.append("not in the EHR: " + ", ".join(absent))
    if not ehr.conditions:
        notes.append("no condition history in the EHR")
    if not ehr.medications:
        notes.append("no medication list in the EHR")
    notes.extend(ehr.problems)
    return notes
