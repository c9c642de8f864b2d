"""Explain routing for a stored message or an uploaded file, for the routes page and the API."""

from __future__ import annotations

from ecgbridge.core.explain import Explanation, explain_bytes, explain_message
from ecgbridge.errors import InputError
from ecgbridge.gateway.console.context import ConsoleContext

__all__ = ["explain_for"]


def explain_for(
    ctx: ConsoleContext, message_id: str | None, data: bytes | None, calling_ae: str | None = None
) -> Explanation:
    """The current routes' decision; InputError (shown to the user) for an unreadable upload or a bad id."""
    routes = ctx.settings.routes
    if message_id:
        if ctx.store.get(message_id) is None:
            raise InputError(f"no message with id {message_id!r}")
        return explain_message(routes, ctx.store, message_id)
    if data is not None:
        if not data:
            raise InputError("the uploaded file is empty")
        return explain_bytes(routes, data, name="the uploaded file", calling_ae_title=calling_ae)
    raise InputError("give a stored message id or choose a file")
