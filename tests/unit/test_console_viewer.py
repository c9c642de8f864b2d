"""The console's ECG viewer data: samples as stored, study facts without identity, the worker's heatmaps.

Why: the viewer shows patient samples (so every call is audited and nothing identifying
rides along), and its heatmap must shade the same seconds as the PNG in the chart; the
gateway cannot run models, so the worker stores the maps with the analysis.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.core.settings import Settings
from ecgbridge.core.store import MessageStore
from ecgbridge.gateway.console.viewer import MAX_FS, MAX_SECONDS, ViewerError, viewer_payload
from ecgbridge.mapping.ecg import AnalysisResult
from ecgbridge.mapping.readers import read_ecg_bytes
from tests.support.peers import need

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
STANDARD = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def _store(tmp_path: Path) -> MessageStore:
    settings = Settings(data_dir=tmp_path)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    return store


def _record(store: MessageStore, data: bytes, source: str) -> str:
    sha, size = store.save_blob(data)
    return store.record_message(source=source, blob_sha256=sha, blob_size=size, route="all-ecg")


def _fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def _worker(tmp_path: Path):
    from ecgbridge.worker.jobs import WorkerContext

    ctx = WorkerContext.create(Settings(data_dir=tmp_path))
    ctx.store.create_schema()
    return ctx


def _analysed(tmp_path: Path, name: str, source: str):
    from ecgbridge.worker.jobs import analyse_message

    ctx = _worker(tmp_path)
    mid = _record(ctx.store, _fixture(name), source)
    analyse_message(ctx, mid)
    return ctx, mid


def _heat_boxes(fig) -> list[tuple[float, float, float]]:
    """(x0 mm, x1 mm, alpha) of every shaded CAM step on the PNG page's grid axes."""
    from matplotlib.collections import PolyCollection

    (ax,) = fig.axes
    boxes = []
    for coll in ax.collections:
        if isinstance(coll, PolyCollection):
            for path, colour in zip(coll.get_paths(), coll.get_facecolors()):
                xs = path.vertices[:, 0]
                boxes.append((float(xs.min()), float(xs.max()), float(colour[3])))
    return sorted(boxes)


# --------------------------------------------------------------------------- samples and study facts


def test_payload_of_a_dicom_message_holds_every_lead_in_mv(tmp_path) -> None:
    store = _store(tmp_path)
    data = _fixture("dicom/ptbxl_00622_mi_12lead.dcm")
    mid = _record(store, data, "dicom")
    payload = viewer_payload(store, mid)
    ecg = read_ecg_bytes(data, hint="dicom")

    assert payload["message_id"] == mid
    assert payload["fs"] == payload["source_fs"] == 500.0 and payload["units"] == "mV"
    assert payload["leads"] == list(STANDARD) and list(payload["samples"]) == list(STANDARD)
    assert payload["n_samples"] == 5000 and payload["duration_s"] == payload["recording_s"] == 10.0
    assert payload["truncated"] is False
    assert payload["limits"] == {"max_seconds": MAX_SECONDS, "max_fs": MAX_FS} == {"max_seconds": 10.0, "max_fs": 500.0}
    for i, lead in enumerate(STANDARD):
        values = payload["samples"][lead]
        assert len(values) == 5000
        np.testing.assert_allclose(values, ecg.signals[i], atol=5e-5 + 1e-9)
        assert all(round(v, 4) == v for v in values[:200])
    assert payload["study"] == {"source_format": "dicom", "device": "AT-6 C 5.5", "state": "received", "flags": []}
    assert payload["heatmaps"] is None
    # JSON as served, and nothing that identifies the patient in it
    text = json.dumps(payload)
    assert ecg.patient.id and ecg.patient.id not in text
    assert ecg.patient.name and ecg.patient.name.split("^")[0] not in text
    assert "acquired" not in text and "birth" not in text


