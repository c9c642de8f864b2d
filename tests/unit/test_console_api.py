"""The console over real HTTP (uvicorn on a free port, a real SQLite store): who may do what,
bad input answered clearly, patient data escaped and every view and action audited."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from ecgbridge.core.states import DeliveryState, MessageState
from tests.support.console import PASSWORD, Console, csrf_of, login, running_console

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DICOM = FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm"
EVIL = "<script>alert('x')</script>"
INJECTION = "' OR 1=1; DROP TABLE messages; --"

CONFIG = {
    "destinations": [{"name": "ehr", "type": "fhir", "base_url": "http://127.0.0.1:9/fhir"}],
    "routes": [{"name": "all-ecg", "destinations": ["ehr"]}],
}


@pytest.fixture
def console(tmp_path: Path):
    with running_console(tmp_path, config=CONFIG) as c:
        yield c


def _store_dicom(console: Console, patient_name: str = "Doe^Jane") -> str:
    ds = dcmread(DICOM)
    ds.PatientName = patient_name
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    sha, size = console.store.save_blob(buf.getvalue())
    return console.store.record_message(
        source="dicom",
        remote="CART1@127.0.0.1",
        blob_sha256=sha,
        blob_size=size,
        sop_instance_uid=str(ds.SOPInstanceUID),
        route="all-ecg",
    )


def _dead_letter(console: Console, destination: str = "ehr") -> str:
    mid = _store_dicom(console)
    console.store.save_result(mid, {"message_id": mid, "outputs": [], "label": "not for clinical use"}, "test@0")
    console.store.set_state(mid, MessageState.FAILED, error=f"delivery to {destination} dead-lettered")
    console.store.ensure_deliveries(mid, [destination])
    console.store.update_delivery(mid, destination, state=DeliveryState.DEAD, error="connection refused")
    return mid


def _audit(console: Console, action: str) -> list:
    return [a for a in console.accounts.audit_log(limit=500) if a.action == action]


def test_pages_need_a_login_and_the_api_answers_401_as_a_problem(console: Console) -> None:
    with console.client() as anon:
        page = anon.get("/messages")
        assert page.status_code == 303 and page.headers["location"] == "/login"
        api = anon.get("/api/messages")
        assert api.status_code == 401 and api.headers["content-type"].startswith("application/problem+json")
        assert api.json()["detail"] == "sign in first"


def test_wrong_password_is_refused_then_throttled_and_audited(console: Console) -> None:
    with console.client() as c:
        for _ in range(5):
            answer = c.post("/login", data={"username": "viewer", "password": "wrong password!!", "next": "/"})
            assert answer.status_code == 401 and "Wrong user name or password" in answer.text
        answer = c.post("/login", data={"username": "viewer", "password": PASSWORD, "next": "/"})
        assert answer.status_code == 429 and "Too many failed sign-ins" in answer.text
    outcomes = [a.outcome for a in _audit(console, "login")]
    assert outcomes.count("failed") == 5 and "denied" in outcomes


def test_expired_session_goes_back_to_the_login(console: Console) -> None:
    with console.client("viewer") as c:
        assert c.get("/").status_code == 200
        sessions = console.server.app.state.sessions
        for session in list(sessions._by_id.values()):  # idle longer than console.session_idle_s
            session.last_seen = time.monotonic() - console.live.current.console.session_idle_s - 1
        assert c.get("/").status_code == 303
        assert c.get("/api/messages").status_code == 401


def test_a_form_post_without_the_csrf_token_is_refused(console: Console) -> None:
    mid = _dead_letter(console)
    with console.client("operator") as c:
        answer = c.post(f"/messages/{mid}/deliveries/ehr/retry", data={})
        assert answer.status_code == 403 and "CSRF" in answer.text
        answer = c.post(f"/api/messages/{mid}/deliveries/ehr/retry")
        assert answer.status_code == 403
    assert console.store.delivery(mid, "ehr").state == DeliveryState.DEAD
    assert _audit(console, "csrf_refused")


def test_a_viewer_cannot_retry_and_the_attempt_is_audited(console: Console) -> None:
    mid = _dead_letter(console)
    with console.client() as c:
        csrf = login(c, "viewer")
        answer = c.post(f"/api/messages/{mid}/deliveries/ehr/retry", headers={"X-CSRF-Token": csrf})
        assert answer.status_code == 403 and "operator role" in answer.json()["detail"]
    (denied,) = _audit(console, "forbidden")
    assert denied.actor == "viewer" and denied.outcome == "denied" and denied.remote_addr == "127.0.0.1"
    assert console.store.delivery(mid, "ehr").state == DeliveryState.DEAD


def test_an_operator_retries_a_dead_letter_and_it_is_pending_again(console: Console) -> None:
    mid = _dead_letter(console)
    with console.client() as c:
        csrf = login(c, "operator")
        answer = c.post(f"/messages/{mid}/deliveries/ehr/retry", data={"csrf_token": csrf})
        assert answer.status_code == 303
    row = console.store.delivery(mid, "ehr")
    assert row.state == DeliveryState.PENDING and row.attempts == 0
    assert console.store.get(mid).state == MessageState.ANALYSED
    kinds = [e.kind for e in console.store.events(mid)]
    assert "delivery_replayed" in kinds and "enqueue_failed" in kinds  # the broker is down: the sweep will send it
    assert _audit(console, "retry_delivery")[0].target == f"{mid}/ehr"


def test_bulk_replay_counts_first_then_replays_each_once(console: Console) -> None:
    ids = [_dead_letter(console) for _ in range(3)]
    with console.client() as c:
        csrf = login(c, "operator")
        dry = c.post("/api/destinations/ehr/replay?dry_run=true", headers={"X-CSRF-Token": csrf}).json()
        assert dry["count"] == 3 and dry["dry_run"] is True
        assert all(console.store.delivery(m, "ehr").state == DeliveryState.DEAD for m in ids)
        done = c.post("/api/destinations/ehr/replay?dry_run=false", headers={"X-CSRF-Token": csrf}).json()
        assert done["count"] == 3 and not done["failed"]
        again = c.post("/api/destinations/ehr/replay?dry_run=true", headers={"X-CSRF-Token": csrf}).json()
        assert again["count"] == 0
    assert all(console.store.delivery(m, "ehr").state == DeliveryState.PENDING for m in ids)


def test_replaying_to_a_destination_removed_from_the_config_says_so(console: Console) -> None:
    mid = _dead_letter(console, destination="old-ehr")
    with console.client() as c:
        csrf = login(c, "operator")
        answer = c.post(f"/api/messages/{mid}/deliveries/old-ehr/retry", headers={"X-CSRF-Token": csrf})
        assert answer.status_code == 409 and "no longer in the configuration" in answer.json()["detail"]
        page = c.post("/dead-letters/old-ehr/replay", data={"csrf_token": csrf, "dry_run": "true"})
        assert page.status_code == 200 and "no longer in the configuration" in page.text
    assert _audit(console, "retry_delivery")[0].outcome == "failed"


def test_an_unknown_message_is_a_404_in_both_forms(console: Console) -> None:
    with console.client("viewer") as c:
        assert c.get("/api/messages/not-a-message").status_code == 404
        page = c.get("/messages/00000000-0000-0000-0000-000000000000")
        assert page.status_code == 404 and "no message with id" in page.text


def test_filters_take_injection_and_script_strings_as_plain_text(console: Console) -> None:
    _store_dicom(console)
    with console.client("viewer") as c:
        for field in ("state", "source", "route", "destination", "delivery_state", "sender", "q"):
            answer = c.get("/api/messages", params={field: INJECTION})
            assert answer.status_code == 200 and answer.json()["messages"] == [], field
            page = c.get("/messages", params={field: EVIL})
            assert page.status_code == 200 and EVIL not in page.text, field
        assert len(c.get("/api/messages").json()["messages"]) == 1  # the table is still there
        bad = c.get("/api/messages", params={"since": "yesterday"})
        assert bad.status_code == 422 and "since" in bad.json()["detail"]
        assert c.get("/api/messages", params={"cursor": "not-a-cursor"}).status_code == 400


def test_a_patient_name_is_shown_escaped_and_the_view_is_audited(console: Console) -> None:
    mid = _store_dicom(console, patient_name=EVIL)
    with console.client("viewer") as c:
        page = c.get(f"/messages/{mid}")
    assert page.status_code == 200
    assert EVIL not in page.text and "&lt;script&gt;" in page.text
    assert (
        "Doe" not in page.headers.get("location", "") and EVIL not in page.text.split("<title>")[1].split("</title>")[0]
    )
    (view,) = _audit(console, "view_message")
    assert view.actor == "viewer" and view.target == mid


def test_the_inbound_bytes_are_for_operators_and_audited(console: Console) -> None:
    mid = _store_dicom(console)
    with console.client("viewer") as c:
        assert c.get(f"/api/messages/{mid}/raw").status_code == 403
    with console.client("operator") as c:
        raw = c.get(f"/api/messages/{mid}/raw")
    assert raw.status_code == 200 and raw.content[128:132] == b"DICM"
    assert f'filename="{mid}.dcm"' in raw.headers["content-disposition"]
    assert _audit(console, "download_inbound")[0].detail["bytes"] == len(raw.content)


def test_an_api_token_works_without_a_session_and_without_csrf(console: Console) -> None:
    mid = _dead_letter(console)
    token = console.accounts.create_token("operator", "replay-script")
    with console.client() as c:
        headers = {"Authorization": f"Bearer {token}"}
        assert c.get("/api/messages", headers=headers).status_code == 200
        assert c.post(f"/api/messages/{mid}/deliveries/ehr/retry", headers=headers).status_code == 200
        assert c.get("/api/messages", headers={"Authorization": "Bearer ecgb_wrong"}).status_code == 401
    assert _audit(console, "retry_delivery")[0].actor == "token:replay-script@operator"


def test_security_headers_and_no_phi_in_urls(console: Console) -> None:
    with console.client("viewer") as c:
        page = c.get("/")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"


def test_the_openapi_document_is_published(console: Console) -> None:
    with console.client() as c:
        spec = c.get("/api/openapi.json").json()
    assert "/api/messages" in spec["paths"] and "/api/destinations/{destination}/replay" in spec["paths"]


def test_the_audit_log_is_for_admins(console: Console) -> None:
    with console.client("operator") as c:
        assert c.get("/audit").status_code == 403
    with console.client("admin") as c:
        page = c.get("/audit")
    assert page.status_code == 200 and "login" in page.text


def test_sign_out_ends_the_session(console: Console) -> None:
    with console.client() as c:
        csrf = login(c, "viewer")
        assert c.post("/logout", data={"csrf_token": csrf}).status_code == 303
        assert c.get("/").status_code == 303
    _ = csrf_of  # imported for other tests


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example/",
        "/\t/evil.example",
        "/\n/evil.example",
        "https://evil.example/",
        "\\\\evil.example",
        "/\\evil.example",
    ],
)
def test_sign_in_never_redirects_off_the_console(console: Console, target: str) -> None:
    with console.client() as c:
        answer = c.post("/login", data={"username": "viewer", "password": PASSWORD, "next": target})
    assert answer.status_code == 303 and answer.headers["location"] == "/"


def test_explain_refuses_an_upload_over_the_limit_and_names_what_is_unreadable(tmp_path: Path) -> None:
    limit = DICOM.stat().st_size + 100
    config = {**CONFIG, "console": {"host": "127.0.0.1", "port": 0, "max_upload_bytes": limit}}
    with running_console(tmp_path, config=config) as console, console.client() as c:
        csrf = login(c, "viewer")
        headers = {"X-CSRF-Token": csrf}
        big = c.post("/api/routes/explain", content=b"x" * (limit + 1), headers=headers)
        assert big.status_code == 413 and f"{limit} bytes" in big.json()["detail"]
        junk = c.post("/api/routes/explain", content=b"not an ECG at all", headers=headers)
        assert junk.status_code == 422 and junk.json()["detail"]
        page = c.post(
            "/routes/explain",
            data={"csrf_token": csrf},
            files={"file": ("junk.bin", b"not an ECG at all", "application/octet-stream")},
        )
        assert page.status_code == 200 and 'id="explain-error"' in page.text
        unknown = c.post("/api/routes/explain?message_id=nope", headers=headers)
        assert unknown.status_code == 422 and "no message with id" in unknown.json()["detail"]
        good = c.post("/api/routes/explain?calling_ae=CART1", content=DICOM.read_bytes(), headers=headers)
        assert good.status_code == 200 and good.json()["matched"] == "all-ecg"
