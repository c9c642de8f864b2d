"""Signal-quality gate: what the model saw, flagged on every result, and what poor quality may change.

:func:`assess` checks one canonical :class:`~mapping.ecg.Ecg` lead by lead and as a
whole, and returns a :class:`QualityReport`: a per-lead status, the flags, and an overall
``acceptable`` / ``poor``. :func:`quality_flags` is the flags alone (what the pipeline
puts into :attr:`AnalysisResult.quality_flags`, so every FHIR and HL7 result shows them).
A flag never stops the analysis; :func:`cap_for_quality` says what a poor ECG may not
claim.

Checks and thresholds (each a module constant; the numbers were checked on the real
fixtures in ``tests/fixtures`` and on synthetic corruptions of them in
``tests/unit/test_quality.py``). Metrics that compare powers or ranges are ratios, so
they work on z-scored sources too::

    check                 per lead                                                flag
    missing               a standard lead the ECG does not have                   missing_leads:V1,...
    non-finite            any NaN / inf sample (set to 0 for the other checks)    nonfinite_samples:I,...
    flat                  >= 50 % of 2 s windows span < 0.03 mV (or z units)      flat_leads:V2,...
    clipping              rail plateaus (>= 10 ms, >= 3 samples, within 0.2 %    clipped_leads:V2,...
                          of the range of the max or min) in >= 2 runs and
                          >= 0.5 % of samples
    high-frequency noise  mean PSD 40..min(150, 0.9 Nyquist) Hz over mean PSD     hf_noise:aVL,...
                          of the QRS band 5..15 Hz > 0.1 (needs fs >= 90 Hz;
                          mains hum counts; clean real leads reach 0.04)
    motion artefact       largest 2 s window (hop 1 s) range over the median     motion_artefact:II,...
                          window range, 0.5-40 Hz as the models see it, > 2.2
    baseline wander       excursion (p1..p99) of the content below 0.5 Hz, its    baseline_wander:V1,...
                          linear drift removed, over the range (p0.5..p99.5) of
                          the rest > 1.0 ("the baseline moves more than the QRS
                          is tall"); slow linear drift is left alone: the
                          models' 0.5 Hz high-pass removes it
    implausible amplitude |x - median| > 15 mV; mV sources only (skipped for     implausible_amplitude:V3,...
                          ``units:zscore``)
    limb-lead reversal    LA/RA: lead I with negative P and dominant negative     suspected_limb_lead_reversal:LA/RA
                          QRS, aVR with dominant positive QRS, V6 upright (so
                          dextrocardia does not fire); needs >= 4 beats, found
                          by the measurements' QRS detector (one detection per
                          ECG, shared through ``features.SignalViews``)
    duration              < 2.5 s                                                 too_short:2.0s
                          < 8 s (the models read 10 s; the rest is zero-padded)    short_recording:5.0s

Overall **poor** (flag ``poor_quality``) when any of: too short; a standard lead missing,
flat or non-finite; a suspected limb-lead reversal; an implausible amplitude; >= 2
leads clipped; >= 3 leads (a quarter of twelve) with high-frequency noise, motion
artefact or baseline wander. One clipped, noisy or wandering lead is flagged but stays
acceptable: carts produce that every day and the models are trained with such
augmentation.

Measured (``tests/unit/test_quality.py`` and a run over ``../shared/data``, 2026-12-01):
every fixture in ``tests/fixtures/dicom`` and ``tests/fixtures/wfdb`` is acceptable (the
Georgia record E07506 carries ``baseline_wander:V4``, a real 2 mV drift). Of the 839
PTB-XL subset records, none of the 541 without a noise / ectopy annotation is poor;
17 of 114 with PVCs / AF are (motion artefact: an ectopic beat much larger than the
sinus beats looks like a burst; the known false positive), 3 of 27 with PTB-XL's
``burst_noise``, 1 of 111 ``static_noise``, 1 of 44 ``baseline_drift`` (that subset is
band-passed to 0.5-40 Hz and z-scored, so its noise is mostly invisible to the
high-frequency and wander checks). 6 of the 50 challenge records are poor (zeroed
precordial leads, one plausible LA/RA reversal, noisy Chapman records). Every noisy
normal fixture the shipped model mis-calls is poor, except short motion bursts
(an xfail in the tests documents the one measured miss). About 40 ms
per 12-lead 10 s ECG at 500 Hz, 11 ms at 100 Hz, on one core. Since the gate uses the
measurements' QRS detection instead of its own (2026-12-07), the flags of all 889 records
above are unchanged (the check: old and new ``assess`` side by side).

What poor quality changes (:func:`cap_for_quality`), and why:

* **Probabilities are never changed**: they are the model's statement and every
  mapping shows them next to the flags.
* **No "high" tier on a poor ECG**: a ``high`` risk tier becomes ``moderate``. The gate
  cannot tell whether noise raised a score, so it bounds what noise can do: a noisy
  normal ECG can at most reach ``moderate``; a true MI on a noisy tracing still shows as
  ``moderate`` (Moderate + High is the tier set chosen to catch the class), flagged
  ``poor_quality``, i.e. "repeat the ECG", never as ``low``. Tiers never go *up*.
* **No "normal" on a poor ECG**: the normal class (``NORM`` / SNOMED 164854000) is not
  marked present. Noise can hide an abnormality; reassurance needs a clean tracing.
* **Too short (< 2.5 s) asserts nothing**: the input is then more than 75 % zero
  padding, so every finding is reported with its probability but ``present=False`` and
  no tier. (Caveat: the FHIR / HL7 mappings word a finding that is not present as
  "below threshold"; ``extra["quality_gate"]`` records every decision withheld.)
* **No predicted clinical abnormalities on a poor or too-short ECG**: the explanations a
  knowledge-transfer model gives (``extra["predicted_abnormalities"]``, "ECG pattern
  associated with elevated NT-proBNP") move to ``extra["quality_gate"]["explanations_withheld"]``
  (kept for audit, not sent); the writers say they were withheld. They are read off the same
  embedding noise moves, explain rather than find (nothing is missed without them), and a
  noisy "associated with elevated troponin" could start a work-up.

The pipeline must call :func:`cap_for_quality` on each model output with the report
:func:`assess` gave (``analyse_ecg``); the function is idempotent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
from scipy import signal as sps

from ecgbridge.inference.features import SignalViews
from ecgbridge.inference.filters import zero_phase
from ecgbridge.mapping.abnormality_result import PREDICTED_KEY, WITHHELD_KEY
from ecgbridge.mapping.codes import SUPERCLASS_SNOMED
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Finding, ModelOutput

__all__ = [
    "LeadQuality",
    "QualityReport",
    "assess",
    "quality_flags",
    "cap_for_quality",
    "TOO_SHORT_S",
    "SHORT_S",
]

# --------------------------------------------------------------------------- thresholds

TOO_SHORT_S = 2.5  #: shorter than this: ``too_short``, nothing asserted
SHORT_S = 8.0  #: shorter than this: ``short_recording`` (informational)
FLAT_WINDOW_S = 2.0  #: window for the flat check (always holds a QRS above 30 bpm)
FLAT_RANGE = 0.03  #: a window spanning less than this (mV, or z units) is flat
FLAT_FRACTION = 0.5  #: a lead is flat when at least this share of its windows is
CLIP_TOLERANCE = 0.002  #: share of the lead's range that counts as "at the rail"
CLIP_MIN_RUN_S = 0.010  #: a plateau this long (and >= 3 samples) is not a rounded peak
CLIP_MIN_RUNS = 2
CLIP_MIN_FRACTION = 0.005
HF_BAND_HZ = (40.0, 150.0)  #: noise band (upper end capped at 0.9 x Nyquist)
QRS_BAND_HZ = (5.0, 15.0)
HF_RATIO = 0.1  #: mean PSD of the noise band over that of the QRS band
BURST_WINDOW_S = 2.0  #: windows (hop 1 s) for the motion-artefact check
BURST_RATIO = 2.2  #: largest window range over the median window range, in the models' 0.5-40 Hz band
WANDER_CUTOFF_HZ = 0.5
WANDER_RATIO = 1.0  #: baseline excursion over the range of the waveform above the cutoff
MAX_ABS_MV = 15.0  #: larger excursions from the lead median are not an ECG
NOISY_LEADS_POOR = 3  #: this many noisy / wandering leads make the ECG poor
CLIPPED_LEADS_POOR = 2

_STATUS_ORDER = ("missing", "nonfinite", "flat", "clipped", "implausible_amplitude", "noisy", "motion", "wander", "ok")
_NORMAL_SNOMED = SUPERCLASS_SNOMED["NORM"][0]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class LeadQuality:
    """One lead: its worst ``status``, every issue found, and the measured numbers."""

    lead: str
    status: str  # ok | missing | nonfinite | flat | clipped | implausible_amplitude | noisy | motion | wander
    issues: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class QualityReport:
    """The gate's verdict on one ECG."""

    overall: str  # acceptable | poor
    flags: tuple[str, ...]
    leads: Mapping[str, LeadQuality]
    #: Why the ECG is poor (empty when acceptable), e.g. ``("flat_leads", "too_short")``.
    reasons: tuple[str, ...] = ()
    duration_s: float = 0.0

    @property
    def acceptable(self) -> bool:
        return self.overall == "acceptable"

    @property
    def too_short(self) -> bool:
        return "too_short" in self.reasons

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "flags": list(self.flags),
            "reasons": list(self.reasons),
            "duration_s": round(self.duration_s, 3),
            "leads": {
                name: {
                    "status": q.status,
                    "issues": list(q.issues),
                    "metrics": {k: round(float(v), 4) for k, v in q.metrics.items()},
                }
                for name, q in self.leads.items()
            },
        }


