"""Evaluate an *exported* diagnosis model the way serving runs it: a PTB-XL fold or external challenge data.

The ONNX file is loaded through ``inference.models`` (registry, sha256 check,
onnxruntime session) and each record goes through ``prepare_input``, i.e. the
manifest's own preprocessing pipeline. What this prints is therefore a
measurement of the artefact that ships, not of the torch checkpoint.

AUROC is computed from rank statistics (Mann-Whitney U, ties averaged); 95%
confidence intervals are percentile intervals over a bootstrap that resamples
*patients* (all records of a drawn patient come along), matching the
patient-level split. Replicates in which a class has no positive or no
negative are skipped and counted.

Calibration: ECE (``training.calibration.ece``) of the ``probabilities`` output
("after") and, when the graph also exports the uncalibrated ``logits``, of
``sigmoid(logits)`` ("before"); this is why the graph exports ``logits``.

The layout of ``--data`` is detected: a directory with ``ptbxl_database.csv`` is
PTB-XL (``--fold``, default 10); a directory of challenge ``.hea`` files with
``#Dx`` lines is evaluated per source database (Georgia, PTB-XL, Chapman/Ningbo,
...). A class with no positive (or no negative) in a set gets AUROC "n/a" and is
left out of that set's macro-AUROC, which the report says. The challenge's
PTB-XL (``HR``) records are looked up in ``--train-data`` (the PTB-XL directory
the model was trained on) and any that are in it are dropped from the metrics
and listed.

    ecgbridge evaluate diagnosis [--model inference/shipped/NAME] --data /path/to/ptbxl [--fold 10] [--json]
    ecgbridge evaluate diagnosis --model inference/shipped/NAME --data /path/to/cinc2021 --train-data /path/to/ptbxl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecgbridge.inference.metrics import (
    auroc,
    bootstrap_auroc,
    macro_auroc,
    macro_auroc_defined,
    patient_groups,
    patient_resamples,
    threshold_metrics,
)
from ecgbridge.inference.models import ModelRegistry, load_manifest, prepare_input
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg
from ecgbridge.training.calibration import ece, sigmoid
from ecgbridge.training.datasets.challenge import is_challenge_dir, load_challenge, ptbxl_overlap
from ecgbridge.training.datasets.ptbxl import load_ptbxl

_patient_groups = patient_groups  # the name lvef_evaluate imports

__all__ = [
    "auroc",
    "macro_auroc",
    "bootstrap_auroc",
    "threshold_metrics",
    "best_f1_threshold",
    "macro_auroc_defined",
    "patient_resamples",
    "predict_fold",
    "predict_outputs",
    "metrics_for",
    "evaluate_diagnosis",
    "evaluate_external",
    "format_report",
    "to_jsonable",
    "main",
]


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


def predict_outputs(loaded: Any, x: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Every declared output of an exported model on preprocessed inputs (N, leads, samples)."""
    chunks: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), batch_size):
        for role, value in loaded.predict(x[i : i + batch_size]).items():
            chunks.setdefault(role, []).append(value)
    if not chunks:
        return {"probabilities": np.zeros((0, len(loaded.manifest.classes)), np.float32)}
    return {role: np.concatenate(values) for role, values in chunks.items()}


def _load(model_dir: Path) -> Any:
    manifest = load_manifest(Path(model_dir))
    return ModelRegistry(paths={manifest.name: Path(model_dir)}).get(manifest.name)


def _serve_transform(loaded: Any) -> Any:
    def serve_transform(signal: np.ndarray, fs: float, units: str) -> np.ndarray:
        ecg = Ecg(signals=signal, leads=STANDARD_LEADS, fs=fs, source_format="wfdb", units=units)
        return prepare_input(ecg, loaded.manifest)

    return serve_transform


def predict_fold(
    model_dir: Path,
    data_dir: Path,
    *,
    fold: int = 10,
    sampling_rate: int = 100,
    batch_size: int = 64,
) -> tuple[np.ndarray, Any, Any]:
    """Probabilities of the exported model on a fold -> (probs, PtbxlData, LoadedModel)."""
    loaded = _load(model_dir)
    data = load_ptbxl(data_dir, (fold,), sampling_rate=sampling_rate, transform=_serve_transform(loaded))
    outputs = predict_outputs(loaded, data.x, batch_size)
    return outputs["probabilities"], data, loaded


