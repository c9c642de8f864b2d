"""The LVEF page of the PDF report: the tier in plain language and a small attribution chart.

A second A4 page after the 12-lead page, drawn only when the result holds an LVEF
output. The words come from :mod:`mapping.lvef_result` (the same sentences the FHIR
Observation note and the HL7 NTE carry); the chart shows the tree SHAP contributions
towards the predicted tier, ECG features and EHR variables in two colours.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from ecgbridge.mapping.ecg import NOT_FOR_CLINICAL_USE, AnalysisResult
from ecgbridge.mapping.lvef_result import attributions, explanation_lines, format_value, lvef_output, predicted_tier

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["render_lvef_page"]

_PAGE_W, _PAGE_H = 297.0, 210.0
_RED = "#b00020"
_ECG_COLOUR, _EHR_COLOUR = "#1a3fb0", "#c2570c"
_BARS = 10


def render_lvef_page(result: AnalysisResult) -> Figure | None:
    """The page as a matplotlib Figure, or None when the result has no LVEF tier."""
    output = lvef_output(result)
    tier = predicted_tier(output) if output is not None else None
    if output is None or tier is None:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_PAGE_W / 25.4, _PAGE_H / 25.4))
    fig.patch.set_facecolor("white")

    def text(x_mm: float, y_mm: float, s: str, **kw: object) -> None:
        kw.setdefault("fontsize", 9)
        kw.setdefault("va", "top")
        fig.text(x_mm / _PAGE_W, y_mm / _PAGE_H, s, parse_math=False, **kw)  # type: ignore[arg-type]

    text(16, _PAGE_H - 8, "LVEF TIER ESTIMATE - NOT FOR CLINICAL USE", fontsize=12, fontweight="bold", color=_RED)
    text(
        16,
        _PAGE_H - 15,
        f"Model: {output.model} {output.version} (variant: {output.extra.get('variant', '?')})",
        fontsize=9,
        fontweight="bold",
    )
    wrapped: list[str] = []
    for line in explanation_lines(output, top=6):
        wrapped.extend(textwrap.wrap(line, 95) or [""])
        wrapped.append("")
    text(16, _PAGE_H - 23, "\n".join(wrapped[:22]), linespacing=1.35)

    probs = [(f.display, float(f.probability), f is tier) for f in output.findings]
    ax_p = fig.add_axes((200 / _PAGE_W, 128 / _PAGE_H, 85 / _PAGE_W, 55 / _PAGE_H))
    ax_p.barh(
        range(len(probs)),
        [p for _, p, _ in probs],
        color=["#333333" if chosen else "#bbbbbb" for _, _, chosen in probs],
    )
    ax_p.set_yticks(range(len(probs)), [d for d, _, _ in probs], fontsize=7)
    ax_p.invert_yaxis()
    ax_p.set_xlim(0, 1)
    ax_p.set_title("Tier probabilities", fontsize=8)
    ax_p.tick_params(axis="x", labelsize=7)

    attrs = attributions(output)[:_BARS]
    ax_a = fig.add_axes((90 / _PAGE_W, 18 / _PAGE_H, 190 / _PAGE_W, 80 / _PAGE_H))
    if attrs:
        ax_a.barh(
            range(len(attrs)),
            [a.contribution for a in attrs],
            color=[_EHR_COLOUR if a.kind == "ehr" else _ECG_COLOUR for a in attrs],
        )
        ax_a.set_yticks(range(len(attrs)), [f"{format_value(a)} ({a.kind.upper()})" for a in attrs], fontsize=7)
        ax_a.invert_yaxis()
        ax_a.axvline(0, color="#555555", linewidth=0.8)
    else:
        ax_a.text(0.5, 0.5, "no attributions stored", ha="center", va="center", fontsize=8)
        ax_a.set_yticks([])
    ax_a.set_title(
        f"What moved the estimate towards '{tier.display}' (tree SHAP, log-odds; "
        "blue = ECG feature, orange = EHR variable)",
        fontsize=8,
    )
    ax_a.tick_params(axis="x", labelsize=7)
    text(16, 8, result.label or NOT_FOR_CLINICAL_USE, fontsize=7, color=_RED, fontweight="bold")
    return fig
