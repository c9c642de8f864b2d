"""TLS on the MLLP listener and client, the console over HTTPS, and the certificate checks.

A throwaway CA (tests/support/pki.py) signs a server and a client certificate; a second
CA signs a stranger's. Real sockets on free ports; Python's ssl module as the peer.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from ecgbridge.core.settings import ListenerTls, MllpListener, Settings, check_config
from ecgbridge.core.tls import TlsFiles, check_files, client_context
from ecgbridge.errors import TransientDeliveryError
from ecgbridge.gateway.mllp import MllpServer
from ecgbridge.mapping.hl7_common import frame
from ecgbridge.outbound.mllp_client import send_message
from tests.support.console import running_console
from tests.support.pki import Pki
from tests.support.processes import write_config

MSG = "MSH|^~\\&|CART|WARD|ECGBRIDGE|HOSP|20260101120000||ADT^A08|CTRL1|P|2.5.1\rPID|1||123\r"


def _ack(raw: bytes, peer: str) -> bytes:
    return b"MSH|^~\\&|ECGBRIDGE|HOSP|CART|WARD|20260101120001||ACK|A1|P|2.5.1\rMSA|AA|CTRL1\r"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _server(pki: Pki, *, mutual: bool = False, cert=None) -> MllpServer:
    issued = cert or pki.server
    tls = ListenerTls(cert_file=issued.cert, key_file=issued.key, ca_file=pki.ca_file, require_client_cert=mutual)
    server = MllpServer(MllpListener(port=0, tls=tls), _ack, lambda head, size, peer: b"")
    server.start()
    return server


def _client_ctx(pki: Pki, client=None) -> ssl.SSLContext:
    issued = client
    return client_context(TlsFiles(issued.cert if issued else None, issued.key if issued else None, pki.ca_file))


def test_mllp_over_tls_round_trip_with_our_client(pki: Pki) -> None:
    server = _server(pki)
    try:
        ack = send_message("127.0.0.1", server.port, MSG, connect_timeout_s=5, ack_timeout_s=5, tls=_client_ctx(pki))
        assert ack.code == "AA"
    finally:
        server.stop()


def test_mutual_tls_takes_our_client_and_refuses_a_stranger(pki: Pki) -> None:
    server = _server(pki, mutual=True)
    try:
        ok = send_message(
            "127.0.0.1", server.port, MSG, connect_timeout_s=5, ack_timeout_s=5, tls=_client_ctx(pki, pki.client)
        )
        assert ok.code == "AA"
        stranger = ssl.create_default_context(cafile=str(pki.ca_file))
        stranger.load_cert_chain(str(pki.stranger.cert), str(pki.stranger.key))
        with pytest.raises(TransientDeliveryError):
            send_message("127.0.0.1", server.port, MSG, connect_timeout_s=5, ack_timeout_s=5, tls=stranger)
        with pytest.raises(TransientDeliveryError):  # no client certificate at all
            send_message("127.0.0.1", server.port, MSG, connect_timeout_s=5, ack_timeout_s=5, tls=_client_ctx(pki))
        # and it still serves the next good client
        assert (
            send_message(
                "127.0.0.1", server.port, MSG, connect_timeout_s=5, ack_timeout_s=5, tls=_client_ctx(pki, pki.client)
            ).code
            == "AA"
        )
    finally:
        server.stop()


def test_an_expired_server_certificate_is_refused_by_our_client(pki: Pki) -> None:
    server = _server(pki, cert=pki.expired)
    try:
        with pytest.raises(TransientDeliveryError, match="TLS with 127.0.0.1"):
            send_message("127.0.0.1", server.port, MSG, connect_timeout_s=5, ack_timeout_s=5, tls=_client_ctx(pki))
    finally:
        server.stop()


def test_plain_tcp_to_a_tls_port_is_closed_cleanly(pki: Pki) -> None:
    server = _server(pki)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(frame(MSG.encode()))
            sock.settimeout(10)
            data = b""
            try:
                data = sock.recv(4096)
            except (ConnectionResetError, TimeoutError):
                pass
            assert b"MSA|AA" not in data  # no HL7 answer over a connection that did not do TLS
        time.sleep(0.2)
        assert (
            send_message("127.0.0.1", server.port, MSG, connect_timeout_s=5, ack_timeout_s=5, tls=_client_ctx(pki)).code
            == "AA"
        )  # the listener is fine
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(pki: Pki) -> None:
    server = _server(pki)
    try:
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cafile=str(pki.ca_file))
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        try:
            old.minimum_version = ssl.TLSVersion.TLSv1_1
        except (ValueError, ssl.SSLError):
            pytest.skip("this OpenSSL cannot even offer TLS 1.1")
        with pytest.raises(TransientDeliveryError):
            send_message("127.0.0.1", server.port, MSG, connect_timeout_s=5, ack_timeout_s=5, tls=old)
    finally:
        server.stop()


def test_the_console_over_https(pki: Pki, tmp_path: Path) -> None:
    tls = {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key)}
    with running_console(tmp_path, config={"console": {"host": "127.0.0.1", "port": 0, "tls": tls}}) as console:
        url = console.url.replace("http://", "https://")
        with httpx.Client(verify=_client_ctx(pki)) as client:
            assert client.get(url + "/login").status_code == 200
        with pytest.raises(httpx.ConnectError), httpx.Client() as client:  # the system CAs do not know ours
            client.get(url + "/login")


def test_certificate_checks_name_what_is_wrong(pki: Pki) -> None:
    assert check_files(TlsFiles(pki.server.cert, pki.server.key, pki.ca_file), "x") == ([], [])
    problems, _ = check_files(TlsFiles(pki.server.cert, pki.client.key), "listeners.mllp.tls")
    assert problems == ["listeners.mllp.tls.key_file: the private key does not belong to the certificate in cert_file"]
    problems, _ = check_files(TlsFiles(pki.expired.cert, pki.expired.key), "x")
    assert len(problems) == 1 and "expired on" in problems[0]
    problems, _ = check_files(TlsFiles(pki.folder / "nope.crt", pki.server.key), "x")
    assert problems == [f"x.cert_file: {pki.folder / 'nope.crt'} does not exist"]
    problems, _ = check_files(TlsFiles(pki.server.key, pki.server.key), "x")  # a key is not a certificate
    assert problems == [f"x.cert_file: {pki.server.key} is not a PEM certificate"]


def test_config_check_reports_a_bad_certificate_and_never_prints_the_key(pki: Pki, tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.yaml",
        {
            "data_dir": str(tmp_path / "d"),
            "listeners": {"mllp": {"tls": {"cert_file": str(pki.expired.cert), "key_file": str(pki.expired.key)}}},
        },
    )
    report = check_config(path)
    assert not report.ok and any("listeners.mllp.tls.cert_file: the certificate expired" in p for p in report.problems)
    assert "PRIVATE KEY" not in "\n".join(report.problems + report.warnings)


def test_relative_certificate_paths_are_read_beside_the_config(pki: Pki, tmp_path: Path) -> None:
    from ecgbridge.core.settings import load_settings

    (tmp_path / "certs").mkdir()
    for p in (pki.server.cert, pki.server.key):
        (tmp_path / "certs" / p.name).write_bytes(p.read_bytes())
    path = write_config(
        tmp_path / "c.yaml",
        {"listeners": {"dicom": {"tls": {"cert_file": "certs/server.crt", "key_file": "certs/server.key"}}}},
    )
    tls = load_settings(path).listeners.dicom.tls
    assert tls is not None and tls.cert_file == (tmp_path / "certs" / "server.crt").resolve()


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://ehr.example.org/fhir", True),
        ("http://127.0.0.1:8103/fhir", True),
        ("http://localhost/fhir", True),
        ("http://ehr.example.org/fhir", False),
    ],
)
def test_fhir_over_plain_http_only_to_this_machine_or_when_allowed(url: str, allowed: bool) -> None:
    from pydantic import ValidationError

    data = {"destinations": [{"name": "ehr", "base_url": url}], "routes": [{"name": "r", "destinations": ["ehr"]}]}
    if allowed:
        Settings.model_validate(data)
    else:
        with pytest.raises(ValidationError, match="plain http"):
            Settings.model_validate(data)
        data["destinations"][0]["allow_insecure_http"] = True
        Settings.model_validate(data)
