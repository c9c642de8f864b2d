"""``Intake.admit`` and resends of one SOP Instance (rule: ecgbridge.core.intake's docstring).

Why: a cart that resent an instance got a second message, a second analysis and a
second HL7 ORU (only the FHIR report was deduplicated, by its identifier).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.routing import MessageFacts
from ecgbridge.core.settings import Settings, load_settings
from ecgbridge.core.states import MessageState, Source
from ecgbridge.core.store import MessageStore

UID = "1.2.826.0.1.3680043.8.498.1"


class RecordingDispatcher:
    def __init__(self) -> None:
        self.analysed: list[str] = []

    def analyse(self, message_id: str) -> None:
        self.analysed.append(message_id)

    def deliver(self, message_id: str, destination: str, countdown: float | None = None) -> None:
        raise AssertionError("admit never delivers")


@pytest.fixture
def intake(tmp_path: Path, database_url: str | None) -> Intake:
    """An Intake on a fresh store: SQLite, then PostgreSQL (``database_url``)."""
    settings: Settings = load_settings(None).model_copy(update={"data_dir": tmp_path})
    store = MessageStore(database_url or f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    store.create_schema()
    return Intake(settings, store, RecordingDispatcher())  # type: ignore[arg-type]


def _arrival(intake: Intake, content: bytes, uid: str | None = UID, source: str = Source.DICOM) -> Arrival:
    sha, size = intake.store.save_blob(content)
    return Arrival(
        facts=MessageFacts(source, "CART1", "1.2.840.10008.5.1.4.1.1.9.1.1"),
        blob_sha256=sha,
        blob_size=size,
        remote="CART1@10.0.0.7",
        sop_instance_uid=uid,
    )


def _kinds(intake: Intake, message_id: str) -> list[str]:
    return [e.kind for e in reversed(intake.store.events(message_id))]


def test_an_identical_resend_records_and_analyses_nothing(intake: Intake) -> None:
    first = intake.admit(_arrival(intake, b"ecg one"))
    assert first.queued and not first.duplicate
    again = intake.admit(_arrival(intake, b"ecg one"))
    assert again.duplicate and again.message_id == first.message_id and not again.queued
    assert [m.id for m in intake.store.list()] == [first.message_id]  # no second message
    assert intake.dispatcher.analysed == [first.message_id]  # type: ignore[attr-defined]  # no second analysis
    assert intake.store.deliveries(first.message_id) == []
    assert _kinds(intake, first.message_id) == ["duplicate_received"]
    (event,) = intake.store.events(first.message_id)
    assert event.level == "info" and "CART1@10.0.0.7" in event.detail


def test_a_changed_resend_is_a_new_linked_version_and_is_analysed(intake: Intake) -> None:
    first = intake.admit(_arrival(intake, b"ecg one"))
    changed = intake.admit(_arrival(intake, b"ecg one, corrected"))
    assert not changed.duplicate and changed.queued and changed.message_id != first.message_id
    assert changed.resend_of == first.message_id
    assert intake.dispatcher.analysed == [first.message_id, changed.message_id]  # type: ignore[attr-defined]
    assert _kinds(intake, first.message_id) == ["resent_changed"]
    assert _kinds(intake, changed.message_id) == ["resent_changed"]
    (old_event,) = intake.store.events(first.message_id)
    (new_event,) = intake.store.events(changed.message_id)
    assert changed.message_id in old_event.detail and first.message_id in new_event.detail
    # the original again: still an identical resend of the first message
    assert intake.admit(_arrival(intake, b"ecg one")).message_id == first.message_id
    # a third version links to the latest one
    third = intake.admit(_arrival(intake, b"ecg one, corrected twice"))
    assert third.resend_of == changed.message_id
    assert len(intake.store.list()) == 3


def test_rejected_messages_and_messages_without_a_uid_are_not_resends(intake: Intake) -> None:
    rejected = intake.reject(_arrival(intake, b"broken"), "cannot decode", "DecodeError")
    taken = intake.admit(_arrival(intake, b"broken"))  # e.g. accepted after an upgrade
    assert not taken.duplicate and taken.message_id != rejected and taken.resend_of is None
    one = intake.admit(_arrival(intake, b"hl7 oru", uid=None, source=Source.HL7))
    two = intake.admit(_arrival(intake, b"hl7 oru", uid=None, source=Source.HL7))
    assert one.message_id != two.message_id  # HL7's own check (MSH bytes) handles those
    assert intake.store.get(taken.message_id).state == MessageState.QUEUED


def test_an_identical_resend_of_an_instance_from_the_inbox_counts_across_listeners(intake: Intake) -> None:
    first = intake.admit(_arrival(intake, b"an ecg file"))
    again = intake.admit(_arrival(intake, b"an ecg file", source=Source.FILE))
    assert again.duplicate and again.message_id == first.message_id
    (event,) = intake.store.events(first.message_id)
    assert "via file" in event.detail  # never a file name (it may hold a patient's name)


def test_the_same_instance_on_several_associations_at_once_is_recorded_once(intake: Intake) -> None:
    arrival = _arrival(intake, b"ecg sent by two threads")
    start = threading.Barrier(8)
    ids: list[str] = []

    def send() -> None:
        start.wait()
        ids.append(intake.admit(arrival).message_id)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(intake.store.list()) == 1
    assert _kinds(intake, ids[0]).count("duplicate_received") == 7
