"""Local retraining: fine-tune the live diagnosis model on this site's over-read ECGs, and propose the
result only if it beats the live model on the site's own held-out period.

    ecgbridge train diagnosis --from-store --out DIR [--config site.yaml] [--since DATE] [--until DATE]
        [--live NAME|DIR] [--init DIR] [--ptbxl DIR | --no-ptbxl] [--test-fraction 0.3]
        [--val-fraction 0.15] [--test-from DATE] [--epochs 10] [--lr 1e-4] [--train-layers all|head]
        [--min-improvement 0] [--require-ci] [--complete-only] [--n-bootstrap 1000] [--seed 0]

What it does, in order:

1. **Data.** The ECGs with a cardiologist's current label (:mod:`ecgbridge.core.training_set`:
   the over-read's classes NORM, MI, STTC, CD, HYP), recorded in ``[--since, --until)`` (time =
   acquisition time, else receipt time). A read that names no diagnosis is left out, and so is
   one with statements no table understood when ``--complete-only``; a class the read names only
   with a hedge ("possible LVH") is *uncertain*: left out of the loss and of that class's AUROC
   for that ECG (the rule of ``ecgbridge validate``). Every ECG goes through the model's own
   preprocessing (``inference.models.prepare_input``), the path serving uses. The labels never
   leave the store; ``OUT`` receives counts, message ids and times, never a patient identifier.
2. **Split: patient-level and by time** (:func:`time_split`). ECGs are ordered by time. The
   held-out (test) period is the latest ``--test-fraction`` of them (or those from
   ``--test-from``); the validation period the ``--val-fraction`` before it; training is what is
   earlier. A patient with an ECG in the held-out period belongs to it: their earlier ECGs are
   used for nothing; likewise a patient of the validation period has no ECG in training. So no
   patient is in two sets and every held-out ECG was recorded after every training and
   validation ECG. Patients are compared by a keyed hash, in memory, with a key drawn for this
   run; an ECG naming no patient is a patient of its own.
3. **Starting point.** The live model (``--live``, default: the diagnosis model the configuration's
   routes run live, after promotions) or ``--init DIR``. Its ONNX file is rebuilt as the torch
   ``Cnn1d`` it was exported from (``training.reexport.cnn_from_onnx``: the exporter folded each
   BatchNorm into its convolution, so they become fixed identities) and the rebuilt network
   must reproduce the ONNX graph's logits on the site's training ECGs (within 1e-4) before any
   step is taken. Only that architecture can be rebuilt here; another is refused with the reason.
4. **Fine-tuning.** Masked binary cross-entropy (positive weight sqrt(neg / pos) per class on the
   training set, clipped to [1, 10]), AdamW, ``--epochs`` passes with the training augmentation
   (``training.augment``, then the serving pipeline), BatchNorms frozen. The epoch with the best
   validation macro-AUROC is kept, the starting weights (epoch 0) included: if no epoch beats the
   starting point on validation, the candidate *is* the starting point and the rule below refuses
   it. ``--train-layers head`` trains the linear head only.
5. **Export** through ``training.export`` (probabilities, CAMs, logits, parity-checked) with the
   starting model's calibration constants (in the graph), thresholds and risk tiers unchanged:
   the comparison below is of ranking (AUROC), which they do not change; refitting them on a
   site needs more positives per class than a validation period usually holds.
6. **Evaluation** through the serving path (``ModelRegistry``, onnxruntime, the manifest's
   preprocessing) on the held-out period, the live model and the candidate on the same ECGs:
   per-class AUROC, macro-AUROC over the classes with both positives and negatives there,
   95 % CIs and the **paired** difference by a patient-level bootstrap (each replicate draws
   patients once and scores both models on the draw; replicates in which a class of the macro
   has no positive or negative are skipped and counted); sensitivity / specificity at each
   model's thresholds. Then PTB-XL fold 10 (``training.evaluate.evaluate_diagnosis``) for both,
   when ``--ptbxl DIR`` is given or ``$ECGBRIDGE_SHARED_DATA/ptbxl-subset`` or
   ``../shared/data/ptbxl-subset`` exists; the card says when it was not available.
7. **Sanity checks** the shipped model passes (tests/unit/test_explain.py): the candidate's
   probabilities depend on its input, and its class activation maps change when every weight is
   redrawn (model-parameter randomisation, Adebayo et al. 2018: mean |correlation| < 0.9 per class).
8. **The rule.** Let D = candidate macro-AUROC - live macro-AUROC on the held-out period. The
   candidate is *proposed* only if D > ``--min-improvement`` (default 0: a tie is not better), and
   with ``--require-ci`` also the lower end of D's 95 % CI > ``--min-improvement``, and the
   sanity checks pass. Otherwise it is *refused*.
9. **Output** in ``--out``: ``MODEL_CARD.md`` (data, split, counts, both evaluations, the rule and
   the decision), ``metrics.json``, ``split.csv`` (message id, time, set), ``checkpoint.pt``; when
   proposed, ``proposed/`` is the model directory (``model.onnx``, ``manifest.json``, the card) to run
   as a shadow model (``models: [{name: diagnosis-site, path: OUT/proposed}]``, the route's
   ``shadow_models``) before ``ecgbridge models promote``. When refused, no model directory is
   left. Exit status 0 proposed, 3 refused (1 / 2: an error).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ecgbridge.core.labels import EcgLabel
from ecgbridge.core.settings import Settings, load_settings, redact_url
from ecgbridge.core.store import MessageStore
from ecgbridge.core.training_set import iter_context_records, iter_site_records, parse_when
from ecgbridge.errors import ConfigError, EcgBridgeError, ModelError
from ecgbridge.inference.metrics import auroc, patient_resamples, threshold_metrics
from ecgbridge.inference.models import Manifest, ModelRegistry, load_manifest, prepare_input
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg
from ecgbridge.training.augment import AugmentConfig, Augmenter
from ecgbridge.training.clinical import (
    ClinicalManifest,
    ManifestRow,
    check_split_disjoint,
    measurements_from_ehr_context,
    write_manifest,
)
from ecgbridge.training.datasets.ptbxl import SUPERCLASSES, TEST_FOLDS
from ecgbridge.training.evaluate import evaluate_diagnosis, format_report, to_jsonable
from ecgbridge.training.export import ServingGraph, export_model
from ecgbridge.training.models.cnn1d import Cnn1d
from ecgbridge.training.reexport import cnn_from_onnx

__all__ = [
    "REFUSED",
    "Split",
    "time_split",
    "masked_macro_auroc",
    "paired_macro_difference",
    "decide",
    "rule_text",
    "retrain_from_store",
    "clinical_manifest_from_store",
    "main",
]

#: Exit status when the candidate is refused (0: proposed; 1 and 2 are errors).
REFUSED = 3
#: Largest difference allowed between the rebuilt torch network's logits and the ONNX graph's.
REBUILD_TOLERANCE = 1e-4
#: Parameter randomisation passes when the mean |correlation| of original and randomised CAMs is below this.
RANDOMISATION_MAX_CORR = 0.9
CLASSES = SUPERCLASSES


# ----- the split -----------------------------------------------------------------------------------
@dataclass
class Split:
    """Which set each ECG is in (``assign``: train | val | test | excluded: ...) and the cut-offs."""

    assign: list[str]
    test_from: datetime
    val_from: datetime | None

    def indices(self, name: str) -> np.ndarray:
        return np.asarray([i for i, a in enumerate(self.assign) if a == name], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.assign))


def time_split(
    when: Sequence[datetime],
    groups: Sequence[str],
    *,
    test_fraction: float = 0.3,
    val_fraction: float = 0.15,
    test_from: datetime | None = None,
) -> Split:
    """Patient-level split by time (module docstring, step 2); ``groups`` are the patients."""
    n = len(when)
    if n == 0:
        raise EcgBridgeError("no labelled ECG to split")
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1 or test_fraction + val_fraction >= 1:
        raise ConfigError("--test-fraction must be in (0, 1), --val-fraction in [0, 1), their sum below 1")
    ordered = sorted(when)
    n_test = max(1, math.ceil(n * test_fraction - 1e-9))
    cut_test = test_from or ordered[n - n_test]
    before = [t for t in ordered if t < cut_test]
    n_val = int(round(n * val_fraction))
    cut_val: datetime | None = before[max(0, len(before) - n_val)] if n_val > 0 and before else None
    period = ["test" if t >= cut_test else ("val" if cut_val is not None and t >= cut_val else "train") for t in when]
    test_groups = {g for g, p in zip(groups, period) if p == "test"}
    val_groups = {g for g, p in zip(groups, period) if p == "val"} - test_groups
    assign = []
    for g, p in zip(groups, period):
        if p != "test" and g in test_groups:
            assign.append("excluded: patient in the held-out period")
        elif p == "train" and g in val_groups:
            assign.append("excluded: patient in the validation period")
        else:
            assign.append(p)
    split = Split(assign=assign, test_from=cut_test, val_from=cut_val)
    seen: dict[str, str] = {}
    for g, a in zip(groups, assign):
        if a in ("train", "val", "test"):
            if seen.setdefault(g, a) != a:
                raise AssertionError("a patient in two sets")  # the rule above makes this impossible
    return split


# ----- metrics with uncertain labels (NaN) left out ------------------------------------------------
def _class_auroc(y: np.ndarray, p: np.ndarray) -> float:
    known = ~np.isnan(y)
    return auroc(y[known], p[known]) if known.any() else float("nan")


def defined_classes(y: np.ndarray) -> list[int]:
    """Columns with at least one positive and one negative (uncertain entries, NaN, not counted)."""
    out = []
    for k in range(y.shape[1]):
        col = y[:, k][~np.isnan(y[:, k])]
        if col.size and 0 < col.sum() < col.size:
            out.append(k)
    return out


def masked_macro_auroc(y: np.ndarray, p: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """Mean AUROC over ``classes`` (default: those defined on ``y``); NaN if one of them is undefined."""
    ks = list(classes) if classes is not None else defined_classes(y)
    if not ks:
        return float("nan")
    return float(np.mean([_class_auroc(y[:, k], p[:, k]) for k in ks]))


def _percentile_ci(samples: list[float]) -> list[float] | None:
    return [float(v) for v in np.percentile(samples, [2.5, 97.5])] if samples else None


def paired_macro_difference(
    y: np.ndarray,
    p_candidate: np.ndarray,
    p_live: np.ndarray,
    groups: np.ndarray,
    *,
    classes: Sequence[int],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Macro-AUROC of each model and their difference, with paired patient-level bootstrap CIs."""
    cand, live = masked_macro_auroc(y, p_candidate, classes), masked_macro_auroc(y, p_live, classes)
    s_cand, s_live, s_diff = [], [], []
    for idx in patient_resamples(groups, n_bootstrap, seed):
        a = masked_macro_auroc(y[idx], p_candidate[idx], classes)
        b = masked_macro_auroc(y[idx], p_live[idx], classes)
        if not (math.isnan(a) or math.isnan(b)):
            s_cand.append(a)
            s_live.append(b)
            s_diff.append(a - b)
    return {
        "candidate": cand,
        "live": live,
        "difference": cand - live,
        "candidate_ci": _percentile_ci(s_cand),
        "live_ci": _percentile_ci(s_live),
        "difference_ci": _percentile_ci(s_diff),
        "valid": len(s_diff),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "unit": "patient",
    }


