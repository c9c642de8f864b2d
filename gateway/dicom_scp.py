"""DICOM listener: C-ECHO and C-STORE of ECG waveforms, acknowledged only after the durable write.

The C-STORE handler gets its dependencies as bound arguments (pynetdicom's
``evt_handlers=[(evt.EVT_C_STORE, handle_store, [intake])]``), stores the encoded
dataset (fsync), checks it is a usable ECG and hands it to
:meth:`ecgbridge.core.intake.Intake.admit` (route, record, enqueue); only then does it
answer 0x0000. Every exception becomes a DIMSE failure status with an error comment,
so the association survives. An identical resend of a SOP Instance is answered 0x0000
and recorded as a ``duplicate_received`` event only (the rule is in :mod:`ecgbridge.core.intake`).

Over-reads (:mod:`ecgbridge.gateway.overread_intake`): Basic Text, Enhanced and Comprehensive
SR are negotiated too; each SR object from a calling AE named in
``overreads.dicom_calling_ae_titles`` is stored as a cardiologist's read, from any other AE it
is refused 0x0122, and a malformed content tree 0xA900, each with an error record. An ECG
from such an AE whose WaveformAnnotationSequence holds statements is analysed as usual and
its statements are stored as a read of that ECG.

Size: pynetdicom writes each incoming data set to a file as it arrives
(``STORE_RECV_CHUNKED_DATASET``), in the blob store's staging folder, and the PDUs we
accept are bounded, so no object is ever held whole in memory. One larger than
``listeners.dicom.max_object_bytes`` is refused with 0xA700 (Out of Resources) naming
the limit; the others are hashed and moved into the blob store (fsync) before the answer.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.transport import ThreadedAssociationServer

from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.live import SettingsSource, current
from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.routing import MessageFacts
from ecgbridge.core.settings import DicomListener
from ecgbridge.core.states import Source
from ecgbridge.core.store import MessageStore
from ecgbridge.core.tls import listener_context
from ecgbridge.errors import EcgBridgeError, InputError, StorageError
from ecgbridge.gateway.overread_intake import accept_sr, record_self_read
from ecgbridge.mapping.codes import ECG_STORAGE_SOP_CLASSES, SR_STORAGE_SOP_CLASSES, VERIFICATION_SOP_CLASS
from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg
from ecgbridge.mapping.overread_readers import read_ecg_annotations

__all__ = ["handle_store", "handle_echo", "DicomGateway", "TRANSFER_SYNTAXES"]

log = logging.getLogger("ecgbridge.dicom")

#: Uncompressed transfer syntaxes: waveforms are never compressed in practice.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
]
#: The largest PDU we accept: a peer fragments an object into PDUs of this size at most, so
#: pynetdicom never reads a whole large object into memory as one PDU.
MAX_PDU_BYTES = 1024 * 1024
#: Staging files older than this at start were left by a crash mid-transfer.
_STALE_STAGING_S = 3600.0


class _GatewayAE(AE):
    """Our AE, knowing where its incoming data sets are staged (see :func:`_staged_temporary_file`)."""

    staging_dir: Path | None = None


def _staged_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's temporary file for an incoming data set, in the receiving gateway's staging folder.

    pynetdicom creates it in the association's reader thread with ``NamedTemporaryFile`` in
    the system temporary folder (often a RAM disk); ours goes beside the blobs instead, so a
    stored object is renamed in, never copied or held in memory.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    staging = getattr(getattr(assoc, "ae", None), "staging_dir", None)
    if staging is not None:
        kwargs.setdefault("dir", staging)
    return tempfile.NamedTemporaryFile(*args, **kwargs)


def _receive_to_files() -> None:
    """Make pynetdicom write every incoming C-STORE data set to a (staged) file as it arrives."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _staged_temporary_file  # type: ignore[attr-defined]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


def handle_echo(event: evt.Event) -> int:
    return 0x0000


def _received_file(event: evt.Event) -> Path | None:
    """The file pynetdicom wrote the data set to, or None when it kept it in memory."""
    try:
        path = event.dataset_path
    except AttributeError:
        return None
    return Path(path) if isinstance(path, str | os.PathLike) else None


