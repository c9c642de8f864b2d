"""The one preprocessing path shared by training and serving.

Each step is ``apply(signal, fs) -> (signal, fs)`` on an array of shape
(leads, samples) so the sampling rate always travels with the signal. A model's
manifest lists its steps by name (see ``STEPS``); training builds the same
``Pipeline`` from the same list, so the two can never drift apart.

The PTB-XL subset in ``shared/data`` was band-passed (0.5-40 Hz), z-scored per
lead and decimated to 100 Hz by its publisher; the default pipeline reproduces
that from raw millivolts at any sampling rate, and is (near) idempotent on data
that already went through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
from scipy import signal as sps

__all__ = [
    "Step",
    "Bandpass",
    "Resample",
    "FixLength",
    "ZScore",
    "Pipeline",
    "STEPS",
    "DEFAULT_SPEC",
]


class Step(Protocol):
    name: str

    def apply(self, x: np.ndarray, fs: float) -> tuple[np.ndarray, float]: ...

    def spec(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Bandpass:
    """Zero-phase Butterworth band-pass; removes baseline wander and mains/EMG noise."""

    low_hz: float = 0.5
    high_hz: float = 40.0
    order: int = 2
    name: str = "bandpass"

    def apply(self, x: np.ndarray, fs: float) -> tuple[np.ndarray, float]:
        nyquist = fs / 2.0
        high = min(self.high_hz, 0.95 * nyquist)
        sos = sps.butter(self.order, [self.low_hz / nyquist, high / nyquist], btype="band", output="sos")
        padlen = min(x.shape[-1] - 1, 3 * (2 * len(sos) + 1))
        if x.shape[-1] <= padlen or padlen < 1:
            return x.astype(np.float32), fs
        return sps.sosfiltfilt(sos, x, axis=-1, padlen=padlen).astype(np.float32), fs

    def spec(self) -> dict[str, Any]:
        return {"step": self.name, "low_hz": self.low_hz, "high_hz": self.high_hz, "order": self.order}


@dataclass(frozen=True)
class Resample:
    """Polyphase resampling to ``fs_hz`` (anti-aliased); exact for rational ratios."""

    fs_hz: float = 100.0
    name: str = "resample"

    def apply(self, x: np.ndarray, fs: float) -> tuple[np.ndarray, float]:
        if abs(fs - self.fs_hz) < 1e-9:
            return x.astype(np.float32), fs
        ratio = Fraction(self.fs_hz / fs).limit_denominator(1000)
        y = sps.resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)
        return y.astype(np.float32), float(self.fs_hz)

    def spec(self) -> dict[str, Any]:
        return {"step": self.name, "fs_hz": self.fs_hz}


@dataclass(frozen=True)
class FixLength:
    """Take the first ``n_samples`` samples, zero-padding at the end when shorter."""

    n_samples: int = 1000
    name: str = "fix_length"

    def apply(self, x: np.ndarray, fs: float) -> tuple[np.ndarray, float]:
        n = x.shape[-1]
        if n >= self.n_samples:
            return x[..., : self.n_samples].astype(np.float32), fs
        pad = np.zeros(x.shape[:-1] + (self.n_samples - n,), dtype=np.float32)
        return np.concatenate([x.astype(np.float32), pad], axis=-1), fs

    def spec(self) -> dict[str, Any]:
        return {"step": self.name, "n_samples": self.n_samples}


@dataclass(frozen=True)
class ZScore:
    """Per-lead standardisation; a flat lead stays all zeros instead of dividing by 0."""

    eps: float = 1e-6
    name: str = "zscore"

    def apply(self, x: np.ndarray, fs: float) -> tuple[np.ndarray, float]:
        mean = x.mean(axis=-1, keepdims=True)
        std = x.std(axis=-1, keepdims=True)
        safe = np.where(std > self.eps, std, 1.0)
        y = np.where(std > self.eps, (x - mean) / safe, 0.0)
        return y.astype(np.float32), fs

    def spec(self) -> dict[str, Any]:
        return {"step": self.name, "eps": self.eps}


STEPS: dict[str, type] = {
    "bandpass": Bandpass,
    "resample": Resample,
    "fix_length": FixLength,
    "zscore": ZScore,
}

#: The pipeline the baseline diagnosis model was trained with.
DEFAULT_SPEC: list[dict[str, Any]] = [
    {"step": "bandpass", "low_hz": 0.5, "high_hz": 40.0, "order": 2},
    {"step": "resample", "fs_hz": 100.0},
    {"step": "fix_length", "n_samples": 1000},
    {"step": "zscore", "eps": 1e-6},
]


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...]

    @classmethod
    def from_spec(cls, spec: list[dict[str, Any]]) -> Pipeline:
        steps = []
        for item in spec:
            params = dict(item)
            name = params.pop("step")
            if name not in STEPS:
                raise ValueError(f"unknown preprocessing step {name!r}; known: {sorted(STEPS)}")
            steps.append(STEPS[name](**params))
        return cls(tuple(steps))

    def apply(self, x: np.ndarray, fs: float) -> tuple[np.ndarray, float]:
        x = np.nan_to_num(np.asarray(x, dtype=np.float32))
        for step in self.steps:
            x, fs = step.apply(x, fs)
        return x, fs

    def spec(self) -> list[dict[str, Any]]:
        return [s.spec() for s in self.steps]
