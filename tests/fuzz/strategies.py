"""Hypothesis strategies for the fuzz targets: mutated seeds, generated structures.

Why mutations are drawn as hypothesis choices (offsets, lengths, tokens) rather than
with a private random generator: hypothesis can then replay a run from its seed and
shrink a failing input to the fewest, smallest edits of a seed. Strategies are built
once, at import or when a factory is called, never per draw: building them is what
costs time in hypothesis, not drawing from them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

from ecgbridge.mapping.codes import ECG_STORAGE_SOP_CLASSES, MDC_LEAD_CODES, SCPECG_LEAD_CODES
from ecgbridge.mapping.ehr_context import (
    ATC,
    EHR_CONDITION_SNOMED,
    EHR_MEDICATION_RXNORM,
    EHR_PANEL_LOINC,
    EHR_UNIT_FACTORS,
    EHR_VALUE_LOINC,
    ICD10_SYSTEMS,
    LOINC,
    RXNORM,
    SNOMED,
    UCUM,
)

__all__ = [
    "mutated_bytes",
    "dicom_datasets",
    "hl7_messages",
    "xml_documents",
    "xli_payloads",
    "mllp_random_streams",
    "mllp_frame_streams",
    "ehr_inputs",
]

Strategy = st.SearchStrategy[Any]


@functools.cache
def _dice(n: int) -> Strategy:
    return st.integers(0, n - 1)


def _one_in(draw: st.DrawFn, n: int) -> bool:
    """True about one time in ``n``: the top value, as hypothesis favours 0 (a third of draws) when it explores."""
    return bool(draw(_dice(n)) == n - 1)


# --------------------------------------------------------------------- byte mutations

_KINDS = st.sampled_from(["flip", "byte", "int", "insert", "delete", "duplicate", "truncate", "splice", "repeat"])
_BITS = st.integers(0, 7)
_BYTE = st.sampled_from(
    [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF, 0x0B, 0x1C, 0x0D, 0x0A, 0x3C, 0x3E, 0x26, 0x7C]
) | st.integers(0, 255)
_WIDTH = st.sampled_from([2, 4])
_INT = st.sampled_from(
    [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
) | st.integers(0, 2**32 - 1)
_INSERT = st.binary(min_size=1, max_size=64)
_SPAN = st.integers(1, 256)
_SPLICE_LEN = st.integers(1, 512)
_REPEAT = st.tuples(st.integers(1, 16), st.integers(2, 64))


def _apply(data: bytes, kind: str, offset: int, arg: Any) -> bytes:
    offset = min(offset, len(data))
    if kind == "flip":
        return data[:offset] + bytes([data[offset] ^ arg]) + data[offset + 1 :] if offset < len(data) else data
    if kind == "byte":
        return data[:offset] + bytes([arg]) + data[offset + 1 :]
    if kind == "int":
        return data[:offset] + arg + data[offset + len(arg) :]
    if kind in ("insert", "splice"):
        return data[:offset] + arg + data[offset:]
    if kind == "delete":
        return data[:offset] + data[offset + arg :]
    if kind == "duplicate":
        return data[:offset] + data[offset : offset + arg] * 2 + data[offset + arg :]
    if kind == "repeat":
        length, times = arg
        return data[:offset] + data[offset : offset + length] * times + data[offset + length :]
    return data[:offset]  # truncate


def mutated_bytes(seeds: Sequence[bytes], *, focus: int | None = None, max_edits: int = 6) -> Strategy:
    """A seed with 0..``max_edits`` byte edits (flip, interesting values, insert, cut, splice);
    ``focus`` sends half the edits into the first ``focus`` bytes, where headers are."""
    pool = list(seeds)
    pick = st.sampled_from(pool)
    n_edits = st.integers(0, max_edits)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        data = draw(pick)
        for _ in range(draw(n_edits)):
            limit = max(1, len(data))
            if focus is not None and draw(st.booleans()):
                limit = min(limit, focus)
            offset = draw(st.integers(0, limit))
            kind = draw(_KINDS)
            arg: Any = None
            if kind == "flip":
                arg = 1 << draw(_BITS)
            elif kind == "byte":
                arg = draw(_BYTE)
            elif kind == "int":
                width = draw(_WIDTH)
                arg = (draw(_INT) % 2 ** (8 * width)).to_bytes(width, "little")
            elif kind == "insert":
                arg = draw(_INSERT)
            elif kind in ("delete", "duplicate"):
                arg = draw(_SPAN)
            elif kind == "splice":
                other = pool[draw(st.integers(0, len(pool) - 1))]
                start = draw(st.integers(0, max(0, len(other) - 1)))
                arg = other[start : start + draw(_SPLICE_LEN)]
            elif kind == "repeat":
                arg = draw(_REPEAT)
            data = _apply(data, kind, offset, arg)
        return data

    return build()


# ------------------------------------------------------------------ DICOM data sets

_DS_VALUE = st.sampled_from(
    ["500", "0", "-500", "nan", "NaN", "inf", "-inf", "1e308", "1e-320", "", " ", "abc", "5\\6", "500.0000000001"]
) | st.floats(allow_nan=True, allow_infinity=True, width=32).map(lambda f: f"{f:.6g}"[:16])
_MAYBE_DS = st.none() | _DS_VALUE
_SOURCE = st.none() | st.tuples(
    st.sampled_from(sorted(SCPECG_LEAD_CODES) + sorted(MDC_LEAD_CODES) + ["", "5.6.3-9-99", "x"]),
    st.sampled_from(["SCPECG", "MDC", "SCP-ECG", "DCM", "", "99LOCAL"]),
    st.sampled_from(["Lead I", "Lead II", "lead v1", "Lead aVR", "", "Respiration", "Lead II\x00"]),
)
_DICOM_UNITS = st.none() | st.tuples(
    st.sampled_from(["uV", "mV", "V", "nV", "\u00b5V", "mm[Hg]", "", "UV"]),
    st.sampled_from(["microvolt", "millivolt", "volts", "", "kelvin"]),
)
_CHANNEL = st.fixed_dictionaries(
    {
        "source": _SOURCE,
        "sensitivity": _MAYBE_DS,
        "correction": _MAYBE_DS,
        "baseline": _MAYBE_DS,
        "units": _DICOM_UNITS,
        "bits_stored": st.none() | st.integers(0, 64),
        "label": st.none() | st.text(max_size=8),
    }
)
_GROUP_ELEMENTS = (
    "NumberOfWaveformChannels",
    "NumberOfWaveformSamples",
    "SamplingFrequency",
    "MultiplexGroupLabel",
    "WaveformBitsAllocated",
    "WaveformSampleInterpretation",
    "WaveformData",
    "ChannelDefinitionSequence",
)
_VR_SWAPS = (
    "WaveformSequence",
    "ChannelDefinitionSequence",
    "ChannelSourceSequence",
    "NumberOfWaveformChannels",
    "NumberOfWaveformSamples",
    "SamplingFrequency",
    "WaveformData",
    "WaveformBitsAllocated",
    "ChannelSensitivity",
    "CodeValue",
    "MultiplexGroupLabel",
    "ChannelSensitivityUnitsSequence",
)
_N_SAMPLES = st.integers(0, 40) | st.sampled_from([0xFFFF, 0xFFFFFFFF, 2**31])


@st.composite
def _group(draw: st.DrawFn) -> dict[str, Any]:
    bits = draw(st.sampled_from([16, 16, 8, 32, 64, 0, 12, 24]))
    channels = draw(st.lists(_CHANNEL, max_size=13))
    n_samples = draw(_N_SAMPLES)
    declared = n_samples * len(channels) * max(bits, 8) // 8
    size = draw(st.sampled_from([declared, declared, declared + 1, max(0, declared - 1)]) | st.integers(0, 400))
    data = draw(st.binary(min_size=size, max_size=size)) if size <= 2048 else b"\x00" * min(size, 1 << 16)
    return {
        "label": draw(st.sampled_from(["RHYTHM", "MEDIAN BEAT", "REPRESENTATIVE", "", "rhythm ", "Rhythm\x00"])),
        "channels": channels,
        "n_channels": draw(st.sampled_from([len(channels)] * 3 + [0, len(channels) + 1, 0xFFFF])),
        "n_samples": n_samples,
        "fs": draw(st.sampled_from(["500", "500", "250"]) | _DS_VALUE),
        "bits": bits,
        "interpretation": draw(
            st.sampled_from(["SS", "SS", "SB", "US", "UB", "MB", "AB", "SL", "UL", "SV", "UV", "", "X"])
        ),
        "data": data,
        "omit": draw(st.sets(st.sampled_from(_GROUP_ELEMENTS), max_size=2)) if _one_in(draw, 4) else set(),
    }


_GROUPS = st.lists(_group(), max_size=3)
_OVERRIDES = st.dictionaries(
    st.sampled_from(_VR_SWAPS), st.sampled_from(["OB", "UN", "SQ", "US", "UL", "DS", "LO", "OW", "XX"]), max_size=2
)


@st.composite
def _dicom_dataset(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "sop_class": draw(
            st.sampled_from(list(ECG_STORAGE_SOP_CLASSES) * 3 + ["1.2.840.10008.5.1.4.1.1.2", "", "1.2.3"])
        ),
        "groups": draw(_GROUPS),
        "patient_id": draw(st.none() | st.text(max_size=12)),
        "birth_date": draw(st.none() | st.sampled_from(["19550314", "1955-03-14", "00000000", "99999999", "1955"])),
        "sex": draw(st.none() | st.sampled_from(["F", "M", "O", "X", ""])),
        "acquired": draw(
            st.none()
            | st.sampled_from(
                [
                    "20210314103412",
                    "20210314103412.123456+0100",
                    "00010101",
                    "99991231235959-1400",
                    "2021",
                    "x",
                    "20210314103412+9999",
                    "19000101000000.000000-1200",
                ]
            )
        ),
        "content": draw(
            st.none() | st.tuples(st.sampled_from(["20210314", "0000", ""]), st.sampled_from(["1034", ""]))
        ),
        "tz": draw(st.none() | st.sampled_from(["+0100", "-1400", "+9999", "0100", ""])),
        "implicit": draw(st.booleans()),
        "undefined": draw(st.booleans()),
        "empty_sequence": draw(st.booleans()),
        "overrides": draw(_OVERRIDES) if _one_in(draw, 4) else {},
    }


def dicom_datasets() -> Strategy:
    """A description of an ECG data set (top level, multiplex groups, channels), values raw and often wrong."""
    return _dicom_dataset()


# ----------------------------------------------------------------------- HL7 messages

_HL7_TOKENS = (
    "",
    '""',
    "0",
    "-1",
    "1e309",
    "-1e309",
    "nan",
    "inf",
    "-0",
    "0.0",
    "1e-320",
    "99999999999999999999999",
    "NA",
    "MA",
    "CD",
    "ED",
    "TS",
    "NM",
    "ST",
    "^",
    "~",
    "&",
    "\\",
    "|",
    "\\X0D\\",
    "\\X\\",
    "\\XZZ\\",
    "\\E\\",
    "\\.br\\",
    "\\H\\",
    "\\Zabc\\",
    "\x00",
    "\u00ff",
    "\u20ac",
    "uV",
    "mV",
    "V",
    "kV",
    "MDC_ECG_LEAD_I",
    "I",
    "II",
    "V6",
    "Lead I",
    "5.6.3-9-1",
    "2:1",
    "LA^RA",
    "1&I^I^1&uV&microvolt&UCUM^1&0&0^500^-32768&32767",
    "1&II^II^^^",
    "20260101",
    "20261301",
    "20260101120000+9999",
    "99999999999999",
    "0000",
    "2.5.1",
    "2.3",
    "2.8.2",
    "2.1",
    "9.9",
    "ORU^R01^ORU_R01",
    "ORU^W01",
    "ORM^O01",
    "OML^O21",
    "ADT^A01",
    "ADT^A08^ADT_A01",
    "ACK",
    "QRY^A19",
    "Application^XML^XML^Base64^PHhtbC8+",
    "Application^DICOM^DICOM^Hex^00ff",
    "^^DICOM^Base64^AAAA",
    "^^^A^<x/>",
    "^^^Base64^!!!",
    "^^^Q^x",
    "1^2^3~4^5^6",
    "1~2~3",
    "1^^3",
    "9" * 400,
)
_CHARSETS = (
    "UNICODE UTF-8",
    "8859/1",
    "8859/7",
    "ASCII",
    "UNICODE UTF-16",
    "GB 18030-2000",
    "BIG-5",
    "KS X 1001",
    "EBCDIC",
    "",
    "UTF-8",
    "ISO IR192",
)
_HL7_VALUE = (
    st.sampled_from(_HL7_TOKENS)
    | st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.integers(-(2**70), 2**70).map(str)
    | st.text(max_size=24)
)
_HL7_EDITS = st.sampled_from(
    [
        "field",
        "field",
        "piece",
        "piece",
        "piece",
        "piece",
        "drop_field",
        "add_field",
        "segment",
        "msh2",
        "msh18",
        "splice",
    ]
)
_SEGMENT_ACTIONS = st.sampled_from(["delete", "duplicate", "swap", "rename"])
_SEGMENT_IDS = st.sampled_from(["MSH", "PID", "OBR", "ORC", "OBX", "ZXX", "obx", "OB", "OBXX", "", "NTE"])
_MSH2 = st.sampled_from(["^~\\&", "^~\\&#", "^~\\", "^^\\&", "", "^~\\&#!", "a~\\&"]) | st.text(max_size=6)
_MSH18 = st.sampled_from(_CHARSETS) | st.text(max_size=16)
_ENDINGS = st.sampled_from(["\r", "\r", "\r", "\n", "\r\n", "\n\r"])
_FRAMES = st.sampled_from(["", "", "", "start", "both", "bom", "inner"])
_INNER = st.sampled_from([b"\x0b", b"\x1c", b"\x1c\r\x0b"])


def _replace_piece(draw: st.DrawFn, value: str) -> str:
    """Replace one repetition, component or subcomponent of a field (CD's CSU, CCP, NR live there)."""
    depth = draw(st.integers(0, 2))
    separators = "~^&"[: depth + 1]

    def walk(text: str, level: int) -> str:
        parts = text.split(separators[level])
        k = draw(st.integers(0, len(parts) - 1))
        if level == depth:
            parts[k] = "" if _one_in(draw, 8) else draw(_HL7_VALUE)
        else:
            parts[k] = walk(parts[k], level + 1)
        return separators[level].join(parts)

    return walk(value, 0)


def _text_codec(raw: bytes) -> str:
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "latin-1"


def hl7_messages(seeds: Sequence[bytes]) -> Strategy:
    """A seed message with field-level edits, then maybe byte edits, line-ending and MLLP changes."""
    pool = [(raw, _text_codec(raw)) for raw in seeds]
    split = [[seg.split("|") for seg in raw.decode(codec).split("\r") if seg] for raw, codec in pool]
    lines = [seg for message in split for seg in message]
    n_edits = st.integers(0, 5)

    def edit(draw: st.DrawFn, segments: list[list[str]]) -> list[list[str]]:
        segments = [list(seg) for seg in segments]
        kind = draw(_HL7_EDITS)
        # four edits in five after MSH: the waveform reader's decisions are in OBX, OBR and PID
        low = 1 if len(segments) > 1 and not _one_in(draw, 5) else 0
        i = draw(st.integers(low, len(segments) - 1))
        seg = segments[i]
        if kind in ("field", "piece", "drop_field") and len(seg) > 1:
            j = draw(st.integers(1, len(seg) - 1))
            if kind == "field":
                seg[j] = draw(_HL7_VALUE)
            elif kind == "piece":
                seg[j] = _replace_piece(draw, seg[j])
            else:
                del seg[j]
        elif kind == "add_field":
            seg.insert(draw(st.integers(1, len(seg))), draw(_HL7_VALUE))
        elif kind == "segment":
            action = draw(_SEGMENT_ACTIONS)
            if action == "delete" and len(segments) > 1:
                del segments[i]
            elif action == "duplicate":
                segments.insert(i, list(seg))
            elif action == "swap":
                j = draw(st.integers(0, len(segments) - 1))
                segments[i], segments[j] = segments[j], segments[i]
            else:
                seg[0] = draw(_SEGMENT_IDS)
        elif kind == "msh2" and segments[0][0] == "MSH" and len(segments[0]) > 1:
            segments[0][1] = draw(_MSH2)
        elif kind == "msh18" and segments[0][0] == "MSH":
            msh = segments[0]
            msh.extend([""] * (18 - len(msh)))
            msh[17] = draw(_MSH18)
        elif kind == "splice":
            segments.insert(i, list(lines[draw(st.integers(0, len(lines) - 1))]))
        return segments

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        index = draw(st.integers(0, len(pool) - 1))
        codec = pool[index][1]
        segments = split[index]
        for _ in range(draw(n_edits)):
            segments = edit(draw, segments)
        ending = draw(_ENDINGS)
        text = ending.join("|".join(seg) for seg in segments) + draw(st.sampled_from([ending, "", "\r\r\r"]))
        data = text.encode(draw(st.sampled_from(["utf-8", "latin-1"])) if _one_in(draw, 8) else codec, "replace")
        if _one_in(draw, 6):
            for _ in range(draw(st.integers(1, 3))):
                offset = draw(st.integers(0, min(len(data), 300)))
                data = (
                    _apply(data, "byte", offset, draw(_BYTE))
                    if draw(st.booleans())
                    else data[:offset] + data[offset + draw(_SPAN) :]
                )
        frame = draw(_FRAMES)
        if frame == "start":
            data = b"\x0b" + data
        elif frame == "both":
            data = b"\x0b" + data + b"\x1c\r"
        elif frame == "bom":
            data = b"\xef\xbb\xbf" + data
        elif frame == "inner":
            cut = draw(st.integers(0, len(data)))
            data = data[:cut] + draw(_INNER) + data[cut:]
        return data

    return build()


# ----------------------------------------------------------------------- vendor XML

_XML_TOKENS = (
    "",
    "0",
    "-1",
    "nan",
    "inf",
    "1e308",
    "1e-320",
    "65536",
    "4294967296",
    "abc",
    "&amp;",
    "&#0;",
    "&#xD800;",
    "]]>",
    "<x/>",
    "MICROVOLTS",
    "MILLIVOLTS",
    "mmHg",
    "uV",
    "mV",
    "Rhythm",
    "Median",
    "RHYTHM",
    "REPRESENTATIVE_BEAT",
    "MDC_ECG_LEAD_I",
    "MDC_ECG_LEAD_AVR",
    "TIME_ABSOLUTE",
    "SLIST_PQ",
    "SLIST_INT",
    "GLIST_TS",
    "XLI",
    "NONE",
    "True",
    "False",
    "Base64",
    "1.03",
    "1.04",
    "2.00",
    "AAAA",
    "////",
    "+8P/+A==",
    "I II III",
    "V1 V1",
    "12",
    "16",
    "99",
    "8",
    "4",
)
_XML_VALUE = (
    st.sampled_from(_XML_TOKENS)
    | st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.integers(-(2**70), 2**70).map(str)
    | st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=12)
)
_XML_EDITS = st.sampled_from(["text", "text", "text", "attribute", "attribute", "attribute", "leaf", "block", "rename"])
_XML_NAMES = st.sampled_from(
    ["Waveform", "LeadData", "series", "sequence", "x", "parsedwaveforms", "component", "value"]
)
_XML_SPOTS = {
    "text": re.compile(r">([^<]*)<"),
    "attribute": re.compile(r"=\"([^\"]*)\""),
    "leaf": re.compile(r"<([A-Za-z][\w:]*)[^<>]*>[^<]*</\1>"),
    "block": re.compile(r"<(LeadData|Waveform|component|sequence|series|sequenceSet|parsedwaveforms)\b.*?</\1>", re.S),
    "rename": re.compile(r"<([A-Za-z][\w:]*)[^<>]*>[^<]*</(\1)>"),
}
_ESCAPES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"))