def _too_large(intake: Intake, calling: str, size: int, limit: int) -> Dataset:
    log.warning("C-STORE from %s refused: %d bytes, over the %d-byte limit", calling, size, limit)
    try:
        intake.store.add_event(
            None,
            "dicom_too_large",
            f"a C-STORE of {size} bytes from {calling} exceeds listeners.dicom.max_object_bytes ({limit}); refused",
            level="warning",
        )
    except Exception:
        log.exception("could not record the refused C-STORE from %s", calling)
    return _status(0xA700, f"object of {size} bytes exceeds the {limit}-byte limit")


def handle_store(event: evt.Event, intake: Intake) -> int | Dataset:
    """C-STORE: size check, durable write, validate, then ``admit``; success only after all."""
    calling = event.assoc.requestor.ae_title.strip()
    remote = f"{calling}@{event.assoc.requestor.address}"
    limit = intake.settings.listeners.dicom.max_object_bytes  # read per object: a reload applies
    try:
        received = _received_file(event)
        if received is not None:
            size = received.stat().st_size
            if size > limit:
                return _too_large(intake, calling, size, limit)
            sha, size = intake.store.blobs.save_file(received)
            data = intake.store.read_blob(sha)
        else:  # pynetdicom kept it in memory (chunked receiving switched off elsewhere)
            data = event.encoded_dataset(include_meta=True)
            if len(data) > limit:
                return _too_large(intake, calling, len(data), limit)
            sha, size = intake.store.save_blob(data)
    except StorageError as exc:
        log.error("C-STORE from %s not stored: %s", calling, exc)
        return _status(0xA700, str(exc))
    except Exception as exc:
        log.exception("C-STORE from %s could not be read from the association", calling)
        return _status(0xC210, f"cannot read the dataset: {type(exc).__name__}")

    request: Any = event.request  # a C-STORE request in this handler
    sop_class = str(request.AffectedSOPClassUID)
    sop_instance = str(request.AffectedSOPInstanceUID)
    arrival = Arrival(
        facts=MessageFacts(Source.DICOM, calling, sop_class),
        blob_sha256=sha,
        blob_size=size,
        remote=remote,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
    )
    if sop_class in SR_STORAGE_SOP_CLASSES:
        return _store_sr(intake, data, arrival, calling)
    try:
        ds = read_bytes(data)
        ecg = to_ecg(ds)
        if str(ds.get("SOPInstanceUID", sop_instance)) != sop_instance:
            log.warning("C-STORE %s: dataset SOP Instance UID differs from the request", sop_instance)
    except InputError as exc:
        try:
            intake.reject(arrival, str(exc), type(exc).__name__)
        except Exception:
            log.exception("could not record the rejected C-STORE %s", sop_instance)
        log.warning("C-STORE %s from %s rejected: %s", sop_instance, calling, type(exc).__name__)
        return _status(exc.dimse_status, str(exc))

    try:
        admitted = intake.admit(
            replace(
                arrival,
                flags=list(ecg.flags),
                placer_order_number=ecg.study.placer_order_number,
                filler_order_number=ecg.study.filler_order_number,
                acquired_at=ecg.study.acquired_at,
                accession_number=ecg.study.accession_number,
                patient_key=intake.patient_key(ecg.patient),
            )
        )
        if intake.settings.overreads.dicom_source(calling):
            read = read_ecg_annotations(ds)
            if read is not None:  # the over-read source's confirmed statements: a read of this ECG
                record_self_read(intake, admitted.message_id, read, ecg, source=Source.DICOM, sender=calling)
        if admitted.duplicate:
            log.info("C-STORE %s: identical resend of message %s; not stored again", sop_instance, admitted.message_id)
            return 0x0000
        log.info(
            "C-STORE %s stored as message %s (%s)",
            sop_instance,
            admitted.message_id,
            f"route {admitted.route.name}" if admitted.route else "unrouted",
        )
        return 0x0000
    except EcgBridgeError as exc:
        log.error("C-STORE %s failed: %s", sop_instance, exc)
        return _status(exc.dimse_status, str(exc))
    except Exception as exc:
        log.exception("C-STORE %s failed unexpectedly", sop_instance)
        return _status(0xC001, f"internal error: {type(exc).__name__}")


