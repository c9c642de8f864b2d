"""Over-reads: cardiologists' confirmed reads of ECGs, stored as versioned labels for the models.

A listener that takes an over-read (an HL7 ORU^R01 without waveform, a DICOM SR, the
annotations of an ECG object, a confirmed vendor XML export; the sources are named in the
``overreads`` settings) first stores and records its message like any other (bytes fsync'ed,
a ``processed`` row, or the ECG's own row), then calls :func:`record_overread`, and only then
answers the sender. :func:`record_overread` maps the statements
(:func:`ecgbridge.mapping.overread.map_statements`), finds the ECG the read is of
(:func:`find_ecg`), and stores one ``overreads`` row (:class:`~ecgbridge.core.store.OverreadRow`).

**Linking rule** (:func:`find_ecg`), first rule that finds something decides:

0. *Itself*: statements carried inside an ECG (the annotations of a DICOM ECG object, a
   confirmed vendor XML export) are a read of that ECG's message (rule ``self``).
1. *SOP Instance UID*: an ECG message with a SOP Instance UID the read references (SR
   evidence and WAVEFORM / COMPOSITE / IMAGE items, an OBX ``SOPInstanceUID``). Several
   messages with one UID are resends of one ECG: the latest is taken. UIDs of two different
   ECGs: ambiguous.
2. *Order or accession number*: ECG messages whose placer / filler order number or accession
   number equals one of the read's (OBR-2 / OBR-3 / OBR-18 / IPC-1, SR request attributes and
   AccessionNumber). One ECG (resends counted once): linked; several: ambiguous.
3. *Patient and acquisition time*: ECGs recorded within ``link_window_min`` minutes either side
   of the read's acquisition time (OBR-7, the SR's study time) whose patient identifier (and
   issuer, when both name one) equals the read's. The identifier is compared in memory, read
   from the candidates' stored bytes: like every table here, ``messages`` holds no patient
   identifier. ECGs stored before acquisition times were recorded (``messages.acquired_at``
   empty) are found by rules 1 and 2 only.

An ECG message is one not ``rejected`` and not ``processed`` (orders, ADT, over-reads). A read
that links nowhere is stored *unlinked* with the reason (``ambiguous: 2 ECGs of the patient
within 10 min``, ``no ECG found ...``) and an ``overread_unlinked`` event; :func:`relink` tries
again later (``ecgbridge overreads relink``), e.g. once an ECG that came after its read arrived.

**Versions.** Only reads with status F (final) or C (corrected) are labels; P (preliminary) and
the other statuses are stored, never labels. Among the labels of one ECG the latest wins: the
latest read time (the read's own time; else when it was stored), then the latest stored. Every
other label of the ECG gets ``superseded_by`` (the next newer one): the history is kept, a
late-arriving older read does not displace a newer one, and a C that corrects an F replaces it.

**Duplicates.** A read with the same ECG (or, unlinked, the same references and patient),
status, reader and statements as one already stored is a duplicate: stored with
``duplicate_of`` and never a label again, whatever its control id or message time, so a flood
of resends is one label. (A resend of identical bytes is caught earlier by the listener.)

**API** for ``ecgbridge validate``, the console and the CLI (every function takes the store):

- :func:`record_overread` -> :class:`Recorded` (the stored :class:`Overread`, ``outcome``
  ``label`` | ``not_a_label`` | ``duplicate``);
- :func:`current_label` (ECG message id) -> the :class:`Overread` that is its label now, or None;
- :func:`history` (ECG message id) -> every read linked to it, oldest first (duplicates too);
- :func:`labelled_ecgs` (``since`` / ``until``: the ECGs' receipt time) -> :class:`EcgLabel` per
  labelled ECG: its current ``labels`` ``{NORM, MI, STTC, CD, HYP: 0 | 1}`` (None: the read names
  no diagnosis), ``uncertain`` classes, ``severity4`` / ``severity3`` tiers, ``complete`` (every
  statement understood);
- :func:`overreads` (``unlinked``, ``since``, ``limit``) -> stored reads, newest first;
- :func:`overread_of_message` (carrier message id) -> the read that message carried;
- :func:`unmatched_statements` -> ``[(statement text, count)]``, most frequent first;
- :func:`counts` -> totals for the console and ``/metrics``;
- :func:`relink` -> ids of unlinked reads now linked.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Text, cast, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ecgbridge.core.states import MessageState
from ecgbridge.core.store import MessageRow, MessageStore, OverreadRow
from ecgbridge.errors import EcgBridgeError, StorageError
from ecgbridge.mapping.overread import map_statements
from ecgbridge.mapping.overread_readers import Read

__all__ = [
    "Overread",
    "Link",
    "Recorded",
    "EcgLabel",
    "NOT_ECG_STATES",
    "record_overread",
    "find_ecg",
    "current_label",
    "history",
    "labelled_ecgs",
    "distinct_ecgs",
    "overreads",
    "overread_of_message",
    "unmatched_statements",
    "counts",
    "relink",
    "read_of_message",
]

log = logging.getLogger("ecgbridge.labels")

#: Message states that are not ECGs a read can be of.
NOT_ECG_STATES: tuple[str, ...] = (MessageState.REJECTED.value, MessageState.PROCESSED.value)
#: One recording at a time in a process: the supersession of one ECG's labels is recomputed as a
#: whole (PostgreSQL also locks the ECG's row, for gateways in several processes).
_RECORDING = threading.Lock()

Outcome = Literal["label", "not_a_label", "duplicate"]


def _aware(when: datetime | None) -> datetime | None:
    return when if when is None or when.tzinfo is not None else when.replace(tzinfo=UTC)


def _iso(when: datetime | None) -> str | None:
    aware = _aware(when)
    return aware.isoformat() if aware else None


@dataclass(frozen=True)
class Overread:
    """One stored read (an ``overreads`` row as a value)."""

    id: int
    message_id: str
    ecg_message_id: str | None
    link_rule: str | None
    unlinked_reason: str | None
    source: str
    kind: str
    sender: str | None
    reader: str | None
    read_at: datetime | None
    status: str
    is_label: bool
    statements: list[dict[str, Any]]
    refs: dict[str, Any]
    labels: dict[str, int] | None
    uncertain: list[str]
    severity4: str | None
    severity3: str | None
    findings: list[dict[str, Any]]
    unmatched: list[str]
    duplicate_of: int | None
    superseded_by: int | None
    created_at: datetime

    @property
    def current(self) -> bool:
        """The label of its ECG now: a linked F / C read, not a duplicate, not superseded."""
        return self.is_label and bool(self.ecg_message_id) and self.duplicate_of is None and self.superseded_by is None

    @property
    def state(self) -> str:
        """For display: current | superseded | duplicate | not a label | unlinked."""
        if self.duplicate_of is not None:
            return "duplicate"
        if not self.is_label:
            return "not a label"
        if not self.ecg_message_id:
            return "unlinked"
        return "superseded" if self.superseded_by is not None else "current"

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["read_at"], out["created_at"] = _iso(self.read_at), _iso(self.created_at)
        out["current"], out["state"] = self.current, self.state
        return out


def _value(row: OverreadRow) -> Overread:
    return Overread(
        id=row.id,
        message_id=row.message_id,
        ecg_message_id=row.ecg_message_id,
        link_rule=row.link_rule,
        unlinked_reason=row.unlinked_reason,
        source=row.source,
        kind=row.kind,
        sender=row.sender,
        reader=row.reader,
        read_at=_aware(row.read_at),
        status=row.status,
        is_label=bool(row.is_label),
        statements=list(row.statements or []),
        refs=dict(row.refs or {}),
        labels=dict(row.labels) if row.labels is not None else None,
        uncertain=list(row.uncertain or []),
        severity4=row.severity4,
        severity3=row.severity3,
        findings=list(row.findings or []),
        unmatched=list(row.unmatched or []),
        duplicate_of=row.duplicate_of,
        superseded_by=row.superseded_by,
        created_at=_aware(row.created_at) or datetime.now(UTC),
    )


@dataclass(frozen=True)
class Link:
    """Where :func:`find_ecg` got: the ECG message and the rule, or why none."""

    ecg_message_id: str | None
    rule: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Recorded:
    overread: Overread
    outcome: Outcome


@dataclass(frozen=True)
class EcgLabel:
    """An ECG's current label, for ``ecgbridge validate``."""

    ecg_message_id: str
    ecg_received_at: datetime
    overread_id: int
    status: str
    read_at: datetime | None
    reader: str | None
    labels: dict[str, int] | None
    uncertain: list[str]
    severity4: str | None
    severity3: str | None
    #: Every statement of the read was understood (nothing in ``unmatched``).
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["ecg_received_at"], out["read_at"] = _iso(self.ecg_received_at), _iso(self.read_at)
        return out


