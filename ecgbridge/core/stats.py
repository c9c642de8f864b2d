"""What IT staff ask an interface engine, answered by SQL aggregates over the store.

The dashboard (``collect_stats``) and ``/metrics`` (the smaller functions) read the store,
not process memory, so they count the work of every process; each query groups or ranks
in the database (indexes in :mod:`ecgbridge.core.store`) and reads no patient data.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Float, Integer, and_, case, cast, extract, func, literal_column, or_, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import SelectBase

from ecgbridge.core.states import DeliveryState, MessageState, Source
from ecgbridge.core.store import (
    EVENT_HEAD,
    AnalysisTimingRow,
    DeliveryRow,
    EventRow,
    MessageRow,
    MessageStore,
    ResultRow,
    TimingStage,
)

__all__ = [
    "DURATION_BUCKETS",
    "EHR_STATUSES",
    "NO_ROUTE",
    "DestinationCounts",
    "Histogram",
    "MessageCount",
    "Queue",
    "Summary",
    "analysed_total",
    "analysis_queue",
    "collect_stats",
    "dead_letter_counts",
    "delivery_counts",
    "delivery_queues",
    "duration_histograms",
    "duration_summaries",
    "ehr_context_counts",
    "latency_summaries",
    "message_counts",
    "throughput",
]

#: The statuses an ``ehr_context`` event's detail starts with (``ecgbridge.worker.jobs.ehr_context_for``).
EHR_STATUSES = ("complete", "partial", "unavailable", "no_patient", "not_configured")
#: The route shown for messages that have none (unrouted, rejected, orders).
NO_ROUTE = "(none)"
#: Upper bounds (seconds) of the analysis-duration histogram buckets (+Inf is implied).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Ranks reported for a distribution, in per mille (nearest-rank method; 1000 is the maximum).
_RANKS = {"p50": 500, "p95": 950, "p99": 990, "max": 1000}
_WAITING = (MessageState.RECEIVED.value, MessageState.QUEUED.value)
_DELIVERY_ENDED = (DeliveryState.DELIVERED.value, DeliveryState.FAILED.value, DeliveryState.DEAD.value)


# ----- values ------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageCount:
    source: str
    route: str
    state: str
    count: int


@dataclass
class DestinationCounts:
    by_state: dict[str, int] = field(default_factory=lambda: {s.value: 0 for s in DeliveryState})
    attempts: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


@dataclass(frozen=True)
class Queue:
    """Work waiting now: how much, and since when the oldest has waited."""

    depth: int = 0
    oldest_at: datetime | None = None

    def age_s(self, now: datetime) -> float:
        return max(0.0, (now - self.oldest_at).total_seconds()) if self.oldest_at is not None else 0.0


@dataclass(frozen=True)
class Summary:
    """A distribution of seconds: count, mean and nearest-rank percentiles (None when empty)."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count}
        for name in ("mean", *_RANKS):
            value = getattr(self, name)
            out[name] = round(value, 4) if value is not None else None
        return out


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts (one per ``DURATION_BUCKETS`` bound, then +Inf), count and sum."""

    buckets: tuple[int, ...]
    count: int
    sum: float


# ----- helpers -----------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time in the store is UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now(now: datetime | None) -> datetime:
    return _utc(now) or datetime.now(UTC)


def _dialect(store: MessageStore) -> str:
    return store.engine.dialect.name


def _seconds(store: MessageStore, column: Any) -> ColumnElement[Any]:
    """The column as seconds since the epoch (fractional), in the database's own functions."""
    if _dialect(store) == "postgresql":
        return extract("epoch", column)
    # whole seconds, plus the ".ffffff" SQLAlchemy writes after them (julianday() keeps only ~0.1 ms)
    return cast(func.strftime("%s", column), Integer) + cast(func.substr(column, 20), Float)


