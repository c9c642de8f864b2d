"""Retention: delete old messages' content, and later their rows (Mirth's data pruner, for ecgbridge).

Why it is careful: blobs are content-addressed, so one file may belong to several messages
(a resent ECG, the same rendered report). A blob is deleted only when no message left out
of the prune refers to it, and checked again after a grace period (a resend arriving while
the pruner runs finds the file, so its row may commit just after the first check): until
then the file waits in ``blobs/.pruning`` and goes back if a new reference appeared.
Unfinished messages (received, queued, a delivery pending, or changed within the last hour)
are never pruned. A pruned message keeps its row, states, deliveries, events and counts,
carries the flag ``content_pruned`` and a ``content_pruned`` event; the console answers 410.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    Table,
    Text,
    and_,
    case,
    cast,
    delete,
    exists,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy import true as sql_true
from sqlalchemy.orm import Session

from ecgbridge.core.accounts import AccountStore
from ecgbridge.core.settings import RetentionSettings, Settings
from ecgbridge.core.states import DeliveryState, MessageState
from ecgbridge.core.store import ArtifactRow, DeliveryRow, EventRow, MessageRow, MessageStore

__all__ = ["CONTENT_PRUNED", "PRUNED_DETAIL", "PruneReport", "prune", "is_pruned"]

log = logging.getLogger("ecgbridge.retention")

#: The flag (and event kind) a message whose content was deleted carries.
CONTENT_PRUNED = "content_pruned"
#: What the console answers (410) for a pruned message's bytes, ECG or attachments.
PRUNED_DETAIL = (
    "the content of this message (its ECG bytes, attachments and artifacts) was deleted by the retention "
    "policy (retention.content_days); its states, deliveries and events are kept"
)
#: Seconds a blob waits in quarantine before the second reference check.
GRACE_S = 10.0
#: A message changed this recently (a retry, a replay) is left for the next run.
QUIET = timedelta(hours=1)
BATCH = 500
_CHUNK = 500  # blob ids per reference query
_QUARANTINE = ".pruning"


@dataclass
class PruneReport:
    """What a prune did (or, in a dry run, would do)."""

    dry_run: bool
    content_before: datetime | None = None
    rows_before: datetime | None = None
    #: messages whose content was (would be) deleted
    messages: int = 0
    #: blob files deleted and their bytes
    blobs: int = 0
    bytes: int = 0
    #: blobs of pruned messages kept because a message outside the prune still uses them
    shared_kept: int = 0
    #: old messages left alone: not finished (received, queued, a delivery pending) or changed within QUIET
    unfinished: int = 0
    #: messages deleted with their rows (metadata_days)
    rows_deleted: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("content_before", "rows_before"):
            out[key] = out[key].isoformat() if out[key] else None
        return out

    def lines(self) -> list[str]:
        if self.content_before is None:
            return ["retention is off: set retention.content_days (and optionally metadata_days)"]
        would = "would be " if self.dry_run else ""
        lines = [
            f"content of messages received before {self.content_before:%Y-%m-%d %H:%M} UTC:",
            f"  {self.messages} message(s) {would}pruned; {self.blobs} blob(s) {would}deleted, "
            f"{self.bytes / 1e6:.1f} MB {would}freed",
            f"  {self.shared_kept} blob(s) kept: still used by a message that is not pruned",
            f"  {self.unfinished} older message(s) left alone: not finished (received, queued, a delivery "
            "pending) or changed within the last hour",
        ]
        if self.rows_before is not None:
            lines.append(
                f"rows of messages received before {self.rows_before:%Y-%m-%d %H:%M} UTC: "
                f"{self.rows_deleted} message(s) {would}deleted with their results, deliveries and events"
            )
        if self.dry_run:
            lines.append("dry run: nothing was deleted")
        return lines


def is_pruned(row: MessageRow) -> bool:
    """Whether retention deleted this message's content (the console then answers 410)."""
    return CONTENT_PRUNED in (row.flags or [])


def _pruned() -> ColumnElement[bool]:
    return func.coalesce(cast(MessageRow.flags, Text), "").like(f'%"{CONTENT_PRUNED}"%')


