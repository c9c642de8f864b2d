"""The clinical-knowledge ECG encoder (issue #14): knowledge transfer from clinical data into an ECG-only model.

Three stages (``docs/kt-encoder.md``)::

    ecgbridge train kt --data /path/to/ptbxl --out /tmp/kt [--seeds N] [--epochs E] [--compare]
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
``abnormalities`` (N, heads), the heads' probabilities; the manifest's
``architecture.abnormality_heads`` names them.

``--compare`` also trains, per seed, the signal-only recipe (same loop, no stage 1) and a
fully multimodal model (stage-1 encoder + clinical encoder, clinical vector also at
inference) and writes fold-10 macro-AUROC per arm with patient-level paired bootstrap CIs of
the differences to ``comparison.json`` and the model card.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ecgbridge.inference.metrics import patient_resamples
from ecgbridge.inference.preprocess import DEFAULT_SPEC
from ecgbridge.training.augment import AugmentConfig, Augmenter
from ecgbridge.training.calibration import apply_calibration, choose_tiers, fit_calibration, min_sensitivity_threshold
from ecgbridge.training.clinical import (
    VARIABLES,
    Abnormality,
    ManifestRow,
    abnormality_targets,
    clinical_matrix,
    from_ptbxl,
    write_manifest,
)
from ecgbridge.training.datasets.ptbxl import (
    SUPERCLASSES,
    TEST_FOLDS,
    TRAIN_FOLDS,
    VAL_FOLDS,
    PtbxlData,
    check_patient_disjoint,
    load_ptbxl,
)
from ecgbridge.training.evaluate import auroc, to_jsonable
from ecgbridge.training.export import ServingGraph, export_model
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


#: The arms in table order; "ssl-only" is the stage-1 ablation (``clip_weight=0``: ECG views only).
ARMS = ("signal-only", "ssl-only", "knowledge-transfer", "multimodal")


def compare_arms(
    y: np.ndarray, pids: np.ndarray, arms: dict[str, list[np.ndarray]], *, n_bootstrap: int, seed: int = 0
) -> dict[str, Any]:
    """Fold-10 macro-AUROC per arm (seed-ensemble of logits, and mean/sd over seeds) + paired bootstrap diffs."""
    ensembles = {arm: np.mean(zs, axis=0) for arm, zs in arms.items() if len(zs)}
    per_seed_auc = {arm: [_macro_auroc_defined(y, z) for z in zs] for arm, zs in arms.items() if len(zs)}
    out: dict[str, Any] = {
        "fold": TEST_FOLDS[0],
        "n_records": int(len(y)),
        "n_patients": int(np.unique(pids).size),
        "label_counts": {c: int(y[:, k].sum()) for k, c in enumerate(SUPERCLASSES)},
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


def combine_runs(run_dirs: Sequence[Path], out: Path, *, n_bootstrap: int = 1000) -> dict[str, Any]:
    """Pool single-seed runs (``fold10_outputs.npz``) into one comparison: ``comparison.json``, ``COMPARISON.md``."""
    loaded = [np.load(Path(d) / "fold10_outputs.npz") for d in run_dirs]
    ref = loaded[0]
    for d, z in zip(run_dirs, loaded):
        if not np.array_equal(z["ecg_ids"], ref["ecg_ids"]):
            raise ValueError(f"{d} was evaluated on other records than {run_dirs[0]}")
    arms: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS}
    for z in loaded:
        for arm in ARMS:
            key = f"logits_{arm.replace('-', '_')}"
            if key in z.files:
                arms[arm].extend(list(z[key]))
    comparison = compare_arms(ref["y"], ref["patient_ids"], arms, n_bootstrap=n_bootstrap)
    comparison["runs"] = [str(d) for d in run_dirs]
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
    (out / "COMPARISON.md").write_text("\n".join(_comparison_lines(comparison)) + "\n")
    return comparison


def _comparison_lines(c: dict[str, Any]) -> list[str]:
    lines = [
        f"Fold {c['fold']}: {c['n_records']} records, {c['n_patients']} patients; positives {c['label_counts']}.",
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


# ----- the recipe -------------------------------------------------------------------------


def _rows_for(data: PtbxlData, by_ecg: dict[str, ManifestRow]) -> list[ManifestRow]:
    return [by_ecg[f"ptbxl-{int(e)}"] for e in data.ecg_ids]


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
    data_dir: Path,
    out_dir: Path,
    *,
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
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    model_dir = Path(model_dir) if model_dir is not None else out_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed, threads)
    cpu = torch.device("cpu")

    def say(msg: str) -> None:
        if log:
            print(msg, flush=True)

    # data: signals + labels (training.datasets.ptbxl), clinical variables (training.clinical)
    manifest = from_ptbxl(data_dir)
    write_manifest(manifest, out_dir / "clinical_manifest.jsonl")
    by_ecg = {r.ecg_id: r for r in manifest.rows}
    train = load_ptbxl(data_dir, TRAIN_FOLDS, limit=limit)
    val = load_ptbxl(data_dir, VAL_FOLDS, limit=limit)
    test = load_ptbxl(data_dir, TEST_FOLDS, limit=limit)
    check_patient_disjoint(train, val, test)
    rows_train, rows_val, rows_test = (_rows_for(d, by_ecg) for d in (train, val, test))
    loincs, values_tr, mask_tr, dropped = clinical_matrix(rows_train)
    scaler = ClinicalScaler(values_tr, mask_tr)

    def clinical_of(rows: list[ManifestRow]) -> np.ndarray:
        _, v, m, _ = clinical_matrix(rows, loincs)
        return scaler(v, m)

    v_train, v_val, v_test = clinical_of(rows_train), clinical_of(rows_val), clinical_of(rows_test)
    heads_spec, t_train = abnormality_targets(rows_train)
    _, t_test_all = abnormality_targets(rows_test, heads_spec, require_both=False)
    say(
        f"train {len(train)}, val {len(val)}, test {len(test)} records; clinical variables "
        + ", ".join(VARIABLES[c].name for c in loincs)
        + (f" (dropped, missing everywhere: {', '.join(dropped)})" if dropped else "")
        + f"; abnormality heads {', '.join(a.code for a in heads_spec)}"
    )

    aug = Augmenter(AugmentConfig(fs=FS_HZ), DEFAULT_SPEC)
    pos_weight = class_pos_weight(train.y)
    x_extra = np.zeros((0, *train.x.shape[1:]), np.float32)
    if pretrain is not None:
        from ecgbridge.training.pretrain import load_unlabelled

        x_extra = load_unlabelled(Path(pretrain), limit=limit)
    x_ssl = np.concatenate([train.x, x_extra])
    v_ssl = np.concatenate([v_train, np.zeros((len(x_extra), v_train.shape[1]), np.float32)])
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
        head = fit_abnormality_heads(_embeddings(member["model"], train.x), t_train, seed=s)
        heads.append(head)
        z_test = _logits(member["model"], test.x)
        arms[kt_arm].append(z_test)
        row: dict[str, Any] = {"seed": s, kt_arm: {"fold9": member["val_macro_auroc"]}}
        if compare:
            base = fit_member(train, val, loss=loss, seed=s, tag=f"signal-only seed {s}", **common)
            arms["signal-only"].append(_logits(base["model"], test.x))
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
            row["multimodal"] = {"fold9": mm["val_macro_auroc"]}
        for arm, zs in arms.items():
            if zs:
                row.setdefault(arm, {})["fold10"] = _macro_auroc_defined(test.y, zs[-1])
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
        trained_on=f"PTB-XL ({data_dir.name}): strat_fold 1-8 ({len(train)} records) + biometrics; fold 9 validation",
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
    say(f"exported {exported['onnx_path']}, parity " + ", ".join(f"{k} {v:.2e}" for k, v in exported["parity"].items()))

    # fold-10 measurements (card only; every choice above was made on folds 1-9)
    with torch.no_grad():
        abn_test = graph(torch.from_numpy(test.x))[3].numpy() if len(test) else np.zeros((0, len(heads_spec)))
    abnormality_metrics = _abnormality_aurocs(heads_spec, t_test_all, abn_test)
    comparison = compare_arms(test.y, test.patient_ids, arms, n_bootstrap=n_bootstrap, seed=seed)
    comparison["per_seed"] = per_seed
    arrays: dict[str, Any] = {
        "y": test.y,
        "patient_ids": test.patient_ids,
        "ecg_ids": test.ecg_ids,
        "seeds": np.array([r["seed"] for r in per_seed]),
        "abnormalities": abn_test,
        "abnormality_targets": t_test_all,
        **{f"logits_{arm.replace('-', '_')}": np.stack(zs) for arm, zs in arms.items() if zs},
    }
    np.savez(out_dir / "fold10_outputs.npz", **arrays)
    result = {
        "command": command,
        "data": {
            "data_dir": str(data_dir),
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
        f"PTB-XL from `{d['data_dir']}`: strat_fold 1-8 train ({d['train']} records), fold 9 validation "
        f"({d['val']}), fold 10 test ({d['test']} records, {c['n_patients']} patients); patient-level folds, "
        "disjointness checked. Clinical variables (folds 1-8 records with a value): "
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


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["combine"]:  # pool single-seed runs into one comparison
        combiner = argparse.ArgumentParser(prog="ecgbridge train kt combine", description=combine_runs.__doc__)
        combiner.add_argument("runs", type=Path, nargs="+", help="--out folders of single-seed `--compare` runs")
        combiner.add_argument("--out", type=Path, required=True)
        combiner.add_argument("--n-bootstrap", type=int, default=1000)
        cargs = combiner.parse_args(given[1:])
        comparison = combine_runs(cargs.runs, cargs.out, n_bootstrap=cargs.n_bootstrap)
        print("\n".join(_comparison_lines(comparison)))
        return 0
    parser = argparse.ArgumentParser(prog="ecgbridge train kt", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="PTB-XL root (ptbxl_database.csv)")
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
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="first N records per split (smoke tests)")
    args = parser.parse_args(argv)
    train_kt(
        args.data,
        args.out,
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
        n_bootstrap=args.n_bootstrap,
        threads=args.threads,
        limit=args.limit,
        command="ecgbridge train kt " + " ".join(sys.argv[3:] if argv is None else list(argv)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
