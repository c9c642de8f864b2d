"""Signing in to the console through a real OpenID Connect provider (``oidc-provider`` from npm).

The browser is an httpx client that follows the redirects and submits the provider's own
login and consent forms; the console runs for real (uvicorn on a free port). What counts:
the session's role comes from the mapped ``groups`` claim, a person whose groups map to no
role is refused, a tampered, replayed or foreign state is refused, a token whose signature
does not match the provider's keys is refused, and each outcome is audited without tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import httpx
import pytest
from joserfc.jwk import KeySet, RSAKey

from ecgbridge.core.accounts import Role
from ecgbridge.core.settings import OidcSettings
from tests.support.console import PASSWORD, Console, running_console
from tests.support.oidc_provider import OidcProvider, provider_available
from tests.support.peers import needs
from tests.support.processes import free_port

_REASON = provider_available()
pytestmark = [pytest.mark.integration, needs(_REASON)]

SECRET_ENV = "ECGBRIDGE_TEST_OIDC_SECRET"
MAPPING = {"ecg-admins": "admin", "ecg-operators": "operator", "ecg-viewers": "viewer"}


@contextmanager
def _console_and_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **oidc: Any
) -> Iterator[tuple[Console, OidcProvider]]:
    port = free_port()
    with OidcProvider(f"http://127.0.0.1:{port}/login/oidc/callback") as provider:
        monkeypatch.setenv(SECRET_ENV, provider.client_secret)
        settings = {
            "name": "Hospital SSO",
            "issuer": provider.issuer,
            "client_id": provider.client_id,
            "client_secret_env": SECRET_ENV,
            "scopes": ["openid", "profile", "groups"],
            "roles_claim": "groups",
            "role_mapping": MAPPING,
            "allow_unknown_users": True,
            "require_https": False,
            "allow_insecure_http": True,
            **oidc,
        }
        config = {"console": {"host": "127.0.0.1", "port": port, "oidc": settings}}
        with running_console(tmp_path, config=config, users={"admin": Role.ADMIN}) as console:
            yield console, provider


@pytest.fixture
def sso(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Console, OidcProvider]]:
    with _console_and_provider(tmp_path, monkeypatch) as pair:
        yield pair


class _Forms(HTMLParser):
    """The forms of a page: action, method and the inputs' names and values."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get").lower(), "fields": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")


def _at_provider(client: httpx.Client, console: Console, account: str, next_path: str = "/messages") -> str:
    """Start at the console, sign in and consent at the provider; the callback URL the provider sends back."""
    callback = f"{console.url}/login/oidc/callback"
    answer = client.get(f"{console.url}/login/oidc", params={"next": next_path})
    assert answer.status_code == 303, answer.text[:500]
    for _ in range(20):
        if answer.is_redirect:
            target = urljoin(str(answer.url), answer.headers["location"])
            if target.startswith(callback + "?"):
                return target
            answer = client.get(target)
            continue
        assert answer.status_code == 200, f"{answer.url}: {answer.status_code} {answer.text[:500]}"
        parser = _Forms()
        parser.feed(answer.text)
        form = next(f for f in parser.forms if f["method"] == "post")
        fields = dict(form["fields"])
        if fields.get("prompt") == "login":
            fields.update(login=account, password="any password")
        answer = client.post(urljoin(str(answer.url), form["action"]), data=fields)
    raise AssertionError("the provider never sent the browser back to the console")


