"""The PDF / PNG report is drawn only when wanted: for destinations that carry it, or for a person who asks.

Real parts: a redis-server, one ``ecgbridge worker``, ``ecgbridge gateway`` with its console,
pynetdicom as two carts and python-hl7's MLLP server as two EHR interfaces, one that takes the
PDF in the ORU (``include_report_pdf``) and one that does not.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.console import PASSWORD, login
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.processes import RedisServer, wait_for
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration


def _ecg(path: Path):  # type: ignore[no-untyped-def]
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    return ds


def _attachments(store, message_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    stored = store.get_result(message_id)
    return list(stored.result.get("attachments") or []) if stored is not None else []


def test_reports_are_drawn_for_the_destinations_that_carry_them_and_on_request(
    make_stack, redis_server: RedisServer, waveform_ecg_path: Path
) -> None:
    from ecgbridge.core.accounts import AccountStore, Role

    with Hl7Receiver("AA") as with_pdf, Hl7Receiver("AA") as text_only:
        stack = make_stack(
            extra={
                "destinations": [
                    {"name": "pdf-ehr", "type": "hl7", "host": "127.0.0.1", "port": with_pdf.port},
                    {
                        "name": "text-ehr",
                        "type": "hl7",
                        "host": "127.0.0.1",
                        "port": text_only.port,
                        "include_report_pdf": False,
                    },
                ],
                "routes": [
                    {
                        "name": "reports",
                        "match": {"calling_ae_titles": ["CARTPDF"]},
                        "destinations": ["pdf-ehr", "text-ehr"],
                    },
                    {"name": "all-ecg", "destinations": ["text-ehr"]},
                ],
            }
        )
        worker = stack.start_worker()
        stack.start_gateway()
        assert send_dicom(stack.port, [_ecg(waveform_ecg_path)], ae_title="CARTPDF") == [0x0000]
        assert send_dicom(stack.port, [_ecg(waveform_ecg_path)], ae_title="CART2") == [0x0000]
        stack.wait_state("delivered", count=2, timeout_s=120)
        store = stack.store()
        by_route = {row.route: row for row in store.list(limit=10)}

        # The route with a destination that carries the PDF: drawn once, in its own task, before that delivery.
        drawn = _attachments(store, by_route["reports"].id)
        assert [a["content_type"] for a in drawn] == ["application/pdf", "image/png"]
        (pdf_oru,) = with_pdf.received
        assert "|ED|REPORT-PDF^" in pdf_oru
        assert all("|ED|" not in oru for oru in text_only.received) and len(text_only.received) == 2
        assert "ecgbridge.render" in worker.log_text()

        # The route whose destination does not: analysed and delivered, nothing drawn ...
        plain = by_route["all-ecg"].id
        assert _attachments(store, plain) == []
        assert not any(e.kind == "render_failed" for e in store.events(plain))

        # ... until a person asks for it in the console (audited), which a worker then draws.
        AccountStore(store).create_user("viewer", PASSWORD, Role.VIEWER)
        with httpx.Client(base_url=f"http://127.0.0.1:{stack.console_port}", timeout=30) as client:
            csrf = login(client, "viewer", PASSWORD)
            page = client.get(f"/messages/{plain}")
            assert 'id="draw-report"' in page.text
            answer = client.post(f"/api/messages/{plain}/report", headers={"X-CSRF-Token": csrf})
            assert answer.status_code == 202, answer.text
            wait_for(lambda: _attachments(store, plain) or None, 60, 0.3, "the report drawn on request")
            assert client.post(f"/api/messages/{plain}/report", headers={"X-CSRF-Token": csrf}).json() == {
                "drawn": True
            }
            assert client.get(f"/api/messages/{plain}/attachments/0").content.startswith(b"%PDF-")
            assert 'id="draw-report"' not in client.get(f"/messages/{plain}").text
        actions = [e.action for e in AccountStore(store).audit_log(limit=50)]
        assert "draw_report" in actions
        assert len(text_only.received) == 2  # asking for a report sends nothing again
