"""Torch -> ONNX model directory: ``model.onnx`` + ``manifest.json``, checked for parity.

The sigmoid is part of the exported graph, so serving reads probabilities
straight from the ``probabilities`` output and never re-implements the head.
The manifest (validated by ``inference.models.Manifest``) carries everything the
serving side needs: lead order, sampling rate, the preprocessing spec the model
was trained with, classes with SNOMED CT codes, thresholds and the file's sha256.

Export uses torch's default (dynamo / ``torch.export``) exporter with a dynamic
batch dimension; ``export_onnx`` falls back to the legacy TorchScript exporter
only if that fails, and reports which one it used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from inference.models import Manifest, ModelClass, ModelInput
from inference.preprocess import DEFAULT_SPEC, Pipeline
from mapping.codes import SUPERCLASS_DISPLAY, SUPERCLASS_SNOMED
from mapping.ecg import STANDARD_LEADS

__all__ = [
    "OPSET",
    "PARITY_TOLERANCE",
    "ParityError",
    "ProbabilityModel",
    "export_onnx",
    "check_parity",
    "build_manifest",
    "write_manifest",
    "export_model",
    "sha256_file",
]

log = logging.getLogger(__name__)

OPSET = 18
PARITY_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """The ONNX graph does not reproduce the torch model's probabilities."""


class ProbabilityModel(nn.Module):
    """Logits model + sigmoid: what the ONNX graph computes."""

    def __init__(self, logits_model: nn.Module) -> None:
        super().__init__()
        self.logits_model = logits_model

    def forward(self, ecg: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits_model(ecg))


def _as_probability_model(model: nn.Module) -> nn.Module:
    return model if isinstance(model, ProbabilityModel) else ProbabilityModel(model)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_onnx(
    model: nn.Module,
    onnx_path: Path,
    *,
    n_leads: int = len(STANDARD_LEADS),
    n_samples: int = 1000,
    opset: int = OPSET,
) -> str:
    """Write ``model`` (logits) + sigmoid to ``onnx_path``; returns the exporter used.

    Input ``ecg`` (N, leads, samples) float32 with N dynamic; output ``probabilities``.
    """
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = _as_probability_model(model).eval()
    example = (torch.zeros(2, n_leads, n_samples, dtype=torch.float32),)
    try:
        torch.onnx.export(
            wrapped,
            example,
            str(onnx_path),
            input_names=["ecg"],
            output_names=["probabilities"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
        return f"torch.onnx.export(dynamo=True, dynamic_shapes=batch, opset={opset})"
    except Exception as exc:  # noqa: BLE001 - fall back, but say so
        log.warning("dynamo ONNX export failed (%s); falling back to dynamo=False", exc)
        torch.onnx.export(
            wrapped,
            example,
            str(onnx_path),
            input_names=["ecg"],
            output_names=["probabilities"],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"ecg": {0: "batch"}, "probabilities": {0: "batch"}},
        )
        return f"torch.onnx.export(dynamo=False, dynamic_axes=batch, opset={opset})"


def _ecg_like(n: int, n_leads: int, n_samples: int, seed: int) -> np.ndarray:
    """Synthetic beats (spikes + T waves + noise) through the serving pipeline."""
    rng = np.random.default_rng(seed)
    fs = 100.0
    t = np.arange(n_samples) / fs
    out = []
    pipeline = Pipeline.from_spec(DEFAULT_SPEC)
    for _ in range(n):
        rr = rng.uniform(0.6, 1.2)
        phase = (t + rng.uniform(0, rr)) % rr
        beat = np.exp(-((phase - 0.2) / 0.015) ** 2) + 0.3 * np.exp(-((phase - 0.45) / 0.05) ** 2)
        gains = rng.normal(0, 1, size=(n_leads, 1))
        x = gains * beat[None] + 0.05 * rng.normal(size=(n_leads, n_samples))
        out.append(pipeline.apply(x, fs)[0])
    return np.stack(out).astype(np.float32)


def check_parity(
    torch_model: nn.Module,
    onnx_path: Path,
    n: int = 8,
    *,
    real: np.ndarray | None = None,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> float:
    """Max |p_torch - p_onnx| over random, ECG-like and (if given) real inputs; raises above ``tolerance``.

    ``torch_model`` is the logits model (or a ``ProbabilityModel``). Batches of 1
    and ``n`` are both run, so the dynamic batch axis is exercised.
    """
    import onnxruntime as ort

    wrapped = _as_probability_model(torch_model).eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    n_leads, n_samples = int(shape[1]), int(shape[2])
    rng = np.random.default_rng(seed)
    batches = [
        rng.normal(size=(n, n_leads, n_samples)).astype(np.float32),
        rng.normal(size=(1, n_leads, n_samples)).astype(np.float32),
        _ecg_like(n, n_leads, n_samples, seed),
    ]
    if real is not None and len(real):
        batches.append(np.asarray(real[:n], dtype=np.float32))
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = wrapped(torch.from_numpy(batch)).numpy()
            got = session.run(["probabilities"], {"ecg": batch})[0]
            worst = max(worst, float(np.max(np.abs(expected - got))))
    if not worst <= tolerance:
        raise ParityError(f"ONNX/torch probability mismatch {worst:.3g} > {tolerance:g} for {onnx_path}")
    return worst


def build_manifest(
    *,
    classes: tuple[str, ...],
    thresholds: dict[str, float],
    sha256: str,
    name: str = "diagnosis",
    version: str = "0.1.0",
    task: str = "diagnosis",
    description: str = "",
    trained_on: str = "",
    preprocessing: list[dict[str, Any]] | None = None,
    n_samples: int = 1000,
    fs_hz: float = 100.0,
) -> Manifest:
    return Manifest(
        name=name,
        version=version,
        task=task,
        file="model.onnx",
        sha256=sha256,
        input=ModelInput(name="ecg", leads=list(STANDARD_LEADS), fs_hz=fs_hz, n_samples=n_samples),
        preprocessing=[dict(step) for step in (preprocessing or DEFAULT_SPEC)],
        outputs={"probabilities": "probabilities"},
        classes=[
            ModelClass(code=c, display=SUPERCLASS_DISPLAY[c], snomed=SUPERCLASS_SNOMED[c][0]) for c in classes
        ],
        thresholds={c: round(float(thresholds[c]), 6) for c in classes},
        card="MODEL_CARD.md",
        description=description,
        trained_on=trained_on,
        created=datetime.now(timezone.utc).date().isoformat(),
    )


def write_manifest(manifest: Manifest, model_dir: Path) -> Path:
    path = Path(model_dir) / "manifest.json"
    # Round-trip through the validator so a file we write is a file the registry reads.
    Manifest.model_validate(json.loads(manifest.model_dump_json()))
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path


def export_model(
    model: nn.Module,
    model_dir: Path,
    *,
    classes: tuple[str, ...],
    thresholds: dict[str, float],
    real: np.ndarray | None = None,
    **manifest_fields: Any,
) -> dict[str, Any]:
    """Export, parity-check and describe one model directory; returns what was done."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / "model.onnx"
    model = model.eval()
    method = export_onnx(model, onnx_path)
    parity = check_parity(model, onnx_path, real=real)
    manifest = build_manifest(classes=classes, thresholds=thresholds, sha256=sha256_file(onnx_path), **manifest_fields)
    write_manifest(manifest, model_dir)
    return {
        "onnx_path": str(onnx_path),
        "export_method": method,
        "parity_max_abs_diff": parity,
        "onnx_bytes": onnx_path.stat().st_size,
        "sha256": manifest.sha256,
        "manifest": manifest.model_dump(mode="json"),
    }
