"""Resident memory of the gateway, an analysis worker and ``ecgbridge import``, each beside a peer (issue 12).

    python -m bench.memory [--ecgs 30] [--files 1000 10000] [--concurrency 2] [--no-ehr] [--only stack import]

Issue 12's targets: the gateway process at most 150 MB with every listener and the console
running; a worker process (the Celery parent and each pool child) at most 400 MB with
diagnosis, triage and LVEF loaded; ``ecgbridge import`` at most 300 MB and the same peak
whatever the number of files. Nothing else measures them, so this does, in one run:

1. **gateway + worker** (one deployment, as the tests start one: a real redis-server on a
   free port, ``ecgbridge worker`` and ``ecgbridge gateway`` processes, SQLite): DICOM SCP,
   MLLP listener, inbox and console all on; the route runs diagnosis + triage + LVEF with
   the EHR context read from the test FHIR server (Medplum, ``tests/fhir_server``; a seeded
   heart-failure patient whose identifier every ECG carries; ``--no-ehr`` or no Node.js:
   LVEF runs on the ECG alone and says so). Sent: ``--ecgs`` C-STOREs of the committed
   12-lead fixtures (each its own SOP Instance UID), one HL7 waveform ORU over MLLP, one
   DICOM file dropped in the inbox; then a console sign-in (argon2id) and a few page loads
   (dashboard, messages, a message, its ECG viewer data, routes, dead letters, stats,
   metrics). VmRSS / VmHWM of the gateway (and any child) after each step; of the worker's
   parent and each pool child once every ECG is analysed (PSS too: forked children share
   pages, which RSS counts in each).
2. **peers**, same C-STOREs: a bare pynetdicom SCP that writes and fsyncs each object, and
   DCMTK ``storescp`` when installed; for the worker, a bare Python process that only loads
   the same ONNX graphs (diagnosis, triage, LVEF's two variants) with onnxruntime and runs
   each once, and one that runs ecgbridge's analysis (``analyse_ecg`` with the three models,
   no Celery, no store) on the five fixtures: what the models and the analysis code cost alone.
3. **import**: ``--files`` sizes of distinct DICOM files (the PTB-XL fixture with its own
   SOP Instance UID and Patient ID each; the smaller sets are hard links to the first files
   of the largest, one flat folder each), each imported with ``ecgbridge import
   --no-deliver`` into a fresh store, Redis up and no worker running: the import only stores
   and enqueues, the analysis is the workers' and is not what is measured. Its RSS is sampled
   every 0.2 s (with the file count from its progress line) and its peak read from the kernel
   when it exits (``ru_maxrss``, through GNU time or a small launcher: see
   :func:`peak_wrapped`). Peers: ``cp -r`` of the same folder, and a Python loop that reads,
   writes and fsyncs each file (their peaks read the same way).

It prints every figure beside its target and says whether it is met: the gateway by its RSS
after the traffic and, apart, by its peak (a sign-in's argon2id hash takes 64 MiB while it
runs); each worker process and the import by their peaks; "constant" when the largest
import's peak is within 10 MB (or 5 %) of the smallest's. MB = 2**20 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Only the standard library at the top: the peers run as ``python -m bench.memory --child ...``
# and must not carry this script's own imports in their memory.

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
#: The committed 12-lead DICOM fixtures an ECG cart could send (the broken ones are for other tests).
DICOM_FIXTURES = [
    FIXTURES / "dicom" / name
    for name in (
        "ptbxl_00024_norm_12lead.dcm",
        "ptbxl_00622_mi_12lead.dcm",
        "ptbxl_00730_cd_12lead.dcm",
        "cinc2021_E07506_12lead.dcm",
        "cinc2021_E07506_8lead.dcm",
    )
]
HL7_FIXTURE = FIXTURES / "hl7" / "ptbxl_00024_na_100hz.hl7"
IMPORT_FIXTURE = DICOM_FIXTURES[0]
MODELS = ["diagnosis", "triage", "lvef"]
SHIPPED = REPO / "inference" / "shipped"
ONNX_FILES = [
    SHIPPED / "diagnosis-baseline" / "model.onnx",
    SHIPPED / "triage" / "model.onnx",
    SHIPPED / "lvef" / "ecg_only.onnx",
    SHIPPED / "lvef" / "ecg_ehr.onnx",
]
PASSWORD = "bench memory password 1234"

GATEWAY_MB = 150.0
WORKER_MB = 400.0
IMPORT_MB = 300.0
#: "Constant memory": the largest import's peak within this much of the smallest's (MB, or 5 %).
CONSTANT_SLACK_MB = 10.0

# --------------------------------------------------------------------------- reading memory


@dataclass(frozen=True)
class Mem:
    """A process's resident memory now (RSS), its peak (HWM) and its proportional share (PSS), MB."""

    rss: float
    hwm: float
    pss: float | None = None

    def text(self) -> str:
        pss = f", PSS {self.pss:6.1f}" if self.pss is not None else ""
        return f"RSS {self.rss:6.1f} MB, peak (HWM) {self.hwm:6.1f} MB{pss}"


