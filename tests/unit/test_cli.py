"""The command line as an IT person uses it: exit codes and what it prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ecgbridge.cli import main

REPO = Path(__file__).resolve().parents[2]
DICOM_MI = REPO / "tests" / "fixtures" / "dicom" / "ptbxl_00622_mi_12lead.dcm"


def test_every_command_has_help(capsys):
    for argv in (
        ["--help"],
        ["run", "--help"],
        ["gateway", "--help"],
        ["worker", "--help"],
        ["analyse", "--help"],
        ["messages", "list", "--help"],
        ["messages", "show", "--help"],
        ["messages", "attachment", "--help"],
        ["routes", "list", "--help"],
        ["routes", "explain", "--help"],
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


# ----- config check: every problem at once, and warnings ----------------------------------------
def test_config_check_reports_field_and_reference_errors_together(capsys, tmp_path):
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "listeners:\n"
        "  dicom:\n"
        "    prot: 104\n"  # a field error ...
        "ehr:\n"
        "  - {name: epic, base_url: 'https://epic.example.org/R4'}\n"
        "routes:\n"
        "  - name: r\n"
        "    models: [diagnosis, lvef]\n"  # ... and three cross-references, all in one pass
        "    destinations: [ehr]\n"
        "    ehr_context: cerner\n"
    )
    assert main(["config", "check", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: 4 problem(s)" in err
    assert f"{cfg}:3: listeners.dicom.prot: unknown setting" in err
    assert f"{cfg}:8: routes[0].models: 'lvef' is not a model listed under models" in err
    assert f"{cfg}:9: routes[0].destinations: 'ehr' is not a destination listed under destinations" in err
    assert f"{cfg}:10: routes[0].ehr_context: 'cerner' is not an EHR source listed under ehr" in err


def test_config_check_warns_about_missing_key_files_and_unset_token_variables(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("EHR_TOKEN_FOR_TEST", raising=False)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "present.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "destinations:\n"
        "  - name: ehr\n"
        "    base_url: https://fhir.example.org/R4\n"
        "    auth: {type: bearer, token_env: EHR_TOKEN_FOR_TEST}\n"
        "ehr:\n"
        "  - name: epic\n"
        "    base_url: https://epic.example.org/R4\n"
        "    auth:\n"
        "      type: smart-backend\n"
        "      client_id: ecgbridge\n"
        "      private_key_file: keys/missing.pem\n"
        "      key_id: k1\n"
        "  - name: cerner\n"
        "    base_url: https://cerner.example.org/R4\n"
        "    auth: {type: smart-backend, client_id: c, private_key_file: keys/present.pem, key_id: k2}\n"
    )
    assert main(["config", "check", str(cfg)]) == 0  # warnings, not errors
    out = capsys.readouterr().out
    assert "OK" in out and "2 warning(s)" in out
    assert (
        f"warning: {cfg}:4: destinations[0].auth.token_env: environment variable EHR_TOKEN_FOR_TEST is not set" in out
    )
    assert (
        f"warning: {cfg}:11: ehr[0].auth.private_key_file: file {tmp_path / 'keys' / 'missing.pem'} does not exist"
        in out
    )
    assert "present.pem" not in out
    monkeypatch.setenv("EHR_TOKEN_FOR_TEST", "x")
    assert main(["config", "check", str(cfg)]) == 0
    assert "EHR_TOKEN_FOR_TEST" not in capsys.readouterr().out


# ----- ECGBRIDGE_CONFIG and the store line ---------------------------------------------------------
def test_ecgbridge_config_is_the_default_config_and_the_store_is_named(capsys, tmp_path, monkeypatch):
    cfg = tmp_path / "site.yaml"
    cfg.write_text("data_dir: ./site-data\nlisteners:\n  dicom:\n    prot: 1\n")
    monkeypatch.setenv("ECGBRIDGE_CONFIG", str(cfg))
    monkeypatch.delenv("ECGBRIDGE_DATABASE_URL", raising=False)
    assert main(["config", "check"]) == 2  # the file the variable names, not the defaults
    assert f"{cfg}:4: listeners.dicom.prot" in capsys.readouterr().err
    cfg.write_text("data_dir: ./site-data\n")
    assert main(["config", "check"]) == 0
    assert f"{cfg}: OK" in capsys.readouterr().out
    assert main(["messages", "list", "--json"]) == 0
    captured = capsys.readouterr()
    db = tmp_path / "site-data" / "ecgbridge.db"
    assert f"store: sqlite:///{db} (config: {cfg} from ECGBRIDGE_CONFIG)" in captured.err
    assert json.loads(captured.out) == []
    other = tmp_path / "other.yaml"
    other.write_text("data_dir: ./other-data\n")
    assert main(["messages", "list", "--config", str(other)]) == 0  # --config wins over the variable
    assert f"store: sqlite:///{tmp_path / 'other-data' / 'ecgbridge.db'} (config: {other})" in capsys.readouterr().err
    monkeypatch.setenv("ECGBRIDGE_CONFIG", str(tmp_path / "absent.yaml"))
    assert main(["messages", "list"]) == 2
    assert "absent.yaml" in (err := capsys.readouterr().err) and "ECGBRIDGE_CONFIG" in err


# ----- messages show / attachment ----------------------------------------------------------------
def _stored_analysis(tmp_path: Path) -> tuple[Path, Any, str, str]:
    """A config, its store, an analysed DICOM message (diagnosis + triage, two attachments) and an HL7 one."""
    from ecgbridge.core.settings import load_settings
    from ecgbridge.core.store import MessageStore
    from ecgbridge.inference.models import ModelRegistry
    from ecgbridge.inference.pipeline import analyse_ecg
    from ecgbridge.mapping.ecg import Attachment
    from ecgbridge.mapping.readers import read_ecg_file

    cfg = tmp_path / "site.yaml"
    cfg.write_text("data_dir: ./data\n")
    settings = load_settings(cfg)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    sha, size = store.save_blob(DICOM_MI.read_bytes())
    dicom_id = store.record_message(
        source="dicom",
        remote="CART1@10.0.0.5",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.9.1.1",
        sop_instance_uid="1.2.3.4",
        blob_sha256=sha,
        blob_size=size,
        route="all-ecg",
        state="analysed",
    )
    result = analyse_ecg(read_ecg_file(DICOM_MI), ModelRegistry(), ["diagnosis", "triage"], message_id=dicom_id)
    pdf, png = b"%PDF-1.4 a report", b"\x89PNG\r\n\x1a\n an image"
    attachments = tuple(
        Attachment(content_type=ct, title=title, blob_sha256=store.save_blob(data)[0], size=len(data))
        for ct, title, data in (("application/pdf", "AI ECG report", pdf), ("image/png", "12-lead with heatmap", png))
    )
    from dataclasses import replace

    store.save_result(dicom_id, replace(result, attachments=attachments).to_dict(), "diagnosis,triage")
    hsha, hsize = store.save_blob(b"MSH|^~\\&|CART|WARD|||20260101||ORU^R01|1|P|2.5.1\r")
    hl7_id = store.record_message(
        source="hl7",
        remote="CART@10.0.0.7",
        blob_sha256=hsha,
        blob_size=hsize,
        message_type="ORU^R01",
        placer_order_number="PL-00024",
        filler_order_number="FI-00024",
        state="queued",
        route="all-ecg",
    )
    return cfg, store, dicom_id, hl7_id


def test_messages_show_has_only_what_the_message_has(capsys, tmp_path):
    cfg, _store, dicom_id, hl7_id = _stored_analysis(tmp_path)
    assert main(["messages", "show", dicom_id[:8], "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "None" not in out
    lines = out.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.strip().startswith("measurements ("))
    assert lines[heading + 1].strip().startswith("heart rate") and lines[heading + 1].endswith("/min")
    assert any(line.strip().startswith("QRS duration") and line.endswith(" ms") for line in lines)
    assert any(line.strip().startswith("QRS axis") and line.endswith(" deg") for line in lines)
    assert "risk tier high" in out  # the diagnosis model's risk tiers
    assert "severity tier: " in out  # the triage model's severity
    assert "SOP instance: 1.2.3.4" in out
    assert "1. AI ECG report (application/pdf, 17 bytes): " in out
    assert f"ecgbridge messages attachment {dicom_id[:8]} 1 --out report-{dicom_id[:8]}.pdf" in out
    assert "2. 12-lead with heatmap (image/png" in out

    assert main(["messages", "show", hl7_id, "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "SOP instance" not in out and "None" not in out and "measurements" not in out
    assert "message type: ORU^R01" in out and "order numbers: placer PL-00024, filler FI-00024" in out


def test_messages_attachment_saves_the_file(capsys, tmp_path):
    cfg, _store, dicom_id, hl7_id = _stored_analysis(tmp_path)
    target = tmp_path / "report.pdf"
    assert main(["messages", "attachment", dicom_id[:8], "1", "--out", str(target), "--config", str(cfg)]) == 0
    assert target.read_bytes() == b"%PDF-1.4 a report"
    assert f"wrote {target}" in capsys.readouterr().out
    assert main(["messages", "attachment", dicom_id, "3", "--config", str(cfg)]) == 1
    assert "attachments 1 to 2, not 3" in capsys.readouterr().err
    assert main(["messages", "attachment", hl7_id, "1", "--config", str(cfg)]) == 1
    assert "has no attachments" in capsys.readouterr().err


def test_messages_attachment_draws_a_report_no_destination_wanted(capsys, tmp_path):
    """Reports are drawn only when wanted: asking for one here draws it, once, and lists it on the result."""
    from ecgbridge.core.settings import load_settings
    from ecgbridge.core.store import MessageStore
    from ecgbridge.inference.models import ModelRegistry
    from ecgbridge.inference.pipeline import analyse_ecg
    from ecgbridge.mapping.readers import read_ecg_file

    cfg = tmp_path / "site.yaml"
    cfg.write_text("data_dir: ./data\n")
    settings = load_settings(cfg)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    sha, size = store.save_blob(DICOM_MI.read_bytes())
    mid = store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg", state="analysed")
    result = analyse_ecg(read_ecg_file(DICOM_MI), ModelRegistry(), ["diagnosis", "triage"], message_id=mid)
    store.save_result(mid, result.to_dict(), "diagnosis,triage")
    target = tmp_path / "report.pdf"
    assert main(["messages", "attachment", mid, "1", "--out", str(target), "--config", str(cfg)]) == 0
    assert target.read_bytes().startswith(b"%PDF-")
    assert "drawing its report" in capsys.readouterr().err
    listed = store.get_result(mid).result["attachments"]
    assert [a["content_type"] for a in listed] == ["application/pdf", "image/png"]
    assert main(["messages", "attachment", mid, "2", "--out", str(tmp_path / "p.png"), "--config", str(cfg)]) == 0
    assert "drawing" not in capsys.readouterr().err  # drawn once
    assert store.get_result(mid).result["attachments"] == listed


# ----- analyse -------------------------------------------------------------------------------------
def test_analyse_prints_measurements_with_units(capsys):
    assert main(["analyse", str(DICOM_MI)]) == 0
    out = capsys.readouterr().out
    for label, unit in (
        ("heart rate", "/min"),
        ("QRS duration", "ms"),
        ("QT interval", "ms"),
        ("QRS axis", "deg"),
        ("Sokolow-Lyon voltage", "mV"),
    ):
        assert any(line.strip().startswith(label) and line.endswith(f" {unit}") for line in out.splitlines()), label


def test_analyse_lvef_alone_also_runs_the_model_it_reads(capsys):
    assert main(["analyse", "--model", "lvef", "--json", str(DICOM_MI)]) == 0
    captured = capsys.readouterr()
    tasks = [o["task"] for o in json.loads(captured.out)["outputs"]]
    assert tasks.index("diagnosis") < tasks.index("lvef")
    assert "model lvef reads the output of the diagnosis model" in captured.err
    lvef = next(o for o in json.loads(captured.out)["outputs"] if o["task"] == "lvef")
    assert not any("no diagnosis model output" in note for note in lvef["extra"]["missing_context"])


def test_evaluate_diagnosis_defaults_to_the_shipped_model(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "diagnosis", "--data", str(tmp_path)])  # an empty folder: refused after the default
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "diagnosis-baseline (the shipped diagnosis model" in err and "--model" not in err.split("error:")[1]


# ----- noise -----------------------------------------------------------------------------------------
def test_the_worker_starts_quiet(monkeypatch, tmp_path):
    import ecgbridge.worker.tasks as tasks
    from ecgbridge.core.settings import Settings
    from ecgbridge.service import run_worker

    seen: list[list[str]] = []

    class FakeApp:
        def worker_main(self, argv: list[str]) -> None:
            seen.append(argv)

    monkeypatch.setattr(tasks, "worker_app", lambda settings: FakeApp())
    run_worker(Settings(data_dir=tmp_path, broker={"url": "redis://127.0.0.1:1/0"}))
    (argv,) = seen
    assert argv[:2] == ["--quiet", "worker"]  # no banner


def test_logging_keeps_matplotlib_font_scans_out(monkeypatch):
    from ecgbridge.cli import _setup_logging

    _setup_logging("DEBUG")
    assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() >= logging.WARNING
