"""A SYNTHETIC LVEF cohort: real ECGs, simulated EHR variables and a simulated LVEF.

No data set pairing ECGs with echocardiographic LVEF is reachable here, so the shipped
LVEF model is trained on this cohort. Its labels are simulated: a model trained on them
learns the associations written below, not physiology, and means nothing clinically
until a site retrains it on its own ECG + echo data (``training.datasets.lvef`` format).

What is real: the ECGs (PTB-XL subset, the unlabelled PTB-XL records, the challenge
records that are not PTB-XL copies, or any folder of WFDB records), their measurements
(:func:`inference.features.measure`), the shipped diagnosis model's probabilities, PTB-XL's
age, sex, weight and height where its database gives them, and PTB-XL's SCP statements
(used as the "true" history behind the simulation where they exist). Everything else is
drawn per patient from a random generator seeded by ``(seed, sha256(patient_id))``, so a
cohort is reproducible and a patient's draws do not depend on the other rows.

1. Latent causes, per patient (real where the source gives them):

   ========================  ====================================================  =========
   cause                     source                                                share
   ========================  ====================================================  =========
   prior MI                  PTB-XL SCP statement of class MI; else Bernoulli(p_MI)  ~15-25 %
   anterior MI               SCP ASMI, AMI, ALMI, LMI, INJAS, INJAL                 subset
   LBBB                      SCP CLBBB / ILBBB; else the measured LBBB morphology   ~4 %
   wide QRS (not LBBB)       measured QRS >= 130 ms                                 ~5 %
   AF / flutter              SCP AFIB / AFLT; else Bernoulli(0.7) when no consistent
                             P wave was measured, Bernoulli(0.03) otherwise         ~15 %
   tachycardia               measured heart rate > 100 /min (or SCP STACH)          ~8 %
   low QRS voltage           SCP LVOLT; else the measured low-voltage flag          ~1 %
   Q-wave leads              measured (NaN on z-scored PTB-XL: no mV)               -
   age, sex                  PTB-XL; else age N(62, 14) clipped 18-95, sex 50/50    -
   CKD                       Bernoulli(sigmoid(-2.6 + 0.04 (age - 60)))             ~8 %
   diabetes                  Bernoulli(0.18 + 0.002 (age - 60))                     ~18 %
   hypertension              Bernoulli(clip(0.25 + 0.01 (age - 50), 0.1, 0.75))     ~35 %
   cardiomyopathy            Bernoulli(0.10), never recorded in the EHR: a cause    10 %
                             the ECG and the EHR see only through its effects
   ========================  ====================================================  =========

2. LVEF (%) = 58 + the effects below + N(0, 8), clipped to 10-80. Directions follow the
   literature on ECG and clinical predictors of LV systolic dysfunction (prior / anterior MI
   and Q waves, LBBB and QRS prolongation, AF, resting tachycardia, low voltage, older age,
   male sex, CKD and diabetes all go with a lower EF); the sizes are rough choices of ours,
   not estimates from data:

   ========================  ===========  ==========================================
   cause                     direction    simulated effect on LVEF (points)
   ========================  ===========  ==========================================
   prior MI                  lower        -10, anterior MI a further -4
   Q-wave leads              lower        -1.2 per lead (at most 5 leads)
   LBBB                      lower        -9
   QRS >= 130 ms, not LBBB   lower        -4
   AF / flutter              lower        -4
   heart rate > 100 /min     lower        -5
   low QRS voltage           lower        -4
   age                       lower        -0.10 per year over 55
   male sex                  lower        -2.5
   CKD                       lower        -3
   diabetes                  lower        -1.5
   cardiomyopathy            lower        -24
   ========================  ===========  ==========================================

3. EHR variables, drawn from the LVEF (dys = max(0, 55 - LVEF)) and the causes:

   =====================  =========================================================  ===============
   variable               simulated as                                               association
   =====================  =========================================================  ===============
   NT-proBNP (pg/mL)      10^(1.85 + 0.045 dys + 0.012 (age-50)+ + 0.35 CKD          strong, low EF
                          + 0.25 AF + N(0, 0.35))
   BNP (pg/mL)            NT-proBNP / 10^(0.75 + N(0, 0.15))                         strong
   troponin (ng/L)        10^(0.75 + 0.012 dys + 0.35 MI + 0.25 CKD + 0.006 (age-60)  moderate
                          + N(0, 0.3))
   eGFR, creatinine       eGFR 95 - 0.7 (age-40)+, x U(0.35, 0.75) with CKD,          weak
                          - 0.3 dys + N(0, 10); creatinine from CKD-EPI 2021
   sodium (mmol/L)        140 - 0.08 dys + N(0, 2.8)                                 weak
   potassium (mmol/L)     4.2 + 0.4 CKD + 0.01 dys + N(0, 0.4)                       weak
   haemoglobin (g/dL)     14.6 men / 13.2 women - 1.0 CKD - 0.03 dys + N(0, 1.3)     weak
   systolic BP (mm Hg)    124 + 14 HTN + 0.25 (age-60) - 0.45 (40 - LVEF)+ + N(0,15)  weak
   diastolic BP           0.5 systolic + 14 + N(0, 7)                                -
   heart rate (vitals)    the ECG's rate + N(0, 7)                                   via the ECG
   weight, height, BMI    PTB-XL where given; else N(84 / 71, 15) kg, N(176 / 163, 7)  none
   heart failure (hx)     Bernoulli(sigmoid(-3 + 0.12 dys))                          strong
   MI, AF, HTN, DM, CKD   the latent cause, recorded with probability 0.8-0.85       as above
   loop diuretic          Bernoulli(sigmoid(-3.2 + 2.5 HF + 0.05 dys + 0.8 CKD))     strong
   beta blocker           Bernoulli(sigmoid(-1.8 + 1.6 HF + 1.3 MI + 1.2 AF + 0.6 HTN)) moderate
   ACE inhibitor / ARB    Bernoulli(sigmoid(-1.6 + 1.6 HF + 1.4 HTN + 0.6 DM + 0.6 MI)) moderate
   MRA                    Bernoulli(sigmoid(-4 + 1.5 HF + 0.08 (40 - LVEF)+))        strong, low EF
   =====================  =========================================================  ===============

4. Missingness: 20 % of patients have no EHR at all (every EHR cell empty: the ECG-only
   case). The others: age and sex 98 %; NT-proBNP 45 % (+30 % when heart failure is
   recorded: ordered when suspected), BNP 20 %, troponin 45 %; potassium, sodium and
   creatinine together 85 % (eGFR with them 90 %); haemoglobin 80 %; blood pressure and
   heart rate 85 %; weight 70 %, height 50 %, BMI when both; the Condition query answered
   90 % (then a recorded condition is 1, an absent one 0 in 60 % and empty in 40 %, as a
   fetcher that reports only positives would give); medications fetched 60 % (then 1 / 0).

Splits: PTB-XL folds 9 and 10 (the shipped diagnosis model's validation and test folds,
so its probabilities there are not fitted) are ``test``; every other row is ``train`` or
``val`` (15 %) by sha256 of the patient id; the unlabelled PTB-XL records never go to
``test`` (their folds are unknown). Rows from ``--records`` folders get no split
(the manifest reader's patient-level hash split).

Output: the manifest CSV (``training.datasets.lvef`` format) and, beside it, the features
cache (``<stem>.features.json``) that ``training.datasets.lvef.load_features`` reads.

    python -m ecgbridge.training.lvef_synthetic --data /work/shared/data --out cohort/lvef_synthetic.csv [--seed 0]
    python -m ecgbridge.training.lvef_synthetic --records tests/fixtures/wfdb --replicas 40 --out /tmp/tiny.csv
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ecgbridge.inference.lvef_features import LVEF_TIERS, lvef_feature_row, tier_index
from ecgbridge.training.datasets.lvef import EHR_COLUMNS, LvefRecord, Measurer, cache_path_for, load_features

__all__ = [
    "SourceRecord",
    "ptbxl_sources",
    "unlabelled_sources",
    "challenge_sources",
    "folder_sources",
    "data_dir_sources",
    "generate_cohort",
    "main",
]

_MI_FALLBACK = frozenset(
    {"IMI", "ASMI", "AMI", "ALMI", "ILMI", "LMI", "PMI", "IPLMI", "IPMI", "INJAS", "INJAL", "INJIN", "INJLA", "INJIL"}
)
_ANTERIOR = frozenset({"ASMI", "AMI", "ALMI", "LMI", "INJAS", "INJAL"})


@dataclass(frozen=True)
class SourceRecord:
    """One real ECG and what its source says about the patient (None = not given)."""

    path: Path  # the .hea file
    patient_id: str
    source: str  # ptbxl | ptbxl-unlabelled | challenge | folder
    age: float | None = None
    sex: str | None = None  # male | female
    weight: float | None = None
    height: float | None = None
    scp: frozenset[str] | None = None  # PTB-XL SCP codes (labelled records only)
    mi_codes: frozenset[str] = _MI_FALLBACK
    fold: int | None = None


def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def ptbxl_sources(ptbxl_dir: Path) -> list[SourceRecord]:
    """The labelled PTB-XL records of ``ptbxl_dir`` (ptbxl_database.csv, scp_statements.csv, records100)."""
    import pandas as pd

    db = pd.read_csv(ptbxl_dir / "ptbxl_database.csv")
    mi_codes = _MI_FALLBACK
    stmts = ptbxl_dir / "scp_statements.csv"
    if stmts.is_file():
        s = pd.read_csv(stmts, index_col=0)
        mi_codes = frozenset(str(k) for k in s.index[s["diagnostic_class"] == "MI"])
    out: list[SourceRecord] = []
    for row in db.itertuples(index=False):
        hea = ptbxl_dir / f"{row.filename_lr}.hea"
        if not hea.is_file():
            continue
        age = _num(row.age)
        if age is not None and age >= 300:  # PTB-XL writes 300 for ages over 89
            age = 90.0
        sex = {0: "male", 1: "female"}.get(int(row.sex)) if _num(row.sex) is not None else None
        pid = _num(row.patient_id)
        out.append(
            SourceRecord(
                path=hea,
                patient_id=f"ptbxl-{int(pid) if pid is not None else 'ecg' + str(row.ecg_id)}",
                source="ptbxl",
                age=age,
                sex=sex,
                weight=_num(row.weight),
                height=_num(row.height),
                scp=frozenset(ast.literal_eval(str(row.scp_codes))),
                mi_codes=mi_codes,
                fold=int(row.strat_fold) if _num(row.strat_fold) is not None else None,
            )
        )
    return out


def unlabelled_sources(folder: Path) -> list[SourceRecord]:
    """Records listed in ``folder/RECORDS`` (no metadata: age and sex are simulated)."""
    out = []
    for name in (folder / "RECORDS").read_text().split():
        hea = folder / f"{name}.hea"
        if hea.is_file():
            out.append(SourceRecord(path=hea, patient_id=f"unl-{Path(name).name}", source="ptbxl-unlabelled"))
    return out


def _header_age_sex(hea: Path) -> tuple[float | None, str | None]:
    age = sex = None
    for line in hea.read_text(errors="replace").splitlines():
        m = re.match(r"#\s*(Age|Sex)\s*:\s*(.+)", line.strip(), re.I)
        if m and m.group(1).lower() == "age":
            age = _num(m.group(2))
        elif m:
            sex = {"male": "male", "m": "male", "female": "female", "f": "female"}.get(m.group(2).strip().lower())
    return age, sex


def folder_sources(folder: Path, *, source: str = "folder", skip_prefix: tuple[str, ...] = ()) -> list[SourceRecord]:
    """Every WFDB header in ``folder`` (sorted), age and sex from ``# Age:`` / ``# Sex:`` comments."""
    out = []
    for hea in sorted(folder.glob("*.hea")):
        if hea.stem.startswith(skip_prefix):
            continue
        age, sex = _header_age_sex(hea)
        out.append(SourceRecord(path=hea, patient_id=f"{source}-{hea.stem}", source=source, age=age, sex=sex))
    return out


