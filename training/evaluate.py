"""Evaluate an *exported* diagnosis model on a PTB-XL fold, the way serving runs it.

The ONNX file is loaded through ``inference.models`` (registry, sha256 check,
onnxruntime session) and each record goes through ``prepare_input``, i.e. the
manifest's own preprocessing pipeline. What this prints is therefore a
measurement of the artefact that ships, not of the torch checkpoint.

AUROC is computed from rank statistics (Mann-Whitney U, ties averaged); 95%
confidence intervals are percentile intervals over a bootstrap that resamples
*patients* (all records of a drawn patient come along), matching the
patient-level split. Replicates in which a class has no positive or no
negative are skipped and counted.

    ecgbridge evaluate diagnosis --model inference/shipped/diagnosis-baseline --data /path/to/ptbxl [--fold 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata

from inference.models import ModelRegistry, load_manifest, prepare_input
from mapping.ecg import STANDARD_LEADS, Ecg

from .datasets.ptbxl import load_ptbxl

__all__ = [
    "auroc",
    "macro_auroc",
    "bootstrap_auroc",
    "threshold_metrics",
    "best_f1_threshold",
    "predict_fold",
    "evaluate_diagnosis",
    "format_report",
    "to_jsonable",
    "main",
]


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via ranks; NaN when only one class is present."""
    y = np.asarray(y_true).astype(bool)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean of per-class AUROCs (NaN if any class is undefined)."""
    return float(np.mean([auroc(y_true[:, k], scores[:, k]) for k in range(y_true.shape[1])]))


def _patient_groups(patient_ids: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(patient_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


def bootstrap_auroc(
    y_true: np.ndarray,
    scores: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Patient-level percentile bootstrap of per-class and macro AUROC."""
    rng = np.random.default_rng(seed)
    groups = _patient_groups(np.asarray(patient_ids))
    n_classes = y_true.shape[1]
    per_class: list[list[float]] = [[] for _ in range(n_classes)]
    macro: list[float] = []
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, len(groups), size=len(groups))
        idx = np.concatenate([groups[g] for g in drawn])
        values = [auroc(y_true[idx, k], scores[idx, k]) for k in range(n_classes)]
        for k, v in enumerate(values):
            if not np.isnan(v):
                per_class[k].append(v)
        if not np.any(np.isnan(values)):
            macro.append(float(np.mean(values)))

    def interval(samples: list[float]) -> tuple[float, float] | None:
        if not samples:
            return None
        lo, hi = np.percentile(samples, [2.5, 97.5])
        return float(lo), float(hi)

    return {
        "macro_ci": interval(macro),
        "macro_valid": len(macro),
        "class_ci": [interval(s) for s in per_class],
        "class_valid": [len(s) for s in per_class],
    }


