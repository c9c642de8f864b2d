"""One sender per destination in a worker process, rebuilt when the destination's configuration changes.

The sender is what a process holds per destination: its connections (an HL7 destination's
persistent MLLP connection) and its ``max_in_flight`` slots (:meth:`Sender.in_flight_slot`),
so both are per process. Replacing a sender closes the old one; a send still under way on
it finishes first (an HL7 connection is closed when that send is done).
"""

from __future__ import annotations

import threading

from ecgbridge.core.settings import DestinationConfig
from ecgbridge.outbound.sender import Sender, create_sender

__all__ = ["SenderPool"]


class SenderPool:
    """Keeps senders (and their connections) across messages; thread-safe (a delivery worker's threads share it)."""

    def __init__(self) -> None:
        self._senders: dict[str, tuple[DestinationConfig, Sender]] = {}
        self._lock = threading.Lock()

    def get(self, config: DestinationConfig) -> Sender:
        with self._lock:
            held = self._senders.get(config.name)
            if held is not None and held[0] == config:
                return held[1]
            if held is not None:
                held[1].close()
            sender = create_sender(config)
            self._senders[config.name] = (config, sender)
            return sender

    def close(self) -> None:
        with self._lock:
            for _, sender in self._senders.values():
                sender.close()
            self._senders.clear()
