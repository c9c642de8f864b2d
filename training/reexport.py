"""Re-export a shipped CNN's ONNX with CAMs, fold-9 calibration and risk tiers, without retraining.

Why: the 0.1.0 baseline was exported before the serving graph had class activation maps,
calibration and tiers. No retrained candidate beat it on the validation fold by a margin
that held, so rather than ship a worse network to gain those outputs, this rebuilds the
same network in torch from the ONNX weights (the exporter had folded each BatchNorm into
its convolution, so the BatchNorms become identities), checks it reproduces the old
graph's probabilities, fits calibration, thresholds and tiers on fold 9 exactly as
``training.train`` does, and exports through ``training.export`` (probabilities + cams +
logits, parity-checked). Fold 10 and the external sources are evaluated afterwards and
decide nothing.

    python -m ecgbridge.training.reexport --model inference/shipped/diagnosis-baseline \\
        --data ../shared/data/ptbxl-subset --out /tmp/reexport --version 0.1.1 \\
        [--external ../shared/data/challenge/cinc2021]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ecgbridge.inference.models import load_manifest
from ecgbridge.inference.preprocess import DEFAULT_SPEC
from ecgbridge.training.calibration import (
    apply_calibration,
    choose_tiers,
    ece,
    fit_calibration,
    min_sensitivity_threshold,
    sigmoid,
)
from ecgbridge.training.datasets.ptbxl import SUPERCLASSES, TEST_FOLDS, TRAIN_FOLDS, VAL_FOLDS, load_ptbxl
from ecgbridge.training.evaluate import evaluate_diagnosis, evaluate_external, format_report, macro_auroc
from ecgbridge.training.export import ServingGraph, export_model
from ecgbridge.training.models.cnn1d import Cnn1d
from ecgbridge.training.train import _logits, class_pos_weight

__all__ = ["cnn_from_onnx", "reexport", "main"]

#: Largest difference allowed between the old graph's probabilities and the rebuilt network's.
REBUILD_TOLERANCE = 1e-5


def _initializers(onnx_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def cnn_from_onnx(onnx_path: Path, dropout: float = 0.3) -> Cnn1d:
    """A ``Cnn1d`` (eval mode) carrying the weights of an exported one with folded BatchNorms."""
    weights = _initializers(onnx_path)
    conv = sorted(
        (k for k in weights if re.fullmatch(r".*features\.(\d+)\.0\.weight", k)),
        key=lambda k: int(re.findall(r"features\.(\d+)\.0\.weight", k)[0]),
    )
    head_w = next(v for k, v in weights.items() if k.endswith("classifier.weight"))
    head_b = next(v for k, v in weights.items() if k.endswith("classifier.bias"))
    model = Cnn1d(
        n_leads=weights[conv[0]].shape[1], n_classes=head_w.shape[0], width=head_w.shape[1] // 4, dropout=dropout
    )
    if len(conv) != len(model.features):
        raise ValueError(f"{onnx_path}: {len(conv)} convolutions, Cnn1d has {len(model.features)} blocks")
    with torch.no_grad():
        for block, key in zip(model.features, conv):
            layers = cast(torch.nn.Sequential, block)  # a Cnn1d block: Conv1d, BatchNorm1d, ReLU[, MaxPool1d]
            conv_layer, bn = cast(torch.nn.Conv1d, layers[0]), cast(torch.nn.BatchNorm1d, layers[1])
            w, b = weights[key], weights.get(key + "_bias")
            if tuple(conv_layer.weight.shape) != w.shape or b is None:
                raise ValueError(
                    f"{onnx_path}: {key} {w.shape} does not fit {tuple(conv_layer.weight.shape)} "
                    "(or its folded bias is missing)"
                )
            conv_layer.weight.copy_(torch.from_numpy(w))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
            assert bn.running_mean is not None and bn.running_var is not None  # tracked: BatchNorm1d's default
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)  # (x - 0) / sqrt(var + eps) = x
        model.classifier.weight.copy_(torch.from_numpy(head_w))
        model.classifier.bias.copy_(torch.from_numpy(head_b))
    return model.eval()


def _old_probabilities(model_dir: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    manifest = load_manifest(model_dir)
    session = ort.InferenceSession(str(model_dir / manifest.file), providers=["CPUExecutionProvider"])
    return cast(
        np.ndarray, session.run([manifest.outputs["probabilities"]], {manifest.input.name: x.astype(np.float32)})[0]
    )


def reexport(
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    *,
    version: str,
    external: Path | None = None,
    threshold_rule: str = "keep",
    min_sensitivity: float = 0.8,
    tier_catch: float = 0.95,
    tier_specificity: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Rebuild, calibrate on fold 9, export to ``out_dir``, evaluate; returns what the card prints."""
    old = load_manifest(model_dir)
    model = cnn_from_onnx(model_dir / old.file)
    train = load_ptbxl(data_dir, TRAIN_FOLDS)
    val = load_ptbxl(data_dir, VAL_FOLDS)
    z_val = _logits(model, val.x, torch.device("cpu"))
    rebuilt_gap = float(np.max(np.abs(sigmoid(z_val) - _old_probabilities(model_dir, val.x))))
    if rebuilt_gap > REBUILD_TOLERANCE:
        raise ValueError(f"rebuilt network differs from {model_dir} by {rebuilt_gap:.2e} on fold 9")
    pos_weight = class_pos_weight(train.y)
    calib = fit_calibration(val.y, z_val, pos_weight, seed=seed)
    p_val = apply_calibration(z_val, calib["temperature"], calib["offset"])
    thresholds, tiers, tier_detail = {}, {}, {}
    for k, code in enumerate(SUPERCLASSES):
        if threshold_rule == "keep":  # the old decision, carried through the (monotonic) calibration
            old_t = float(np.clip(old.thresholds[code], 1e-7, 1 - 1e-7))
            z_old = np.full((1, len(SUPERCLASSES)), np.log(old_t / (1 - old_t)))
            thresholds[code] = round(float(apply_calibration(z_old, calib["temperature"], calib["offset"])[0, k]), 6)
        else:
            thresholds[code] = round(
                min_sensitivity_threshold(val.y[:, k], p_val[:, k], min_sensitivity)["threshold"], 6
            )
        t = choose_tiers(val.y[:, k], p_val[:, k], catch=tier_catch, specificity=tier_specificity)
        tiers[code] = {"moderate": t["moderate"], "high": t["high"]}
        tier_detail[code] = t
    graph = ServingGraph([model], temperature=calib["temperature"], offset=calib["offset"]).eval()
    exported = export_model(
        graph,
        out_dir,
        classes=SUPERCLASSES,
        thresholds=thresholds,
        real=val.x[:8],
        name=old.name,
        version=version,
        task="diagnosis",
        description=(
            f"{old.name} {old.version}'s network re-exported with class activation maps, fold-9 calibration "
            "and risk tiers; research use only, NOT FOR CLINICAL USE."
        ),
        trained_on=old.trained_on,
        preprocessing=DEFAULT_SPEC,
        tiers=tiers,
        calibration={
            "method": calib["method"],
            "variant": calib["variant"],
            "fitted_on": f"PTB-XL strat_fold 9 ({len(val)} records)",
            "temperature": {c: round(float(v), 6) for c, v in zip(SUPERCLASSES, calib["temperature"])},
            "offset": {c: round(float(v), 6) for c, v in zip(SUPERCLASSES, calib["offset"])},
            "in_graph": True,
            "uncalibrated_output": "logits",
        },
        architecture={
            "module": "training.models.Cnn1d",
            "arch": "cnn",
            "width": model.classifier.in_features // 4,
            "dropout": float(model.dropout.p),
            "members": 1,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "cam_stride_samples": 16,
            "rebuilt_from": f"{old.name} {old.version} (sha256 {old.sha256})",
        },
    )
    test_metrics = evaluate_diagnosis(out_dir, data_dir, fold=TEST_FOLDS[0], n_bootstrap=n_bootstrap, seed=seed)
    external_metrics = (
        evaluate_external(out_dir, external, train_data=data_dir, n_bootstrap=n_bootstrap, seed=seed)
        if external is not None
        else None
    )
    return {
        "old": old,
        "rebuilt_gap": rebuilt_gap,
        "threshold_rule": threshold_rule,
        "calibration": calib,
        "thresholds": thresholds,
        "tiers": tier_detail,
        "ece_val": {"before": ece(val.y, sigmoid(z_val)), "after": ece(val.y, p_val)},
        "fold9_macro_auroc": macro_auroc(val.y, z_val),
        "n_val": len(val),
        "exported": exported,
        "test_report": format_report(test_metrics),
        "external_report": format_report(external_metrics) if external_metrics is not None else None,
    }


