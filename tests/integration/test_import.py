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

from tests.support.processes import REPO, RedisServer, free_port, wait_for
from tests.support.stack import hl7_ehr

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


def test_an_import_interrupted_halfway_is_finished_by_running_it_again(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path, tmp_path: Path
) -> None:
    """SIGINT halfway, then the same command: every file once; ``--no-deliver`` keeps the results home."""
    import signal
    import time

    from tests.support.hl7_receiver import Hl7Receiver

    n = 60
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(n):
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(archive / f"ecg{i:03d}.dcm")
    with Hl7Receiver("AA") as ehr:
        stack = make_stack(extra=hl7_ehr(ehr.port))
        stack.start_worker()
        stack.start_gateway()

        dry = json.loads(_import(stack.config, str(archive), "--dry-run", "--json").stdout)
        assert (dry["files"], dry["stored"], dry["dry_run"]) == (n, n, True)
        assert stack.store().list() == [], "a dry run recorded something"

        cmd = [sys.executable, "-m", "ecgbridge", "import", "--config", str(stack.config), str(archive), "--no-deliver"]
        first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(stack.store().list(limit=0)) >= 5, 60, 0.05, "the import to be under way")
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
        done_first = len(stack.store().list(limit=0))
        assert first.returncode == 130 and "run the same command again" in err, (first.returncode, err)
        assert done_first < n, "the import finished before it could be interrupted; make the archive larger"

        second = subprocess.run(cmd + ["--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
        summary = json.loads(second.stdout)
        assert summary["stored"] + summary["already"] + summary["duplicate"] == n
        assert summary["stored"] <= n - done_first + 1  # at most the file in hand when interrupted
        stack.wait_state("analysed", count=n, timeout_s=300)
        rows = stack.store().list(limit=0)
        assert len(rows) == n and len({r.sop_instance_uid for r in rows}) == n
        time.sleep(2)
        assert ehr.received == [], "--no-deliver delivered"
        assert all(not stack.store().deliveries(r.id) for r in rows)
        assert any(e.kind == "deliveries_skipped" for e in stack.store().events(rows[0].id))

    csv_out = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "messages", "list", "--config", str(stack.config)]
        + ["--route", "all-ecg", "--csv", "--limit", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = csv_out.stdout.strip().splitlines()
    assert len(lines) == n + 1 and "diagnosis:MI" in lines[0] and lines[0].startswith("id,received_at")
