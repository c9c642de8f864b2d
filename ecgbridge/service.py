"""Starting the parts: gateway, workers, embedded broker; and the recovery sweep.

``ecgbridge run`` = broker (when embedded) + worker processes + gateway in this
process. ``ecgbridge gateway`` and ``ecgbridge worker`` start the parts alone,
for many workers against one Redis.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ecgbridge.broker import EmbeddedRedis
from ecgbridge.core.queue import QUEUE, Dispatcher, make_celery
from ecgbridge.core.settings import Settings
from ecgbridge.core.states import MessageState, WorkKind
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import StorageError

__all__ = ["recover", "Gateway", "run_worker", "run_all"]

log = logging.getLogger("ecgbridge")


def recover(store: MessageStore, dispatcher: Dispatcher, *, include_queued: bool) -> int:
    """Re-enqueue work a crash may have lost; jobs are idempotent, so extra enqueues are harmless."""
    count = 0
    for work in list(store.unfinished()):
        try:
            if work.kind is WorkKind.ANALYSE:
                row = store.get(work.message_id)
                if row is not None and row.state == MessageState.QUEUED and not include_queued:
                    continue
                dispatcher.analyse(work.message_id)
                if row is not None and row.state == MessageState.RECEIVED:
                    store.set_state(work.message_id, MessageState.QUEUED)
            else:
                assert work.destination is not None
                dispatcher.deliver(work.message_id, work.destination)
            count += 1
        except StorageError:
            log.warning("recovery: broker unreachable, will try again")
            break
    if count:
        log.info("recovery: re-enqueued %d job(s)", count)
    return count


class Gateway:
    """The listeners plus a periodic sweep that enqueues stored-but-unqueued messages."""

    def __init__(self, settings: Settings, sweep_interval_s: float = 15.0) -> None:
        from ecgbridge.gateway.dicom_scp import DicomGateway

        self.settings = settings
        self.store = MessageStore(settings.database_url, settings.data_dir)
        self.store.create_schema()
        self.dispatcher = Dispatcher(make_celery(settings))
        self.dicom = DicomGateway(settings, self.store, self.dispatcher) if settings.listeners.dicom.enabled else None
        self.mllp = None
        if settings.listeners.mllp.enabled:
            from ecgbridge.gateway.mllp import MllpGateway

            self.mllp = MllpGateway(settings, self.store, self.dispatcher)
        self.inbox = None
        if settings.listeners.inbox.enabled:
            from ecgbridge.gateway.inbox import InboxWatcher

            self.inbox = InboxWatcher(settings, self.store, self.dispatcher)
        self._stop = threading.Event()
        self._sweep_interval = sweep_interval_s
        self._sweeper: threading.Thread | None = None

    def start(self) -> None:
        recover(self.store, self.dispatcher, include_queued=True)
        for listener in (self.dicom, self.mllp, self.inbox):
            if listener is not None:
                listener.start()
        self._sweeper = threading.Thread(target=self._sweep, name="recovery-sweep", daemon=True)
        self._sweeper.start()

    def _sweep(self) -> None:
        while not self._stop.wait(self._sweep_interval):
            try:
                recover(self.store, self.dispatcher, include_queued=False)
            except Exception:
                log.exception("recovery sweep failed")

    def stop(self) -> None:
        self._stop.set()
        for listener in (self.inbox, self.mllp, self.dicom):
            if listener is not None:
                listener.stop()


def run_worker(settings: Settings, *, concurrency: int | None = None, loglevel: str | None = None) -> None:
    """A Celery worker in this process (prefork pool); blocks until stopped."""
    from ecgbridge.worker.tasks import worker_app

    MessageStore(settings.database_url, settings.data_dir).create_schema()
    app = worker_app(settings)
    argv = [
        "worker",
        "--queues",
        QUEUE,
        "--concurrency",
        str(concurrency or settings.workers.concurrency),
        "--pool",
        "prefork",
        "--loglevel",
        loglevel or settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--hostname",
        f"ecgbridge-{os.getpid()}@%h",
    ]
    app.worker_main(argv)


def _worker_command(settings: Settings) -> list[str]:
    cmd = [sys.executable, "-m", "ecgbridge", "worker"]
    if settings.source_file is not None:
        cmd += ["--config", str(settings.source_file)]
    return cmd


def _wait_for_signal() -> None:
    stop = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    while not stop.wait(1.0):
        pass


def run_all(settings: Settings) -> None:
    """Broker (embedded unless configured) + worker processes + gateway; until SIGINT/SIGTERM."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker: EmbeddedRedis | None = None
    env = dict(os.environ)
    env["ECGBRIDGE_DATA_DIR"] = str(settings.data_dir.resolve())
    if settings.embedded_broker:
        broker = EmbeddedRedis(settings.data_dir / "broker", settings.broker_socket)
        broker.start()
        env["ECGBRIDGE_BROKER_URL"] = settings.broker_url
    workers: list[subprocess.Popen[bytes]] = []
    gateway: Gateway | None = None
    try:
        for _ in range(settings.workers.processes):
            workers.append(subprocess.Popen(_worker_command(settings), env=env))
        gateway = Gateway(settings)
        gateway.start()
        dicom = settings.listeners.dicom
        mllp = settings.listeners.mllp
        print(
            f"ecgbridge running: DICOM {dicom.ae_title} on {dicom.host}:{gateway.dicom.port if gateway.dicom else '-'}, "
            f"HL7 MLLP on {mllp.host}:{gateway.mllp.port if gateway.mllp else '-'}, "
            f"{len(workers)} worker process(es), data in {Path(settings.data_dir).resolve()}, "
            f"broker {'embedded' if broker else settings.broker_url}. Ctrl-C stops.",
            flush=True,
        )
        _wait_for_signal()
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        if broker is not None:
            broker.stop()
