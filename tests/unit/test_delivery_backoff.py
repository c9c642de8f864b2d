"""A retried delivery waits for its backoff: the recovery sweep must not run it early.

Why: the gateway's sweep (every 15 s) used to re-enqueue every pending delivery, so a
destination that was down spent its ``max_attempts`` long before the configured backoff
allowed and was dead-lettered within a minute or two.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, text, update

from ecgbridge.core.settings import load_settings
from ecgbridge.core.states import DeliveryState, Work, WorkKind
from ecgbridge.core.store import DeliveryRow, MessageStore
from ecgbridge.errors import TransientDeliveryError
from ecgbridge.service import RETRY_GRACE_S, recover
from ecgbridge.worker.delivery import deliver_message, retry_countdown
from ecgbridge.worker.jobs import WorkerContext, analyse_message
from tests.support import toy_sender  # noqa: F401 - registers the toy destination type

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dicom" / "ptbxl_00024_norm_12lead.dcm"
DEST = "research-share"


class RecordingDispatcher:
    """What the sweep enqueues, without a broker."""

    def __init__(self, backlog: int = 0) -> None:
        self.sent: list[tuple[str, ...]] = []
        self.backlog = backlog  # tasks waiting in the delivery queue

    def waiting(self, queue: str) -> int:
        return self.backlog

    def analyse(self, message_id: str) -> None:
        self.sent.append(("analyse", message_id))

    def deliver(self, message_id: str, destination: str, countdown: float | None = None) -> None:
        self.sent.append(("deliver", message_id, destination))


@pytest.fixture
def failed_once(tmp_path: Path, database_url: str | None) -> tuple[WorkerContext, str]:
    """An analysed message whose delivery failed transiently once (backoff 30 s, 3 attempts); SQLite, PostgreSQL."""
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    config = tmp_path / "ecgbridge.yaml"
    storage = f"storage: {{database_url: '{database_url}'}}\n" if database_url else ""
    config.write_text(
        f"""data_dir: {tmp_path / "data"}
{storage}delivery: {{max_attempts: 3, backoff_initial_s: 30, backoff_max_s: 300}}
destinations:
  - {{name: {DEST}, type: toy, folder: {outbox}}}
routes:
  - {{name: all-ecg, destinations: [{DEST}]}}
