"""The work behind the Celery tasks, as plain functions of a context and an id.

Each job re-reads the message's state from the store and does only what is
still missing, so running a job twice (a redelivered task, a recovery sweep
after a crash) produces no second result and no second report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ecgbridge.core.drift import record_ecg_stats
from ecgbridge.core.promotions import models_in_force
from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.settings import Route, Settings, load_settings
from ecgbridge.core.states import FINAL_MESSAGE_STATES, NO_DELIVERY_FLAG, DeliveryState, MessageState
from ecgbridge.core.store import MessageRow, MessageStore, ResultVersion, TimingStage, record_timings
from ecgbridge.errors import EcgBridgeError, InputError, ModelError
from ecgbridge.inference.models import ModelRegistry
from ecgbridge.inference.pipeline import analyse_ecg, needs_ehr_context
from ecgbridge.mapping.ecg import AnalysisResult, Attachment, Ecg
from ecgbridge.mapping.ehr_context import EhrContext
from ecgbridge.mapping.readers import read_ecg_bytes
from ecgbridge.outbound.ehr_fetch import EhrFetcher
from ecgbridge.worker.senders import SenderPool

if TYPE_CHECKING:
    from ecgbridge.inference.explain import CamSet

__all__ = [
    "WorkerContext",
    "analyse_message",
    "reanalyse_message",
    "attachment_bytes",
    "pending_deliveries",
    "render_failed",
    "report_pending",
    "render_report",
    "run_shadow_models",
    "save_heatmaps",
    "ehr_context_for",
    "load_ecg",
]

log = logging.getLogger("ecgbridge.worker")


@dataclass
class WorkerContext:
    """What jobs need; built once per worker process (models load once)."""

    settings: Settings
    store: MessageStore
    registry: ModelRegistry
    dispatcher: Dispatcher | None = None
    pid: int = field(default_factory=os.getpid)
    #: One FHIR client (and SMART token) per EHR source, reused across messages.
    ehr: EhrFetcher = field(default_factory=EhrFetcher)
    #: One sender per destination, reused across messages.
    senders: SenderPool = field(default_factory=SenderPool)

    #: (mtime_ns, size) of the configuration file the settings were read from.
    config_stamp: tuple[int, int] | None = None

    @classmethod
    def create(
        cls, settings: Settings, dispatcher: Dispatcher | None = None, store: MessageStore | None = None
    ) -> WorkerContext:
        """``store``: one the caller has open already (the CLI drawing a report); else the configuration's."""
        store = store or MessageStore(settings.database_url, settings.data_dir)
        paths = {m.name: Path(m.path) for m in settings.models if m.path is not None}
        ctx = cls(settings=settings, store=store, registry=ModelRegistry(paths=paths), dispatcher=dispatcher)
        ctx.config_stamp = _stamp(settings.source_file)
        return ctx

    def follow_config_file(self) -> None:
        """Take a changed configuration file (a hot reload) before the next task; an invalid one is ignored.

        Routes, destinations and EHR sources follow the file; where the models live and the
        store are read at start (a change there needs a worker restart, as at the gateway).
        """
        source = self.settings.source_file
        stamp = _stamp(source)
        if source is None or stamp is None or stamp == self.config_stamp:
            return
        self.config_stamp = stamp
        try:
            fresh = load_settings(source)
        except EcgBridgeError as exc:
            log.warning(
                "the configuration file changed but is invalid; keeping the one in force (%s)", str(exc).splitlines()[0]
            )
            return
        self.settings = fresh
        log.info(
            "configuration file re-read: %d route(s), %d destination(s)", len(fresh.routes), len(fresh.destinations)
        )


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _route(settings: Settings, name: str | None) -> Route | None:
    return next((r for r in settings.routes if r.name == name), None)


def load_ecg(store: MessageStore, row: MessageRow) -> Ecg:
    return read_ecg_bytes(store.read_blob(row.blob_sha256), hint=row.source)


