"""End-to-end latency and throughput: C-STORE response -> DiagnosticReport created on the FHIR server.

A real redis-server, W `ecgbridge worker` processes, an `ecgbridge gateway`, the
Medplum FHIR server; N ECGs sent one by one with pynetdicom. Latency per ECG =
time the FHIR delivery was recorded in the store minus the time the C-STORE
success came back to the sender.

    python -m bench.e2e [--n 50] [--workers 1] [--interval S] [--lvef] [--fhir-latency-ms MS] [--layout all|split|both]
                        [--write-mode auto|individual|batch|transaction] [--no-report] [--delivery-threads N]
                        [--drain-deliveries] [--plots DIR]

``--fhir-latency-ms`` puts a proxy in front of the FHIR server that holds every request
that long, as a real EHR's FHIR API answers in 100-300 ms; ``--layout both`` measures the
workers analysing and delivering in one process pool, then analysis workers beside a
delivery worker (a thread pool), in the same run.

``--no-report``: the FHIR destination takes no ``presentedForm`` (so no report is drawn);
``--write-mode``: how each report is written (default ``auto``: what the server's
CapabilityStatement offers). ``--drain-deliveries`` (split layout): the delivery worker
starts only once every ECG is analysed, so its throughput (reports written per second) is
measured alone. ``--plots DIR`` writes the latency distribution and the reports delivered
over time as PNGs.

``--lvef`` routes every ECG through diagnosis + triage + LVEF with the patient's EHR
context read from the same FHIR server (``--patients`` seeded heart-failure patients, the ECGs
dealt among them in turn; one patient's every search would also find the heart rate of every
report written before, a history no real patient has), so the latency
includes the EHR fetch and the second PDF page.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.support import ehr_bundles
from tests.support.fhir_server import FhirServer, node_available
from tests.support.http_peers import FaultProxy
from tests.support.processes import RedisServer, wait_for
from tests.support.stack import Stack

from .common import percentile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (analysis workers with --layout split)"
    )
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between sends (0: back to back)")
    parser.add_argument("--lvef", action="store_true", help="diagnosis + triage + LVEF with EHR context")
    parser.add_argument("--patients", type=int, default=1, help="--lvef: seeded patients the ECGs are dealt among")
    parser.add_argument("--triage", action="store_true", help="diagnosis + triage (no EHR context)")
    parser.add_argument(
        "--fhir-latency-ms", type=float, default=0.0, help="hold every FHIR request this long (a real EHR's API)"
    )
    parser.add_argument(
        "--layout",
        choices=("all", "split", "both"),
        default="all",
        help="all: workers analyse and deliver; split: analysis workers + one delivery worker (threads); "
        "both: run each in turn and print them side by side",
    )
    parser.add_argument("--write-mode", choices=("auto", "individual", "batch", "transaction"), default="auto")
    parser.add_argument("--no-report", action="store_true", help="no presentedForm: no PDF / PNG drawn")
    parser.add_argument("--delivery-threads", type=int, default=8, help="threads of the delivery worker (split)")
    parser.add_argument(
        "--drain-deliveries", action="store_true", help="split: start the delivery worker once all are analysed"
    )
    parser.add_argument("--plots", type=Path, default=None, help="write the latency and throughput plots here")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="the store in a fresh database on PostgreSQL at 127.0.0.1:5432 (default: SQLite in the data directory)",
    )
    args = parser.parse_args()
    # Stopped from outside (kill, python -m bench interrupted): unwind, so the finally blocks stop the
    # gateway, workers, Redis and the FHIR server instead of leaving them running on the machine.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.drain_deliveries and args.layout != "split":
        parser.error("--drain-deliveries needs --layout split")
    reason = node_available()
    if reason:
        raise SystemExit(reason)
    layouts = ["all", "split"] if args.layout == "both" else [args.layout]
    figures = [run_once(args, layout) for layout in layouts]
    what = (
        "diagnosis + triage + LVEF with EHR context"
        if args.lvef
        else "diagnosis + triage"
        if args.triage
        else "diagnosis"
    )
    print(
        f"end to end ({what}), {args.n} x 12-lead ECG, "
        f"{'back to back' if not args.interval else f'every {args.interval}s'}, "
        f"FHIR latency {args.fhir_latency_ms:g} ms per request, write mode {args.write_mode} "
        f"({', '.join(sorted(set(f['modes'] for f in figures)))}), "
        f"{'no report drawn' if args.no_report else 'PDF + PNG report in presentedForm'}, "
        f"store {'PostgreSQL' if args.postgres else 'SQLite'}, {time.strftime('%Y-%m-%d')}"
    )
    for layout, f in zip(layouts, figures, strict=True):
        workers = (
            f"{args.workers} worker process(es) analysing and delivering"
            if layout == "all"
            else f"{args.workers} analysis worker(s) + 1 delivery worker ({args.delivery_threads} threads)"
        )
        print(f"- {workers}:")
        print(
            f"  latency C-STORE response -> DiagnosticReport created: p50 {f['p50']:.3f} s, "
            f"p95 {f['p95']:.3f} s, max {f['max']:.3f} s"
        )
        print(
            f"  of which response -> result saved: p50 {f['analysed_p50']:.3f} s; "
            f"result saved -> report created: p50 {f['delivering_p50']:.3f} s, p95 {f['delivering_p95']:.3f} s"
        )
        print(f"  throughput: {f['throughput']:.2f} ECGs/s ({args.n} in {f['elapsed']:.1f} s)")
        print(f"  the slowest ECG's events (seconds after its C-STORE response): {f['slowest']}")
        if args.drain_deliveries:
            print(
                f"  deliveries alone (the delivery worker started after all {args.n} were analysed): "
                f"{f['delivery_rate']:.2f} reports/s ({args.n + 1} in {f['delivery_elapsed']:.1f} s, from its start)"
            )
    if args.plots is not None:
        for path in _plots(args, layouts, figures):
            print(f"plot: {path}")


def _plots(args: argparse.Namespace, layouts: list[str], figures: list[dict]) -> list[Path]:  # type: ignore[type-arg]
    """The latency distribution and the reports delivered over time, one line per layout, as PNGs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    args.plots.mkdir(parents=True, exist_ok=True)
    tag = (
        f"e2e-{args.fhir_latency_ms:g}ms-{args.write_mode}"
        + ("-noreport" if args.no_report else "")
        + ("-drain" if args.drain_deliveries else "")
        + (f"-every{args.interval:g}s" if args.interval else "")
        + ("-lvef" if args.lvef else "-triage" if args.triage else "")
    )
    written = []
    for kind in ("latency", "throughput"):
        fig = Figure(figsize=(6.4, 3.6), dpi=100)
        ax = fig.add_subplot()
        for layout, f in zip(layouts, figures, strict=True):
            if kind == "latency":
                ax.hist(f["latencies"], bins=20, alpha=0.6, label=layout)
                ax.set_xlabel("C-STORE response -> DiagnosticReport created (s)")
                ax.set_ylabel("ECGs")
            else:
                done = sorted(f["done_offsets"])
                ax.step(done, range(1, len(done) + 1), where="post", label=layout)
                ax.set_xlabel("seconds since the first ECG was sent")
                ax.set_ylabel("reports delivered")
        ax.set_title(f"{kind}: {args.n} ECGs, FHIR +{args.fhir_latency_ms:g} ms/request, {args.write_mode}")
        ax.legend()
        fig.tight_layout()
        path = args.plots / f"{tag}-{kind}.png"
        FigureCanvasAgg(fig).print_png(str(path))
        written.append(path)
    return written