def _per_class(y: np.ndarray, p: np.ndarray, manifest: Manifest) -> dict[str, Any]:
    out = {}
    for k, code in enumerate(CLASSES):
        known = ~np.isnan(y[:, k])
        yk, pk = y[known, k], p[known, k]
        thr = manifest.threshold(code)
        out[code] = {
            "positives": int(yk.sum()),
            "negatives": int(yk.size - yk.sum()),
            "uncertain_left_out": int((~known).sum()),
            "auroc": auroc(yk, pk) if yk.size else float("nan"),
            "threshold": thr,
            **threshold_metrics(yk, pk, thr),
        }
    return out


# ----- the rule --------------------------------------------------------------------------------------
def rule_text(min_improvement: float, require_ci: bool) -> str:
    margin = f"{min_improvement:+.3f}" if min_improvement else "0"
    text = (
        "propose the candidate only if D = (candidate macro-AUROC) - (live macro-AUROC) on the site's held-out "
        f"period is > {margin}"
    )
    if require_ci:
        text += f" and the lower end of D's 95% CI (paired patient-level bootstrap) is > {margin}"
    return text + ", and the sanity checks pass; otherwise refuse it (a tie is not better)"


def decide(
    comparison: dict[str, Any], *, min_improvement: float, require_ci: bool, sanity_passed: bool
) -> tuple[bool, list[str]]:
    """(proposed, reasons) by :func:`rule_text`'s rule."""
    reasons = []
    d = comparison["difference"]
    if math.isnan(d):
        reasons.append("D is undefined on the held-out period")
    elif not d > min_improvement:
        reasons.append(f"D = {d:+.4f} is not > {min_improvement:+.4f}")
    if require_ci:
        ci = comparison.get("difference_ci")
        if ci is None:
            reasons.append("no valid bootstrap replicate for D's CI")
        elif not ci[0] > min_improvement:
            reasons.append(f"D's 95% CI lower end {ci[0]:+.4f} is not > {min_improvement:+.4f}")
    if not sanity_passed:
        reasons.append("a sanity check failed")
    return not reasons, reasons


# ----- the live model and the starting point ---------------------------------------------------------
def _diagnosis_task(directory: Path) -> bool:
    try:
        return load_manifest(directory).task == "diagnosis"
    except ModelError:
        return False