def test_hl7_messages_keep_their_rate_and_length(tmp_path) -> None:
    store = _store(tmp_path)
    slow = viewer_payload(store, _record(store, _fixture("hl7/ptbxl_00024_na_100hz.hl7"), "hl7"))
    assert slow["fs"] == 100.0 and slow["n_samples"] == 1000 and slow["duration_s"] == 10.0
    short = viewer_payload(store, _record(store, _fixture("hl7/cinc2021_E07506_ma_2500ms_8859-1.hl7"), "hl7"))
    assert short["fs"] == 500.0 and short["n_samples"] == 1250 and short["duration_s"] == 2.5
    assert short["truncated"] is False and short["study"]["source_format"] == "hl7"
    assert all(len(v) == 1250 for v in short["samples"].values())


def test_reader_flags_are_passed_on_for_the_labels(tmp_path) -> None:
    store = _store(tmp_path)
    payload = viewer_payload(store, _record(store, _fixture("dicom/cinc2021_E07506_8lead.dcm"), "dicom"))
    assert payload["study"]["flags"] == ["derived_leads:III,aVR,aVL,aVF"]
    assert payload["leads"] == list(STANDARD)


def test_long_and_fast_recordings_are_cut_to_10_s_at_500_hz(tmp_path) -> None:
    from scipy.signal import resample_poly

    from tests.support.dicom_writer import dataset_to_bytes, ecg_to_dataset

    base = read_ecg_bytes(_fixture("dicom/ptbxl_00024_norm_12lead.dcm"))
    fast = resample_poly(np.tile(base.signals.astype(np.float64), (1, 2))[:, :7500], 2, 1, axis=-1)  # 15 s at 1 kHz
    ecg = replace(base, signals=fast.astype(np.float32), fs=1000.0)
    store = _store(tmp_path)
    payload = viewer_payload(store, _record(store, dataset_to_bytes(ecg_to_dataset(ecg)), "dicom"))
    assert payload["source_fs"] == 1000.0 and payload["fs"] == 500.0
    assert payload["recording_s"] == pytest.approx(15.0) and payload["truncated"] is True
    assert payload["n_samples"] == 5000 and payload["duration_s"] == 10.0
    lead_ii = np.asarray(payload["samples"]["II"])
    # the down-sampled trace is the original's (first 10 s at 500 Hz), not an aliased one
    np.testing.assert_allclose(lead_ii[100:-100], base.lead("II")[100 : 5000 - 100], atol=0.02)


def test_gaps_are_null(tmp_path, monkeypatch) -> None:
    import ecgbridge.gateway.console.viewer as viewer

    ecg = read_ecg_bytes(_fixture("dicom/ptbxl_00024_norm_12lead.dcm"))
    signals = ecg.signals.copy()
    signals[1, 10:20] = np.nan
    monkeypatch.setattr(viewer, "read_ecg_bytes", lambda data, hint=None: replace(ecg, signals=signals))
    store = _store(tmp_path)
    payload = viewer_payload(store, _record(store, b"stand-in", "dicom"))
    ii = payload["samples"]["II"]
    assert ii[10:20] == [None] * 10 and ii[9] is not None and ii[20] is not None
    json.dumps(payload, allow_nan=False)  # valid JSON: no NaN tokens


def test_an_unknown_message_is_404(tmp_path) -> None:
    with pytest.raises(ViewerError) as caught:
        viewer_payload(_store(tmp_path), "no-such-id")
    assert caught.value.status == 404


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("dicom/cinc2021_E07506_truncated.dcm", "dicom"),
        ("dicom/cinc2021_E07506_median_only.dcm", "dicom"),
        ("dicom/cinc2021_E07506_cut.dcm", "dicom"),
    ],
)
def test_bytes_that_are_no_ecg_are_422_with_the_readers_text(tmp_path, name: str, source: str) -> None:
    from ecgbridge.errors import InputError

    data = _fixture(name)
    with pytest.raises(InputError) as reader:
        read_ecg_bytes(data, hint=source)
    store = _store(tmp_path)
    with pytest.raises(ViewerError) as caught:
        viewer_payload(store, _record(store, data, source))
    assert caught.value.status == 422 and caught.value.detail == str(reader.value)