def analyse_message(ctx: WorkerContext, message_id: str) -> list[str]:
    """Analyse a stored message once; returns the destinations still to deliver to.

    A re-analysis an operator asked for (a waiting result version) is done here too, after
    the first analysis: see :func:`reanalyse_message`.
    """
    store = ctx.store
    row = store.get(message_id)
    if row is None:
        log.error("analyse: no message %s in the store", message_id)
        return []
    revision = store.pending_version(message_id)
    if row.state in FINAL_MESSAGE_STATES and revision is None:
        return []
    route = _route(ctx.settings, row.route)
    if route is None:
        error = f"route {row.route!r} is no longer in the configuration"
        store.set_state(message_id, MessageState.FAILED, error=error)
        store.add_event(message_id, "route_missing", error)
        return []
    if revision is not None and store.get_result(message_id) is not None:
        return reanalyse_message(ctx, row, route, revision)
    if store.get_result(message_id) is None:
        # Durations for the console and /metrics; kept beside the result, never in it.
        started = time.perf_counter()
        stages: dict[str, float] = {}
        model_seconds: dict[str, float] = {}
        try:
            result = _analysis(ctx, row, route, stages, model_seconds)
        except (InputError, ModelError) as exc:
            store.set_state(message_id, MessageState.FAILED, error=str(exc))
            store.add_event(message_id, type(exc).__name__, str(exc))
            log.warning("analyse %s failed: %s", message_id, type(exc).__name__)
            return []
        models = ",".join(f"{o.model}@{o.version}" for o in result.outputs)
        if store.save_result(message_id, result.to_dict(), models):
            log.info("analysed message %s (sop %s) with %s", message_id, row.sop_instance_uid, models)
            stages[TimingStage.TOTAL] = time.perf_counter() - started
            try:
                record_timings(store, message_id, stages, model_seconds)
            except Exception as exc:  # statistics never fail an analysis
                log.warning("could not record the timings of message %s: %s", message_id, type(exc).__name__)
        store.add_flags(message_id, list(result.ecg_flags + result.quality_flags))
    skip_deliveries = NO_DELIVERY_FLAG in (row.flags or [])
    if route.destinations and not skip_deliveries:
        # Before the state moves on, so that to a later ECG of the same patient this one is never
        # "analysed with nothing pending" while its deliveries are still to be made (core.ordering).
        store.ensure_deliveries(message_id, route.destinations)
    if row.state in (MessageState.RECEIVED, MessageState.QUEUED):
        store.set_state(message_id, MessageState.ANALYSED)
    if not route.destinations:
        return []
    if skip_deliveries:
        if not any(e.kind == "deliveries_skipped" for e in store.events(message_id)):  # once, redelivered or not
            store.add_event(message_id, "deliveries_skipped", "imported with --no-deliver: analysed only", level="info")
        return []
    return [d.destination for d in store.deliveries(message_id) if d.state == DeliveryState.PENDING]


def _analysis(
    ctx: WorkerContext, row: MessageRow, route: Route, stages: dict[str, float], model_seconds: dict[str, float]
) -> AnalysisResult:
    """The route's models on the stored ECG, with its explanations; raises InputError / ModelError."""
    ecg = load_ecg(ctx.store, row)
    if row.patient_key is None:  # a file or an older row: keyed here, for the order of deliveries
        key = ctx.store.patient_keys.key_for(ecg.patient.id, ecg.patient.id_issuer)
        if key is not None:
            ctx.store.set_patient_key(row.id, key)
    models = models_in_force(ctx.store, route)  # the route's, with any promotion of a shadow model
    ehr: EhrContext | None = None
    if needs_ehr_context(ctx.registry, list(models.live)) or _shadows_need_ehr(ctx, models.shadow):
        t = time.perf_counter()
        ehr = ehr_context_for(ctx, route, ecg, row.id)
        stages[TimingStage.EHR_CONTEXT] = time.perf_counter() - t
    t = time.perf_counter()
    result = analyse_ecg(ecg, ctx.registry, list(models.live), message_id=row.id, ehr=ehr, timings=model_seconds)
    stages[TimingStage.ANALYSIS] = time.perf_counter() - t
    t = time.perf_counter()
    save_heatmaps(ctx, row.id, ecg, result)
    stages[TimingStage.EXPLANATIONS] = time.perf_counter() - t
    if models.shadow:
        run_shadow_models(ctx, row.id, ecg, ehr, models.shadow)
    try:  # what the ECG looked like, for drift; statistics never fail an analysis
        record_ecg_stats(ctx.store, row.id, ecg, result, route.name)
    except Exception as exc:
        log.warning("could not record the input statistics of %s: %s", row.id, type(exc).__name__)
    return result


def _shadows_need_ehr(ctx: WorkerContext, shadow: tuple[str, ...]) -> bool:
    """Whether a shadow model reads the EHR context; one that cannot load is reported by its own run."""
    try:
        return bool(shadow) and needs_ehr_context(ctx.registry, list(shadow))
    except ModelError:
        return False


