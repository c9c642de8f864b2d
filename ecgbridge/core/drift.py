"""Drift: are this week's ECGs, and what the models say about them, like those of the reference weeks?

Each analysis records what the ECG looked like (:func:`record_ecg_stats`, the ``ecg_stats``
table: sampling rate, leads, duration, the cart's manufacturer / model, the file format, a
robust amplitude, the quality flags; no patient data) beside the result's findings. The
report compares each week (Monday to Monday, UTC) with a reference window (default: the
first four weeks with data; ``--reference-since`` / ``--until`` to choose) by the population
stability index of every statistic (:func:`ecgbridge.inference.metrics.psi`):

- numeric (amplitude, duration): over the reference's deciles (fewer quantile bins when a
  window holds under 250 ECGs: one bin per 25, at least 2, since with n values a PSI of about
  (bins - 1) / n is sampling noise alone);
- categorical (sampling rate, leads, device, format): over the reference's categories plus
  "other";
- each quality flag, and each model class's positive calls: present / absent.

Reading a PSI: under 0.1 stable, 0.1-0.25 a moderate shift, over 0.25 a shift to look at (a
new cart model, a firmware changing the filters, a new ward's population). The console's
validation page shows the table; ``/metrics`` exports the last seven days' values
(``ecgbridge_drift_psi``, ``ecgbridge_output_positive_rate``) and
``deploy/monitoring/alerts.yml`` alerts when one stays over 0.25.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select

from ecgbridge.core.store import EcgStatsRow, MessageStore, ResultRow
from ecgbridge.inference.metrics import psi
from ecgbridge.mapping.ecg import AnalysisResult, Ecg

__all__ = ["record_ecg_stats", "drift_report", "window_values", "last_days", "format_drift", "PSI_ALERT"]

#: The PSI over which a statistic has shifted enough to look at (the alert rule's threshold).
PSI_ALERT = 0.25
_OTHER = "other"


def _amplitude(ecg: Ecg) -> float | None:
    if ecg.signals.size == 0:
        return None
    lo, hi = np.nanpercentile(ecg.signals, [2, 98], axis=1)
    return float(np.nanmedian(hi - lo))


def record_ecg_stats(store: MessageStore, message_id: str, ecg: Ecg, result: AnalysisResult, route: str | None) -> None:
    """Store what the analysed ECG looked like (one row per message; a re-analysis replaces it)."""
    row = EcgStatsRow(
        message_id=message_id,
        analysed_at=datetime.now(UTC),
        route=route,
        fs=float(ecg.fs),
        n_leads=len(ecg.leads),
        duration_s=float(ecg.duration_s),
        device=(ecg.study.device or None) and str(ecg.study.device)[:128],
        source_format=ecg.source_format[:32],
        amplitude_mv=_amplitude(ecg),
        quality_flags=sorted({f.split(":", 1)[0] for f in (*result.quality_flags, *result.ecg_flags)}),
    )
    with store.session() as s, s.begin():
        s.merge(row)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _rows(store: MessageStore, since: datetime | None, until: datetime | None) -> list[dict[str, Any]]:
    """Each analysed ECG's statistics and its models' positive calls (``model/CLASS`` -> 0/1)."""
    with store.session() as s:
        q = select(EcgStatsRow, ResultRow.result).outerjoin(ResultRow, ResultRow.message_id == EcgStatsRow.message_id)
        if since is not None:
            q = q.where(EcgStatsRow.analysed_at >= since)
        if until is not None:
            q = q.where(EcgStatsRow.analysed_at < until)
        out = []
        for stat, result in s.execute(q.order_by(EcgStatsRow.analysed_at)):
            calls = {}
            for o in (result or {}).get("outputs") or []:
                for f in o.get("findings") or []:
                    calls[f"{o['model']}/{f['code']}"] = int(bool(f.get("present")))
            out.append(
                {
                    "at": _aware(stat.analysed_at),
                    "numeric": {"amplitude_mv": stat.amplitude_mv, "duration_s": stat.duration_s},
                    "category": {
                        "fs_hz": f"{stat.fs:g}",
                        "leads": str(stat.n_leads),
                        "device": stat.device or "not given",
                        "format": stat.source_format or "unknown",
                    },
                    "flags": set(stat.quality_flags or []),
                    "calls": calls,
                }
            )
    return out


def _numeric_psi(ref: Sequence[float], cur: Sequence[float]) -> float:
    ref_v = [v for v in ref if v is not None and np.isfinite(v)]
    cur_v = [v for v in cur if v is not None and np.isfinite(v)]
    if len(ref_v) < 2 or not cur_v:
        return float("nan")
    # Fewer bins for small windows: with n values per window a PSI of about (bins - 1) / n is noise alone.
    bins = max(2, min(10, min(len(ref_v), len(cur_v)) // 25))
    inner = np.unique(np.percentile(ref_v, np.linspace(0, 100, bins + 1)[1:-1]))
    return psi(ref_v, cur_v, [-np.inf, *inner, np.inf])


def _category_psi(ref: Sequence[str], cur: Sequence[str]) -> float:
    if not ref or not cur:
        return float("nan")
    kept = [c for c, _ in Counter(ref).most_common(9)]
    index = {c: i for i, c in enumerate(kept)}
    codes_ref = [index.get(c, len(kept)) for c in ref]
    codes_cur = [index.get(c, len(kept)) for c in cur]
    return psi(codes_ref, codes_cur, [i - 0.5 for i in range(len(kept) + 2)])


def _binary_psi(ref: Sequence[int], cur: Sequence[int]) -> float:
    if not ref or not cur:
        return float("nan")
    return psi(ref, cur, [-0.5, 0.5, 1.5])


def window_values(reference: list[dict[str, Any]], current: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """statistic -> {psi, reference / current mean or rate} for one window against the reference."""
    out: dict[str, dict[str, float]] = {}
    for key in ("amplitude_mv", "duration_s"):
        r = [x["numeric"][key] for x in reference]
        c = [x["numeric"][key] for x in current]
        out[key] = {
            "psi": _numeric_psi(r, c),
            "reference": float(np.nanmedian([v for v in r if v is not None] or [np.nan])),
            "current": float(np.nanmedian([v for v in c if v is not None] or [np.nan])),
        }
    for key in ("fs_hz", "leads", "device", "format"):
        r_cat = [x["category"][key] for x in reference]
        c_cat = [x["category"][key] for x in current]
        out[key] = {"psi": _category_psi(r_cat, c_cat)}
    flags = sorted(set().union(*(x["flags"] for x in reference + current))) if reference or current else []
    for flag in flags:
        r_bin = [int(flag in x["flags"]) for x in reference]
        c_bin = [int(flag in x["flags"]) for x in current]
        out[f"flag:{flag}"] = {
            "psi": _binary_psi(r_bin, c_bin),
            "reference": float(np.mean(r_bin)) if r_bin else float("nan"),
            "current": float(np.mean(c_bin)) if c_bin else float("nan"),
        }
    classes = sorted(set().union(*(x["calls"].keys() for x in reference + current))) if reference or current else []
    for cls in classes:
        r_call = [x["calls"][cls] for x in reference if cls in x["calls"]]
        c_call = [x["calls"][cls] for x in current if cls in x["calls"]]
        out[f"positive:{cls}"] = {
            "psi": _binary_psi(r_call, c_call),
            "reference": float(np.mean(r_call)) if r_call else float("nan"),
            "current": float(np.mean(c_call)) if c_call else float("nan"),
        }
    return out


def _monday(when: datetime) -> datetime:
    day = when.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def _reference(
    rows: list[dict[str, Any]], since: datetime | None, until: datetime | None, weeks: int
) -> tuple[datetime, datetime, list[dict[str, Any]]]:
    """The reference window (default: ``weeks`` weeks from the Monday of the first analysis) and its ECGs."""
    start = since or _monday(rows[0]["at"])
    end = until or start + timedelta(weeks=weeks)
    return start, end, [x for x in rows if start <= x["at"] < end]


def drift_report(
    store: MessageStore,
    *,
    reference_since: datetime | None = None,
    reference_until: datetime | None = None,
    reference_weeks: int = 4,
    since: datetime | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The reference window and, for each week after it (from ``since``), every statistic's PSI against it."""
    now = now or datetime.now(UTC)
    rows = _rows(store, None, None)
    if not rows:
        return {"reference": None, "weeks": []}
    ref_start, ref_end, reference = _reference(rows, reference_since, reference_until, reference_weeks)
    weeks: dict[datetime, list[dict[str, Any]]] = defaultdict(list)
    for x in rows:
        if x["at"] >= ref_end and (since is None or x["at"] >= since) and x["at"] < now:
            weeks[_monday(x["at"])].append(x)
    return {
        "reference": {"since": ref_start.isoformat(), "until": ref_end.isoformat(), "n": len(reference)},
        "weeks": [
            {"week": start.date().isoformat(), "n": len(items), "statistics": window_values(reference, items)}
            for start, items in sorted(weeks.items())
        ],
    }


