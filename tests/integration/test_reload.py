"""Hot reload of a running gateway: SIGHUP to a real ``ecgbridge gateway`` process.

Real parts: a redis-server for the test, ``python -m ecgbridge gateway --config ...`` as
a child process, pynetdicom as the cart, the ``ecgbridge routes explain`` command, and
the store the gateway writes (messages and the audit log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from ecgbridge.core.accounts import AccountStore
from tests.support.processes import REPO, write_config
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration

CART1_ONLY = [{"name": "cart1-only", "match": {"sources": ["dicom"], "calling_ae_titles": ["CART1"]}}]
WITH_TESTSCU = [*CART1_ONLY, {"name": "testscu", "match": {"sources": ["dicom"], "calling_ae_titles": ["TESTSCU"]}}]


def _rewrite(stack: Any, **changes: Any) -> None:
    config = yaml.safe_load(stack.config.read_text())
    config.update(changes)
    write_config(stack.config, config)


def _explain(stack: Any, message_id: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "routes", "explain", message_id, "--config", str(stack.config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def _ecg(waveform_ecg_path: Any) -> Any:
    ds = dcmread(waveform_ecg_path)
    ds.PatientName, ds.PatientID = "Reload^Rosalind", "MRN4455667"  # distinctive, to look for in the logs
    ds.SOPInstanceUID = generate_uid()
    return ds


def test_sighup_applies_new_routes_and_refuses_an_invalid_file(make_stack, waveform_ecg_path) -> None:
    stack = make_stack(extra={"routes": CART1_ONLY})
    gateway = stack.start_gateway()  # no worker: a routed message waits as queued
    gateway.wait_for_log("SIGHUP reloads the configuration file", 30)

    assert send_dicom(stack.port, [_ecg(waveform_ecg_path)]) == [0x0000]  # from TESTSCU: no route yet
    (first,) = stack.wait_state("unrouted")
    assert "routes[0] cart1-only: calling AE TESTSCU is not one of [CART1]" in _explain(stack, first.id)

    # a valid file: the next C-STORE takes the new route
    _rewrite(stack, routes=WITH_TESTSCU)
    os.kill(gateway.process.pid, signal.SIGHUP)
    gateway.wait_for_log("configuration reloaded from", 30)
    assert gateway.alive()
    assert send_dicom(stack.port, [_ecg(waveform_ecg_path)]) == [0x0000]
    (second,) = stack.wait_state("queued")
    assert second.route == "testscu"
    explained = _explain(stack, first.id)  # the stored unrouted message, under the rules now in force
    assert "matches route 'testscu'" in explained and "it would now get route 'testscu'" in explained

    # an invalid file: refused with file:line, the rules in force stay
    _rewrite(stack, routes=[*WITH_TESTSCU, {"name": "bad", "destinations": ["nowhere"]}])
    os.kill(gateway.process.pid, signal.SIGHUP)
    gateway.wait_for_log("configuration NOT reloaded", 30)
    gateway.wait_for_log(f"{stack.config}:", 10)
    assert "'nowhere' is not a destination" in gateway.log_text()
    assert gateway.alive()
    _rewrite(stack, routes=WITH_TESTSCU)  # so that this test can read the store with the file again
    assert send_dicom(stack.port, [_ecg(waveform_ecg_path)]) == [0x0000]
    queued = stack.wait_state("queued", count=2)
    assert {r.route for r in queued} == {"testscu"}

    audit = AccountStore(stack.store()).audit_log(action="config_reload")
    assert [(a.actor, a.outcome) for a in reversed(audit)] == [("system:SIGHUP", "ok"), ("system:SIGHUP", "failed")]
    assert "testscu" in audit[1].detail["diff"]
    assert any("'nowhere'" in p for p in audit[0].detail["problems"])

    logs = stack.full_logs()
    assert "MRN4455667" not in logs and "Rosalind" not in logs, "PHI in the logs"
