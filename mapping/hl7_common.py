"""Shared HL7 v2 helpers: MLLP framing, separators, MSH, bytes -> hl7apy message, timestamps, escaping.

Why one module: the MLLP listener and client, the waveform reader, the order reader and
the result writer must agree on how a frame looks, which delimiters a message uses
(:class:`Separators`, read from MSH-1/MSH-2 by :func:`read_header`, the one MSH reader
that works without hl7apy), how bytes become text (MSH-18), how line endings are cleaned
up, how a value is escaped and where an error is located; a private copy in each would
drift.

How a message is read (:func:`read_er7`, :func:`parse_er7`):

1. MLLP framing (0x0B ... 0x1C 0x0D) and a UTF-8 byte order mark are stripped.
2. The bytes are decoded by MSH-18 (HL7 table 0211: ``UNICODE UTF-8``, ``8859/1`` ...
   ``8859/15``, ``ASCII`` and a few more); without MSH-18, UTF-8 and then ISO-8859-1.
   MSH-18 itself is read by hl7apy from the MSH segment decoded as ISO-8859-1, which
   maps every byte and leaves the ASCII header intact in every supported charset.
3. ``\\r\\n`` and ``\\n`` become ``\\r``; empty segments are dropped.
4. **OBX-5 of value types NA, MA and ED is set aside** (:attr:`Er7.deferred`) and a
   placeholder takes its place; hl7apy parses everything else. Reason, measured here:
   hl7apy builds about 6,000 elements per second, so the 60,000 samples of a 10 s
   500 Hz 12-lead ECG cost 12-18 s per message, and strict validation rejects any
   ED payload over 64 kB (MaxLengthReached). Splitting a segment into fields (to find
   OBX-2 and OBX-5) is the only ER7 splitting done outside hl7apy; the NA/MA numbers
   are read by :mod:`mapping.hl7_waveform`, an ED field by hl7apy's ``parse_field``
   (:func:`parse_deferred_field`).

Errors are :class:`~ecgbridge.errors.DecodeError` with messages that name what is wrong
and never carry message content (hl7apy's own text, which may quote values, goes to
``detail``). Where the fault has a place, the error carries an :class:`ErrorLocation`
(read it with :func:`error_location`) for the ACK's ERR-2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import get_message_info, parse_field, parse_segment, parse_segments

from ecgbridge.errors import DecodeError, EcgBridgeError, Hl7Error

__all__ = [
    "CHARSETS",
    "START_BLOCK",
    "END_BLOCK",
    "CARRIAGE_RETURN",
    "FRAME_END",
    "DEFERRED_VALUE_TYPES",
    "Separators",
    "DEFAULT_SEPARATORS",
    "Header",
    "ErrorLocation",
    "Er7",
    "frame",
    "strip_mllp",
    "first_segment",
    "read_header",
    "version_tuple",
    "decode_bytes",
    "python_codec",
    "hl7_charset",
    "read_er7",
    "parse_er7",
    "parse_deferred_field",
    "segments",
    "field_text",
    "component_text",
    "msh_facts",
    "obx_codes",
    "hl7_timestamp",
    "parse_hl7_timestamp",
    "escape",
    "unescape",
    "error_location",
    "with_location",
]

#: MLLP (HL7 v2 Appendix C): a frame is START_BLOCK payload END_BLOCK CARRIAGE_RETURN.
START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
#: The end of a frame as it appears on the wire.
FRAME_END = END_BLOCK + CARRIAGE_RETURN

#: MSH-18 values (HL7 table 0211) -> Python codec. Upper-cased keys; a few common
#: non-standard spellings are accepted as aliases.
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "8859/1": "latin-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "UNICODE UTF-8": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc_kr",
    # aliases some senders use
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO-8859-1": "latin-1",
    "ISO IR100": "latin-1",
    "ISO IR192": "utf-8",
}
_CANONICAL: dict[str, str] = {
    "UTF-8": "UNICODE UTF-8",
    "UTF8": "UNICODE UTF-8",
    "ISO IR192": "UNICODE UTF-8",
    "ISO-8859-1": "8859/1",
    "ISO IR100": "8859/1",
}
#: Python codec -> MSH-18 value, for writers.
_HL7_BY_CODEC: dict[str, str] = {
    "ascii": "ASCII",
    "us-ascii": "ASCII",
    "latin-1": "8859/1",
    "latin1": "8859/1",
    "iso-8859-1": "8859/1",
    "iso8859-1": "8859/1",
    "utf-8": "UNICODE UTF-8",
    "utf8": "UNICODE UTF-8",
    **{f"iso-8859-{n}": f"8859/{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 15)},
    **{f"iso8859-{n}": f"8859/{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 15)},
}
_UNSUPPORTED_CHARSETS = (
    "UNICODE",
    "UNICODE UTF-16",
    "UNICODE UTF-32",
    "ISO IR14",
    "ISO IR87",
    "ISO IR159",
    "CNS 11643-1992",
)

#: OBX value types whose OBX-5 :func:`read_er7` sets aside instead of expanding.
DEFERRED_VALUE_TYPES: frozenset[str] = frozenset({"NA", "MA", "ED"})
_PLACEHOLDER = "ecgbridge-deferred-"

#: Message types whose MSH-9.3 (message structure) older versions leave out.
_STRUCTURE_BY_EVENT: dict[str, str] = {
    "ORU^R01": "ORU_R01",
    "ORU^W01": "ORU_R01",
    "ORM^O01": "ORM_O01",
    "OML^O21": "OML_O21",
    "ADT^A01": "ADT_A01",
    "ADT^A04": "ADT_A01",
    "ADT^A08": "ADT_A01",
    "ADT^A13": "ADT_A01",
    "ADT^A02": "ADT_A02",
    "ADT^A03": "ADT_A03",
    "ADT^A05": "ADT_A05",
    "ADT^A14": "ADT_A05",
    "ADT^A28": "ADT_A05",
    "ADT^A31": "ADT_A05",
    "ADT^A40": "ADT_A39",
    "ACK": "ACK",
}


# ----------------------------------------------------------------------- locations


@dataclass(frozen=True)
class ErrorLocation:
    """Where a fault is, as ERR-2 (ERL) says it: segment id, its occurrence, field..."""

    segment: str
    sequence: int = 1  # 1-based occurrence of this segment id in the message
    field: int | None = None
    repetition: int | None = None
    component: int | None = None

    def er7(self, component_separator: str = "^") -> str:
        """ERL as ER7 text, e.g. ``OBX^3^5``."""
        parts = [self.segment, str(self.sequence)]
        for value in (self.field, self.repetition, self.component):
            if value is None:
                break
            parts.append(str(value))
        return component_separator.join(parts)


_LOCATION_ATTR = "hl7_location"


def with_location(exc: EcgBridgeError, location: ErrorLocation | None) -> EcgBridgeError:
    """Attach ``location`` to ``exc`` (for the ACK's ERR segment) and return it."""
    if location is not None:
        setattr(exc, _LOCATION_ATTR, location)
    return exc


def error_location(exc: BaseException) -> ErrorLocation | None:
    """The :class:`ErrorLocation` an ecgbridge HL7 error carries, if any."""
    location = getattr(exc, _LOCATION_ATTR, None)
    return location if isinstance(location, ErrorLocation) else None


# ---------------------------------------------------------------- separators and MSH


@dataclass(frozen=True)
class Separators:
    """The delimiters of one message: MSH-1 and MSH-2 (``|^~\\&``, from v2.7 maybe a truncation character)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None

    @property
    def msh2(self) -> str:
        """MSH-2 as written: component, repetition, escape, subcomponent (and truncation)."""
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")

    def hl7apy(self) -> dict[str, str]:
        """As hl7apy's ``encoding_chars`` dict, the form its API takes."""
        chars = {
            "FIELD": self.field,
            "COMPONENT": self.component,
            "REPETITION": self.repetition,
            "ESCAPE": self.escape,
            "SUBCOMPONENT": self.subcomponent,
            "GROUP": "\r",
            "SEGMENT": "\r",
        }
        if self.truncation:
            chars["TRUNCATION"] = self.truncation
        return chars

    @classmethod
    def of(cls, chars: Separators | str | Mapping[str, str]) -> Separators:
        """From hl7apy's ``encoding_chars`` dict or MSH-2 text (``^~\\&``, field ``|``)."""
        if isinstance(chars, Separators):
            return chars
        if isinstance(chars, Mapping):
            return cls(
                chars["FIELD"],
                chars["COMPONENT"],
                chars["REPETITION"],
                chars["ESCAPE"],
                chars["SUBCOMPONENT"],
                chars.get("TRUNCATION"),
            )
        if len(chars) < 4:
            raise ValueError(f"MSH-2 needs 4 encoding characters, got {chars!r}")
        return cls("|", chars[0], chars[1], chars[2], chars[3], chars[4] if len(chars) > 4 else None)


DEFAULT_SEPARATORS = Separators()


def _separators_from(field_sep: str, msh2: str, version: tuple[int, ...]) -> Separators | None:
    """The separators of MSH-1 and MSH-2, or None when they are unusable."""
    allowed_len = (4, 5) if version >= (2, 7) else (4,)
    chars = field_sep + msh2
    if len(msh2) not in allowed_len or len(set(chars)) != len(chars):
        return None
    if not all(_delimiter(c) for c in chars):
        return None
    return Separators(field_sep, msh2[0], msh2[1], msh2[2], msh2[3], msh2[4] if len(msh2) == 5 else None)


def _delimiter(char: str) -> bool:
    """A usable delimiter: printable ASCII, not a letter or digit. A byte above 0x7E would not
    survive the ACK: it is written in the ACK's character set (two bytes in UTF-8)."""
    return "!" <= char <= "~" and not char.isalnum()


def version_tuple(text: str) -> tuple[int, ...]:
    """An HL7 version id as numbers (``2.5.1`` -> (2, 5, 1)); () when it holds none."""
    parts = re.findall(r"\d+", text.split("^", 1)[0])
    return tuple(int(p) for p in parts[:3]) if parts else ()


@dataclass(frozen=True)
class Header:
    """MSH read without hl7apy, so that even a message hl7apy refuses can be answered.

    ``parts[n - 1]`` is MSH-n for n >= 2 (``parts[0]`` is "MSH"); values are raw ER7.
    """

    parts: tuple[str, ...]
    separators: Separators
    #: False when MSH-2 was unusable: ``separators`` are then the default ones.
    trusted: bool = True

    def raw(self, n: int) -> str:
        if n == 1:
            return self.separators.field
        return self.parts[n - 1] if n - 1 < len(self.parts) else ""

    def component(self, n: int, c: int = 1) -> str:
        value = self.raw(n).split(self.separators.repetition, 1)[0]
        comps = value.split(self.separators.component)
        return comps[c - 1].strip() if c - 1 < len(comps) else ""

    @property
    def control_id(self) -> str:
        return self.raw(10).strip()

    @property
    def version(self) -> str:
        return self.component(12)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return version_tuple(self.version)

    @property
    def message_type(self) -> str:
        """TYPE^EVENT, e.g. ORU^R01 (empty parts left empty)."""
        return f"{self.component(9, 1).upper()}^{self.component(9, 2).upper()}"

    @property
    def charset(self) -> str:
        return self.raw(18).split(self.separators.repetition, 1)[0].strip().upper()

    @property
    def enhanced(self) -> bool:
        return bool(self.component(15) or self.component(16))


def read_header(text: str) -> Header:
    """Locate MSH and split it on its own separators; :class:`Hl7Error` 100 / 102 without a usable one."""
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7Error("the message does not start with an MSH segment", code=100, location=("MSH", 1))
    sep = text[3]
    if not _delimiter(sep):
        raise Hl7Error("MSH-1 field separator is missing or invalid", code=102, location=("MSH", 1, 1))
    parts = tuple(first_segment(text).split(sep))
    version = version_tuple(parts[11]) if len(parts) > 11 else ()
    separators = _separators_from(sep, parts[1] if len(parts) > 1 else "", version or (2, 5))
    if separators is None:
        fallback = Separators(field=sep) if sep not in "^~\\&" else DEFAULT_SEPARATORS
        return Header(parts, fallback, trusted=False)
    return Header(parts, separators)


def first_segment(data: bytes | str) -> str:
    """The first segment (MSH) as text: up to the first CR or LF, after any leading byte
    order mark, NUL or white space.

    Bytes are decoded byte for byte (ISO 8859-1): MSH is ASCII in every character set we read.
    """
    if isinstance(data, str):
        return re.split(r"[\r\n]", data.lstrip("\ufeff\x00 \t\r\n"), maxsplit=1)[0]
    return re.split(rb"[\r\n]", data.lstrip(b"\xef\xbb\xbf\x00 \t\r\n"), maxsplit=1)[0].decode("latin-1")


# ------------------------------------------------------------------------ decoding


def frame(payload: bytes) -> bytes:
    """Wrap one message in an MLLP block."""
    return START_BLOCK + payload + FRAME_END


def strip_mllp(raw: bytes) -> bytes:
    """``raw`` without MLLP framing; a frame marker inside the message is a DecodeError."""
    data = raw.strip(b" \t\r\n")
    if data.startswith(START_BLOCK):
        data = data[1:]
    if data.endswith(END_BLOCK):
        data = data[:-1]
    for marker, name in ((START_BLOCK, "0x0B (start block)"), (END_BLOCK, "0x1C (end block)")):
        pos = data.find(marker)
        if pos >= 0:
            raise DecodeError(f"MLLP {name} inside the message at byte {pos}: more than one frame?")
    return data


def python_codec(charset: str) -> str:
    """The Python codec for an MSH-18 value (``8859/1`` -> ``latin-1``)."""
    key = charset.strip().upper()
    if key in CHARSETS:
        return CHARSETS[key]
    if key in _UNSUPPORTED_CHARSETS:
        raise DecodeError(
            f"MSH-18 character set {charset!r} is not supported (16/32-bit and ISO 2022 "
            f"encodings do not survive MLLP framing); use UNICODE UTF-8 or 8859/1"
        )
    raise DecodeError(
        f"MSH-18 character set {charset!r} is not an HL7 table 0211 value ecgbridge reads "
        f"(accepted: {', '.join(k for k in CHARSETS if k not in _CANONICAL)})"
    )


def hl7_charset(encoding: str) -> str:
    """The MSH-18 value for a Python codec or an HL7 name (``UTF-8`` -> ``UNICODE UTF-8``)."""
    key = encoding.strip()
    if key.upper() in CHARSETS:
        return _CANONICAL.get(key.upper(), key.upper())
    try:
        return _HL7_BY_CODEC[key.lower()]
    except KeyError:
        raise ValueError(f"no HL7 table 0211 character set for encoding {encoding!r}") from None


def _preview(data: bytes) -> str:
    return repr(data[:8])


def decode_bytes(raw: bytes | str) -> tuple[str, str]:
    """Bytes (MLLP-framed or not) -> (text, MSH-18 charset used), decoded by MSH-18.

    Without MSH-18: UTF-8, else ISO-8859-1 (which decodes any byte). Text input is only
    unframed; its charset is the declared one (or ``UNICODE UTF-8``).
    """
    if isinstance(raw, str):
        text = raw.strip(" \t\r\n").lstrip("\ufeff\x0b").rstrip("\x1c\r\n ")
        _check_msh(text[:8].encode("latin-1", errors="replace"))
        declared = _msh18(first_segment(text))
        return text, (_canonical_charset(declared) if declared else "UNICODE UTF-8")
    data = strip_mllp(raw)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    _check_msh(data)
    declared = _msh18(first_segment(data))
    if declared:
        try:
            codec = python_codec(declared)
        except DecodeError as exc:
            raise with_location(exc, ErrorLocation("MSH", 1, 18)) from None
        charset = _canonical_charset(declared)
        try:
            return data.decode(codec), charset
        except UnicodeDecodeError as exc:
            raise with_location(
                DecodeError(
                    f"MSH-18 declares {declared} but byte 0x{data[exc.start]:02X} at offset "
                    f"{exc.start} is not valid {charset}"
                ),
                ErrorLocation("MSH", 1, 18),
            ) from exc
    try:
        return data.decode("utf-8"), "UNICODE UTF-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "8859/1"


def _check_msh(head: bytes) -> None:
    if not head:
        raise DecodeError("empty input: 0 bytes is not an HL7 v2 message")
    if not head.startswith(b"MSH"):
        raise DecodeError(f"not an HL7 v2 message: does not start with MSH (starts with {_preview(head)})")


def _canonical_charset(declared: str) -> str:
    key = declared.strip().upper()
    return _CANONICAL.get(key, key)


def _msh18(msh: str) -> str | None:
    """MSH-18 (first repetition, unescaped) of an MSH segment; None when empty.

    hl7apy checks the encoding characters (as it will when parsing the message), so a
    message it cannot read fails here, before it is decoded, with the MSH-2 location.
    """
    encoding, _message_structure, _version = _message_info(msh)
    separators = Separators.of(encoding)
    header = Header(tuple(msh.split(separators.field)), separators)
    value = unescape(header.raw(18).split(separators.repetition, 1)[0], separators).strip()
    return value or None


def _message_info(text: str) -> Any:
    """hl7apy's (encoding chars, structure, version) of a message; DecodeError at MSH-2 when it cannot tell."""
    try:
        return get_message_info(text)
    except (HL7apyException, IndexError) as exc:
        # hl7apy reads MSH-12 unchecked when MSH-2 holds 5 characters: a short MSH is an IndexError there
        reason = _safe_reason(exc) if isinstance(exc, HL7apyException) else "5 encoding characters but no MSH-12"
        raise with_location(
            DecodeError(f"MSH segment is malformed: {reason}", detail=str(exc)), ErrorLocation("MSH", 1, 2)
        ) from exc


def _safe_reason(exc: BaseException) -> str:
    """hl7apy's message, except where it quotes a value (MaxLengthReached)."""
    from hl7apy.exceptions import MaxLengthReached

    if isinstance(exc, MaxLengthReached):
        return f"a value is longer than its maximum length {exc.limit}"
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else type(exc).__name__


# ------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Er7:
    """A parsed message plus what :func:`read_er7` set aside and learnt on the way."""

    message: Message
    #: The decoded, normalised ER7 text (``\\r`` separators), deferred values included.
    text: str
    #: The character set used to decode the bytes (MSH-18 spelling).
    charset: str
    #: Placeholder -> original OBX-5 ER7 text, for OBX value types NA, MA and ED.
    deferred: Mapping[str, str] = field(default_factory=dict)
    #: Segment ids in wire order, as the text has them.
    segment_ids: tuple[str, ...] = ()
    #: Segments hl7apy did not place in the message structure (find_groups only).
    dropped: tuple[str, ...] = ()
    #: The message's delimiters (MSH-1, MSH-2).
    separators: Separators = DEFAULT_SEPARATORS

    def deferred_value(self, obx: Segment) -> str | None:
        """The original OBX-5 text of a deferred OBX, or None when it was not deferred."""
        placeholder = field_text(obx, 5, raw=True)
        return self.deferred.get(placeholder or "")


def read_er7(
    raw: bytes | str,
    *,
    validate: bool = False,
    validate_as: str | None = None,
    find_groups: bool = True,
) -> Er7:
    """Decode, normalise and parse a message with hl7apy; see the module docstring.

    ``validate``: hl7apy strict level plus ``Message.validate()`` (segment order and
    cardinality in the message structure, required fields, data types of the fields
    hl7apy knows) against the definitions of ``validate_as`` (default: the MSH-12
    version), and no segment left outside the structure. Failures are DecodeError with
    an :class:`ErrorLocation` where hl7apy lets us find one.
    ``find_groups=False`` keeps every segment as a direct child of the message in wire
    order (hl7apy otherwise silently drops segments that fit nowhere, e.g. Z-segments).
    """
    text, charset = decode_bytes(raw)
    text = _normalise(text)
    encoding, structure, version = _message_info(text)
    separators = Separators.of(encoding)
    seg_texts = text.split("\r")
    segment_ids = tuple(s[:3] for s in seg_texts)
    _check_segment_ids(seg_texts, separators.field)
    parse_text, deferred = _defer(seg_texts, separators.field)
    if not version:
        raise with_location(DecodeError("MSH-12 (version id) is empty"), ErrorLocation("MSH", 1, 12))
    from hl7apy import SUPPORTED_LIBRARIES

    target = (validate_as or version) if validate else version
    if target not in SUPPORTED_LIBRARIES:
        raise with_location(
            DecodeError(f"HL7 version {target!r} is not one ecgbridge reads (hl7apy definitions: 2.1-2.8.2)"),
            ErrorLocation("MSH", 1, 12),
        )
    structure = _structure(structure)
    level = VALIDATION_LEVEL.STRICT if validate else VALIDATION_LEVEL.TOLERANT
    message = _parse(parse_text, target, encoding, structure, level, find_groups or validate, validate)
    placed = tuple(s.name for s in segments(message))
    dropped = _dropped(segment_ids, placed)
    if validate:
        if any(not seg.startswith("Z") for seg in dropped):
            index = _first_dropped_index(segment_ids, placed)
            seg = segment_ids[index]
            raise with_location(
                DecodeError(
                    f"segment {index + 1} ({seg}) does not fit the {structure or 'message'} structure of HL7 {target}"
                ),
                ErrorLocation(seg, segment_ids[: index + 1].count(seg)),
            )
        try:
            message.validate()
        except HL7apyException as exc:
            raise with_location(
                DecodeError(f"HL7 {target} validation failed: {_safe_reason(exc)}", detail=str(exc)),
                _location_from_validation(str(exc)),
            ) from exc
    return Er7(
        message=message,
        text=text,
        charset=charset,
        deferred=deferred,
        segment_ids=segment_ids,
        dropped=dropped,
        separators=separators,
    )


def parse_er7(raw: bytes | str, *, validate: bool = False) -> Message:
    """Bytes or text -> hl7apy Message (see :func:`read_er7`; NA/MA/ED OBX-5 deferred).

    The returned message holds a placeholder in OBX-5 of NA, MA and ED OBX segments;
    use :func:`read_er7` when those values are needed.
    """
    return read_er7(raw, validate=validate).message


def parse_deferred_field(er7: Er7, obx: Segment) -> list[Any]:
    """hl7apy Field objects (one per repetition) for a deferred OBX-5 (e.g. an ED value)."""
    value = er7.deferred_value(obx)
    if value is None:
        return [f for f in obx.children if f.name == "OBX_5"]
    encoding = er7.message.encoding_chars
    version = er7.message.version
    return [
        parse_field(
            rep, name="OBX_5", version=version, encoding_chars=encoding, validation_level=VALIDATION_LEVEL.TOLERANT
        )
        for rep in value.split(er7.separators.repetition)
    ]


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    return "\r".join(s for s in text.split("\r") if s.strip())


def _check_segment_ids(seg_texts: list[str], field_sep: str) -> None:
    for index, seg in enumerate(seg_texts):
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", seg[:3]) or (len(seg) > 3 and seg[3] != field_sep):
            raise with_location(
                DecodeError(
                    f"segment {index + 1} does not start with a segment id and a field separator {field_sep!r}"
                ),
                ErrorLocation(re.sub(r"[^A-Z0-9]", "?", seg[:3].upper()) or "???", 1),
            )


def _defer(seg_texts: list[str], field_sep: str) -> tuple[str, dict[str, str]]:
    """Replace OBX-5 of NA/MA/ED segments by placeholders; return (text, deferred)."""
    deferred: dict[str, str] = {}
    out: list[str] = []
    for seg in seg_texts:
        if seg.startswith("OBX" + field_sep):
            parts = seg.split(field_sep, 6)
            if len(parts) >= 6 and parts[2].strip().upper() in DEFERRED_VALUE_TYPES and parts[5]:
                key = f"{_PLACEHOLDER}{len(deferred)}"
                deferred[key] = parts[5]
                parts[5] = key
                seg = field_sep.join(parts)
        out.append(seg)
    return "\r".join(out), deferred


def _structure(structure: str | None) -> str | None:
    """MSH-9.3, else the structure the event implies (ADT_A08 -> ADT_A01), as hl7apy names it."""
    if not structure:
        return None
    return _STRUCTURE_BY_EVENT.get(structure.replace("_", "^", 1), structure)


def _parse(
    text: str,
    version: str,
    encoding: dict[str, str],
    structure: str | None,
    level: int,
    find_groups: bool,
    strict: bool,
) -> Message:
    from hl7apy.exceptions import InvalidName

    try:
        try:
            message = Message(name=structure, version=version, validation_level=level, encoding_chars=encoding)
        except InvalidName:
            if strict:
                raise with_location(
                    DecodeError(f"message structure {structure!r} (MSH-9) is not defined in HL7 {version}"),
                    ErrorLocation("MSH", 1, 9),
                ) from None
            message = Message(version=version, validation_level=level, encoding_chars=encoding)
        reference = message.reference if message.name else None
        message.children = parse_segments(
            text, version, encoding, level, reference, find_groups and reference is not None
        )
    except DecodeError:
        raise
    except Exception as exc:
        where = _locate_parse_error(text, version, encoding, level)
        reason = _safe_reason(exc) if isinstance(exc, HL7apyException) else type(exc).__name__
        if where is not None and where.field is not None:
            what = (
                f"{where.segment}-{where.field} (segment occurrence {where.sequence}) is not a "
                f"valid value for HL7 {version}"
            )
        elif where is not None:
            what = f"{where.segment} segment (occurrence {where.sequence}) could not be parsed in HL7 {version}"
        else:
            what = f"HL7 {version} message could not be parsed"
        raise with_location(DecodeError(f"{what} ({reason})", detail=str(exc)), where) from exc
    return message


def _locate_parse_error(text: str, version: str, encoding: dict[str, str], level: int) -> ErrorLocation | None:
    """Re-parse segment by segment, then field by field, to find what hl7apy refused."""
    separators = Separators.of(encoding)
    counts: dict[str, int] = {}
    for seg in text.split("\r"):
        name = seg[:3]
        counts[name] = counts.get(name, 0) + 1
        try:
            parse_segment(seg, version=version, encoding_chars=encoding, validation_level=level)
            continue
        except Exception:
            pass
        fields = seg.split(separators.field)
        # MSH-1 is the separator itself, so MSH's split starts at MSH-2.
        first = 2 if name == "MSH" else 1
        for number, value in enumerate(fields[1:], start=first):
            for rep in value.split(separators.repetition) if number != 2 or name != "MSH" else [value]:
                try:
                    if rep:
                        parse_field(
                            rep,
                            name=f"{name}_{number}",
                            version=version,
                            encoding_chars=encoding,
                            validation_level=level,
                        )
                except Exception:
                    return ErrorLocation(name, counts[name], number)
        return ErrorLocation(name, counts[name])
    return None


def _location_from_validation(text: str) -> ErrorLocation | None:
    """ERR location from hl7apy's 'Missing required child OBR.OBR_27'-style messages."""
    match = re.search(r"\b([A-Z][A-Z0-9]{2})_(\d+)\b", text)
    if match:
        return ErrorLocation(match.group(1), 1, int(match.group(2)))
    match = re.search(r"\.([A-Z][A-Z0-9]{2})\b", text)
    if match:
        return ErrorLocation(match.group(1), 1)
    return None


def _dropped(wire: tuple[str, ...], placed: tuple[str, ...]) -> tuple[str, ...]:
    remaining = list(placed)
    dropped: list[str] = []
    for seg in wire:
        if remaining and remaining[0] == seg:
            remaining.pop(0)
        else:
            dropped.append(seg)
    return tuple(dropped)


def _first_dropped_index(wire: tuple[str, ...], placed: tuple[str, ...]) -> int:
    """Index of the first segment (other than a Z-segment) hl7apy left out."""
    j = 0
    for i, seg in enumerate(wire):
        if j < len(placed) and placed[j] == seg:
            j += 1
        elif not seg.startswith("Z"):
            return i
    return len(wire) - 1


# ------------------------------------------------------------------------ reading


def segments(message: Any) -> list[Segment]:
    """Every segment of a message (or group), depth first, i.e. in wire order."""
    out: list[Segment] = []
    stack: Iterator[Any] = iter(message.children)
    pending: list[Iterator[Any]] = []
    while True:
        for child in stack:
            if child.classname == "Segment":
                out.append(child)
            else:
                pending.append(stack)
                stack = iter(child.children)
                break
        else:
            if not pending:
                return out
            stack = pending.pop()


def _position(child: Any, index: int) -> int:
    match = re.search(r"_(\d+)$", child.name or "")
    return int(match.group(1)) if match else index


def _child_at(element: Any, number: int) -> Any | None:
    for index, child in enumerate(element.children, start=1):
        if _position(child, index) == number:
            return child
    return None


def field_text(
    segment: Segment,
    number: int,
    component: int = 1,
    subcomponent: int = 1,
    *,
    rep: int = 0,
    raw: bool = False,
) -> str | None:
    """Unescaped text of SEG-number[rep].component.subcomponent; None when empty or ``""``.

    ``raw=True`` returns the whole repetition's ER7 text (escaped, separators kept).
    """
    reps = [f for f in segment.children if f.name == f"{segment.name}_{number}"]
    if rep >= len(reps):
        return None
    fld = reps[rep]
    if raw:
        value = fld.to_er7()
        return value or None
    if number <= 2 and segment.name == "MSH":
        return str(fld.to_er7()) if number == 2 else str(segment.encoding_chars["FIELD"])
    return component_text(fld, component, subcomponent)


def component_text(
    fld: Any,
    component: int = 1,
    subcomponent: int = 1,
    *,
    encoding: Separators | Mapping[str, str] | None = None,
) -> str | None:
    """Unescaped text of one component (and subcomponent) of an hl7apy Field.

    Pass the message's separators as ``encoding`` when calling this in a loop: hl7apy
    finds them by walking up the tree on every call.
    """
    comp = _child_at(fld, component)
    if comp is None:
        return None
    target = _child_at(comp, subcomponent) if comp.children else (comp if subcomponent == 1 else None)
    if target is None:
        return None
    separators = Separators.of(encoding if encoding is not None else fld.encoding_chars)
    text = unescape(target.to_er7(separators.hl7apy()), separators).strip()
    return None if text in ("", '""') else text


def msh_facts(message: Message) -> dict[str, str | None]:
    """The MSH fields routing, storage and the ACK need, as plain strings (None: empty)."""
    msh = next((s for s in segments(message) if s.name == "MSH"), None)
    if msh is None:
        raise DecodeError("message has no MSH segment")

    def hd(number: int) -> str | None:
        return field_text(msh, number, 1) or field_text(msh, number, 2)

    msg_type = field_text(msh, 9, 1)
    event = field_text(msh, 9, 2)
    return {
        "sending_application": hd(3),
        "sending_facility": hd(4),
        "receiving_application": hd(5),
        "receiving_facility": hd(6),
        "message_type": "^".join(p for p in (msg_type, event) if p) or None,
        "message_structure": field_text(msh, 9, 3),
        "control_id": field_text(msh, 10),
        "processing_id": field_text(msh, 11),
        "version": field_text(msh, 12),
        "field_separator": message.encoding_chars["FIELD"],
        "encoding_characters": field_text(msh, 2),
        "charset": field_text(msh, 18),
        "accept_ack_type": field_text(msh, 15),
        "application_ack_type": field_text(msh, 16),
    }


def obx_codes(message: Message) -> tuple[str, ...]:
    """OBX-3.1 of every OBX, first occurrence order, without repeats (for routing)."""
    codes: list[str] = []
    for seg in segments(message):
        if seg.name == "OBX":
            code = field_text(seg, 3, 1)
            if code and code not in codes:
                codes.append(code)
    return tuple(codes)


# --------------------------------------------------------------------- timestamps

_TS = re.compile(
    r"(?P<y>\d{4})(?:(?P<mo>\d{2})(?:(?P<d>\d{2})(?:(?P<h>\d{2})(?:(?P<mi>\d{2})"
    r"(?:(?P<s>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?)?)?)?(?P<tz>[+-]\d{4})?"
)


def hl7_timestamp(dt: datetime, *, naive_ok: bool = False) -> str:
    """``YYYYMMDDHHMMSS[.SSSS]+ZZZZ``; a naive datetime is refused unless ``naive_ok``.

    Why refuse: a receiver cannot tell which local time a bare timestamp meant. With
    ``naive_ok`` it is written without offset (HL7: the sender's local time).
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        if not naive_ok:
            raise ValueError("naive datetime: give a timezone so the HL7 timestamp carries an offset")
        offset = ""
    else:
        minutes = int(dt.utcoffset().total_seconds() // 60)  # type: ignore[union-attr]
        sign = "-" if minutes < 0 else "+"
        offset = f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    text = dt.strftime("%Y%m%d%H%M%S")
    if dt.microsecond:
        text += f".{dt.microsecond // 100:04d}"
    return text + offset


def parse_hl7_timestamp(text: str | None) -> datetime | None:
    """An HL7 TS/DTM -> datetime (aware when it has an offset); None when empty.

    Missing month/day default to 1, missing time to midnight. Raises ValueError when
    the text is not a DTM.
    """
    if text is None or not text.strip() or text.strip() == '""':
        return None
    value = text.strip()
    match = _TS.fullmatch(value)
    if not match:
        raise ValueError(f"not an HL7 timestamp (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]): {value[:40]!r}")
    g = match.groupdict()
    fraction = g["f"] or ""
    micro = int(fraction.ljust(6, "0")) if fraction else 0
    tz = None
    if g["tz"]:
        sign = -1 if g["tz"][0] == "-" else 1
        hours, minutes = int(g["tz"][1:3]), int(g["tz"][3:5])
        if hours > 14 or minutes >= 60:
            raise ValueError(f"timestamp offset {g['tz']} is out of range")
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    return datetime(
        int(g["y"]),
        int(g["mo"] or 1),
        int(g["d"] or 1),
        int(g["h"] or 0),
        int(g["mi"] or 0),
        int(g["s"] or 0),
        micro,
        tzinfo=tz,
    )


# ----------------------------------------------------------------------- escaping


def escape(text: str, encoding_chars: Separators | str | Mapping[str, str] = DEFAULT_SEPARATORS) -> str:
    """``text`` as a literal ER7 value: delimiters as \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ (\\P\\), CR/LF as hex.

    ``encoding_chars``: :class:`Separators`, MSH-2 text (``^~\\&``) or hl7apy's dict.
    """
    seps = Separators.of(encoding_chars)
    esc = seps.escape
    out = text.replace(esc, f"{esc}E{esc}")
    pairs = [
        (seps.field, "F"),
        (seps.component, "S"),
        (seps.subcomponent, "T"),
        (seps.repetition, "R"),
        (seps.truncation, "P"),
    ]
    for char, code in pairs:
        if char:
            out = out.replace(char, f"{esc}{code}{esc}")
    return out.replace("\r", f"{esc}X0D{esc}").replace("\n", f"{esc}X0A{esc}")


def unescape(text: str, encoding_chars: Separators | str | Mapping[str, str] = DEFAULT_SEPARATORS) -> str:
    """ER7 value text -> literal text: \\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\P\\ \\Xhh\\ \\.br\\; \\H\\ \\N\\ \\Z..\\ \\C..\\ \\M..\\ dropped."""
    seps = Separators.of(encoding_chars)
    esc = seps.escape
    if esc not in text:
        return text
    simple = {
        "F": seps.field,
        "S": seps.component,
        "T": seps.subcomponent,
        "R": seps.repetition,
        "E": esc,
        "P": seps.truncation or "#",
        "H": "",
        "N": "",
        ".br": "\n",
    }
    pattern = re.compile(re.escape(esc) + r"([^" + re.escape(esc) + r"]*)" + re.escape(esc))

    def repl(match: re.Match[str]) -> str:
        code = match.group(1)
        if code in simple:
            return simple[code]
        if code[:1] == "X" and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", code[1:]):
            data = bytes.fromhex(code[1:])
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:
                return data.decode("latin-1")
        if code[:1] in ("Z", "C", "M") or code.startswith("."):
            return ""
        return match.group(0)

    return pattern.sub(repl, text)
