"""Over-reads where people see them: the ECG's console page and API (audited), ``/api/stats``, and
``ecgbridge overreads list / unmatched / relink`` over a real SQLite store and a real console (uvicorn)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread

from ecgbridge.cli import main
from ecgbridge.core import labels
from ecgbridge.core.store import MessageStore
from ecgbridge.mapping.overread import Statement
from ecgbridge.mapping.overread_readers import Read, ReadRefs
from tests.support.console import Console, running_console

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DICOM = FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm"


def _ecg(store: MessageStore) -> tuple[str, str]:
    ds = dcmread(DICOM)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    sha, size = store.save_blob(buf.getvalue())
    uid = str(ds.SOPInstanceUID)
    mid = store.record_message(
        source="dicom", remote="CART1@127.0.0.1", blob_sha256=sha, blob_size=size, sop_instance_uid=uid, route="all-ecg"
    )
    return mid, uid


def _read(
    store: MessageStore, statements: list[str], *, uid: str | None = None, status: str = "F", at: int = 10
) -> str:
    sha, size = store.save_blob(f"read {statements} {status} {at}".encode())
    carrier = store.record_message(source="hl7", blob_sha256=sha, blob_size=size, state="processed", flags=["overread"])
    read = Read(
        kind="oru",
        status=status,
        statements=tuple(Statement(text=t) for t in statements),
        reader="Heart Anna",
        read_at=datetime(2026, 3, 1, at, tzinfo=UTC),
        refs=ReadRefs(sop_instance_uids=(uid,) if uid else (), placer_order_number=None if uid else "NOWHERE-1"),
    )
    labels.record_overread(store, read, message_id=carrier, source="hl7", sender="MUSE", window_min=10)
    return carrier


@pytest.fixture
def console(tmp_path: Path):
    with running_console(tmp_path) as c:
        yield c


def test_the_ecg_page_shows_its_current_label_and_history_and_the_view_is_audited(console: Console) -> None:
    ecg_id, uid = _ecg(console.store)
    _read(console.store, ["NORMAL ECG"], uid=uid, at=10)
    carrier = _read(console.store, ["ANTERIOR INFARCT, AGE UNDETERMINED"], uid=uid, status="C", at=11)
    with console.client("viewer") as c:
        page = c.get(f"/messages/{ecg_id}")
        assert page.status_code == 200
        assert "Cardiologist&#39;s read" in page.text or "Cardiologist's read" in page.text
        assert 'id="overread-current"' in page.text and ">MI<" in page.text and "superseded" in page.text
        detail = c.get(f"/api/messages/{ecg_id}").json()["overreads"]
        assert detail["current"]["status"] == "C" and detail["current"]["labels"]["MI"] == 1
        assert [r["state"] for r in detail["history"]] == ["superseded", "current"]
        carried = c.get(f"/messages/{carrier}")
        assert 'id="overread-carried"' in carried.text and ecg_id[:8] in carried.text
        stats = c.get("/api/stats").json()["overreads"]
        assert stats["labels"] == 1 and stats["superseded"] == 1
    views = [a for a in console.accounts.audit_log(limit=50) if a.action == "view_message"]
    assert {a.target for a in views} >= {ecg_id, carrier}


def test_overreads_commands_list_the_unlinked_and_the_unmatched_and_relink(
    console: Console, capsys: pytest.CaptureFixture[str]
) -> None:
    _read(console.store, ["SINUS RHYTHM", "WOBBLY BASELINE HUMPS"])  # names an order no ECG carries
    config = ["--config", str(console.config)]
    assert main(["overreads", "list", "--unlinked", "--json", *config]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (
        listed["state"] == "unlinked" and listed["unlinked_reason"] == "no ECG found by its order or accession number"
    )
    assert main(["overreads", "list", *config]) == 0
    assert "unlinked" in capsys.readouterr().out
    assert main(["overreads", "unmatched", *config]) == 0
    out = capsys.readouterr().out
    assert "WOBBLY BASELINE HUMPS" in out and "SINUS RHYTHM" not in out
    assert main(["overreads", "relink", *config]) == 0
    assert "0 over-read(s) linked" in capsys.readouterr().out


def test_every_overreads_command_has_help() -> None:
    for argv in (["overreads", "--help"], ["overreads", "list", "--help"], ["overreads", "unmatched", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0


def test_an_older_database_gets_the_acquisition_time_and_accession_columns_in_place(
    tmp_path: Path, database_url: str | None
) -> None:
    from sqlalchemy import create_engine, inspect, text

    url = database_url or f"sqlite:///{tmp_path / 'old.db'}"
    json_type, time_type = ("JSON", "TIMESTAMPTZ") if url.startswith("postgresql") else ("JSON", "DATETIME")
    engine = create_engine(url)
    with engine.begin() as conn:  # the messages table as releases before over-reads made it
        conn.execute(
            text(
                f"CREATE TABLE messages (id VARCHAR(36) PRIMARY KEY, received_at {time_type} NOT NULL, "
                f"updated_at {time_type} NOT NULL, source VARCHAR(16) NOT NULL, remote VARCHAR(128), "
                "sop_class_uid VARCHAR(64), sop_instance_uid VARCHAR(64), blob_sha256 VARCHAR(64) NOT NULL, "
                "blob_size INTEGER NOT NULL, state VARCHAR(16) NOT NULL, route VARCHAR(64), error TEXT, "
                f"flags {json_type} NOT NULL, placer_order_number VARCHAR(199), filler_order_number VARCHAR(199), "
                "message_type VARCHAR(32))"
            )
        )
        conn.execute(
            text(
                "INSERT INTO messages (id, received_at, updated_at, source, blob_sha256, blob_size, state, flags, "
                "placer_order_number) VALUES ('old-ecg', '2024-03-01 10:00:00', '2024-03-01 10:00:00', 'dicom', "
                "'00', 1, 'analysed', '[]', 'PL-OLD')"
            )
        )
    engine.dispose()
    store = MessageStore(url, tmp_path)
    store.create_schema()
    columns = {c["name"] for c in inspect(store.engine).get_columns("messages")}
    assert {"acquired_at", "accession_number"} <= columns and "overreads" in inspect(store.engine).get_table_names()
    old = store.get("old-ecg")
    assert old is not None and old.acquired_at is None and old.accession_number is None
    _read(store, ["LEFT BUNDLE BRANCH BLOCK"])  # an order number no ECG carries
    sha, size = store.save_blob(b"a read of the old ECG")
    carrier = store.record_message(source="hl7", blob_sha256=sha, blob_size=size, state="processed")
    read = Read(
        kind="oru", status="F", statements=(Statement(text="NORMAL ECG"),), refs=ReadRefs(placer_order_number="PL-OLD")
    )
    labels.record_overread(store, read, message_id=carrier, source="hl7", sender="MUSE", window_min=10)
    current = labels.current_label(store, "old-ecg")
    assert current is not None and current.link_rule == "order" and current.labels["NORM"] == 1
    store.engine.dispose()
