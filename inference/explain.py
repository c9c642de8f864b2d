"""Rendered explanations: a 12-lead printout with the model's class activation map, as PNG and PDF.

The page is what a cardiologist expects from a cart: A4 landscape ECG paper (1 mm minor,
5 mm major grid), 25 mm/s, 10 mm/mV (halved, then halved again, when the largest lead
would not fit its row: the gain is printed and the calibration pulse drawn at it), the
3 x 4 layout (I II III | aVR aVL aVF | V1 V2 V3 | V4 V5 V6, 2.5 s per column, the columns
consecutive in time) and a 10 s lead II rhythm strip. Above the grid: model name and
version, every finding with probability, threshold and tier, the quality flags and any
measurements; the "NOT FOR CLINICAL USE" label is printed on the page twice. Under the
findings, a model with explanations (the knowledge-transfer model) gets a short section
"Predicted from the ECG (not measured)": each clinical abnormality its ECG pattern is
associated with, with its probability, in the words of :mod:`mapping.abnormality_result`
(or that a poor-quality ECG withheld them); up to four lines, the findings shortened first.

**Heatmap.** Behind the traces, in blue, the class activation map (CAM) of the *top
finding*: the present finding with the highest probability, else the finding with the
highest probability. CAMs come from the model graph (``LoadedModel.explain``) over the
model's input window: the first ``n_samples / fs`` seconds (10 s) of the recording, step
``j`` covering ``[j, j + 1) * window / T'`` seconds. Both the 3 x 4 rows and the rhythm
strip run 0..10 s from left to right at 25 mm/s, so one map lies under every row at the
same times. Only positive evidence above the map's median is shaded, scaled to its
maximum (a global-average-pool head adds a per-class constant, so a confident class's map
is positive everywhere; the median keeps the *where* visible); the map has no lead axis
(the network pools the leads in its first layers),
so the shading says *when*, not *which lead*. Without a map (the model has no ``cams``
output) the page says so and shows no shading.

**Identity on the page.** Patient id (with issuer), acquisition time, device and source
are printed; the patient *name* is not. The attachment is copied into the EHR and, from
there, to systems outside the chart (HIE exports, image viewers, research extracts, mail
to a referrer) that never check who may see it; the id is enough to match a printout to
the chart, and a name printed into a rasterised image cannot be redacted later.

Rendering uses the object-oriented matplotlib API on the Agg canvas (no pyplot, no
global state, safe in a worker process) and is deterministic: the same ECG and result
give the same bytes, so the content-addressed blob store keeps one copy.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import signal as sps

from ecgbridge.mapping.abnormality_result import SECTION_TITLE, predicted_abnormalities, withheld_reason
from ecgbridge.mapping.ecg import NOT_FOR_CLINICAL_USE, AnalysisResult, Ecg, Finding, ModelOutput
from ecgbridge.mapping.lvef_result import LVEF_TASK, predicted_tier

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ecgbridge.inference.models import LoadedModel

__all__ = [
    "CamSet",
    "cams_for",
    "top_finding",
    "explained_output",
    "render_figure",
    "render_png",
    "render_pdf",
    "render_both",
    "LAYOUT",
    "PNG_DPI",
]

#: The 3 x 4 layout (rows of leads; column c shows seconds 2.5 c .. 2.5 (c + 1)).
LAYOUT: tuple[tuple[str, ...], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)
RHYTHM_LEAD = "II"
_MAX_LINES = 9  # header lines per column
_PREDICTED_LINES = 4  # of them at most for the predicted clinical abnormalities
PNG_DPI = 150  #: 1 mm = 5.9 px: the minor grid stays visible

# Page geometry in millimetres (A4 landscape).
_PAGE_W, _PAGE_H = 297.0, 210.0
_GRID_LEFT, _GRID_BOTTOM, _GRID_W, _GRID_H = 16.0, 14.0, 265.0, 140.0
_TRACE_X0 = 10.0  # traces start after the calibration pulse
_SPEED = 25.0  # mm/s
_SECONDS = 10.0
_COLUMN_S = 2.5
_ROW_PITCH = _GRID_H / 4.0
_GAINS = (10.0, 5.0, 2.5, 1.25)  # mm per mV, standard first

_MINOR, _MAJOR = "#f6c9c4", "#e58f86"
_TRACE = "#111111"
_HEAT_RGB = (0.12, 0.35, 0.95)
_HEAT_ALPHA = 0.5
_LABEL_RED = "#b00020"

_MEASUREMENTS: dict[str, tuple[str, str]] = {
    "heart_rate": ("HR", "/min"),
    "pr_interval": ("PR", "ms"),
    "qrs_duration": ("QRS", "ms"),
    "qt_interval": ("QT", "ms"),
    "qtc_interval": ("QTc", "ms"),
    "p_axis": ("P axis", "deg"),
    "qrs_axis": ("QRS axis", "deg"),
    "t_axis": ("T axis", "deg"),
    "lvef": ("LVEF", "%"),
}
#: Quality flags of the form ``issue:LEAD,LEAD`` whose leads are marked on their panels.
_LEAD_ISSUES = {
    "flat_leads": "flat",
    "missing_leads": "missing",
    "clipped_leads": "clipped",
    "hf_noise": "noise",
    "motion_artefact": "artefact",
    "baseline_wander": "wander",
    "nonfinite_samples": "NaN",
    "implausible_amplitude": "amplitude",
}


@dataclass(frozen=True)
class CamSet:
    """Class activation maps of one model for one ECG.

    ``maps[k]`` belongs to class ``classes[k]``; the maps span the first ``window_s``
    seconds of the recording (the model's input window).
    """

    maps: np.ndarray  # (classes, T')
    classes: tuple[str, ...]
    window_s: float = _SECONDS
    model: str | None = None
    version: str | None = None

    def __post_init__(self) -> None:
        maps = np.asarray(self.maps, dtype=np.float32)
        if maps.ndim != 2 or maps.shape[0] != len(self.classes) or maps.shape[1] < 1:
            raise ValueError(f"CAMs of shape {maps.shape} do not fit {len(self.classes)} classes")
        if not self.window_s > 0:
            raise ValueError("CamSet.window_s must be positive")
        object.__setattr__(self, "maps", maps)

    def for_class(self, code: str) -> np.ndarray | None:
        return self.maps[self.classes.index(code)] if code in self.classes else None


Cams = CamSet | np.ndarray | None


def cams_for(model: LoadedModel, ecg: Ecg) -> CamSet | None:
    """The model's CAMs for ``ecg``, or None when its graph has no ``cams`` output."""
    from ecgbridge.errors import ModelError

    if "cams" not in model.manifest.outputs or not hasattr(model, "explain"):
        return None
    try:
        maps = model.explain(ecg)
    except ModelError:
        return None
    m = model.manifest
    return CamSet(
        maps=maps,
        classes=tuple(c.code for c in m.classes),
        window_s=m.input.n_samples / m.input.fs_hz,
        model=m.name,
        version=m.version,
    )


def top_finding(output: ModelOutput) -> Finding | None:
    """The present finding with the highest probability, else the most probable one."""
    if not output.findings:
        return None
    present = [f for f in output.findings if f.present]
    return max(present or output.findings, key=lambda f: f.probability)


def explained_output(result: AnalysisResult, cams: Cams) -> ModelOutput | None:
    """The output the maps belong to: the CamSet's model, else the first output."""
    if not result.outputs:
        return None
    if isinstance(cams, CamSet) and cams.model is not None:
        for output in result.outputs:
            if output.model == cams.model and (cams.version is None or output.version == cams.version):
                return output
    return result.outputs[0]


def _as_camset(cams: Cams, output: ModelOutput | None) -> CamSet | None:
    if cams is None or output is None:
        return None
    if isinstance(cams, CamSet):
        return cams
    return CamSet(
        maps=np.asarray(cams),
        classes=tuple(f.code for f in output.findings),
        model=output.model,
        version=output.version,
    )


# --------------------------------------------------------------------------- signal for display


def _display_signal(ecg: Ecg) -> tuple[dict[str, np.ndarray], bool]:
    """Lead name -> samples for the page (0.05 Hz zero-phase high-pass, NaN kept as gaps)."""
    x = np.asarray(ecg.signals, dtype=np.float64)
    finite = np.isfinite(x)
    filled = np.where(finite, x, 0.0)
    filtered = False
    if x.shape[1] > int(3 * ecg.fs):
        sos = sps.butter(1, 0.05 / (ecg.fs / 2.0), btype="high", output="sos")
        filled = sps.sosfiltfilt(sos, filled, axis=-1)
        filtered = True
    shown = np.where(finite, filled, np.nan)
    return {lead: shown[i] for i, lead in enumerate(ecg.leads)}, filtered


def _gain(signals: Mapping[str, np.ndarray]) -> float:
    spans = [
        np.nanpercentile(s, 99.5) - np.nanpercentile(s, 0.5)
        for s in signals.values()
        if s.size and np.isfinite(s).any()
    ]
    span = max(spans, default=1.0)
    for gain in _GAINS:
        if span * gain <= _ROW_PITCH * 0.95:
            return gain
    return _GAINS[-1]


def _lead_marks(flags: tuple[str, ...]) -> dict[str, list[str]]:
    marks: dict[str, list[str]] = {}
    for flag in flags:
        name, _, leads = flag.partition(":")
        if name in _LEAD_ISSUES and leads:
            for lead in leads.split(","):
                marks.setdefault(lead.strip(), []).append(_LEAD_ISSUES[name])
    return marks


# --------------------------------------------------------------------------- drawing

_Segment = tuple[tuple[float, float], tuple[float, float]]  # a grid line, (x0, y0) -> (x1, y1) in mm


def _paper(ax: Axes) -> None:
    from matplotlib.collections import LineCollection

    minor_x: list[_Segment] = [((x, 0), (x, _GRID_H)) for x in np.arange(0, _GRID_W + 0.01, 1.0) if round(x) % 5]
    minor_y: list[_Segment] = [((0, y), (_GRID_W, y)) for y in np.arange(0, _GRID_H + 0.01, 1.0) if round(y) % 5]
    major_x: list[_Segment] = [((x, 0), (x, _GRID_H)) for x in np.arange(0, _GRID_W + 0.01, 5.0)]
    major_y: list[_Segment] = [((0, y), (_GRID_W, y)) for y in np.arange(0, _GRID_H + 0.01, 5.0)]
    ax.add_collection(LineCollection(minor_x + minor_y, colors=_MINOR, linewidths=0.25, zorder=0))
    ax.add_collection(LineCollection(major_x + major_y, colors=_MAJOR, linewidths=0.6, zorder=1))


def _heatmap(ax: Axes, cam: np.ndarray, window_s: float, duration_s: float) -> bool:
    """Shade positive CAM evidence under every row, one band per map step; False when there is none.

    Step ``j`` is drawn over ``[j, j + 1) * window_s / T'`` seconds of every row, at the
    map's own resolution (no smoothing that would suggest a finer one).
    """
    from matplotlib.collections import PolyCollection

    raw = np.nan_to_num(cam.astype(np.float64))
    step = window_s / raw.size
    shown_s = min(window_s, duration_s, _SECONDS)
    n_shown = max(1, min(raw.size, int(np.ceil(shown_s / step - 1e-9))))
    shown = raw[:n_shown]
    # Positive evidence above the map's own median: a GAP head adds a constant per class, so a
    # confident class has a map positive everywhere; the median keeps "where" visible.
    floor = max(float(np.median(shown)), 0.0)
    values = np.clip(shown - floor, 0.0, None)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0:
        return False
    boxes, colours = [], []
    for j, v in enumerate(values):
        if v <= 0:
            continue
        x0 = _TRACE_X0 + _SPEED * j * step
        x1 = _TRACE_X0 + _SPEED * (j + 1) * step
        boxes.append(((x0, 0.0), (x1, 0.0), (x1, _GRID_H), (x0, _GRID_H)))
        colours.append((*_HEAT_RGB, _HEAT_ALPHA * v / peak))
    ax.add_collection(PolyCollection(boxes, facecolors=colours, edgecolors="none", antialiaseds=False, zorder=2))
    return True


def _calibration(ax: Axes, y0: float, gain: float) -> None:
    xs = [1.0, 3.0, 3.0, 8.0, 8.0, 9.5]
    ys = [y0, y0, y0 + gain, y0 + gain, y0, y0]
    ax.plot(xs, ys, color=_TRACE, linewidth=0.7, zorder=4, solid_joinstyle="miter")


def _trace(ax: Axes, samples: np.ndarray, fs: float, t0: float, t1: float, y0: float, gain: float) -> None:
    i0, i1 = round(t0 * fs), min(round(t1 * fs), samples.size)
    if i1 - i0 < 2:
        return
    seg = samples[i0:i1]
    centre = float(np.nanmedian(seg)) if np.isfinite(seg).any() else 0.0
    t = np.arange(i0, i1) / fs
    ax.plot(
        _TRACE_X0 + _SPEED * t,
        y0 + gain * (seg - centre),
        color=_TRACE,
        linewidth=0.55,
        zorder=4,
        solid_joinstyle="round",
        antialiased=True,
    )


def _label(ax: Axes, x: float, y: float, text: str, marks: list[str] | None) -> None:
    suffix = f" ({', '.join(marks)})" if marks else ""
    ax.text(
        x,
        y,
        text + suffix,
        fontsize=7.5,
        fontweight="bold",
        color=_LABEL_RED if marks else _TRACE,
        ha="left",
        va="bottom",
        zorder=5,
        parse_math=False,
    )


def _fmt_time(dt: datetime | None) -> str:
    if dt is None:
        return "not given"
    text = dt.isoformat(sep=" ", timespec="seconds")
    return text if dt.tzinfo is not None else text + " (no time zone given)"


def _wrap(lines: list[str], width: int) -> list[str]:
    """Lines folded to ``width`` characters (7 pt text in a header column), continuation indented."""
    out: list[str] = []
    for line in lines:
        out.extend(
            textwrap.wrap(line, width, subsequent_indent="    ", break_long_words=True, break_on_hyphens=False) or [""]
        )
    return out


def _finding_line(f: Finding, top: Finding | None, withheld: Mapping[str, Any] | None = None) -> str:
    mark = "+" if f.present else "-"
    tier = f", tier {f.tier}" if f.tier else ""
    was = (withheld or {}).get(f.code)
    gate = ""
    if isinstance(was, Mapping):  # inference.quality.cap_for_quality changed this decision
        before = [] if bool(was.get("present")) == f.present else ["present" if was.get("present") else "absent"]
        if was.get("tier") != f.tier:
            before.append(f"tier {was.get('tier') or 'none'}")
        gate = f" [gate: was {', '.join(before)}]"
    star = "  <- shaded" if top is not None and f is top else ""
    return f"{mark} {f.display} ({f.code}): p={f.probability:.2f} (threshold {f.threshold:.2f}){tier}{gate}{star}"


def _predicted_lines(result: AnalysisResult) -> list[str]:
    """The "Predicted from the ECG (not measured)" section: one paragraph per model that has one."""
    lines: list[str] = []
    for o in result.outputs:
        reason = withheld_reason(o)
        if reason is not None:
            lines.append(f"{SECTION_TITLE}: withheld ({reason.replace('_', ' ')} ECG).")
            continue
        found = predicted_abnormalities(o, strict=False)
        if found:
            listed = "; ".join(f"{a.display} p={a.probability:.2f}" for a in found)
            lines += [f"{SECTION_TITLE}:", f"ECG pattern associated with {listed}."]
    return lines


def render_figure(
    ecg: Ecg,
    result: AnalysisResult,
    cams: Cams = None,
    measurements: Mapping[str, Any] | None = None,
) -> Figure:
    """The page as a matplotlib Figure (A4 landscape, 1 data unit = 1 mm on the grid)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_PAGE_W / 25.4, _PAGE_H / 25.4))
    fig.patch.set_facecolor("white")
    ax = fig.add_axes((_GRID_LEFT / _PAGE_W, _GRID_BOTTOM / _PAGE_H, _GRID_W / _PAGE_W, _GRID_H / _PAGE_H))
    ax.set_xlim(0, _GRID_W)
    ax.set_ylim(0, _GRID_H)
    ax.set_axis_off()
    _paper(ax)

    signals, filtered = _display_signal(ecg)
    zscore = "units:zscore" in ecg.flags or ecg.units.lower() == "zscore"
    gain = _gain(signals)
    marks = _lead_marks(tuple(result.quality_flags) + tuple(result.ecg_flags))

    output = explained_output(result, cams)
    camset = _as_camset(cams, output)
    top = top_finding(output) if output is not None else None
    heat_note: str
    shaded = False
    if camset is None:
        name = f"{output.model} {output.version}" if output else "the model"
        heat_note = f"No heatmap: {name} provides no class activation map."
    elif top is None or camset.for_class(top.code) is None:
        heat_note = "No heatmap: the maps do not cover the top finding."
    elif _heatmap(ax, camset.for_class(top.code), camset.window_s, ecg.duration_s):  # type: ignore[arg-type]
        shaded = True
        heat_note = (
            f"Blue shading: class activation map of {top.display} ({top.code}) where it is positive and "
            f"above its median, scaled to its maximum, over the first {camset.window_s:g} s (the model's "
            "input); it marks times, not leads."
        )
    else:
        heat_note = f"No heatmap: the map of {top.display} ({top.code}) has no positive evidence above its median."

    # rows: three of the 3 x 4 layout, then the rhythm strip
    for r in range(4):
        y0 = _GRID_H - _ROW_PITCH * (r + 0.5)
        _calibration(ax, y0, gain)
        leads = LAYOUT[r] if r < 3 else (RHYTHM_LEAD,)
        for c, lead in enumerate(leads):
            t0 = c * _COLUMN_S
            t1 = t0 + (_COLUMN_S if r < 3 else _SECONDS)
            x = _TRACE_X0 + _SPEED * t0
            label_y = y0 + _ROW_PITCH * 0.33
            if lead in signals:
                _trace(ax, signals[lead], ecg.fs, t0, t1, y0, gain)
                _label(ax, x + 1.0, label_y, lead if r < 3 else f"{lead} (rhythm)", marks.get(lead))
            else:
                _label(ax, x + 1.0, label_y, lead, ["absent"])
            if r < 3 and c > 0:  # column boundary tick, as carts print it
                ax.plot([x, x], [y0 - 3.0, y0 + 3.0], color=_TRACE, linewidth=0.8, zorder=4)
    if ecg.duration_s < _SECONDS:
        ax.text(
            _TRACE_X0 + _SPEED * ecg.duration_s + 2,
            2.0,
            f"recording ends at {ecg.duration_s:.1f} s",
            fontsize=7,
            color=_LABEL_RED,
            zorder=5,
            parse_math=False,
        )

    def text(x_mm: float, y_mm: float, s: str, **kw: Any) -> None:
        kw.setdefault("fontsize", 7)
        kw.setdefault("va", "top")
        fig.text(x_mm / _PAGE_W, y_mm / _PAGE_H, s, parse_math=False, **kw)

    top_y = _PAGE_H - 6.0
    text(
        _GRID_LEFT,
        top_y + 1.5,
        "AI ECG ANALYSIS - NOT FOR CLINICAL USE",
        fontsize=11,
        fontweight="bold",
        color=_LABEL_RED,
    )
    scored = [o for o in result.outputs if o.findings]
    models = ", ".join(f"{o.model} {o.version} ({o.task})" for o in scored) or "no model findings"
    text(_GRID_LEFT, top_y - 5.0, f"Model: {models}", fontsize=8, fontweight="bold")
    head_y, body_y = top_y - 10.5, top_y - 15.0
    patient = ecg.patient
    pid = patient.id or "not given"
    if patient.id and patient.id_issuer:
        pid += f" ({patient.id_issuer})"
    study = ecg.study
    lines = [
        f"Patient ID: {pid}",
        f"Acquired: {_fmt_time(study.acquired_at)}",
        f"Device: {study.device or 'not given'}    Source: {ecg.source_format}",
        f"Recording: {ecg.duration_s:.1f} s at {ecg.fs:g} Hz, {len(ecg.leads)} leads",
    ]
    if study.accession_number:
        lines.append(f"Accession: {study.accession_number}")
    text(_GRID_LEFT, head_y, "Recording", fontsize=8, fontweight="bold")
    text(_GRID_LEFT, body_y, "\n".join(_wrap(lines, 56)[:_MAX_LINES]), linespacing=1.3)

    finding_lines: list[str] = []
    for o in scored:
        if len(scored) > 1:
            finding_lines.append(f"{o.model} {o.version}:")
        gate = o.extra.get("quality_gate") if isinstance(o.extra, Mapping) else None
        withheld = gate.get("withheld") if isinstance(gate, Mapping) else None
        if o.task == LVEF_TASK:  # four tier probabilities would crowd the column: one line, details on page 2
            chosen = predicted_tier(o)
            if chosen is not None:
                finding_lines.append(
                    f"LVEF tier: {chosen.display} p={chosen.probability:.2f} "
                    f"({o.extra.get('variant', '?')}; PDF page 2)"
                )
            continue
        finding_lines.extend(_finding_line(f, top if shaded and o is output else None, withheld) for f in o.findings)
    finding_lines = _wrap(finding_lines, 78)
    predicted = _wrap(_predicted_lines(result), 78)
    if len(predicted) > _PREDICTED_LINES:
        predicted = predicted[: _PREDICTED_LINES - 1] + [predicted[_PREDICTED_LINES - 1][:74] + " ..."]
    room = _MAX_LINES - len(predicted)
    if len(finding_lines) > room:
        finding_lines = finding_lines[: room - 1] + [f"... {len(finding_lines) - room + 1} more"]
    finding_lines += predicted
    text(95.0, head_y, "Findings (+ above threshold)", fontsize=8, fontweight="bold")
    text(95.0, body_y, "\n".join(finding_lines) or "none", linespacing=1.3)

    poor = "poor_quality" in result.quality_flags
    quality = "POOR - interpret with caution" if poor else "acceptable"
    text(
        205.0, head_y, f"Signal quality: {quality}", fontsize=8, fontweight="bold", color=_LABEL_RED if poor else _TRACE
    )
    flag_lines = [f for f in (*result.quality_flags, *result.ecg_flags) if f != "poor_quality"]
    right = [*(flag_lines[:5] or ["no quality flags"])]
    if len(flag_lines) > 5:
        right.append(f"... {len(flag_lines) - 5} more")
    values = []
    for key, raw in (_measurements_of(result) if measurements is None else measurements).items():
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not np.isfinite(raw):
            continue
        label, unit = _MEASUREMENTS.get(key, (key, ""))
        number = f"{raw:.0f}" if unit in ("ms", "deg", "/min") else f"{raw:g}"
        values.append(f"{label} {number} {unit}".strip())
    if values:
        right.append("Measurements:")
        right.extend(", ".join(values[i : i + 3]) for i in range(0, min(len(values), 9), 3))
    text(205.0, body_y, "\n".join(_wrap(right, 54)[:_MAX_LINES]), linespacing=1.3)

    text(_GRID_LEFT, _GRID_BOTTOM + _GRID_H + 4.5, heat_note, fontsize=6.5, color="#1a3fb0", va="bottom")

    unit = "z-score unit (source not in mV)" if zscore else "mV"
    scale = f"25 mm/s   {gain:g} mm/{unit}"
    scale += "   display filter 0.05 Hz high-pass (zero-phase)" if filtered else "   unfiltered"
    if ecg.duration_s > _SECONDS:
        scale += f"   first 10 s of {ecg.duration_s:.1f} s"
    text(_GRID_LEFT, _GRID_BOTTOM - 1.5, scale, fontsize=6.5)
    text(_GRID_LEFT + _GRID_W, _GRID_BOTTOM - 1.5, "ecgbridge", fontsize=6.5, ha="right")
    text(
        _GRID_LEFT,
        _GRID_BOTTOM - 5.5,
        result.label or NOT_FOR_CLINICAL_USE,
        fontsize=6.5,
        color=_LABEL_RED,
        fontweight="bold",
    )
    return fig


def _measurements_of(result: AnalysisResult) -> dict[str, Any]:
    """``extra["measurements"]`` of every output, first one wins (what the HL7 NM OBX carry)."""
    merged: dict[str, Any] = {}
    for output in result.outputs:
        values = output.extra.get("measurements") if isinstance(output.extra, Mapping) else None
        if isinstance(values, Mapping):
            for key, value in values.items():
                merged.setdefault(str(key), value)
    return merged


def _title(result: AnalysisResult) -> str:
    models = ", ".join(f"{o.model} {o.version}" for o in result.outputs if o.findings)
    return f"AI ECG analysis ({models}) - NOT FOR CLINICAL USE"


def _png_bytes(fig: Figure, dpi: int, title: str) -> bytes:
    """Draw on Agg (the text by Pillow, :mod:`.raster_text`) and write an 8-bit palette PNG.

    A palette PNG is a quarter of the RGBA size and faster to encode.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image, PngImagePlugin

    from ecgbridge.inference.raster_text import draw_text_with_pillow, pillow_drawable

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    texts = pillow_drawable(fig)
    for t in texts:
        t.set_visible(False)
    try:
        canvas.draw()  # type: ignore[no-untyped-call]  # matplotlib's backend_agg is unannotated
    finally:
        for t in texts:
            t.set_visible(True)
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)  # type: ignore[no-untyped-call]  # as above
    rgb = image.convert("RGB")
    draw_text_with_pillow(rgb, texts, dpi)
    paletted = rgb.quantize(colors=96, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    info.add_text("Software", "ecgbridge")
    buf = io.BytesIO()
    paletted.save(buf, format="PNG", pnginfo=info, dpi=(dpi, dpi), compress_level=6)
    return buf.getvalue()


def _core_fonts_can_write(figures: tuple[Figure, ...]) -> bool:
    """Whether every text of the pages is in the PDF core fonts' encoding (Windows-1252)."""
    from matplotlib.text import Text

    try:
        for page in figures:
            for t in page.findobj(Text):
                t.get_text().encode("cp1252")
    except UnicodeEncodeError:
        return False
    return True


def _pdf_bytes(fig: Figure, title: str, extra_pages: tuple[Figure, ...] = ()) -> bytes:
    """One PDF: the 12-lead page, then any extra pages (the LVEF page).

    Text is set in the PDF core font Helvetica (not embedded: every reader has it, and
    subsetting and embedding DejaVu Sans took half of the PDF's time) unless some text is
    outside its encoding (a patient name in another script): then DejaVu Sans is embedded.
    """
    import logging

    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages

    pages = (fig, *extra_pages)
    core = _core_fonts_can_write(pages)
    buf = io.BytesIO()
    metadata = {"Title": title, "Creator": "ecgbridge", "Producer": "ecgbridge", "CreationDate": None}
    font_log = logging.getLogger("matplotlib.font_manager")
    level = font_log.level
    font_log.setLevel(logging.ERROR)  # "Helvetica: using medium for normal" on every text, otherwise
    try:
        with matplotlib.rc_context({"pdf.use14corefonts": core}), PdfPages(buf, metadata=metadata) as pdf:
            for page in pages:
                pdf.savefig(page, facecolor="white")
    finally:
        font_log.setLevel(level)
    return buf.getvalue()


def _extra_pages(result: AnalysisResult) -> tuple[Figure, ...]:
    from ecgbridge.inference.explain_lvef import render_lvef_page

    page = render_lvef_page(result)
    return (page,) if page is not None else ()


def render_png(
    ecg: Ecg,
    result: AnalysisResult,
    cams: Cams = None,
    measurements: Mapping[str, Any] | None = None,
    *,
    dpi: int = PNG_DPI,
) -> bytes:
    """The page as PNG (``dpi`` pixels per inch; tests use a low one)."""
    return _png_bytes(render_figure(ecg, result, cams, measurements), dpi, _title(result))


def render_pdf(
    ecg: Ecg,
    result: AnalysisResult,
    cams: Cams = None,
    measurements: Mapping[str, Any] | None = None,
) -> bytes:
    """The 12-lead page (vector grid, traces and heatmap), plus the LVEF page when there is a tier."""
    return _pdf_bytes(render_figure(ecg, result, cams, measurements), _title(result), _extra_pages(result))


def render_both(
    ecg: Ecg,
    result: AnalysisResult,
    cams: Cams = None,
    measurements: Mapping[str, Any] | None = None,
    *,
    dpi: int = PNG_DPI,
) -> tuple[bytes, bytes]:
    """(PNG, PDF) of the same page, laid out once."""
    fig = render_figure(ecg, result, cams, measurements)
    title = _title(result)
    pdf = _pdf_bytes(fig, title, _extra_pages(result))
    return _png_bytes(fig, dpi, title), pdf
