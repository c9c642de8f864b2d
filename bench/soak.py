"""The soak: ECGs at a steady rate through a whole deployment while faults are injected; nothing may be lost.

    python -m bench.soak                       # 1000 ECGs, every fault, the durations of issue 11
    python -m bench.soak --n 100 --fhir-outage-s 120 --kill-every 25   # what the CI test runs

Real parts only: ``ecgbridge gateway`` and two ``ecgbridge worker`` processes, a redis-server
with its append-only file, the Medplum FHIR test server (behind a TCP gate that can be shut)
and python-hl7's MLLP server as the EHR's HL7 interface. The cart side sends every other ECG
by DICOM C-STORE (pynetdicom) and the rest as HL7 ORU^R01 waveform messages over MLLP; a send
that is not acknowledged is sent again later, byte for byte, as a cart would.

The first tenth of the stream is sent with no fault and delivered before anything else
happens (the warm-up: every code path has run once, so memory measured after it is a warm
start). Faults, at fixed points of the stream (fractions of the ECGs sent):

* every ``kill_every`` analysed ECGs: worker A SIGKILLed (main process and pool child) and
  started again; worker B is never killed, so its memory can be judged over the whole run;
* 15 %: the FHIR server becomes unreachable for ``fhir_outage_s`` (connections refused);
* 35 %: Redis SIGKILLed and started again from its append-only file (fsync every second);
* 50 %: the gateway stopped and started again;
* 60 %: the EHR's HL7 interface answers AE for ``hl7_ae_s``;
* 75 %: the data directory's file system (a tmpfs mounted for the run; needs root) filled
  until writes fail, for ``disk_full_s``, then freed.

At the end it prints what it counted (``SoakReport``); the run passes when nothing
acknowledged is lost, no report or ORU reached the EHR twice, every acknowledged ECG was
delivered or dead-lettered with its reason, nothing was acknowledged while the disk was full
that is not stored, and no ecgbridge process grew by more than 20 % over the second half of
the run. Memory is printed at the warm start, halfway and at the end; the first half is not
judged because a worker keeps filling first-use caches well after the warm-up (measured
alone: a worker delivering FHIR reports grows from 249 to 372 MB over its first 100 reports
as fhir.resources builds each resource's model, then stays flat), which is not a leak.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.support.fhir_server import FhirServer
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.processes import REPO, RedisServer, wait_for
from tests.support.stack import Stack
from tests.support.tcp_gate import TcpGate

__all__ = ["SoakPlan", "SoakReport", "run_soak"]

WFDB = REPO / "tests" / "fixtures" / "wfdb" / "00024_lr.hea"
TERMINAL_DELIVERY = ("delivered", "dead", "failed")
MAX_GROWTH = 0.20


@dataclass(frozen=True)
class SoakPlan:
    n: int = 1000
    rate_per_s: float = 1.5
    kill_every: int = 100
    fhir_outage_s: float = 300.0
    hl7_ae_s: float = 30.0
    disk_full_s: float = 20.0
    disk_size: str = "2g"
    resend_after_s: float = 3.0
    max_sends: int = 40
    drain_timeout_s: float = 1800.0
    claim_s: float = 120.0  # delivery.claim_s: how long a worker killed mid-send holds its delivery
    #: Judge memory (growth over the second half). A short run cannot tell a leak from a cache filled
    #: late (its FHIR outage may cover the whole first half): the CI version only prints it.
    judge_memory: bool = True
    database_url: str | None = None  # None: SQLite in the data directory, so a full disk reaches it too


@dataclass
class Ecg:
    """One ECG of the stream and what the gateway answered each time it was sent."""

    index: int
    transport: str  # dicom | hl7
    placer: str
    payload: Any  # a pydicom Dataset or the ER7 bytes
    answers: list[str] = field(default_factory=list)
    acked: bool = False
    next_send: float = 0.0
    during_disk_full: list[str] = field(default_factory=list)


@dataclass
class SoakReport:
    sent: int = 0
    send_attempts: int = 0
    acknowledged: int = 0
    never_acknowledged: int = 0
    stored: int = 0
    stored_twice: int = 0
    analysed: int = 0
    delivered_exactly_once: int = 0
    fhir_reports_in_ehr: int = 0
    hl7_orus_accepted_by_ehr: int = 0
    duplicates: int = 0
    #: ORUs accepted again under an MSH-10 the EHR had already accepted: a worker died between the
    #: EHR's AA and recording it, and the redelivered task sent the same message again. A receiver
    #: that checks MSH-10 (HL7 v2 original mode) drops them, so they are not duplicates; counted apart.
    retransmitted: int = 0
    #: For each such ORU: the receiver's answers and the message's events, in order.
    retransmission_details: list[str] = field(default_factory=list)
    lost: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    acked_while_disk_full_not_stored: int = 0
    answers_while_disk_full: dict[str, int] = field(default_factory=dict)
    drain_s: float = 0.0
    wall_s: float = 0.0
    faults: list[str] = field(default_factory=list)
    memory_mb: dict[str, dict[str, float]] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)
    worker_self_restarts: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = [
            f"sent {self.sent} ECGs ({self.send_attempts} sends), acknowledged {self.acknowledged}, "
            f"never acknowledged {self.never_acknowledged}",
            f"stored {self.stored} (stored twice: {self.stored_twice}), analysed {self.analysed}",
            f"delivered exactly once {self.delivered_exactly_once} (FHIR reports in the EHR "
            f"{self.fhir_reports_in_ehr}, ORUs the EHR accepted {self.hl7_orus_accepted_by_ehr})",
            f"duplicates {self.duplicates}, lost {self.lost}, dead-lettered {self.dead_lettered}, "
            f"ORUs retransmitted under an MSH-10 already accepted {self.retransmitted}"
            + (f" {self.dead_letter_reasons}" if self.dead_letter_reasons else ""),
            f"disk full: answers {self.answers_while_disk_full or '{}'}, acknowledged but not stored "
            f"{self.acked_while_disk_full_not_stored}",
            f"time to drain after the last acknowledgement {self.drain_s:.0f} s, whole run {self.wall_s:.0f} s",
            "resident memory, MB (warm start -> halfway -> end; judged: halfway -> end, at most +20 %):",
            *(f"  {name}: {m['start']:.0f} -> {m['mid']:.0f} -> {m['end']:.0f}" for name, m in self.memory_mb.items()),
            f"workers that restarted themselves after an unrecoverable Celery error: {self.worker_self_restarts}",
            *(f"  retransmitted: {d}" for d in self.retransmission_details),
            "faults: " + "; ".join(self.faults),
            "PASSED" if self.passed else "FAILED: " + "; ".join(self.problems),
        ]
        return "\n".join(lines)


# ----- the cart side -----------------------------------------------------------------


def _dicom_ecg(base: Dataset, placer: str, index: int) -> Dataset:
    ds = copy.deepcopy(base)  # Dataset.copy() shares the data elements
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"SOAK{index:05d}"
    ds.PlacerOrderNumberImagingServiceRequest = placer
    return ds


def _hl7_ecg(placer: str, index: int) -> bytes:
    from dataclasses import replace as dc_replace

    from ecgbridge.mapping.ecg import Patient
    from ecgbridge.mapping.wfdb_record import read_wfdb
    from tests.support.hl7_waveform_writer import build_oru_waveform

    ecg = dc_replace(read_wfdb(WFDB), patient=Patient(id=f"SOAK{index:05d}", name=None))
    return build_oru_waveform(ecg, control_id=f"CART{index:06d}", placer_order_number=placer).encode()


def send_dicom_once(port: int, ds: Dataset) -> str:
    """C-STORE on a fresh association: "0x0000" and other statuses, or why there was no status."""
    ae = AE(ae_title="SOAKCART")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(str(ds.SOPClassUID), ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", port, ae_title="ECGBRIDGE")
    if not assoc.is_established:
        return "no-association"
    try:
        status = assoc.send_c_store(ds)
        return f"0x{int(status.Status):04X}" if "Status" in status else "aborted"
    finally:
        if assoc.is_established:
            assoc.release()


def send_hl7_once(port: int, message: bytes) -> str:
    """One MLLP frame on a fresh connection: the ACK's MSA-1, or why there was none."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"\x0b" + message + b"\x1c\r")
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = sock.recv(65536)
                if not chunk:
                    return "closed"
                answer += chunk
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__
    for segment in answer.strip(b"\x0b\x1c\r").split(b"\r"):
        if segment.startswith(b"MSA"):
            return segment.split(b"|")[1].decode(errors="replace")
    return "no-MSA"


