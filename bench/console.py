"""The console at 100 000 messages: message-list and ECG-viewer latency over HTTP, and its memory.

For SQLite and for PostgreSQL (a fresh schema in database ``test`` at 127.0.0.1:5432, user
postgres or root, dropped afterwards), in one run:

1. seed ``--n`` messages with their deliveries, events and results by bulk inserts (one of
   them the real PTB-XL 12-lead DICOM ECG with a heatmaps artifact, for the viewer);
2. start the console in a process of its own, as a gateway would: RSS is read once the
   gateway's modules are imported and the store is open (before), once the console
   listens (started), and after every request below (after; also the peak);
3. ask ``GET /api/messages`` (signed in as a viewer, one keep-alive connection) ``--reps``
   times per filter (varied values), follow the cursor deep, walk all rows by cursor in
   pages of 200, and ask ``GET /api/messages/{id}/ecg``;
4. beside each, the peers in this process on the same database: ``search_messages`` (the
   same SQLAlchemy query the API runs, without HTTP) and the exact SQL it sends, run
   through the driver (``exec_driver_sql``, rows fetched, no ORM); ``viewer_payload`` for the viewer.

Targets: list p95 < 200 ms, viewer p95 < 300 ms, the console adds at most 50 MB. A plan
(EXPLAIN) is printed for every list case whose HTTP p95 misses the target (all with --explain).

    python -m bench.console [--n 100000] [--reps 30] [--db sqlite postgresql] [--explain]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import event, insert, select, text

from ecgbridge.core.queries import MessageFilter, encode_cursor, search_messages
from ecgbridge.core.store import DeliveryRow, EventRow, MessageRow, MessageStore, ResultRow
from tests.support.processes import REPO, free_port, write_config
from tests.support.stores import PostgresUnavailable, postgres_schema

from .common import percentile

__all__ = ["main", "seed"]

ECG = REPO / "tests" / "fixtures" / "dicom" / "ptbxl_00024_norm_12lead.dcm"
PASSWORD = "bench password 12345"
LIST_P95_MS = 200.0
VIEWER_P95_MS = 300.0
CONSOLE_MB = 50.0
ROUTES = {
    "carts-ed": ["ehr"],
    "carts-wards": ["ehr", "ehr-hl7"],
    "muse": ["ehr-hl7"],
    "cardiology": ["ehr", "archive"],
    "research": [],
}
STATES = [("delivered", 85), ("failed", 4), ("analysed", 3), ("unrouted", 3), ("rejected", 2), ("queued", 2)]
STATES += [("received", 1)]
CARTS = [f"CART{i:02d}@10.1.{i}.20" for i in range(60)]
HL7_SENDERS = ["MUSE@10.2.0.5", "EPIC@10.2.0.9", "CARDIOSOFT@10.2.0.12"]
SPAN = timedelta(days=90)

# --------------------------------------------------------------------------- seeding


def _result(mid: str, i: int) -> dict[str, Any]:
    """About 1.5 kB, shaped like a diagnosis + measurements result."""
    rnd = random.Random(i)
    return {
        "message_id": mid,
        "label": "AI-generated, not for clinical use",
        "quality_flags": [] if i % 17 else ["poor_quality"],
        "ecg_flags": [],
        "attachments": [
            {"content_type": ct, "title": t, "blob_sha256": hashlib.sha256(f"{i}{ct}".encode()).hexdigest(), "size": s}
            for ct, t, s in (("application/pdf", "report", 61234), ("image/png", "12-lead", 184321))
        ],
        "outputs": [
            {
                "model": "diagnosis",
                "version": "0.1.1",
                "task": "diagnosis",
                "extra": {"cam_peak_s": {"MI": 3.2}},
                "findings": [
                    {"code": c, "display": c, "probability": round(rnd.random(), 4), "threshold": 0.5, "present": False}
                    for c in ("NORM", "MI", "STTC", "CD", "HYP")
                ],
            },
            {
                "model": "measurements",
                "version": "1.0",
                "task": "measurements",
                "findings": [],
                "extra": {
                    "measurements": {
                        k: rnd.randint(lo, hi)
                        for k, lo, hi in (
                            ("heart_rate", 45, 120),
                            ("pr_interval", 120, 220),
                            ("qrs_duration", 70, 140),
                            ("qt_interval", 340, 460),
                            ("qtc_interval", 380, 480),
                            ("qrs_axis", -30, 90),
                        )
                    }
                },
            },
        ],
    }


def _heatmaps() -> bytes:
    rnd = random.Random(1)
    classes = {
        c: {"display": c, "probability": 0.2, "present": False, "t0_s": 0.0, "step_s": 0.3125}
        | {"values": [round(rnd.random(), 3) for _ in range(32)]}
        for c in ("NORM", "MI", "STTC", "CD", "HYP")
    }
    return json.dumps(
        {"model": "diagnosis", "version": "0.1.1", "window_s": 10.0, "top": "MI", "classes": classes}
    ).encode()


def seed(store: MessageStore, n: int, *, chunk: int = 5000) -> dict[str, Any]:
    """``n`` messages over 90 days with deliveries, events and results; returns what the cases ask for."""
    rnd = random.Random(42)
    end = datetime.now(UTC).replace(microsecond=0)
    step = SPAN / n
    ecg_sha, ecg_size = store.save_blob(ECG.read_bytes())
    samples: dict[str, list[str]] = {"sop": [], "order": [], "id": []}
    viewer_id = ""
    msgs: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    weights = [w for _, w in STATES]
    names = [s for s, _ in STATES]

    def flush() -> None:
        with store.engine.begin() as conn:
            for table, rows in (
                (MessageRow, msgs),
                (ResultRow, results),
                (DeliveryRow, deliveries),
                (EventRow, events),
            ):
                if rows:
                    conn.execute(insert(table), rows)
        for rows in (msgs, results, deliveries, events):
            rows.clear()

    for i in range(n):
        mid = str(uuid.uuid4())
        at = end - SPAN + i * step + timedelta(milliseconds=rnd.randint(0, 999))
        state = rnd.choices(names, weights)[0]
        source = rnd.choices(["dicom", "hl7", "file"], [70, 25, 5])[0]
        remote = (
            rnd.choice(CARTS)
            if source == "dicom"
            else rnd.choice(HL7_SENDERS)
            if source == "hl7"
            else f"export-{i:06d}.xml"
        )
        route = None if state in ("unrouted", "rejected") else rnd.choice(list(ROUTES))
        sop = f"1.2.826.0.1.3680043.8.498.{i + 10_000_000}"
        placer = f"ORD{i:08d}" if rnd.random() < 0.6 else None
        real = i == n - 10  # the viewer's ECG: real bytes, near the top of the list
        if real:
            viewer_id, state, source, route = mid, "delivered", "dicom", "carts-ed"
        msgs.append(
            {
                "id": mid,
                "received_at": at,
                "updated_at": at + timedelta(seconds=5),
                "source": source,
                "remote": remote,
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.9.1.1" if source == "dicom" else None,
                "sop_instance_uid": sop,
                "blob_sha256": ecg_sha if real else hashlib.sha256(mid.encode()).hexdigest(),
                "blob_size": ecg_size if real else 284_000,
                "state": state,
                "route": route,
                "error": "delivery to ehr dead-lettered: connection refused" if state == "failed" else None,
                "flags": ["poor_quality"] if i % 17 == 0 else [],
                "placer_order_number": placer,
                "filler_order_number": None,
                "message_type": "ORU^R01" if source == "hl7" else None,
            }
        )
        events.append({"message_id": mid, "at": at, "level": "info", "kind": "received", "detail": f"from {source}"})
        if state in ("delivered", "failed", "analysed"):
            results.append(
                {
                    "message_id": mid,
                    "created_at": at + timedelta(seconds=2),
                    "models": "diagnosis@0.1.1",
                    "result": _result(mid, i),
                }
            )
            for dest in ROUTES[route or "research"]:
                dstate = {"delivered": "delivered", "analysed": "pending"}.get(state, rnd.choice(["dead", "failed"]))
                deliveries.append(
                    {
                        "message_id": mid,
                        "destination": dest,
                        "state": dstate,
                        "attempts": 1 if dstate == "delivered" else 10,
                        "last_error": None if dstate == "delivered" else "connection refused",
                        "remote_ref": f"DiagnosticReport/{i}" if dstate == "delivered" else None,
                        "updated_at": at + timedelta(seconds=4),
                    }
                )
                if dstate != "delivered":
                    events.append(
                        {
                            "message_id": mid,
                            "at": at + timedelta(seconds=4),
                            "level": "error",
                            "kind": "dead_letter",
                            "detail": f"{dest}: connection refused",
                        }
                    )
        if rnd.random() < 0.01:
            samples["sop"].append(sop)
            samples["id"].append(mid[:8])
            if placer:
                samples["order"].append(placer)
        if len(msgs) >= chunk:
            flush()
    flush()
    store.save_artifact(viewer_id, "heatmaps", _heatmaps())
    return {"viewer_id": viewer_id, "end": end, **samples}


# --------------------------------------------------------------------------- the console in its own process


def _rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _serve(config: str) -> None:
    """Child mode: open the store as a gateway does, say the RSS, start the console, say it again, wait."""
    from ecgbridge.core.accounts import AccountStore
    from ecgbridge.core.live import LiveSettings
    from ecgbridge.core.queue import Dispatcher, make_celery
    from ecgbridge.core.settings import load_settings

    for listener in ("dicom_scp", "mllp", "hl7_inbound", "inbox"):  # what a gateway holds before its console
        importlib.import_module(f"ecgbridge.gateway.{listener}")
    settings = load_settings(config)
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    accounts = AccountStore(store)
    dispatcher = Dispatcher(make_celery(settings))
    store.get("00000000-0000-0000-0000-000000000000")  # the pool's first connection
    print(f"before {_rss_mb(os.getpid())[0]:.1f}", flush=True)
    from ecgbridge.gateway.console.context import ConsoleContext
    from ecgbridge.gateway.console.server import ConsoleServer

    server = ConsoleServer(ConsoleContext(LiveSettings(settings), store, dispatcher, accounts))
    server.start()
    print(f"started {_rss_mb(os.getpid())[0]:.1f} {server.port}", flush=True)
    sys.stdin.read()  # until the parent closes it
    server.stop()


@contextmanager
def _console(config: Path) -> Iterator[tuple[subprocess.Popen[str], str, float, float]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.console", "--serve", str(config)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        before = float(proc.stdout.readline().split()[1])
        _, started, port = proc.stdout.readline().split()
        yield proc, f"http://127.0.0.1:{port}", before, float(started)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- measuring


def _ms(fn: Callable[[], Any], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _p(values: list[float]) -> str:
    return f"{percentile(values, 50):7.1f} {percentile(values, 95):7.1f}"


def _filter(params: dict[str, str]) -> MessageFilter:
    keys = {"q": "query"}
    values: dict[str, Any] = {keys.get(k, k): v for k, v in params.items() if k not in ("cursor", "limit")}
    for k in ("since", "until"):
        if k in values:
            values[k] = datetime.fromisoformat(values[k])
    return MessageFilter(**values)


def _cases(samples: dict[str, Any], store: MessageStore) -> list[tuple[str, Callable[[int], dict[str, str]]]]:
    """(name, i -> query parameters) of every list case; values vary between repetitions."""
    end: datetime = samples["end"]
    with store.session() as s:  # a cursor 90 % deep, and one of delivered messages 90 % deep
        deep = s.scalars(
            select(MessageRow)
            .order_by(MessageRow.received_at.desc(), MessageRow.id.desc())
            .offset(int(0.9 * _count(store)))
            .limit(1)
        ).one()
        deep_delivered = s.scalars(
            select(MessageRow)
            .where(MessageRow.state == "delivered")
            .order_by(MessageRow.received_at.desc(), MessageRow.id.desc())
            .offset(80_000 * _count(store) // 100_000)
            .limit(1)
        ).one()
    states = ["failed", "delivered", "queued", "unrouted", "analysed"]
    routes = list(ROUTES)
    dests = ["ehr", "ehr-hl7", "archive"]

    def day(i: int) -> dict[str, str]:
        start = end - timedelta(days=1 + (i * 7) % 85)
        return {"since": start.isoformat(), "until": (start + timedelta(days=1)).isoformat()}

    def q(i: int) -> str:
        pool = [samples["sop"], samples["order"], samples["id"]][i % 3]
        return str(pool[i % len(pool)])

    return [
        ("no filter, first page", lambda i: {}),
        ("state", lambda i: {"state": states[i % len(states)]}),
        ("route", lambda i: {"route": routes[i % len(routes)]}),
        ("destination", lambda i: {"destination": dests[i % len(dests)]}),
        ("destination + delivery_state=dead", lambda i: {"destination": dests[i % 2], "delivery_state": "dead"}),
        ("sender (substring)", lambda i: {"sender": CARTS[i % len(CARTS)].split("@")[0]}),
        ("time range (1 day)", day),
        ("q: SOP UID / order number / id prefix", lambda i: {"q": q(i)}),
        ("state + route + time range", lambda i: {"state": "delivered", "route": routes[i % 4], **day(i)}),
        ("cursor 90 % deep, no filter", lambda i: {"cursor": encode_cursor(deep)}),
        (
            "cursor 80 % deep, state=delivered",
            lambda i: {"state": "delivered", "cursor": encode_cursor(deep_delivered)},
        ),
    ]


def _count(store: MessageStore) -> int:
    with store.session() as s:
        return int(s.scalar(text("SELECT count(*) FROM messages")) or 0)


def _captured_sql(store: MessageStore, f: MessageFilter, cursor: str | None) -> tuple[str, Any]:
    seen: list[tuple[str, Any]] = []

    def grab(_conn: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", grab)
    try:
        search_messages(store, f, limit=50, cursor=cursor)
    finally:
        event.remove(store.engine, "before_cursor_execute", grab)
    return next((st, p) for st, p in reversed(seen) if "FROM messages" in st)


def _plan(store: MessageStore, sql: str, params: Any) -> list[str]:
    prefix = "EXPLAIN QUERY PLAN " if store.engine.dialect.name == "sqlite" else "EXPLAIN (ANALYZE, BUFFERS) "
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + sql, params).fetchall()
    return [" | ".join(str(c) for c in (r[-1:] if store.engine.dialect.name == "sqlite" else r)) for r in rows]


def _bench_db(label: str, url: str, work: Path, n: int, reps: int, explain: bool) -> dict[str, Any]:
    data = work / label
    store = MessageStore(url, data)
    store.create_schema()
    t = time.perf_counter()
    samples = seed(store, n)
    seeded_s = time.perf_counter() - t
    if store.engine.dialect.name == "postgresql":
        with store.engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    from ecgbridge.core.accounts import AccountStore, Role

    AccountStore(store).create_user("viewer", PASSWORD, Role.VIEWER)
    counts = {name: _table_count(store, name) for name in ("messages", "deliveries", "events", "results")}
    print(f"\n== {label}: seeded {counts} in {seeded_s:.0f} s", flush=True)
    config = write_config(
        work / f"{label}.yaml",
        {
            "data_dir": str(data),
            "storage": {"database_url": url},
            "broker": {"url": f"redis://127.0.0.1:{free_port()}/0"},
            "console": {"host": "127.0.0.1", "port": 0},
            "log_level": "WARNING",
        },
    )
    out: dict[str, Any] = {"db": label, "seeded": counts, "seed_s": seeded_s, "cases": []}
    with _console(config) as (proc, base, rss_before, rss_started), httpx.Client(base_url=base, timeout=60) as http:
        answer = http.post("/login", data={"username": "viewer", "password": PASSWORD, "next": "/"})
        assert answer.status_code == 303, answer.text[:300]
        signed_in = _rss_mb(proc.pid)
        print(f"RSS after one sign-in: {signed_in[0]:.1f} MB, peak so far {signed_in[1]:.1f} MB (argon2id hashing)")

        def get(path: str, params: dict[str, str] | None = None) -> httpx.Response:
            r = http.get(path, params=params)
            assert r.status_code == 200, (path, params, r.status_code, r.text[:300])
            return r

        get("/api/messages")  # warm: first request imports and compiles
        print(f"{'case':<40} {'HTTP p50 p95 ms':>16} {'search_messages':>16} {'driver SQL':>16}  rows", flush=True)
        for name, params_of in _cases(samples, store):
            http_ms: list[float] = []
            orm_ms: list[float] = []
            sql_ms: list[float] = []
            rows = 0
            for i in range(reps):
                params = params_of(i)
                t0 = time.perf_counter()
                rows = len(get("/api/messages", params).json()["messages"])
                http_ms.append((time.perf_counter() - t0) * 1000)
                f, cursor = _filter(params), params.get("cursor")
                t0 = time.perf_counter()
                search_messages(store, f, limit=50, cursor=cursor)
                orm_ms.append((time.perf_counter() - t0) * 1000)
                sql, sql_params = _captured_sql(store, f, cursor)
                with store.engine.connect() as conn:
                    t0 = time.perf_counter()
                    conn.exec_driver_sql(sql, sql_params).fetchall()
                    sql_ms.append((time.perf_counter() - t0) * 1000)
            print(f"{name:<40} {_p(http_ms):>16} {_p(orm_ms):>16} {_p(sql_ms):>16}  {rows}", flush=True)
            out["cases"].append({"case": name, "http": http_ms, "orm": orm_ms, "sql": sql_ms})
            if explain or percentile(http_ms, 95) > LIST_P95_MS:
                sql, sql_params = _captured_sql(store, _filter(params_of(0)), params_of(0).get("cursor"))
                for line in _plan(store, sql, sql_params):
                    print(f"      plan: {line}")

        # follow the cursor 100 pages deep (5000 rows), as an operator paging on would
        page_ms: list[float] = []
        params: dict[str, str] = {}
        for _ in range(100):
            t0 = time.perf_counter()
            body = get("/api/messages", params).json()
            page_ms.append((time.perf_counter() - t0) * 1000)
            params = {"cursor": body["next_cursor"]}
        print(f"{'paging on by cursor, 100 pages of 50':<40} {_p(page_ms):>16}", flush=True)
        out["paging"] = page_ms

        # every message, by cursor, 200 a page: memory must not grow with the rows walked
        walked, pages, params = 0, 0, {"limit": "200"}
        t0 = time.perf_counter()
        while True:
            body = get("/api/messages", params).json()
            walked += len(body["messages"])
            pages += 1
            if not body["next_cursor"]:
                break
            params = {"limit": "200", "cursor": body["next_cursor"]}
        walk_s = time.perf_counter() - t0
        rss_walk = _rss_mb(proc.pid)[0]
        print(f"walked all {walked} messages in {pages} pages of 200 in {walk_s:.1f} s; RSS then {rss_walk:.1f} MB")
        out["walk"] = {"messages": walked, "pages": pages, "s": walk_s, "rss_mb": rss_walk}

        # the viewer: one real ECG (PTB-XL 12-lead, 500 Hz, 10 s) with its heatmaps
        from ecgbridge.gateway.console.viewer import viewer_payload

        vid = samples["viewer_id"]
        get(f"/api/messages/{vid}/ecg")
        viewer_ms: list[float] = []
        size = 0
        for _ in range(reps):
            t0 = time.perf_counter()
            size = len(get(f"/api/messages/{vid}/ecg").content)
            viewer_ms.append((time.perf_counter() - t0) * 1000)
        payload_ms = _ms(lambda: viewer_payload(store, vid), reps)
        dumps_ms = _ms(lambda: json.dumps(viewer_payload(store, vid)), reps)
        print(f"{'viewer GET /api/messages/{id}/ecg':<40} {_p(viewer_ms):>16}  ({size / 1000:.0f} kB JSON)")
        print(f"{'  peer: viewer_payload() in process':<40} {_p(payload_ms):>16}")
        print(f"{'  peer: viewer_payload() + json.dumps':<40} {_p(dumps_ms):>16}")
        out["viewer"] = {"http": viewer_ms, "payload": payload_ms, "dumps": dumps_ms, "bytes": size}
        rss_after, rss_peak = _rss_mb(proc.pid)
    out["rss"] = {
        "before": rss_before,
        "started": rss_started,
        "signed_in": signed_in[0],
        "peak_after_sign_in": signed_in[1],
        "after": rss_after,
        "peak": rss_peak,
    }
    print(
        f"RSS of the serving process: {rss_before:.1f} MB before the console, {rss_started:.1f} MB once it listens "
        f"(+{rss_started - rss_before:.1f}), {rss_after:.1f} MB after the requests (+{rss_after - rss_before:.1f} "
        f"in all; peak {rss_peak:.1f}); target: at most +{CONSOLE_MB:.0f} MB"
    )
    worst = max(percentile(c["http"], 95) for c in out["cases"])
    print(
        f"targets: list p95 worst {worst:.0f} ms (< {LIST_P95_MS:.0f}: {'met' if worst < LIST_P95_MS else 'MISSED'}); "
        f"viewer p95 {percentile(viewer_ms, 95):.0f} ms (< {VIEWER_P95_MS:.0f}: "
        f"{'met' if percentile(viewer_ms, 95) < VIEWER_P95_MS else 'MISSED'}); console memory "
        f"+{rss_after - rss_before:.1f} MB ({'met' if rss_after - rss_before <= CONSOLE_MB else 'MISSED'})"
    )
    store.engine.dispose()
    return out


def _table_count(store: MessageStore, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0)


@contextmanager
def _postgres() -> Iterator[str]:
    """A fresh schema in database ``test`` (dropped afterwards); exits when there is no server."""
    try:
        with postgres_schema("bench") as (url, version):
            print(f"PostgreSQL {version} at 127.0.0.1:5432 ({url.split('?')[0].split('//')[1].split('@')[0]})")
            yield url
    except PostgresUnavailable as exc:
        raise SystemExit(str(exc)) from None


def _machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    mem = next(
        line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return f"{os.cpu_count()} cores, {model}, {int(mem) / 1024 / 1024:.0f} GiB; Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="messages to seed")
    parser.add_argument("--reps", type=int, default=30, help="requests per list case and for the viewer")
    parser.add_argument("--db", nargs="+", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    parser.add_argument("--explain", action="store_true", help="print the plan of every list case")
    parser.add_argument("--json", metavar="FILE", help="also write every timing to FILE")
    parser.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _serve(args.serve)
        return
    print(_machine())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for db in args.db:
            if db == "sqlite":
                results.append(
                    _bench_db(
                        "sqlite", f"sqlite:///{work / 'sqlite' / 'ecgbridge.db'}", work, args.n, args.reps, args.explain
                    )
                )
            else:
                with _postgres() as url:
                    results.append(_bench_db("postgresql", url, work, args.n, args.reps, args.explain))
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=str, indent=1))


if __name__ == "__main__":
    main()
