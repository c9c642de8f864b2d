"""The ECG + clinical-data manifest (``docs/clinical-manifest.md``): format, checks and converters.

One JSON Lines file describes ECGs and the clinical variables measured around them, so
that PTB-XL's biometrics, MIMIC-IV-ECG with MIMIC-IV labs and a site's own export all
reach the knowledge-transfer recipe (``training.kt``) the same way::

    {"format": "ecgbridge-clinical-manifest", "version": 1, "ecg_root": "/data/ptbxl"}
    {"ecg_id": "ptbxl-9", "patient_id": "18792", "ecg_path": "records100/00000/00009_lr",
     "ecg_time": "1984-12-08T09:44:43", "split": "10",
     "variables": [{"loinc": "30525-0", "value": 55, "unit": "a", "time": "1984-12-08T09:44:43"}]}

The first line (header) is optional; ``ecg_root`` defaults to the manifest's folder and
``ecg_path`` is a WFDB record path (no extension) relative to it, or absolute. Values are
converted to each variable's canonical UCUM unit by a small table (``UNIT_FACTORS``); a
unit the table does not know is refused with the variable named. Rows whose ECG file is
absent are reported and left out; a patient in two splits is refused; a variable missing
in every row is dropped with a warning (``clinical_matrix``).

Converters: ``from_ptbxl`` (age, sex, height, weight, BMI derived from the last two) and
``from_mimic_iv_ecg`` (``record_list.csv``, ``machine_measurements.csv``, the WFDB files,
plus a MIMIC-IV ``labevents``-like CSV and optionally ``patients.csv``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "VARIABLES",
    "ABNORMALITIES",
    "MIMIC_ITEMID_LOINC",
    "UNIT_FACTORS",
    "ClinicalDataError",
    "Variable",
    "Abnormality",
    "Measurement",
    "ManifestRow",
    "ClinicalManifest",
    "EHR_CONTEXT_LOINC",
    "convert_unit",
    "measurements_from_ehr_context",
    "read_manifest",
    "write_manifest",
    "check_split_disjoint",
    "clinical_matrix",
    "abnormality_targets",
    "patient_fold",
    "from_ptbxl",
    "from_mimic_iv_ecg",
]

log = logging.getLogger(__name__)

FORMAT = "ecgbridge-clinical-manifest"
VERSION = 1


class ClinicalDataError(ValueError):
    """The clinical manifest or its inputs are wrong (unknown unit, patient in two splits, bad row)."""


@dataclass(frozen=True)
class Variable:
    """A clinical variable: LOINC code, short name, canonical UCUM unit, plausible range (canonical unit)."""

    loinc: str
    name: str
    display: str
    unit: str
    low: float
    high: float


#: The variables known by LOINC code. Others are kept in the manifest but not used for training.
VARIABLES: dict[str, Variable] = {
    v.loinc: v
    for v in (
        Variable("30525-0", "age", "Age", "a", 0.0, 120.0),
        Variable("46098-0", "sex_male", "Sex (1 male, 0 female)", "1", 0.0, 1.0),
        Variable("8302-2", "height", "Body height", "cm", 40.0, 250.0),
        Variable("29463-7", "weight", "Body weight", "kg", 2.0, 400.0),
        Variable("39156-5", "bmi", "Body mass index", "kg/m2", 8.0, 100.0),
        Variable("2823-3", "potassium", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 1.0, 10.0),
        Variable("2951-2", "sodium", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 90.0, 200.0),
        Variable("2160-0", "creatinine", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.05, 30.0),
        Variable("718-7", "hemoglobin", "Hemoglobin [Mass/volume] in Blood", "g/dL", 2.0, 25.0),
        Variable("33762-6", "nt_probnp", "NT-proBNP [Mass/volume] in Serum or Plasma", "pg/mL", 0.0, 100000.0),
        Variable("6598-7", "troponin_t", "Troponin T.cardiac [Mass/volume] in Serum or Plasma", "ng/mL", 0.0, 100.0),
        Variable("8480-6", "systolic_bp", "Systolic blood pressure", "mm[Hg]", 40.0, 300.0),
        Variable("8462-4", "diastolic_bp", "Diastolic blood pressure", "mm[Hg]", 20.0, 200.0),
    )
}
_BY_NAME = {v.name: v for v in VARIABLES.values()}

#: (LOINC, unit as written) -> factor to the canonical unit. Units are matched case-sensitively
#: first (UCUM is case-sensitive), then case-insensitively with spaces removed (what lab systems write).
UNIT_FACTORS: dict[tuple[str, str], float] = {
    ("30525-0", "a"): 1.0,
    ("30525-0", "yr"): 1.0,
    ("30525-0", "years"): 1.0,
    ("30525-0", "mo"): 1 / 12,
    ("46098-0", "1"): 1.0,
    ("8302-2", "cm"): 1.0,
    ("8302-2", "m"): 100.0,
    ("8302-2", "[in_i]"): 2.54,
    ("8302-2", "in"): 2.54,
    ("29463-7", "kg"): 1.0,
    ("29463-7", "g"): 0.001,
    ("29463-7", "[lb_av]"): 0.45359237,
    ("29463-7", "lb"): 0.45359237,
    ("39156-5", "kg/m2"): 1.0,
    ("39156-5", "kg/m^2"): 1.0,
    ("2823-3", "mmol/L"): 1.0,
    ("2823-3", "meq/L"): 1.0,  # monovalent: 1 mEq = 1 mmol
    ("2951-2", "mmol/L"): 1.0,
    ("2951-2", "meq/L"): 1.0,
    ("2160-0", "mg/dL"): 1.0,
    ("2160-0", "umol/L"): 1 / 88.42,
    ("718-7", "g/dL"): 1.0,
    ("718-7", "g/L"): 0.1,
    ("718-7", "mmol/L"): 1.611,
    ("33762-6", "pg/mL"): 1.0,
    ("33762-6", "ng/L"): 1.0,
    ("6598-7", "ng/mL"): 1.0,
    ("6598-7", "ug/L"): 1.0,
    ("6598-7", "ng/L"): 0.001,
    ("8480-6", "mm[Hg]"): 1.0,
    ("8480-6", "mmHg"): 1.0,
    ("8480-6", "kPa"): 7.50062,
    ("8462-4", "mm[Hg]"): 1.0,
    ("8462-4", "mmHg"): 1.0,
    ("8462-4", "kPa"): 7.50062,
}

#: The EHR context ecgbridge stores with a result (``mapping.ehr_context``: variables by name, each in
#: that module's canonical unit, with the LOINC code the Observation carried) -> the manifest's
#: variable of the same quantity. The EHR context lumps troponin I and T as "troponin": only a
#: troponin T code maps to 6598-7 (``EHR_TROPONIN_T``: serum/plasma, and the high-sensitivity assay
#: whose 14 ng/L upper reference limit is the 0.014 ng/mL cut-off below); troponin I, eGFR, BNP and
#: heart rate (which the ECG itself measures) keep their own code and are not used.
EHR_CONTEXT_LOINC: dict[str, str] = {
    "potassium": "2823-3",
    "sodium": "2951-2",
    "creatinine": "2160-0",
    "hemoglobin": "718-7",
    "nt_probnp": "33762-6",
    "weight": "29463-7",
    "height": "8302-2",
    "bmi": "39156-5",
    "systolic_bp": "8480-6",
    "diastolic_bp": "8462-4",
}
EHR_TROPONIN_T: tuple[str, ...] = ("6598-7", "67151-1")
#: Ages above this are written as it (PTB-XL's training ages stop at 90; Safe Harbor aggregates ages over 89).
AGE_CAP = 90.0
_UNIT_LOOSE = {(loinc, unit.lower().replace(" ", "")): f for (loinc, unit), f in UNIT_FACTORS.items()}

#: MIMIC-IV ``labevents.itemid`` -> LOINC, for the labs above (MIMIC-IV v2 ``d_labitems`` has no
#: LOINC column). Verify against the site's ``d_labitems`` before use; a ``loinc`` column wins.
MIMIC_ITEMID_LOINC: dict[int, str] = {
    50971: "2823-3",  # Potassium, blood chemistry
    50983: "2951-2",  # Sodium
    50912: "2160-0",  # Creatinine
    51222: "718-7",  # Hemoglobin, hematology
    50963: "33762-6",  # NTproBNP
    51003: "6598-7",  # Troponin T
}


@dataclass(frozen=True)
class Abnormality:
    """A binary clinical abnormality predicted from the ECG embedding (stage 3)."""

    code: str
    display: str
    loinc: str
    above: float | None = None  # abnormal when value > above
    below: float | None = None  # or value < below

    def of(self, value: float) -> float:
        if math.isnan(value):
            return math.nan
        high = self.above is not None and value > self.above
        low = self.below is not None and value < self.below
        return 1.0 if (high or low) else 0.0


#: Stage-3 targets. PTB-XL has the first three; the lab ones need a site's or MIMIC-IV's labs.
ABNORMALITIES: tuple[Abnormality, ...] = (
    Abnormality("age_over_65", "Age over 65 years", "30525-0", above=65.0),
    Abnormality("bmi_over_30", "Body mass index over 30 kg/m2", "39156-5", above=30.0),
    Abnormality("male_sex", "Male sex (sanity check)", "46098-0", above=0.5),
    Abnormality("nt_probnp_high", "NT-proBNP above 300 pg/mL", "33762-6", above=300.0),
    Abnormality("troponin_t_high", "Troponin T above 0.014 ng/mL", "6598-7", above=0.014),
    Abnormality("potassium_abnormal", "Potassium outside 3.5-5.0 mmol/L", "2823-3", above=5.0, below=3.5),
    Abnormality("creatinine_high", "Creatinine above 1.3 mg/dL", "2160-0", above=1.3),
    Abnormality("hemoglobin_low", "Hemoglobin below 12 g/dL", "718-7", below=12.0),
)


@dataclass(frozen=True)
class Measurement:
    loinc: str
    value: float  # in the variable's canonical unit once read
    unit: str
    time: str | None = None


@dataclass(frozen=True)
class ManifestRow:
    ecg_id: str
    patient_id: str
    ecg_path: str
    ecg_time: str | None
    split: str | None
    variables: tuple[Measurement, ...] = ()
    labels: dict[str, float] | None = None
    statements: tuple[str, ...] = ()

    def value(self, loinc: str) -> float:
        """The measurement of ``loinc`` closest to the ECG time (the last listed when no times), or NaN."""
        found = [m for m in self.variables if m.loinc == loinc]
        if not found:
            return math.nan
        if self.ecg_time and all(m.time for m in found):
            t0 = _parse_time(self.ecg_time)
            return min(found, key=lambda m: abs((_parse_time(str(m.time)) - t0).total_seconds())).value
        return found[-1].value

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ecg_id": self.ecg_id,
            "patient_id": self.patient_id,
            "ecg_path": self.ecg_path,
            "ecg_time": self.ecg_time,
            "split": self.split,
            "variables": [
                {"loinc": m.loinc, "value": m.value, "unit": m.unit, **({"time": m.time} if m.time else {})}
                for m in self.variables
            ],
        }
        if self.labels is not None:
            out["labels"] = self.labels
        if self.statements:
            out["statements"] = list(self.statements)
        return out


@dataclass
class ClinicalManifest:
    rows: list[ManifestRow]
    ecg_root: Path
    report: dict[str, Any] = field(default_factory=dict)

    def record_path(self, row: ManifestRow) -> Path:
        p = Path(row.ecg_path)
        return p if p.is_absolute() else self.ecg_root / p


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T"))


def convert_unit(loinc: str, value: float, unit: str, *, where: str = "") -> tuple[float, str]:
    """``value`` in ``unit`` -> (value, canonical unit) of variable ``loinc``; ClinicalDataError if unknown."""
    var = VARIABLES.get(loinc)
    name = f"{var.name} (LOINC {loinc})" if var else f"LOINC {loinc}"
    if var is None:
        return value, unit  # not a variable we use: kept as written
    factor = UNIT_FACTORS.get((loinc, unit))
    if factor is None:
        factor = _UNIT_LOOSE.get((loinc, unit.lower().replace(" ", "")))
    if factor is None:
        known = sorted({u for (code, u) in UNIT_FACTORS if code == loinc})
        raise ClinicalDataError(
            f"{where}{name}: unknown unit {unit!r} (known: {', '.join(known)}); convert it or extend UNIT_FACTORS"
        )
    return value * factor, var.unit


def measurements_from_ehr_context(
    context: dict[str, Any] | None, *, ecg_time: str | None, where: str = ""
) -> tuple[Measurement, ...]:
    """The manifest's measurements from a stored EHR context (``EhrContext.to_dict()``).

    Age (at the ECG, capped at ``AGE_CAP``) and sex (FHIR gender male / female; other or
    unknown is missing) are timed at the ECG. Each value becomes a measurement at its
    Observation's effective time: under the manifest's code for its quantity
    (``EHR_CONTEXT_LOINC``, ``EHR_TROPONIN_T``), converted by ``convert_unit`` (a unit the
    table does not know raises ``ClinicalDataError`` naming the variable), else under the
    code the EHR sent, as written (kept, not used).
    """
    if not context:
        return ()
    out: list[Measurement] = []
    age = context.get("age_years")
    if isinstance(age, int | float) and math.isfinite(age):
        out.append(Measurement("30525-0", min(float(age), AGE_CAP), "a", ecg_time))
    sex = str(context.get("sex") or "").lower()
    if sex in ("male", "female"):
        out.append(Measurement("46098-0", 1.0 if sex == "male" else 0.0, "1", ecg_time))
    for name, item in sorted((context.get("values") or {}).items()):
        if not isinstance(item, dict) or item.get("value") is None:
            continue
        try:
            value = float(item["value"])
        except (TypeError, ValueError) as exc:
            raise ClinicalDataError(f"{where}{name}: value {item['value']!r} is not a number") from exc
        sent = str(item.get("loinc") or "").strip()
        code = EHR_CONTEXT_LOINC.get(name) or (VARIABLES["6598-7"].loinc if sent in EHR_TROPONIN_T else sent)
        if not code:
            raise ClinicalDataError(f"{where}{name}: no LOINC code")
        value, unit = convert_unit(code, value, str(item.get("unit") or ""), where=where)
        out.append(Measurement(code, value, unit, str(item["effective"]) if item.get("effective") else None))
    return tuple(out)


def _measurement(item: dict[str, Any], where: str) -> Measurement | None:
    loinc = str(item.get("loinc") or "").strip()
    if not loinc:
        raise ClinicalDataError(f"{where}a variable without a LOINC code: {item}")
    raw = item.get("value")
    if raw is None or raw == "" or (isinstance(raw, float) and math.isnan(raw)):
        return None  # missing is allowed
    try:
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise ClinicalDataError(f"{where}LOINC {loinc}: value {raw!r} is not a number") from exc
    unit = str(item.get("unit") or "").strip()
    value, unit = convert_unit(loinc, value, unit, where=where)
    time = item.get("time")
    return Measurement(loinc, value, unit, str(time) if time else None)


def _row(obj: dict[str, Any], where: str) -> ManifestRow:
    for key in ("ecg_id", "patient_id", "ecg_path"):
        if obj.get(key) in (None, ""):
            raise ClinicalDataError(f"{where}missing {key!r}")
    measurements = [_measurement(item, where) for item in obj.get("variables") or []]
    labels = obj.get("labels")
    return ManifestRow(
        ecg_id=str(obj["ecg_id"]),
        patient_id=str(obj["patient_id"]),
        ecg_path=str(obj["ecg_path"]),
        ecg_time=str(obj["ecg_time"]) if obj.get("ecg_time") else None,
        split=str(obj["split"]) if obj.get("split") not in (None, "") else None,
        variables=tuple(m for m in measurements if m is not None),
        labels={str(k): float(v) for k, v in labels.items()} if isinstance(labels, dict) else None,
        statements=tuple(str(s) for s in obj.get("statements") or ()),
    )


def _ecg_exists(path: Path) -> bool:
    return path.with_name(path.name + ".hea").is_file() or path.is_file()


def _finish(rows: list[ManifestRow], ecg_root: Path, *, check_files: bool, source: str) -> ClinicalManifest:
    manifest = ClinicalManifest(rows=[], ecg_root=ecg_root, report={"source": source, "rows_read": len(rows)})
    missing: list[str] = []
    for row in rows:
        if check_files and not _ecg_exists(manifest.record_path(row)):
            missing.append(row.ecg_id)
            continue
        manifest.rows.append(row)
    if missing:
        log.warning("%d manifest rows have no ECG file and were left out: %s", len(missing), ", ".join(missing[:10]))
    manifest.report["missing_ecg"] = missing
    manifest.report["rows"] = len(manifest.rows)
    check_split_disjoint(manifest.rows)
    return manifest


def read_manifest(path: Path, *, check_files: bool = True, ecg_root: Path | None = None) -> ClinicalManifest:
    """Read and check a manifest (see the module docstring); rows without an ECG file are reported, not kept."""
    path = Path(path)
    rows: list[ManifestRow] = []
    root = ecg_root
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}: "
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ClinicalDataError(f"{where}not JSON: {exc}") from exc
        if obj.get("format") == FORMAT:
            if int(obj.get("version", VERSION)) > VERSION:
                raise ClinicalDataError(f"{where}manifest version {obj['version']} is newer than {VERSION}")
            if root is None and obj.get("ecg_root"):
                root = Path(obj["ecg_root"])
            continue
        rows.append(_row(obj, where))
    base = root if root is not None else path.parent
    if not base.is_absolute():
        base = path.parent / base
    return _finish(rows, base, check_files=check_files, source=str(path))


def write_manifest(manifest: ClinicalManifest, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "version": VERSION, "ecg_root": str(manifest.ecg_root)}
    lines = [json.dumps(header)] + [json.dumps(r.to_json(), default=float) for r in manifest.rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_split_disjoint(rows: Iterable[ManifestRow]) -> None:
    """Refuse a manifest in which one patient's ECGs are in more than one split."""
    seen: dict[str, str] = {}
    clashes: dict[str, set[str]] = {}
    for row in rows:
        if row.split is None:
            continue
        first = seen.setdefault(row.patient_id, row.split)
        if first != row.split:
            clashes.setdefault(row.patient_id, {first}).add(row.split)
    if clashes:
        detail = "; ".join(f"patient {p} in splits {', '.join(sorted(s))}" for p, s in list(clashes.items())[:5])
        raise ClinicalDataError(f"{len(clashes)} patients appear in more than one split (leakage): {detail}")