def resolve_live(settings: Settings, store: MessageStore, live: str | None) -> tuple[Path, str]:
    """The live diagnosis model's directory and how it was found."""
    if live and (Path(live) / "manifest.json").is_file():
        return Path(live), f"--live {live}"
    paths = {m.name: Path(m.path) for m in settings.models if m.path is not None}
    available = ModelRegistry(paths=paths).available()
    if live:
        if live not in available:
            raise ConfigError(f"--live {live!r}: no such model (models[].path, a shipped model, or a directory)")
        return available[live], f"--live {live}"
    from ecgbridge.core.promotions import active_promotions, apply

    names: list[str] = []
    for route in settings.routes:
        for name in apply(route, active_promotions(store, route.name)).live:
            if name in available and name not in names and _diagnosis_task(available[name]):
                names.append(name)
    if len(names) > 1:
        raise ConfigError(f"the routes run several diagnosis models live ({', '.join(names)}): name one with --live")
    name = names[0] if names else "diagnosis"
    if name not in available:
        raise ConfigError(f"no diagnosis model {name!r} found: name one with --live")
    why = "the diagnosis model the routes run live" if names else "the model named diagnosis (no route runs one)"
    return available[name], why


def _calibration(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    cal = manifest.calibration or {}
    t = cal.get("temperature") or {}
    o = cal.get("offset") or {}
    return (
        np.asarray([float(t.get(c, 1.0)) for c in CLASSES], dtype=np.float64),
        np.asarray([float(o.get(c, 0.0)) for c in CLASSES], dtype=np.float64),
    )


def rebuild_start(model_dir: Path, x_check: np.ndarray) -> tuple[Cnn1d, dict[str, Any]]:
    """The starting model in torch, checked against its ONNX graph on real inputs (module docstring, step 3)."""
    manifest = load_manifest(model_dir)
    if [c.code for c in manifest.classes] != list(CLASSES):
        raise ModelError(f"{model_dir}: classes {[c.code for c in manifest.classes]}, expected {list(CLASSES)}")
    arch = (manifest.architecture or {}).get("arch", "cnn")
    members = int((manifest.architecture or {}).get("members", 1))
    if arch != "cnn" or members != 1:
        raise ModelError(
            f"{manifest.name} {manifest.version} is a {arch} model with {members} member(s): only a single Cnn1d "
            "(the shipped diagnosis model's architecture) can be rebuilt from its ONNX file here; pass --init with "
            "such a model directory"
        )
    model = cnn_from_onnx(model_dir / manifest.file, dropout=float((manifest.architecture or {}).get("dropout", 0.3)))
    loaded = ModelRegistry(paths={"start": model_dir}).signal_model("start")
    x = x_check[:32].astype(np.float32)
    out = loaded.predict(x)
    with torch.no_grad():
        z = model(torch.from_numpy(x)).double().numpy()
    if "logits" in out:
        gap = float(np.max(np.abs(z - out["logits"])))
    else:
        t, o = _calibration(manifest)
        gap = float(np.max(np.abs(1 / (1 + np.exp(-(z - o) / t)) - out["probabilities"])))
    if not gap <= REBUILD_TOLERANCE:
        raise ModelError(f"the torch rebuild of {model_dir} differs from its ONNX graph by {gap:.2e}")
    return model, {
        "name": manifest.name,
        "version": manifest.version,
        "sha256": manifest.sha256,
        "directory": str(model_dir),
        "trained_on": manifest.trained_on,
        "rebuild_gap": gap,
        "checked_on": int(len(x)),
    }


# ----- fine-tuning -------------------------------------------------------------------------------------
def _logits(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        parts = [model(torch.from_numpy(x[i : i + batch])).double().numpy() for i in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0, len(CLASSES)))


def _freeze_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()


def pos_weight(y: np.ndarray, cap: float = 10.0) -> np.ndarray:
    known = ~np.isnan(y)
    pos = np.nansum(y, axis=0)
    neg = known.sum(axis=0) - pos
    return cast(np.ndarray, np.clip(np.sqrt(neg / np.maximum(pos, 1.0)), 1.0, cap).astype(np.float32))


def fine_tune(
    model: Cnn1d,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    train_layers: str,
    augmenter: Augmenter | None,
    seed: int,
    say: Callable[[str], None],
) -> tuple[Cnn1d, dict[str, Any]]:
    """Module docstring, step 4; returns the kept weights and the history."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    best = copy.deepcopy(model).eval()
    val_classes = defined_classes(y_val)
    start_auc = masked_macro_auroc(y_val, _logits(model, x_val), val_classes) if val_classes else float("nan")
    history = [{"epoch": 0, "train_loss": float("nan"), "val_macro_auroc": start_auc}]
    say(
        f"epoch 0 (the starting point): validation macro-AUROC {start_auc:.4f}"
        if val_classes
        else "no validation class with positives and negatives: the last epoch will be kept"
    )
    best_auc, best_epoch = start_auc, 0
    if train_layers == "head":
        for p in model.features.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    pw = torch.from_numpy(pos_weight(y_train))
    target = torch.from_numpy(np.nan_to_num(y_train, nan=0.0).astype(np.float32))
    mask = torch.from_numpy((~np.isnan(y_train)).astype(np.float32))
    for epoch in range(1, epochs + 1):
        model.train()
        _freeze_batchnorm(model)
        order = rng.permutation(len(x_train))
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            xb = augmenter(x_train[idx], rng) if augmenter is not None else x_train[idx]
            out = model(torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)))
            per = nn.functional.binary_cross_entropy_with_logits(out, target[idx], pos_weight=pw, reduction="none")
            loss = (per * mask[idx]).sum() / mask[idx].sum().clamp(min=1.0)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        auc = masked_macro_auroc(y_val, _logits(model, x_val), val_classes) if val_classes else float("nan")
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_macro_auroc": auc})
        better = not math.isnan(auc) and (math.isnan(best_auc) or auc > best_auc)
        if better or (not val_classes and epoch == epochs):
            best_auc, best_epoch, best = auc, epoch, copy.deepcopy(model).eval()
        say(
            f"epoch {epoch}/{epochs}: train loss {total / max(seen, 1):.4f}"
            + (f", validation macro-AUROC {auc:.4f}" + (" *" if best_epoch == epoch else "") if val_classes else "")
        )
    kept = "the starting weights (no epoch beat them on validation)" if best_epoch == 0 else f"epoch {best_epoch}"
    if not val_classes:
        kept = f"the last epoch ({epochs}): the validation period has no class with positives and negatives"
    return best, {
        "history": history,
        "best_epoch": best_epoch,
        "kept": kept,
        "validation_classes": [CLASSES[k] for k in val_classes],
        "validation_macro_auroc": best_auc,
        "validation_start_macro_auroc": start_auc,
    }


# ----- sanity checks ---------------------------------------------------------------------------------
def sanity_checks(model_dir: Path, x: np.ndarray, seed: int = 1) -> dict[str, Any]:
    """Input dependence and CAM parameter randomisation of an exported model (module docstring, step 7)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    manifest = load_manifest(model_dir)
    x = x[:16].astype(np.float32)
    graph = onnx.load(str(model_dir / manifest.file))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {manifest.input.name: x}
    probs, cams = session.run([manifest.outputs["probabilities"], manifest.outputs["cams"]], feed)
    spread = float(np.min(np.std(probs, axis=0))) if len(x) > 1 else float("nan")
    rng = np.random.default_rng(seed)
    for init in graph.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype.kind == "f" and w.size > 1:
            drawn = rng.normal(float(w.mean()), float(w.std()) or 1.0, size=w.shape).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(drawn, init.name))
    randomised = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    (cams_r,) = randomised.run([manifest.outputs["cams"]], feed)
    corr: dict[str, float] = {}
    for k, code in enumerate(CLASSES):
        values = []
        for i in range(len(x)):
            a, b = cams[i, k], cams_r[i, k]
            if np.std(a) > 0 and np.std(b) > 0:
                values.append(abs(float(np.corrcoef(a, b)[0, 1])))
        corr[code] = float(np.mean(values)) if values else float("nan")
    randomisation_ok = all(not math.isnan(v) and v < RANDOMISATION_MAX_CORR for v in corr.values())
    depends_ok = len(x) < 2 or spread > 1e-6
    return {
        "n_ecgs": int(len(x)),
        "input_dependence": {
            "passed": depends_ok,
            "min_class_std": spread,
            "rule": "the probabilities differ across held-out ECGs (per class std > 1e-6)",
        },
        "parameter_randomisation": {
            "passed": randomisation_ok,
            "mean_abs_corr": corr,
            "rule": f"mean |corr(CAM, CAM with every weight redrawn)| < {RANDOMISATION_MAX_CORR} for every class",
        },
        "passed": randomisation_ok and depends_ok,
    }