def metrics_for(
    manifest: Any,
    y_by_code: np.ndarray,
    outputs: dict[str, np.ndarray],
    patient_ids: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    bootstrap_unit: str = "patient",
) -> dict[str, Any]:
    """AUROC (+CI), threshold metrics, tiers and ECE of model outputs against labels in the model's class order."""
    probs = outputs["probabilities"]
    codes = [c.code for c in manifest.classes]
    y = y_by_code
    macro, defined = macro_auroc_defined(y, probs)
    boot = bootstrap_auroc(y, probs, patient_ids, n_bootstrap=n_bootstrap, seed=seed, macro_classes=defined)
    classes: dict[str, Any] = {}
    for k, code in enumerate(codes):
        thr = manifest.threshold(code)
        entry = {
            "positives": int(y[:, k].sum()),
            "negatives": int(len(y) - y[:, k].sum()),
            "auroc": auroc(y[:, k], probs[:, k]),
            "auroc_ci": boot["class_ci"][k],
            "bootstrap_valid": boot["class_valid"][k],
            "threshold": thr,
            **threshold_metrics(y[:, k], probs[:, k], thr),
        }
        if manifest.tiers and code in manifest.tiers:
            tiers = [manifest.tier(code, float(p)) for p in probs[:, k]]
            pos = y[:, k].astype(bool)
            entry["tiers"] = {
                t: {
                    "positives": int(sum(1 for tt, pp in zip(tiers, pos) if tt == t and pp)),
                    "negatives": int(sum(1 for tt, pp in zip(tiers, pos) if tt == t and not pp)),
                }
                for t in ("low", "moderate", "high")
            }
        classes[code] = entry
    calibration: dict[str, Any] = {"after": ece(y, probs)}
    if "logits" in outputs:
        calibration["before"] = ece(y, sigmoid(outputs["logits"]))
    return {
        "n": int(len(y)),
        "macro_auroc": macro,
        "macro_auroc_ci": boot["macro_ci"],
        "macro_classes": [c for c, d in zip(codes, defined) if d],
        "bootstrap": {
            "n": n_bootstrap,
            "valid": boot["macro_valid"],
            "unit": bootstrap_unit,
            "seed": seed,
            "interval": "percentile 2.5-97.5",
        },
        "classes": classes,
        "calibration": calibration,
    }


def _model_info(loaded: Any, model_dir: Path) -> dict[str, Any]:
    m = loaded.manifest
    return {"name": m.name, "version": m.version, "sha256": m.sha256, "directory": str(model_dir)}


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
    loaded = _load(model_dir)
    data = load_ptbxl(data_dir, (fold,), sampling_rate=sampling_rate, transform=_serve_transform(loaded))
    outputs = predict_outputs(loaded, data.x)
    manifest = loaded.manifest
    codes = [c.code for c in manifest.classes]
    # Align label columns to the model's class order by code, never by position.
    y = np.stack([data.y[:, data.classes.index(code)] for code in codes], axis=1)
    body = metrics_for(manifest, y, outputs, data.patient_ids, n_bootstrap=n_bootstrap, seed=seed)
    n_patients = int(np.unique(data.patient_ids).size)
    return {
        "model": _model_info(loaded, model_dir),
        "data": {
            "data_dir": str(data_dir),
            "layout": "ptbxl",
            "fold": fold,
            "sampling_rate": sampling_rate,
            "n_records": len(data),
            "n_patients": n_patients,
            "n_unlabelled_excluded": data.n_unlabelled,
            "description": (
                f"PTB-XL strat_fold {fold}: {len(data)} records, {n_patients} patients "
                f"({data.n_unlabelled} records without a superclass label excluded)"
            ),
        },
        **body,
    }


