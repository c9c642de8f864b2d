"""Metrics of a classifier's probabilities against labels: pure NumPy, shared by training and the live site.

``training.evaluate`` (a PTB-XL fold, external data), ``ecgbridge validate`` (the site's own
over-read ECGs, :mod:`ecgbridge.core.validation`) and the drift statistics use these same
functions, so a figure from one is comparable with the other: AUROC from rank statistics
(Mann-Whitney U, ties averaged), percentile bootstrap intervals that resample patients
(or ECGs, one group each), confusion metrics at a threshold, expected calibration error
and its reliability bins, the population stability index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "auroc",
    "macro_auroc",
    "macro_auroc_defined",
    "patient_groups",
    "patient_resamples",
    "bootstrap_auroc",
    "paired_auroc_difference",
    "threshold_metrics",
    "ece",
    "reliability",
    "psi",
]


def auroc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via ranks; NaN when only one class is present."""
    y = np.asarray(y_true).astype(bool)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Imported here, not at the top: scipy.stats costs 60 MB resident, and the gateway imports this
    # module (the console's drift metrics use psi) without ever computing an AUROC there.
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean of per-class AUROCs (NaN if any class is undefined)."""
    return float(np.mean([auroc(y_true[:, k], scores[:, k]) for k in range(y_true.shape[1])]))


def macro_auroc_defined(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, list[bool]]:
    """Mean AUROC over the classes that have both positives and negatives, and which those are."""
    values = [auroc(y_true[:, k], scores[:, k]) for k in range(y_true.shape[1])]
    defined = [not np.isnan(v) for v in values]
    kept = [v for v, d in zip(values, defined) if d]
    return (float(np.mean(kept)) if kept else float("nan")), defined


def patient_groups(patient_ids: np.ndarray) -> list[np.ndarray]:
    _, inverse = np.unique(patient_ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    return np.split(order, bounds)


def patient_resamples(patient_ids: np.ndarray, n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of each patient-level bootstrap replicate (a patient's records are drawn together).

    The same ``seed`` gives the same replicates, so statistics bootstrapped in separate
    passes (AUROC here, kappa in ``training.lvef_evaluate``) share their resamples.
    """
    rng = np.random.default_rng(seed)
    groups = patient_groups(np.asarray(patient_ids))
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, len(groups), size=len(groups))
        yield np.concatenate([groups[g] for g in drawn])


def bootstrap_auroc(
    y_true: np.ndarray,
    scores: np.ndarray,
    patient_ids: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    macro_classes: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Patient-level percentile bootstrap of per-class and macro AUROC.

    ``macro_classes`` (default: all) says which classes the macro averages; a
    replicate counts for the macro only when all of those are defined in it.
    """
    mask = list(macro_classes) if macro_classes is not None else [True] * y_true.shape[1]
    n_classes = y_true.shape[1]
    per_class: list[list[float]] = [[] for _ in range(n_classes)]
    macro: list[float] = []
    for idx in patient_resamples(patient_ids, n_bootstrap, seed):
        values = [auroc(y_true[idx, k], scores[idx, k]) for k in range(n_classes)]
        for k, v in enumerate(values):
            if not np.isnan(v):
                per_class[k].append(v)
        chosen = [v for v, m in zip(values, mask) if m]
        if chosen and not np.any(np.isnan(chosen)):
            macro.append(float(np.mean(chosen)))

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


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Expected calibration error per class, their mean, and pooled over all labels."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)

    def one(yy: np.ndarray, pp: np.ndarray) -> float:
        if yy.size == 0:
            return float("nan")
        bins = np.minimum((pp * n_bins).astype(int), n_bins - 1)
        total = 0.0
        for b in range(n_bins):
            m = bins == b
            if m.any():
                total += m.sum() * abs(yy[m].mean() - pp[m].mean())
        return float(total / yy.size)

    per_class = [one(y[:, k], p[:, k]) for k in range(y.shape[1])]
    return {
        "per_class": per_class,
        "mean": float(np.nanmean(per_class)) if per_class else float("nan"),
        "pooled": one(y.ravel(), p.ravel()),
        "bins": n_bins,
    }


def paired_auroc_difference(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    groups: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC(a) - AUROC(b) on the same cases, with a paired percentile bootstrap interval.

    Each replicate draws groups (patients, or ECGs) once and scores both models on the same
    draw, so the interval is of the difference, not of two independent estimates.
    """
    diff = auroc(y_true, score_a) - auroc(y_true, score_b)
    samples = []
    for idx in patient_resamples(groups, n_bootstrap, seed):
        d = auroc(y_true[idx], score_a[idx]) - auroc(y_true[idx], score_b[idx])
        if not np.isnan(d):
            samples.append(d)
    ci = tuple(float(v) for v in np.percentile(samples, [2.5, 97.5])) if samples else None
    return {"difference": float(diff), "ci": ci, "valid": len(samples)}


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Reliability-diagram bins of one class: count, mean predicted probability and observed rate per bin."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = bins == b
        if m.any():
            out.append(
                {
                    "lo": b / n_bins,
                    "hi": (b + 1) / n_bins,
                    "n": int(m.sum()),
                    "predicted": float(p[m].mean()),
                    "observed": float(y[m].mean()),
                }
            )
    return out


def psi(reference: Sequence[float], current: Sequence[float], edges: Sequence[float]) -> float:
    """Population stability index of ``current`` against ``reference`` over the bins ``edges`` make.

    sum over bins of (c - r) * ln(c / r) with the bins' shares; empty shares are floored at 1e-4
    so an empty bin counts as a large change, not an infinite one. Conventionally under 0.1:
    stable, 0.1-0.25: moderate shift, over 0.25: a shift to act on.
    """
    r = np.histogram(np.asarray(reference, dtype=np.float64), bins=np.asarray(edges))[0].astype(np.float64)
    c = np.histogram(np.asarray(current, dtype=np.float64), bins=np.asarray(edges))[0].astype(np.float64)
    if r.sum() == 0 or c.sum() == 0:
        return float("nan")
    r = np.maximum(r / r.sum(), 1e-4)
    c = np.maximum(c / c.sum(), 1e-4)
    return float(np.sum((c - r) * np.log(c / r)))
