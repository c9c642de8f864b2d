"""DCMTK as an independent DICOM peer: echoscu and storescu against our gateway."""

from __future__ import annotations

import subprocess

import pytest
from pydicom.data import get_testdata_file

from tests.support.dcmtk import dcmtk_unavailable
from tests.support.peers import needs

pytestmark = [pytest.mark.interop, pytest.mark.integration]

needs_dcmtk = needs(dcmtk_unavailable())


@needs_dcmtk
def test_echoscu_gets_success(make_stack):
    stack = make_stack()
    stack.start_gateway()
    out = subprocess.run(
        ["echoscu", "-aec", "ECGBRIDGE", "127.0.0.1", str(stack.port)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr


@needs_dcmtk
def test_storescu_ecg_is_analysed(make_stack, waveform_ecg_path):
    stack = make_stack()
    stack.start_worker()
    stack.start_gateway()
    out = subprocess.run(
        [
            "storescu",
            "-v",
            "-aet",
            "MORTARA1",
            "-aec",
            "ECGBRIDGE",
            "127.0.0.1",
            str(stack.port),
            str(waveform_ecg_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "Received Store Response (Success)" in out.stderr + out.stdout
    (row,) = stack.wait_state("analysed")
    assert row.remote.startswith("MORTARA1@")
    result = stack.store().get_result(row.id).result
    assert len(result["outputs"][0]["findings"]) == 5


@needs_dcmtk
def test_storescu_of_a_ct_image_is_refused(make_stack):
    stack = make_stack()
    stack.start_gateway()
    ct = get_testdata_file("CT_small.dcm")
    out = subprocess.run(
        ["storescu", "-aec", "ECGBRIDGE", "127.0.0.1", str(stack.port), ct], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert (
        "no presentation context" in (out.stderr + out.stdout).lower()
        or "rejected" in (out.stderr + out.stdout).lower()
    )
    assert stack.store().list() == []
