"""Signal clean-up the vendor readers share.

Why: carts that print a 1 mV calibration pulse also store it, after the recording,
in every lead at once (Philips' 11 s strips end with about 0.4 s of it, and so do
aECG files converted from them). It is not the patient's signal: a model would see a
square wave, and a quality gate a flat line. It is cut off, and the reader flags it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["trim_calibration", "MAX_TRAILER_S"]

#: Longest trailer that is cut off (seconds).
MAX_TRAILER_S = 1.0


def trim_calibration(by_lead: dict[str, np.ndarray], fs: float, tolerance: float = 0.0) -> int:
    """Cut a trailing calibration pulse in place; returns the number of samples cut.

    The trailer is the run at the end where all leads agree (their spread is at most
    ``tolerance``, in the signal's units: 0 for raw counts, a few uV for a file that
    was filtered after the pulse was added). It is cut only when it holds both
    zeros and a step larger than ten times the tolerance (a pulse, not a lost
    signal), is at most :data:`MAX_TRAILER_S` long and something precedes it.
    """
    if len(by_lead) < 2:
        return 0
    stack = np.stack([np.asarray(v) for v in by_lead.values()])
    same = (stack.max(axis=0) - stack.min(axis=0)) <= tolerance
    differing = np.flatnonzero(~same)
    if differing.size == 0:
        return 0
    start = int(differing[-1]) + 1
    trailer = stack[0, start:]
    if trailer.size == 0 or trailer.size > MAX_TRAILER_S * fs:
        return 0
    if not (np.any(np.abs(trailer) <= tolerance) and np.any(np.abs(trailer) > 10 * tolerance)):
        return 0
    for lead in by_lead:
        by_lead[lead] = by_lead[lead][:start]
    return int(stack.shape[1] - start)
