"""DICOM listener: C-ECHO and C-STORE of ECG waveforms, acknowledged only after the durable write.

The C-STORE handler gets its dependencies as bound arguments (pynetdicom's
``evt_handlers=[(evt.EVT_C_STORE, handle_store, [intake])]``), stores the encoded
dataset (fsync), checks it is a usable ECG and hands it to
:meth:`ecgbridge.core.intake.Intake.admit` (route, record, enqueue); only then does it
answer 0x0000. Every exception becomes a DIMSE failure status with an error comment,
so the association survives.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import replace
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from ecgbridge.core.intake import Arrival, Intake
from ecgbridge.core.live import SettingsSource, current
from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.routing import MessageFacts
from ecgbridge.core.settings import DicomListener
from ecgbridge.core.states import Source
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import EcgBridgeError, InputError, StorageError
from ecgbridge.mapping.codes import ECG_STORAGE_SOP_CLASSES, VERIFICATION_SOP_CLASS
from ecgbridge.mapping.dicom_waveform import read_bytes, to_ecg

__all__ = ["handle_store", "handle_echo", "DicomGateway", "TRANSFER_SYNTAXES"]

log = logging.getLogger("ecgbridge.dicom")

#: Uncompressed transfer syntaxes: waveforms are never compressed in practice.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    return ds


def handle_echo(event: evt.Event) -> int:
    return 0x0000


def handle_store(event: evt.Event, intake: Intake) -> int | Dataset:
    """C-STORE: durable write, validate, then ``admit``; success only after both."""
    calling = event.assoc.requestor.ae_title.strip()
    remote = f"{calling}@{event.assoc.requestor.address}"
    try:
        data = event.encoded_dataset(include_meta=True)
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
            )
        )
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
        self.ae = AE(ae_title=self.config.ae_title)
        self.ae.maximum_associations = self.config.max_associations
        self.ae.network_timeout = self.config.network_timeout_s
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 60
        self.ae.maximum_pdu_size = 0  # no limit: waveforms can be large
        self.ae.require_called_aet = self.config.require_called_ae_title
        if self.config.allowed_calling_ae_titles:
            self.ae.require_calling_aet = list(self.config.allowed_calling_ae_titles)
        self.ae.add_supported_context(VERIFICATION_SOP_CLASS, TRANSFER_SYNTAXES)
        for uid in ECG_STORAGE_SOP_CLASSES:
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
        server = self.ae.make_server(  # an _AllowlistServer: server_class below
            (self.config.host, self.config.port),
            ae_title=self.config.ae_title,
            evt_handlers=handlers,
            server_class=_AllowlistServer,
        )
        assert isinstance(server, _AllowlistServer)
        server.allowed_networks = [ipaddress.ip_network(n, strict=False) for n in self.config.allowed_addresses]
        self.server = server
        self.ae._servers.append(server)
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
        self._thread.start()
        log.info("DICOM listener %s on %s:%d", self.config.ae_title, self.config.host, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.ae.shutdown()