#: The message's artifact holding its shadow models' results (never delivered).
SHADOW_ARTIFACT = "shadow"


def run_shadow_models(
    ctx: WorkerContext, message_id: str, ecg: Ecg, ehr: EhrContext | None, shadow: tuple[str, ...]
) -> None:
    """Run the route's shadow models on the ECG and store their outputs as the ``shadow`` artifact.

    Same input and EHR context as the live models; the result is kept apart from the one that
    is delivered (``ecgbridge validate`` and the console read it). A shadow model that fails
    never touches the live result: it is a ``shadow_failed`` event.
    """
    try:
        result = analyse_ecg(ecg, ctx.registry, list(shadow), message_id=message_id, ehr=ehr)
        outputs = tuple(o for o in result.outputs if o.task != "measurements")  # the live result has them
        data = {
            "models": list(shadow),
            "result": AnalysisResult(message_id, outputs, result.quality_flags, result.ecg_flags).to_dict(),
        }
        ctx.store.save_artifact(message_id, SHADOW_ARTIFACT, json.dumps(data, separators=(",", ":")).encode())
    except Exception as exc:
        ctx.store.add_event(message_id, "shadow_failed", f"{type(exc).__name__}: {exc}"[:500], level="warning")
        log.warning("shadow models of message %s failed: %s", message_id, type(exc).__name__)


def reanalyse_message(ctx: WorkerContext, row: MessageRow, route: Route, version: int) -> list[str]:
    """Save result ``version`` (made with the route's models now) and move the deliveries on to it.

    Idempotent like the first analysis: a saved version is not computed again and a delivery
    already at ``version`` is left alone. Each destination's earlier outcome is kept as a
    ``delivery_superseded`` event. Timings are the first analysis's only. A failed re-analysis
    leaves the earlier result, its deliveries and the message's state as they were.
    Returns the destinations to deliver the new version to.
    """
    store = ctx.store
    message_id = row.id
    waiting = store.result_version(message_id, version)
    if waiting is None or waiting.error is not None:
        return []
    if waiting.result is None:
        try:
            result = _analysis(ctx, row, route, {}, {})
        except (InputError, ModelError, OSError) as exc:  # OSError: the ECG's bytes were pruned meanwhile
            store.fail_version(message_id, version, f"{type(exc).__name__}: {exc}")
            store.add_event(message_id, "reanalysis_failed", f"result version {version}: {type(exc).__name__}: {exc}")
            store.set_state(message_id, _settled_state(store, message_id))
            log.warning("re-analysis %d of %s failed: %s", version, message_id, type(exc).__name__)
            return []
        models = ",".join(f"{o.model}@{o.version}" for o in result.outputs)
        if store.save_version(message_id, version, result.to_dict(), models):
            store.add_event(message_id, "reanalysed", f"result version {version} with {models}", level="info")
            log.info("re-analysed message %s as result version %d with %s", message_id, version, models)
        store.add_flags(message_id, list(result.ecg_flags + result.quality_flags))
    before = {d.destination: d for d in store.deliveries(message_id)}
    for dest in store.revise_deliveries(message_id, route.destinations, version):
        old = before.get(dest)
        if old is not None:
            outcome = old.state + (f" as {old.remote_ref}" if old.remote_ref else "")
            detail = f"{dest}: result version {old.version or 1} {outcome}; now delivering version {version}"
            store.add_event(message_id, "delivery_superseded", detail[:500], level="info")
    store.set_state(message_id, _settled_state(store, message_id))
    return [
        d.destination
        for d in store.deliveries(message_id)
        if d.state == DeliveryState.PENDING and (d.version or 1) == version
    ]


def _settled_state(store: MessageStore, message_id: str) -> MessageState:
    """The message's state as its deliveries have it: a re-analysis moves an analysed message back here."""
    states = {d.state for d in store.deliveries(message_id)}
    if not states or DeliveryState.PENDING in states:
        return MessageState.ANALYSED
    if states == {DeliveryState.DELIVERED}:
        return MessageState.DELIVERED
    return MessageState.FAILED


