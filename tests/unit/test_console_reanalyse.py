"""The console's "Re-analyse with the current models": the page's button and version list, the API, roles,
CSRF and the audit log (a real console over HTTP; the broker is down, so the work waits in the store)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecgbridge.core.states import MessageState
from tests.support.console import Console, csrf_of, login, running_console

CONFIG = {
    "destinations": [{"name": "ehr", "type": "fhir", "base_url": "http://127.0.0.1:9/fhir"}],
    "routes": [{"name": "all-ecg", "destinations": ["ehr"]}],
}


@pytest.fixture
def console(tmp_path: Path):
    with running_console(tmp_path, config=CONFIG) as c:
        yield c


def _delivered(console: Console) -> str:
    sha, size = console.store.save_blob(b"not read by these tests")
    mid = console.store.record_message(source="dicom", blob_sha256=sha, blob_size=size, route="all-ecg")
    result = {"message_id": mid, "label": "not for clinical use", "outputs": []}
    console.store.save_result(mid, result, "diagnosis@0.1.0")
    console.store.set_state(mid, MessageState.DELIVERED)
    return mid


def _audit(console: Console, action: str) -> list:
    return [a for a in console.accounts.audit_log(limit=500) if a.action == action]


def test_the_operator_re_analyses_from_the_message_page(console: Console) -> None:
    mid = _delivered(console)
    with console.client() as c:
        login(c, "operator")
        page = c.get(f"/messages/{mid}")
        assert page.status_code == 200
        assert "Result versions" in page.text and "Re-analyse with the current models" in page.text
        answer = c.post(f"/messages/{mid}/reanalyse", data={"csrf_token": csrf_of(page.text), "reason": "model 0.2"})
        assert answer.status_code == 303 and answer.headers["location"] == f"/messages/{mid}"
        again = c.get(f"/messages/{mid}")
        assert "model 0.2" in again.text and "pending" in again.text and "by operator" in again.text
    assert console.store.pending_version(mid) == 2
    assert console.store.get(mid).state == MessageState.QUEUED
    (entry,) = _audit(console, "reanalyse")
    assert entry.actor == "operator" and entry.target == mid and entry.detail == {"version": 2, "joined": False}


def test_the_api_answers_the_version_and_a_second_click_joins_it(console: Console) -> None:
    mid = _delivered(console)
    with console.client() as c:
        csrf = login(c, "operator")
        first = c.post(f"/api/messages/{mid}/reanalyse", headers={"X-CSRF-Token": csrf})
        second = c.post(f"/api/messages/{mid}/reanalyse", headers={"X-CSRF-Token": csrf})
        assert first.status_code == second.status_code == 200
        assert (first.json()["version"], first.json()["joined"]) == (2, False)
        assert (second.json()["version"], second.json()["joined"]) == (2, True)
        detail = c.get(f"/api/messages/{mid}").json()
        assert [v["version"] for v in detail["versions"]] == [1, 2]
        assert detail["versions"][1]["state"] == "pending" and detail["result"]["version"] == 1
        assert detail["deliveries"] == []  # none yet: the worker moves them on once the version is saved
    assert len(console.store.result_versions(mid)) == 2


def test_viewers_cannot_re_analyse_and_refusals_are_audited(console: Console) -> None:
    mid = _delivered(console)
    with console.client() as c:
        csrf = login(c, "viewer")
        page = c.get(f"/messages/{mid}")
        assert "Result versions" in page.text and "Re-analyse with the current models" not in page.text
        assert c.post(f"/api/messages/{mid}/reanalyse", headers={"X-CSRF-Token": csrf}).status_code == 403
    with console.client() as c:
        csrf = login(c, "operator")
        assert c.post(f"/api/messages/{mid}/reanalyse").status_code == 403  # no CSRF token
        missing = c.post("/api/messages/no-such-message/reanalyse", headers={"X-CSRF-Token": csrf})
        assert missing.status_code == 404
    assert console.store.pending_version(mid) is None
    assert [a.outcome for a in _audit(console, "reanalyse")] == ["failed"]