def _finished(before: datetime, quiet_before: datetime) -> ColumnElement[bool]:
    """Received before ``before``, done with (no analysis or delivery to come), and quiet lately."""
    pending = exists().where(DeliveryRow.message_id == MessageRow.id, DeliveryRow.state == DeliveryState.PENDING.value)
    return and_(
        MessageRow.received_at < before,
        MessageRow.updated_at < quiet_before,
        MessageRow.state.not_in([MessageState.RECEIVED.value, MessageState.QUEUED.value]),
        ~pending,
    )


def _result_tables() -> list[Table]:
    """Every table holding a message's result (``results``, and re-analyses): a ``result`` beside ``message_id``."""
    return [t for t in MessageRow.metadata.sorted_tables if {"message_id", "result"} <= set(t.c.keys())]


def _child_tables() -> list[Table]:
    """Tables of a message's rows, children first (``orders`` are shared by messages and stay)."""
    return [t for t in reversed(MessageRow.metadata.sorted_tables) if "message_id" in t.c and t.name != "orders"]


def _attachments(store: MessageStore, table: Table) -> Select[Any]:
    """The blob id of every attachment of every result in ``table`` (a scan of the JSON)."""
    column = table.c.result
    if store.engine.dialect.name == "postgresql":
        arr = column.op("->")(literal_column("'attachments'"))
        items = case((func.json_typeof(arr) == "array", arr), else_=literal_column("'[]'::json"))
        elems = func.json_array_elements(items).table_valued("value").alias("att")
        sha: Any = elems.c.value.op("->>")(literal_column("'blob_sha256'"))
        cond: ColumnElement[bool] = sql_true()
    else:
        elems = func.json_each(column, "$.attachments").table_valued("value", "type").alias("att")
        sha = func.json_extract(elems.c.value, "$.blob_sha256")
        cond = elems.c.type == "object"
    return select(sha).select_from(table).join(elems, sql_true()).where(cond)


def _live_attachments(store: MessageStore, gone: ColumnElement[bool]) -> set[int]:
    """``hash()`` of every attachment of the results of messages not ``gone``: one JSON scan per pass.

    Hashes keep the set small; a collision can only keep a blob, never delete one.
    """
    live: set[int] = set()
    with store.engine.connect() as conn:
        for table in _result_tables():
            kept = ~exists().where(MessageRow.id == table.c.message_id, gone)
            rows = conn.execution_options(stream_results=True, max_row_buffer=5000).execute(
                _attachments(store, table).where(kept)
            )
            live.update(hash(str(sha)) for (sha,) in rows if sha)
    return live


def _still_used(s: Session, shas: Iterable[str], gone: ColumnElement[bool], live: set[int]) -> set[str]:
    """Of ``shas``, those a message not ``gone`` refers to: its inbound bytes, an artifact, an attachment."""
    used = {sha for sha in shas if hash(sha) in live}
    ordered = sorted(set(shas))
    left_out = exists().where(MessageRow.id == ArtifactRow.message_id, gone)
    for i in range(0, len(ordered), _CHUNK):
        chunk = ordered[i : i + _CHUNK]
        used.update(s.scalars(select(MessageRow.blob_sha256).where(MessageRow.blob_sha256.in_(chunk), ~gone)))
        used.update(s.scalars(select(ArtifactRow.blob_sha256).where(ArtifactRow.blob_sha256.in_(chunk), ~left_out)))
    return used


