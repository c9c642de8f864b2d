"""The console's Validation page: the live model on over-read ECGs, and the drift table; viewing it is audited."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from pydicom import dcmread
from pydicom.uid import generate_uid

from ecgbridge.core import labels
from ecgbridge.core.store import MessageStore
from ecgbridge.mapping.overread import Statement
from ecgbridge.mapping.overread_readers import Read, ReadRefs
from tests.conftest import FIXTURES
from tests.support.console import running_console
from tests.unit.test_explain import result_with

DICOM = FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm"
#: (probability of MI the model gave, the cardiologist's statements)
CASES = [
    (0.91, ["ANTERIOR INFARCT, AGE UNDETERMINED"]),
    (0.72, ["INFERIOR INFARCT"]),
    (0.40, ["NORMAL ECG"]),
    (0.65, ["NORMAL ECG"]),
    (0.08, ["SINUS RHYTHM", "NORMAL ECG"]),
    (0.03, ["NORMAL ECG"]),
]


def _site(store: MessageStore) -> None:
    for i, (p_mi, statements) in enumerate(CASES):
        ds = dcmread(DICOM)
        ds.SOPInstanceUID = generate_uid()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        sha, size = store.save_blob(buf.getvalue())
        mid = store.record_message(
            source="dicom", blob_sha256=sha, blob_size=size, sop_instance_uid=str(ds.SOPInstanceUID), route="all-ecg"
        )
        store.save_result(mid, result_with({"MI": p_mi, "NORM": 1 - p_mi}, model="diagnosis").to_dict(), "diagnosis")
        rsha, rsize = store.save_blob(f"read {i}".encode())
        carrier = store.record_message(source="hl7", blob_sha256=rsha, blob_size=rsize, state="processed")
        read = Read(
            kind="oru",
            status="F",
            statements=tuple(Statement(text=t) for t in statements),
            reader="Heart Anna",
            read_at=datetime(2026, 3, 1, 10, tzinfo=UTC),
            refs=ReadRefs(sop_instance_uids=(str(ds.SOPInstanceUID),)),
        )
        labels.record_overread(store, read, message_id=carrier, source="hl7", sender="MUSE", window_min=10)


def test_the_validation_page_shows_the_live_model_against_the_reads(tmp_path) -> None:
    with running_console(tmp_path) as console:
        _site(console.store)
        with console.client("viewer") as c:
            page = c.get("/validation")
            assert page.status_code == 200, page.text[:500]
            text = page.text
            assert "live model diagnosis 0.0.1" in text and "still without one" in text
            # MI: the two infarcts scored 0.91 and 0.72, the four normals at most 0.65: AUROC 1.000
            assert '<th scope="row">MI</th><td class="num">6</td><td class="num">2</td>' in text
            assert "1.000" in text and "reliability of MI" in text
            assert 'href="/validation" aria-current="page"' in text
    assert any(a.action == "view_validation" for a in console.accounts.audit_log(limit=20))
