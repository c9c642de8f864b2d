"""HL7 v2 receiver rules: the MSH checks, what we take, and the ACK / ERR we answer with.

Why in mapping (pure: text and bytes in, text and bytes out): the rules an inbound
message is held to and how it is answered are HL7, not I/O. The gateway's handler
(``gateway.hl7_inbound``) stores, records and routes; it asks this module whether a
message is acceptable and what to answer, and tests can check every rule without a store.

Acknowledgment modes. Original mode (MSH-15 and MSH-16 both empty): MSA-1 AA / AE / AR.
Enhanced mode (either valued): the accept acknowledgment only, CA / CE / CR (mapped one
to one from AA / AE / AR), when MSH-15 asks for it (AL or empty: always; NE: never; ER:
only CE / CR; SU: only CA); our ACK sets MSH-15 / MSH-16 to NE so that nobody
acknowledges the acknowledgment. The ACK's layout follows the sender's version.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from hl7apy.exceptions import HL7apyException

from ecgbridge.errors import DecodeError, Hl7Error
from ecgbridge.mapping.hl7_common import (
    CHARSETS,
    DEFAULT_SEPARATORS,
    ErrorLocation,
    Header,
    Separators,
    decode_bytes,
    error_location,
    escape,
    field_text,
    first_segment,
    python_codec,
    read_er7,
    read_header,
    version_tuple,
)

__all__ = [
    "ERROR_CODES",
    "SUPPORTED_MESSAGES",
    "Location",
    "sniff_header",
    "ack_codec",
    "validate_header",
    "classify",
    "decode_message",
    "new_control_id",
    "build_ack",
    "encode_ack",
    "parse_segments",
    "decode_failure",
    "erl",
    "named",
    "raw_field",
    "first_component",
]

#: HL7 table 0357 (message error condition codes) used in ERR-3 / ELD-4.
ERROR_CODES: dict[int, str] = {
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    207: "Application internal error",
}

#: MSH-9 type -> the events we take.
SUPPORTED_MESSAGES: dict[str, frozenset[str]] = {
    "ORU": frozenset({"R01"}),
    "ORM": frozenset({"O01"}),
    "OML": frozenset({"O21"}),
    "ADT": frozenset({"A01", "A04", "A08"}),
}
_DEFAULT_VERSION = "2.5.1"
_USER_MESSAGE_MAX = 200

Location = tuple[Any, ...]  # (segment id, sequence, field, field repetition, component)


# ----- MSH ------------------------------------------------------------------------------
def sniff_header(raw: bytes) -> Header | None:
    """MSH from raw bytes: enough to answer whatever the rest holds; None without one."""
    try:
        return read_header(first_segment(raw))
    except Hl7Error:
        return None


def ack_codec(header: Header | None) -> str:
    """The codec the ACK is written in: the sender's MSH-18 (UTF-8 when absent or unknown)."""
    if header is not None and header.charset in CHARSETS:
        return python_codec(header.charset)
    return "utf-8"


def validate_header(header: Header) -> None:
    """The MSH checks every message must pass before its type is looked at."""
    if not header.trusted:
        raise Hl7Error("MSH-2 encoding characters are missing, duplicated or invalid", code=102, location=("MSH", 1, 2))
    if not header.component(9, 1):
        raise Hl7Error("MSH-9 message type is missing", code=101, location=("MSH", 1, 9))
    if not header.control_id:
        raise Hl7Error("MSH-10 message control id is missing", code=101, location=("MSH", 1, 10))
    if not header.version:
        raise Hl7Error("MSH-12 version id is missing", code=101, location=("MSH", 1, 12))
    from hl7apy import SUPPORTED_LIBRARIES

    if header.version not in SUPPORTED_LIBRARIES:
        raise Hl7Error(
            f"HL7 version {header.version[:16]!r} is not supported (2.1 to 2.8.2 are)",
            code=203,
            location=("MSH", 1, 12),
        )
    if header.charset and header.charset not in CHARSETS:
        raise Hl7Error(
            f"MSH-18 character set {header.charset[:20]!r} is not supported (UNICODE UTF-8, "
            "ASCII, 8859/1 ... 8859/15 are)",
            code=103,
            location=("MSH", 1, 18),
        )


