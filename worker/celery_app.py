"""The Celery application: one definition for the embedded and the scaled mode.

Tasks are acknowledged late (after they finish) and a worker takes one task at a
time, so a worker killed mid-task leaves its task to be redelivered; the tasks
are idempotent, so redelivery never duplicates a report. Importing this module
is cheap: it does not load models or onnxruntime (the gateway imports it to
enqueue ids).
"""

from __future__ import annotations

from celery import Celery

from ecgbridge.core.settings import Settings

__all__ = ["ANALYSE_TASK", "DELIVER_TASK", "QUEUE", "make_celery"]

ANALYSE_TASK = "ecgbridge.analyse"
DELIVER_TASK = "ecgbridge.deliver"
QUEUE = "ecgbridge"


def make_celery(settings: Settings, *, include_tasks: bool = False) -> Celery:
    app = Celery("ecgbridge", broker=settings.broker_url, set_as_current=True)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.broker.visibility_timeout_s},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    if include_tasks:
        from ecgbridge.worker import tasks

        tasks.register(app, settings)
    return app
