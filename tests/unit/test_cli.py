"""The command line as an IT person uses it: exit codes and what it prints."""

from __future__ import annotations

import json

import pytest

from ecgbridge.cli import main


def test_every_command_has_help(capsys):
    for argv in (
        ["--help"],
        ["run", "--help"],
        ["gateway", "--help"],
        ["worker", "--help"],
        ["analyse", "--help"],
        ["messages", "list", "--help"],
        ["messages", "show", "--help"],
        ["config", "check", "--help"],
        ["train", "--help"],
        ["evaluate", "--help"],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0, argv
    assert "usage: ecgbridge" in capsys.readouterr().out


def test_analyse_a_dicom_file_as_json(capsys, waveform_ecg_path):
    assert main(["analyse", "--json", str(waveform_ecg_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["fs"] == 1000.0 and len(out["leads"]) == 12
    (model,) = [o for o in out["outputs"] if o["task"] == "diagnosis"]
    assert model["model"] == "diagnosis" and len(model["findings"]) == 5
    (measured,) = [o for o in out["outputs"] if o["task"] == "measurements"]
    assert 40 < measured["extra"]["measurements"]["heart_rate"] < 100
    assert "NOT FOR CLINICAL USE" in out["label"]


def test_analyse_reports_bad_files_and_exits_nonzero(capsys, tmp_path):
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"not an ecg at all")
    assert main(["analyse", str(bad)]) == 1
    assert "error:" in capsys.readouterr().out


def test_config_check_exit_codes(capsys, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("listeners:\n  dicom:\n    port: 104\n")
    assert main(["config", "check", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("listeners:\n  dicom:\n    prot: 104\n")
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:3: listeners.dicom.prot: unknown setting" in err


def test_messages_on_an_empty_store(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data_dir: ./d\n")
    assert main(["messages", "list", "--json", "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["messages", "show", "nope", "--config", str(cfg)]) == 1


def test_gateway_and_worker_refuse_the_embedded_broker(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("ECGBRIDGE_BROKER_URL", raising=False)
    assert main(["worker"]) == 2
    assert "broker.url" in capsys.readouterr().err
