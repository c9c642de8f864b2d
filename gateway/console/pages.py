"""The console's pages: sign-in, dashboard, message browser and detail, dead letters, routes,
configuration and audit log. Server-rendered (Jinja2, autoescaped); forms post with the
session's CSRF token; no patient data in titles or URLs (message ids are random UUIDs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ecgbridge.core.accounts import Principal, Role
from ecgbridge.core.operations import ActionError, dead_letters, replay_dead_letters, retry_delivery
from ecgbridge.core.promotions import active_promotions
from ecgbridge.core.promotions import apply as apply_promotions
from ecgbridge.core.queries import search_messages
from ecgbridge.core.routing import route_criteria
from ecgbridge.core.states import DeliveryState, MessageState, Source
from ecgbridge.errors import EcgBridgeError
from ecgbridge.gateway.console import dashboard
from ecgbridge.gateway.console.api import message_detail, message_filter, request_reanalysis, request_report
from ecgbridge.gateway.console.auth import SESSION_COOKIE, LoginThrottle, Sessions, require
from ecgbridge.gateway.console.context import ConsoleContext, context_of
from ecgbridge.gateway.console.oidc import sign_in_options
from ecgbridge.gateway.console.templating import render
from ecgbridge.mapping.readers import read_ecg_bytes

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
Ctx = Annotated[ConsoleContext, Depends(context_of)]


def _safe_next(target: str | None) -> str:
    """Only a path on this console (no scheme, no //host): no open redirect after login."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in target):
        return "/"  # browsers drop tabs and newlines: "/\t/evil.example" would become "//evil.example"
    return target


# ----- sign in / out -------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, ctx: Ctx, next: str = "/") -> HTMLResponse:
    return render(
        request, "login.html", next=_safe_next(next), no_users=not ctx.accounts.has_users(), **sign_in_options(ctx)
    )


@router.post("/login")
def login(
    request: Request,
    ctx: Ctx,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "/",
) -> Response:
    throttle: LoginThrottle = request.app.state.throttle
    address = request.client.host if request.client else "-"
    keys = (f"user:{username.lower()}", f"addr:{address}")
    if throttle.locked(*keys):
        ctx.accounts.audit(username[:64] or "-", "login", outcome="denied", remote_addr=address, note="throttled")
        return render(
            request,
            "login.html",
            status_code=429,
            next=_safe_next(next),
            error="Too many failed sign-ins: wait a few minutes and try again.",
            **sign_in_options(ctx),
        )
    who = ctx.accounts.authenticate(username, password)
    if who is None:
        throttle.failed(*keys)
        ctx.accounts.audit(username[:64] or "-", "login", outcome="failed", remote_addr=address)
        return render(
            request,
            "login.html",
            status_code=401,
            next=_safe_next(next),
            error="Wrong user name or password.",
            **sign_in_options(ctx),
        )
    throttle.succeeded(*keys)
    sessions: Sessions = request.app.state.sessions
    sid, _ = sessions.create(who)
    ctx.accounts.audit(who.name, "login", role=who.role.value, remote_addr=address)
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE, sid, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/"
    )
    return response


@router.post("/logout")
def logout(request: Request, ctx: Ctx, who: Viewer) -> Response:
    sessions: Sessions = request.app.state.sessions
    sessions.drop(request.cookies.get(SESSION_COOKIE))
    ctx.audit(who, "logout", request)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# ----- dashboard ------------------------------------------------------------------------------
@router.get("/", response_class=HTMLResponse)
def dashboard_page(request: Request, ctx: Ctx, who: Viewer) -> HTMLResponse:
    return render(request, "dashboard.html", active="dashboard", **dashboard.dashboard_data(ctx))