# ----- finding the ECG ----------------------------------------------------------------------------------
def _is_ecg() -> Any:
    return MessageRow.state.not_in(NOT_ECG_STATES)


def distinct_ecgs(rows: Iterable[MessageRow]) -> list[MessageRow]:
    """One message per ECG, the latest: messages sharing a SOP Instance UID are resends of one ECG."""
    latest: dict[str, MessageRow] = {}
    for row in rows:
        key = row.sop_instance_uid or row.id
        seen = latest.get(key)
        if seen is None or (_aware(row.received_at), row.id) > (_aware(seen.received_at), seen.id):
            latest[key] = row
    return list(latest.values())


def _patient_of(store: MessageStore, row: MessageRow) -> tuple[str | None, str | None]:
    """The patient identifier and issuer an ECG message's stored bytes carry (in memory only)."""
    data = store.read_blob(row.blob_sha256)
    if row.source == "dicom":
        from pydicom import dcmread

        ds = dcmread(io.BytesIO(data), specific_tags=["PatientID", "IssuerOfPatientID"], force=True)
        return (str(ds.get("PatientID") or "").strip() or None, str(ds.get("IssuerOfPatientID") or "").strip() or None)
    from ecgbridge.mapping.readers import read_ecg_bytes

    patient = read_ecg_bytes(data, hint=row.source).patient
    return patient.id, patient.id_issuer


