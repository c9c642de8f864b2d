"""Per-patient delivery order: a keyed patient pseudonym on each message, and the key it is made with.

An EHR's HL7 interface files ORUs in the order they arrive. When two ECGs of one patient are
analysed by different worker processes, the later one can finish first; a receiver that keeps
"the latest ECG" per patient would then show the older one as the latest. A destination with
``ordering: per_patient`` therefore holds a later ECG's delivery while an earlier ECG of the
same patient still has one to send there (:meth:`MessageStore.ahead_in_order`).

To find "the same patient" without a patient identifier in any table, each message row keeps
``patient_key``: ``HMAC-SHA256(site key, "patient|" + issuer + "|" + identifier)``, cut to 32
hex digits. The site key is 32 random bytes in ``<data_dir>/keys/patient-order.key`` (mode
0600), created by the first process that needs it. It lives beside the blobs, not in the
database: the blobs hold the identifiers anyway, while someone who can read only the database
(a reporting user, a backup of it) cannot test guessed medical record numbers against the keys.
Deleting the file only breaks the order of ECGs that straddle the change.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

from ecgbridge.errors import StorageError

__all__ = ["KEY_FILE", "PATIENT_KEY_LENGTH", "PatientKeys", "patient_key"]

#: Where the site key lives, under ``data_dir``.
KEY_FILE = Path("keys") / "patient-order.key"
#: Hex digits of the HMAC kept on a message row (128 bits: no collision among a site's patients).
PATIENT_KEY_LENGTH = 32
_KEY_BYTES = 32


def patient_key(key: bytes, identifier: str | None, issuer: str | None) -> str | None:
    """``HMAC-SHA256(key, "patient|issuer|identifier")`` in hex; None without an identifier."""
    ident = (identifier or "").strip()
    if not ident:
        return None
    message = f"patient|{(issuer or '').strip()}|{ident}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class PatientKeys:
    """The site's patient keys for ordering: read (or first made) from ``data_dir``, once per process."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / KEY_FILE
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def key_for(self, identifier: str | None, issuer: str | None) -> str | None:
        """The message row's ``patient_key`` for this identifier (None when the ECG names no patient)."""
        if not (identifier or "").strip():
            return None
        full = patient_key(self._site_key(), identifier, issuer)
        return full[:PATIENT_KEY_LENGTH] if full else None

    def _site_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = _read_or_create(self.path)
            return self._key


def _read_or_create(path: Path) -> bytes:
    """The key file's bytes; a missing file is written whole under a temporary name and linked into place,
    so processes starting together agree on one key and never read a half-written one."""
    for _ in range(50):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise StorageError(f"cannot read the patient ordering key {path}: {exc.strerror}") from exc
        if len(data) == _KEY_BYTES:
            return data
        if data:
            raise StorageError(
                f"the patient ordering key {path} is {len(data)} bytes, not {_KEY_BYTES}: restore or delete it"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(_KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails if another process linked its key first: then read that one
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the patient ordering key {path}: {exc.strerror}") from exc
        time.sleep(0.01)
    raise StorageError(f"cannot read the patient ordering key {path}")
