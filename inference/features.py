"""Global ECG measurements from the raw signal: intervals, axes, amplitudes, criteria.

:func:`measure` reads one canonical :class:`~mapping.ecg.Ecg` (mV, at the cart's own
sampling rate: never the 100 Hz model input) and returns :class:`Measurements`:
heart rate, RR, PR, QRS, QT, QTc (Bazett and Fridericia), P / QRS / T frontal axes,
per-lead R and S amplitudes, Sokolow-Lyon and Cornell voltage, pathological Q waves,
ST deviation at J+60 ms, T inversion, fragmented QRS, low voltage and a bundle-branch
block morphology. :meth:`Measurements.as_dict` is exactly the shape
:mod:`mapping.hl7_oru` (and :mod:`mapping.fhir_measurements`) map:
``{"heart_rate": 61.1, "pr_interval": 160.0, ...}`` with the keys of
``mapping.hl7_oru.MEASUREMENT_UNITS`` and nothing that was not measured.
:meth:`Measurements.features` is everything, JSON-safe, for the LVEF model and the report.

How (why a delineator of our own: neurokit2 0.3.0 was evaluated, see
``docs/measurements.md``: its DWT delineation put QRS offsets 50-90 ms late or missing on
the real Mortara ECG and cost 150-190 ms per lead; its fast "prominence" method is
single-lead; and it pulls scikit-learn and caps setuptools < 82)::

    1. filter     zero-phase (forward-backward) Butterworth: high-pass 0.5 Hz (within the
                  AHA limit of 0.67 Hz for linear-phase filters, so the ST level is not
                  distorted), low-pass 100 Hz when fs >= 250 Hz
    2. beats      QRS energy: 8-30 Hz band, each independent lead (I, II, V1-V6) scaled
                  to its own 99th percentile, squared and summed, 80 ms moving average;
                  peaks >= 250 ms apart and >= 30 % of the 90th percentile peak
    3. median     windows around every beat, aligned (+-10 ms) by cross-correlation of
                  the QRS (+-60 ms) with the first median; beats whose QRS correlates
                  < 0.9 with it (ectopics, artefact) are left out; sample-wise median;
                  a median from < 500 Hz is upsampled (band-limited) to >= 500 Hz
    4. delineate  on the median beat, globally over the independent leads, with the
                  spatial velocity SV (norm of the lead derivatives, 60 Hz low-passed)
                  and the spatial magnitude (norm of the leads less the PR level):
                  QRS onset / offset where SV falls to 4 % of its QRS peak above its
                  isoelectric floor and stays there 8 ms;
                  P wave = the most prominent peak of the magnitude of the 25 Hz median
                  in [onset - min(360 ms, 0.45 RR), onset - 20 ms], onset / offset where
                  SV before / after it falls to 15 % of its peak above its floor; kept
                  only if each beat's P segment correlates >= 0.5 (median) with the
                  median's (in atrial fibrillation it does not: flag p_wave_inconsistent);
                  T end where SV after the steepest descent of the T wave falls to 10 %
                  of that descent above its floor, searched no later than R + 0.7 RR
                  (at most 650 ms) and 20 ms before the next beat's P onset
    5. measure    intervals from the fiducials; amplitudes against the PR level at QRS
                  onset; axes from the net areas of I and aVF (atan2(2 aVF / sqrt 3, I),
                  the hexaxial projection), P over [P on, P off] against the line
                  joining its ends, QRS over [onset, offset], T over [offset, T end]

Criteria (per lead; lists keep only leads with a contiguous neighbour that also meets
them: V1-V6 in sequence, V5-V6-I-aVL, II-III-aVF):

* pathological Q (Fourth Universal Definition of MI): V2-V3 Q >= 20 ms and >= 0.05 mV,
  I, II, aVL, aVF, V4-V6 Q >= 30 ms and >= 0.1 mV, or a QS complex; not in aVR, III, V1,
  not with an LBBB morphology;
* fragmented QRS (conservative, Das et al.): >= 5 turning points of prominence
  >= max(0.05 mV, 10 % of the lead's QRS peak-to-peak) in a QRS < 120 ms (q-R-S plus a
  notch), >= 7 in a wider QRS;
* T inversion: the largest T deflection (J + 80 ms to T end) <= -0.1 mV; aVR is never
  listed (V1 and III inversions can be normal variants: the list is a measurement);
* low voltage: every limb lead's QRS peak-to-peak < 0.5 mV / every precordial < 1.0 mV;
* morphology when QRS >= 120 ms: LBBB = V1 predominantly negative, I and V6
  predominantly positive without a q (< 15 % of R); RBBB = a terminal R' in V1
  (last 40 % of the QRS, > 25 % of the V1 peak) and a terminal S in I or V6; else IVCD.

Heart rate is 60 000 / mean RR of all detected beats (the ventricular rate a cart
prints); QTc uses that RR in seconds: Bazett QT / RR^(1/2), Fridericia QT / RR^(1/3).
``qtc_interval`` (LOINC 8636-3) is the Bazett value.

Missing leads give None for what needs them (never a value invented from other leads).
A source flagged ``units:zscore`` (the PTB-XL subset: band-passed and z-scored per lead)
has no millivolts: amplitude-based measurements (amplitudes, voltages, Q waves, ST,
T inversion, fragmentation, low voltage, axes, which need the ratio between leads) are
None and the flag ``amplitudes_unavailable:zscore`` says so; intervals, rate and the
bundle-branch morphology (sign patterns, scale-free) are still computed.

Plausibility: a value outside the physiological range below is dropped (None) and
flagged ``implausible:<name>``, never clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import numpy as np
from scipy.ndimage import uniform_filter1d
from scipy.signal import find_peaks, resample_poly

from ecgbridge.inference.filters import butter_sos, zero_phase
from ecgbridge.mapping.ecg import Ecg

__all__ = [
    "FEATURES_VERSION",
    "HL7_KEYS",
    "MEASUREMENTS_MODEL",
    "Fiducials",
    "Measurements",
    "SignalViews",
    "detect_beats",
    "measure",
]

#: Version of this algorithm; goes into every result (ModelOutput.version).
FEATURES_VERSION = "0.1.0"
#: ModelOutput.model name of the measurements.
MEASUREMENTS_MODEL = "ecgbridge-measurements"
#: Keys of :meth:`Measurements.as_dict`, in the order of mapping.hl7_oru.MEASUREMENT_UNITS.
HL7_KEYS: tuple[str, ...] = (
    "heart_rate",
    "pr_interval",
    "qrs_duration",
    "qt_interval",
    "qtc_interval",
    "p_axis",
    "qrs_axis",
    "t_axis",
)

_INDEPENDENT = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
_LIMB = ("I", "II", "III", "aVR", "aVL", "aVF")
_PRECORDIAL = ("V1", "V2", "V3", "V4", "V5", "V6")

# --- tuning constants (checked on the Mortara cart record, the Philips files and the
# --- synthetic beats in tests/unit/test_features.py; docs/measurements.md)
_HP_HZ = 0.5
_LP_HZ = 100.0
_DET_BAND = (8.0, 30.0)
_DET_SMOOTH_S = 0.08
_REFRACTORY_S = 0.25
_PEAK_REL = 0.30
_ALIGN_S = 0.010
_ALIGN_QRS_S = 0.060
_MIN_CORR = 0.90
_QRS_ON_FRAC = 0.04
_QRS_OFF_FRAC = 0.04
_SV_LP_HZ = 60.0
_QUIET_RUN_S = 0.008
_P_FRAC = 0.15
_T_END_FRAC = 0.10
_DELINEATE_MIN_FS = 500.0
_P_MIN_REL = 0.01
_P_MIN_CONSISTENCY = 0.5  # median beat-to-median correlation of the P segment (AF: ~0.37, SR: ~0.93)
_FRAG_EXTREMA_NARROW = 5  # q-R-S (3) + one notch (2): a notch, not merely an RSR'
_FRAG_EXTREMA_WIDE = 7  # q-R-S + two notches (Das et al. 2008, f-wQRS)
_LIMITS: dict[str, tuple[float, float]] = {
    "heart_rate": (20.0, 300.0),
    "pr_interval": (50.0, 450.0),
    "qrs_duration": (40.0, 250.0),
    "qt_interval": (180.0, 700.0),
}


@dataclass(frozen=True)
class Fiducials:
    """Global fiducial points on the median beat, in ms relative to the beat's QRS fiducial."""

    p_onset: float | None
    p_offset: float | None
    qrs_onset: float
    qrs_offset: float
    t_end: float | None


