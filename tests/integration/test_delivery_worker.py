"""Deliveries on their own queue, served by a thread pool: a slow EHR holds no analysis process.

Real parts: a redis-server, ``ecgbridge worker --queues analysis`` (one process),
``ecgbridge worker --queues delivery`` (a pool of threads), ``ecgbridge gateway``, pynetdicom
as the cart and python-hl7's MLLP server as an EHR that takes 30 s to acknowledge each ORU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from ecgbridge.core.queue import DELIVERY_QUEUE, QUEUE
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.processes import RedisServer
from tests.support.stack import hl7_ehr, send_dicom

pytestmark = pytest.mark.integration

ACK_DELAY_S = 30.0
ECGS = 4


def test_a_slow_ehr_is_waited_on_by_delivery_threads_while_analysis_goes_on(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path
) -> None:
    with Hl7Receiver("AA", ack_delay_s=ACK_DELAY_S) as ehr:
        # per_message: a persistent connection would send one at a time (its ordering), not side by side;
        # ordering none: the four ECGs are one patient's, which per_patient (the HL7 default) sends in turn
        stack = make_stack(
            extra={
                **hl7_ehr(ehr.port, ack_timeout_s=60, connection="per_message", ordering="none"),
                "workers": {"delivery_threads": ECGS},
            }
        )
        analysis = stack.start_worker("analysis")
        delivery = stack.start_worker("delivery")
        stack.start_gateway()
        datasets = []
        for _ in range(ECGS):
            ds = dcmread(waveform_ecg_path)
            ds.SOPInstanceUID = generate_uid()
            datasets.append(ds)
        assert send_dicom(stack.port, datasets) == [0x0000] * ECGS

        # Every ORU reaches the EHR before the first is acknowledged: the deliveries wait side
        # by side in the delivery worker's threads, and the analyses did not wait for them.
        ehr.wait_received(ECGS, timeout_s=ACK_DELAY_S - 5)
        assert len(stack.store().list(state="analysed")) == ECGS
        stack.wait_state("delivered", count=ECGS, timeout_s=ACK_DELAY_S + 60)

    analysis_log, delivery_log = analysis.log_text(), delivery.log_text()
    assert "ecgbridge.deliver" not in analysis_log and "ecgbridge.analyse" in analysis_log
    assert "ecgbridge.analyse" not in delivery_log and "ecgbridge.deliver" in delivery_log
    assert f"queues: {QUEUE}" not in delivery_log or DELIVERY_QUEUE in delivery_log
