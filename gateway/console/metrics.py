"""``GET /metrics``: Prometheus exposition read from the store at scrape time.

Workers run in other processes (often on other hosts), so in-process counters would
see only what the console itself did; the collector asks the store instead, with the
aggregates of :mod:`ecgbridge.core.stats`, and the totals it reports are counters because
the store only grows. No authentication: no label holds patient data (sources, states,
route, destination, model and listener names only) and the console binds to its own
address. What each metric means: ``deploy/monitoring/README.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ecgbridge import __version__
from ecgbridge.core import drift, stats
from ecgbridge.core.states import DeliveryState, MessageState, Source
from ecgbridge.core.store import TimingStage
from ecgbridge.gateway.console.context import ConsoleContext, context_of

__all__ = ["router", "StoreCollector", "LISTENER_SOURCES", "exposition"]

log = logging.getLogger("ecgbridge.console")

router = APIRouter()

#: The message source each listener records (``ecgbridge_listener_up`` carries both, to join on).
LISTENER_SOURCES = {"dicom": Source.DICOM.value, "mllp": Source.HL7.value, "inbox": Source.FILE.value}

_MESSAGE_STATES = [s.value for s in MessageState]
_DELIVERY_STATES = [s.value for s in DeliveryState]


class StoreCollector(Collector):
    """Every ecgbridge metric, computed from the store (and the context's listeners) when collected."""

    def __init__(self, ctx: ConsoleContext) -> None:
        self.ctx = ctx

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the names are fixed, the values come at scrape time

    def collect(self) -> Iterator[Metric]:
        yield from self._process()
        started = time.perf_counter()
        try:
            families = list(self._store())
        except Exception as exc:  # a scrape still answers, saying the store is down
            log.warning("/metrics could not read the store: %s", type(exc).__name__)
            families = []
        yield _gauge(
            "ecgbridge_store_up", "Whether the store answered this scrape (1) or not (0).", 1 if families else 0
        )
        yield _gauge(
            "ecgbridge_store_query_seconds", "Seconds the store's aggregates took.", time.perf_counter() - started
        )
        yield from families

    # ----- this process ---------------------------------------------------------------
    def _process(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("ecgbridge_build_info", "The ecgbridge version serving /metrics.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield _gauge(
            "ecgbridge_console_start_time_seconds",
            "When the console (and the gateway process serving it) started, in seconds since the epoch.",
            self.ctx.started_at.timestamp(),
        )
        up = GaugeMetricFamily(
            "ecgbridge_listener_up",
            "Whether a listener accepts connections or files now (1) or not (0); source: what it records.",
            labels=["listener", "source"],
        )
        for name, running in sorted(self.ctx.listeners.items()):
            try:
                value = 1.0 if running() else 0.0
            except Exception:
                value = 0.0
            up.add_metric([name, LISTENER_SOURCES.get(name, "")], value)
        yield up

    # ----- the store --------------------------------------------------------------------
    def _store(self) -> Iterator[Metric]:
        store = self.ctx.store
        now = datetime.now(UTC)
        yield from _messages(stats.message_counts(store))
        yield CounterMetricFamily(
            "ecgbridge_messages_analysed", "Messages analysed (results saved), ever.", value=stats.analysed_total(store)
        )
        queue = stats.analysis_queue(store)
        yield _gauge("ecgbridge_analysis_queue_depth", "Routed messages waiting for analysis now.", queue.depth)
        yield _gauge(
            "ecgbridge_analysis_queue_oldest_age_seconds",
            "Seconds the oldest message waiting for analysis has waited (0 when none waits).",
            queue.age_s(now),
        )
        counts = stats.delivery_counts(store)
        destinations = sorted(set(counts) | set(_configured_destinations(self.ctx)))
        yield from _deliveries(destinations, counts, stats.delivery_queues(store), now)
        dead_total = CounterMetricFamily(
            "ecgbridge_dead_letters",
            'Deliveries dead-lettered (retries ran out), ever; those still dead: ecgbridge_deliveries{state="dead"}.',
            labels=["destination"],
        )
        for dest, n in stats.dead_letter_counts(store, destinations).items():
            dead_total.add_metric([dest], n)
        yield dead_total
        ehr = CounterMetricFamily(
            "ecgbridge_ehr_context", "EHR context reads by outcome status, ever.", labels=["status"]
        )
        for status, (ever, _) in stats.ehr_context_counts(store).items():
            ehr.add_metric([status], ever)
        yield ehr
        yield from _durations(stats.duration_histograms(store))
        yield from self._drift(now)

    #: Seconds the drift figures are kept between scrapes (they read every analysed ECG's statistics).
    DRIFT_CACHE_S = 300.0
    _drift_cache: tuple[float, dict[str, Any]] | None = None

    def _drift(self, now: datetime) -> Iterator[Metric]:
        cached = self._drift_cache
        if cached is None or time.monotonic() - cached[0] > self.DRIFT_CACHE_S:
            cached = (time.monotonic(), drift.last_days(self.ctx.store, now=now))
            self._drift_cache = cached
        values = cached[1]
        psi = GaugeMetricFamily(
            "ecgbridge_drift_psi",
            "Population stability index of an input statistic or output rate, last 7 days vs the reference weeks.",
            labels=["statistic"],
        )
        rate = GaugeMetricFamily(
            "ecgbridge_output_positive_rate",
            "Share of the last 7 days' ECGs a model called positive for a class.",
            labels=["model", "class"],
        )
        for name, v in sorted(values.items()):
            if v["psi"] == v["psi"]:  # not NaN
                psi.add_metric([name], v["psi"])
            if name.startswith("positive:") and v.get("current") == v.get("current"):
                model, _, cls = name[len("positive:") :].partition("/")
                rate.add_metric([model, cls], v["current"])
        yield psi
        yield rate


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _configured_destinations(ctx: ConsoleContext) -> list[str]:
    try:
        return [d.name for d in ctx.settings.destinations]
    except Exception:  # no settings (a bare context): the store's destinations only
        return []


def _messages(counts: Iterable[stats.MessageCount]) -> Iterator[Metric]:
    by_source: dict[tuple[str, str], int] = {(s.value, state): 0 for s in Source for state in _MESSAGE_STATES}
    by_route: dict[tuple[str, str], int] = {}
    for c in counts:
        by_source[(c.source, c.state)] = by_source.get((c.source, c.state), 0) + c.count
        for state in _MESSAGE_STATES:
            by_route.setdefault((c.route, state), 0)
        by_route[(c.route, c.state)] = by_route.get((c.route, c.state), 0) + c.count
    received = CounterMetricFamily(
        "ecgbridge_messages_received",
        "Messages taken by a listener (rejected ones included), ever, by source: dicom, hl7 (MLLP), file (inbox).",
        labels=["source"],
    )
    rejected = CounterMetricFamily(
        "ecgbridge_messages_rejected", "Messages refused at the gateway (kept as rejected), ever.", labels=["source"]
    )
    for source in sorted({s for s, _ in by_source}):
        received.add_metric([source], sum(n for (s, _), n in by_source.items() if s == source))
        rejected.add_metric([source], by_source.get((source, MessageState.REJECTED.value), 0))
    yield received
    yield rejected
    by_state = GaugeMetricFamily(
        "ecgbridge_messages", "Messages in the store now, by source and state.", labels=["source", "state"]
    )
    for (source, state), n in sorted(by_source.items()):
        by_state.add_metric([source, state], n)
    yield by_state
    routes = GaugeMetricFamily(
        "ecgbridge_route_messages",
        f"Messages in the store now, by route ({stats.NO_ROUTE}: unrouted, rejected, orders) and state.",
        labels=["route", "state"],
    )
    for (route, state), n in sorted(by_route.items()):
        routes.add_metric([route, state], n)
    yield routes


def _deliveries(
    destinations: list[str],
    counts: dict[str, stats.DestinationCounts],
    queues: dict[str, stats.Queue],
    now: datetime,
) -> Iterator[Metric]:
    by_state = GaugeMetricFamily(
        "ecgbridge_deliveries",
        "Deliveries in the store now, by destination and state.",
        labels=["destination", "state"],
    )
    delivered = CounterMetricFamily(
        "ecgbridge_deliveries_delivered", "Deliveries completed, ever.", labels=["destination"]
    )
    attempts = CounterMetricFamily(
        "ecgbridge_delivery_attempts",
        "Delivery attempts made, ever (a replay starts a delivery's count afresh).",
        labels=["destination"],
    )
    depth = GaugeMetricFamily("ecgbridge_delivery_queue_depth", "Deliveries pending now.", labels=["destination"])
    age = GaugeMetricFamily(
        "ecgbridge_delivery_queue_oldest_age_seconds",
        "Seconds since the result of the oldest pending delivery was saved (0 when none is pending).",
        labels=["destination"],
    )
    for dest in destinations:
        c = counts.get(dest, stats.DestinationCounts())
        for state in sorted(set(_DELIVERY_STATES) | set(c.by_state)):
            by_state.add_metric([dest, state], c.by_state.get(state, 0))
        delivered.add_metric([dest], c.by_state.get(DeliveryState.DELIVERED.value, 0))
        attempts.add_metric([dest], c.attempts)
        queue = queues.get(dest, stats.Queue())
        depth.add_metric([dest], queue.depth)
        age.add_metric([dest], queue.age_s(now))
    yield from (by_state, delivered, attempts, depth, age)


def _durations(histograms: dict[tuple[str, str], stats.Histogram]) -> Iterator[Metric]:
    models = HistogramMetricFamily(
        "ecgbridge_model_duration_seconds",
        "Seconds one model's run took on a message (model loading excluded).",
        labels=["model"],
    )
    stages = HistogramMetricFamily(
        "ecgbridge_analysis_duration_seconds",
        "Seconds a stage of a message's analysis took: analysis (every model and the measurements), "
        "ehr_context, explanations, total (from loading the ECG until the result was saved).",
        labels=["stage"],
    )
    bounds = [floatToGoString(b) for b in stats.DURATION_BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]
    for (stage, model), h in histograms.items():
        buckets = list(zip(bounds, h.buckets))
        if stage == TimingStage.MODEL.value:
            models.add_metric([model], buckets, h.sum)
        else:
            stages.add_metric([stage], buckets, h.sum)
    yield models
    yield stages


def exposition(ctx: ConsoleContext, accept: str = "") -> tuple[bytes, str]:
    """The metrics of ``ctx`` in the format ``accept`` asks for (Prometheus text by default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(ctx))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus scrape (sync: the store's queries run in the thread pool, not on the event loop)."""
    body, content_type = exposition(context_of(request), request.headers.get("accept", ""))
    return Response(content=body, media_type=content_type)
