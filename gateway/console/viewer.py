"""The ECG viewer's data: a message's samples, study facts and stored heatmaps, as JSON.

The gateway cannot run models, so the heatmaps are what the worker stored with the analysis
(the ``heatmaps`` artifact, see ``ecgbridge.worker.jobs.save_heatmaps``); the samples are
read from the stored bytes with the same reader the worker uses. Samples are patient data:
every call is audited (``view_ecg``), and nothing but ids and error types is logged.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request

from ecgbridge.core.accounts import Principal, Role
from ecgbridge.core.retention import PRUNED_DETAIL, is_pruned
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import EcgBridgeError
from ecgbridge.gateway.console.auth import require
from ecgbridge.gateway.console.context import context_of
from ecgbridge.mapping.readers import read_ecg_bytes

__all__ = ["router", "viewer_payload", "ViewerError", "MAX_SECONDS", "MAX_FS", "HEATMAPS_KIND"]

log = logging.getLogger("ecgbridge.console")

router = APIRouter()

#: Only the first 10 s are served (what a 12-lead page and the models show) ...
MAX_SECONDS = 10.0
#: ... at no more than 500 Hz (above that the samples are resampled down by an integer factor),
#: so one answer holds at most 5000 samples per lead.
MAX_FS = 500.0
#: The artifact kind the worker stores the heatmaps under.
HEATMAPS_KIND = "heatmaps"
_DECIMALS = 4  # 0.1 uV: far below any ECG's resolution


class ViewerError(Exception):
    """Why a message cannot be shown: an HTTP status and a detail for the problem document."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _samples(row: np.ndarray, decimals: int = _DECIMALS) -> list[float | None]:
    """One lead as JSON numbers, rounded; a non-finite sample (a gap) is null."""
    rounded = np.round(row.astype(np.float64), decimals)
    values: list[float | None] = rounded.tolist()
    if not np.isfinite(rounded).all():
        values = [v if v is not None and math.isfinite(v) else None for v in values]
    return values


def _downsample(signals: np.ndarray, factor: int) -> np.ndarray:
    """Every ``factor``-th sample after an anti-aliasing filter; gaps (NaN) stay gaps."""
    if factor <= 1:
        return signals
    from scipy.signal import resample_poly

    x = np.asarray(signals, dtype=np.float64)
    finite = np.isfinite(x)
    out = np.asarray(resample_poly(np.where(finite, x, 0.0), 1, factor, axis=-1))
    n = out.shape[-1]
    gaps = ~finite[:, ::factor][:, :n]
    out[gaps] = np.nan
    return out


def _heatmaps(store: MessageStore, message_id: str) -> dict[str, Any] | None:
    raw = store.artifact(message_id, HEATMAPS_KIND)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        log.warning("the heatmaps artifact of message %s is not JSON", message_id)
        return None
    return value if isinstance(value, dict) else None


def _result_flags(store: MessageStore, message_id: str) -> list[str]:
    row = store.get_result(message_id)
    result = row.result if row is not None else None
    flags = result.get("quality_flags") if isinstance(result, dict) else None
    return [str(f) for f in flags] if isinstance(flags, list) else []


def viewer_payload(store: MessageStore, message_id: str) -> dict[str, Any]:
    """What the viewer draws for one message; raises :class:`ViewerError` (404, 410 pruned, 422).

    Shape::

        {"message_id": str,
         "fs": float,                 # samples per second of the samples below
         "source_fs": float,          # of the recording
         "units": "mV",               # as the reader reports ("zscore" for a source not in mV)
         "leads": [str, ...],         # in the recording's order
         "samples": {lead: [float | null, ...]},   # 4 decimals; null = gap
         "n_samples": int, "duration_s": float,    # of the samples served
         "recording_s": float, "truncated": bool,  # the whole recording; whether it was cut
         "limits": {"max_seconds": 10.0, "max_fs": 500.0},
         "study": {"source_format": str, "device": str | null, "state": str,
                   "flags": [str, ...]},  # reader flags, then the analysis' quality flags
         "heatmaps": {...} | null}    # the worker's artifact as stored

    Patient identity (name, id, birth date) and acquisition time are never part of it.
    """
    row = store.get(message_id)
    if row is None:
        raise ViewerError(404, f"no message {message_id}")
    if is_pruned(row):
        raise ViewerError(410, PRUNED_DETAIL)
    try:
        data = store.read_blob(row.blob_sha256)
    except OSError as exc:
        raise ViewerError(404, "the message's bytes are no longer in the blob store") from exc
    try:
        ecg = read_ecg_bytes(data, hint=row.source)
    except (EcgBridgeError, ValueError) as exc:
        raise ViewerError(422, str(exc)) from exc
    except Exception as exc:  # a reader crash on odd bytes: still the bytes' fault, not the viewer's
        log.warning("reading message %s for the viewer failed: %s", message_id, type(exc).__name__)
        raise ViewerError(422, f"the ECG reader failed: {type(exc).__name__}: {exc}") from exc

    total = int(ecg.signals.shape[1])
    keep = min(total, int(round(MAX_SECONDS * ecg.fs)))
    factor = max(1, math.ceil(ecg.fs / MAX_FS - 1e-9))
    signals = _downsample(np.asarray(ecg.signals[:, :keep]), factor)
    fs = float(ecg.fs) / factor
    n = int(signals.shape[1])
    flags = list(dict.fromkeys([*ecg.flags, *_result_flags(store, message_id)]))
    return {
        "message_id": message_id,
        "fs": fs,
        "source_fs": float(ecg.fs),
        "units": ecg.units,
        "leads": list(ecg.leads),
        "samples": {lead: _samples(signals[i]) for i, lead in enumerate(ecg.leads)},
        "n_samples": n,
        "duration_s": round(n / fs, 6),
        "recording_s": round(ecg.duration_s, 6),
        "truncated": keep < total,
        "limits": {"max_seconds": MAX_SECONDS, "max_fs": MAX_FS},
        "study": {
            "source_format": ecg.source_format,
            "device": ecg.study.device,
            "state": row.state,
            "flags": flags,
        },
        "heatmaps": _heatmaps(store, message_id),
    }


@router.get("/api/messages/{message_id}/ecg", tags=["viewer"])
def message_ecg(message_id: str, request: Request, who: Principal = Depends(require(Role.VIEWER))) -> dict[str, Any]:
    """The message's ECG samples (first 10 s, at most 500 Hz), study facts and heatmaps for the viewer."""
    ctx = context_of(request)
    try:
        payload = viewer_payload(ctx.store, message_id)
    except ViewerError as exc:
        ctx.audit(who, "view_ecg", request, target=message_id, outcome="failed", detail={"status": exc.status})
        raise HTTPException(exc.status, exc.detail) from exc
    ctx.audit(who, "view_ecg", request, target=message_id)
    return payload
