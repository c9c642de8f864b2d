"""Evaluate an exported LVEF model directory on a manifest, the way serving runs it.

The model is loaded with :class:`inference.lvef.LvefModel` (sha256 checks, ONNX Runtime
sessions) and every row goes through :func:`inference.lvef_features.lvef_feature_row`, so
what this prints measures the shipped artefact. Four evaluations of one split:

* ``ecg+ehr``: the ECG+EHR variant on the rows that have EHR context (where serving uses it);
* ``ecg-only (EHR rows)``: the ECG-only variant on the same rows (what the EHR adds);
* ``ecg-only``: the ECG-only variant on every row;
* ``served``: every row with the variant serving would choose (``ecg-only`` without EHR).

Metrics (tiers are ordinal: normal > mildly > moderately > severely reduced): one-vs-rest
AUROC per tier (rank statistic, :func:`training.evaluate.auroc`) with a patient-level
percentile bootstrap 95 % CI and the tier's count; macro-AUROC over the tiers present, with
CI; quadratic weighted Cohen's kappa of the argmax tier (with CI); accuracy; the confusion
matrix (rows: true tier, columns: predicted tier).

    ecgbridge evaluate lvef --model inference/shipped/lvef --manifest cohort.csv [--split test] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecgbridge.inference.lvef import LVEF_DIR, LvefModel
from ecgbridge.inference.lvef_features import LVEF_TIERS
from ecgbridge.training.datasets.lvef import LvefTable, build_table, cache_path_for, load_features, read_manifest
from ecgbridge.training.evaluate import _patient_groups, auroc, bootstrap_auroc, patient_resamples

__all__ = [
    "quadratic_weighted_kappa",
    "confusion_matrix",
    "tier_metrics",
    "served_probabilities",
    "evaluate_table",
    "evaluate_model",
    "format_metrics",
    "format_report",
    "main",
]

_K = len(LVEF_TIERS)
CODES = [t.code for t in LVEF_TIERS]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int = _K) -> np.ndarray:
    """(k, k) counts, rows = true tier, columns = predicted tier."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return m


def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, k: int = _K) -> float:
    """Cohen's kappa with quadratic weights (i - j)^2 / (k - 1)^2; NaN when undefined."""
    o = confusion_matrix(y_true, y_pred, k).astype(np.float64)
    n = o.sum()
    if n == 0:
        return float("nan")
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / float((k - 1) ** 2)
    e = np.outer(o.sum(axis=1), o.sum(axis=0)) / n
    denom = float((w * e).sum())
    return float("nan") if denom == 0 else 1.0 - float((w * o).sum()) / denom


def _interval(samples: list[float]) -> list[float] | None:
    if not samples:
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def _rounded(ci: Sequence[float] | None) -> list[float] | None:
    return None if ci is None else [round(float(v), 4) for v in ci]