@dataclass(frozen=True)
class Measurements:
    """What :func:`measure` found; None wherever a measurement could not be made."""

    fs: float
    n_beats: int  # beats detected
    n_beats_median: int  # beats that went into the median beat
    heart_rate: float | None = None  # /min
    rr_interval: float | None = None  # ms, mean
    pr_interval: float | None = None  # ms
    qrs_duration: float | None = None  # ms
    qt_interval: float | None = None  # ms
    qtc_bazett: float | None = None  # ms
    qtc_fridericia: float | None = None  # ms
    p_axis: float | None = None  # deg, (-180, 180]
    qrs_axis: float | None = None
    t_axis: float | None = None
    #: mV per lead: R = highest point of the QRS, S = depth of the lowest point after R
    #: (or of the whole complex when it has no R), both >= 0, against the PR level.
    r_amplitude: dict[str, float] | None = None
    s_amplitude: dict[str, float] | None = None
    sokolow_lyon: float | None = None  # mV, S V1 + max(R V5, R V6)
    cornell: float | None = None  # mV, R aVL + S V3
    qrs_area: dict[str, float] | None = None  # net QRS area per lead, mV*ms, against the PR level
    q_waves: tuple[str, ...] | None = None  # leads with a pathological Q wave
    st_deviation: dict[str, float] | None = None  # mV at J+60 ms against the PR level
    t_inversion: tuple[str, ...] | None = None
    fragmented_qrs: tuple[str, ...] | None = None
    low_voltage_limb: bool | None = None  # every limb lead QRS peak-to-peak < 0.5 mV
    low_voltage_precordial: bool | None = None  # every precordial lead < 1.0 mV
    #: "normal" (QRS < 120 ms), "LBBB", "RBBB" or "IVCD" (wide, neither pattern).
    qrs_morphology: str | None = None
    fiducials: Fiducials | None = None
    flags: tuple[str, ...] = ()

    @property
    def qtc_interval(self) -> float | None:
        """The QTc reported under LOINC 8636-3: Bazett's."""
        return self.qtc_bazett

    def as_dict(self) -> dict[str, float]:
        """The ``ModelOutput.extra["measurements"]`` shape mapping.hl7_oru reads.

        Keys from :data:`HL7_KEYS` (units: /min, ms, deg as in
        ``mapping.hl7_oru.MEASUREMENT_UNITS``), values rounded to 0.1; a measurement that
        was not made is left out (the mapping would flag a None as unusable).
        """
        out: dict[str, float] = {}
        for key in HL7_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = round(float(value), 1)
        return out

    def features(self) -> dict[str, Any]:
        """Everything, JSON-safe (tuples as lists), for extra["features"] and the LVEF model."""
        data = asdict(self)
        data["qtc_interval"] = self.qtc_interval
        for key, value in list(data.items()):
            if isinstance(value, tuple):
                data[key] = list(value)
            elif isinstance(value, float):
                data[key] = round(value, 3)
            elif isinstance(value, dict) and key != "fiducials":
                data[key] = {k: round(float(v), 3) for k, v in value.items()}
        if self.fiducials is not None:
            data["fiducials"] = {
                k: (None if v is None else round(float(v), 1)) for k, v in asdict(self.fiducials).items()
            }
        return data


