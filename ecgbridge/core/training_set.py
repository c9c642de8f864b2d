"""The site's over-read ECGs as a training set: each label with its decoded ECG, its time and a keyed patient key.

Local retraining (``ecgbridge train diagnosis --from-store``, :mod:`ecgbridge.training.from_store`) and
the de-identified research export (``ecgbridge export training-set``, :mod:`ecgbridge.core.deid`)
read the store through :func:`iter_site_records` (one decoded ECG at a time) or :func:`site_records`
(all of them, sorted by time), so both see the same ECGs, labels and times. The labels stay in
the store; this only reads them.

**Which ECGs.** Every ECG with a current label (:func:`ecgbridge.core.labels.labelled_ecgs`: the
latest final or corrected over-read), whatever the read names (``label.labels`` is None when it
names no diagnosis: the caller decides). An ECG whose stored bytes cannot be read any more
(pruned by retention) or decoded is left out and counted in :attr:`SiteRecords.skipped`.

**Its time** (:attr:`SiteRecord.when`): when the ECG was recorded, as its message row keeps it
(``messages.acquired_at``) or, for rows stored before that column, as the ECG's bytes say; else
when it was received (``when_source`` says which). ``since`` / ``until`` select by that time,
``[since, until)``: an imported archive is received in one afternoon but recorded over years,
and a time-based split must follow the recordings.

**The patient** is read from the stored bytes (no table holds a patient identifier) and kept
only as ``HMAC-SHA256(key, "patient|" + issuer + "|" + identifier)`` in hex: the caller's key (a
random per-run key for a split, the site's secret for an export), so records of one patient
share a key and nothing here can turn it back into the identifier. The identifier itself is
never returned, stored or logged. An ECG that names no patient gets ``patient_key`` None.
The decoded :class:`~ecgbridge.mapping.ecg.Ecg` still carries the patient's identifiers (PHI):
callers keep it in memory and write only what they have de-identified.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select

from ecgbridge.core.labels import EcgLabel, distinct_ecgs, labelled_ecgs
from ecgbridge.core.ordering import patient_key
from ecgbridge.core.store import MessageRow, MessageStore
from ecgbridge.errors import ConfigError, EcgBridgeError
from ecgbridge.mapping.ecg import Ecg

__all__ = [
    "SiteRecord",
    "SiteRecords",
    "ContextRecord",
    "iter_site_records",
    "iter_context_records",
    "stored_ehr_context",
    "site_records",
    "patient_key",
    "parse_when",
]

log = logging.getLogger("ecgbridge.training_set")

WhenSource = Literal["acquired", "received"]


@dataclass(frozen=True)
class SiteRecord:
    """One labelled ECG: its current label, the decoded ECG (PHI inside), its time and patient key."""

    label: EcgLabel
    ecg: Ecg = field(repr=False)
    when: datetime
    when_source: WhenSource
    #: HMAC of the patient's issuer and identifier under the caller's key; None: the ECG names no patient.
    patient_key: str | None = field(repr=False)

    @property
    def message_id(self) -> str:
        return self.label.ecg_message_id


@dataclass
class SiteRecords:
    records: list[SiteRecord]
    #: why ECGs with a label were left out -> how many (no identifiers)
    skipped: Counter[str] = field(default_factory=Counter)


def _utc(when: datetime) -> datetime:
    """SQLite hands back the UTC times it stored without their zone."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _aware(when: datetime | None) -> datetime | None:
    return None if when is None else _utc(when)


def _decoded_in_window(
    store: MessageStore,
    row: MessageRow,
    received_at: datetime,
    since: datetime | None,
    until: datetime | None,
    skipped: Counter[str],
    what: str,
) -> tuple[Ecg, datetime, WhenSource] | None:
    """The row's ECG decoded, with its time and where the time came from; None outside ``[since, until)``
    or when it cannot be read (counted in ``skipped``). The row's own recording time is checked first,
    so the bytes of an ECG outside the window are not read."""
    from ecgbridge.mapping.readers import read_ecg_bytes

    acquired = _aware(row.acquired_at)
    if acquired is not None and ((since and acquired < since) or (until and acquired >= until)):
        return None
    try:
        ecg = read_ecg_bytes(store.read_blob(row.blob_sha256), hint=row.source)
    except (EcgBridgeError, OSError, ValueError) as exc:
        skipped["content pruned or unreadable" if isinstance(exc, OSError) else "could not be decoded"] += 1
        log.debug("%s %s left out: %s", what, row.id, type(exc).__name__)
        return None
    acquired = acquired or _aware(ecg.study.acquired_at)
    source: WhenSource = "acquired" if acquired is not None else "received"
    when = acquired if acquired is not None else received_at
    if (since and when < since) or (until and when >= until):
        return None
    return ecg, when, source


_AGO = re.compile(r"^(\d+)\s*([dhw])$")


