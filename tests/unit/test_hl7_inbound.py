"""HL7 v2 inbound handling: the ACK (checked with hl7apy and python-hl7), MSH checks,
message types, acknowledgment modes, character sets, orders and ORU waveforms.

A real MessageStore on SQLite in tmp_path; the real Dispatcher on a real Redis where
a message is enqueued (and the real Dispatcher on a dead port for "broker down").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
import redis
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from ecgbridge.core.queue import QUEUE, Dispatcher, make_celery
from ecgbridge.core.settings import Route, RouteMatch, Settings, default_settings
from ecgbridge.core.states import Work, WorkKind
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import Hl7Error
from ecgbridge.gateway.hl7_inbound import InboundContext, handle_message, handle_oversize
from ecgbridge.mapping.hl7_common import read_header
from ecgbridge.mapping.hl7_wire import build_ack, decode_message
from tests.support.hl7_messages import with_charset
from tests.support.processes import free_port

REPO = Path(__file__).resolve().parents[2]
WFDB = REPO / "tests" / "fixtures" / "wfdb" / "00024_lr.hea"
PEER = "10.1.2.3:40001"

ORDER_DETAIL_KEYS = {
    "placer_order_number",
    "filler_order_number",
    "placer_group_number",
    "order_control",
    "order_status",
    "ordering_provider",
    "universal_service_id",
    "visit_number",
    "patient_class",
    "patient_identifier",
    "requested_at",
    "sending_application",
    "sending_facility",
}


# ----- helpers --------------------------------------------------------------------------------
def er7(*segments: str) -> str:
    return "\r".join(segments) + "\r"


def msh(
    msg_type: str = "ORM^O01^ORM_O01",
    control: str = "CTRL0001",
    version: str = "2.5.1",
    *,
    charset: str = "",
    accept: str = "",
    app_ack: str = "",
    sep: str = "|",
    enc: str = "^~\\&",
    sending: str = "HIS^1.2.840.1^ISO",
    facility: str = "HOSP",
) -> str:
    f = [
        sending,
        facility,
        "ECGBRIDGE",
        "CARDIO",
        "20260301101500+0100",
        "",
        msg_type,
        control,
        "P",
        version,
        "",
        "",
        accept,
        app_ack,
        "",
        charset,
    ]
    return "MSH" + sep + enc + sep + sep.join(f).rstrip(sep)


def orm(
    placer: str = "PL1001",
    filler: str = "FI2002",
    *,
    control: str = "ORM0001",
    name: str = "Müller^Zoë",
    charset: str = "",
    msg_type: str = "ORM^O01^ORM_O01",
    provider: str = "1234^Smith^John",
) -> str:
    return er7(
        msh(msg_type, control, charset=charset),
        f"PID|1||MRN55501^^^HOSP^MR~X99^^^OTHER||{name}||19600101|F",
        "PV1|1|O|CARD^101^1||||||||||||||||VN7788^^^HOSP^VN",
        f"ORC|NW|{placer}^HIS|{filler}^ECG|GRP9^HIS|SC||||20260301100000|||{provider}",
        f"OBR|1|{placer}^HIS|{filler}^ECG|93000^EKG 12 lead^CPT|||20260301100500",
    )


def fields(ack: bytes, codec: str = "utf-8") -> hl7.Message:
    """The ACK parsed by python-hl7, an independent parser."""
    return hl7.parse(ack.decode(codec))


def seg(message: hl7.Message, name: str) -> Any:
    return message.segment(name)


def hl7apy_valid(ack: bytes, codec: str = "utf-8") -> None:
    message = parse_message(ack.decode(codec), validation_level=VALIDATION_LEVEL.STRICT)
    message.validate()


@pytest.fixture
def store(tmp_path: Path, database_url: str | None) -> MessageStore:
    """A fresh store: SQLite, then PostgreSQL (``database_url``)."""
    s = MessageStore(database_url or f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    s.create_schema()
    return s


def _settings(broker_url: str, routes: list[Route] | None = None) -> Settings:
    base = default_settings()
    data: dict[str, Any] = {"broker": {"url": broker_url}}
    if routes is not None:
        data["routes"] = [r.model_dump() for r in routes]
    return Settings.model_validate({**base.model_dump(exclude={"source_file"}), **data})


@pytest.fixture
def dead_ctx(store: MessageStore) -> InboundContext:
    """No broker listening: enough for everything that enqueues nothing."""
    settings = _settings(f"redis://127.0.0.1:{free_port()}/0")
    return InboundContext(settings, store, Dispatcher(make_celery(settings)))


@pytest.fixture
def live_ctx(store: MessageStore, redis_server: Any) -> Iterator[InboundContext]:
    settings = _settings(redis_server.url)
    yield InboundContext(settings, store, Dispatcher(make_celery(settings)))


def waveform_message(
    control: str = "ORU0001",
    *,
    placer: str | None = "PL1001",
    filler: str | None = None,
    name: str | None = None,
    charset: str = "UNICODE UTF-8",
    version: str = "2.5.1",
) -> str:
    """An ORU^R01 with the 12-lead waveform of a real PTB-XL record (``charset`` "": no MSH-18)."""
    from dataclasses import replace

    from ecgbridge.mapping.ecg import Patient
    from ecgbridge.mapping.wfdb_record import read_wfdb
    from tests.support.hl7_waveform_writer import build_oru_waveform

    ecg = replace(read_wfdb(WFDB), patient=Patient(id="MRN55501", name=name))
    message = build_oru_waveform(
        ecg,
        control_id=control,
        placer_order_number=placer,
        filler_order_number=filler,
        version=version,
        encoding=charset or "UNICODE UTF-8",
    )
    return message if charset else with_charset(message, "")


# ----- the ACK ---------------------------------------------------------------------------------
def test_ack_answers_the_sender_in_its_own_terms(dead_ctx: InboundContext) -> None:
    raw = orm(control="CTRL-777").encode()
    ack = handle_message(raw, PEER, dead_ctx)
    again = handle_message(orm(control="CTRL-778").encode(), PEER, dead_ctx)
    m, h = fields(ack), seg(fields(ack), "MSH")
    assert str(seg(m, "MSA")[1]) == "AA" and str(seg(m, "MSA")[2]) == "CTRL-777"
    assert (str(h[3]), str(h[4]), str(h[5]), str(h[6])) == ("ECGBRIDGE", "CARDIO", "HIS^1.2.840.1^ISO", "HOSP")
    assert str(h[9]) == "ACK^O01^ACK" and str(h[12]) == "2.5.1" and str(h[11]) == "P"
    assert re.fullmatch(r"\d{14}\.\d{3}[+-]\d{4}", str(h[7])), "MSH-7 must carry the UTC offset"
    ours = {str(h[10]), str(seg(fields(again), "MSH")[10])}
    assert len(ours) == 2 and "CTRL-777" not in ours and all(len(c) <= 20 for c in ours)
    assert ack.endswith(b"\r") and b"\n" not in ack
    hl7apy_valid(ack)


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"])
def test_error_ack_layout_follows_the_senders_version(version: str) -> None:
    header = read_header(msh("ORU^R01^ORU_R01", "C1", version))
    err = Hl7Error("channel 3 has 999 samples, 1000 expected", code=207, location=("OBX", 3, 5), ack="AE")
    ack = build_ack(header, "AE", err)
    assert ack is not None
    m = fields(ack.encode())
    assert str(seg(m, "MSA")[1]) == "AE" and str(seg(m, "MSH")[12]) == version
    if version >= "2.5":
        e = seg(m, "ERR")
        assert str(e[2]) == "OBX^3^5"
        assert str(e[3]) == "207^Application internal error^HL70357"
        assert str(e[4]) == "E" and "999 samples" in str(e[8])
    else:
        assert str(seg(m, "ERR")[1]) == "OBX^3^5^207&Application internal error&HL70357"
        assert "999 samples" in str(seg(m, "MSA")[3])
    assert str(seg(m, "MSH")[9]) == ("ACK^R01" if version == "2.3" else "ACK^R01^ACK")
    if version != "2.3":  # hl7apy needs MSH-9.3 (from v2.3.1) to find the ACK structure
        hl7apy_valid(ack.encode())


def test_ack_uses_the_senders_encoding_characters_and_escapes_our_text() -> None:
    header = read_header(msh("ORU^R01^ORU_R01", "C$9", enc="$~\\&", sending="CART$7"))
    err = Hl7Error("bad | text ^ with $ all & the ~ delimiters \\ here", code=207, location=("OBX", 2, 5), ack="AE")
    ack = build_ack(header, "AE", err)
    assert ack is not None and ack.startswith("MSH|$~\\&|")
    err_seg = [s for s in ack.split("\r") if s.startswith("ERR")][0].split("|")
    assert err_seg[2] == "OBX$2$5" and err_seg[3] == "207$Application internal error$HL70357"
    assert err_seg[8] == r"bad \F\ text ^ with \S\ all \T\ the \R\ delimiters \E\ here"
    assert "|CART$7|" in ack  # copied from MSH-3 as it came: same delimiters


def test_error_text_round_trips_through_an_independent_parser(dead_ctx: InboundContext) -> None:
    raw = er7(msh("QRY^A19^QRY_A19", "Q1"), "QRD|x").encode()
    m = fields(handle_message(raw, PEER, dead_ctx))
    text = m.unescape(str(seg(m, "ERR")[8]))
    assert "QRY" in text and "ORU^R01" in text  # escaped on the wire as ORU\S\R01


# ----- malformed MSH and unsupported types -----------------------------------------------------------
@pytest.mark.parametrize(
    "raw, code, location",
    [
        (b"PID|1||MRN1\rOBX|1|NM|x", "100", "MSH^1"),
        (b"\x00\x01binary garbage", "100", "MSH^1"),
        (msh(enc="^~").encode(), "102", "MSH^1^2"),
        (msh(enc="^^\\&").encode(), "102", "MSH^1^2"),
        (msh(msg_type="").encode(), "101", "MSH^1^9"),
        (msh(control="").encode(), "101", "MSH^1^10"),
        (msh(version="").encode(), "101", "MSH^1^12"),
        (msh(version="3.0").encode(), "203", "MSH^1^12"),
        (msh(charset="EBCDIC").encode(), "103", "MSH^1^18"),
        (msh(charset="ASCII").encode() + "\rPID|1||X||Müller".encode("latin-1"), "102", "MSH^1^18"),
    ],
    ids=[
        "no-msh",
        "binary",
        "short-msh2",
        "duplicate-msh2",
        "no-msh9",
        "no-msh10",
        "no-msh12",
        "version",
        "charset",
        "not-ascii",
    ],
)
def test_malformed_msh_is_rejected_with_err_and_kept(
    dead_ctx: InboundContext, raw: bytes, code: str, location: str
) -> None:
    ack = handle_message(raw, PEER, dead_ctx)
    m = fields(ack, "latin-1")
    assert str(seg(m, "MSA")[1]) == "AR"
    err = seg(m, "ERR")
    assert str(err[2]) == location and str(err[3]).split("^")[0] == code
    (row,) = dead_ctx.store.list()
    assert row.state == "rejected" and row.error and row.source == "hl7"
    assert dead_ctx.store.read_blob(row.blob_sha256) == raw, "the raw bytes must be kept"
    assert dead_ctx.store.events(row.id), "no error record"


def test_msa2_echoes_the_control_id_even_when_rejecting(dead_ctx: InboundContext) -> None:
    m = fields(handle_message(msh(enc="^~", control="KEEP-ME").encode(), PEER, dead_ctx))
    assert str(seg(m, "MSA")[2]) == "KEEP-ME"


@pytest.mark.parametrize(
    "msg_type, code, location",
    [
        ("QRY^A19^QRY_A19", "200", "MSH^1^9^1^1"),
        ("ACK^R01^ACK", "200", "MSH^1^9^1^1"),
        ("ORU^R30^ORU_R30", "201", "MSH^1^9^1^2"),
        ("ADT^A03^ADT_A03", "201", "MSH^1^9^1^2"),
    ],
)
def test_unsupported_type_or_event_is_rejected(
    dead_ctx: InboundContext, msg_type: str, code: str, location: str
) -> None:
    m = fields(handle_message(er7(msh(msg_type, "T1"), "EVN|x").encode(), PEER, dead_ctx))
    assert str(seg(m, "MSA")[1]) == "AR"
    assert str(seg(m, "ERR")[2]) == location and str(seg(m, "ERR")[3]).startswith(code + "^")
    (row,) = dead_ctx.store.list()
    assert row.state == "rejected" and row.message_type == "^".join(msg_type.split("^")[:2])
    assert [e.kind for e in dead_ctx.store.events(row.id)] == ["unsupported_message_type"]


def test_adt_is_recorded_and_acknowledged(dead_ctx: InboundContext) -> None:
    raw = er7(msh("ADT^A08^ADT_A01", "ADT1"), "EVN|A08|20260301", "PID|1||MRN1^^^H^MR||Doe^Jane").encode()
    assert str(seg(fields(handle_message(raw, PEER, dead_ctx)), "MSA")[1]) == "AA"
    (row,) = dead_ctx.store.list()
    assert row.state == "processed" and row.message_type == "ADT^A08"


# ----- acknowledgment modes -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "accept, app_ack, good, bad",
    [
        ("AL", "NE", "CA", "CR"),
        ("NE", "AL", None, None),
        ("ER", "AL", None, "CR"),
        ("SU", "NE", "CA", None),
        ("", "AL", "CA", "CR"),  # enhanced (MSH-16 valued), MSH-15 empty: always
    ],
)
def test_enhanced_mode_sends_the_accept_ack_msh15_asks_for(
    dead_ctx: InboundContext, accept: str, app_ack: str, good: str | None, bad: str | None
) -> None:
    ok = er7(msh("ADT^A04^ADT_A01", "E1", accept=accept, app_ack=app_ack), "EVN|A04")
    ko = er7(msh("QRY^A19^QRY_A19", "E2", accept=accept, app_ack=app_ack), "QRD|x")
    for message, expected in ((ok, good), (ko, bad)):
        ack = handle_message(message.encode(), PEER, dead_ctx)
        if expected is None:
            assert ack == b""
            continue
        m = fields(ack)
        assert str(seg(m, "MSA")[1]) == expected
        assert (str(seg(m, "MSH")[15]), str(seg(m, "MSH")[16])) == ("NE", "NE")
        hl7apy_valid(ack)
    assert {r.state for r in dead_ctx.store.list()} == {"processed", "rejected"}  # recorded either way


def test_original_mode_acks_carry_no_msh15_or_msh16(dead_ctx: InboundContext) -> None:
    ack = handle_message(er7(msh("ADT^A04^ADT_A01", "O1"), "EVN|A04").encode(), PEER, dead_ctx)
    h = seg(fields(ack), "MSH")
    assert len(h) <= 15 or not str(h[15])


# ----- character sets ------------------------------------------------------------------------------
NAME = "Müller^Zoë"


@pytest.mark.parametrize(
    "charset, codec, flags",
    [
        ("UNICODE UTF-8", "utf-8", []),
        ("8859/1", "latin-1", []),
        ("", "utf-8", []),
        ("", "latin-1", ["charset_assumed:8859/1"]),
    ],
)
def test_decoding_honours_msh18_and_falls_back_to_latin1(charset: str, codec: str, flags: list[str]) -> None:
    raw = orm(charset=charset).encode(codec)
    text, used, found = decode_message(raw, read_header(raw.decode("latin-1")))
    assert NAME in text and used == codec and found == flags
    assert "\n" not in text


def test_declared_utf8_that_is_not_utf8_is_rejected(dead_ctx: InboundContext) -> None:
    raw = orm(charset="UNICODE UTF-8").encode("latin-1")
    m = fields(handle_message(raw, PEER, dead_ctx), "latin-1")
    assert str(seg(m, "MSA")[1]) == "AR" and str(seg(m, "ERR")[2]) == "MSH^1^18"


@pytest.mark.parametrize("charset, codec", [("UNICODE UTF-8", "utf-8"), ("8859/1", "latin-1")])
def test_order_names_and_ack_keep_the_senders_charset(dead_ctx: InboundContext, charset: str, codec: str) -> None:
    message = orm(charset=charset, provider="1234^Müller^Zoë").replace(
        "|HOSP|ECGBRIDGE|CARDIO|", "|KLINIKUM MÜNCHEN|ECGBRIDGE|CARDIO|"
    )
    ack = handle_message(message.encode(codec), PEER, dead_ctx)
    m = fields(ack, codec)
    assert str(seg(m, "MSA")[1]) == "AA" and str(seg(m, "MSH")[18]) == charset
    assert str(seg(m, "MSH")[6]) == "KLINIKUM MÜNCHEN"  # copied back, encoded as the sender encodes
    order = dead_ctx.store.find_order("PL1001", None)
    assert order is not None and order.details["ordering_provider"] == "1234^Müller^Zoë"
    assert order.details["sending_facility"] == "KLINIKUM MÜNCHEN"


def test_latin1_without_msh18_is_flagged(dead_ctx: InboundContext) -> None:
    assert b"|AA|" in handle_message(orm().encode("latin-1"), PEER, dead_ctx)
    (row,) = dead_ctx.store.list()
    assert "charset_assumed:8859/1" in row.flags
    assert any(e.kind == "charset_assumed" for e in dead_ctx.store.events(row.id))


# ----- orders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("msg_type", ["ORM^O01^ORM_O01", "OML^O21^OML_O21"])
def test_order_is_upserted_with_its_details(dead_ctx: InboundContext, msg_type: str) -> None:
    ack = handle_message(orm(msg_type=msg_type).encode(), PEER, dead_ctx)
    assert str(seg(fields(ack), "MSA")[1]) == "AA"
    store = dead_ctx.store
    order = store.find_order("PL1001", "FI2002")
    assert order is not None and order.order_control == "NW" and order.status == "SC"
    assert set(order.details) == ORDER_DETAIL_KEYS
    assert order.details == {
        "placer_order_number": "PL1001",
        "filler_order_number": "FI2002",
        "placer_group_number": "GRP9^HIS",
        "order_control": "NW",
        "order_status": "SC",
        "ordering_provider": "1234^Smith^John",
        "universal_service_id": "93000^EKG 12 lead^CPT",
        "visit_number": "VN7788^^^HOSP^VN",
        "patient_class": "O",
        "patient_identifier": "MRN55501^^^HOSP^MR",
        "requested_at": "20260301100000",
        "sending_application": "HIS^1.2.840.1^ISO",
        "sending_facility": "HOSP",
    }
    (row,) = store.list()
    assert row.state == "processed" and row.message_type == msg_type.rsplit("^", 1)[0]
    assert order.message_id == row.id


def test_order_without_numbers_is_rejected(dead_ctx: InboundContext) -> None:
    raw = er7(msh(), "PID|1||M1", "ORC|NW|||", "OBR|1|||93000^EKG^CPT").encode()
    m = fields(handle_message(raw, PEER, dead_ctx))
    assert str(seg(m, "MSA")[1]) == "AR" and str(seg(m, "ERR")[2]) == "ORC^1^2"
    assert str(seg(m, "ERR")[3]).startswith("101^")
    assert dead_ctx.store.find_order(None, None) is None


def test_a_later_order_message_updates_the_order(dead_ctx: InboundContext) -> None:
    handle_message(orm().encode(), PEER, dead_ctx)
    handle_message(
        orm(control="ORM0002").replace("ORC|NW|", "ORC|XO|").replace("|SC|", "|IP|").encode(), PEER, dead_ctx
    )
    order = dead_ctx.store.find_order("PL1001", None)
    assert order is not None and order.order_control == "XO" and order.status == "IP"


# ----- oversize and storage failures -------------------------------------------------------------------
def test_oversize_frame_gets_ar_with_its_control_id_and_a_record(dead_ctx: InboundContext) -> None:
    head = orm(control="BIG-1").encode()[:200]
    m = fields(handle_oversize(head, 20_000_000, 16 * 1024 * 1024, PEER, dead_ctx))
    assert str(seg(m, "MSA")[1]) == "AR" and str(seg(m, "MSA")[2]) == "BIG-1"
    assert "too large" in str(seg(m, "ERR")[8])
    (row,) = dead_ctx.store.list()
    assert row.state == "rejected" and "truncated:first_bytes_only" in row.flags
    assert [e.kind for e in dead_ctx.store.events(row.id)] == ["message_too_large"]


def test_storage_failure_is_answered_ae(tmp_path: Path) -> None:
    (tmp_path / "blobs").write_text("a file where the blob directory should be")
    store = MessageStore(f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    store.create_schema()
    settings = _settings(f"redis://127.0.0.1:{free_port()}/0")
    ctx = InboundContext(settings, store, Dispatcher(make_celery(settings)))
    m = fields(handle_message(orm(control="DISK-1").encode(), PEER, ctx))
    assert str(seg(m, "MSA")[1]) == "AE" and str(seg(m, "MSA")[2]) == "DISK-1"
    assert str(seg(m, "ERR")[3]).startswith("207^") and "send again" in str(seg(m, "ERR")[8])


# ----- ORU^R01 with a waveform ------------------------------------------------------------------------
def test_oru_is_stored_routed_and_its_id_enqueued(live_ctx: InboundContext, redis_server: Any) -> None:
    message = waveform_message("ORU-42", placer="PL1001")
    ack = handle_message(message.encode(), PEER, live_ctx)
    m = fields(ack)
    assert str(seg(m, "MSA")[1]) == "AA" and str(seg(m, "MSA")[2]) == "ORU-42"
    assert str(seg(m, "MSH")[9]) == "ACK^R01^ACK"
    (row,) = live_ctx.store.list()
    assert row.state == "queued" and row.message_type == "ORU^R01" and row.route == "all-ecg"
    assert row.placer_order_number == "PL1001" and row.remote.endswith("@10.1.2.3")
    assert live_ctx.store.read_blob(row.blob_sha256) == message.encode()
    assert redis.Redis.from_url(redis_server.url).llen(QUEUE) == 1


def test_oru_resent_after_a_lost_ack_is_not_recorded_twice(live_ctx: InboundContext, redis_server: Any) -> None:
    raw = waveform_message("ORU-43").encode()
    assert b"|AA|" in handle_message(raw, PEER, live_ctx)
    assert b"|AA|" in handle_message(raw, PEER, live_ctx)
    (row,) = live_ctx.store.list()
    assert any(e.kind == "duplicate_received" for e in live_ctx.store.events(row.id))
    assert redis.Redis.from_url(redis_server.url).llen(QUEUE) == 1


def test_oru_before_its_order_is_linked_when_the_order_comes(live_ctx: InboundContext) -> None:
    handle_message(waveform_message("ORU-44", placer="PL1001").encode(), PEER, live_ctx)
    (ecg_row,) = live_ctx.store.list()
    assert live_ctx.store.order_for_message(ecg_row.id) is None
    handle_message(orm("PL1001", "FI2002").encode(), PEER, live_ctx)
    order = live_ctx.store.order_for_message(ecg_row.id)
    assert order is not None and order.filler_order_number == "FI2002"
    linked = [e for e in live_ctx.store.events(ecg_row.id) if e.kind == "order_linked"]
    assert len(linked) == 1 and f"order {order.id} " in linked[0].detail
    handle_message(orm("PL1001", "FI2002", control="ORM0003").encode(), PEER, live_ctx)  # an update: no 2nd event
    assert len([e for e in live_ctx.store.events(ecg_row.id) if e.kind == "order_linked"]) == 1


def test_order_before_oru_is_found_for_the_message(live_ctx: InboundContext) -> None:
    handle_message(orm("PL2001", "FI3002").encode(), PEER, live_ctx)
    handle_message(waveform_message("ORU-45", placer="PL2001").encode(), PEER, live_ctx)
    ecg_row = [r for r in live_ctx.store.list() if r.message_type == "ORU^R01"][0]
    order = live_ctx.store.order_for_message(ecg_row.id)
    assert order is not None and order.details["filler_order_number"] == "FI3002"
    assert any(e.kind == "order_linked" for e in live_ctx.store.events(ecg_row.id))


def test_unrouted_oru_is_kept_and_acknowledged(store: MessageStore, redis_server: Any) -> None:
    routes = [Route(name="cart-x", match=RouteMatch(sending_applications=["CART-X"]))]
    settings = _settings(redis_server.url, routes)
    ctx = InboundContext(settings, store, Dispatcher(make_celery(settings)))
    assert b"|AA|" in handle_message(waveform_message("ORU-46").encode(), PEER, ctx)
    (row,) = store.list()
    assert row.state == "unrouted" and row.route is None
    assert any(e.kind == "unrouted" for e in store.events(row.id))


def test_route_matches_on_hl7_fields(store: MessageStore, redis_server: Any) -> None:
    message = waveform_message("ORU-47")
    obx3 = [s.split("|")[3].split("^")[0] for s in message.split("\r") if s.startswith("OBX")]
    routes = [
        Route(name="other-facility", match=RouteMatch(sources=["hl7"], sending_facilities=["ELSEWHERE"])),
        Route(
            name="hl7-ecg",
            match=RouteMatch(
                sources=["hl7"], message_types=["ORU^R01"], sending_applications=["CART"], obx_codes=[obx3[-1]]
            ),
        ),
    ]
    settings = _settings(redis_server.url, routes)
    ctx = InboundContext(settings, store, Dispatcher(make_celery(settings)))
    assert b"|AA|" in handle_message(message.encode(), PEER, ctx)
    (row,) = store.list()
    assert row.route == "hl7-ecg" and row.state == "queued"


def test_broker_down_after_the_durable_write_still_acknowledges(dead_ctx: InboundContext) -> None:
    assert b"|AA|" in handle_message(waveform_message("ORU-48").encode(), PEER, dead_ctx)
    (row,) = dead_ctx.store.list()
    assert row.state == "received" and row.route == "all-ecg"  # the recovery sweep enqueues it later
    assert any(e.kind == "enqueue_failed" for e in dead_ctx.store.events(row.id))
    assert list(dead_ctx.store.unfinished()) == [Work(row.id, WorkKind.ANALYSE)]


def test_an_order_number_longer_than_its_column_gets_the_same_answer_on_every_database(
    dead_ctx: InboundContext, database_url: str | None, request: pytest.FixtureRequest
) -> None:
    """A valid ORU must not be accepted on one database and fail on the other; nor be cut short silently."""
    placer = "PL" + "7" * 78
    m = fields(handle_message(waveform_message("ORU-LONG", placer=placer).encode(), PEER, dead_ctx))
    answer = str(seg(m, "MSA")[1])
    assert answer in ("AA", "AR"), f"{answer}: {seg(m, 'ERR')[8] if answer != 'AA' else ''}"
    if answer == "AA":
        (row,) = dead_ctx.store.list()
        assert row.placer_order_number == placer


def _break_one_channel(message: str) -> tuple[str, int]:
    """Drop samples from the last OBX carrying data, so definitions and data disagree."""
    segments = message.split("\r")
    obx = [i for i, s in enumerate(segments) if s.startswith("OBX|") and s.split("|")[2] in ("NA", "MA")]
    assert obx, "no NA/MA OBX in the built message"
    i = obx[-1]
    parts = segments[i].split("|")
    rep = "~" if "~" in parts[5] else "^"
    values = parts[5].split(rep)
    parts[5] = rep.join(values[: len(values) // 2])
    segments[i] = "|".join(parts)
    set_id = sum(1 for s in segments[: i + 1] if s.startswith("OBX|"))
    return "\r".join(segments), set_id


def test_waveform_whose_channels_and_data_disagree_gets_ae_naming_the_obx(
    live_ctx: InboundContext, redis_server: Any
) -> None:
    message, obx_number = _break_one_channel(waveform_message("ORU-49"))
    m = fields(handle_message(message.encode(), PEER, live_ctx))
    assert str(seg(m, "MSA")[1]) == "AE" and str(seg(m, "MSA")[2]) == "ORU-49"
    location = str(seg(m, "ERR")[2])
    assert location.startswith("OBX^"), location
    assert location.split("^")[1] == str(obx_number), (location, obx_number)
    (row,) = live_ctx.store.list()
    assert row.state == "rejected" and any(e.kind == "WaveformError" for e in live_ctx.store.events(row.id))
    assert redis.Redis.from_url(redis_server.url).llen(QUEUE) == 0, "a bad waveform must not reach a worker"


def test_oru_without_obr_is_rejected(dead_ctx: InboundContext) -> None:
    raw = er7(msh("ORU^R01^ORU_R01", "ORU-50"), "PID|1||M1", "OBX|1|NM|8867-4^HR^LN||72").encode()
    m = fields(handle_message(raw, PEER, dead_ctx))
    assert str(seg(m, "MSA")[1]) == "AR" and str(seg(m, "ERR")[2]) == "OBR^1"


@pytest.mark.parametrize("charset, codec", [("UNICODE UTF-8", "utf-8"), ("8859/1", "latin-1"), ("", "latin-1")])
def test_oru_with_non_ascii_name_in_the_senders_charset(live_ctx: InboundContext, charset: str, codec: str) -> None:
    from ecgbridge.mapping.readers import read_ecg_bytes

    raw = waveform_message("ORU-51", name=NAME, charset=charset).encode(codec)
    m = fields(handle_message(raw, PEER, live_ctx), codec)
    assert str(seg(m, "MSA")[1]) == "AA"
    (row,) = live_ctx.store.list()
    ecg = read_ecg_bytes(live_ctx.store.read_blob(row.blob_sha256), hint="hl7")  # what the worker reads
    assert ecg.patient.name is not None and "Müller" in ecg.patient.name and "Zoë" in ecg.patient.name
    assert ("charset_assumed:8859/1" in row.flags) == (not charset)
