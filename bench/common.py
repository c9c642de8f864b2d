"""Helpers shared by the benchmarks: test ECG files and timing of DCMTK's storescu."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

__all__ = ["make_ecg_files", "time_storescu", "percentile", "require"]


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise SystemExit(f"{binary} not found: apt-get install dcmtk redis-server")
    return path


def make_ecg_files(directory: Path, n: int) -> list[Path]:
    """``n`` copies of the real Mortara 12-lead ECG, each with its own SOP Instance UID."""
    directory.mkdir(parents=True, exist_ok=True)
    base = dcmread(get_testdata_file("waveform_ecg.dcm"))
    files = []
    for i in range(n):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        path = directory / f"ecg{i:05d}.dcm"
        base.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def time_storescu(port: int, files: list[Path], *, associations: int = 1, called: str = "ANY-SCP") -> float:
    """Seconds for ``associations`` parallel storescu processes to send all ``files``."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", called, "127.0.0.1", str(port), *map(str, chunk)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
        if chunk
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