def ehr_context_for(ctx: WorkerContext, route: Route, ecg: Ecg, message_id: str) -> EhrContext | None:
    """The patient's EHR context from the route's EHR source; None when the route names none.

    Never raises for EHR trouble (down, 401, slow, unknown patient): the context then says
    what was missing and the ECG is analysed with the ECG-only LVEF variant. What happened
    is recorded as an ``ehr_context`` event (status and problems only: no values, no PHI).
    """
    if route.ehr_context is None:
        return None
    try:
        source = ctx.settings.ehr_source(route.ehr_context)
    except EcgBridgeError as exc:
        context = EhrContext.missing("unavailable", str(exc), source=route.ehr_context)
    else:
        context = ctx.ehr.fetch(source, ecg.patient, ecg.study.acquired_at)
    detail = context.status + (": " + "; ".join(context.problems) if context.problems else "")
    level = "info" if context.status == "complete" else "warning"
    ctx.store.add_event(message_id, "ehr_context", detail[:500], level=level)
    log.info(
        "EHR context for message %s from %s: %s, %d values, %d problems",
        message_id,
        context.source or route.ehr_context,
        context.status,
        len(context.values),
        len(context.problems),
    )
    return context


#: (content type, title) of the rendered explanations, in the order they are attached.
REPORT_PDF = ("application/pdf", "AI ECG analysis report (not for clinical use)")
REPORT_PNG = ("image/png", "12-lead ECG with model heatmap (not for clinical use)")
#: Event kind of a report that could not be drawn (its detail starts with the result version).
RENDER_FAILED = "render_failed"

#: One drawing at a time per process: matplotlib's font cache is not made for threads (a delivery
#: worker's threads may draw a report a sweep sent them before its render task ran).
_DRAWING = threading.Lock()


def _cams(ctx: WorkerContext, message_id: str, ecg: Ecg, result: AnalysisResult) -> CamSet | None:
    """The class activation maps of the result's first model, when its graph has them and it is still that version."""
    from ecgbridge.inference.explain import cams_for

    if not result.outputs:
        return None
    first = result.outputs[0]
    try:
        cams = cams_for(ctx.registry.signal_model(first.model), ecg)
    except ModelError as exc:
        log.info("no CAM for message %s: %s", message_id, exc)
        return None
    if cams is not None and cams.version != first.version:
        log.info(
            "no CAM for message %s: %s is now version %s, not %s", message_id, first.model, cams.version, first.version
        )
        return None
    return cams


def save_heatmaps(ctx: WorkerContext, message_id: str, ecg: Ecg, result: AnalysisResult) -> None:
    """Store the first model's CAMs as the message's ``heatmaps`` artifact, for the console's ECG viewer.

    Every class's map on the ECG's time axis (step ``j`` covers ``t0_s + [j, j + 1) * step_s``
    seconds of the recording), cut where the recording (or the 10 s shown) ends and normalised
    0..1 by the report page's rule (positive evidence above the map's median, scaled to its
    maximum), so the viewer and the page shade the same steps. Computed with the analysis (the
    gateway cannot run models); the PDF / PNG report is drawn later, only when wanted
    (:func:`render_report`). Best effort: a failure is a ``heatmaps_failed`` event.
    """
    from ecgbridge.inference.explain import explained_output, top_finding

    try:
        cams = _cams(ctx, message_id, ecg, result)
        if cams is None:
            return
        output = explained_output(result, cams)
        findings = {f.code: f for f in output.findings} if output is not None else {}
        top = top_finding(output) if output is not None else None
        n_steps = int(cams.maps.shape[1])
        step_s = cams.window_s / n_steps  # the model input is the recording's first window_s seconds
        shown_s = min(cams.window_s, ecg.duration_s, 10.0)  # as the PNG: the viewer shows 10 s too
        n_shown = max(1, min(n_steps, math.ceil(shown_s / step_s - 1e-9)))
        classes: dict[str, dict[str, object]] = {}
        for code, cam in zip(cams.classes, cams.maps):
            shown = np.nan_to_num(np.asarray(cam[:n_shown], dtype=np.float64))
            values = np.clip(shown - max(float(np.median(shown)), 0.0), 0.0, None)
            peak = float(values.max())
            finding = findings.get(code)
            classes[code] = {
                "display": finding.display if finding is not None else code,
                "probability": round(float(finding.probability), 4) if finding is not None else None,
                "present": bool(finding.present) if finding is not None else None,
                "t0_s": 0.0,
                "step_s": round(step_s, 6),
                "values": [round(v, 3) for v in (values / peak if peak > 0 else values).tolist()],
            }
        heatmaps = {
            "model": cams.model,
            "version": cams.version,
            "window_s": round(cams.window_s, 6),
            "top": top.code if top is not None else None,
            "classes": classes,
        }
        ctx.store.save_artifact(message_id, "heatmaps", json.dumps(heatmaps, separators=(",", ":")).encode())
    except Exception as exc:
        ctx.store.add_event(message_id, "heatmaps_failed", f"{type(exc).__name__}: {exc}"[:500], level="warning")
        log.warning("storing the heatmaps of %s failed: %s", message_id, type(exc).__name__)


