"""A WFDB record as one stored blob (why: the store keeps one blob per message, a record is a
header and its signal files; ``ecgbridge import`` packs them and the worker reads them back)."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.cli_import import archive_files
from ecgbridge.errors import DecodeError, UnsupportedInputError
from ecgbridge.gateway.file_intake import file_bytes, record_parts
from ecgbridge.mapping.readers import looks_like_wfdb, read_ecg_bytes, read_ecg_file
from ecgbridge.mapping.wfdb_record import (
    looks_like_wfdb_container,
    pack_wfdb_members,
    pack_wfdb_record,
    read_wfdb_bytes,
    wfdb_signal_files,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
WFDB_DIR = FIXTURES / "wfdb"
DICOM = FIXTURES / "dicom" / "ptbxl_00024_norm_12lead.dcm"


@pytest.mark.parametrize("header", ["00024_lr.hea", "E07506.hea", "georgia_dialect/E07506.hea"])
def test_a_packed_record_reads_back_as_the_record_on_disk(header: str) -> None:
    data = pack_wfdb_record(WFDB_DIR / header)
    assert looks_like_wfdb_container(data) and looks_like_wfdb(data)
    stored = read_ecg_bytes(data, hint="file")  # as the worker reads a message of source file
    original = read_ecg_file(WFDB_DIR / header)
    assert stored.leads == original.leads and stored.fs == original.fs
    assert stored.signals.shape == original.signals.shape
    assert np.allclose(stored.signals, original.signals)
    assert stored.flags == original.flags and stored.patient == original.patient
    assert stored.source_format == "wfdb"


def test_the_container_is_a_plain_tar_with_the_original_names_and_the_same_bytes_each_time(tmp_path: Path) -> None:
    data = pack_wfdb_record(WFDB_DIR / "E07506.hea")
    assert pack_wfdb_record(WFDB_DIR / "E07506.hea") == data  # a re-import hashes the same
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["E07506.hea", "E07506.mat"]
        assert all(m.isreg() and m.mtime == 0 and m.mode == 0o644 and m.uid == 0 for m in members)
        for m in members:
            content = tar.extractfile(m)
            assert content is not None and content.read() == (WFDB_DIR / m.name).read_bytes()


def test_signal_files_named_by_a_header() -> None:
    assert wfdb_signal_files((WFDB_DIR / "00024_lr.hea").read_bytes()) == ["00024_lr.dat"]
    assert wfdb_signal_files((WFDB_DIR / "georgia_dialect" / "E07506.hea").read_text()) == ["E07506.mat"]
    two_files = (
        "rec 3 250 100\nrec_a.dat 16 200 16 0 0 0 0 I\n# c\nrec_b.dat 16 200 16 0 0 0 0 II\n~ 16 200 16 0 0 0 0 III\n"
    )
    assert wfdb_signal_files(two_files) == ["rec_a.dat", "rec_b.dat"]
    assert wfdb_signal_files("multi/2 1 360 45000\nseg1 20000\nseg2 25000\n") == []
    assert wfdb_signal_files("not a header at all") == []
    assert wfdb_signal_files("") == []


def test_a_missing_signal_file_is_named(tmp_path: Path) -> None:
    shutil.copy(WFDB_DIR / "00024_lr.hea", tmp_path)
    data = pack_wfdb_record(tmp_path / "00024_lr.hea")
    with pytest.raises(DecodeError, match=r"signal file 00024_lr\.dat is missing"):
        read_ecg_bytes(data, hint="file")


def test_a_signal_file_outside_the_folder_is_never_read_or_unpacked(tmp_path: Path) -> None:
    (tmp_path / "rec").mkdir()
    shutil.copy(WFDB_DIR / "00024_lr.dat", tmp_path / "secret.dat")
    header = (WFDB_DIR / "00024_lr.hea").read_text().replace("00024_lr.dat", "../secret.dat")
    (tmp_path / "rec" / "00024_lr.hea").write_text(header)
    data = pack_wfdb_record(tmp_path / "rec" / "00024_lr.hea")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        assert tar.getnames() == ["00024_lr.hea"]
    with pytest.raises(DecodeError, match="not a file beside the header"):
        read_wfdb_bytes(data)
    crafted = pack_wfdb_members([("00024_lr.hea", b"00024_lr 0 100 0\n"), ("../x.dat", b"\0\0")])
    with pytest.raises(DecodeError, match="not a plain file"):
        read_wfdb_bytes(crafted)


def test_other_bytes_are_not_taken_for_a_record() -> None:
    assert not looks_like_wfdb(DICOM.read_bytes())
    assert not looks_like_wfdb((FIXTURES / "vendor" / "129DYPRG.XML").read_bytes())
    assert not looks_like_wfdb(b"")
    other_tar = pack_wfdb_members([("notes.txt", b"hello")])
    assert not looks_like_wfdb(other_tar)
    with pytest.raises(UnsupportedInputError, match="WFDB record"):
        read_ecg_bytes(other_tar, hint="file")
    with pytest.raises(UnsupportedInputError):
        read_ecg_bytes((WFDB_DIR / "00024_lr.dat").read_bytes(), hint="file")  # a signal file alone


def test_a_broken_container_is_a_decode_error() -> None:
    data = pack_wfdb_record(WFDB_DIR / "00024_lr.hea")
    with pytest.raises(DecodeError):
        read_wfdb_bytes(data[: 512 + 1024 + 512 + 100])  # the header member whole, the signal member cut


def test_file_bytes_packs_a_header_and_limits_the_size(tmp_path: Path) -> None:
    assert file_bytes(WFDB_DIR / "00024_lr.hea", max_bytes=1 << 20) == pack_wfdb_record(WFDB_DIR / "00024_lr.hea")
    assert file_bytes(DICOM, max_bytes=1 << 20) == DICOM.read_bytes()
    with pytest.raises(OSError, match="more than 10000 bytes"):
        file_bytes(WFDB_DIR / "00024_lr.hea", max_bytes=10_000)  # the header is small, its record is not
    with pytest.raises(OSError, match="more than 10000 bytes"):
        file_bytes(DICOM, max_bytes=10_000)


def test_record_parts_are_the_signal_files_beside_a_header() -> None:
    names = ["00024_lr.hea", "00024_lr.dat", "00622_lr.dat", "E07506.hea", "E07506.mat", "other.dat"]
    assert record_parts(WFDB_DIR, names) == {"00024_lr.dat", "E07506.mat"}


def _archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    (root / "sub").mkdir(parents=True)
    for name in ("00024_lr.hea", "00024_lr.dat"):
        shutil.copy(WFDB_DIR / name, root / name)
    for name in ("E07506.hea", "E07506.mat"):
        shutil.copy(WFDB_DIR / name, root / "sub" / name)
    shutil.copy(WFDB_DIR / "00622_lr.hea", root / "00622_lr.hea")  # its .dat is missing
    shutil.copy(WFDB_DIR / "00730_lr.dat", root / "00730_lr.dat")  # its .hea is missing
    shutil.copy(DICOM, root / "ecg.dcm")
    return root


def test_an_archive_lists_each_record_once_by_its_header(tmp_path: Path) -> None:
    root = _archive(tmp_path)
    assert [name for _, name in archive_files([root], [])] == [
        "import:00024_lr.hea",
        "import:00622_lr.hea",
        "import:00730_lr.dat",  # no header names it: taken, and found unreadable, on its own
        "import:ecg.dcm",
        "import:sub/E07506.hea",
    ]
    # the signal files are part of their record whatever the patterns
    assert [name for _, name in archive_files([root], ["*.dat"])] == ["import:00730_lr.dat"]
    # files given directly: a signal file stands for its header, a record is listed once
    given = [root / "00024_lr.dat", root / "00024_lr.hea", root / "ecg.dcm", root / "00730_lr.dat"]
    assert [(path.name, name) for path, name in archive_files(given, [])] == [
        ("00024_lr.hea", "import:00024_lr.hea"),
        ("ecg.dcm", "import:ecg.dcm"),
        ("00730_lr.dat", "import:00730_lr.dat"),
    ]
