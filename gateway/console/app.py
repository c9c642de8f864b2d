"""The console's FastAPI application: JSON API under /api, pages, /metrics, static files.

Errors answer in the caller's terms: the JSON API with an RFC 9457 problem document,
pages with a readable page (or the login page when not signed in). Nothing is fetched
from the internet: the interactive OpenAPI viewer (which loads from a CDN) is off and
the schema is published at ``/api/openapi.json``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from ecgbridge import __version__
from ecgbridge.gateway.console import api, metrics, oidc, pages, viewer
from ecgbridge.gateway.console.auth import LoginThrottle, Sessions
from ecgbridge.gateway.console.context import ConsoleContext
from ecgbridge.gateway.console.templating import render_error

__all__ = ["create_app", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parent / "static"

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class _SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")  # pages and API answers hold PHI
        return response


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith(("/api/", "/metrics")) or "application/json" in request.headers.get("accept", "")


def problem(status: int, detail: str, title: str | None = None) -> JSONResponse:
    body = {"type": "about:blank", "title": title or _TITLES.get(status, "Error"), "status": status, "detail": detail}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    410: "Gone",
    413: "Content too large",
    422: "Unprocessable content",
    429: "Too many requests",
}


def create_app(ctx: ConsoleContext) -> FastAPI:
    console = ctx.settings.console
    app = FastAPI(
        title="ecgbridge console API",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
        description="Messages, deliveries, routes, configuration and statistics of one ecgbridge gateway.",
    )
    app.state.ctx = ctx
    app.state.sessions = Sessions(console.session_idle_s)
    app.state.throttle = LoginThrottle(console.login_max_failures, console.login_lockout_s)
    app.add_middleware(_SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for module in (api, viewer, metrics, oidc, pages):
        app.include_router(module.router)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if _wants_json(request):
            response = problem(exc.status_code, str(exc.detail))
            for name, value in (exc.headers or {}).items():
                response.headers[name] = value
            return response
        if exc.status_code == 401:
            return RedirectResponse("/login", status_code=303)
        return render_error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p not in ('query', 'body', 'path'))}: {e['msg']}"
            for e in exc.errors()
        )
        if _wants_json(request):
            return problem(422, where)
        return render_error(request, 422, where)

    return app