def threshold_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion counts, sensitivity, specificity, PPV and F1 at ``score >= threshold``."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(score) >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else float("nan")

    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def best_f1_threshold(y_true: np.ndarray, score: np.ndarray) -> float:
    """Threshold maximising F1, placed midway between neighbouring scores.

    Ties are broken towards the middle of the tied range so a threshold does not
    sit on one validation record's score. Returns 0.5 when there are no positives.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.unique(np.asarray(score, dtype=np.float64))
    if not y.any() or s.size == 0:
        return 0.5
    candidates = np.concatenate([[s[0] / 2.0], (s[:-1] + s[1:]) / 2.0, [(s[-1] + 1.0) / 2.0]])
    f1 = np.array([threshold_metrics(y, score, t)["f1"] for t in candidates])
    f1 = np.nan_to_num(f1, nan=0.0)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    return float(candidates[best[len(best) // 2]])


def predict_fold(
    model_dir: Path,
    data_dir: Path,
    *,
    fold: int = 10,
    sampling_rate: int = 100,
    batch_size: int = 64,
) -> tuple[np.ndarray, Any, Any]:
    """Probabilities of the exported model on a fold -> (probs, PtbxlData, LoadedModel)."""
    manifest = load_manifest(Path(model_dir))
    loaded = ModelRegistry(paths={manifest.name: Path(model_dir)}).get(manifest.name)

    def serve_transform(signal: np.ndarray, fs: float, units: str) -> np.ndarray:
        ecg = Ecg(signals=signal, leads=STANDARD_LEADS, fs=fs, source_format="wfdb", units=units)
        return prepare_input(ecg, loaded.manifest)

    data = load_ptbxl(data_dir, (fold,), sampling_rate=sampling_rate, transform=serve_transform)
    chunks = [
        loaded.predict(data.x[i : i + batch_size])["probabilities"] for i in range(0, len(data), batch_size)
    ]
    probs = np.concatenate(chunks) if chunks else np.zeros((0, len(loaded.manifest.classes)), np.float32)
    return probs, data, loaded


def evaluate_diagnosis(
    model_dir: Path,
    data_dir: Path,
    *,
    fold: int = 10,
    n_bootstrap: int = 1000,
    seed: int = 0,
    sampling_rate: int = 100,
) -> dict[str, Any]:
    """Measure the exported model on one PTB-XL fold; every number in the model card comes from here."""
    probs, data, loaded = predict_fold(model_dir, data_dir, fold=fold, sampling_rate=sampling_rate)
    manifest = loaded.manifest
    codes = [c.code for c in manifest.classes]
    # Align label columns to the model's class order by code, never by position.
    y = np.stack([data.y[:, data.classes.index(code)] for code in codes], axis=1)
    boot = bootstrap_auroc(y, probs, data.patient_ids, n_bootstrap=n_bootstrap, seed=seed)
    classes: dict[str, Any] = {}
    for k, code in enumerate(codes):
        thr = manifest.threshold(code)
        classes[code] = {
            "positives": int(y[:, k].sum()),
            "negatives": int(len(y) - y[:, k].sum()),
            "auroc": auroc(y[:, k], probs[:, k]),
            "auroc_ci": boot["class_ci"][k],
            "bootstrap_valid": boot["class_valid"][k],
            "threshold": thr,
            **threshold_metrics(y[:, k], probs[:, k], thr),
        }
    return {
        "model": {
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.sha256,
            "directory": str(model_dir),
        },
        "data": {
            "data_dir": str(data_dir),
            "fold": fold,
            "sampling_rate": sampling_rate,
            "n_records": len(data),
            "n_patients": int(np.unique(data.patient_ids).size),
            "n_unlabelled_excluded": data.n_unlabelled,
        },
        "n": len(data),
        "macro_auroc": macro_auroc(y, probs),
        "macro_auroc_ci": boot["macro_ci"],
        "bootstrap": {
            "n": n_bootstrap,
            "valid": boot["macro_valid"],
            "unit": "patient",
            "seed": seed,
            "interval": "percentile 2.5-97.5",
        },
        "classes": classes,
    }


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


def format_report(metrics: dict[str, Any]) -> str:
    """The human-readable table; ``training.cards`` copies it verbatim into the model card."""
    m, d, b = metrics["model"], metrics["data"], metrics["bootstrap"]
    lines = [
        f"model {m['name']} {m['version']} (sha256 {str(m['sha256'])[:12]}) on PTB-XL strat_fold {d['fold']}: "
        f"{d['n_records']} records, {d['n_patients']} patients "
        f"({d['n_unlabelled_excluded']} records without a superclass label excluded)",
        f"macro-AUROC {_f(metrics['macro_auroc'])} (95% CI {_ci(metrics['macro_auroc_ci'])}; "
        f"{b['unit']}-level bootstrap, {b['valid']}/{b['n']} valid resamples, seed {b['seed']})",
        "",
        f"{'class':<6} {'pos':>4} {'neg':>4}  {'AUROC':>5}  {'95% CI':<11}  {'thr':>5}  "
        f"{'sens':>5} {'(TP/P)':>8}  {'spec':>5} {'(TN/N)':>8}  {'PPV':>5}  {'F1':>5}",
    ]
    for code, c in metrics["classes"].items():
        sens_counts = "({}/{})".format(c["tp"], c["positives"])
        spec_counts = "({}/{})".format(c["tn"], c["negatives"])
        lines.append(
            f"{code:<6} {c['positives']:>4} {c['negatives']:>4}  {_f(c['auroc']):>5}  {_ci(c['auroc_ci']):<11}  "
            f"{_f(c['threshold']):>5}  {_f(c['sensitivity']):>5} {sens_counts:>8}  "
            f"{_f(c['specificity']):>5} {spec_counts:>8}  {_f(c['ppv']):>5}  {_f(c['f1']):>5}"
        )
    return "\n".join(lines)


def to_jsonable(value: Any) -> Any:
    """Metrics with NaN -> None and tuples -> lists, so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecgbridge evaluate diagnosis", description=__doc__.split("\n")[0])
    parser.add_argument("--model", dest="model_dir", type=Path, required=True,
                        help="directory with manifest.json and model.onnx (e.g. inference/shipped/diagnosis-baseline)")
    parser.add_argument("--data", dest="data_dir", type=Path, required=True, help="PTB-XL root (holds ptbxl_database.csv)")
    parser.add_argument("--fold", type=int, default=10)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampling-rate", type=int, choices=(100, 500), default=100)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    args = parser.parse_args(argv)
    metrics = evaluate_diagnosis(
        args.model_dir,
        args.data_dir,
        fold=args.fold,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        sampling_rate=args.sampling_rate,
    )
    print(json.dumps(to_jsonable(metrics), indent=2) if args.json else format_report(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
