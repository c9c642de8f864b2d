"""Shadow models: run beside the live ones, stored apart, never delivered; promoted and rolled back, audited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ecgbridge.cli import main
from ecgbridge.core.promotions import Promotion, apply, models_in_force
from ecgbridge.core.settings import Route, Settings, load_settings
from ecgbridge.errors import ConfigError
from tests.conftest import FIXTURES

SHIPPED = Path(__file__).resolve().parents[2] / "inference" / "shipped" / "diagnosis-baseline"


def _candidate(tmp_path: Path, version: str = "0.1.1-candidate") -> Path:
    """The shipped diagnosis model under another version: a stand-in for a retrained candidate."""
    directory = tmp_path / "candidate"
    shutil.copytree(SHIPPED, directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["version"] = version
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def _config(tmp_path: Path, candidate: Path) -> Path:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "data_dir: ./data\n"
        "models:\n  - name: diagnosis\n  - name: triage\n  - name: diagnosis-candidate\n"
        f"    path: {candidate}\n"
        "routes:\n  - name: all-ecg\n    models: [diagnosis, triage]\n    shadow_models: [diagnosis-candidate]\n"
    )
    return cfg


def test_a_promotion_swaps_the_shadow_with_the_live_model_in_its_place() -> None:
    route = Route(name="r", models=["diagnosis", "triage"], shadow_models=["cand"])
    p = Promotion(1, "r", "cand", "diagnosis", "cli:x", None, None)  # type: ignore[arg-type]
    now = apply(route, [p])
    assert (now.live, now.shadow, now.applied) == (("cand", "triage"), ("diagnosis",), (p,))
    other_route = Promotion(2, "other", "cand", "diagnosis", "cli:x", None, None)  # type: ignore[arg-type]
    stale = Promotion(3, "r", "gone", "diagnosis", "cli:x", None, None)  # type: ignore[arg-type]
    assert apply(route, [other_route, stale]).live == ("diagnosis", "triage")  # neither fits: not in force


def test_shadow_models_must_be_configured_and_not_also_live(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both a live and a shadow model"):
        Route(name="r", models=["diagnosis"], shadow_models=["diagnosis"])
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("routes:\n  - name: r\n    shadow_models: [nope]\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert any(p.startswith(f"{cfg}:3: routes[0].shadow_models: 'nope'") for p in info.value.problems)


def test_shadows_run_beside_the_live_models_and_promote_and_rollback_swap_them(tmp_path: Path, capsys) -> None:
    from ecgbridge.core.accounts import AccountStore
    from ecgbridge.worker.jobs import SHADOW_ARTIFACT, WorkerContext, analyse_message

    cfg = _config(tmp_path, _candidate(tmp_path))
    settings = load_settings(cfg)
    ctx = WorkerContext.create(settings)
    ctx.store.create_schema()
    data = (FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm").read_bytes()

    def analysed() -> tuple[str, dict]:
        sha, size = ctx.store.save_blob(data)
        mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
        assert analyse_message(ctx, mid) == []
        shadow = json.loads(ctx.store.artifact(mid, SHADOW_ARTIFACT) or b"{}")
        return ctx.store.get_result(mid).models, shadow

    models, shadow = analysed()
    assert models.startswith("diagnosis@0.1.1,triage@") and "candidate" not in models  # delivered: the live ones
    assert shadow["models"] == ["diagnosis-candidate"]
    (out,) = shadow["result"]["outputs"]  # the candidate's findings, without a second set of measurements
    assert (out["model"], out["version"]) == ("diagnosis", "0.1.1-candidate") and len(out["findings"]) == 5

    assert (
        main(["models", "promote", "diagnosis-candidate", "--reason", "better on site data", "--config", str(cfg)]) == 0
    )
    assert "all-ecg: diagnosis-candidate is live, diagnosis is a shadow model" in capsys.readouterr().out
    now = models_in_force(ctx.store, settings.route("all-ecg"), max_age_s=0)
    assert (now.live, now.shadow) == (("diagnosis-candidate", "triage"), ("diagnosis",))
    models, shadow = analysed()
    assert models.startswith("diagnosis@0.1.1-candidate,") and shadow["models"] == ["diagnosis"]
    assert main(["models", "list", "--config", str(cfg)]) == 0
    listed = capsys.readouterr().out
    assert "all-ecg: live diagnosis-candidate, triage; shadow diagnosis" in listed and "better on site data" in listed

    assert main(["models", "rollback", "--config", str(cfg)]) == 0
    assert "diagnosis is live again" in capsys.readouterr().out
    models, _ = analysed()
    assert models.startswith("diagnosis@0.1.1,")
    assert main(["models", "rollback", "--config", str(cfg)]) == 1  # nothing left to undo
    actions = [(e.action, e.target) for e in AccountStore(ctx.store).audit_log(limit=10)]
    assert ("promote_model", "all-ecg:diagnosis-candidate") in actions
    assert ("rollback_model", "all-ecg:diagnosis-candidate") in actions
    capsys.readouterr()
    assert main(["models", "promote", "triage", "--config", str(cfg)]) != 0
    assert "'triage' is not a shadow model of any route now" in capsys.readouterr().err


def test_a_failing_shadow_model_leaves_the_live_result_whole(tmp_path: Path) -> None:
    from ecgbridge.worker.jobs import SHADOW_ARTIFACT, WorkerContext, analyse_message

    broken = _candidate(tmp_path)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    settings = load_settings(_config(tmp_path, broken))
    ctx = WorkerContext.create(settings)
    ctx.store.create_schema()
    sha, size = ctx.store.save_blob((FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm").read_bytes())
    mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    analyse_message(ctx, mid)
    assert ctx.store.get(mid).state == "analysed" and ctx.store.get_result(mid).result["outputs"]
    assert ctx.store.artifact(mid, SHADOW_ARTIFACT) is None
    (event,) = [e for e in ctx.store.events(mid) if e.kind == "shadow_failed"]
    assert event.level == "warning"


def test_settings_without_shadows_read_no_promotions(tmp_path: Path) -> None:
    from ecgbridge.core.store import MessageStore

    settings = Settings(data_dir=tmp_path)
    store = MessageStore(settings.database_url, settings.data_dir)  # no schema: nothing is read
    assert models_in_force(store, settings.routes[0]).live == ("diagnosis",)
