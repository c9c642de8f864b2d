"""PTB-XL: metadata, diagnostic superclass labels, the standard folds, and signals.

The same code reads the full PTB-XL (21,799 records, ``records100`` or
``records500``) and the subset in ``shared/data/ptbxl-subset``: only the files
named by ``filename_lr`` / ``filename_hr`` are read. Every signal goes through
``inference.preprocess`` (the serving pipeline) so training never sees data the
deployed model would not; lead order comes from the header's lead *names*,
never their positions.

Labels follow the PTB-XL paper's recipe: each SCP code of a record that is a
diagnostic statement (``diagnostic == 1`` in ``scp_statements.csv``) contributes
its ``diagnostic_class``; the likelihood value is ignored. Records with no
superclass are kept out of training and evaluation and counted.

Splits are PTB-XL's ``strat_fold`` column, which its authors made patient-level
(all records of one patient share a fold); ``check_patient_disjoint`` verifies it.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ecgbridge.inference.preprocess import DEFAULT_SPEC, Pipeline
from ecgbridge.mapping.ecg import STANDARD_LEADS

__all__ = [
    "SUPERCLASSES",
    "TRAIN_FOLDS",
    "VAL_FOLDS",
    "TEST_FOLDS",
    "Transform",
    "PtbxlData",
    "load_metadata",
    "load_diagnostic_map",
    "superclasses_of",
    "read_signal",
    "load_ptbxl",
    "check_patient_disjoint",
]

#: Output order of every diagnosis model trained here.
SUPERCLASSES: tuple[str, ...] = ("NORM", "MI", "STTC", "CD", "HYP")
TRAIN_FOLDS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
VAL_FOLDS: tuple[int, ...] = (9,)
TEST_FOLDS: tuple[int, ...] = (10,)

#: (signal (leads, samples) in STANDARD_LEADS order, fs, units) -> model input (12, n).
Transform = Callable[[np.ndarray, float, str], np.ndarray]

_LEAD_BY_UPPER = {lead.upper(): lead for lead in STANDARD_LEADS}


@dataclass(frozen=True)
class PtbxlData:
    """Preprocessed records of some folds, with the ids needed for patient-level work."""

    x: np.ndarray  # (n, 12, n_samples) float32, STANDARD_LEADS order
    y: np.ndarray  # (n, len(SUPERCLASSES)) float32 multi-hot
    ecg_ids: np.ndarray  # (n,) int
    patient_ids: np.ndarray  # (n,) int
    folds: np.ndarray  # (n,) int
    n_unlabelled: int  # records of these folds left out: no diagnostic superclass
    classes: tuple[str, ...] = SUPERCLASSES
    fs: float = 100.0
    info: dict[str, object] = field(default_factory=dict)
    #: per record, PTB-XL's ``{SCP statement: likelihood}`` (for other label schemes, ``training.triage``)
    scp_codes: tuple[dict[str, float], ...] = ()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def label_counts(self) -> dict[str, int]:
        return {c: int(self.y[:, i].sum()) for i, c in enumerate(self.classes)}


def load_metadata(data_dir: Path) -> pd.DataFrame:
    """``ptbxl_database.csv`` indexed by ecg_id, ``scp_codes`` parsed into dicts."""
    path = Path(data_dir) / "ptbxl_database.csv"
    if not path.is_file():
        raise FileNotFoundError(f"not a PTB-XL directory (no ptbxl_database.csv): {data_dir}")
    meta = pd.read_csv(path, index_col="ecg_id")
    meta["scp_codes"] = meta["scp_codes"].apply(ast.literal_eval)
    return meta


def load_diagnostic_map(data_dir: Path) -> dict[str, str]:
    """SCP code -> diagnostic superclass, for diagnostic statements only."""
    statements = pd.read_csv(Path(data_dir) / "scp_statements.csv", index_col=0)
    diagnostic = statements[statements["diagnostic"] == 1]
    return {str(code): str(cls) for code, cls in diagnostic["diagnostic_class"].items() if isinstance(cls, str)}


def superclasses_of(scp_codes: dict[str, float], diagnostic_map: dict[str, str]) -> set[str]:
    return {diagnostic_map[code] for code in scp_codes if code in diagnostic_map}


def read_signal(record_path: Path) -> tuple[np.ndarray, float, str]:
    """One WFDB record as (12, samples) in STANDARD_LEADS order (by lead name), fs, units."""
    import wfdb  # imported here: only training needs it

    record = wfdb.rdrecord(str(record_path))
    names = [_LEAD_BY_UPPER.get(str(n).upper(), str(n)) for n in record.sig_name]
    missing = [lead for lead in STANDARD_LEADS if lead not in names]
    if missing:
        raise ValueError(f"record {record_path} lacks leads {', '.join(missing)}")
    signal = np.asarray(record.p_signal, dtype=np.float32).T
    ordered = np.stack([signal[names.index(lead)] for lead in STANDARD_LEADS])
    units = {str(u) for u in record.units}
    return ordered, float(record.fs), units.pop() if len(units) == 1 else "mixed"


def _default_transform() -> Transform:
    pipeline = Pipeline.from_spec(DEFAULT_SPEC)

    def transform(signal: np.ndarray, fs: float, units: str) -> np.ndarray:
        return pipeline.apply(signal, fs)[0]

    return transform


def load_ptbxl(
    data_dir: Path,
    folds: tuple[int, ...] | list[int],
    *,
    sampling_rate: int = 100,
    transform: Transform | None = None,
    limit: int | None = None,
    require_superclass: bool = True,
) -> PtbxlData:
    """Labelled records of ``folds``, preprocessed by ``transform`` (default: DEFAULT_SPEC).

    ``require_superclass=False`` keeps the records without a diagnostic superclass too
    (all-zero ``y`` row; ``n_unlabelled`` is then 0): for label schemes built from
    ``scp_codes`` (fine statements, severity tiers).

    ``sampling_rate`` picks ``records100`` (filename_lr) or ``records500`` (filename_hr);
    the pipeline resamples either to the model's rate. ``limit`` keeps the first N
    labelled records (for quick tests).
    """
    if sampling_rate not in (100, 500):
        raise ValueError(f"sampling_rate must be 100 or 500, got {sampling_rate}")
    data_dir = Path(data_dir)
    meta = load_metadata(data_dir)
    diagnostic_map = load_diagnostic_map(data_dir)
    column = "filename_lr" if sampling_rate == 100 else "filename_hr"
    rows = meta[meta["strat_fold"].isin(list(folds))].sort_index()
    labels = rows["scp_codes"].apply(lambda codes: superclasses_of(codes, diagnostic_map))
    labelled = rows[labels.apply(len) > 0] if require_superclass else rows
    n_unlabelled = int(len(rows) - len(labelled))
    if labelled[column].isna().any():
        raise ValueError(f"{int(labelled[column].isna().sum())} records have no {column}; try another --sampling-rate")
    if limit is not None:
        labelled = labelled.iloc[:limit]
    transform = transform or _default_transform()
    xs, ys = [], []
    for ecg_id, row in labelled.iterrows():
        signal, fs, units = read_signal(data_dir / str(row[column]))
        xs.append(np.asarray(transform(signal, fs, units), dtype=np.float32))
        present = labels.loc[ecg_id]
        ys.append([1.0 if c in present else 0.0 for c in SUPERCLASSES])
    x = np.stack(xs) if xs else np.zeros((0, len(STANDARD_LEADS), 0), dtype=np.float32)
    return PtbxlData(
        x=x,
        y=np.asarray(ys, dtype=np.float32).reshape(-1, len(SUPERCLASSES)),
        ecg_ids=labelled.index.to_numpy(dtype=np.int64),
        patient_ids=labelled["patient_id"].to_numpy(dtype=np.float64).astype(np.int64),
        folds=labelled["strat_fold"].to_numpy(dtype=np.int64),
        n_unlabelled=n_unlabelled,
        info={"data_dir": str(data_dir), "sampling_rate": sampling_rate, "folds": list(folds)},
        scp_codes=tuple(dict(codes) for codes in labelled["scp_codes"]),
    )


def check_patient_disjoint(*splits: PtbxlData) -> None:
    """Raise if any patient appears in more than one split (record-level leakage)."""
    seen: dict[int, int] = {}
    for i, split in enumerate(splits):
        for pid in set(split.patient_ids.tolist()):
            if pid in seen and seen[pid] != i:
                raise ValueError(f"patient-level leakage: a patient is in splits {seen[pid]} and {i}")
            seen[pid] = i
