"""A full disk: nothing is acknowledged that is not stored, and intake resumes once space is freed.

Real parts only: the gateway's data directory (SQLite database and blobs) is a small tmpfs
mounted for the test, filled for real, so every write the product makes gets the kernel's
ENOSPC; pynetdicom sends the C-STORE, a raw MLLP socket the ORU, a file lands in the inbox.
Mounting needs root (CAP_SYS_ADMIN): without it the tests skip.

Two ways a file system fills: no blocks left (the usual full disk) and no inodes left (a
disk of many small files). With no inodes but one, the object still arrives into its
staging file and the blob store's own write fails: the DICOM listener answers 0xA700 as
``gateway.dicom_scp`` promises. With no blocks left, pynetdicom's own write of the arriving
data set into the staging folder fails first, in its reader thread, before our handler
runs: the association is aborted instead (nothing is acknowledged, but no 0xA700 either).
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.processes import REPO, wait_for
from tests.support.stack import Stack, send_dicom

pytestmark = pytest.mark.integration

WFDB = REPO / "tests" / "fixtures" / "wfdb" / "00024_lr.hea"
VENDOR = REPO / "tests" / "fixtures" / "vendor"


@dataclass
class SmallDisk:
    """A tmpfs of ``size`` bytes and ``inodes`` inodes at ``path``, to fill and free for real."""

    path: Path
    size: str = "16m"
    inodes: int = 4096

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            pytest.skip("mounting a small file system needs root")
        out = subprocess.run(
            [
                "mount",
                "-t",
                "tmpfs",
                "-o",
                f"size={self.size},nr_inodes={self.inodes},mode=0755",
                "tmpfs",
                str(self.path),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")

    def unmount(self) -> None:
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)  # a process still had a file open

    def fill_blocks(self) -> None:
        """Write one file until the kernel says ENOSPC."""
        with (self.path / "filler").open("wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == 28, exc
        assert os.statvfs(self.path).f_bavail == 0

    def fill_inodes(self, leave: int) -> None:
        """Create empty files until ENOSPC, then delete ``leave`` of them."""
        folder = self.path / "many"
        folder.mkdir()
        made = 0
        try:
            while True:
                (folder / str(made)).touch()
                made += 1
        except OSError as exc:
            assert exc.errno == 28, exc
        for n in range(leave):
            (folder / str(made - 1 - n)).unlink()
        assert os.statvfs(self.path).f_favail == leave

    def free(self) -> None:
        subprocess.run(["rm", "-rf", str(self.path / "filler"), str(self.path / "many")], check=True)


@pytest.fixture
def deployment(make_stack, tmp_path: Path) -> Iterator[tuple[Stack, SmallDisk, Path]]:
    """A gateway (no worker: nothing here needs analysing) whose data directory is a small tmpfs."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    stack = make_stack(
        mllp_options={"enabled": True},
        inbox_options={"enabled": True, "path": str(inbox), "poll_interval_s": 0.2, "settle_s": 0.3},
    )
    disk = SmallDisk(stack.data_dir)
    disk.mount()
    try:
        stack.start_gateway().wait_for_log("inbox listener", 30)
        yield stack, disk, inbox
    finally:
        stack.stop()  # closes the database before the file system goes
        disk.unmount()


# ----- what we send ---------------------------------------------------------------------------------------
def _ecg(path: Path) -> Dataset:
    ds = dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    return ds


def _oru(control: str) -> bytes:
    from ecgbridge.mapping.ecg import Patient
    from ecgbridge.mapping.wfdb_record import read_wfdb
    from tests.support.hl7_waveform_writer import build_oru_waveform

    ecg = replace(read_wfdb(WFDB), patient=Patient(id="MRN-DISK", name="Full^Disk"))
    return build_oru_waveform(ecg, control_id=control, placer_order_number=control).encode()