def test_garbage_bytes_are_422(tmp_path) -> None:
    store = _store(tmp_path)
    with pytest.raises(ViewerError) as caught:
        viewer_payload(store, _record(store, b"hello, this is not an ECG", "file"))
    assert caught.value.status == 422 and "not a format ecgbridge reads" in caught.value.detail


def test_a_lost_blob_is_404(tmp_path) -> None:
    store = _store(tmp_path)
    mid = _record(store, _fixture("hl7/ptbxl_00024_na_100hz.hl7"), "hl7")
    store.blobs.path(store.get(mid).blob_sha256).unlink()
    with pytest.raises(ViewerError) as caught:
        viewer_payload(store, mid)
    assert caught.value.status == 404 and "blob store" in caught.value.detail


# --------------------------------------------------------------------------- the heatmaps artifact


def test_an_analysed_message_has_every_class_map_normalised_on_the_ecg_time_axis(tmp_path) -> None:
    from ecgbridge.inference.explain import cams_for, explained_output, top_finding

    ctx, mid = _analysed(tmp_path, "dicom/ptbxl_00622_mi_12lead.dcm", "dicom")
    payload = viewer_payload(ctx.store, mid)
    heat = payload["heatmaps"]
    result = AnalysisResult.from_dict(ctx.store.get_result(mid).result)
    model = ctx.registry.signal_model(result.outputs[0].model)
    if "cams" not in model.manifest.outputs:
        assert heat is None
        need("the shipped model has no `cams` output")
    ecg = read_ecg_bytes(_fixture("dicom/ptbxl_00622_mi_12lead.dcm"))
    cams = cams_for(model, ecg)
    output = explained_output(result, cams)

    assert (heat["model"], heat["version"]) == (model.manifest.name, model.manifest.version)
    assert heat["window_s"] == pytest.approx(model.manifest.input.n_samples / model.manifest.input.fs_hz)
    assert list(heat["classes"]) == [c.code for c in model.manifest.classes]
    assert heat["top"] == top_finding(output).code
    findings = {f.code: f for f in output.findings}
    n_steps = cams.maps.shape[1]
    for code, entry in heat["classes"].items():
        assert entry["display"] == findings[code].display
        assert entry["probability"] == pytest.approx(findings[code].probability, abs=1e-4)
        assert entry["present"] is findings[code].present
        assert entry["t0_s"] == 0.0  # the model's input is the recording's first window_s seconds
        assert entry["step_s"] == pytest.approx(heat["window_s"] / n_steps, abs=1e-6)
        values = entry["values"]
        assert len(values) == n_steps  # a 10 s recording: the whole map
        assert all(0.0 <= v <= 1.0 and round(v, 3) == v for v in values)
        assert max(values) in (0.0, 1.0)
        # the PNG's rule: positive evidence above the map's median, scaled to its maximum
        raw = cams.for_class(code).astype(np.float64)
        above = np.clip(raw - max(float(np.median(raw)), 0.0), 0, None)
        expected = above / above.max() if above.max() > 0 else above
        np.testing.assert_allclose(values, expected, atol=6e-4)
    assert any(max(e["values"]) == 1.0 for e in heat["classes"].values())
    assert len(ctx.store.artifact(mid, "heatmaps")) < 8000  # small: rounded, compact