def tier_metrics(
    y_true: np.ndarray, probs: np.ndarray, patient_ids: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per-tier AUROC (+ CI, counts), macro-AUROC (+ CI), quadratic kappa (+ CI), accuracy, confusion."""
    y = np.asarray(y_true, dtype=int)
    p = np.asarray(probs, dtype=np.float64)
    pred = np.argmax(p, axis=1)
    onehot = np.eye(_K, dtype=bool)[y]
    per = [auroc(onehot[:, k], p[:, k]) for k in range(_K)]
    defined = [not np.isnan(v) for v in per]
    macro = float(np.mean([v for v, d in zip(per, defined) if d])) if any(defined) else float("nan")
    n_rounds = n_bootstrap if len(y) else 0
    boot = bootstrap_auroc(onehot, p, patient_ids, n_bootstrap=n_rounds, seed=seed, macro_classes=defined)
    boot_kappa = [
        kap
        for idx in patient_resamples(patient_ids, n_rounds, seed)
        if not np.isnan(kap := quadratic_weighted_kappa(y[idx], pred[idx]))
    ]
    groups = _patient_groups(np.asarray(patient_ids))
    cm = confusion_matrix(y, pred)
    return {
        "n": int(len(y)),
        "n_patients": int(len(groups)),
        "tiers": [
            {
                "code": CODES[k],
                "count": int(onehot[:, k].sum()),
                "auroc": None if np.isnan(per[k]) else round(float(per[k]), 4),
                "ci": _rounded(boot["class_ci"][k]),
            }
            for k in range(_K)
        ],
        "macro_auroc": None if np.isnan(macro) else round(macro, 4),
        "macro_ci": _rounded(boot["macro_ci"]),
        "macro_tiers": [CODES[k] for k in range(_K) if defined[k]],
        "kappa_quadratic": None if np.isnan(qk := quadratic_weighted_kappa(y, pred)) else round(qk, 4),
        "kappa_ci": _interval(boot_kappa),
        "accuracy": round(float(np.mean(pred == y)), 4) if len(y) else None,
        "confusion": cm.tolist(),
        "n_bootstrap": int(n_bootstrap),
    }


def served_probabilities(model: LvefModel, table: LvefTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ecg+ehr probabilities, ecg-only probabilities, served probabilities) for every row of the table."""
    rows = [dict(zip(table.feature_names, r)) for r in table.x]
    p_full = model.predict_proba(model.matrix(rows, "ecg+ehr"), "ecg+ehr") if rows else np.zeros((0, _K))
    p_ecg = model.predict_proba(model.matrix(rows, "ecg-only"), "ecg-only") if rows else np.zeros((0, _K))
    served = np.where(table.has_ehr[:, None], p_full, p_ecg)
    return p_full, p_ecg, served


def evaluate_table(model: LvefModel, table: LvefTable, *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    p_full, p_ecg, served = served_probabilities(model, table)
    ehr = table.has_ehr
    out = {
        "ecg+ehr": tier_metrics(
            table.tier[ehr], p_full[ehr], table.patient_ids[ehr], n_bootstrap=n_bootstrap, seed=seed
        ),
        "ecg-only (EHR rows)": tier_metrics(
            table.tier[ehr], p_ecg[ehr], table.patient_ids[ehr], n_bootstrap=n_bootstrap, seed=seed
        ),
        "ecg-only": tier_metrics(table.tier, p_ecg, table.patient_ids, n_bootstrap=n_bootstrap, seed=seed),
        "served": tier_metrics(table.tier, served, table.patient_ids, n_bootstrap=n_bootstrap, seed=seed),
    }
    return out


def evaluate_model(
    model_dir: Path,
    manifest_csv: Path,
    *,
    split: str = "test",
    n_bootstrap: int = 1000,
    seed: int = 0,
    table: LvefTable | None = None,
) -> dict[str, Any]:
    """Metrics of the model directory on one split ("all" for every row) of a manifest."""
    model = LvefModel.load(model_dir)
    if table is None:
        records = read_manifest(manifest_csv)
        feats = load_features(records, cache_path_for(manifest_csv))
        table = build_table(records, feats)
    sub = table if split == "all" else table.subset(table.split == split)
    return {
        "model": {
            "name": model.manifest.name,
            "version": model.manifest.version,
            "synthetic": model.manifest.synthetic,
            "notice": model.manifest.notice,
            "directory": str(model.directory),
        },
        "manifest": str(manifest_csv),
        "split": split,
        "rows": len(sub),
        "rows_with_ehr": int(sub.has_ehr.sum()),
        "evaluations": evaluate_table(model, sub, n_bootstrap=n_bootstrap, seed=seed),
    }


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if not ci else f"{ci[0]:.3f}-{ci[1]:.3f}"


def format_metrics(name: str, m: dict[str, Any]) -> str:
    """One evaluation as Markdown (the model card embeds exactly this)."""
    lines = [
        f"**{name}**: {m['n']} ECGs, {m['n_patients']} patients",
        "",
        "| tier | count | AUROC (one-vs-rest) | 95 % CI |",
        "|---|---|---|---|",
    ]
    for t in m["tiers"]:
        lines.append(f"| {t['code']} | {t['count']} | {_f(t['auroc'])} | {_ci(t['ci'])} |")
    lines.append(
        f"| macro ({', '.join(m['macro_tiers'])}) | {m['n']} | {_f(m['macro_auroc'])} | {_ci(m['macro_ci'])} |"
    )
    lines += [
        "",
        f"Quadratic weighted kappa {_f(m['kappa_quadratic'])} (95 % CI {_ci(m['kappa_ci'])}); "
        f"accuracy {_f(m['accuracy'])}; bootstrap {m['n_bootstrap']} patient resamples.",
        "",
        "Confusion matrix (rows: true tier, columns: predicted tier):",
        "",
        "| true \\ predicted | " + " | ".join(CODES) + " |",
        "|---" * (_K + 1) + "|",
    ]
    for code, row in zip(CODES, m["confusion"]):
        lines.append(f"| {code} | " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    mdl = report["model"]
    head = [
        f"LVEF model {mdl['name']} {mdl['version']} on {report['manifest']} (split {report['split']}: "
        f"{report['rows']} rows, {report['rows_with_ehr']} with EHR context)"
    ]
    if mdl.get("synthetic"):
        head.append(f"NOTE: {mdl['notice']}")
    return "\n".join(head) + "\n\n" + "\n\n".join(format_metrics(k, v) for k, v in report["evaluations"].items())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ecgbridge evaluate lvef", description="Evaluate an exported LVEF model on a CSV manifest."
    )
    ap.add_argument("--model", type=Path, default=LVEF_DIR, help="model directory (default: the shipped one)")
    ap.add_argument("--manifest", type=Path, required=True, help="LVEF CSV manifest (training.datasets.lvef format)")
    ap.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    ap.add_argument("--bootstrap", type=int, default=1000, help="patient bootstrap replicates for the CIs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = ap.parse_args(argv)
    report = evaluate_model(args.model, args.manifest, split=args.split, n_bootstrap=args.bootstrap, seed=args.seed)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