# ----- messages -------------------------------------------------------------------------------
def _input_value(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%dT%H:%M") if value else ""


@router.get("/messages", response_class=HTMLResponse)
def messages_page(
    request: Request, ctx: Ctx, who: Viewer, f: Annotated[Any, Depends(message_filter)], cursor: str | None = None
) -> HTMLResponse:
    error = None
    try:
        page = search_messages(ctx.store, f, limit=50, cursor=cursor)
        rows, next_cursor = page.rows, page.next_cursor
    except ValueError as exc:
        rows, next_cursor, error = [], None, str(exc)
    params = {k: v for k, v in request.query_params.items() if k != "cursor" and v}
    next_url = "/messages?" + urlencode({**params, "cursor": next_cursor}) if next_cursor else None
    settings = ctx.settings
    return render(
        request,
        "messages.html",
        active="messages",
        rows=rows,
        f=f,
        next_url=next_url,
        error=error,
        states=[s.value for s in MessageState],
        sources=[s.value for s in Source],
        delivery_states=[s.value for s in DeliveryState],
        route_names=[r.name for r in settings.routes],
        destination_names=[d.name for d in settings.destinations],
        since_value=_input_value(f.since),
        until_value=_input_value(f.until),
    )


@router.get("/messages/{message_id}", response_class=HTMLResponse)
def message_page(message_id: str, request: Request, ctx: Ctx, who: Viewer) -> HTMLResponse:
    row = ctx.store.get(message_id[:64])
    if row is None:
        raise HTTPException(404, f"no message with id {message_id[:64]!r}")
    ctx.audit(who, "view_message", request, target=row.id)
    detail = message_detail(ctx, row)
    patient = None
    if row.state not in (MessageState.REJECTED, MessageState.PROCESSED):
        try:
            ecg = read_ecg_bytes(ctx.store.read_blob(row.blob_sha256), hint=row.source)
            patient = ecg.patient
        except (EcgBridgeError, OSError):
            patient = None
    return render(
        request,
        "message.html",
        active="messages",
        m=row,
        order=detail["order"],
        result=detail["result"],
        deliveries=detail["deliveries"],
        events=detail["events"],
        versions=detail["versions"],
        overreads=detail["overreads"],
        patient=patient,
        message_id=row.id,
        show_viewer=patient is not None,
        can_operate=who.allows(Role.OPERATOR),
        drawing=request.query_params.get("drawing") == "1",
    )


@router.post("/messages/{message_id}/deliveries/{destination}/retry", response_class=HTMLResponse)
def retry_page(message_id: str, destination: str, request: Request, ctx: Ctx, who: Operator) -> Response:
    target = f"{message_id[:64]}/{destination[:64]}"
    try:
        retry_delivery(ctx.store, ctx.dispatcher, ctx.settings, message_id[:64], destination[:64])
    except ActionError as exc:
        ctx.audit(who, "retry_delivery", request, target=target, outcome="failed", note=str(exc))
        raise HTTPException(exc.status, str(exc)) from exc
    ctx.audit(who, "retry_delivery", request, target=target)
    return RedirectResponse(f"/messages/{message_id[:64]}", status_code=303)


@router.post("/messages/{message_id}/report", response_class=HTMLResponse)
def report_page(message_id: str, request: Request, ctx: Ctx, who: Viewer) -> Response:
    drawn = request_report(ctx, who, request, message_id)
    return RedirectResponse(f"/messages/{message_id[:64]}" + ("" if drawn else "?drawing=1"), status_code=303)


@router.post("/messages/{message_id}/reanalyse", response_class=HTMLResponse)
def reanalyse_page(
    message_id: str,
    request: Request,
    ctx: Ctx,
    who: Operator,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    request_reanalysis(ctx, who, request, message_id, reason)
    return RedirectResponse(f"/messages/{message_id[:64]}", status_code=303)


# ----- dead letters ---------------------------------------------------------------------------
def _dead_letters_page(request: Request, ctx: ConsoleContext, who: Principal, **extra: Any) -> HTMLResponse:
    grouped: dict[str, list[Any]] = {}
    for d in dead_letters(ctx.store):
        grouped.setdefault(d.destination, []).append(d)
    return render(
        request,
        "dead_letters.html",
        active="dead",
        by_destination=sorted(grouped.items()),
        can_operate=who.allows(Role.OPERATOR),
        **extra,
    )


@router.get("/dead-letters", response_class=HTMLResponse)
def dead_letters_page(request: Request, ctx: Ctx, who: Viewer) -> HTMLResponse:
    return _dead_letters_page(request, ctx, who)


@router.post("/dead-letters/{destination}/replay", response_class=HTMLResponse)
def replay_page(
    destination: str, request: Request, ctx: Ctx, who: Operator, dry_run: Annotated[str, Form()] = "true"
) -> HTMLResponse:
    dry = dry_run != "false"
    action = "replay_dead_letters" + ("_dry_run" if dry else "")
    try:
        replay = replay_dead_letters(ctx.store, ctx.dispatcher, ctx.settings, destination[:64], dry_run=dry)
    except ActionError as exc:
        ctx.audit(who, action, request, target=destination[:64], outcome="failed", note=str(exc))
        return _dead_letters_page(request, ctx, who, outcome={"error": True, "text": str(exc)})
    ctx.audit(who, action, request, target=destination[:64], detail={"count": replay.count})
    if dry:
        return _dead_letters_page(request, ctx, who, confirm=destination)
    text = f"Replayed {replay.count - len(replay.failed)} dead letter(s) of {destination}."
    if replay.failed:
        text += f" {len(replay.failed)} could not be replayed: " + "; ".join(sorted(set(replay.failed.values())))
    return _dead_letters_page(request, ctx, who, outcome={"error": bool(replay.failed), "text": text})


# ----- validation -------------------------------------------------------------------------------
#: (monotonic time, report) of the validation page: its bootstrap takes a moment on a big site.
_VALIDATION_CACHE: dict[int, tuple[float, dict[str, Any], dict[str, Any]]] = {}
VALIDATION_CACHE_S = 60.0


@router.get("/validation", response_class=HTMLResponse)
def validation_page(request: Request, ctx: Ctx, who: Viewer) -> HTMLResponse:
    """The models on this site's over-read ECGs and the drift of their inputs: aggregates only, no patient data."""
    import time

    from ecgbridge.core.drift import PSI_ALERT, drift_report
    from ecgbridge.core.validation import validation_report

    cached = _VALIDATION_CACHE.get(id(ctx.store))
    if cached is None or time.monotonic() - cached[0] > VALIDATION_CACHE_S:
        report = validation_report(ctx.store, ctx.settings, n_bootstrap=200)
        cached = (time.monotonic(), report, drift_report(ctx.store))
        _VALIDATION_CACHE[id(ctx.store)] = cached
    ctx.audit(who, "view_validation", request)
    drift = cached[2]
    return render(
        request,
        "validation.html",
        active="validation",
        report=cached[1],
        drift_reference=drift["reference"],
        drift_weeks=drift["weeks"][-8:],
        psi_alert=PSI_ALERT,
    )


# ----- routes ---------------------------------------------------------------------------------
def _routes_page(request: Request, ctx: ConsoleContext, who: Principal, **extra: Any) -> HTMLResponse:
    settings = ctx.settings
    promotions = active_promotions(ctx.store)
    routes = []
    for r in settings.routes:
        now = apply_promotions(r, promotions)
        routes.append(
            {
                "name": r.name,
                "criteria": route_criteria(r),
                "models": list(now.live),
                "shadow_models": list(now.shadow),
                "promoted": [f"{p.promoted} over {p.demoted} ({p.promoted_by})" for p in now.applied],
                "destinations": r.destinations,
                "ehr_context": r.ehr_context,
            }
        )
    unrouted = ctx.store.count_state(MessageState.UNROUTED)
    return render(
        request,
        "routes.html",
        active="routes",
        routes=routes,
        generation=ctx.live.generation,
        loaded_at=ctx.live.loaded_at,
        source_file=settings.source_file,
        unrouted=unrouted,
        can_operate=who.allows(Role.OPERATOR),
        **extra,
    )


@router.get("/routes", response_class=HTMLResponse)
def routes_page(request: Request, ctx: Ctx, who: Viewer) -> HTMLResponse:
    return _routes_page(request, ctx, who)


@router.post("/routes/explain", response_class=HTMLResponse)
async def explain_page(
    request: Request,
    ctx: Ctx,
    who: Viewer,
    message_id: Annotated[str, Form()] = "",
    calling_ae: Annotated[str, Form()] = "",
    file: UploadFile | None = None,
) -> HTMLResponse:
    from ecgbridge.gateway.console.explaining import explain_for

    limit = ctx.settings.console.max_upload_bytes
    data: bytes | None = None
    if file is not None and file.filename:
        data = await file.read(limit + 1)
        if len(data) > limit:
            ctx.audit(who, "explain_route", request, outcome="failed", note="upload over the size limit")
            return _routes_page(request, ctx, who, explain_error=f"The file is larger than the {limit} bytes accepted.")
    try:
        explanation = explain_for(ctx, message_id.strip()[:64] or None, data, calling_ae.strip()[:16] or None)
    except EcgBridgeError as exc:
        return _routes_page(request, ctx, who, explain_error=str(exc))
    ctx.audit(who, "explain_route", request, target=message_id.strip()[:64] or "upload")
    return _routes_page(request, ctx, who, explanation=explanation)


@router.post("/routes/reroute", response_class=HTMLResponse)
def reroute_page(request: Request, ctx: Ctx, who: Operator) -> HTMLResponse:
    from ecgbridge.core.operations import reroute_unrouted

    outcome = reroute_unrouted(ctx.store, ctx.dispatcher, ctx.settings)
    ctx.audit(who, "reroute_unrouted", request, detail={"routed": outcome.routed, "still_unrouted": outcome.unrouted})
    return _routes_page(request, ctx, who, reroute=outcome.text())


# ----- configuration --------------------------------------------------------------------------
@router.get("/config", response_class=HTMLResponse)
def config_page(request: Request, ctx: Ctx, who: Admin) -> HTMLResponse:
    return render(
        request,
        "config.html",
        active="config",
        generation=ctx.live.generation,
        loaded_at=ctx.live.loaded_at,
        source_file=ctx.settings.source_file,
    )


@router.post("/config/reload", response_class=HTMLResponse)
def reload_page(request: Request, ctx: Ctx, who: Admin) -> HTMLResponse:
    if ctx.reload is None:
        raise HTTPException(409, "this console cannot reload the configuration")
    result = ctx.reload(actor=who.name, remote_addr=request.client.host if request.client else None)
    return render(
        request,
        "config.html",
        active="config",
        generation=ctx.live.generation,
        loaded_at=ctx.live.loaded_at,
        source_file=ctx.settings.source_file,
        reload=result,
    )


# ----- audit ----------------------------------------------------------------------------------
@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    ctx: Ctx,
    who: Admin,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    before: int | None = None,
) -> HTMLResponse:
    rows = ctx.accounts.audit_log(
        limit=100, before_id=before, actor=actor or None, action=action or None, target=target or None
    )
    ctx.audit(who, "view_audit_log", request)
    params = {k: v for k, v in (("actor", actor), ("action", action), ("target", target)) if v}
    older = "/audit?" + urlencode({**params, "before": rows[-1].id}) if len(rows) == 100 else None
    return render(
        request, "audit.html", active="audit", rows=rows, actor=actor, action=action, target=target, older_url=older
    )
