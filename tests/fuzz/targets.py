"""The fuzz cases: what each feeds, the property it checks, and how many cases CI runs.

One table for the tests (``tests/fuzz/test_*.py``, a bounded run in CI) and for
``bench/fuzz.py`` (the long run), so both check the same properties on the same inputs.
The properties: a reader answers every input with its result or an error of the
documented :class:`~ecgbridge.errors.InputError` family, within :data:`harness.CALL_LIMIT_S`;
what it returns is usable; the HL7 handler always answers with an ACK (and never with
"internal error"); the MLLP framer never raises and gives the same frames however the
bytes are split; the EHR mapping never raises and its result is finite JSON.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from ecgbridge.errors import InputError
from ecgbridge.mapping.hl7_common import Header, decode_bytes, first_segment, read_header
from ecgbridge.mapping.hl7_wire import ack_codec, build_ack, classify, decode_message, parse_segments, sniff_header
from ecgbridge.mapping.hl7_wire import validate_header as validate_msh
from tests.fuzz import seeds, strategies
from tests.fuzz.harness import COUNTS, NoAnswer, answered, check_ecg, time_limit

__all__ = ["Case", "CASES", "TARGETS", "by_name", "inbound_context", "load_json"]


@dataclass(frozen=True)
class Case:
    """One fuzz case: ``check`` raises on a property violation; ``dump`` stores an input as a fixture."""

    name: str
    target: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]
    ci_examples: int
    dump: Callable[[Any], tuple[str, bytes]]

    def run(self, value: Any) -> None:
        COUNTS[self.name] += 1
        self.check(value)


def _raw(suffix: str) -> Callable[[Any], tuple[str, bytes]]:
    return lambda value: (suffix, value)


def _json_dump(value: Any) -> tuple[str, bytes]:
    def default(obj: Any) -> Any:
        if isinstance(obj, datetime):
            return {"__datetime__": obj.isoformat()}
        if isinstance(obj, bytes):
            return {"__bytes__": obj.hex()}
        raise TypeError(type(obj).__name__)

    return ".json", json.dumps(value, default=default, indent=1).encode()


def load_json(data: bytes) -> Any:
    def hook(obj: dict[str, Any]) -> Any:
        if set(obj) == {"__datetime__"}:
            return datetime.fromisoformat(obj["__datetime__"])
        if set(obj) == {"__bytes__"}:
            return bytes.fromhex(obj["__bytes__"])
        return obj

    value = json.loads(data, object_hook=hook)
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- DICOM


def check_dicom_bytes(data: bytes) -> None:
    """read_bytes (with and without force) + to_ecg: an Ecg or an InputError."""
    from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg

    for force in (False, True):
        ds = answered(lambda: read_bytes(data, force=force))
        if isinstance(ds, InputError):
            continue
        ecg = answered(lambda: to_ecg(ds))
        if not isinstance(ecg, InputError):
            check_ecg(ecg)


def check_dicom_dataset(desc: dict[str, Any]) -> None:
    """A generated data set, encoded byte for byte, through read_bytes + to_ecg."""
    from tests.fuzz.dicom_build import encode

    check_dicom_bytes(encode(desc))


def _dump_dicom_dataset(desc: dict[str, Any]) -> tuple[str, bytes]:
    from tests.fuzz.dicom_build import encode

    return ".dcm", encode(desc)


# ------------------------------------------------------------------------------- HL7


def check_hl7_wire(raw: bytes) -> None:
    """The MSH helpers the handler calls before its own try: never raise; the rest: InputError only."""
    with time_limit():
        header = sniff_header(raw)  # outside the handler's try: must not raise
        ack_codec(header)
        first_segment(raw)
    answered(lambda: decode_bytes(raw))
    answered(lambda: decode_message(raw, header))
    read = answered(lambda: read_header(first_segment(raw)))
    if isinstance(read, Header):
        answered(lambda: validate_msh(read))
        answered(lambda: classify(read))
    with time_limit():
        for code in ("AA", "AE", "AR"):
            ack = build_ack(header, code)
            if ack is not None:
                assert ack.startswith("MSH") and "\rMSA" in ack, ack[:80]


def check_hl7_parse(raw: bytes) -> None:
    """decode_message + parse_segments (all, and the ORU subset) + parse_oru_waveform."""
    from ecgbridge.mapping.hl7_waveform import parse_oru_waveform

    decoded = answered(lambda: decode_message(raw, sniff_header(raw)))
    if not isinstance(decoded, InputError):
        text = decoded[0]
        answered(lambda: parse_segments(text))
        answered(lambda: parse_segments(text, frozenset({"MSH", "ORC", "OBR", "OBX"})))
    ecg = answered(lambda: parse_oru_waveform(raw))
    if not isinstance(ecg, InputError):
        check_ecg(ecg)


@functools.cache
def inbound_context() -> Any:
    """A real SQLite store in a temporary folder and a Dispatcher on a dead broker port.

    No route: the default route would make every accepted ORU wait ~2 s on the broker's
    retry policy (that path is covered by tests/unit/test_hl7_inbound.py); unrouted,
    the message is still stored, recorded and acknowledged.
    """
    from ecgbridge.core.queue import Dispatcher, make_celery
    from ecgbridge.core.settings import Settings, default_settings
    from ecgbridge.core.store import MessageStore
    from ecgbridge.gateway.hl7_inbound import InboundContext
    from tests.support.processes import free_port

    folder = Path(tempfile.mkdtemp(prefix="ecgbridge-fuzz-"))
    atexit.register(shutil.rmtree, folder, True)
    store = MessageStore(f"sqlite:///{folder / 'store.db'}", folder)
    store.create_schema()
    base = default_settings().model_dump(exclude={"source_file"})
    settings = Settings.model_validate({**base, "broker": {"url": f"redis://127.0.0.1:{free_port()}/0"}, "routes": []})
    return InboundContext(settings, store, Dispatcher(make_celery(settings)))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _hl7_log() -> Iterator[_Records]:
    """The handler's log records (debug included, so the traceback of a swallowed crash is kept)."""
    logger = logging.getLogger("ecgbridge")
    handler = _Records()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def check_hl7_inbound(raw: bytes) -> None:
    """handle_message always answers with an ACK, and never with an internal error."""
    from ecgbridge.gateway.hl7_inbound import handle_message

    with _hl7_log() as log, time_limit():
        ack = handle_message(raw, "10.1.2.3:40001", inbound_context())
    crashed = [r for r in log.records if r.levelno >= logging.ERROR or (r.exc_info and r.exc_info[1] is not None)]
    if crashed:
        exc = next((r.exc_info[1] for r in crashed if r.exc_info and r.exc_info[1] is not None), None)
        what = f"{type(exc).__name__}: {exc}" if exc is not None else crashed[0].getMessage()
        raise NoAnswer(f"handle_message answered an internal error: {what}") from exc
    assert isinstance(ack, bytes), type(ack)
    if not ack:
        header = sniff_header(raw)
        assert header is not None and header.enhanced and header.component(15).upper() in ("NE", "ER", "SU"), (
            "no ACK, but the message did not ask for none"
        )
        return
    text = ack.decode("latin-1")  # the ACK's delimiters are ASCII in every character set it is written in
    assert text.startswith("MSH") and text.endswith("\r"), text[:80]
    separator = text[3]
    msa = [s.split(separator) for s in text.split("\r") if s.startswith("MSA" + separator)]
    assert len(msa) == 1 and msa[0][1] in ("AA", "AE", "AR", "CA", "CE", "CR"), text
    assert "internal error (" not in text, text


