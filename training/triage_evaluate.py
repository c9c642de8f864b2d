"""Evaluate ECG severity triage: tier labels, tier scores from any label granularity, metrics.

Labels. A record's tier is the worst tier of its statements (``mapping.codes``:
``severity4_of_scp`` for PTB-XL's SCP-ECG statements, ``severity4_of_snomed`` for the
challenge's SNOMED CT codes); a record with no statement, or with a code the tables do
not know, has no tier and is left out (counted).

Three tasks are scored, all from the 4-tier level (the 3-tier scale merges levels 1-2):

    abnormal  normal vs any abnormality (level >= 1)
    major     level >= 2 (major or urgent); 4-tier information only
    urgent    urgent vs the rest (level 3)

Tier scores. A model trained on another granularity is mapped to a score per task:

- tiered models (``severity3`` / ``severity4``): the cumulative output of that task
  (``severity3`` has no ``major`` output);
- fine-grained SCP statements: the maximum probability over the statements whose own
  tier reaches the task's level (e.g. urgent = max over INJ*, 3AVB, LNGQT ... that the
  model has an output for; n/a when it has none);
- superclasses: ``max_k w_kt * p_k``, where ``w_kt`` is the share of training-fold
  records positive for superclass k whose tier reaches level t (a superclass mixes
  tiers: MI holds old infarcts and acute injury).

Thresholds are chosen on fold 9 only (``choose_thresholds``) and applied unchanged to
fold 10 and to every external source; the 3-tier decision uses the same "worst flag wins"
rule as serving (``inference.triage.decode_levels``). The rule depends on how many fold-9
positives a task has:

- at least ``N_MIN_POSITIVES`` (10): the minimum-sensitivity rule
  (``training.calibration.min_sensitivity_threshold``: best F1 among the thresholds with
  fold-9 sensitivity >= the target);
- fewer: a sensitivity measured on a handful of positives is meaningless (with one
  positive, "sensitivity >= 0.9" means "just below that one score"), so the threshold is
  taken from the many fold-9 NEGATIVES instead (``specificity_threshold``): the quantile
  of the negatives' scores that gives the task's specificity target
  (``FEW_POSITIVES_SPECIFICITY``, 0.90: an urgent or major flag is cheap to review and
  costly to miss). The positives play no part in it.

Test-fold (fold 10) and external data never enter threshold choice. An exported model's
thresholds can be re-derived without retraining (``rethreshold``; ``ecgbridge evaluate
triage --rethreshold``): fold-9 scores through the serving path, only the manifest's
``thresholds`` rewritten.

AUROC with a 95% percentile bootstrap (patients on PTB-XL, records on challenge data,
``training.evaluate.bootstrap_auroc``); sensitivity / specificity at the threshold with
their counts.

    ecgbridge evaluate triage --model inference/shipped/triage --data /path/to/ptbxl [--fold 10]
    ecgbridge evaluate triage --model inference/shipped/triage --data /path/to/cinc2021 --train-data /path/to/ptbxl
    ecgbridge evaluate triage --model inference/shipped/triage --data /path/to/ptbxl --rethreshold
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ecgbridge.inference.triage import decode_levels
from ecgbridge.mapping.codes import SCP_SEVERITY, SEVERITY3, SEVERITY4_TO_3, severity4_of_scp, severity4_of_snomed
from ecgbridge.training.calibration import min_sensitivity_threshold
from ecgbridge.training.datasets.challenge import is_challenge_dir, load_challenge, ptbxl_overlap
from ecgbridge.training.datasets.ptbxl import VAL_FOLDS, PtbxlData, load_ptbxl
from ecgbridge.training.evaluate import (
    _load,
    _serve_transform,
    auroc,
    bootstrap_auroc,
    predict_outputs,
    threshold_metrics,
    to_jsonable,
)

__all__ = [
    "TASKS",
    "task_labels",
    "ptbxl_levels",
    "load_tier_ptbxl",
    "load_tier_challenge",
    "tier_scores",
    "superclass_weights",
    "N_MIN_POSITIVES",
    "FEW_POSITIVES_SPECIFICITY",
    "specificity_threshold",
    "choose_thresholds",
    "rethreshold",
    "tier_metrics",
    "format_tier_table",
    "evaluate_triage",
    "main",
]

#: task -> minimum 4-tier level that makes a record positive.
TASKS: dict[str, int] = {"abnormal": 1, "major": 2, "urgent": 3}

#: A task with fewer fold-9 positives than this gets its threshold from the fold-9 negatives.
N_MIN_POSITIVES = 10

#: Specificity target of the few-positives rule, per task (see the module docstring).
FEW_POSITIVES_SPECIFICITY: dict[str, float] = {"abnormal": 0.9, "major": 0.9, "urgent": 0.9}


def task_labels(level4: np.ndarray) -> dict[str, np.ndarray]:
    level4 = np.asarray(level4)
    return {task: (level4 >= lo).astype(np.float64) for task, lo in TASKS.items()}


def ptbxl_levels(scp_codes: Sequence[dict[str, float]]) -> np.ndarray:
    """4-tier level per record (-1: no tier)."""
    return np.array([(-1 if (lv := severity4_of_scp(c)) is None else lv) for c in scp_codes], dtype=np.int64)


def _subset(data: PtbxlData, keep: np.ndarray) -> PtbxlData:
    from dataclasses import replace

    idx = np.flatnonzero(keep)
    return replace(
        data,
        x=data.x[idx],
        y=data.y[idx],
        ecg_ids=data.ecg_ids[idx],
        patient_ids=data.patient_ids[idx],
        folds=data.folds[idx],
        scp_codes=tuple(data.scp_codes[i] for i in idx),
    )


def load_tier_ptbxl(
    data_dir: Path, folds: Sequence[int], *, transform: Any = None, sampling_rate: int = 100, limit: int | None = None
) -> tuple[PtbxlData, np.ndarray, int]:
    """Records of ``folds`` that have a tier -> (data, 4-tier levels, number left out)."""
    data = load_ptbxl(
        data_dir, tuple(folds), sampling_rate=sampling_rate, transform=transform, limit=limit, require_superclass=False
    )
    levels = ptbxl_levels(data.scp_codes)
    keep = levels >= 0
    return _subset(data, keep), levels[keep], int((~keep).sum())


def load_tier_challenge(data_dir: Path, *, transform: Any = None, train_data: Path | None = None) -> dict[str, Any]:
    """Challenge records with a tier, per source; PTB-XL (HR) records found in ``train_data`` are dropped."""
    data = load_challenge(data_dir, transform=transform, require_superclass=False)
    overlap = ptbxl_overlap(data.names, train_data)
    in_training = {n for n, fold in overlap.items() if fold is not None}
    levels = np.array([(-1 if (lv := severity4_of_snomed(dx)) is None else lv) for dx in data.dx], dtype=np.int64)
    no_tier = [n for n, lv in zip(data.names, levels) if lv < 0]
    sources: dict[str, dict[str, Any]] = {}
    for source in sorted(set(data.sources)):
        idx = [
            i
            for i, (s, n, lv) in enumerate(zip(data.sources, data.names, levels))
            if s == source and lv >= 0 and n not in in_training
        ]
        sources[source] = {
            "x": data.x[idx],
            "level4": levels[idx],
            "names": [data.names[i] for i in idx],
            "n_no_tier": sum(1 for s, lv in zip(data.sources, levels) if s == source and lv < 0),
            "n_dropped_in_training": sum(
                1 for s, n in zip(data.sources, data.names) if s == source and n in in_training
            ),
        }
    unknown: dict[str, int] = {}
    for dx in data.dx:
        for code in dx:
            if severity4_of_snomed([code]) is None:
                unknown[code] = unknown.get(code, 0) + 1
    return {
        "sources": sources,
        "no_tier": no_tier,
        "unknown_codes": unknown,
        "dropped_in_training": sorted(in_training),
        "data_dir": str(data_dir),
    }


def superclass_weights(y_super: np.ndarray, level4: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """``w[task][class]``: share of records positive for the class whose tier reaches the task's level."""
    out: dict[str, dict[str, float]] = {}
    for task, lo in TASKS.items():
        out[task] = {}
        for k, c in enumerate(classes):
            pos = y_super[:, k] > 0.5
            out[task][c] = float(np.mean(level4[pos] >= lo)) if pos.any() else 0.0
    return out