# ----- the whole run ------------------------------------------------------------------------------------
#: Reasons ``iter_site_records`` counts (ECGs it could not read), beside those this module adds.
SKIPPED_WHILE_READING = ("the ECG's message row is gone", "content pruned or unreadable", "could not be decoded")


@dataclass(frozen=True)
class Used:
    """A labelled ECG taken for the run, without its signal (its model input is kept instead)."""

    label: EcgLabel
    when: datetime
    when_source: str
    patient_key: str | None

    @property
    def message_id(self) -> str:
        return self.label.ecg_message_id


def _labels_matrix(records: Sequence[Used]) -> np.ndarray:
    y = np.zeros((len(records), len(CLASSES)), dtype=np.float32)
    for i, r in enumerate(records):
        labels = r.label.labels or {}
        for k, code in enumerate(CLASSES):
            y[i, k] = np.nan if code in r.label.uncertain else float(labels.get(code, 0))
    return y


def default_ptbxl() -> Path | None:
    env = os.environ.get("ECGBRIDGE_SHARED_DATA")
    for base in ([Path(env)] if env else []) + [Path.cwd().parent / "shared" / "data"]:
        candidate = base / "ptbxl-subset"
        if (candidate / "ptbxl_database.csv").is_file():
            return candidate
    return None


def _period(when: list[datetime]) -> str:
    return f"{min(when):%Y-%m-%d}..{max(when):%Y-%m-%d}" if when else "-"


def _set_summary(records: list[Used], y: np.ndarray, groups: list[str]) -> dict[str, Any]:
    return {
        "n_ecgs": len(records),
        "n_patients": len(set(groups)),
        "period": _period([r.when for r in records]),
        "positives": {c: int(np.nansum(y[:, k])) for k, c in enumerate(CLASSES)},
        "uncertain": {c: int(np.isnan(y[:, k]).sum()) for k, c in enumerate(CLASSES)},
    }


@dataclass
class Options:
    since: datetime | None = None
    until: datetime | None = None
    live: str | None = None
    init: Path | None = None
    ptbxl: Path | None = None
    no_ptbxl: bool = False
    test_fraction: float = 0.3
    val_fraction: float = 0.15
    test_from: datetime | None = None
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-3
    batch_size: int = 32
    train_layers: str = "all"
    augment: bool = True
    min_improvement: float = 0.0
    require_ci: bool = False
    complete_only: bool = False
    min_train: int = 20
    n_bootstrap: int = 1000
    seed: int = 0
    threads: int = 1
    name: str = "diagnosis-site"
    version: str | None = None
    command: str = ""


