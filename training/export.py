"""Torch -> ONNX model directory: ``model.onnx`` + ``manifest.json``, checked for parity.

The head is part of the exported graph, so serving never re-implements it. For a
model with a global-average-pool head (``features`` + ``classifier``, e.g.
``ResNetSE1d`` and ``Cnn1d``) or an ensemble of them, ``ServingGraph`` computes,
in one ONNX call:

- ``cams`` (N, classes, T'): class activation maps ``W_k . f_t`` from the last
  conv features and the linear head (mean over ensemble members). For this head
  CAM equals Grad-CAM, so no backward pass is needed;
- ``logits`` (N, classes): ``mean_t cams + bias`` (member mean), uncalibrated;
- ``probabilities`` (N, classes): ``sigmoid((logits - offset) / T)``, with the
  per-class calibration constants (``training.calibration``) baked into the graph
  (``offset = 0, T = 1`` when uncalibrated).

A model without that head exports ``probabilities`` only (sigmoid of its logits).
The manifest (validated by ``inference.models.Manifest``) carries everything the
serving side needs: lead order, sampling rate, the preprocessing spec the model
was trained with, output names by role, classes with SNOMED CT codes,
thresholds, risk tiers, calibration metadata and the file's sha256.

Export uses torch's default (dynamo / ``torch.export``) exporter with a dynamic
batch dimension; ``export_onnx`` falls back to the legacy TorchScript exporter
only if that fails, and reports which one it used.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ecgbridge.inference.models import Manifest, ModelClass, ModelInput, sha256_file
from ecgbridge.inference.preprocess import DEFAULT_SPEC, Pipeline
from ecgbridge.mapping.codes import SUPERCLASS_DISPLAY, SUPERCLASS_SNOMED
from ecgbridge.mapping.ecg import STANDARD_LEADS

__all__ = [
    "OPSET",
    "PARITY_TOLERANCE",
    "ParityError",
    "ProbabilityModel",
    "ServingGraph",
    "as_serving_graph",
    "export_onnx",
    "parity_by_output",
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


def _has_cam_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, "features", None), nn.Module) and isinstance(
        getattr(model, "classifier", None), nn.Linear
    )


class ServingGraph(nn.Module):
    """Members (GAP + linear head) -> (probabilities, cams, logits); see the module docstring."""

    output_names: tuple[str, ...] = ("probabilities", "cams", "logits")
    temperature: torch.Tensor  # buffers (registered in __init__)
    offset: torch.Tensor

    def __init__(
        self,
        members: list[nn.Module] | nn.Module,
        temperature: Any = None,
        offset: Any = None,
    ) -> None:
        super().__init__()
        members = list(members) if isinstance(members, (list, tuple, nn.ModuleList)) else [members]
        if not members or not all(_has_cam_head(m) for m in members):
            raise TypeError("ServingGraph needs models with a `features` module and a linear `classifier`")
        self.members = nn.ModuleList(members)
        n_classes = cast(nn.Linear, members[0].classifier).out_features  # _has_cam_head checked it is one
        t = (
            torch.ones(n_classes)
            if temperature is None
            else torch.as_tensor(np.asarray(temperature), dtype=torch.float32)
        )
        o = torch.zeros(n_classes) if offset is None else torch.as_tensor(np.asarray(offset), dtype=torch.float32)
        self.register_buffer("temperature", t.reshape(n_classes).clone())
        self.register_buffer("offset", o.reshape(n_classes).clone())

    def forward(self, ecg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cams, logits = [], []
        for member in self.members:
            classifier = cast(nn.Linear, member.classifier)  # members have a CAM head (checked in __init__)
            features = cast(nn.Module, member.features)(ecg)  # (N, C, T')
            cam = torch.matmul(classifier.weight, features)  # (K, C) @ (N, C, T') -> (N, K, T')
            cams.append(cam)
            logits.append(cam.mean(dim=-1) + classifier.bias)
        if len(cams) == 1:
            cam, logit = cams[0], logits[0]
        else:
            cam = torch.stack(cams).mean(dim=0)
            logit = torch.stack(logits).mean(dim=0)
        probabilities = torch.sigmoid((logit - self.offset) / self.temperature)
        return probabilities, cam, logit


def as_serving_graph(model: nn.Module) -> nn.Module:
    """ServingGraph when the model has a CAM-capable head, else a plain ProbabilityModel."""
    if isinstance(model, (ServingGraph, ProbabilityModel)):
        return model
    if _has_cam_head(model):
        return ServingGraph([model])
    return ProbabilityModel(model)


def _output_names(wrapped: nn.Module) -> list[str]:
    return list(wrapped.output_names) if isinstance(wrapped, ServingGraph) else ["probabilities"]


def _torch_outputs(wrapped: nn.Module, batch: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = wrapped(torch.from_numpy(batch))
    values = out if isinstance(out, tuple) else (out,)
    return {name: v.numpy() for name, v in zip(_output_names(wrapped), values)}


def _as_probability_model(model: nn.Module) -> nn.Module:
    return as_serving_graph(model)


def export_onnx(
    model: nn.Module,
    onnx_path: Path,
    *,
    n_leads: int = len(STANDARD_LEADS),
    n_samples: int = 1000,
    opset: int = OPSET,
) -> str:
    """Write ``model`` to ``onnx_path``; returns the exporter used.

    ``model`` is a logits model (wrapped by ``as_serving_graph``) or a ``ServingGraph``.
    Input ``ecg`` (N, leads, samples) float32 with N dynamic; outputs
    ``probabilities`` (+ ``cams``, ``logits`` for a CAM-capable head).
    """
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = as_serving_graph(model).eval()
    names = _output_names(wrapped)
    example = (torch.zeros(2, n_leads, n_samples, dtype=torch.float32),)
    try:
        torch.onnx.export(
            wrapped,
            example,
            str(onnx_path),
            input_names=["ecg"],
            output_names=names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
        return f"torch.onnx.export(dynamo=True, dynamic_shapes=batch, opset={opset})"
    except Exception as exc:
        log.warning("dynamo ONNX export failed (%s); falling back to dynamo=False", exc)
        torch.onnx.export(
            wrapped,
            example,
            str(onnx_path),
            input_names=["ecg"],
            output_names=names,
            opset_version=opset,
            dynamo=False,
            dynamic_axes={"ecg": {0: "batch"}, **{name: {0: "batch"} for name in names}},
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
        beat = np.exp(-(((phase - 0.2) / 0.015) ** 2)) + 0.3 * np.exp(-(((phase - 0.45) / 0.05) ** 2))
        gains = rng.normal(0, 1, size=(n_leads, 1))
        x = gains * beat[None] + 0.05 * rng.normal(size=(n_leads, n_samples))
        out.append(pipeline.apply(x, fs)[0])
    return np.stack(out).astype(np.float32)


def parity_by_output(
    torch_model: nn.Module,
    onnx_path: Path,
    n: int = 8,
    *,
    real: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Max |torch - onnx| per output over random, ECG-like and (if given) real inputs.

    ``torch_model`` is the logits model or the wrapped graph (``ServingGraph`` /
    ``ProbabilityModel``). Batches of 1 and ``n`` are both run, so the dynamic
    batch axis is exercised. Only outputs both sides have are compared.
    """
    import onnxruntime as ort

    wrapped = as_serving_graph(torch_model).eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape
    n_leads, n_samples = int(shape[1]), int(shape[2])
    onnx_names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    batches = [
        rng.normal(size=(n, n_leads, n_samples)).astype(np.float32),
        rng.normal(size=(1, n_leads, n_samples)).astype(np.float32),
        _ecg_like(n, n_leads, n_samples, seed),
    ]
    if real is not None and len(real):
        batches.append(np.asarray(real[:n], dtype=np.float32))
    worst: dict[str, float] = {}
    for batch in batches:
        expected = _torch_outputs(wrapped, batch)
        names = [name for name in expected if name in onnx_names]
        got = dict(zip(names, session.run(names, {"ecg": batch})))
        for name in names:
            if got[name].shape != expected[name].shape:
                worst[name] = float("inf")
                continue
            worst[name] = max(worst.get(name, 0.0), float(np.max(np.abs(expected[name] - got[name]))))
    return worst


