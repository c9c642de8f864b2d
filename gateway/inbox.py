"""Inbox folder listener: ECG files an ECG management system exports, each taken once.

A thread polls the configured folder. A file is taken when its size and mtime have
not changed for ``settle_s`` (the exporter finished writing), then, in this order:

1. its bytes are written to the message store (fsync);
2. it is read as an ECG (:func:`mapping.readers.read_ecg_bytes`): an input error
   records the message as ``rejected`` (with an event) and the file goes to
   ``failed/`` with a sibling ``<name>.error.txt`` saying why;
3. otherwise it is admitted (:meth:`ecgbridge.core.intake.Intake.admit`: routed,
   recorded with source ``file`` and remote = the file's name, enqueued) and the file
   goes to ``done/``. An identical resend of a SOP Instance already taken (any
   listener) records nothing new: the first message gets a ``duplicate_received``
   event and the file goes to ``done/`` (the rule is in :mod:`ecgbridge.core.intake`);
4. with ``overreads.inbox``, a confirmed Philips or GE MUSE export is also a cardiologist's
   read of its own ECG: its statements are stored as a label (``gateway.overread_intake``)
   before the file is moved. An unconfirmed export is an ECG only, as before.

Why nothing is lost or doubled on restart: a file is moved only after its message is
recorded, and before recording, a message with the same content hash and file name
from source ``file`` is looked up: when one exists (a crash came between the record
and the move), the file is only moved. A message recorded but not enqueued is
re-enqueued by the gateway's recovery sweep.

What is never taken: dot-files, partial files (``*.tmp``, ``*.part``, ...), names not
matching ``patterns``, anything but a regular file (a symbolic link is never followed,
so nothing outside the folder is read), files over :data:`MAX_FILE_BYTES`.

No PHI in logs: file names may hold patient names, so logs show the content hash
prefix and the message id, never the name (the name is kept in the store only).
Moves are renames inside the folder, so ``done/`` and ``failed/`` are on the same
file system; one gateway per folder (two watchers of one folder could race).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ecgbridge.core.intake import Intake
from ecgbridge.core.live import SettingsSource, current
from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.settings import InboxListener
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import EcgBridgeError
from ecgbridge.gateway.file_intake import Taken, take_file

__all__ = ["InboxWatcher", "PARTIAL_SUFFIXES", "MAX_FILE_BYTES", "DONE", "FAILED"]

log = logging.getLogger("ecgbridge.inbox")

DONE = "done"
FAILED = "failed"
#: Names an exporter uses while a file is still being written (matched case-insensitively).
PARTIAL_SUFFIXES: tuple[str, ...] = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp", "~")
#: Larger files are not ECGs; they go to failed/ unread.
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time this size and mtime were first seen


class InboxWatcher:
    """Polls one folder in a thread; ``start()`` / ``stop()`` as the other listeners."""

    def __init__(self, settings: SettingsSource, store: MessageStore, dispatcher: Dispatcher) -> None:
        self.config: InboxListener = current(settings).listeners.inbox
        if self.config.path is None:
            raise ValueError("the inbox listener needs a path")
        self.path = Path(self.config.path).absolute()
        self.store = store
        self.intake = Intake(settings, store, dispatcher)
        self._seen: dict[str, _Seen] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._missing_logged = False

    # ----- lifecycle -------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the watcher thread is polling (the console's listener-up indicator)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="inbox-watcher", daemon=True)
        self._thread.start()
        log.info(
            "inbox listener watching %s every %.1f s (settle %.1f s)",
            self.path,
            self.config.poll_interval_s,
            self.config.settle_s,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan_once()
            except Exception:
                log.exception("inbox poll failed; trying again")
            self._stop.wait(self.config.poll_interval_s)

    # ----- one poll ----------------------------------------------------------------
    def scan_once(self) -> int:
        """Take every settled file once; returns how many were taken."""
        if not self.path.is_dir():
            if not self._missing_logged:
                log.error("inbox folder %s does not exist or is not a folder; waiting for it", self.path)
                self._missing_logged = True
            return 0
        self._missing_logged = False
        now = time.monotonic()
        present: set[str] = set()
        ready: list[tuple[int, str]] = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not self._wanted(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # symbolic links, folders (done/, failed/), devices
                present.add(entry.name)
                seen = self._seen.get(entry.name)
                if seen is None or (seen.size, seen.mtime_ns) != (st.st_size, st.st_mtime_ns):
                    self._seen[entry.name] = seen = _Seen(st.st_size, st.st_mtime_ns, now)
                if now - seen.since >= self.config.settle_s:
                    ready.append((st.st_mtime_ns, entry.name))
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        taken = 0
        for _, name in sorted(ready):  # oldest first
            if self._stop.is_set():
                break
            if self._take(name):
                taken += 1
        return taken

    def _wanted(self, name: str) -> bool:
        if name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES):
            return False
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.config.patterns)

    # ----- one file -----------------------------------------------------------------
    def _take(self, name: str) -> bool:
        """Store, validate, record, route and enqueue one file, then move it; False to retry."""
        source = self.path / name
        seen = self._seen.get(name)
        try:
            data = _read_regular(source, seen)
        except _Changed:
            self._seen.pop(name, None)  # it is still being written: settle again
            return False
        except _TooLarge as exc:
            self.store.add_event(
                None,
                "inbox_too_large",
                f"an inbox file of {exc.size} bytes exceeds {MAX_FILE_BYTES} bytes; moved to failed/",
            )
            self._move(name, FAILED, error=f"file is {exc.size} bytes, more than the {MAX_FILE_BYTES} accepted")
            log.warning("inbox: a file of %d bytes is over the size limit; moved to failed/", exc.size)
            return True
        except OSError as exc:
            log.warning("inbox: a file could not be read (%s); will retry", exc.strerror or type(exc).__name__)
            return False

        try:
            outcome = take_file(self.intake, data, name, overreads=self.intake.settings.overreads.inbox)
        except EcgBridgeError as exc:  # store or broker trouble before the record: nothing recorded
            log.error("inbox: a file was not stored (%s); will retry", exc)
            return False
        if outcome.taken is Taken.REJECTED:
            self._move(name, FAILED, error=outcome.error, message_id=outcome.message_id)
        else:
            self._move(name, DONE, message_id=outcome.message_id)
        log.info("inbox: file taken as message %s (%s); moved", outcome.message_id, outcome.taken.value)
        return True

    def _move(self, name: str, folder: str, *, error: str | None = None, message_id: str | None = None) -> Path | None:
        """Rename the file into done/ or failed/ (a suffix avoids overwriting); None on failure."""
        target_dir = self.path / folder
        try:
            target_dir.mkdir(exist_ok=True)
            target = _free_name(target_dir, name)
            if error is not None:
                note = target.with_name(target.name + ".error.txt")
                lines = [f"message: {message_id}" if message_id else "message: (none recorded)", f"error: {error}", ""]
                note.write_text("\n".join(lines), encoding="utf-8")
            os.rename(self.path / name, target)
            _fsync_dir(target_dir)
            _fsync_dir(self.path)
        except OSError as exc:
            log.error(
                "inbox: could not move a file to %s/ (%s); it stays in the inbox",
                folder,
                exc.strerror or type(exc).__name__,
            )
            return None
        self._seen.pop(name, None)
        return target


class _Changed(Exception):
    """The file changed since it settled."""


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _read_regular(path: Path, seen: _Seen | None) -> bytes:
    """The bytes of a regular file, opened without following a symbolic link."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Changed()
        if seen is not None and (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
            raise _Changed()
        if st.st_size > MAX_FILE_BYTES:
            raise _TooLarge(st.st_size)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns) or len(data) != st.st_size:
            raise _Changed()
        return data
    finally:
        os.close(fd)


def _free_name(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/stem-N.ext`` with the first N not taken."""
    target = folder / name
    if not target.exists() and not target.is_symlink():
        return target
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    for n in range(1, 100_000):
        candidate = folder / f"{stem}-{n}{dot}{ext}"
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    # Practically unreachable; a content-derived name is still unique.
    return folder / f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}-{time.time_ns()}{dot}{ext}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
