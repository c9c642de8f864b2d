"""Pick the reader for stored bytes: one entry point from any inbound format to an Ecg."""

from __future__ import annotations

from pathlib import Path

from ecgbridge.errors import UnsupportedInputError
from mapping.ecg import Ecg

__all__ = ["read_ecg_bytes", "read_ecg_file", "looks_like_dicom"]


def looks_like_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def read_ecg_bytes(data: bytes, *, hint: str | None = None) -> Ecg:
    from mapping.dicom_waveform import read_bytes, to_ecg

    if hint == "dicom" or looks_like_dicom(data):
        return to_ecg(read_bytes(data))
    raise UnsupportedInputError("not a DICOM file (no DICM preamble); other formats are not read yet")


def read_ecg_file(path: Path) -> Ecg:
    """A local file -> Ecg: DICOM by its preamble, WFDB by a .hea header beside the signal."""
    from pathlib import Path as _Path

    p = _Path(path)
    if p.suffix.lower() in (".hea", ".dat", ".mat") or (p.with_suffix(".hea").exists() and not p.suffix):
        from mapping.wfdb_record import read_wfdb

        return read_wfdb(p.with_suffix(""))
    return read_ecg_bytes(p.read_bytes())
