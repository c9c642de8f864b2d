"""Encode a generated ECG data set description as DICOM bytes, element by element.

Why not pydicom's writer: it refuses (or fixes) the values a hostile sender would
write: a DS of "nan", a US of three bytes, a sequence sent with VR OB. This encoder
writes whatever it is given, in Explicit or Implicit VR Little Endian, behind a
valid preamble and file meta, so the reader meets exactly those bytes.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = ["encode"]

_LONG_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UN", "UT", "UC", "UR", "SV", "UV"}
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

Element = tuple[str, Any]  # (keyword, value): str, int, bytes or a list of items (lists of Elements)


def encode(desc: dict[str, Any]) -> bytes:
    """A DICOM file (preamble, file meta, data set) from a :func:`strategies.dicom_datasets` description."""
    implicit = bool(desc["implicit"])
    overrides: dict[str, str] = desc.get("overrides", {})
    undefined = bool(desc.get("undefined", False))
    body = _dataset(_top(desc), implicit, overrides, undefined)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = desc["sop_class"] or "1.2.3"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1"
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    return out.getvalue() + body


def _top(desc: dict[str, Any]) -> list[Element]:
    elements: list[Element] = [("SOPClassUID", desc["sop_class"]), ("SOPInstanceUID", "1.2.826.0.1.3680043.10.1.1")]
    if desc["acquired"] is not None:
        elements.append(("AcquisitionDateTime", desc["acquired"]))
    if desc["content"] is not None:
        elements += [("ContentDate", desc["content"][0]), ("ContentTime", desc["content"][1])]
    if desc["tz"] is not None:
        elements.append(("TimezoneOffsetFromUTC", desc["tz"]))
    for keyword, key in (("PatientID", "patient_id"), ("PatientBirthDate", "birth_date"), ("PatientSex", "sex")):
        if desc[key] is not None:
            elements.append((keyword, desc[key]))
    if desc["groups"] or desc.get("empty_sequence"):
        elements.append(("WaveformSequence", [_group(g) for g in desc["groups"]]))
    return elements


def _group(g: dict[str, Any]) -> list[Element]:
    elements: list[Element] = [
        ("NumberOfWaveformChannels", g["n_channels"]),
        ("NumberOfWaveformSamples", g["n_samples"]),
        ("SamplingFrequency", g["fs"]),
        ("MultiplexGroupLabel", g["label"]),
        ("ChannelDefinitionSequence", [_channel(c) for c in g["channels"]]),
        ("WaveformBitsAllocated", g["bits"]),
        ("WaveformSampleInterpretation", g["interpretation"]),
        ("WaveformData", g["data"]),
    ]
    return [(k, v) for k, v in elements if k not in g["omit"]]


def _channel(c: dict[str, Any]) -> list[Element]:
    elements: list[Element] = []
    if c["label"] is not None:
        elements.append(("ChannelLabel", c["label"]))
    if c["source"] is not None:
        code, scheme, meaning = c["source"]
        elements.append(
            (
                "ChannelSourceSequence",
                [[("CodeValue", code), ("CodingSchemeDesignator", scheme), ("CodeMeaning", meaning)]],
            )
        )
    for keyword, key in (
        ("ChannelSensitivity", "sensitivity"),
        ("ChannelSensitivityCorrectionFactor", "correction"),
        ("ChannelBaseline", "baseline"),
    ):
        if c[key] is not None:
            elements.append((keyword, c[key]))
    if c["units"] is not None:
        code, meaning = c["units"]
        units = [("CodeValue", code), ("CodingSchemeDesignator", "UCUM"), ("CodeMeaning", meaning)]
        elements.append(("ChannelSensitivityUnitsSequence", [units]))
    if c["bits_stored"] is not None:
        elements.append(("WaveformBitsStored", c["bits_stored"]))
    return elements


def _dataset(elements: list[Element], implicit: bool, overrides: dict[str, str], undefined: bool) -> bytes:
    out = bytearray()
    for keyword, value in sorted(elements, key=lambda e: tag_for_keyword(e[0]) or 0):
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        vr = overrides.get(keyword) or dictionary_VR(tag).split(" or ")[-1]
        out += _element(tag, vr, value, implicit, overrides, undefined)
    return bytes(out)


def _value(vr: str, value: Any, implicit: bool, overrides: dict[str, str], undefined: bool) -> tuple[bytes, bool]:
    """(encoded value, undefined length) of one element."""
    if isinstance(value, list):
        items = bytearray()
        for item in value:
            body = _dataset(item, implicit, overrides, undefined)
            items += struct.pack("<II", _ITEM, _UNDEFINED if undefined else len(body)) + body
            if undefined:
                items += struct.pack("<II", _ITEM_END, 0)
        if undefined and vr == "SQ":
            items += struct.pack("<II", _SEQ_END, 0)
        return bytes(items), undefined and vr == "SQ"
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, int):
        width = {"US": 2, "SS": 2, "UL": 4, "SL": 4}.get(vr, 4)
        raw = (value % (1 << (8 * width))).to_bytes(width, "little")
    else:
        raw = str(value).encode("utf-8", errors="surrogatepass")
    if len(raw) % 2:
        raw += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    return raw, False


def _element(tag: int, vr: str, value: Any, implicit: bool, overrides: dict[str, str], undefined: bool) -> bytes:
    raw, undefined_length = _value(vr, value, implicit, overrides, undefined)
    length = _UNDEFINED if undefined_length else len(raw)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", length) + raw
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\x00\x00" + struct.pack("<I", length) + raw
    if length > 0xFFFF:
        raw, length = raw[:0xFFFE], 0xFFFE
    return head + vr.encode() + struct.pack("<H", length) + raw
