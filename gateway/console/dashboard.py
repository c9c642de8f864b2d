"""The dashboard's figures, from :func:`ecgbridge.core.stats.collect_stats` (the same numbers as /metrics)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from ecgbridge.core.states import DeliveryState, MessageState, Source
from ecgbridge.core.stats import collect_stats
from ecgbridge.core.store import EventRow
from ecgbridge.gateway.console.context import ConsoleContext

__all__ = ["dashboard_data", "age_text", "LISTENER_OF_SOURCE"]

#: The listener that takes each message source (the context's listener names).
LISTENER_OF_SOURCE = {Source.DICOM.value: "dicom", Source.HL7.value: "mllp", Source.FILE.value: "inbox"}


def age_text(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def dashboard_data(ctx: ConsoleContext) -> dict[str, Any]:
    now = datetime.now(UTC)
    stats = collect_stats(ctx.store, now)
    messages, deliveries, queues = stats["messages"], stats["deliveries"], stats["queues"]
    by_source = {}
    for source in Source:
        entry = messages["by_source"].get(source.value, {"total": 0, "by_state": {}})
        by_source[source.value] = {"total": entry["total"], **entry["by_state"]}
    last24 = {s.value: 0 for s in Source}
    hourly = stats["throughput"]["hourly"]
    received_24h = sum(b["received"] for b in hourly)
    routes = []
    for name, entry in sorted(messages["by_route"].items()):
        if name == "(none)":
            continue
        st = entry["by_state"]
        routes.append(
            {
                "name": name,
                "total": entry["total"],
                "done": st.get(MessageState.ANALYSED, 0) + st.get(MessageState.DELIVERED, 0),
                "failed": st.get(MessageState.FAILED, 0),
            }
        )
    names = [d.name for d in ctx.settings.destinations]
    names += sorted(set(deliveries["by_destination"]) - set(names))
    destinations = []
    for name in names:
        st = deliveries["by_destination"].get(name, {}).get("by_state", {})
        queue = queues["deliveries"].get(name, {})
        destinations.append(
            {
                "name": name,
                **{s.value: st.get(s.value, 0) for s in DeliveryState},
                "oldest": age_text(queue.get("oldest_age_s")) if queue.get("depth") else None,
            }
        )
    with ctx.store.session() as s:
        errors = list(
            s.scalars(select(EventRow).where(EventRow.level == "error").order_by(EventRow.id.desc()).limit(10))
        )
    latency = stats["latency"]
    return {
        "listener_names": [s.value for s in Source],
        "listener_of_source": LISTENER_OF_SOURCE,
        "listeners": {name: up() for name, up in ctx.listeners.items()},
        "by_source": by_source,
        "last24": last24,
        "received_24h": received_24h,
        "hourly": hourly,
        "analysis_queued": queues["analysis"]["depth"],
        "analysis_oldest": age_text(queues["analysis"]["oldest_age_s"]) if queues["analysis"]["depth"] else None,
        "failed": messages["by_state"].get(MessageState.FAILED, 0),
        "unrouted": messages["by_state"].get(MessageState.UNROUTED, 0),
        "routes": routes,
        "destinations": destinations,
        "latency": {
            key: {k: _seconds(v) for k, v in (summary or {}).items() if k in ("p50", "p95", "p99")}
            | {"count": (summary or {}).get("count", 0)}
            for key, summary in latency.items()
        },
        "errors": errors,
        "now": now,
        "generation": ctx.live.generation,
        "loaded_at": ctx.live.loaded_at,
    }
