"""Export parity (probabilities and CAMs), the shipped diagnosis model, tiers, calibration, external data, a tiny train."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.inference.models import SHIPPED_DIR, Manifest, ModelRegistry
from ecgbridge.inference.preprocess import DEFAULT_SPEC, Pipeline
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg
from tests.support.peers import need

# The shipped diagnosis model. A replacement (``training.train`` with ``--model-dir``) goes into
# ``inference/shipped/diagnosis`` with version 0.2.0 and the baseline directory is deleted in the same step.
SHIPPED = SHIPPED_DIR / "diagnosis-baseline"
SHIPPED_VERSION = "0.1.1"


def _shared_ptbxl() -> Path:
    base = os.environ.get("ECGBRIDGE_SHARED_DATA")
    root = Path(base) if base else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    return root.resolve() / "ptbxl-subset"


def _require_ptbxl() -> Path:
    root = _shared_ptbxl()
    if not (root / "ptbxl_database.csv").is_file():
        need(f"shared PTB-XL subset not found at {root} (set ECGBRIDGE_SHARED_DATA); skipping data test")
    return root


def _raw_ecg(rng: np.random.Generator) -> np.ndarray:
    """10 s of spiky periodic 'beats' at 500 Hz in mV-ish units, with wander and noise."""
    t = np.arange(5000) / 500.0
    rr = rng.uniform(0.6, 1.2)
    phase = (t + rng.uniform(0, rr)) % rr
    beat = np.exp(-(((phase - 0.2) / 0.01) ** 2)) + 0.3 * np.exp(-(((phase - 0.45) / 0.05) ** 2))
    return rng.normal(size=(12, 1)) * beat + 0.02 * rng.normal(size=(12, t.size)) + 0.3 * np.sin(0.6 * t)


def _ecg_like(n: int, seed: int = 1) -> np.ndarray:
    """Synthetic ECGs through the serving pipeline: real-ish model inputs without data files."""
    rng = np.random.default_rng(seed)
    pipeline = Pipeline.from_spec(DEFAULT_SPEC)
    return np.stack([pipeline.apply(_raw_ecg(rng), 500.0)[0] for _ in range(n)]).astype(np.float32)


def _real_inputs(n: int) -> np.ndarray | None:
    root = _shared_ptbxl()
    if not (root / "ptbxl_database.csv").is_file():
        return None
    from ecgbridge.training.datasets.ptbxl import load_ptbxl

    return load_ptbxl(root, (9,), limit=n).x


# (1) ONNX export parity -------------------------------------------------------------------


def test_export_matches_torch_within_1e_4(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed: export parity needs it")
    from ecgbridge.training.export import check_parity, export_model
    from ecgbridge.training.models import Cnn1d

    torch.manual_seed(0)
    model = Cnn1d()
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            model(torch.randn(16, 12, 1000) * 1.5 + 0.2)
    model.eval()
    real = _real_inputs(8)
    result = export_model(
        model,
        tmp_path / "m",
        classes=("NORM", "MI", "STTC", "CD", "HYP"),
        thresholds={c: 0.5 for c in ("NORM", "MI", "STTC", "CD", "HYP")},
        real=real,
    )
    onnx_path = Path(result["onnx_path"])
    assert result["parity_max_abs_diff"] < 1e-4
    assert check_parity(model, onnx_path, n=4) < 1e-4

    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = [np.random.default_rng(3).normal(size=(5, 12, 1000)).astype(np.float32), _ecg_like(3)]
    if real is not None:
        inputs.append(real)
    for batch in inputs:
        got = session.run(["probabilities"], {"ecg": batch})[0]
        with torch.no_grad():
            expected = torch.sigmoid(model(torch.from_numpy(batch))).numpy()
        assert got.shape == (len(batch), 5)
        assert np.max(np.abs(got - expected)) < 1e-4

    manifest = Manifest.model_validate(json.loads((tmp_path / "m" / "manifest.json").read_text()))
    assert manifest.preprocessing == DEFAULT_SPEC
    assert manifest.input.leads == list(STANDARD_LEADS)
    assert [c.code for c in manifest.classes] == ["NORM", "MI", "STTC", "CD", "HYP"]


def test_parity_check_raises_on_a_different_model(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed: export parity needs it")
    from ecgbridge.training.export import ParityError, check_parity, export_onnx
    from ecgbridge.training.models import Cnn1d

    torch.manual_seed(0)
    exported = Cnn1d().eval()
    export_onnx(exported, tmp_path / "model.onnx")
    other = Cnn1d().eval()
    with torch.no_grad():
        other.classifier.bias.add_(1.0)
    with pytest.raises(ParityError):
        check_parity(other, tmp_path / "model.onnx")


# (2) the shipped model --------------------------------------------------------------------


def test_shipped_directory_holds_exactly_the_three_files() -> None:
    assert SHIPPED.is_dir(), f"{SHIPPED} is missing: run training.train with --model-dir {SHIPPED}"
    assert sorted(p.name for p in SHIPPED.iterdir()) == ["MODEL_CARD.md", "manifest.json", "model.onnx"]
    assert (SHIPPED / "model.onnx").stat().st_size < 2 * 1024 * 1024
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert "NOT FOR CLINICAL USE" in card.splitlines()[0]


def test_shipped_model_loads_by_name_and_gives_five_probabilities() -> None:
    from ecgbridge.errors import ModelError
    from ecgbridge.training.export import sha256_file

    loaded = ModelRegistry().get("diagnosis")
    manifest = loaded.manifest
    assert loaded.directory == SHIPPED
    assert manifest.name == "diagnosis" and manifest.version == SHIPPED_VERSION and manifest.task == "diagnosis"
    assert manifest.sha256 == sha256_file(loaded.directory / manifest.file)
    assert manifest.preprocessing == DEFAULT_SPEC
    assert set(manifest.thresholds) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert manifest.outputs["probabilities"] == "probabilities"

    # A raw 500 Hz ECG with leads in a scrambled order: serving must preprocess and reorder by name.
    raw = _raw_ecg(np.random.default_rng(1))
    order = list(reversed(STANDARD_LEADS))
    ecg = Ecg(
        signals=np.stack([raw[STANDARD_LEADS.index(lead)] for lead in order]).astype(np.float32),
        leads=tuple(order),
        fs=500.0,
    )
    out = loaded.run(ecg)
    assert out.model == "diagnosis" and out.version == SHIPPED_VERSION
    assert [f.code for f in out.findings] == ["NORM", "MI", "STTC", "CD", "HYP"]
    assert all(0.0 <= f.probability <= 1.0 for f in out.findings)
    model_input = Pipeline.from_spec(DEFAULT_SPEC).apply(raw, 500.0)[0]
    reference = loaded.predict(model_input[None])["probabilities"][0]
    assert np.allclose([f.probability for f in out.findings], reference, atol=1e-5)

    # Tiers and CAMs when the manifest declares them; a manifest without them keeps serving.
    if manifest.tiers:
        assert set(manifest.tiers) == {"NORM", "MI", "STTC", "CD", "HYP"}
        assert all(f.tier in ("low", "moderate", "high") for f in out.findings)
    else:
        assert all(f.tier is None for f in out.findings)
    if "cams" in manifest.outputs:
        cams = loaded.explain(ecg)
        assert cams.shape[0] == 5 and cams.ndim == 2
        assert set(out.extra["cam_peak_s"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
        assert all(0.0 <= t <= 10.0 for t in out.extra["cam_peak_s"].values())
    else:
        assert "cam_peak_s" not in out.extra
        with pytest.raises(ModelError):
            loaded.explain(ecg)

    batch = loaded.predict(_ecg_like(4, seed=7))
    assert batch["probabilities"].shape == (4, 5)
    assert np.all((batch["probabilities"] >= 0.0) & (batch["probabilities"] <= 1.0))


def test_only_one_shipped_model_is_named_diagnosis() -> None:
    names = [json.loads(p.read_text())["name"] for p in SHIPPED_DIR.glob("*/manifest.json")]
    assert names.count("diagnosis") == 1


# (1b) the serving graph: ensemble + calibration + CAMs, parity ------------------------------


def _tiny_resnet(torch, seed: int):
    from ecgbridge.training.models import ResNetSE1d

    torch.manual_seed(seed)
    model = ResNetSE1d(width=8)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for _ in range(2):
            model(torch.randn(8, 12, 1000) * 1.3 + 0.1)
    return model.eval()


def test_serving_graph_parity_for_probabilities_cams_and_logits(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed: export parity needs it")
    import onnxruntime as ort

    from ecgbridge.training.export import ServingGraph, export_model, parity_by_output

    members = [_tiny_resnet(torch, 0), _tiny_resnet(torch, 1)]
    temperature = np.array([1.5, 0.8, 1.0, 2.0, 1.2], dtype=np.float32)
    offset = np.array([0.0, 0.3, -0.2, 0.0, 0.5], dtype=np.float32)
    graph = ServingGraph(members, temperature=temperature, offset=offset).eval()
    result = export_model(
        graph,
        tmp_path / "m",
        classes=("NORM", "MI", "STTC", "CD", "HYP"),
        thresholds={c: 0.5 for c in ("NORM", "MI", "STTC", "CD", "HYP")},
        real=_real_inputs(4),
    )
    assert set(result["parity"]) == {"probabilities", "cams", "logits"}
    assert max(result["parity"].values()) < 1e-4
    manifest = Manifest.model_validate(json.loads((tmp_path / "m" / "manifest.json").read_text()))
    assert manifest.outputs == {"probabilities": "probabilities", "cams": "cams", "logits": "logits"}

    session = ort.InferenceSession(result["onnx_path"], providers=["CPUExecutionProvider"])
    for batch in (_ecg_like(3), np.random.default_rng(5).normal(size=(1, 12, 1000)).astype(np.float32)):
        probs, cams, logits = session.run(["probabilities", "cams", "logits"], {"ecg": batch})
        with torch.no_grad():
            x = torch.from_numpy(batch)
            ref_cams = torch.stack([m.class_activation_map(x) for m in members]).mean(0).numpy()
            ref_logits = torch.stack([m(x) for m in members]).mean(0).numpy()
        ref_probs = 1 / (1 + np.exp(-(ref_logits - offset) / temperature))
        assert cams.shape == (len(batch), 5, 63)
        assert np.max(np.abs(cams - ref_cams)) < 1e-4
        assert np.max(np.abs(logits - ref_logits)) < 1e-4
        assert np.max(np.abs(probs - ref_probs)) < 1e-4
        # CAM is exact for a GAP head: logit = time mean of the CAM + bias (member means).
        bias = np.mean([m.classifier.bias.detach().numpy() for m in members], axis=0)
        assert np.allclose(cams.mean(-1) + bias, logits, atol=1e-4)
    assert parity_by_output(graph, Path(result["onnx_path"]), n=2)["cams"] < 1e-4


# evaluation helpers -----------------------------------------------------------------------


def test_rank_auroc_matches_known_values_and_handles_ties() -> None:
    from ecgbridge.training.evaluate import auroc, best_f1_threshold, threshold_metrics

    assert auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auroc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(auroc(np.array([1, 1]), np.array([0.2, 0.3])))
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    thr = best_f1_threshold(y, s)
    assert 0.3 < thr < 0.7
    m = threshold_metrics(y, s, thr)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 0, 0, 3) and m["f1"] == 1.0


def test_patient_bootstrap_is_seeded() -> None:
    from ecgbridge.training.evaluate import bootstrap_auroc

    rng = np.random.default_rng(0)
    y = (rng.random((60, 2)) < 0.4).astype(float)
    s = y * 0.5 + rng.random((60, 2))
    pids = np.repeat(np.arange(30), 2)
    a = bootstrap_auroc(y, s, pids, n_bootstrap=50, seed=3)
    b = bootstrap_auroc(y, s, pids, n_bootstrap=50, seed=3)
    assert a == b and a["macro_ci"][0] <= a["macro_ci"][1]


# (3) tiny end-to-end train ----------------------------------------------------------------


def test_tiny_end_to_end_train_export_evaluate(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="torch is not installed: training needs it")
    root = _require_ptbxl()
    from ecgbridge.training.train import train_diagnosis

    out_dir, model_dir = tmp_path / "out", tmp_path / "model"
    result = train_diagnosis(
        root,
        out_dir,
        epochs=1,
        batch_size=16,
        model_dir=model_dir,
        limit=24,
        n_bootstrap=20,
        threads=1,
        log=False,
        width=8,
    )
    assert sorted(p.name for p in model_dir.iterdir()) == ["MODEL_CARD.md", "manifest.json", "model.onnx"]
    assert (out_dir / "model.pt").is_file()
    loaded = ModelRegistry(paths={"diagnosis": model_dir}).get("diagnosis")
    assert loaded.directory == model_dir
    metrics = result["metrics"]
    assert metrics["n"] == metrics["data"]["n_records"] > 0
    assert set(metrics["classes"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    for c in metrics["classes"].values():
        assert c["positives"] + c["negatives"] == metrics["n"]
    assert result["training"]["export"]["parity_max_abs_diff"] < 1e-4
    assert max(result["training"]["export"]["parity"].values()) < 1e-4
    assert {r["loss"] for r in result["training"]["loss_comparison"]} == {"focal", "bce"}
    manifest = loaded.manifest
    assert set(manifest.tiers or {}) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert all(t["moderate"] <= t["high"] for t in manifest.tiers.values())
    assert "after" in metrics["calibration"] and "before" in metrics["calibration"]
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert card.splitlines()[0].endswith("NOT FOR CLINICAL USE")
    assert result["report"] in card
    assert "Focal loss vs BCE" in card and "Risk tiers" in card