def _escaped(text: str) -> str:
    for char, entity in _ESCAPES:
        text = text.replace(char, entity)
    return text


def xml_documents(seeds: Sequence[bytes], fixtures: Sequence[bytes]) -> Strategy:
    """A vendor seed with value, element and tag edits (mostly still well-formed), then maybe byte
    edits or a UTF-16 re-encoding; one in 40 a mutated real file."""
    pool = []
    for raw in seeds:
        encoding = "iso-8859-1" if raw.startswith(b'<?xml version="1.0" encoding="ISO-8859-1"') else "utf-8"
        text = raw.decode(encoding)
        spots: dict[str, list[tuple[int, ...]]] = {}
        for kind, rx in _XML_SPOTS.items():
            if kind == "rename":
                spots[kind] = [(*m.span(1), *m.span(2)) for m in rx.finditer(text)]
            else:
                spots[kind] = [m.span(1 if kind in ("text", "attribute") else 0) for m in rx.finditer(text)]
        pool.append((text, encoding, spots))
    real = mutated_bytes(fixtures, focus=4096, max_edits=3)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        if _one_in(draw, 40):
            return draw(real)
        text, encoding, spots = pool[draw(st.integers(0, len(pool) - 1))]
        edits: list[tuple[int, int, str]] = []
        for _ in range(draw(st.integers(0, 4))):
            kind = draw(_XML_EDITS)
            if not spots[kind]:
                continue
            spot = spots[kind][draw(st.integers(0, len(spots[kind]) - 1))]
            if kind == "rename":
                name = draw(_XML_NAMES)
                edits += [(spot[0], spot[1], name), (spot[2], spot[3], name)]
                continue
            start, end = spot
            if kind in ("leaf", "block"):
                new = text[start:end] * draw(st.sampled_from([0, 2, 3]))
            else:
                new = draw(_XML_VALUE)
                if not _one_in(draw, 10):
                    new = _escaped(new)
            edits.append((start, end, new))
        # applied from the end, overlaps skipped, so that the spans found in the seed stay valid
        bound = len(text)
        for start, end, new in sorted(edits, reverse=True):
            if end <= bound:
                text, bound = text[:start] + new + text[end:], start
        data = text.encode(encoding, errors="xmlcharrefreplace")
        if _one_in(draw, 8):
            for _ in range(draw(st.integers(1, 3))):
                offset = draw(st.integers(0, len(data)))
                if draw(st.booleans()):
                    data = _apply(data, "byte", offset, draw(_BYTE))
                else:
                    data = data[:offset] + data[offset + draw(_SPAN) :]
        if _one_in(draw, 10):
            declared = f'encoding="{encoding.upper()}"'
            data = data.decode(encoding, errors="replace").replace(declared, 'encoding="UTF-16"').encode("utf-16")
        return data

    return build()


