"""HL7 delivery over a persistent MLLP connection, and a destination's ``max_in_flight``.

Real sockets only: python-hl7's asyncio MLLP server plays the EHR
(``tests.support.hl7_receiver``, here counting the TCP connections it accepted and the
messages it holds unanswered at once), ecgbridge's own MLLP listener plays it over TLS.
The sender is the real :class:`~ecgbridge.outbound.hl7_sender.Hl7Sender`, built by the
registry as a worker's sender pool builds it, shared by threads as a delivery worker's
thread pool shares it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import numpy as np
import pytest

from ecgbridge.core.settings import ClientTls, DestinationConfig, Hl7Destination, ListenerTls, MllpListener
from ecgbridge.errors import ConfigError, TransientDeliveryError
from ecgbridge.gateway.mllp import MllpServer
from ecgbridge.mapping.ecg import Ecg, Patient, Study
from ecgbridge.outbound.hl7_sender import Hl7Sender, control_id
from ecgbridge.outbound.mllp_client import MllpConnection
from ecgbridge.outbound.sender import Outgoing, Sender, create_sender
from ecgbridge.worker.senders import SenderPool
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.pki import Pki
from tests.support.results import sample_result

NOW = datetime(2024, 3, 1, 10, 20, 0, tzinfo=UTC)


class CountingReceiver(Hl7Receiver):
    """The test EHR, also counting connections (all, open now) and messages received but not yet answered."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.connections = 0
        self.open_now = 0
        self.unanswered = 0
        self.max_unanswered = 0

    async def _handle(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        with self._lock:
            self.connections += 1
            self.open_now += 1
        try:
            await super()._handle(reader, writer)
        finally:
            with self._lock:
                self.open_now -= 1

    def _next_answer(self) -> str:  # called under self._lock as each message arrives
        answer = super()._next_answer()
        if answer not in ("silent", "close"):
            self.unanswered += 1
            self.max_unanswered = max(self.max_unanswered, self.unanswered)
        return answer

    def _ack(self, raw: str, answer: str, n: int) -> hl7.Message:  # called just before the ACK is written
        with self._lock:
            self.unanswered -= 1
        return super()._ack(raw, answer, n)

    def drop_connections(self) -> None:
        """Close every open connection from the receiver's side (as an interface engine's idle timeout does)."""

        async def close_all() -> None:
            for writer in list(self._writers):
                writer.close()

        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(5)
        wait_until(lambda: self.open_now == 0, "the receiver closed its connections")


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.01)


def _destination(port: int, **kw: Any) -> Hl7Destination:
    return Hl7Destination(
        name="ehr", type="hl7", host="127.0.0.1", port=port, **{"ack_timeout_s": 3.0, "connect_timeout_s": 3.0, **kw}
    )


def _sender(port: int, **kw: Any) -> Hl7Sender:
    sender = create_sender(_destination(port, **kw))
    assert isinstance(sender, Hl7Sender)
    return sender


def _outgoing(i: int) -> Outgoing:
    ecg = Ecg(
        signals=np.zeros((2, 10), dtype=np.float32),
        leads=("I", "II"),
        fs=500.0,
        patient=Patient(id=f"MRN-{i:04d}", name="Doe^Jane"),
        study=Study(sop_instance_uid=f"1.2.826.0.1.3680043.8.498.{i + 1}", acquired_at=NOW),
    )
    return Outgoing(message_id=f"msg-{i:04d}", result=sample_result(message_id=f"msg-{i:04d}"), ecg=ecg, attachments={})


def _msh10(raw: str) -> str:
    return raw.replace("\n", "\r").split("\r", 1)[0].split("|")[9]


# --------------------------------------------------------------------------- one connection, reused