# --------------------------------------------------------------------------- per-lead metrics


def _flat_fraction(x: np.ndarray, fs: float) -> float:
    n = max(round(FLAT_WINDOW_S * fs), 2)
    if x.size < n:
        return float(np.ptp(x) < FLAT_RANGE) if x.size else 1.0
    k = x.size // n
    windows = x[: k * n].reshape(k, n)
    return float(np.mean(np.ptp(windows, axis=1) < FLAT_RANGE))


def _plateaus(mask: np.ndarray, min_run: int) -> tuple[int, int]:
    """(number of runs of True at least ``min_run`` long, samples in them)."""
    if not mask.any():
        return 0, 0
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = ends - starts
    long = lengths[lengths >= min_run]
    return int(long.size), int(long.sum())


def _clip_metrics(x: np.ndarray, fs: float) -> tuple[int, float]:
    top, bottom = float(x.max()), float(x.min())
    span = top - bottom
    if span <= 0:
        return 0, 0.0
    tol = CLIP_TOLERANCE * span
    min_run = max(3, round(CLIP_MIN_RUN_S * fs))
    runs_hi, n_hi = _plateaus(x >= top - tol, min_run)
    runs_lo, n_lo = _plateaus(x <= bottom + tol, min_run)
    return runs_hi + runs_lo, (n_hi + n_lo) / x.size