def xli_payloads(seed: bytes, n_samples: int) -> Strategy:
    """An XLI payload (mutated real-structure chunks, or random bytes) and the samples per lead asked for."""
    payload = mutated_bytes([seed], focus=64) | st.binary(max_size=256)
    samples = st.sampled_from([n_samples, 1, 2, n_samples - 1, n_samples * 2]) | st.integers(0, 5000)
    return st.tuples(payload, samples)


# ----------------------------------------------------------------------------- MLLP

_MLLP_BYTE = st.sampled_from([0x0B, 0x1C, 0x0D, 0x0A, 0x00]) | st.integers(0, 255)
_JUNK = st.binary(max_size=8).map(lambda b: b.replace(b"\x0b", b""))
_PAYLOAD = st.binary(max_size=200).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))


def _with_splits(draw: st.DrawFn, data: bytes) -> list[int]:
    return sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))


@st.composite
def _random_stream(draw: st.DrawFn) -> tuple[bytes, list[int], int]:
    data = bytes(draw(st.lists(_MLLP_BYTE, max_size=300)))
    return data, _with_splits(draw, data), draw(st.integers(1, 64) | st.just(1 << 20))


def mllp_random_streams() -> Strategy:
    """(stream of bytes rich in 0x0B/0x1C/0x0D, chunk boundaries, max_message_bytes)."""
    return _random_stream()


