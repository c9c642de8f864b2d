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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
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
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.schema import CreateIndex

from ecgbridge.core.ordering import PATIENT_KEY_LENGTH, PatientKeys
from ecgbridge.core.states import DeliveryState, MessageState, Work, WorkKind
from ecgbridge.errors import StorageError

__all__ = [
    "MESSAGE_STATES",
    "DELIVERY_STATES",
    "MessageStore",
    "MessageRow",
    "ResultRow",
    "ResultVersionRow",
    "ResultVersion",
    "OrderRow",
    "OverreadRow",
    "DeliveryRow",
    "EventRow",
    "BlobStore",
    "AnalysisTimingRow",
    "TimingStage",
    "EVENT_HEAD",
    "record_timings",
    "timings_of",
    "create_missing_indexes",
    "create_missing_columns",
]

MESSAGE_STATES = tuple(MessageState)
DELIVERY_STATES = tuple(DeliveryState)


#: Longest order number kept (HL7 EI.1 entity identifier: 199 characters).
ORDER_NUMBER_MAX = 199


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(when: datetime) -> datetime:
    """SQLite hands back the UTC times it stored without their zone."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_source_route_state", "source", "route", "state"),  # stats: counts
        # the console's list by state, newest first: without it SQLite sorts every row of a common state
        Index("ix_messages_state_received_at", "state", "received_at", "id"),
    )

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
    placer_order_number: Mapped[str | None] = mapped_column(String(ORDER_NUMBER_MAX), index=True)
    filler_order_number: Mapped[str | None] = mapped_column(String(ORDER_NUMBER_MAX), index=True)
    message_type: Mapped[str | None] = mapped_column(String(32))  # HL7 MSH-9, e.g. ORU^R01
    #: When the ECG was recorded (UTC), as the listener read it: an over-read finds its ECG by it
    #: (``ecgbridge.core.labels``). Added in place; None for ECGs recorded before, and for non-ECGs.
    acquired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    #: The DICOM Accession Number the ECG carries (an order identifier, like the order numbers). Added in place.
    accession_number: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    #: The keyed patient pseudonym (:mod:`ecgbridge.core.ordering`) that holds a later ECG's delivery
    #: behind an earlier one of the same patient; no identifier. Added in place.
    patient_key: Mapped[str | None] = mapped_column(String(PATIENT_KEY_LENGTH), nullable=True, index=True)


class OrderRow(Base):
    """An ECG order (ORM^O01 / OML^O21) so that a result links to it, whichever arrives first.

    ``details`` keeps what the result must echo back (ORC/OBR fields, ordering
    provider, visit); it is PHI-bearing like the blobs and is never logged.
    """

    __tablename__ = "orders"
    __table_args__ = (UniqueConstraint("placer_order_number", "filler_order_number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    placer_order_number: Mapped[str | None] = mapped_column(String(ORDER_NUMBER_MAX), index=True)
    filler_order_number: Mapped[str | None] = mapped_column(String(ORDER_NUMBER_MAX), index=True)
    order_control: Mapped[str | None] = mapped_column(String(8))  # ORC-1: NW, CA, XO, ...
    status: Mapped[str | None] = mapped_column(String(16))  # ORC-5
    message_id: Mapped[str | None] = mapped_column(String(36))  # the HL7 message it came in
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class OverreadRow(Base):
    """A cardiologist's read (over-read) of an ECG: a label for the models, versioned.

    ``message_id`` is the message that carried the read (an ORU, an SR, an ECG object or
    file with confirmed statements); ``ecg_message_id`` the ECG it reads, None when it could
    not be linked (``unlinked_reason`` says why). A corrected or later read of the same ECG
    sets ``superseded_by`` on the one it replaces; a repeat of a read already taken is kept
    with ``duplicate_of``. ``content_key`` (unique, None for duplicates) makes the first of a
    flood win even across processes. No patient identifiers: statements are clinical text, the
    reader is the clinician. The API is :mod:`ecgbridge.core.labels`.
    """

    __tablename__ = "overreads"
    __table_args__ = (Index("ix_overreads_ecg_label", "ecg_message_id", "is_label", "superseded_by"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(36), index=True)
    ecg_message_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    #: self | sop_instance_uid | order | patient_time
    link_rule: Mapped[str | None] = mapped_column(String(24), nullable=True)
    unlinked_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    source: Mapped[str] = mapped_column(String(16))  # dicom | hl7 | file
    kind: Mapped[str] = mapped_column(String(24))  # oru | sr | ecg_annotations | philips_xml | muse_xml
    sender: Mapped[str | None] = mapped_column(String(64), nullable=True)  # MSH-3 or calling AE title
    reader: Mapped[str | None] = mapped_column(String(128), nullable=True)
    read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    status: Mapped[str] = mapped_column(String(4))  # F | C | P | ...
    is_label: Mapped[bool] = mapped_column(Boolean, default=False)
    statements: Mapped[list[Any]] = mapped_column(JSON, default=list)
    refs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    labels: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    uncertain: Mapped[list[Any]] = mapped_column(JSON, default=list)
    severity4: Mapped[str | None] = mapped_column(String(24), nullable=True)
    severity3: Mapped[str | None] = mapped_column(String(24), nullable=True)
    findings: Mapped[list[Any]] = mapped_column(JSON, default=list)
    unmatched: Mapped[list[Any]] = mapped_column(JSON, default=list)
    content_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    duplicate_of: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    superseded_by: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)


class ResultRow(Base):
    __tablename__ = "results"

    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    models: Mapped[str] = mapped_column(String(256))  # "diagnosis@0.1.0,..."
    result: Mapped[dict[str, Any]] = mapped_column(JSON)


class ResultVersionRow(Base):
    """A re-analysis of a message (result version 2, 3, ...); version 1 stays the ``results`` row.

    Created when an operator asks (``result`` empty until the worker saved it; ``error`` when
    that analysis failed), so a second request while one waits joins it instead of adding one.
    ``reason`` is the operator's free text: like every table here it must not hold patient data.
    """

    __tablename__ = "result_versions"
    __table_args__ = (UniqueConstraint("message_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    requested_by: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # when the result was saved
    models: Mapped[str | None] = mapped_column(String(256))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[str | None] = mapped_column(Text)


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
    #: The result version this row delivers (pending) or delivered; a re-analysis moves it on.
    #: Added in place to older databases (``create_missing_columns``), their rows reading 1.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    #: When a retried delivery may be attempted again (None: now); the recovery sweep leaves it
    #: alone until then, so it never spends attempts ahead of the backoff. Added in place.
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: Which task is sending this delivery now, and until when that claim holds: a second task for
    #: the same delivery (a redelivered, restored or re-enqueued one) waits instead of sending it
    #: again. Every recorded outcome releases it. Added in place.
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


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


class EcgStatsRow(Base):
    """What an analysed ECG looked like, for input drift (``ecgbridge.core.drift``): no patient data."""

    __tablename__ = "ecg_stats"

    message_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    analysed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    route: Mapped[str | None] = mapped_column(String(128))
    fs: Mapped[float] = mapped_column(Float)
    n_leads: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float] = mapped_column(Float)
    #: The cart's manufacturer / model as the ECG names it (a device, not a person).
    device: Mapped[str | None] = mapped_column(String(128))
    source_format: Mapped[str | None] = mapped_column(String(32))
    #: Median over the leads of the 2nd-98th percentile range, mV (a robust QRS amplitude).
    amplitude_mv: Mapped[float | None] = mapped_column(Float)
    quality_flags: Mapped[list[str]] = mapped_column(JSON, default=list)


class PromotionRow(Base):
    """A shadow model made live in a route, and the live one it replaced (``ecgbridge.core.promotions``)."""

    __tablename__ = "model_promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    route: Mapped[str] = mapped_column(String(128), index=True)
    promoted: Mapped[str] = mapped_column(String(128))  # the model entry that was a shadow
    demoted: Mapped[str] = mapped_column(String(128))  # the live model entry it replaced
    promoted_by: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    promoted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    rolled_back_by: Mapped[str | None] = mapped_column(String(64))
    rolled_back_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def _fsync_dir(path: Path) -> None:
    """Make a rename into ``path`` durable (the directory entry, not only the file)."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_failure(exc: OSError) -> StorageError:
    out_of_space = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return StorageError(
        ("out of disk space" if out_of_space else "cannot write the message to disk") + f" ({exc.strerror})"
    )


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
            _fsync_dir(final.parent)
        except OSError as exc:
            raise _write_failure(exc) from exc
        return sha, len(data)

    def staging_dir(self) -> Path:
        """Where a listener writes an object while it arrives: on the blobs' file system, so it is renamed in."""
        folder = self.root / ".incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def save_file(self, source: Path) -> tuple[str, int]:
        """Move a finished file in as a blob (hashed in chunks, fsync'ed, renamed); its sha256 and size.

        For objects that must never be held whole in memory; the same guarantee as ``save``:
        file and folder are fsync'ed before it returns. ``source`` is gone afterwards (copied
        first when it is on another file system).
        """
        try:
            digest, size = hashlib.sha256(), 0
            with open(source, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                os.fsync(fh.fileno())  # the writer may only have flushed it
            sha = digest.hexdigest()
            final = self.path(sha)
            if final.exists() and final.stat().st_size == size:
                Path(source).unlink(missing_ok=True)
                return sha, size
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(source, final)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_in(Path(source), final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise _write_failure(exc) from exc
        return sha, size

    @staticmethod
    def _copy_in(source: Path, final: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        source.unlink(missing_ok=True)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


@dataclass(frozen=True)
class MessageView:
    """A message with what happened to it, as ``ecgbridge messages`` shows it."""

    message: dict[str, Any]
    result: dict[str, Any] | None
    deliveries: list[dict[str, Any]]
    events: list[dict[str, Any]]
    #: Every result version, oldest first (:meth:`ResultVersion.summary`); ``result`` is the latest analysed.
    versions: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class ResultVersion:
    """One result of a message: version 1 (the ``results`` row) or a re-analysis.

    ``result`` is None while the re-analysis waits for a worker (``pending``) or when it
    failed (``error``).
    """

    message_id: str
    version: int
    created_at: datetime | None
    models: str | None
    result: dict[str, Any] | None
    requested_at: datetime | None = None
    requested_by: str | None = None
    reason: str | None = None
    error: str | None = None

    @property
    def pending(self) -> bool:
        return self.result is None and self.error is None

    @property
    def state(self) -> str:
        """``analysed``, ``pending`` or ``failed``: for display (not a stored state)."""
        return "analysed" if self.result is not None else ("failed" if self.error else "pending")

    def summary(self) -> dict[str, Any]:
        """The version without its result body: what a version list shows (present findings by code)."""
        outputs = (self.result or {}).get("outputs") or []
        present = [f.get("code") for o in outputs for f in o.get("findings") or [] if f.get("present")]
        return {
            "version": self.version,
            "state": self.state,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "requested_at": self.requested_at.isoformat() if self.requested_at else None,
            "requested_by": self.requested_by,
            "reason": self.reason,
            "models": self.models,
            "present": present,
            "error": self.error,
        }


def _version_of(row: ResultVersionRow) -> ResultVersion:
    return ResultVersion(
        message_id=row.message_id,
        version=row.version,
        created_at=row.created_at,
        models=row.models,
        result=row.result,
        requested_at=row.requested_at,
        requested_by=row.requested_by,
        reason=row.reason,
        error=row.error,
    )


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
        #: The site key of the patient pseudonyms that order deliveries (beside the blobs, not in the database).
        self.patient_keys = PatientKeys(Path(data_dir))
        # hide_parameters: a database error's text then names the statement, never the values
        # (order numbers, file names) that its traceback would otherwise carry into the logs.
        kwargs: dict[str, Any] = {"pool_pre_ping": True, "hide_parameters": True}
        if database_url.startswith("sqlite"):
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        self.engine = create_engine(database_url, **kwargs)
        if database_url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create missing tables and indexes; safe when a gateway and workers start at the same moment.

        Migration rule: new tables, new indexes and new columns (nullable or with a constant
        default, listed in :data:`ADDED_COLUMNS`) are added in place (older databases get them
        at the next start); existing columns are never changed.
        """
        from ecgbridge.core import accounts  # noqa: F401 - its tables share this metadata

        for attempt in range(3):
            try:
                Base.metadata.create_all(self.engine)
                create_missing_columns(self)
                widen_columns(self)
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
        acquired_at: datetime | None = None,
        accession_number: str | None = None,
        patient_key: str | None = None,
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
            acquired_at=acquired_at.astimezone(UTC) if acquired_at and acquired_at.tzinfo else acquired_at,
            accession_number=accession_number[:64] if accession_number else None,
            patient_key=patient_key,
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

    def list(
        self, *, limit: int = 100, state: str | None = None, route: str | None = None
    ) -> builtins.list[MessageRow]:
        """Messages, newest first; ``limit`` 0: all of them."""
        with self.session() as s:
            q = select(MessageRow).order_by(MessageRow.received_at.desc())
            if limit:
                q = q.limit(limit)
            if state:
                q = q.where(MessageRow.state == state)
            if route:
                q = q.where(MessageRow.route == route)
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
        """The latest analysed result: the newest re-analysis, else version 1 (the ``results`` row).

        A re-analysis comes back as a detached :class:`ResultRow` carrying its own values.
        """
        with self.session() as s:
            latest = s.scalar(
                select(ResultVersionRow)
                .where(ResultVersionRow.message_id == message_id, ResultVersionRow.result.is_not(None))
                .order_by(ResultVersionRow.version.desc())
                .limit(1)
            )
            if latest is not None and latest.result is not None:
                return ResultRow(
                    message_id=message_id,
                    created_at=latest.created_at,
                    models=latest.models or "",
                    result=latest.result,
                )
            return s.get(ResultRow, message_id)

    # ----- result versions (re-analysis) ---------------------------------------
    def result_versions(self, message_id: str) -> builtins.list[ResultVersion]:
        """Every result of a message, version 1 first; empty before the first analysis."""
        with self.session() as s:
            first = s.get(ResultRow, message_id)
            rows = s.scalars(
                select(ResultVersionRow)
                .where(ResultVersionRow.message_id == message_id)
                .order_by(ResultVersionRow.version)
            )
            later = [_version_of(r) for r in rows]
        if first is None:
            return later
        return [ResultVersion(message_id, 1, first.created_at, first.models, first.result), *later]

    def result_version(self, message_id: str, version: int) -> ResultVersion | None:
        if version <= 1:
            with self.session() as s:
                first = s.get(ResultRow, message_id)
            return ResultVersion(message_id, 1, first.created_at, first.models, first.result) if first else None
        with self.session() as s:
            row = s.scalar(
                select(ResultVersionRow).where(
                    ResultVersionRow.message_id == message_id, ResultVersionRow.version == version
                )
            )
            return _version_of(row) if row is not None else None

    def pending_version(self, message_id: str) -> int | None:
        """The re-analysis asked for and not yet analysed (at most one), or None."""
        with self.session() as s:
            return s.scalar(
                select(ResultVersionRow.version).where(
                    ResultVersionRow.message_id == message_id,
                    ResultVersionRow.result.is_(None),
                    ResultVersionRow.error.is_(None),
                )
            )

    def request_version(self, message_id: str, *, requested_by: str, reason: str | None = None) -> tuple[int, bool]:
        """Record a re-analysis request; returns (version, whether this request made it).

        A request while another waits joins it (a double click is one version); a version whose
        analysis failed is asked for again under its number. Raises KeyError without version 1.
        """
        for _ in range(3):
            try:
                with self.session() as s, s.begin():
                    if s.get(ResultRow, message_id) is None:
                        raise KeyError(message_id)
                    latest = s.scalar(
                        select(ResultVersionRow)
                        .where(ResultVersionRow.message_id == message_id)
                        .order_by(ResultVersionRow.version.desc())
                        .limit(1)
                    )
                    if latest is not None and latest.result is None:
                        if latest.error is None:
                            return latest.version, False
                        latest.error, latest.requested_at = None, _now()
                        latest.requested_by, latest.reason = requested_by[:64], reason
                        return latest.version, True
                    version = (latest.version if latest is not None else 1) + 1
                    s.add(
                        ResultVersionRow(
                            message_id=message_id, version=version, requested_by=requested_by[:64], reason=reason
                        )
                    )
                    return version, True
            except IntegrityError:
                continue  # another request took this number at the same moment: join it
        raise StorageError("could not record the re-analysis request")

    def save_version(self, message_id: str, version: int, result: dict[str, Any], models: str) -> bool:
        """Store a re-analysis's result once (an atomic update of the waiting row); False when already there."""
        with self.session() as s, s.begin():
            done = s.execute(
                update(ResultVersionRow)
                .where(
                    ResultVersionRow.message_id == message_id,
                    ResultVersionRow.version == version,
                    ResultVersionRow.result.is_(None),
                )
                .values(result=result, models=models, created_at=_now(), error=None)
                .execution_options(synchronize_session=False)
            )
            return bool(getattr(done, "rowcount", 0))

    def attach_to_result(self, message_id: str, version: int, attachments: builtins.list[dict[str, Any]]) -> bool:
        """List the rendered report files on a saved result version; False when it already lists some.

        The report is drawn after the analysis (when a destination or a person asks for it), so
        its files join the stored result afterwards; a second render of the same version (a
        redelivered task, two people opening it at once) leaves the first one's list alone.
        """
        with self.session() as s, s.begin():
            row: ResultRow | ResultVersionRow | None
            if version <= 1:
                row = s.get(ResultRow, message_id, with_for_update=True)
            else:
                row = s.scalar(
                    select(ResultVersionRow)
                    .where(ResultVersionRow.message_id == message_id, ResultVersionRow.version == version)
                    .with_for_update()
                )
            if row is None or row.result is None or row.result.get("attachments"):
                return False
            row.result = {**row.result, "attachments": attachments}  # a new dict: JSON columns track assignment
            return True

    def fail_version(self, message_id: str, version: int, error: str) -> None:
        """Mark a waiting re-analysis failed; the next request asks for the same version again."""
        with self.session() as s, s.begin():
            s.execute(
                update(ResultVersionRow)
                .where(
                    ResultVersionRow.message_id == message_id,
                    ResultVersionRow.version == version,
                    ResultVersionRow.result.is_(None),
                )
                .values(error=error[:2000])
                .execution_options(synchronize_session=False)
            )

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
    def set_patient_key(self, message_id: str, key: str) -> None:
        """Keep the patient pseudonym of a message the listener could not key (a file, an older row)."""
        with self.session() as s, s.begin():
            s.execute(
                update(MessageRow)
                .where(MessageRow.id == message_id, MessageRow.patient_key.is_(None))
                .values(patient_key=key)
                .execution_options(synchronize_session=False)
            )

    def ahead_in_order(
        self, row: MessageRow, destination: str, routes: builtins.list[str]
    ) -> tuple[str, datetime] | None:
        """The earliest ECG of ``row``'s patient, received before it, that may still be sent to ``destination``.

        "May still be sent": it is on one of ``routes`` (those that deliver there) and is not yet
        analysed (received, queued), or its first result's delivery there is pending. Delivered,
        failed, dead-lettered, unrouted or rejected ECGs hold nothing up, nor does an amended
        result (a re-analysis) of an earlier ECG: the receiver takes it as a correction. Returns (message id, received
        at), or None. See :mod:`ecgbridge.core.ordering`.
        """
        if not row.patient_key or not routes:
            return None
        pending = (
            select(DeliveryRow.id)
            .where(
                DeliveryRow.message_id == MessageRow.id,
                DeliveryRow.destination == destination,
                DeliveryRow.state == DeliveryState.PENDING.value,
                or_(DeliveryRow.version.is_(None), DeliveryRow.version == 1),  # an amendment orders nothing
            )
            .exists()
        )
        with self.session() as s:
            found = s.execute(
                select(MessageRow.id, MessageRow.received_at)
                .where(
                    MessageRow.patient_key == row.patient_key,
                    MessageRow.id != row.id,
                    MessageRow.received_at < row.received_at,
                    MessageRow.route.in_(routes),
                    or_(MessageRow.state.in_([MessageState.RECEIVED.value, MessageState.QUEUED.value]), pending),
                )
                .order_by(MessageRow.received_at)
                .limit(1)
            ).first()
        return (str(found[0]), _aware(found[1])) if found is not None else None

    def hold_delivery(self, message_id: str, destination: str, until: datetime) -> None:
        """Mark a pending delivery as waiting until ``until`` (its task retries then): the recovery
        sweep leaves it alone meanwhile. Attempts, error and claim stay as they are."""
        with self.session() as s, s.begin():
            s.execute(
                update(DeliveryRow)
                .where(
                    DeliveryRow.message_id == message_id,
                    DeliveryRow.destination == destination,
                    DeliveryRow.state == DeliveryState.PENDING.value,
                )
                .values(next_attempt_at=until)
                .execution_options(synchronize_session=False)
            )

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
        version: int | None = None,
        next_attempt_at: datetime | None = None,
    ) -> DeliveryRow:
        """Record a delivery's outcome. With ``version``, a row a re-analysis has meanwhile moved to
        another version is returned unchanged (the outcome of the older version must not settle it).

        ``next_attempt_at`` is when a retried delivery is due again (set with the transient
        failure, in the same write); any other update clears it (due now)."""
        if state not in DELIVERY_STATES:
            raise ValueError(f"unknown delivery state {state!r}")
        state = DeliveryState(state).value
        with self.session() as s, s.begin():
            row = s.scalar(
                select(DeliveryRow).where(DeliveryRow.message_id == message_id, DeliveryRow.destination == destination)
            )
            if row is not None and version is not None and (row.version or 1) != version:
                return row
            if row is None:
                row = DeliveryRow(message_id=message_id, destination=destination, attempts=0, version=version or 1)
                s.add(row)
            row.state = state
            if count_attempt:
                row.attempts = (row.attempts or 0) + 1
            if error is not None:
                row.last_error = error
            if remote_ref is not None:
                row.remote_ref = remote_ref
            row.next_attempt_at = next_attempt_at
            row.claimed_by = row.claimed_until = None
            return row

    def claim_delivery(self, message_id: str, destination: str, owner: str, lease_s: float) -> float:
        """Claim the sending of one delivery for ``lease_s`` seconds; 0.0 when ``owner`` holds it now,
        otherwise the seconds until another owner's claim lapses.

        Two tasks for one delivery exist whenever work is re-enqueued while its task still runs
        (a gateway start-up, a broker restart, a task restored after a worker was killed). The
        claim is one conditional UPDATE, so exactly one of them sends; a claim whose owner died
        lapses after ``lease_s``. A row not yet created has nothing to race for.
        """
        now = _now()
        with self.session() as s, s.begin():
            taken = s.execute(
                update(DeliveryRow)
                .where(
                    DeliveryRow.message_id == message_id,
                    DeliveryRow.destination == destination,
                    or_(
                        DeliveryRow.claimed_until.is_(None),
                        DeliveryRow.claimed_until < now,
                        DeliveryRow.claimed_by == owner,
                    ),
                )
                .values(claimed_by=owner, claimed_until=now + timedelta(seconds=lease_s))
                .execution_options(synchronize_session=False)
            )
            if taken.rowcount:  # type: ignore[attr-defined]  # a CursorResult
                return 0.0
            until = s.scalar(
                select(DeliveryRow.claimed_until).where(
                    DeliveryRow.message_id == message_id, DeliveryRow.destination == destination
                )
            )
        if until is None:
            return 0.0
        return max(0.0, (_aware(until) - now).total_seconds())

    def revise_deliveries(self, message_id: str, destinations: builtins.list[str], version: int) -> builtins.list[str]:
        """Point each destination's delivery at result ``version``: pending, attempts afresh.

        One row per message and destination stays (its meaning: the delivery of the message's
        current result); a row already at ``version`` or later is left alone, so a redelivered
        task changes nothing. Returns the destinations moved on (their old outcome is the
        caller's to record).
        """
        moved: builtins.list[str] = []
        for dest in destinations:
            try:
                with self.session() as s, s.begin():
                    row = s.scalar(
                        select(DeliveryRow).where(DeliveryRow.message_id == message_id, DeliveryRow.destination == dest)
                    )
                    if row is None:
                        s.add(DeliveryRow(message_id=message_id, destination=dest, version=version))
                    elif (row.version or 1) < version:
                        row.version, row.state = version, DeliveryState.PENDING.value
                        row.attempts, row.last_error, row.next_attempt_at = 0, None, None  # due now
                    else:
                        continue
                moved.append(dest)
            except IntegrityError:
                continue  # another worker created it concurrently
        return moved

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
    def unfinished(self, due_by: datetime | None = None) -> Iterator[Work]:
        """Work a crash may have lost: analyses of routed messages not yet analysed, pending deliveries.

        A pending delivery counts once it is due by ``due_by`` (default: now): its
        ``next_attempt_at``, or when it was last changed if no retry is scheduled. One whose
        retry is scheduled later is the broker's to run then; enqueuing it early would spend
        an attempt ahead of the backoff.
        """
        due_by = due_by or _now()
        with self.session() as s:
            waiting = (MessageState.RECEIVED.value, MessageState.QUEUED.value)
            for row in s.scalars(select(MessageRow).where(MessageRow.state.in_(waiting))):
                if row.route is not None:
                    yield Work(row.id, WorkKind.ANALYSE)
            q = (
                select(DeliveryRow.message_id, DeliveryRow.destination)
                .join(MessageRow, MessageRow.id == DeliveryRow.message_id)
                .where(
                    DeliveryRow.state == DeliveryState.PENDING.value,
                    MessageRow.state == MessageState.ANALYSED.value,
                    func.coalesce(DeliveryRow.next_attempt_at, DeliveryRow.updated_at) <= due_by,
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
            versions=[v.summary() for v in self.result_versions(row.id)],
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


#: Columns added to a table after its first release, as (table, column): ``create_all`` skips
#: existing tables, so :func:`create_missing_columns` adds these with ``ALTER TABLE``.
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("deliveries", "version"),
    ("deliveries", "next_attempt_at"),
    ("deliveries", "claimed_by"),
    ("deliveries", "claimed_until"),
    ("messages", "acquired_at"),
    ("messages", "accession_number"),
    ("messages", "patient_key"),
)


#: Columns made wider since they were first created: (table, column, length). An order number is an
#: HL7 EI.1 (up to 199 characters); it was VARCHAR(64), which PostgreSQL enforces and SQLite does not.
WIDENED_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("messages", "placer_order_number", ORDER_NUMBER_MAX),
    ("messages", "filler_order_number", ORDER_NUMBER_MAX),
    ("orders", "placer_order_number", ORDER_NUMBER_MAX),
    ("orders", "filler_order_number", ORDER_NUMBER_MAX),
)


def widen_columns(store: MessageStore) -> list[str]:
    """Widen the :data:`WIDENED_COLUMNS` of an older PostgreSQL database in place (SQLite needs nothing)."""
    if store.engine.dialect.name != "postgresql":
        return []
    widened: list[str] = []
    for table_name, column_name, length in WIDENED_COLUMNS:
        with store.engine.begin() as conn:
            current = conn.execute(
                text(
                    "SELECT character_maximum_length FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = :t AND column_name = :c"
                ),
                {"t": table_name, "c": column_name},
            ).scalar()
            if current is None or int(current) >= length:
                continue
            preparer = conn.dialect.identifier_preparer
            conn.execute(
                text(
                    f"ALTER TABLE {preparer.quote(table_name)} ALTER COLUMN "
                    f"{preparer.quote(column_name)} TYPE VARCHAR({length})"
                )
            )
            widened.append(f"{table_name}.{column_name}")
    return widened


def create_missing_columns(store: MessageStore) -> list[str]:
    """Add the :data:`ADDED_COLUMNS` a database made by an older version lacks; returns "table.column"s added.

    Safe when several processes start at once: PostgreSQL's ``ADD COLUMN IF NOT EXISTS``; on
    SQLite (which has no ``IF NOT EXISTS`` there) a "duplicate column" from a racing process is
    taken as done. Existing rows get the column's constant default.
    """
    added: list[str] = []
    for table_name, column_name in ADDED_COLUMNS:
        column = Base.metadata.tables[table_name].c[column_name]
        with store.engine.begin() as conn:
            inspector = inspect(conn)
            if not inspector.has_table(table_name):
                continue
            if column_name in {c["name"] for c in inspector.get_columns(table_name)}:
                continue
            preparer = conn.dialect.identifier_preparer
            ddl = f"ALTER TABLE {preparer.quote(table_name)} ADD COLUMN "
            if conn.dialect.name == "postgresql":
                ddl += "IF NOT EXISTS "
            ddl += f"{preparer.quote(column_name)} {column.type.compile(dialect=conn.dialect)}"
            default = column.server_default
            if default is not None:
                ddl += f" DEFAULT {default.arg.text}"  # type: ignore[attr-defined]  # a text() clause
            if not column.nullable:
                ddl += " NOT NULL"
            try:
                conn.execute(text(ddl))
            except OperationalError as exc:
                if "duplicate column" not in str(exc.orig).lower():
                    raise
                continue
        added.append(f"{table_name}.{column_name}")
    return added
