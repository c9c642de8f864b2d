"""Every benchmark in one run, each beside its peers, written to ``docs/performance.md``.

    python -m bench                 # the full set (about 25 minutes on 2 cores)
    python -m bench --quick         # smaller counts, to see that everything runs (about 5 minutes)
    python -m bench --only e2e archive --out /tmp/perf.md
    python -m bench --with-soak     # also the 1000-ECG fault soak (about 20 minutes more)

Each benchmark is its own module (``bench/<name>.py``) and prints its figures with the
peers it measured in the same run; this runs them one after another as subprocesses (so
one's processes never share the machine with another's) and writes their output under the
machine's description: cores, CPU model, memory, Python, and the date. A benchmark whose
peer is missing (DCMTK, Node.js for the FHIR server) is listed with the reason instead.
The end-to-end and delivery benchmarks also draw their latency distribution and reports
delivered over time as PNGs, kept beside the page (``docs/performance/``) and shown in it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: bench.e2e measuring the delivery worker alone: it starts once every ECG is analysed, no report drawn.
_DRAIN_NOW = ["--layout", "split", "--drain-deliveries", "--no-report"]
_DRAIN = [*_DRAIN_NOW, "--fhir-latency-ms", "100"]

#: name -> (what it measures, full arguments, --quick arguments, binaries it needs)
BENCHES: dict[str, tuple[str, list[str], list[str], tuple[str, ...]]] = {
    "inference": ("ONNX Runtime vs PyTorch, per ECG, by batch size", [], ["--seconds", "1"], ()),
    "render": (
        "per-ECG analysis and report drawing on one core, beside matplotlib drawing the page alone",
        ["--rounds", "5"],
        ["--rounds", "1"],
        (),
    ),
    "ingest": (
        "DICOM C-STORE objects/s: ecgbridge vs DCMTK storescp (and a bare pynetdicom SCP)",
        ["--n", "200"],
        ["--n", "40", "--associations", "1"],
        ("storescu", "storescp"),
    ),
    "mllp": (
        "HL7 waveform ORUs/s acknowledged: ecgbridge vs python-hl7's server",
        ["--n", "60"],
        ["--n", "20", "--senders", "1"],
        (),
    ),
    "e2e": (
        "C-STORE -> DiagnosticReport latency and throughput, FHIR requests held 100 ms, both worker layouts, "
        "PDF + PNG report in every DiagnosticReport",
        ["--n", "40", "--workers", "2", "--fhir-latency-ms", "100", "--layout", "both"],
        ["--n", "8", "--workers", "1", "--fhir-latency-ms", "100", "--layout", "both"],
        ("node",),
    ),
    "e2e-paced": (
        "5 ECG/s for 5 minutes (1500 ECGs), diagnosis + triage, no report, FHIR to the indexed peer, "
        "2 analysis workers + 1 delivery worker: C-STORE response -> DiagnosticReport created",
        [
            "--n",
            "1500",
            "--interval",
            "0.2",
            "--workers",
            "2",
            "--triage",
            "--no-report",
            "--layout",
            "split",
            "--postgres",
        ],
        ["--n", "30", "--interval", "0.2", "--workers", "1", "--triage", "--no-report", "--layout", "split"],
        ("node",),
    ),
    "e2e-paced-lvef": (
        "the same 5 minutes with LVEF and the patient's EHR context read from FHIR before each analysis "
        "(100 seeded heart-failure patients, 15 ECGs each; every search also finds the reports written before)",
        [
            "--n",
            "1500",
            "--interval",
            "0.2",
            "--workers",
            "2",
            "--lvef",
            "--patients",
            "100",
            "--no-report",
            "--layout",
            "split",
            "--postgres",
        ],
        ["--n", "20", "--interval", "0.2", "--workers", "1", "--lvef", "--no-report", "--layout", "split"],
        ("node",),
    ),
    "delivery": (
        "reports written per second by the delivery worker alone (32 threads), FHIR requests held 100 ms, "
        "write mode auto (what the server offers)",
        [*_DRAIN, "--n", "100", "--delivery-threads", "32", "--postgres"],
        [*_DRAIN, "--n", "15", "--delivery-threads", "8"],
        ("node",),
    ),
    "delivery-nodelay": (
        "the same with nothing held: straight to the indexed FHIR peer (what the engine itself can write)",
        [*_DRAIN_NOW, "--n", "200", "--delivery-threads", "32", "--postgres"],
        [*_DRAIN_NOW, "--n", "15", "--delivery-threads", "8"],
        ("node",),
    ),
    "delivery-individual": (
        "the same, one conditional create per resource (the peer: how every report was written before)",
        [*_DRAIN, "--n", "100", "--delivery-threads", "32", "--write-mode", "individual", "--postgres"],
        [*_DRAIN, "--n", "15", "--delivery-threads", "8", "--write-mode", "individual"],
        ("node",),
    ),
    "archive": (
        "ecgbridge import: files stored/s and ECGs analysed/s vs cp + fsync and bare analysis",
        ["--n", "300", "--workers", "2"],
        ["--n", "40", "--workers", "1"],
        (),
    ),
    "memory": (
        "resident memory: the gateway (every listener + console), a diagnosis + triage + LVEF worker, "
        "ecgbridge import at two sizes; beside a bare pynetdicom SCP, storescp, onnxruntime alone, cp",
        ["--ecgs", "30", "--files", "1000", "10000"],
        ["--ecgs", "10", "--files", "200", "2000"],
        (),
    ),
}
SOAK = ("1000 ECGs under worker kills, a Redis restart, a FHIR outage, HL7 AE, a gateway restart, a full disk", [], [])


def machine() -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        memory = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "unknown memory"
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {os.cpu_count()} cores, {cpu}, {memory}, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; other jobs may have been running on a shared machine",
    ]


#: Benchmarks that draw plots (``--plots DIR``); their PNGs go beside performance.md.
PLOTTING = ("e2e", "e2e-paced", "e2e-paced-lvef", "delivery", "delivery-nodelay", "delivery-individual")


def run(name: str, args: list[str], log: list[str], plots: Path | None = None) -> None:
    started = time.monotonic()
    module = "e2e" if name.startswith(("delivery", "e2e")) else name
    if plots is not None and name in PLOTTING:
        args = [*args, "--plots", str(plots)]
    out = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, capture_output=True, text=True)
    took = time.monotonic() - started
    text = out.stdout.strip() or "(no output)"
    if out.returncode != 0:
        text += f"\n(exit status {out.returncode})\n" + out.stderr.strip()[-2000:]
    shown = [line for line in text.splitlines() if not line.startswith("plot: ")]
    log += [f"`python -m bench.{module} {' '.join(args)}` ({took:.0f} s)", "", "```", *shown, "```", ""]
    for line in text.splitlines():
        if line.startswith("plot: ") and plots is not None:
            png = Path(line[len("plot: ") :])
            log += [f"![{png.stem}]({plots.name}/{png.name})", ""]
    print(f"bench.{name}: {took:.0f} s, exit {out.returncode}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: does every benchmark run?")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="these benchmarks only")
    parser.add_argument("--with-soak", action="store_true", help="also bench.soak (1000 ECGs, about 20 minutes)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    args = parser.parse_args()
    log = [
        "# Performance",
        "",
        "Written by `python -m bench" + (" --quick" if args.quick else "") + "`: every benchmark of `bench/`, each",
        "printing its figures beside the peers it measured in the same run. Figures from one",
        "machine on one day; rerun the command to compare.",
        "",
        *machine(),
        "",
    ]
    for name in args.only or list(BENCHES):
        what, full, quick, needs = BENCHES[name]
        log += [f"## {name}: {what}", ""]
        missing = [b for b in needs if shutil.which(b) is None]
        if missing:
            log += [f"Not run: {', '.join(missing)} not found.", ""]
            continue
        plots = args.out.parent / args.out.stem
        run(
            name,
            quick if args.quick else full,
            log,
            plots=plots.relative_to(REPO) if plots.is_relative_to(REPO) else plots,
        )
    if args.with_soak:
        log += [f"## soak: {SOAK[0]}", ""]
        run("soak", [], log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(log))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