def mllp_frame_streams(seeds: Sequence[bytes]) -> Strategy:
    """(payloads, their MLLP stream with junk between frames, chunk boundaries, max_message_bytes)."""
    seeded = st.sampled_from([s.replace(b"\x0b", b"").replace(b"\x1c", b"") for s in seeds])
    payloads = st.lists(_PAYLOAD | seeded, max_size=6)

    @st.composite
    def build(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int], int]:
        chosen = draw(payloads)
        stream = bytearray()
        for p in chosen:
            stream += draw(_JUNK) + b"\x0b" + p + b"\x1c" + draw(st.sampled_from([b"\r", b"\r", b""]))
        stream += draw(_JUNK)
        data = bytes(stream)
        return chosen, data, _with_splits(draw, data), draw(st.integers(1, 4096) | st.just(1 << 20))

    return build()


# -------------------------------------------------------------------- EHR resources

_LOINCS = sorted({c for codes in EHR_VALUE_LOINC.values() for c in codes} | set(EHR_PANEL_LOINC)) + ["0000-0"]
_SYSTEMS = [LOINC, SNOMED, UCUM, RXNORM, ATC, *ICD10_SYSTEMS, "urn:oid:1.2.3", "", "http://loinc.org/"]
_UNITS = [
    "pg/mL",
    "ng/L",
    "pmol/L",
    "mmol/L",
    "mg/dL",
    "umol/L",
    "g/dL",
    "mm[Hg]",
    "kPa",
    "/min",
    "kg",
    "[lb_av]",
    "cm",
    "[in_i]",
    "kg/m2",
    "mL/min/{1.73_m2}",
    "",
    " ",
    "furlongs",
    "\u00b5g/L",
    "%",
]
_DATES = [
    "2021-03-14",
    "2021-03-14T10:34:12Z",
    "2021-03-14T10:34:12+14:00",
    "2021",
    "2021-03",
    "0001-01-01",
    "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59-12:00",
    "9999-12-31",
    "0000",
    "2021-13-01",
    "2021-02-30",
    "",
    "T",
    "2021-03-14T25:00:00",
    "1800-01-01",
    "+10000-01-01",
    "2021-03-14T10:34:12.999999999Z",
    "2021-03-14T10:34:12",
    "2020-03-14T10:34:12Z",
    "2021-03-13",
    "2021-W10",
]
_JSON_KEYS = st.sampled_from(
    [
        "status",
        "code",
        "coding",
        "system",
        "value",
        "unit",
        "valueQuantity",
        "effectiveDateTime",
        "effectivePeriod",
        "start",
        "end",
        "issued",
        "component",
        "text",
        "display",
        "comparator",
        "clinicalStatus",
        "id",
        "resourceType",
        "onsetDateTime",
        "recordedDate",
    ]
)
_JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**1100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(_DATES + _UNITS + _LOINCS[:6] + _SYSTEMS + ["final", "active", "male", "<", "\x00"])
    | st.text(max_size=8)
)
_JSON = st.recursive(
    _JSON_SCALAR,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_JSON_KEYS, children, max_size=4),
    max_leaves=8,
)