def _store_sr(intake: Intake, data: bytes, arrival: Arrival, calling: str) -> int | Dataset:
    """A structured report: a cardiologist's read (``gateway.overread_intake.accept_sr``)."""
    try:
        outcome = accept_sr(intake, data, arrival, calling)
    except EcgBridgeError as exc:
        log.error("SR %s failed: %s", arrival.sop_instance_uid, exc)
        return _status(exc.dimse_status, str(exc))
    except Exception as exc:
        log.exception("SR %s failed unexpectedly", arrival.sop_instance_uid)
        return _status(0xC001, f"internal error: {type(exc).__name__}")
    return 0x0000 if outcome.status == 0x0000 else _status(outcome.status, outcome.comment)


class _AllowlistServer(ThreadedAssociationServer):
    """Refuses TCP connections from addresses outside the configured networks, before any PDU."""

    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        try:
            addr = ipaddress.ip_address(client_address[0])
        except ValueError:
            return False
        ok = any(addr in net for net in self.allowed_networks)
        if not ok:
            log.warning("refused DICOM connection from %s: address not allowed", client_address[0])
        return ok


class DicomGateway:
    """A running DICOM SCP bound to a store and a dispatcher."""

    def __init__(self, settings: SettingsSource, store: MessageStore, dispatcher: Dispatcher) -> None:
        self.config: DicomListener = current(settings).listeners.dicom
        self.intake = Intake(settings, store, dispatcher)
        _receive_to_files()
        self.ae = _GatewayAE(ae_title=self.config.ae_title)
        try:
            self.ae.staging_dir = store.blobs.staging_dir()
            _remove_stale(self.ae.staging_dir)
        except OSError as exc:  # each C-STORE then reports the storage problem; the system temp folder stages
            log.error("DICOM staging folder unusable (%s)", exc.strerror or type(exc).__name__)
        self.ae.maximum_associations = self.config.max_associations
        self.ae.network_timeout = self.config.network_timeout_s
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 60
        self.ae.maximum_pdu_size = MAX_PDU_BYTES
        self.ae.require_called_aet = self.config.require_called_ae_title
        if self.config.allowed_calling_ae_titles:
            self.ae.require_calling_aet = list(self.config.allowed_calling_ae_titles)
        self.ae.add_supported_context(VERIFICATION_SOP_CLASS, TRANSFER_SYNTAXES)
        for uid in ECG_STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        for uid in SR_STORAGE_SOP_CLASSES:  # over-reads; from an AE not named in overreads: 0x0122 per object
            self.ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        self.server: _AllowlistServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def running(self) -> bool:
        """Whether the SCP thread is serving (the console's listener-up indicator)."""
        return self.server is not None and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        handlers: list[Any] = [(evt.EVT_C_ECHO, handle_echo), (evt.EVT_C_STORE, handle_store, [self.intake])]
        # DICOM secure transport (PS3.15 Annex B, BCP 195 profile); None: plain TCP.
        ssl_context = listener_context(self.config.tls, "listeners.dicom.tls")
        server = self.ae.make_server(  # an _AllowlistServer: server_class below
            (self.config.host, self.config.port),
            ae_title=self.config.ae_title,
            evt_handlers=handlers,
            server_class=_AllowlistServer,
            ssl_context=ssl_context,
        )
        assert isinstance(server, _AllowlistServer)
        server.allowed_networks = [ipaddress.ip_network(n, strict=False) for n in self.config.allowed_addresses]
        self.server = server
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
        self._thread.start()
        log.info(
            "DICOM listener %s on %s:%d%s",
            self.config.ae_title,
            self.config.host,
            self.port,
            " (TLS)" if self.config.tls else "",
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.ae.shutdown()


def _remove_stale(folder: Path) -> None:
    """Delete staging files a crash left behind (never acknowledged, so the sender resends them)."""
    cutoff = time.time() - _STALE_STAGING_S
    for path in folder.iterdir():
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            continue
