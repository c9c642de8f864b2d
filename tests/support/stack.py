"""A whole ecgbridge deployment for one test: config, real gateway and worker processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE

from .processes import EcgbridgeProcess, free_port, wait_for, write_config

__all__ = ["Stack", "send_dicom", "hl7_ehr"]


def send_dicom(
    port: int, datasets: list[Dataset], *, ae_title: str = "TESTSCU", called: str = "ECGBRIDGE"
) -> list[int]:
    """C-STORE each dataset over one association with pynetdicom; returns the statuses."""
    ae = AE(ae_title=ae_title)
    for uid in {str(ds.SOPClassUID) for ds in datasets}:
        ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association was not established"
    try:
        statuses = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
        return statuses
    finally:
        assoc.release()


def hl7_ehr(port: int, **destination: Any) -> dict[str, Any]:
    """``Stack(extra=...)`` for one HL7 destination "ehr" on ``port`` and the route "all-ecg" (diagnosis) to it."""
    return {
        "destinations": [{"name": "ehr", "type": "hl7", "host": "127.0.0.1", "port": port, **destination}],
        "routes": [{"name": "all-ecg", "models": ["diagnosis"], "destinations": ["ehr"]}],
    }


@dataclass
class Stack:
    tmp: Path
    broker_url: str
    database_url: str | None = None
    fhir_base_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    dicom_options: dict[str, Any] = field(default_factory=dict)
    fhir_auth: dict[str, Any] | None = None
    port: int = field(default_factory=free_port)
    mllp_port: int = field(default_factory=free_port)
    mllp_options: dict[str, Any] = field(default_factory=dict)
    inbox_options: dict[str, Any] = field(default_factory=dict)
    console_port: int = field(default_factory=free_port)
    processes: list[EcgbridgeProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.tmp / "data"
        cfg: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "listeners": {
                "dicom": {"port": self.port, "host": "127.0.0.1", **self.dicom_options},
                "mllp": {"port": self.mllp_port, "host": "127.0.0.1", **self.mllp_options},
                **({"inbox": self.inbox_options} if self.inbox_options else {}),
            },
            "broker": {"url": self.broker_url},
            "console": {"port": self.console_port, "host": "127.0.0.1"},
            "delivery": {"max_attempts": 20, "backoff_initial_s": 0.5, "backoff_max_s": 2},
            "log_level": "INFO",
        }
        if self.database_url:
            cfg["storage"] = {"database_url": self.database_url}
        route: dict[str, Any] = {"name": "all-ecg", "models": ["diagnosis"], "destinations": []}
        if self.fhir_base_url:
            cfg["destinations"] = [
                {
                    "name": "ehr",
                    "base_url": self.fhir_base_url,
                    "timeout_s": 5,
                    **({"auth": self.fhir_auth} if self.fhir_auth else {}),
                }
            ]
            route["destinations"] = ["ehr"]
        cfg["routes"] = [route]
        for key, value in self.extra.items():
            cfg[key] = value
        self.config = write_config(self.tmp / "ecgbridge.yaml", cfg)
        self._n = 0

    def _proc(self, *args: str) -> EcgbridgeProcess:
        self._n += 1
        proc = EcgbridgeProcess([*args, "--config", str(self.config)], self.tmp / f"{args[0]}-{self._n}.log")
        self.processes.append(proc)
        return proc

    def start_worker(self, queues: str = "all") -> EcgbridgeProcess:
        proc = (self._proc("worker", "--queues", queues) if queues != "all" else self._proc("worker")).start()
        proc.wait_for_log(" ready.", 90)
        return proc

    def start_gateway(self) -> EcgbridgeProcess:
        proc = self._proc("gateway").start()
        proc.wait_for_log("DICOM listener", 60)
        if self.mllp_options.get("enabled", True):
            proc.wait_for_log("MLLP listener", 60)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def logs(self) -> str:
        """The end of every process's log: for failure messages, not for PHI checks (see ``full_logs``)."""
        return "\n".join(f"--- {p.log_path.name}\n{p.log_text()[-4000:]}" for p in self.processes)

    def full_logs(self) -> str:
        """Every line every process of this stack wrote, restarts included: what a PHI check must read."""
        return "\n".join(f"--- {p.log_path.name}\n{p.log_text()}" for p in self.processes)

    # ----- looking at the store, the way `ecgbridge messages` does -------------------
    def store(self):  # type: ignore[no-untyped-def]
        from ecgbridge.core.settings import load_settings
        from ecgbridge.core.store import MessageStore

        s = load_settings(self.config)
        return MessageStore(s.database_url, s.data_dir)

    def wait_state(self, state: str | tuple[str, ...], count: int = 1, timeout_s: float = 60.0) -> list[Any]:
        states = (state,) if isinstance(state, str) else state
        store = self.store()

        def done() -> list[Any] | None:
            rows = [r for r in store.list(limit=max(1000, 2 * count)) if r.state in states]
            return rows if len(rows) >= count else None

        try:
            return wait_for(done, timeout_s, 0.3, f"{count} message(s) in state {states}")
        except AssertionError as exc:
            rows = [(r.id[:8], r.state, r.error) for r in store.list(limit=50)]
            raise AssertionError(f"{exc}; messages: {rows}\n{self.logs()}") from None


def load(path: str | Path) -> Dataset:
    return dcmread(str(path))