def _rarely(rare: Strategy, usual: Strategy, n: int = 8) -> Strategy:
    """``usual``, and one time in ``n`` ``rare``: the common path goes deep, the odd case is still tried."""

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        return draw(rare) if _one_in(draw, n) else draw(usual)

    return build()


def _maybe(strategy: Strategy) -> Strategy:
    """The value, or (one time in 16) any JSON value in its place: where a wrong type hides."""
    return _rarely(_JSON, strategy, 16)


def _record(required: dict[str, Strategy], optional: dict[str, Strategy] | None = None) -> Strategy:
    """A JSON object with its required fields three times in four (else any subset), sometimes not an object."""
    optional = optional or {}
    whole = st.fixed_dictionaries(required, optional=optional)
    subset = st.fixed_dictionaries({}, optional={**required, **optional})
    return _maybe(_rarely(subset, whole, 4))


def _concept(codes: Sequence[str], system: Strategy) -> Strategy:
    coding = _record(
        {"system": _maybe(system), "code": _maybe(st.sampled_from(list(codes)))},
        {"display": _maybe(st.sampled_from(["furosemide 40 MG", "Metoprolol", "x", ""]))},
    )
    return _record({"coding": _maybe(st.lists(coding, min_size=1, max_size=3))}, {"text": _maybe(st.text(max_size=20))})