def _hour_index(store: MessageStore, column: Any, start: datetime) -> ColumnElement[Any]:
    """Whole hours from ``start`` (an hour boundary) to the column's time."""
    start_s = int(start.timestamp())
    if _dialect(store) == "postgresql":
        return func.floor((extract("epoch", column) - start_s) / 3600)
    return (cast(func.strftime("%s", column), Integer) - start_s) / 3600  # integer division in SQLite


def _summaries(session: Session, values: SelectBase, keys: Sequence[str]) -> dict[tuple[str, ...], Summary]:
    """Rank ``values`` (columns ``keys`` and ``v``) per key in SQL; only the ranked rows come back."""
    sub = values.subquery()
    key_cols = [sub.c[k] for k in keys]
    partition = key_cols or None
    ranked = select(
        *key_cols,
        sub.c.v,
        func.row_number().over(partition_by=partition, order_by=sub.c.v).label("rn"),
        func.count().over(partition_by=partition).label("n"),
        func.avg(sub.c.v).over(partition_by=partition).label("mean"),
    ).subquery()
    rn, n = ranked.c.rn, ranked.c.n
    wanted = or_(*(and_(rn * 1000 >= n * q, (rn - 1) * 1000 < n * q) for q in _RANKS.values()))
    picked: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in session.execute(select(ranked).where(wanted)):
        key = tuple(str(row._mapping[k]) for k in keys)
        count = int(row.n)
        entry = picked.setdefault(key, {"count": count, "mean": float(row.mean)})
        for name, q in _RANKS.items():
            if int(row.rn) == (q * count + 999) // 1000:
                entry[name] = float(row.v)
    return {key: Summary(**entry) for key, entry in picked.items()}


# ----- counts ------------------------------------------------------------------------


def message_counts(store: MessageStore) -> list[MessageCount]:
    """Messages by source (the listener that took them), route and state."""
    q = select(MessageRow.source, MessageRow.route, MessageRow.state, func.count()).group_by(
        MessageRow.source, MessageRow.route, MessageRow.state
    )
    with store.session() as s:
        return [MessageCount(src, route or NO_ROUTE, state, int(n)) for src, route, state, n in s.execute(q)]


def delivery_counts(store: MessageStore) -> dict[str, DestinationCounts]:
    """Deliveries by destination and state, with the attempts made (every state listed, 0 included)."""
    q = select(DeliveryRow.destination, DeliveryRow.state, func.count(), func.sum(DeliveryRow.attempts)).group_by(
        DeliveryRow.state,
        DeliveryRow.destination,  # the order of ix_deliveries_state_destination
    )
    out: dict[str, DestinationCounts] = {}
    with store.session() as s:
        for dest, state, n, attempts in s.execute(q):
            counts = out.setdefault(dest, DestinationCounts())
            counts.by_state[state] = counts.by_state.get(state, 0) + int(n)
            counts.attempts += int(attempts or 0)
    return dict(sorted(out.items()))


def analysed_total(store: MessageStore) -> int:
    """Results saved, ever (one per analysed message): a counter for "is anything being analysed"."""
    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(ResultRow)) or 0)


def analysis_queue(store: MessageStore) -> Queue:
    """Routed messages not analysed yet (``received`` or ``queued``) and the oldest one's arrival."""
    q = select(func.count(), func.min(MessageRow.received_at)).where(
        MessageRow.state.in_(_WAITING), MessageRow.route.is_not(None)
    )
    with store.session() as s:
        n, oldest = s.execute(q).one()
    return Queue(int(n), _utc(oldest))


def delivery_queues(store: MessageStore) -> dict[str, Queue]:
    """Pending deliveries per destination; a delivery waits from the moment its result was saved."""
    since = func.min(func.coalesce(ResultRow.created_at, DeliveryRow.updated_at))
    q = (
        select(DeliveryRow.destination, func.count(), since)
        .outerjoin(ResultRow, ResultRow.message_id == DeliveryRow.message_id)
        .where(DeliveryRow.state == DeliveryState.PENDING.value)
        .group_by(DeliveryRow.destination)
    )
    with store.session() as s:
        rows = list(s.execute(q))
    return {dest: Queue(int(n), _parse_time(oldest)) for dest, n, oldest in sorted(rows)}