def clinical_matrix(
    rows: Sequence[ManifestRow], loincs: Sequence[str] | None = None, *, drop_missing: bool = True
) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(kept LOINC codes, values (n, k) NaN where missing, mask (n, k) 1 = measured, dropped codes).

    ``loincs`` default: every known variable that appears in ``rows``. A variable that no row
    has is dropped with a warning (it would be a constant-zero input that teaches nothing);
    ``drop_missing=False`` keeps the columns as given, for the validation, test and external
    sets, whose matrices must line up with the training set's whatever they lack.
    """
    wanted = (
        list(loincs)
        if loincs is not None
        else [c for c in VARIABLES if any(m.loinc == c for r in rows for m in r.variables)]
    )
    values = np.array([[r.value(c) for c in wanted] for r in rows], dtype=np.float64).reshape(len(rows), len(wanted))
    present = ~np.isnan(values)
    keep = [k for k in range(len(wanted)) if present[:, k].any() or not drop_missing]
    dropped = [wanted[k] for k in range(len(wanted)) if k not in keep]
    for code in dropped:
        name = VARIABLES[code].name if code in VARIABLES else code
        msg = f"clinical variable {name} (LOINC {code}) is missing in every row: dropped"
        warnings.warn(msg, stacklevel=2)
        log.warning(msg)
    return (
        [wanted[k] for k in keep],
        values[:, keep],
        present[:, keep].astype(np.float32),
        dropped,
    )


def abnormality_targets(
    rows: Sequence[ManifestRow], abnormalities: Sequence[Abnormality] = ABNORMALITIES, *, require_both: bool = True
) -> tuple[list[Abnormality], np.ndarray]:
    """(abnormalities kept, targets (n, k): 1 / 0 / NaN where not measured).

    ``require_both`` keeps only the abnormalities with positives and negatives in ``rows``
    (what a head can be trained on); False keeps every one given (evaluation sets).
    """
    kept, cols = [], []
    for ab in abnormalities:
        col = np.array([ab.of(r.value(ab.loinc)) for r in rows], dtype=np.float64)
        known = col[~np.isnan(col)]
        if not require_both or (known.size and 0 < known.sum() < known.size):
            kept.append(ab)
            cols.append(col)
    return kept, (np.stack(cols, axis=1) if cols else np.zeros((len(rows), 0)))


def patient_fold(patient_id: str, n_folds: int = 10) -> int:
    """A stable patient-level fold 1..n_folds (sha256 of the id), for data without folds (MIMIC-IV-ECG)."""
    digest = hashlib.sha256(str(patient_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") % n_folds + 1


# ----- PTB-XL ---------------------------------------------------------------------------


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def from_ptbxl(data_dir: Path, *, check_files: bool = True, sampling_rate: int = 100) -> ClinicalManifest:
    """PTB-XL's ``ptbxl_database.csv`` -> manifest: age, sex, height, weight, BMI (derived), labels = SCP codes.

    PTB-XL writes ages over 89 as 300 (de-identification): they become 90. Sex is 0 male,
    1 female in PTB-XL; here ``sex_male`` is 1 for male. Heights of 0 or blank are missing.
    ``split`` is ``strat_fold``; the ECG time is ``recording_date``, which is also each
    variable's time (PTB-XL records them with the ECG).
    """
    from ecgbridge.training.datasets.ptbxl import load_metadata

    data_dir = Path(data_dir)
    meta = load_metadata(data_dir)
    column = "filename_lr" if sampling_rate == 100 else "filename_hr"
    rows = []
    for ecg_id, r in meta.sort_index().iterrows():
        when = str(r["recording_date"]).replace(" ", "T") if isinstance(r.get("recording_date"), str) else None
        age = _num(r.get("age"))
        if age == 300:
            age = 90.0
        sex = _num(r.get("sex"))
        height = _num(r.get("height"))
        height = math.nan if not height or height <= 0 else height
        weight = _num(r.get("weight"))
        weight = math.nan if not weight or weight <= 0 else weight
        bmi = weight / (height / 100.0) ** 2 if not (math.isnan(weight) or math.isnan(height)) else math.nan
        items = [
            ("30525-0", age, "a"),
            ("46098-0", (1.0 - sex) if not math.isnan(sex) else math.nan, "1"),
            ("8302-2", height, "cm"),
            ("29463-7", weight, "kg"),
            ("39156-5", bmi, "kg/m2"),
        ]
        variables = tuple(Measurement(code, float(v), unit, when) for code, v, unit in items if not math.isnan(v))
        pid = r.get("patient_id")
        if pid is None or (isinstance(pid, float) and math.isnan(pid)):
            raise ClinicalDataError(f"PTB-XL ecg_id {ecg_id} has no patient_id")
        path = r.get(column)
        rows.append(
            ManifestRow(
                ecg_id=f"ptbxl-{ecg_id}",
                patient_id=str(int(float(pid))),
                ecg_path=str(path) if isinstance(path, str) else f"missing/{ecg_id}",
                ecg_time=when,
                split=str(int(r["strat_fold"])),
                variables=variables,
                labels={str(k): float(v) for k, v in dict(r["scp_codes"]).items()},
            )
        )
    return _finish(rows, data_dir, check_files=check_files, source=f"PTB-XL {data_dir}")


# ----- MIMIC-IV-ECG + labs -----------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def from_mimic_iv_ecg(
    ecg_dir: Path,
    labs_csv: Path | None = None,
    *,
    patients_csv: Path | None = None,
    window_before_h: float = 24.0,
    window_after_h: float = 6.0,
    check_files: bool = True,
    n_folds: int = 10,
) -> ClinicalManifest:
    """A MIMIC-IV-ECG layout (+ labs) -> manifest.

    ``ecg_dir`` holds ``record_list.csv`` (subject_id, study_id, file_name, ecg_time, path)
    and the WFDB files under ``path``; ``machine_measurements.csv`` (subject_id, study_id,
    report_0..report_17, ...) is optional and gives each row's machine statements.
    ``labs_csv`` is ``labevents``-like: subject_id, charttime, valuenum, valueuom and either
    ``loinc`` or ``itemid`` (mapped by ``MIMIC_ITEMID_LOINC``; others ignored). Per ECG and
    variable, every lab within ``window_before_h`` before to ``window_after_h`` after the ECG
    is kept with its time (``ManifestRow.value`` uses the closest). ``patients_csv``
    (subject_id, anchor_age, gender) adds age and sex. Splits are stable patient-level folds
    (``patient_fold``): 1-8 train, 9 validation, 10 test, as with PTB-XL.
    """
    ecg_dir = Path(ecg_dir)
    records = _read_csv(ecg_dir / "record_list.csv")
    statements: dict[str, tuple[str, ...]] = {}
    mm = ecg_dir / "machine_measurements.csv"
    if mm.is_file():
        for r in _read_csv(mm):
            reports = [r[k].strip() for k in sorted(r, key=str) if k.startswith("report_") and (r[k] or "").strip()]
            statements[str(r["study_id"])] = tuple(reports)
    labs: dict[str, list[tuple[datetime, str, float, str]]] = {}
    if labs_csv is not None:
        for lineno, r in enumerate(_read_csv(Path(labs_csv)), 2):
            loinc = (r.get("loinc") or "").strip()
            if not loinc and (r.get("itemid") or "").strip():
                loinc = MIMIC_ITEMID_LOINC.get(int(float(r["itemid"])), "")
            if not loinc or loinc not in VARIABLES:
                continue
            value = _num(r.get("valuenum"))
            if math.isnan(value):
                continue
            unit = (r.get("valueuom") or "").strip()
            converted, canonical = convert_unit(loinc, value, unit, where=f"{labs_csv}:{lineno}: ")
            labs.setdefault(str(r["subject_id"]), []).append((_parse_time(r["charttime"]), loinc, converted, canonical))
    demo: dict[str, tuple[float, float]] = {}
    if patients_csv is not None:
        for r in _read_csv(Path(patients_csv)):
            gender = (r.get("gender") or "").strip().upper()
            demo[str(r["subject_id"])] = (
                _num(r.get("anchor_age")),
                1.0 if gender == "M" else 0.0 if gender == "F" else math.nan,
            )
    before, after = timedelta(hours=window_before_h), timedelta(hours=window_after_h)
    rows = []
    for r in records:
        subject, study = str(r["subject_id"]), str(r["study_id"])
        when = _parse_time(r["ecg_time"]) if r.get("ecg_time") else None
        variables: list[Measurement] = []
        if when is not None:
            for t, loinc, value, unit in labs.get(subject, []):
                if when - before <= t <= when + after:
                    variables.append(Measurement(loinc, value, unit, t.isoformat()))
        if subject in demo:
            age, male = demo[subject]
            iso = when.isoformat() if when else None
            if not math.isnan(age):
                variables.append(Measurement("30525-0", age, "a", iso))
            if not math.isnan(male):
                variables.append(Measurement("46098-0", male, "1", iso))
        rows.append(
            ManifestRow(
                ecg_id=f"mimic-{study}",
                patient_id=subject,
                ecg_path=str(r["path"]),
                ecg_time=when.isoformat() if when else None,
                split=str(patient_fold(subject, n_folds)),
                variables=tuple(variables),
                statements=statements.get(study, ()),
            )
        )
    return _finish(rows, ecg_dir, check_files=check_files, source=f"MIMIC-IV-ECG {ecg_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ecgbridge.training.clinical ptbxl|mimic|from-store ...``: write a manifest, print its report."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(prog="python -m ecgbridge.training.clinical", description=__doc__.split("\n")[0])
    parser.add_argument("source", choices=("ptbxl", "mimic", "from-store"))
    parser.add_argument("--data", type=Path, default=None, help="PTB-XL root, or the MIMIC-IV-ECG folder")
    parser.add_argument("--labs", type=Path, default=None, help="mimic: labevents-like CSV")
    parser.add_argument("--patients", type=Path, default=None, help="mimic: patients.csv (anchor_age, gender)")
    parser.add_argument("--config", "-c", help="from-store: YAML configuration (default: $ECGBRIDGE_CONFIG)")
    parser.add_argument("--since", help="from-store: ECGs recorded since (a date, or 30d / 2w ago)")
    parser.add_argument("--until", help="from-store: ECGs recorded before (a date)")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="from-store: share in the held-out split")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="from-store: share in the validation split")
    parser.add_argument(
        "--out", type=Path, required=True, help="the manifest (.jsonl); from-store: a folder (records/ + manifest)"
    )
    args = parser.parse_args(argv)
    if args.source == "from-store":
        from ecgbridge.core.settings import load_settings, redact_url
        from ecgbridge.core.store import MessageStore
        from ecgbridge.core.training_set import parse_when
        from ecgbridge.training.from_store import clinical_manifest_from_store

        settings = load_settings(args.config or os.environ.get("ECGBRIDGE_CONFIG") or None)
        store = MessageStore(settings.database_url, settings.data_dir)
        store.create_schema()
        print(f"store: {redact_url(settings.database_url)}", file=sys.stderr)
        from ecgbridge.errors import EcgBridgeError

        try:
            manifest = clinical_manifest_from_store(
                store,
                args.out,
                since=parse_when(args.since),
                until=parse_when(args.until),
                test_fraction=args.test_fraction,
                val_fraction=args.val_fraction,
                log=lambda msg: print(msg, file=sys.stderr),
            )
        except (EcgBridgeError, ClinicalDataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({**manifest.report, "out": str(Path(args.out) / "clinical_manifest.jsonl")}))
        return 0
    if args.data is None:
        parser.error(f"{args.source} needs --data")
    if args.source == "ptbxl":
        manifest = from_ptbxl(args.data)
    else:
        manifest = from_mimic_iv_ecg(args.data, args.labs, patients_csv=args.patients)
    write_manifest(manifest, args.out)
    print(json.dumps({**manifest.report, "missing_ecg": len(manifest.report["missing_ecg"]), "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
