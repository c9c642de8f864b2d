"""Diagnosis model throughput on one CPU core: ONNX Runtime vs PyTorch, model + CAM, batch 1 and 32.

Both sides compute the same graph (``training.export.ServingGraph``: class
activation maps, member-mean logits, calibrated probabilities) on preprocessed
inputs (12 x 1000 at 100 Hz); the preprocessing of a raw 500 Hz ECG
(``inference.preprocess``) is timed separately. ONNX Runtime runs the shipped
``model.onnx`` with one intra-op and one inter-op thread (as the worker does);
PyTorch runs with ``torch.set_num_threads(1)``. The torch module is rebuilt from
the manifest's ``architecture`` with random weights unless ``--checkpoint`` gives
the training run's ``model.pt`` (speed does not depend on the weights; with the
checkpoint the two outputs are also compared).

    python -m bench.inference [--model DIR (default: the registry's "diagnosis")] [--checkpoint RUN/model.pt] [--seconds 3]

A manifest without ``architecture`` (the 0.1.0 baseline) is taken to be the CNN when its
description says so, else the ResNet-SE at width 32; ``--checkpoint`` overrides both.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ecgbridge.inference.models import ModelRegistry, load_manifest
from ecgbridge.inference.preprocess import Pipeline


def _rate(fn: Callable[[], None], batch: int, seconds: float) -> tuple[float, float]:
    """(ECGs per second, ms per call) over at least ``seconds`` after a warm-up."""
    for _ in range(3):
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and calls >= 5:
            break
    return calls * batch / elapsed, 1000.0 * elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped 'diagnosis')")
    parser.add_argument("--checkpoint", type=Path, default=None, help="training run's model.pt (optional)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing window per cell")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()

    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort
    import torch

    from ecgbridge.training.export import ServingGraph
    from ecgbridge.training.train import build_model

    if args.model is None:
        args.model = ModelRegistry().available()["diagnosis"]
    manifest = load_manifest(args.model)
    guessed = "cnn" if "cnn" in manifest.description.lower() else "resnet_se"
    arch = manifest.architecture or {"arch": guessed, "width": 32, "dropout": 0.3, "members": 1}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False) if args.checkpoint else None
    if state is not None:
        arch = {
            **arch,
            "arch": state["arch"],
            "width": state["width"],
            "dropout": state["dropout"],
            "members": len(state["members"]),
        }
    members = [build_model(arch["arch"], width=arch["width"], dropout=arch["dropout"]) for _ in range(arch["members"])]
    temperature = offset = None
    if manifest.calibration:
        temperature = [manifest.calibration["temperature"][c.code] for c in manifest.classes]
        offset = [manifest.calibration["offset"][c.code] for c in manifest.classes]
    weights = "random weights (same shapes)"
    if state is not None:
        for m, sd in zip(members, state["members"]):
            m.load_state_dict(sd)
        weights = f"weights from {args.checkpoint}"
    graph = ServingGraph(members, temperature=temperature, offset=offset).eval()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(args.model / manifest.file), options, providers=["CPUExecutionProvider"])
    names = list(manifest.outputs.values())
    leads, n = len(manifest.input.leads), manifest.input.n_samples

    rng = np.random.default_rng(0)
    pipeline = Pipeline.from_spec(manifest.preprocessing)
    raw = rng.normal(size=(leads, int(10 * 500))).astype(np.float32)
    pre_rate, pre_ms = _rate(lambda: pipeline.apply(raw, 500.0), 1, args.seconds)

    print(
        f"model {manifest.name} {manifest.version} ({arch['arch']}, {arch['members']} member(s), "
        f"{arch.get('parameters', sum(p.numel() for p in graph.parameters())):,} parameters); outputs {', '.join(names)}"
    )
    print(f"torch {torch.__version__} (1 thread, {weights}); onnxruntime {ort.__version__} (1 intra-op thread)")
    print(f"preprocessing a raw 500 Hz 10 s ECG: {pre_ms:.2f} ms per ECG ({pre_rate:.0f} ECG/s)\n")
    print(f"{'runtime':<13} {'batch':>5} {'ECG/s':>9} {'ms/ECG':>8} {'ms/call':>8}")
    worst = 0.0
    for batch in args.batches:
        x = rng.normal(size=(batch, leads, n)).astype(np.float32)
        feeds = {manifest.input.name: x}
        ort_rate, ort_ms = _rate(lambda: session.run(names, feeds), batch, args.seconds)
        xt = torch.from_numpy(x)

        def run_torch() -> None:
            with torch.inference_mode():
                graph(xt)

        pt_rate, pt_ms = _rate(run_torch, batch, args.seconds)
        print(f"{'onnxruntime':<13} {batch:>5} {ort_rate:>9.1f} {1000 / ort_rate:>8.2f} {ort_ms:>8.2f}")
        print(f"{'pytorch':<13} {batch:>5} {pt_rate:>9.1f} {1000 / pt_rate:>8.2f} {pt_ms:>8.2f}")
        if args.checkpoint is not None:
            with torch.inference_mode():
                ref = graph(xt)
            got = session.run(names, feeds)
            by_name = dict(zip(ServingGraph.output_names, ref))
            worst = max(
                [worst] + [float(np.max(np.abs(by_name[nm].numpy() - g))) for nm, g in zip(names, got) if nm in by_name]
            )
    if args.checkpoint is not None:
        print(f"\nmax |onnx - torch| over all outputs: {worst:.2e}")


if __name__ == "__main__":
    main()
