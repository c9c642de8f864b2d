"""Severity triage: a triage model's cumulative outputs -> one severity tier.

A triage model (manifest ``task: "triage"``) is served like any multi-label model: one
sigmoid probability and one threshold per output. Its outputs are *cumulative ordinal*
("the ECG is at least this severe"), in order of increasing severity:

    4-tier model: abnormal  (tier >= minor_abnormality)
                  major     (tier >= major_nonurgent)
                  urgent    (tier == urgent)
    3-tier model: abnormal  (tier >= abnormal_nonurgent)
                  urgent    (tier == urgent)

The tiers themselves (and the SCP-ECG / SNOMED CT tables that define them) are in
``mapping.codes`` (``SEVERITY3``, ``SEVERITY4``).

Decoding rule ("worst flag wins"): the tier is the most severe level whose output is
present (probability >= its threshold); normal when none is. The outputs are not forced
to be monotone first: an ``urgent`` output above its threshold makes the ECG urgent even
when ``abnormal`` is below its own, so an urgent flag is never hidden by a lower output.
This mirrors the labelling rule (an ECG's tier is its worst statement's tier). A 4-tier
model gives both scales: its 3-tier result merges minor and major
(``mapping.codes.SEVERITY4_TO_3``).

``LoadedModel.run`` calls ``severity_extra`` for triage models and puts the result into
``ModelOutput.extra``: ``severity`` (3-tier code), ``severity_display``, ``severity4``
and ``severity4_display`` (4-tier models only), and ``severity_rule``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ecgbridge.mapping.codes import SEVERITY3, SEVERITY4, SEVERITY4_DISPLAY, SEVERITY4_TO_3, SEVERITY_DISPLAY
from ecgbridge.mapping.ecg import Finding, ModelOutput

__all__ = [
    "TRIAGE_OUTPUTS_3",
    "TRIAGE_OUTPUTS_4",
    "TRIAGE_OUTPUT_DISPLAY",
    "DECODING_RULE",
    "decode_levels",
    "severity_extra",
    "severity_of",
]

#: Output codes (cumulative, least to most severe) of a 3-tier and a 4-tier triage model.
TRIAGE_OUTPUTS_3: tuple[str, ...] = ("abnormal", "urgent")
TRIAGE_OUTPUTS_4: tuple[str, ...] = ("abnormal", "major", "urgent")

TRIAGE_OUTPUT_DISPLAY: dict[str, str] = {
    "abnormal": "Abnormal ECG (any tier above normal)",
    "major": "Major abnormality or urgent",
    "urgent": "Urgent ECG",
}

DECODING_RULE = (
    "worst flag wins: the tier is the most severe cumulative output at or above its threshold "
    "(abnormal < major < urgent); normal when none is"
)


def decode_levels(probabilities: np.ndarray, thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Levels (0 = normal ... K) from cumulative probabilities (N, K) or (K,) and K thresholds.

    Level ``j + 1`` for the most severe output ``j`` with ``p_j >= threshold_j``; 0 if none.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    single = p.ndim == 1
    p = p.reshape(1, -1) if single else p
    thr = np.asarray(thresholds, dtype=np.float64).reshape(1, -1)
    if p.shape[1] != thr.shape[1]:
        raise ValueError(f"{p.shape[1]} outputs but {thr.shape[1]} thresholds")
    flagged = p >= thr
    k = p.shape[1]
    # index of the last flagged column + 1, or 0
    last = np.where(flagged.any(axis=1), k - np.argmax(flagged[:, ::-1], axis=1), 0)
    return last[0] if single else last


def _scale(codes: Sequence[str]) -> str:
    if tuple(codes) == TRIAGE_OUTPUTS_4:
        return "severity4"
    if tuple(codes) == TRIAGE_OUTPUTS_3:
        return "severity3"
    raise ValueError(
        f"a triage model's outputs must be {list(TRIAGE_OUTPUTS_3)} or {list(TRIAGE_OUTPUTS_4)}, got {list(codes)}"
    )


def severity_extra(findings: Sequence[Finding]) -> dict[str, Any]:
    """The ``extra`` entries of a triage result, from its findings (present = at/above threshold)."""
    codes = [f.code for f in findings]
    scale = _scale(codes)
    present = [bool(f.present) for f in findings]
    level = 0
    for j, flag in enumerate(present):
        if flag:
            level = j + 1
    extra: dict[str, Any] = {"severity_rule": DECODING_RULE}
    if scale == "severity4":
        tier4 = SEVERITY4[level]
        tier3 = SEVERITY3[SEVERITY4_TO_3[level]]
        extra["severity4"] = tier4
        extra["severity4_display"] = SEVERITY4_DISPLAY[tier4]
    else:
        tier3 = SEVERITY3[level]
    extra["severity"] = tier3
    extra["severity_display"] = SEVERITY_DISPLAY[tier3]
    return extra


def severity_of(output: ModelOutput) -> str:
    """3-tier severity code of a triage ``ModelOutput`` (from ``extra`` or, failing that, its findings)."""
    if output.task != "triage":
        raise ValueError(f"not a triage result: task {output.task!r}")
    return str(output.extra.get("severity") or severity_extra(output.findings)["severity"])
