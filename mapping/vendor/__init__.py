"""Vendor ECG XML files -> the canonical :class:`~mapping.ecg.Ecg`.

Why one entry point: an inbox file or an HL7 ED attachment arrives as bytes with no
trustworthy name or MIME type, so the format is recognised from the document's root
element and namespace, never from a file extension:

=================  =====================================  =====================
root element       namespace                              reader
=================  =====================================  =====================
``AnnotatedECG``   ``urn:hl7-org:v3``                     :mod:`.aecg`
``restingecgdata`` ``http://www3.medical.philips.com``    :mod:`.philips`
``RestingECG``     (none)                                 :mod:`.muse`
=================  =====================================  =====================

Each reader raises :class:`~ecgbridge.errors.DecodeError` for bytes that are not
(well-formed) XML, :class:`~ecgbridge.errors.WaveformError` for a document without a
usable rhythm strip and :class:`~ecgbridge.errors.UnsupportedInputError` for XML of
another kind; messages name what is wrong, never patient data.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

from ecgbridge.errors import UnsupportedInputError
from ecgbridge.mapping.ecg import Ecg
from ecgbridge.mapping.vendor._xml import parse, split_tag

__all__ = ["FORMATS", "read_xml", "detect_format", "looks_like_xml"]

#: source_format -> (root element local name, namespace or None).
FORMATS: dict[str, tuple[str, str | None]] = {
    "aecg": ("AnnotatedECG", "urn:hl7-org:v3"),
    "philips": ("restingecgdata", "http://www3.medical.philips.com"),
    "muse": ("RestingECG", None),
}

_BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")


def looks_like_xml(data: bytes) -> bool:
    """Cheap sniff: the bytes start with '<' in UTF-8 or UTF-16 (with or without a BOM)."""
    head = data[:64]
    for bom in _BOMS:
        if head.startswith(bom):
            head = head[len(bom) :]
            break
    if head[:2] in (b"<\x00", b"\x00<"):
        return True
    return head.lstrip(b" \t\r\n").startswith(b"<")


def detect_format(root: Element) -> str | None:
    """'aecg' | 'philips' | 'muse' for a parsed root element, None for other XML."""
    namespace, name = split_tag(root.tag)
    for fmt, (expected_name, expected_ns) in FORMATS.items():
        if name == expected_name and namespace == expected_ns:
            return fmt
    # Philips files written without the default namespace still carry the root name.
    if name == "restingecgdata" and namespace is None:
        return "philips"
    return None


def read_xml(data: bytes) -> Ecg:
    """An ECG XML document (HL7 aECG, Philips Sierra, GE MUSE) -> Ecg in mV."""
    root = parse(data)
    fmt = detect_format(root)
    if fmt == "aecg":
        from ecgbridge.mapping.vendor import aecg

        return aecg.to_ecg(root)
    if fmt == "philips":
        from ecgbridge.mapping.vendor import philips

        return philips.to_ecg(root)
    if fmt == "muse":
        from ecgbridge.mapping.vendor import muse

        return muse.to_ecg(root)
    namespace, name = split_tag(root.tag)
    raise UnsupportedInputError(
        f"XML root element <{name}> (namespace {namespace or 'none'}) is not an ECG format "
        "ecgbridge reads (HL7 aECG AnnotatedECG, Philips Sierra restingecgdata, GE MUSE RestingECG)"
    )
