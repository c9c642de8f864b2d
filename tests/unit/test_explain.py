"""inference.explain and the worker's attachments: the printout, the heatmap's time mapping, CAM sanity.

Why: the PNG/PDF goes into the chart next to the numbers; it must be one readable page,
show the map of the finding it claims to show at the times the map covers, and never
fail an analysis. A tiny CAM-capable ONNX graph is built here (Conv -> ReLU -> 1x1 Conv
= CAMs -> time mean -> sigmoid, the global-average-pool head of the real models) so the
tests do not depend on which model is shipped; the checks that need a *trained* map
run on the shipped model when it has a ``cams`` output and are skipped otherwise (failed in CI).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.inference.explain import (
    CamSet,
    cams_for,
    render_both,
    render_figure,
    render_pdf,
    render_png,
    top_finding,
)
from ecgbridge.inference.models import ModelRegistry
from ecgbridge.inference.preprocess import DEFAULT_SPEC
from ecgbridge.mapping.ecg import NOT_FOR_CLINICAL_USE, AnalysisResult, Ecg, Finding, ModelOutput
from ecgbridge.mapping.readers import read_ecg_file
from tests.support.peers import need

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
DPI = 40  # tests render small: 2 cores are shared


def load(name: str) -> Ecg:
    return read_ecg_file(FIXTURES / name)


def result_with(probs: dict[str, float], thresholds: float = 0.5, model: str = "cam-test") -> AnalysisResult:
    findings = tuple(Finding(c, c, probs.get(c, 0.01), thresholds, probs.get(c, 0.01) >= thresholds) for c in CLASSES)
    return AnalysisResult(
        "m-1", (ModelOutput(model, "0.0.1", "diagnosis", findings),), quality_flags=("baseline_wander:V4",)
    )


def one_hot_cams(hot: dict[str, int], steps: int = 50) -> CamSet:
    maps = np.zeros((len(CLASSES), steps), dtype=np.float32)
    for code, j in hot.items():
        maps[CLASSES.index(code), j] = 3.0
    return CamSet(maps, CLASSES, window_s=10.0, model="cam-test", version="0.0.1")


def heat_boxes(fig) -> list[tuple[float, float, float]]:
    """(x0 mm, x1 mm, alpha) of every shaded CAM step on the grid axes."""
    from matplotlib.collections import PolyCollection

    (ax,) = fig.axes
    boxes = []
    for coll in ax.collections:
        if isinstance(coll, PolyCollection):
            for path, colour in zip(coll.get_paths(), coll.get_facecolors()):
                xs = path.vertices[:, 0]
                boxes.append((float(xs.min()), float(xs.max()), float(colour[3])))
    return boxes


def page_text(fig) -> str:
    return "\n".join(t.get_text() for t in [*fig.texts, *fig.axes[0].texts])


def pdf_pages(data: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", data))


# --------------------------------------------------------------------------- a tiny CAM model


def write_cam_model(directory: Path, seed: int = 0, name: str = "cam-test") -> Path:
    onnx = pytest.importorskip("onnx", reason="building the test CAM graph needs the onnx package (extra `train`)")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.normal(size=(16, 12, 15)) / np.sqrt(12 * 15)).astype(np.float32)
    b1 = (0.1 * rng.normal(size=16)).astype(np.float32)
    w2 = (rng.normal(size=(5, 16, 1)) / 4).astype(np.float32)
    b2 = (0.1 * rng.normal(size=5)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["ecg", "w1", "b1"], ["h"], kernel_shape=[15], strides=[8], pads=[7, 7]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Conv", ["hr", "w2"], ["cams"], kernel_shape=[1]),
        helper.make_node("ReduceMean", ["cams"], ["m"], axes=[2], keepdims=0),
        helper.make_node("Add", ["m", "b2"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_cam",
        [helper.make_tensor_value_info("ecg", TensorProto.FLOAT, ["N", 12, 1000])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("cams", TensorProto.FLOAT, ["N", 5, 125]),
        ],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / "model.onnx"))
    manifest = {
        "name": name,
        "version": "0.0.1",
        "task": "diagnosis",
        "file": "model.onnx",
        "preprocessing": DEFAULT_SPEC,
        "outputs": {"probabilities": "probabilities", "cams": "cams"},
        "classes": [{"code": c, "display": c} for c in CLASSES],
        "thresholds": {c: 0.5 for c in CLASSES},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def randomised_copy(model_dir: Path, out: Path, seed: int = 1) -> Path:
    """The same graph with every float initializer redrawn (same shape and spread): the
    model-parameter randomisation test of Adebayo et al. 2018, at full depth."""
    onnx = pytest.importorskip("onnx", reason="randomising a graph needs the onnx package (extra `train`)")
    from onnx import numpy_helper

    manifest = json.loads((model_dir / "manifest.json").read_text())
    model = onnx.load(str(model_dir / manifest["file"]))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype.kind == "f" and w.size > 1:
            drawn = rng.normal(float(w.mean()), float(w.std()) or 1.0, size=w.shape).astype(w.dtype)
            init.CopyFrom(numpy_helper.from_array(drawn, init.name))
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / manifest["file"]))
    manifest["sha256"] = None
    manifest["name"] = manifest["name"] + "-randomised"
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def cam_model(tmp_path_factory):
    directory = write_cam_model(tmp_path_factory.mktemp("cam-model"))
    return ModelRegistry(paths={"cam-test": directory}).get("cam-test")


@pytest.fixture(scope="module")
def shipped_with_cams():
    """The shipped diagnosis model, or the model directory in ECGBRIDGE_TEST_DIAGNOSIS_MODEL (a candidate)."""
    candidate = os.environ.get("ECGBRIDGE_TEST_DIAGNOSIS_MODEL")
    registry = ModelRegistry(paths={"diagnosis": Path(candidate)}) if candidate else ModelRegistry()
    model = registry.get("diagnosis")
    if "cams" not in model.manifest.outputs:
        need(f"the shipped model {model.manifest.name} {model.manifest.version} has no `cams` output")
    return model


# --------------------------------------------------------------------------- the page


def test_png_and_pdf_for_a_real_fixture(cam_model) -> None:
    from PIL import Image

    ecg = load("dicom/ptbxl_00622_mi_12lead.dcm")
    result = AnalysisResult("m-1", (cam_model.run(ecg),))
    cams = cams_for(cam_model, ecg)
    png = render_png(ecg, result, cams, dpi=DPI)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(png))
    assert image.size == pytest.approx((297 / 25.4 * DPI, 210 / 25.4 * DPI), abs=1.01)  # A4 landscape
    pdf = render_pdf(ecg, result, cams, measurements={"heart_rate": 102, "qtc_interval": 448.0})
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")
    assert pdf_pages(pdf) == 1
    assert (
        render_pdf(ecg, result, cams, measurements={"heart_rate": 102, "qtc_interval": 448.0}) == pdf
    )  # deterministic


def test_the_pngs_text_drawn_by_pillow_sits_where_matplotlib_puts_it() -> None:
    """The PNG's text is written by Pillow (fast); each artist's ink must fall inside the box matplotlib lays out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from ecgbridge.inference.explain import PNG_DPI
    from ecgbridge.inference.raster_text import draw_text_with_pillow, pillow_drawable

    ecg = load("dicom/ptbxl_00622_mi_12lead.dcm")
    fig = render_figure(ecg, result_with({"MI": 0.8}), None, {"heart_rate": 71, "qrs_duration": 96})
    fig.set_dpi(PNG_DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    texts = pillow_drawable(fig)
    assert {"AI ECG ANALYSIS - NOT FOR CLINICAL USE", "V4 (wander)"} <= {t.get_text() for t in texts}
    renderer = canvas.get_renderer()
    width, height = canvas.get_width_height()
    for artist in texts:
        box = artist.get_window_extent(renderer)
        blank = Image.new("RGB", (width, height), "white")
        draw_text_with_pillow(blank, [artist], PNG_DPI)
        ink = np.argwhere(np.asarray(blank.convert("L")) < 200)
        assert len(ink), artist.get_text()
        top, left = ink.min(axis=0)
        bottom, right = ink.max(axis=0)
        slack = 0.35 * artist.get_fontsize() * PNG_DPI / 72  # glyph outlines differ from the layout box by a little
        assert left >= box.x0 - slack and right <= box.x1 + slack, artist.get_text()
        assert top >= height - box.y1 - slack and bottom <= height - box.y0 + slack, artist.get_text()


def test_the_pdf_uses_the_core_font_unless_a_text_is_outside_its_encoding() -> None:
    ecg = load("dicom/ptbxl_00622_mi_12lead.dcm")
    latin = render_pdf(ecg, result_with({"MI": 0.8}))
    assert b"/BaseFont /Helvetica" in latin and b"DejaVu" not in latin  # not embedded: every reader has it
    foreign = replace(
        ecg, patient=replace(ecg.patient, id="\u03a9-0042")
    )  # a patient id with a Greek letter (outside Windows-1252)
    embedded = render_pdf(foreign, result_with({"MI": 0.8}))
    assert b"DejaVu" in embedded and b"/BaseFont /Helvetica" not in embedded


def test_page_names_patient_id_and_time_but_not_the_name() -> None:
    ecg = load("dicom/ptbxl_00622_mi_12lead.dcm")
    assert ecg.patient.name and ecg.patient.id
    fig = render_figure(ecg, result_with({"MI": 0.8}), None, {"heart_rate": 71, "qrs_duration": 96})
    text = page_text(fig)
    assert ecg.patient.id in text and "Acquired: 1987-04-16" in text
    assert ecg.patient.name not in text and ecg.patient.name.split("^")[0] + "^" not in text
    assert "NOT FOR CLINICAL USE" in text and NOT_FOR_CLINICAL_USE in text
    assert "cam-test 0.0.1" in text and "MI (MI): p=0.80 (threshold 0.50)" in text
    assert "baseline_wander:V4" in text and "V4 (wander)" in text  # flag listed and marked on its panel
    assert "HR 71 /min" in text and "QRS 96 ms" in text
    # without measurements given, the page shows what the outputs carry (the pipeline's measurements output)
    out = ModelOutput(
        "ecgbridge-measurements", "0.1.0", "measurements", (), extra={"measurements": {"qtc_interval": 451.1}}
    )
    with_measured = replace(result_with({"MI": 0.8}), outputs=(*result_with({"MI": 0.8}).outputs, out))
    text = page_text(render_figure(ecg, with_measured))
    assert "QTc 451 ms" in text and "ecgbridge-measurements" not in text.split("\n")[1]
    assert "25 mm/s" in text and "mm/mV" in text
    for lead in ("I", "aVR", "V1", "V4", "II", "aVL", "V2", "V5", "III", "aVF", "V3", "V6", "II (rhythm)"):
        assert lead in text.split("\n") or any(line.startswith(lead + " ") for line in text.split("\n")), lead


def test_without_cams_the_page_says_so() -> None:
    ecg = load("wfdb/00024_lr.hea")
    fig = render_figure(ecg, result_with({"NORM": 0.9}, model="diagnosis"))
    assert heat_boxes(fig) == []
    assert "No heatmap: diagnosis 0.0.1 provides no class activation map." in page_text(fig)
    assert "z-score unit" in page_text(fig)  # a z-scored source is not labelled as mV


def test_heatmap_maps_cam_steps_to_seconds() -> None:
    """Step j of a T'-step map over 10 s is drawn over [j, j+1) * 10/T' s at 25 mm/s after the 10 mm lead-in."""
    ecg = load("dicom/cinc2021_E07506_12lead.dcm")
    fig = render_figure(ecg, result_with({"MI": 0.9}), one_hot_cams({"MI": 10}, steps=50))
    ((x0, x1, alpha),) = heat_boxes(fig)
    assert (x0, x1) == pytest.approx((10 + 25 * 2.0, 10 + 25 * 2.2))
    assert alpha == pytest.approx(0.5)
    # a different resolution, the same rule
    fig = render_figure(ecg, result_with({"MI": 0.9}), one_hot_cams({"MI": 124}, steps=125))
    ((x0, x1, _),) = heat_boxes(fig)
    assert (x0, x1) == pytest.approx((10 + 25 * 9.92, 10 + 25 * 10.0))


def test_heatmap_stops_where_a_short_recording_ends() -> None:
    ecg = load("dicom/cinc2021_E07506_12lead.dcm")
    short = replace(ecg, signals=ecg.signals[:, : int(4.0 * ecg.fs)])
    ramp = np.tile(np.linspace(0.1, 5.0, 50, dtype=np.float32), (5, 1))
    cams = CamSet(ramp, CLASSES, model="cam-test")
    fig = render_figure(short, result_with({"MI": 0.9}), cams)
    assert max(x1 for _, x1, _ in heat_boxes(fig)) == pytest.approx(10 + 25 * 4.0)
    assert "recording ends at 4.0 s" in page_text(fig)


def test_the_heatmap_changes_when_the_cam_changes() -> None:
    from PIL import Image

    ecg = load("wfdb/00024_lr.hea")
    result = result_with({"MI": 0.9})
    a = render_png(ecg, result, one_hot_cams({"MI": 5}), dpi=DPI)
    b = render_png(ecg, result, one_hot_cams({"MI": 40}), dpi=DPI)
    assert a != b

    def blueness(png: bytes, t_s: float) -> float:
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
        x_px = int((16 + 10 + 25 * t_s) / 25.4 * DPI)
        y_px = img.shape[0] - int((14 + 2.0) / 25.4 * DPI)  # 2 mm above the grid's bottom edge
        r, _g, bl = img[y_px, x_px]
        return bl - r

    assert blueness(a, 1.1) > blueness(a, 8.1) + 40  # step 5 of 50 covers 1.0-1.2 s
    assert blueness(b, 8.1) > blueness(b, 1.1) + 40  # step 40 covers 8.0-8.2 s


def test_the_top_findings_map_is_shaded() -> None:
    ecg = load("wfdb/00024_lr.hea")
    cams = one_hot_cams({"NORM": 2, "MI": 10, "STTC": 20, "CD": 30, "HYP": 40})

    def shaded_step(result: AnalysisResult) -> int:
        ((x0, _, _),) = heat_boxes(render_figure(ecg, result, cams))
        return round((x0 - 10) / 25 / 0.2)

    # present findings: the most probable one (STTC), not the most probable overall absent one
    assert shaded_step(result_with({"MI": 0.6, "STTC": 0.7, "HYP": 0.45}, thresholds=0.5)) == 20
    # nothing present: the most probable finding
    assert shaded_step(result_with({"MI": 0.3, "CD": 0.4}, thresholds=0.5)) == 30
    out = result_with({"MI": 0.6, "STTC": 0.7}).outputs[0]
    assert top_finding(out).code == "STTC"
    text = page_text(render_figure(ecg, result_with({"MI": 0.6, "STTC": 0.7}), cams))
    assert "class activation map of STTC (STTC)" in text and "(threshold 0.50)  <- shaded" in text


def test_decisions_the_quality_gate_changed_are_marked() -> None:
    from ecgbridge.inference.quality import QualityReport, cap_for_quality

    ecg = load("wfdb/00024_lr.hea")
    result = result_with({"NORM": 0.9, "MI": 0.7})
    out = replace(
        result.outputs[0],
        findings=tuple(replace(f, tier="high") if f.code == "MI" else f for f in result.outputs[0].findings),
    )
    capped = cap_for_quality(out, QualityReport("poor", ("hf_noise:I,II,III", "poor_quality"), {}, ("hf_noise",)))
    text = page_text(render_figure(ecg, replace(result, outputs=(capped,), quality_flags=("poor_quality",))))
    assert "- NORM (NORM): p=0.90 (threshold 0.50) [gate: was present]" in text
    assert "+ MI (MI): p=0.70 (threshold 0.50), tier moderate [gate: was tier high]" in text
    assert "Signal quality: POOR - interpret with caution" in text


def test_a_plain_array_belongs_to_the_first_output() -> None:
    ecg = load("wfdb/00024_lr.hea")
    maps = one_hot_cams({"HYP": 7}).maps
    ((x0, _, _),) = heat_boxes(render_figure(ecg, result_with({"HYP": 0.9}), maps))
    assert x0 == pytest.approx(10 + 25 * 1.4)
    with pytest.raises(ValueError):
        CamSet(np.zeros((3, 10)), CLASSES)


def test_render_both_matches_the_single_renderers(cam_model) -> None:
    ecg = load("wfdb/00024_lr.hea")
    result = AnalysisResult("m-1", (cam_model.run(ecg),))
    cams = cams_for(cam_model, ecg)
    png, pdf = render_both(ecg, result, cams, dpi=DPI)
    assert png == render_png(ecg, result, cams, dpi=DPI)
    assert pdf == render_pdf(ecg, result, cams)


# --------------------------------------------------------------------------- CAMs from the model graph


def test_cams_for_reads_the_graph_and_falls_back_without_one(cam_model) -> None:
    ecg = load("dicom/cinc2021_E07506_12lead.dcm")
    cams = cams_for(cam_model, ecg)
    assert cams is not None and cams.maps.shape == (5, 125) and cams.window_s == pytest.approx(10.0)
    assert cams.classes == CLASSES and (cams.model, cams.version) == ("cam-test", "0.0.1")
    # a map's time mean plus the head bias is the class logit (GAP head): the CAM is the model's own evidence
    probs = cam_model.predict(np.zeros((1, 12, 1000), dtype=np.float32))["probabilities"]
    assert probs.shape == (1, 5)
    baseline = ModelRegistry().get("diagnosis")
    if "cams" not in baseline.manifest.outputs:
        assert cams_for(baseline, ecg) is None


def test_parameter_randomisation_changes_the_maps(cam_model, tmp_path) -> None:
    ecg = load("dicom/cinc2021_E07506_12lead.dcm")
    random_dir = randomised_copy(cam_model.directory, tmp_path / "randomised")
    randomised = ModelRegistry(paths={"r": random_dir}).get("r")
    a, b = cams_for(cam_model, ecg).maps, cams_for(randomised, ecg).maps
    for k in range(len(CLASSES)):
        assert abs(np.corrcoef(a[k], b[k])[0, 1]) < 0.9, CLASSES[k]
    # and the maps depend on the input: another ECG gives other maps
    other = cams_for(cam_model, load("dicom/ptbxl_00730_cd_12lead.dcm")).maps
    assert not np.allclose(a, other, atol=1e-3)


def test_shipped_model_parameter_randomisation(shipped_with_cams, tmp_path) -> None:
    ecg = load("dicom/ptbxl_00622_mi_12lead.dcm")
    random_dir = randomised_copy(shipped_with_cams.directory, tmp_path / "randomised")
    randomised = ModelRegistry(paths={"r": random_dir}).get("r")
    a, b = cams_for(shipped_with_cams, ecg).maps, cams_for(randomised, ecg).maps
    k = CLASSES.index("MI") if "MI" in shipped_with_cams.manifest.thresholds else 0
    assert abs(np.corrcoef(a[k], b[k])[0, 1]) < 0.9


#: Measured failures of one exact model (by ONNX sha256): strict xfails that lapse when the model changes.
KNOWN_FAILURES = {
    (
        "test_shipped_model_mi_map_weighs_qrs_st_over_baseline",
        "953d229b07bd5c1baa6c30f38ddfc1429d4c7443c007946ffc29d48cd7dc153a",
    ): (
        "diagnosis 0.1.1 (the 0.1.0 network re-exported with CAMs; measured 2026-12-01): on ptbxl_00622 (MI) the MI "
        "map averages -0.604 over QRS+ST (71 % of the time at 102 bpm) vs -0.434 elsewhere, although the model calls "
        "MI (p above its threshold); its heatmap marks time, not where the MI evidence lies. The parameter-"
        "randomisation check passes."
    ),
    (
        "test_shipped_model_mi_map_weighs_qrs_st_over_baseline",
        "3f329e64cd84cea795665e1be9f575bbfbdc526247c72d80e49fe0792c07a1a1",
    ): (
        "diagnosis 0.2.0 (measured 2026-12-01): on ptbxl_00622 (MI) the MI map (62 steps) averages -1.125 over "
        "QRS+ST (71 % of the time at 102 bpm) vs -0.741 elsewhere; the model does not call this ECG MI "
        "(p=0.132 < threshold 0.258, tier low). The 2026-12-01 training candidate /tmp/runs/r4 passed."
    ),
}


def test_shipped_model_mi_map_weighs_qrs_st_over_baseline(shipped_with_cams, request) -> None:
    """On the MI fixture the MI map is higher over QRS + ST (R-60 ms .. R+350 ms) than over the rest."""
    from ecgbridge.inference.features import detect_beats

    reason = KNOWN_FAILURES.get((request.node.originalname, shipped_with_cams.manifest.sha256))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))

    ecg = load("dicom/ptbxl_00622_mi_12lead.dcm")
    cams = cams_for(shipped_with_cams, ecg)
    cam = cams.for_class("MI")
    assert cam is not None
    t = (np.arange(cam.size) + 0.5) * cams.window_s / cam.size
    beats = detect_beats(ecg) / ecg.fs
    qrs_st = np.zeros(cam.size, dtype=bool)
    for r in beats:
        qrs_st |= (t >= r - 0.06) & (t <= r + 0.35)
    assert qrs_st.any() and (~qrs_st).any()
    assert cam[qrs_st].mean() > cam[~qrs_st].mean()


