"""The configuration in force, replaceable while the gateway runs (hot reload of routes).

Listeners and the console read :attr:`LiveSettings.current` on each use, so a reload
takes effect for the next message without a restart. Settings that bind sockets (ports,
addresses, TLS files) are read once at start; a reload that changes them says a restart
is needed.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from ecgbridge.core.settings import Settings

__all__ = ["LiveSettings", "SettingsSource", "current"]


class LiveSettings:
    """Holds one :class:`Settings`; :meth:`replace` swaps it atomically for every reader."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        #: Incremented by every replace; shown in the console.
        self.generation = 1
        self.loaded_at = datetime.now(UTC)

    @property
    def current(self) -> Settings:
        return self._settings

    def replace(self, settings: Settings) -> None:
        with self._lock:
            self._settings = settings
            self.generation += 1
            self.loaded_at = datetime.now(UTC)


#: What a component may be given: fixed settings, or the live ones.
SettingsSource = Settings | LiveSettings


def current(source: SettingsSource) -> Settings:
    """The settings in force for ``source``."""
    return source.current if isinstance(source, LiveSettings) else source
