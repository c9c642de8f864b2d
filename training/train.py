"""Train, select, calibrate, export, evaluate and document the diagnosis model.

One function does the whole run so the shipped directory can be reproduced by
one command::

    ecgbridge train diagnosis --data /path/to/ptbxl --out /tmp/run \\
        --model-dir inference/shipped/diagnosis --external /path/to/cinc2021

What it does, in order (every choice on fold 9, never on fold 10):

1. Folds 1-8 train, fold 9 validates; patient-level disjointness is checked.
2. ``--loss auto`` trains the architecture (``--arch``, default ``resnet_se``) once
   with focal loss and once with BCE (same seed, class weights and augmentation)
   and keeps the loss with the higher fold-9 macro-AUROC; ``--loss focal|bce``
   trains that one only. Each model keeps an exponential moving average (EMA) of
   its weights; the EMA checkpoint of the epoch with the best fold-9 macro-AUROC
   is kept (early stopping after ``--patience`` epochs without improvement).
3. ``--seeds N`` > 1 trains N - 1 more seeds of the chosen loss; the members'
   logits (and CAMs) are averaged inside one ONNX graph.
4. Calibration (``training.calibration``) is fitted on fold-9 logits and baked
   into the graph; decision thresholds (minimum-sensitivity rule) and risk tiers
   are chosen on fold-9 calibrated probabilities and written to the manifest.
5. The graph is exported (``training.export``: probabilities, cams, logits;
   parity-checked), then evaluated through the serving path on fold 10
   (``training.evaluate``) and, with ``--external``, per external source.
   The loss comparison's fold-10 figures are measured last, for the card only.
6. ``MODEL_CARD.md`` is written from those measurements (``training.cards``).

Runs are deterministic for a given seed, thread count and torch build (CPU,
deterministic algorithms on); a CUDA GPU is used when present (``--device``).
The torch checkpoint (``model.pt``), history and ``result.json`` go to
``out_dir``; the model directory receives only ``model.onnx``, ``manifest.json``
and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ecgbridge.inference.preprocess import DEFAULT_SPEC
from ecgbridge.mapping.ecg import STANDARD_LEADS
from ecgbridge.training.augment import AugmentConfig, Augmenter
from ecgbridge.training.calibration import (
    apply_calibration,
    choose_tiers,
    ece,
    fit_calibration,
    min_sensitivity_threshold,
)
from ecgbridge.training.cards import write_model_card
from ecgbridge.training.datasets.ptbxl import (
    SUPERCLASSES,
    TEST_FOLDS,
    TRAIN_FOLDS,
    VAL_FOLDS,
    PtbxlData,
    check_patient_disjoint,
    load_metadata,
    load_ptbxl,
)
from ecgbridge.training.evaluate import (
    auroc,
    bootstrap_auroc,
    evaluate_diagnosis,
    evaluate_external,
    format_report,
    to_jsonable,
)
from ecgbridge.training.export import ServingGraph, export_model
from ecgbridge.training.models.cnn1d import Cnn1d
from ecgbridge.training.models.resnet_se import ResNetSE1d

__all__ = ["augment", "FocalLoss", "class_pos_weight", "build_model", "fit_member", "train_diagnosis", "main"]

FS_HZ = 100.0
ARCHS = ("resnet_se", "cnn")
LOSSES = ("auto", "focal", "bce")


def _seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The baseline's light augmentation (kept for reference; training now uses ``training.augment``).

    Amplitude scaling per record (x0.9-1.1), baseline wander (one sinusoid per
    lead, 0.05-0.5 Hz, amplitude up to 0.1) and gaussian noise (sigma up to 0.05).
    """
    n, leads, t = x.shape
    g = generator
    scale = 0.9 + 0.2 * torch.rand(n, 1, 1, generator=g)
    time_s = torch.arange(t, dtype=x.dtype) / FS_HZ
    freq = 0.05 + 0.45 * torch.rand(n, leads, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, leads, 1, generator=g)
    amp = 0.1 * torch.rand(n, leads, 1, generator=g)
    wander = amp * torch.sin(2 * math.pi * freq * time_s + phase)
    sigma = 0.05 * torch.rand(n, 1, 1, generator=g)
    noise = sigma * torch.randn(n, leads, t, generator=g)
    return x * scale + wander + noise


