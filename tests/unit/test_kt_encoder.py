"""The knowledge-transfer recipe (training.kt): a CI-sized end-to-end run that checks the pipeline, not the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training extra is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from tests.support.tiny_ptbxl import write_tiny_ptbxl  # noqa: E402

CODES = ["{'NORM': 100.0}", "{'ASMI': 100.0, 'ISC_': 50.0}", "{'CLBBB': 100.0, '1AVB': 100.0}", "{'LVH': 100.0}"]


def _tiny_ptbxl(root: Path) -> Path:
    """20 records, 4 per fold pair: folds 1-8 train (12), fold 9 (4), fold 10 (4); ages, sexes, some BMIs."""
    rows = []
    rng = np.random.default_rng(0)
    folds = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 9, 9, 9, 9, 10, 10, 10, 10]
    for i, fold in enumerate(folds):
        height: float | str = float(rng.integers(150, 190)) if i % 2 == 0 else ""
        weight: float | str = float(rng.integers(50, 120))
        rows.append((i + 1, 100 + i, float(rng.integers(20, 90)), i % 2, height, weight, CODES[i % 4], fold))
    return write_tiny_ptbxl(root, rows)


def test_kt_runs_end_to_end_and_exports_the_abnormality_heads(tmp_path: Path) -> None:
    import onnxruntime as ort

    from ecgbridge.inference.models import load_manifest
    from ecgbridge.training.kt import train_kt

    data = _tiny_ptbxl(tmp_path / "ptbxl")
    result = train_kt(
        data,
        tmp_path / "out",
        arch="cnn",
        width=8,
        epochs=1,
        pretrain_epochs=1,
        pretrain_batch_size=8,
        batch_size=8,
        compare=True,
        n_bootstrap=20,
        log=False,
    )
    model_dir = tmp_path / "out" / "diagnosis-kt"
    manifest = load_manifest(model_dir)
    assert manifest.outputs["abnormalities"] == "abnormalities" and manifest.task == "diagnosis"
    heads = [h["code"] for h in (manifest.architecture or {})["abnormality_heads"]]
    assert heads[:1] == ["age_over_65"] and "male_sex" in heads
    assert result["export"]["parity"]["abnormalities"] <= 1e-4
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(["probabilities", "abnormalities"], {"ecg": np.zeros((3, 12, 1000), np.float32)})
    assert out[0].shape == (3, 5) and out[1].shape == (3, len(heads))
    assert set(result["comparison"]["seed_ensemble_macro_auroc"]) == {"signal-only", "knowledge-transfer", "multimodal"}
    assert (tmp_path / "out" / "clinical_manifest.jsonl").is_file()
    assert "Three-way comparison" in (model_dir / "MODEL_CARD.md").read_text()
    assert json.loads((tmp_path / "out" / "result.json").read_text())["stage1"][0]["with_clinical"] == 12
    # single-seed runs pool into one comparison
    from ecgbridge.training.kt import main

    assert (
        main(
            [
                "combine",
                str(tmp_path / "out"),
                str(tmp_path / "out"),
                "--out",
                str(tmp_path / "cmp"),
                "--n-bootstrap",
                "10",
            ]
        )
        == 0
    )
    pooled = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert pooled["n_seeds"] == {"signal-only": 2, "knowledge-transfer": 2, "multimodal": 2}


def test_clip_loss_is_low_for_matching_pairs() -> None:
    from ecgbridge.training.kt import clip_loss

    a = torch.eye(4)
    assert float(clip_loss(a, a, 0.1)) < 0.01 < float(clip_loss(a, a.roll(1, 0), 0.1))


def test_cli_knows_train_kt() -> None:
    from ecgbridge.cli import TRAINING_ENTRIES

    assert TRAINING_ENTRIES["kt"] == ("ecgbridge.training.kt", "ecgbridge.training.evaluate")


def test_kt_graph_exports_abnormalities_with_parity(tmp_path: Path) -> None:
    from ecgbridge.training.export import check_parity, export_model, parity_by_output
    from ecgbridge.training.kt import KtServingGraph, embed
    from ecgbridge.training.models import Cnn1d

    torch.manual_seed(0)
    members = [Cnn1d(width=8), Cnn1d(width=8)]
    for m in members:
        m.train()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            m(torch.randn(8, 12, 1000))
        m.eval()
    heads = [torch.nn.Linear(32, 3), torch.nn.Linear(32, 3)]
    graph = KtServingGraph(members, heads, temperature=[1.5] * 5, offset=[0.1] * 5).eval()
    x = torch.randn(4, 12, 1000)
    with torch.no_grad():
        probabilities, _cams, _logits, abnormalities = graph(x)
        expected = torch.stack([torch.sigmoid(h(embed(m, x))) for m, h in zip(members, heads)]).mean(0)
    assert torch.allclose(abnormalities, expected, atol=1e-6) and probabilities.shape == (4, 5)
    result = export_model(
        graph,
        tmp_path / "m",
        classes=("NORM", "MI", "STTC", "CD", "HYP"),
        thresholds=dict.fromkeys(("NORM", "MI", "STTC", "CD", "HYP"), 0.5),
        name="kt-test",
        version="0.0.1",
    )
    assert result["manifest"]["outputs"]["abnormalities"] == "abnormalities"
    assert check_parity(graph, tmp_path / "m" / "model.onnx") <= 1e-4
    assert parity_by_output(graph, tmp_path / "m" / "model.onnx")["abnormalities"] <= 1e-4


def test_compare_arms_pairs_every_arm_present() -> None:
    from ecgbridge.training.kt import compare_arms

    rng = np.random.default_rng(0)
    y = (rng.random((40, 5)) < 0.4).astype(np.float32)
    good = [y + rng.normal(0, 0.5, y.shape) for _ in range(2)]
    noise = [rng.normal(0, 1, y.shape) for _ in range(2)]
    out = compare_arms(
        y, np.arange(40), {"signal-only": noise, "ssl-only": noise, "knowledge-transfer": good}, n_bootstrap=50
    )
    assert list(out["paired_differences"]) == [
        "ssl-only - signal-only",
        "knowledge-transfer - signal-only",
        "knowledge-transfer - ssl-only",
    ]
    assert out["paired_differences"]["knowledge-transfer - signal-only"]["ci"][0] > 0
    assert out["paired_differences"]["ssl-only - signal-only"]["diff"] == 0