def _is_ack(transport: str, answer: str) -> bool:
    return answer == ("0x0000" if transport == "dicom" else "AA") or (transport == "hl7" and answer == "CA")


# ----- the run -------------------------------------------------------------------------


class Soak:
    def __init__(self, plan: SoakPlan, workdir: Path, log: Any = print) -> None:
        self.plan = plan
        self.workdir = workdir
        self.log = log
        self.report = SoakReport(sent=plan.n)
        self.disk_full = threading.Event()
        self.stopping = threading.Event()
        self.samples: dict[str, dict[str, float]] = {}
        self.series: dict[str, list[float]] = {}  # each process's RSS at every tenth of the stream, from warm
        self._analysed = 0

    # -- set-up --------------------------------------------------------------------
    def _mount_data_dir(self, path: Path) -> str | None:
        path.mkdir(parents=True, exist_ok=True)
        if self.plan.disk_full_s <= 0:
            return "--disk-full-s 0"
        if os.geteuid() != 0:
            return "mounting a small file system needs root"
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.plan.disk_size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        return None if out.returncode == 0 else f"cannot mount a tmpfs: {out.stderr.strip()}"

    def _config(self, fhir_url: str, hl7_port: int) -> dict[str, Any]:
        return {
            "broker": {"url": self.redis.url, "visibility_timeout_s": 30},
            # a claim held by a worker killed mid-send lapses after claim_s (the product's default: 120 s)
            "delivery": {
                "max_attempts": 60,
                "backoff_initial_s": 1,
                "backoff_max_s": 20,
                "claim_s": self.plan.claim_s,
            },
            "destinations": [
                {"name": "ehr-fhir", "type": "fhir", "base_url": fhir_url, "timeout_s": 10},
                {"name": "ehr-hl7", "type": "hl7", "host": "127.0.0.1", "port": hl7_port, "ack_timeout_s": 10},
            ],
            "routes": [{"name": "all-ecg", "models": ["diagnosis"], "destinations": ["ehr-fhir", "ehr-hl7"]}],
        }

    # -- process memory ------------------------------------------------------------
    def _processes(self) -> dict[str, int]:
        procs = {"gateway": self.gateway, "worker-B": self.worker_b}
        found: dict[str, int] = {}
        for name, proc in procs.items():
            if proc.alive():
                assert proc.process is not None
                found[name] = proc.process.pid
                if name.startswith("worker"):
                    for i, child in enumerate(proc.child_pids()):
                        found[f"{name} pool child {i + 1}"] = child
        if self.redis.process and self.redis.process.poll() is None:
            found["redis-server (not judged)"] = self.redis.process.pid
        fhir_proc = getattr(self.fhir, "_proc", None)
        if fhir_proc is not None and fhir_proc.poll() is None:
            found["FHIR test server (holds the EHR's data: not judged)"] = fhir_proc.pid
        return found

    def _sample(self, when: str) -> None:
        for name, pid in self._processes().items():
            rss = _rss_mb(pid)
            if rss is None:
                continue
            entry = self.samples.setdefault(f"{name}#{pid}", {})
            if when == "end":
                entry["end"] = rss
                continue
            if when == "warm" or "seen" in entry:  # after the warm-up, or a tenth of the stream after first seen
                entry.setdefault("start", rss)
            if "start" in entry:
                self.series.setdefault(f"{name}#{pid}", []).append(rss)
            entry["seen"] = rss

    # -- faults ----------------------------------------------------------------------
    def _fault(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.t0:.0f}s {text}"
        self.report.faults.append(stamp)
        self.log(f"[soak] {stamp}")

    def _later(self, delay_s: float, action: Any) -> None:
        def run() -> None:
            if not self.stopping.wait(delay_s):
                action()

        threading.Thread(target=run, daemon=True).start()

    def _fhir_outage(self) -> None:
        self.gate.shut()
        self._fault(f"FHIR server unreachable for {self.plan.fhir_outage_s:.0f} s")

        def reopen() -> None:
            self.gate.open()
            self._fault("FHIR server reachable again")

        self._later(self.plan.fhir_outage_s, reopen)

    def _redis_restart(self) -> None:
        self.redis.kill()
        self.redis.start()
        self._fault("Redis SIGKILLed and restarted from its append-only file")

    def _gateway_restart(self) -> None:
        self.gateway.stop()
        self.gateway = self.stack.start_gateway()
        self._fault("gateway stopped and started again")

    def _hl7_ae(self) -> None:
        self.receiver.mode = "AE"
        self._fault(f"the EHR's HL7 interface answers AE for {self.plan.hl7_ae_s:.0f} s")

        def back() -> None:
            self.receiver.mode = "AA"
            self._fault("the EHR's HL7 interface answers AA again")

        self._later(self.plan.hl7_ae_s, back)

    def _fill_disk(self) -> None:
        filler = self.stack.data_dir / "soak-filler"
        with filler.open("wb", buffering=0) as fh:
            for size in (1 << 20, 4096, 512):
                try:
                    while True:
                        fh.write(b"\0" * size)
                except OSError as exc:
                    if exc.errno != 28:
                        raise
        self.disk_full.set()
        self._fault(f"data directory's file system full for {self.plan.disk_full_s:.0f} s")

        def free() -> None:
            self.disk_full.clear()
            filler.unlink()
            self._fault("disk space freed")

        self._later(self.plan.disk_full_s, free)

    def _killer(self) -> None:
        """SIGKILL worker A each time ``kill_every`` more ECGs have been analysed, then start it again."""
        next_kill = self.plan.kill_every
        while not self.stopping.wait(0.5):
            try:
                self._analysed = self._count_analysed()
            except Exception:  # the store is briefly unreadable (the disk is full): ask again
                continue
            if self._analysed >= next_kill:
                next_kill += self.plan.kill_every
                self.worker_a.kill()
                self._fault(f"worker A SIGKILLed after {self._analysed} analysed")
                self.worker_a = self.stack.start_worker()

    # -- the stream --------------------------------------------------------------------
    def _send(self, ecg: Ecg) -> None:
        full = self.disk_full.is_set()
        if ecg.transport == "dicom":
            answer = send_dicom_once(self.stack.port, ecg.payload)
        else:
            answer = send_hl7_once(self.stack.mllp_port, ecg.payload)
        self.report.send_attempts += 1
        ecg.answers.append(answer)
        if full and self.disk_full.is_set():  # full for the whole exchange
            ecg.during_disk_full.append(answer)
        if _is_ack(ecg.transport, answer):
            ecg.acked = True
        else:
            ecg.next_send = time.monotonic() + self.plan.resend_after_s

    def _stream(self, ecgs: list[Ecg]) -> float:
        # memory at a warm start: after the fault-free first tenth has been delivered, or for a process
        # started later, a tenth of the stream after it was first seen
        samples = [(tenth / 10, lambda: self._sample("start")) for tenth in range(2, 10)]
        samples.insert(0, (0.10, lambda: self._warm_up(ecgs)))
        faults = sorted(
            [
                *samples,
                (0.15, self._fhir_outage),
                (0.35, self._redis_restart),
                (0.50, self._gateway_restart),
                (0.60, self._hl7_ae),
                (0.75, self._fill_disk if self.disk_ok else lambda: None),
            ],
            key=lambda fault: fault[0],
        )
        interval = 1.0 / self.plan.rate_per_s
        started = time.monotonic()
        for i, ecg in enumerate(ecgs):
            while faults and i >= faults[0][0] * len(ecgs):
                faults.pop(0)[1]()
            due = started + i * interval
            while time.monotonic() < due:
                self._resend_due(ecgs[:i], until=due)
            self._send(ecg)
        last = time.monotonic()
        while not all(e.acked for e in ecgs):
            pending = [e for e in ecgs if not e.acked and len(e.answers) < self.plan.max_sends]
            if not pending:
                break
            self._resend_due(pending, until=time.monotonic() + 1)
            last = time.monotonic()
        return last

    def _warm_up(self, ecgs: list[Ecg]) -> None:
        """Wait until the first tenth, sent before any fault, is delivered; then take the warm memory sample."""
        acked = {e.placer for e in ecgs if e.acked}
        wait_for(lambda: self._drained(acked), 300, 0.5, "the warm-up ECGs to be delivered")
        self._sample("warm")
        self._fault(f"warm-up done: {len(acked)} ECGs delivered before any fault")

    def _resend_due(self, ecgs: list[Ecg], until: float) -> None:
        now = time.monotonic()
        for ecg in ecgs:
            if not ecg.acked and ecg.next_send <= now and len(ecg.answers) < self.plan.max_sends:
                self._send(ecg)
                return
        time.sleep(max(0.0, min(0.05, until - time.monotonic())))

    # -- counting ------------------------------------------------------------------------
    def _rows(self) -> list[Any]:
        from sqlalchemy import select

        from ecgbridge.core.store import MessageRow

        with self.store.session() as s:
            return list(s.scalars(select(MessageRow)))

    def _count_analysed(self) -> int:
        return sum(1 for r in self._rows() if r.state in ("analysed", "delivered"))

    def _drained(self, acked_placers: set[str]) -> bool:
        rows = {r.placer_order_number: r for r in self._rows()}
        for placer in acked_placers:
            row = rows.get(placer)
            if row is None:
                return False
            if row.state in ("received", "queued"):
                return False
            if row.state in ("failed", "rejected", "unrouted"):
                continue
            deliveries = self.store.deliveries(row.id)
            if len(deliveries) < 2 or any(d.state not in TERMINAL_DELIVERY for d in deliveries):
                return False
        return True

    def _count(self, ecgs: list[Ecg]) -> None:
        r = self.report
        acked = {e.placer for e in ecgs if e.acked}
        r.acknowledged = len(acked)
        r.never_acknowledged = r.sent - r.acknowledged
        rows = self._rows()
        per_placer = Counter(row.placer_order_number for row in rows)
        by_placer = {row.placer_order_number: row for row in rows}
        r.stored = sum(1 for p in acked if p in per_placer)
        r.stored_twice = sum(1 for p, n in per_placer.items() if n > 1)
        r.analysed = sum(1 for p in acked if p in by_placer and self.store.get_result(by_placer[p].id) is not None)

        # the EHR's side: FHIR reports by identifier, ORUs accepted (AA) by MSH-10
        reports = self._fhir_reports()
        report_keys = Counter(_first_identifier(dr) for dr in reports)
        r.fhir_reports_in_ehr = len(reports)
        accepted = [_msh10(m) for m, a in zip(self.receiver.received, self.receiver.answers, strict=True) if a == "AA"]
        oru_keys = Counter(accepted)
        r.hl7_orus_accepted_by_ehr = len(oru_keys)
        r.duplicates = sum(n - 1 for n in report_keys.values() if n > 1)
        r.retransmitted = sum(n - 1 for n in oru_keys.values() if n > 1)

        from ecgbridge.outbound.hl7_sender import control_id

        reasons: Counter[str] = Counter()
        for placer in acked:
            row = by_placer.get(placer)
            if row is None:
                r.lost += 1
                continue
            if row.state in ("failed", "rejected", "unrouted"):
                reasons[f"message {row.state}: {(row.error or '')[:80]}"] += 1
                r.dead_lettered += 1
                continue
            deliveries = {d.destination: d for d in self.store.deliveries(row.id)}
            if row.state in ("received", "queued") or any(
                deliveries.get(dest) is None or deliveries[dest].state not in TERMINAL_DELIVERY
                for dest in ("ehr-fhir", "ehr-hl7")
            ):
                r.lost += 1
                continue
            dead = [d for d in deliveries.values() if d.state != "delivered"]
            for d in dead:
                reasons[f"{d.destination} {d.state}: {(d.error or '')[:80]}"] += 1
            if dead:
                r.dead_lettered += 1
            elif oru_keys[control_id(row.id, "ehr-hl7")] >= 1 and self._one_report_for(row, report_keys):
                r.delivered_exactly_once += 1
            if oru_keys[control_id(row.id, "ehr-hl7")] > 1 and len(r.retransmission_details) < 20:
                r.retransmission_details.append(self._story(row.id, control_id(row.id, "ehr-hl7")))
        # An ORU the EHR accepted under an MSH-10 ecgbridge never gave a stored message's result would
        # be a result filed twice under two identities (or a stranger's): that is a duplicate.
        assigned = {control_id(row.id, "ehr-hl7") for row in rows}
        r.duplicates += sum(1 for msh10 in oru_keys if msh10 not in assigned)
        r.dead_letter_reasons = dict(reasons)

        full_answers = [a for e in ecgs for a in e.during_disk_full]
        r.answers_while_disk_full = dict(Counter(full_answers))
        r.acked_while_disk_full_not_stored = sum(
            1 for e in ecgs if any(_is_ack(e.transport, a) for a in e.during_disk_full) and e.placer not in per_placer
        )

    def _story(self, message_id: str, msh10: str) -> str:
        """Why an ORU reached the EHR twice: what the EHR answered each time, and what the store recorded."""
        answers = [a for m, a in zip(self.receiver.received, self.receiver.answers, strict=True) if _msh10(m) == msh10]
        events = [
            f"{e.at:%H:%M:%S} {e.kind}: {(e.detail or '')[:70]}"
            for e in reversed(self.store.events(message_id, limit=50))
            if e.kind not in ("ehr_context",)
        ]
        return f"{msh10} answered {answers}; events: {' | '.join(events) or 'none'}"

    def _one_report_for(self, row: Any, report_keys: Counter[tuple[str, str]]) -> bool:
        """Exactly one DiagnosticReport in the EHR carries this message's report identifier.

        The identifier is the one ``mapping.fhir_report`` gives: the SOP Instance UID of a DICOM
        ECG, otherwise ecgbridge's message id.
        """
        from ecgbridge.mapping.codes import SYSTEM

        if row.source == "dicom" and row.sop_instance_uid:
            key = (SYSTEM["dicom_uid"], f"urn:oid:{row.sop_instance_uid}")
        else:
            key = (SYSTEM["ecgbridge_result"], row.id)
        return report_keys[key] == 1

    def _fhir_reports(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        with httpx.Client(base_url=self.fhir.base_url + "/", timeout=60) as client:
            offset = 0
            while True:
                page = client.get("DiagnosticReport", params={"_count": 500, "_offset": offset}).json()
                entries = [e["resource"] for e in page.get("entry", [])]
                found += entries
                if len(entries) < 500:
                    return found
                offset += 500

    def _judge(self) -> None:
        r = self.report
        for key, m in self.samples.items():
            if "start" not in m or "end" not in m:
                continue
            name = key.split("#")[0]
            series = [*self.series.get(key, [m["start"]]), m["end"]]
            mid = series[len(series) // 2]
            r.memory_mb[key] = {"start": m["start"], "mid": mid, "end": m["end"]}
            # A leak keeps growing; a cache filled on first use (fhir.resources loads each resource's
            # model when it is first validated, matplotlib its fonts) stops. Judged: the second half.
            if self.plan.judge_memory and "not judged" not in name and m["end"] > mid * (1 + MAX_GROWTH):
                r.leaks.append(f"{key} grew {mid:.0f} -> {m['end']:.0f} MB over the second half of the run")
        if r.lost:
            r.problems.append(f"{r.lost} acknowledged ECG(s) lost")
        if r.duplicates:
            r.problems.append(f"{r.duplicates} duplicate report(s) in the EHR, or ORU(s) under an MSH-10 not assigned")
        if r.stored_twice:
            r.problems.append(f"{r.stored_twice} ECG(s) stored twice")
        if r.never_acknowledged:
            r.problems.append(f"{r.never_acknowledged} ECG(s) never acknowledged after {self.plan.max_sends} sends")
        if r.acked_while_disk_full_not_stored:
            r.problems.append(f"{r.acked_while_disk_full_not_stored} acknowledged while the disk was full, not stored")
        if r.acknowledged != r.delivered_exactly_once + r.dead_lettered:
            r.problems.append("acknowledged != delivered exactly once + dead-lettered")
        r.problems += [f"leak: {leak}" for leak in r.leaks]

    # -- the whole run -------------------------------------------------------------------
    def run(self) -> SoakReport:
        plan = self.plan
        self.t0 = time.monotonic()
        base = dcmread(get_testdata_file("waveform_ecg.dcm"))
        ecgs = [
            Ecg(i, t, placer, _dicom_ecg(base, placer, i) if t == "dicom" else _hl7_ecg(placer, i))
            for i in range(plan.n)
            for t, placer in [("dicom" if i % 2 == 0 else "hl7", f"SOAK{i:05d}")]
        ]
        self.redis = RedisServer(aof_dir=self.workdir / "redis").start()
        self.fhir = FhirServer().start()
        self.gate = TcpGate(self.fhir.port).open()
        self.receiver = Hl7Receiver("AA").start()
        try:
            fhir_url = f"http://127.0.0.1:{self.gate.port}/fhir/R4"
            self.stack = Stack(
                tmp=self.workdir / "stack",
                broker_url=self.redis.url,
                database_url=plan.database_url,
                extra=self._config(fhir_url, self.receiver.port),
            )
            why_not = self._mount_data_dir(self.stack.data_dir)
            self.disk_ok = why_not is None
            if why_not:
                self._fault(f"disk-full fault skipped: {why_not}")
            try:
                self._run(ecgs)
            finally:
                self.stopping.set()
                self.stack.stop()
                if self.disk_ok:
                    subprocess.run(["umount", "-l", str(self.stack.data_dir)], capture_output=True)
        finally:
            self.receiver.stop()
            self.gate.shut()
            self.fhir.stop()
            self.redis.stop()
        self.report.wall_s = time.monotonic() - self.t0
        return self.report

    def _run(self, ecgs: list[Ecg]) -> None:
        from ecgbridge.core.settings import load_settings
        from ecgbridge.core.store import MessageStore

        self.worker_a = self.stack.start_worker()
        self.worker_b = self.stack.start_worker()
        self.gateway = self.stack.start_gateway()
        settings = load_settings(self.stack.config)
        self.store = MessageStore(settings.database_url, settings.data_dir)
        killer = threading.Thread(target=self._killer, name="soak-killer", daemon=True)
        killer.start()
        last_ack = self._stream(ecgs)
        acked = {e.placer for e in ecgs if e.acked}
        self.log(f"[soak] stream done: {len(acked)}/{len(ecgs)} acknowledged; draining")

        def drained() -> bool:
            try:
                return self._drained(acked)
            except Exception:
                return False

        try:
            wait_for(drained, self.plan.drain_timeout_s, 2.0, "every acknowledged ECG delivered or dead-lettered")
        except AssertionError as exc:
            self.report.problems.append(str(exc))
        self.report.drain_s = time.monotonic() - last_ack
        self.stopping.set()
        killer.join(5)
        self._sample("end")
        if not self.worker_b.alive() or not self.gateway.alive():
            self.report.problems.append("worker B or the gateway exited by itself")
        self.report.worker_self_restarts = self.stack.full_logs().count("starting it again in 5 s")
        self._count(ecgs)
        self._judge()


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _first_identifier(resource: dict[str, Any]) -> tuple[str, str]:
    ident = (resource.get("identifier") or [{}])[0]
    return str(ident.get("system", "")), str(ident.get("value", ""))


def _msh10(raw: str) -> str:
    msh = raw.replace("\n", "\r").split("\r")[0]
    fields = msh.split(msh[3]) if len(msh) > 3 else []
    return fields[9] if len(fields) > 9 else ""


def run_soak(plan: SoakPlan, workdir: Path | None = None, log: Any = print) -> SoakReport:
    """Run the soak in ``workdir`` (a fresh temporary folder by default) and return what it counted."""
    if workdir is not None:
        return Soak(plan, workdir, log).run()
    with tempfile.TemporaryDirectory(prefix="ecgbridge-soak-") as tmp:
        return Soak(plan, Path(tmp), log).run()


def main(argv: list[str] | None = None) -> int:
    defaults = SoakPlan()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(defaults).items():
        kind = type(value) if value is not None else str
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    p.add_argument("--json", action="store_true", help="print the report as JSON too")
    args = vars(p.parse_args(argv))
    as_json = args.pop("json")
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found: apt-get install redis-server")
    plan = replace(defaults, **{k: v for k, v in args.items()})
    report = run_soak(plan)
    print(report.text())
    if as_json:
        print(json.dumps(asdict(report), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
