"""The console's JSON API: messages, actions, routes, configuration, statistics, audit log.

Every response that shows patient data (a message's detail, its bytes, its attachments)
is audited; every action needs the operator role (configuration: admin) and is audited
with its outcome.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from ecgbridge.core.accounts import Principal, Role
from ecgbridge.core.operations import ActionError, Reanalysis, reanalyse, replay_dead_letters, retry_delivery
from ecgbridge.core.queries import MessageFilter, search_messages
from ecgbridge.core.retention import PRUNED_DETAIL, is_pruned
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.errors import EcgBridgeError, StorageError
from ecgbridge.gateway.console.auth import require
from ecgbridge.gateway.console.context import ConsoleContext, context_of

__all__ = ["router", "message_summary", "message_detail", "message_filter", "request_reanalysis", "overread_detail"]

router = APIRouter(prefix="/api", tags=["api"])

Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
Ctx = Annotated[ConsoleContext, Depends(context_of)]


def message_summary(row: MessageRow) -> dict[str, Any]:
    """A row of the message list: no patient data (the tables hold none)."""
    return {
        "id": row.id,
        "received_at": row.received_at.isoformat(),
        "source": row.source,
        "remote": row.remote,
        "message_type": row.message_type,
        "state": row.state,
        "route": row.route,
        "error": row.error,
        "flags": list(row.flags or []),
        "sop_instance_uid": row.sop_instance_uid,
        "placer_order_number": row.placer_order_number,
        "filler_order_number": row.filler_order_number,
    }


def message_filter(
    state: str | None = None,
    source: str | None = None,
    route: str | None = None,
    destination: str | None = None,
    delivery_state: str | None = None,
    sender: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    q: Annotated[str | None, Query(description="message id (or prefix), order number or SOP Instance UID")] = None,
) -> MessageFilter:
    def clean(value: str | None) -> str | None:
        return value.strip()[:128] or None if value else None

    return MessageFilter(
        clean(state),
        clean(source),
        clean(route),
        clean(destination),
        clean(delivery_state),
        clean(sender),
        since,
        until,
        clean(q),
    )


def _row_or_404(store: MessageStore, message_id: str) -> MessageRow:
    row = store.get(message_id[:64])
    if row is None:
        raise HTTPException(404, f"no message with id {message_id[:64]!r}")
    return row


def overread_detail(store: MessageStore, message_id: str) -> dict[str, Any] | None:
    """The cardiologists' reads of this ECG (current label and history), or the read this message carried."""
    from ecgbridge.core.labels import current_label, history, overread_of_message

    carried = overread_of_message(store, message_id)
    reads = history(store, message_id)
    if carried is None and not reads:
        return None
    current = current_label(store, message_id)
    return {
        "current": current.to_dict() if current is not None else None,
        "history": [r.to_dict() for r in reads],
        "carried": carried.to_dict() if carried is not None else None,
    }


def message_detail(ctx: ConsoleContext, row: MessageRow) -> dict[str, Any]:
    """Everything IT staff look at for one message: timeline, flags, findings, deliveries, order."""
    view = ctx.store.view(row.id)
    assert view is not None
    order = ctx.store.order_for_message(row.id)
    result = view.result or {}
    outputs = []
    for out in result.get("outputs", []):
        outputs.append(
            {
                "model": out.get("model"),
                "version": out.get("version"),
                "task": out.get("task"),
                "findings": out.get("findings", []),
                "extra": {
                    k: v
                    for k, v in (out.get("extra") or {}).items()
                    if k
                    in (
                        "measurements",
                        "tier",
                        "variant",
                        "severity",
                        "severity_display",
                        "severity4_display",
                        "missing_context",
                        "ehr_status",
                        "predicted_abnormalities",  # predicted from the ECG, never measured
                        "quality_gate",
                    )
                },
            }
        )
    analysed = [v for v in view.versions if v["state"] == "analysed"]
    return {
        "overreads": overread_detail(ctx.store, row.id),
        "message": message_summary(row),
        "events": view.events,
        "deliveries": view.deliveries,
        "versions": view.versions,
        "result": {
            "version": analysed[-1]["version"] if analysed else 1,
            "label": result.get("label"),
            "quality_flags": result.get("quality_flags", []),
            "ecg_flags": result.get("ecg_flags", []),
            "outputs": outputs,
            "attachments": [
                {"index": i, "content_type": a.get("content_type"), "title": a.get("title"), "size": a.get("size")}
                for i, a in enumerate(result.get("attachments", []))
            ],
        }
        if view.result is not None
        else None,
        "order": {
            "id": order.id,
            "placer_order_number": order.placer_order_number,
            "filler_order_number": order.filler_order_number,
            "order_control": order.order_control,
            "status": order.status,
            "message_id": order.message_id,
        }
        if order is not None
        else None,
    }


