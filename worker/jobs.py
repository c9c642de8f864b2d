"""The work behind the Celery tasks, as plain functions of a context and an id.

Each job re-reads the message's state from the store and does only what is
still missing, so running a job twice (a redelivered task, a recovery sweep
after a crash) produces no second result and no second report.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.settings import Route, Settings
from ecgbridge.core.states import FINAL_MESSAGE_STATES, DeliveryState, MessageState
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.errors import EcgBridgeError, InputError, ModelError
from ecgbridge.inference.models import ModelRegistry
from ecgbridge.inference.pipeline import analyse_ecg, needs_ehr_context
from ecgbridge.mapping.ecg import AnalysisResult, Attachment, Ecg
from ecgbridge.mapping.ehr_context import EhrContext
from ecgbridge.mapping.readers import read_ecg_bytes
from ecgbridge.outbound.ehr_fetch import EhrFetcher
from ecgbridge.worker.senders import SenderPool

__all__ = [
    "WorkerContext",
    "analyse_message",
    "attach_explanations",
    "attachment_bytes",
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

    @classmethod
    def create(cls, settings: Settings, dispatcher: Dispatcher | None = None) -> WorkerContext:
        store = MessageStore(settings.database_url, settings.data_dir)
        paths = {m.name: Path(m.path) for m in settings.models if m.path is not None}
        return cls(settings=settings, store=store, registry=ModelRegistry(paths=paths), dispatcher=dispatcher)


def _route(settings: Settings, name: str | None) -> Route | None:
    return next((r for r in settings.routes if r.name == name), None)


def load_ecg(store: MessageStore, row: MessageRow) -> Ecg:
    return read_ecg_bytes(store.read_blob(row.blob_sha256), hint=row.source)


def analyse_message(ctx: WorkerContext, message_id: str) -> list[str]:
    """Analyse a stored message once; returns the destinations still to deliver to."""
    store = ctx.store
    row = store.get(message_id)
    if row is None:
        log.error("analyse: no message %s in the store", message_id)
        return []
    if row.state in FINAL_MESSAGE_STATES:
        return []
    route = _route(ctx.settings, row.route)
    if route is None:
        error = f"route {row.route!r} is no longer in the configuration"
        store.set_state(message_id, MessageState.FAILED, error=error)
        store.add_event(message_id, "route_missing", error)
        return []
    if store.get_result(message_id) is None:
        try:
            ecg = load_ecg(store, row)
            wants_ehr = needs_ehr_context(ctx.registry, route.models)
            ehr = ehr_context_for(ctx, route, ecg, message_id) if wants_ehr else None
            result = analyse_ecg(ecg, ctx.registry, route.models, message_id=message_id, ehr=ehr)
        except (InputError, ModelError) as exc:
            store.set_state(message_id, MessageState.FAILED, error=str(exc))
            store.add_event(message_id, type(exc).__name__, str(exc))
            log.warning("analyse %s failed: %s", message_id, type(exc).__name__)
            return []
        result = attach_explanations(ctx, message_id, ecg, result)
        models = ",".join(f"{o.model}@{o.version}" for o in result.outputs)
        if store.save_result(message_id, result.to_dict(), models):
            log.info("analysed message %s (sop %s) with %s", message_id, row.sop_instance_uid, models)
        store.add_flags(message_id, list(result.ecg_flags + result.quality_flags))
    if row.state in (MessageState.RECEIVED, MessageState.QUEUED):
        store.set_state(message_id, MessageState.ANALYSED)
    if not route.destinations:
        return []
    store.ensure_deliveries(message_id, route.destinations)
    return [d.destination for d in store.deliveries(message_id) if d.state == DeliveryState.PENDING]


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


def attach_explanations(ctx: WorkerContext, message_id: str, ecg: Ecg, result: AnalysisResult) -> AnalysisResult:
    """Render the PDF report and the PNG page, store both as blobs, list them on the result.

    Runs once per message (before the result is saved), whether or not the route has
    destinations, so ``ecgbridge messages show`` can point at the files. The heatmap
    is the first output's model's CAM when its graph has one. Rendering is best
    effort: any failure is recorded as a ``render_failed`` event and the result is
    returned without attachments; the analysis itself never fails here.
    """
    from ecgbridge.inference.explain import cams_for, render_both

    started = time.perf_counter()
    try:
        cams = None
        if result.outputs:
            try:
                cams = cams_for(ctx.registry.signal_model(result.outputs[0].model), ecg)
            except ModelError as exc:
                log.info("no CAM for message %s: %s", message_id, exc)
        png, pdf = render_both(ecg, result, cams)  # measurements: those the outputs carry
        attachments = []
        for (content_type, title), data in ((REPORT_PDF, pdf), (REPORT_PNG, png)):
            sha, size = ctx.store.save_blob(data)
            attachments.append(Attachment(content_type=content_type, title=title, blob_sha256=sha, size=size))
    except Exception as exc:
        ctx.store.add_event(message_id, "render_failed", f"{type(exc).__name__}: {exc}"[:500], level="warning")
        log.warning("rendering the explanation of %s failed: %s", message_id, type(exc).__name__)
        return result
    log.debug(
        "rendered message %s in %.0f ms (pdf %d B, png %d B)",
        message_id,
        (time.perf_counter() - started) * 1000,
        len(pdf),
        len(png),
    )
    return replace(result, attachments=result.attachments + tuple(attachments))


def attachment_bytes(store: MessageStore, result: AnalysisResult) -> dict[str, bytes]:
    """blob sha256 -> bytes for the result's attachments that are still in the store."""
    data: dict[str, bytes] = {}
    for attachment in result.attachments:
        try:
            data[attachment.blob_sha256] = store.read_blob(attachment.blob_sha256)
        except OSError:
            log.warning("attachment %s of a result is missing from the blob store", attachment.blob_sha256[:12])
    return data