def retrain_from_store(
    store: MessageStore, settings: Settings, out: Path, options: Options, *, log: bool = True
) -> dict[str, Any]:
    """The whole run (module docstring); returns the summary written to ``metrics.json``."""
    started = time.monotonic()
    o = options

    def say(msg: str) -> None:
        if log:
            print(msg, flush=True)

    torch.manual_seed(o.seed)
    torch.set_num_threads(o.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "proposed", out / "candidate"):
        if stale.exists():
            raise EcgBridgeError(f"{stale} exists from an earlier run: choose a new --out")
    live_dir, live_why = resolve_live(settings, store, o.live)
    init_dir = Path(o.init) if o.init is not None else live_dir
    live_manifest, init_manifest = load_manifest(live_dir), load_manifest(init_dir)

    # (1) data
    left_out: Counter[str] = Counter()
    records: list[Used] = []
    x_init, x_live = [], []
    n_found = 0
    for r in iter_site_records(store, key=os.urandom(32), since=o.since, until=o.until, skipped=left_out):
        n_found += 1
        if r.label.labels is None:
            left_out["the read names no diagnosis"] += 1
            continue
        if o.complete_only and not r.label.complete:
            left_out["statements not understood (--complete-only)"] += 1
            continue
        try:
            xi = prepare_input(r.ecg, init_manifest)
            xl = (
                xi
                if live_manifest.preprocessing == init_manifest.preprocessing
                else prepare_input(r.ecg, live_manifest)
            )
        except (ModelError, ValueError) as exc:
            left_out[f"not a model input: {str(exc).split(':')[0]}"] += 1
            continue
        records.append(Used(r.label, r.when, r.when_source, r.patient_key))  # the decoded ECG is not kept
        x_init.append(xi)
        x_live.append(xl)
    order = sorted(range(len(records)), key=lambda i: (records[i].when, records[i].message_id))
    records = [records[i] for i in order]
    x_init, x_live = [x_init[i] for i in order], [x_live[i] for i in order]
    say(
        f"site data: {n_found + sum(v for k, v in left_out.items() if k in SKIPPED_WHILE_READING)} labelled ECG(s) "
        "in the window, "
        f"{len(records)} usable; left out: "
        + ("; ".join(f"{n} {why}" for why, n in sorted(left_out.items())) or "none")
    )
    if not records:
        raise EcgBridgeError("no usable labelled ECG in the store for this window: nothing to train on")
    xs = np.stack(x_init).astype(np.float32)
    xs_live = np.stack(x_live).astype(np.float32)
    y = _labels_matrix(records)
    groups = [r.patient_key or f"ecg:{r.message_id}" for r in records]
    anonymous = sum(1 for r in records if r.patient_key is None)

    # (2) split
    split = time_split(
        [r.when for r in records],
        groups,
        test_fraction=o.test_fraction,
        val_fraction=o.val_fraction,
        test_from=o.test_from,
    )
    tr, va, te = split.indices("train"), split.indices("val"), split.indices("test")
    sets = {
        name: _set_summary([records[i] for i in idx], y[idx], [groups[i] for i in idx])
        for name, idx in (("train", tr), ("validation", va), ("held-out", te))
    }
    excluded = {k: v for k, v in split.counts().items() if k.startswith("excluded")}
    when_sources = Counter(r.when_source for r in records)
    say(
        f"split by time, patient-level: training {sets['train']['n_ecgs']} ECGs / {sets['train']['n_patients']} "
        f"patients ({sets['train']['period']}), "
        + (
            f"validation {sets['validation']['n_ecgs']} / {sets['validation']['n_patients']} "
            f"({sets['validation']['period']}), "
            if len(va)
            else "no validation period, "
        )
        + f"held-out {sets['held-out']['n_ecgs']} / "
        f"{sets['held-out']['n_patients']} (from {split.test_from:%Y-%m-%d %H:%M}); excluded "
        + (", ".join(f"{n} ({why.split(': ', 1)[1]})" for why, n in excluded.items()) or "none")
    )
    test_classes = defined_classes(y[te])
    if not test_classes:
        raise EcgBridgeError(
            "the held-out period has no class with both a positive and a negative read: the candidate cannot be "
            "compared with the live model (more over-reads, or a larger --test-fraction)"
        )
    if len(tr) < o.min_train:
        raise EcgBridgeError(f"{len(tr)} training ECG(s) after the split: fewer than --min-train {o.min_train}")
    with (out / "split.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ecg_message_id", "time", "time_source", "set"])
        for used, a in zip(records, split.assign):
            w.writerow([used.message_id, used.when.astimezone(UTC).isoformat(), used.when_source, a])

    # (3) starting point
    model, start = rebuild_start(init_dir, xs[tr])
    say(
        f"starting point: {start['name']} {start['version']} rebuilt in torch from its ONNX file "
        f"(Cnn1d; largest logit difference {start['rebuild_gap']:.1e} on {start['checked_on']} training ECGs)"
    )

    # (4) fine-tuning
    fs = float(init_manifest.input.fs_hz)
    augmenter = Augmenter(AugmentConfig(fs=fs), init_manifest.preprocessing) if o.augment else None
    candidate, tuning = fine_tune(
        model,
        xs[tr],
        y[tr],
        xs[va],
        y[va],
        epochs=o.epochs,
        lr=o.lr,
        weight_decay=o.weight_decay,
        batch_size=o.batch_size,
        train_layers=o.train_layers,
        augmenter=augmenter,
        seed=o.seed,
        say=say,
    )
    torch.save({"arch": "cnn", "state_dict": candidate.state_dict(), "start": start}, out / "checkpoint.pt")

    # (5) export
    temperature, offset = _calibration(init_manifest)
    version = o.version or f"{init_manifest.version}+site.{datetime.now(UTC):%Y%m%d}"
    cand_dir = out / "candidate"
    trained_on = (
        f"fine-tuned on {len(tr)} over-read ECGs of {sets['train']['n_patients']} patients of this site "
        f"({sets['train']['period']}; validation {len(va)} ECGs, {sets['validation']['period']}) from "
        f"{start['name']} {start['version']} ({start['trained_on']})"
    )
    exported = export_model(
        ServingGraph([candidate], temperature=temperature, offset=offset).eval(),
        cand_dir,
        classes=CLASSES,
        thresholds=dict(init_manifest.thresholds),
        real=xs[tr][:8],
        name=o.name,
        version=version,
        task="diagnosis",
        description=(
            f"{start['name']} {start['version']} fine-tuned on this site's over-read ECGs; research use only, "
            "NOT FOR CLINICAL USE."
        ),
        trained_on=trained_on,
        preprocessing=init_manifest.preprocessing,
        tiers=init_manifest.tiers,
        calibration={**(init_manifest.calibration or {}), "note": f"{start['name']} {start['version']}'s, unchanged"},
        architecture={
            "module": "training.models.Cnn1d",
            "arch": "cnn",
            "width": candidate.classifier.in_features // 4,
            "dropout": float(candidate.dropout.p),
            "members": 1,
            "parameters": int(sum(p.numel() for p in candidate.parameters())),
            "cam_stride_samples": 16,
            "fine_tuned_from": f"{start['name']} {start['version']} (sha256 {start['sha256']})",
        },
    )
    say(f"exported the candidate ({exported['export_method']}; parity {exported['parity_max_abs_diff']:.1e})")

    # (6) evaluation on the held-out period, both models through the serving path
    live_model = ModelRegistry(paths={"live": live_dir}).signal_model("live")
    cand_model = ModelRegistry(paths={"candidate": cand_dir}).signal_model("candidate")
    p_live = live_model.predict(xs_live[te])["probabilities"].astype(np.float64)
    p_cand = cand_model.predict(xs[te])["probabilities"].astype(np.float64)
    first_seen: dict[str, int] = {}  # patients numbered in time order: the bootstrap does not depend on the run's key
    group_ids = np.asarray([first_seen.setdefault(groups[i], len(first_seen)) for i in te])
    comparison = paired_macro_difference(
        y[te], p_cand, p_live, group_ids, classes=test_classes, n_bootstrap=o.n_bootstrap, seed=o.seed
    )
    comparison["classes"] = [CLASSES[k] for k in test_classes]
    site_eval = {
        "live": {
            "model": f"{live_manifest.name} {live_manifest.version}",
            **_per_class_entry(y[te], p_live, live_manifest),
        },
        "candidate": {"model": f"{o.name} {version}", **_per_class_entry(y[te], p_cand, cand_model.manifest)},
        "comparison": comparison,
    }

    # PTB-XL fold 10
    ptbxl_dir = None if o.no_ptbxl else (o.ptbxl or default_ptbxl())
    ptbxl: dict[str, Any]
    if ptbxl_dir is None:
        why = (
            "--no-ptbxl"
            if o.no_ptbxl
            else "no --ptbxl DIR given and no ptbxl-subset in $ECGBRIDGE_SHARED_DATA or ../shared/data"
        )
        ptbxl = {"available": False, "why": why}
        say(f"PTB-XL fold {TEST_FOLDS[0]}: not evaluated ({why})")
    else:
        m_live = evaluate_diagnosis(live_dir, ptbxl_dir, fold=TEST_FOLDS[0], n_bootstrap=o.n_bootstrap, seed=o.seed)
        m_cand = evaluate_diagnosis(cand_dir, ptbxl_dir, fold=TEST_FOLDS[0], n_bootstrap=o.n_bootstrap, seed=o.seed)
        ptbxl = {
            "available": True,
            "data_dir": str(ptbxl_dir),
            "live": m_live,
            "candidate": m_cand,
            "live_report": format_report(m_live),
            "candidate_report": format_report(m_cand),
        }
        say(
            f"PTB-XL fold {TEST_FOLDS[0]} ({m_live['data']['n_records']} records): live macro-AUROC "
            f"{m_live['macro_auroc']:.3f}, candidate {m_cand['macro_auroc']:.3f}"
        )

    # (7) sanity
    sanity = sanity_checks(cand_dir, xs[te])

    # (8) the rule
    rule = rule_text(o.min_improvement, o.require_ci)
    proposed, reasons = decide(
        comparison, min_improvement=o.min_improvement, require_ci=o.require_ci, sanity_passed=sanity["passed"]
    )
    summary: dict[str, Any] = {
        "decision": "proposed" if proposed else "refused",
        "reasons": reasons,
        "rule": rule,
        "command": o.command,
        "out": str(out),
        "store": redact_url(settings.database_url),
        "live": {
            "directory": str(live_dir),
            "found_as": live_why,
            "model": f"{live_manifest.name} {live_manifest.version}",
            "sha256": live_manifest.sha256,
        },
        "start": start,
        "candidate": {
            "name": o.name,
            "version": version,
            "sha256": exported["sha256"],
            "export": {k: exported[k] for k in ("export_method", "parity")},
        },
        "data": {
            "left_out": dict(left_out),
            "usable": len(records),
            "patients": len(set(groups)),
            "without_patient_id": anonymous,
            "time_source": dict(when_sources),
            "sets": sets,
            "excluded": excluded,
            "test_from": split.test_from,
            "val_from": split.val_from,
            "window": {"since": o.since, "until": o.until},
        },
        "settings": {
            "epochs": o.epochs,
            "lr": o.lr,
            "weight_decay": o.weight_decay,
            "batch_size": o.batch_size,
            "train_layers": o.train_layers,
            "augmentation": augmenter.config.describe() if augmenter else "none",
            "pos_weight": dict(zip(CLASSES, pos_weight(y[tr]).tolist())),
            "seed": o.seed,
            "threads": o.threads,
            "test_fraction": o.test_fraction,
            "test_from_given": o.test_from is not None,
            "val_fraction": o.val_fraction,
            "torch": torch.__version__,
        },
        "tuning": tuning,
        "site": site_eval,
        "ptbxl": ptbxl,
        "sanity": sanity,
        "wall_s": round(time.monotonic() - started, 1),
    }

    # (9) output
    card = render_card(summary)
    (out / "MODEL_CARD.md").write_text(card)
    if proposed:
        (cand_dir / "MODEL_CARD.md").write_text(card)
        cand_dir.rename(out / "proposed")
        summary["proposed_dir"] = str(out / "proposed")
    else:
        shutil.rmtree(cand_dir)
    (out / "metrics.json").write_text(json.dumps(to_jsonable(summary), indent=2, default=str) + "\n")
    for line in decision_lines(summary):
        say(line)
    return summary


