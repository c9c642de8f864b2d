"""LVEF training data: a CSV manifest of ECG files, echo LVEF and EHR variables.

This is the format a site exports to (re)train the LVEF model on its own patients, e.g.
from MIMIC-IV-ECG joined with the echo reports' LVEF (MIMIC-IV-Note / MIMIC-IV-ECHO
measurements) and MIMIC-IV's labs and diagnoses, or from its ECG management system
joined with its echo system's structured LVEF. ``training.lvef_synthetic`` writes the
same format for the synthetic cohort the shipped model is trained on.

One row per ECG; header row required; UTF-8; empty cell = missing::

    column              required  content
    ecg_path            yes       WFDB header (.hea) or DICOM ECG file, relative to the CSV's folder
                                  (absolute paths work too)
    lvef_percent        yes       LVEF in %, the echo closest to the ECG; 5 <= value <= 85
    patient_id          yes       a pseudonymous patient key (never an MRN): splits are by patient
    split               no        train | val | test; when the column is absent or a cell is empty, a
                                  deterministic patient-level split from sha256(patient_id):
                                  70 % train, 15 % val, 15 % test
    source              no        free text (e.g. where the row came from); ignored by training
    age_years           no        age at the ECG, years
    sex                 no        male | female | other | unknown (FHIR administrative gender)
    <EHR value name>    no        one column per key of mapping.ehr_context.EHR_VALUE_NAMES, named
                                  exactly so, in its unit: nt_probnp pg/mL, bnp pg/mL, troponin ng/L
                                  (high-sensitivity), potassium mmol/L, sodium mmol/L, creatinine
                                  mg/dL, egfr mL/min/1.73 m2, hemoglobin g/dL, systolic_bp and
                                  diastolic_bp mm Hg, heart_rate /min, weight kg, height cm, bmi kg/m2
    hx_<condition>      no        1 / 0 (also true/false, yes/no), empty = not known; conditions of
                                  EHR_CONDITION_NAMES, e.g. hx_heart_failure, hx_atrial_fibrillation
    med_<class>         no        1 / 0 / empty, classes of EHR_MEDICATION_NAMES, e.g. med_loop_diuretic

A row whose EHR cells are all empty is a patient with no EHR context (``ehr=None``): the
ECG-only situation the serving side meets when the EHR gives nothing. Any other column is
an error (a misspelt ``nt_pro_bnp`` would otherwise silently become "missing"). Errors
name the file, the line (the header is line 1) and the column.

Rows become model inputs through :func:`inference.lvef_features.lvef_feature_row`, the
function serving uses: EHR cells are turned into an :class:`~mapping.ehr_context.EhrContext`
(:func:`ehr_context_from_cells`), the ECG is measured with :func:`inference.features.measure`
and classified by the shipped diagnosis model. Those two are slow for thousands of ECGs, so
:func:`load_features` keeps them in a JSON cache beside the CSV (``<csv stem>.features.json``,
keyed by ``ecg_path`` as written in the CSV, invalidated when the measurement or diagnosis
model version changes).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ecgbridge.errors import InputError
from ecgbridge.inference.lvef_features import FEATURE_NAMES, lvef_feature_row, tier_index
from ecgbridge.mapping.ehr_context import (
    EHR_CONDITION_NAMES,
    EHR_MEDICATION_NAMES,
    EHR_VALUE_NAMES,
    EhrContext,
    EhrValue,
)

__all__ = [
    "LVEF_MIN",
    "LVEF_MAX",
    "SPLITS",
    "REQUIRED_COLUMNS",
    "OPTIONAL_COLUMNS",
    "EHR_COLUMNS",
    "LvefManifestError",
    "LvefRecord",
    "LvefTable",
    "patient_split",
    "read_manifest",
    "ehr_context_from_cells",
    "cache_path_for",
    "load_features",
    "build_table",
]

LVEF_MIN, LVEF_MAX = 5.0, 85.0
SPLITS: tuple[str, ...] = ("train", "val", "test")
REQUIRED_COLUMNS: tuple[str, ...] = ("ecg_path", "lvef_percent", "patient_id")
#: EHR columns, in the order the synthetic generator writes them.
EHR_COLUMNS: tuple[str, ...] = (
    "age_years",
    "sex",
    *EHR_VALUE_NAMES,
    *(f"hx_{c}" for c in EHR_CONDITION_NAMES),
    *(f"med_{m}" for m in EHR_MEDICATION_NAMES),
)
OPTIONAL_COLUMNS: tuple[str, ...] = ("split", "source", *EHR_COLUMNS)
_SEXES = ("male", "female", "other", "unknown")
_TRUE = ("1", "true", "yes", "y")
_FALSE = ("0", "false", "no", "n")


class LvefManifestError(InputError):
    """A manifest that cannot be used; the message names the file, line and column."""


@dataclass(frozen=True)
class LvefRecord:
    """One manifest row, validated."""

    line: int  # line number in the CSV (header = 1)
    ecg_key: str  # ecg_path as written in the CSV (the feature cache key)
    ecg_path: Path  # resolved
    lvef_percent: float
    tier: int  # inference.lvef_features.tier_index(lvef_percent)
    patient_id: str
    split: str
    ehr: EhrContext | None
    source: str = ""


def patient_split(patient_id: str) -> str:
    """Deterministic patient-level split: sha256(patient_id) -> 70 % train, 15 % val, 15 % test."""
    bucket = int(hashlib.sha256(str(patient_id).encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 70 else "val" if bucket < 85 else "test"


def _where(csv_path: Path, line: int, column: str | None = None) -> str:
    return f"{csv_path}: line {line}" + (f", column {column!r}" if column else "")


def _float_cell(csv_path: Path, line: int, column: str, text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise LvefManifestError(f"{_where(csv_path, line, column)}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise LvefManifestError(f"{_where(csv_path, line, column)}: {text!r} is not a finite number")
    return value


def _flag_cell(csv_path: Path, line: int, column: str, text: str) -> bool | None:
    t = text.strip().lower()
    if not t:
        return None
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise LvefManifestError(f"{_where(csv_path, line, column)}: {text!r} is not 1/0 (or true/false, yes/no)")


def ehr_context_from_cells(
    cells: dict[str, str], *, csv_path: Path = Path("<cells>"), line: int = 0
) -> EhrContext | None:
    """EHR cells of one row (column -> text) as the EhrContext a fetcher would have built; None when all are empty."""
    values: dict[str, EhrValue] = {}
    for name, unit in EHR_VALUE_NAMES.items():
        v = _float_cell(csv_path, line, name, cells.get(name, "") or "")
        if v is not None:
            if v < 0:
                raise LvefManifestError(f"{_where(csv_path, line, name)}: {v:g} {unit} is negative")
            values[name] = EhrValue(name=name, value=v, unit=unit, loinc="", effective=None, reference=None)
    conditions = {
        c: f
        for c in EHR_CONDITION_NAMES
        if (f := _flag_cell(csv_path, line, f"hx_{c}", cells.get(f"hx_{c}", "") or "")) is not None
    }
    medications = {
        m: f
        for m in EHR_MEDICATION_NAMES
        if (f := _flag_cell(csv_path, line, f"med_{m}", cells.get(f"med_{m}", "") or "")) is not None
    }
    age = _float_cell(csv_path, line, "age_years", cells.get("age_years", "") or "")
    if age is not None and not 0 <= age <= 120:
        raise LvefManifestError(f"{_where(csv_path, line, 'age_years')}: {age:g} is outside 0-120 years")
    sex_text = (cells.get("sex", "") or "").strip().lower()
    if sex_text and sex_text not in _SEXES:
        raise LvefManifestError(f"{_where(csv_path, line, 'sex')}: {sex_text!r} is not one of {', '.join(_SEXES)}")
    ctx = EhrContext(
        status="complete",
        age_years=age,
        sex=sex_text or None,
        values=values,
        conditions=conditions,
        medications=medications,
        source="manifest",
    )
    return ctx if ctx.has_data else None


def read_manifest(csv_path: Path | str, *, check_files: bool = True) -> list[LvefRecord]:
    """Read and validate every row of an LVEF manifest (see the module docstring)."""
    path = Path(csv_path)
    if not path.is_file():
        raise LvefManifestError(f"LVEF manifest {path} does not exist")
    base = path.resolve().parent
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise LvefManifestError(f"{path}: line 1: no header row")
        known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
        for column in header:
            if column not in known:
                raise LvefManifestError(
                    f"{_where(path, 1, column)}: unknown column (allowed: {', '.join(REQUIRED_COLUMNS)}, "
                    f"split, source, age_years, sex, the EHR_VALUE_NAMES {', '.join(EHR_VALUE_NAMES)}, "
                    f"hx_<{'|'.join(EHR_CONDITION_NAMES)}>, med_<{'|'.join(EHR_MEDICATION_NAMES)}>)"
                )
        for column in REQUIRED_COLUMNS:
            if column not in header:
                raise LvefManifestError(f"{_where(path, 1, column)}: required column is missing")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise LvefManifestError(f"{_where(path, 1, dupes[0])}: column appears more than once")
        records: list[LvefRecord] = []
        for i, raw in enumerate(reader):
            line = i + 2
            cells = {k.strip(): (v or "") for k, v in raw.items() if k is not None}
            if None in raw:
                raise LvefManifestError(f"{_where(path, line)}: more cells than header columns")
            ecg_key = cells["ecg_path"].strip()
            if not ecg_key:
                raise LvefManifestError(f"{_where(path, line, 'ecg_path')}: empty")
            ecg_path = (base / ecg_key) if not Path(ecg_key).is_absolute() else Path(ecg_key)
            if check_files and not ecg_path.is_file():
                raise LvefManifestError(
                    f"{_where(path, line, 'ecg_path')}: file {ecg_key!r} not found (looked in {base})"
                )
            ef = _float_cell(path, line, "lvef_percent", cells["lvef_percent"])
            if ef is None:
                raise LvefManifestError(f"{_where(path, line, 'lvef_percent')}: empty (every row needs an LVEF)")
            if not LVEF_MIN <= ef <= LVEF_MAX:
                raise LvefManifestError(
                    f"{_where(path, line, 'lvef_percent')}: {ef:g} is outside {LVEF_MIN:g}-{LVEF_MAX:g} % "
                    "(a fraction such as 0.55 must be written as 55)"
                )
            pid = cells["patient_id"].strip()
            if not pid:
                raise LvefManifestError(f"{_where(path, line, 'patient_id')}: empty (splits are by patient)")
            split = cells.get("split", "").strip().lower()
            if split and split not in SPLITS:
                raise LvefManifestError(f"{_where(path, line, 'split')}: {split!r} is not one of {', '.join(SPLITS)}")
            ehr = ehr_context_from_cells(cells, csv_path=path, line=line)
            records.append(
                LvefRecord(
                    line=line,
                    ecg_key=ecg_key,
                    ecg_path=ecg_path,
                    lvef_percent=ef,
                    tier=tier_index(ef),
                    patient_id=pid,
                    split=split or patient_split(pid),
                    ehr=ehr,
                    source=cells.get("source", "").strip(),
                )
            )
    if not records:
        raise LvefManifestError(f"{path}: no rows after the header")
    by_patient: dict[str, str] = {}
    for r in records:
        first = by_patient.setdefault(r.patient_id, r.split)
        if first != r.split:
            raise LvefManifestError(
                f"{_where(path, r.line, 'split')}: patient {r.patient_id!r} is in both {first!r} and {r.split!r} "
                "(splits must be patient-level)"
            )
    return records


def cache_path_for(csv_path: Path | str) -> Path:
    p = Path(csv_path)
    return p.with_name(p.stem + ".features.json")


#: (ecg path) -> (measurement features dict, diagnosis {code: p} or None); the default measures and classifies.
Measurer = Callable[[Path], tuple[dict[str, Any], dict[str, float] | None]]


def _default_measurer() -> tuple[Measurer, str]:
    from ecgbridge.inference.features import FEATURES_VERSION, measure
    from ecgbridge.inference.models import ModelRegistry
    from ecgbridge.mapping.readers import read_ecg_file

    diag = ModelRegistry().signal_model("diagnosis")

    def run(path: Path) -> tuple[dict[str, Any], dict[str, float] | None]:
        ecg = read_ecg_file(path)
        feats = measure(ecg).features()
        out = diag.run(ecg)
        return feats, {f.code: float(f.probability) for f in out.findings}

    return run, f"measurements {FEATURES_VERSION}; {diag.manifest.name} {diag.manifest.version}"


def load_features(
    records: Sequence[LvefRecord],
    cache: Path | None,
    *,
    measurer: Measurer | None = None,
    key: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{ecg_key: {"features": ..., "diagnosis": ...}}`` for every record, measured once and cached.

    ``key`` identifies the measurement + diagnosis model versions; a cache written under
    another key is ignored (and rewritten). An ECG that cannot be read is an error naming its row.
    """
    if measurer is None:
        measurer, key = _default_measurer()
    key = key or "custom"
    data: dict[str, dict[str, Any]] = {}
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
            if stored.get("key") == key:
                data = dict(stored.get("records") or {})
        except (ValueError, OSError):
            data = {}
    todo = [r for r in dict((r.ecg_key, r) for r in records).values() if r.ecg_key not in data]
    for n, r in enumerate(todo):
        try:
            feats, diag = measurer(r.ecg_path)
        except FileNotFoundError as exc:
            raise LvefManifestError(f"line {r.line}, column 'ecg_path': {r.ecg_key!r}: {exc}") from exc
        except Exception as exc:
            raise LvefManifestError(
                f"line {r.line}, column 'ecg_path': ECG {r.ecg_key!r} could not be read or measured: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        data[r.ecg_key] = {"features": feats, "diagnosis": diag}
        if progress and (n + 1) % 200 == 0:
            progress(f"measured {n + 1}/{len(todo)} ECGs")
    if cache is not None and todo:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "records": data}, separators=(",", ":")))
        tmp.replace(cache)
    return data


