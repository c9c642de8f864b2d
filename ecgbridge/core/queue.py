"""Enqueue work by task name and message id; never an ECG payload through the broker."""

from __future__ import annotations

import logging

from celery import Celery

from ecgbridge.errors import StorageError
from ecgbridge.worker.celery_app import ANALYSE_TASK, DELIVER_TASK, QUEUE

__all__ = ["Dispatcher"]

log = logging.getLogger("ecgbridge.dispatch")


class Dispatcher:
    def __init__(self, app: Celery) -> None:
        self.app = app

    def analyse(self, message_id: str) -> None:
        self._send(ANALYSE_TASK, [message_id])

    def deliver(self, message_id: str, destination: str, countdown: float | None = None) -> None:
        self._send(DELIVER_TASK, [message_id, destination], countdown=countdown)

    def _send(self, name: str, args: list[str], countdown: float | None = None) -> None:
        try:
            self.app.send_task(name, args=args, queue=QUEUE, countdown=countdown, retry=True,
                               retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
        except Exception as exc:  # kombu raises many types; all mean "broker unreachable"
            log.warning("enqueue %s for message %s failed: %s", name, args[0], type(exc).__name__)
            raise StorageError(f"the broker did not take the task ({type(exc).__name__})") from exc
        log.debug("enqueued %s %s", name, args)