# --------------------------------------------------------------------------- filters


def _filter(x: np.ndarray, fs: float, lo: float | None, hi: float | None, order: int = 2) -> np.ndarray:
    sos = butter_sos(float(fs), lo, hi, order)
    if sos is None:
        return x
    return zero_phase(x, fs, lo, hi, order, padlen=min(x.shape[-1] - 1, 3 * (2 * len(sos) + 1) * 4))


# --------------------------------------------------------------------------- beats


def _detect_beats(det: np.ndarray, fs: float) -> np.ndarray:
    """QRS fiducials (sample indices) from band-passed independent leads (L, N)."""
    scale = np.percentile(np.abs(det), 99, axis=1)
    usable = scale > 1e-9
    if not usable.any():
        return np.zeros(0, dtype=int)
    energy = np.sum((det[usable] / scale[usable, None]) ** 2, axis=0)
    width = max(1, int(round(_DET_SMOOTH_S * fs)))
    env = uniform_filter1d(energy, width, mode="nearest")
    peaks, _ = find_peaks(env, distance=max(1, int(round(_REFRACTORY_S * fs))))
    if peaks.size == 0:
        return cast(np.ndarray, peaks)
    heights = env[peaks]
    peaks = peaks[heights >= _PEAK_REL * np.percentile(heights, 90)]
    half = width // 2 + 1
    refined = np.array(
        [max(0, p - half) + int(np.argmax(energy[max(0, p - half) : p + half + 1])) for p in peaks], dtype=int
    )
    return np.unique(refined)