def _same_patient(read: Read, ident: str | None, issuer: str | None) -> bool:
    if not read.patient_id or not ident or read.patient_id.strip() != ident.strip():
        return False
    return not (read.patient_issuer and issuer) or read.patient_issuer.strip() == issuer.strip()


def _window(minutes: float) -> str:
    return f"{minutes:g} min"


def find_ecg(store: MessageStore, read: Read, *, window_min: float) -> Link:
    """The ECG message ``read`` is of, by the linking rule of the module docstring."""
    refs = read.refs
    nearby: list[MessageRow] = []
    with store.session() as s:
        if refs.sop_instance_uids:
            rows = distinct_ecgs(
                s.scalars(select(MessageRow).where(MessageRow.sop_instance_uid.in_(refs.sop_instance_uids), _is_ecg()))
            )
            if len(rows) == 1:
                return Link(rows[0].id, "sop_instance_uid")
            if rows:
                return Link(None, reason=f"ambiguous: the read references {len(rows)} different ECGs")
        numbers = [n for n in (*refs.order_numbers, refs.accession_number) if n]
        if numbers:
            rows = distinct_ecgs(
                s.scalars(
                    select(MessageRow).where(
                        or_(
                            MessageRow.placer_order_number.in_(numbers),
                            MessageRow.filler_order_number.in_(numbers),
                            MessageRow.accession_number.in_(numbers),
                        ),
                        _is_ecg(),
                    )
                )
            )
            if len(rows) == 1:
                return Link(rows[0].id, "order")
            if rows:
                return Link(None, reason=f"ambiguous: {len(rows)} ECGs carry the read's order or accession number")
        when = _aware(refs.acquired_at)
        if read.patient_id and when is not None:
            span = timedelta(minutes=window_min)
            nearby += list(
                s.scalars(
                    select(MessageRow).where(
                        MessageRow.acquired_at >= when - span, MessageRow.acquired_at <= when + span, _is_ecg()
                    )
                )
            )
    if read.patient_id and when is not None:
        same = []
        for row in nearby:
            try:
                ident, issuer = _patient_of(store, row)
            except (EcgBridgeError, OSError, ValueError):
                continue  # unreadable now (e.g. its content was pruned): not a candidate
            if _same_patient(read, ident, issuer):
                same.append(row)
        rows = distinct_ecgs(same)
        if len(rows) == 1:
            return Link(rows[0].id, "patient_time")
        if rows:
            return Link(None, reason=f"ambiguous: {len(rows)} ECGs of the patient within {_window(window_min)}")
    tried = []
    if refs.sop_instance_uids:
        tried.append("its SOP Instance UID")
    if refs.order_numbers or refs.accession_number:
        tried.append("its order or accession number")
    if read.patient_id and when is not None:
        tried.append(f"its patient within {_window(window_min)} of its acquisition time")
    if not tried:
        return Link(None, reason="no ECG found: the read names no SOP Instance UID, order number or patient and time")
    return Link(None, reason="no ECG found by " + ", by ".join(tried))


