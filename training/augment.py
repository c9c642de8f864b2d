"""Online artefact augmentation, passed through the serving pipeline.

Real carts add noise that the model must not mistake for disease (seed 003's
"clean data bias": a loose electrode scored above a true MI). Each training
batch of preprocessed 100 Hz signals gets, per record and independently with
the probabilities in ``AugmentConfig``:

- amplitude scaling per lead (log-uniform gain; applied *before* the additive
  artefacts so it changes each lead's signal-to-noise ratio; the per-lead
  z-score would cancel a pure gain),
- Gaussian noise,
- baseline wander (1-3 sinusoids, 0.05-0.7 Hz, one shared drift with per-lead gains),
- powerline interference at 50 or 60 Hz (sampled at 100 Hz, 60 Hz aliases to 40 Hz),
- electrode-motion bursts (0.2-1.5 s of smoothed random-walk artefact in 1-3 leads),
- one lead gone flat (all zeros, as a disconnected lead reads after the pipeline).

Then the batch goes through the serving preprocessing (``inference.preprocess``:
band-pass and per-lead z-score; resampling is a no-op at 100 Hz), so the model
learns each artefact the way it looks after serving's own filters, never a raw
artefact that serving would have removed. Labels are unchanged: an artefact
added to a normal ECG is still a normal ECG.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np

from ecgbridge.inference.preprocess import DEFAULT_SPEC, Pipeline

__all__ = ["AugmentConfig", "Augmenter"]


@dataclass(frozen=True)
class AugmentConfig:
    fs: float = 100.0
    p_scale: float = 0.5
    scale_log_range: float = math.log(1.5)  # per-lead gain in [1/1.5, 1.5]
    p_noise: float = 0.5
    noise_max: float = 0.2  # sigma in units of the (z-scored) signal
    p_wander: float = 0.4
    wander_max: float = 1.0
    p_powerline: float = 0.2
    powerline_max: float = 0.3
    p_motion: float = 0.2
    motion_max: float = 2.0
    p_flat: float = 0.1

    def scaled(self, strength: float) -> AugmentConfig:
        """The same artefacts with every probability and amplitude multiplied by ``strength`` (probabilities capped at 1)."""

        def p(v: float) -> float:
            return min(1.0, v * strength)

        return AugmentConfig(
            fs=self.fs,
            p_scale=p(self.p_scale),
            scale_log_range=self.scale_log_range * strength,
            p_noise=p(self.p_noise),
            noise_max=self.noise_max * strength,
            p_wander=p(self.p_wander),
            wander_max=self.wander_max * strength,
            p_powerline=p(self.p_powerline),
            powerline_max=self.powerline_max * strength,
            p_motion=p(self.p_motion),
            motion_max=self.motion_max * strength,
            p_flat=p(self.p_flat),
        )

    def describe(self) -> str:
        return (
            f"per record, independently: per-lead gain x{math.exp(-self.scale_log_range):.2f}-{math.exp(self.scale_log_range):.2f} "
            f"(p {self.p_scale}), gaussian noise sigma <= {self.noise_max} (p {self.p_noise}), baseline wander 0.05-0.7 Hz "
            f"amplitude <= {self.wander_max} (p {self.p_wander}), powerline 50/60 Hz amplitude <= {self.powerline_max} "
            f"(p {self.p_powerline}), electrode-motion bursts 0.2-1.5 s amplitude <= {self.motion_max} in 1-3 leads "
            f"(p {self.p_motion}), one lead flat (p {self.p_flat}); then the serving pipeline (band-pass, z-score)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Augmenter:
    def __init__(self, config: AugmentConfig | None = None, preprocessing: list[dict[str, Any]] | None = None) -> None:
        self.config = config or AugmentConfig()
        self.pipeline = Pipeline.from_spec(preprocessing or DEFAULT_SPEC)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(N, leads, T) preprocessed signals -> augmented and re-preprocessed (same shape, float32)."""
        c = self.config
        x = np.array(x, dtype=np.float64, copy=True)
        n, leads, t = x.shape
        time_s = np.arange(t) / c.fs

        def pick(p: float) -> np.ndarray:
            return cast(np.ndarray, rng.random(n) < p)  # n is an int: an array, not the scalar overload

        m = pick(c.p_scale)
        if m.any():
            gains = np.exp(rng.uniform(-c.scale_log_range, c.scale_log_range, size=(int(m.sum()), leads, 1)))
            x[m] *= gains
        m = pick(c.p_noise)
        if m.any():
            sigma = rng.uniform(0.0, c.noise_max, size=(int(m.sum()), 1, 1))
            x[m] += sigma * rng.standard_normal((int(m.sum()), leads, t))
        for i in np.flatnonzero(pick(c.p_wander)):
            drift = np.zeros(t)
            for _ in range(int(rng.integers(1, 4))):
                f = rng.uniform(0.05, 0.7)
                drift += rng.uniform(0, c.wander_max) * np.sin(2 * math.pi * f * time_s + rng.uniform(0, 2 * math.pi))
            x[i] += rng.uniform(-1.0, 1.0, size=(leads, 1)) * drift[None]
        for i in np.flatnonzero(pick(c.p_powerline)):
            f = 50.0 if rng.random() < 0.5 else 60.0
            amp = rng.uniform(0, c.powerline_max)
            x[i] += (
                amp
                * rng.uniform(0.3, 1.0, size=(leads, 1))
                * np.sin(2 * math.pi * f * time_s + rng.uniform(0, 2 * math.pi))[None]
            )
        for i in np.flatnonzero(pick(c.p_motion)):
            for lead in rng.choice(leads, size=int(rng.integers(1, 4)), replace=False):
                length = int(rng.uniform(0.2, 1.5) * c.fs)
                start = int(rng.integers(0, max(t - length, 1)))
                walk = np.cumsum(rng.standard_normal(length))
                kernel = np.hanning(max(int(0.08 * c.fs), 3))
                walk = np.convolve(walk - walk.mean(), kernel / kernel.sum(), mode="same")
                walk = walk / (np.abs(walk).max() + 1e-9) * rng.uniform(0.3, c.motion_max)
                x[i, lead, start : start + length] += walk * np.hanning(length)
        for i in np.flatnonzero(pick(c.p_flat)):
            x[i, int(rng.integers(0, leads))] = 0.0
        y, _ = self.pipeline.apply(x, c.fs)
        return np.ascontiguousarray(y, dtype=np.float32)
