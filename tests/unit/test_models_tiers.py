"""inference.models: risk tiers and calibration in the manifest, CAM summary and explain(), old manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.errors import ModelError
from ecgbridge.inference.models import Manifest, ModelRegistry
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg

CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")


def _manifest_dict(**extra: object) -> dict:
    base = {
        "name": "diagnosis-test",
        "version": "9.9.9",
        "preprocessing": [{"step": "fix_length", "n_samples": 1000}],
        "classes": [{"code": c, "display": c} for c in CLASSES],
        "thresholds": {c: 0.5 for c in CLASSES},
    }
    base.update(extra)
    return base


def _ecg(seed: int = 0) -> Ecg:
    rng = np.random.default_rng(seed)
    t = np.arange(5000) / 500.0
    beat = np.exp(-((((t % 0.8) - 0.2) / 0.01) ** 2))
    x = rng.normal(size=(12, 1)) * beat + 0.02 * rng.normal(size=(12, t.size))
    return Ecg(signals=x.astype(np.float32), leads=STANDARD_LEADS, fs=500.0)


def test_manifest_without_tiers_or_calibration_still_validates() -> None:
    m = Manifest.model_validate(_manifest_dict())
    assert m.tiers is None and m.calibration is None
    assert m.tier("MI", 0.9) is None
    assert m.outputs == {"probabilities": "probabilities"}


def test_manifest_tiers_are_checked_and_applied() -> None:
    m = Manifest.model_validate(_manifest_dict(tiers={"MI": {"moderate": 0.1, "high": 0.4}}))
    assert [m.tier("MI", p) for p in (0.05, 0.1, 0.39, 0.4, 0.99)] == ["low", "moderate", "moderate", "high", "high"]
    assert m.tier("NORM", 0.9) is None  # a class without tiers
    for bad in ({"MI": {"moderate": 0.5, "high": 0.4}}, {"XX": {"moderate": 0.1, "high": 0.4}}, {"MI": {"high": 0.4}}):
        with pytest.raises(ValueError):
            Manifest.model_validate(_manifest_dict(tiers=bad))
    with pytest.raises(ValueError):
        Manifest.model_validate(_manifest_dict(outputs={"cams": "cams"}))


def _export(tmp_path: Path, with_cams: bool, tiers: dict | None) -> Path:
    torch = pytest.importorskip("torch", reason="torch is not installed: building a test model needs it")
    from ecgbridge.training.export import ProbabilityModel, export_model
    from ecgbridge.training.models import ResNetSE1d

    torch.manual_seed(0)
    model = ResNetSE1d(width=8).eval()
    target = model if with_cams else ProbabilityModel(model)
    directory = tmp_path / ("cams" if with_cams else "plain")
    export_model(
        target,
        directory,
        classes=CLASSES,
        thresholds={c: 0.5 for c in CLASSES},
        name="diagnosis-test",
        version="9.9.9",
        tiers=tiers,
        calibration={"method": "none", "in_graph": True} if tiers else None,
        architecture={"arch": "resnet_se", "width": 8, "dropout": 0.3, "members": 1, "cam_stride_samples": 16},
    )
    return directory


def test_run_fills_tiers_and_cam_peaks_and_explain_returns_maps(tmp_path: Path) -> None:
    tiers = {c: {"moderate": 0.2, "high": 0.6} for c in CLASSES}
    directory = _export(tmp_path, with_cams=True, tiers=tiers)
    loaded = ModelRegistry(paths={"diagnosis-test": directory}).get("diagnosis-test")
    ecg = _ecg()
    out = loaded.run(ecg)
    for f in out.findings:
        expected = "high" if f.probability >= 0.6 else "moderate" if f.probability >= 0.2 else "low"
        assert f.tier == expected
    cams = loaded.explain(ecg)
    assert cams.shape == (5, 63)
    step = loaded.manifest.cam_step_s(63)
    assert step == pytest.approx(0.16)  # the architecture's stride: 16 samples at 100 Hz
    for k, code in enumerate(CLASSES):
        assert out.extra["cam_peak_s"][code] == pytest.approx((int(np.argmax(cams[k])) + 0.5) * step, abs=1e-3)
    json.dumps(out.extra)  # results travel as JSON


def test_a_model_without_tiers_or_cams_still_serves(tmp_path: Path) -> None:
    directory = _export(tmp_path, with_cams=False, tiers=None)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["outputs"] == {"probabilities": "probabilities"} and manifest["tiers"] is None
    loaded = ModelRegistry(paths={"diagnosis-test": directory}).get("diagnosis-test")
    out = loaded.run(_ecg())
    assert all(f.tier is None for f in out.findings)
    assert "cam_peak_s" not in out.extra
    with pytest.raises(ModelError):
        loaded.explain(_ecg())
