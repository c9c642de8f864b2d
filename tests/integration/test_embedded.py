"""`ecgbridge run` on embedded defaults: its own Redis and SQLite, nothing installed by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from pydicom import dcmread

from tests.support.processes import REPO, EcgbridgeProcess, free_port, wait_for, write_config
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration


def _list(config) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "messages", "list", "--json", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def test_run_on_embedded_defaults_analyses_and_survives_restart(tmp_path, waveform_ecg_path):
    port, mllp_port = free_port(), free_port()
    # Only the port differs from the defaults (a free one, so tests can run in parallel).
    config = write_config(
        tmp_path / "ecgbridge.yaml",
        {"listeners": {"dicom": {"port": port}, "mllp": {"port": mllp_port}}, "workers": {"processes": 0}},
    )
    run = EcgbridgeProcess(["run", "--config", str(config)], tmp_path / "run1.log").start()
    try:
        run.wait_for_log("ecgbridge running", 60)
        assert send_dicom(port, [dcmread(waveform_ecg_path)]) == [0x0000]
    finally:
        run.stop()  # no worker ran: the message is stored and queued, not analysed
    assert [m["state"] for m in _list(config)] == ["queued"]
    assert (tmp_path / "ecgbridge-data" / "ecgbridge.db").exists()

    config = write_config(
        tmp_path / "ecgbridge.yaml", {"listeners": {"dicom": {"port": port}, "mllp": {"port": mllp_port}}}
    )
    run = EcgbridgeProcess(["run", "--config", str(config)], tmp_path / "run2.log").start()
    try:
        run.wait_for_log("ecgbridge running", 60)
        items = wait_for(
            lambda: [m for m in _list(config) if m["state"] == "analysed"],
            90,
            0.5,
            "the message analysed after restart",
        )
        assert len(items) == 1
        assert set(items[0]["findings"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
        if shutil.which("storescu"):
            out = subprocess.run(
                ["storescu", "127.0.0.1", str(port), str(waveform_ecg_path)], capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, out.stderr
            wait_for(
                lambda: len([m for m in _list(config) if m["state"] == "analysed"]) == 2,
                60,
                0.5,
                "the storescu message analysed",
            )
    finally:
        run.stop()
    assert "Traceback" not in run.log_text()


def test_embedded_broker_starts_from_a_relative_data_dir(tmp_path, monkeypatch):
    """`bash scripts/run.sh` without a config: data_dir is the relative ./ecgbridge-data."""
    import redis

    from ecgbridge.broker import EmbeddedRedis
    from ecgbridge.core.settings import default_settings

    monkeypatch.chdir(tmp_path)
    settings = default_settings()
    assert not settings.data_dir.is_absolute()
    broker = EmbeddedRedis(settings.data_dir / "broker", settings.broker_socket)
    broker.start()
    try:
        assert redis.Redis(unix_socket_path=str(settings.broker_socket)).ping()
        assert (tmp_path / "ecgbridge-data" / "broker" / "redis.log").exists()
    finally:
        broker.stop()
