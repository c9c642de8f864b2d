"""Re-analysis as a new result version: the store's versions and deliveries, the operation, the worker's
job, the FHIR and HL7 mappings of a revision (amended / C), and the in-place schema addition."""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from ecgbridge.core.operations import ActionError, reanalyse
from ecgbridge.core.settings import Hl7Destination, load_settings
from ecgbridge.core.states import DeliveryState, MessageState
from ecgbridge.core.store import MessageStore, create_missing_columns
from ecgbridge.errors import StorageError, TransientDeliveryError
from ecgbridge.mapping.ecg import Ecg, Patient, Study
from ecgbridge.mapping.fhir_report import RESULT_VERSION_SYSTEM, build_report
from ecgbridge.mapping.hl7_oru import build_oru_r01, validate_er7
from ecgbridge.outbound.fhir_client import FhirClient
from ecgbridge.outbound.fhir_sender import deliver_revision
from ecgbridge.outbound.hl7_sender import control_id
from ecgbridge.worker.delivery import deliver_message
from ecgbridge.worker.jobs import WorkerContext, analyse_message
from tests.support import toy_sender  # noqa: F401 - registers the toy destination type
from tests.support.results import sample_result

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dicom" / "ptbxl_00024_norm_12lead.dcm"
NOW = datetime(2024, 3, 1, 10, 20, 0, tzinfo=UTC)
RESULT = {"message_id": "m", "outputs": [], "label": "not for clinical use"}


class FakeDispatcher:
    """Records what would be enqueued; ``down`` answers like a broker outage."""

    def __init__(self, down: bool = False) -> None:
        self.down = down
        self.analysed: list[str] = []

    def analyse(self, message_id: str) -> None:
        if self.down:
            raise StorageError("the broker did not take the task (OperationalError)")
        self.analysed.append(message_id)


@pytest.fixture
def store(tmp_path: Path) -> MessageStore:
    s = MessageStore(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    s.create_schema()
    return s


def _message(store: MessageStore, route: str | None = "all-ecg") -> str:
    sha, size = store.save_blob(f"ecg bytes {uuid.uuid4()}".encode())  # one blob each
    return store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route=route)


def _result(tag: str) -> dict[str, Any]:
    return {**RESULT, "outputs": [{"model": "diagnosis", "version": tag, "task": "diagnosis", "findings": []}]}


# --------------------------------------------------------------------------- store


def test_version_one_is_the_results_row_and_get_result_is_the_latest(store: MessageStore) -> None:
    mid = _message(store)
    assert store.result_versions(mid) == [] and store.get_result(mid) is None
    assert store.save_result(mid, _result("1"), "diagnosis@1")
    assert [v.version for v in store.result_versions(mid)] == [1]

    assert store.request_version(mid, requested_by="alice", reason="model 2 deployed") == (2, True)
    assert store.pending_version(mid) == 2
    assert store.get_result(mid).models == "diagnosis@1"  # a waiting version is not the result yet
    assert store.save_version(mid, 2, _result("2"), "diagnosis@2")
    assert not store.save_version(mid, 2, _result("X"), "diagnosis@X")  # a redelivered task stores nothing
    assert store.pending_version(mid) is None
    latest = store.get_result(mid)
    assert latest.models == "diagnosis@2" and latest.result["outputs"][0]["version"] == "2"

    versions = store.result_versions(mid)
    assert [(v.version, v.state, v.requested_by) for v in versions] == [(1, "analysed", None), (2, "analysed", "alice")]
    assert store.result_version(mid, 1).result["outputs"][0]["version"] == "1"  # version 1 kept as it was
    view = store.view(mid)
    assert view.result["outputs"][0]["version"] == "2"
    assert [v["version"] for v in view.versions] == [1, 2] and view.versions[1]["reason"] == "model 2 deployed"


