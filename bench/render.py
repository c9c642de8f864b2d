"""Per-ECG analysis and report drawing on one CPU core, beside matplotlib drawing the same page alone.

For each ECG (the 12-lead DICOM fixtures and pydicom's Mortara ECG) it times, in process:
decoding the stored bytes, ``analyse_ecg`` with diagnosis + triage (quality gate,
measurements, both models), the CAMs the console's viewer shows, then the report:
laying the page out, the PNG (Agg for the drawing, Pillow for the text:
``inference.raster_text``) and the PDF (core font Helvetica). The peer is matplotlib alone
on the same laid-out page: Agg drawing the text too, and the PDF with DejaVu Sans embedded,
which is how every report was drawn before. ECGs per second per core are the inverse of
the median per-ECG time, with and without the report.

    python -m bench.render [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.data import get_testdata_file

from ecgbridge.inference.explain import PNG_DPI, _extra_pages, _pdf_bytes, _png_bytes, _title, cams_for, render_figure
from ecgbridge.inference.models import ModelRegistry
from ecgbridge.inference.pipeline import analyse_ecg
from ecgbridge.mapping.readers import read_ecg_bytes

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dicom"


def _files() -> list[Path]:
    chosen = [p for p in sorted(FIXTURES.glob("*_12lead.dcm"))]
    return [*chosen, Path(get_testdata_file("waveform_ecg.dcm"))]


def _matplotlib_png(fig, dpi: int) -> bytes:  # type: ignore[no-untyped-def]
    """The page's PNG as before: Agg draws the text too (same palette PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    paletted = image.convert("RGB").quantize(colors=96, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    paletted.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _matplotlib_pdf(fig, extra) -> bytes:  # type: ignore[no-untyped-def]
    """The PDF as before: DejaVu Sans subset and embedded."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages

    buf = io.BytesIO()
    with matplotlib.rc_context({"pdf.use14corefonts": False}), PdfPages(buf) as pdf:
        for page in (fig, *extra):
            pdf.savefig(page, facecolor="white")
    return buf.getvalue()


def _ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="times each ECG is timed (after one warm-up)")
    args = parser.parse_args()
    registry = ModelRegistry()
    models = ["diagnosis", "triage"]
    stages: dict[str, list[float]] = {
        k: [] for k in ("decode", "analyse", "cams", "layout", "png", "pdf", "peer_png", "peer_pdf", "peer_layout")
    }
    files = _files()
    for path in files:
        data = path.read_bytes()
        for round_ in range(args.rounds + 1):
            timed: dict[str, float] = {}
            timed["decode"] = _ms(lambda: read_ecg_bytes(data))
            ecg = read_ecg_bytes(data)
            holder: dict[str, object] = {}
            timed["analyse"] = _ms(lambda: holder.update(r=analyse_ecg(ecg, registry, models, message_id="bench")))
            result = holder["r"]
            model = registry.signal_model(result.outputs[0].model)  # type: ignore[attr-defined]
            timed["cams"] = _ms(lambda: holder.update(c=cams_for(model, ecg)))
            cams = holder["c"]
            timed["layout"] = _ms(lambda: holder.update(f=render_figure(ecg, result, cams)))  # type: ignore[arg-type]
            fig, title = holder["f"], _title(result)  # type: ignore[arg-type]
            timed["png"] = _ms(lambda: _png_bytes(fig, PNG_DPI, title))  # type: ignore[arg-type]
            timed["pdf"] = _ms(lambda: _pdf_bytes(fig, title, _extra_pages(result)))  # type: ignore[arg-type]
            timed["peer_layout"] = _ms(lambda: holder.update(g=render_figure(ecg, result, cams)))  # type: ignore[arg-type]
            timed["peer_png"] = _ms(lambda: _matplotlib_png(holder["g"], PNG_DPI))
            timed["peer_pdf"] = _ms(lambda: _matplotlib_pdf(holder["g"], _extra_pages(result)))  # type: ignore[arg-type]
            if round_:  # the first round warms caches (fonts, ONNX Runtime's arenas)
                for k, v in timed.items():
                    stages[k].append(v)
    med = {k: statistics.median(v) for k, v in stages.items()}
    p95 = {k: sorted(v)[int(0.95 * (len(v) - 1))] for k, v in stages.items()}
    n = len(stages["decode"])
    print(f"{len(files)} ECGs x {args.rounds} rounds = {n} timings per stage, one process, one core; ms median (p95)")
    for k in ("decode", "analyse", "cams"):
        print(f"  {k:<8} {med[k]:7.1f} ({p95[k]:.1f})")
    analysis = med["decode"] + med["analyse"] + med["cams"]
    ours = med["layout"] + med["png"] + med["pdf"]
    peer = med["peer_layout"] + med["peer_png"] + med["peer_pdf"]
    print("report drawing         ecgbridge            matplotlib alone (peer)")
    for k in ("layout", "png", "pdf"):
        print(
            f"  {k:<8}             {med[k]:7.1f} ({p95[k]:.1f})      {med['peer_' + k]:7.1f} ({p95['peer_' + k]:.1f})"
        )
    print(f"  one report (3 above)  {ours:7.1f}               {peer:7.1f}   ({peer / ours:.1f}x)")
    print(
        f"analysis per core: {1000 / analysis:.1f} ECG/s without the report, {1000 / (analysis + ours):.1f} ECG/s "
        f"with it ({1000 / (analysis + peer):.1f} ECG/s drawing it with matplotlib alone); not counting the "
        "store, the broker or Celery (bench.archive measures the whole pipeline)"
    )


if __name__ == "__main__":
    main()