# --------------------------------------------------------------------------- the worker stores the attachments


def _context(tmp_path: Path, registry: ModelRegistry | None = None):
    from ecgbridge.core.settings import Settings
    from ecgbridge.worker.jobs import WorkerContext

    ctx = WorkerContext.create(Settings(data_dir=tmp_path))
    ctx.store.create_schema()
    if registry is not None:
        ctx.registry = registry
    return ctx


def test_the_analysis_draws_nothing_and_render_report_draws_once(tmp_path) -> None:
    from ecgbridge.worker.jobs import analyse_message, attachment_bytes, render_report

    ctx = _context(tmp_path)
    data = (FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm").read_bytes()
    sha, size = ctx.store.save_blob(data)
    mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    analyse_message(ctx, mid)
    assert ctx.store.get_result(mid).result["attachments"] == []  # the report is drawn only when wanted
    assert ctx.store.artifact(mid, "heatmaps") is not None  # the viewer's maps come with the analysis
    drawn = render_report(ctx, mid)
    result = AnalysisResult.from_dict(ctx.store.get_result(mid).result)
    assert result.attachments == drawn
    assert [a.content_type for a in result.attachments] == ["application/pdf", "image/png"]
    blobs = attachment_bytes(ctx.store, result)
    pdf = blobs[result.attachments[0].blob_sha256]
    assert pdf.startswith(b"%PDF-") and pdf_pages(pdf) == 1 and len(pdf) == result.attachments[0].size
    assert blobs[result.attachments[1].blob_sha256].startswith(b"\x89PNG")
    analyse_message(ctx, mid)  # a redelivered task draws nothing new
    assert render_report(ctx, mid) == drawn  # nor does a second render
    assert AnalysisResult.from_dict(ctx.store.get_result(mid).result).attachments == result.attachments


def test_a_render_failure_does_not_fail_the_analysis(tmp_path, monkeypatch) -> None:
    import ecgbridge.inference.explain
    from ecgbridge.worker.jobs import analyse_message, render_failed, render_report

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr(ecgbridge.inference.explain, "render_both", broken)
    ctx = _context(tmp_path)
    data = (FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm").read_bytes()
    sha, size = ctx.store.save_blob(data)
    mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    analyse_message(ctx, mid)
    assert render_report(ctx, mid) == ()
    stored = ctx.store.get_result(mid)
    assert stored is not None and stored.result["attachments"] == [] and stored.result["outputs"]
    assert ctx.store.get(mid).state == "analysed"
    (event,) = [e for e in ctx.store.events(mid) if e.kind == "render_failed"]
    assert "no fonts on this machine" in event.detail and event.level == "warning"
    assert event.detail.startswith("result version 1: ") and render_failed(ctx.store, mid, 1)


def test_deliveries_get_the_bytes_from_the_store(tmp_path) -> None:
    from ecgbridge.core.settings import Hl7Destination
    from ecgbridge.mapping.fhir_report import build_report
    from ecgbridge.mapping.hl7_oru import build_oru_r01
    from ecgbridge.worker.jobs import attachment_bytes, render_report

    ctx = _context(tmp_path)
    data = (FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm").read_bytes()
    ecg = load("dicom/ptbxl_00024_norm_12lead.dcm")
    sha, size = ctx.store.save_blob(data)
    mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    ctx.store.save_result(mid, result_with({"NORM": 0.9}, model="diagnosis").to_dict(), "diagnosis")
    result = replace(result_with({"NORM": 0.9}, model="diagnosis"), attachments=render_report(ctx, mid))
    data = attachment_bytes(ctx.store, result)
    report = build_report(
        result, patient=ecg.patient, study=ecg.study, message_id="m-9", attachments_data=data
    ).report.resource
    assert [f["contentType"] for f in report["presentedForm"]] == ["application/pdf", "image/png"]
    dest = Hl7Destination(name="ehr", type="hl7", host="127.0.0.1", port=2575)
    er7 = build_oru_r01(
        result, ecg=ecg, order=None, destination=dest, message_id="m-9", control_id="C1", attachments_data=data
    )
    assert "|ED|REPORT-PDF^" in er7
    ctx.store.blobs.path(result.attachments[0].blob_sha256).unlink()  # the blob store lost the PDF
    assert set(attachment_bytes(ctx.store, result)) == {result.attachments[1].blob_sha256}


def test_an_lvef_tier_adds_a_page_with_its_explanation_and_attribution_chart() -> None:
    from ecgbridge.inference.explain_lvef import render_lvef_page
    from tests.support.results import lvef_output as _lvef_output

    ecg = load("wfdb/00024_lr.hea")
    base = result_with({"NORM": 0.9}, model="diagnosis")
    result = replace(base, outputs=(*base.outputs, _lvef_output()))
    assert render_lvef_page(base) is None
    page = render_lvef_page(result)
    text = page_text(page) + "\n".join(ax.get_title() for ax in page.axes)
    labels = [t.get_text() for ax in page.axes for t in ax.get_yticklabels()]
    assert "NT-proBNP 2400 pg/mL (EHR)" in labels and "QRS duration 152 ms (ECG)" in labels
    assert "LVEF TIER ESTIMATE - NOT FOR CLINICAL USE" in text
    assert "NT-proBNP 2400 pg/mL (EHR)" in text and "synthetic" in text
    assert "Tier probabilities" in text and "tree SHAP" in text
    assert pdf_pages(render_pdf(ecg, result)) == 2
    assert pdf_pages(render_pdf(ecg, base)) == 1
    first = page_text(render_figure(ecg, result))
    assert "LVEF tier: LVEF 30-40 % (moderately reduced) p=0.60 (ecg+ehr; PDF page 2)" in first
