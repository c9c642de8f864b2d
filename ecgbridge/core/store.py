"""The durable message store: content-addressed blobs on disk plus states in SQL.

Nothing is acknowledged to a sender before ``save_blob`` has fsync'ed the bytes
and ``record_message`` has committed the row. The same schema runs on SQLite
(embedded default, WAL mode, synchronous=FULL) and PostgreSQL (scale).
The tables hold no patient names or identifiers: those stay inside the blob.

The states a message and a delivery move through are the enums in
:mod:`ecgbridge.core.states`; the columns hold their string values.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.schema import CreateIndex

from ecgbridge.core.states import DeliveryState, MessageState, Work, WorkKind
from ecgbridge.errors import StorageError

__all__ = [
    "MESSAGE_STATES",
    "DELIVERY_STATES",
    "MessageStore",
    "MessageRow",
    "ResultRow",
    "OrderRow",
    "DeliveryRow",
    "EventRow",
    "BlobStore",
    "AnalysisTimingRow",
    "TimingStage",
    "EVENT_HEAD",
    "record_timings",
    "timings_of",
    "create_missing_indexes",
]

MESSAGE_STATES = tuple(MessageState)
DELIVERY_STATES = tuple(DeliveryState)


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_source_route_state", "source", "route", "state"),)  # stats: counts

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)
    source: Mapped[str] = mapped_column(String(16))  # dicom | file | hl7
    remote: Mapped[str | None] = mapped_column(String(128))  # "AE@address" or a file name
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    blob_sha256: Mapped[str] = mapped_column(String(64), index=True)
    blob_size: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    route: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    flags: Mapped[list[str]] = mapped_column(JSON, default=list)
    #: Order numbers the ECG carries (HL7 OBR-2/3, DICOM order attributes); link to ``orders``.
    placer_order_number: Mapped[str | None] = mapped_column(String(64), index=True)
    filler_order_number: Mapped[str | None] = mapped_column(String(64), index=True)
    message_type: Mapped[str | None] = mapped_column(String(32))  # HL7 MSH-9, e.g. ORU^R01


class OrderRow(Base):
    """An ECG order (ORM^O01 / OML^O21) so that a result links to it, whichever arrives first.

    ``details`` keeps what the result must echo back (ORC/OBR fields, ordering
    provider, visit); it is PHI-bearing like the blobs and is never logged.
    """

    __tablename__ = "orders"
    __table_args__ = (UniqueConstraint("placer_order_number", "filler_order_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    placer_order_number: Mapped[str | None] = mapped_column(String(64), index=True)
    filler_order_number: Mapped[str | None] = mapped_column(String(64), index=True)
    order_control: Mapped[str | None] = mapped_column(String(8))  # ORC-1: NW, CA, XO, ...
    status: Mapped[str | None] = mapped_column(String(16))  # ORC-5
    message_id: Mapped[str | None] = mapped_column(String(36))  # the HL7 message it came in
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class ResultRow(Base):
    __tablename__ = "results"

    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    models: Mapped[str] = mapped_column(String(256))  # "diagnosis@0.1.0,..."
    result: Mapped[dict[str, Any]] = mapped_column(JSON)


class DeliveryRow(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("message_id", "destination"),
        Index("ix_deliveries_state_destination", "state", "destination", "attempts"),  # stats: counts, queues
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    remote_ref: Mapped[str | None] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now, index=True)


class EventRow(Base):
    """An error record (or notable event) about a message, kept for IT staff."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str | None] = mapped_column(String(36), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    level: Mapped[str] = mapped_column(String(8))  # error | warning | info
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text)


class ArtifactRow(Base):
    """A derived file of a message kept in the blob store, by kind (e.g. the viewer's heatmaps)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("message_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(36), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    blob_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class BlobStore:
    """Content-addressed files; a blob is fsync'ed (file and directory) before it counts."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def save(self, data: bytes) -> tuple[str, int]:
        sha = hashlib.sha256(data).hexdigest()
        final = self.path(sha)
        if final.exists() and final.stat().st_size == len(data):
            return sha, len(data)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".incoming-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            out_of_space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StorageError(
                ("out of disk space" if out_of_space else "cannot write the message to disk") + f" ({exc.strerror})"
            ) from exc
        return sha, len(data)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