class FocalLoss(nn.Module):
    """Binary focal loss on logits: ``w * (1 - p_t)^gamma * BCE``, ``w = pos_weight`` on positives, 1 on negatives."""

    pos_weight: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, gamma: float = 2.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else torch.tensor([]))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        loss = ce * (1 - p_t).pow(self.gamma)
        if self.pos_weight.numel():
            loss = loss * (target * self.pos_weight + (1 - target))
        return loss.mean()


def class_pos_weight(y: np.ndarray, cap: float = 10.0) -> np.ndarray:
    """Per-class positive weight sqrt(negatives / positives), clipped to [1, cap]."""
    pos = y.sum(axis=0)
    neg = len(y) - pos
    return cast(np.ndarray, np.clip(np.sqrt(neg / np.maximum(pos, 1.0)), 1.0, cap).astype(np.float32))


def build_model(arch: str, *, width: int, dropout: float, n_classes: int = len(SUPERCLASSES)) -> ResNetSE1d | Cnn1d:
    if arch == "resnet_se":
        return ResNetSE1d(n_leads=len(STANDARD_LEADS), n_classes=n_classes, width=width, dropout=dropout)
    if arch == "cnn":
        return Cnn1d(n_leads=len(STANDARD_LEADS), n_classes=n_classes, width=width, dropout=dropout)
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def _describe_arch(arch: str, width: int, dropout: float) -> str:
    if arch == "resnet_se":
        return (
            f"1D ResNet with squeeze-and-excitation (`training.models.ResNetSE1d`, width {width}): stem Conv1d k15 "
            f"stride 2, four residual SE blocks (kernel 7; {width}/{2 * width}/{4 * width}/{4 * width} channels, "
            "strides 1/2/2/2: 16x temporal downsampling), SE reduction 8, dropout 0.1 inside blocks, global average "
            f"pooling, dropout {dropout}, linear head to 5 logits"
        )
    return (
        f"1D CNN (`training.models.Cnn1d`, width {width}): 5 Conv1d+BatchNorm+ReLU blocks "
        "(kernels 7/5/5/5/3, stride 2 then 3 max-pools: 16x temporal downsampling), global average "
        f"pooling, dropout {dropout}, linear head to 5 logits"
    )


@torch.no_grad()
def _logits(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [
        model(torch.from_numpy(x[i : i + batch_size]).to(device)).cpu().numpy() for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, len(SUPERCLASSES)))


