"""The work queue: task names, the Celery app's settings, and enqueueing by message id.

Only ids travel through the broker, never an ECG. Tasks are acknowledged late (after
they finish) and a worker takes one task at a time, so a worker killed mid-task
leaves its task to be redelivered; the jobs are idempotent, so redelivery never
duplicates a report. The gateway uses this module to enqueue; the worker room
registers the task bodies on the same app (:mod:`ecgbridge.worker.tasks`). Importing
it loads no model runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery

from ecgbridge.core.settings import Settings
from ecgbridge.errors import StorageError

__all__ = [
    "ANALYSE_TASK",
    "DELIVER_TASK",
    "DELIVERY_QUEUE",
    "QUEUE",
    "QUEUES",
    "RENDER_TASK",
    "Dispatcher",
    "make_celery",
]

log = logging.getLogger("ecgbridge.dispatch")

#: Celery task names: stable across releases, so tasks queued before an upgrade still run.
ANALYSE_TASK = "ecgbridge.analyse"
DELIVER_TASK = "ecgbridge.deliver"
#: Draws a result's PDF / PNG report (CPU work, on the analysis queue), then sends the deliveries waiting for it.
RENDER_TASK = "ecgbridge.render"
#: The analysis queue (CPU-bound work), and the queue of every task enqueued before deliveries had their own.
QUEUE = "ecgbridge"
#: Deliveries: network I/O that waits on the receiver, served by a thread pool
#: (``ecgbridge worker --queues delivery``) so a slow EHR never holds an analysis process.
DELIVERY_QUEUE = "ecgbridge-deliver"
#: What ``ecgbridge worker --queues`` takes: a name, or "all" for both queues in one pool.
QUEUES: dict[str, tuple[str, ...]] = {
    "all": (QUEUE, DELIVERY_QUEUE),
    "analysis": (QUEUE,),
    "delivery": (DELIVERY_QUEUE,),
}


def make_celery(settings: Settings) -> Celery:
    """The Celery app with ecgbridge's delivery guarantees (acks late, one task at a time)."""
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
        # a broker that does not answer a connection must not hold a listener (or a console request)
        # for the operating system's TCP timeout: the message is safe on disk, the sweep re-enqueues it
        broker_transport_options={
            "visibility_timeout": settings.broker.visibility_timeout_s,
            "socket_connect_timeout": 5,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        enable_utc=True,
    )
    return app


class Dispatcher:
    """Enqueues analyse and deliver tasks by name; a broker that does not take one is a StorageError."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def analyse(self, message_id: str) -> None:
        self._send(ANALYSE_TASK, [message_id], QUEUE)

    def render(self, message_id: str, *, then_deliver: bool = False) -> None:
        """Draw the report of the message's latest result; ``then_deliver``: enqueue the deliveries that carry it."""
        self._send(RENDER_TASK, [message_id, then_deliver], QUEUE)

    def deliver(self, message_id: str, destination: str, countdown: float | None = None) -> None:
        self._send(DELIVER_TASK, [message_id, destination], DELIVERY_QUEUE, countdown=countdown)

    def waiting(self, queue: str) -> int | None:
        """Tasks waiting in ``queue`` now (not those a worker holds); None if unknown or unreachable."""
        length = self._ask_redis(lambda client: client.llen(queue))
        return int(length) if length is not None else None

    def broker_instance(self) -> str | None:
        """Which run of the broker answers now (Redis's ``run_id``); None if unknown or unreachable.

        A Redis that restarted may have lost the tasks of its last second (its AOF is written
        every second) or all of them (no persistence); a new run id tells the gateway to
        re-enqueue every queued message, not only the ones its periodic sweep takes.
        """
        info = self._ask_redis(lambda client: client.info("server"))
        run_id = info.get("run_id") if isinstance(info, dict) else None
        return str(run_id) if run_id else None

    def _ask_redis(self, question: Callable[[Any], Any]) -> Any:
        """``question(client)`` on the broker's Redis client; None for another broker, or one not answering now."""
        try:
            with self.app.connection_for_write() as conn:
                client = getattr(conn.default_channel, "client", None)  # kombu's Redis transport
                return question(client) if client is not None else None
        except Exception:  # unreachable now: the next sweep asks again
            return None

    def _send(self, name: str, args: list[Any], queue: str, countdown: float | None = None) -> None:
        try:
            self.app.send_task(
                name,
                args=args,
                queue=queue,
                countdown=countdown,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as exc:  # kombu raises many types; all mean "broker unreachable"
            log.warning("enqueue %s for message %s failed: %s", name, args[0], type(exc).__name__)
            raise StorageError(f"the broker did not take the task ({type(exc).__name__})") from exc
        log.debug("enqueued %s %s", name, args)
