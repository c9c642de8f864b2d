"""Optional self-supervised pretraining of the encoder on unlabelled ECGs (contrastive, SimCLR-style).

Two views of each record are made by the artefact augmentation (``training.augment``,
through the serving pipeline) and an independent random temporal crop
(``crop_s`` seconds at a random offset; the encoder is fully convolutional with a
global-average-pool, so it takes any length). A small projection head maps the
pooled features to an embedding, and the NT-Xent loss pulls the two views of a
record together and pushes the other records of the batch away. Only the
encoder (``features``) is kept; fine-tuning puts a fresh linear head on it.

The data are ``ptbxl-unlabelled`` (PTB-XL records without labels or folds) plus
the *training* folds' signals (their labels unused). Validation and test folds
are never fed to it. The unlabelled records have unknown folds and patients, so
some are PTB-XL test-fold recordings or test patients: that is why they are
used without labels only, and never for evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ecgbridge.inference.preprocess import DEFAULT_SPEC, Pipeline
from ecgbridge.training.augment import Augmenter
from ecgbridge.training.datasets.ptbxl import read_signal
from ecgbridge.training.models.resnet_se import ResNetSE1d

__all__ = ["load_unlabelled", "nt_xent", "pretrain_encoder"]


def load_unlabelled(data_dir: Path, *, limit: int | None = None) -> np.ndarray:
    """Records listed in ``data_dir/RECORDS`` (WFDB paths), preprocessed by ``DEFAULT_SPEC``: (n, 12, 1000)."""
    data_dir = Path(data_dir)
    listing = data_dir / "RECORDS"
    if not listing.is_file():
        raise FileNotFoundError(f"no RECORDS file in {data_dir}")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if limit is not None:
        names = names[:limit]
    pipeline = Pipeline.from_spec(DEFAULT_SPEC)
    xs = [pipeline.apply(*read_signal(data_dir / name)[:2])[0] for name in names]
    return np.stack(xs).astype(np.float32) if xs else np.zeros((0, 12, 1000), np.float32)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross-entropy over 2N embeddings (positives: the other view)."""
    z = nn.functional.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.t() / temperature
    n = a.shape[0]
    sim = sim - torch.eye(2 * n, device=z.device) * 1e9
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return nn.functional.cross_entropy(sim, target)


def pretrain_encoder(
    model: ResNetSE1d,
    x: np.ndarray,
    *,
    epochs: int,
    augmenter: Augmenter,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    temperature: float = 0.2,
    crop_s: float = 8.0,
    fs: float = 100.0,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model.features`` contrastively on ``x`` (n, leads, T); returns the loss history."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    width = int(model.n_features)
    head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 64)).to(device)
    model = model.to(device)
    params = list(model.features.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * (len(x) // batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    crop = min(int(crop_s * fs), x.shape[-1])
    history = []
    started = time.monotonic()
    step = 0

    def view(batch: np.ndarray) -> torch.Tensor:
        v = augmenter(batch, rng)
        starts = rng.integers(0, v.shape[-1] - crop + 1, size=len(v))
        return torch.from_numpy(np.stack([r[:, s : s + crop] for r, s in zip(v, starts)])).to(device)

    for epoch in range(1, epochs + 1):
        model.train()
        head.train()
        order = rng.permutation(len(x))
        total, seen = 0.0, 0
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            a = head(model.embed(view(x[idx])))
            b = head(model.embed(view(x[idx])))
            loss = nt_xent(a, b, temperature)
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            optimiser.step()
            if step < steps:
                scheduler.step()
            step += 1
            total += loss.detach().item() * len(idx)
            seen += len(idx)
        elapsed = time.monotonic() - started
        history.append({"epoch": epoch, "nt_xent": total / max(seen, 1)})
        log(
            f"[pretrain] epoch {epoch:3d}/{epochs} nt_xent {total / max(seen, 1):.4f} "
            f"(chance {math.log(2 * batch_size - 1):.2f}; {int(elapsed)}s elapsed, ~{int(elapsed / epoch * (epochs - epoch))}s left)"
        )
    model.eval()
    return {
        "history": history,
        "records": int(len(x)),
        "epochs": epochs,
        "batch_size": batch_size,
        "temperature": temperature,
        "crop_s": crop_s,
        "lr": lr,
        "wall_s": round(time.monotonic() - started, 1),
    }