def test_the_viewers_map_shades_the_seconds_the_png_shades(tmp_path) -> None:
    from ecgbridge.inference.explain import cams_for, render_figure

    ctx, mid = _analysed(tmp_path, "dicom/ptbxl_00024_norm_12lead.dcm", "dicom")
    heat = viewer_payload(ctx.store, mid)["heatmaps"]
    if heat is None:
        need("the shipped model has no `cams` output")
    result = AnalysisResult.from_dict(ctx.store.get_result(mid).result)
    ecg = read_ecg_bytes(_fixture("dicom/ptbxl_00024_norm_12lead.dcm"))
    cams = cams_for(ctx.registry.signal_model(result.outputs[0].model), ecg)
    boxes = _heat_boxes(render_figure(ecg, result, cams))  # the page shades the top finding
    top = heat["classes"][heat["top"]]
    t0, step = top["t0_s"], top["step_s"]
    shaded = [(t0 + j * step, t0 + (j + 1) * step, v) for j, v in enumerate(top["values"]) if v > 0]
    assert len(boxes) == len(shaded) > 0
    for (x0, x1, alpha), (a, b, v) in zip(boxes, shaded):
        # the page: 10 mm lead-in, 25 mm/s, alpha 0.5 at the map's maximum
        assert ((x0 - 10) / 25, (x1 - 10) / 25) == pytest.approx((a, b), abs=1e-4)
        assert alpha == pytest.approx(0.5 * v, abs=1e-3)


def test_a_short_recordings_maps_end_with_it(tmp_path) -> None:
    ctx, mid = _analysed(tmp_path, "hl7/cinc2021_E07506_ma_2500ms_8859-1.hl7", "hl7")
    payload = viewer_payload(ctx.store, mid)
    heat = payload["heatmaps"]
    if heat is None:
        need("no heatmaps: the shipped model has no `cams` output or the ECG was not analysed")
    for entry in heat["classes"].values():
        covered = len(entry["values"]) * entry["step_s"]
        assert payload["duration_s"] <= covered < payload["duration_s"] + entry["step_s"] + 1e-9
        assert math.isclose(max(entry["values"]), 1.0) or max(entry["values"]) == 0.0


def test_without_a_map_there_is_no_artifact_and_the_analysis_is_whole(tmp_path, monkeypatch) -> None:
    import ecgbridge.inference.explain

    monkeypatch.setattr(ecgbridge.inference.explain, "cams_for", lambda model, ecg: None)
    ctx, mid = _analysed(tmp_path, "dicom/ptbxl_00024_norm_12lead.dcm", "dicom")
    assert ctx.store.artifact(mid, "heatmaps") is None and viewer_payload(ctx.store, mid)["heatmaps"] is None
    assert ctx.store.get_result(mid).result["outputs"]
    from ecgbridge.worker.jobs import render_report

    assert [a.content_type for a in render_report(ctx, mid)] == ["application/pdf", "image/png"]  # drawn without one


def test_a_heatmap_failure_does_not_fail_the_analysis_or_the_page(tmp_path, monkeypatch) -> None:
    ctx = _worker(tmp_path)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ctx.store, "save_artifact", broken)
    from ecgbridge.worker.jobs import analyse_message

    mid = _record(ctx.store, _fixture("dicom/ptbxl_00024_norm_12lead.dcm"), "dicom")
    analyse_message(ctx, mid)
    stored = ctx.store.get_result(mid)
    assert stored is not None and stored.result["outputs"]
    assert ctx.store.get(mid).state == "analysed"
    model = ctx.registry.signal_model(stored.result["outputs"][0]["model"])
    if "cams" in model.manifest.outputs:
        (event,) = [e for e in ctx.store.events(mid) if e.kind == "heatmaps_failed"]
        assert "disk full" in event.detail and event.level == "warning"
    assert viewer_payload(ctx.store, mid)["heatmaps"] is None


def test_a_damaged_artifact_is_shown_as_no_heatmap(tmp_path) -> None:
    store = _store(tmp_path)
    mid = _record(store, _fixture("hl7/ptbxl_00024_na_100hz.hl7"), "hl7")
    store.save_artifact(mid, "heatmaps", b"{not json")
    assert viewer_payload(store, mid)["heatmaps"] is None