def mem(pid: int) -> Mem | None:
    """VmRSS, VmHWM and Pss of ``pid`` from /proc; None once it has exited (zombie or gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # a zombie (exited, not yet reaped) or a kernel thread: no memory of its own
        return None
    pss = None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
                break
    except OSError:
        pass
    return Mem(int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024, pss)


def descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, their children...), from /proc/<pid>/task/*/children."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


#: Starts a command and writes its peak RSS (kB, from ``wait4``) to a file: the fallback for GNU time.
_LAUNCHER = (
    "import os,sys; pid=os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ); _,st,ru=os.wait4(pid,0); "
    "open(sys.argv[1],'w').write(str(ru.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(st))"
)


def peak_wrapped(cmd: list[str], peak_file: Path) -> list[str]:
    """``cmd`` under a small launcher that writes its peak RSS (kB) to ``peak_file`` once it exits.

    Why a launcher: the kernel's ``ru_maxrss`` of a child counts the memory of the process it was
    forked from (its maximum is carried over at ``exec``), so a child of this script would never
    read below this script's own RSS. GNU time is about 2 MB; the Python fallback about 9 MB, the
    floor of what it can report.
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    if gnu_time:
        return [gnu_time, "-f", "%M", "-o", str(peak_file), *cmd]
    return [sys.executable, "-S", "-c", _LAUNCHER, str(peak_file), *cmd]


def read_peak(peak_file: Path) -> float:
    """The peak written by :func:`peak_wrapped`, MB (GNU time writes a status line first when the command fails)."""
    return int(peak_file.read_text().split()[-1]) / 1024


def run_measured(cmd: list[str], peak_file: Path) -> tuple[float, float]:
    """Run ``cmd`` to the end (it must succeed); (seconds, its peak RSS in MB)."""
    started = time.monotonic()
    subprocess.run(peak_wrapped(cmd, peak_file), check=True)
    return time.monotonic() - started, read_peak(peak_file)


# --------------------------------------------------------------------------- peers (child modes)


def _child_scp(folder: str) -> None:
    """A bare pynetdicom storage SCP: write each object as a DICOM file, fsync it, answer success."""
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        with path.open("wb") as f:
            f.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(f, event.file_meta, enforce_standard=True)
            f.write(event.request.DataSet.getvalue())
            f.flush()
            os.fsync(f.fileno())
        return 0x0000

    ae = AE(ae_title="BARE-SCP")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    print(f"port {server.server_address[1]}", flush=True)
    sys.stdin.read()  # until the parent closes it
    server.shutdown()


def _child_onnx() -> None:
    """Only onnxruntime: load the ONNX graphs a diagnosis + triage + LVEF worker loads, run each once."""
    import numpy as np
    import onnxruntime as ort

    for path in ONNX_FILES:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # as the worker's registry sets them
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {
            i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
            for i in session.get_inputs()
        }
        session.run(None, feeds)
    _say_own_memory()


