"""Resends of one SOP Instance against a real gateway: real pynetdicom C-STOREs, ``ecgbridge
gateway`` and ``ecgbridge worker`` processes, Redis, an HL7 receiver as the LIS, the inbox.

The rule (ecgbridge.core.intake): an identical resend is answered success and recorded as
a ``duplicate_received`` event only; a changed one is a new, linked version, analysed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.conftest import FIXTURES
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.processes import wait_for
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration


def _kinds(store, message_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [e.kind for e in reversed(store.events(message_id))]


def test_a_resent_instance_is_analysed_and_reported_once_and_a_changed_one_again(
    make_stack, waveform_ecg_path, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with Hl7Receiver("AA") as lis:
        stack = make_stack(
            inbox_options={"enabled": True, "path": str(inbox), "poll_interval_s": 0.2, "settle_s": 0.5},
            extra={
                "destinations": [{"name": "lis", "type": "hl7", "host": "127.0.0.1", "port": lis.port}],
                "routes": [
                    {
                        "name": "carts",
                        "match": {"sources": ["dicom"]},
                        "models": ["diagnosis"],
                        "destinations": ["lis"],
                    },
                    {"name": "files", "match": {"sources": ["file"]}, "models": ["diagnosis"]},
                ],
            },
        )
        stack.start_worker()
        stack.start_gateway()
        store = stack.store()
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()

        # ---- identical resends: on the same association, and from another cart later
        assert send_dicom(stack.port, [ds, ds]) == [0x0000, 0x0000]
        assert send_dicom(stack.port, [ds], ae_title="CART2") == [0x0000]
        (first,) = stack.wait_state("delivered")
        time.sleep(2)  # room for a second analysis or ORU, were there one
        assert [m.id for m in store.list()] == [first.id]
        assert len(lis.received) == 1, lis.answers
        kinds = _kinds(store, first.id)
        assert kinds.count("duplicate_received") == 2 and "resent_changed" not in kinds
        details = [e.detail for e in store.events(first.id) if e.kind == "duplicate_received"]
        assert any("CART2@" in d for d in details)

        # ---- a changed resend (same UID, other content): a new, linked version, analysed and sent
        ds.StudyDescription = "corrected at the cart"
        assert send_dicom(stack.port, [ds]) == [0x0000]
        stack.wait_state("delivered", count=2)
        second = next(m for m in store.list() if m.id != first.id)
        assert second.sop_instance_uid == first.sop_instance_uid == ds.SOPInstanceUID
        wait_for(lambda: len(lis.received) == 2, 30, 0.2, "the second version's ORU")
        (old_link,) = [e.detail for e in store.events(first.id) if e.kind == "resent_changed"]
        (new_link,) = [e.detail for e in store.events(second.id) if e.kind == "resent_changed"]
        assert second.id in old_link and first.id in new_link
        assert store.get_result(second.id) is not None

    # ---- the inbox: the same DICOM file exported twice under two names
    exported = (FIXTURES / "dicom" / "cinc2021_E07506_12lead.dcm").read_bytes()
    for name in ("export-1.dcm", "export-2.dcm"):
        (inbox / (name + ".part")).write_bytes(exported)
        os.replace(inbox / (name + ".part"), inbox / name)
        wait_for(lambda n=name: (inbox / "done" / n).exists(), 30, 0.2, f"{name} moved to done/")
    files = [m for m in store.list() if m.source == "file"]
    assert len(files) == 1, [(m.remote, m.state) for m in files]
    assert _kinds(store, files[0].id).count("duplicate_received") == 1
