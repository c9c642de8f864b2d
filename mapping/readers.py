"""Pick the reader for stored bytes: one entry point from any inbound format to an Ecg."""

from __future__ import annotations

from pathlib import Path

from ecgbridge.errors import UnsupportedInputError
from ecgbridge.mapping.ecg import Ecg

__all__ = [
    "read_ecg_bytes",
    "read_ecg_file",
    "looks_like_dicom",
    "looks_like_hl7",
    "looks_like_wfdb",
    "looks_like_xml",
]


def looks_like_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def looks_like_hl7(data: bytes) -> bool:
    head = data.lstrip(b"\x0b\r\n \t\xef\xbb\xbf")
    return head.startswith(b"MSH")


def looks_like_xml(data: bytes) -> bool:
    """XML in UTF-8 or, as Philips carts write it, UTF-16 with a byte-order mark."""
    from ecgbridge.mapping.vendor import looks_like_xml as vendor_looks_like_xml

    return vendor_looks_like_xml(data)


def looks_like_wfdb(data: bytes) -> bool:
    """A WFDB record (header and signal files) packed as one blob by ``ecgbridge import``."""
    from ecgbridge.mapping.wfdb_record import looks_like_wfdb_container

    return looks_like_wfdb_container(data)


def read_ecg_bytes(data: bytes, *, hint: str | None = None) -> Ecg:
    """Bytes as stored by a listener -> Ecg. ``hint`` is the message source (dicom, hl7, file) or ``wfdb``.

    A WFDB record is stored as the container of :func:`ecgbridge.mapping.wfdb_record.pack_wfdb_record`
    (recognised by its content, whatever the hint but hl7 and dicom)."""
    if hint == "hl7" or (looks_like_hl7(data) and not looks_like_wfdb(data)):
        from ecgbridge.mapping.hl7_waveform import parse_oru_waveform

        return parse_oru_waveform(data)
    if hint == "dicom" or looks_like_dicom(data):
        from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg

        return to_ecg(read_bytes(data))
    if hint == "wfdb" or looks_like_wfdb(data):
        from ecgbridge.mapping.wfdb_record import read_wfdb_bytes

        return read_wfdb_bytes(data)
    if looks_like_xml(data):
        from ecgbridge.mapping.vendor import read_xml

        return read_xml(data)
    raise UnsupportedInputError(
        "not a format ecgbridge reads: expected DICOM (DICM preamble), HL7 v2 (MSH), ECG XML "
        "(HL7 aECG, Philips Sierra, GE MUSE) or a WFDB record (imported by its .hea header)"
    )


def read_ecg_file(path: Path) -> Ecg:
    """A local file -> Ecg: DICOM by its preamble, WFDB by a .hea header beside the signal."""
    from pathlib import Path as _Path

    p = _Path(path)
    if p.suffix.lower() in (".hea", ".dat", ".mat") or (p.with_suffix(".hea").exists() and not p.suffix):
        from ecgbridge.mapping.wfdb_record import read_wfdb

        return read_wfdb(p.with_suffix(""))
    return read_ecg_bytes(p.read_bytes())
