"""The message browser's searches: filters and keyset paging that never load the whole table.

Every filter is a bound SQL parameter (no string building), so what an operator types is
data, never SQL. Pages are keyed on (received_at, id) of the last row shown: the next
page is as cheap as the first however deep an operator pages.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, exists, or_, select

from ecgbridge.core.store import DeliveryRow, MessageRow, MessageStore

__all__ = ["MessageFilter", "MessagePage", "search_messages", "encode_cursor", "decode_cursor"]

MAX_PAGE = 200


@dataclass(frozen=True)
class MessageFilter:
    """What the browser may filter on; None or "" means any."""

    state: str | None = None
    source: str | None = None
    route: str | None = None
    destination: str | None = None
    #: delivery state for ``destination`` (e.g. dead), or any delivery in that state when no destination.
    delivery_state: str | None = None
    #: the sender: calling AE title / sending application / file name (substring of ``remote``).
    sender: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    #: a message id (or its prefix), an order (accession) number or a SOP Instance UID.
    query: str | None = None


@dataclass(frozen=True)
class MessagePage:
    rows: list[MessageRow]
    #: opaque cursor of the next (older) page, or None on the last page.
    next_cursor: str | None


def encode_cursor(row: MessageRow) -> str:
    text = f"{row.received_at.isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(received_at, id) of a cursor; ValueError when it is not one of ours."""
    padded = cursor + "=" * (-len(cursor) % 4)
    try:
        when, _, message_id = base64.urlsafe_b64decode(padded.encode()).decode().partition("|")
        return datetime.fromisoformat(when), message_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not a valid page cursor") from exc


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` literally anywhere (its % and _ escaped)."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def search_messages(
    store: MessageStore, f: MessageFilter, *, limit: int = 50, cursor: str | None = None
) -> MessagePage:
    """Newest first, ``limit`` rows (at most 200) older than ``cursor``."""
    limit = max(1, min(limit, MAX_PAGE))
    q = select(MessageRow)
    if f.state:
        q = q.where(MessageRow.state == f.state)
    if f.source:
        q = q.where(MessageRow.source == f.source)
    if f.route:
        q = q.where(MessageRow.route == f.route)
    if f.destination or f.delivery_state:
        conds = [DeliveryRow.message_id == MessageRow.id]
        if f.destination:
            conds.append(DeliveryRow.destination == f.destination)
        if f.delivery_state:
            conds.append(DeliveryRow.state == f.delivery_state)
        q = q.where(exists().where(and_(*conds)))
    if f.sender:
        q = q.where(MessageRow.remote.like(_like(f.sender), escape="\\"))
    if f.since is not None:
        q = q.where(MessageRow.received_at >= f.since)
    if f.until is not None:
        q = q.where(MessageRow.received_at < f.until)
    if f.query:
        text = f.query.strip()
        q = q.where(
            or_(
                MessageRow.id.startswith(text, autoescape=True),
                MessageRow.sop_instance_uid == text,
                MessageRow.placer_order_number == text,
                MessageRow.filler_order_number == text,
            )
        )
    if cursor:
        when, last_id = decode_cursor(cursor)
        # the plain range first, so the database walks the (state, received_at, id) index from the cursor on
        q = q.where(MessageRow.received_at <= when).where(
            or_(MessageRow.received_at < when, and_(MessageRow.received_at == when, MessageRow.id < last_id))
        )
    q = q.order_by(MessageRow.received_at.desc(), MessageRow.id.desc()).limit(limit + 1)
    with store.session() as s:
        rows = list(s.scalars(q))
    more = len(rows) > limit
    rows = rows[:limit]
    return MessagePage(rows, encode_cursor(rows[-1]) if more and rows else None)