def test_a_request_while_one_waits_joins_it_and_a_failed_one_is_asked_again(store: MessageStore) -> None:
    mid = _message(store)
    with pytest.raises(KeyError):
        store.request_version(mid, requested_by="alice")  # nothing to revise before the first analysis
    store.save_result(mid, _result("1"), "diagnosis@1")
    assert store.request_version(mid, requested_by="alice") == (2, True)
    assert store.request_version(mid, requested_by="bob") == (2, False)  # the double click
    store.fail_version(mid, 2, "ModelError: no such model")
    assert store.pending_version(mid) is None
    assert store.result_version(mid, 2).state == "failed"
    assert store.request_version(mid, requested_by="bob") == (2, True)  # same number, asked again
    assert store.result_version(mid, 2).error is None and store.result_version(mid, 2).requested_by == "bob"
    store.save_version(mid, 2, _result("2"), "diagnosis@2")
    assert store.request_version(mid, requested_by="carol") == (3, True)


def test_deliveries_move_on_to_a_version_once_and_an_older_outcome_settles_nothing(store: MessageStore) -> None:
    mid = _message(store)
    store.ensure_deliveries(mid, ["ehr", "lis"])
    store.update_delivery(mid, "ehr", state=DeliveryState.DELIVERED, remote_ref="DiagnosticReport/7")
    assert [d.version for d in store.deliveries(mid)] == [1, 1]

    assert store.revise_deliveries(mid, ["ehr", "lis", "new"], 2) == ["ehr", "lis", "new"]
    assert store.revise_deliveries(mid, ["ehr", "lis", "new"], 2) == []  # a redelivered task: nothing
    rows = {d.destination: d for d in store.deliveries(mid)}
    assert len(rows) == 3 and all(d.version == 2 and d.state == DeliveryState.PENDING for d in rows.values())
    assert rows["ehr"].attempts == 0 and rows["ehr"].remote_ref == "DiagnosticReport/7"

    # version 1's send finishing late must not mark version 2 delivered
    stale = store.update_delivery(mid, "lis", state=DeliveryState.DELIVERED, remote_ref="ACK:1", version=1)
    assert stale.version == 2 and store.delivery(mid, "lis").state == DeliveryState.PENDING
    done = store.update_delivery(mid, "lis", state=DeliveryState.DELIVERED, remote_ref="ACK:2", version=2)
    assert done.state == DeliveryState.DELIVERED and done.remote_ref == "ACK:2"


def test_an_older_database_gets_the_delivery_version_column_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as con:  # the deliveries table as releases before result versions made it
        con.execute(
            "CREATE TABLE deliveries (id INTEGER NOT NULL PRIMARY KEY, message_id VARCHAR(36) NOT NULL, "
            "destination VARCHAR(64) NOT NULL, state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, "
            "last_error TEXT, remote_ref VARCHAR(256), updated_at DATETIME NOT NULL, UNIQUE (message_id, destination))"
        )
        con.execute(
            "INSERT INTO deliveries (message_id, destination, state, attempts, updated_at) "
            "VALUES ('m1', 'ehr', 'delivered', 1, '2024-03-01 10:00:00')"
        )
    store = MessageStore(f"sqlite:///{path}", tmp_path)
    assert "deliveries.version" in create_missing_columns(store)
    assert create_missing_columns(store) == []  # a second process starting: nothing to do
    store.create_schema()
    assert store.delivery("m1", "ehr").version == 1  # the old row reads as version 1
    assert "result_versions" in inspect(store.engine).get_table_names()


def test_the_column_is_added_in_place_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE deliveries (id SERIAL PRIMARY KEY, message_id VARCHAR(36) NOT NULL, "
                "destination VARCHAR(64) NOT NULL, state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, "
                "last_error TEXT, remote_ref VARCHAR(256), updated_at TIMESTAMPTZ NOT NULL, "
                "UNIQUE (message_id, destination))"
            )
        )
        conn.execute(
            text(
                "INSERT INTO deliveries (message_id, destination, state, attempts, updated_at) "
                "VALUES ('m1', 'ehr', 'delivered', 1, now())"
            )
        )
    engine.dispose()
    store = MessageStore(postgres_url, tmp_path)
    assert "deliveries.version" in create_missing_columns(store)
    assert create_missing_columns(store) == []
    store.create_schema()
    assert store.delivery("m1", "ehr").version == 1
    store.engine.dispose()


# --------------------------------------------------------------------------- the operation


def _settings(tmp_path: Path, outbox: Path) -> Any:
    path = tmp_path / "ecgbridge.yaml"
    path.write_text(
        f"""data_dir: {tmp_path / "data"}
destinations:
  - name: research-share
    type: toy
    folder: {outbox}
routes:
  - name: all-ecg
    destinations: [research-share]
""",
        encoding="utf-8",
    )
    return load_settings(path)


