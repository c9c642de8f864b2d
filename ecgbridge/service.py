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
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ecgbridge.broker import EmbeddedRedis
from ecgbridge.core.accounts import AccountStore
from ecgbridge.core.live import LiveSettings
from ecgbridge.core.queue import DELIVERY_QUEUE, QUEUES, Dispatcher, make_celery
from ecgbridge.core.settings import Settings
from ecgbridge.core.states import MessageState, WorkKind
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import StorageError

__all__ = ["recover", "Gateway", "run_worker", "run_all", "reload_on_sighup"]

log = logging.getLogger("ecgbridge")


#: How long past its due time the periodic sweep leaves a pending delivery to the broker's own
#: (retry) task before taking it for lost: enqueuing both would spend two attempts on one retry.
RETRY_GRACE_S = 60.0


def recover(store: MessageStore, dispatcher: Dispatcher, *, include_queued: bool) -> int:
    """Re-enqueue work a crash may have lost; jobs are idempotent, so an extra enqueue sends nothing twice.

    A delivery waiting for its backoff (``next_attempt_at`` in the future) is never taken: it
    would spend attempts early. At start-up (``include_queued``) every due delivery is taken;
    the periodic sweep takes one only :data:`RETRY_GRACE_S` after it fell due, and only while
    the delivery queue is empty: a delivery behind a backlog is late, not lost, and enqueuing
    it again at every sweep would grow the backlog without end (the soak saw 26 000 copies).
    """
    count = 0
    due_by = datetime.now(UTC) - timedelta(seconds=0 if include_queued else RETRY_GRACE_S)
    backlog = not include_queued and (dispatcher.waiting(DELIVERY_QUEUE) or 0) > 0
    for work in list(store.unfinished(due_by)):
        if backlog and work.kind is WorkKind.DELIVER:
            continue
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


def _is_running(listener: Any) -> Callable[[], bool]:
    return lambda: bool(listener.running)


class Gateway:
    """The listeners plus a periodic sweep that enqueues stored-but-unqueued messages."""

    def __init__(self, settings: Settings, sweep_interval_s: float = 15.0) -> None:
        from ecgbridge.gateway.dicom_scp import DicomGateway

        #: The configuration in force; a reload (SIGHUP or the console) replaces it for every listener.
        self.live = LiveSettings(settings)
        self.store = MessageStore(settings.database_url, settings.data_dir)
        self.store.create_schema()
        self.accounts = AccountStore(self.store)
        self.dispatcher = Dispatcher(make_celery(settings))
        self.dicom = DicomGateway(self.live, self.store, self.dispatcher) if settings.listeners.dicom.enabled else None
        self.mllp = None
        if settings.listeners.mllp.enabled:
            from ecgbridge.gateway.mllp import MllpGateway

            self.mllp = MllpGateway(self.live, self.store, self.dispatcher)
        self.inbox = None
        if settings.listeners.inbox.enabled:
            from ecgbridge.gateway.inbox import InboxWatcher

            self.inbox = InboxWatcher(self.live, self.store, self.dispatcher)
        self.console = None
        if settings.console.enabled:
            from ecgbridge.gateway.console.context import ConsoleContext
            from ecgbridge.gateway.console.server import ConsoleServer

            listeners = {
                name: _is_running(listener)
                for name, listener in (("dicom", self.dicom), ("mllp", self.mllp), ("inbox", self.inbox))
                if listener is not None
            }
            context = ConsoleContext(
                self.live, self.store, self.dispatcher, self.accounts, listeners=listeners, reload=self.reload
            )
            self.console = ConsoleServer(context)
        self._stop = threading.Event()
        self._sweep_interval = sweep_interval_s
        self._sweeper: threading.Thread | None = None

    @property
    def settings(self) -> Settings:
        return self.live.current

    def reload(self, actor: str = "system", remote_addr: str | None = None) -> Any:
        """Re-read the configuration file; an invalid file changes nothing. Audited either way."""
        from ecgbridge.core.reload import reload_settings

        return reload_settings(self.live, self.accounts, actor=actor, remote_addr=remote_addr)

    def start(self) -> None:
        recover(self.store, self.dispatcher, include_queued=True)
        for listener in (self.dicom, self.mllp, self.inbox):
            if listener is not None:
                listener.start()
        if self.console is not None:
            try:
                self.console.start()
            except RuntimeError as exc:  # intake matters more than the console: keep receiving
                log.error("%s; the listeners run without it", exc)
                self.console = None
        self._sweeper = threading.Thread(target=self._sweep, name="recovery-sweep", daemon=True)
        self._sweeper.start()
        threading.Thread(target=self._retention, name="retention", daemon=True).start()

    def _sweep(self) -> None:
        broker = self.dispatcher.broker_instance()
        while not self._stop.wait(self._sweep_interval):
            try:
                now = self.dispatcher.broker_instance()
                restarted = broker is not None and now is not None and now != broker
                if restarted:
                    log.warning("recovery: the broker restarted and may have lost queued tasks; re-enqueuing them")
                broker = now or broker
                recover(self.store, self.dispatcher, include_queued=restarted)
            except Exception:
                log.exception("recovery sweep failed")

    def _retention(self, first_after_s: float = 60.0) -> None:
        """Prune every ``retention.run_every_h`` (read each time: a reload may change it), first soon after start."""
        from ecgbridge.core.retention import prune

        due = time.monotonic() + first_after_s
        while not self._stop.wait(min(30.0, first_after_s)):
            every_h = self.settings.retention.run_every_h
            if not every_h or time.monotonic() < due:
                continue
            try:
                prune(self.store, self.settings, dry_run=False)
            except Exception:
                log.exception("retention: the prune failed")
            due = time.monotonic() + every_h * 3600

    def stop(self) -> None:
        self._stop.set()
        for listener in (self.console, self.inbox, self.mllp, self.dicom):
            if listener is not None:
                listener.stop()