def _mllp(port: int, raw: bytes) -> tuple[str, str]:
    """One ORU over MLLP; (MSA-1, ERR-8 or "")."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"\x0b" + raw + b"\x1c\r")
        buf = b""
        while not buf.endswith(b"\x1c\r"):
            chunk = sock.recv(65536)
            assert chunk, "the gateway closed the connection before its ACK"
            buf += chunk
    segments = {s[:3]: s.split("|") for s in buf.strip(b"\x0b").removesuffix(b"\x1c\r").decode().split("\r") if s}
    err = segments.get("ERR", [])
    return segments["MSA"][1], err[8] if len(err) > 8 else ""


def _drop(inbox: Path, name: str) -> None:
    (inbox / (name + ".part")).write_bytes((VENDOR / "liryc_hl7aecg_example.xml").read_bytes())
    (inbox / (name + ".part")).replace(inbox / name)


# ----- what the store says ------------------------------------------------------------------------------------
def _stored(stack: Stack) -> dict[str, bytes]:
    """Each recorded message (SOP Instance UID, else order number, else file name) -> its stored bytes."""
    store = stack.store()
    out = {}
    for row in store.list(limit=1000):
        key = row.sop_instance_uid or row.placer_order_number or row.remote or row.id
        out[key] = store.read_blob(row.blob_sha256)  # raises when a recorded message lost its bytes
    return out


def _stored_after_freeing(stack: Stack, disk: SmallDisk, inbox: Path, ds: Dataset, control: str) -> None:
    """Free the space: the same C-STORE, ORU and file are then stored, and the gateway kept running."""
    disk.free()
    assert send_dicom(stack.port, [ds]) == [0x0000]
    assert _mllp(stack.mllp_port, _oru(control)) == ("AA", "")
    wait_for(lambda: not (inbox / "waiting.xml").exists(), 30, 0.2, "the inbox file taken once there is space")
    stored = _stored(stack)
    assert {str(ds.SOPInstanceUID), control, "waiting.xml"} <= set(stored)
    assert all(p.alive() for p in stack.processes)


def test_no_blocks_left_nothing_acknowledged_and_intake_resumes_when_space_is_freed(
    deployment: tuple[Stack, SmallDisk, Path], waveform_ecg_path: Path
) -> None:
    stack, disk, inbox = deployment
    before = _ecg(waveform_ecg_path)
    assert send_dicom(stack.port, [before]) == [0x0000]  # the store works before the disk fills
    disk.fill_blocks()

    ds = _ecg(waveform_ecg_path)
    control = f"DISK{uuid.uuid4().hex[:10].upper()}"
    (status,) = send_dicom(stack.port, [ds])
    assert status != 0x0000, "acknowledged a C-STORE on a full disk"
    code, error = _mllp(stack.mllp_port, _oru(control))
    assert code == "AE" and "disk space" in error, (code, error)
    _drop(inbox, "waiting.xml")
    wait_for(lambda: "inbox: a file was not stored" in stack.full_logs(), 30, 0.2, "the inbox's failed write")
    assert (inbox / "waiting.xml").exists() and not (inbox / "done").exists(), "the file was taken without a place"
    assert set(_stored(stack)) == {str(before.SOPInstanceUID)}, "a message was recorded without its bytes"

    _stored_after_freeing(stack, disk, inbox, ds, control)


@pytest.mark.xfail(
    strict=True,
    reason="defect: with no blocks left pynetdicom's write of the arriving data set into the staging "
    "folder raises in its reader thread (STORE_RECV_CHUNKED_DATASET) before handle_store runs, and the "
    "association is aborted: the sender gets no 0xA700 (see test_no_blocks_left_...)",
)
def test_no_blocks_left_dicom_answers_out_of_resources(
    deployment: tuple[Stack, SmallDisk, Path], waveform_ecg_path: Path
) -> None:
    stack, disk, _ = deployment
    disk.fill_blocks()
    assert send_dicom(stack.port, [_ecg(waveform_ecg_path)]) == [0xA700]


def test_no_inodes_left_dicom_answers_a700_hl7_ae_and_intake_resumes(
    deployment: tuple[Stack, SmallDisk, Path], waveform_ecg_path: Path
) -> None:
    stack, disk, inbox = deployment
    before = _ecg(waveform_ecg_path)
    assert send_dicom(stack.port, [before]) == [0x0000]
    disk.fill_inodes(leave=1)  # the staging file takes the last one; the blob's folders find none

    ds = _ecg(waveform_ecg_path)
    control = f"DISK{uuid.uuid4().hex[:10].upper()}"
    assert send_dicom(stack.port, [ds]) == [0xA700]
    code, error = _mllp(stack.mllp_port, _oru(control))
    assert code == "AE" and "disk space" in error, (code, error)
    assert set(_stored(stack)) == {str(before.SOPInstanceUID)}, "a message was recorded without its bytes"
    assert "C-STORE from TESTSCU not stored: out of disk space" in stack.full_logs()

    disk.free()
    assert send_dicom(stack.port, [ds]) == [0x0000]
    assert _mllp(stack.mllp_port, _oru(control)) == ("AA", "")
    assert {str(ds.SOPInstanceUID), control} <= set(_stored(stack))
    assert all(p.alive() for p in stack.processes)