def tier_scores(
    probs: np.ndarray,
    classes: Sequence[str],
    scheme: str,
    *,
    weights: dict[str, dict[str, float]] | None = None,
) -> dict[str, np.ndarray | None]:
    """Per task, one score per record from a model's probabilities (see the module docstring); None: n/a."""
    probs = np.asarray(probs, dtype=np.float64)
    classes = list(classes)
    out: dict[str, np.ndarray | None] = {}
    for task, lo in TASKS.items():
        if scheme in ("severity3", "severity4"):
            out[task] = probs[:, classes.index(task)] if task in classes else None
        elif scheme == "fine":
            cols = [k for k, c in enumerate(classes) if SCP_SEVERITY[c][0] >= lo]
            out[task] = probs[:, cols].max(axis=1) if cols else None
        elif scheme == "superclass":
            if weights is None:
                raise ValueError("superclass scores need the training-fold weights")
            w = np.array([weights[task][c] for c in classes])
            out[task] = (probs * w[None, :]).max(axis=1)
        else:
            raise ValueError(f"unknown label scheme {scheme!r}")
    return out


def specificity_threshold(
    y: np.ndarray, score: np.ndarray, specificity: float, *, min_positives: int = N_MIN_POSITIVES
) -> dict[str, Any]:
    """Threshold from the validation negatives alone: their quantile that gives ``specificity``.

    At most ``floor((1 - specificity) * n_negatives)`` negatives score at or above the
    threshold, which lies midway between the highest negative that must stay below it and
    the next higher negative score (midway to 1 when there is none). The positives' scores
    are not used; their fold-9 count caught is reported for information only
    (``min_positives`` only names the rule).
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    neg = np.sort(score[~y])
    n_pos = int(y.sum())
    if neg.size == 0:
        return {"threshold": 0.5, "rule": "no validation negatives: 0.5", "positives": n_pos, "negatives": 0}
    allowed_fp = int(math.floor((1.0 - specificity) * neg.size + 1e-9))
    anchor = neg[neg.size - 1 - allowed_fp]  # the highest negative that must stay below the threshold
    above = neg[neg > anchor]
    threshold = float((anchor + above[0]) / 2.0) if above.size else float((anchor + 1.0) / 2.0)
    fp = int(np.sum(neg >= threshold))
    return {
        "threshold": threshold,
        "rule": f"fewer than {min_positives} fold-9 positives: fold-9 negatives' quantile for specificity "
        f">= {specificity:g}",
        "positives": n_pos,
        "negatives": int(neg.size),
        "val_specificity": 1.0 - fp / neg.size,
        "val_tp": int(np.sum(score[y] >= threshold)),
    }


def choose_thresholds(
    level4: np.ndarray,
    scores: dict[str, np.ndarray | None],
    *,
    min_sensitivity: float,
    urgent_sensitivity: float,
    min_positives: int = N_MIN_POSITIVES,
    few_positives_specificity: dict[str, float] | float | None = None,
) -> dict[str, dict[str, Any]]:
    """Fold-9 thresholds per task (the rule of the module docstring).

    A task with >= ``min_positives`` fold-9 positives: minimum-sensitivity rule (``urgent``
    uses ``urgent_sensitivity``, the others ``min_sensitivity``). Fewer:
    ``specificity_threshold`` with the task's ``few_positives_specificity`` (a float for
    every task, or a per-task dict; default ``FEW_POSITIVES_SPECIFICITY``). Pass fold-9
    (validation) labels and scores only.
    """
    if few_positives_specificity is None:
        few_positives_specificity = FEW_POSITIVES_SPECIFICITY
    if not isinstance(few_positives_specificity, dict):
        few_positives_specificity = {t: float(few_positives_specificity) for t in TASKS}
    labels = task_labels(level4)
    out: dict[str, dict[str, Any]] = {}
    for task, s in scores.items():
        if s is None:
            continue
        n_pos = int(labels[task].sum())
        if n_pos >= min_positives:
            target = urgent_sensitivity if task == "urgent" else min_sensitivity
            out[task] = min_sensitivity_threshold(labels[task], s, target)
        else:
            out[task] = specificity_threshold(
                labels[task], s, few_positives_specificity[task], min_positives=min_positives
            )
    return out


def _f(v: Any, d: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def tier_metrics(
    level4: np.ndarray,
    scores: dict[str, np.ndarray | None],
    thresholds: dict[str, float],
    groups: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    unit: str = "patient",
) -> dict[str, Any]:
    """AUROC (+CI), counts and threshold metrics per task; the decoded 3-tier confusion matrix."""
    level4 = np.asarray(level4)
    labels = task_labels(level4)
    tasks = [t for t in TASKS if scores.get(t) is not None]
    given = {t: v for t, v in scores.items() if v is not None}
    result: dict[str, Any] = {
        "n": int(len(level4)),
        "bootstrap": {"n": n_bootstrap, "unit": unit, "seed": seed},
        "positives": {t: int(labels[t].sum()) for t in TASKS},
        "tasks": {},
    }
    if tasks and len(level4):
        y = np.stack([labels[t] for t in tasks], axis=1)
        s = np.stack([given[t] for t in tasks], axis=1)
        boot = bootstrap_auroc(y, s, groups, n_bootstrap=n_bootstrap, seed=seed)
    for j, task in enumerate(tasks):
        entry: dict[str, Any] = {
            "positives": int(labels[task].sum()),
            "negatives": int(len(level4) - labels[task].sum()),
            "auroc": auroc(labels[task], given[task]) if len(level4) else float("nan"),
            "auroc_ci": boot["class_ci"][j] if len(level4) else None,
        }
        if task in thresholds:
            entry["threshold"] = float(thresholds[task])
            entry.update(threshold_metrics(labels[task], given[task], thresholds[task]))
        result["tasks"][task] = entry
    # 3-tier decision: abnormal and urgent outputs, "worst flag wins"
    if all(t in thresholds and scores.get(t) is not None for t in ("abnormal", "urgent")) and len(level4):
        p = np.stack([given["abnormal"], given["urgent"]], axis=1)
        pred3 = decode_levels(p, [thresholds["abnormal"], thresholds["urgent"]])
        true3 = np.array([SEVERITY4_TO_3[int(v)] for v in level4])
        confusion = [[int(np.sum((true3 == a) & (pred3 == b))) for b in range(3)] for a in range(3)]
        f1s = []
        for k in range(3):
            tp = confusion[k][k]
            fp = sum(confusion[a][k] for a in range(3)) - tp
            fn = sum(confusion[k]) - tp
            if tp + fn > 0:  # classes absent from the set are left out of the macro
                f1s.append(2 * tp / (2 * tp + fp + fn))
        result["tier3"] = {
            "labels": list(SEVERITY3),
            "confusion": confusion,  # rows true, columns predicted
            "accuracy": float(np.mean(pred3 == true3)),
            "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
            "macro_f1_classes": int(len(f1s)),
        }
    return result


def format_tier_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: one row per (model, data set)."""
    head = (
        "| model (labels) | data | n | abnormal+ / urgent+ | AUROC normal vs abnormal (95% CI) | "
        "AUROC major+ vs rest (95% CI) | AUROC urgent vs rest (95% CI) | urgent sens. at threshold (TP/P) | "
        "urgent spec. | 3-tier acc. | 3-tier macro-F1 |\n" + "|---" * 11 + "|\n"
    )
    lines = []
    for r in rows:
        m = r["metrics"]
        t = m["tasks"]

        def cell(task: str) -> str:
            if task not in t:
                return "n/a"
            e = t[task]
            ci = e.get("auroc_ci")
            return f"{_f(e['auroc'])} ({'n/a' if ci is None else f'{ci[0]:.3f}-{ci[1]:.3f}'})"

        urg = t.get("urgent", {})
        pos = m.get("positives", {})
        counts = f"{pos.get('abnormal', 'n/a')} / {pos.get('urgent', 'n/a')}"
        sens = (
            f"{_f(urg.get('sensitivity'), 2)} ({urg.get('tp')}/{urg.get('tp', 0) + urg.get('fn', 0)})"
            if "sensitivity" in urg
            else "n/a"
        )
        tier3 = m.get("tier3") or {}
        lines.append(
            f"| {r['model']} | {r['data']} | {m['n']} | {counts} | {cell('abnormal')} | {cell('major')} | "
            f"{cell('urgent')} | {sens} | {_f(urg.get('specificity'), 2)} | {_f(tier3.get('accuracy'), 2)} | "
            f"{_f(tier3.get('macro_f1'), 2)} |"
        )
    return head + "\n".join(lines) + "\n"


