"""Configuration: defaults, the example file, and errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecgbridge.core.settings import load_settings
from ecgbridge.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_embedded_defaults_need_no_server(monkeypatch):
    for var in ("ECGBRIDGE_DATA_DIR", "ECGBRIDGE_DATABASE_URL", "ECGBRIDGE_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert s.embedded_broker and s.database_url.startswith("sqlite:///")
    assert s.listeners.dicom.port == 11112 and s.routes[0].models == ["diagnosis"]


def test_example_config_is_valid_and_documents_every_key():
    s = load_settings(REPO / "config" / "ecgbridge.example.yaml")
    assert s.destinations[0].auth.type == "bearer"
    text = (REPO / "config" / "ecgbridge.example.yaml").read_text()
    for key in (
        "allowed_calling_ae_titles",
        "allowed_addresses",
        "database_url",
        "visibility_timeout_s",
        "max_attempts",
        "patient_identifier_system",
        "sop_class_uids",
        "token_env",
    ):
        assert key in text


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return info.value.problems


def test_errors_name_file_line_and_field(tmp_path):
    problems = _problems(tmp_path, "listeners:\n  dicom:\n    port: 70000\n    ae_titel: X\n")
    assert any("site.yaml:3: listeners.dicom.port" in p for p in problems)
    assert any("site.yaml:4: listeners.dicom.ae_titel: unknown setting" in p for p in problems)


def test_route_references_are_checked(tmp_path):
    problems = _problems(tmp_path, "routes:\n  - name: r\n    models: [nope]\n    destinations: [ehr]\n")
    assert any(p.startswith(f"{tmp_path / 'site.yaml'}:3: routes[0].models: 'nope'") for p in problems)
    assert any(":4: routes[0].destinations: 'ehr'" in p for p in problems)


def test_bad_yaml_and_bad_values(tmp_path):
    assert any("site.yaml:3: expected" in p for p in _problems(tmp_path, "a: [1,\nb: 2\n"))
    problems = _problems(tmp_path, "listeners:\n  dicom:\n    allowed_addresses: [10.0.0.0/33]\n    ae_title: ''\n")
    assert any("is not an IP address or CIDR network" in p for p in problems)
    assert any("ae_title" in p for p in problems)
    problems = _problems(tmp_path, "destinations:\n  - name: e\n    base_url: ftp://x\n    auth: {type: bearer}\n")
    assert any("base_url must start with http" in p for p in problems)
    assert any("token_env" in p for p in problems)


def test_environment_overrides_and_secrets(tmp_path, monkeypatch):
    path = tmp_path / "site.yaml"
    path.write_text(
        "destinations:\n  - name: e\n    base_url: https://x/fhir\n    auth: {type: bearer, token_env: EHR_TOKEN}\n"
    )
    monkeypatch.setenv("ECGBRIDGE_BROKER_URL", "redis://10.1.1.1:6379/0")
    monkeypatch.setenv("ECGBRIDGE_DATABASE_URL", "postgresql+psycopg://u@h/db")
    s = load_settings(path)
    assert s.broker_url == "redis://10.1.1.1:6379/0" and not s.embedded_broker
    assert s.database_url == "postgresql+psycopg://u@h/db"
    with pytest.raises(ConfigError, match="EHR_TOKEN"):
        s.destinations[0].auth.token()
    monkeypatch.setenv("EHR_TOKEN", "s3cret")
    assert s.destinations[0].auth.token() == "s3cret"
    assert "s3cret" not in path.read_text()


def test_relative_data_dir_is_relative_to_the_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("ECGBRIDGE_DATA_DIR", raising=False)
    path = tmp_path / "site.yaml"
    path.write_text("data_dir: ./d\n")
    assert load_settings(path).data_dir == (tmp_path / "d").resolve()


EHR_YAML = """\
ehr:
  - name: epic
    base_url: https://ehr.example.org/fhir/R4/
    auth:
      type: smart-backend
      client_id: ecgbridge
      private_key_file: keys/ecgbridge.pem
      key_id: k1
    total_timeout_s: 20
routes:
  - name: r
    ehr_context: epic
"""


def test_ehr_sources_and_route_reference(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(EHR_YAML)
    s = load_settings(path)
    src = s.ehr_source("epic")
    assert src.base_url == "https://ehr.example.org/fhir/R4"
    assert (src.timeout_s, src.total_timeout_s, src.retries) == (5.0, 20.0, 2)
    assert (src.observation_window_days, src.max_observation_pages, src.fetch_medications) == (365, 20, True)
    assert src.patient_identifier_system == "urn:ecgbridge:patient-id"
    assert src.auth.private_key_file == (tmp_path / "keys" / "ecgbridge.pem").resolve()
    assert src.auth.token_url is None and src.auth.smart_scope.startswith("system/Patient.rs ")
    assert s.routes[0].ehr_context == "epic"
    assert load_settings().ehr == [] and load_settings().routes[0].ehr_context is None


def test_route_naming_an_unknown_ehr_source(tmp_path):
    problems = _problems(tmp_path, EHR_YAML.replace("ehr_context: epic", "ehr_context: cerner"))
    assert any(
        ":12: routes[0].ehr_context: 'cerner' is not an EHR source listed under ehr (['epic'])" in p for p in problems
    ), problems
    problems = _problems(tmp_path, "routes:\n  - name: r\n    ehr_context: x\n")
    assert any("routes[0].ehr_context: 'x' is not an EHR source listed under ehr ([])" in p for p in problems)


def test_ehr_auth_and_field_checks(tmp_path):
    problems = _problems(tmp_path, "ehr:\n  - name: e\n    base_url: ftp://x\n    auth: {type: smart-backend}\n")
    assert any("base_url must start with http" in p for p in problems)
    assert any("needs client_id, private_key_file, key_id" in p for p in problems)
    problems = _problems(
        tmp_path, "ehr:\n  - name: e\n    base_url: https://x\n    auth: {type: bearer, client_id: c}\n"
    )
    assert any("needs token_env" in p or "does not use client_id" in p for p in problems)
    problems = _problems(
        tmp_path,
        "ehr:\n  - name: e\n    base_url: https://x\n    auth: {type: saml}\n"
        "    timeout_s: 30\n    total_timeout_s: 10\n    retries: -1\n",
    )
    assert any("ehr[0].auth.type" in p for p in problems)
    assert any("ehr[0].retries" in p for p in problems)
    problems = _problems(
        tmp_path, "ehr:\n  - name: e\n    base_url: https://x\n    timeout_s: 30\n    total_timeout_s: 10\n"
    )
    assert any("total_timeout_s must be at least timeout_s" in p for p in problems)
    problems = _problems(tmp_path, "ehr:\n  - {name: e, base_url: 'https://x'}\n  - {name: e, base_url: 'https://y'}\n")
    assert any("ehr: names must be unique" in p for p in problems)
    problems = _problems(
        tmp_path,
        "ehr:\n  - {name: e, base_url: 'https://x', auth: {type: smart-backend, "
        "client_id: c, private_key_file: k.pem, key_id: k, token_url: 'ftp://t'}}\n",
    )
    assert any("token_url must start with http" in p for p in problems)