def _per_class_entry(y: np.ndarray, p: np.ndarray, manifest: Manifest) -> dict[str, Any]:
    return {"classes": _per_class(y, p, manifest)}


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ci(ci: Sequence[float] | None, signed: bool = False) -> str:
    if ci is None:
        return "n/a"
    return f"{ci[0]:+.3f} to {ci[1]:+.3f}" if signed else f"{ci[0]:.3f}-{ci[1]:.3f}"


def decision_lines(s: dict[str, Any]) -> list[str]:
    c = s["site"]["comparison"]
    held = s["data"]["sets"]["held-out"]
    lines = [
        f"held-out period from {s['data']['test_from']:%Y-%m-%d}: {held['n_ecgs']} ECGs, {held['n_patients']} patients; "
        f"macro over {', '.join(c['classes'])}",
        f"  live       {s['site']['live']['model']}: macro-AUROC {_f(c['live'])} (95% CI {_ci(c['live_ci'])})",
        f"  candidate  {s['site']['candidate']['model']}: macro-AUROC {_f(c['candidate'])} (95% CI {_ci(c['candidate_ci'])})",
        f"  D = candidate - live: {c['difference']:+.3f} (95% CI {_ci(c['difference_ci'], signed=True)}; paired "
        f"patient-level bootstrap, {c['valid']}/{c['n_bootstrap']} valid replicates, seed {c['seed']})",
        f"sanity checks: {'passed' if s['sanity']['passed'] else 'FAILED'} (parameter randomisation "
        + ", ".join(f"{k} {_f(v, 2)}" for k, v in s["sanity"]["parameter_randomisation"]["mean_abs_corr"].items())
        + ")",
        f"rule: {s['rule']}",
    ]
    if s["decision"] == "proposed":
        lines.append(
            f"decision: PROPOSED: the model directory is {s.get('proposed_dir')}; card and metrics in {s['out']}"
        )
    else:
        lines.append(
            "decision: REFUSED: " + "; ".join(s["reasons"]) + f". No model written; card and metrics in "
            f"{s['out']} (exit status {REFUSED})"
        )
    return lines


