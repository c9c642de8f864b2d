"""PhysioNet/CinC challenge layout (2020/2021): external evaluation data, never training data.

A directory of WFDB records (``NAME.hea`` + ``NAME.mat``, or ``.dat``), each header
carrying comment lines ``# Age: 78``, ``# Sex: Male`` and ``# Dx: code,code,...``
with SNOMED CT concept ids. Records are read by lead *name* with the product's WFDB
reader (``mapping.wfdb_record.read_wfdb_record``, which also takes the Georgia header
dialect ``E07938.mat 12 500 5000 05-May-2020 09:49:17``) and go through the serving
pipeline (``inference.preprocess``), like PTB-XL.

Source database. The challenge names records by a prefix per source; the prefix
is how a record's hospital is identified (``SOURCE_PREFIXES``)::

    E   Georgia 12-lead ECG Challenge database (G12EC, Emory, USA)
    HR  PTB-XL (Germany): HRnnnnn is PTB-XL ecg_id nnnnn
    JS  Chapman-Shaoxing and Ningbo databases (China); the challenge numbers both
        with JS (2021 release: Chapman-Shaoxing first, Ningbo from about JS10647 on),
        so "JS" is reported as one source
    A   CPSC 2018,  Q  CPSC-Extra,  I  St Petersburg INCART,  S  PTB

The ``HR`` records are PTB-XL recordings: they may be the very records (or the
patients) of the PTB-XL data a model was trained on. ``ptbxl_overlap`` looks
each one up by ecg_id in a PTB-XL ``ptbxl_database.csv`` and returns its fold.

SNOMED CT -> PTB-XL superclass (``SNOMED_TO_SUPERCLASS``, kept in ``mapping.codes`` with
the severity-tier table of the same codes and re-exported here). PTB-XL's superclasses
come from its diagnostic SCP statements; each challenge code is mapped to the
superclass of the PTB-XL statement it corresponds to (the analogue is given in
the table). Codes that describe rhythm or ectopy only, or that PTB-XL treats as a
form statement without a diagnostic class, map to no superclass. NORM has no
challenge code of its own: a record is NORM when it has a sinus-rhythm code
(``SINUS_RHYTHMS``) and every code it carries is in ``NORM_COMPATIBLE`` (the
rhythm, ectopy and voltage statements that co-occur with NORM in PTB-XL). A
record that ends up with no superclass at all (e.g. atrial fibrillation only)
is excluded and counted, as PTB-XL's loader does with its unlabelled records.

Known judgement calls, kept visible here:

- T-wave abnormal / T-wave inversion (164934002 / 59931005) -> STTC: PTB-XL's
  nearest diagnostic statement is NDT ("non-diagnostic T abnormalities", STTC);
  its form statements NT_/INVT have no class.
- 55827005 is labelled "left ventricular high voltage" in the challenge's
  Chapman/Ningbo data: voltage criteria alone, PTB-XL's VCLVH/HVOLT form
  statements, which carry no class and co-occur with NORM. It maps to no
  superclass and is NORM-compatible. (The signals are z-scored per lead by the
  preprocessing, so no model here can see voltage anyway.)
- Q-wave abnormal (164917005), axis deviations, low QRS voltage and pacing map to
  no superclass and are not NORM-compatible (PTB-XL: form / rhythm statements).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ecgbridge.inference.preprocess import DEFAULT_SPEC, Pipeline
from ecgbridge.mapping.codes import SNOMED_TO_SUPERCLASS
from ecgbridge.mapping.ecg import STANDARD_LEADS
from ecgbridge.mapping.wfdb_record import lead_name, read_wfdb_record
from ecgbridge.training.datasets.ptbxl import SUPERCLASSES, Transform

__all__ = [
    "SNOMED_TO_SUPERCLASS",
    "SINUS_RHYTHMS",
    "NORM_COMPATIBLE",
    "SOURCE_PREFIXES",
    "ChallengeHeader",
    "ChallengeData",
    "is_challenge_dir",
    "source_of",
    "read_header",
    "superclasses_from_snomed",
    "load_challenge",
    "read_signal",
    "ptbxl_overlap",
]

#: Sinus rhythms (PTB-XL SR / SBRAD / STACH / SARRH): a NORM record needs one of them.
SINUS_RHYTHMS: dict[str, str] = {
    "426783006": "sinus rhythm",
    "426177001": "sinus bradycardia",
    "427084000": "sinus tachycardia",
    "427393009": "sinus arrhythmia",
}

#: Codes a NORM record may carry (they co-occur with NORM in PTB-XL: SR family, PAC, PVC, VCLVH/HVOLT, LVOLT).
NORM_COMPATIBLE: dict[str, str] = {
    **SINUS_RHYTHMS,
    "284470004": "premature atrial contraction",
    "63593006": "supraventricular premature beats",
    "427172004": "premature ventricular contractions",
    "17338001": "ventricular premature beats",
    "164884008": "ventricular ectopics",
    "55827005": "left ventricular high voltage",
    "251146004": "low QRS voltages",
}

#: Record-name prefix -> source database (longest prefix wins).
SOURCE_PREFIXES: dict[str, str] = {
    "HR": "PTB-XL",
    "JS": "Chapman-Shaoxing/Ningbo",
    "E": "Georgia",
    "A": "CPSC",
    "Q": "CPSC-Extra",
    "I": "INCART",
    "S": "PTB",
}


def source_of(record_name: str) -> str:
    for prefix in sorted(SOURCE_PREFIXES, key=len, reverse=True):
        if record_name.startswith(prefix) and record_name[len(prefix) : len(prefix) + 1].isdigit():
            return SOURCE_PREFIXES[prefix]
    return "unknown"


@dataclass(frozen=True)
class ChallengeHeader:
    name: str
    dx: tuple[str, ...]
    age: float | None
    sex: str | None


def read_header(path: Path) -> ChallengeHeader:
    """Age, sex and the ``#Dx`` SNOMED CT codes from a challenge ``.hea`` file."""
    path = Path(path)
    age: float | None = None
    sex: str | None = None
    dx: tuple[str, ...] = ()
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("#"):
            continue
        key, _, value = line.lstrip("#").partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "dx":
            dx = tuple(c.strip() for c in value.split(",") if c.strip())
        elif key == "age":
            try:
                age = float(value)
            except ValueError:
                age = None  # "NaN", "Unknown"
            if age is not None and np.isnan(age):
                age = None
        elif key == "sex":
            sex = value.lower() if value and value.lower() not in ("unknown", "nan") else None
    return ChallengeHeader(name=path.stem, dx=dx, age=age, sex=sex)


