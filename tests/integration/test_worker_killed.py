"""A worker SIGKILLed in the middle of an analysis: the task comes back, the result goes out once.

Real parts only: a redis-server, ``ecgbridge gateway`` and ``ecgbridge worker`` processes,
pynetdicom as the cart, python-hl7's MLLP server as the EHR the result is written to.

Mid-task, provably: the route runs the LVEF model, which reads the patient's EHR context
first, from an EHR that holds every request (``SlowPeer``). Once that EHR has seen the
worker's request, the worker is inside the analyse task with nothing recorded yet; then
it is killed. Tasks are acknowledged late (``core.queue``), so the broker still holds it:

* the whole worker (main process and pool child) killed: Redis gives the unacknowledged
  task back once ``broker.visibility_timeout_s`` has passed, to the worker started next;
* only the pool child killed: the worker's main process rejects the task back to the
  queue (``task_reject_on_worker_lost``) and its new child runs it.

The gateway is never restarted, so its start-up recovery sweep cannot be what re-enqueues it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis
from pydicom import dcmread
from pydicom.uid import generate_uid

from ecgbridge.outbound.hl7_sender import control_id
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.http_peers import SlowPeer
from tests.support.processes import RedisServer, wait_for
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration

VISIBILITY_TIMEOUT_S = 10  # the smallest the settings allow
EHR_HOLDS_S = 120.0  # far longer than the test waits before the kill


def _config(broker_url: str, ehr_url: str, receiver_port: int) -> dict:
    return {
        "broker": {"url": broker_url, "visibility_timeout_s": VISIBILITY_TIMEOUT_S},
        "models": [{"name": "diagnosis"}, {"name": "lvef"}],
        "ehr": [{"name": "held", "base_url": ehr_url, "timeout_s": EHR_HOLDS_S + 30, "total_timeout_s": 300}],
        "destinations": [
            {"name": "ehr", "type": "hl7", "host": "127.0.0.1", "port": receiver_port, "ack_timeout_s": 10}
        ],
        "routes": [
            {"name": "all-ecg", "models": ["diagnosis", "lvef"], "destinations": ["ehr"], "ehr_context": "held"}
        ],
        "delivery": {"max_attempts": 3, "backoff_initial_s": 0.5, "backoff_max_s": 2},
    }


def _unacked(redis_url: str) -> int:
    """Tasks Redis holds as delivered but not acknowledged (kombu's ``unacked`` hash)."""
    return int(redis.Redis.from_url(redis_url).hlen("unacked"))


@pytest.mark.parametrize("victim", ["whole-worker", "pool-child"])
def test_worker_killed_mid_analysis_is_redelivered_and_delivered_exactly_once(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path, victim: str
) -> None:
    with SlowPeer(delay_s=EHR_HOLDS_S) as ehr, Hl7Receiver("AA") as receiver:
        stack = make_stack(extra=_config(redis_server.url, ehr.origin + "/fhir/R4", receiver.port))
        worker = stack.start_worker()
        stack.start_gateway()
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        assert send_dicom(stack.port, [ds]) == [0x0000]

        wait_for(lambda: ehr.requests, 90, 0.1, "the worker's EHR request (the task is running)")
        delivered_at = time.monotonic()  # the broker handed the task out before the worker asked the EHR
        assert _unacked(redis_server.url) == 1, "the running task is not held as unacknowledged"
        assert worker.process is not None
        if victim == "whole-worker":
            worker.kill()  # SIGKILL to the main process and its pool child at once
        else:
            (child,) = worker.child_pids()  # concurrency 1: one pool process, the one running the task
            os.kill(child, signal.SIGKILL)  # the main process lives
        ehr.delay_s = 0.0  # the EHR answers at once from now on

        store = stack.store()
        (row,) = store.list()
        assert row.state == "queued" and store.get_result(row.id) is None, "the killed task got further than asked"
        assert receiver.received == []

        if victim == "whole-worker":
            # Redis gives the task back only after the visibility timeout; a worker starting
            # after it restores it at once (later, kombu's periodic restore would).
            time.sleep(max(0.0, delivered_at + VISIBILITY_TIMEOUT_S + 1 - time.monotonic()))
            stack.start_worker()
        (row,) = stack.wait_state("delivered", timeout_s=180)

    searches = [path for method, path in ehr.requests if path.split("?")[0].endswith("/Patient")]
    assert len(searches) == 2, f"the task ran {len(searches)} time(s), not twice: {ehr.requests}"
    assert len(receiver.received) == 1, "the result was written to the EHR more than once"
    assert f"|{control_id(row.id, 'ehr')}|" in receiver.received[0]
    (delivery,) = store.deliveries(row.id)
    assert (delivery.state, delivery.attempts) == ("delivered", 1)
    assert store.get_result(row.id) is not None
    assert [m.id for m in store.list()] == [row.id]
    assert [e.kind for e in store.events(row.id)].count("ehr_context") == 1  # only the redelivered run got that far
    assert _unacked(redis_server.url) == 0
    if victim == "pool-child":
        assert "WorkerLostError" in stack.full_logs()
