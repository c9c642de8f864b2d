"""The inbox folder listener end to end: real `ecgbridge gateway` and `ecgbridge worker`, real Redis.

Files are dropped as an ECG management system would: a Philips Sierra XML and an HL7
aECG (real recordings, the committed fixtures), a broken file, and files the watcher
must leave alone (a dot-file, a partial ``.part``, a symbolic link to a file outside
the folder). Then the gateway is restarted with a file "left behind by a crash" (its
message recorded, the file not yet moved), and a file is written slowly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

VENDOR = FIXTURES / "vendor"
PHILIPS = "Doe_Janet_129DYPRG.XML"  # a file name holding a patient name: must not reach the logs
AECG = "liryc_aecg.xml"
BROKEN = "broken.xml"


def _messages(stack) -> list:  # type: ignore[no-untyped-def]
    return stack.store().list(limit=100)


def _by_remote(stack) -> dict[str, list]:  # type: ignore[no-untyped-def]
    out: dict[str, list] = {}
    for row in _messages(stack):
        out.setdefault(row.remote, []).append(row)
    return out


def _drop(folder: Path, name: str, data: bytes) -> None:
    """Write as a careful exporter does: a partial name, then a rename."""
    partial = folder / (name + ".part")
    partial.write_bytes(data)
    os.replace(partial, folder / name)


def test_inbox_files_taken_once_moved_and_survive_a_restart(
    make_stack, tmp_path: Path, database_url: str | None
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    stack = make_stack(
        inbox_options={"enabled": True, "path": str(inbox), "poll_interval_s": 0.2, "settle_s": 1.0},
        database_url=database_url,
    )
    stack.start_worker()
    gateway = stack.start_gateway()
    gateway.wait_for_log("inbox listener", 30)

    philips = (VENDOR / "129DYPRG.XML").read_bytes()
    aecg = (VENDOR / "liryc_hl7aecg_example.xml").read_bytes()
    (inbox / ".hidden.xml").write_bytes(aecg)
    (inbox / "exporting.xml.part").write_bytes(aecg[:1000])
    outside = tmp_path / "outside.xml"
    outside.write_bytes(aecg)
    (inbox / "link.xml").symlink_to(outside)
    _drop(inbox, PHILIPS, philips)
    _drop(inbox, AECG, aecg)
    _drop(inbox, BROKEN, philips[:5000])

    stack.wait_state("analysed", count=2, timeout_s=90)
    stack.wait_state("rejected", count=1, timeout_s=30)
    wait_for(lambda: not (inbox / BROKEN).exists(), 10, 0.2, "broken file moved")
    rows = _by_remote(stack)
    assert sorted(rows) == sorted([PHILIPS, AECG, BROKEN]), rows
    assert all(len(v) == 1 and v[0].source == "file" for v in rows.values())
    assert rows[PHILIPS][0].state == rows[AECG][0].state == "analysed"
    assert stack.store().get_result(rows[PHILIPS][0].id) is not None
    assert "philips_residual_leads:III,aVR,aVL,aVF" in rows[PHILIPS][0].flags
    rejected = rows[BROKEN][0]
    assert rejected.state == "rejected" and "not well-formed XML" in rejected.error
    assert [e.kind for e in stack.store().events(rejected.id)] == ["DecodeError"]

    wait_for(lambda: (inbox / "done" / AECG).exists(), 10, 0.2, "files moved to done/")
    assert sorted(p.name for p in (inbox / "done").iterdir()) == sorted([PHILIPS, AECG])
    assert sorted(p.name for p in (inbox / "failed").iterdir()) == [BROKEN, BROKEN + ".error.txt"]
    note = (inbox / "failed" / (BROKEN + ".error.txt")).read_text()
    assert rejected.id in note and "DecodeError: not well-formed XML" in note
    # Left alone: dot-file, partial file, symbolic link (and its target outside the folder).
    assert {p.name for p in inbox.iterdir() if p.is_file() or p.is_symlink()} == {
        ".hidden.xml",
        "exporting.xml.part",
        "link.xml",
    }
    assert outside.read_bytes() == aecg

    # ---- restart: a crash left a recorded file unmoved; a new file arrived meanwhile.
    gateway.stop()
    (inbox / AECG).write_bytes(aecg)  # same name, same bytes as message rows[AECG]
    _drop(inbox, "new_while_down.xml", aecg)
    gateway = stack.start_gateway()
    gateway.wait_for_log("inbox listener", 30)
    stack.wait_state("analysed", count=3, timeout_s=90)
    wait_for(lambda: not (inbox / AECG).exists(), 15, 0.2, "the left-behind file moved")
    rows = _by_remote(stack)
    assert len(rows[AECG]) == 1, "a file recorded before the crash must not become a second message"
    assert len(rows["new_while_down.xml"]) == 1
    assert len(_messages(stack)) == 4
    assert (inbox / "done" / "liryc_aecg-1.xml").exists()  # name collision resolved by a suffix

    # ---- a file written slowly is not taken before it settles.
    slow = inbox / "slow.xml"
    with slow.open("wb") as fh:
        for i in range(4):
            fh.write(aecg[i * len(aecg) // 4 : (i + 1) * len(aecg) // 4])
            fh.flush()
            time.sleep(0.5)  # < settle_s: the watcher must keep waiting
            assert "slow.xml" not in _by_remote(stack), "taken while still being written"
    stack.wait_state("analysed", count=4, timeout_s=60)
    rows = _by_remote(stack)
    assert [r.state for r in rows["slow.xml"]] == ["analysed"]
    assert (inbox / "done" / "slow.xml").exists()

    logs = stack.full_logs()
    assert "Doe_Janet" not in logs and "inbox: file" in logs