def challenge_sources(folder: Path) -> list[SourceRecord]:
    """Challenge records that are not copies of PTB-XL (``HR*`` records are skipped: they may be in the subset)."""
    return folder_sources(folder, source="challenge", skip_prefix=("HR",))


def data_dir_sources(data_dir: Path) -> list[SourceRecord]:
    """PTB-XL subset + unlabelled + challenge records under a shared data directory (those present)."""
    out: list[SourceRecord] = []
    if (data_dir / "ptbxl-subset" / "ptbxl_database.csv").is_file():
        out += ptbxl_sources(data_dir / "ptbxl-subset")
    if (data_dir / "ptbxl-unlabelled" / "RECORDS").is_file():
        out += unlabelled_sources(data_dir / "ptbxl-unlabelled")
    if (data_dir / "challenge" / "cinc2021").is_dir():
        out += challenge_sources(data_dir / "challenge" / "cinc2021")
    if not out:
        raise FileNotFoundError(f"no ptbxl-subset, ptbxl-unlabelled or challenge/cinc2021 data under {data_dir}")
    return out


# --------------------------------------------------------------------------- simulation


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bucket(patient_id: str) -> int:
    return int(hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:8], 16) % 100


def _patient_rng(seed: int, patient_id: str) -> np.random.Generator:
    h = int(hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:16], 16)
    return np.random.default_rng([seed, h])