def run_worker(
    settings: Settings, *, concurrency: int | None = None, loglevel: str | None = None, queues: str = "all"
) -> int:
    """A Celery worker in this process; blocks until stopped.

    ``queues`` "all" (analyses and deliveries) and "analysis" run a prefork pool of
    ``concurrency`` processes (CPU-bound work); "delivery" runs a pool of threads
    (``workers.delivery_threads``), since a delivery mostly waits on its receiver.

    Returns 0 after a requested shutdown (a signal), otherwise Celery's exit status: the worker
    stopped by itself on an "unrecoverable error", which is what kombu's Redis transport can
    raise while it reconnects to a broker that restarted. The caller starts a fresh process.
    """
    from celery.exceptions import SecurityWarning
    from celery.signals import worker_shutting_down

    asked_to_stop = threading.Event()
    worker_shutting_down.connect(lambda **_: asked_to_stop.set(), weak=False)

    from ecgbridge.worker.tasks import worker_app

    MessageStore(settings.database_url, settings.data_dir).create_schema()
    app = worker_app(settings)
    # Celery warns (many lines) whenever a worker runs as root, because a root worker that
    # accepted pickle could be made to run code; ours accepts JSON only (core.queue), and in
    # containers root is the norm, so the warning is noise in the service log.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    threads = queues == "delivery"
    size = concurrency or (settings.workers.delivery_threads if threads else settings.workers.concurrency)
    argv = [
        "--quiet",  # no banner: the service log says what started (see the "ready." line)
        "worker",
        "--queues",
        ",".join(QUEUES[queues]),
        "--concurrency",
        str(size),
        "--pool",
        "threads" if threads else "prefork",
        "--loglevel",
        loglevel or settings.log_level,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--hostname",
        f"ecgbridge-{os.getpid()}@%h",
    ]
    try:
        app.worker_main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        return 0 if asked_to_stop.is_set() else code
    return 0


def _worker_command(settings: Settings, queues: str) -> list[str]:
    cmd = [sys.executable, "-m", "ecgbridge", "worker", "--queues", queues]
    if settings.source_file is not None:
        cmd += ["--config", str(settings.source_file)]
    return cmd