def last_days(
    store: MessageStore, *, days: int = 7, reference_weeks: int = 4, now: datetime | None = None
) -> dict[str, Any]:
    """The last ``days`` days against the default reference window (what ``/metrics`` exports)."""
    now = now or datetime.now(UTC)
    rows = _rows(store, None, None)
    if not rows:
        return {}
    _, ref_end, reference = _reference(rows, None, None, reference_weeks)
    current = [x for x in rows if x["at"] >= max(ref_end, now - timedelta(days=days))]
    return window_values(reference, current) if reference and current else {}


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def format_drift(report: dict[str, Any]) -> str:
    """The drift report as text: one line per statistic and week, flagged over :data:`PSI_ALERT`."""
    ref = report["reference"]
    if ref is None:
        return "drift: no analysed ECG recorded yet"
    lines = [
        f"drift: reference {ref['since'][:10]} .. {ref['until'][:10]} ({ref['n']} ECGs); PSI per week (> {PSI_ALERT} *)"
    ]
    for week in report["weeks"]:
        lines.append(f"week of {week['week']} ({week['n']} ECGs)")
        for name, v in week["statistics"].items():
            mark = " *" if np.isfinite(v["psi"]) and v["psi"] > PSI_ALERT else ""
            extra = f"  ({_f(v['reference'])} -> {_f(v['current'])})" if "reference" in v else ""
            lines.append(f"  {name:<32} PSI {_f(v['psi'], 3)}{extra}{mark}")
    if not report["weeks"]:
        lines.append("no week after the reference window yet")
    return "\n".join(lines)
