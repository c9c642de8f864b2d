"""HL7 v2 over MLLP end to end: sender -> ``ecgbridge gateway`` -> store -> Redis -> worker.

Real parts only: a redis-server, real ``ecgbridge gateway`` and ``ecgbridge worker``
processes, python-hl7's ``mllp_send`` command as the independent sender (one
connection per run, one ACK printed per message), raw sockets where a test needs to
misbehave on the wire (garbage, a frame never closed, one byte a second, 20 MB).
ORU^R01 messages carry a 12-lead waveform built from a real PTB-XL record.

One deployment serves most of the module (a worker takes longer to start than these
tests take together); each test uses its own control ids and order numbers, so the
tests cannot see each other's messages. The crash test has a deployment of its own.
The framing edge cases that need other listener settings (allowlist, connection
limit) run an in-process ``MllpServer`` on a real socket with the real handler.
Every test that stores runs twice: on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hl7_messages import with_charset
from tests.support.peers import need
from tests.support.processes import REPO, RedisServer, redis_binary, wait_for
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

WFDB = REPO / "tests" / "fixtures" / "wfdb" / "00024_lr.hea"
MLLP_SEND = Path(sys.executable).with_name("mllp_send")
FRAME_TIMEOUT_S = 4.0
IDLE_TIMEOUT_S = 8.0
NAME = "Müller^Zoë"
PATIENT_ID = "MRN7741209"


# ----- messages --------------------------------------------------------------------------------
def _uid() -> str:
    return uuid.uuid4().hex[:10].upper()


def oru(control: str, placer: str | None, *, name: str | None = None, charset: str = "UNICODE UTF-8") -> str:
    """An ORU^R01 with the 12-lead waveform of a real PTB-XL record (``charset`` "": no MSH-18)."""
    from dataclasses import replace

    from ecgbridge.mapping.ecg import Patient
    from ecgbridge.mapping.wfdb_record import read_wfdb
    from tests.support.hl7_waveform_writer import build_oru_waveform

    ecg = replace(read_wfdb(WFDB), patient=Patient(id=PATIENT_ID, name=name))
    message = build_oru_waveform(
        ecg, control_id=control, placer_order_number=placer, encoding=charset or "UNICODE UTF-8"
    )
    return message if charset else with_charset(message, "")


def orm(control: str, placer: str, filler: str) -> str:
    return (
        "\r".join(
            [
                f"MSH|^~\\&|HIS|HOSP|ECGBRIDGE|CARDIO|20260301101500+0100||ORM^O01^ORM_O01|{control}|P|2.5.1",
                f"PID|1||{PATIENT_ID}^^^HOSP^MR||Doe^Janet||19600101|F",
                "PV1|1|O|CARD^101^1||||||||||||||||VN7788^^^HOSP^VN",
                f"ORC|NW|{placer}^HIS|{filler}^ECG||SC||||20260301100000|||1234^Smith^John",
                f"OBR|1|{placer}^HIS|{filler}^ECG|93000^EKG 12 lead^CPT",
            ]
        )
        + "\r"
    )


def break_one_channel(message: str) -> tuple[str, int]:
    """Halve the samples of the last NA/MA OBX; returns the message and that OBX's number."""
    segments = message.split("\r")
    data = [i for i, s in enumerate(segments) if s.startswith("OBX|") and s.split("|")[2] in ("NA", "MA")]
    i = data[-1]
    parts = segments[i].split("|")
    rep = "~" if "~" in parts[5] else "^"
    values = parts[5].split(rep)
    parts[5] = rep.join(values[: len(values) // 2])
    segments[i] = "|".join(parts)
    return "\r".join(segments), sum(1 for s in segments[: i + 1] if s.startswith("OBX|"))


# ----- the wire ----------------------------------------------------------------------------------
def framed(payload: bytes) -> bytes:
    return b"\x0b" + payload + b"\x1c\r"


def mllp_send(port: int, messages: list[bytes], tmp: Path) -> list[str]:
    """python-hl7's mllp_send over one connection; the ACKs it printed, one per message."""
    if not MLLP_SEND.exists():
        need("python-hl7's mllp_send is not installed (pip install hl7)")
    path = tmp / f"send-{_uid()}.hl7"
    path.write_bytes(b"".join(framed(m) for m in messages))
    out = subprocess.run(
        [str(MLLP_SEND), "--file", str(path), "-p", str(port), "127.0.0.1"], capture_output=True, timeout=120
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    acks = [a.strip(b"\x0b\n") for a in out.stdout.split(b"\x1c\r") if a.strip(b"\x0b\n")]
    assert len(acks) == len(messages), out.stdout
    return [a.decode("latin-1") for a in acks]


def ack_fields(ack: str) -> dict[str, list[str]]:
    return {s[:3]: s.split("|") for s in ack.split("\r") if s}


def msa(ack: str) -> tuple[str, str]:
    f = ack_fields(ack)["MSA"]
    return f[1], f[2] if len(f) > 2 else ""


def recv_frame(sock: socket.socket, timeout_s: float = 60.0) -> bytes:
    sock.settimeout(timeout_s)
    buf = b""
    while not buf.endswith(b"\x1c\r"):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a whole ACK ({buf[:80]!r})")
        buf += chunk
    return buf.strip(b"\x0b").removesuffix(b"\x1c\r")


def closed_within(sock: socket.socket, timeout_s: float) -> float:
    """Seconds until the peer closed ``sock`` (recv returns b"" or a reset)."""
    start = time.monotonic()
    sock.settimeout(timeout_s)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def messages_json(stack: Stack) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ecgbridge",
            "messages",
            "list",
            "--json",
            "--limit",
            "1000",
            "--config",
            str(stack.config),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def rows_for(stack: Stack, placer: str) -> list[Any]:
    return [r for r in stack.store().list(limit=1000) if r.placer_order_number == placer]


def wait_row(
    stack: Stack, placer: str, states: tuple[str, ...], message_type: str = "ORU^R01", timeout_s: float = 90.0
) -> Any:
    def found() -> Any:
        rows = [r for r in rows_for(stack, placer) if r.message_type == message_type]
        return rows[0] if rows and rows[0].state in states else None

    try:
        return wait_for(found, timeout_s, 0.3, f"{message_type} {placer} in {states}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None


# ----- the deployment ----------------------------------------------------------------------------------
def _start(stack: Stack, *, worker: bool = True) -> None:
    if worker:
        stack.start_worker()
    gateway = stack.start_gateway()
    gateway.wait_for_log("MLLP listener", 60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, module_database_url: str | None) -> Iterator[Stack]:
    """One deployment for the module's tests, once on SQLite and once on PostgreSQL."""
    if redis_binary() is None:
        need("no redis-server binary (apt-get install redis-server)")
    redis = RedisServer().start()
    s = Stack(
        tmp=tmp_path_factory.mktemp("mllp"),
        broker_url=redis.url,
        database_url=module_database_url,
        mllp_options={"enabled": True, "frame_timeout_s": FRAME_TIMEOUT_S, "idle_timeout_s": IDLE_TIMEOUT_S},
    )
    try:
        _start(s)
        yield s
    finally:
        s.stop()
        redis.stop()


# ----- acceptance -----------------------------------------------------------------------------------------
def test_mllp_send_oru_with_a_real_12_lead_gets_aa_and_is_analysed(stack: Stack, tmp_path: Path) -> None:
    placer = f"PL{_uid()}"
    (ack,) = mllp_send(stack.mllp_port, [oru(f"C{placer}", placer).encode()], tmp_path)
    assert msa(ack) == ("AA", f"C{placer}")
    assert ack_fields(ack)["MSH"][8] == "ACK^R01^ACK"
    row = wait_row(stack, placer, ("analysed", "delivered"))
    (item,) = [m for m in messages_json(stack) if m["id"] == row.id]
    assert item["source"] == "hl7" and item["state"] == "analysed"
    assert set(item["findings"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert all(0.0 <= p <= 1.0 for p in item["findings"].values())


def test_order_before_and_after_its_result_are_linked(stack: Stack, tmp_path: Path) -> None:
    first, later = f"PL{_uid()}", f"PL{_uid()}"
    acks = mllp_send(
        stack.mllp_port,
        [
            orm(f"O{first}", first, f"F{first}").encode(),  # order, then its ECG
            oru(f"R{first}", first).encode(),
            oru(f"R{later}", later).encode(),  # ECG, then its order
            orm(f"O{later}", later, f"F{later}").encode(),
        ],
        tmp_path,
    )
    assert [msa(a)[0] for a in acks] == ["AA"] * 4
    store = stack.store()
    for placer in (first, later):
        row = wait_row(stack, placer, ("queued", "analysed", "delivered"))
        order = store.order_for_message(row.id)
        assert order is not None and order.filler_order_number == f"F{placer}"
        assert order.details["ordering_provider"] == "1234^Smith^John"
        assert any(e.kind == "order_linked" for e in store.events(row.id)), placer
        (order_row,) = [r for r in rows_for(stack, placer) if r.message_type == "ORM^O01"]
        assert order_row.state == "processed" and order.message_id == order_row.id


# ----- bad input: answered, recorded, and the connection keeps serving ---------------------------------------
def test_bad_messages_get_ar_or_ae_with_err_and_the_connection_still_serves(stack: Stack, tmp_path: Path) -> None:
    uid = _uid()
    bad_waveform, obx_number = break_one_channel(oru(f"W{uid}", f"PLW{uid}"))
    good = f"PLG{uid}"
    acks = mllp_send(
        stack.mllp_port,
        [
            f"MSH|^~|CART|WARD|ECGBRIDGE||20260301||ORU^R01^ORU_R01|M{uid}|P|2.5.1\rPID|1".encode(),
            f"MSH|^~\\&|CART|WARD|ECGBRIDGE||20260301||QRY^A19^QRY_A19|U{uid}|P|2.5.1\rQRD|x".encode(),
            bad_waveform.encode(),
            oru(f"G{uid}", good).encode(),
        ],
        tmp_path,
    )
    malformed, unsupported, waveform, fine = (ack_fields(a) for a in acks)
    assert msa(acks[0]) == ("AR", f"M{uid}") and malformed["ERR"][2] == "MSH^1^2"
    assert malformed["ERR"][3].startswith("102^")
    assert msa(acks[1]) == ("AR", f"U{uid}") and unsupported["ERR"][3].startswith("200^")
    assert msa(acks[2]) == ("AE", f"W{uid}")
    assert waveform["ERR"][2].split("^")[:2] == ["OBX", str(obx_number)], waveform["ERR"]
    assert waveform["ERR"][8], "the AE must say what is wrong"
    assert msa(acks[3]) == ("AA", f"G{uid}") and "ERR" not in fine
    (rejected,) = rows_for(stack, f"PLW{uid}")
    assert rejected.state == "rejected" and stack.store().events(rejected.id)
    wait_row(stack, good, ("analysed", "delivered"))


def test_20_mb_message_gets_ar_and_the_same_connection_then_gets_aa(stack: Stack) -> None:
    uid = _uid()
    big = (
        (
            f"MSH|^~\\&|CART|WARD|ECGBRIDGE||20260301||ORU^R01^ORU_R01|BIG{uid}|P|2.5.1\r"
            "OBX|1|ED|PDF^Report^L||^application^pdf^Base64^"
        ).encode()
        + b"QUJD" * (5 * 1024 * 1024)
        + b"\r"
    )
    assert len(big) > 20_000_000
    normal = f"MSH|^~\\&|HIS|HOSP|ECGBRIDGE||20260301||ADT^A08^ADT_A01|N{uid}|P|2.5.1\rEVN|A08\r".encode()
    with socket.create_connection(("127.0.0.1", stack.mllp_port), timeout=60) as sock:
        sender = threading.Thread(target=sock.sendall, args=(framed(big) + framed(normal),))
        sender.start()
        first = recv_frame(sock).decode()
        second = recv_frame(sock).decode()
        sender.join(60)
    assert msa(first) == ("AR", f"BIG{uid}") and "too large" in ack_fields(first)["ERR"][8]
    assert msa(second) == ("AA", f"N{uid}")


def test_garbage_between_frames_is_skipped(stack: Stack) -> None:
    uid = _uid()
    adt = [
        f"MSH|^~\\&|HIS|HOSP|ECGBRIDGE||20260301||ADT^A08^ADT_A01|G{uid}{i}|P|2.5.1\rEVN|A08\r".encode()
        for i in range(3)
    ]
    wire = (
        b"\r\n\x00garbage before"
        + framed(adt[0])
        + b"\xff\xfe noise \x1c\r"
        + framed(adt[1])
        + b"\x0bstarted, then restarted"
        + framed(adt[2])
    )
    with socket.create_connection(("127.0.0.1", stack.mllp_port), timeout=60) as sock:
        sock.sendall(wire)
        acks = [recv_frame(sock).decode() for _ in range(3)]
    assert [msa(a) for a in acks] == [("AA", f"G{uid}{i}") for i in range(3)]


# ----- timeouts: clean closes, no stuck listener -----------------------------------------------------------------
def test_frame_never_closed_is_dropped_after_frame_timeout_and_others_are_served(stack: Stack, tmp_path: Path) -> None:
    stalled = socket.create_connection(("127.0.0.1", stack.mllp_port), timeout=60)
    stalled.sendall(b"\x0bMSH|^~\\&|CART|WARD|ECGBRIDGE||20260301||ORU^R01|")
    uid = _uid()
    (ack,) = mllp_send(stack.mllp_port, [orm(f"S{uid}", f"PLS{uid}", f"FS{uid}").encode()], tmp_path)
    assert msa(ack)[0] == "AA"
    waited = closed_within(stalled, FRAME_TIMEOUT_S + 30)
    stalled.close()
    assert waited < FRAME_TIMEOUT_S + 30, "the stalled connection was never closed"
    (ack,) = mllp_send(stack.mllp_port, [orm(f"T{uid}", f"PLT{uid}", f"FT{uid}").encode()], tmp_path)
    assert msa(ack)[0] == "AA"


def test_a_sender_of_one_byte_a_second_does_not_block_another(stack: Stack, tmp_path: Path) -> None:
    slow = socket.create_connection(("127.0.0.1", stack.mllp_port), timeout=60)
    payload = framed(f"MSH|^~\\&|HIS|HOSP|ECGBRIDGE||20260301||ADT^A08^ADT_A01|SLOW{_uid()}|P|2.5.1\r".encode())
    stop = threading.Event()
    sent: list[int] = []

    def trickle() -> None:
        for byte in payload:
            if stop.wait(1.0):
                return
            try:
                slow.send(bytes([byte]))
                sent.append(byte)
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    time.sleep(1.5)
    uid = _uid()
    started = time.monotonic()
    acks = mllp_send(
        stack.mllp_port, [orm(f"Q{uid}{i}", f"PLQ{uid}{i}", f"FQ{uid}{i}").encode() for i in range(3)], tmp_path
    )
    elapsed = time.monotonic() - started
    assert [msa(a)[0] for a in acks] == ["AA"] * 3
    assert thread.is_alive() and len(sent) < len(payload), "the slow sender finished: the test proves nothing"
    waited = closed_within(slow, FRAME_TIMEOUT_S + 30)
    stop.set()
    slow.close()
    assert waited < FRAME_TIMEOUT_S + 30, "the slow sender was never cut off"
    assert elapsed < 60, f"the fast sender waited {elapsed:.0f} s"


def test_idle_connection_is_closed(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.mllp_port), timeout=60) as idle:
        waited = closed_within(idle, IDLE_TIMEOUT_S + 30)
    assert IDLE_TIMEOUT_S - 1 <= waited < IDLE_TIMEOUT_S + 30


# ----- character sets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "charset, codec",
    [("UNICODE UTF-8", "utf-8"), ("8859/1", "latin-1"), ("", "latin-1")],
    ids=["utf-8", "8859-1", "8859-1-undeclared"],
)
def test_non_ascii_patient_names(stack: Stack, tmp_path: Path, charset: str, codec: str) -> None:
    from ecgbridge.mapping.readers import read_ecg_bytes

    placer = f"PL{_uid()}"
    raw = oru(f"N{placer}", placer, name=NAME, charset=charset).encode(codec)
    assert NAME.encode(codec) in raw
    (ack,) = mllp_send(stack.mllp_port, [raw], tmp_path)
    assert msa(ack) == ("AA", f"N{placer}")
    fields = ack_fields(ack)["MSH"]
    assert (fields[17] if len(fields) > 17 else "") == charset
    row = wait_row(stack, placer, ("analysed", "delivered"))
    ecg = read_ecg_bytes(stack.store().read_blob(row.blob_sha256), hint="hl7")  # as the worker read it
    assert ecg.patient.name is not None and "Müller" in ecg.patient.name and "Zoë" in ecg.patient.name
    logs = stack.full_logs()
    for secret in ("Müller", "Zoë", "M\xfcller", PATIENT_ID):
        assert secret not in logs, f"PHI in the logs: {secret!r}"


# ----- a crash mid-stream ------------------------------------------------------------------------------------------
def test_gateway_killed_mid_stream_loses_nothing_acknowledged_and_duplicates_nothing(
    make_stack: Any, database_url: str | None
) -> None:
    """SIGKILL while a sender streams ORUs over one connection, then restart and resend the rest."""
    stack = make_stack(mllp_options={"enabled": True}, database_url=database_url)
    gateway = stack.start_gateway()
    gateway.wait_for_log("MLLP listener", 60)
    uid = _uid()
    messages = {f"K{uid}{i:02d}": oru(f"K{uid}{i:02d}", f"K{uid}{i:02d}").encode() for i in range(16)}
    acked: list[str] = []

    def stream() -> None:
        with socket.create_connection(("127.0.0.1", stack.mllp_port), timeout=60) as sock:
            for control, raw in messages.items():
                sock.sendall(framed(raw))
                ack = recv_frame(sock).decode()
                if msa(ack) == ("AA", control):
                    acked.append(control)

    sender = threading.Thread(target=lambda: _ignore_connection_errors(stream), daemon=True)
    sender.start()
    wait_for(lambda: len(acked) >= 4, 120, 0.05, "four acknowledged messages")
    gateway.kill()
    sender.join(30)
    got_ack = list(acked)
    assert 4 <= len(got_ack) < len(messages), "the kill did not land mid-stream"

    stack.start_worker()
    _start(stack, worker=False)  # restarted: its recovery sweep enqueues what was stored
    resend = [raw for control, raw in messages.items() if control not in got_ack]
    with socket.create_connection(("127.0.0.1", stack.mllp_port), timeout=60) as sock:
        for raw in resend:
            sock.sendall(framed(raw))
            assert msa(recv_frame(sock).decode())[0] == "AA"

    store = stack.store()
    for control in messages:
        wait_row(stack, control, ("analysed", "delivered"), timeout_s=180)
    for control in messages:
        rows = [r for r in rows_for(stack, control) if r.message_type == "ORU^R01"]
        assert len(rows) == 1, f"{control}: {len(rows)} stored messages (acknowledged: {control in got_ack})"
        assert store.get_result(rows[0].id) is not None
    assert len([r for r in store.list(limit=1000) if r.message_type == "ORU^R01"]) == len(messages)


def _ignore_connection_errors(fn: Any) -> None:
    try:
        fn()
    except (OSError, AssertionError):
        pass  # the gateway was killed under the sender


# ----- listener limits, in process ----------------------------------------------------------------------------------
def _in_process_server(tmp_path: Path, database_url: str | None, **mllp: Any) -> Any:
    from ecgbridge.core.queue import Dispatcher, make_celery
    from ecgbridge.core.settings import Settings, default_settings
    from ecgbridge.core.store import MessageStore
    from ecgbridge.gateway.mllp import MllpGateway
    from tests.support.processes import free_port

    data = default_settings().model_dump(exclude={"source_file"})
    data["listeners"]["mllp"].update({"port": 0, **mllp})
    data["broker"] = {"url": f"redis://127.0.0.1:{free_port()}/0"}  # orders need no broker
    settings = Settings.model_validate(data)
    store = MessageStore(database_url or f"sqlite:///{tmp_path / 'store.db'}", tmp_path)
    store.create_schema()
    gateway = MllpGateway(settings, store, Dispatcher(make_celery(settings)))
    gateway.start()
    return gateway


def test_address_outside_the_allowlist_is_closed_at_accept(tmp_path: Path, database_url: str | None) -> None:
    gateway = _in_process_server(tmp_path, database_url, allowed_addresses=["10.0.0.0/8"])
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(framed(orm("A1", "PLA1", "FA1").encode()))
            assert closed_within(sock, 10) < 10
        assert gateway.stats["refused_address"] == 1 and gateway.stats["frames"] == 0
    finally:
        gateway.stop()


def test_connections_beyond_the_limit_are_closed_and_the_others_keep_working(
    tmp_path: Path, database_url: str | None
) -> None:
    gateway = _in_process_server(tmp_path, database_url, max_connections=2)
    try:
        held = [socket.create_connection(("127.0.0.1", gateway.port), timeout=10) for _ in range(2)]
        wait_for(lambda: gateway.stats["connections"] == 2, 10, 0.05, "two connections served")
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as extra:
            assert closed_within(extra, 10) < 10
        held[0].sendall(framed(orm("L1", "PLL1", "FL1").encode()))
        assert msa(recv_frame(held[0]).decode()) == ("AA", "L1")
        for sock in held:
            sock.close()
        assert gateway.stats["refused_busy"] == 1
    finally:
        gateway.stop()