""",
        encoding="utf-8",
    )
    ctx = WorkerContext.create(load_settings(config))
    ctx.store.create_schema()
    sha, size = ctx.store.save_blob(FIXTURE.read_bytes())
    mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    assert analyse_message(ctx, mid) == [DEST]
    (outbox / "fail-next").touch()
    with pytest.raises(TransientDeliveryError):
        deliver_message(ctx, mid, DEST)
    return ctx, mid


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite gives naive UTC back


def test_the_sweep_leaves_a_delivery_waiting_for_its_backoff(failed_once: tuple[WorkerContext, str]) -> None:
    ctx, mid = failed_once
    row = ctx.store.delivery(mid, DEST)
    assert row is not None and row.state == DeliveryState.PENDING and row.attempts == 1
    dispatcher = RecordingDispatcher()
    for _ in range(4):  # a minute of the gateway's 15-second sweeps
        recover(ctx.store, dispatcher, include_queued=False)  # type: ignore[arg-type]
    recover(ctx.store, dispatcher, include_queued=True)  # and a gateway restart
    assert dispatcher.sent == []
    row = ctx.store.delivery(mid, DEST)
    assert row.attempts == 1 and row.state == DeliveryState.PENDING


def test_the_retry_time_is_stored_with_the_failure_and_the_sweep_takes_it_once_overdue(
    failed_once: tuple[WorkerContext, str],
) -> None:
    ctx, mid = failed_once
    row = ctx.store.delivery(mid, DEST)
    assert row is not None and row.next_attempt_at is not None
    wait = (_utc(row.next_attempt_at) - datetime.now(UTC)).total_seconds()
    assert 25 < wait <= 30  # backoff_initial_s after the first attempt: the task's countdown
    assert retry_countdown(ctx.settings, 1, TransientDeliveryError("busy")) == 30
    assert list(ctx.store.unfinished()) == []
    assert list(ctx.store.unfinished(datetime.now(UTC) + timedelta(seconds=31))) == [Work(mid, WorkKind.DELIVER, DEST)]

    def due(seconds_ago: float) -> None:
        with ctx.store.session() as s, s.begin():
            s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.message_id == mid)
                .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=seconds_ago))
            )

    dispatcher = RecordingDispatcher()
    due(1)  # just due: the broker's retry task runs it; the sweep does not double it
    recover(ctx.store, dispatcher, include_queued=False)  # type: ignore[arg-type]
    assert dispatcher.sent == []
    recover(ctx.store, dispatcher, include_queued=True)  # a restart takes what is due
    assert dispatcher.sent == [("deliver", mid, DEST)]
    due(RETRY_GRACE_S + 5)  # overdue: its retry task was lost
    recover(ctx.store, dispatcher, include_queued=False)  # type: ignore[arg-type]
    assert dispatcher.sent == [("deliver", mid, DEST)] * 2


def test_an_overdue_delivery_behind_a_backlog_is_late_not_lost(failed_once: tuple[WorkerContext, str]) -> None:
    """The periodic sweep leaves deliveries alone while tasks wait in the delivery queue.

    Found by the soak: during a long FHIR outage hundreds of deliveries were overdue only
    because their tasks were still queued; every sweep enqueued them all again, and the queue
    grew to 26 000 copies. A gateway start-up (and a broker restart) still takes them.
    """
    ctx, mid = failed_once
    with ctx.store.session() as s, s.begin():
        s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.message_id == mid)
            .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=RETRY_GRACE_S + 5))
        )
    busy = RecordingDispatcher(backlog=40)
    recover(ctx.store, busy, include_queued=False)  # type: ignore[arg-type]
    assert busy.sent == []
    recover(ctx.store, busy, include_queued=True)  # type: ignore[arg-type]
    assert busy.sent == [("deliver", mid, DEST)]
    idle = RecordingDispatcher(backlog=0)
    recover(ctx.store, idle, include_queued=False)  # type: ignore[arg-type]
    assert idle.sent == [("deliver", mid, DEST)]


def test_a_success_clears_the_retry_time(failed_once: tuple[WorkerContext, str]) -> None:
    ctx, mid = failed_once
    assert deliver_message(ctx, mid, DEST) is not None
    row = ctx.store.delivery(mid, DEST)
    assert row.state == DeliveryState.DELIVERED and row.next_attempt_at is None and row.attempts == 2


def test_a_retry_after_longer_than_the_backoff_wins() -> None:
    settings = load_settings(None)
    exc = TransientDeliveryError("429")
    exc.retry_after_s = 120.0  # type: ignore[attr-defined]
    assert retry_countdown(settings, 1, exc) == 120.0
    assert retry_countdown(settings, 1, TransientDeliveryError("503")) == settings.delivery.backoff_initial_s


def test_an_older_database_gets_the_column_in_place(tmp_path: Path, database_url: str | None) -> None:
    store = MessageStore(database_url or f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    store.create_schema()
    sha, size = store.save_blob(b"DICM")
    mid = store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="r")
    store.ensure_deliveries(mid, ["ehr"])
    with store.engine.begin() as conn:  # the deliveries table as an older release made it
        conn.execute(text("ALTER TABLE deliveries DROP COLUMN next_attempt_at"))
    assert "next_attempt_at" not in {c["name"] for c in inspect(store.engine).get_columns("deliveries")}

    again = MessageStore(store.url, tmp_path)
    again.create_schema()  # what the next start of any process does
    again.create_schema()  # and a second one finds nothing to add
    assert "next_attempt_at" in {c["name"] for c in inspect(again.engine).get_columns("deliveries")}
    row = again.delivery(mid, "ehr")
    assert row is not None and row.state == DeliveryState.PENDING and row.next_attempt_at is None
    store.set_state(mid, "analysed")
    assert list(again.unfinished()) == [Work(mid, WorkKind.DELIVER, "ehr")]
    again.engine.dispose()
    store.engine.dispose()