def run_once(args: argparse.Namespace, layout: str) -> dict[str, float]:
    """One deployment, N ECGs; the latency and throughput figures."""
    with tempfile.TemporaryDirectory() as tmp_name, FhirServer() as fhir:
        redis = RedisServer().start()
        proxy = FaultProxy(fhir.origin, delay_s=args.fhir_latency_ms / 1000).start() if args.fhir_latency_ms else None
        fhir_url = proxy.base_url if proxy is not None else fhir.base_url  # type: ignore[attr-defined]
        extra: dict = {}
        patients: list[ehr_bundles.Seeded] = []
        if args.lvef:
            patients = [ehr_bundles.seed_heart_failure(fhir.base_url) for _ in range(max(1, args.patients))]
            extra = {
                "models": [{"name": "diagnosis"}, {"name": "triage"}, {"name": "lvef"}],
                "ehr": [{"name": "ehr-context", "base_url": fhir_url}],
                "routes": [
                    {
                        "name": "all-ecg",
                        "models": ["diagnosis", "triage", "lvef"],
                        "destinations": ["ehr"],
                        "ehr_context": "ehr-context",
                    }
                ],
            }
        elif args.triage:
            extra = {
                "models": [{"name": "diagnosis"}, {"name": "triage"}],
                "routes": [{"name": "all-ecg", "models": ["diagnosis", "triage"], "destinations": ["ehr"]}],
            }
        extra["destinations"] = [
            {
                "name": "ehr",
                "base_url": fhir_url,
                "timeout_s": 30,
                "write_mode": args.write_mode,
                "presented_form": not args.no_report,
            }
        ]
        extra["workers"] = {"delivery_threads": args.delivery_threads}
        database_url = _fresh_postgres() if args.postgres else None
        stack = Stack(
            tmp=Path(tmp_name), broker_url=redis.url, fhir_base_url=fhir_url, extra=extra, database_url=database_url
        )
        delivery_started = 0.0
        try:
            for _ in range(args.workers):
                stack.start_worker("analysis" if layout == "split" else "all")
            if layout == "split" and not args.drain_deliveries:
                stack.start_worker("delivery")
            stack.start_gateway()
            store = stack.store()
            ds = dcmread(get_testdata_file("waveform_ecg.dcm"))
            if patients:
                ds.PatientID = patients[0].identifier
                ds.AcquisitionDateTime = ehr_bundles.ECG_TIME.strftime("%Y%m%d%H%M%S+0000")
            ae = AE(ae_title="BENCH")
            ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.1")
            assoc = wait_for(
                lambda: (a := ae.associate("127.0.0.1", stack.port, ae_title="ECGBRIDGE")).is_established and a,
                60,
                0.5,
                "the gateway",
            )
            # warm-up: the first ECG loads the model in the worker
            ds.SOPInstanceUID = generate_uid()
            assoc.send_c_store(ds)
            stack.wait_state(("analysed", "delivered") if args.drain_deliveries else "delivered", 1, timeout_s=120)
            acked: dict[str, float] = {}
            t0 = time.time()
            for i in range(args.n):
                ds.SOPInstanceUID = generate_uid()
                if patients:
                    ds.PatientID = patients[i % len(patients)].identifier
                status = assoc.send_c_store(ds)
                assert status.Status == 0, status
                acked[ds.SOPInstanceUID] = time.time()
                if args.interval:  # on a schedule: one every interval from t0, whatever a send took
                    time.sleep(max(0.0, t0 + (i + 1) * args.interval - time.time()))
            assoc.release()
            if args.drain_deliveries:
                stack.wait_state(("analysed", "delivered"), args.n + 1, timeout_s=60 + args.n * 10)
                stack.start_worker("delivery")
                delivery_started = time.time()
            stack.wait_state("delivered", args.n + 1, timeout_s=60 + args.n * 10)
            latencies = []
            done_times = []
            analysed: list[float] = []  # C-STORE response -> result saved (queue wait + analysis + rendering)
            delivering: list[float] = []  # result saved -> DiagnosticReport created (FHIR writes)
            slowest: tuple[float, str, float] = (-1.0, "", 0.0)
            for row in store.list(limit=args.n + 10):
                if row.sop_instance_uid not in acked:
                    continue
                (delivery,) = store.deliveries(row.id)
                done = _ts(delivery.updated_at)
                saved = _ts(store.get_result(row.id).created_at)
                slowest = max(slowest, (done - acked[row.sop_instance_uid], row.id, acked[row.sop_instance_uid]))
                latencies.append(done - acked[row.sop_instance_uid])
                analysed.append(saved - acked[row.sop_instance_uid])
                delivering.append(done - saved)
                done_times.append(done)
            elapsed = max(done_times) - t0
            story = _story(store, slowest[1], acked_at=slowest[2])
            modes = [  # what the FHIR sender chose (auto), and what it fell back to
                line.split(" written as ", 1)[1].split()[0]
                for line in stack.full_logs().splitlines()
                if "reports written as " in line or "reports are written as " in line
            ]
        finally:
            stack.stop()
            redis.stop()
            if database_url is not None:
                _drop_postgres(database_url)
            if proxy is not None:
                proxy.stop()
    latencies.sort()
    analysed.sort()
    delivering.sort()
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "max": latencies[-1],
        "analysed_p50": percentile(analysed, 50),
        "delivering_p50": percentile(delivering, 50),
        "delivering_p95": percentile(delivering, 95),
        "throughput": args.n / elapsed,
        "elapsed": elapsed,
        "latencies": latencies,
        "done_offsets": [t - t0 for t in done_times],
        # the warm-up ECG is delivered in the drain too
        "delivery_rate": (args.n + 1) / (max(done_times) - delivery_started) if delivery_started else 0.0,
        "delivery_elapsed": max(done_times) - delivery_started if delivery_started else 0.0,
        "modes": " then ".join(dict.fromkeys(modes)) or "?",
        "slowest": story,
    }


def _story(store: Any, message_id: str, acked_at: float) -> str:
    """What happened to one ECG: its events' kinds, in seconds after its C-STORE response."""
    events = sorted(store.events(message_id, limit=50), key=lambda e: e.id)
    return ", ".join(f"{e.kind} +{_ts(e.at) - acked_at:.1f}s" for e in events) or "no events"


def _fresh_postgres() -> str:
    """A new database on the local PostgreSQL (trust auth), as the tests make one."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _drop_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    admin.dispose()


def _ts(dt) -> float:  # type: ignore[no-untyped-def]
    return dt.replace(tzinfo=dt.tzinfo or UTC).timestamp()


if __name__ == "__main__":
    main()