def render_card(summary: dict[str, Any], old_card: str, command: str) -> str:
    """The old card's description of data, split and training, then what this export adds, as measured."""
    old = summary["old"]
    keep = old_card.split("\n## Thresholds", 1)[0].split("\n", 1)[1]  # drop the old title line
    calib = summary["calibration"]
    lines = [
        f"# {old.name} {summary['exported']['manifest']['version']}: baseline network with CAMs, calibration and risk "
        "tiers, NOT FOR CLINICAL USE",
        "",
        f"The network is {old.name} {old.version}'s, weight for weight: `training.reexport` rebuilt it in torch from "
        f"the ONNX file (sha256 `{old.sha256}`; its BatchNorms were folded into the convolutions), checked it "
        f"reproduces the old probabilities on fold 9 (largest difference {summary['rebuilt_gap']:.1e}), and exported "
        "it again through `training.export` with `cams` and `logits` outputs, calibration inside the graph and risk "
        "tiers in the manifest. Everything below up to *Calibration* is the original card's; no training happened.",
        f"Command: `{command}`",
        keep.rstrip(),
        "",
        "## Calibration",
        f"{calib['method']}, fitted on PTB-XL strat_fold 9 ({summary['n_val']} "
        f"records), variant chosen by cross-validated NLL within fold 9: **{calib['variant']}**.",
        "",
        "| class | T | offset |",
        "|---|---|---|",
        *(
            f"| {c} | {float(t):.3f} | {float(o):.3f} |"
            for c, t, o in zip(SUPERCLASSES, calib["temperature"], calib["offset"])
        ),
        "",
        f"Fold-9 ECE (mean over classes) {summary['ece_val']['before']['mean']:.3f} before, "
        f"{summary['ece_val']['after']['mean']:.3f} after (fitted there; fold 10 below).",
        "",
        "## Decision thresholds and risk tiers",
        (
            f"Thresholds: {old.name} {old.version}'s own (max F1 on fold 9), carried through the calibration, so every "
            "present / absent decision is unchanged. (The min-sensitivity rule of `training.train`, tried first, caught "
            "8/10 HYP on fold 10 instead of 0/10 but lowered CD's threshold so far that a normal ECG with 35 % "
            "baseline wander, which the quality gate accepts, was called CD: tests/unit/test_quality.py.) "
            if summary["threshold_rule"] == "keep"
            else "Thresholds: per class, on fold-9 calibrated probabilities, the best-F1 threshold among those catching "
            ">= 80 % of fold-9 positives. "
        )
        + "Tiers: moderate = the highest cut-off at which Moderate + High catch >= 95 % of fold-9 positives; high = "
        "the lowest at which <= 5 % of fold-9 negatives reach High.",
        "",
        "| class | threshold | moderate | high | fold-9 positives |",
        "|---|---|---|---|---|",
        *(
            f"| {c} | {summary['thresholds'][c]:.4f} | {summary['tiers'][c]['moderate']:.4f} | "
            f"{summary['tiers'][c]['high']:.4f} | {summary['tiers'][c].get('positives', '')} |"
            for c in SUPERCLASSES
        ),
        "",
        "## Evaluation (fold 10 and external sources; measured after every choice, through the serving path)",
        "```",
        summary["test_report"].rstrip(),
        "```",
    ]
    if summary["external_report"]:
        lines += ["", "```", summary["external_report"].rstrip(), "```"]
    lines += [
        "",
        "## Known limits",
        "- Fold-10 macro-AUROC is the 0.1.0 network's (the ranking is unchanged by calibration); the issue's target "
        "of 0.93 is not reached.",
        "- The MI class activation map of the MI test fixture (ptbxl_00622) is lower over QRS + ST than over the "
        "rest of the beat (see tests/unit/test_explain.py KNOWN_FAILURES): the heatmap marks time, and for this "
        "network it should not be read as where the MI evidence lies.",
        "",
        "NOT FOR CLINICAL USE: every result this model produces says so.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecgbridge.training.reexport", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="shipped model directory (manifest + ONNX)")
    parser.add_argument("--data", type=Path, required=True, help="PTB-XL root the model was trained on")
    parser.add_argument("--out", type=Path, required=True, help="new model directory")
    parser.add_argument("--version", required=True)
    parser.add_argument("--external", type=Path, default=None)
    parser.add_argument(
        "--thresholds",
        choices=("keep", "min-sensitivity"),
        default="keep",
        help="keep the old decisions (default) or choose new ones on fold 9",
    )
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    command = "python -m ecgbridge.training.reexport " + " ".join(sys.argv[1:] if argv is None else list(argv))
    summary = reexport(
        args.model,
        args.data,
        args.out,
        version=args.version,
        external=args.external,
        threshold_rule=args.thresholds,
        n_bootstrap=args.n_bootstrap,
    )
    old_card = (args.model / "MODEL_CARD.md").read_text()
    (args.out / "MODEL_CARD.md").write_text(render_card(summary, old_card, command))
    print(summary["test_report"])
    if summary["external_report"]:
        print(summary["external_report"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
