"""Routing (first match, deny by default) and the durable store (states, idempotence), on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from ecgbridge.core.routing import MessageFacts, match_route
from ecgbridge.core.settings import Route, RouteMatch
from ecgbridge.core.states import Work, WorkKind
from ecgbridge.core.store import MessageStore
from ecgbridge.mapping.codes import SOP_12_LEAD_ECG, SOP_GENERAL_ECG


def test_first_matching_route_wins_and_no_match_is_none():
    routes = [
        Route(name="cart1", match=RouteMatch(calling_ae_titles=["CART1"]), models=["diagnosis"]),
        Route(name="general", match=RouteMatch(sop_class_uids=[SOP_GENERAL_ECG])),
    ]
    assert match_route(routes, MessageFacts("dicom", "CART1", SOP_12_LEAD_ECG)).name == "cart1"
    assert match_route(routes, MessageFacts("dicom", "CART9", SOP_GENERAL_ECG)).name == "general"
    assert match_route(routes, MessageFacts("dicom", "CART9", SOP_12_LEAD_ECG)) is None
    assert match_route([Route(name="files", match=RouteMatch(sources=["file"]))], MessageFacts("dicom")) is None


def _store(database_url: str | None, folder: Path) -> MessageStore:
    return MessageStore(database_url or f"sqlite:///{folder / 'db.sqlite'}", folder)


def test_store_blob_is_content_addressed_and_durable(tmp_path: Path, database_url: str | None) -> None:
    store = _store(database_url, tmp_path)
    store.create_schema()
    sha, size = store.save_blob(b"DICM" * 10)
    assert store.save_blob(b"DICM" * 10) == (sha, size)
    assert store.read_blob(sha) == b"DICM" * 10
    assert not list(store.blobs.path(sha).parent.glob(".incoming-*"))


def test_results_and_deliveries_are_idempotent(tmp_path: Path, database_url: str | None) -> None:
    store = _store(database_url, tmp_path)
    store.create_schema()
    sha, size = store.save_blob(b"x")
    mid = store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="r", sop_instance_uid="1.2.3")
    assert list(store.unfinished()) == [Work(mid, WorkKind.ANALYSE)]
    assert store.save_result(mid, {"outputs": []}, "m@1") is True
    assert store.save_result(mid, {"outputs": []}, "m@1") is False
    store.ensure_deliveries(mid, ["ehr"])
    store.ensure_deliveries(mid, ["ehr"])
    assert len(store.deliveries(mid)) == 1
    store.set_state(mid, "analysed")
    assert list(store.unfinished()) == [Work(mid, WorkKind.DELIVER, "ehr")]
    store.update_delivery(mid, "ehr", state="delivered", remote_ref="DiagnosticReport/1")
    assert list(store.unfinished()) == []
    view = store.view(mid[:8])
    assert view is not None and view.deliveries[0]["attempts"] == 1