def parse_when(value: str | None) -> datetime | None:
    """``--since`` / ``--until``: ``30d`` / ``12h`` / ``2w`` ago, or an ISO date or date-time (UTC without a zone)."""
    if value is None:
        return None
    m = _AGO.match(value.strip())
    if m:
        unit = {"d": "days", "h": "hours", "w": "weeks"}[m[2]]
        return datetime.now(UTC) - timedelta(**{unit: int(m[1])})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ConfigError(f"{value!r} is neither a duration (30d, 12h, 2w) nor a date (2026-11-01)") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def iter_site_records(
    store: MessageStore,
    *,
    key: bytes,
    since: datetime | None = None,
    until: datetime | None = None,
    skipped: Counter[str] | None = None,
) -> Iterator[SiteRecord]:
    """The labelled ECGs recorded in ``[since, until)``, decoded one at a time, in the labels API's order.

    For sets too large to hold every decoded ECG at once; ``skipped`` (when given) counts what is
    left out and why. :func:`site_records` is the same as a list sorted by time.
    """

    if not key:
        raise ValueError("site records need a non-empty key for the patient keys")
    skipped = skipped if skipped is not None else Counter()
    since, until = _aware(since), _aware(until)
    labels = labelled_ecgs(store)
    rows: dict[str, MessageRow] = {}
    ids = [label.ecg_message_id for label in labels]
    with store.session() as s:
        for start in range(0, len(ids), 500):
            for message in s.scalars(select(MessageRow).where(MessageRow.id.in_(ids[start : start + 500]))):
                rows[message.id] = message
    for label in labels:
        row = rows.get(label.ecg_message_id)
        if row is None:
            skipped["the ECG's message row is gone"] += 1
            continue
        found = _decoded_in_window(store, row, label.ecg_received_at, since, until, skipped, "labelled ECG")
        if found is None:
            continue
        ecg, when, source = found
        pkey = patient_key(key, ecg.patient.id, ecg.patient.id_issuer)
        yield SiteRecord(label=label, ecg=ecg, when=when, when_source=source, patient_key=pkey)


def site_records(
    store: MessageStore, *, key: bytes, since: datetime | None = None, until: datetime | None = None
) -> SiteRecords:
    """The labelled ECGs recorded in ``[since, until)`` (see the module docstring), oldest first, all in memory."""
    out = SiteRecords(records=[])
    out.records = list(iter_site_records(store, key=key, since=since, until=until, skipped=out.skipped))
    out.records.sort(key=lambda r: (r.when, r.message_id))
    return out


# ----- the EHR context stored with each analysed ECG (the clinical manifest of ``train kt --from-store``) -----


@dataclass(frozen=True)
class ContextRecord:
    """An analysed ECG with the EHR context stored with its result, and its label when it has one."""

    message_id: str
    ecg: Ecg = field(repr=False)
    when: datetime
    when_source: WhenSource
    #: HMAC of the patient's issuer and identifier under the caller's key; None: the ECG names no patient.
    patient_key: str | None = field(repr=False)
    #: ``EhrContext.to_dict()`` as stored in the result (PHI: values of the patient), or None.
    context: dict[str, Any] | None = field(repr=False)
    label: EcgLabel | None


def stored_ehr_context(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The EHR context a stored result carries: the first output with ``extra["ehr_context"]``, else None.

    The worker stores it there when a model that reads the EHR ran (the LVEF model,
    ``inference.lvef``); retention strips it from pruned results, which then have none.
    """
    for output in (result or {}).get("outputs") or []:
        context = (output.get("extra") or {}).get("ehr_context") if isinstance(output, dict) else None
        if isinstance(context, dict):
            return context
    return None


def _has_context_data(context: dict[str, Any] | None) -> bool:
    if not context:
        return False
    return bool(context.get("values") or context.get("age_years") is not None or context.get("sex"))


def iter_context_records(
    store: MessageStore,
    *,
    key: bytes,
    since: datetime | None = None,
    until: datetime | None = None,
    skipped: Counter[str] | None = None,
) -> Iterator[ContextRecord]:
    """Every analysed ECG with EHR context data, and every labelled ECG, recorded in ``[since, until)``.

    One message per ECG (messages sharing a SOP Instance UID are resends: the latest is taken,
    as for the labels). The context is the latest result's (a re-analysis fetches it again).
    Times and patient keys as :func:`iter_site_records`; ``skipped`` counts what is left out and why.
    """
    from ecgbridge.core.store import ResultRow

    if not key:
        raise ValueError("context records need a non-empty key for the patient keys")
    skipped = skipped if skipped is not None else Counter()
    since, until = _aware(since), _aware(until)
    labels = {label.ecg_message_id: label for label in labelled_ecgs(store)}
    with store.session() as s:
        rows = list(s.scalars(select(MessageRow).join(ResultRow, ResultRow.message_id == MessageRow.id)))
        analysed = {row.id for row in rows}
        ids = [i for i in labels if i not in analysed]  # over-read ECGs without a stored result
        for start in range(0, len(ids), 500):
            rows.extend(s.scalars(select(MessageRow).where(MessageRow.id.in_(ids[start : start + 500]))))
    for row in sorted(distinct_ecgs(rows), key=lambda r: (_utc(r.received_at), r.id)):
        acquired = _aware(row.acquired_at)
        if acquired is not None and ((since and acquired < since) or (until and acquired >= until)):
            continue  # before the result is read: the window decides first
        stored = store.get_result(row.id)
        context = stored_ehr_context(stored.result if stored is not None else None)
        label = labels.get(row.id)
        if label is None and not _has_context_data(context):
            skipped["neither EHR context data nor a label"] += 1
            continue
        found = _decoded_in_window(store, row, _utc(row.received_at), since, until, skipped, "analysed ECG")
        if found is None:
            continue
        ecg, when, source = found
        pkey = patient_key(key, ecg.patient.id, ecg.patient.id_issuer)
        yield ContextRecord(row.id, ecg, when, source, pkey, context, label)
