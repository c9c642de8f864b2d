"""``ecgbridge import`` of WFDB records (PhysioNet: a ``.hea`` header and its ``.dat``/``.mat`` signal files).

Real parts: a redis-server, PostgreSQL, an ``ecgbridge worker`` process and the ``ecgbridge
import`` command run as a user would, over a folder of real PTB-XL and PhysioNet/CinC 2021
records (the committed fixtures), a real DICOM ECG, a header whose signal file is missing and
a signal file whose header is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.mapping.readers import read_ecg_bytes, read_ecg_file
from tests.support.processes import REPO, RedisServer

pytestmark = pytest.mark.integration

WFDB_DIR = REPO / "tests" / "fixtures" / "wfdb"


def _import(config: Path, *args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "import", "--config", str(config), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode in (0, 1), out.stderr
    summary: dict[str, object] = json.loads(out.stdout)
    return summary


def _archive(folder: Path, waveform_ecg_path: Path) -> Path:
    (folder / "challenge").mkdir(parents=True)
    for name in ("00024_lr.hea", "00024_lr.dat"):
        shutil.copy(WFDB_DIR / name, folder / name)
    for name in ("E07506.hea", "E07506.mat"):
        shutil.copy(WFDB_DIR / name, folder / "challenge" / name)
    shutil.copy(WFDB_DIR / "00622_lr.hea", folder / "00622_lr.hea")  # its 00622_lr.dat is not there
    shutil.copy(waveform_ecg_path, folder / "cart.dcm")
    return folder


def test_wfdb_records_are_imported_with_their_signal_files_and_analysed(
    make_stack, redis_server: RedisServer, postgres_url: str, waveform_ecg_path: Path, tmp_path: Path
) -> None:
    stack = make_stack(database_url=postgres_url)
    archive = _archive(tmp_path / "archive", waveform_ecg_path)

    dry = _import(stack.config, str(archive), "--dry-run")
    assert (dry["files"], dry["stored"], dry["rejected"], dry["not_recorded"]) == (4, 3, 1, 0), dry
    (reason,) = dry["rejections"]  # type: ignore[misc]
    assert "signal file 00622_lr.dat is missing" in reason
    assert stack.store().list() == [], "a dry run recorded something"

    stack.start_worker()
    summary = _import(stack.config, str(archive))
    assert (summary["files"], summary["stored"], summary["rejected"], summary["not_recorded"]) == (4, 3, 1, 0)
    assert summary["rejections"] == dry["rejections"], "the dry run did not say what the import did"
    stack.wait_state("analysed", count=3, timeout_s=180)
    store = stack.store()
    rows = {r.remote: r for r in store.list(limit=0)}
    assert sorted(rows) == [
        "import:00024_lr.hea",
        "import:00622_lr.hea",
        "import:cart.dcm",
        "import:challenge/E07506.hea",
    ], "a signal file was taken on its own"
    assert {r.remote for r in rows.values() if r.state == "analysed"} == {
        "import:00024_lr.hea",
        "import:cart.dcm",
        "import:challenge/E07506.hea",
    }
    broken = rows["import:00622_lr.hea"]
    assert broken.state == "rejected" and "signal file 00622_lr.dat is missing" in (broken.error or "")
    assert "record:E07506" in (rows["import:challenge/E07506.hea"].flags or [])

    for remote, header in (("import:00024_lr.hea", "00024_lr.hea"), ("import:challenge/E07506.hea", "E07506.hea")):
        stored = read_ecg_bytes(store.read_blob(rows[remote].blob_sha256), hint=rows[remote].source)
        original = read_ecg_file(WFDB_DIR / header)
        assert stored.leads == original.leads and stored.fs == original.fs
        assert np.allclose(stored.signals, original.signals), f"{remote}: the stored record is not the record"

    again = _import(stack.config, str(archive))  # an interrupted import, re-run: the records are recognised
    assert (again["stored"], again["already"], again["rejected"], again["duplicate"]) == (0, 3, 1, 0), again
    assert len(stack.store().list(limit=0)) == 4, "the second import recorded something again"

    (archive / "00622_lr.dat").write_bytes((WFDB_DIR / "00622_lr.dat").read_bytes())  # the missing file arrives
    late = _import(stack.config, str(archive))
    assert (late["files"], late["stored"], late["already"], late["rejected"]) == (4, 1, 3, 0), late
    stack.wait_state("analysed", count=4, timeout_s=120)