def _strip_result(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its patient-bearing parts: attachments, EHR context, EHR attribution values."""
    outputs = []
    for out in result.get("outputs") or []:
        extra = {k: v for k, v in (out.get("extra") or {}).items() if k != "ehr_context"}
        if isinstance(extra.get("attributions"), list):
            extra["attributions"] = [
                {**a, "value": None} if isinstance(a, dict) and a.get("kind") != "ecg" else a
                for a in extra["attributions"]
            ]
        outputs.append({**out, "extra": extra})
    return {**result, "attachments": [], "outputs": outputs}


def _contents(s: Session, ids: list[str]) -> tuple[dict[str, set[str]], dict[str, tuple[int, int]]]:
    """Each message's blobs (inbound, artifacts, attachments) and its (attachment, artifact) counts."""
    blobs: dict[str, set[str]] = {mid: set() for mid in ids}
    counts: dict[str, list[int]] = {mid: [0, 0] for mid in ids}
    for mid, sha in s.execute(select(MessageRow.id, MessageRow.blob_sha256).where(MessageRow.id.in_(ids))):
        blobs[mid].add(sha)
    for mid, sha in s.execute(
        select(ArtifactRow.message_id, ArtifactRow.blob_sha256).where(ArtifactRow.message_id.in_(ids))
    ):
        blobs[mid].add(sha)
        counts[mid][1] += 1
    rows = [
        r
        for t in _result_tables()
        for r in s.execute(select(t.c.message_id, t.c.result).where(t.c.message_id.in_(ids)))
    ]
    for mid, result in rows:
        for a in (result or {}).get("attachments") or []:
            if isinstance(a, dict) and a.get("blob_sha256"):
                blobs[mid].add(str(a["blob_sha256"]))
                counts[mid][0] += 1
    return blobs, {mid: (c[0], c[1]) for mid, c in counts.items()}


def _mark(s: Session, ids: list[str], counts: dict[str, tuple[int, int]], days: int) -> None:
    """Flag the messages, strip their results, drop their artifact rows, and say so in an event each."""
    for mid, flags in list(s.execute(select(MessageRow.id, MessageRow.flags).where(MessageRow.id.in_(ids)))):
        s.execute(  # updated_at stays: pruning is no state change
            update(MessageRow)
            .where(MessageRow.id == mid)
            .values(flags=sorted(set(flags or []) | {CONTENT_PRUNED}), updated_at=MessageRow.updated_at)
        )
    for table in _result_tables():
        key = list(table.primary_key.columns)
        for row in list(s.execute(select(*key, table.c.result).where(table.c.message_id.in_(ids)))):
            if row.result is not None:
                match = and_(*(col == row[i] for i, col in enumerate(key)))
                s.execute(update(table).where(match).values(result=_strip_result(row.result)))
    s.execute(delete(ArtifactRow).where(ArtifactRow.message_id.in_(ids)))
    for mid in ids:
        attachments, artifacts = counts[mid]
        s.add(
            EventRow(
                message_id=mid,
                kind=CONTENT_PRUNED,
                level="info",
                detail=f"retention ({days} days): the inbound bytes, {attachments} attachment(s) and "
                f"{artifacts} artifact(s) deleted; the result keeps its findings, not its EHR values",
            )
        )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _changed_at(path: Path) -> float | None:
    """When the file was last renamed (ctime): when it went into quarantine."""
    try:
        return path.stat().st_ctime
    except OSError:
        return None


def _settle(store: MessageStore, report: PruneReport, grace_s: float) -> None:
    """After the grace period: quarantined blobs still unused are deleted, the others go back."""
    qdir = store.blobs.root / _QUARANTINE
    names = sorted(p.name for p in qdir.iterdir()) if qdir.is_dir() else []
    if not names:
        return
    if grace_s > 0:
        time.sleep(grace_s)
    live = _live_attachments(store, _pruned())
    with store.session() as s:
        used = _still_used(s, names, _pruned(), live)
    for sha in names:
        held = qdir / sha
        final = store.blobs.path(sha)
        moved = _changed_at(held)
        if moved is None or time.time() - moved < grace_s:
            continue  # another prune's, quarantined just now: its own grace period first
        if sha in used:
            report.shared_kept += 1
            if final.exists():
                held.unlink(missing_ok=True)  # a new arrival wrote it again meanwhile
            else:
                os.replace(held, final)
            continue
        size = _size(held)
        held.unlink(missing_ok=True)
        if size is not None:
            report.blobs += 1
            report.bytes += size


def _prune_content(
    store: MessageStore, report: PruneReport, days: int, before: datetime, quiet_before: datetime
) -> None:
    # Gone: what this run prunes (or pruned before). A blob it shares with a message of a later batch is
    # freed with the first one; should the run stop between the two, the next run prunes the second.
    gone = or_(_finished(before, quiet_before), _pruned())
    eligible = and_(_finished(before, quiet_before), ~_pruned())
    live = _live_attachments(store, gone)
    qdir = store.blobs.root / _QUARANTINE
    seen: set[str] = set()  # a blob shared by two pruned messages counts once
    after: tuple[datetime, str] | None = None
    while True:
        q = select(MessageRow.id, MessageRow.received_at).where(eligible)
        if after is not None:
            q = q.where(
                or_(
                    MessageRow.received_at > after[0],
                    and_(MessageRow.received_at == after[0], MessageRow.id > after[1]),
                )
            )
        with store.session() as s:
            page = list(s.execute(q.order_by(MessageRow.received_at, MessageRow.id).limit(BATCH)))
        if not page:
            return
        after = (page[-1][1], page[-1][0])
        ids = [mid for mid, _ in page]
        with store.session() as s, s.begin():
            if not report.dry_run:  # still eligible now (an operator may have retried one meanwhile)
                ids = list(s.scalars(select(MessageRow.id).where(MessageRow.id.in_(ids), eligible)))
            blobs, counts = _contents(s, ids)
            if not report.dry_run:
                _mark(s, ids, counts, days)
        candidates = set().union(*blobs.values()) - seen if blobs else set()
        seen |= candidates
        with store.session() as s:
            used = _still_used(s, candidates, gone, live)
        report.messages += len(ids)
        report.shared_kept += len(used)
        for sha in sorted(candidates - used):
            path = store.blobs.path(sha)
            if report.dry_run:
                size = _size(path)
                if size is not None:
                    report.blobs += 1
                    report.bytes += size
                continue
            qdir.mkdir(exist_ok=True)
            try:
                os.replace(path, qdir / sha)
            except FileNotFoundError:
                continue  # already gone (a blob shared with a message pruned earlier)


def _delete_rows(store: MessageStore, report: PruneReport, before: datetime, quiet_before: datetime) -> None:
    old = _finished(before, quiet_before)
    if report.dry_run:
        with store.session() as s:
            report.rows_deleted = int(s.scalar(select(func.count()).select_from(MessageRow).where(old)) or 0)
        return
    while True:
        with store.session() as s, s.begin():
            ids = list(s.scalars(select(MessageRow.id).where(old, _pruned()).limit(BATCH)))
            if not ids:
                return
            for table in _child_tables():
                s.execute(delete(table).where(table.c.message_id.in_(ids)))
            s.execute(delete(MessageRow).where(MessageRow.id.in_(ids)))
        report.rows_deleted += len(ids)


def prune(
    store: MessageStore,
    settings: Settings | RetentionSettings,
    *,
    dry_run: bool,
    now: datetime | None = None,
    actor: str | None = "system",
    grace_s: float | None = None,
) -> PruneReport:
    """Apply the retention settings once; audited as ``prune`` by ``actor`` (None: not audited)."""
    retention = settings.retention if isinstance(settings, Settings) else settings
    report = PruneReport(dry_run=dry_run)
    content_days = retention.content_days or retention.metadata_days
    if content_days is None:
        return report
    now = now or datetime.now(UTC)
    quiet_before = now - QUIET
    report.content_before = now - timedelta(days=content_days)
    if retention.metadata_days:
        report.rows_before = now - timedelta(days=retention.metadata_days)
    started = time.perf_counter()
    _prune_content(store, report, content_days, report.content_before, quiet_before)
    if not dry_run:
        _settle(store, report, GRACE_S if grace_s is None else grace_s)
    if report.rows_before is not None:
        _delete_rows(store, report, report.rows_before, quiet_before)
    with store.session() as s:
        old = MessageRow.received_at < report.content_before
        left = and_(old, ~_pruned(), ~_finished(report.content_before, quiet_before))
        report.unfinished = int(s.scalar(select(func.count()).select_from(MessageRow).where(left)) or 0)
    log.info(
        "retention%s: %d message(s) pruned, %d blob(s) (%.1f MB) deleted, %d kept as shared, %d row(s) deleted in %.1f s",
        " (dry run)" if dry_run else "",
        report.messages,
        report.blobs,
        report.bytes / 1e6,
        report.shared_kept,
        report.rows_deleted,
        time.perf_counter() - started,
    )
    if actor is not None:
        AccountStore(store).audit(actor, "prune", detail=report.to_dict())
    return report
