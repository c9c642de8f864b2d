"""A FHIR destination that needs SMART Backend Services: the report is written with a token
from a real token endpoint (tests/support/http_peers.py) to the Medplum FHIR server behind a
proxy that refuses any request without that token."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ecgbridge.core.settings import DEFAULT_SMART_WRITE_SCOPE, FhirDestination
from ecgbridge.mapping.readers import read_ecg_bytes
from ecgbridge.outbound.fhir_sender import FhirSender
from ecgbridge.outbound.sender import Outgoing
from tests.support.http_peers import FaultProxy, SmartTokenEndpoint, json_reply
from tests.support.results import sample_result

pytestmark = pytest.mark.integration
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "dicom" / "ptbxl_00024_norm_12lead.dcm"
TOKEN = "destination-token-1"


class TokenCheckingProxy(FaultProxy):
    """The FHIR server as a hospital exposes it: 401 without the right bearer token."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: list[str] = []

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes):  # type: ignore[no-untyped-def]
        auth = {k.lower(): v for k, v in headers.items()}.get("authorization", "")
        self.seen.append(auth)
        if auth != f"Bearer {TOKEN}":
            return json_reply(
                401,
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "login", "diagnostics": "no valid token"}],
                },
            )
        return super().handle(method, path, headers, body)


def test_a_report_is_written_with_a_smart_backend_services_token(fhir_server, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    key_file = tmp_path / "ecgbridge.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with (
        SmartTokenEndpoint(public_key_pem=public, client_id="ecgbridge", key_id="k1", tokens=[TOKEN]) as tokens,
        TokenCheckingProxy(fhir_server.origin) as proxy,
    ):
        dest = FhirDestination(
            name="ehr",
            base_url=proxy.base_url,
            auth={
                "type": "smart-backend",
                "client_id": "ecgbridge",
                "key_id": "k1",
                "private_key_file": str(key_file),
                "token_url": tokens.token_url,
            },
        )
        ecg = read_ecg_bytes(FIXTURE.read_bytes(), hint="dicom")
        sender = FhirSender(dest)
        try:
            ref = sender.send(Outgoing("msg-smart-1", sample_result(message_id="msg-smart-1"), ecg, {}))
            again = sender.send(Outgoing("msg-smart-1", sample_result(message_id="msg-smart-1"), ecg, {}))
        finally:
            sender.close()
    assert ref.startswith("DiagnosticReport/") and again == ref  # idempotent, as without auth
    assert tokens.issued == 1  # one token, reused by the sender until it expires
    assert tokens.scopes == [DEFAULT_SMART_WRITE_SCOPE]
    assert proxy.seen and all(a == f"Bearer {TOKEN}" for a in proxy.seen)
