"""Calibration, decision thresholds and risk tiers, all chosen on the validation fold only.

Calibration is temperature scaling on the (ensemble-mean) logits ``z``::

    p_k = sigmoid((z_k - offset_k) / T_k)

``offset_k`` is either 0 or the fixed prior correction ``log(pos_weight_k)``
(class weighting multiplies the positive term of the loss by ``pos_weight_k``,
which shifts a well-fitted logit by about ``log(pos_weight_k)``); ``T_k`` is one
temperature shared by all classes or one per class. Which of the four variants
is used is decided by 5-fold cross-validated negative log-likelihood *within*
the validation fold, then the chosen variant is refitted on the whole fold. The
result is a constant per class, so ``training.export`` puts it inside the ONNX
graph and serving reads calibrated probabilities from one call.

ECE is the expected calibration error of each class's probabilities treated as
a binary forecast (10 equal-width bins, weighted by bin size); ``ece`` returns
the mean over classes and the value pooled over all (record, class) pairs.

Decision thresholds (``present``) use a minimum-sensitivity rule: the threshold
with the best validation F1 among those that catch at least ``min_sensitivity``
of the validation positives. Risk tiers per class::

    low       p <  moderate
    moderate  moderate <= p < high
    high      p >= high

``moderate`` is the highest threshold at which High + Moderate still catch at
least ``catch`` (default 95 %) of the validation positives; ``high`` is the lowest
threshold at which at most ``1 - specificity`` (default 5 %) of the validation
negatives reach High. Thresholds sit midway between neighbouring validation
scores so that none sits on one record's score.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from ecgbridge.inference.metrics import ece

__all__ = [
    "sigmoid",
    "nll",
    "fit_temperature",
    "fit_calibration",
    "apply_calibration",
    "ece",
    "min_sensitivity_threshold",
    "choose_tiers",
    "tier_of",
]


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def nll(y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of logits ``z`` against labels ``y`` (numerically stable)."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def fit_temperature(y: np.ndarray, z: np.ndarray) -> float:
    """The T in [0.05, 20] minimising NLL of sigmoid(z / T) (searched on log T)."""
    if y.size == 0:
        return 1.0
    res = minimize_scalar(
        lambda lt: nll(y, z / math.exp(lt)), bounds=(math.log(0.05), math.log(20.0)), method="bounded"
    )
    return float(math.exp(res.x))


def _fit_variant(y: np.ndarray, z: np.ndarray, offset: np.ndarray, per_class: bool) -> np.ndarray:
    zc = z - offset[None]
    if per_class:
        return np.array([fit_temperature(y[:, k], zc[:, k]) for k in range(y.shape[1])])
    return np.full(y.shape[1], fit_temperature(y.ravel(), zc.ravel()))


def apply_calibration(z: np.ndarray, temperature: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return sigmoid((np.asarray(z, dtype=np.float64) - offset[None]) / temperature[None])


def fit_calibration(
    y: np.ndarray,
    z: np.ndarray,
    pos_weight: np.ndarray,
    *,
    n_splits: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Pick and fit the calibration variant on validation labels ``y`` and logits ``z``."""
    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    n, k = y.shape
    offsets = {"none": np.zeros(k), "prior": np.log(np.asarray(pos_weight, dtype=np.float64))}
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(n) % n_splits
    cv: dict[str, float] = {}
    for off_name, offset in offsets.items():
        for per_class in (False, True):
            name = f"{'per-class' if per_class else 'single'} temperature, offset {off_name}"
            losses = []
            for f in range(n_splits):
                tr, te = fold_of != f, fold_of == f
                if not te.any() or not tr.any():
                    continue
                t = _fit_variant(y[tr], z[tr], offset, per_class)
                losses.append(nll(y[te], (z[te] - offset[None]) / t[None]) * te.sum())
            cv[name] = float(np.sum(losses) / n) if losses else float("nan")
    cv["uncalibrated"] = nll(y, z)
    candidates = {name: v for name, v in cv.items() if name != "uncalibrated" and not math.isnan(v)}
    best = min(candidates, key=candidates.__getitem__) if candidates else "single temperature, offset none"
    per_class = best.startswith("per-class")
    offset = offsets["prior" if best.endswith("prior") else "none"]
    temperature = _fit_variant(y, z, offset, per_class)
    return {
        "method": "temperature scaling: p = sigmoid((logit - offset) / T)",
        "variant": best,
        "temperature": temperature,
        "offset": offset,
        "cv_nll": cv,
        "cv": f"{n_splits}-fold cross-validated NLL within the validation fold (seed {seed})",
        "nll_before": nll(y, z),
        "nll_after": nll(y, (z - offset[None]) / temperature[None]),
    }