def superclasses_from_snomed(codes: tuple[str, ...] | list[str]) -> set[str]:
    """The PTB-XL superclasses of one record's SNOMED CT codes (see the module docstring)."""
    found = {SNOMED_TO_SUPERCLASS[c][0] for c in codes if c in SNOMED_TO_SUPERCLASS}
    if not found and any(c in SINUS_RHYTHMS for c in codes) and all(c in NORM_COMPATIBLE for c in codes):
        found.add("NORM")
    return found


def read_signal(record_path: Path) -> tuple[np.ndarray, float, str]:
    """One record as (12, samples) in STANDARD_LEADS order, fs, units (as ``ptbxl.read_signal``).

    Read through ``mapping``'s WFDB reader so that training accepts exactly the headers the
    product accepts, the challenge dialect included.
    """
    record = read_wfdb_record(record_path)
    names = [lead_name(str(n)) or str(n) for n in record.sig_name]
    missing = [lead for lead in STANDARD_LEADS if lead not in names]
    if missing:
        raise ValueError(f"record {record_path} lacks leads {', '.join(missing)}")
    signal = np.asarray(record.p_signal, dtype=np.float32).T
    ordered = np.stack([signal[names.index(lead)] for lead in STANDARD_LEADS])
    units = {str(u) for u in record.units}
    return ordered, float(record.fs), units.pop() if len(units) == 1 else "mixed"


def is_challenge_dir(directory: Path) -> bool:
    """True when ``directory`` holds challenge-style headers (a ``#Dx`` line)."""
    for hea in sorted(Path(directory).glob("*.hea"))[:5]:
        if "Dx:" in hea.read_text(errors="replace"):
            return True
    return False


@dataclass(frozen=True)
class ChallengeData:
    """Preprocessed challenge records with a superclass label, and what was left out."""

    x: np.ndarray  # (n, 12, n_samples) float32, STANDARD_LEADS order
    y: np.ndarray  # (n, len(SUPERCLASSES)) multi-hot
    names: tuple[str, ...]
    sources: tuple[str, ...]
    ages: tuple[float | None, ...]
    sexes: tuple[str | None, ...]
    dx: tuple[tuple[str, ...], ...]
    excluded: tuple[str, ...]  # records with no superclass under the mapping
    excluded_sources: tuple[str, ...]
    unmapped_codes: dict[str, int]  # codes with no superclass and not NORM-compatible -> count
    classes: tuple[str, ...] = SUPERCLASSES
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def patient_ids(self) -> np.ndarray:
        """One pseudo-patient per record: the challenge data carry no patient ids."""
        return np.arange(len(self), dtype=np.int64)

    def _records(self, keep: list[int], **changes: Any) -> ChallengeData:
        """These records only (per-record fields subset; ``changes`` replace the rest)."""
        return replace(
            self,
            x=self.x[keep],
            y=self.y[keep],
            names=tuple(self.names[i] for i in keep),
            sources=tuple(self.sources[i] for i in keep),
            ages=tuple(self.ages[i] for i in keep),
            sexes=tuple(self.sexes[i] for i in keep),
            dx=tuple(self.dx[i] for i in keep),
            **changes,
        )

    def select(self, source: str) -> ChallengeData:
        return self._records(
            [i for i, s in enumerate(self.sources) if s == source],
            excluded=tuple(n for n, s in zip(self.excluded, self.excluded_sources) if s == source),
            excluded_sources=tuple(s for s in self.excluded_sources if s == source),
            info={**self.info, "source": source},
        )

    def drop(self, names: set[str]) -> ChallengeData:
        return self._records(
            [i for i, n in enumerate(self.names) if n not in names], info={**self.info, "dropped": sorted(names)}
        )

    def label_counts(self) -> dict[str, int]:
        return {c: int(self.y[:, i].sum()) for i, c in enumerate(self.classes)}