# ----- recording ---------------------------------------------------------------------------------------
def _content_key(read: Read, link: Link) -> str:
    """What makes two reads the same read (see "Duplicates" in the module docstring)."""
    target: dict[str, Any] = {"ecg": link.ecg_message_id}
    if link.ecg_message_id is None:
        target = {"refs": {**read.refs.to_dict(), "acquired_at": None}, "when": _iso(read.refs.acquired_at)}
        target["patient"] = hashlib.sha256(f"{read.patient_issuer}|{read.patient_id}".encode()).hexdigest()
    body = {
        **target,
        "status": read.status,
        "reader": read.reader,
        "statements": [s.to_dict() for s in read.statements],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _order_key(row: OverreadRow) -> tuple[datetime, int]:
    return (_aware(row.read_at) or _aware(row.created_at) or datetime.now(UTC), row.id)


def _resupersede(s: Session, ecg_message_id: str) -> None:
    """Chain the labels of one ECG oldest to newest: each is superseded by the next; the newest is current."""
    rows = sorted(
        s.scalars(
            select(OverreadRow).where(
                OverreadRow.ecg_message_id == ecg_message_id,
                OverreadRow.is_label.is_(True),
                OverreadRow.duplicate_of.is_(None),
            )
        ),
        key=_order_key,
    )
    for older, newer in zip(rows, [*rows[1:], None], strict=True):
        wanted = newer.id if newer is not None else None
        if older.superseded_by != wanted:
            older.superseded_by = wanted


def _lock_ecg(s: Session, ecg_message_id: str | None) -> None:
    if ecg_message_id:
        s.get(MessageRow, ecg_message_id, with_for_update=True)


def record_overread(
    store: MessageStore,
    read: Read,
    *,
    message_id: str,
    source: str,
    sender: str | None,
    window_min: float,
    of_itself: bool = False,
) -> Recorded:
    """Map, link and store one read carried by message ``message_id``; events on both messages.

    ``of_itself``: the message is the ECG the read is of (annotations, a vendor XML export):
    linked to it by rule ``self``, the linking rule is not needed.
    """
    label = map_statements(read.statements)
    link = Link(message_id, "self") if of_itself else find_ecg(store, read, window_min=window_min)
    key = _content_key(read, link)
    fields: dict[str, Any] = {
        "message_id": message_id,
        "ecg_message_id": link.ecg_message_id,
        "link_rule": link.rule,
        "unlinked_reason": link.reason,
        "source": source,
        "kind": read.kind,
        "sender": (sender or "")[:64] or None,
        "reader": read.reader,
        "read_at": read.read_at,
        "status": read.status[:4],
        "is_label": read.is_label,
        "statements": [st.to_dict() for st in read.statements],
        "refs": read.refs.to_dict(),
        "labels": label.labels,
        "uncertain": list(label.uncertain),
        "severity4": label.severity4,
        "severity3": label.severity3,
        "findings": [f.to_dict() for f in label.findings],
        "unmatched": list(label.unmatched),
    }
    with _RECORDING:
        row = _insert(store, fields, key, link.ecg_message_id)
    value = _value(row)
    _events(store, value, link)
    outcome: Outcome = "duplicate" if value.duplicate_of is not None else ("label" if value.is_label else "not_a_label")
    log.info(
        "over-read %d from message %s: %s, %s%s",
        value.id,
        message_id,
        outcome,
        f"ECG {value.ecg_message_id} ({value.link_rule})" if value.ecg_message_id else "unlinked",
        f", {len(value.unmatched)} unmatched statement(s)" if value.unmatched else "",
    )
    return Recorded(value, outcome)


def _insert(store: MessageStore, fields: dict[str, Any], key: str, ecg_message_id: str | None) -> OverreadRow:
    for _attempt in range(3):
        try:
            with store.session() as s, s.begin():
                existing = s.scalar(select(OverreadRow).where(OverreadRow.content_key == key))
                _lock_ecg(s, ecg_message_id)
                row = OverreadRow(
                    **fields,
                    content_key=None if existing is not None else key,
                    duplicate_of=existing.id if existing is not None else None,
                )
                s.add(row)
                s.flush()
                if existing is None and fields["is_label"] and ecg_message_id:
                    _resupersede(s, ecg_message_id)
            return row
        except IntegrityError:
            continue  # the same read was stored concurrently: this one is its duplicate on the next pass
    raise StorageError("could not record the over-read")


def _events(store: MessageStore, value: Overread, link: Link) -> None:
    if value.duplicate_of is not None:
        store.add_event(
            value.message_id,
            "overread_duplicate",
            f"the same read as over-read {value.duplicate_of}: recorded as its duplicate, not a label again",
            level="info",
        )
        return
    if value.ecg_message_id is None:
        store.add_event(
            value.message_id, "overread_unlinked", f"over-read {value.id} not linked: {link.reason}", "warning"
        )
    else:
        what = "label" if value.is_label else f"not a label (status {value.status})"
        store.add_event(
            value.message_id,
            "overread_recorded",
            f"over-read {value.id} of ECG message {value.ecg_message_id} (by {value.link_rule}): {what}",
            level="info",
        )
        if value.ecg_message_id != value.message_id:
            store.add_event(
                value.ecg_message_id,
                "overread_linked",
                f"over-read {value.id} (status {value.status}) from message {value.message_id}: {what}",
                level="info",
            )
    if value.unmatched:
        store.add_event(
            value.message_id,
            "overread_unmatched",
            f"over-read {value.id}: {len(value.unmatched)} statement(s) no table knows "
            "(ecgbridge overreads unmatched lists them)",
            level="warning",
        )


# ----- reading ----------------------------------------------------------------------------------------
def current_label(store: MessageStore, ecg_message_id: str) -> Overread | None:
    """The read that is the ECG's label now (latest F / C, see "Versions"), or None."""
    with store.session() as s:
        rows = list(
            s.scalars(
                select(OverreadRow).where(
                    OverreadRow.ecg_message_id == ecg_message_id,
                    OverreadRow.is_label.is_(True),
                    OverreadRow.duplicate_of.is_(None),
                    OverreadRow.superseded_by.is_(None),
                )
            )
        )
    return _value(max(rows, key=_order_key)) if rows else None


def history(store: MessageStore, ecg_message_id: str) -> list[Overread]:
    """Every read linked to the ECG, oldest first: labels, superseded ones, preliminary ones, duplicates."""
    with store.session() as s:
        rows = list(s.scalars(select(OverreadRow).where(OverreadRow.ecg_message_id == ecg_message_id)))
    return [_value(r) for r in sorted(rows, key=_order_key)]


def labelled_ecgs(
    store: MessageStore, *, since: datetime | None = None, until: datetime | None = None
) -> list[EcgLabel]:
    """Each ECG received in [since, until) that has a label, with its current label; oldest ECG first."""
    with store.session() as s:
        q = (
            select(OverreadRow, MessageRow.received_at)
            .join(MessageRow, MessageRow.id == OverreadRow.ecg_message_id)
            .where(
                OverreadRow.is_label.is_(True),
                OverreadRow.duplicate_of.is_(None),
                OverreadRow.superseded_by.is_(None),
            )
            .order_by(MessageRow.received_at, OverreadRow.id)
        )
        if since is not None:
            q = q.where(MessageRow.received_at >= since)
        if until is not None:
            q = q.where(MessageRow.received_at < until)
        found: dict[str, EcgLabel] = {}
        for row, received_at in s.execute(q):
            ecg_id = str(row.ecg_message_id)  # joined on it: never None here
            found[ecg_id] = EcgLabel(
                ecg_message_id=ecg_id,
                ecg_received_at=_aware(received_at) or datetime.now(UTC),
                overread_id=row.id,
                status=row.status,
                read_at=_aware(row.read_at),
                reader=row.reader,
                labels=dict(row.labels) if row.labels is not None else None,
                uncertain=list(row.uncertain or []),
                severity4=row.severity4,
                severity3=row.severity3,
                complete=not row.unmatched,
            )
    return list(found.values())


def overreads(
    store: MessageStore, *, unlinked: bool | None = None, since: datetime | None = None, limit: int = 100
) -> list[Overread]:
    """Stored reads, newest first; ``unlinked`` True: only those without an ECG (duplicates left out)."""
    with store.session() as s:
        q = select(OverreadRow).order_by(OverreadRow.id.desc())
        if unlinked is True:
            q = q.where(OverreadRow.ecg_message_id.is_(None), OverreadRow.duplicate_of.is_(None))
        elif unlinked is False:
            q = q.where(OverreadRow.ecg_message_id.is_not(None))
        if since is not None:
            q = q.where(OverreadRow.created_at >= since)
        if limit:
            q = q.limit(limit)
        return [_value(r) for r in s.scalars(q)]


def overread_of_message(store: MessageStore, message_id: str) -> Overread | None:
    """The read the message ``message_id`` carried (an ORU, an SR, an annotated ECG), or None."""
    with store.session() as s:
        row = s.scalar(
            select(OverreadRow).where(OverreadRow.message_id == message_id).order_by(OverreadRow.id.desc()).limit(1)
        )
        return _value(row) if row is not None else None


def unmatched_statements(store: MessageStore, *, since: datetime | None = None) -> list[tuple[str, int]]:
    """Statement texts no table knows, with how many reads had them (duplicates not counted), most frequent first."""
    counter: Counter[str] = Counter()
    with store.session() as s:
        q = select(OverreadRow.unmatched).where(OverreadRow.duplicate_of.is_(None))
        if since is not None:
            q = q.where(OverreadRow.created_at >= since)
        for (texts,) in s.execute(q):
            for text in set(texts or []):
                counter[" ".join(str(text).split()).upper()] += 1
    return sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))