def test_reanalyse_records_the_request_queues_it_and_joins_a_double_click(tmp_path: Path) -> None:
    settings = _settings(tmp_path, tmp_path)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    dispatcher = FakeDispatcher()
    mid = _message(store)
    with pytest.raises(ActionError) as info:
        reanalyse(store, dispatcher, settings, "no-such-id", requested_by="alice")
    assert info.value.status == 404
    with pytest.raises(ActionError, match="no result to re-analyse"):
        reanalyse(store, dispatcher, settings, mid, requested_by="alice")
    store.save_result(mid, _result("1"), "diagnosis@1")
    store.set_state(mid, MessageState.DELIVERED)

    first = reanalyse(store, dispatcher, settings, mid, requested_by="alice", reason="new model")
    again = reanalyse(store, dispatcher, settings, mid, requested_by="alice")
    assert (first.version, first.joined, again.version, again.joined) == (2, False, 2, True)
    assert dispatcher.analysed == [mid, mid]  # the task is the existing one, by message id
    assert store.get(mid).state == MessageState.QUEUED  # so the recovery sweep finds a lost task
    assert [e.kind for e in store.events(mid)].count("reanalysis_requested") == 1

    orphan = _message(store, route="gone")
    store.save_result(orphan, _result("1"), "diagnosis@1")
    with pytest.raises(ActionError, match="no longer in the configuration"):
        reanalyse(store, dispatcher, settings, orphan, requested_by="alice")

    pruned = _message(store)
    store.save_result(pruned, _result("1"), "diagnosis@1")
    store.blobs.path(store.get(pruned).blob_sha256).unlink()  # retention removed the ECG's bytes
    with pytest.raises(ActionError) as info:
        reanalyse(store, dispatcher, settings, pruned, requested_by="alice")
    assert info.value.status == 410 and store.pending_version(pruned) is None

    down = FakeDispatcher(down=True)
    other = _message(store)
    store.save_result(other, _result("1"), "diagnosis@1")
    reanalyse(store, down, settings, other, requested_by="alice")
    assert store.pending_version(other) == 2 and store.get(other).state == MessageState.QUEUED
    assert any(e.kind == "enqueue_failed" for e in store.events(other))


# --------------------------------------------------------------------------- the worker