@dataclass(frozen=True)
class MessageView:
    """A message with what happened to it, as ``ecgbridge messages`` shows it."""

    message: dict[str, Any]
    result: dict[str, Any] | None
    deliveries: list[dict[str, Any]]
    events: list[dict[str, Any]]


def _row_dict(row: Base) -> dict[str, Any]:
    out = {}
    for col in row.__table__.columns:
        value = getattr(row, col.name)
        if isinstance(value, datetime):
            value = value.isoformat()
        out[col.name] = value
    return out


class MessageStore:
    def __init__(self, database_url: str, data_dir: Path) -> None:
        self.url = database_url
        self.blobs = BlobStore(Path(data_dir) / "blobs")
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if database_url.startswith("sqlite"):
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        self.engine = create_engine(database_url, **kwargs)
        if database_url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create missing tables and indexes; safe when a gateway and workers start at the same moment.

        Migration rule: new tables and new indexes are added in place (older databases get
        them at the next start); existing columns are never changed.
        """
        from ecgbridge.core import accounts  # noqa: F401 - its tables share this metadata

        for attempt in range(3):
            try:
                Base.metadata.create_all(self.engine)
                create_missing_indexes(self)
                return
            except (ProgrammingError, IntegrityError):
                # another process created the same table between our check and our CREATE
                if attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))
            except OperationalError as exc:
                raise StorageError(f"cannot open the message store database: {exc.orig}") from exc

    def session(self) -> Session:
        return self._sessions()

    # ----- messages -------------------------------------------------------
    def save_blob(self, data: bytes) -> tuple[str, int]:
        return self.blobs.save(data)

    def read_blob(self, sha256: str) -> bytes:
        return self.blobs.read(sha256)

    def record_message(
        self,
        *,
        source: str,
        blob_sha256: str,
        blob_size: int,
        state: str = MessageState.RECEIVED,
        remote: str | None = None,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        route: str | None = None,
        error: str | None = None,
        flags: list[str] | None = None,
        placer_order_number: str | None = None,
        filler_order_number: str | None = None,
        message_type: str | None = None,
    ) -> str:
        message_id = str(uuid.uuid4())
        row = MessageRow(
            id=message_id,
            source=source,
            remote=remote,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            blob_sha256=blob_sha256,
            blob_size=blob_size,
            state=MessageState(state).value,
            route=route,
            error=error,
            flags=list(flags or []),
            placer_order_number=placer_order_number,
            filler_order_number=filler_order_number,
            message_type=message_type,
        )
        try:
            with self.session() as s, s.begin():
                s.add(row)
        except OperationalError as exc:
            raise StorageError(f"cannot record the message: {exc.orig}") from exc
        return message_id

    def set_state(self, message_id: str, state: str, *, error: str | None = None, route: str | None = None) -> None:
        if state not in MESSAGE_STATES:
            raise ValueError(f"unknown message state {state!r}")
        state = MessageState(state).value
        with self.session() as s, s.begin():
            row = s.get(MessageRow, message_id)
            if row is None:
                raise KeyError(message_id)
            row.state = state
            if error is not None:
                row.error = error
            if route is not None:
                row.route = route

    def add_flags(self, message_id: str, flags: list[str]) -> None:
        with self.session() as s, s.begin():
            row = s.get(MessageRow, message_id)
            if row is not None:
                row.flags = sorted(set(row.flags or []) | set(flags))

    def get(self, message_id: str) -> MessageRow | None:
        with self.session() as s:
            return s.get(MessageRow, message_id)

    def list(self, *, limit: int = 100, state: str | None = None) -> builtins.list[MessageRow]:
        with self.session() as s:
            q = select(MessageRow).order_by(MessageRow.received_at.desc()).limit(limit)
            if state:
                q = q.where(MessageRow.state == state)
            return list(s.scalars(q))

    def count_state(self, state: str) -> int:
        """How many messages are in ``state`` now (one indexed COUNT)."""
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(MessageRow).where(MessageRow.state == state)) or 0)

    def find_by_blob(self, sha256: str, source: str, *, remote: str | None = None) -> builtins.list[MessageRow]:
        """Messages with exactly these bytes from this source (oldest first): resend detection."""
        with self.session() as s:
            q = select(MessageRow).where(MessageRow.blob_sha256 == sha256, MessageRow.source == source)
            if remote is not None:
                q = q.where(MessageRow.remote == remote)
            return list(s.scalars(q.order_by(MessageRow.received_at)))

    def find_by_prefix(self, prefix: str) -> MessageRow | None:
        with self.session() as s:
            rows = list(s.scalars(select(MessageRow).where(MessageRow.id.startswith(prefix)).limit(2)))
            return rows[0] if len(rows) == 1 else None

    # ----- events (error records) ------------------------------------------
    def add_event(self, message_id: str | None, kind: str, detail: str, level: str = "error") -> None:
        with self.session() as s, s.begin():
            s.add(EventRow(message_id=message_id, kind=kind, detail=detail, level=level))

    def events(self, message_id: str | None = None, *, limit: int = 100) -> builtins.list[EventRow]:
        with self.session() as s:
            q = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
            if message_id is not None:
                q = q.where(EventRow.message_id == message_id)
            return list(s.scalars(q))

    # ----- results ----------------------------------------------------------
    def save_result(self, message_id: str, result: dict[str, Any], models: str) -> bool:
        """Store the analysis once; a redelivered task finds it and stores nothing."""
        try:
            with self.session() as s, s.begin():
                if s.get(ResultRow, message_id) is not None:
                    return False
                s.add(ResultRow(message_id=message_id, result=result, models=models))
            return True
        except IntegrityError:
            return False

    def get_result(self, message_id: str) -> ResultRow | None:
        with self.session() as s:
            return s.get(ResultRow, message_id)

    # ----- artifacts ----------------------------------------------------------
    def save_artifact(self, message_id: str, kind: str, data: bytes) -> str:
        """Store ``data`` as the message's artifact of ``kind`` (replacing an older one); its sha256."""
        sha, _ = self.save_blob(data)
        with self.session() as s, s.begin():
            row = s.scalar(select(ArtifactRow).where(ArtifactRow.message_id == message_id, ArtifactRow.kind == kind))
            if row is None:
                s.add(ArtifactRow(message_id=message_id, kind=kind, blob_sha256=sha))
            else:
                row.blob_sha256 = sha
        return sha

    def artifact(self, message_id: str, kind: str) -> bytes | None:
        with self.session() as s:
            row = s.scalar(select(ArtifactRow).where(ArtifactRow.message_id == message_id, ArtifactRow.kind == kind))
        if row is None:
            return None
        try:
            return self.read_blob(row.blob_sha256)
        except OSError:
            return None

    # ----- deliveries -------------------------------------------------------
    def ensure_deliveries(self, message_id: str, destinations: builtins.list[str]) -> None:
        for dest in destinations:
            try:
                with self.session() as s, s.begin():
                    exists = s.scalar(
                        select(DeliveryRow).where(DeliveryRow.message_id == message_id, DeliveryRow.destination == dest)
                    )
                    if exists is None:
                        s.add(DeliveryRow(message_id=message_id, destination=dest))
            except IntegrityError:
                continue  # another worker created it concurrently

    def delivery(self, message_id: str, destination: str) -> DeliveryRow | None:
        with self.session() as s:
            return s.scalar(
                select(DeliveryRow).where(DeliveryRow.message_id == message_id, DeliveryRow.destination == destination)
            )

    def deliveries(self, message_id: str) -> builtins.list[DeliveryRow]:
        with self.session() as s:
            return list(
                s.scalars(select(DeliveryRow).where(DeliveryRow.message_id == message_id).order_by(DeliveryRow.id))
            )

    def update_delivery(
        self,
        message_id: str,
        destination: str,
        *,
        state: str,
        error: str | None = None,
        remote_ref: str | None = None,
        count_attempt: bool = True,
    ) -> DeliveryRow:
        if state not in DELIVERY_STATES:
            raise ValueError(f"unknown delivery state {state!r}")
        state = DeliveryState(state).value
        with self.session() as s, s.begin():
            row = s.scalar(
                select(DeliveryRow).where(DeliveryRow.message_id == message_id, DeliveryRow.destination == destination)
            )
            if row is None:
                row = DeliveryRow(message_id=message_id, destination=destination, attempts=0)
                s.add(row)
            row.state = state
            if count_attempt:
                row.attempts = (row.attempts or 0) + 1
            if error is not None:
                row.last_error = error
            if remote_ref is not None:
                row.remote_ref = remote_ref
            return row

    def reset_attempts(self, message_id: str, destination: str) -> None:
        """Start a replayed delivery's retry budget afresh (its history stays in the events)."""
        with self.session() as s, s.begin():
            row = s.scalar(
                select(DeliveryRow).where(DeliveryRow.message_id == message_id, DeliveryRow.destination == destination)
            )
            if row is not None:
                row.attempts = 0

    # ----- orders ---------------------------------------------------------------
    def upsert_order(
        self,
        *,
        placer_order_number: str | None,
        filler_order_number: str | None,
        order_control: str | None = None,
        status: str | None = None,
        message_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> OrderRow:
        """Insert an order or update the one with the same numbers (a later ORM replaces details)."""
        if not placer_order_number and not filler_order_number:
            raise ValueError("an order needs a placer or a filler order number")
        for _ in range(2):
            try:
                with self.session() as s, s.begin():
                    row = s.scalar(
                        select(OrderRow).where(
                            OrderRow.placer_order_number == placer_order_number,
                            OrderRow.filler_order_number == filler_order_number,
                        )
                    )
                    if row is None:
                        row = OrderRow(placer_order_number=placer_order_number, filler_order_number=filler_order_number)
                        s.add(row)
                    row.order_control = order_control
                    row.status = status
                    row.message_id = message_id
                    row.details = dict(details or {})
                    return row
            except IntegrityError:
                continue  # created concurrently: update it on the second pass
        raise StorageError("could not record the order")

    def find_order(self, placer_order_number: str | None, filler_order_number: str | None) -> OrderRow | None:
        """The order matching either number (placer first); None when neither is known."""
        with self.session() as s:
            for column, value in (
                (OrderRow.placer_order_number, placer_order_number),
                (OrderRow.filler_order_number, filler_order_number),
            ):
                if value:
                    row = s.scalar(select(OrderRow).where(column == value).order_by(OrderRow.id.desc()).limit(1))
                    if row is not None:
                        return row
        return None

    def messages_for_order(self, order: OrderRow) -> builtins.list[MessageRow]:
        """ECG messages that carry this order's numbers (e.g. ones that arrived before the order)."""
        with self.session() as s:
            conds = []
            if order.placer_order_number:
                conds.append(MessageRow.placer_order_number == order.placer_order_number)
            if order.filler_order_number:
                conds.append(MessageRow.filler_order_number == order.filler_order_number)
            return list(s.scalars(select(MessageRow).where(or_(*conds)).order_by(MessageRow.received_at)))

    def order_for_message(self, message_id: str) -> OrderRow | None:
        row = self.get(message_id)
        if row is None:
            return None
        return self.find_order(row.placer_order_number, row.filler_order_number)

    # ----- recovery -----------------------------------------------------------
    def unfinished(self) -> Iterator[Work]:
        """Work a crash may have lost: analyses of routed messages not yet analysed, pending deliveries."""
        with self.session() as s:
            waiting = (MessageState.RECEIVED.value, MessageState.QUEUED.value)
            for row in s.scalars(select(MessageRow).where(MessageRow.state.in_(waiting))):
                if row.route is not None:
                    yield Work(row.id, WorkKind.ANALYSE)
            q = (
                select(DeliveryRow.message_id, DeliveryRow.destination)
                .join(MessageRow, MessageRow.id == DeliveryRow.message_id)
                .where(
                    DeliveryRow.state == DeliveryState.PENDING.value, MessageRow.state == MessageState.ANALYSED.value
                )
            )
            for message_id, dest in s.execute(q):
                yield Work(message_id, WorkKind.DELIVER, dest)

    def view(self, message_id: str) -> MessageView | None:
        row = self.get(message_id) or self.find_by_prefix(message_id)
        if row is None:
            return None
        result = self.get_result(row.id)
        return MessageView(
            message=_row_dict(row),
            result=result.result if result else None,
            deliveries=[_row_dict(d) for d in self.deliveries(row.id)],
            events=[_row_dict(e) for e in reversed(self.events(row.id))],
        )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def results_json(row: ResultRow | None) -> str:
    return json.dumps(row.result if row else None)


# ----- analysis timings (stats, /metrics) -----------------------------------------


class TimingStage(StrEnum):
    """What an ``analysis_timings`` row measured (``model`` names the model for ``MODEL`` only)."""

    MODEL = "model"  #: one model's run on the ECG (or a derived model on its outputs)
    ANALYSIS = "analysis"  #: the whole pure analysis: quality, every model, the measurements
    EHR_CONTEXT = "ehr_context"  #: reading the patient's EHR context
    EXPLANATIONS = "explanations"  #: rendering the report and heatmap
    TOTAL = "total"  #: the analysis job, from loading the ECG until its result was saved


class AnalysisTimingRow(Base):
    """How long one stage (or one model) of a message's analysis took; written once, after the result."""

    __tablename__ = "analysis_timings"
    __table_args__ = (
        UniqueConstraint("message_id", "stage", "model"),
        Index("ix_analysis_timings_stage_model_seconds", "stage", "model", "seconds"),  # histograms
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(36))
    stage: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(64), default="")
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)