def counts(store: MessageStore) -> dict[str, int]:
    """total, labels (current), superseded, not_labels, unlinked, duplicates, with_unmatched."""
    with store.session() as s:

        def n(*conds: Any) -> int:
            return int(s.scalar(select(func.count()).select_from(OverreadRow).where(*conds)) or 0)

        original = OverreadRow.duplicate_of.is_(None)
        linked = OverreadRow.ecg_message_id.is_not(None)
        label = OverreadRow.is_label.is_(True)
        return {
            "total": n(),
            "labels": n(original, linked, label, OverreadRow.superseded_by.is_(None)),
            "superseded": n(original, linked, label, OverreadRow.superseded_by.is_not(None)),
            "not_labels": n(original, OverreadRow.is_label.is_(False)),
            "unlinked": n(original, OverreadRow.ecg_message_id.is_(None)),
            "duplicates": n(OverreadRow.duplicate_of.is_not(None)),
            "with_unmatched": n(original, func.coalesce(func.length(cast(OverreadRow.unmatched, Text)), 0) > 2),
        }


def relink(store: MessageStore, *, window_min: float, limit: int = 1000) -> list[int]:
    """Link the unlinked reads whose ECG can be found now (e.g. it arrived after its read); their ids.

    The patient identifier is not stored, so each read is read again from its message's bytes.
    """
    done: list[int] = []
    for value in overreads(store, unlinked=True, limit=limit):
        message = store.get(value.message_id)
        if message is None:
            continue
        try:
            read = read_of_message(store, message, value.kind)
        except (EcgBridgeError, OSError, ValueError):
            continue
        if read is None:
            continue
        link = find_ecg(store, read, window_min=window_min)
        if link.ecg_message_id is None:
            continue
        key = _content_key(read, link)
        with _RECORDING:
            try:
                with store.session() as s, s.begin():
                    row = s.get(OverreadRow, value.id)
                    if row is None or row.ecg_message_id is not None:
                        continue
                    _lock_ecg(s, link.ecg_message_id)
                    existing = s.scalar(select(OverreadRow).where(OverreadRow.content_key == key))
                    row.ecg_message_id, row.link_rule, row.unlinked_reason = link.ecg_message_id, link.rule, None
                    if existing is not None:
                        row.content_key, row.duplicate_of = None, existing.id
                    else:
                        row.content_key = key
                    s.flush()
                    if existing is None and row.is_label:
                        _resupersede(s, link.ecg_message_id)
            except IntegrityError:
                continue
        store.add_event(
            value.message_id,
            "overread_recorded",
            f"over-read {value.id} linked later to ECG message {link.ecg_message_id} (by {link.rule})",
            level="info",
        )
        done.append(value.id)
    return done


