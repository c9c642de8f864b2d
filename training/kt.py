"""The clinical-knowledge ECG encoder (issue #14): knowledge transfer from clinical data into an ECG-only model.

Three stages (``docs/kt-encoder.md``)::

    ecgbridge train kt --data /path/to/ptbxl --out /tmp/kt [--seeds N] [--epochs E] [--compare]
    ecgbridge train kt ... --external /path/to/cinc2021              # every arm on the challenge records too
    ecgbridge train kt --from-store [--config site.yaml] --out DIR   # the site's EHR context + over-reads
    ecgbridge train kt combine RUN_DIR [RUN_DIR ...] --out DIR     # pool single-seed --compare runs

1. **Joint-embedding pretraining.** The diagnosis encoder (``training.models``, the same
   ``--arch`` as ``ecgbridge train diagnosis``) gets a projection head; a clinical-vector
   encoder (an MLP over the standardised values *and* their missingness mask: missing
   values are zeros with mask 0, not imputed) gets another. A symmetric CLIP loss pulls an
   ECG's embedding towards its own clinical vector and away from the others of the batch
   (rows with at least one clinical value); an NT-Xent loss between two augmented views
   of every ECG (``training.pretrain.nt_xent``) trains on the ECGs without clinical data
   too (``--pretrain DIR`` adds unlabelled records, which have none). Clinical variables
   are also randomly masked (``clinical_dropout``) so the encoder learns from partial
   vectors. Folds 1-8 only.
2. **Fine-tuning** for the five superclasses from the pretrained encoder, with the
   diagnosis recipe's own loop (``training.train.fit_member``: EMA, best fold-9 epoch).
3. **Abnormality heads**: logistic heads on the fine-tuned encoder's pooled (frozen)
   features predicting binary clinical abnormalities (``training.clinical.ABNORMALITIES``
   with both classes present in folds 1-8; PTB-XL: age > 65, BMI > 30, male sex).

Only the ECG is needed at inference: the exported graph (``KtServingGraph``) has the
diagnosis outputs (probabilities, cams, logits; calibrated on fold 9) plus
``abnormalities`` (N, heads), the heads' probabilities; the manifest's ``explanations``
name them for serving (``docs/kt-encoder.md``, "Serving"), ``architecture.abnormality_heads`` too.

``--compare`` also trains, per seed, the signal-only recipe (same loop, no stage 1) and a
fully multimodal model (stage-1 encoder + clinical encoder, clinical vector also at
inference) and writes fold-10 macro-AUROC per arm with patient-level paired bootstrap CIs of
the differences to ``comparison.json`` and the model card. ``--external DIR`` scores every arm
on PhysioNet challenge records as well (``load_external``: read and labelled as ``ecgbridge
evaluate diagnosis`` reads them; the multimodal arm gets the headers' age and sex), per source
and pooled (``compare_external``).

The ship rule (``decide_ship``): the export ships only if it is at least as good as the shipped
diagnosis model on fold 10 and on the external records (both through the serving path, paired)
and passes the sanity checks and the test suite's noise and CAM tests (``run_suite_checks``);
the verdict goes into ``result.json`` and the card. Nothing here replaces the shipped model.

``--from-store`` (``training.from_store.clinical_manifest_from_store``) builds the clinical
manifest from the EHR context stored with each analysed ECG and the over-reads, and the recipe
trains on its splits (``load_manifest_data``) instead of PTB-XL's folds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ecgbridge.inference.metrics import patient_resamples
from ecgbridge.inference.models import ModelRegistry, prepare_input
from ecgbridge.inference.preprocess import DEFAULT_SPEC, Pipeline
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg
from ecgbridge.training.augment import AugmentConfig, Augmenter
from ecgbridge.training.calibration import apply_calibration, choose_tiers, fit_calibration, min_sensitivity_threshold
from ecgbridge.training.clinical import (
    VARIABLES,
    Abnormality,
    ClinicalDataError,
    ClinicalManifest,
    ManifestRow,
    Measurement,
    abnormality_targets,
    clinical_matrix,
    from_ptbxl,
    read_manifest,
    write_manifest,
)
from ecgbridge.training.datasets.challenge import ChallengeData, load_challenge, ptbxl_overlap
from ecgbridge.training.datasets.ptbxl import (
    SUPERCLASSES,
    TEST_FOLDS,
    TRAIN_FOLDS,
    VAL_FOLDS,
    PtbxlData,
    Transform,
    check_patient_disjoint,
    load_ptbxl,
)
from ecgbridge.training.datasets.ptbxl import read_signal as read_ptbxl_signal
from ecgbridge.training.evaluate import auroc, predict_outputs, to_jsonable
from ecgbridge.training.export import ServingGraph, export_model
from ecgbridge.training.from_store import defined_classes, paired_macro_difference, sanity_checks
from ecgbridge.training.pretrain import nt_xent
from ecgbridge.training.train import (
    ARCHS,
    _macro_auroc_defined,
    _seed_everything,
    build_model,
    class_pos_weight,
    fit_member,
)

__all__ = [
    "ClinicalEncoder",
    "ClinicalScaler",
    "KtServingGraph",
    "clip_loss",
    "embed",
    "pretrain_joint",
    "fit_abnormality_heads",
    "paired_bootstrap_diff",
    "train_kt",
    "main",
]

FS_HZ = 100.0


# ----- pieces ---------------------------------------------------------------------------


def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled encoder features (N, F) of a diagnosis model (``features`` + global average pool)."""
    pool = cast(nn.Module, model.pool)
    return cast(torch.Tensor, pool(cast(nn.Module, model.features)(x)).flatten(1))


def _n_features(model: nn.Module) -> int:
    return int(cast(nn.Linear, model.classifier).in_features)


