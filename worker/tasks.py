"""Thin Celery tasks: take ids, call the jobs, decide retry or dead-letter.

Per-process resources (store connection pool, model registry, EHR clients, senders)
live on a base Task class, as Celery's task guide shows: built on first use in each
worker process (after the fork, so no connection is shared between processes) and
reused by every task that process runs, by every thread of a delivery worker's pool too
(the store, httpx clients and senders are safe to share between threads).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery, Task
from celery.signals import worker_process_init

from ecgbridge.core.queue import ANALYSE_TASK, DELIVER_TASK, RENDER_TASK, Dispatcher, make_celery
from ecgbridge.core.settings import Settings
from ecgbridge.core.states import MessageState
from ecgbridge.errors import TransientDeliveryError
from ecgbridge.worker import delivery, jobs

__all__ = ["WorkerTask", "register", "worker_app"]

log = logging.getLogger("ecgbridge.worker")


class WorkerTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """Base class of ecgbridge's tasks: one :class:`~ecgbridge.worker.jobs.WorkerContext` per process."""

    abstract = True
    settings: Settings | None = None
    _context: jobs.WorkerContext | None = None
    _context_lock = threading.Lock()

    @property
    def context(self) -> jobs.WorkerContext:
        with WorkerTask._context_lock:  # a delivery worker's threads share one context
            ctx = WorkerTask._context
            if ctx is None or ctx.pid != os.getpid():
                assert WorkerTask.settings is not None, "worker.tasks.register() was not called"
                ctx = jobs.WorkerContext.create(WorkerTask.settings, Dispatcher(self.app))
                WorkerTask._context = ctx
            ctx.follow_config_file()
        return ctx


def _warm_models(sender: Any = None, **_: object) -> None:
    """Load every configured model when a worker process starts, not on its first ECG."""
    task = _analyse_task
    if task is None:
        return
    ctx = task.context
    for entry in ctx.settings.models:
        try:
            ctx.registry.get(entry.name)
        except Exception as exc:  # reported again, with the message, when a task needs it
            log.error("model %s could not be loaded: %s", entry.name, exc)


_analyse_task: WorkerTask | None = None

#: Retries of a delivery task that failed on something other than its receiver (the store, the
#: broker): after these, the task fails and the gateway's recovery sweep takes the delivery.
UNEXPECTED_RETRIES = 10


def register(app: Celery, settings: Settings) -> None:
    """Register the analyse and deliver tasks on ``app`` for this configuration."""
    global _analyse_task
    WorkerTask.settings = settings
    WorkerTask._context = None
    worker_process_init.connect(_warm_models, weak=False)

    @app.task(name=ANALYSE_TASK, bind=True, base=WorkerTask, max_retries=5)  # type: ignore[untyped-decorator]
    def analyse(self: WorkerTask, message_id: str) -> None:
        """First analysis, or the re-analysis waiting in the store: the version travels there, not in the
        arguments, so the task's name and arguments stay those of every release."""
        ctx = self.context
        try:
            destinations = jobs.analyse_message(ctx, message_id)
        except Exception as exc:  # store or broker trouble: retry, then record
            if self.request.retries >= (self.max_retries or 0):
                ctx.store.add_event(message_id, "analysis_error", f"{type(exc).__name__}: {exc}")
                waiting = ctx.store.pending_version(message_id)
                if waiting is not None:  # a re-analysis asked for: the next request asks for it again
                    ctx.store.fail_version(message_id, waiting, f"analysis error: {type(exc).__name__}: {exc}")
                ctx.store.set_state(
                    message_id, MessageState.FAILED, error=f"analysis error: {type(exc).__name__}: {exc}"
                )
                raise
            raise self.retry(exc=exc, countdown=2**self.request.retries) from exc
        assert ctx.dispatcher is not None  # the task's context always has one
        held = jobs.report_pending(ctx, message_id, destinations)
        for dest in destinations:
            if dest not in held:
                ctx.dispatcher.deliver(message_id, dest)
        if held:  # drawn in its own task, then those deliveries go
            ctx.dispatcher.render(message_id, then_deliver=True)

    @app.task(name=RENDER_TASK, bind=True, base=WorkerTask, max_retries=5)  # type: ignore[untyped-decorator]
    def render(self: WorkerTask, message_id: str, then_deliver: bool = False) -> None:
        """Draw the report of the latest result (once); then, if asked, send the deliveries that carry it."""
        ctx = self.context
        try:
            jobs.render_report(ctx, message_id)
            destinations = jobs.pending_deliveries(ctx, message_id) if then_deliver else []
        except Exception as exc:  # store or broker trouble: retry; the deliveries' own jobs draw it otherwise
            if self.request.retries >= (self.max_retries or 0):
                raise
            raise self.retry(exc=exc, countdown=2**self.request.retries) from exc
        assert ctx.dispatcher is not None
        for dest in destinations:
            if ctx.settings.destination(dest).wants_report():
                ctx.dispatcher.deliver(message_id, dest)

    @app.task(name=DELIVER_TASK, bind=True, base=WorkerTask, max_retries=None)  # type: ignore[untyped-decorator]
    def deliver(self: WorkerTask, message_id: str, destination: str) -> None:
        ctx = self.context
        try:
            delivery.deliver_message(ctx, message_id, destination, claim=self.request.id)
        except delivery.DeliveryClaimed as exc:  # another task is sending it: no attempt spent
            raise self.retry(countdown=exc.retry_after_s + 1) from None
        except TransientDeliveryError as exc:
            row = ctx.store.delivery(message_id, destination)
            attempts = row.attempts if row else 1
            if attempts >= ctx.settings.delivery.max_attempts:
                delivery.dead_letter(ctx, message_id, destination, str(exc))
                return
            countdown = delivery.retry_countdown(ctx.settings, attempts, exc)  # = the row's next_attempt_at
            # Celery logs the retry's exception text; a receiver's error text may quote patient
            # data, so the log gets only the kind of failure (the full text is in the store).
            safe = TransientDeliveryError(f"{destination}: {type(exc).__name__}, attempt {attempts}")
            raise self.retry(exc=safe, countdown=countdown) from None
        except Exception as exc:  # the store (a full disk) or the broker: try again, no attempt spent
            if self.request.retries >= UNEXPECTED_RETRIES:
                raise  # acknowledged as failed; the gateway's sweep enqueues the delivery again later
            log.warning("deliver %s to %s: %s; trying again", message_id, destination, type(exc).__name__)
            raise self.retry(countdown=min(60, 2 ** min(self.request.retries, 6))) from None

    _analyse_task = analyse


def worker_app(settings: Settings) -> Celery:
    """The Celery app with ecgbridge's tasks registered: what a worker process runs."""
    app = make_celery(settings)
    register(app, settings)
    return app
