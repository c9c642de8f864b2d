"""Shadow models made live, and back: the route's models in force are the configuration's plus these.

A route may list ``shadow_models``: they run on every ECG of the route beside its live
``models``, their results are stored (the message's ``shadow`` artifact) and shown, never
delivered. ``ecgbridge models promote NAME`` makes a shadow live in the routes that list it:
the live model of the same task steps down to shadow in its place. ``ecgbridge models
rollback`` undoes the latest promotion still in force. Neither edits the configuration
file: a promotion is a row in the store (who, when, why), applied on top of the routes by
:func:`models_in_force`, so every worker takes it for its next ECG and the audit log, the
console and ``ecgbridge routes list`` show it; editing the file to match makes it permanent.

A promotion that no longer fits the configuration (the shadow left ``shadow_models``, or the
demoted model left ``models``) is skipped and shown as not in force.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from ecgbridge.core.settings import Route
from ecgbridge.core.store import MessageStore, PromotionRow

__all__ = ["ModelsInForce", "Promotion", "active_promotions", "models_in_force", "promote", "rollback"]

#: How long a worker keeps the promotions it read before reading them again (seconds).
CACHE_S = 5.0


@dataclass(frozen=True)
class Promotion:
    id: int
    route: str
    promoted: str
    demoted: str
    promoted_by: str
    promoted_at: datetime
    reason: str | None


@dataclass(frozen=True)
class ModelsInForce:
    """A route's live and shadow models after the promotions, and the promotions applied."""

    live: tuple[str, ...]
    shadow: tuple[str, ...]
    applied: tuple[Promotion, ...] = ()


def _promotion(row: PromotionRow) -> Promotion:
    return Promotion(row.id, row.route, row.promoted, row.demoted, row.promoted_by, row.promoted_at, row.reason)


def active_promotions(store: MessageStore, route: str | None = None) -> list[Promotion]:
    """Promotions not rolled back, oldest first (the order they are applied in)."""
    with store.session() as s:
        q = select(PromotionRow).where(PromotionRow.rolled_back_at.is_(None)).order_by(PromotionRow.id)
        if route is not None:
            q = q.where(PromotionRow.route == route)
        return [_promotion(r) for r in s.scalars(q)]


def apply(route: Route, promotions: list[Promotion]) -> ModelsInForce:
    """``route``'s models with ``promotions`` applied in order (pure: no store)."""
    live, shadow = list(route.models), list(route.shadow_models)
    applied = []
    for p in promotions:
        if p.route != route.name or p.promoted not in shadow or p.demoted not in live:
            continue  # no longer fits the configuration
        live[live.index(p.demoted)] = p.promoted
        shadow[shadow.index(p.promoted)] = p.demoted
        applied.append(p)
    return ModelsInForce(tuple(live), tuple(shadow), tuple(applied))


_cache: dict[int, tuple[float, list[Promotion]]] = {}


def models_in_force(store: MessageStore, route: Route, *, max_age_s: float = CACHE_S) -> ModelsInForce:
    """The route's live and shadow models now; the promotions are read at most every ``max_age_s`` per store."""
    if not route.shadow_models:
        return ModelsInForce(tuple(route.models), ())
    now = time.monotonic()
    cached = _cache.get(id(store))
    if cached is None or now - cached[0] > max_age_s:
        cached = (now, active_promotions(store))
        _cache[id(store)] = cached
    return apply(route, cached[1])


def promote(
    store: MessageStore, route: Route, promoted: str, demoted: str, *, by: str, reason: str | None
) -> Promotion:
    """Record that ``promoted`` (a shadow of ``route`` now) replaces the live ``demoted``; raises ValueError if it does not fit."""
    now = apply(route, active_promotions(store, route.name))
    if promoted not in now.shadow:
        raise ValueError(
            f"{promoted!r} is not a shadow model of route {route.name!r} now (shadows: {list(now.shadow)})"
        )
    if demoted not in now.live:
        raise ValueError(f"{demoted!r} is not a live model of route {route.name!r} now (live: {list(now.live)})")
    with store.session() as s, s.begin():
        row = PromotionRow(route=route.name, promoted=promoted, demoted=demoted, promoted_by=by[:64], reason=reason)
        s.add(row)
        s.flush()
        made = _promotion(row)
    _cache.clear()
    return made


def rollback(store: MessageStore, route: str, *, by: str) -> Promotion | None:
    """Undo the latest promotion in force in ``route``; the one undone, or None when there is none."""
    with store.session() as s, s.begin():
        row = s.scalar(
            select(PromotionRow)
            .where(PromotionRow.route == route, PromotionRow.rolled_back_at.is_(None))
            .order_by(PromotionRow.id.desc())
            .limit(1)
        )
        if row is None:
            return None
        row.rolled_back_at = datetime.now(UTC)
        row.rolled_back_by = by[:64]
        undone = _promotion(row)
    _cache.clear()
    return undone