@dataclass(frozen=True)
class LvefTable:
    """Model inputs of a manifest: ``x`` (n, len(FEATURE_NAMES)) float64 with NaN, labels and ids."""

    x: np.ndarray
    ef: np.ndarray  # (n,) LVEF %
    tier: np.ndarray  # (n,) int tier index
    patient_ids: np.ndarray  # (n,) str
    split: np.ndarray  # (n,) str
    has_ehr: np.ndarray  # (n,) bool
    records: tuple[LvefRecord, ...]
    feature_names: tuple[str, ...] = FEATURE_NAMES

    def subset(self, mask: np.ndarray) -> LvefTable:
        idx = np.flatnonzero(mask)
        return LvefTable(
            x=self.x[idx],
            ef=self.ef[idx],
            tier=self.tier[idx],
            patient_ids=self.patient_ids[idx],
            split=self.split[idx],
            has_ehr=self.has_ehr[idx],
            records=tuple(self.records[i] for i in idx),
            feature_names=self.feature_names,
        )

    def __len__(self) -> int:
        return int(self.x.shape[0])


def build_table(records: Sequence[LvefRecord], features: dict[str, dict[str, Any]]) -> LvefTable:
    """Feature rows (via lvef_feature_row, as serving builds them) for the records."""
    rows = []
    for r in records:
        f = features[r.ecg_key]
        row = lvef_feature_row(f.get("features") or {}, f.get("diagnosis"), r.ehr)
        rows.append([row[name] for name in FEATURE_NAMES])
    return LvefTable(
        x=np.asarray(rows, dtype=np.float64).reshape(len(records), len(FEATURE_NAMES)),
        ef=np.asarray([r.lvef_percent for r in records], dtype=np.float64),
        tier=np.asarray([r.tier for r in records], dtype=np.int64),
        patient_ids=np.asarray([r.patient_id for r in records], dtype=object),
        split=np.asarray([r.split for r in records], dtype=object),
        has_ehr=np.asarray([r.ehr is not None for r in records], dtype=bool),
        records=tuple(records),
    )