def _midpoints(score: np.ndarray) -> np.ndarray:
    s = np.unique(np.asarray(score, dtype=np.float64))
    if s.size == 0:
        return np.array([0.5])
    return np.concatenate([[s[0] / 2.0], (s[:-1] + s[1:]) / 2.0, [(s[-1] + 1.0) / 2.0]])


def min_sensitivity_threshold(y: np.ndarray, score: np.ndarray, min_sensitivity: float = 0.8) -> dict[str, Any]:
    """Best-F1 threshold among those with validation sensitivity >= ``min_sensitivity``."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    if not y.any():
        return {"threshold": 0.5, "rule": "no validation positives: 0.5", "positives": 0}
    best_t, best_f1 = None, -1.0
    candidates = _midpoints(score)
    for t in candidates:
        pred = score >= t
        tp = int(np.sum(pred & y))
        fp = int(np.sum(pred & ~y))
        fn = int(np.sum(~pred & y))
        if tp / (tp + fn) + 1e-12 < min_sensitivity:
            continue
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and best_t is not None and t > best_t):
            best_t, best_f1 = float(t), f1
    assert best_t is not None  # the lowest candidate catches every positive
    return {
        "threshold": best_t,
        "rule": f"max F1 with sensitivity >= {min_sensitivity:g}",
        "positives": int(y.sum()),
        "f1": best_f1,
    }


def choose_tiers(y: np.ndarray, score: np.ndarray, *, catch: float = 0.95, specificity: float = 0.95) -> dict[str, Any]:
    """``moderate`` / ``high`` thresholds for one class from validation scores (see the module docstring)."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    all_sorted = np.unique(score)
    pos = np.sort(score[y])
    neg = np.sort(score[~y])
    if pos.size:
        allowed_misses = int(math.floor((1.0 - catch) * pos.size + 1e-9))
        anchor = pos[allowed_misses]  # the lowest positive that must still be caught
        below = all_sorted[all_sorted < anchor]
        moderate = float((anchor + below[-1]) / 2.0) if below.size else float(anchor / 2.0)
    else:
        allowed_misses, moderate = 0, 0.5
    if neg.size:
        allowed_fp = int(math.floor((1.0 - specificity) * neg.size + 1e-9))
        anchor_n = neg[neg.size - 1 - allowed_fp]  # highest negative that must stay below High
        above = all_sorted[all_sorted > anchor_n]
        high = float((anchor_n + above[0]) / 2.0) if above.size else float((anchor_n + 1.0) / 2.0)
    else:
        allowed_fp, high = 0, 0.5
    moderate = min(moderate, high)
    caught = int(np.sum(score[y] >= moderate))
    high_pos = int(np.sum(score[y] >= high))
    high_neg = int(np.sum(score[~y] >= high))
    return {
        "moderate": round(moderate, 6),
        "high": round(high, 6),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "caught_moderate_or_high": caught,
        "positives_high": high_pos,
        "negatives_high": high_neg,
        "allowed_missed_positives": allowed_misses,
        "allowed_negatives_high": allowed_fp,
    }


def tier_of(p: float, tiers: dict[str, float]) -> str:
    if p >= tiers["high"]:
        return "high"
    if p >= tiers["moderate"]:
        return "moderate"
    return "low"