def _nan_where(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    return np.where(bad, np.nan, values)


def _hf_ratios(x: np.ndarray, fs: float) -> np.ndarray:
    """Per lead: mean PSD of the noise band over that of the QRS band (NaN: not measurable)."""
    upper = min(HF_BAND_HZ[1], 0.9 * fs / 2.0)
    if upper - HF_BAND_HZ[0] < 4.0 or x.shape[1] < int(fs):
        return np.full(x.shape[0], np.nan)  # not measurable at this sampling rate / length
    nperseg = min(x.shape[1], int(2 * fs))
    freqs, psd = sps.welch(x - x.mean(axis=1, keepdims=True), fs=fs, nperseg=nperseg, axis=-1)
    noise = psd[:, (freqs >= HF_BAND_HZ[0]) & (freqs <= upper)].mean(axis=1)
    qrs = psd[:, (freqs >= QRS_BAND_HZ[0]) & (freqs <= QRS_BAND_HZ[1])].mean(axis=1)
    return _nan_where(noise / np.where(qrs > 0, qrs, 1.0), qrs <= 0)


def _wander_ratios(x: np.ndarray, fs: float) -> np.ndarray:
    """Per lead: excursion below 0.5 Hz (linear drift removed) over the range of the rest."""
    if x.shape[1] < int(2 * fs):
        return np.full(x.shape[0], np.nan)
    centred = x - np.median(x, axis=1, keepdims=True)
    low = zero_phase(centred, fs, None, WANDER_CUTOFF_HZ)
    rest = centred - low
    t = np.arange(x.shape[1], dtype=np.float64) - (x.shape[1] - 1) / 2.0
    slope = (low @ t) / float(t @ t)
    base = low - low.mean(axis=1, keepdims=True) - slope[:, None] * t  # linear drift removed
    amplitude = np.percentile(rest, 99.5, axis=1) - np.percentile(rest, 0.5, axis=1)
    excursion = np.percentile(base, 99, axis=1) - np.percentile(base, 1, axis=1)
    return _nan_where(excursion / np.where(amplitude > 0, amplitude, 1.0), amplitude <= 0)


def _burst_ratios(x: np.ndarray, fs: float) -> np.ndarray:
    """Per lead: largest 2 s window range over the median one, band-passed as the models see it."""
    w, hop = int(BURST_WINDOW_S * fs), int(fs)
    if x.shape[1] < w + 2 * hop:
        return np.full(x.shape[0], np.nan)  # fewer than three windows: nothing to compare with
    y = zero_phase(x, fs, 0.5, min(40.0, 0.45 * fs))
    ranges = np.stack([np.ptp(y[:, s : s + w], axis=1) for s in range(0, y.shape[1] - w + 1, hop)], axis=1)
    typical = np.median(ranges, axis=1)
    return _nan_where(ranges.max(axis=1) / np.where(typical > 0, typical, 1.0), typical <= 0)


# --------------------------------------------------------------------------- limb-lead reversal


def _median_beat(lead: np.ndarray, beats: np.ndarray, fs: float) -> np.ndarray | None:
    before, after = int(0.35 * fs), int(0.25 * fs)
    windows = [lead[b - before : b + after] for b in beats if b - before >= 0 and b + after <= lead.size]
    if len(windows) < 4:
        return None
    return cast(np.ndarray, np.median(np.stack(windows), axis=0))


def _qrs_net(beat: np.ndarray, fs: float) -> tuple[float, float]:
    """(net QRS deflection normalised to [-1, 1], P-wave mean) of a median beat, baseline-referenced."""
    centre = int(0.35 * fs)
    baseline = float(np.median(beat[centre - int(0.30 * fs) : centre - int(0.22 * fs)]))  # before P
    qrs = beat[centre - int(0.06 * fs) : centre + int(0.06 * fs)] - baseline
    up, down = max(float(qrs.max()), 0.0), max(float(-qrs.min()), 0.0)
    net = (up - down) / (up + down) if up + down > 0 else 0.0
    p_wave = beat[centre - int(0.20 * fs) : centre - int(0.09 * fs)] - baseline
    return net, float(p_wave.mean())


def _limb_reversal(ecg: Ecg, views: SignalViews, usable: set[str]) -> bool:
    """Conservative LA/RA reversal test (see the module docstring), on the measurements' QRS fiducials."""
    if not {"I", "aVR", "V6"} <= usable:
        return False
    x = views.x
    beats = views.qrs_fiducials
    if beats.size < 4:
        return False
    stats = {}
    for name in ("I", "aVR", "V6"):
        beat = _median_beat(x[ecg.leads.index(name)], beats, ecg.fs)
        if beat is None:
            return False
        stats[name] = _qrs_net(beat, ecg.fs)
    (net_i, p_i), (net_avr, _), (net_v6, _) = stats["I"], stats["aVR"], stats["V6"]
    return net_i < -0.3 and p_i < 0 and net_avr > 0.3 and net_v6 > 0.0


# --------------------------------------------------------------------------- the gate


def _leads_flag(name: str, leads: list[str]) -> str:
    return f"{name}:{','.join(leads)}"


def assess(ecg: Ecg, views: SignalViews | None = None) -> QualityReport:
    """Check ``ecg`` (see the module docstring for every check and threshold).

    ``views``: the ECG's :class:`~inference.features.SignalViews` when the analysis shares
    them with the measurements (one QRS detection for both); made here otherwise.
    """
    views = views if views is not None and views.ecg is ecg else SignalViews(ecg)
    fs = float(ecg.fs)
    zscore = "units:zscore" in ecg.flags or ecg.units.lower() == "zscore"
    finite, x = views.finite, views.x
    leads: dict[str, LeadQuality] = {}
    by_issue: dict[str, list[str]] = {}
    hf, burst, wander = _hf_ratios(x, fs), _burst_ratios(x, fs), _wander_ratios(x, fs)

    def note(issue: str, lead: str) -> None:
        by_issue.setdefault(issue, []).append(lead)

    for i, name in enumerate(ecg.leads):
        row = x[i]
        issues: list[str] = []
        metrics: dict[str, float] = {}
        if not finite[i].all():
            issues.append("nonfinite")
            metrics["nonfinite_fraction"] = float(1.0 - finite[i].mean())
        flat = _flat_fraction(row, fs)
        metrics["flat_fraction"] = flat
        metrics["range"] = float(np.ptp(row)) if row.size else 0.0
        if flat >= FLAT_FRACTION:
            issues.append("flat")
        else:
            runs, frac = _clip_metrics(row, fs)
            metrics["clip_fraction"] = frac
            if runs >= CLIP_MIN_RUNS and frac >= CLIP_MIN_FRACTION:
                issues.append("clipped")
            if not zscore:
                peak = float(np.max(np.abs(row - np.median(row)))) if row.size else 0.0
                metrics["max_abs_mv"] = peak
                if peak > MAX_ABS_MV:
                    issues.append("implausible_amplitude")
            for key, values, limit, issue in (
                ("hf_ratio", hf, HF_RATIO, "noisy"),
                ("burst_ratio", burst, BURST_RATIO, "motion"),
                ("wander_ratio", wander, WANDER_RATIO, "wander"),
            ):
                if np.isfinite(values[i]):
                    metrics[key] = float(values[i])
                    if values[i] > limit:
                        issues.append(issue)
        status = min(issues, key=_STATUS_ORDER.index) if issues else "ok"
        leads[name] = LeadQuality(name, status, tuple(issues), metrics)
        for issue in issues:
            note(issue, name)

    missing = [lead for lead in STANDARD_LEADS if lead not in ecg.leads]
    for name in missing:
        leads[name] = LeadQuality(name, "missing", ("missing",))

    flags: list[str] = []
    reasons: list[str] = []
    duration = ecg.duration_s
    if duration < TOO_SHORT_S:
        flags.append(f"too_short:{duration:.1f}s")
        reasons.append("too_short")
    elif duration < SHORT_S:
        flags.append(f"short_recording:{duration:.1f}s")
    if missing:
        flags.append(_leads_flag("missing_leads", missing))
        reasons.append("missing_leads")
    for issue, flag, poor_at in (
        ("nonfinite", "nonfinite_samples", 1),
        ("flat", "flat_leads", 1),
        ("implausible_amplitude", "implausible_amplitude", 1),
        ("clipped", "clipped_leads", CLIPPED_LEADS_POOR),
        ("noisy", "hf_noise", NOISY_LEADS_POOR),
        ("motion", "motion_artefact", NOISY_LEADS_POOR),
        ("wander", "baseline_wander", NOISY_LEADS_POOR),
    ):
        names = by_issue.get(issue, [])
        if names:
            flags.append(_leads_flag(flag, names))
            if len(names) >= poor_at:
                reasons.append(flag)
    usable = {name for name, q in leads.items() if q.status not in ("missing", "nonfinite", "flat")}
    if duration >= TOO_SHORT_S and _limb_reversal(ecg, views, usable):
        flags.append("suspected_limb_lead_reversal:LA/RA")
        reasons.append("suspected_limb_lead_reversal")
    overall = "poor" if reasons else "acceptable"
    if reasons:
        flags.append("poor_quality")
    return QualityReport(overall=overall, flags=tuple(flags), leads=leads, reasons=tuple(reasons), duration_s=duration)


def quality_flags(ecg: Ecg) -> tuple[str, ...]:
    """The flags of :func:`assess` (``poor_quality`` among them when the ECG is poor)."""
    return assess(ecg).flags


# --------------------------------------------------------------------------- what poor quality changes


def _is_normal(finding: Finding) -> bool:
    return finding.code.upper() == "NORM" or finding.snomed == _NORMAL_SNOMED


def cap_for_quality(output: ModelOutput, report: QualityReport) -> ModelOutput:
    """``output`` as a poor ECG may state it (unchanged when the ECG is acceptable).

    Poor: a ``high`` tier becomes ``moderate`` and the normal class is not present.
    Too short: no finding is present and none has a tier. Either: predicted abnormalities are
    withheld (moved into the gate). Probabilities never change;
    ``extra["quality_gate"]`` records the rule and each decision withheld. Idempotent.
    """
    if report.acceptable:
        return output
    rule = "too_short" if report.too_short else "poor_quality"
    gate = dict(output.extra.get("quality_gate") or {}) if isinstance(output.extra, Mapping) else {}
    withheld: dict[str, Any] = dict(gate.get("withheld") or {})
    findings: list[Finding] = []
    for f in output.findings:
        if rule == "too_short":
            new = replace(f, present=False, tier=None)
        else:
            new = replace(
                f,
                tier="moderate" if f.tier == "high" else f.tier,
                present=False if _is_normal(f) else f.present,
            )
        if new != f:
            withheld.setdefault(f.code, {"present": f.present, "tier": f.tier})
        findings.append(new)
    gate.update({"overall": report.overall, "rule": rule, "reasons": list(report.reasons), "withheld": withheld})
    extra = {**output.extra, "quality_gate": gate}
    predicted = extra.pop(PREDICTED_KEY, None)
    if predicted:
        gate[WITHHELD_KEY] = predicted
    return replace(output, findings=tuple(findings), extra=extra)