def load_challenge(
    data_dir: Path,
    *,
    transform: Transform | None = None,
    sources: tuple[str, ...] | None = None,
    require_superclass: bool = True,
) -> ChallengeData:
    """Every challenge record under ``data_dir`` (recursively) with at least one superclass.

    ``require_superclass=False`` keeps the records without one too (their ``y`` row is all
    zeros; nothing is ``excluded``): label schemes other than the superclasses (severity
    tiers, ``training.triage``) derive their own labels from ``dx``.
    """
    data_dir = Path(data_dir)
    headers = sorted(data_dir.rglob("*.hea"))
    if not headers:
        raise FileNotFoundError(f"no .hea files under {data_dir}")
    if transform is None:
        pipeline = Pipeline.from_spec(DEFAULT_SPEC)

        def transform(signal: np.ndarray, fs: float, units: str) -> np.ndarray:
            return pipeline.apply(signal, fs)[0]

    xs: list[np.ndarray] = []
    ys: list[list[float]] = []
    kept: list[ChallengeHeader] = []
    kept_sources: list[str] = []
    excluded: list[str] = []
    excluded_sources: list[str] = []
    unmapped: Counter[str] = Counter()
    for hea in headers:
        header = read_header(hea)
        source = source_of(header.name)
        if sources is not None and source not in sources:
            continue
        for code in header.dx:
            if code not in SNOMED_TO_SUPERCLASS and code not in NORM_COMPATIBLE:
                unmapped[code] += 1
        labels = superclasses_from_snomed(header.dx)
        if not labels and require_superclass:
            excluded.append(header.name)
            excluded_sources.append(source)
            continue
        signal, fs, units = read_signal(hea.with_suffix(""))
        xs.append(np.asarray(transform(signal, fs, _normalise_units(units)), dtype=np.float32))
        ys.append([1.0 if c in labels else 0.0 for c in SUPERCLASSES])
        kept.append(header)
        kept_sources.append(source)
    x = np.stack(xs) if xs else np.zeros((0, len(STANDARD_LEADS), 0), dtype=np.float32)
    return ChallengeData(
        x=x,
        y=np.asarray(ys, dtype=np.float32).reshape(-1, len(SUPERCLASSES)),
        names=tuple(h.name for h in kept),
        sources=tuple(kept_sources),
        ages=tuple(h.age for h in kept),
        sexes=tuple(h.sex for h in kept),
        dx=tuple(h.dx for h in kept),
        excluded=tuple(excluded),
        excluded_sources=tuple(excluded_sources),
        unmapped_codes=dict(sorted(unmapped.items())),
        info={"data_dir": str(data_dir)},
    )


def _normalise_units(units: str) -> str:
    return "mV" if units.lower() == "mv" else units


def ptbxl_overlap(names: tuple[str, ...] | list[str], ptbxl_dir: Path | None) -> dict[str, int | None]:
    """For each ``HRnnnnn`` record: its strat_fold in ``ptbxl_dir``'s metadata (None: not listed there).

    Records of other sources are not returned. Without a PTB-XL directory every
    HR record maps to None, which means *unknown*, not *disjoint*.
    """
    hr = {n: int(m.group(1)) for n in names if (m := re.fullmatch(r"HR(\d+)", n))}
    if not hr:
        return {}
    folds: dict[int, int] = {}
    if ptbxl_dir is not None and (Path(ptbxl_dir) / "ptbxl_database.csv").is_file():
        meta = pd.read_csv(Path(ptbxl_dir) / "ptbxl_database.csv", usecols=["ecg_id", "strat_fold"])
        folds = dict(zip(meta["ecg_id"].astype(int), meta["strat_fold"].astype(int)))
    return {n: folds.get(i) for n, i in hr.items()}