def classify(header: Header) -> str:
    """The kind of message (ORU, ORM, OML, ADT); raises 200 / 201 for what we do not take."""
    kind, event = header.component(9, 1).upper(), header.component(9, 2).upper()
    if kind not in SUPPORTED_MESSAGES:
        raise Hl7Error(
            f"unsupported message type {kind[:8]!r}: this receiver takes ORU^R01, ORM^O01, OML^O21 and ADT^A01/A04/A08",
            code=200,
            location=("MSH", 1, 9, 1, 1),
            kind="unsupported_message_type",
        )
    if event not in SUPPORTED_MESSAGES[kind]:
        raise Hl7Error(
            f"unsupported event {event[:8]!r} for {kind}: this receiver takes "
            f"{', '.join(kind + '^' + e for e in sorted(SUPPORTED_MESSAGES[kind]))}",
            code=201,
            location=("MSH", 1, 9, 1, 2),
            kind="unsupported_message_type",
        )
    return kind


# ----- character sets ---------------------------------------------------------------------
def decode_message(raw: bytes, header: Header | None) -> tuple[str, str, list[str]]:
    """Bytes -> (text with \\r segment terminators, Python codec, flags), honouring MSH-18.

    Decoding is ``mapping.hl7_common.decode_bytes`` (the worker reads the stored bytes
    the same way); we add the flag for a guessed charset and the ERR location.
    """
    try:
        text, charset = decode_bytes(raw)
    except DecodeError as exc:
        where = error_location(exc)
        raise Hl7Error(
            str(exc), code=102, location=erl(where) if where else ("MSH", 1, 18), kind="DecodeError"
        ) from exc
    declared = header.charset if header is not None else ""
    flags = ["charset_assumed:8859/1"] if not declared and charset == "8859/1" else []
    return text.replace("\r\n", "\r").replace("\n", "\r"), python_codec(charset), flags


# ----- the ACK ----------------------------------------------------------------------------
def _timestamp(now: datetime | None = None) -> str:
    """HL7 TS with milliseconds and the UTC offset: YYYYMMDDHHMMSS.sss+ZZZZ."""
    now = (now or datetime.now()).astimezone()
    return now.strftime("%Y%m%d%H%M%S") + f".{now.microsecond // 1000:03d}" + now.strftime("%z")


def new_control_id() -> str:
    """A fresh MSH-10 (20 characters: the ST length limit up to v2.6)."""
    return uuid.uuid4().hex[:20].upper()


_ENHANCED = {"AA": "CA", "AE": "CE", "AR": "CR"}


def _should_send(condition: str, code: str) -> bool:
    """MSH-15 rules for the accept acknowledgment (table 0155)."""
    if condition == "NE":
        return False
    if condition == "ER":
        return code != "CA"
    if condition == "SU":
        return code == "CA"
    return True  # AL, empty or unknown: always


def build_ack(
    header: Header | None,
    code: str,
    error: Hl7Error | None = None,
    *,
    now: datetime | None = None,
    control_id: str | None = None,
) -> str | None:
    """The ACK for ``header`` (None: no usable MSH), ER7 with \\r terminators.

    ``code`` is the original-mode code (AA / AE / AR); in enhanced mode it becomes
    CA / CE / CR and None is returned when MSH-15 says not to acknowledge.
    Values copied from the inbound MSH stay raw ER7 (same delimiters); our own text
    is escaped. The layout follows the sender's version (MSH-9 with or without the
    structure, ERR-2..8 from v2.5, ERR-1 ELD plus MSA-3 before).
    """
    enc = header.separators if header is not None else DEFAULT_SEPARATORS
    trusted = header is not None and header.trusted
    version = (header.version_tuple if header is not None else ()) or version_tuple(_DEFAULT_VERSION)
    enhanced = header is not None and trusted and header.enhanced
    if enhanced:
        code = _ENHANCED.get(code, code)
        if not _should_send(header.component(15).upper(), code):  # type: ignore[union-attr]
            return None

    def copied(n: int) -> str:
        if header is None:
            return ""
        value = header.raw(n)
        return value if trusted else escape(value, enc)

    event = header.component(9, 2) if header is not None else ""
    msh9 = "ACK"
    if event:  # MSH-9.3, the message structure, exists from v2.3.1
        msh9 += enc.component + escape(event, enc) + (enc.component + "ACK" if version >= (2, 3, 1) else "")
    msh = [""] * 19
    msh[3] = copied(5) or "ECGBRIDGE"
    msh[4] = copied(6)
    msh[5] = copied(3)
    msh[6] = copied(4)
    msh[7] = _timestamp(now)
    msh[9] = msh9
    msh[10] = escape(control_id or new_control_id(), enc)
    msh[11] = copied(11) or "P"
    msh[12] = copied(12) if header is not None and header.version else _DEFAULT_VERSION
    if enhanced:
        msh[15] = msh[16] = "NE"
    msh[18] = copied(18)
    segments = [_segment("MSH" + enc.field + enc.msh2, msh[3:], enc)]

    msa = [code, copied(10)]
    if error is not None and version < (2, 5):
        msa.append(escape(_user_message(error), enc))
    segments.append(_segment("MSA", msa, enc))
    if error is not None:
        segments.append(_err_segment(error, enc, version))
    return "".join(s + "\r" for s in segments)


