"""``ecgbridge import``: an archive of ECG files recorded, analysed and delivered like any other message.

Real parts: a redis-server, ``ecgbridge gateway`` and ``ecgbridge worker`` processes, and the
``ecgbridge import`` command run as a user would, over a folder of real DICOM and vendor XML
ECGs and one file that is not an ECG.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.processes import REPO, RedisServer, free_port

pytestmark = pytest.mark.integration

VENDOR = REPO / "tests" / "fixtures" / "vendor"


def _import(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ecgbridge", "import", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def _archive(folder: Path, waveform_ecg_path: Path) -> Path:
    (folder / "2019" / "03").mkdir(parents=True)
    for i in range(3):
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(folder / "2019" / "03" / f"ecg{i}.dcm")
    shutil.copy(VENDOR / "129DYPRG.XML", folder / "2019" / "muse.xml")
    (folder / "notes.txt").write_text("not an ECG")
    (folder / ".DS_Store").write_bytes(b"\0")  # never taken
    return folder


def test_an_archive_is_analysed_once_however_often_it_is_imported(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path, tmp_path: Path
) -> None:
    stack = make_stack()
    stack.start_worker()
    stack.start_gateway()
    archive = _archive(tmp_path / "archive", waveform_ecg_path)

    out = _import(stack.config, str(archive), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["files"], summary["stored"], summary["rejected"], summary["queued"]) == (5, 4, 1, True)
    assert list(summary["rejections"]) and "notes" not in json.dumps(summary["rejections"])
    stack.wait_state("analysed", count=4, timeout_s=120)
    rows = stack.store().list()
    assert sorted(r.remote for r in rows if r.state == "analysed") == [
        "import:2019/03/ecg0.dcm",
        "import:2019/03/ecg1.dcm",
        "import:2019/03/ecg2.dcm",
        "import:2019/muse.xml",
    ]
    assert [r.remote for r in rows if r.state == "rejected"] == ["import:notes.txt"]

    again = json.loads(_import(stack.config, str(archive), "--json").stdout)  # an interrupted import, re-run
    assert (again["stored"], again["already"], again["rejected"]) == (0, 4, 1)
    assert len(stack.store().list()) == 5, "the second import recorded something again"


def test_without_a_broker_the_files_wait_for_the_gateway(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path, tmp_path: Path
) -> None:
    stack = make_stack()
    stack.start_worker()
    stack.start_gateway()
    archive = _archive(tmp_path / "archive", waveform_ecg_path)
    cut_off = yaml.safe_load(stack.config.read_text())
    cut_off["broker"]["url"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    offline = tmp_path / "offline.yaml"
    offline.write_text(yaml.safe_dump(cut_off))

    out = _import(offline, str(archive), "--pattern", "*.dcm")
    assert out.returncode == 0, out.stderr
    assert "3 stored for analysis" in out.stdout and "broker was not reachable" in out.stdout
    assert {r.state for r in stack.store().list()} == {"received"}
    stack.wait_state("analysed", count=3, timeout_s=120)  # the running gateway's sweep enqueued them


def test_an_unknown_route_is_refused_naming_the_routes(make_stack, tmp_path: Path) -> None:
    stack = make_stack()
    (tmp_path / "a.dcm").write_bytes(b"")
    out = _import(stack.config, str(tmp_path), "--route", "screening")
    assert out.returncode != 0
    assert "no route named 'screening'" in out.stderr and "all-ecg" in out.stderr
    assert not (stack.data_dir / "ecgbridge.db").exists(), "refused, yet it opened the store"