def evaluate_external(
    model_dir: Path,
    data_dir: Path,
    *,
    train_data: Path | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-source metrics on challenge-layout data (see the module docstring)."""
    loaded = _load(model_dir)
    data = load_challenge(data_dir, transform=_serve_transform(loaded))
    overlap = ptbxl_overlap(data.names, train_data)
    in_training = {name for name, fold in overlap.items() if fold is not None}
    kept = data.drop(in_training) if in_training else data
    codes = [c.code for c in loaded.manifest.classes]
    result: dict[str, Any] = {
        "model": _model_info(loaded, model_dir),
        "data": {
            "data_dir": str(data_dir),
            "layout": "challenge",
            "n_records": len(data),
            "n_excluded_no_superclass": len(data.excluded),
            "excluded_no_superclass": list(data.excluded),
            "unmapped_codes": data.unmapped_codes,
            "ptbxl_records_checked_in": str(train_data) if train_data else None,
            "ptbxl_overlap": {name: fold for name, fold in overlap.items()},
            "dropped_in_training_data": sorted(in_training),
        },
        "sources": {},
    }
    for source in sorted(set(kept.sources)):
        part = kept.select(source)
        outputs = predict_outputs(loaded, part.x)
        y = np.stack([part.y[:, part.classes.index(code)] for code in codes], axis=1)
        body = metrics_for(
            loaded.manifest, y, outputs, part.patient_ids, n_bootstrap=n_bootstrap, seed=seed, bootstrap_unit="record"
        )
        n_excl = len(part.excluded)
        note = ""
        if source == "PTB-XL":
            dropped = [n for n in in_training]
            note = (
                f"; PTB-XL recordings: {len(dropped)} dropped because they are in the training data "
                f"({', '.join(f'{n} fold {overlap[n]}' for n in sorted(dropped)) or 'none found'}), "
                "the rest may share patients with it" + ("" if train_data else " (not checked: no --train-data)")
            )
        result["sources"][source] = {
            "data": {
                "source": source,
                "n_records": len(part),
                "n_unlabelled_excluded": n_excl,
                "description": f"challenge source {source}: {len(part)} records ({n_excl} without a superclass excluded){note}",
            },
            **body,
        }
    return result


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


def format_report(metrics: dict[str, Any]) -> str:
    """The human-readable table; ``training.cards`` copies it verbatim into the model card."""
    if "sources" in metrics:
        return _format_external(metrics)
    m, d, b = metrics["model"], metrics["data"], metrics["bootstrap"]
    description = d.get("description") or (
        f"PTB-XL strat_fold {d['fold']}: {d['n_records']} records, {d['n_patients']} patients "
        f"({d['n_unlabelled_excluded']} records without a superclass label excluded)"
    )
    all_codes = list(metrics["classes"])
    macro_classes = metrics.get("macro_classes", all_codes)
    left_out = [c for c in all_codes if c not in macro_classes]
    lines = [
        f"model {m['name']} {m['version']} (sha256 {str(m['sha256'])[:12]}) on {description}",
        f"macro-AUROC {_f(metrics['macro_auroc'])} (95% CI {_ci(metrics['macro_auroc_ci'])}; "
        f"{b['unit']}-level bootstrap, {b['valid']}/{b['n']} valid resamples, seed {b['seed']})"
        + (
            f"; over {', '.join(macro_classes)} only: no positives or no negatives for {', '.join(left_out)}"
            if left_out
            else ""
        ),
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
    if any("tiers" in c for c in metrics["classes"].values()):
        lines += [
            "",
            "risk tiers (positives / negatives in each tier)",
            f"{'class':<6} {'low':>9} {'moderate':>9} {'high':>9}",
        ]
        for code, c in metrics["classes"].items():
            if "tiers" in c:
                t = c["tiers"]
                lines.append(
                    f"{code:<6} "
                    + " ".join(f"{t[k]['positives']:>4}/{t[k]['negatives']:<4}" for k in ("low", "moderate", "high"))
                )
    cal = metrics.get("calibration")
    if cal:

        def ece_line(tag: str, e: dict[str, Any]) -> str:
            per = " ".join(f"{code} {_f(v)}" for code, v in zip(metrics["classes"], e["per_class"]))
            return f"ECE {tag:<6} mean {_f(e['mean'])}  pooled {_f(e['pooled'])}  ({per})"

        lines.append("")
        if "before" in cal:
            lines.append(ece_line("before", cal["before"]))
        lines.append(ece_line("after", cal["after"]))
    return "\n".join(lines)


def _format_external(metrics: dict[str, Any]) -> str:
    d = metrics["data"]
    head = [
        f"external data {d['data_dir']}: {d['n_records']} records with a superclass label "
        f"({d['n_excluded_no_superclass']} without one excluded)",
    ]
    if d.get("unmapped_codes"):
        head.append(
            "codes with no superclass (not NORM-compatible): "
            + ", ".join(f"{k} x{v}" for k, v in d["unmapped_codes"].items())
        )
    parts = ["\n".join(head)]
    for _source, sm in metrics["sources"].items():
        parts.append(format_report({"model": metrics["model"], **sm}))
    return "\n\n".join(parts)


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
    parser.add_argument(
        "--model",
        dest="model_dir",
        type=Path,
        default=None,
        help="directory with manifest.json and model.onnx (default: the shipped diagnosis model, "
        "inference/shipped/diagnosis-baseline)",
    )
    parser.add_argument(
        "--data",
        dest="data_dir",
        type=Path,
        required=True,
        help="PTB-XL root (holds ptbxl_database.csv) or a PhysioNet-challenge directory (.hea with #Dx)",
    )
    parser.add_argument("--fold", type=int, default=10, help="PTB-XL fold (PTB-XL layout only)")
    parser.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="PTB-XL directory the model was trained on: challenge HR records found in it are dropped",
    )
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampling-rate", type=int, choices=(100, 500), default=100)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.model_dir is None:
        args.model_dir = ModelRegistry().available()["diagnosis"]
        print(f"model: {args.model_dir} (the shipped diagnosis model; --model DIR for another)", file=sys.stderr)
    if (args.data_dir / "ptbxl_database.csv").is_file():
        metrics = evaluate_diagnosis(
            args.model_dir,
            args.data_dir,
            fold=args.fold,
            n_bootstrap=args.n_bootstrap,
            seed=args.seed,
            sampling_rate=args.sampling_rate,
        )
    elif is_challenge_dir(args.data_dir):
        metrics = evaluate_external(
            args.model_dir, args.data_dir, train_data=args.train_data, n_bootstrap=args.n_bootstrap, seed=args.seed
        )
    else:
        parser.error(f"{args.data_dir}: neither PTB-XL (ptbxl_database.csv) nor challenge layout (.hea with #Dx)")
    print(json.dumps(to_jsonable(metrics), indent=2) if args.json else format_report(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
