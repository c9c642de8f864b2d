"""Jinja2 templates shipped in the package (autoescaped), with what every page needs."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from ecgbridge import __version__
from ecgbridge.gateway.console.auth import principal_of, session_of

__all__ = ["templates", "render", "render_error"]

templates = Jinja2Templates(directory=str(Path(__file__).resolve().parent / "templates"))


def _when(value: datetime | str | None) -> str:
    """A timestamp as IT staff read it: UTC, to the second."""
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


templates.env.filters["when"] = _when


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    session = session_of(request)
    context.setdefault("principal", principal_of(request))
    context.setdefault("csrf_token", session.csrf if session else "")
    context.setdefault("version", __version__)
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def render_error(request: Request, status: int, detail: str) -> HTMLResponse:
    return render(request, "error.html", status_code=status, status=status, detail=detail)