def _with_state(url: str, state: str) -> str:
    parts = urlsplit(url)
    query = [(k, state if k == "state" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _logins(console: Console) -> list[Any]:
    return [a for a in console.accounts.audit_log(limit=500) if a.action == "login"]


def test_sign_in_through_the_provider_gives_the_role_of_the_mapped_group(sso: tuple[Console, OidcProvider]) -> None:
    console, _ = sso
    with httpx.Client(timeout=30, follow_redirects=False) as browser:
        page = browser.get(f"{console.url}/login", params={"next": "/messages"})
        assert 'href="/login/oidc?next=/messages"' in page.text and "Sign in with Hospital SSO" in page.text

        callback = _at_provider(browser, console, "alice")
        query = dict(parse_qsl(urlsplit(callback).query))
        assert set(query) >= {"code", "state"}
        done = browser.get(callback)
        assert done.status_code == 200, done.text[:800]
        assert "Signed in as alice (admin)" in done.text
        # the session cookie is SameSite=Strict: the page continues to the console by a same-site navigation
        assert '<meta http-equiv="refresh" content="0; url=/messages">' in done.text
        cookie = done.headers["set-cookie"]
        assert "ecgbridge_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie

        messages = browser.get(f"{console.url}/messages")
        assert messages.status_code == 200 and "alice (admin)" in messages.text
        assert browser.get(f"{console.url}/config").status_code == 200  # an admin page

        again = browser.get(callback)  # the same answer twice: the state is used up
        assert again.status_code == 400 and "not started here" in again.text

    user = console.accounts.user("alice")
    assert user is not None and user.password_hash is None and user.role == "admin"  # an OIDC-only user
    ok = [a for a in _logins(console) if a.actor == "alice" and a.outcome == "ok"]
    assert len(ok) == 1 and ok[0].detail == {"via": "oidc"} and ok[0].role == "admin"
    created = [a for a in console.accounts.audit_log(limit=500) if a.action == "user_created"]
    assert [(a.target, a.detail) for a in created] == [("alice", {"role": "admin", "via": "oidc"})]
    replayed = [a for a in _logins(console) if a.outcome == "failed"]
    assert [a.detail for a in replayed] == [{"via": "oidc", "reason": "state_mismatch"}]
    # nothing of the exchange is kept: no code, no state in the audit log
    everything = repr([(a.actor, a.target, a.detail, a.note) for a in console.accounts.audit_log(limit=500)])
    assert query["code"] not in everything and query["state"] not in everything

    with console.client() as c:  # an OIDC-only user has no password to sign in with
        assert c.post("/login", data={"username": "alice", "password": PASSWORD}).status_code == 401


def test_an_operator_group_gives_an_operator_session(sso: tuple[Console, OidcProvider]) -> None:
    console, _ = sso
    with httpx.Client(timeout=30, follow_redirects=False) as browser:
        done = browser.get(_at_provider(browser, console, "oscar", next_path="/"))
        assert done.status_code == 200 and "Signed in as oscar (operator)" in done.text
        assert "oscar (operator)" in browser.get(f"{console.url}/").text
        assert browser.get(f"{console.url}/config").status_code == 403


def test_a_person_whose_groups_map_to_no_role_is_refused(sso: tuple[Console, OidcProvider]) -> None:
    console, _ = sso
    with httpx.Client(timeout=30, follow_redirects=False) as browser:
        refused = browser.get(_at_provider(browser, console, "carol"))
        assert refused.status_code == 403
        assert "has no group that gives access to this console" in refused.text
        assert "ecgbridge_session" not in refused.headers.get("set-cookie", "")
        page = browser.get(f"{console.url}/messages")
        assert page.status_code == 303 and page.headers["location"] == "/login"
    assert console.accounts.user("carol") is None
    denied = [a for a in _logins(console) if a.actor == "carol"]
    assert [(a.outcome, a.detail) for a in denied] == [("denied", {"via": "oidc", "reason": "unmapped_role"})]


def test_a_tampered_or_foreign_state_is_refused(sso: tuple[Console, OidcProvider]) -> None:
    console, _ = sso
    with httpx.Client(timeout=30, follow_redirects=False) as browser:
        callback = _at_provider(browser, console, "alice")
        state = dict(parse_qsl(urlsplit(callback).query))["state"]
        tampered = browser.get(_with_state(callback, state[:-2] + ("AA" if not state.endswith("AA") else "BB")))
        assert tampered.status_code == 400 and "not started here" in tampered.text
        assert browser.get(f"{console.url}/messages").status_code == 303  # not signed in

        with httpx.Client(timeout=30, follow_redirects=False) as other:  # the answer opened in another browser
            foreign = other.get(callback)
            assert foreign.status_code == 400 and "another browser" in foreign.text
    reasons = [a.detail["reason"] for a in _logins(console) if a.outcome == "failed"]
    assert reasons == ["browser_mismatch", "state_mismatch"]  # newest first
    assert console.accounts.user("alice") is None


def test_an_id_token_not_signed_by_the_providers_key_is_refused(sso: tuple[Console, OidcProvider]) -> None:
    console, _ = sso
    with httpx.Client(timeout=30, follow_redirects=False) as browser:
        callback = _at_provider(browser, console, "alice")
        # the keys the console holds for the provider: another key under the provider's key id
        impostor = RSAKey.generate_key(2048, parameters={"kid": "test-rs256", "alg": "RS256", "use": "sig"})
        keys = KeySet.import_key_set({"keys": [impostor.as_dict(private=False)]})
        console.server.app.state.oidc_logins._provider._jwks = keys
        refused = browser.get(callback)
        assert refused.status_code == 401, refused.text[:500]
    reasons = [a.detail["reason"] for a in _logins(console) if a.outcome == "failed"]
    assert reasons == ["id_token_invalid:bad_signature"]
    assert console.accounts.user("alice") is None


def test_unknown_people_are_refused_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _console_and_provider(tmp_path, monkeypatch, allow_unknown_users=False) as (console, _):
        console.accounts.create_user("victor", None, Role.VIEWER)  # known: an OIDC-only user made beforehand
        with httpx.Client(timeout=30, follow_redirects=False) as browser:
            refused = browser.get(_at_provider(browser, console, "oscar"))
            assert refused.status_code == 403 and "no user on this console" in refused.text
        with httpx.Client(timeout=30, follow_redirects=False) as browser:  # the provider remembers oscar otherwise
            done = browser.get(_at_provider(browser, console, "victor"))
            assert done.status_code == 200 and "Signed in as victor (viewer)" in done.text
        assert console.accounts.user("oscar") is None
        outcomes = [(a.actor, a.outcome, a.detail) for a in _logins(console)]
        assert outcomes == [
            ("victor", "ok", {"via": "oidc"}),
            ("oscar", "denied", {"via": "oidc", "reason": "unknown_user"}),
        ]


def test_a_provider_that_names_another_issuer_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    with OidcProvider(f"http://127.0.0.1:{port}/login/oidc/callback") as provider:
        monkeypatch.setenv(SECRET_ENV, provider.client_secret)
        oidc = {
            "issuer": provider.issuer.replace("127.0.0.1", "localhost"),  # discovery says 127.0.0.1
            "client_id": provider.client_id,
            "client_secret_env": SECRET_ENV,
            "role_mapping": MAPPING,
            "require_https": False,
            "allow_insecure_http": True,
        }
        config = {"console": {"host": "127.0.0.1", "port": port, "oidc": oidc}}
        with running_console(tmp_path, config=config, users={"admin": Role.ADMIN}) as console:
            with console.client() as c:
                answer = c.get("/login/oidc")
                assert answer.status_code == 502 and "not set up correctly" in answer.text
        reasons = [a.detail["reason"] for a in _logins(console)]
        assert reasons == ["issuer_mismatch"]


def test_the_settings_refuse_plain_http_unless_both_test_switches_are_set() -> None:
    base = {"issuer": "http://idp.example", "client_id": "c", "role_mapping": {"g": "viewer"}}
    with pytest.raises(ValueError, match="must be https"):
        OidcSettings.model_validate(base)
    with pytest.raises(ValueError, match="for tests only"):
        OidcSettings.model_validate({**base, "require_https": False})
    assert OidcSettings.model_validate({**base, "require_https": False, "allow_insecure_http": True})
    with pytest.raises(ValueError, match="no claim value"):
        OidcSettings.model_validate({**base, "issuer": "https://idp.example", "role_mapping": {}})
    with pytest.raises(ValueError, match="openid"):
        OidcSettings.model_validate({**base, "issuer": "https://idp.example", "scopes": ["profile"]})
    assert OidcSettings.model_validate({**base, "issuer": "https://idp.example/"}).issuer == "https://idp.example"