def evaluate_triage(
    model_dir: Path,
    data_dir: Path,
    *,
    fold: int = 10,
    train_data: Path | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    sampling_rate: int = 100,
) -> dict[str, Any]:
    """Measure an exported triage model through the serving path (registry, ONNX, manifest preprocessing)."""
    loaded = _load(Path(model_dir))
    manifest = loaded.manifest
    codes = [c.code for c in manifest.classes]
    thresholds = {c: manifest.threshold(c) for c in codes}
    scheme = "severity4" if "major" in codes else "severity3"
    transform = _serve_transform(loaded)
    name = f"{manifest.name} {manifest.version}"
    rows: list[dict[str, Any]] = []
    if is_challenge_dir(Path(data_dir)):
        ext = load_tier_challenge(Path(data_dir), transform=transform, train_data=train_data)
        for source, part in ext["sources"].items():
            probs = predict_outputs(loaded, part["x"])["probabilities"] if len(part["x"]) else np.zeros((0, len(codes)))
            scores = tier_scores(probs, codes, scheme)
            m = tier_metrics(
                part["level4"],
                scores,
                thresholds,
                np.arange(len(part["level4"])),
                n_bootstrap=n_bootstrap,
                seed=seed,
                unit="record",
            )
            m["n_no_tier"] = part["n_no_tier"]
            m["n_dropped_in_training"] = part["n_dropped_in_training"]
            rows.append({"model": name, "data": f"{source} (external)", "metrics": m})
        info: dict[str, Any] = {k: v for k, v in ext.items() if k != "sources"}
    else:
        data, level4, n_out = load_tier_ptbxl(Path(data_dir), (fold,), transform=transform, sampling_rate=sampling_rate)
        probs = predict_outputs(loaded, data.x)["probabilities"]
        scores = tier_scores(probs, codes, scheme)
        m = tier_metrics(level4, scores, thresholds, data.patient_ids, n_bootstrap=n_bootstrap, seed=seed)
        m["n_no_tier"] = n_out
        m["n_patients"] = int(np.unique(data.patient_ids).size)
        rows.append({"model": name, "data": f"PTB-XL fold {fold}", "metrics": m})
        info = {"data_dir": str(data_dir), "fold": fold}
    return {
        "model": {
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.sha256,
            "directory": str(model_dir),
            "scheme": scheme,
        },
        "thresholds": thresholds,
        "rows": rows,
        "data": info,
        "report": format_tier_table(rows),
    }