def check_parity(
    torch_model: nn.Module,
    onnx_path: Path,
    n: int = 8,
    *,
    real: np.ndarray | None = None,
    tolerance: float = PARITY_TOLERANCE,
    seed: int = 0,
) -> float:
    """Max |torch - onnx| over every shared output (probabilities, cams, logits); raises above ``tolerance``."""
    diffs = parity_by_output(torch_model, onnx_path, n, real=real, seed=seed)
    if "probabilities" not in diffs:
        raise ParityError(f"{onnx_path} has no `probabilities` output to compare")
    worst = max(diffs.values())
    if not worst <= tolerance:
        detail = ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
        raise ParityError(f"ONNX/torch mismatch ({detail}) > {tolerance:g} for {onnx_path}")
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
    outputs: dict[str, str] | None = None,
    tiers: dict[str, dict[str, float]] | None = None,
    calibration: dict[str, Any] | None = None,
    architecture: dict[str, Any] | None = None,
    model_classes: list[ModelClass] | None = None,
) -> Manifest:
    """The manifest of an exported graph; ``model_classes`` default to the PTB-XL superclasses of ``classes``."""
    return Manifest(
        name=name,
        version=version,
        task=task,
        file="model.onnx",
        sha256=sha256,
        input=ModelInput(name="ecg", leads=list(STANDARD_LEADS), fs_hz=fs_hz, n_samples=n_samples),
        preprocessing=[dict(step) for step in (preprocessing or DEFAULT_SPEC)],
        outputs=dict(outputs or {"probabilities": "probabilities"}),
        classes=model_classes
        or [ModelClass(code=c, display=SUPERCLASS_DISPLAY[c], snomed=SUPERCLASS_SNOMED[c][0]) for c in classes],
        thresholds={c: round(float(thresholds[c]), 6) for c in classes},
        tiers=tiers,
        calibration=calibration,
        architecture=architecture,
        card="MODEL_CARD.md",
        description=description,
        trained_on=trained_on,
        created=datetime.now(UTC).date().isoformat(),
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
    """Export, parity-check and describe one model directory; returns what was done.

    ``model`` is a logits model or a ``ServingGraph`` (ensemble, calibration).
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / "model.onnx"
    wrapped = as_serving_graph(model.eval()).eval()
    method = export_onnx(wrapped, onnx_path)
    check_parity(wrapped, onnx_path, real=real)
    diffs = parity_by_output(wrapped, onnx_path, real=real)
    names = _output_names(wrapped)
    manifest_fields.setdefault("outputs", {name: name for name in names})
    manifest = build_manifest(classes=classes, thresholds=thresholds, sha256=sha256_file(onnx_path), **manifest_fields)
    write_manifest(manifest, model_dir)
    return {
        "onnx_path": str(onnx_path),
        "export_method": method,
        "parity_max_abs_diff": diffs["probabilities"],
        "parity": diffs,
        "onnx_bytes": onnx_path.stat().st_size,
        "sha256": manifest.sha256,
        "manifest": manifest.model_dump(mode="json"),
    }