def _segment(name: str, fields: Sequence[str], enc: Separators) -> str:
    values = list(fields)
    while values and not values[-1]:
        values.pop()
    return enc.field.join([name, *values])


def _user_message(error: Hl7Error) -> str:
    return " ".join(str(error).split())[:_USER_MESSAGE_MAX]


def _err_segment(error: Hl7Error, enc: Separators, version: tuple[int, ...]) -> str:
    text = ERROR_CODES.get(error.code, "Application internal error")
    loc = [str(p) if p not in (None, "") else "" for p in error.location]
    if version >= (2, 5):
        erl_text = enc.component.join(loc)
        cwe = enc.component.join([str(error.code), escape(text, enc), "HL70357"])
        return _segment("ERR", ["", erl_text, cwe, "E", "", "", "", escape(_user_message(error), enc)], enc)
    # v2.1-2.4: ERR-1 ELD = segment ^ sequence ^ field ^ code (CE in subcomponents)
    eld = (loc + ["", "", ""])[:3]
    ce = enc.subcomponent.join([str(error.code), escape(text, enc), "HL70357"])
    return _segment("ERR", [enc.component.join(eld + [ce])], enc)


def encode_ack(ack: str | None, codec: str) -> bytes:
    return ack.encode(codec, errors="replace") if ack else b""


# ----- parsing with hl7apy ------------------------------------------------------------------
def parse_segments(text: str, only: frozenset[str] | None = None) -> list[Any]:
    """hl7apy segments in wire order (``mapping.hl7_common.read_er7``, OBX-5 of NA / MA / ED
    set aside: hl7apy needs seconds for tens of thousands of samples).

    ``only``: parse just these segments, OBX cut after OBX-4; for an ORU, whose full
    reading (and validation) is ``mapping.hl7_waveform``'s, this halves the time.
    """
    try:
        return list(read_er7(_only(text, only) if only else text, find_groups=False).message.children)
    except DecodeError as exc:
        raise decode_failure(exc) from exc
    except HL7apyException as exc:
        raise Hl7Error(f"the message cannot be parsed ({type(exc).__name__})", code=102, kind="DecodeError") from exc


def _only(text: str, names: frozenset[str]) -> str:
    sep = text[3:4] or "|"
    kept = []
    for segment in text.split("\r"):
        name = segment[:3]
        if name in names:
            kept.append(sep.join(segment.split(sep, 5)[:5]) if name == "OBX" else segment)
    return "\r".join(kept)


def decode_failure(exc: DecodeError) -> Hl7Error:
    """A reader's DecodeError as an AR: 100 when a segment is at fault, 102 for a field."""
    where = error_location(exc)
    code = 100 if where is not None and where.field is None else 102
    return Hl7Error(str(exc), code=code, location=erl(where) if where is not None else (), kind="DecodeError")


def erl(where: ErrorLocation) -> Location:
    parts: list[Any] = [where.segment, where.sequence]
    for value in (where.field, where.repetition, where.component):
        if value is None:
            break
        parts.append(value)
    return tuple(parts)


def named(segments: list[Any], name: str) -> list[Any]:
    return [s for s in segments if s.name == name]


def raw_field(segment: Any, n: int) -> str:
    """Field ``n`` (first repetition) as ER7 with the default delimiters ("1234^Smith^John")."""
    if segment is None:
        return ""
    reps = [f for f in segment.children if f.name == f"{segment.name}_{n}"]
    if not reps:
        return ""
    return str(reps[0].to_er7(encoding_chars=DEFAULT_SEPARATORS.hl7apy())).strip()


def first_component(segment: Any, n: int) -> str:
    """The first component of field ``n`` as plain text (e.g. EI.1 of OBR-2)."""
    return (field_text(segment, n, 1) or "") if segment is not None else ""