def rethreshold(
    model_dir: Path,
    data_dir: Path,
    *,
    min_sensitivity: float = 0.8,
    urgent_sensitivity: float = 0.9,
    min_positives: int = N_MIN_POSITIVES,
    few_positives_specificity: dict[str, float] | float | None = None,
    sampling_rate: int = 100,
    write: bool = True,
) -> dict[str, Any]:
    """Re-derive an exported model's thresholds on PTB-XL fold 9, without retraining.

    Fold-9 scores come through the serving path (registry, ONNX, manifest preprocessing);
    ``choose_thresholds`` picks the thresholds; with ``write`` only the manifest's
    ``thresholds`` are replaced (the ONNX file and its sha256 are untouched) and the
    manifest is validated before it is written. Only the validation fold is ever read.
    """
    from ecgbridge.inference.models import Manifest

    model_dir = Path(model_dir)
    loaded = _load(model_dir)
    manifest = loaded.manifest
    codes = [c.code for c in manifest.classes]
    scheme = "severity4" if "major" in codes else "severity3"
    data, level4, n_out = load_tier_ptbxl(
        Path(data_dir), VAL_FOLDS, transform=_serve_transform(loaded), sampling_rate=sampling_rate
    )
    scores = tier_scores(predict_outputs(loaded, data.x)["probabilities"], codes, scheme)
    chosen = choose_thresholds(
        level4,
        scores,
        min_sensitivity=min_sensitivity,
        urgent_sensitivity=urgent_sensitivity,
        min_positives=min_positives,
        few_positives_specificity=few_positives_specificity,
    )
    old = {c: manifest.threshold(c) for c in codes}
    new = {c: round(float(chosen[c]["threshold"]), 6) for c in codes}
    path = model_dir / "manifest.json"
    if write:
        raw = json.loads(path.read_text())
        raw["thresholds"] = new
        Manifest.model_validate(raw)
        path.write_text(json.dumps(raw, indent=2) + "\n")
    return {
        "manifest": str(path),
        "folds": list(VAL_FOLDS),
        "n": int(len(level4)),
        "n_no_tier": n_out,
        "positives": {t: int(v.sum()) for t, v in task_labels(level4).items()},
        "old": old,
        "new": new,
        "detail": chosen,
        "written": write,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ecgbridge evaluate triage", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an exported triage model directory")
    parser.add_argument("--data", type=Path, required=True, help="PTB-XL root or a challenge-layout directory")
    parser.add_argument("--fold", type=int, default=10)
    parser.add_argument("--train-data", type=Path, default=None, help="the PTB-XL directory the model was trained on")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampling-rate", type=int, choices=(100, 500), default=100)
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument(
        "--rethreshold",
        action="store_true",
        help="instead of evaluating: choose the thresholds on PTB-XL fold 9 of --data (the rule of "
        "choose_thresholds) and write them into the model's manifest; nothing else changes",
    )
    parser.add_argument("--dry-run", action="store_true", help="with --rethreshold: print, do not write")
    parser.add_argument("--min-sensitivity", type=float, default=0.8, help="--rethreshold: abnormal/major target")
    parser.add_argument("--urgent-sensitivity", type=float, default=0.9, help="--rethreshold: urgent target")
    parser.add_argument(
        "--min-val-positives",
        type=int,
        default=N_MIN_POSITIVES,
        help="--rethreshold: fewer fold-9 positives -> threshold from the negatives",
    )
    parser.add_argument(
        "--few-positives-specificity",
        type=float,
        default=None,
        help=f"--rethreshold: specificity target of that rule (default per task: {FEW_POSITIVES_SPECIFICITY})",
    )
    args = parser.parse_args(argv)
    if args.rethreshold:
        if is_challenge_dir(Path(args.data)):
            parser.error("--rethreshold needs the PTB-XL directory (thresholds come from fold 9 only)")
        out = rethreshold(
            args.model,
            args.data,
            min_sensitivity=args.min_sensitivity,
            urgent_sensitivity=args.urgent_sensitivity,
            min_positives=args.min_val_positives,
            few_positives_specificity=args.few_positives_specificity,
            sampling_rate=args.sampling_rate,
            write=not args.dry_run,
        )
        print(json.dumps(to_jsonable(out), indent=2))
        return 0
    result = evaluate_triage(
        args.model,
        args.data,
        fold=args.fold,
        train_data=args.train_data,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        sampling_rate=args.sampling_rate,
    )
    print(json.dumps(to_jsonable(result), indent=2) if args.json else result["report"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