def test_consecutive_messages_go_over_one_connection() -> None:
    with CountingReceiver("AA") as ehr:
        sender = _sender(ehr.port)
        refs = [sender.send(_outgoing(i)) for i in range(5)]
        assert refs == [f"ACK:EHR{n:05d}" for n in range(1, 6)]
        assert ehr.connections == 1 and ehr.open_now == 1
        assert [_msh10(m) for m in ehr.received] == [control_id(f"msg-{i:04d}", "ehr") for i in range(5)]
        sender.close()
        wait_until(lambda: ehr.open_now == 0, "close() closed the connection")


def test_per_message_opens_a_connection_for_each_message() -> None:
    with CountingReceiver("AA") as ehr:
        sender = _sender(ehr.port, connection="per_message")
        for i in range(3):
            sender.send(_outgoing(i))
        assert sender.connection() is None
        assert ehr.connections == 3 and len(ehr.received) == 3


def test_the_receiver_closing_between_messages_means_a_new_connection_and_no_resend() -> None:
    with CountingReceiver("AA") as ehr:
        sender = _sender(ehr.port)
        sender.send(_outgoing(1))
        ehr.drop_connections()
        assert sender.send(_outgoing(2)) == "ACK:EHR00002"
        assert ehr.connections == 2
        assert [_msh10(m) for m in ehr.received] == [control_id("msg-0001", "ehr"), control_id("msg-0002", "ehr")]


def test_a_reused_connection_lost_before_any_answer_is_sent_once_more_on_a_new_one() -> None:
    # message 2 arrives on the connection message 1 used, and the receiver hangs up without answering:
    # nothing acknowledged it, so it goes out again (same MSH-10) on a new connection, within the same send
    with CountingReceiver("AA", first=["AA", "close"]) as ehr:
        sender = _sender(ehr.port)
        sender.send(_outgoing(1))
        assert sender.send(_outgoing(2)) == "ACK:EHR00003"
        assert ehr.connections == 2
        assert [_msh10(m) for m in ehr.received] == [control_id(f"msg-000{i}", "ehr") for i in (1, 2, 2)]


def test_a_lost_connection_is_retried_only_once_and_a_new_one_never() -> None:
    with CountingReceiver("close") as ehr:  # a new connection closed without an answer: no resend in the call
        sender = _sender(ehr.port)
        with pytest.raises(TransientDeliveryError, match="closed the connection before an ACK"):
            sender.send(_outgoing(1))
        assert len(ehr.received) == 1
    with CountingReceiver("AA", first=["AA", "close", "close"]) as ehr:  # reused, then new: one resend only
        sender = _sender(ehr.port)
        sender.send(_outgoing(1))
        with pytest.raises(TransientDeliveryError, match="closed the connection before an ACK"):
            sender.send(_outgoing(2))
        assert len(ehr.received) == 3 and ehr.connections == 2
        assert not sender.connection().is_open  # type: ignore[union-attr]
        sender.send(_outgoing(3))
        assert ehr.connections == 3


def test_a_timeout_waiting_for_the_ack_is_not_resent_and_drops_the_connection() -> None:
    with CountingReceiver("AA", first=["AA", "silent"]) as ehr:
        sender = _sender(ehr.port, ack_timeout_s=0.5)
        sender.send(_outgoing(1))
        with pytest.raises(TransientDeliveryError, match="no ACK .* within 0.5 s"):
            sender.send(_outgoing(2))
        assert len(ehr.received) == 2  # sent once: the delivery retries decide about another try
        wait_until(lambda: ehr.open_now == 0, "the timed-out connection was closed")
        assert sender.send(_outgoing(3)).startswith("ACK:")
        assert ehr.connections == 2


def test_an_ack_for_another_message_drops_the_connection() -> None:
    with CountingReceiver("AA", first=["AA", "wrong_id"]) as ehr:
        sender = _sender(ehr.port)
        sender.send(_outgoing(1))
        with pytest.raises(TransientDeliveryError, match="ACK for another message"):
            sender.send(_outgoing(2))
        connection = sender.connection()
        assert connection is not None and not connection.is_open
        wait_until(lambda: ehr.open_now == 0, "the out-of-step connection was closed")
        assert sender.send(_outgoing(2)) == "ACK:EHR00003"
        assert ehr.connections == 2