# --------------------------------------------------------------------------- the endpoint


@pytest.fixture
def console(tmp_path):
    """The console app over a real store, with a viewer's API token (no server, no broker contacted)."""
    from fastapi.testclient import TestClient

    from ecgbridge.core.accounts import AccountStore, Role
    from ecgbridge.core.live import LiveSettings
    from ecgbridge.core.queue import Dispatcher, make_celery
    from ecgbridge.gateway.console.app import create_app
    from ecgbridge.gateway.console.context import ConsoleContext

    settings = Settings(data_dir=tmp_path)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    accounts = AccountStore(store)
    accounts.create_user("vera", None, Role.VIEWER)
    token = accounts.create_token("vera", "viewer-test")
    ctx = ConsoleContext(
        live=LiveSettings(settings), store=store, dispatcher=Dispatcher(make_celery(settings)), accounts=accounts
    )
    with TestClient(create_app(ctx)) as client:
        yield client, ctx, {"Authorization": f"Bearer {token}"}


def test_the_endpoint_serves_the_payload_and_audits_each_call(console) -> None:
    client, ctx, auth = console
    mid = _record(ctx.store, _fixture("hl7/ptbxl_00024_na_100hz.hl7"), "hl7")
    assert client.get(f"/api/messages/{mid}/ecg").status_code == 401
    answer = client.get(f"/api/messages/{mid}/ecg", headers=auth)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
    assert answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body == json.loads(json.dumps(viewer_payload(ctx.store, mid)))
    (row,) = ctx.accounts.audit_log(action="view_ecg")
    assert row.actor.endswith("@vera") and (row.role, row.target, row.outcome) == ("viewer", mid, "ok")


def test_the_endpoint_answers_problems(console) -> None:
    client, ctx, auth = console
    missing = client.get("/api/messages/nope/ecg", headers=auth)
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert missing.json()["detail"] == "no message nope"
    bad = _record(ctx.store, _fixture("dicom/cinc2021_E07506_truncated.dcm"), "dicom")
    unreadable = client.get(f"/api/messages/{bad}/ecg", headers=auth)
    assert unreadable.status_code == 422 and "WaveformData is truncated" in unreadable.json()["detail"]
    outcomes = {(r.target, r.outcome, r.detail.get("status")) for r in ctx.accounts.audit_log(action="view_ecg")}
    assert outcomes == {("nope", "failed", 404), (bad, "failed", 422)}


# --------------------------------------------------------------------------- the partial and its static files


def test_the_partial_needs_only_the_message_id_and_keeps_to_the_csp() -> None:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    from ecgbridge.gateway.console.app import STATIC_DIR

    templates = STATIC_DIR.parent / "templates"
    env = Environment(loader=FileSystemLoader(templates), autoescape=select_autoescape(), undefined=StrictUndefined)
    html = env.get_template("_viewer.html").render(message_id='m-1"><b>')
    assert 'data-message-id="m-1&#34;&gt;&lt;b&gt;"' in html and "<b>" not in html  # escaped
    assert 'data-state="loading"' in html
    # no inline script or style (the CSP allows neither): scripts and styles come from /static
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/static/viewer.js" defer>']
    assert "<style" not in html and not re.search(r"\sstyle=", html) and not re.search(r"\son[a-z]+=", html)
    for asset in re.findall(r'(?:src|href)="/static/([^"]+)"', html):
        assert (STATIC_DIR / asset).is_file(), asset
    # every control is labelled or named, and reachable (no negative tabindex)
    assert 'tabindex="-1"' not in html
    for select in re.findall(r"<select[^>]*>", html):
        assert "<label" in html.split(select)[0].rsplit("</label>", 1)[-1], select
    script = (STATIC_DIR / "viewer.js").read_text()
    assert '"ready"' in script and '"error"' in script and "data-state" in script