def _creatinine_from_egfr(egfr: float, age: float, female: bool) -> float:
    """Serum creatinine (mg/dL) for which CKD-EPI 2021 (race-free) gives ``egfr``."""
    kappa, alpha, f = (0.7, -0.241, 1.012) if female else (0.9, -0.302, 1.0)
    ratio = egfr / (142.0 * 0.9938**age * f)  # = min(s, 1)^alpha * max(s, 1)^-1.2, s = scr / kappa
    s = ratio ** (1.0 / alpha) if ratio >= 1.0 else ratio ** (-1.0 / 1.2)
    return cast(float, kappa * s)  # float ** float is Any in typeshed (a negative base gives complex)


def _egfr_ckd_epi(scr: float, age: float, female: bool) -> float:
    kappa, alpha, f = (0.7, -0.241, 1.012) if female else (0.9, -0.302, 1.0)
    s = scr / kappa
    return cast(float, 142.0 * min(s, 1.0) ** alpha * max(s, 1.0) ** -1.2 * 0.9938**age * f)  # as above


def _fmt(x: float | None, digits: int) -> str:
    if x is None:
        return ""
    return f"{x:.{digits}f}"


def simulate_patient(
    src: SourceRecord, ecg_row: dict[str, float], *, seed: int, patient_id: str, no_ehr_rate: float = 0.20
) -> tuple[float, dict[str, str], dict[str, Any]]:
    """(LVEF %, EHR cells for the manifest, latent causes) for one patient (see the module docstring)."""
    rng = _patient_rng(seed, patient_id)
    u = rng.random
    labelled = src.scp is not None
    scp = src.scp or frozenset()  # read only when labelled
    p = {c: ecg_row.get(f"p_{c}", float("nan")) for c in ("MI", "CD", "HYP")}

    def meas(name: str) -> float | None:
        v = ecg_row.get(name, float("nan"))
        return None if v != v else float(v)

    age = src.age if src.age is not None else float(np.clip(rng.normal(62, 14), 18, 95))
    sex = src.sex or ("female" if u() < 0.5 else "male")
    female = sex == "female"
    pmi = p["MI"] if p["MI"] == p["MI"] else 0.1
    mi = bool(scp & src.mi_codes) if labelled else bool(u() < float(np.clip(pmi, 0.02, 0.95)))
    anterior = bool(scp & _ANTERIOR) if labelled else bool(mi and u() < 0.4)
    lbbb = bool(scp & {"CLBBB", "ILBBB"}) if labelled else meas("lbbb") == 1.0
    qrs = meas("qrs_duration")
    wide = (qrs is not None and qrs >= 130.0) and not lbbb
    incons = meas("p_wave_inconsistent") == 1.0
    af = bool(scp & {"AFIB", "AFLT"}) if labelled else bool(u() < (0.7 if incons else 0.03))
    hr = meas("ecg_heart_rate")
    tachy = (hr is not None and hr > 100.0) or (labelled and "STACH" in scp)
    lowv = bool("LVOLT" in scp) if labelled else meas("low_voltage") == 1.0
    qleads = min(meas("q_wave_leads") or 0.0, 5.0)
    ckd = bool(u() < _sigmoid(-2.6 + 0.04 * (age - 60)))
    dm = bool(u() < 0.18 + 0.002 * (age - 60))
    htn = bool(u() < float(np.clip(0.25 + 0.01 * (age - 50), 0.1, 0.75)))
    cmp_ = bool(u() < 0.10)

    ef = (
        58.0
        - 10.0 * mi
        - 4.0 * anterior
        - 1.2 * qleads
        - 9.0 * lbbb
        - 4.0 * wide
        - 4.0 * af
        - 5.0 * tachy
        - 4.0 * lowv
        - 0.10 * max(0.0, age - 55)
        - 2.5 * (not female)
        - 3.0 * ckd
        - 1.5 * dm
        - 24.0 * cmp_
        + rng.normal(0.0, 8.0)
    )
    ef = float(np.clip(ef, 10.0, 80.0))
    dys = max(0.0, 55.0 - ef)

    # EHR values (drawn whether or not they are kept, so missingness does not shift other draws)
    ntp = float(
        np.clip(
            10 ** (1.85 + 0.045 * dys + 0.012 * max(0.0, age - 50) + 0.35 * ckd + 0.25 * af + rng.normal(0, 0.35)),
            5,
            35000,
        )
    )
    bnp = float(np.clip(ntp / 10 ** (0.75 + rng.normal(0, 0.15)), 2, 5000))
    trop = float(
        np.clip(10 ** (0.75 + 0.012 * dys + 0.35 * mi + 0.25 * ckd + 0.006 * (age - 60) + rng.normal(0, 0.3)), 1, 5000)
    )
    egfr = 95.0 - 0.7 * max(0.0, age - 40)
    if ckd:
        egfr *= rng.uniform(0.35, 0.75)
    egfr = float(np.clip(egfr - 0.3 * dys + rng.normal(0, 10), 5, 130))
    creat = round(_creatinine_from_egfr(egfr, age, female), 2)
    egfr = _egfr_ckd_epi(max(creat, 0.1), age, female)
    sodium = 140.0 - 0.08 * dys + rng.normal(0, 2.8)
    potassium = 4.2 + 0.4 * ckd + 0.01 * dys + rng.normal(0, 0.4)
    hb = (13.2 if female else 14.6) - 1.0 * ckd - 0.03 * dys - 0.01 * max(0.0, age - 60) + rng.normal(0, 1.3)
    sbp = 124 + 14 * htn + 0.25 * (age - 60) - 0.45 * max(0.0, 40 - ef) + rng.normal(0, 15)
    dbp = 0.5 * sbp + 14 + rng.normal(0, 7)
    hr_v = (hr if hr is not None else 75 + 10 * af + 0.3 * dys) + rng.normal(0, 7)
    weight = src.weight if src.weight is not None else float(np.clip(rng.normal(71 if female else 84, 15), 38, 180))
    height = src.height if src.height is not None else float(np.clip(rng.normal(163 if female else 176, 7), 140, 205))
    hf = bool(u() < _sigmoid(-3.0 + 0.12 * dys))
    coded = {
        "heart_failure": hf,
        "myocardial_infarction": mi and u() < 0.8,
        "atrial_fibrillation": af and u() < 0.85,
        "hypertension": htn and u() < 0.85,
        "diabetes": dm and u() < 0.85,
        "chronic_kidney_disease": ckd and u() < 0.8,
    }
    meds = {
        "loop_diuretic": bool(u() < _sigmoid(-3.2 + 2.5 * hf + 0.05 * dys + 0.8 * ckd)),
        "beta_blocker": bool(u() < _sigmoid(-1.8 + 1.6 * hf + 1.3 * mi + 1.2 * af + 0.6 * htn)),
        "ace_inhibitor_or_arb": bool(u() < _sigmoid(-1.6 + 1.6 * hf + 1.4 * htn + 0.6 * dm + 0.6 * mi)),
        "mineralocorticoid_antagonist": bool(u() < _sigmoid(-4.0 + 1.5 * hf + 0.08 * max(0.0, 40 - ef))),
    }

    cells = {c: "" for c in EHR_COLUMNS}
    has_ehr = u() >= no_ehr_rate
    keep = {k: u() for k in ("demo", "ntp", "bnp", "trop", "panel", "egfr", "hb", "bp", "hr", "w", "h", "cond", "med")}
    cond_blank = {c: u() for c in coded}
    latent = {
        "mi": mi,
        "anterior_mi": anterior,
        "lbbb": lbbb,
        "wide_qrs": wide,
        "af": af,
        "tachycardia": tachy,
        "low_voltage": lowv,
        "ckd": ckd,
        "diabetes": dm,
        "hypertension": htn,
        "cardiomyopathy": cmp_,
        "age": age,
        "sex": sex,
        "has_ehr": has_ehr,
    }
    if not has_ehr:
        return round(ef, 1), cells, latent
    if keep["demo"] < 0.98:
        cells["age_years"] = _fmt(age, 0)
        cells["sex"] = sex
    if keep["ntp"] < 0.45 + 0.30 * hf:
        cells["nt_probnp"] = _fmt(ntp, 0)
    if keep["bnp"] < 0.20:
        cells["bnp"] = _fmt(bnp, 0)
    if keep["trop"] < 0.45:
        cells["troponin"] = _fmt(trop, 1)
    if keep["panel"] < 0.85:
        cells["potassium"] = _fmt(potassium, 1)
        cells["sodium"] = _fmt(sodium, 0)
        cells["creatinine"] = _fmt(creat, 2)
        if keep["egfr"] < 0.90:
            cells["egfr"] = _fmt(egfr, 0)
    if keep["hb"] < 0.80:
        cells["hemoglobin"] = _fmt(hb, 1)
    if keep["bp"] < 0.85:
        cells["systolic_bp"] = _fmt(sbp, 0)
        cells["diastolic_bp"] = _fmt(dbp, 0)
    if keep["hr"] < 0.85:
        cells["heart_rate"] = _fmt(hr_v, 0)
    if keep["w"] < 0.70:
        cells["weight"] = _fmt(weight, 1)
    if keep["h"] < 0.50:
        cells["height"] = _fmt(height, 0)
    if cells["weight"] and cells["height"]:
        cells["bmi"] = _fmt(weight / (height / 100.0) ** 2, 1)
    if keep["cond"] < 0.90:
        for c, present in coded.items():
            if present:
                cells[f"hx_{c}"] = "1"
            elif cond_blank[c] < 0.6:
                cells[f"hx_{c}"] = "0"
    if keep["med"] < 0.60:
        for m, taken in meds.items():
            cells[f"med_{m}"] = "1" if taken else "0"
    return round(ef, 1), cells, latent


