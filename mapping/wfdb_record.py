"""A WFDB record (PTB-XL, PhysioNet/CinC challenge) -> the canonical :class:`~mapping.ecg.Ecg`.

Why: training data and test fixtures come as WFDB, and they must reach the models by
the same rules as a DICOM ECG (lead names, mV, standard order, derived leads), so the
lead assembly is shared with :mod:`mapping.dicom_waveform`.

PTB-XL subsets processed upstream carry units ``zscore`` (band-passed, z-scored per
lead): they are accepted as if mV and flagged ``units:zscore``. Header comments of the
challenge records (``#Sex: Female``) give the patient's sex; the record name goes into
the flags as ``record:NAME`` (study UIDs stay None: a WFDB record has none).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import wfdb

from ecgbridge.errors import DecodeError, WaveformError
from ecgbridge.mapping.codes import LEAD_BY_MEANING
from ecgbridge.mapping.dicom_waveform import standardise_leads
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Patient, Study

__all__ = ["read_wfdb", "lead_name", "WFDB_UNITS_TO_MV"]

#: WFDB units (lower-cased) -> factor to mV. "zscore" is dimensionless, kept as is.
WFDB_UNITS_TO_MV: dict[str, float] = {
    "mv": 1.0,
    "uv": 1e-3,
    "\u00b5v": 1e-3,
    "\u03bcv": 1e-3,
    "v": 1e3,
    "zscore": 1.0,
}

_LEAD_BY_LOWER: dict[str, str] = {lead.lower(): lead for lead in STANDARD_LEADS}
_SEX = {"male": "male", "m": "male", "female": "female", "f": "female"}


def lead_name(raw: str) -> str | None:
    """A WFDB signal name as a standard lead ('AVR', 'avr' -> 'aVR'), or None."""
    key = raw.strip().lower()
    return _LEAD_BY_LOWER.get(key) or LEAD_BY_MEANING.get(key)


def read_wfdb(path: Path | str) -> Ecg:
    """Read the record at ``path`` (with or without .hea/.dat/.mat) as an Ecg in mV."""
    base = Path(path)
    if base.suffix.lower() in (".hea", ".dat", ".mat"):
        base = base.with_suffix("")
    header = base.with_name(base.name + ".hea")
    if not header.is_file():
        raise FileNotFoundError(f"no WFDB header {header}")
    try:
        record = wfdb.rdrecord(str(base), physical=True)
    except Exception as exc:
        raise DecodeError(f"WFDB record {base.name} could not be read ({type(exc).__name__})", detail=str(exc)) from exc

    name = str(record.record_name or base.name)
    fs = float(record.fs or 0)
    if not np.isfinite(fs) or fs <= 0:
        raise WaveformError(f"WFDB record {name}: sampling frequency must be > 0 (got {fs:g})")
    signal = record.p_signal
    if signal is None or signal.ndim != 2 or signal.shape[0] == 0:
        raise WaveformError(f"WFDB record {name}: no samples")

    flags: list[str] = [f"record:{name}"]
    by_lead: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    zscore = assumed = False
    units = list(record.units or [])
    for column, raw_name in enumerate(record.sig_name or []):
        lead = lead_name(str(raw_name))
        if lead is None:
            dropped.append(re.sub(r"[,\s]+", " ", str(raw_name)).strip() or f"channel {column + 1}")
            continue
        if lead in by_lead:
            raise WaveformError(f"WFDB record {name}: lead {lead} appears twice")
        unit = (str(units[column]) if column < len(units) and units[column] else "").strip()
        if not unit:
            unit, assumed = "mV", True  # the WFDB default when a header names no units
        factor = WFDB_UNITS_TO_MV.get(unit.lower())
        if factor is None:
            raise WaveformError(f"WFDB record {name}: lead {lead} units {unit!r} are not a voltage")
        zscore = zscore or unit.lower() == "zscore"
        values = signal[:, column].astype(np.float64) * factor
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise WaveformError(f"WFDB record {name}: lead {lead} has {bad} NaN/invalid samples")
        by_lead[lead] = values

    signals, leads, lead_flags = standardise_leads(by_lead, dropped)
    if zscore:
        flags.append("units:zscore")
    if assumed:
        flags.append("units_assumed:mV")
    return Ecg(
        signals=signals,
        leads=leads,
        fs=fs,
        patient=Patient(sex=_sex_from_comments(record.comments or [])),
        study=Study(accession_number=None),
        source_format="wfdb",
        units="mV",
        flags=tuple(flags) + lead_flags,
    )


def _sex_from_comments(comments: list[str]) -> str | None:
    """'Sex: Female' (PhysioNet challenge header comment) -> 'female'; None when absent."""
    for line in comments:
        key, sep, value = str(line).lstrip("#").partition(":")
        if sep and key.strip().lower() == "sex":
            return _SEX.get(value.strip().lower(), "unknown")
    return None
