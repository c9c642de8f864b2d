"""A destination that is down: attempts follow the configured backoff, not the recovery sweep.

Real parts: ``ecgbridge gateway`` (its recovery sweep runs every 15 s) and ``ecgbridge
worker`` processes, a redis-server, pynetdicom as the cart; the FHIR destination is a
closed port, so every attempt fails transiently.
"""

from __future__ import annotations

import time

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.processes import free_port, wait_for
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration


def test_the_recovery_sweep_spends_no_attempts_ahead_of_the_backoff(make_stack, waveform_ecg_path, postgres_url):
    # PostgreSQL only: the sweep's query is checked on SQLite and PostgreSQL by
    # tests/unit/test_delivery_backoff.py; here the processes and their clocks, which are the same on both.
    stack = make_stack(
        database_url=postgres_url,
        fhir_base_url=f"http://127.0.0.1:{free_port()}/fhir",  # nothing listens there
        extra={"delivery": {"max_attempts": 3, "backoff_initial_s": 45, "backoff_max_s": 45}},
    )
    stack.start_worker()
    stack.start_gateway()
    ds = dcmread(waveform_ecg_path)
    ds.SOPInstanceUID = generate_uid()
    assert send_dicom(stack.port, [ds]) == [0x0000]
    store = stack.store()

    def first_attempt():  # type: ignore[no-untyped-def]
        rows = [d for m in store.list() for d in store.deliveries(m.id)]
        return rows if rows and rows[0].attempts >= 1 else None

    (delivery,) = wait_for(first_attempt, 90, 0.3, "the first delivery attempt")
    time.sleep(35)  # two sweeps or more; the retry is due 45 s after the first attempt
    (delivery,) = store.deliveries(delivery.message_id)
    assert (delivery.state, delivery.attempts) == ("pending", 1), stack.logs()
    assert delivery.next_attempt_at is not None
    (row,) = store.list()
    assert row.state == "analysed"