def _child_analysis() -> None:
    """ecgbridge's analysis alone: the three models through ``analyse_ecg`` on a fixture, no Celery, no store."""
    from ecgbridge.inference.models import ModelRegistry
    from ecgbridge.inference.pipeline import analyse_ecg
    from ecgbridge.mapping.readers import read_ecg_file

    registry = ModelRegistry()
    for path in DICOM_FIXTURES:
        analyse_ecg(read_ecg_file(path), registry, MODELS)
    _say_own_memory()


def _say_own_memory() -> None:
    m = mem(os.getpid())
    assert m is not None
    print(json.dumps({"rss": m.rss, "hwm": m.hwm, "pss": m.pss}), flush=True)


def _peer_child(kind: str) -> Mem:
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", kind], cwd=REPO, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"peer {kind} failed: {out.stderr[-1500:]}")
    fields = json.loads(out.stdout.strip().splitlines()[-1])
    return Mem(fields["rss"], fields["hwm"], fields["pss"])


# --------------------------------------------------------------------------- 1. gateway and worker


def _ecg_datasets(n: int, patient_id: str | None) -> list[Any]:
    """``n`` C-STOREs: the committed fixtures in turn, each with a fresh SOP Instance UID (and the EHR's patient)."""
    from copy import deepcopy

    from pydicom import dcmread
    from pydicom.uid import generate_uid

    bases = [dcmread(p) for p in DICOM_FIXTURES]
    out = []
    for i in range(n):
        ds = deepcopy(bases[i % len(bases)])  # Dataset.copy() is shallow: its elements would be shared
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if patient_id is not None:
            from tests.support import ehr_bundles

            ds.PatientID = patient_id
            ds.AcquisitionDateTime = ehr_bundles.ECG_TIME.strftime("%Y%m%d%H%M%S+0000")
        out.append(ds)
    return out


def _send_hl7(port: int, payload: bytes) -> str:
    """One ORU over MLLP with ecgbridge's own framing; the ACK's MSA-1."""
    from ecgbridge.mapping.hl7_common import frame

    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(frame(payload))
        answer = b""
        while b"\x1c" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    msa = next((seg for seg in answer.strip(b"\x0b\x1c\r").split(b"\r") if seg.startswith(b"MSA")), b"MSA|??")
    return msa.split(b"|")[1].decode()