_NEAR = [
    "2021-03-14",
    "2021-03-14T10:34:12Z",
    "2021-03-14T08:00:00+01:00",
    "2021-03-01",
    "2020-06-30T12:00:00Z",
    "2021",
]
_DATE = _maybe(_rarely(st.sampled_from(_DATES), st.sampled_from(_NEAR), 3))
_PERIOD = _record({"start": _DATE}, {"end": _DATE})
_NUMBER = _rarely(
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**70), 2**1100)
    | st.booleans()
    | st.sampled_from([1e306, -1e306, 10**400, 2**63]),
    st.floats(-1e4, 1e4) | st.integers(0, 500),
    4,
)
_LOINC_SYSTEM = _rarely(st.sampled_from(_SYSTEMS), st.just(LOINC), 4)
_OBSERVATION_STATUS = _maybe(
    _rarely(st.sampled_from(["cancelled", "FINAL", ""]), st.sampled_from(["final", "amended"]), 4)
)


def _quantity(units: Sequence[str]) -> Strategy:
    unit = _maybe(_rarely(st.sampled_from(_UNITS), st.sampled_from(list(units)), 4))
    return _record(
        {"value": _maybe(_NUMBER), "unit": unit, "system": _maybe(st.sampled_from(_SYSTEMS))},
        {"code": unit, "comparator": _maybe(st.sampled_from(["<", ">", "<=", ""]))},
    )