#: The start of an event's detail (where e.g. an ``ehr_context`` event puts its status), as the
#: index below holds it: queries that count events by it must spell it the same way.
EVENT_HEAD = func.substr(EventRow.detail, literal_column("1"), literal_column("16"))
Index("ix_events_kind_head_at", EventRow.kind, EVENT_HEAD, EventRow.at)  # stats: events by kind and status


def record_timings(
    store: MessageStore, message_id: str, stages: Mapping[str, float], models: Mapping[str, float]
) -> bool:
    """Store a message's stage and per-model durations (seconds) once; False when already there."""
    rows = [
        AnalysisTimingRow(message_id=message_id, stage=TimingStage(k).value, model="", seconds=v)
        for k, v in stages.items()
    ]
    rows += [
        AnalysisTimingRow(message_id=message_id, stage=TimingStage.MODEL.value, model=name[:64], seconds=v)
        for name, v in models.items()
    ]
    try:
        with store.session() as s, s.begin():
            first = select(AnalysisTimingRow.id).where(AnalysisTimingRow.message_id == message_id).limit(1)
            if s.scalar(first) is not None:
                return False
            s.add_all(rows)
        return True
    except IntegrityError:
        return False  # a redelivered task wrote them concurrently


def timings_of(store: MessageStore, message_id: str) -> dict[str, float]:
    """A message's durations: ``{"total": s, ..., "model:diagnosis": s}`` (empty when none were recorded)."""
    with store.session() as s:
        rows = s.execute(
            select(AnalysisTimingRow.stage, AnalysisTimingRow.model, AnalysisTimingRow.seconds).where(
                AnalysisTimingRow.message_id == message_id
            )
        )
        return {(f"{stage}:{model}" if model else stage): seconds for stage, model, seconds in rows}


def create_missing_indexes(store: MessageStore) -> list[str]:
    """Create the indexes a database made by an older version lacks (``create_all`` skips existing tables).

    Safe when several processes start at once (``IF NOT EXISTS``); returns the names it found missing.
    """
    if store.engine.dialect.name == "sqlite":
        listed = "SELECT name FROM sqlite_master WHERE type = 'index'"
    else:
        listed = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    created: list[str] = []
    with store.engine.begin() as conn:
        existing = {str(name) for (name,) in conn.execute(text(listed))}
        tables = set(inspect(conn).get_table_names())
        for table in Base.metadata.sorted_tables:
            for index in table.indexes:
                if table.name in tables and index.name and index.name not in existing:
                    conn.execute(CreateIndex(index, if_not_exists=True))
                    created.append(str(index.name))
    return created
