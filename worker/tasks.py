"""Thin Celery tasks: take ids, call ``inference.jobs``, decide retry or dead-letter."""

from __future__ import annotations

import logging
import os

from celery import Celery, Task
from celery.signals import worker_process_init

from ecgbridge.errors import TransientDeliveryError
from ecgbridge.core.settings import Settings
from ecgbridge.core.queue import Dispatcher

from ecgbridge.worker import jobs
from ecgbridge.inference.lvef import LvefModel
from ecgbridge.inference.pipeline import LVEF_MODEL
from ecgbridge.worker.celery_app import ANALYSE_TASK, DELIVER_TASK

__all__ = ["register", "context"]

log = logging.getLogger("ecgbridge.worker")

_settings: Settings | None = None
_context: jobs.WorkerContext | None = None
_app: Celery | None = None


def context() -> jobs.WorkerContext:
    """The per-process context; rebuilt after fork so no DB connection is shared."""
    global _context
    if _context is None or _context.pid != os.getpid():
        assert _settings is not None and _app is not None, "tasks.register() was not called"
        _context = jobs.WorkerContext.create(_settings, Dispatcher(_app))
    return _context


def _warm_models(**_: object) -> None:
    ctx = context()
    for entry in ctx.settings.models:
        try:
            if entry.name == LVEF_MODEL:
                LvefModel.load(ctx.registry.configured_path(LVEF_MODEL))
            else:
                ctx.registry.get(entry.name)
        except Exception as exc:  # reported again, with the message, when a task needs it
            log.error("model %s could not be loaded: %s", entry.name, exc)


def register(app: Celery, settings: Settings) -> None:
    global _settings, _app
    _settings, _app = settings, app
    worker_process_init.connect(_warm_models, weak=False)

    @app.task(name=ANALYSE_TASK, bind=True, max_retries=5)
    def analyse(self: Task, message_id: str) -> None:
        ctx = context()
        try:
            destinations = jobs.analyse_message(ctx, message_id)
        except Exception as exc:  # store or broker trouble: retry, then record
            if self.request.retries >= (self.max_retries or 0):
                ctx.store.add_event(message_id, "analysis_error", f"{type(exc).__name__}: {exc}")
                ctx.store.set_state(message_id, "failed", error=f"analysis error: {type(exc).__name__}: {exc}")
                raise
            raise self.retry(exc=exc, countdown=2 ** self.request.retries)
        for dest in destinations:
            ctx.dispatcher.deliver(message_id, dest)

    @app.task(name=DELIVER_TASK, bind=True, max_retries=None)
    def deliver(self: Task, message_id: str, destination: str) -> None:
        ctx = context()
        try:
            jobs.deliver_message(ctx, message_id, destination)
        except TransientDeliveryError as exc:
            row = ctx.store.delivery(message_id, destination)
            attempts = row.attempts if row else 1
            if attempts >= ctx.settings.delivery.max_attempts:
                jobs.dead_letter(ctx, message_id, destination, str(exc))
                return
            countdown = max(jobs.backoff_s(ctx.settings, attempts), getattr(exc, "retry_after_s", 0) or 0)
            # Celery logs the retry's exception text; a receiver's error text may quote patient
            # data, so the log gets only the kind of failure (the full text is in the store).
            safe = TransientDeliveryError(f"{destination}: {type(exc).__name__}, attempt {attempts}")
            raise self.retry(exc=safe, countdown=countdown)
