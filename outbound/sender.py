"""The one interface every destination type implements, and the registry that finds it by ``type``.

A destination type is one module: a configuration class (a
:class:`~ecgbridge.core.settings.DestinationConfig` with its own ``type`` literal) and a
:class:`Sender` subclass, joined with :func:`register_sender`. Nothing else changes:
the settings loader validates ``destinations[]`` by ``type`` through the same registry
and the worker's delivery job calls :meth:`Sender.send` without knowing the type.
Built-in types are FHIR (:mod:`ecgbridge.outbound.fhir_sender`) and HL7 v2 over MLLP
(:mod:`ecgbridge.outbound.hl7_sender`); a site's own type can also come from a
distribution's ``ecgbridge.senders`` entry point.

A sender answers one question: was the result delivered? It returns the receiver's
reference, or raises :class:`~ecgbridge.errors.TransientDeliveryError` (retry with
backoff) or :class:`~ecgbridge.errors.PermanentDeliveryError` (retrying cannot help; a
:class:`~ecgbridge.errors.MappingError` counts as permanent too). Retries, dead letters
and delivery states are the worker's, not the sender's.

Concurrency: one sender serves every delivery thread of a worker process at once. A
destination's ``max_in_flight`` caps how many of its sends run at the same time in one
process (a semaphore around every subclass's :meth:`Sender.send`, added by this base
class; a thread over the cap waits for a slot). It is per process: N delivery processes
may have N times as many sends in flight. An HL7 destination with a persistent connection
sends one message at a time anyway (:mod:`ecgbridge.outbound.hl7_sender`).
"""

from __future__ import annotations

import builtins
import functools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, TypeVar

from ecgbridge.core.settings import DestinationConfig, register_destination_type
from ecgbridge.errors import ConfigError, DestinationBusy
from ecgbridge.mapping.ecg import AnalysisResult, Ecg

__all__ = ["Outgoing", "Sender", "register_sender", "sender_class", "create_sender", "load_senders"]

log = logging.getLogger("ecgbridge.delivery")

#: Entry-point group through which an installed distribution adds destination types.
ENTRY_POINT_GROUP = "ecgbridge.senders"


@dataclass(frozen=True)
class Outgoing:
    """One stored result on its way to one destination: all a sender may put in its message."""

    message_id: str
    result: AnalysisResult
    ecg: Ecg
    #: blob sha256 -> bytes of the result's attachments (PDF, PNG) still in the store.
    attachments: Mapping[str, bytes]
    #: The linked order's details (HL7 ORC / OBR values to echo), or None.
    order: Mapping[str, Any] | None = None
    #: Which result version this is: 1, then 2, 3, ... after a re-analysis (a sender updates what it sent).
    version: int = 1


_SendMethod = Callable[["Sender", Outgoing], str]
#: Guards the lazy creation of a sender's in-flight slots.
_SLOTS_LOCK = threading.Lock()


class _Slots:
    """At most ``limit`` sends at once; a thread already holding a slot passes again (``super().send``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.semaphore = threading.BoundedSemaphore(limit)
        self.local = threading.local()


#: The longest a send waits for one of its destination's ``max_in_flight`` slots before it is retried later.
SLOT_WAIT_S = 45.0


class Sender(ABC):
    """Delivers results to one configured destination; one instance per destination and process.

    Thread-safe: the delivery worker's threads share it. Each subclass's ``send`` runs
    inside the destination's ``max_in_flight`` slots (the base class wraps it).
    """

    #: The ``type`` value in the configuration that selects this sender.
    type: ClassVar[builtins.str]
    #: The configuration class of its destinations (validated by the settings loader).
    config_class: ClassVar[builtins.type[DestinationConfig]]

    def __init__(self, config: DestinationConfig) -> None:
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        send = cls.__dict__.get("send")
        if callable(send) and not getattr(send, "_in_flight_limited", False):
            setattr(cls, "send", _limited(send))  # noqa: B010 - mypy refuses assigning to a method

    @abstractmethod
    def send(self, outgoing: Outgoing) -> str:
        """Deliver ``outgoing``; returns the receiver's reference for it (shown to IT staff)."""

    def close(self) -> None:  # noqa: B027 - optional hook: most senders hold no connection
        """Release connections; the sender is not used again."""

    @contextmanager
    def in_flight_slot(self) -> Iterator[None]:
        """Hold one of the destination's ``max_in_flight`` slots (waiting for one); no limit: no wait."""
        limit = getattr(self.config, "max_in_flight", None)
        if limit is None:
            yield
            return
        slots = self.__dict__.get("_slots")
        if slots is None:  # made here, not in __init__: a subclass's __init__ need not call ours
            with _SLOTS_LOCK:
                slots = self.__dict__.setdefault("_slots", _Slots(limit))
        if getattr(slots.local, "held", False):  # this thread is already inside send()
            yield
            return
        if not slots.semaphore.acquire(blocking=False):
            log.debug("destination %s: %d sends in flight, waiting for one to finish", self.config.name, limit)
            # bounded, so the delivery's claim (delivery.claim_s) outlasts the wait and the send
            if not slots.semaphore.acquire(timeout=SLOT_WAIT_S):
                raise DestinationBusy(
                    f"destination {self.config.name}: {limit} sends in flight for {SLOT_WAIT_S:.0f} s (max_in_flight)"
                )
        slots.local.held = True
        try:
            yield
        finally:
            slots.local.held = False
            slots.semaphore.release()


def _limited(send: _SendMethod) -> _SendMethod:
    """``send`` run inside the destination's in-flight slots."""

    @functools.wraps(send)
    def limited(self: Sender, outgoing: Outgoing) -> str:
        with self.in_flight_slot():
            return send(self, outgoing)

    setattr(limited, "_in_flight_limited", True)  # noqa: B010 - a function attribute
    return limited


_SENDERS: dict[str, type[Sender]] = {}
_S = TypeVar("_S", bound=type[Sender])


def register_sender(cls: _S) -> _S:
    """Class decorator: make ``cls`` the sender of ``cls.type`` and its config a destination type."""
    existing = _SENDERS.get(cls.type)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"destination type {cls.type!r} is already served by {existing.__qualname__}")
    if cls.config_class.model_fields["type"].default != cls.type:
        raise ValueError(f"{cls.config_class.__name__}.type must default to {cls.type!r}")
    register_destination_type(cls.type, cls.config_class)
    _SENDERS[cls.type] = cls
    return cls


def load_senders() -> None:
    """Import the built-in senders and those that installed distributions declare."""
    from ecgbridge.outbound import fhir_sender, hl7_sender  # noqa: F401 - registration on import

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:
            log.error("destination type plug-in %s could not be loaded: %s", ep.name, type(exc).__name__)


def sender_class(type_name: str) -> type[Sender]:
    load_senders()
    try:
        return _SENDERS[type_name]
    except KeyError:
        raise ConfigError(f"no sender for destination type {type_name!r} (known: {sorted(_SENDERS)})") from None


def create_sender(config: DestinationConfig) -> Sender:
    """A new sender for one destination's configuration."""
    return sender_class(config.type)(config)