def measure_stack(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One deployment with every listener and the console; memory of the gateway and the worker processes."""
    import httpx

    from ecgbridge.core.accounts import AccountStore, Role
    from tests.support.fhir_server import FhirServer, node_available
    from tests.support.processes import RedisServer, wait_for
    from tests.support.stack import Stack, send_dicom

    tmp.mkdir(parents=True)
    ehr_missing = "--no-ehr" if args.no_ehr else node_available()
    out: dict[str, Any] = {"steps": [], "ehr": ehr_missing or "Medplum test FHIR server, seeded heart-failure patient"}
    redis = RedisServer().start()
    fhir = None if ehr_missing else FhirServer().start()
    try:
        route: dict[str, Any] = {"name": "all-ecg", "models": MODELS, "destinations": []}
        extra: dict[str, Any] = {
            "models": [{"name": m} for m in MODELS],
            "workers": {"concurrency": args.concurrency},
            "log_level": "INFO",
        }
        patient_id = None
        if fhir is not None:
            from tests.support import ehr_bundles

            patient_id = ehr_bundles.seed_heart_failure(fhir.base_url).identifier
            extra["ehr"] = [{"name": "ehr-context", "base_url": fhir.base_url}]
            route["ehr_context"] = "ehr-context"
        extra["routes"] = [route]
        inbox = tmp / "inbox"
        inbox.mkdir()
        stack = Stack(
            tmp=tmp / "stack",
            broker_url=redis.url,
            extra=extra,
            inbox_options={"enabled": True, "path": str(inbox), "poll_interval_s": 0.5, "settle_s": 0.5},
        )
        try:
            worker = stack.start_worker("all")
            gateway = stack.start_gateway()
            assert gateway.process is not None and worker.process is not None
            gpid = gateway.process.pid
            wait_for(
                lambda: (
                    httpx.get(f"http://127.0.0.1:{stack.console_port}/api/health", timeout=5).status_code in (200, 503)
                ),
                60,
                0.5,
                "the console",
            )
            AccountStore(stack.store()).create_user("bench-admin", PASSWORD, Role.ADMIN)

            def step(what: str) -> None:
                m = mem(gpid)
                assert m is not None, "the gateway exited"
                kids = [(k, mem(k)) for k in descendants(gpid)]
                out["steps"].append((what, m, kids))
                print(f"  gateway, {what:<44} {m.text()}" + "".join(f"; child {k}: {c.text()}" for k, c in kids if c))

            print(f"1. gateway (DICOM, MLLP, inbox, console) and worker ({' + '.join(MODELS)}), {out['ehr']}")
            step("started, idle")
            datasets = _ecg_datasets(args.ecgs, patient_id)
            statuses = send_dicom(stack.port, datasets)
            assert all(s == 0 for s in statuses), statuses
            step(f"after {args.ecgs} C-STOREs (one association)")
            ack = _send_hl7(stack.mllp_port, HL7_FIXTURE.read_bytes())
            assert ack in ("AA", "CA"), ack
            step("after one HL7 waveform ORU over MLLP")
            dropped = _ecg_datasets(1, patient_id)[0]
            dropped.save_as(inbox / "export.dcm.partial", enforce_file_format=True)
            (inbox / "export.dcm.partial").rename(inbox / "export.dcm")
            wait_for(lambda: not (inbox / "export.dcm").exists(), 60, 0.2, "the inbox to take its file")
            taken = sorted(p.parent.name for p in inbox.rglob("*.dcm"))
            step(f"after one inbox file (moved to {'/'.join(taken)})")
            started = time.monotonic()
            rows = stack.wait_state(("analysed", "failed"), count=args.ecgs + 2, timeout_s=120 + 10 * args.ecgs)
            analysed_s = time.monotonic() - started
            states = Counter(r.state for r in rows)
            with httpx.Client(base_url=f"http://127.0.0.1:{stack.console_port}", timeout=60) as http:
                answer = http.post("/login", data={"username": "bench-admin", "password": PASSWORD, "next": "/"})
                assert answer.status_code == 303, answer.text[:300]
                step("after one console sign-in (argon2id)")
                mid = rows[0].id
                pages = ["/", "/messages", f"/messages/{mid}", f"/api/messages/{mid}/ecg", "/routes"]
                pages += ["/dead-letters", "/api/stats", "/metrics", "/api/messages?limit=200"]
                for rounds in (1, 5):  # the first round warms caches; more rounds show whether it grows
                    for _ in range(rounds):
                        for page in pages:
                            r = http.get(page)
                            assert r.status_code == 200, (page, r.status_code, r.text[:300])
                    step(f"after {rounds} more round(s) of {len(pages)} page loads")
            out["gateway"] = mem(gpid)
            out["gateway_children"] = [(k, mem(k)) for k in descendants(gpid)]
            out["worker_parent"] = mem(worker.process.pid)
            out["worker_children"] = [(k, mem(k)) for k in worker.child_pids()]
            out["analysed"] = (len(rows), analysed_s)
            out["lvef"] = _lvef_context(stack, [r.id for r in rows])
            print(
                f"  worker: {len(rows)} ECGs done ({', '.join(f'{k} x{v}' for k, v in states.items())}; "
                f"{analysed_s:.0f} s after the last was sent); LVEF's EHR context: "
                f"{', '.join(f'{k} x{v}' for k, v in out['lvef'].items())}"
            )
            print(f"  worker parent (Celery main) {out['worker_parent'].text()}")
            for pid, m in out["worker_children"]:
                if m is not None:
                    print(f"  worker pool child {pid:<8}  {m.text()}")
        finally:
            stack.stop()
    finally:
        if fhir is not None:
            fhir.stop()
        redis.stop()

    print("2. peers, the same C-STOREs:")
    out["peers"] = {}
    scp_dir = tmp / "bare-scp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.memory", "--child", "scp", str(scp_dir)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[1])
        assert all(s == 0 for s in send_dicom(port, datasets, called="BARE-SCP"))
        out["peers"]["bare pynetdicom SCP (write + fsync)"] = mem(proc.pid)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(15)
    if shutil.which("storescp"):
        from tests.support.processes import free_port

        port = free_port()
        (tmp / "storescp").mkdir()
        scp = subprocess.Popen(
            ["storescp", "-od", str(tmp / "storescp"), "-aet", "ANY-SCP", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: _listening(port), 15, 0.1, "storescp")
            assert all(s == 0 for s in send_dicom(port, datasets, called="ANY-SCP"))
            out["peers"]["DCMTK storescp"] = mem(scp.pid)
        finally:
            scp.terminate()
            scp.wait(10)
    else:
        print("    DCMTK storescp: not installed (apt-get install dcmtk)")
    for name, m in out["peers"].items():
        print(f"    {name:<44} {m.text() if m else '(exited)'}")
    print("   peers of the worker (one process each):")
    out["onnx_peer"] = _peer_child("onnx")
    print(f"    {'onnxruntime alone, the 4 graphs run once':<44} {out['onnx_peer'].text()}")
    out["analysis_peer"] = _peer_child("analysis")
    print(f"    {'analyse_ecg with the 3 models, 5 fixtures':<44} {out['analysis_peer'].text()}")
    return out


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _lvef_context(stack: Any, ids: list[str]) -> Counter[str]:
    """What LVEF had as EHR context on each analysed ECG (status of its ``ehr_context``)."""
    store = stack.store()
    seen: Counter[str] = Counter()
    for mid in ids:
        row = store.get_result(mid)
        outputs = (row.result or {}).get("outputs", []) if row is not None else []
        lvef = next((o for o in outputs if o.get("task") == "lvef" or o.get("model", "").startswith("lvef")), None)
        if lvef is None:
            seen["no LVEF output"] += 1
        else:
            seen[str((lvef.get("extra") or {}).get("ehr_context", {}).get("status", "?"))] += 1
    store.engine.dispose()
    return seen


# --------------------------------------------------------------------------- 3. import


def make_archive(folder: Path, n: int) -> None:
    """``n`` distinct DICOM files from the PTB-XL fixture: own SOP Instance UID and Patient ID each."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    base = dcmread(IMPORT_FIXTURE)
    for i in range(n):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.PatientID = f"BENCH{i:07d}"
        base.save_as(folder / f"ecg{i:07d}.dcm", enforce_file_format=True)


def _import_once(folder: Path, n: int, broker_url: str, work: Path) -> dict[str, Any]:
    """``ecgbridge import --no-deliver`` of ``folder`` into a fresh store; its RSS over time and its peak."""
    from tests.support.processes import write_config

    config = write_config(
        work / f"import-{n}.yaml",
        {
            "data_dir": str(work / f"data-{n}"),
            "broker": {"url": broker_url},
            "models": [{"name": "diagnosis"}],
            "routes": [{"name": "archive", "models": ["diagnosis"], "destinations": []}],
            "log_level": "WARNING",
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECGBRIDGE_")} | {"ECGBRIDGE_PROGRESS": "1"}
    peak_file = work / f"import-{n}.peak"
    cmd = [sys.executable, "-m", "ecgbridge", "import", "--config", str(config), "--no-deliver", str(folder)]
    started = time.monotonic()
    proc = subprocess.Popen(  # not --json: that also silences the progress line the file count is read from
        peak_wrapped(cmd, peak_file),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    done = [0]
    stdout: list[bytes] = []
    stderr_tail: list[bytes] = []

    def read_progress() -> None:
        assert proc.stderr is not None
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):  # type: ignore[union-attr]
            stderr_tail[:] = [(b"".join(stderr_tail) + chunk)[-4000:]]
            counts = re.findall(rb"(\d+) files \(", chunk)
            if counts:
                done[0] = int(counts[-1])

    readers = [
        threading.Thread(target=read_progress, daemon=True),
        threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
    ]
    for t in readers:
        t.start()
    samples: list[tuple[float, int, float]] = []  # (seconds, files done, RSS MB)
    while proc.poll() is None:
        m = next((m for m in map(mem, descendants(proc.pid)) if m is not None), None)  # the import, under its launcher
        if m is not None:
            samples.append((time.monotonic() - started, done[0], m.rss))
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    for t in readers:
        t.join(10)
    if proc.returncode != 0:
        raise RuntimeError(f"ecgbridge import exited {proc.returncode}: {b''.join(stderr_tail).decode()[-2000:]}")
    text = b"".join(stdout).decode()
    found = re.search(r"(\d+) file\(s\) in [\d.]+ s: (\d+) stored", text)
    if found is None:
        raise RuntimeError(f"no summary from ecgbridge import: {text[-2000:]}")
    # the kernel's peak; a sample can read a few pages above it (per-thread RSS counters are batched)
    peak = max([read_peak(peak_file)] + [rss for _, _, rss in samples])
    return {"n": n, "s": elapsed, "peak": peak, "samples": samples, "stored": int(found[2])}


def _rss_at(samples: list[tuple[float, int, float]], files: int) -> float | None:
    """The RSS sampled when the import had first reported at least ``files`` files."""
    return next((rss for _, n, rss in samples if n >= files), None)


def measure_import(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The import at each size beside ``cp -r`` and a read + fsync loop of the same files."""
    from tests.support.processes import RedisServer

    sizes = sorted(set(args.files))
    full = tmp / f"archive-{sizes[-1]}"
    t0 = time.monotonic()
    make_archive(full, sizes[-1])
    size_kb = (full / "ecg0000000.dcm").stat().st_size / 1024
    print(
        f"3. ecgbridge import --no-deliver, {' and '.join(map(str, sizes))} distinct DICOM files "
        f"({size_kb:.0f} kB each, one flat folder; made in {time.monotonic() - t0:.0f} s); Redis up, no worker"
    )
    folders = {sizes[-1]: full}
    for n in sizes[:-1]:
        folders[n] = tmp / f"archive-{n}"
        folders[n].mkdir()
        for i in range(n):
            os.link(full / f"ecg{i:07d}.dcm", folders[n] / f"ecg{i:07d}.dcm")
    redis = RedisServer().start()
    runs = []
    try:
        for n in sizes:
            run = _import_once(folders[n], n, redis.url, tmp)
            runs.append(run)
            marks = [m for m in (n // 10, n // 2) if m]
            at = ", ".join(f"{_rss_at(run['samples'], m) or float('nan'):.1f} MB after {m} files" for m in marks)
            stored = run["stored"]
            print(
                f"  import of {n:>6} files: {stored} stored in {run['s']:.0f} s ({n / run['s']:.1f} files/s); "
                f"RSS {at}; peak {run['peak']:.1f} MB"
            )
    finally:
        redis.stop()
    peers: dict[int, tuple[float, float]] = {}
    for n in sizes:
        cp_s, cp_peak = run_measured(["cp", "-r", str(folders[n]), str(tmp / f"cp-{n}")], tmp / "cp.peak")
        shutil.rmtree(tmp / f"cp-{n}")
        code = (
            "import os,sys\nfor e in sorted(os.scandir(sys.argv[1]), key=lambda e: e.name):\n"
            "    data = open(e.path, 'rb').read()\n"
            "    with open(sys.argv[2] + '/' + e.name, 'wb') as f:\n"
            "        f.write(data); f.flush(); os.fsync(f.fileno())\n"
        )
        (tmp / f"py-{n}").mkdir()
        py_s, py_peak = run_measured(
            [sys.executable, "-c", code, str(folders[n]), str(tmp / f"py-{n}")], tmp / "py.peak"
        )
        shutil.rmtree(tmp / f"py-{n}")
        peers[n] = (cp_peak, py_peak)
        print(
            f"  peers, {n:>6} files: cp -r peak {cp_peak:.1f} MB ({cp_s:.1f} s); "
            f"Python read + write + fsync loop peak {py_peak:.1f} MB ({py_s:.1f} s)"
        )
    return {"runs": runs, "peers": peers}


# --------------------------------------------------------------------------- main


def targets(stack: dict[str, Any] | None, imports: dict[str, Any] | None) -> list[str]:
    lines = ["targets (issue 12; resident memory, MB = 2**20 bytes):"]
    if stack is not None:
        g: Mem = stack["gateway"]
        kids = sum(m.rss for _, m in stack["gateway_children"] if m)
        lines.append(
            f"- gateway, every listener and the console, after the traffic: RSS {g.rss:.1f} MB "
            f"(+{kids:.1f} in children) <= {GATEWAY_MB:.0f}: {verdict(g.rss + kids <= GATEWAY_MB)}; "
            f"its peak (HWM) {g.hwm:.1f} MB <= {GATEWAY_MB:.0f}: {verdict(g.hwm <= GATEWAY_MB)}"
        )
        procs = [("parent", stack["worker_parent"])] + [(f"pool child {p}", m) for p, m in stack["worker_children"]]
        for name, m in procs:
            if m is None:
                continue
            lines.append(
                f"- worker {name} ({' + '.join(MODELS)} loaded): RSS {m.rss:.1f} MB, peak {m.hwm:.1f} MB "
                f"<= {WORKER_MB:.0f}: {verdict(m.hwm <= WORKER_MB)}"
            )
    if imports is not None:
        runs = imports["runs"]
        small, large = runs[0], runs[-1]
        growth = large["peak"] - small["peak"]
        constant = growth <= max(CONSTANT_SLACK_MB, 0.05 * small["peak"])
        peaks = ", ".join(f"{r['peak']:.1f} MB for {r['n']} files" for r in runs)
        lines.append(
            f"- ecgbridge import: peak {peaks} "
            f"<= {IMPORT_MB:.0f}: {verdict(all(r['peak'] <= IMPORT_MB for r in runs))}; "
            f"constant ({large['n']} vs {small['n']} files: {growth:+.1f} MB, allowed "
            f"{max(CONSTANT_SLACK_MB, 0.05 * small['peak']):.0f}): {verdict(constant)}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ecgs", type=int, default=30, help="C-STOREs sent to the gateway and analysed by the worker")
    parser.add_argument("--files", type=int, nargs="+", default=[1000, 10000], help="import sizes (files)")
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's pool processes")
    parser.add_argument("--no-ehr", action="store_true", help="no FHIR server: LVEF runs on the ECG alone")
    parser.add_argument("--only", nargs="+", choices=("stack", "import"), default=["stack", "import"])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"scp": lambda: _child_scp(rest[0]), "onnx": _child_onnx, "analysis": _child_analysis}[kind]()
        return
    if len(set(args.files)) < 2 and "import" in args.only:
        parser.error("--files needs two sizes or more: constant memory is the same peak at each")
    print(f"memory, {os.cpu_count()} cores, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M')}")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        tmp = Path(tmp_name)
        stack = measure_stack(args, tmp / "stack") if "stack" in args.only else None
        imports = measure_import(args, tmp / "import") if "import" in args.only else None
    print("\n".join(targets(stack, imports)))


if __name__ == "__main__":
    main()
