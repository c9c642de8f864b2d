"""DICOM secure transport with DCMTK's storescu as the independent peer (a throwaway CA from tests/support/pki.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.dcmtk import dcmtk_unavailable
from tests.support.peers import needs
from tests.support.pki import Pki

pytestmark = [
    pytest.mark.interop,
    needs(dcmtk_unavailable()),
]


def _storescu(port: int, path: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", *tls, "-aet", "CART1", "-aec", "ECGBRIDGE", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_storescu_over_mutual_tls_is_stored_and_strangers_are_refused(
    make_stack, tmp_path: Path, waveform_ecg_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    stack = make_stack(
        dicom_options={
            "tls": {
                "cert_file": str(pki.server.cert),
                "key_file": str(pki.server.key),
                "ca_file": str(pki.ca_file),
                "require_client_cert": True,
            }
        }
    )
    stack.start_gateway()

    ok = _storescu(
        stack.port, waveform_ecg_path, "+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca_file)
    )
    assert ok.returncode == 0, ok.stderr
    stack.wait_state(("queued", "received"), count=1)

    stranger = _storescu(
        stack.port, waveform_ecg_path, "+tls", str(pki.stranger.key), str(pki.stranger.cert), "+cf", str(pki.ca_file)
    )
    assert stranger.returncode != 0
    plain = _storescu(stack.port, waveform_ecg_path)  # plain TCP to the TLS port
    assert plain.returncode != 0
    assert len(stack.store().list()) == 1  # neither was stored

    again = _storescu(
        stack.port, waveform_ecg_path, "+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca_file)
    )
    assert again.returncode == 0, again.stderr  # the listener still serves after the refusals


def test_storescu_refuses_our_expired_certificate(make_stack, tmp_path: Path, waveform_ecg_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    stack = make_stack(dicom_options={"tls": {"cert_file": str(pki.expired.cert), "key_file": str(pki.expired.key)}})
    stack.start_gateway()
    answer = _storescu(
        stack.port, waveform_ecg_path, "+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca_file)
    )
    assert answer.returncode != 0
    assert stack.store().list() == []
