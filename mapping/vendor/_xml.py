"""Small XML and value helpers the vendor readers share (no I/O, no patient data in errors).

Why a parser wrapper: inbox files come from a share anyone on the network may write
to, so the XML is parsed with ``defusedxml`` (entity declarations and external
references refused: no billion-laughs, no local file reads), while a plain
``<!DOCTYPE RestingECG SYSTEM "restecg.dtd">`` line, which GE MUSE writes, is
accepted (the DTD is never fetched).
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ecgbridge.errors import DecodeError, WaveformError

__all__ = [
    "parse",
    "split_tag",
    "local",
    "child",
    "children",
    "text",
    "to_float",
    "uid_from_id",
    "hl7_ts",
    "iso_date",
    "VOLT_UNITS_TO_MV",
    "volts_to_mv",
]

#: Voltage unit spellings the formats use (UCUM, MUSE words) -> factor to mV.
VOLT_UNITS_TO_MV: dict[str, float] = {
    "nv": 1e-6,
    "uv": 1e-3,
    "\u00b5v": 1e-3,
    "\u03bcv": 1e-3,
    "mv": 1.0,
    "v": 1e3,
    "nanovolts": 1e-6,
    "microvolts": 1e-3,
    "millivolts": 1.0,
    "volts": 1e3,
    "nanovolt": 1e-6,
    "microvolt": 1e-3,
    "millivolt": 1.0,
    "volt": 1e3,
}


def parse(data: bytes) -> Element:
    """The root element of an XML document, or DecodeError saying why it is not one."""
    if not data or not data.strip():
        raise DecodeError("empty input: 0 bytes of XML")
    try:
        root: Element = SafeET.fromstring(data)
        return root
    except DefusedXmlException as exc:
        raise DecodeError(
            f"XML refused: it declares entities or external references ({type(exc).__name__}); ECG XML needs neither"
        ) from exc
    except ParseError as exc:
        # expat's message is "<what>: line L, column C": positions only, no content.
        raise DecodeError(f"not well-formed XML: {exc}") from exc
    except (ValueError, LookupError) as exc:  # e.g. an unknown encoding declaration
        raise DecodeError(f"XML could not be decoded ({type(exc).__name__}: {exc})") from exc


def split_tag(tag: str) -> tuple[str | None, str]:
    """'{ns}name' -> ('ns', 'name'); 'name' -> (None, 'name')."""
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return None, tag


def local(element: Element) -> str:
    return split_tag(element.tag)[1]


def child(element: Element | None, *names: str) -> Element | None:
    """The first descendant along a path of local names (namespace ignored), or None."""
    current = element
    for name in names:
        if current is None:
            return None
        current = next((c for c in current if local(c) == name), None)
    return current


def children(element: Element | None, name: str) -> list[Element]:
    if element is None:
        return []
    return [c for c in element if local(c) == name]


def text(element: Element | None, *names: str) -> str | None:
    """Stripped text at a path of local names, or None when absent or blank."""
    node = child(element, *names) if names else element
    if node is None or node.text is None:
        return None
    value = node.text.strip()
    return value or None


def to_float(value: str | None, what: str) -> float:
    """A decimal (point or comma) as float; WaveformError naming ``what`` otherwise."""
    if value is None or not value.strip():
        raise WaveformError(f"{what} is missing")
    try:
        number = float(value.strip().replace(",", "."))
    except ValueError:
        raise WaveformError(f"{what} is not a number ({value.strip()[:32]!r})") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise WaveformError(f"{what} is not a finite number")
    return number


def volts_to_mv(unit: str | None) -> float | None:
    """Factor from a voltage unit to mV, None when the unit is absent, KeyError when unknown."""
    if unit is None or not unit.strip():
        return None
    return VOLT_UNITS_TO_MV[unit.strip().lower()]


_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def uid_from_id(root: str | None, extension: str | None = None) -> str | None:
    """A DICOM-style UID (an OID) for a document id, so write-back can stay idempotent.

    An OID is kept; a UUID becomes ``2.25.<its integer>`` (the standard UUID-derived
    UID); root + extension, which only together identify the document, become the
    ``2.25`` form of a name-based UUID (uuid5) of both. None when there is no id.
    """
    root = (root or "").strip()
    extension = (extension or "").strip()
    if not root:
        return None
    if extension:
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, root + '^' + extension).int}"
    if _OID.fullmatch(root) and len(root) <= 64:
        return root
    try:
        return f"2.25.{uuid.UUID(root).int}"
    except ValueError:
        return None


_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d+)?([+-]\d{4})?")


def hl7_ts(value: str | None) -> datetime | None:
    """An HL7 v3 TS (YYYYMMDDHHMMSS[.fff][+ZZZZ]) as datetime; aware only with an offset."""
    if not value:
        return None
    match = _TS.fullmatch(value.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, frac, offset = match.groups()
    try:
        when = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int(round(float(frac) * 1e6)) if frac else 0,
        )
    except ValueError:
        return None
    if offset:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[3:5])
        if hours <= 14 and minutes < 60:
            when = when.replace(tzinfo=timezone(sign * timedelta(hours=hours, minutes=minutes)))
    return when


def iso_date(value: str | None, *formats: str) -> str | None:
    """A date in one of ``formats`` as YYYY-MM-DD, or None when absent or invalid."""
    if not value:
        return None
    for fmt in formats:
        try:
            return datetime.strptime(value.strip(), fmt).date().isoformat()
        except ValueError:
            continue
    return None