class ClinicalScaler:
    """Standardise clinical values with folds 1-8 statistics; missing -> 0 with mask 0."""

    def __init__(self, values: np.ndarray, mask: np.ndarray) -> None:
        present = mask.astype(bool)
        filled = np.where(present, values, np.nan)
        with np.errstate(all="ignore"):
            self.mean = np.nan_to_num(np.nanmean(filled, axis=0))
            self.std = np.nan_to_num(np.nanstd(filled, axis=0), nan=1.0)
        self.std[self.std < 1e-6] = 1.0

    def __call__(self, values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        z = np.where(mask.astype(bool), (np.nan_to_num(values) - self.mean) / self.std, 0.0)
        return np.concatenate([z, mask], axis=1).astype(np.float32)


class ClinicalEncoder(nn.Module):
    """MLP over [standardised values, missingness mask] (2k inputs) -> an embedding."""

    def __init__(self, n_variables: int, out_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 * n_variables, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.net(v))


def clip_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` (CLIP)."""
    a = nn.functional.normalize(a, dim=1)
    b = nn.functional.normalize(b, dim=1)
    logits = a @ b.t() / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.t(), target))


def _drop_clinical(v: np.ndarray, k: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Randomly hide measured variables (value and mask to 0) with probability ``p``."""
    if p <= 0:
        return v
    hide = rng.random((len(v), k)) < p
    out = v.copy()
    out[:, :k][hide] = 0.0
    out[:, k:][hide] = 0.0
    return out


def pretrain_joint(
    model: nn.Module,
    x: np.ndarray,
    clinical: np.ndarray,
    has_clinical: np.ndarray,
    *,
    epochs: int,
    augmenter: Augmenter | None,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    temperature: float = 0.1,
    ssl_weight: float = 0.5,
    clip_weight: float = 1.0,
    clinical_dropout: float = 0.2,
    crop_s: float = 8.0,
    fs: float = FS_HZ,
    embed_dim: int = 64,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Stage 1 on ``x`` (n, 12, T) with ``clinical`` (n, 2k: values + mask); trains ``model.features`` in place."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    width = _n_features(model)
    k = clinical.shape[1] // 2
    ecg_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, embed_dim)).to(device)
    clin = ClinicalEncoder(k, embed_dim).to(device)
    model = model.to(device)
    params = [*cast(nn.Module, model.features).parameters(), *ecg_head.parameters(), *clin.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * max(1, len(x) // batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    crop = min(int(crop_s * fs), x.shape[-1])
    history: list[dict[str, float]] = []
    started = time.monotonic()
    step = 0

    def view(batch: np.ndarray) -> torch.Tensor:
        v = augmenter(batch, rng) if augmenter is not None else batch
        starts = rng.integers(0, v.shape[-1] - crop + 1, size=len(v))
        return torch.from_numpy(np.stack([r[:, s : s + crop] for r, s in zip(v, starts)]).astype(np.float32)).to(device)

    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(x))
        sums = {"clip": 0.0, "nt_xent": 0.0, "loss": 0.0}
        seen = 0
        for i in range(0, max(1, len(order) - batch_size + 1), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                continue
            ea = ecg_head(embed(model, view(x[idx])))
            eb = ecg_head(embed(model, view(x[idx])))
            loss_ssl = nt_xent(ea, eb, temperature)
            with_clin = np.flatnonzero(has_clinical[idx])
            if len(with_clin) >= 2:
                v = torch.from_numpy(_drop_clinical(clinical[idx[with_clin]], k, clinical_dropout, rng)).to(device)
                loss_clip = clip_loss(ea[with_clin], clin(v), temperature)
            else:
                loss_clip = torch.zeros((), device=device)
            loss = clip_weight * loss_clip + ssl_weight * loss_ssl
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            optimiser.step()
            if step < steps:
                scheduler.step()
            step += 1
            for name, value in (("clip", loss_clip), ("nt_xent", loss_ssl), ("loss", loss)):
                sums[name] += float(value.detach()) * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch, **{k2: v2 / max(seen, 1) for k2, v2 in sums.items()}})
        log(
            f"[stage 1] epoch {epoch:3d}/{epochs} clip {history[-1]['clip']:.4f} nt_xent {history[-1]['nt_xent']:.4f} "
            f"(chance {math.log(batch_size):.2f} / {math.log(2 * batch_size - 1):.2f}; "
            f"{int(time.monotonic() - started)}s)"
        )
    model.eval()
    return {
        "history": history,
        "records": int(len(x)),
        "with_clinical": int(np.sum(has_clinical)),
        "epochs": epochs,
        "batch_size": batch_size,
        "temperature": temperature,
        "ssl_weight": ssl_weight,
        "clip_weight": clip_weight,
        "clinical_dropout": clinical_dropout,
        "embed_dim": embed_dim,
        "wall_s": round(time.monotonic() - started, 1),
        "clinical_encoder": clin.cpu(),
    }


@torch.no_grad()
def _embeddings(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [embed(model, torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, _n_features(model)), np.float32)


def fit_abnormality_heads(
    features: np.ndarray, targets: np.ndarray, *, steps: int = 300, weight_decay: float = 1e-2, seed: int = 0
) -> nn.Linear:
    """Stage 3: one logistic head per column of ``targets`` (1 / 0 / NaN = unknown, masked out)."""
    torch.manual_seed(seed)
    f = torch.from_numpy(features.astype(np.float32))
    t = torch.from_numpy(np.nan_to_num(targets).astype(np.float32))
    known = torch.from_numpy((~np.isnan(targets)).astype(np.float32))
    head = nn.Linear(f.shape[1], targets.shape[1])
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=weight_decay)
    pos = (t * known).sum(0)
    neg = ((1 - t) * known).sum(0)
    pos_weight = torch.clamp(torch.sqrt(neg / torch.clamp(pos, min=1.0)), 1.0, 10.0)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(head(f), t, pos_weight=pos_weight, reduction="none")
        loss = (loss * known).sum() / torch.clamp(known.sum(), min=1.0)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    return head.eval()


class KtServingGraph(ServingGraph):
    """``ServingGraph`` + ``abnormalities`` (N, heads): the stage-3 heads' probabilities, member mean."""

    output_names = ("probabilities", "cams", "logits", "abnormalities")

    def __init__(self, members: list[nn.Module], heads: list[nn.Linear], temperature: Any, offset: Any) -> None:
        super().__init__(members, temperature=temperature, offset=offset)
        if len(heads) != len(members):
            raise ValueError("one abnormality head per member")
        self.heads = nn.ModuleList(heads)

    def forward(self, ecg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        cams, logits, abn = [], [], []
        for member, head in zip(self.members, self.heads):
            classifier = cast(nn.Linear, member.classifier)
            features = cast(nn.Module, member.features)(ecg)
            cam = torch.matmul(classifier.weight, features)
            cams.append(cam)
            logits.append(cam.mean(dim=-1) + classifier.bias)
            abn.append(torch.sigmoid(head(features.mean(dim=-1))))
        cam = torch.stack(cams).mean(dim=0)
        logit = torch.stack(logits).mean(dim=0)
        probabilities = torch.sigmoid((logit - self.offset) / self.temperature)
        return probabilities, cam, logit, torch.stack(abn).mean(dim=0)


class MultimodalNet(nn.Module):
    """The fully multimodal arm: ECG features and the clinical encoder's embedding -> class logits."""

    def __init__(self, ecg_model: nn.Module, n_variables: int, n_classes: int, clin_dim: int = 32) -> None:
        super().__init__()
        self.ecg = ecg_model
        self.clin = ClinicalEncoder(n_variables, clin_dim)
        self.dropout = nn.Dropout(0.3)
        self.classifier = nn.Linear(_n_features(ecg_model) + clin_dim, n_classes)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        z = torch.cat([embed(self.ecg, x), self.clin(v)], dim=1)
        return cast(torch.Tensor, self.classifier(self.dropout(z)))


def fit_multimodal(
    train: PtbxlData,
    val: PtbxlData,
    v_train: np.ndarray,
    v_val: np.ndarray,
    *,
    arch: str,
    width: int,
    dropout: float,
    init_features: dict[str, torch.Tensor] | None,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    pos_weight: np.ndarray,
    augmenter: Augmenter | None,
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train the multimodal arm (BCE, AdamW, cosine); keep the epoch with the best fold-9 macro-AUROC."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ecg = build_model(arch, width=width, dropout=dropout)
    if init_features is not None:
        cast(nn.Module, ecg.features).load_state_dict(init_features)
    net = MultimodalNet(ecg, v_train.shape[1] // 2, len(SUPERCLASSES))
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * math.ceil(len(train) / batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.from_numpy(pos_weight))
    y = torch.from_numpy(train.y)
    best, best_state, best_epoch = -1.0, copy.deepcopy(net.state_dict()), 0
    step = 0
    for epoch in range(1, epochs + 1):
        net.train()
        order = rng.permutation(len(train))
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                continue
            xb = augmenter(train.x[idx], rng) if augmenter is not None else train.x[idx]
            out = net(torch.from_numpy(xb.astype(np.float32)), torch.from_numpy(v_train[idx]))
            loss = loss_fn(out, y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step < steps:
                scheduler.step()
            step += 1
        z_val = _multimodal_logits(net, val.x, v_val)
        auc = _macro_auroc_defined(val.y, z_val)
        if not math.isnan(auc) and auc > best:
            best, best_state, best_epoch = auc, copy.deepcopy(net.state_dict()), epoch
        log(f"[multimodal seed {seed}] epoch {epoch}/{epochs} fold-9 macro-AUROC {auc:.4f}")
    net.load_state_dict(best_state)
    return {"model": net.eval(), "best_epoch": best_epoch, "val_macro_auroc": best}


@torch.no_grad()
def _multimodal_logits(net: MultimodalNet, x: np.ndarray, v: np.ndarray, batch_size: int = 256) -> np.ndarray:
    net.eval()
    out = [
        net(torch.from_numpy(x[i : i + batch_size]), torch.from_numpy(v[i : i + batch_size])).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(SUPERCLASSES)))


@torch.no_grad()
def _logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(x[i : i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(SUPERCLASSES)))


def paired_bootstrap_diff(
    y: np.ndarray, za: np.ndarray, zb: np.ndarray, pids: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Macro-AUROC of b minus a on the same patient-level resamples: point, 95% CI, P(diff <= 0)."""
    point = _macro_auroc_defined(y, zb) - _macro_auroc_defined(y, za)
    diffs = []
    for rows in patient_resamples(pids, n_bootstrap, seed):
        if any(y[rows, k].min() == y[rows, k].max() for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)):
            continue  # a class defined on the full set is undefined in this replicate
        diffs.append(_macro_auroc_defined(y[rows], zb[rows]) - _macro_auroc_defined(y[rows], za[rows]))
    arr = np.asarray(diffs)
    return {
        "diff": point,
        "ci": [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))] if arr.size else None,
        "p_not_better": float(np.mean(arr <= 0)) if arr.size else None,
        "valid_resamples": int(arr.size),
        "n_bootstrap": n_bootstrap,
    }


#: The arms in table order; "ssl-only" is the stage-1 ablation (``clip_weight=0``: ECG views only);
#: "shipped" is the shipped diagnosis model (its serving-path probabilities), the ship rule's reference.
ARMS = ("shipped", "signal-only", "ssl-only", "knowledge-transfer", "multimodal")


def compare_arms(
    y: np.ndarray,
    pids: np.ndarray,
    arms: dict[str, list[np.ndarray]],
    *,
    n_bootstrap: int,
    seed: int = 0,
    fold: int | str = TEST_FOLDS[0],
) -> dict[str, Any]:
    """Macro-AUROC per arm (seed-ensemble of logits, and mean/sd over seeds) + paired bootstrap diffs.

    ``fold`` names the set (fold 10, or an external source). The macro is over the classes with
    positives and negatives in ``y``; the others are named in ``left_out_classes`` (an external
    source may have no MI at all), and a bootstrap replicate in which a kept class loses its
    positives or negatives is skipped, so every replicate averages the same classes.
    """
    ensembles = {arm: np.mean(zs, axis=0) for arm, zs in arms.items() if len(zs)}
    per_seed_auc = {arm: [_macro_auroc_defined(y, z) for z in zs] for arm, zs in arms.items() if len(zs)}
    positives = y.sum(axis=0) if len(y) else np.zeros(len(SUPERCLASSES))
    out: dict[str, Any] = {
        "fold": fold,
        "n_records": int(len(y)),
        "n_patients": int(np.unique(pids).size),
        "label_counts": {c: int(y[:, k].sum()) for k, c in enumerate(SUPERCLASSES)},
        "macro_classes": [c for k, c in enumerate(SUPERCLASSES) if 0 < positives[k] < len(y)],
        "left_out_classes": {
            c: "no positives" if positives[k] == 0 else "no negatives"
            for k, c in enumerate(SUPERCLASSES)
            if not 0 < positives[k] < len(y)
        },
        "n_seeds": {arm: len(zs) for arm, zs in arms.items() if len(zs)},
        "seed_ensemble_macro_auroc": {arm: _macro_auroc_defined(y, z) for arm, z in ensembles.items()},
        "seed_mean_macro_auroc": {
            arm: {"mean": float(np.mean(v)), "sd": float(np.std(v)), "values": v} for arm, v in per_seed_auc.items()
        },
        "paired_differences": {},
    }
    present = [arm for arm in ARMS if arm in ensembles]
    if len(y):
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                out["paired_differences"][f"{b} - {a}"] = paired_bootstrap_diff(
                    y, ensembles[a], ensembles[b], pids, n_bootstrap=n_bootstrap, seed=seed
                )
    return out


def _pool_arms(loaded: Sequence[Any]) -> dict[str, list[np.ndarray]]:
    """Every run's per-seed logits by arm; the shipped model's probabilities once (the first run's)."""
    arms: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS}
    for z in loaded:
        for arm in ARMS:
            key = f"logits_{arm.replace('-', '_')}"
            if key in z.files:
                arms[arm].extend(list(z[key]))
    if all("shipped_probabilities" in z.files for z in loaded):
        if any(not np.allclose(z["shipped_probabilities"], loaded[0]["shipped_probabilities"]) for z in loaded):
            raise ValueError("the runs compared with different shipped models (shipped_probabilities differ)")
        arms["shipped"] = [loaded[0]["shipped_probabilities"]]
    return arms


def combine_runs(run_dirs: Sequence[Path], out: Path, *, n_bootstrap: int = 1000) -> dict[str, Any]:
    """Pool single-seed runs into one comparison (``comparison.json``, ``COMPARISON.md``).

    Fold 10 from each run's ``fold10_outputs.npz``; the external records from its
    ``external_outputs.npz`` when every run has one (runs with ``--external`` on the same
    records). Each run's ship decision (``result.json``) is listed.
    """
    loaded = [np.load(Path(d) / "fold10_outputs.npz") for d in run_dirs]
    ref = loaded[0]
    for d, z in zip(run_dirs, loaded):
        if not np.array_equal(z["ecg_ids"], ref["ecg_ids"]):
            raise ValueError(f"{d} was evaluated on other records than {run_dirs[0]}")
    comparison = compare_arms(ref["y"], ref["patient_ids"], _pool_arms(loaded), n_bootstrap=n_bootstrap)
    comparison["runs"] = [str(d) for d in run_dirs]
    results = [json.loads((Path(d) / "result.json").read_text()) for d in run_dirs]
    ext_files = [Path(d) / "external_outputs.npz" for d in run_dirs]
    if all(f.is_file() for f in ext_files):
        ext_loaded = [np.load(f) for f in ext_files]
        for d, z in zip(run_dirs, ext_loaded):
            if not np.array_equal(z["names"], ext_loaded[0]["names"]):
                raise ValueError(f"{d} was evaluated on other external records than {run_dirs[0]}")
        first_ext = next((r["external"] for r in results if r.get("external")), None) or {}
        comparison["external"] = {
            "data": first_ext.get("data"),
            "clinical_variables": first_ext.get("clinical_variables"),
            "comparison": compare_external(
                ext_loaded[0]["y"],
                [str(s) for s in ext_loaded[0]["sources"]],
                _pool_arms(ext_loaded),
                n_bootstrap=n_bootstrap,
                pooled_sources=(first_ext.get("data") or {}).get("pooled_sources"),
            ),
        }
    elif any(f.is_file() for f in ext_files):
        comparison["external_note"] = "only some runs have external_outputs.npz: external records not pooled"
    comparison["ship_decisions"] = [
        {"run": str(d), "ships": (r.get("ship") or {}).get("ships"), "text": (r.get("ship") or {}).get("text")}
        for d, r in zip(run_dirs, results)
    ]
    kt_runs = [(d, z) for d, z in zip(run_dirs, loaded) if "logits_knowledge_transfer" in z.files]
    first = json.loads((Path(kt_runs[0][0]) / "result.json").read_text()) if kt_runs else {}
    codes = [h["code"] for h in first.get("abnormality_heads", [])]
    kt_loaded = [z for _, z in kt_runs]
    if codes and all(z["abnormalities"].shape == kt_loaded[0]["abnormalities"].shape for z in kt_loaded):
        targets = ref["abnormality_targets"]
        mean_probs = np.mean([z["abnormalities"] for z in kt_loaded], axis=0)
        comparison["abnormalities"] = {
            code: {
                "seed_ensemble_auroc": auroc(
                    targets[~np.isnan(targets[:, j]), j], mean_probs[~np.isnan(targets[:, j]), j]
                ),
                "per_seed_auroc": [
                    auroc(targets[~np.isnan(targets[:, j]), j], z["abnormalities"][~np.isnan(targets[:, j]), j])
                    for z in kt_loaded
                ],
                "n": int((~np.isnan(targets[:, j])).sum()),
                "positives": int(np.nansum(targets[:, j])),
            }
            for j, code in enumerate(codes)
        }
    comparison["seeds"] = [int(s) for z in loaded for s in z["seeds"]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(to_jsonable(comparison), indent=2) + "\n")
    lines = _comparison_lines(comparison)
    if comparison.get("external"):
        lines += _external_card_lines(comparison["external"])
    lines += ["", "## Ship decisions of the runs", ""]
    lines += [f"- `{r['run']}`: {r['text'] or 'no decision recorded'}" for r in comparison["ship_decisions"]]
    (out / "COMPARISON.md").write_text("\n".join(lines) + "\n")
    return comparison


def _set_name(fold: int | str) -> str:
    text = str(fold)
    return f"Fold {text}" if text.isdigit() else text[:1].upper() + text[1:]


def _comparison_lines(c: dict[str, Any]) -> list[str]:
    left_out = c.get("left_out_classes") or {}
    lines = [
        f"{_set_name(c['fold'])}: {c['n_records']} records, {c['n_patients']} patients; positives {c['label_counts']}"
        + (
            "; macro over "
            + ", ".join(c["macro_classes"])
            + ", left out: "
            + ", ".join(f"{k} ({v})" for k, v in left_out.items())
            if left_out
            else ""
        )
        + ".",
        "",
        "| arm | seeds | seed-ensemble macro-AUROC | mean over seeds (sd) |",
        "|---|---|---|---|",
    ]
    for arm, value in c["seed_ensemble_macro_auroc"].items():
        m = c["seed_mean_macro_auroc"][arm]
        lines.append(f"| {arm} | {c['n_seeds'][arm]} | {_f(value)} | {_f(m['mean'])} ({_f(m['sd'])}) |")
    if c["paired_differences"]:
        lines += ["", "Paired patient-level bootstrap of the seed-ensembles' difference:", ""]
        lines += ["| difference | point | 95% CI | P(diff <= 0) | valid resamples |", "|---|---|---|---|---|"]
        for k, v in c["paired_differences"].items():
            ci = f"{_f(v['ci'][0])} to {_f(v['ci'][1])}" if v["ci"] else "n/a"
            lines.append(
                f"| {k} | {_f(v['diff'])} | {ci} | {_f(v['p_not_better'])} | "
                f"{v['valid_resamples']}/{v['n_bootstrap']} |"
            )
    else:
        lines += ["", "Only the knowledge-transfer arm was trained (no `--compare`)."]
    if c.get("abnormalities"):
        lines += ["", "Knowledge-transfer abnormality heads (stage 3), fold 10:", ""]
        lines += ["| head | AUROC, mean of seeds' probabilities | per seed | n | positives |", "|---|---|---|---|---|"]
        for code, v in c["abnormalities"].items():
            per = ", ".join(_f(a) for a in v["per_seed_auroc"])
            lines.append(f"| {code} | {_f(v['seed_ensemble_auroc'])} | {per} | {v['n']} | {v['positives']} |")
    return lines


# ----- external records, the shipped model and the ship rule ---------------------------------

#: Clinical variables the challenge headers carry (``# Age:``, ``# Sex:``): all the multimodal arm gets there.
EXTERNAL_VARIABLES = ("30525-0", "46098-0")
#: Ages above this are written as it, as ``from_ptbxl`` does with PTB-XL's 300 (its training ages stop at 90).
AGE_CAP = 90.0


@dataclass(frozen=True)
class ExternalSet:
    """Challenge records for the comparison, with the clinical variables their headers give."""

    data: ChallengeData
    rows: list[ManifestRow]
    info: dict[str, Any]


def _header_row(name: str, age: float | None, sex: str | None) -> ManifestRow:
    variables = []
    if age is not None and math.isfinite(age):
        variables.append(Measurement("30525-0", min(float(age), AGE_CAP), "a"))
    if sex in ("male", "female"):
        variables.append(Measurement("46098-0", 1.0 if sex == "male" else 0.0, "1"))
    return ManifestRow(f"challenge-{name}", name, name, None, None, tuple(variables))


def load_external(
    directory: Path, ptbxl_dir: Path | None, *, transform: Transform | None = None, drop: set[str] | None = None
) -> ExternalSet:
    """Challenge records (``training.datasets.challenge``: SNOMED CT -> superclasses, source by prefix).

    Signals go through ``transform`` (default: the serving pipeline, ``inference.preprocess``,
    as ``load_ptbxl``). PTB-XL recordings (``HR``) found in ``ptbxl_dir`` are dropped (they are
    training or fold-10 records; ``ecgbridge evaluate diagnosis --train-data`` drops the same),
    and so are the names in ``drop``.
    """
    data = load_challenge(Path(directory), transform=transform)
    overlap = ptbxl_overlap(data.names, ptbxl_dir)
    found = {name for name, fold in overlap.items() if fold is not None} | set(drop or ())
    kept = data.drop(found) if found else data
    rows = [_header_row(n, a, s) for n, a, s in zip(kept.names, kept.ages, kept.sexes)]
    own = {"PTB-XL"} if ptbxl_dir is not None else set()  # the training data's own database is not external
    info = {
        "pooled_sources": sorted(set(kept.sources) - own),
        "not_pooled": {s: "the training data's own database: reported per source, not pooled" for s in own},
        "data_dir": str(directory),
        "n_records": len(kept),
        "sources": {s: kept.sources.count(s) for s in sorted(set(kept.sources))},
        "label_counts": kept.label_counts(),
        "excluded_no_superclass": list(data.excluded),
        "unmapped_codes": data.unmapped_codes,
        "ptbxl_checked_in": str(ptbxl_dir) if ptbxl_dir is not None else None,
        "dropped_in_ptbxl_data": {n: overlap.get(n) for n in sorted(found)},
        "with_age": sum(1 for r in rows if any(m.loinc == "30525-0" for m in r.variables)),
        "with_sex": sum(1 for r in rows if any(m.loinc == "46098-0" for m in r.variables)),
    }
    return ExternalSet(kept, rows, info)


def compare_external(
    y: np.ndarray,
    sources: Sequence[str],
    arms: dict[str, list[np.ndarray]],
    *,
    n_bootstrap: int,
    seed: int = 0,
    pooled_sources: Sequence[str] | None = None,
) -> dict[str, Any]:
    """``compare_arms`` on the external records per source and pooled over ``pooled_sources`` (default: all).

    Record-level bootstrap: the challenge gives no patient ids. PTB-XL's own recordings are
    not pooled when the models were trained on PTB-XL (``load_external``): not external data.
    """
    src = np.asarray(sources)
    pooled = sorted(set(sources)) if pooled_sources is None else list(pooled_sources)
    keep = np.flatnonzero(np.isin(src, pooled))
    out: dict[str, Any] = {
        "pooled_sources": pooled,
        "pooled": compare_arms(
            y[keep],
            np.arange(len(keep)),
            {arm: [z[keep] for z in zs] for arm, zs in arms.items()},
            n_bootstrap=n_bootstrap,
            seed=seed,
            fold="external, pooled (" + ", ".join(pooled) + ")",
        ),
    }
    out["sources"] = {}
    for name in sorted(set(sources)):
        keep = np.flatnonzero(src == name)
        out["sources"][name] = compare_arms(
            y[keep],
            np.arange(len(keep)),
            {arm: [z[keep] for z in zs] for arm, zs in arms.items()},
            n_bootstrap=n_bootstrap,
            seed=seed,
            fold=f"external: {name}",
        )
    return out


def shipped_diagnosis_dir() -> Path:
    """The shipped diagnosis model's directory (``inference/shipped/diagnosis-baseline``)."""
    return ModelRegistry().available()["diagnosis"]


def _serving_transform(manifest: Any) -> Transform:
    """Record -> model input through ``inference.models.prepare_input``: what serving does to an ECG."""

    def transform(signal: np.ndarray, fs: float, units: str) -> np.ndarray:
        ecg = Ecg(signals=signal, leads=STANDARD_LEADS, fs=fs, source_format="wfdb", units=units)
        return prepare_input(ecg, manifest)

    return transform


def _serving_probabilities(loaded: Any, x: np.ndarray) -> np.ndarray:
    """The exported model's ``probabilities`` (ONNX Runtime) in SUPERCLASSES order, matched by code."""
    codes = [c.code for c in loaded.manifest.classes]
    p = predict_outputs(loaded, x)["probabilities"].astype(np.float64)
    return p[:, [codes.index(c) for c in SUPERCLASSES]] if len(p) else np.zeros((0, len(SUPERCLASSES)))


def _paired_vs_shipped(
    y: np.ndarray, p_kt: np.ndarray, p_shipped: np.ndarray, groups: np.ndarray, *, n_bootstrap: int, seed: int
) -> dict[str, Any]:
    """KT export vs the shipped model on the same records (``from_store.paired_macro_difference``)."""
    classes = defined_classes(y)
    cmp = paired_macro_difference(y, p_kt, p_shipped, groups, classes=classes, n_bootstrap=n_bootstrap, seed=seed)
    cmp["classes"] = [SUPERCLASSES[k] for k in classes]
    cmp["left_out_classes"] = [c for k, c in enumerate(SUPERCLASSES) if k not in classes]
    cmp["n_records"] = int(len(y))
    return cmp


#: The test-suite checks the shipped model's card names (run against a candidate through
#: ``ECGBRIDGE_TEST_DIAGNOSIS_MODEL``): check -> (pytest node id, required for shipping).
SUITE_CHECKS: dict[str, tuple[str, bool]] = {
    "noise": ("tests/unit/test_quality.py::test_noise_on_normal_ecgs_does_not_score_above_a_true_mi", True),
    "cam_randomisation": ("tests/unit/test_explain.py::test_shipped_model_parameter_randomisation", True),
    # the shipped network fails this one (a strict xfail by its sha256), so it is reported, not required
    "mi_cam_qrs_st": ("tests/unit/test_explain.py::test_shipped_model_mi_map_weighs_qrs_st_over_baseline", False),
}


def _repository_root() -> Path | None:
    """The checkout whose ``tests/`` hold the checks: beside this package's source, else the working folder."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "tests" / "unit" / "test_quality.py").is_file():
            return root
    return None


def run_suite_checks(model_dir: Path, *, timeout_s: float = 900.0) -> dict[str, Any]:
    """The noise and CAM tests of the test suite on ``model_dir`` (pytest, ``ECGBRIDGE_TEST_DIAGNOSIS_MODEL``).

    The same tests the shipped model passes, not a copy of them. Outcome per check: passed,
    failed, xfailed, skipped (with pytest's message) or not run (no checkout with ``tests/``).
    """
    import subprocess
    import tempfile
    import xml.etree.ElementTree as ET

    root = _repository_root()
    if root is None:
        why = "no checkout with tests/unit/test_quality.py beside the package or in the working folder"
        return {"ran": False, "why": why, "checks": {}, "passed": False}
    env = {**os.environ, "ECGBRIDGE_TEST_DIAGNOSIS_MODEL": str(Path(model_dir).resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        ids = [node for node, _ in SUITE_CHECKS.values()]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *ids]
        started = time.monotonic()
        proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        cases: dict[str, ET.Element] = {}
        if junit.is_file():
            for element in ET.parse(junit).getroot().iter("testcase"):
                cases[element.get("name", "")] = element
    checks: dict[str, Any] = {}
    for check, (node, required) in SUITE_CHECKS.items():
        found = cases.get(node.split("::")[-1])
        outcome, message = "not run", (proc.stdout + proc.stderr)[-300:]
        if found is not None:
            outcome, message = "passed", ""
            for child in found:
                if child.tag in ("failure", "error"):
                    outcome, message = "failed", child.get("message", "")
                elif child.tag == "skipped":
                    xfail = child.get("type") == "pytest.xfail"
                    outcome, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
        first_line = message.strip().splitlines()[0] if message.strip() else ""
        checks[check] = {"test": node, "required": required, "outcome": outcome, "message": first_line[:300]}
    return {
        "ran": True,
        "root": str(root),
        "returncode": proc.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "checks": checks,
        "passed": all(c["outcome"] == "passed" for c in checks.values() if c["required"]),
    }


def ship_rule_text(test_label: str = f"PTB-XL fold {TEST_FOLDS[0]}") -> str:
    return (
        "ship the knowledge-transfer export only if its macro-AUROC is at least the shipped diagnosis model's "
        f"(D = KT - shipped >= 0, point estimate, same records, serving path) on {test_label} AND on the external "
        "records (pooled over their sources, the training data's own database left out), and it passes the sanity checks of `train diagnosis --from-store` (input dependence, "
        "CAM parameter randomisation) and the test suite's noise test and CAM parameter-randomisation test "
        "(the checks the shipped model passes); the CIs are reported, not used"
    )


def decide_ship(
    fold10: dict[str, Any] | None,
    external: dict[str, Any] | None,
    sanity: dict[str, Any],
    suite: dict[str, Any],
    *,
    test_label: str = f"PTB-XL fold {TEST_FOLDS[0]}",
) -> dict[str, Any]:
    """``ship_rule_text``'s rule -> {ships, reasons, text}; the text is the card's one-line verdict."""
    reasons: list[str] = []
    parts: list[str] = []
    pooled = "the external records (pooled: " + ", ".join((external or {}).get("pooled_sources") or []) + ")"
    for label, cmp in ((test_label, fold10), (pooled, external)):
        if cmp is None:
            reasons.append(f"not evaluated on {label}")
            continue
        d = cmp["difference"]
        ci = cmp.get("difference_ci")
        ci_text = f"D {d:+.3f}, 95% CI {ci[0]:+.3f} to {ci[1]:+.3f}" if ci else f"D {d:+.3f}, no CI"
        parts.append(f"KT {_f(cmp['candidate'])} vs shipped {_f(cmp['live'])} on {label} ({ci_text})")
        if math.isnan(d) or d < 0:
            reasons.append(f"KT {_f(cmp['candidate'])} < shipped {_f(cmp['live'])} on {label} ({ci_text})")
    if not sanity.get("passed"):
        reasons.append("a sanity check failed (input dependence or CAM parameter randomisation)")
    if not suite.get("ran"):
        reasons.append(f"the test suite's noise and CAM checks were not run ({suite.get('why')})")
    else:
        for check, c in suite["checks"].items():
            if c["required"] and c["outcome"] != "passed":
                reasons.append(f"the suite's {check} check: {c['outcome']}")
    ships = not reasons
    text = "ships: yes: " + "; ".join(parts) if ships else "ships: no, because " + "; ".join(reasons)
    return {
        "ships": ships,
        "reasons": reasons,
        "comparisons": parts,
        "text": text,
        "rule": ship_rule_text(test_label),
        "test_label": test_label,
    }


def _ship_evaluation(
    model_dir: Path,
    shipped_dir: Path,
    *,
    load_test: Callable[[Transform], PtbxlData],
    test: PtbxlData,
    test_label: str = f"PTB-XL fold {TEST_FOLDS[0]}",
    ext: ExternalSet | None,
    ext_ptbxl: Path | None,
    n_bootstrap: int,
    seed: int,
    suite_checks: bool,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ship rule's measurements: the export and the shipped model through the serving path, paired.

    ``load_test(transform)`` reloads the test records with a model's own preprocessing (its
    manifest's pipeline via ``prepare_input``), so both models are scored as serving would score
    them. Returns the decision (``decide_ship`` + what it was decided on) and the shipped model's
    probabilities (``fold10``, ``external``) for the comparison tables.
    """
    models = {
        "kt": ModelRegistry(paths={"kt": Path(model_dir)}).signal_model("kt"),
        "shipped": ModelRegistry(paths={"shipped": Path(shipped_dir)}).signal_model("shipped"),
    }
    p_test: dict[str, np.ndarray] = {}
    x_kt = test.x
    for tag, loaded in models.items():
        data = load_test(_serving_transform(loaded.manifest))
        if not np.array_equal(data.ecg_ids, test.ecg_ids):
            raise ValueError(f"{tag}: the serving path read other test records than training did")
        p_test[tag] = _serving_probabilities(loaded, data.x)
        x_kt = data.x if tag == "kt" else x_kt
    fold10 = _paired_vs_shipped(
        test.y, p_test["kt"], p_test["shipped"], test.patient_ids, n_bootstrap=n_bootstrap, seed=seed
    )
    external: dict[str, Any] | None = None
    p_ext: dict[str, np.ndarray] = {}
    if ext is not None:
        for tag, loaded in models.items():
            again = load_external(Path(ext.info["data_dir"]), ext_ptbxl, transform=_serving_transform(loaded.manifest))
            if again.data.names != ext.data.names:
                raise ValueError(f"{tag}: the serving path read other external records than the arms did")
            p_ext[tag] = _serving_probabilities(loaded, again.data.x)
        y, sources = ext.data.y, np.asarray(ext.data.sources)
        pooled = np.flatnonzero(np.isin(sources, ext.info["pooled_sources"]))
        external = _paired_vs_shipped(
            y[pooled], p_ext["kt"][pooled], p_ext["shipped"][pooled], pooled, n_bootstrap=n_bootstrap, seed=seed
        )
        external["pooled_sources"] = ext.info["pooled_sources"]
        external["sources"] = {}
        for name in sorted(set(ext.data.sources)):
            keep = np.flatnonzero(sources == name)
            external["sources"][name] = _paired_vs_shipped(
                y[keep], p_ext["kt"][keep], p_ext["shipped"][keep], keep, n_bootstrap=n_bootstrap, seed=seed
            )
    sanity = sanity_checks(Path(model_dir), x_kt)
    suite = (
        run_suite_checks(Path(model_dir))
        if suite_checks
        else {"ran": False, "why": "switched off (--no-suite-checks)", "checks": {}, "passed": False}
    )
    decision = decide_ship(fold10, external, sanity, suite, test_label=test_label)
    m = models["shipped"].manifest
    decision.update(
        shipped={"name": m.name, "version": m.version, "sha256": m.sha256, "directory": str(shipped_dir)},
        fold10=fold10,
        external=external,
        sanity=sanity,
        suite=suite,
    )
    scores = {"fold10": p_test["shipped"], "kt_export_fold10": p_test["kt"]}
    if p_ext:
        scores.update(external=p_ext["shipped"], kt_export_external=p_ext["kt"])
    return decision, scores


# ----- the recipe -------------------------------------------------------------------------


def _rows_for(data: PtbxlData, by_ecg: dict[str, ManifestRow]) -> list[ManifestRow]:
    return [by_ecg[f"ptbxl-{int(e)}"] for e in data.ecg_ids]


@dataclass
class KtData:
    """What the recipe trains and tests on: PTB-XL's folds, or a clinical manifest's splits (``--from-store``).

    ``train`` / ``val`` / ``test`` hold the ECGs with a superclass label (stage 2, the comparison);
    ``x_more`` / ``rows_more`` the training-split ECGs without one, which still have clinical data
    (stage 1 and the stage-3 heads use them). ``load_test(transform)`` reads the test ECGs again
    through a model's own preprocessing (the ship rule scores exported models as serving does).
    """

    train: PtbxlData
    val: PtbxlData
    test: PtbxlData
    rows_train: list[ManifestRow]
    rows_val: list[ManifestRow]
    rows_test: list[ManifestRow]
    x_more: np.ndarray
    rows_more: list[ManifestRow]
    load_test: Callable[[Transform], PtbxlData]
    source: str
    test_label: str
    ptbxl_dir: Path | None = None


def _ptbxl_data(data_dir: Path, out_dir: Path, limit: int | None) -> KtData:
    """PTB-XL: signals and labels from ``training.datasets.ptbxl``, biometrics from ``from_ptbxl``."""
    manifest = from_ptbxl(data_dir)
    write_manifest(manifest, out_dir / "clinical_manifest.jsonl")
    by_ecg = {r.ecg_id: r for r in manifest.rows}
    train = load_ptbxl(data_dir, TRAIN_FOLDS, limit=limit)
    val = load_ptbxl(data_dir, VAL_FOLDS, limit=limit)
    test = load_ptbxl(data_dir, TEST_FOLDS, limit=limit)
    return KtData(
        train,
        val,
        test,
        rows_train=_rows_for(train, by_ecg),
        rows_val=_rows_for(val, by_ecg),
        rows_test=_rows_for(test, by_ecg),
        x_more=np.zeros((0, *train.x.shape[1:]), np.float32),
        rows_more=[],
        load_test=lambda transform: load_ptbxl(data_dir, TEST_FOLDS, limit=limit, transform=transform),
        source=f"PTB-XL ({data_dir.name})",
        test_label=f"PTB-XL fold {TEST_FOLDS[0]}",
        ptbxl_dir=data_dir,
    )


def _superclass_labels(row: ManifestRow) -> list[float] | None:
    """A row's superclass targets, or None when its labels name none (``labels``: code -> 1 / 0 / 0.5 hedged).

    A hedged statement (0.5) counts as present, as PTB-XL's labels ignore the statement's
    likelihood (``training.datasets.ptbxl``).
    """
    labels = row.labels or {}
    if not any(c in labels for c in SUPERCLASSES):
        return None
    return [1.0 if labels.get(c, 0.0) >= 0.5 else 0.0 for c in SUPERCLASSES]


def load_manifest_split(
    manifest: ClinicalManifest, rows: Sequence[ManifestRow], *, transform: Transform | None = None
) -> PtbxlData:
    """Rows with superclass labels as ``PtbxlData``: each WFDB record read by lead name, then ``transform``.

    ``transform`` defaults to the serving pipeline (``inference.preprocess.DEFAULT_SPEC``), as
    ``load_ptbxl``'s does; ecg and patient ids stay the manifest's strings.
    """
    if transform is None:
        pipeline = Pipeline.from_spec(DEFAULT_SPEC)

        def transform(signal: np.ndarray, fs: float, units: str) -> np.ndarray:
            return pipeline.apply(signal, fs)[0]

    xs, ys = [], []
    for row in rows:
        labels = _superclass_labels(row)
        if labels is None:
            raise ClinicalDataError(f"{row.ecg_id}: no superclass label ({', '.join(SUPERCLASSES)})")
        signal, fs, units = read_ptbxl_signal(manifest.record_path(row))
        xs.append(np.asarray(transform(signal, fs, units), dtype=np.float32))
        ys.append(labels)
    return PtbxlData(
        x=np.stack(xs) if xs else np.zeros((0, len(STANDARD_LEADS), 0), np.float32),
        y=np.asarray(ys, dtype=np.float32).reshape(-1, len(SUPERCLASSES)),
        ecg_ids=np.asarray([r.ecg_id for r in rows], dtype=str),
        patient_ids=np.asarray([r.patient_id for r in rows], dtype=str),
        folds=np.asarray([int(r.split or 0) for r in rows], dtype=np.int64),
        n_unlabelled=0,
    )


def load_manifest_data(manifest: ClinicalManifest, *, limit: int | None = None, name: str = "") -> KtData:
    """A clinical manifest's splits (``"1"``-``"8"`` train, ``"9"`` validation, ``"10"`` test) for the recipe."""
    by_split: dict[str, list[ManifestRow]] = {"train": [], "val": [], "test": [], "more": []}
    for row in manifest.rows:
        fold = int(row.split) if row.split and row.split.isdigit() else None
        part = (
            "train" if fold in TRAIN_FOLDS else "val" if fold in VAL_FOLDS else "test" if fold in TEST_FOLDS else None
        )
        if part is None:
            continue
        if _superclass_labels(row) is None:
            part = "more" if part == "train" else ""
        if part:
            by_split[part].append(row)
    if limit is not None:
        by_split = {k: v[:limit] for k, v in by_split.items()}
    for part in ("train", "val", "test"):
        if not by_split[part]:
            raise ClinicalDataError(f"{name or 'the manifest'}: no {part} ECG with a superclass label")
    train, val, test = (load_manifest_split(manifest, by_split[p]) for p in ("train", "val", "test"))
    more = load_manifest_split(
        manifest,
        [replace(r, labels={"NORM": 0.0}) for r in by_split["more"]],  # the signals only: no label is used
    )
    return KtData(
        train,
        val,
        test,
        by_split["train"],
        by_split["val"],
        by_split["test"],
        x_more=more.x if len(more) else np.zeros((0, *train.x.shape[1:]), np.float32),
        rows_more=by_split["more"],
        load_test=lambda transform: load_manifest_split(manifest, by_split["test"], transform=transform),
        source=f"clinical manifest {name}".strip(),
        test_label=f"the held-out split ({TEST_FOLDS[0]})",
    )


def _abnormality_aurocs(heads: list[Abnormality], targets: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    out = {}
    for j, ab in enumerate(heads):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        out[ab.code] = {
            "auroc": auroc(y, probs[known, j]) if known.any() else float("nan"),
            "n": int(known.sum()),
            "positives": int(y.sum()),
        }
    return out


def train_kt(
    data_dir: Path | None,
    out_dir: Path,
    *,
    manifest: Path | ClinicalManifest | None = None,
    model_dir: Path | None = None,
    arch: str = "resnet_se",
    seeds: int = 1,
    seed: int = 0,
    epochs: int = 30,
    pretrain_epochs: int = 20,
    pretrain: Path | None = None,
    batch_size: int = 32,
    pretrain_batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-2,
    width: int = 32,
    dropout: float = 0.3,
    patience: int = 10,
    loss: str = "bce",
    clip_weight: float = 1.0,
    compare: bool = False,
    external: Path | None = None,
    shipped: Path | None = None,
    suite_checks: bool = True,
    min_sensitivity: float = 0.8,
    n_bootstrap: int = 1000,
    threads: int = 1,
    limit: int | None = None,
    version: str = "0.1.0",
    name: str = "diagnosis-kt",
    log: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Stages 1-3 on PTB-XL, export with abnormality heads, optional three-way comparison; see the module docstring."""
    started = time.monotonic()
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if (data_dir is None) == (manifest is None):
        raise ValueError("give either data_dir (PTB-XL) or manifest (a clinical manifest), not both")
    out_dir = Path(out_dir)
    model_dir = Path(model_dir) if model_dir is not None else out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed, threads)
    cpu = torch.device("cpu")

    def say(msg: str) -> None:
        if log:
            print(msg, flush=True)

    # data: signals + labels (training.datasets.ptbxl, or a clinical manifest), clinical variables (training.clinical)
    if manifest is not None:
        source_path = None if isinstance(manifest, ClinicalManifest) else Path(manifest)
        cm = manifest if isinstance(manifest, ClinicalManifest) else read_manifest(Path(manifest))
        if source_path is None or source_path.resolve() != (out_dir / "clinical_manifest.jsonl").resolve():
            write_manifest(cm, out_dir / "clinical_manifest.jsonl")
        kd = load_manifest_data(cm, limit=limit, name=str(source_path or cm.report.get("source", "")))
    else:
        kd = _ptbxl_data(Path(cast(Path, data_dir)), out_dir, limit)
    train, val, test = kd.train, kd.val, kd.test
    check_patient_disjoint(train, val, test)
    rows_train, rows_val, rows_test = kd.rows_train, kd.rows_val, kd.rows_test
    rows_fit = rows_train + kd.rows_more  # every training-split ECG with its clinical data (stages 1 and 3)
    loincs, values_tr, mask_tr, dropped = clinical_matrix(rows_fit)
    scaler = ClinicalScaler(values_tr, mask_tr)

    def clinical_of(rows: list[ManifestRow]) -> np.ndarray:
        _, v, m, _ = clinical_matrix(rows, loincs, drop_missing=False)
        return scaler(v, m)

    v_train, v_val, v_test = clinical_of(rows_train), clinical_of(rows_val), clinical_of(rows_test)
    v_more = clinical_of(kd.rows_more)
    ext = load_external(Path(external), kd.ptbxl_dir) if external is not None else None
    v_ext = clinical_of(ext.rows) if ext is not None else np.zeros((0, v_train.shape[1]), np.float32)
    if ext is not None:
        say(
            f"external records {external}: {len(ext.data)} ("
            + ", ".join(f"{k} {v}" for k, v in ext.info["sources"].items())
            + f"); PTB-XL recordings dropped as found in the training data: {len(ext.info['dropped_in_ptbxl_data'])}; "
            f"the multimodal arm gets their age ({ext.info['with_age']}) and sex ({ext.info['with_sex']}) only"
        )
    heads_spec, t_train = abnormality_targets(rows_fit)
    _, t_test_all = abnormality_targets(rows_test, heads_spec, require_both=False)
    say(
        f"{kd.source}: train {len(train)} (+{len(kd.rows_more)} without a label, stages 1 and 3 only), val "
        f"{len(val)}, test {len(test)} records; clinical variables "
        + ", ".join(VARIABLES[c].name for c in loincs)
        + (f" (dropped, missing everywhere: {', '.join(dropped)})" if dropped else "")
        + f"; abnormality heads {', '.join(a.code for a in heads_spec)}"
    )

    trained_on = (
        f"{kd.source}: split 1-8 ({len(train)} labelled records"
        + (f" + {len(kd.rows_more)} without a label, stages 1 and 3" if kd.rows_more else "")
        + ") + clinical variables "
        + ", ".join(VARIABLES[c].name for c in loincs)
        + "; split 9 validation"
    )
    aug = Augmenter(AugmentConfig(fs=FS_HZ), DEFAULT_SPEC)
    pos_weight = class_pos_weight(train.y)
    x_extra = np.zeros((0, *train.x.shape[1:]), np.float32)
    if pretrain is not None:
        from ecgbridge.training.pretrain import load_unlabelled

        x_extra = load_unlabelled(Path(pretrain), limit=limit)
    x_fit = np.concatenate([train.x, kd.x_more])  # rows_fit's ECGs
    x_ssl = np.concatenate([x_fit, x_extra])
    v_ssl = np.concatenate([v_train, v_more, np.zeros((len(x_extra), v_train.shape[1]), np.float32)])
    has_clin = np.concatenate([mask_tr.any(axis=1), np.zeros(len(x_extra), bool)])

    common: dict[str, Any] = dict(
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        width=width,
        dropout=dropout,
        patience=patience,
        ema_decay=0.98,
        pos_weight=pos_weight,
        augmenter=aug,
        device=cpu,
        log=say,
    )
    kt_arm = "knowledge-transfer" if clip_weight > 0 else "ssl-only"  # clip_weight 0: the stage-1 ablation
    arms: dict[str, list[np.ndarray]] = {"signal-only": [], kt_arm: [], "multimodal": []}
    ext_arms: dict[str, list[np.ndarray]] = {arm: [] for arm in arms}  # the same models on the external records
    x_ext = ext.data.x if ext is not None else np.zeros((0, *test.x.shape[1:]), np.float32)
    per_seed: list[dict[str, Any]] = []
    members: list[dict[str, Any]] = []
    heads: list[nn.Linear] = []
    stage1: list[dict[str, Any]] = []
    for s in range(seed, seed + seeds):
        torch.manual_seed(s)
        encoder = build_model(arch, width=width, dropout=dropout)
        info = pretrain_joint(
            encoder,
            x_ssl,
            v_ssl,
            has_clin,
            epochs=pretrain_epochs,
            augmenter=aug,
            seed=s,
            batch_size=pretrain_batch_size,
            clip_weight=clip_weight,
            log=say,
        )
        info.pop("clinical_encoder")
        stage1.append(info)
        init = {k: v.detach().clone() for k, v in cast(nn.Module, encoder.features).state_dict().items()}
        member = fit_member(train, val, loss=loss, seed=s, tag=f"kt seed {s}", init_features=init, **common)
        members.append(member)
        head = fit_abnormality_heads(_embeddings(member["model"], x_fit), t_train, seed=s)
        heads.append(head)
        z_test = _logits(member["model"], test.x)
        arms[kt_arm].append(z_test)
        ext_arms[kt_arm].append(_logits(member["model"], x_ext))
        row: dict[str, Any] = {"seed": s, kt_arm: {"fold9": member["val_macro_auroc"]}}
        if compare:
            base = fit_member(train, val, loss=loss, seed=s, tag=f"signal-only seed {s}", **common)
            arms["signal-only"].append(_logits(base["model"], test.x))
            ext_arms["signal-only"].append(_logits(base["model"], x_ext))
            row["signal-only"] = {"fold9": base["val_macro_auroc"]}
            mm = fit_multimodal(
                train,
                val,
                v_train,
                v_val,
                arch=arch,
                width=width,
                dropout=dropout,
                init_features=init,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                pos_weight=pos_weight,
                augmenter=aug,
                seed=s,
                log=say,
            )
            arms["multimodal"].append(_multimodal_logits(mm["model"], test.x, v_test))
            ext_arms["multimodal"].append(_multimodal_logits(mm["model"], x_ext, v_ext))
            row["multimodal"] = {"fold9": mm["val_macro_auroc"]}
        for arm, zs in arms.items():
            if zs:
                row.setdefault(arm, {})["fold10"] = _macro_auroc_defined(test.y, zs[-1])
                if ext is not None:
                    row[arm]["external"] = _macro_auroc_defined(ext.data.y, ext_arms[arm][-1])
        per_seed.append(row)
        say(f"seed {s}: " + "; ".join(f"{a} fold 10 {v['fold10']:.4f}" for a, v in row.items() if a != "seed"))

    # calibration, thresholds, tiers on fold 9 (as training.train), export with the heads
    z_val = np.mean([m["val_logits"] for m in members], axis=0)
    calib = fit_calibration(val.y, z_val, pos_weight, seed=seed)
    p_val = apply_calibration(z_val, calib["temperature"], calib["offset"])
    thresholds, tiers = {}, {}
    for k, code in enumerate(SUPERCLASSES):
        thresholds[code] = round(min_sensitivity_threshold(val.y[:, k], p_val[:, k], min_sensitivity)["threshold"], 6)
        t = choose_tiers(val.y[:, k], p_val[:, k])
        tiers[code] = {"moderate": t["moderate"], "high": t["high"]}
    graph = KtServingGraph(
        [m["model"] for m in members], heads, temperature=calib["temperature"], offset=calib["offset"]
    ).eval()
    head_meta = [
        {"code": a.code, "display": a.display, "loinc": a.loinc, "above": a.above, "below": a.below} for a in heads_spec
    ]
    exported = export_model(
        graph,
        model_dir,
        classes=SUPERCLASSES,
        thresholds=thresholds,
        real=val.x[:8],
        name=name,
        version=version,
        task="diagnosis",
        description=(
            f"1D {arch} knowledge-transfer encoder (stage 1 joint ECG-clinical pretraining, {seeds} seed(s)), PTB-XL "
            "superclasses + predicted clinical abnormalities (`abnormalities` output); research use only, "
            "NOT FOR CLINICAL USE."
        ),
        trained_on=trained_on,
        preprocessing=DEFAULT_SPEC,
        tiers=tiers,
        calibration={"method": calib["method"], "variant": calib["variant"], "in_graph": True},
        architecture={
            "module": "training.kt.KtServingGraph",
            "arch": arch,
            "width": width,
            "members": len(members),
            "cam_stride_samples": 16,
            "abnormality_heads": head_meta,
            "abnormality_output": "abnormalities",
        },
    )
    # serving reads the heads from the manifest's `explanations` (inference.models.Explanation: wording,
    # LOINC, cut-off, column); `architecture.abnormality_heads` stays for audits and older readers
    from ecgbridge.inference.models import explanations_from_heads, load_manifest
    from ecgbridge.training.export import write_manifest as write_model_manifest

    served = load_manifest(model_dir).model_copy(update={"explanations": explanations_from_heads(head_meta)})
    write_model_manifest(served, model_dir)
    say(f"exported {exported['onnx_path']}, parity " + ", ".join(f"{k} {v:.2e}" for k, v in exported["parity"].items()))

    # fold-10 measurements (card only; every choice above was made on folds 1-9)
    with torch.no_grad():
        abn_test = graph(torch.from_numpy(test.x))[3].numpy() if len(test) else np.zeros((0, len(heads_spec)))
    abnormality_metrics = _abnormality_aurocs(heads_spec, t_test_all, abn_test)

    # the ship rule: the export against the shipped diagnosis model, same records, serving path
    shipped_dir = Path(shipped) if shipped is not None else shipped_diagnosis_dir()
    ship, shipped_scores = _ship_evaluation(
        model_dir,
        shipped_dir,
        load_test=kd.load_test,
        test=test,
        test_label=kd.test_label,
        ext=ext,
        ext_ptbxl=kd.ptbxl_dir,
        n_bootstrap=n_bootstrap,
        seed=seed,
        suite_checks=suite_checks,
    )
    say(ship["text"])
    arms_and_shipped = {"shipped": [shipped_scores["fold10"]], **arms}
    comparison = compare_arms(test.y, test.patient_ids, arms_and_shipped, n_bootstrap=n_bootstrap, seed=seed)
    comparison["per_seed"] = per_seed
    external_result: dict[str, Any] | None = None
    if ext is not None:
        ext_with_shipped = {"shipped": [shipped_scores["external"]], **ext_arms}
        external_result = {
            "data": ext.info,
            "clinical_variables": "age and sex from the headers (weight, height, BMI missing: mask 0)",
            "comparison": compare_external(
                ext.data.y,
                ext.data.sources,
                ext_with_shipped,
                n_bootstrap=n_bootstrap,
                seed=seed,
                pooled_sources=ext.info["pooled_sources"],
            ),
        }
        ext_arrays: dict[str, Any] = dict(
            y=ext.data.y,
            names=np.asarray(ext.data.names),
            sources=np.asarray(ext.data.sources),
            ages=np.asarray([np.nan if a is None else a for a in ext.data.ages], dtype=np.float64),
            sexes=np.asarray([s or "" for s in ext.data.sexes]),
            seeds=np.array([r["seed"] for r in per_seed]),
            shipped_probabilities=shipped_scores["external"],
            kt_export_probabilities=shipped_scores["kt_export_external"],
            **{f"logits_{arm.replace('-', '_')}": np.stack(zs) for arm, zs in ext_arms.items() if zs},
        )
        np.savez(out_dir / "external_outputs.npz", **ext_arrays)
    arrays: dict[str, Any] = {
        "y": test.y,
        "patient_ids": test.patient_ids,
        "ecg_ids": test.ecg_ids,
        "seeds": np.array([r["seed"] for r in per_seed]),
        "abnormalities": abn_test,
        "abnormality_targets": t_test_all,
        "shipped_probabilities": shipped_scores["fold10"],
        "kt_export_probabilities": shipped_scores["kt_export_fold10"],
        **{f"logits_{arm.replace('-', '_')}": np.stack(zs) for arm, zs in arms.items() if zs},
    }
    np.savez(out_dir / "fold10_outputs.npz", **arrays)
    result = {
        "command": command,
        "data": {
            "data_dir": str(data_dir) if data_dir is not None else None,
            "manifest": str(manifest) if isinstance(manifest, (str, Path)) else None,
            "source": kd.source,
            "test_label": kd.test_label,
            "train_without_label": len(kd.rows_more),
            "train": len(train),
            "val": len(val),
            "test": len(test),
            "clinical_variables": {c: VARIABLES[c].name for c in loincs},
            "clinical_coverage_train": {VARIABLES[c].name: int(mask_tr[:, j].sum()) for j, c in enumerate(loincs)},
            "dropped_variables": dropped,
            "unlabelled_ecg_only": int(len(x_extra)),
        },
        "stage1": stage1,
        "stage2": [
            {"seed": m["seed"], "best_epoch": m["best_epoch"], "fold9_macro_auroc": m["val_macro_auroc"]}
            for m in members
        ],
        "abnormality_heads": head_meta,
        "abnormality_fold10": abnormality_metrics,
        "comparison": comparison,
        "external": external_result,
        "ship": ship,
        "export": {k: exported[k] for k in ("onnx_path", "export_method", "parity", "onnx_bytes", "sha256")},
        "settings": {
            "arch": arch,
            "width": width,
            "seeds": seeds,
            "epochs": epochs,
            "pretrain_epochs": pretrain_epochs,
            "batch_size": batch_size,
            "pretrain_batch_size": pretrain_batch_size,
            "lr": lr,
            "loss": loss,
            "clip_weight": clip_weight,
            "patience": patience,
            "threads": threads,
            "limit": limit,
            "external": str(external) if external is not None else None,
            "shipped": str(shipped_dir),
            "suite_checks": suite_checks,
            "torch": torch.__version__,
        },
        "wall_s": round(time.monotonic() - started, 1),
    }
    (out_dir / "result.json").write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    (model_dir / "MODEL_CARD.md").write_text(render_kt_card(result))
    torch.save(
        {"members": [m["model"].state_dict() for m in members], "heads": [h.state_dict() for h in heads]},
        out_dir / "model.pt",
    )
    say(f"wrote {out_dir / 'result.json'} and {model_dir / 'MODEL_CARD.md'} ({result['wall_s']:.0f} s)")
    return result


def _f(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def render_kt_card(result: dict[str, Any]) -> str:
    """The model card of a KT run: what was trained on what, and every number measured."""
    d, c, s = result["data"], result["comparison"], result["settings"]
    lines = [
        "# Model card: knowledge-transfer ECG encoder (issue #14)",
        "",
        "**Research use only. NOT FOR CLINICAL USE.** The `abnormalities` output is *predicted from the ECG*, "
        "not measured.",
        "",
        f"Command: `{result.get('command') or 'train_kt(...)'}`",
        "",
        "## Data and split",
        "",
        f"{d.get('source') or 'PTB-XL'} from `{d.get('manifest') or d['data_dir']}`: split 1-8 train ({d['train']} "
        f"labelled records"
        + (f", + {d['train_without_label']} without a label for stages 1 and 3" if d.get("train_without_label") else "")
        + f"), 9 validation ({d['val']}), 10 test ({d['test']} records, {c['n_patients']} patients); "
        "patient-level splits, disjointness checked. Clinical variables (training-split records with a value): "
        + ", ".join(f"{k} {v}" for k, v in d["clinical_coverage_train"].items())
        + (f"; dropped (missing everywhere): {', '.join(d['dropped_variables'])}" if d["dropped_variables"] else "")
        + f". ECG-only records added to stage 1: {d['unlabelled_ecg_only']}.",
        "",
        f"Fold-10 label counts: {c['label_counts']}.",
        "",
        "## Settings",
        "",
        ", ".join(f"{k} {v}" for k, v in s.items()),
        "",
        "## Three-way comparison, fold 10 (macro-AUROC over the five superclasses)",
        "",
        *_comparison_lines(c),
    ]
    lines += ["", "Per seed (fold 9 / fold 10):", ""]
    for row in c["per_seed"]:
        lines.append(
            f"- seed {row['seed']}: "
            + "; ".join(f"{a} {_f(v.get('fold9'))} / {_f(v.get('fold10'))}" for a, v in row.items() if a != "seed")
        )
    lines += _external_card_lines(result.get("external"))
    lines += _ship_card_lines(result.get("ship"))
    lines += ["", "## Predicted clinical abnormalities (stage 3), fold 10", ""]
    lines += ["| head | AUROC | n with a value | positives |", "|---|---|---|---|"]
    for code, v in result["abnormality_fold10"].items():
        lines.append(f"| {code} | {_f(v['auroc'])} | {v['n']} | {v['positives']} |")
    parity = result["export"]["parity"]
    lines += [
        "",
        "## Export",
        "",
        f"{result['export']['export_method']}; ONNX/torch parity max |diff|: "
        + ", ".join(f"{k} {v:.1e}" for k, v in parity.items()),
        "",
        f"Wall time {result['wall_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def _external_card_lines(ext: dict[str, Any] | None) -> list[str]:
    """The card's external-records section: every arm (and the shipped model) pooled and per source."""
    if not ext:
        return ["", "## External records", "", "Not evaluated (no `--external DIR`)."]
    d, c = ext["data"], ext["comparison"]
    dropped = d["dropped_in_ptbxl_data"]
    lines = [
        "",
        "## External records (PhysioNet/CinC challenge; macro-AUROC over the classes defined in each set)",
        "",
        f"`{d['data_dir']}`: {d['n_records']} records with a superclass ("
        + ", ".join(f"{k} {v}" for k, v in d["sources"].items())
        + f"); {len(d['excluded_no_superclass'])} without one excluded; PTB-XL recordings found in the training "
        f"data dropped: {', '.join(f'{n} (fold {f})' for n, f in dropped.items()) or 'none'}. SNOMED CT codes map "
        "to the superclasses as `ecgbridge evaluate diagnosis` maps them (`training.datasets.challenge`); the "
        "signals go through the serving pipeline. The multimodal arm gets only what the headers carry: "
        f"{ext['clinical_variables']} (age in {d['with_age']}, sex in {d['with_sex']} records). The bootstrap "
        "draws records (the challenge gives no patient ids). `shipped` is the shipped diagnosis model "
        "(its probabilities through the serving path; one model, so one 'seed'). Pooled over: "
        + ", ".join(c.get("pooled_sources") or d.get("pooled_sources") or [])
        + "".join(f"; not pooled: {k} ({v})" for k, v in (d.get("not_pooled") or {}).items())
        + ".",
        "",
        *_comparison_lines(c["pooled"]),
    ]
    for part in c["sources"].values():
        lines += ["", *_comparison_lines(part)]
    return lines


def _ship_card_lines(ship: dict[str, Any] | None) -> list[str]:
    """The card's ship decision: the verdict line, the rule, the paired comparisons and every check."""
    if not ship:
        return []
    sh = ship["shipped"]
    lines = [
        "",
        "## Ship decision",
        "",
        f"**{ship['text']}**",
        "",
        f"Rule: {ship['rule']}. Shipped model: {sh['name']} {sh['version']} (sha256 `{str(sh['sha256'])[:12]}`, "
        f"`{sh['directory']}`). This run decides nothing by itself: the shipped model is only replaced by hand.",
        "",
        "| set | KT export | shipped | D = KT - shipped (95% CI, paired bootstrap) | classes | left out |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(ship.get("test_label", f"PTB-XL fold {TEST_FOLDS[0]}"), ship.get("fold10"))]
    ext = ship.get("external")
    if ext:
        rows.append(("external, pooled (" + ", ".join(ext.get("pooled_sources") or []) + ")", ext))
        rows += [(f"external: {k}", v) for k, v in ext["sources"].items()]
    for label, cmp in rows:
        if cmp is None:
            continue
        ci = cmp.get("difference_ci")
        ci_text = f"{ci[0]:+.3f} to {ci[1]:+.3f}" if ci else "n/a"
        lines.append(
            f"| {label} | {_f(cmp['candidate'])} | {_f(cmp['live'])} | {cmp['difference']:+.3f} ({ci_text}; "
            f"{cmp['valid']}/{cmp['n_bootstrap']} valid) | {', '.join(cmp['classes'])} | "
            f"{', '.join(cmp['left_out_classes']) or '-'} |"
        )
    san = ship["sanity"]
    lines += [
        "",
        f"- sanity (`training.from_store.sanity_checks`, {san['n_ecgs']} test ECGs): input dependence "
        f"{'passed' if san['input_dependence']['passed'] else 'FAILED'}; CAM parameter randomisation "
        f"{'passed' if san['parameter_randomisation']['passed'] else 'FAILED'} ("
        + ", ".join(f"{k} {_f(v)}" for k, v in san["parameter_randomisation"]["mean_abs_corr"].items())
        + ")",
    ]
    suite = ship["suite"]
    if not suite.get("ran"):
        lines.append(f"- test-suite checks: not run ({suite.get('why')})")
    for c in suite.get("checks", {}).values():
        req = "required" if c["required"] else "reported only (the shipped network fails it)"
        msg = f": {c['message']}" if c["message"] and c["outcome"] != "passed" else ""
        lines.append(f"- `{c['test']}` ({req}): {c['outcome']}{msg}")
    return lines


def _manifest_from_store(args: argparse.Namespace) -> Path:
    """``--from-store``: the configured store's clinical manifest in OUT/store-manifest (``from_store``)."""
    from ecgbridge.core.settings import load_settings, redact_url
    from ecgbridge.core.store import MessageStore
    from ecgbridge.core.training_set import parse_when
    from ecgbridge.training.from_store import clinical_manifest_from_store

    settings = load_settings(args.config or os.environ.get("ECGBRIDGE_CONFIG") or None)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    print(f"store: {redact_url(settings.database_url)}", file=sys.stderr)
    folder = Path(args.out).resolve() / "store-manifest"
    clinical_manifest_from_store(
        store,
        folder,
        since=parse_when(args.since),
        until=parse_when(args.until),
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        test_from=parse_when(args.test_from),
    )
    store.engine.dispose()
    return folder / "clinical_manifest.jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["combine"]:  # pool single-seed runs into one comparison
        combiner = argparse.ArgumentParser(prog="ecgbridge train kt combine", description=combine_runs.__doc__)
        combiner.add_argument("runs", type=Path, nargs="+", help="--out folders of single-seed `--compare` runs")
        combiner.add_argument("--out", type=Path, required=True)
        combiner.add_argument("--n-bootstrap", type=int, default=1000)
        cargs = combiner.parse_args(given[1:])
        combine_runs(cargs.runs, cargs.out, n_bootstrap=cargs.n_bootstrap)
        print((Path(cargs.out) / "COMPARISON.md").read_text(), end="")
        return 0
    parser = argparse.ArgumentParser(prog="ecgbridge train kt", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="PTB-XL root (ptbxl_database.csv)")
    source.add_argument(
        "--manifest", type=Path, help="a clinical manifest instead (splits 1-8 / 9 / 10, superclass labels)"
    )
    source.add_argument(
        "--from-store",
        action="store_true",
        help="build the manifest from the EHR context stored with each analysed ECG and the over-reads "
        "(OUT/store-manifest), then train on it",
    )
    store = parser.add_argument_group("--from-store")
    store.add_argument("--config", "-c", help="YAML configuration (default: $ECGBRIDGE_CONFIG, else the defaults)")
    store.add_argument("--since", help="ECGs recorded since (a date, or 30d / 2w ago)")
    store.add_argument("--until", help="ECGs recorded before (a date)")
    store.add_argument("--test-fraction", type=float, default=0.3, help="share of ECGs in the held-out period")
    store.add_argument("--val-fraction", type=float, default=0.15, help="share in the validation period before it")
    store.add_argument("--test-from", help="the held-out period starts here instead (a date)")
    parser.add_argument("--out", type=Path, required=True, help="result.json, clinical manifest, checkpoint")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="model.onnx/manifest/card (default OUT/diagnosis-kt)"
    )
    parser.add_argument("--pretrain", type=Path, default=None, help="unlabelled records (RECORDS): ECG-only views")
    parser.add_argument("--arch", choices=ARCHS, default="resnet_se")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30, help="stage-2 epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="stage-1 epochs")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--loss", choices=("bce", "focal"), default="bce")
    parser.add_argument(
        "--clip-weight", type=float, default=1.0, help="stage-1 CLIP weight; 0 = ablation without clinical data"
    )
    parser.add_argument("--compare", action="store_true", help="also train signal-only and multimodal arms per seed")
    parser.add_argument(
        "--external",
        type=Path,
        default=None,
        help="PhysioNet challenge records (.hea with #Dx): every arm is also scored there, per source and pooled",
    )
    parser.add_argument(
        "--shipped", type=Path, default=None, help="the diagnosis model the ship rule compares with (default: shipped)"
    )
    parser.add_argument(
        "--no-suite-checks",
        action="store_true",
        help="do not run the test suite's noise and CAM checks on the export (it then does not ship)",
    )
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="first N records per split (smoke tests)")
    args = parser.parse_args(argv)
    manifest: Path | None = args.manifest
    if args.from_store:
        manifest = _manifest_from_store(args)
    train_kt(
        args.data,
        args.out,
        manifest=manifest,
        model_dir=args.model_dir,
        pretrain=args.pretrain,
        arch=args.arch,
        seeds=args.seeds,
        seed=args.seed,
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        width=args.width,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        loss=args.loss,
        clip_weight=args.clip_weight,
        compare=args.compare,
        external=args.external,
        shipped=args.shipped,
        suite_checks=not args.no_suite_checks,
        n_bootstrap=args.n_bootstrap,
        threads=args.threads,
        limit=args.limit,
        command="ecgbridge train kt " + " ".join(sys.argv[3:] if argv is None else list(argv)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