def _class_table(entry: dict[str, Any]) -> list[str]:
    rows = [
        "| class | pos | neg | uncertain (left out) | AUROC | threshold | sensitivity (TP/P) | specificity (TN/N) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for code, c in entry["classes"].items():
        rows.append(
            f"| {code} | {c['positives']} | {c['negatives']} | {c['uncertain_left_out']} | {_f(c['auroc'])} | "
            f"{c['threshold']:.3f} | {_f(c['sensitivity'])} ({c['tp']}/{c['positives']}) | "
            f"{_f(c['specificity'])} ({c['tn']}/{c['negatives']}) |"
        )
    return rows


def render_card(s: dict[str, Any]) -> str:
    """MODEL_CARD.md of the run, from its measurements (proposed or refused, both say so)."""
    d, start, c = s["data"], s["start"], s["site"]["comparison"]
    verdict = "PROPOSED" if s["decision"] == "proposed" else "REFUSED"
    sets = d["sets"]
    lines = [
        f"# {s['candidate']['name']} {s['candidate']['version']}: {start['name']} {start['version']} fine-tuned on this "
        f"site's over-reads ({verdict}), NOT FOR CLINICAL USE",
        "",
        f"**Decision: {verdict}.** Rule: {s['rule']}."
        + (f" Refused because: {'; '.join(s['reasons'])}." if s["reasons"] else ""),
        "",
        f"Command: `{s['command']}`; store {s['store']}; {s['wall_s']:.0f} s.",
        "",
        "## Starting point",
        f"{start['name']} {start['version']} (sha256 `{start['sha256']}`, `{start['directory']}`), rebuilt in torch from "
        "its ONNX file as the `Cnn1d` it was exported from (the exporter had folded each BatchNorm into its convolution; "
        f"they stay fixed identities while fine-tuning). The rebuilt network reproduced the ONNX graph's logits to "
        f"{start['rebuild_gap']:.1e} on {start['checked_on']} of the site's training ECGs. It was trained on: "
        f"{start['trained_on']}. The live model compared against: {s['live']['model']} ({s['live']['found_as']}).",
        "",
        "## Data (this site's over-read ECGs; they stay in the store)",
        f"{d['usable']} usable ECGs of {d['patients']} patients ({d['without_patient_id']} naming no patient, each counted "
        "as a patient of its own); time = acquisition time ("
        + ", ".join(f"{n} {k}" for k, n in d["time_source"].items())
        + "). Left out: "
        + ("; ".join(f"{n} {why}" for why, n in sorted(d["left_out"].items())) or "none")
        + ". Labels: the cardiologist's current read (latest final or corrected) mapped to NORM, MI, STTC, CD, HYP; "
        "a class named only with a hedge is uncertain and left out for that ECG.",
        "",
        "| set | ECGs | patients | period | NORM | MI | STTC | CD | HYP | uncertain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in sets.items():
        lines.append(
            f"| {name} | {st['n_ecgs']} | {st['n_patients']} | {st['period']} | "
            + " | ".join(str(st["positives"][k]) for k in CLASSES)
            + f" | {sum(st['uncertain'].values())} |"
        )
    lines += [
        "",
        f"**Split** (patient-level, by time): held-out = ECGs recorded from {d['test_from']:%Y-%m-%d %H:%M} UTC ("
        + ("--test-from" if s["settings"]["test_from_given"] else f"the latest {s['settings']['test_fraction']:.0%}")
        + "), "
        + (
            f"validation = the {s['settings']['val_fraction']:.0%} before it (from {d['val_from']:%Y-%m-%d %H:%M})"
            if d["val_from"]
            else "no validation period"
        )
        + ", training = the earlier ones. A patient with an ECG in a later set has none in an earlier one; excluded "
        "for that reason: "
        + (", ".join(f"{n} ECGs ({why.split(': ', 1)[1]})" for why, n in d["excluded"].items()) or "none")
        + ".",
        "",
        "## Fine-tuning",
        f"{s['settings']['epochs']} epochs, AdamW lr {s['settings']['lr']}, weight decay {s['settings']['weight_decay']}, "
        f"batch {s['settings']['batch_size']}, layers trained: {s['settings']['train_layers']}, masked BCE with positive "
        "weights "
        + ", ".join(f"{k} {v:.2f}" for k, v in s["settings"]["pos_weight"].items())
        + f"; augmentation: {s['settings']['augmentation']}. Kept: {s['tuning']['kept']} (validation macro-AUROC "
        f"{_f(s['tuning']['validation_macro_auroc'])} over {', '.join(s['tuning']['validation_classes']) or 'no class'}; "
        f"the starting point {_f(s['tuning']['validation_start_macro_auroc'])}). Calibration constants, thresholds "
        f"and risk tiers: {start['name']} {start['version']}'s, unchanged. Seed {s['settings']['seed']}, torch "
        f"{s['settings']['torch']}.",
        "",
        "| epoch | train loss | validation macro-AUROC |",
        "|---|---|---|",
        *(
            f"| {h['epoch']} | {_f(h['train_loss'], 4)} | {_f(h['val_macro_auroc'], 4)} |"
            for h in s["tuning"]["history"]
        ),
        "",
        f"## Evaluation on the site's held-out period ({sets['held-out']['n_ecgs']} ECGs, {sets['held-out']['n_patients']} "
        "patients; serving path)",
        f"Macro-AUROC over {', '.join(c['classes'])} (the classes with positives and negatives there); 95% CIs by a "
        f"patient-level bootstrap, {c['valid']}/{c['n_bootstrap']} valid replicates, seed {c['seed']}.",
        "",
        "| model | macro-AUROC | 95% CI |",
        "|---|---|---|",
        f"| live: {s['site']['live']['model']} | {_f(c['live'])} | {_ci(c['live_ci'])} |",
        f"| candidate: {s['site']['candidate']['model']} | {_f(c['candidate'])} | {_ci(c['candidate_ci'])} |",
        f"| **D = candidate - live** (paired) | **{c['difference']:+.3f}** | {_ci(c['difference_ci'], signed=True)} |",
        "",
        "Live model, per class (at its thresholds):",
        "",
        *_class_table(s["site"]["live"]),
        "",
        "Candidate, per class:",
        "",
        *_class_table(s["site"]["candidate"]),
        "",
        f"## PTB-XL fold {TEST_FOLDS[0]}",
    ]
    p = s["ptbxl"]
    if p["available"]:
        lines += [
            f"Both models on PTB-XL strat_fold {TEST_FOLDS[0]} (`{p['data_dir']}`), for what fine-tuning did to the "
            "public benchmark (not part of the rule):",
            "",
            "```",
            p["live_report"].rstrip(),
            "",
            p["candidate_report"].rstrip(),
            "```",
        ]
    else:
        lines.append(f"Not evaluated: {p['why']}. The candidate's effect on the public benchmark is unknown.")
    san = s["sanity"]
    lines += [
        "",
        f"## Sanity checks ({san['n_ecgs']} held-out ECGs): {'passed' if san['passed'] else 'FAILED'}",
        f"- input dependence: {'passed' if san['input_dependence']['passed'] else 'FAILED'} ("
        f"{san['input_dependence']['rule']}; smallest {san['input_dependence']['min_class_std']:.2e})",
        f"- parameter randomisation: {'passed' if san['parameter_randomisation']['passed'] else 'FAILED'} ("
        f"{san['parameter_randomisation']['rule']}: "
        + ", ".join(f"{k} {_f(v, 2)}" for k, v in san["parameter_randomisation"]["mean_abs_corr"].items())
        + ")",
        "",
        "## Known limits",
        f"- {sets['held-out']['n_ecgs']} held-out ECGs: read the CIs before the point estimates.",
        "- Thresholds, tiers and calibration are the starting model's; they were not refitted on this site.",
        "- The labels are the site's cardiologists' reads as the statement tables map them "
        "(`ecgbridge overreads unmatched` lists what they did not understand).",
        "",
        "NOT FOR CLINICAL USE: every result this model produces says so.",
        "",
    ]
    return "\n".join(lines)


# ----- the clinical manifest of ``train kt --from-store`` --------------------------------------------
#: Split names of the clinical manifest (PTB-XL's folds: 1-8 train, 9 validation, 10 test).
MANIFEST_SPLITS = {"train": "1", "val": "9", "test": "10"}
#: 1000 steps per unit (1 uV per step for mV), as PTB-XL, the challenge and ``export training-set`` write.
WFDB_GAIN = 1000.0


def _write_wfdb(ecg: Ecg, folder: Path, name: str) -> None:
    """The 12 standard leads of a decoded ECG as WFDB format 16, no header comments, no base date."""
    import wfdb

    signals = np.asarray(ecg.in_lead_order(STANDARD_LEADS), dtype=np.float64)
    peak = float(np.nanmax(np.abs(signals))) if np.isfinite(signals).any() else 0.0
    n = len(STANDARD_LEADS)
    fixed = {"adc_gain": [WFDB_GAIN] * n, "baseline": [0] * n} if peak * WFDB_GAIN < 32000 else {}
    wfdb.wrsamp(
        name,
        fs=float(ecg.fs),
        units=[ecg.units] * n,
        sig_name=list(STANDARD_LEADS),
        p_signal=np.nan_to_num(signals).T,
        fmt=["16"] * n,
        write_dir=str(folder),
        **fixed,
    )


def _label_values(label: EcgLabel | None) -> dict[str, float] | None:
    """The over-read as manifest labels: superclass -> 1 stated, 0 not stated, 0.5 stated with a hedge."""
    if label is None or label.labels is None:
        return None
    return {c: 0.5 if c in label.uncertain else float(label.labels.get(c, 0)) for c in CLASSES}


def clinical_manifest_from_store(
    store: MessageStore,
    out: Path,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    test_fraction: float = 0.3,
    val_fraction: float = 0.15,
    test_from: datetime | None = None,
    log: Callable[[str], None] = print,
) -> ClinicalManifest:
    """The clinical manifest of the site's analysed ECGs, from the EHR context stored with each.

    Every analysed ECG whose stored result carries EHR context data (labs and vitals from FHIR,
    age, sex: ``mapping.ehr_context``), or that has a cardiologist's over-read, recorded in
    ``[since, until)`` (``core.training_set.iter_context_records``). Its measurements come from
    ``training.clinical.measurements_from_ehr_context`` (LOINC codes, the manifest's UCUM units,
    Observation times; an unknown unit is refused by name); its labels from the over-read
    (superclass -> 1 / 0, 0.5 for a hedged statement; none when the read names no diagnosis,
    or there is no read: stages 1 and 3 still use the ECG). Splits as ``train diagnosis
    --from-store``'s (``time_split``: patient-level, by time; split "1" train, "9" validation,
    "10" held out); ECGs of a patient of a later period are left out and counted.

    Written to ``out``: ``records/<message id>.hea/.dat`` (the 12 standard leads, WFDB format
    16), ``clinical_manifest.jsonl`` and ``report.json`` (counts). Patients are keyed by an HMAC under a key drawn for this
    run, so the file names no patient and cannot be joined with another run's; the values, times
    and labels are the site's clinical data: keep ``out`` where the store is.
    """
    out = Path(out).resolve()
    records = out / "records"
    records.mkdir(parents=True, exist_ok=True)
    skipped: Counter[str] = Counter()
    found: list[tuple[ManifestRow, datetime, str]] = []
    for r in iter_context_records(store, key=os.urandom(32), since=since, until=until, skipped=skipped):
        if any(lead not in r.ecg.leads for lead in STANDARD_LEADS):
            skipped["fewer than the 12 standard leads"] += 1
            continue
        when = r.when.astimezone(UTC)
        variables = measurements_from_ehr_context(
            r.context, ecg_time=when.isoformat(), where=f"message {r.message_id}: "
        )
        _write_wfdb(r.ecg, records, r.message_id)
        row = ManifestRow(
            ecg_id=r.message_id,
            patient_id=r.patient_key or f"ecg:{r.message_id}",
            ecg_path=f"records/{r.message_id}",
            ecg_time=when.isoformat(),
            split=None,
            variables=variables,
            labels=_label_values(r.label),
        )
        found.append((row, when, row.patient_id))
    if not found:
        raise EcgBridgeError(
            "no analysed ECG with EHR context data or an over-read in the store for this window "
            "(the context is stored when a route names an EHR source and runs a model that reads it)"
        )
    split = time_split(
        [w for _, w, _ in found],
        [g for _, _, g in found],
        test_fraction=test_fraction,
        val_fraction=val_fraction,
        test_from=test_from,
    )
    rows: list[ManifestRow] = []
    for (row, _, _), assigned in zip(found, split.assign):
        if assigned in MANIFEST_SPLITS:
            rows.append(replace(row, split=MANIFEST_SPLITS[assigned]))
        else:
            skipped[assigned] += 1
    check_split_disjoint(rows)
    manifest = ClinicalManifest(
        rows=rows,
        ecg_root=out,
        report={
            "source": "store",
            "rows": len(rows),
            "missing_ecg": [],
            "left_out": dict(skipped),
            "with_clinical_data": sum(1 for r in rows if r.variables),
            "labelled": sum(1 for r in rows if r.labels is not None),
            "splits": dict(Counter(r.split for r in rows)),
            "test_from": split.test_from.isoformat(),
            "val_from": split.val_from.isoformat() if split.val_from else None,
        },
    )
    write_manifest(manifest, out / "clinical_manifest.jsonl")
    (out / "report.json").write_text(json.dumps(manifest.report, indent=2) + "\n")  # counts only
    log(
        f"clinical manifest from the store: {len(rows)} ECGs ({manifest.report['labelled']} with an over-read, "
        f"{manifest.report['with_clinical_data']} with clinical data; splits {manifest.report['splits']}); left out: "
        + ("; ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none")
        + f" -> {out / 'clinical_manifest.jsonl'}"
    )
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ecgbridge train diagnosis --from-store",
        description="Fine-tune the live diagnosis model on the site's over-read ECGs; propose it only if it beats "
        "the live model on the site's held-out period (the latest ECGs, patient-level).",
    )
    parser.add_argument("--out", type=Path, required=True, help="card, metrics, split; proposed/ when proposed")
    parser.add_argument("--config", "-c", help="YAML configuration (default: $ECGBRIDGE_CONFIG, else the defaults)")
    parser.add_argument("--since", help="ECGs recorded since (a date, or 30d / 2w ago)")
    parser.add_argument("--until", help="ECGs recorded before (a date)")
    parser.add_argument("--live", help="the live model: a name or a model directory (default: what the routes run)")
    parser.add_argument("--init", type=Path, help="fine-tune from this model directory instead of the live model")
    parser.add_argument("--ptbxl", type=Path, help="PTB-XL directory for the fold-10 evaluation")
    parser.add_argument("--no-ptbxl", action="store_true", help="skip the PTB-XL evaluation")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="share of ECGs in the held-out period")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="share in the validation period before it")
    parser.add_argument("--test-from", help="the held-out period starts here instead (a date)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-layers", choices=("all", "head"), default="all")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument(
        "--min-improvement", type=float, default=0.0, help="D must exceed this (>= 0; default 0: beat the live model)"
    )
    parser.add_argument("--require-ci", action="store_true", help="also require D's 95%% CI lower end to exceed it")
    parser.add_argument("--complete-only", action="store_true", help="leave out reads with statements not understood")
    parser.add_argument("--min-train", type=int, default=20, help="refuse to train on fewer ECGs (default 20)")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="diagnosis-site", help="the candidate's model name")
    parser.add_argument("--version", help="the candidate's version (default: START_VERSION+site.YYYYMMDD)")
    args = parser.parse_args(argv)
    if args.min_improvement < 0:
        parser.error("--min-improvement must be >= 0: a candidate worse than the live model is never proposed")
    path = args.config or os.environ.get("ECGBRIDGE_CONFIG") or None
    settings = load_settings(path)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    print(f"store: {redact_url(settings.database_url)}", file=sys.stderr)
    options = Options(
        since=parse_when(args.since),
        until=parse_when(args.until),
        live=args.live,
        init=args.init,
        ptbxl=args.ptbxl,
        no_ptbxl=args.no_ptbxl,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        test_from=parse_when(args.test_from),
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        train_layers=args.train_layers,
        augment=not args.no_augment,
        min_improvement=args.min_improvement,
        require_ci=args.require_ci,
        complete_only=args.complete_only,
        min_train=args.min_train,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
        threads=args.threads,
        name=args.name,
        version=args.version,
        command="ecgbridge train diagnosis --from-store " + " ".join(sys.argv[1:] if argv is None else list(argv)),
    )
    summary = retrain_from_store(store, settings, args.out, options)
    return 0 if summary["decision"] == "proposed" else REFUSED


if __name__ == "__main__":
    sys.exit(main())