@router.get("/messages", summary="Messages, newest first, filtered and paged")
def list_messages(
    ctx: Ctx,
    who: Viewer,
    f: Annotated[MessageFilter, Depends(message_filter)],
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    try:
        page = search_messages(ctx.store, f, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    return {"messages": [message_summary(r) for r in page.rows], "next_cursor": page.next_cursor}


@router.get("/messages/{message_id}", summary="One message with its timeline, findings, deliveries and order")
def get_message(message_id: str, request: Request, ctx: Ctx, who: Viewer) -> dict[str, Any]:
    row = _row_or_404(ctx.store, message_id)
    ctx.audit(who, "view_message", request, target=row.id)
    return message_detail(ctx, row)


_EXTENSIONS = {"dicom": "dcm", "hl7": "hl7", "file": "bin"}


@router.get("/messages/{message_id}/raw", summary="The inbound bytes as received (operator)")
def get_raw(message_id: str, request: Request, ctx: Ctx, who: Operator) -> Response:
    row = _row_or_404(ctx.store, message_id)
    if is_pruned(row):
        raise HTTPException(410, PRUNED_DETAIL)
    try:
        data = ctx.store.read_blob(row.blob_sha256)
    except OSError as exc:
        raise HTTPException(410, "the message's bytes are no longer in the store (pruned?)") from exc
    ctx.audit(who, "download_inbound", request, target=row.id, detail={"bytes": len(data)})
    name = f"{row.id}.{_EXTENSIONS.get(row.source, 'bin')}"
    return Response(
        data, media_type="application/octet-stream", headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


@router.get("/messages/{message_id}/attachments/{index}", summary="A rendered attachment (PDF report, PNG)")
def get_attachment(message_id: str, index: int, request: Request, ctx: Ctx, who: Viewer) -> Response:
    row = _row_or_404(ctx.store, message_id)
    if is_pruned(row):
        raise HTTPException(410, PRUNED_DETAIL)
    stored = ctx.store.get_result(row.id)
    attachments = (stored.result.get("attachments") or []) if stored else []
    if not 0 <= index < len(attachments):
        raise HTTPException(404, f"message {row.id} has no attachment {index}")
    item = attachments[index]
    try:
        data = ctx.store.read_blob(item["blob_sha256"])
    except OSError as exc:
        raise HTTPException(410, "the attachment is no longer in the store") from exc
    ctx.audit(who, "view_attachment", request, target=row.id, detail={"index": index})
    kind = str(item.get("content_type") or "application/octet-stream")
    ext = {"application/pdf": "pdf", "image/png": "png"}.get(kind, "bin")
    return Response(
        data, media_type=kind, headers={"Content-Disposition": f'inline; filename="{row.id}-{index}.{ext}"'}
    )


def request_report(ctx: ConsoleContext, who: Principal, request: Request, message_id: str) -> bool:
    """Have the report of the message's latest result drawn (a worker's render task); True if already drawn.

    Reports are drawn only when a destination or a person wants one: this is the person.
    Audited as ``draw_report``; a message not analysed (or pruned) is a 409 / 410 problem.
    """
    row = _row_or_404(ctx.store, message_id[:64])
    if is_pruned(row):
        raise HTTPException(410, PRUNED_DETAIL)
    stored = ctx.store.get_result(row.id)
    if stored is None:
        raise HTTPException(409, f"message {row.id} has no result to draw a report of (state {row.state})")
    if stored.result.get("attachments"):
        return True
    try:
        ctx.dispatcher.render(row.id)
    except StorageError as exc:
        ctx.audit(who, "draw_report", request, target=row.id, outcome="failed", note=str(exc))
        raise HTTPException(503, f"the report could not be asked for: {exc}") from exc
    ctx.audit(who, "draw_report", request, target=row.id)
    return False


@router.post("/messages/{message_id}/report", summary="Have the result's PDF / PNG report drawn (viewer)")
def post_report(message_id: str, request: Request, ctx: Ctx, who: Viewer) -> JSONResponse:
    """202 while a worker draws it (its files then appear in the message's ``result.attachments``); 200 when drawn."""
    drawn = request_report(ctx, who, request, message_id)
    return JSONResponse({"drawn": drawn}, status_code=200 if drawn else 202)


def _action(ctx: ConsoleContext, who: Principal, request: Request, action: str, target: str, run: Any) -> Any:
    """Run an operator action, audit it with its outcome, answer its failure as a problem."""
    try:
        outcome = run()
    except ActionError as exc:
        ctx.audit(who, action, request, target=target, outcome="failed", note=str(exc))
        raise HTTPException(exc.status, str(exc)) from exc
    ctx.audit(who, action, request, target=target)
    return outcome


@router.post("/messages/{message_id}/deliveries/{destination}/retry", summary="Retry one delivery (operator)")
def post_retry(message_id: str, destination: str, request: Request, ctx: Ctx, who: Operator) -> dict[str, Any]:
    _action(
        ctx,
        who,
        request,
        "retry_delivery",
        f"{message_id[:64]}/{destination[:64]}",
        lambda: retry_delivery(ctx.store, ctx.dispatcher, ctx.settings, message_id[:64], destination[:64]),
    )
    return {"message_id": message_id, "destination": destination, "state": "pending"}


@router.post(
    "/messages/{message_id}/reanalyse",
    summary="Re-analyse with the route's current models as a new result version, then update the destinations (operator)",
)
def post_reanalyse(
    message_id: str,
    request: Request,
    ctx: Ctx,
    who: Operator,
    reason: Annotated[str | None, Query(max_length=500, description="why (no patient data)")] = None,
) -> dict[str, Any]:
    outcome = request_reanalysis(ctx, who, request, message_id, reason)
    return {"message_id": outcome.message_id, "version": outcome.version, "joined": outcome.joined, "state": "queued"}


def request_reanalysis(
    ctx: ConsoleContext, who: Principal, request: Request, message_id: str, reason: str | None
) -> Reanalysis:
    """The ``reanalyse`` action for the API and the page: audited with the version it asked for."""
    target = message_id[:64]
    note = (reason or "").strip()[:500] or None
    try:
        outcome = reanalyse(ctx.store, ctx.dispatcher, ctx.settings, target, requested_by=who.name, reason=note)
    except ActionError as exc:
        ctx.audit(who, "reanalyse", request, target=target, outcome="failed", note=str(exc))
        raise HTTPException(exc.status, str(exc)) from exc
    ctx.audit(who, "reanalyse", request, target=target, detail={"version": outcome.version, "joined": outcome.joined})
    return outcome


@router.post("/destinations/{destination}/replay", summary="Replay a destination's dead letters (operator)")
def post_replay(destination: str, request: Request, ctx: Ctx, who: Operator, dry_run: bool = True) -> dict[str, Any]:
    replay = _action(
        ctx,
        who,
        request,
        "replay_dead_letters" + ("_dry_run" if dry_run else ""),
        destination[:64],
        lambda: replay_dead_letters(ctx.store, ctx.dispatcher, ctx.settings, destination[:64], dry_run=dry_run),
    )
    return {
        "destination": replay.destination,
        "dry_run": replay.dry_run,
        "count": replay.count,
        "message_ids": replay.message_ids,
        "failed": replay.failed,
    }


@router.get("/routes", summary="The routes in force, in the order they are tried")
def get_routes(ctx: Ctx, who: Viewer) -> dict[str, Any]:
    settings = ctx.settings
    return {
        "generation": ctx.live.generation,
        "loaded_at": ctx.live.loaded_at.isoformat(),
        "source_file": str(settings.source_file) if settings.source_file else None,
        "routes": [r.model_dump(mode="json") for r in settings.routes],
        "destinations": [{"name": d.name, "type": d.type} for d in settings.destinations],
    }


@router.get("/health", summary="Liveness and readiness: the store answers and the broker takes connections")
def get_health(ctx: Ctx) -> Response:
    checks: dict[str, str] = {}
    try:
        ctx.store.get("00000000-0000-0000-0000-000000000000")
        checks["store"] = "ok"
    except Exception as exc:
        checks["store"] = f"failed: {type(exc).__name__}"
    try:
        with ctx.dispatcher.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"failed: {type(exc).__name__}"
    for name, up in ctx.listeners.items():
        checks[f"listener:{name}"] = "ok" if up() else "down"
    ok = all(v == "ok" for v in checks.values())
    return Response(
        json.dumps({"status": "ok" if ok else "unavailable", "checks": checks}),
        status_code=200 if ok else 503,
        media_type="application/json",
    )


@router.post(
    "/routes/explain", summary="Which route a stored message or an uploaded file would take, and why not the others"
)
async def post_explain(
    request: Request, ctx: Ctx, who: Viewer, message_id: str | None = None, calling_ae: str | None = None
) -> dict[str, Any]:
    from ecgbridge.gateway.console.explaining import explain_for

    data: bytes | None = None
    if message_id is None:
        limit = ctx.settings.console.max_upload_bytes
        data = await request.body()
        if len(data) > limit:
            ctx.audit(who, "explain_route", request, outcome="failed", note="upload over the size limit")
            raise HTTPException(413, f"the file is larger than the {limit} bytes accepted")
    try:
        explanation = explain_for(
            ctx, message_id[:64] if message_id else None, data, calling_ae[:16] if calling_ae else None
        )
    except EcgBridgeError as exc:
        raise HTTPException(422, str(exc)) from exc
    ctx.audit(who, "explain_route", request, target=message_id[:64] if message_id else "upload")
    return explanation.to_dict()


@router.post("/unrouted/reroute", summary="Route the unrouted messages again with the routes in force (operator)")
def post_reroute(request: Request, ctx: Ctx, who: Operator, dry_run: bool = True) -> dict[str, Any]:
    from ecgbridge.core.operations import reroute_unrouted

    outcome = reroute_unrouted(ctx.store, ctx.dispatcher, ctx.settings, dry_run=dry_run)
    ctx.audit(
        who,
        "reroute_unrouted" + ("_dry_run" if dry_run else ""),
        request,
        detail={"routed": outcome.routed, "still_unrouted": outcome.unrouted},
    )
    return {
        "dry_run": dry_run,
        "routed": outcome.routed,
        "by_route": outcome.by_route,
        "still_unrouted": outcome.unrouted,
        "unreadable": outcome.unreadable,
    }


@router.post("/config/reload", summary="Re-read the configuration file; an invalid file changes nothing (admin)")
def post_reload(request: Request, ctx: Ctx, who: Admin) -> Any:
    if ctx.reload is None:
        raise HTTPException(409, "this console cannot reload the configuration")
    result = ctx.reload(actor=who.name, remote_addr=request.client.host if request.client else None)
    return result.to_dict() if hasattr(result, "to_dict") else result


@router.get("/audit", summary="The audit log, newest first (admin)")
def get_audit(
    request: Request,
    ctx: Ctx,
    who: Admin,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    before: int | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    rows = ctx.accounts.audit_log(limit=limit, before_id=before, actor=actor, action=action, target=target)
    ctx.audit(who, "view_audit_log", request)
    return {
        "entries": [
            {
                "id": r.id,
                "at": r.at.isoformat(),
                "actor": r.actor,
                "role": r.role,
                "action": r.action,
                "target": r.target,
                "outcome": r.outcome,
                "remote_addr": r.remote_addr,
                "detail": r.detail,
                "note": r.note,
            }
            for r in rows
        ]
    }


@router.get("/stats", summary="Counts by state per listener, route and destination; queues; throughput; latency")
def get_stats(ctx: Ctx, who: Viewer) -> dict[str, Any]:
    from ecgbridge.core.labels import counts
    from ecgbridge.core.stats import collect_stats

    return {**collect_stats(ctx.store), "overreads": counts(ctx.store)}