def _predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Sigmoid probabilities on CPU (kept for callers of the baseline's helper)."""
    return cast(np.ndarray, 1.0 / (1.0 + np.exp(-_logits(model, x, torch.device("cpu"), batch_size))))


def _macro_auroc_defined(y: np.ndarray, p: np.ndarray) -> float:
    """Mean AUROC over classes defined on this set (a tiny fold may lack some)."""
    values = [auroc(y[:, k], p[:, k]) for k in range(y.shape[1])]
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def fit_member(
    train: PtbxlData,
    val: PtbxlData,
    *,
    arch: str,
    loss: str,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    width: int,
    dropout: float,
    patience: int,
    ema_decay: float,
    pos_weight: np.ndarray,
    augmenter: Augmenter | None,
    device: torch.device,
    log: Any,
    tag: str,
    init_features: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train one model; returns the best-on-fold-9 EMA model, its fold-9 logits and the history.

    ``init_features`` (a pretrained ``features`` state dict) initialises the encoder. The
    model has one output per column of ``train.y`` (the five superclasses here; other label
    schemes in ``training.triage``).
    """
    started = time.monotonic()
    torch.manual_seed(seed)
    model = build_model(arch, width=width, dropout=dropout, n_classes=int(train.y.shape[1]))
    if init_features is not None:
        model.features.load_state_dict(init_features)
    model = model.to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train) / batch_size))
    total_steps = max(1, epochs * steps_per_epoch)
    warmup = min(2 * steps_per_epoch, total_steps // 5 + 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_at)
    pw = torch.from_numpy(pos_weight).to(device)
    loss_fn: nn.Module = FocalLoss(gamma=2.0, pos_weight=pw) if loss == "focal" else nn.BCEWithLogitsLoss(pos_weight=pw)
    rng = np.random.default_rng(seed)
    y_train = torch.from_numpy(train.y).to(device)
    history: list[dict[str, float]] = []
    best_auc, best_epoch = -1.0, 0
    best_state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(train))
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb_np = augmenter(train.x[idx], rng) if augmenter is not None else train.x[idx]
            xb = torch.from_numpy(xb_np).to(device)
            out = model(xb)
            batch_loss = loss_fn(out, y_train[idx])
            optimiser.zero_grad()
            batch_loss.backward()
            optimiser.step()
            scheduler.step()
            step += 1
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for (_name, e), (_, m) in zip(ema.state_dict().items(), model.state_dict().items()):
                    if e.dtype.is_floating_point:
                        e.mul_(decay).add_(m.detach(), alpha=1 - decay)
                    else:
                        e.copy_(m)
            total += batch_loss.detach().item() * len(idx)
            seen += len(idx)
        z_val = _logits(ema, val.x, device)
        val_auc = _macro_auroc_defined(val.y, z_val)
        val_loss = float(
            nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(z_val), torch.from_numpy(val.y).double())
        )
        history.append(
            {"epoch": epoch, "train_loss": total / max(seen, 1), "val_bce": val_loss, "val_macro_auroc": val_auc}
        )
        improved = not math.isnan(val_auc) and val_auc > best_auc
        if improved:
            best_auc, best_epoch = val_auc, epoch
            best_state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
        elapsed = time.monotonic() - started
        log(
            f"[{tag}] epoch {epoch:3d}/{epochs} train_loss {total / max(seen, 1):.4f} fold-9 bce {val_loss:.4f} "
            f"macro-AUROC {val_auc:.4f}{' *' if improved else '  '} "
            f"({_fmt_s(elapsed)} elapsed, ~{_fmt_s(elapsed / epoch * (epochs - epoch))} left)"
        )
        if patience and best_epoch > 0 and epoch - best_epoch >= patience:
            log(f"[{tag}] early stop: no fold-9 improvement for {patience} epochs")
            break
    ema.load_state_dict(best_state)
    ema = ema.cpu().eval()
    z_val = _logits(ema, val.x, torch.device("cpu"))
    return {
        "model": ema,
        "loss": loss,
        "seed": seed,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "val_macro_auroc": _macro_auroc_defined(val.y, z_val),
        "val_logits": z_val,
        "history": history,
        "wall_s": round(time.monotonic() - started, 1),
    }


def _split_summary(data: PtbxlData, folds: tuple[int, ...]) -> dict[str, Any]:
    return {
        "folds": "-".join(str(f) for f in (folds[0], folds[-1])) if len(folds) > 1 else str(folds[0]),
        "n_records": len(data),
        "n_patients": int(np.unique(data.patient_ids).size),
        "n_unlabelled_excluded": data.n_unlabelled,
        "label_counts": data.label_counts(),
    }


def _describe_step(step: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in step.items() if k != "step")
    return f"{step['step']}({params})"


def _auroc_with_ci(y: np.ndarray, z: np.ndarray, pids: np.ndarray, n_bootstrap: int, seed: int) -> dict[str, Any]:
    macro = _macro_auroc_defined(y, z)
    boot = bootstrap_auroc(y, z, pids, n_bootstrap=n_bootstrap, seed=seed)
    return {
        "macro_auroc": macro,
        "macro_auroc_ci": boot["macro_ci"],
        "per_class": {c: auroc(y[:, k], z[:, k]) for k, c in enumerate(SUPERCLASSES)},
    }


def train_diagnosis(
    data_dir: Path,
    out_dir: Path,
    *,
    arch: str = "resnet_se",
    loss: str = "auto",
    seeds: int = 1,
    epochs: int = 40,
    seed: int = 0,
    batch_size: int = 32,
    sampling_rate: int = 100,
    model_dir: Path | None = None,
    external: Path | None = None,
    compare_with: Path | None = None,
    pretrain: Path | None = None,
    pretrain_epochs: int = 20,
    lr: float = 2e-3,
    weight_decay: float = 1e-2,
    width: int = 32,
    dropout: float = 0.3,
    patience: int = 15,
    ema_decay: float = 0.98,
    augment_online: bool = True,
    augment_strength: float = 1.0,
    noise_max: float | None = None,
    min_sensitivity: float = 0.8,
    tier_catch: float = 0.95,
    tier_specificity: float = 0.95,
    name: str = "diagnosis",
    version: str = "0.2.0",
    threads: int = 1,
    device: str = "auto",
    n_bootstrap: int = 1000,
    limit: int | None = None,
    log: bool = True,
    command: str | None = None,
) -> dict[str, Any]:
    """Train on PTB-XL and ship to ``model_dir`` (default ``out_dir/diagnosis``); see the module docstring.

    Returns the fold-10 metrics, the training summary, and the paths written.
    ``limit`` keeps the first N labelled records per split (smoke tests only).
    """
    started = time.monotonic()
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    model_dir = Path(model_dir) if model_dir is not None else out_dir / name
    if model_dir.resolve() == out_dir.resolve():
        raise ValueError("model_dir must differ from out_dir: the checkpoint must not land in the model directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed, threads)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )

    def say(msg: str) -> None:
        if log:
            print(msg, flush=True)

    train = load_ptbxl(data_dir, TRAIN_FOLDS, sampling_rate=sampling_rate, limit=limit)
    val = load_ptbxl(data_dir, VAL_FOLDS, sampling_rate=sampling_rate, limit=limit)
    test_meta = load_metadata(data_dir)
    test_pids = set(test_meta.loc[test_meta["strat_fold"].isin(TEST_FOLDS), "patient_id"].dropna().astype(int))
    overlap = len(test_pids & (set(train.patient_ids.tolist()) | set(val.patient_ids.tolist())))
    check_patient_disjoint(train, val)
    if overlap:
        raise ValueError(f"{overlap} test-fold patients also appear in train/validation")
    say(
        f"train {len(train)} records ({train.n_unlabelled} without superclass excluded), "
        f"val {len(val)} ({val.n_unlabelled} excluded); labels train {train.label_counts()}; device {dev}, threads {threads}"
    )
    pos_weight = class_pos_weight(train.y)
    aug_config = AugmentConfig(fs=FS_HZ).scaled(augment_strength)
    if noise_max is not None:  # heavy-noise training: the seed's "noisy normal above a true MI" failure
        aug_config = dataclasses.replace(aug_config, noise_max=noise_max)
    augmenter = Augmenter(aug_config, DEFAULT_SPEC) if augment_online else None
    common: dict[str, Any] = dict(
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        width=width,
        dropout=dropout,
        patience=patience,
        ema_decay=ema_decay,
        pos_weight=pos_weight,
        augmenter=augmenter,
        device=dev,
        log=say,
    )

    # (1b) optional self-supervised pretraining of the encoder
    pretrain_info = None
    if pretrain is not None:
        if arch != "resnet_se":
            raise ValueError("--pretrain needs --arch resnet_se")
        from ecgbridge.training.pretrain import load_unlabelled, pretrain_encoder

        x_unlabelled = load_unlabelled(Path(pretrain), limit=limit)
        x_ssl = np.concatenate([x_unlabelled, train.x])
        say(
            f"pretraining on {len(x_unlabelled)} unlabelled records + {len(train)} training-fold signals (labels unused)"
        )
        torch.manual_seed(seed)
        encoder = build_model(arch, width=width, dropout=dropout)
        assert isinstance(encoder, ResNetSE1d)  # arch is resnet_se (checked above)
        pretrain_info = pretrain_encoder(
            encoder,
            x_ssl,
            epochs=pretrain_epochs,
            augmenter=Augmenter(aug_config, DEFAULT_SPEC),
            seed=seed,
            device=dev,
            log=say,
        )
        pretrain_info["unlabelled_records"] = int(len(x_unlabelled))
        pretrain_info["training_records"] = int(len(train))
        common["init_features"] = {k: v.detach().cpu().clone() for k, v in encoder.features.state_dict().items()}

    # (2) loss comparison on fold 9
    losses = ["focal", "bce"] if loss == "auto" else [loss]
    candidates: dict[str, dict[str, Any]] = {}
    for loss_name in losses:
        candidates[loss_name] = fit_member(
            train, val, loss=loss_name, seed=seed, tag=f"{loss_name} seed {seed}", **common
        )
        say(
            f"{loss_name}: best epoch {candidates[loss_name]['best_epoch']}, fold-9 macro-AUROC "
            f"{candidates[loss_name]['val_macro_auroc']:.4f} ({_fmt_s(candidates[loss_name]['wall_s'])})"
        )
    chosen = max(losses, key=lambda k: (candidates[k]["val_macro_auroc"], k == "focal"))
    if len(losses) > 1:
        say(f"loss chosen on fold 9: {chosen}")

    # (3) more seeds of the chosen loss
    members = [candidates[chosen]]
    for extra in range(1, seeds):
        members.append(
            fit_member(train, val, loss=chosen, seed=seed + extra, tag=f"{chosen} seed {seed + extra}", **common)
        )
        say(f"seed {seed + extra}: fold-9 macro-AUROC {members[-1]['val_macro_auroc']:.4f}")
    z_val = np.mean([m["val_logits"] for m in members], axis=0)
    ensemble_val_auc = _macro_auroc_defined(val.y, z_val)
    if seeds > 1:
        say(
            f"ensemble of {seeds}: fold-9 macro-AUROC {ensemble_val_auc:.4f} "
            "(members " + ", ".join(f"{m['val_macro_auroc']:.4f}" for m in members) + ")"
        )

    # (4) calibration, thresholds, tiers on fold 9
    calib = fit_calibration(val.y, z_val, pos_weight, seed=seed)
    p_val = apply_calibration(z_val, calib["temperature"], calib["offset"])
    ece_val = {"before": ece(val.y, 1 / (1 + np.exp(-z_val))), "after": ece(val.y, p_val)}
    thresholds, threshold_detail, tiers, tier_detail = {}, {}, {}, {}
    for k, code in enumerate(SUPERCLASSES):
        thr = min_sensitivity_threshold(val.y[:, k], p_val[:, k], min_sensitivity)
        thresholds[code] = round(thr["threshold"], 6)
        threshold_detail[code] = thr
        t = choose_tiers(val.y[:, k], p_val[:, k], catch=tier_catch, specificity=tier_specificity)
        tiers[code] = {"moderate": t["moderate"], "high": t["high"]}
        tier_detail[code] = t
    say(
        f"calibration: {calib['variant']}, T {np.round(calib['temperature'], 3).tolist()}, "
        f"fold-9 ECE {ece_val['before']['mean']:.3f} -> {ece_val['after']['mean']:.3f}"
    )
    say(f"thresholds {thresholds}")
    say(f"tiers {tiers}")

    # (5) export + evaluate
    graph = ServingGraph([m["model"] for m in members], temperature=calib["temperature"], offset=calib["offset"]).eval()
    torch.save(
        {
            "arch": arch,
            "width": width,
            "dropout": dropout,
            "classes": list(SUPERCLASSES),
            "members": [m["model"].state_dict() for m in members],
            "candidates": {k: v["model"].state_dict() for k, v in candidates.items()},
            "temperature": calib["temperature"].tolist(),
            "offset": calib["offset"].tolist(),
        },
        out_dir / "model.pt",
    )
    subset = data_dir.name
    trained_on = (
        f"PTB-XL ({subset}, records{sampling_rate}): strat_fold 1-8 train ({len(train)} records), "
        f"fold 9 validation ({len(val)} records); Wagner et al. 2020, CC BY 4.0"
    )
    calibration_meta = {
        "method": calib["method"],
        "variant": calib["variant"],
        "fitted_on": f"PTB-XL strat_fold 9 ({len(val)} records)",
        "temperature": {c: round(float(v), 6) for c, v in zip(SUPERCLASSES, calib["temperature"])},
        "offset": {c: round(float(v), 6) for c, v in zip(SUPERCLASSES, calib["offset"])},
        "in_graph": True,
        "uncalibrated_output": "logits",
    }
    arch_label = "ResNet-SE" if arch == "resnet_se" else "CNN"
    n_params = int(sum(p.numel() for p in members[0]["model"].parameters()))
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
            f"1D {arch_label}{f' ensemble of {seeds}' if seeds > 1 else ''}, PTB-XL diagnostic superclasses, "
            "calibrated, risk tiers and class activation maps; research use only, NOT FOR CLINICAL USE."
        ),
        trained_on=trained_on,
        preprocessing=DEFAULT_SPEC,
        tiers=tiers,
        calibration=calibration_meta,
        architecture={
            "module": "training.models.ResNetSE1d" if arch == "resnet_se" else "training.models.Cnn1d",
            "arch": arch,
            "width": width,
            "dropout": dropout,
            "members": len(members),
            "parameters": n_params * len(members),
            "cam_stride_samples": 16,
        },
    )
    say(
        f"exported {exported['onnx_path']} via {exported['export_method']}, parity "
        + ", ".join(f"{k} {v:.2e}" for k, v in exported["parity"].items())
    )

    metrics = evaluate_diagnosis(
        model_dir, data_dir, fold=TEST_FOLDS[0], n_bootstrap=n_bootstrap, seed=seed, sampling_rate=sampling_rate
    )
    report = format_report(metrics)
    say(report)
    external_metrics = None
    external_report = None
    if external is not None:
        external_metrics = evaluate_external(
            model_dir, Path(external), train_data=data_dir, n_bootstrap=n_bootstrap, seed=seed
        )
        external_report = format_report(external_metrics)
        say(external_report)

    # The loss comparison on fold 10, measured after every choice was made (card only).
    test = load_ptbxl(data_dir, TEST_FOLDS, sampling_rate=sampling_rate, limit=limit)
    loss_table = []
    for loss_name, cand in candidates.items():
        z_test = _logits(cand["model"], test.x, torch.device("cpu"))
        loss_table.append(
            {
                "loss": loss_name,
                "seed": cand["seed"],
                "best_epoch": cand["best_epoch"],
                "fold9_macro_auroc": cand["val_macro_auroc"],
                "fold9_per_class": {
                    c: auroc(val.y[:, k], cand["val_logits"][:, k]) for k, c in enumerate(SUPERCLASSES)
                },
                "fold10": _auroc_with_ci(test.y, z_test, test.patient_ids, n_bootstrap, seed),
                "chosen": loss_name == chosen,
            }
        )
    if seeds > 1:
        z_test_members = [_logits(m["model"], test.x, torch.device("cpu")) for m in members]
        ensemble_table = {
            "members": [
                {
                    "seed": m["seed"],
                    "fold9_macro_auroc": m["val_macro_auroc"],
                    "fold10_macro_auroc": _macro_auroc_defined(test.y, z),
                }
                for m, z in zip(members, z_test_members)
            ],
            "ensemble_fold9_macro_auroc": ensemble_val_auc,
            "ensemble_fold10_macro_auroc": _macro_auroc_defined(test.y, np.mean(z_test_members, axis=0)),
        }
    else:
        ensemble_table = None

    comparison: dict[str, Any] | None = None
    if compare_with is not None:
        comparison = {"model_dir": str(compare_with), "rows": []}
        for label, directory in (("this model", model_dir), ("previous", Path(compare_with))):
            row: dict[str, Any] = {"label": label}
            for fold in (VAL_FOLDS[0], TEST_FOLDS[0]):
                fm = (
                    metrics
                    if (label == "this model" and fold == TEST_FOLDS[0])
                    else evaluate_diagnosis(
                        directory, data_dir, fold=fold, n_bootstrap=n_bootstrap, seed=seed, sampling_rate=sampling_rate
                    )
                )
                row[f"fold{fold}"] = {
                    "macro_auroc": fm["macro_auroc"],
                    "macro_auroc_ci": fm["macro_auroc_ci"],
                    "ece": fm["calibration"]["after"]["mean"],
                }
                row["model"] = f"{fm['model']['name']} {fm['model']['version']}"
            if external is not None:
                em = (
                    external_metrics
                    if label == "this model"
                    else evaluate_external(
                        directory, Path(external), train_data=data_dir, n_bootstrap=n_bootstrap, seed=seed
                    )
                )
                assert em is not None  # external_metrics was computed above, external being given
                row["external"] = {src: sm["macro_auroc"] for src, sm in em["sources"].items()}
            comparison["rows"].append(row)
        say(
            "comparison: "
            + "; ".join(
                f"{r['model']} fold 9 {r['fold9']['macro_auroc']:.3f} fold 10 {r['fold10']['macro_auroc']:.3f}"
                for r in comparison["rows"]
            )
        )

    wall_s = round(time.monotonic() - started, 1)
    settings = {
        "command": command
        or (
            f"train_diagnosis(arch={arch!r}, loss={loss!r}, seeds={seeds}, epochs={epochs}, seed={seed}, "
            f"batch_size={batch_size}, lr={lr}, weight_decay={weight_decay}, width={width}, dropout={dropout}, "
            f"augment_strength={augment_strength}, "
            f"patience={patience}, threads={threads}" + (f", limit={limit}" if limit is not None else "") + ")"
        ),
        "loss": (
            f"{'focal (gamma 2)' if chosen == 'focal' else 'binary cross-entropy'} on logits, chosen "
            + (
                "on fold-9 macro-AUROC against " + ("BCE" if chosen == "focal" else "focal (gamma 2)")
                if loss == "auto"
                else "by --loss"
            )
        ),
        "class weighting": "positive term weighted per class by sqrt(negatives / positives) on folds 1-8, clipped to [1, 10]: "
        + ", ".join(f"{c} {w:.2f}" for c, w in zip(SUPERCLASSES, pos_weight)),
        "optimiser": f"AdamW lr {lr}, weight decay {weight_decay}, linear warm-up then cosine decay over {epochs} epochs",
        "weights kept": f"exponential moving average (decay {ema_decay}) of the weights; the EMA at the epoch with the best "
        f"fold-9 macro-AUROC (early stopping patience {patience})",
        "batch size": batch_size,
        "augmentation": aug_config.describe() if augment_online else "none",
        "ensemble": f"{seeds} seeds ({', '.join(str(m['seed']) for m in members)}), logits and CAMs averaged in the graph"
        if seeds > 1
        else "single model",
        "self-supervised pretraining": (
            f"SimCLR-style contrastive pretraining of the encoder (NT-Xent, temperature {pretrain_info['temperature']}, "
            f"two views = artefact augmentation + random {pretrain_info['crop_s']:.0f} s crop) on "
            f"{pretrain_info['unlabelled_records']} `ptbxl-unlabelled` records + the {pretrain_info['training_records']} "
            f"training-fold signals, {pretrain_info['epochs']} epochs, batch {pretrain_info['batch_size']}, "
            f"{pretrain_info['wall_s']:.0f} s; fine-tuned from it"
            if pretrain_info
            else "none"
        ),
        "seed": seed,
        "torch": torch.__version__,
        "device / threads": f"{dev} / {threads}",
    }
    training = {
        "data_description": (
            f"PTB-XL records from `{subset}` (`records{sampling_rate}`), read with wfdb by lead name."
            + (
                " These signals were band-passed (0.5-40 Hz), z-scored per lead and decimated to 100 Hz by their "
                "publisher before they reached us."
                if subset == "ptbxl-subset"
                else ""
            )
        ),
        "splits": {
            "train": _split_summary(train, TRAIN_FOLDS),
            "validation": _split_summary(val, VAL_FOLDS),
            "test": {
                "folds": str(TEST_FOLDS[0]),
                "n_records": metrics["data"]["n_records"],
                "n_patients": metrics["data"]["n_patients"],
                "n_unlabelled_excluded": metrics["data"]["n_unlabelled_excluded"],
                "label_counts": {c: v["positives"] for c, v in metrics["classes"].items()},
            },
        },
        "patient_overlap": overlap,
        "preprocessing": " -> ".join(_describe_step(step) for step in DEFAULT_SPEC),
        "leads": list(STANDARD_LEADS),
        "architecture": {
            "arch": arch,
            "description": _describe_arch(arch, width, dropout)
            + "; in the exported graph: CAMs from the last conv features and the head weights, member-mean logits, "
            "calibrated sigmoid",
            "parameters": n_params,
            "parameters_total": n_params * len(members),
            "members": len(members),
        },
        "settings": settings,
        "validation": {
            "best_epoch": members[0]["best_epoch"],
            "epochs_run": members[0]["epochs_run"],
            "best_macro_auroc": ensemble_val_auc,
            "n_records": len(val),
        },
        "loss_comparison": loss_table,
        "ensemble": ensemble_table,
        "comparison": comparison,
        "pretraining": pretrain_info,
        "thresholds": {
            "method": f"on fold-9 calibrated probabilities, the best-F1 threshold among those catching >= "
            f"{min_sensitivity:.0%} of fold-9 positives (minimum-sensitivity rule)",
            "values": thresholds,
            "detail": threshold_detail,
        },
        "calibration": {
            **calibration_meta,
            "cv_nll": calib["cv_nll"],
            "cv": calib["cv"],
            "fold9_ece": ece_val,
            "nll_before": calib["nll_before"],
            "nll_after": calib["nll_after"],
        },
        "tiers": {
            "rule": f"moderate: the highest cut-off at which Moderate + High still catch >= {tier_catch:.0%} of fold-9 "
            f"positives; high: the lowest cut-off at which <= {1 - tier_specificity:.0%} of fold-9 negatives reach High "
            "(fold-9 calibrated probabilities; moderate capped at high)",
            "values": tiers,
            "detail": tier_detail,
        },
        "export": {
            "method": exported["export_method"],
            "parity_max_abs_diff": exported["parity_max_abs_diff"],
            "parity": exported["parity"],
            "onnx_bytes": exported["onnx_bytes"],
        },
        "history": {f"{m['loss']} seed {m['seed']}": m["history"] for m in [*candidates.values(), *members[1:]]},
        "wall_s": wall_s,
    }
    card = write_model_card(model_dir / "MODEL_CARD.md", metrics, training, external=external_metrics)
    say(f"wrote {card}; total wall time {_fmt_s(wall_s)}")
    result = {
        "metrics": metrics,
        "report": report,
        "external": external_metrics,
        "external_report": external_report,
        "training": training,
        "thresholds": thresholds,
        "tiers": tiers,
        "paths": {
            "model_dir": str(model_dir),
            "onnx": exported["onnx_path"],
            "manifest": str(model_dir / "manifest.json"),
            "card": str(card),
            "checkpoint": str(out_dir / "model.pt"),
        },
    }
    (out_dir / "result.json").write_text(json.dumps(to_jsonable(result), indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if "--from-store" in given:  # retraining on the site's over-read ECGs: training.from_store
        from ecgbridge.training.from_store import main as from_store_main

        return from_store_main([a for a in given if a != "--from-store"])
    parser = argparse.ArgumentParser(prog="ecgbridge train diagnosis", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--from-store",
        action="store_true",
        help="instead: fine-tune on this site's over-read ECGs (options: ecgbridge train diagnosis --from-store --help)",
    )
    parser.add_argument(
        "--data", "--data-dir", dest="data_dir", type=Path, required=True, help="PTB-XL root (holds ptbxl_database.csv)"
    )
    parser.add_argument(
        "--out", "--out-dir", dest="out_dir", type=Path, required=True, help="checkpoint, history and result.json"
    )
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="where model.onnx/manifest/card go (default OUT/diagnosis)"
    )
    parser.add_argument(
        "--external", type=Path, default=None, help="PhysioNet-challenge directory for external evaluation"
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        help="a previous model directory to measure on folds 9 and 10 (and --external) for the card",
    )
    parser.add_argument(
        "--pretrain",
        type=Path,
        default=None,
        help="unlabelled PTB-XL-layout directory (RECORDS) for self-supervised encoder pretraining",
    )
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--arch", choices=ARCHS, default="resnet_se")
    parser.add_argument(
        "--loss", choices=LOSSES, default="auto", help="auto: train focal and BCE, keep the better on fold 9"
    )
    parser.add_argument("--seeds", type=int, default=1, help="ensemble size (members averaged inside the ONNX graph)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sampling-rate", type=int, choices=(100, 500), default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--patience", type=int, default=15)
    parser.add_argument("--ema-decay", type=float, default=0.98)
    parser.add_argument("--no-augment", action="store_true", help="train without online artefact augmentation")
    parser.add_argument(
        "--augment-strength",
        type=float,
        default=1.0,
        help="multiply every artefact probability and amplitude by this (1 = training.augment defaults)",
    )
    parser.add_argument(
        "--noise-max",
        type=float,
        default=None,
        help="largest Gaussian-noise sigma of the augmentation, in z-scored signal units (default 0.2 x strength)",
    )
    parser.add_argument(
        "--min-sensitivity", type=float, default=0.8, help="decision thresholds: minimum fold-9 sensitivity"
    )
    parser.add_argument(
        "--tier-catch", type=float, default=0.95, help="Moderate + High must catch this share of fold-9 positives"
    )
    parser.add_argument(
        "--tier-specificity", type=float, default=0.95, help="High admits at most 1 - this of fold-9 negatives"
    )
    parser.add_argument("--version", default="0.2.0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="first N records per split (smoke tests)")
    args = parser.parse_args(argv)
    command = "ecgbridge train diagnosis " + " ".join(sys.argv[3:] if argv is None else list(argv))
    train_diagnosis(
        args.data_dir,
        args.out_dir,
        arch=args.arch,
        loss=args.loss,
        seeds=args.seeds,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        sampling_rate=args.sampling_rate,
        model_dir=args.model_dir,
        external=args.external,
        compare_with=args.compare_with,
        pretrain=args.pretrain,
        pretrain_epochs=args.pretrain_epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        width=args.width,
        dropout=args.dropout,
        patience=args.patience,
        ema_decay=args.ema_decay,
        augment_online=not args.no_augment,
        augment_strength=args.augment_strength,
        noise_max=args.noise_max,
        min_sensitivity=args.min_sensitivity,
        tier_catch=args.tier_catch,
        tier_specificity=args.tier_specificity,
        version=args.version,
        threads=args.threads,
        device=args.device,
        n_bootstrap=args.n_bootstrap,
        limit=args.limit,
        command=command,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
