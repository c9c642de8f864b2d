"""Hot reload: a valid file changes the routes of the next message; an invalid one changes nothing.

Real parts: the YAML file on disk, LiveSettings, Intake and a SQLite store (with its audit
log) in tmp_path; only the broker is replaced by a recording dispatcher.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ecgbridge.core.accounts import AccountStore
from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.live import LiveSettings
from ecgbridge.core.reload import reload_settings, restart_needed, settings_yaml
from ecgbridge.core.routing import MessageFacts
from ecgbridge.core.settings import default_settings, load_settings
from ecgbridge.core.store import MessageStore
from ecgbridge.mapping.codes import SOP_12_LEAD_ECG

BASE = """\
data_dir: ./data
listeners:
  dicom:
    port: 11112
destinations:
  - name: ehr
    base_url: https://fhir.example.org/R4
    auth: {type: bearer, token_env: ECGBRIDGE_TEST_TOKEN}
routes:
  - name: cart1
    match: {sources: [dicom], calling_ae_titles: [CART1]}
    destinations: [ehr]
"""

WITH_CART9 = (
    BASE
    + """\
  - name: cart9
    match: {sources: [dicom], calling_ae_titles: [CART9]}
"""
)


class RecordingDispatcher:
    def __init__(self) -> None:
        self.analysed: list[str] = []

    def analyse(self, message_id: str) -> None:
        self.analysed.append(message_id)

    def deliver(self, message_id: str, destination: str, countdown: float | None = None) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, LiveSettings, MessageStore, AccountStore, Intake]:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(BASE)
    settings = load_settings(cfg)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    live = LiveSettings(settings)
    intake = Intake(live, store, RecordingDispatcher())  # type: ignore[arg-type]
    return cfg, live, store, AccountStore(store), intake


def _admit(intake: Intake, store: MessageStore, calling_ae: str) -> str | None:
    sha, size = store.save_blob(f"ECG from {calling_ae} {time.monotonic_ns()}".encode())
    facts = MessageFacts("dicom", calling_ae, SOP_12_LEAD_ECG)
    admission = intake.admit(Arrival(facts=facts, blob_sha256=sha, blob_size=size, remote=f"{calling_ae}@10.0.0.9"))
    return admission.route.name if admission.route else None


def test_a_valid_file_changes_the_routes_of_the_next_message(site) -> None:  # type: ignore[no-untyped-def]
    cfg, live, store, accounts, intake = site
    assert _admit(intake, store, "CART9") is None  # unrouted under the first file
    before = live.generation

    cfg.write_text(WITH_CART9)
    result = reload_settings(live, accounts, actor="alice", remote_addr="10.9.8.7")
    assert result.ok and result.status == "reloaded" and result.changed
    assert live.generation == before + 1 == result.generation
    assert [r.name for r in live.current.routes] == ["cart1", "cart9"]
    assert "+- name: cart9" in result.diff.replace("  ", "") or "+  - name: cart9" in result.diff
    assert result.restart_needed == []
    assert "configuration reloaded" in result.message

    assert _admit(intake, store, "CART9") == "cart9"  # the next message takes the new route
    assert _admit(intake, store, "CART1") == "cart1"

    (row,) = accounts.audit_log(action="config_reload")
    assert (row.actor, row.outcome, row.remote_addr) == ("alice", "ok", "10.9.8.7")
    assert row.target == str(cfg.resolve())
    assert "cart9" in row.detail["diff"] and row.detail["status"] == "reloaded"


def test_reading_the_same_file_again_changes_nothing(site) -> None:  # type: ignore[no-untyped-def]
    cfg, live, _store, accounts, _intake = site
    result = reload_settings(live, accounts, actor="system:SIGHUP")
    assert result.ok and result.status == "unchanged" and not result.diff
    assert live.generation == 1
    (row,) = accounts.audit_log(action="config_reload")
    assert row.outcome == "ok" and row.detail["status"] == "unchanged" and row.actor == "system:SIGHUP"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + "  - name: broken: here\n", ":13: mapping values are not allowed here"),  # bad YAML
        (BASE.replace("destinations: [ehr]", "destinations: [ehr, archive]"), ":12: routes[0].destinations: 'archive'"),
        (WITH_CART9.replace("name: cart9", "name: cart1"), ":9: routes: names must be unique ('cart1'"),
        (BASE.replace("port: 11112", "port: 99999"), ":4: listeners.dicom.port: Input should be less than"),
    ],
    ids=["bad-yaml", "unknown-destination", "duplicate-route-names", "field-error"],
)
def test_an_invalid_file_keeps_the_rules_in_force_and_says_where(site, text: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    cfg, live, store, accounts, intake = site
    in_force = live.current
    cfg.write_text(text)
    result = reload_settings(live, accounts, actor="alice")
    assert not result.ok and result.status == "invalid"
    assert live.current is in_force and live.generation == 1
    assert any(p.startswith(f"{cfg}") and expected in p for p in result.problems), result.problems
    assert "NOT reloaded" in result.message and not result.diff
    assert _admit(intake, store, "CART1") == "cart1"  # still the old rules
    (row,) = accounts.audit_log(action="config_reload")
    assert row.outcome == "failed" and row.detail["problems"] == result.problems


def test_every_problem_of_an_invalid_file_at_once(site) -> None:  # type: ignore[no-untyped-def]
    cfg, live, _store, accounts, _intake = site
    cfg.write_text(WITH_CART9.replace("port: 11112", "prot: 11112").replace("destinations: [ehr]", "destinations: [x]"))
    result = reload_settings(live, accounts, actor="alice")
    assert any(":4: listeners.dicom.prot: unknown setting" in p for p in result.problems)
    assert any(":12: routes[0].destinations: 'x' is not a destination" in p for p in result.problems)


def test_settings_that_bind_sockets_need_a_restart(site) -> None:  # type: ignore[no-untyped-def]
    cfg, live, _store, accounts, _intake = site
    cfg.write_text(WITH_CART9.replace("port: 11112", "port: 11113\n    ae_title: NEWAE") + "console:\n  port: 9090\n")
    result = reload_settings(live, accounts, actor="alice")
    assert result.status == "reloaded"
    assert result.restart_needed == ["listeners.dicom.ae_title", "listeners.dicom.port", "console.port"]
    assert "needs a restart to take effect: listeners.dicom.ae_title" in result.message
    assert restart_needed(default_settings(), default_settings()) == []


def test_no_config_file_means_no_reload(tmp_path: Path) -> None:
    settings = default_settings()
    store = MessageStore(f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path)
    store.create_schema()
    accounts = AccountStore(store)
    live = LiveSettings(settings)
    result = reload_settings(live, accounts, actor="alice")
    assert result.status == "not_possible" and not result.ok
    assert "embedded defaults" in result.problems[0] and "--config" in result.problems[0]
    assert live.current is settings
    (row,) = accounts.audit_log(action="config_reload")
    assert row.outcome == "failed"


def test_secrets_are_never_shown(site, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    cfg, live, _store, accounts, _intake = site
    monkeypatch.setenv("ECGBRIDGE_TEST_TOKEN", "tok-very-secret-123")
    cfg.write_text(
        WITH_CART9
        + "storage:\n  database_url: postgresql+psycopg://ecg:pw-secret-456@db.example.org:5432/ecgbridge\n"
        + "broker:\n  url: redis://:redis-secret-789@redis.example.org:6379/0\n"
    )
    result = reload_settings(live, accounts, actor="alice")
    assert result.status == "reloaded"
    shown = result.diff + "\n".join(result.lines()) + str(accounts.audit_log(action="config_reload")[0].detail)
    for secret in ("tok-very-secret-123", "pw-secret-456", "redis-secret-789"):
        assert secret not in shown
    assert "ecg:********@db.example.org" in result.diff and "token_env: ECGBRIDGE_TEST_TOKEN" in settings_yaml(
        live.current
    )
    assert set(result.restart_needed) == {"storage.database_url", "broker.url"}


def test_sighup_reloads_through_the_wait_loop(site) -> None:  # type: ignore[no-untyped-def]
    """service._wait_for_signal: SIGHUP runs the reload in the main thread and keeps waiting."""
    from ecgbridge.service import _wait_for_signal

    cfg, live, _store, accounts, _intake = site
    cfg.write_text(WITH_CART9)
    calls: list[str] = []

    def on_hangup() -> None:
        calls.append(reload_settings(live, accounts, actor="system:SIGHUP").status)

    def send() -> None:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    sender = threading.Thread(target=send)
    sender.start()
    try:
        _wait_for_signal(on_hangup)
    finally:
        sender.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert calls == ["reloaded"]
    assert [r.name for r in live.current.routes] == ["cart1", "cart9"]