def _parse_time(value: Any) -> datetime | None:
    """A min() over coalesce() comes back as text on SQLite."""
    if isinstance(value, str):
        return _utc(datetime.fromisoformat(value))
    return _utc(value) if isinstance(value, datetime) else None


def dead_letter_counts(store: MessageStore, destinations: Iterable[str]) -> dict[str, int]:
    """Deliveries dead-lettered, ever, per destination (``dead_letter`` events: "<destination>: <error>")."""
    names = sorted(set(destinations))
    if not names:
        return {}
    sums = [func.sum(case((EventRow.detail.startswith(f"{name}: ", autoescape=True), 1), else_=0)) for name in names]
    with store.session() as s:
        row = s.execute(select(*sums).where(EventRow.kind == "dead_letter")).one()
    return {name: int(n or 0) for name, n in zip(names, row)}


def ehr_context_counts(store: MessageStore, since: datetime | None = None) -> dict[str, tuple[int, int]]:
    """EHR context reads by status: (ever, since ``since``); statuses outside ``EHR_STATUSES`` are "other".

    Grouped by the detail's head (``EVENT_HEAD``, served by an index) and classified here:
    the detail is the status, or the status, a colon and the problems.
    """
    later = _utc(since) or datetime(9999, 1, 1, tzinfo=UTC)
    sub = select(EVENT_HEAD.label("head"), EventRow.at).where(EventRow.kind == "ehr_context").subquery()
    q = select(sub.c.head, func.count(), func.sum(case((sub.c.at >= later, 1), else_=0))).group_by(sub.c.head)
    out = {name: (0, 0) for name in (*EHR_STATUSES, "other")}
    with store.session() as s:
        for head, n, m in s.execute(q):
            name = str(head or "").split(":", 1)[0]
            key = name if name in EHR_STATUSES else "other"
            ever, recent = out[key]
            out[key] = (ever + int(n), recent + int(m or 0))
    return out


# ----- over time ---------------------------------------------------------------------