def test_ae_keeps_the_connection() -> None:
    with CountingReceiver("AA", first=["AE"]) as ehr:
        sender = _sender(ehr.port)
        with pytest.raises(TransientDeliveryError, match="AE"):
            sender.send(_outgoing(1))
        sender.send(_outgoing(1))
        assert ehr.connections == 1


def test_threads_sharing_one_sender_take_turns_on_one_connection() -> None:
    threads, each = 6, 4
    with CountingReceiver("AA", ack_delay_s=0.01) as ehr:
        sender = _sender(ehr.port)
        refs: dict[int, str] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(threads)

        def work(t: int) -> None:
            start.wait()
            for k in range(each):
                i = t * each + k
                try:
                    refs[i] = sender.send(_outgoing(i))
                except BaseException as exc:
                    errors.append(exc)

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(60)
        assert not errors
        assert len(refs) == threads * each and all(r.startswith("ACK:EHR") for r in refs.values())
        assert len(set(refs.values())) == threads * each  # each send got its own ACK
        assert ehr.connections == 1 and ehr.max_unanswered == 1
        sent = sorted(control_id(f"msg-{i:04d}", "ehr") for i in range(threads * each))
        assert sorted(_msh10(m) for m in ehr.received) == sent  # whole messages, each once
        sender.close()


def test_an_idle_connection_is_closed_and_opened_again_on_the_next_message() -> None:
    with CountingReceiver("AA") as ehr:
        sender = _sender(ehr.port, idle_close_s=0.3)
        sender.send(_outgoing(1))
        sender.send(_outgoing(2))
        assert ehr.open_now == 1
        wait_until(lambda: ehr.open_now == 0, "the idle connection was closed", timeout_s=3)
        connection = sender.connection()
        assert connection is not None and not connection.is_open
        sender.send(_outgoing(3))
        assert ehr.connections == 2 and len(ehr.received) == 3
        sender.close()


def test_the_sender_pool_closes_the_connection_when_the_destination_changes() -> None:
    with CountingReceiver("AA") as ehr:
        pool = SenderPool()
        pool.get(_destination(ehr.port)).send(_outgoing(1))
        assert ehr.open_now == 1
        pool.get(_destination(ehr.port, ack_timeout_s=5.0)).send(_outgoing(2))  # a new sender, a new connection
        wait_until(lambda: ehr.open_now == 1 and ehr.connections == 2, "the old connection was closed")
        pool.close()
        wait_until(lambda: ehr.open_now == 0, "pool.close() closed the connection")


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_persistent_mllp_over_tls_reuses_the_connection_and_reconnects_after_the_receiver_closed_it(
    pki: Pki,
) -> None:
    peers: list[str] = []

    def answer(payload: bytes, peer: str) -> bytes:
        peers.append(peer)
        control = _msh10(payload.decode())
        return f"MSH|^~\\&|EHR|H|ECGBRIDGE||20240301||ACK|A{len(peers)}|P|2.5.1\rMSA|AA|{control}\r".encode()

    tls = ListenerTls(cert_file=pki.server.cert, key_file=pki.server.key)
    server = MllpServer(MllpListener(port=0, tls=tls, idle_timeout_s=0.5), answer, lambda head, size, peer: b"")
    server.start()
    try:
        sender = _sender(server.port, tls=ClientTls(ca_file=pki.ca_file))
        assert [sender.send(_outgoing(i)) for i in range(3)] == ["ACK:A1", "ACK:A2", "ACK:A3"]
        assert len(set(peers)) == 1  # one TLS connection for all three
        time.sleep(1.2)  # the listener closes the connection idle for 0.5 s
        assert sender.send(_outgoing(3)) == "ACK:A4"
        assert len(set(peers)) == 2 and len(peers) == 4  # a new connection, and nothing sent twice
        sender.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- max_in_flight


