"""Signal-quality gate: flags that travel with every result.

A flag does not stop the analysis; it tells the reader what the model saw. The
checks are deliberately simple here (flat, clipped, implausible amplitude,
short); the noise-robust gate comes with the full models.
"""

from __future__ import annotations

import numpy as np

from mapping.ecg import Ecg

__all__ = ["quality_flags"]


def quality_flags(ecg: Ecg) -> tuple[str, ...]:
    flags: list[str] = []
    x = ecg.signals
    if ecg.duration_s < 8.0:
        flags.append(f"short_recording:{ecg.duration_s:.1f}s")
    std = x.std(axis=1)
    flat = [lead for lead, s in zip(ecg.leads, std) if s < 1e-3]
    if flat:
        flags.append("flat_leads:" + ",".join(flat))
    peak = np.abs(x).max(axis=1)
    if ecg.units == "mV":
        huge = [lead for lead, p in zip(ecg.leads, peak) if p > 15.0]
        if huge:
            flags.append("implausible_amplitude:" + ",".join(huge))
    clipped = []
    for lead, row in zip(ecg.leads, x):
        top = row.max()
        if top > 0 and np.mean(row >= top - 1e-6) > 0.02:
            clipped.append(lead)
    if clipped:
        flags.append("clipped_leads:" + ",".join(clipped))
    return tuple(flags)