def _wait_for_signal(on_hangup: Callable[[], None] | None = None, on_tick: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM or SIGINT; on SIGHUP call ``on_hangup`` (a reload) and keep waiting;
    call ``on_tick`` about once a second (the embedded mode watches its worker processes).

    The handlers only set flags: the reload runs here, in the main thread, not inside a
    signal handler (it writes to the store and logs, neither of which is signal-safe).
    """
    stop = threading.Event()
    wake = threading.Event()
    hangup = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()
        wake.set()

    def _hangup(_signum: int, _frame: object) -> None:
        hangup.set()
        wake.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    if on_hangup is not None:
        signal.signal(signal.SIGHUP, _hangup)
    while not stop.is_set():
        wake.wait(1.0)
        wake.clear()
        if on_tick is not None and not stop.is_set():
            on_tick()
        if on_hangup is not None and hangup.is_set() and not stop.is_set():
            hangup.clear()
            try:
                on_hangup()
            except Exception:
                log.exception("SIGHUP: the configuration reload failed")


def reload_on_sighup(gateway: Gateway, after: Callable[[Any], None] | None = None) -> Callable[[], None]:
    """What SIGHUP does: reload the gateway's configuration file and log the outcome (no PHI)."""

    def _reload() -> None:
        log.info("SIGHUP: re-reading the configuration file")
        result = gateway.reload(actor="system:SIGHUP")
        if result.ok:
            log.info("%s", result.message)
        else:
            log.warning("%s", result.message)
        for problem in result.problems if result.status == "invalid" else ():
            log.warning("  %s", problem)
        for warning in result.warnings:
            log.warning("  %s", warning)
        if result.diff:
            log.debug("configuration changes:\n%s", result.diff)
        if after is not None:
            after(result)

    return _reload


def _console_url(gateway: Gateway) -> str:
    if gateway.console is None:
        return "- (off)"
    return f"{gateway.console.scheme}://{gateway.settings.console.host}:{gateway.console.port}/"


def run_all(settings: Settings) -> None:
    """Broker (embedded unless configured) + worker processes + gateway; until SIGINT/SIGTERM.

    SIGHUP reloads the configuration file; when it changed, the worker processes are
    replaced by new ones (which read the new file) and the old ones finish their task.
    """
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

    analysis_workers = settings.workers.analysis_processes
    delivery_workers = settings.workers.delivery_processes if analysis_workers else 0
    # what each worker process takes: analyses, then the delivery workers (or "all" without them)
    roles = ["analysis" if delivery_workers else "all"] * analysis_workers + ["delivery"] * delivery_workers

    def start_worker(role: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(_worker_command(settings, role), env=env)
        process.role = role  # type: ignore[attr-defined]  # read back by _replace_exited and reloads
        return process

    def _renew_workers(result: Any) -> None:
        # Workers look routes, models and destinations up in the settings they started with:
        # start new ones on the new file first, then let the old ones finish (warm shutdown).
        if not result.changed or not workers:
            return
        old = list(workers)
        workers[:] = [start_worker(w.role) for w in old]  # type: ignore[attr-defined]
        _stop_workers(old)
        log.info("SIGHUP: %d worker process(es) restarted with the new configuration", len(workers))

    try:
        workers.extend(start_worker(role) for role in roles)
        gateway = Gateway(settings)
        gateway.start()
        dicom = settings.listeners.dicom
        mllp = settings.listeners.mllp
        print(
            f"ecgbridge running: DICOM {dicom.ae_title} on {dicom.host}:{gateway.dicom.port if gateway.dicom else '-'}, "
            f"HL7 MLLP on {mllp.host}:{gateway.mllp.port if gateway.mllp else '-'}, "
            f"console on {_console_url(gateway)}, "
            f"{analysis_workers} analysis + {delivery_workers} delivery worker process(es), data in {Path(settings.data_dir).resolve()}, "
            f"broker {'embedded' if broker else settings.broker_url}. Ctrl-C stops"
            + (", SIGHUP reloads the configuration file." if settings.source_file else "."),
            flush=True,
        )
        _wait_for_signal(
            reload_on_sighup(gateway, after=_renew_workers), on_tick=lambda: _replace_exited(workers, start_worker)
        )
    finally:
        if gateway is not None:
            gateway.stop()
        _stop_workers(workers)
        if broker is not None:
            broker.stop()


def _replace_exited(workers: list[subprocess.Popen[bytes]], start: Callable[[str], subprocess.Popen[bytes]]) -> None:
    """Start a new worker process for each one that ended without being asked (killed, out of memory)."""
    for i, w in enumerate(workers):
        if w.poll() is not None:
            log.warning("worker process %d ended (status %s); starting a new one", w.pid, w.returncode)
            workers[i] = start(w.role)  # type: ignore[attr-defined]  # set by run_all's start_worker


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()