def _concurrent_sends(sender: Sender, count: int) -> list[str]:
    refs: list[str] = []
    start = threading.Barrier(count)

    def work(i: int) -> None:
        start.wait()
        refs.append(sender.send(_outgoing(i)))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    return refs


def test_max_in_flight_caps_the_sends_to_a_destination_at_once() -> None:
    with CountingReceiver("AA", ack_delay_s=0.4) as ehr:
        capped = _sender(ehr.port, connection="per_message", max_in_flight=2)
        assert len(_concurrent_sends(capped, 6)) == 6
        assert ehr.max_unanswered == 2 and ehr.connections == 6
    with CountingReceiver("AA", ack_delay_s=0.4) as ehr:  # without the cap, the same threads send more at once
        uncapped = _sender(ehr.port, connection="per_message")
        assert len(_concurrent_sends(uncapped, 6)) == 6
        assert ehr.max_unanswered > 2


def test_a_subclass_calling_super_send_holds_one_slot_not_two() -> None:
    class Base(Sender):
        type = "slot-test"
        config_class = DestinationConfig

        def send(self, outgoing: Outgoing) -> str:
            return "base"

    class Child(Base):
        def send(self, outgoing: Outgoing) -> str:
            return "child+" + super().send(outgoing)

    sender = Child(DestinationConfig(name="x", type="slot-test", max_in_flight=1))
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(sender.send(_outgoing(1))), daemon=True)
    thread.start()
    thread.join(5)
    assert result == ["child+base"]  # no deadlock on its own slot
    assert sender.send(_outgoing(2)) == "child+base"  # and the slot was given back


# --------------------------------------------------------------------------- settings


def test_destination_settings(tmp_path: Path) -> None:
    from ecgbridge.core.settings import load_settings

    dest = _destination(2575)
    assert dest.connection == "persistent" and dest.max_in_flight is None and dest.idle_close_s == 60.0
    path = tmp_path / "ecgbridge.yaml"
    path.write_text(
        f"""data_dir: {tmp_path / "data"}
destinations:
  - {{name: ehr, type: hl7, host: 127.0.0.1, port: 2575, connection: per_message, max_in_flight: 4}}
  - {{name: fhir, type: fhir, base_url: "http://127.0.0.1:8080/fhir", max_in_flight: 3}}
""",
        encoding="utf-8",
    )
    settings = load_settings(path)
    hl7_dest = settings.destination("ehr")
    assert isinstance(hl7_dest, Hl7Destination)
    assert (hl7_dest.connection, hl7_dest.max_in_flight) == ("per_message", 4)
    assert settings.destination("fhir").max_in_flight == 3
    for bad in ("connection: pooled", "max_in_flight: 0", "idle_close_s: 0"):
        path.write_text(
            f"""data_dir: {tmp_path / "data"}
destinations:
  - name: ehr
    type: hl7
    host: 127.0.0.1
    port: 2575
    {bad}
""",
            encoding="utf-8",
        )
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert any(bad.split(":")[0] in p for p in info.value.problems), info.value.problems


def test_mllp_connection_close_while_idle_and_reuse_after_close() -> None:
    with CountingReceiver("AA") as ehr:
        connection = MllpConnection("127.0.0.1", ehr.port, connect_timeout_s=3, ack_timeout_s=3, idle_close_s=60)
        message = "MSH|^~\\&|ECGBRIDGE||TESTEHR||20240301102000+0000||ORU^R01^ORU_R01|CTRL-1|P|2.5.1\rPID|1||MRN-1\r"
        assert connection.exchange(message, "CTRL-1").code == "AA"
        connection.close()
        wait_until(lambda: ehr.open_now == 0, "close() closed the connection")
        # a thread that still had the sender sends once more: it works, and leaves no connection open
        assert connection.exchange(message, "CTRL-1").code == "AA"
        assert not connection.is_open
        wait_until(lambda: ehr.open_now == 0, "the connection after close() was closed too")
