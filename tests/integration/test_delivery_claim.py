"""Two tasks for one delivery at once: the EHR gets the result once.

A second deliver task for a delivery whose first task is still sending is what a gateway
start-up, a broker restart (the gateway re-enqueues what the broker may have lost) or a task
restored after a worker was killed produces. Real parts: a redis-server, two ``ecgbridge
worker`` processes, ``ecgbridge gateway``, pynetdicom as the cart and python-hl7's MLLP
server as an EHR that takes a few seconds to acknowledge, so the two tasks overlap.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from ecgbridge.core.queue import Dispatcher, make_celery
from ecgbridge.core.settings import load_settings
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.processes import RedisServer, wait_for
from tests.support.stack import hl7_ehr, send_dicom

pytestmark = pytest.mark.integration

ACK_DELAY_S = 4.0


def test_a_second_task_for_a_delivery_being_sent_does_not_send_it_again(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path
) -> None:
    with Hl7Receiver("AA", ack_delay_s=ACK_DELAY_S) as ehr:
        stack = make_stack(extra=hl7_ehr(ehr.port, ack_timeout_s=30))
        stack.start_worker()
        stack.start_worker()
        stack.start_gateway()
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        assert send_dicom(stack.port, [ds]) == [0x0000]

        ehr.wait_received(1, timeout_s=90)  # the first task is waiting for the EHR's ACK
        (row,) = stack.store().list()
        Dispatcher(make_celery(load_settings(stack.config))).deliver(row.id, "ehr")  # the second task

        stack.wait_state("delivered", timeout_s=60)
        time.sleep(ACK_DELAY_S + 3)  # time for the second task to have sent, had it been going to
        assert len(ehr.received) == 1, "the result reached the EHR twice"
        (delivery,) = stack.store().deliveries(row.id)
        assert (delivery.state, delivery.attempts) == ("delivered", 1)
        wait_for(lambda: "retry" in stack.full_logs().lower(), 10, 0.2, "the second task to wait for the claim")