# ------------------------------------------------------------------------ vendor XML


def check_xml(data: bytes) -> None:
    """read_xml (aECG, Philips, MUSE) and the format sniffing: an Ecg or an InputError."""
    from ecgbridge.mapping.readers import looks_like_xml
    from ecgbridge.mapping.vendor import read_xml

    with time_limit():
        looks_like_xml(data)
    ecg = answered(lambda: read_xml(data))
    if not isinstance(ecg, InputError):
        check_ecg(ecg)


def check_xli(value: tuple[bytes, int]) -> None:
    """The Philips XLI decompressor alone: bounded output or a DecodeError."""
    from ecgbridge.mapping.vendor.philips import xli_decode

    payload, n_samples = value
    leads = answered(lambda: xli_decode(payload, n_samples))
    if not isinstance(leads, InputError):
        assert len(leads) <= 16 and all(len(lead) <= n_samples + 1 for lead in leads), [len(x) for x in leads]


def _dump_xli(value: tuple[bytes, int]) -> tuple[str, bytes]:
    return ".xli.json", _json_dump([value[0], value[1]])[1]


# ----------------------------------------------------------------------------- MLLP


def _decode_stream(data: bytes, splits: list[int], limit: int) -> tuple[list[Any], int, int]:
    from ecgbridge.gateway.mllp import MllpDecoder

    decoder = MllpDecoder(limit)
    out: list[Any] = []
    bounds = [0, *splits, len(data)]
    for start, end in zip(bounds, bounds[1:]):
        out += decoder.feed(data[start:end])
        assert len(decoder._buf) <= limit, "the decoder holds more than max_message_bytes"
    return out, decoder.discarded, decoder.restarted


def _check_frames(frames: list[Any], limit: int) -> None:
    from ecgbridge.gateway.mllp import Frame, OversizeFrame

    for item in frames:
        if isinstance(item, Frame):
            assert len(item.payload) <= limit and b"\x0b" not in item.payload and b"\x1c" not in item.payload
        else:
            assert isinstance(item, OversizeFrame) and item.size > limit and len(item.head) <= limit, item