def read_of_message(store: MessageStore, message: MessageRow, kind: str) -> Read | None:
    """The read a stored message carries, read again from its bytes (``kind`` as stored with the read)."""
    from ecgbridge.mapping import overread_readers as readers

    data = store.read_blob(message.blob_sha256)
    if kind == "oru":
        return readers.read_oru(data)
    if kind in ("sr", "ecg_annotations"):
        from ecgbridge.mapping.dicom_waveform import read_bytes

        ds = read_bytes(data)
        return readers.read_sr(ds) if kind == "sr" else readers.read_ecg_annotations(ds)
    from ecgbridge.mapping.readers import read_ecg_bytes
    from ecgbridge.mapping.vendor._xml import parse

    read = readers.read_vendor_xml(parse(data))
    if read is None:
        return None
    ecg = read_ecg_bytes(data, hint="file")
    return self_read(read, ecg.study.sop_instance_uid, ecg.study.acquired_at, ecg.patient.id, ecg.patient.id_issuer)


def self_read(
    read: Read, sop_instance_uid: str | None, acquired_at: datetime | None, patient_id: str | None, issuer: str | None
) -> Read:
    """A read carried inside the ECG it reads (annotations, vendor XML): it references that ECG."""
    from dataclasses import replace

    from ecgbridge.mapping.overread_readers import utc

    read = read.with_refs(
        sop_instance_uids=(sop_instance_uid,) if sop_instance_uid else read.refs.sop_instance_uids,
        acquired_at=read.refs.acquired_at or utc(acquired_at),
    )
    return replace(read, patient_id=read.patient_id or patient_id, patient_issuer=read.patient_issuer or issuer)