def _split_for(src: SourceRecord, patient_id: str) -> str:
    if src.source == "folder":
        return ""
    if src.source == "ptbxl" and src.fold in (9, 10):
        return "test"
    return "val" if _bucket(patient_id) < 15 else "train"


def generate_cohort(
    sources: Sequence[SourceRecord],
    out_csv: Path,
    *,
    seed: int = 0,
    replicas: int = 1,
    measurer: Measurer | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Write the manifest CSV and its features cache; returns a summary (rows, tiers, EHR share, sources)."""
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    base = out_csv.resolve().parent
    keyed = [(Path(os.path.relpath(s.path.resolve(), base)).as_posix(), s) for s in sources]
    pseudo = [
        LvefRecord(
            line=i + 2,
            ecg_key=k,
            ecg_path=s.path,
            lvef_percent=60.0,
            tier=0,
            patient_id=s.patient_id,
            split="",
            ehr=None,
        )
        for i, (k, s) in enumerate(keyed)
    ]
    key = None
    if measurer is None:
        from ecgbridge.training.datasets.lvef import _default_measurer

        measurer, key = _default_measurer()
    feats = load_features(pseudo, cache_path_for(out_csv), measurer=measurer, key=key, progress=progress)
    header = ["ecg_path", "lvef_percent", "patient_id", "split", "source", *EHR_COLUMNS]
    tiers: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    n_ehr = 0
    latent_counts: Counter[str] = Counter()
    rows = 0
    with out_csv.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for k, src in keyed:
            f = feats[k]
            ecg_row = lvef_feature_row(f.get("features") or {}, f.get("diagnosis"), None)
            for r in range(replicas):
                pid = src.patient_id if replicas == 1 else f"{src.patient_id}-r{r}"
                ef, cells, latent = simulate_patient(src, ecg_row, seed=seed, patient_id=pid)
                w.writerow([k, f"{ef:.1f}", pid, _split_for(src, pid), src.source, *(cells[c] for c in EHR_COLUMNS)])
                tiers[LVEF_TIERS[tier_index(ef)].code] += 1
                by_source[src.source] += 1
                n_ehr += int(latent["has_ehr"])
                latent_counts.update(k2 for k2, v in latent.items() if v is True)
                rows += 1
    return {
        "rows": rows,
        "tiers": dict(tiers),
        "sources": dict(by_source),
        "with_ehr": n_ehr,
        "seed": seed,
        "replicas": replicas,
        "latent": dict(latent_counts),
        "csv": str(out_csv),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ecgbridge.training.lvef_synthetic", description=__doc__.split("\n\n")[0]
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="shared data dir (ptbxl-subset, ptbxl-unlabelled, challenge/cinc2021)")
    src.add_argument("--records", type=Path, help="a folder of WFDB records (e.g. tests/fixtures/wfdb)")
    ap.add_argument("--out", type=Path, required=True, help="manifest CSV to write (cache beside it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicas", type=int, default=1, help="simulated patients per ECG (tiny test cohorts)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N ECGs")
    args = ap.parse_args(argv)
    sources = data_dir_sources(args.data) if args.data else folder_sources(args.records)
    if args.limit:
        sources = sources[: args.limit]
    summary = generate_cohort(
        sources,
        args.out,
        seed=args.seed,
        replicas=args.replicas,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    print(
        f"wrote {summary['rows']} rows to {args.out}: tiers {summary['tiers']}, with EHR {summary['with_ehr']}, "
        f"sources {summary['sources']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
