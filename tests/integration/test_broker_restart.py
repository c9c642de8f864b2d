"""A broker that restarts empty: the gateway notices and re-enqueues what it lost, without a restart of its own.

Real parts: a redis-server without persistence (so a restart loses every queued task, as a
Redis whose last second of AOF was not yet written loses some), ``ecgbridge gateway`` and
``ecgbridge worker`` processes, pynetdicom as the cart.

Before the fix only the gateway's start-up took queued messages again; its periodic sweep
left them to the broker, so a message whose task died with Redis stayed queued until
someone restarted the gateway.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.processes import RedisServer
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration


def test_tasks_lost_with_the_broker_are_enqueued_again_by_the_running_gateway(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path
) -> None:
    stack = make_stack()
    gateway = stack.start_gateway()  # no worker yet: the task waits in Redis
    ds = dcmread(waveform_ecg_path)
    ds.SOPInstanceUID = generate_uid()
    assert send_dicom(stack.port, [ds]) == [0x0000]
    (row,) = stack.wait_state("queued")

    redis_server.kill()
    redis_server.start()  # same port, empty: the analyse task is gone
    stack.start_worker()

    (row,) = stack.wait_state("analysed", timeout_s=90)
    assert gateway.alive(), "the gateway was restarted; its start-up sweep would hide the bug"
    assert "the broker restarted" in gateway.log_text()
    assert [r.id for r in stack.store().list()] == [row.id]


def test_a_worker_keeps_working_across_broker_restarts(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path
) -> None:
    """The same worker process analyses again after each restart of Redis.

    kombu's Redis transport sometimes gives up while it reconnects ("Unrecoverable error:
    AttributeError ... 'hostname'"); ``ecgbridge worker`` then starts afresh in the same
    process (same pid), so it needs no supervisor to come back.
    """
    stack = make_stack()
    worker = stack.start_worker()
    stack.start_gateway()
    assert worker.process is not None
    pid = worker.process.pid
    for round_ in range(1, 4):
        redis_server.kill()
        redis_server.start()
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        assert send_dicom(stack.port, [ds]) == [0x0000]
        stack.wait_state("analysed", count=round_, timeout_s=120)
        assert worker.alive() and worker.process.pid == pid