def test_the_worker_saves_the_next_version_and_delivers_it_once(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    settings = _settings(tmp_path, outbox)
    ctx = WorkerContext.create(settings)
    ctx.store.create_schema()
    sha, size = ctx.store.save_blob(FIXTURE.read_bytes())
    mid = ctx.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    assert analyse_message(ctx, mid) == ["research-share"]
    assert deliver_message(ctx, mid, "research-share") == f"toy:{mid}.json"
    assert ctx.store.get(mid).state == MessageState.DELIVERED

    reanalyse(ctx.store, FakeDispatcher(), settings, mid, requested_by="alice")
    assert analyse_message(ctx, mid) == ["research-share"]
    assert analyse_message(ctx, mid) == ["research-share"]  # redelivered: no version 3, nothing moved again
    assert [v.version for v in ctx.store.result_versions(mid)] == [1, 2]
    delivery = ctx.store.delivery(mid, "research-share")
    assert (delivery.version, delivery.state, delivery.attempts) == (2, DeliveryState.PENDING, 0)
    assert ctx.store.get(mid).state == MessageState.ANALYSED

    (outbox / f"{mid}.json").unlink()
    assert deliver_message(ctx, mid, "research-share") == f"toy:{mid}.json"
    assert json.loads((outbox / f"{mid}.json").read_text())["message_id"] == mid
    assert ctx.store.delivery(mid, "research-share").state == DeliveryState.DELIVERED
    assert ctx.store.get(mid).state == MessageState.DELIVERED
    kinds = [e.kind for e in ctx.store.events(mid)]
    assert kinds.count("reanalysed") == 1 and kinds.count("delivery_superseded") == 1


# --------------------------------------------------------------------------- FHIR mapping

PATIENT = Patient(id="MRN-0042", name="Doe^Jane")
STUDY = Study(sop_instance_uid="1.2.826.0.1.3680043.8.498.1", acquired_at=NOW)


def _bundle(version: int = 1) -> Any:
    return build_report(sample_result(), patient=PATIENT, study=STUDY, message_id="m", issued=NOW, version=version)


def test_a_revision_amends_the_same_report_and_observations() -> None:
    first, second = _bundle(), _bundle(2)
    assert first.report.resource["status"] == "preliminary"
    report = second.report.resource
    assert report["status"] == "amended"
    assert report["identifier"] == first.report.resource["identifier"]  # the same report, found again
    assert second.report.if_none_exist == first.report.if_none_exist
    assert [o.if_none_exist for o in second.observations] == [o.if_none_exist for o in first.observations]
    assert {o.resource["status"] for o in second.observations} == {"amended"}
    assert {"system": RESULT_VERSION_SYSTEM, "code": "2", "display": "result version 2"} in report["meta"]["tag"]
    assert "Amended: result version 2" in report["conclusion"]
    assert report["conclusion"].endswith(first.report.resource["conclusion"].splitlines()[-1])  # the label last

    provenance = second.provenance_for("DiagnosticReport/7")
    assert provenance["activity"]["coding"][0]["code"] == "UPDATE"
    assert second.is_provenance_of_version(provenance) and not first.is_provenance_of_version(provenance)
    assert not second.is_provenance_of_version(first.provenance_for("DiagnosticReport/7"))
    assert "meta" not in first.provenance_for("DiagnosticReport/7")


def test_a_revision_put_answered_412_is_retried() -> None:
    second = _bundle(2)
    calls: list[tuple[str, str, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path, request.headers.get("If-Match")))
        kind = request.url.path.rsplit("/", 1)[-1]
        if request.method == "POST":
            return httpx.Response(201, json={"resourceType": kind, "id": "d1"})
        if request.method == "GET" and kind == "Observation":
            found = {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "v7"}}
            return httpx.Response(200, json={"resourceType": "Bundle", "entry": [{"resource": found}]})
        if request.method == "PUT":
            return httpx.Response(412, json={"resourceType": "OperationOutcome", "issue": []})
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": []})

    with FhirClient("http://fhir.test/fhir", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(TransientDeliveryError, match="412"):
            deliver_revision(client, second)
    assert ("PUT", "/fhir/Observation/o1", 'W/"v7"') in calls


# --------------------------------------------------------------------------- HL7 mapping

DEST = Hl7Destination(name="ehr", type="hl7", host="127.0.0.1", port=2575, receiving_application="EPIC")


def _oru(version: int) -> str:
    ecg = Ecg(signals=np.zeros((2, 10), dtype=np.float32), leads=("I", "II"), fs=500.0, patient=PATIENT, study=STUDY)
    return build_oru_r01(
        sample_result(),
        ecg=ecg,
        order=None,
        destination=DEST,
        message_id="m",
        control_id=control_id("m", "ehr", version),
        now=NOW,
        version=version,
    )


def test_a_revision_is_an_oru_with_result_status_c_and_its_own_control_id() -> None:
    first, second = _oru(1), _oru(2)
    validate_er7(second)
    segments = [s.split("|") for s in second.split("\r") if s]
    obr = next(s for s in segments if s[0] == "OBR")
    assert obr[25] == "C"
    assert {s[11] for s in segments if s[0] == "OBX"} == {"C"}
    assert any(s[0] == "NTE" and "Corrected result: version 2" in s[3] for s in segments)
    first_obr = next(s for s in (x.split("|") for x in first.split("\r")) if s[0] == "OBR")
    assert first_obr[25] == "P" and (obr[2], obr[3]) == (first_obr[2], first_obr[3])  # the same order numbers
    msh10 = {
        v: next(s for s in (x.split("|") for x in er7.split("\r")) if s[0] == "MSH")[9]
        for v, er7 in ((1, first), (2, second))
    }
    assert msh10[1] == control_id("m", "ehr") == control_id("m", "ehr", 1)  # version 1 as every release had it
    assert msh10[2] == control_id("m", "ehr", 2) != msh10[1]
    assert control_id("m", "ehr", 2) == control_id("m", "ehr", 2) != control_id("m", "ehr", 3)
    assert control_id("m", "lis", 2) != control_id("m", "ehr", 2)
