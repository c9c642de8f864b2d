"""Train, select, export, evaluate and document the baseline diagnosis model.

One function does the whole run so the shipped directory can be reproduced by
one command::

    ecgbridge train diagnosis --data /path/to/ptbxl --out /tmp/run \\
        --model-dir inference/shipped/diagnosis-baseline

Folds 1-8 train, fold 9 picks the checkpoint (macro-AUROC, early stopping) and
the per-class thresholds (max F1), fold 10 is touched once, by
``training.evaluate`` on the exported ONNX file. Runs are deterministic for a
given seed, thread count and torch build (CPU, deterministic algorithms on).
The torch checkpoint (``model.pt``) and logs go to ``out_dir``; the model
directory receives only ``model.onnx``, ``manifest.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from inference.preprocess import DEFAULT_SPEC
from mapping.ecg import STANDARD_LEADS

from .cards import write_model_card
from .datasets.ptbxl import (
    SUPERCLASSES,
    TEST_FOLDS,
    TRAIN_FOLDS,
    VAL_FOLDS,
    PtbxlData,
    check_patient_disjoint,
    load_metadata,
    load_ptbxl,
)
from .evaluate import auroc, best_f1_threshold, evaluate_diagnosis, format_report, to_jsonable
from .export import export_model
from .models.cnn1d import Cnn1d, count_parameters

__all__ = ["augment", "train_diagnosis", "main"]

FS_HZ = 100.0


def _seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light online augmentation of a z-scored batch (N, leads, T) at 100 Hz.

    Amplitude scaling per record (x0.9-1.1), baseline wander (one sinusoid per
    lead, 0.05-0.5 Hz, amplitude up to 0.1) and gaussian noise (sigma up to 0.05).
    Mild on purpose: serving z-scores and band-passes, so large distortions would
    only teach the model inputs it never sees.
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


@torch.no_grad()
def _predict(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(torch.from_numpy(x[i : i + batch_size]))).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(SUPERCLASSES)), np.float32)


def _macro_auroc_defined(y: np.ndarray, p: np.ndarray) -> float:
    """Mean AUROC over classes defined on this set (a tiny fold may lack some)."""
    values = [auroc(y[:, k], p[:, k]) for k in range(y.shape[1])]
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


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


def train_diagnosis(
    data_dir: Path,
    out_dir: Path,
    *,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    sampling_rate: int = 100,
    model_dir: Path | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    width: int = 32,
    dropout: float = 0.3,
    patience: int = 10,
    threads: int = 2,
    n_bootstrap: int = 1000,
    limit: int | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """Train the baseline CNN on PTB-XL and ship it to ``model_dir`` (default ``out_dir/diagnosis-baseline``).

    Returns the fold-10 metrics, the training summary, and the paths written.
    ``limit`` keeps the first N labelled records per split (smoke tests only).
    """
    started = time.monotonic()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    model_dir = Path(model_dir) if model_dir is not None else out_dir / "diagnosis-baseline"
    if model_dir.resolve() == out_dir.resolve():
        raise ValueError("model_dir must differ from out_dir: the checkpoint must not land in the model directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(seed, threads)

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
        f"val {len(val)} ({val.n_unlabelled} excluded); labels train {train.label_counts()}"
    )

    model = Cnn1d(n_leads=len(STANDARD_LEADS), n_classes=len(SUPERCLASSES), width=width, dropout=dropout)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(epochs, 1))
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    shuffle = np.random.default_rng(seed)
    x_train, y_train = torch.from_numpy(train.x), torch.from_numpy(train.y)

    history: list[dict[str, float]] = []
    best_auc, best_epoch, best_state = -1.0, 0, {k: v.clone() for k, v in model.state_dict().items()}
    for epoch in range(1, epochs + 1):
        model.train()
        order = shuffle.permutation(len(train))
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = torch.from_numpy(order[i : i + batch_size])
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            xb = augment(x_train[idx], gen)
            loss = loss_fn(model(xb), y_train[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.detach().item() * len(idx)
            seen += len(idx)
        scheduler.step()
        p_val = _predict(model, val.x)
        val_auc = _macro_auroc_defined(val.y, p_val)
        val_loss = float(loss_fn(torch.logit(torch.from_numpy(p_val).clamp(1e-7, 1 - 1e-7)), torch.from_numpy(val.y)))
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss, "val_macro_auroc": val_auc})
        improved = not math.isnan(val_auc) and val_auc > best_auc
        if improved:
            best_auc, best_epoch = val_auc, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        say(f"epoch {epoch:3d} train_loss {total / max(seen, 1):.4f} val_loss {val_loss:.4f} val_macro_auroc {val_auc:.4f}{' *' if improved else ''}")
        if epoch - best_epoch >= patience and best_epoch > 0:
            say(f"early stop: no fold-9 improvement for {patience} epochs")
            break

    model.load_state_dict(best_state)
    model.eval()
    torch.save(model.state_dict(), out_dir / "model.pt")
    p_val = _predict(model, val.x)
    thresholds = {c: round(best_f1_threshold(val.y[:, k], p_val[:, k]), 6) for k, c in enumerate(SUPERCLASSES)}
    say(f"best epoch {best_epoch} fold-9 macro-AUROC {best_auc:.4f}; thresholds {thresholds}")

    subset = data_dir.name
    trained_on = (
        f"PTB-XL ({subset}, records{sampling_rate}): strat_fold 1-8 train ({len(train)} records), "
        f"fold 9 validation ({len(val)} records); Wagner et al. 2020, CC BY 4.0"
    )
    exported = export_model(
        model,
        model_dir,
        classes=SUPERCLASSES,
        thresholds=thresholds,
        real=val.x[:8],
        name="diagnosis",
        version="0.1.0",
        task="diagnosis",
        description="Baseline 1D CNN, PTB-XL diagnostic superclasses; research use only, NOT FOR CLINICAL USE.",
        trained_on=trained_on,
        preprocessing=DEFAULT_SPEC,
    )
    say(f"exported {exported['onnx_path']} via {exported['export_method']}, parity {exported['parity_max_abs_diff']:.2e}")

    metrics = evaluate_diagnosis(model_dir, data_dir, fold=TEST_FOLDS[0], n_bootstrap=n_bootstrap, seed=seed, sampling_rate=sampling_rate)
    report = format_report(metrics)
    say(report)
    settings = {
        "command": f"train_diagnosis(epochs={epochs}, seed={seed}, batch_size={batch_size}, sampling_rate={sampling_rate}, "
        f"lr={lr}, weight_decay={weight_decay}, width={width}, dropout={dropout}, patience={patience}, threads={threads}"
        + (f", limit={limit}" if limit is not None else "")
        + ")",
        "loss": "binary cross-entropy on logits (BCEWithLogitsLoss), no class weights",
        "optimiser": f"AdamW lr {lr}, weight decay {weight_decay}, cosine annealing over {epochs} epochs",
        "batch size": batch_size,
        "max epochs / early-stopping patience": f"{epochs} / {patience} (on fold-9 macro-AUROC)",
        "augmentation": "per-record amplitude scaling x0.9-1.1, per-lead sinusoidal baseline wander 0.05-0.5 Hz "
        "(amplitude <= 0.1), gaussian noise (sigma <= 0.05)",
        "seed": seed,
        "torch": torch.__version__,
        "threads": threads,
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
            "description": (
                f"1D CNN (`training.models.Cnn1d`, width {width}): 5 Conv1d+BatchNorm+ReLU blocks "
                "(kernels 7/5/5/5/3, stride 2 then 3 max-pools: 16x temporal downsampling), global average "
                f"pooling, dropout {dropout}, linear head to 5 logits; sigmoid in the exported graph"
            ),
            "parameters": count_parameters(model),
        },
        "settings": settings,
        "validation": {
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "best_macro_auroc": best_auc,
            "n_records": len(val),
        },
        "thresholds": {"method": "maximising F1 (midpoint between neighbouring scores)", "values": thresholds},
        "export": {
            "method": exported["export_method"],
            "parity_max_abs_diff": exported["parity_max_abs_diff"],
            "onnx_bytes": exported["onnx_bytes"],
        },
        "history": history,
        "wall_s": round(time.monotonic() - started, 1),
    }
    card = write_model_card(model_dir / "MODEL_CARD.md", metrics, training)
    result = {
        "metrics": metrics,
        "report": report,
        "training": training,
        "thresholds": thresholds,
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
    parser = argparse.ArgumentParser(prog="ecgbridge train diagnosis", description=__doc__.split("\n")[0])
    parser.add_argument("--data", "--data-dir", dest="data_dir", type=Path, required=True, help="PTB-XL root (holds ptbxl_database.csv)")
    parser.add_argument("--out", "--out-dir", dest="out_dir", type=Path, required=True, help="checkpoint, history and result.json")
    parser.add_argument("--model-dir", type=Path, default=None, help="where model.onnx/manifest/card go")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sampling-rate", type=int, choices=(100, 500), default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None, help="first N records per split (smoke tests)")
    args = parser.parse_args(argv)
    train_diagnosis(
        args.data_dir,
        args.out_dir,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        sampling_rate=args.sampling_rate,
        model_dir=args.model_dir,
        lr=args.lr,
        weight_decay=args.weight_decay,
        width=args.width,
        dropout=args.dropout,
        patience=args.patience,
        threads=args.threads,
        n_bootstrap=args.n_bootstrap,
        limit=args.limit,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