def _latest_version(store: MessageStore, message_id: str) -> ResultVersion | None:
    saved = [v for v in store.result_versions(message_id) if v.result is not None]
    return saved[-1] if saved else None


def render_failed(store: MessageStore, message_id: str, version: int) -> bool:
    """Whether drawing result ``version``'s report already failed (it is not tried again by deliveries)."""
    prefix = f"result version {version}:"
    return any(e.kind == RENDER_FAILED and e.detail.startswith(prefix) for e in store.events(message_id))


def render_report(ctx: WorkerContext, message_id: str, version: int | None = None) -> tuple[Attachment, ...]:
    """Draw the PDF report and the PNG page of a saved result once, store both, list them on the result.

    Runs only when wanted: before the deliveries of a route whose destinations carry the
    report (``presented_form``, ``include_report_pdf``), or when a person asks for it in the
    console. ``version``: the result version (default: the latest saved). Idempotent: a
    result that lists its report already is returned as it is. The heatmap is the first
    output's model's CAM, when that model is still the version that made the result.
    Best effort: a failure is a ``render_failed`` event and no attachments are returned;
    the deliveries go on without the report.
    """
    from ecgbridge.inference.explain import render_both

    store = ctx.store
    stored = _latest_version(store, message_id) if version is None else store.result_version(message_id, version)
    if stored is None or stored.result is None:
        return ()
    result = AnalysisResult.from_dict(stored.result)
    if result.attachments:
        return result.attachments
    row = store.get(message_id)
    if row is None:
        return ()
    started = time.perf_counter()
    try:
        ecg = load_ecg(store, row)
        with _DRAWING:
            png, pdf = render_both(ecg, result, _cams(ctx, message_id, ecg, result))  # measurements: the outputs'

        attachments = []
        for (content_type, title), data in ((REPORT_PDF, pdf), (REPORT_PNG, png)):
            sha, size = store.save_blob(data)
            attachments.append(Attachment(content_type=content_type, title=title, blob_sha256=sha, size=size))
        store.attach_to_result(message_id, stored.version, [a.__dict__.copy() for a in attachments])
    except Exception as exc:
        detail = f"result version {stored.version}: {type(exc).__name__}: {exc}"
        store.add_event(message_id, RENDER_FAILED, detail[:500], level="warning")
        log.warning("drawing the report of %s failed: %s", message_id, type(exc).__name__)
        return ()
    log.debug("drew the report of message %s in %.0f ms", message_id, (time.perf_counter() - started) * 1000)
    saved = store.result_version(message_id, stored.version)  # the first render's list, if two raced
    return AnalysisResult.from_dict(saved.result).attachments if saved and saved.result else tuple(attachments)


def pending_deliveries(ctx: WorkerContext, message_id: str) -> list[str]:
    """Destinations of the message whose delivery of its latest result version is still to do."""
    stored = _latest_version(ctx.store, message_id)
    version = stored.version if stored is not None else 1
    known = {d.name for d in ctx.settings.destinations}
    return [
        d.destination
        for d in ctx.store.deliveries(message_id)
        if d.state == DeliveryState.PENDING and (d.version or 1) == version and d.destination in known
    ]


def report_pending(ctx: WorkerContext, message_id: str, destinations: list[str]) -> list[str]:
    """Those of ``destinations`` that carry the report when the latest result does not list it yet."""
    wanting = []
    for name in destinations:
        try:
            if ctx.settings.destination(name).wants_report():
                wanting.append(name)
        except EcgBridgeError:  # left the configuration: its delivery job says so
            continue
    if not wanting:
        return []
    stored = _latest_version(ctx.store, message_id)
    if stored is None or stored.result is None or stored.result.get("attachments"):
        return []
    return wanting


def attachment_bytes(store: MessageStore, result: AnalysisResult) -> dict[str, bytes]:
    """blob sha256 -> bytes for the result's attachments that are still in the store."""
    data: dict[str, bytes] = {}
    for attachment in result.attachments:
        try:
            data[attachment.blob_sha256] = store.read_blob(attachment.blob_sha256)
        except OSError:
            log.warning("attachment %s of a result is missing from the blob store", attachment.blob_sha256[:12])
    return data
