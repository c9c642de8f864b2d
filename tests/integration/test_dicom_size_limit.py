"""``listeners.dicom.max_object_bytes``: an over-size C-STORE is refused with 0xA700, and an
object is written to a file as it arrives (in the data directory), never held whole in memory.

The first test runs against a real ``ecgbridge gateway`` process; the second drives the
listener in this process to watch where pynetdicom stages the data set.
"""

from __future__ import annotations

import copy
import io
import tempfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta, encode

from ecgbridge.core.settings import load_settings
from ecgbridge.core.store import MessageStore
from ecgbridge.gateway.dicom_scp import DicomGateway
from tests.support.processes import write_config
from tests.support.stack import send_dicom

pytestmark = pytest.mark.integration

LIMIT = 400_000  # bytes, as stored (DICOM file: preamble, file meta, data set); the ECG is ~300 kB
EXPLICIT_LE = UID("1.2.840.10008.1.2.1")


def stored_size(ds: Dataset) -> int:
    """The size the gateway stores for ``ds`` sent in Explicit VR Little Endian (as pynetdicom writes it)."""
    meta = io.BytesIO()
    write_file_meta_info(
        meta,
        create_file_meta(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=EXPLICIT_LE),
    )
    body = encode(ds, False, True)
    assert body is not None
    return 128 + 4 + len(meta.getvalue()) + len(body)


def sized(ecg: Dataset, size: int) -> Dataset:
    """A copy of the ECG with a new SOP Instance UID, padded (private OB element) to ``size`` bytes stored."""
    ds = copy.deepcopy(ecg)
    ds.SOPInstanceUID = generate_uid()
    block = ds.private_block(0x0009, "ECGBRIDGE TEST PADDING", create=True)
    block.add_new(0x01, "OB", b"")
    pad = size - stored_size(ds)
    assert pad >= 0 and pad % 2 == 0, pad
    block[0x01].value = b"\0" * pad
    assert stored_size(ds) == size
    return ds


def test_an_object_over_the_limit_is_refused_and_one_at_the_limit_stored(make_stack, waveform_ecg_path):
    stack = make_stack(dicom_options={"max_object_bytes": LIMIT})
    stack.start_gateway()
    ecg = dcmread(waveform_ecg_path)
    over, at_limit = sized(ecg, LIMIT + 2), sized(ecg, LIMIT)  # stored sizes are even
    assert send_dicom(stack.port, [over, at_limit]) == [0xA700, 0x0000]  # one association: it survives
    store = stack.store()
    (row,) = store.list()
    assert row.sop_instance_uid == at_limit.SOPInstanceUID and row.blob_size == LIMIT
    assert store.read_blob(row.blob_sha256) == Path(store.blobs.path(row.blob_sha256)).read_bytes()
    (event,) = [e for e in store.events(None) if e.kind == "dicom_too_large"]
    assert f"{LIMIT + 2} bytes" in event.detail and "TESTSCU" in event.detail

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ecg.SOPClassUID, [str(EXPLICIT_LE)])
    assoc = ae.associate("127.0.0.1", stack.port, ae_title="ECGBRIDGE")
    try:
        status = assoc.send_c_store(sized(ecg, LIMIT + 2))
    finally:
        assoc.release()
    assert status.Status == 0xA700 and str(LIMIT) in status.ErrorComment  # the comment names the limit
    assert len(store.list()) == 1
    staging = store.blobs.root / ".incoming"
    assert staging.is_dir() and not any(staging.iterdir())  # nothing left behind


class _NoBroker:
    def analyse(self, message_id: str) -> None:
        pass

    def deliver(self, message_id: str, destination: str, countdown: float | None = None) -> None:
        pass


def test_the_data_set_is_staged_in_the_data_directory_and_moved_in(tmp_path, waveform_ecg_path, monkeypatch):
    # pynetdicom's default place, the system temporary folder, made unusable: a file there fails the transfer.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-system-temp"))
    settings = load_settings(
        write_config(
            tmp_path / "ecgbridge.yaml",
            {"data_dir": str(tmp_path / "data"), "listeners": {"dicom": {"port": 0, "max_object_bytes": LIMIT}}},
        )
    )
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    moved: list[Path] = []
    save_file = store.blobs.save_file
    monkeypatch.setattr(store.blobs, "save_file", lambda path: moved.append(Path(path)) or save_file(path))
    gateway = DicomGateway(settings, store, _NoBroker())  # type: ignore[arg-type]
    gateway.start()
    try:
        ecg = dcmread(waveform_ecg_path)
        assert send_dicom(gateway.port, [sized(ecg, LIMIT), sized(ecg, LIMIT + 2)]) == [0x0000, 0xA700]
    finally:
        gateway.stop()
    staging = store.blobs.root / ".incoming"
    assert [p.parent for p in moved] == [staging]  # received into a file there, then moved in
    assert not any(staging.iterdir())
    (row,) = store.list()
    assert store.blobs.path(row.blob_sha256).stat().st_size == LIMIT
