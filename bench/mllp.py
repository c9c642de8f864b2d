"""HL7 ingest rate: ORU^R01 waveform messages per second accepted by ecgbridge's MLLP listener.

"Accepted" means what the sender's AA promises: the bytes written and fsync'ed, MSH
checked, the waveform decoded and checked as an ECG, the message recorded in SQLite,
routed and its id enqueued on a real Redis, then the ACK. Messages are one real
12-lead ECG (PTB-XL record 00024, 500 Hz, 10 s, from the DICOM fixture) written as a
chapter 7 waveform ORU^R01 by ``tests.support.hl7_waveform_writer``, each with its own MSH-10.

Beside it, in the same run and with the same client, two peers built on python-hl7's
asyncio MLLP server (``hl7.mllp.start_hl7_server``) that keep nothing: "framing" reads
the block and parses only MSH for ``create_ack()`` (the protocol cost in Python), "parse"
runs ``hl7.parse`` over the whole message first (a generic ER7 parse of 60,000
samples). Neither stores, validates or decodes the ECG: they are floors, not HL7
engines doing our job.

    python -m bench.mllp [--n 60] [--senders 1 8] [--record FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from ecgbridge.mapping.hl7_common import FRAME_END, frame
from tests.support.processes import REPO, EcgbridgeProcess, RedisServer, free_port, wait_for, write_config

from .common import percentile

__all__ = ["main", "build_messages", "run_senders", "serve_peer"]

DEFAULT_RECORD = REPO / "tests" / "fixtures" / "dicom" / "ptbxl_00024_norm_12lead.dcm"
_TEMPLATE_ID = "BENCH0000000000"


def build_messages(record: Path, n: int) -> list[bytes]:
    """``n`` ORU^R01 of one real ECG, differing in MSH-10 only (built once: hl7apy is slow)."""
    from ecgbridge.mapping.ecg import Patient
    from ecgbridge.mapping.readers import read_ecg_file
    from tests.support.hl7_waveform_writer import build_oru_waveform

    ecg = read_ecg_file(record)
    ecg = replace(ecg, patient=Patient(id="BENCH-0001", name="Bench^Test"))
    template = build_oru_waveform(ecg, control_id=_TEMPLATE_ID)
    assert template.count(_TEMPLATE_ID) == 1
    return [template.replace(_TEMPLATE_ID, f"BENCH{i:010d}").encode() for i in range(n)]


def _recv_ack(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(FRAME_END):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the ACK")
        buf += chunk
    return buf


def run_senders(port: int, messages: list[bytes], senders: int) -> tuple[float, list[float], int]:
    """Send ``messages`` over ``senders`` parallel connections, each waiting for every ACK.

    Returns (seconds for all, per-message ACK latencies, number of AA / CA answers).
    """
    chunks = [messages[i::senders] for i in range(senders)]
    latencies: list[float] = []
    accepted = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def send(chunk: list[bytes]) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
                for raw in chunk:
                    t0 = time.perf_counter()
                    sock.sendall(frame(raw))
                    ack = _recv_ack(sock)
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        accepted[0] += b"MSA|AA|" in ack or b"MSA|CA|" in ack
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(c,)) for c in chunks if c]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a sender failed: {errors[0]!r}")
    return elapsed, latencies, accepted[0]


def serve_peer(port: int, mode: str = "parse") -> None:
    """python-hl7's asyncio MLLP server, keeping nothing.

    ``parse``: ``readmessage()`` (whole message through ``hl7.parse``) then ``create_ack()``;
    ``framing``: ``readblock()``, only MSH parsed, ``create_ack()``: MLLP and the ACK alone.
    """
    import hl7
    import hl7.mllp

    async def handle(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                if mode == "parse":
                    message = await reader.readmessage()
                else:
                    block = await reader.readblock()
                    message = hl7.parse(block.split(b"\r", 1)[0].decode("utf-8"))
                writer.writemessage(message.create_ack())
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await hl7.mllp.start_hl7_server(handle, "127.0.0.1", port, limit=64 * 1024 * 1024, encoding="utf-8")
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _measure_peer(messages: list[bytes], senders: int, mode: str) -> float:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.mllp", "--serve-peer", str(port), "--peer-mode", mode], cwd=REPO
    )
    try:
        wait_for(lambda: _listening(port), 30, 0.1, "python-hl7's MLLP server")
        elapsed, _, accepted = run_senders(port, messages, senders)
        if accepted != len(messages):
            raise RuntimeError(f"python-hl7's server acknowledged {accepted} of {len(messages)}")
        return len(messages) / elapsed
    finally:
        proc.terminate()
        proc.wait(10)


def _measure_ours(tmp: Path, redis_url: str, messages: list[bytes], senders: int) -> tuple[float, list[float]]:
    port = free_port()
    data_dir = tmp / f"gw{senders}"
    cfg = write_config(
        tmp / f"gw{senders}.yaml",
        {
            "data_dir": str(data_dir),
            "listeners": {
                "dicom": {"port": free_port()},
                "mllp": {"enabled": True, "port": port, "max_connections": 64},
            },
            "broker": {"url": redis_url},
            "log_level": "WARNING",
        },
    )
    gw = EcgbridgeProcess(["gateway", "--config", str(cfg)], tmp / f"gw{senders}.log").start()
    try:
        wait_for(lambda: _listening(port), 60, 0.2, "the ecgbridge gateway's MLLP listener")
        elapsed, latencies, accepted = run_senders(port, messages, senders)
    finally:
        gw.stop()
    if accepted != len(messages):
        raise RuntimeError(f"ecgbridge acknowledged {accepted} of {len(messages)}:\n{gw.log_text()[-2000:]}")
    _check_stored(cfg, len(messages))
    return len(messages) / elapsed, latencies


def _check_stored(cfg: Path, expected: int) -> None:
    """Every acknowledged message is in the store and queued: the figure counts real work."""
    from ecgbridge.core.settings import load_settings
    from ecgbridge.core.store import MessageStore

    s = load_settings(cfg)
    rows = MessageStore(s.database_url, s.data_dir).list(limit=expected + 10)
    queued = sum(1 for r in rows if r.state == "queued" and r.message_type == "ORU^R01")
    if queued != expected:
        raise RuntimeError(f"{queued} of {expected} acknowledged messages are stored and queued")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=60, help="messages per measurement")
    parser.add_argument("--senders", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--record", type=Path, default=DEFAULT_RECORD, help="DICOM ECG or WFDB .hea")
    parser.add_argument("--serve-peer", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--peer-mode", default="parse", choices=["parse", "framing"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_peer:
        serve_peer(args.serve_peer, args.peer_mode)
        return

    messages = build_messages(args.record, args.n)
    size_kb = len(messages[0]) / 1024
    rows = []
    redis = RedisServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            for senders in args.senders:
                framing = _measure_peer(messages, senders, "framing")
                parse = _measure_peer(messages, senders, "parse")
                ours, latencies = _measure_ours(Path(tmp_name), redis.url, messages, senders)
                rows.append((senders, framing, parse, ours, percentile(latencies, 50), percentile(latencies, 95)))
    finally:
        redis.stop()

    print(
        f"HL7 ORU^R01 waveform ingest, {args.n} messages of {size_kb:.0f} kB ({args.record.name}), "
        f"one connection per sender, {time.strftime('%Y-%m-%d')}"
    )
    print("peers: python-hl7 asyncio MLLP server keeping nothing; 'framing' parses only MSH for its ACK,")
    print("       'parse' runs hl7.parse on the whole message; neither stores, validates or decodes the ECG")
    print(
        f"{'senders':>7}  {'py-hl7 framing/s':>16}  {'py-hl7 parse/s':>14}  {'ecgbridge/s':>11}  "
        f"{'p50 ms':>7}  {'p95 ms':>7}"
    )
    for senders, framing, parse, ours, p50, p95 in rows:
        print(f"{senders:>7}  {framing:>16.1f}  {parse:>14.1f}  {ours:>11.1f}  {p50 * 1000:>7.0f}  {p95 * 1000:>7.0f}")


if __name__ == "__main__":
    main()