def check_mllp_random(value: tuple[bytes, list[int], int]) -> None:
    """Random bytes in random chunks: never raises, bounded, and the same frames as in one chunk."""
    data, splits, limit = value
    with time_limit():
        chunked = _decode_stream(data, splits, limit)
        whole = _decode_stream(data, [], limit)
    _check_frames(chunked[0], limit)
    assert chunked == whole, "the frames depend on how the bytes were split"


def check_mllp_frames(value: tuple[list[bytes], bytes, list[int], int]) -> None:
    """Valid frames with junk between them, in random chunks: every payload comes back (or its head)."""
    from ecgbridge.gateway.mllp import Frame, OversizeFrame

    payloads, stream, splits, limit = value
    with time_limit():
        frames, _, restarted = _decode_stream(stream, splits, limit)
    expected = [Frame(p) if len(p) <= limit else OversizeFrame(p[:limit], len(p)) for p in payloads]
    assert frames == expected and restarted == 0, (frames, expected)


def _dump_mllp(value: tuple[Any, ...]) -> tuple[str, bytes]:
    return ".mllp.json", _json_dump(list(value))[1]


# ------------------------------------------------------------------------------ EHR


def check_ehr(kwargs: dict[str, Any]) -> None:
    """context_from_resources never raises; the context is finite JSON and survives a round trip."""
    from ecgbridge.mapping.ehr_context import EhrContext, context_from_resources

    with time_limit():
        context = context_from_resources(**kwargs)
    assert isinstance(context, EhrContext)
    stored = context.to_dict()
    json.dumps(stored, allow_nan=False)
    assert all(isinstance(p, str) and p for p in context.problems), context.problems
    assert context.age_years is None or (math.isfinite(context.age_years) and context.age_years >= 0)
    for value in context.values.values():
        assert math.isfinite(value.value), value
    assert EhrContext.from_dict(stored) == context, "the stored form does not read back"


# ----------------------------------------------------------------------------- table


def _deferred(build: Callable[[], st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Seeds are built on first use (hl7apy and the writers take a second), not at import."""
    return st.deferred(build)


_dicom_dump, _hl7_dump, _xml_dump = _raw(".dcm"), _raw(".hl7"), _raw(".xml")

#: Every case; ``ci_examples`` sum to about 2000 per target.
CASES: tuple[Case, ...] = (
    Case(
        "dicom.mutated",
        "dicom",
        _deferred(lambda: strategies.mutated_bytes(seeds.dicom_seeds(), focus=1024)),
        check_dicom_bytes,
        900,
        _dicom_dump,
    ),
    Case(
        "dicom.fixture",
        "dicom",
        _deferred(lambda: strategies.mutated_bytes([seeds.dicom_fixture()], focus=2048, max_edits=3)),
        check_dicom_bytes,
        200,
        _dicom_dump,
    ),
    Case("dicom.generated", "dicom", strategies.dicom_datasets(), check_dicom_dataset, 900, _dump_dicom_dataset),
    Case(
        "hl7.wire", "hl7", _deferred(lambda: strategies.hl7_messages(seeds.hl7_seeds())), check_hl7_wire, 600, _hl7_dump
    ),
    Case(
        "hl7.parse",
        "hl7",
        _deferred(lambda: strategies.hl7_messages(seeds.hl7_seeds())),
        check_hl7_parse,
        700,
        _hl7_dump,
    ),
    Case(
        "hl7.inbound",
        "hl7",
        _deferred(lambda: strategies.hl7_messages(seeds.hl7_seeds()) | st.binary(max_size=64)),
        check_hl7_inbound,
        700,
        _hl7_dump,
    ),
    Case(
        "xml.vendor",
        "xml",
        _deferred(lambda: strategies.xml_documents(seeds.xml_seeds(), seeds.xml_fixtures())),
        check_xml,
        1700,
        _xml_dump,
    ),
    Case("xml.xli", "xml", _deferred(lambda: strategies.xli_payloads(*seeds.xli_seed())), check_xli, 300, _dump_xli),
    Case("mllp.random", "mllp", strategies.mllp_random_streams(), check_mllp_random, 1000, _dump_mllp),
    Case(
        "mllp.frames",
        "mllp",
        _deferred(lambda: strategies.mllp_frame_streams(seeds.hl7_seeds())),
        check_mllp_frames,
        1000,
        _dump_mllp,
    ),
    Case("ehr.resources", "ehr", strategies.ehr_inputs(), check_ehr, 2000, _json_dump),
)

TARGETS: tuple[str, ...] = tuple(dict.fromkeys(case.target for case in CASES))


def by_name(name: str) -> Case:
    return next(case for case in CASES if case.name == name)
