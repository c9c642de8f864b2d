"""Zero-phase Butterworth filtering, shared by the quality gate and the measurements.

Both filter every ECG (the gate to find noise, wander and beats; the measurements to
delineate), so they use one filter design with one cache of second-order sections, and
the analysis hands them one :class:`~inference.features.SignalViews` so that the QRS
fiducials are found once per ECG (``inference.pipeline``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import cast

import numpy as np
from scipy.signal import butter, sosfiltfilt

__all__ = ["butter_sos", "zero_phase"]


@lru_cache(maxsize=128)
def butter_sos(fs: float, lo: float | None, hi: float | None, order: int) -> np.ndarray | None:
    """Second-order sections of a Butterworth high-, low- or band-pass; None when there is nothing to do.

    A low-pass edge at or above 90 % of Nyquist is dropped (a 100 Hz low-pass on a 100 Hz
    recording would be a no-op filter with a numerically poor design).
    """
    nyq = fs / 2.0
    if hi is not None and hi >= 0.9 * nyq:
        hi = None
    if lo is not None and hi is not None:
        return cast(np.ndarray, butter(order, [lo, hi], btype="bandpass", fs=fs, output="sos"))
    if lo is not None:
        return cast(np.ndarray, butter(order, lo, btype="highpass", fs=fs, output="sos"))
    if hi is not None:
        return cast(np.ndarray, butter(order, hi, btype="lowpass", fs=fs, output="sos"))
    return None


def zero_phase(
    x: np.ndarray, fs: float, lo: float | None, hi: float | None, order: int = 2, *, padlen: int | None = None
) -> np.ndarray:
    """``x`` (..., samples) filtered forward and backward (no phase shift: intervals keep their timing).

    ``padlen`` None is scipy's default padding; the measurements pass a longer one.
    """
    sos = butter_sos(float(fs), lo, hi, order)
    if sos is None:
        return x
    if padlen is None:
        return cast(np.ndarray, sosfiltfilt(sos, x, axis=-1))
    return cast(np.ndarray, sosfiltfilt(sos, x, axis=-1, padlen=padlen))
