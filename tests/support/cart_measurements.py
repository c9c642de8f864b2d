"""The acquiring cart's own global measurements, read from a DICOM ECG (test support).

Why: tests and ``bench/features.py`` hold :func:`ecgbridge.inference.features.measure`
against what the cart itself measured (docs/measurements.md); the product never reads
the cart's values, so this reader is not shipped.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["cart_measurements"]

#: SCP-ECG measurement codes (DICOM CID 3687 family, as Mortara writes them) -> our keys.
_CART_CODES: dict[str, str] = {
    "5.10.2.1-3": "rr_interval",
    "5.10.2.1-5": "pp_interval",
    "5.13.5-7": "pr_interval",
    "5.13.5-9": "qrs_duration",
    "5.13.5-11": "qt_interval",
    "5.10.2.5-5": "qtc_interval",
    "5.10.3-11": "p_axis",
    "5.10.3-13": "qrs_axis",
    "5.10.3-15": "t_axis",
}
_CART_MEANINGS: dict[str, str] = {
    "rr interval": "rr_interval",
    "pp interval": "pp_interval",
    "pr interval": "pr_interval",
    "qrs duration": "qrs_duration",
    "qt interval": "qt_interval",
    "qtc interval": "qtc_interval",
    "p axis": "p_axis",
    "qrs axis": "qrs_axis",
    "t axis": "t_axis",
    "heart rate": "heart_rate",
    "ventricular rate": "heart_rate",
}


def cart_measurements(ds: Any) -> dict[str, float]:
    """The acquiring cart's own global measurements from a DICOM ECG's WaveformAnnotationSequence.

    Numeric annotations are matched by SCP-ECG code (else by code meaning); a value of 0
    (how Mortara writes "not measured", e.g. the PP interval) is left out. When the cart
    gives an RR interval but no rate, ``heart_rate`` is 60 000 / RR. Units: ms, deg, /min.
    """
    out: dict[str, float] = {}
    for item in getattr(ds, "WaveformAnnotationSequence", None) or []:
        if "NumericValue" not in item or "ConceptNameCodeSequence" not in item:
            continue
        code = item.ConceptNameCodeSequence[0]
        key = _CART_CODES.get(str(getattr(code, "CodeValue", "")))
        if key is None:
            key = _CART_MEANINGS.get(str(getattr(code, "CodeMeaning", "")).strip().lower())
        if key is None:
            continue
        try:
            value = float(item.NumericValue)
        except (TypeError, ValueError):
            continue
        if value == 0 or not math.isfinite(value) or key in out:
            continue
        out[key] = value
    if "heart_rate" not in out and out.get("rr_interval"):
        out["heart_rate"] = 60000.0 / out["rr_interval"]
    return out
