"""The work behind the Celery tasks, as plain functions of a context and an id.

Each job re-reads the message's state from the store and does only what is
still missing, so running a job twice (a redelivered task, a recovery sweep
after a crash) produces no second result and no second report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ecgbridge.errors import EcgBridgeError, InputError, ModelError, PermanentDeliveryError, TransientDeliveryError
from ecgbridge.core.settings import FhirDestination, Hl7Destination, Route, Settings
from ecgbridge.core.queue import Dispatcher
from ecgbridge.outbound.ehr_fetch import EhrFetcher
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.mapping.ecg import AnalysisResult, Attachment, Ecg
from ecgbridge.mapping.ehr_context import EhrContext
from ecgbridge.mapping.readers import read_ecg_bytes

from ecgbridge.inference.models import ModelRegistry
from ecgbridge.inference.pipeline import LVEF_MODEL, analyse_ecg

__all__ = [
    "WorkerContext", "analyse_message", "attach_explanations", "attachment_bytes", "deliver_message", "dead_letter",
    "backoff_s", "ehr_context_for",
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

    @classmethod
    def create(cls, settings: Settings, dispatcher: Dispatcher | None = None) -> "WorkerContext":
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
    if row.state in ("failed", "rejected", "unrouted"):
        return []
    route = _route(ctx.settings, row.route)
    if route is None:
        error = f"route {row.route!r} is no longer in the configuration"
        store.set_state(message_id, "failed", error=error)
        store.add_event(message_id, "route_missing", error)
        return []
    if store.get_result(message_id) is None:
        try:
            ecg = load_ecg(store, row)
            ehr = ehr_context_for(ctx, route, ecg, message_id) if LVEF_MODEL in route.models else None
            result = analyse_ecg(ecg, ctx.registry, route.models, message_id=message_id, ehr=ehr)
        except (InputError, ModelError) as exc:
            store.set_state(message_id, "failed", error=str(exc))
            store.add_event(message_id, type(exc).__name__, str(exc))
            log.warning("analyse %s failed: %s", message_id, type(exc).__name__)
            return []
        result = attach_explanations(ctx, message_id, ecg, result)
        models = ",".join(f"{o.model}@{o.version}" for o in result.outputs)
        if store.save_result(message_id, result.to_dict(), models):
            log.info("analysed message %s (sop %s) with %s", message_id, row.sop_instance_uid, models)
        store.add_flags(message_id, list(result.ecg_flags + result.quality_flags))
    if row.state in ("received", "queued"):
        store.set_state(message_id, "analysed")
    if not route.destinations:
        return []
    store.ensure_deliveries(message_id, route.destinations)
    return [d.destination for d in store.deliveries(message_id) if d.state == "pending"]


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
    log.info("EHR context for message %s from %s: %s, %d values, %d problems", message_id,
             context.source or route.ehr_context, context.status, len(context.values), len(context.problems))
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
                cams = cams_for(ctx.registry.get(result.outputs[0].model), ecg)
            except ModelError as exc:
                log.info("no CAM for message %s: %s", message_id, exc)
        png, pdf = render_both(ecg, result, cams)  # measurements: those the outputs carry
        attachments = []
        for (content_type, title), data in ((REPORT_PDF, pdf), (REPORT_PNG, png)):
            sha, size = ctx.store.save_blob(data)
            attachments.append(Attachment(content_type=content_type, title=title, blob_sha256=sha, size=size))
    except Exception as exc:  # noqa: BLE001 - a page that cannot be drawn must not cost the analysis
        ctx.store.add_event(message_id, "render_failed", f"{type(exc).__name__}: {exc}"[:500], level="warning")
        log.warning("rendering the explanation of %s failed: %s", message_id, type(exc).__name__)
        return result
    log.debug("rendered message %s in %.0f ms (pdf %d B, png %d B)", message_id,
              (time.perf_counter() - started) * 1000, len(pdf), len(png))
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


def _finish_message(store: MessageStore, message_id: str) -> None:
    states = {d.state for d in store.deliveries(message_id)}
    if states == {"delivered"}:
        store.set_state(message_id, "delivered")


def deliver_message(ctx: WorkerContext, message_id: str, destination: str) -> str | None:
    """Write the stored result to one destination; idempotent on the destination side too."""
    store = ctx.store
    current = store.delivery(message_id, destination)
    if current is not None and current.state in ("delivered", "failed", "dead"):
        return current.remote_ref
    row = store.get(message_id)
    stored = store.get_result(message_id)
    if row is None or stored is None:
        log.error("deliver: message %s has no stored result", message_id)
        return None
    dest = ctx.settings.destination(destination)
    result = AnalysisResult.from_dict(stored.result)
    ecg = load_ecg(store, row)
    attachments = attachment_bytes(store, result)
    try:
        if dest.type == "hl7":
            ref = _deliver_hl7(ctx, row, result, ecg, dest, attachments)
        else:
            ref = _deliver_fhir(result, ecg, dest, message_id, attachments)
    except TransientDeliveryError as exc:
        store.update_delivery(message_id, destination, state="pending", error=str(exc))
        store.add_event(message_id, "delivery_retry", f"{destination}: {exc}", level="warning")
        raise
    except (PermanentDeliveryError, EcgBridgeError) as exc:
        store.update_delivery(message_id, destination, state="failed", error=str(exc))
        store.set_state(message_id, "failed", error=f"delivery to {destination} failed: {exc}")
        store.add_event(message_id, "delivery_failed", f"{destination}: {exc}")
        log.warning("delivery of %s to %s failed permanently", message_id, destination)
        return None
    store.update_delivery(message_id, destination, state="delivered", remote_ref=ref)
    log.info("delivered message %s to %s as %s", message_id, destination, ref)
    _finish_message(store, message_id)
    return ref


def _deliver_fhir(
    result: AnalysisResult, ecg: Ecg, dest: FhirDestination, message_id: str,
    attachments_data: Mapping[str, bytes] | None = None,
) -> str:
    from ecgbridge.outbound.fhir_client import BearerAuth, FhirClient, deliver_report, resolve_patient
    from ecgbridge.mapping.fhir_report import build_report

    token = dest.auth.token()
    with FhirClient(dest.base_url, auth=BearerAuth(token) if token else None, timeout_s=dest.timeout_s) as client:
        patient_ref = resolve_patient(client, ecg.patient, dest.patient_identifier_system)
        bundle = build_report(
            result,
            patient=ecg.patient,
            study=ecg.study,
            message_id=message_id,
            patient_reference=patient_ref,
            patient_identifier_system=dest.patient_identifier_system,
            attachments_data=attachments_data,
        )
        return deliver_report(client, bundle, transaction=dest.write_mode == "transaction")


def control_id(message_id: str, destination: str) -> str:
    """MSH-10 for a result: the same on every retry, so a receiver can drop a duplicate."""
    return hashlib.sha1(f"{message_id}/{destination}".encode()).hexdigest()[:20].upper()


def _deliver_hl7(
    ctx: WorkerContext, row: MessageRow, result: AnalysisResult, ecg: Ecg, dest: Hl7Destination,
    attachments_data: Mapping[str, bytes] | None = None,
) -> str:
    """ORU^R01 over MLLP; waits for the ACK (AA delivers, AE/timeout retry, AR fails)."""
    from ecgbridge.outbound.mllp_client import send_oru
    from ecgbridge.mapping.hl7_oru import build_oru_r01

    order = ctx.store.order_for_message(row.id)
    message = build_oru_r01(
        result,
        ecg=ecg,
        order=order.details if order is not None else None,
        destination=dest,
        message_id=row.id,
        control_id=control_id(row.id, dest.name),
        attachments_data=attachments_data,
    )
    return send_oru(dest, message)


def dead_letter(ctx: WorkerContext, message_id: str, destination: str, error: str) -> None:
    """Give up on a destination after the last retry; visible in ``ecgbridge messages``."""
    ctx.store.update_delivery(message_id, destination, state="dead", error=error, count_attempt=False)
    ctx.store.set_state(message_id, "failed", error=f"delivery to {destination} dead-lettered: {error}")
    ctx.store.add_event(message_id, "dead_letter", f"{destination}: {error}")
    log.error("delivery of %s to %s dead-lettered", message_id, destination)


def backoff_s(settings: Settings, attempts: int) -> float:
    d = settings.delivery
    return min(d.backoff_max_s, d.backoff_initial_s * (2 ** max(0, attempts - 1)))