def _median_beat(
    clean: np.ndarray, det: np.ndarray, beats: np.ndarray, fs: float, pre: int, post: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Median of the aligned dominant beats, (L, pre + post), and those beats, (B, L, pre + post)."""
    n = clean.shape[1]
    m = max(1, int(round(_ALIGN_S * fs)))
    ok = beats[(beats - pre - m >= 0) & (beats + post + m <= n)]
    if ok.size < 2:
        return None
    offsets = np.arange(-pre - m, post + m)
    idx = ok[:, None] + offsets[None, :]  # (B, W + 2m)
    segs = np.transpose(clean[:, idx], (1, 0, 2))  # (B, L, W + 2m)
    dsegs = np.transpose(det[:, idx], (1, 0, 2))  # (B, Li, W + 2m)
    scale = np.percentile(np.abs(dsegs), 99, axis=(0, 2)) + 1e-12
    dsegs = dsegs / scale[None, :, None]
    q = max(2, int(round(_ALIGN_QRS_S * fs)))
    lo, hi = m + pre - q, m + pre + q
    template = np.median(dsegs[:, :, lo:hi], axis=0)  # (Li, 2q)
    lags = np.arange(-m, m + 1)
    scores = np.stack([np.einsum("blt,lt->b", dsegs[:, :, lo + k : hi + k], template) for k in lags])
    best = lags[np.argmax(scores, axis=0)]  # (B,)
    aligned = np.stack([segs[b, :, m + k : m + k + pre + post] for b, k in enumerate(best)])
    qrs = np.stack([dsegs[b, :, lo + k : hi + k].ravel() for b, k in enumerate(best)])
    t = template.ravel() - template.mean()
    qc = qrs - qrs.mean(axis=1, keepdims=True)
    corr = (qc @ t) / (np.linalg.norm(qc, axis=1) * np.linalg.norm(t) + 1e-12)
    keep = corr >= _MIN_CORR
    if keep.sum() < 2:
        keep = corr >= np.median(corr)
    return np.median(aligned[keep], axis=0), aligned[keep]


# --------------------------------------------------------------------------- delineation


def _quiet_run(curve: np.ndarray, start: int, stop: int, step: int, thr: float, run: int) -> int | None:
    """First index from ``start`` toward ``stop`` (exclusive) that begins ``run`` samples below thr."""
    count = 0
    for i in range(start, stop, step):
        if curve[i] < thr:
            count += 1
            if count >= run:
                return i - step * (run - 1)
        else:
            count = 0
    return None


def _moving_min(curve: np.ndarray, lo: int, hi: int, width: int) -> float:
    lo, hi = max(0, lo), min(len(curve), hi)
    if hi - lo <= width:
        return float(np.min(curve[lo:hi])) if hi > lo else float(np.min(curve))
    return float(np.min(uniform_filter1d(curve[lo:hi], width, mode="nearest")))


def _consistency(segs: np.ndarray) -> float:
    """Median correlation of each beat's segment (B, L, T) with the median segment."""
    if segs.shape[0] < 2 or segs.shape[2] < 3:
        return 0.0
    x = segs - segs.mean(axis=2, keepdims=True)
    ref = np.median(x, axis=0).ravel()
    flat = x.reshape(x.shape[0], -1)
    r = (flat @ ref) / (np.linalg.norm(flat, axis=1) * np.linalg.norm(ref) + 1e-12)
    return float(np.median(r))


@dataclass
class _Delineation:
    qrs_on: int
    qrs_off: int
    t_end: int | None
    p_on: int | None
    p_off: int | None
    p_consistency: float | None = None
    flags: list[str] = field(default_factory=list)


def _delineate(
    med: np.ndarray,
    ind: list[int],
    fs: float,
    c: int,
    rr_s: float,
    p_consistency: Callable[[int, int | None], float] | None = None,
) -> _Delineation | None:
    w = med.shape[1]

    def s(sec: float) -> int:
        return int(round(sec * fs))

    lp = _filter(med[ind], fs, None, _SV_LP_HZ) if fs > 2.5 * _SV_LP_HZ else med[ind]
    deriv = np.gradient(lp, axis=1) * fs
    sv = np.sqrt(np.sum(deriv**2, axis=0))
    sv = uniform_filter1d(sv, max(1, s(0.004)), mode="nearest")
    run = max(2, s(_QUIET_RUN_S))

    lo, hi = max(1, c - s(0.10)), min(w - 1, c + s(0.10))
    tmax = lo + int(np.argmax(sv[lo:hi]))
    svmax = float(sv[tmax])
    if svmax <= 0:
        return None
    iso = _moving_min(sv, c - s(0.30), c - s(0.04), s(0.02))
    thr_on = iso + _QRS_ON_FRAC * (svmax - iso)
    on = _quiet_run(sv, tmax, max(0, c - s(0.25)), -1, thr_on, run)
    st = _moving_min(sv, tmax + s(0.04), tmax + s(0.26), s(0.02))
    thr_off = st + _QRS_OFF_FRAC * (svmax - st)
    off = _quiet_run(sv, tmax, min(w, c + s(0.30)), 1, thr_off, run)
    if on is None or off is None or off <= on:
        return None
    d = _Delineation(qrs_on=on, qrs_off=off, t_end=None, p_on=None, p_off=None)

    base = lp[:, max(0, on - s(0.01)) : on + 1].mean(axis=1, keepdims=True)
    mag = np.sqrt(np.sum((lp - base) ** 2, axis=0))
    qrs_mag = float(np.max(mag[on : off + 1]))

    # P wave, on the 25 Hz median in [QRS onset - min(360 ms, 0.45 RR), QRS onset - 20 ms]:
    # the most prominent peak of the spatial magnitude of the leads less their PR level;
    # onset / offset where the spatial velocity before the first / after the last
    # velocity peak of the wave falls to a fraction of that peak above its floor.
    lp25 = _filter(med[ind], fs, None, 25.0)
    p_hi = on - s(0.02)
    p_lo = max(0, on - s(min(0.36, 0.45 * rr_s)))
    k = max(1, s(0.01))
    if p_hi - p_lo > s(0.08):
        seg = lp25[:, p_lo : p_hi + 1]
        magp = np.sqrt(np.sum((seg - seg[:, -k:].mean(axis=1, keepdims=True)) ** 2, axis=0))
        svp = uniform_filter1d(np.sqrt(np.sum((np.gradient(seg, axis=1) * fs) ** 2, axis=0)), k, mode="nearest")
        # the most prominent interior peak (a T wave tail at the window start is no peak)
        peaks, props = find_peaks(magp, prominence=_P_MIN_REL * qrs_mag)
        edge = s(0.02)
        inner = (peaks >= edge) & (peaks <= len(magp) - 1 - edge)
        if inner.any():
            ppk = int(peaks[inner][np.argmax(props["prominences"][inner])])
            # the P wave spans the lowest points between it and the next significant peaks
            left, right = peaks[peaks < ppk], peaks[peaks > ppk]
            a0 = int(left[-1]) if left.size else 0
            b0 = int(right[0]) if right.size else len(magp) - 1
            v1 = a0 + int(np.argmin(magp[a0 : ppk + 1]))
            v2 = ppk + int(np.argmin(magp[ppk : b0 + 1]))
            h1 = v1 + int(np.argmax(svp[v1 : ppk + 1]))
            h2 = ppk + int(np.argmax(svp[ppk : v2 + 1]))
            fl1 = float(np.percentile(svp[v1 : h1 + 1], 10))
            fl2 = float(np.percentile(svp[h2:], 10))
            p_on = _quiet_run(svp, h1, max(-1, v1 - s(0.02)), -1, fl1 + _P_FRAC * (float(svp[h1]) - fl1), run)
            p_off = _quiet_run(svp, h2, len(svp), 1, fl2 + _P_FRAC * (float(svp[h2]) - fl2), run)
            if p_on is not None:
                d.p_on = p_lo + p_on
                d.p_off = None if p_off is None else p_lo + p_off
                if p_consistency is not None:
                    d.p_consistency = p_consistency(d.p_on, d.p_off)
                    if d.p_consistency < _P_MIN_CONSISTENCY:  # not the same wave in every beat: no P
                        d.p_on = d.p_off = None
                        d.flags.append("p_wave_inconsistent")

    # T end: after the T peak (largest spatial magnitude from J + 60 ms to the search
    # end), where the spatial velocity of the descending limb falls to a fraction of its
    # peak above its floor. The search ends at min(R + 0.7 RR, R + 650 ms) and, when a P
    # wave was found, 20 ms before the next beat's P onset (fast rates put P on T).
    t_lo = off + s(0.06)
    t_hi = min(w - 1, c + s(min(0.65, 0.70 * rr_s)))
    if d.p_on is not None:
        t_hi = min(t_hi, d.p_on + s(rr_s) - s(0.02))
    if t_hi - t_lo > s(0.05):
        tpk = t_lo + int(np.argmax(mag[t_lo:t_hi]))
        svt = uniform_filter1d(sv, max(1, s(0.01)), mode="nearest")
        d_hi = min(t_hi, tpk + s(0.20))
        if d_hi > tpk + 1:
            desc = tpk + int(np.argmax(svt[tpk:d_hi]))
            floor = float(np.percentile(svt[desc : t_hi + 1], 10))
            thr = floor + _T_END_FRAC * (float(svt[desc]) - floor)
            d.t_end = _quiet_run(svt, desc, t_hi + 1, 1, thr, run)
    if d.t_end is None:
        d.flags.append("t_end_not_found")
    if d.p_on is None and "p_wave_inconsistent" not in d.flags:
        d.flags.append("p_wave_not_found")
    return d


# --------------------------------------------------------------------------- measures


def _axis(area_i: float, area_avf: float) -> float | None:
    if abs(area_i) < 1e-12 and abs(area_avf) < 1e-12:
        return None
    deg = math.degrees(math.atan2(2.0 * area_avf / math.sqrt(3.0), area_i))
    return 180.0 if deg <= -180.0 else deg


def _plausible(name: str, value: float | None, flags: list[str]) -> float | None:
    if value is None:
        return None
    lo, hi = _LIMITS.get(name, (-math.inf, math.inf))
    if not (lo <= value <= hi) or not math.isfinite(value):
        flags.append(f"implausible:{name}")
        return None
    return value


def _extrema_count(x: np.ndarray, min_prom: float) -> int:
    """Significant turning points (peaks and troughs) of a QRS complex."""
    peaks, _ = find_peaks(x, prominence=min_prom)
    troughs, _ = find_peaks(-x, prominence=min_prom)
    return int(len(peaks) + len(troughs))


#: Anatomically contiguous neighbours (anterior V1-V6 in sequence, lateral V5-V6-I-aVL, inferior II-III-aVF).
_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "V1": ("V2",),
    "V2": ("V1", "V3"),
    "V3": ("V2", "V4"),
    "V4": ("V3", "V5"),
    "V5": ("V4", "V6"),
    "V6": ("V5", "I"),
    "I": ("aVL", "V6"),
    "aVL": ("I",),
    "II": ("III", "aVF"),
    "III": ("II", "aVF"),
    "aVF": ("II", "III"),
}