def throughput(store: MessageStore, now: datetime | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Work done per UTC hour (the last 24, the current one last) and per UTC day (the last 7).

    Each bucket: ``start`` (ISO time), ``received`` (every message taken, rejected included),
    ``rejected``, ``analysed`` (results saved), ``delivered`` and ``delivery_failed``
    (deliveries that ended failed or dead, by the time they ended).
    """
    now = _now(now)
    day0 = now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=6)
    hours = 7 * 24
    counts = {name: [0] * hours for name in ("received", "rejected", "analysed", "delivered", "delivery_failed")}

    def add(sub_q: SelectBase, names: Sequence[str]) -> None:
        sub = sub_q.subquery()
        cols = [func.sum(sub.c[name]) for name in names]
        q = select(sub.c.hour, *cols).group_by(sub.c.hour)
        with store.session() as s:
            for hour, *values in s.execute(q):
                if hour is not None and 0 <= int(hour) < hours:
                    for name, value in zip(names, values):
                        counts[name][int(hour)] += int(value or 0)

    one: ColumnElement[int] = literal_column("1", Integer)
    add(
        select(
            _hour_index(store, MessageRow.received_at, day0).label("hour"),
            one.label("received"),
            case((MessageRow.state == MessageState.REJECTED.value, one), else_=0).label("rejected"),
        ).where(MessageRow.received_at >= day0),
        ("received", "rejected"),
    )
    add(
        select(
            _hour_index(store, ResultRow.created_at, day0).label("hour"),
            one.label("analysed"),
        ).where(ResultRow.created_at >= day0),
        ("analysed",),
    )
    add(
        select(
            _hour_index(store, DeliveryRow.updated_at, day0).label("hour"),
            case((DeliveryRow.state == DeliveryState.DELIVERED.value, one), else_=0).label("delivered"),
            case((DeliveryRow.state != DeliveryState.DELIVERED.value, one), else_=0).label("delivery_failed"),
        ).where(DeliveryRow.updated_at >= day0, DeliveryRow.state.in_(_DELIVERY_ENDED)),
        ("delivered", "delivery_failed"),
    )

    def bucket(start: datetime, first: int, width: int) -> dict[str, Any]:
        out: dict[str, Any] = {"start": start.isoformat()}
        for name, per_hour in counts.items():
            out[name] = sum(per_hour[first : first + width])
        return out

    current = int((now - day0).total_seconds() // 3600)
    hourly = [bucket(day0 + timedelta(hours=h), h, 1) for h in range(max(0, current - 23), current + 1)]
    daily = [bucket(day0 + timedelta(days=d), 24 * d, 24) for d in range(7)]
    return hourly, daily


def latency_summaries(
    store: MessageStore, now: datetime | None = None, window_s: float = 86400.0
) -> dict[str, Summary]:
    """Seconds from arrival to saved result, and from saved result to delivered, over the window.

    ``received_to_result``: results saved in the window; ``result_to_delivered``: deliveries
    that ended delivered in the window (one per destination).
    """
    since = _now(now) - timedelta(seconds=window_s)
    analysed = (
        select((_seconds(store, ResultRow.created_at) - _seconds(store, MessageRow.received_at)).label("v"))
        .join(MessageRow, MessageRow.id == ResultRow.message_id)
        .where(ResultRow.created_at >= since)
    )
    delivered = (
        select((_seconds(store, DeliveryRow.updated_at) - _seconds(store, ResultRow.created_at)).label("v"))
        .join(ResultRow, ResultRow.message_id == DeliveryRow.message_id)
        .where(DeliveryRow.state == DeliveryState.DELIVERED.value, DeliveryRow.updated_at >= since)
    )
    with store.session() as s:
        return {
            "received_to_result": _summaries(s, analysed, ()).get((), Summary()),
            "result_to_delivered": _summaries(s, delivered, ()).get((), Summary()),
        }


def duration_summaries(
    store: MessageStore, now: datetime | None = None, window_s: float = 86400.0
) -> dict[tuple[str, str], Summary]:
    """(stage, model) -> the analysis durations recorded in the window (model is "" but for stage "model")."""
    since = _now(now) - timedelta(seconds=window_s)
    t = AnalysisTimingRow
    # keys as expressions, so that SQLite ranges over created_at rather than walking the
    # whole (stage, model, seconds) index for its order
    values = select((t.stage + "").label("stage"), (t.model + "").label("model"), t.seconds.label("v")).where(
        t.created_at >= since
    )
    with store.session() as s:
        found = _summaries(s, values, ("stage", "model"))
    return {(key[0], key[1]): summary for key, summary in sorted(found.items())}


def duration_histograms(
    store: MessageStore, bounds: Sequence[float] = DURATION_BUCKETS
) -> dict[tuple[str, str], Histogram]:
    """(stage, model) -> cumulative bucket counts of every duration recorded, counted in SQL."""
    t = AnalysisTimingRow
    # COUNT(*) FILTER is about twice as fast as SUM(CASE) in SQLite (3.30+); the same in PostgreSQL
    les: list[ColumnElement[Any]]
    if _dialect(store) == "sqlite" and sqlite3.sqlite_version_info >= (3, 30):
        les = [func.count().filter(t.seconds <= bound) for bound in bounds]
    else:
        les = [func.sum(case((t.seconds <= bound, 1), else_=0)) for bound in bounds]
    q = select(t.stage, t.model, func.count(), func.sum(t.seconds), *les).group_by(t.stage, t.model)
    out: dict[tuple[str, str], Histogram] = {}
    with store.session() as s:
        for stage, model, n, total, *cumulative in s.execute(q):
            out[(stage, model)] = Histogram(
                buckets=(*(int(c or 0) for c in cumulative), int(n)), count=int(n), sum=float(total or 0.0)
            )
    return dict(sorted(out.items()))


# ----- the dashboard -----------------------------------------------------------------


def _states(counts: Mapping[str, int], states: Iterable[str]) -> dict[str, int]:
    out = {state: 0 for state in states}
    for state, n in counts.items():
        out[state] = out.get(state, 0) + n
    return out


def _queue_dict(queue: Queue, now: datetime) -> dict[str, Any]:
    return {
        "depth": queue.depth,
        "oldest_at": queue.oldest_at.isoformat() if queue.oldest_at is not None else None,
        "oldest_age_s": round(queue.age_s(now), 3) if queue.oldest_at is not None else None,
    }


def collect_stats(store: MessageStore, now: datetime | None = None, *, window_s: float = 86400.0) -> dict[str, Any]:
    """Everything the dashboard shows, JSON-safe (times are ISO 8601 UTC, durations in seconds).

    ``messages`` (by state, by source, by route), ``deliveries`` (by state and destination,
    attempts), ``queues`` (analysis and per destination: depth, oldest), ``dead_letters``,
    ``throughput`` (hourly, daily), ``latency`` and ``analysis_durations`` (over the last
    ``window_s`` seconds) and ``ehr_context`` (by status: ever and within the window).
    """
    now = _now(now)
    message_states = [s.value for s in MessageState]
    delivery_states = [s.value for s in DeliveryState]

    by_state: dict[str, int] = {}
    by_source: dict[str, dict[str, int]] = {s.value: {} for s in Source}
    by_route: dict[str, dict[str, int]] = {}
    for c in message_counts(store):
        by_state[c.state] = by_state.get(c.state, 0) + c.count
        for table, key in ((by_source, c.source), (by_route, c.route)):
            row = table.setdefault(key, {})
            row[c.state] = row.get(c.state, 0) + c.count

    def breakdown(table: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
        return {
            key: {"total": sum(counts.values()), "by_state": _states(counts, message_states)}
            for key, counts in sorted(table.items())
        }

    destinations = delivery_counts(store)
    pending = delivery_queues(store)
    dead_ever = dead_letter_counts(store, destinations)
    hourly, daily = throughput(store, now)
    ehr = ehr_context_counts(store, now - timedelta(seconds=window_s))
    durations = duration_summaries(store, now, window_s)
    all_deliveries: dict[str, int] = {}
    for counts in destinations.values():
        for state, n in counts.by_state.items():
            all_deliveries[state] = all_deliveries.get(state, 0) + n

    return {
        "generated_at": now.isoformat(),
        "window_s": window_s,
        "messages": {
            "total": sum(by_state.values()),
            "by_state": _states(by_state, message_states),
            "by_source": breakdown(by_source),
            "by_route": breakdown(by_route),
            "analysed_total": analysed_total(store),
        },
        "deliveries": {
            "total": sum(all_deliveries.values()),
            "by_state": _states(all_deliveries, delivery_states),
            "by_destination": {
                dest: {"total": c.total, "by_state": _states(c.by_state, delivery_states), "attempts": c.attempts}
                for dest, c in destinations.items()
            },
        },
        "queues": {
            "analysis": _queue_dict(analysis_queue(store), now),
            "deliveries": {dest: _queue_dict(pending.get(dest, Queue()), now) for dest in destinations},
        },
        "dead_letters": {
            "total": sum(c.by_state.get(DeliveryState.DEAD.value, 0) for c in destinations.values()),
            "by_destination": {
                dest: {"now": c.by_state.get(DeliveryState.DEAD.value, 0), "ever": dead_ever.get(dest, 0)}
                for dest, c in destinations.items()
            },
        },
        "throughput": {"timezone": "UTC", "hourly": hourly, "daily": daily},
        "latency": {name: summary.as_dict() for name, summary in latency_summaries(store, now, window_s).items()},
        "analysis_durations": {
            "stages": {stage: summary.as_dict() for (stage, model), summary in durations.items() if not model},
            "models": {
                model: summary.as_dict()
                for (stage, model), summary in durations.items()
                if stage == TimingStage.MODEL.value
            },
        },
        "ehr_context": {
            "total": {name: ever for name, (ever, _) in ehr.items()},
            "window": {name: recent for name, (_, recent) in ehr.items()},
        },
    }
