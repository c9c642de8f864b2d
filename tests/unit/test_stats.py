"""The dashboard's statistics (``ecgbridge.core.stats``) on a real store: SQLite, and PostgreSQL.

Every test runs on both databases: a SQLite file in ``tmp_path`` and a fresh schema in the
PostgreSQL database ``test`` at 127.0.0.1:5432 (user postgres or root, trust auth), dropped
afterwards; the PostgreSQL run is skipped, saying why, when no server answers (fails in CI). Times are
set on the rows directly so that buckets, ages and latencies are exact.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, text, update

from ecgbridge.core import stats
from ecgbridge.core.states import DeliveryState
from ecgbridge.core.store import (
    AnalysisTimingRow,
    DeliveryRow,
    EventRow,
    MessageRow,
    MessageStore,
    ResultRow,
    create_missing_indexes,
    record_timings,
    timings_of,
)
from tests.support.peers import need
from tests.support.stores import PostgresUnavailable, message_store

NOW = datetime(2024, 5, 10, 12, 30, tzinfo=UTC)
ECG = Path(__file__).resolve().parents[1] / "fixtures" / "dicom" / "ptbxl_00024_norm_12lead.dcm"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MessageStore]:
    try:
        with message_store(request.param, tmp_path, "stats") as store:
            yield store
    except PostgresUnavailable as exc:
        need(f"PostgreSQL run skipped: {exc}")


def _message(store: MessageStore, *, source: str, state: str, route: str | None, received: datetime, **kw: Any) -> str:
    mid = store.record_message(source=source, blob_sha256="0" * 64, blob_size=1, state=state, route=route, **kw)
    with store.session() as s, s.begin():
        s.execute(update(MessageRow).where(MessageRow.id == mid).values(received_at=received))
    return mid


def _result(store: MessageStore, mid: str, at: datetime) -> None:
    assert store.save_result(mid, {"outputs": []}, "diagnosis@1")
    with store.session() as s, s.begin():
        s.execute(update(ResultRow).where(ResultRow.message_id == mid).values(created_at=at))


def _delivery(store: MessageStore, mid: str, dest: str, state: str, at: datetime, attempts: int = 1) -> None:
    for _ in range(attempts):
        store.update_delivery(mid, dest, state=state)
    with store.session() as s, s.begin():
        s.execute(
            update(DeliveryRow)
            .where(DeliveryRow.message_id == mid, DeliveryRow.destination == dest)
            .values(updated_at=at)
        )


def _event(store: MessageStore, mid: str | None, kind: str, detail: str, at: datetime) -> None:
    with store.session() as s, s.begin():
        s.add(EventRow(message_id=mid, kind=kind, detail=detail, level="info", at=at))


def _scenario(store: MessageStore) -> dict[str, str]:
    """A small day of traffic, with every time known (NOW is 12:30 UTC)."""
    m = NOW - timedelta(minutes=1)  # a minute ago, so that nothing sits on a bucket edge
    ids = {
        "queued": _message(store, source="dicom", state="queued", route="carts", received=m - timedelta(minutes=9)),
        "received": _message(store, source="hl7", state="received", route="wards", received=m - timedelta(hours=2)),
        "analysed": _message(store, source="dicom", state="analysed", route="carts", received=m - timedelta(hours=1)),
        "delivered": _message(
            store, source="file", state="delivered", route="carts", received=m - timedelta(days=1, hours=1)
        ),
        "dead": _message(store, source="hl7", state="failed", route="wards", received=m - timedelta(hours=3)),
        "rejected": _message(store, source="hl7", state="rejected", route=None, received=m - timedelta(minutes=30)),
        "unrouted": _message(store, source="dicom", state="unrouted", route=None, received=m - timedelta(days=8)),
    }
    # analysed 1 h ago + 20 s; its FHIR delivery pending since then
    _result(store, ids["analysed"], m - timedelta(hours=1) + timedelta(seconds=20))
    _delivery(store, ids["analysed"], "fhir_main", DeliveryState.PENDING, m - timedelta(minutes=50), attempts=2)
    # delivered yesterday: result after 10 s, delivered 5 s later to both destinations
    _result(store, ids["delivered"], m - timedelta(days=1, hours=1) + timedelta(seconds=10))
    for dest in ("fhir_main", "fhir"):
        _delivery(store, ids["delivered"], dest, DeliveryState.DELIVERED, m - timedelta(days=1, hours=1, seconds=-15))
    # dead-lettered 3 h ago (result after 40 s, dead 2 min later); "fhir" must not count "fhir_main"'s letters
    _result(store, ids["dead"], m - timedelta(hours=3) + timedelta(seconds=40))
    _delivery(store, ids["dead"], "fhir_main", DeliveryState.DEAD, m - timedelta(hours=3) + timedelta(minutes=2), 5)
    _event(store, ids["dead"], "dead_letter", "fhir_main: 503 Service Unavailable", m - timedelta(hours=3))
    _event(store, ids["dead"], "dead_letter", "fhir_main: replayed, 503 again", m - timedelta(hours=2))
    _event(store, ids["dead"], "delivery_retry", "fhir: timeout", m - timedelta(hours=2))
    # EHR context reads: one each, and one detail nobody planned for
    _event(store, ids["analysed"], "ehr_context", "complete", m - timedelta(hours=1))
    _event(store, ids["delivered"], "ehr_context", "partial: no weight; no creatinine", m - timedelta(days=1))
    _event(store, ids["dead"], "ehr_context", "unavailable: HTTP 503 from the FHIR server", m - timedelta(hours=3))
    _event(store, ids["received"], "ehr_context", "no_patient", m - timedelta(hours=2))
    _event(store, None, "ehr_context", "something new", m - timedelta(days=3))
    _event(store, ids["rejected"], "ehr_context_x", "complete", m)  # another kind: not counted
    return ids


def test_collect_stats_answers_the_dashboard(store: MessageStore) -> None:
    _scenario(store)
    got = stats.collect_stats(store, NOW)
    assert json.loads(json.dumps(got)) == got  # JSON-safe as it is

    messages = got["messages"]
    assert messages["total"] == 7 and messages["analysed_total"] == 3
    assert messages["by_state"] == {
        "received": 1,
        "queued": 1,
        "analysed": 1,
        "delivered": 1,
        "failed": 1,
        "unrouted": 1,
        "rejected": 1,
        "processed": 0,
    }
    assert {k: v["total"] for k, v in messages["by_source"].items()} == {"dicom": 3, "file": 1, "hl7": 3}
    assert messages["by_source"]["hl7"]["by_state"]["rejected"] == 1
    assert {k: v["total"] for k, v in messages["by_route"].items()} == {"(none)": 2, "carts": 3, "wards": 2}
    assert messages["by_route"]["wards"]["by_state"]["failed"] == 1

    deliveries = got["deliveries"]
    assert deliveries["by_state"] == {"pending": 1, "delivered": 2, "failed": 0, "dead": 1}
    assert deliveries["by_destination"]["fhir_main"] == {
        "total": 3,
        "by_state": {"pending": 1, "delivered": 1, "failed": 0, "dead": 1},
        "attempts": 2 + 1 + 5,
    }

    queues = got["queues"]
    assert queues["analysis"] == {
        "depth": 2,
        "oldest_at": (NOW - timedelta(hours=2, minutes=1)).isoformat(),
        "oldest_age_s": 7260.0,
    }
    # a pending delivery waits from when its result was saved
    assert queues["deliveries"]["fhir_main"]["depth"] == 1
    assert queues["deliveries"]["fhir_main"]["oldest_age_s"] == 3600 + 60 - 20
    assert queues["deliveries"]["fhir"] == {"depth": 0, "oldest_at": None, "oldest_age_s": None}

    assert got["dead_letters"] == {
        "total": 1,
        "by_destination": {"fhir": {"now": 0, "ever": 0}, "fhir_main": {"now": 1, "ever": 2}},
    }
    assert got["ehr_context"]["total"] == {
        "complete": 1,
        "partial": 1,
        "unavailable": 1,
        "no_patient": 1,
        "not_configured": 0,
        "other": 1,
    }
    # the window is the last 24 h: yesterday's partial (24 h 1 min ago) and the 3-day-old one are out
    assert got["ehr_context"]["window"] == {
        "complete": 1,
        "partial": 0,
        "unavailable": 1,
        "no_patient": 1,
        "not_configured": 0,
        "other": 0,
    }


def test_throughput_by_hour_and_by_day(store: MessageStore) -> None:
    _scenario(store)
    hourly, daily = stats.throughput(store, NOW)
    assert len(hourly) == 24 and len(daily) == 7
    assert hourly[-1]["start"] == "2024-05-10T12:00:00+00:00" and hourly[0]["start"] == "2024-05-09T13:00:00+00:00"
    by_start = {h["start"][11:16]: h for h in hourly if h["start"].startswith("2024-05-10")}
    assert by_start["12:00"]["received"] == 1  # the queued one at 12:20
    assert by_start["11:00"]["received"] == 2 and by_start["11:00"]["rejected"] == 1  # 11:29 analysed, 11:59 rejected
    assert by_start["11:00"]["analysed"] == 1
    assert by_start["10:00"]["received"] == 1  # the HL7 one at 10:29
    assert by_start["09:00"]["received"] == 1 and by_start["09:00"]["analysed"] == 1
    assert by_start["09:00"]["delivery_failed"] == 1  # dead at 09:31
    assert sum(h["received"] for h in hourly) == 5  # yesterday 11:29 is more than 24 h ago
    assert [d["start"][:10] for d in daily] == [f"2024-05-{d:02d}" for d in range(4, 11)]
    assert daily[-1] == {
        "start": "2024-05-10T00:00:00+00:00",
        "received": 5,
        "rejected": 1,
        "analysed": 2,
        "delivered": 0,
        "delivery_failed": 1,
    }
    assert daily[-2]["received"] == 1 and daily[-2]["analysed"] == 1 and daily[-2]["delivered"] == 2
    assert sum(d["received"] for d in daily) == 6  # the 8-day-old unrouted one is outside the week


def test_latency_percentiles_by_nearest_rank(store: MessageStore) -> None:
    base = NOW - timedelta(hours=2)
    for i in range(1, 101):  # 100 messages: result after i seconds, delivered 2 i seconds after that
        mid = _message(store, source="dicom", state="delivered", route="carts", received=base)
        _result(store, mid, base + timedelta(seconds=i))
        _delivery(store, mid, "fhir", DeliveryState.DELIVERED, base + timedelta(seconds=3 * i))
    old = _message(store, source="dicom", state="delivered", route="carts", received=NOW - timedelta(days=3))
    _result(store, old, NOW - timedelta(days=2))  # outside the window: not counted
    got = stats.latency_summaries(store, NOW, window_s=86400)
    first, second = got["received_to_result"], got["result_to_delivered"]
    assert (first.count, first.p50, first.p95, first.p99, first.max) == (100, 50.0, 95.0, 99.0, 100.0)
    assert first.mean == pytest.approx(50.5)
    assert (second.count, second.p50, second.p95, second.p99, second.max) == (100, 100.0, 190.0, 198.0, 200.0)
    assert stats.latency_summaries(store, NOW, window_s=60)["received_to_result"] == stats.Summary()


def test_analysis_durations_summaries_and_histograms(store: MessageStore) -> None:
    for i in range(1, 11):
        mid = _message(store, source="dicom", state="analysed", route="carts", received=NOW)
        assert record_timings(store, mid, {"total": i * 1.0, "analysis": i * 0.5}, {"diagnosis": i * 0.01})
    assert not record_timings(store, mid, {"total": 99.0}, {})  # once per message
    assert timings_of(store, mid) == {"total": 10.0, "analysis": 5.0, "model:diagnosis": 0.1}
    with store.session() as s, s.begin():  # as written "now" by the workers
        s.execute(update(AnalysisTimingRow).values(created_at=NOW - timedelta(minutes=5)))

    summaries = stats.duration_summaries(store, NOW)
    assert sorted(summaries) == [("analysis", ""), ("model", "diagnosis"), ("total", "")]
    total = summaries[("total", "")]
    assert (total.count, total.p50, total.p95, total.max) == (10, 5.0, 10.0, 10.0)
    assert summaries[("model", "diagnosis")].p50 == pytest.approx(0.05)

    histograms = stats.duration_histograms(store, bounds=(0.05, 1.0, 5.0))
    assert histograms[("model", "diagnosis")].buckets == (5, 10, 10, 10)
    assert histograms[("total", "")].buckets == (0, 1, 5, 10)
    assert histograms[("total", "")].sum == pytest.approx(55.0) and histograms[("total", "")].count == 10
    assert histograms[("analysis", "")].buckets == (0, 2, 10, 10)

    got = stats.collect_stats(store, NOW)["analysis_durations"]
    assert set(got["stages"]) == {"analysis", "total"} and set(got["models"]) == {"diagnosis"}
    assert got["models"]["diagnosis"]["p99"] == 0.1


def test_an_empty_store_answers_zeros(store: MessageStore) -> None:
    got = stats.collect_stats(store, NOW)
    assert got["messages"]["total"] == 0 and set(got["messages"]["by_source"]) == {"dicom", "hl7", "file"}
    assert got["queues"]["analysis"] == {"depth": 0, "oldest_at": None, "oldest_age_s": None}
    assert got["latency"]["received_to_result"] == {
        "count": 0,
        "mean": None,
        "p50": None,
        "p95": None,
        "p99": None,
        "max": None,
    }
    assert all(h["received"] == 0 for h in got["throughput"]["hourly"])
    assert got["dead_letters"] == {"total": 0, "by_destination": {}}


def test_destination_names_are_matched_literally_in_dead_letters(store: MessageStore) -> None:
    mid = _message(store, source="hl7", state="failed", route="r", received=NOW)
    _event(store, mid, "dead_letter", "hl7_out: refused", NOW)
    _event(store, mid, "dead_letter", "hl7xout: refused", NOW)  # "_" is no wildcard
    _event(store, mid, "dead_letter", "100%: refused", NOW)
    assert stats.dead_letter_counts(store, ["hl7_out", "100%", "100"]) == {"100": 0, "100%": 1, "hl7_out": 1}


def test_missing_indexes_are_added_to_an_older_database(store: MessageStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_messages_source_route_state"))
        conn.execute(text("DROP INDEX ix_events_kind_head_at"))
    assert sorted(create_missing_indexes(store)) == ["ix_events_kind_head_at", "ix_messages_source_route_state"]
    assert create_missing_indexes(store) == []


@pytest.mark.skipif(sqlite3.sqlite_version_info < (3, 30), reason="the plan check expects SQLite 3.30+")
def test_no_statistic_reads_a_whole_table_on_sqlite(tmp_path: Path) -> None:
    """Every query either searches an index range or walks a covering index: never the table itself."""
    store = MessageStore(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    store.create_schema()
    _scenario(store)
    issued: list[tuple[str, Any]] = []
    event.listen(store.engine, "before_cursor_execute", lambda c, cur, sql, params, *a: issued.append((sql, params)))
    stats.collect_stats(store, NOW)
    from ecgbridge.gateway.console.context import ConsoleContext
    from ecgbridge.gateway.console.metrics import exposition

    exposition(ConsoleContext(live=None, store=store, dispatcher=None, accounts=None))  # type: ignore[arg-type]
    big = ("messages", "deliveries", "events", "results", "analysis_timings")
    with store.engine.connect() as conn:
        for sql, params in issued:
            if not sql.lstrip().upper().startswith("SELECT"):
                continue
            for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params):
                detail = row[-1]
                for table in big:
                    assert not (detail.startswith(f"SCAN {table}") and "INDEX" not in detail), (detail, sql)


def test_collect_stats_stays_fast_with_many_messages(tmp_path: Path) -> None:
    """20 000 messages with their results, deliveries, events and timings (a fifth of the 100 000 target)."""
    store = MessageStore(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    store.create_schema()
    n = 20_000
    msgs, results, deliveries, events, timings = [], [], [], [], []
    for i in range(n):
        mid = str(uuid.uuid4())
        t = NOW - timedelta(seconds=i * 30)
        state = ("delivered", "queued", "rejected", "failed")[i % 4]
        source = ("dicom", "hl7", "file")[i % 3]
        route = None if state == "rejected" else "carts"
        msgs.append(dict(id=mid, received_at=t, updated_at=t, source=source, state=state, route=route, flags=[]))
        msgs[-1].update(blob_sha256="0" * 64, blob_size=1)
        if state in ("delivered", "failed"):
            results.append(dict(message_id=mid, created_at=t + timedelta(seconds=5), models="m@1", result={}))
            ds = DeliveryState.DELIVERED.value if state == "delivered" else DeliveryState.DEAD.value
            deliveries.append(dict(message_id=mid, destination="fhir", state=ds, attempts=1, updated_at=t))
            events.append(dict(message_id=mid, at=t, level="info", kind="ehr_context", detail="complete"))
            for stage, model in (("total", ""), ("analysis", ""), ("model", "diagnosis")):
                timings.append(dict(message_id=mid, stage=stage, model=model, seconds=(i % 100) / 50, created_at=t))
    with store.engine.begin() as conn:
        for table, rows in (
            (MessageRow, msgs),
            (ResultRow, results),
            (DeliveryRow, deliveries),
            (EventRow, events),
            (AnalysisTimingRow, timings),
        ):
            conn.execute(insert(table), rows)
    stats.collect_stats(store, NOW)  # warm the connection and the page cache
    started = time.perf_counter()
    got = stats.collect_stats(store, NOW)
    elapsed = time.perf_counter() - started
    assert got["messages"]["total"] == n and got["queues"]["analysis"]["depth"] == n // 4
    assert elapsed < 2.0, f"collect_stats took {elapsed:.2f} s for {n} messages"


def test_the_worker_records_each_models_time_beside_an_unchanged_result(tmp_path: Path) -> None:
    from ecgbridge.core.settings import Settings
    from ecgbridge.inference.pipeline import analyse_ecg
    from ecgbridge.worker.jobs import WorkerContext, analyse_message, load_ecg

    ctx = WorkerContext.create(Settings(data_dir=tmp_path))
    ctx.store.create_schema()
    sha, size = ctx.store.save_blob(ECG.read_bytes())
    mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    analyse_message(ctx, mid)
    got = timings_of(ctx.store, mid)
    assert set(got) == {"total", "analysis", "explanations", "model:diagnosis", "model:ecgbridge-measurements"}
    assert got["total"] >= got["analysis"] >= got["model:diagnosis"] > 0

    ecg = load_ecg(ctx.store, ctx.store.get(mid))
    plain = analyse_ecg(ecg, ctx.registry, ["diagnosis"], message_id=mid)
    spent: dict[str, float] = {}
    timed = analyse_ecg(ecg, ctx.registry, ["diagnosis"], message_id=mid, timings=spent)
    assert timed.to_dict() == plain.to_dict() and set(spent) == {"diagnosis", "ecgbridge-measurements"}
    stored = ctx.store.get_result(mid).result  # type: ignore[union-attr]
    assert set(stored) == set(plain.to_dict()) and stored["outputs"] == plain.to_dict()["outputs"]

    analyse_message(ctx, mid)  # a redelivered task records nothing new
    assert timings_of(ctx.store, mid) == got