def _contiguous(leads: list[str]) -> tuple[str, ...]:
    """The leads that have at least one contiguous neighbour in the list too."""
    hit = set(leads)
    return tuple(lead for lead in leads if any(n in hit for n in _NEIGHBOURS.get(lead, ())))


def _detection(x: np.ndarray, fs: float, leads: list[str]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """(independent-lead rows, filtered signals, detection signal, QRS fiducials): measure()'s first step."""
    ind = [leads.index(lead) for lead in _INDEPENDENT if lead in leads] or list(range(len(leads)))
    clean = _filter(x, fs, _HP_HZ, _LP_HZ if fs >= 250 else None)
    det = _filter(clean[ind], fs, _DET_BAND[0], _DET_BAND[1])
    return ind, clean, det, _detect_beats(det, fs)


class SignalViews:
    """One ECG's samples as the quality gate and the measurements both read them, prepared once.

    ``x``: float64 (leads, samples), non-finite samples zeroed; ``finite``: where they were
    finite. :meth:`detection` (the measurement filter and the QRS fiducials) is computed on
    first use and kept: the gate's limb-lead check and the measurements share one QRS detector.
    """

    def __init__(self, ecg: Ecg) -> None:
        self.ecg = ecg
        raw = np.asarray(ecg.signals, dtype=np.float64)
        self.finite = np.isfinite(raw)
        self.all_finite = bool(self.finite.all())
        self.x = raw if self.all_finite else np.where(self.finite, raw, 0.0)
        self._detection: tuple[list[int], np.ndarray, np.ndarray, np.ndarray] | None = None

    def detection(self) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        """(independent-lead rows, measurement-filtered signals, detection signal, QRS fiducials)."""
        if self._detection is None:
            self._detection = _detection(self.x, float(self.ecg.fs), list(self.ecg.leads))
        return self._detection

    @property
    def qrs_fiducials(self) -> np.ndarray:
        """QRS fiducials (sample indices) as :func:`measure` finds them."""
        return self.detection()[3]


def detect_beats(ecg: Ecg) -> np.ndarray:
    """QRS fiducials (sample indices) exactly as :func:`measure` finds them (for agreement benchmarks)."""
    return SignalViews(ecg).qrs_fiducials


def measure(ecg: Ecg, views: SignalViews | None = None) -> Measurements:
    """Global measurements of ``ecg`` (see the module docstring for what and how).

    ``views``: the ECG's :class:`SignalViews` when the caller (the analysis) shares them with
    the quality gate; made here otherwise.
    """
    views = views if views is not None and views.ecg is ecg else SignalViews(ecg)
    fs = float(ecg.fs)
    flags: list[str] = []
    zscore = "units:zscore" in ecg.flags
    if zscore:
        flags.append("amplitudes_unavailable:zscore")
    if not views.all_finite:
        flags.append("nonfinite_samples_zeroed")
    leads = list(ecg.leads)
    missing = [lead for lead in (*_LIMB, *_PRECORDIAL) if lead not in leads]
    if missing:
        flags.append("missing_leads:" + ",".join(missing))
    ind, clean, det, beats = views.detection()
    empty = Measurements(fs=fs, n_beats=int(beats.size), n_beats_median=0, flags=())
    if beats.size < 2:
        return _with_flags(empty, flags + ["too_few_beats"])

    rr = np.diff(beats) / fs
    rr_mean = float(np.mean(rr))
    rr_med = float(np.median(rr))
    heart_rate = _plausible("heart_rate", 60.0 / rr_mean, flags)
    rr_ms = rr_mean * 1000.0 if heart_rate is not None else None

    pre = int(round(min(0.45, 0.60 * rr_med) * fs))
    post = int(round(min(0.70, 0.90 * rr_med) * fs))
    built = _median_beat(clean, det, beats, fs, pre, post)
    if built is None:
        return _with_flags(
            Measurements(fs=fs, n_beats=int(beats.size), n_beats_median=0, heart_rate=heart_rate, rr_interval=rr_ms),
            flags + ["too_few_beats"],
        )
    med, kept = built
    n_used = int(kept.shape[0])
    fs_med = fs
    if fs < _DELINEATE_MIN_FS:  # e.g. 100 Hz: delineate a band-limited upsampled median
        up = int(math.ceil(_DELINEATE_MIN_FS / fs))
        med = resample_poly(med, up, 1, axis=1)
        fs_med, pre = fs * up, pre * up
    scale = fs / fs_med

    def p_consistency(p_on: int, p_off: int | None) -> float:
        a = int(round(p_on * scale))
        b = int(round((p_off if p_off is not None else p_on + 0.1 * fs_med) * scale))
        return _consistency(kept[:, ind, a : b + 1])

    d = _delineate(med, ind, fs_med, pre, rr_med, p_consistency)
    if d is None:
        return _with_flags(
            Measurements(
                fs=fs, n_beats=int(beats.size), n_beats_median=n_used, heart_rate=heart_rate, rr_interval=rr_ms
            ),
            flags + ["qrs_not_delineated"],
        )
    flags.extend(d.flags)
    fs = fs_med
    ms = 1000.0 / fs
    qrs = _plausible("qrs_duration", (d.qrs_off - d.qrs_on) * ms, flags)
    pr = _plausible("pr_interval", (d.qrs_on - d.p_on) * ms, flags) if d.p_on is not None else None
    qt = _plausible("qt_interval", (d.t_end - d.qrs_on) * ms, flags) if d.t_end is not None else None
    qtc_b = qtc_f = None
    if qt is not None and rr_ms is not None:
        qtc_b = qt / math.sqrt(rr_ms / 1000.0)
        qtc_f = qt / (rr_ms / 1000.0) ** (1.0 / 3.0)

    fid = Fiducials(
        p_onset=None if d.p_on is None else (d.p_on - pre) * ms,
        p_offset=None if d.p_off is None else (d.p_off - pre) * ms,
        qrs_onset=(d.qrs_on - pre) * ms,
        qrs_offset=(d.qrs_off - pre) * ms,
        t_end=None if d.t_end is None else (d.t_end - pre) * ms,
    )
    morph = _morphology(med, leads, fs, d, qrs)
    out = Measurements(
        fs=float(ecg.fs),
        n_beats=int(beats.size),
        n_beats_median=n_used,
        heart_rate=heart_rate,
        rr_interval=rr_ms,
        pr_interval=pr,
        qrs_duration=qrs,
        qt_interval=qt,
        qtc_bazett=qtc_b,
        qtc_fridericia=qtc_f,
        qrs_morphology=morph,
        fiducials=fid,
    )
    if zscore:
        return _with_flags(out, flags)
    return _with_flags(_amplitude_measures(out, med, leads, fs, d, qrs), flags)


def _with_flags(m: Measurements, flags: list[str]) -> Measurements:
    return replace(m, flags=tuple(dict.fromkeys(flags)))


def _baseline(med: np.ndarray, on: int, fs: float) -> np.ndarray:
    return cast(np.ndarray, med[:, max(0, on - int(round(0.01 * fs))) : on + 1].mean(axis=1))


def _morphology(med: np.ndarray, leads: list[str], fs: float, d: _Delineation, qrs: float | None) -> str | None:
    """Bundle-branch-block pattern from signs of QRS areas (scale-free)."""
    if qrs is None:
        return None
    if qrs < 120.0:
        return "normal"
    need = ("I", "V1", "V6")
    if any(lead not in leads for lead in need):
        return None
    base = _baseline(med, d.qrs_on, fs)

    def complex_(lead: str) -> np.ndarray:
        i = leads.index(lead)
        return cast(np.ndarray, med[i, d.qrs_on : d.qrs_off + 1] - base[i])

    v1, lead_i, v6 = complex_("V1"), complex_("I"), complex_("V6")
    if min(v1.size, lead_i.size, v6.size) < 4:
        return None

    def dominant(x: np.ndarray) -> float:  # > 0: mostly positive complex, < 0: mostly negative
        return float(x.max() + x.min())

    def no_q(x: np.ndarray) -> bool:
        k = max(1, int(np.argmax(x)))
        return -float(x[:k].min(initial=0.0)) < 0.15 * float(x.max())

    # LBBB: V1 predominantly negative (QS / rS); I and V6 broad, predominantly positive, no q.
    if dominant(v1) < 0 and dominant(lead_i) > 0 and dominant(v6) > 0 and no_q(lead_i) and no_q(v6):
        return "LBBB"
    # RBBB: a terminal R / R' in V1 and a terminal S in I or V6 (last 40 % of the QRS).
    tail = max(2, int(round(0.4 * v1.size)))

    def terminal_s(x: np.ndarray) -> bool:
        return float(x[-tail:].min()) < -0.15 * float(np.abs(x).max())

    if float(v1[-tail:].max()) > 0.25 * float(np.abs(v1).max()) and (terminal_s(lead_i) or terminal_s(v6)):
        return "RBBB"
    return "IVCD"


def _amplitude_measures(
    m: Measurements, med: np.ndarray, leads: list[str], fs: float, d: _Delineation, qrs: float | None
) -> Measurements:
    base = _baseline(med, d.qrs_on, fs)
    ms = 1000.0 / fs
    r_amp: dict[str, float] = {}
    s_amp: dict[str, float] = {}
    ptp: dict[str, float] = {}
    area: dict[str, float] = {}
    q_hits: list[str] = []
    frag: list[str] = []
    st: dict[str, float] = {}
    t_inv: list[str] = []
    j60 = d.qrs_off + int(round(0.06 * fs))
    lbbb_like = m.qrs_morphology == "LBBB"
    for i, lead in enumerate(leads):
        x = med[i, d.qrs_on : d.qrs_off + 1] - base[i]
        if x.size < 3:
            continue
        k = int(np.argmax(x))
        r = max(0.0, float(x[k]))
        has_r = r >= 0.05
        s = max(0.0, -float(x[k:].min())) if has_r else max(0.0, -float(x.min()))
        r_amp[lead], s_amp[lead] = r, s
        ptp[lead] = float(x.max() - x.min())
        area[lead] = float(x.sum()) * ms
        # Q wave: initial negative deflection before the R peak.
        if lead not in ("aVR", "III", "V1") and not lbbb_like:
            if not has_r:
                q_hits.append(lead)  # QS complex
            elif x[0:k].size and float(x[:k].min()) < 0:
                neg = np.nonzero(x[:k] >= 0)[0]
                q_end = int(neg[0]) if neg.size and neg[0] > 0 else int(np.argmin(x[:k])) * 2
                q_ms = q_end * ms
                q_depth = -float(x[:k].min())
                if lead in ("V2", "V3"):
                    if q_ms >= 20.0 and q_depth >= 0.05:
                        q_hits.append(lead)
                elif q_ms >= 30.0 and q_depth >= 0.1:
                    q_hits.append(lead)
        # fragmented QRS: extra notches beyond the q-R-S turning points (conservative).
        prom = max(0.05, 0.10 * ptp[lead])
        n_ext = _extrema_count(x, prom)
        if qrs is not None and n_ext >= (_FRAG_EXTREMA_NARROW if qrs < 120.0 else _FRAG_EXTREMA_WIDE):
            frag.append(lead)
        if j60 < med.shape[1]:
            st[lead] = float(med[i, j60] - base[i])
        if d.t_end is not None and d.t_end > d.qrs_off + int(round(0.08 * fs)):
            tw = med[i, d.qrs_off + int(round(0.08 * fs)) : d.t_end + 1] - base[i]
            ext = float(tw[int(np.argmax(np.abs(tw)))])
            if lead != "aVR" and ext <= -0.1:
                t_inv.append(lead)

    def get(table: dict[str, float], lead: str) -> float | None:
        return table.get(lead)

    sokolow = None
    if all(lead in r_amp for lead in ("V1", "V5", "V6")):
        sokolow = s_amp["V1"] + max(r_amp["V5"], r_amp["V6"])
    cornell = None
    if "aVL" in r_amp and "V3" in s_amp:
        cornell = r_amp["aVL"] + s_amp["V3"]
    low_limb = (
        all(lead in ptp for lead in _LIMB) and all(ptp[lead] < 0.5 for lead in _LIMB)
        if all(lead in ptp for lead in _LIMB)
        else None
    )
    low_prec = all(ptp[lead] < 1.0 for lead in _PRECORDIAL) if all(lead in ptp for lead in _PRECORDIAL) else None

    def net(lead: str, a: int | None, b: int | None, linear: bool = False) -> float | None:
        if lead not in leads or a is None or b is None or b <= a:
            return None
        y = med[leads.index(lead), a : b + 1]
        ref = np.linspace(y[0], y[-1], y.size) if linear else base[leads.index(lead)]
        return float(np.sum(y - ref))

    def axis_of(a: int | None, b: int | None, linear: bool = False) -> float | None:
        ai, af = net("I", a, b, linear), net("aVF", a, b, linear)
        return None if ai is None or af is None else _axis(ai, af)

    p_axis = axis_of(d.p_on, d.p_off, linear=True) if d.p_off is not None else None
    qrs_axis = axis_of(d.qrs_on, d.qrs_off)
    t_axis = axis_of(d.qrs_off, d.t_end)
    q_final = _contiguous(q_hits)
    frag_final = _contiguous(frag)
    return replace(
        m,
        p_axis=p_axis,
        qrs_axis=qrs_axis,
        t_axis=t_axis,
        r_amplitude=r_amp,
        s_amplitude=s_amp,
        qrs_area=area,
        sokolow_lyon=sokolow,
        cornell=cornell,
        q_waves=q_final,
        st_deviation=st or None,
        t_inversion=tuple(t_inv),
        fragmented_qrs=frag_final,
        low_voltage_limb=low_limb,
        low_voltage_precordial=low_prec,
    )