def _observation(variable: str) -> Strategy:
    """An Observation of one variable: its LOINC codes and its units mostly, so that values are read."""
    code = _concept(EHR_VALUE_LOINC[variable] + ("0000-0",), _LOINC_SYSTEM)
    quantity = _quantity(sorted(EHR_UNIT_FACTORS[variable]))
    component = _record({"code": code, "valueQuantity": quantity})
    return _record(
        {"status": _OBSERVATION_STATUS, "code": code, "valueQuantity": quantity, "effectiveDateTime": _DATE},
        {
            "resourceType": st.just("Observation"),
            "id": _maybe(st.text(max_size=6)),
            "effectiveInstant": _DATE,
            "effectivePeriod": _PERIOD,
            "issued": _DATE,
            "component": _maybe(st.lists(component, max_size=3)),
        },
    )


_OBSERVATION = st.one_of([_observation(variable) for variable in EHR_VALUE_LOINC])
_CONDITION_CODES = sorted({c for codes in EHR_CONDITION_SNOMED.values() for c in codes})[:12] + [
    "I50.9",
    "I21",
    "E11.9",
    "N18.3",
    "i10",
    "Z99",
]
_DRUG_CODES = sorted({c for codes in EHR_MEDICATION_RXNORM.values() for c in codes})[:10] + [
    "C07AB02",
    "C03CA01",
    "c09aa05",
    "X",
]
_STATUS = ["active", "resolved", "inactive", "refuted", "entered-in-error", "completed", "stopped", "remission"]
_STATUS_CONCEPT = _concept(_STATUS, st.sampled_from(_SYSTEMS))
_CONDITION = _record(
    {
        "code": _concept(_CONDITION_CODES, st.sampled_from([SNOMED, *ICD10_SYSTEMS, LOINC])),
        "clinicalStatus": _STATUS_CONCEPT,
        "onsetDateTime": _DATE,
    },
    {
        "resourceType": st.just("Condition"),
        "verificationStatus": _STATUS_CONCEPT,
        "onsetPeriod": _PERIOD,
        "recordedDate": _DATE,
    },
)
_MEDICATION = _record(
    {
        "status": _maybe(st.sampled_from(_STATUS)),
        "medicationCodeableConcept": _concept(_DRUG_CODES, st.sampled_from([RXNORM, ATC, SNOMED])),
        "effectivePeriod": _PERIOD,
    },
    {
        "resourceType": st.just("MedicationStatement"),
        "medicationReference": _record({"display": _maybe(st.sampled_from(["Lasix", "bisoprolol 5 mg", ""]))}),
        "effectiveDateTime": _DATE,
    },
)
_PATIENT = _rarely(
    st.none(),
    _record(
        {"id": _maybe(st.text(max_size=8)), "gender": _maybe(st.sampled_from(["male", "female", "other", "M", ""]))},
        {"resourceType": st.just("Patient"), "birthDate": _DATE},
    ).filter(lambda p: isinstance(p, dict)),
    6,
)
_ZONE = st.none() | st.just(UTC) | st.integers(-14 * 60 + 1, 14 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
# mostly near the resources' dates, so that values fall inside the window and reach the unit conversion
_WHEN = _rarely(
    st.none()
    | st.builds(
        lambda d, z: d.replace(tzinfo=z),
        st.datetimes() | st.sampled_from([datetime(1, 1, 1), datetime(9999, 12, 31, 23, 59, 59)]),
        _ZONE,
    ),
    st.sampled_from([datetime(2021, 3, 14, 12), datetime(2021, 3, 15, tzinfo=UTC), datetime(2021, 12, 31, tzinfo=UTC)]),
    3,
)


def _resources(strategy: Strategy, size: int) -> Strategy:
    return _rarely(st.none(), st.lists(strategy, max_size=size), 6)


_EHR_INPUTS = st.fixed_dictionaries(
    {
        "patient": _PATIENT,
        "observations": _resources(_OBSERVATION, 5),
        "conditions": _resources(_CONDITION, 3),
        "medications": _resources(_MEDICATION, 3),
        "acquired_at": _WHEN,
        "window_days": _rarely(st.integers(0, 3_000_000), st.sampled_from([365, 3650, 1]), 3),
        "source": st.none() | st.just("ehr"),
        "status": st.sampled_from(["complete", "partial"]),
        "problems": st.lists(st.just("Observation query failed (HTTP 500)"), max_size=1),
    }
)


def ehr_inputs() -> Strategy:
    """Keyword arguments of ``context_from_resources``: FHIR-ish resources, often with wrong types and values."""
    return _EHR_INPUTS
