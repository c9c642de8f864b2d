"""Hot reload of the configuration file (SIGHUP or the console), all or nothing, audited.

Routes, destinations and models change often; restarting the gateway for each would
drop connections from carts. The file is re-read and validated as a whole: an invalid
file changes nothing and the result lists its problems (file:line); a valid one replaces
the live settings for the next message, and the result shows what changed (secrets
masked) and which changes only take effect after a restart (sockets, storage, broker,
workers).
"""

from __future__ import annotations

import difflib
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ecgbridge.core.accounts import AccountStore
from ecgbridge.core.live import LiveSettings
from ecgbridge.core.settings import Settings, check_config, redact_url

__all__ = ["ReloadResult", "reload_settings", "settings_yaml", "restart_needed", "RESTART_SETTINGS"]

log = logging.getLogger("ecgbridge.reload")

#: Settings read once at start (they bind sockets, open the store, start processes): a change
#: is kept in the live settings but takes effect only after a restart. A prefix covers its keys.
RESTART_SETTINGS: tuple[str, ...] = (
    "data_dir",
    "listeners.dicom",
    "listeners.mllp",
    "listeners.inbox",
    "console.enabled",
    "console.host",
    "console.port",
    "console.tls",
    "storage",
    "broker",
    "workers",
    "log_level",
)

#: Keys whose values are secrets (never shown); ``*_env`` and ``*_file`` hold names and paths.
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_?key|private_?key|credential)", re.IGNORECASE)
_MASK = "********"
#: One reload at a time (SIGHUP and the console may ask together): each diff is against what it replaces.
_RELOADING = threading.Lock()
_DIFF_MAX_LINES = 400

Status = Literal["reloaded", "unchanged", "invalid", "not_possible"]


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did. ``ok``: the file's settings are in force now (changed or not)."""

    status: Status
    source_file: Path | None
    generation: int
    #: Why the file was refused (file:line: field: why), or why a reload is not possible.
    problems: list[str] = field(default_factory=list)
    #: Unified diff of the settings in force before and after (YAML, secrets masked).
    diff: str = ""
    #: Changed settings that take effect only after a restart (dotted names).
    restart_needed: list[str] = field(default_factory=list)
    #: Warnings about the new file (a key file missing, a token variable unset).
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in ("reloaded", "unchanged")

    @property
    def changed(self) -> bool:
        return self.status == "reloaded"

    @property
    def message(self) -> str:
        """One line for a log or a page (no patient data, no secrets)."""
        where = str(self.source_file) if self.source_file else "(no file)"
        if self.status == "reloaded":
            text = f"configuration reloaded from {where} (generation {self.generation})"
            if self.restart_needed:
                text += f"; needs a restart to take effect: {', '.join(self.restart_needed)}"
            return text
        if self.status == "unchanged":
            return f"configuration re-read from {where}: nothing changed (generation {self.generation})"
        if self.status == "invalid":
            return (
                f"configuration NOT reloaded: {where} has {len(self.problems)} problem(s); "
                f"the settings in force are unchanged (generation {self.generation})"
            )
        return f"configuration NOT reloaded: {self.problems[0] if self.problems else 'not possible'}"

    def lines(self) -> list[str]:
        out = [self.message]
        out += [f"  - {p}" for p in self.problems if self.status == "invalid"]
        out += [f"  warning: {w}" for w in self.warnings]
        if self.diff:
            out.append(self.diff.rstrip("\n"))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "ok": self.ok,
            "source_file": str(self.source_file) if self.source_file else None,
            "generation": self.generation,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "restart_needed": list(self.restart_needed),
            "diff": self.diff,
        }


# ----- showing settings without their secrets ------------------------------------------------
def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_KEY.search(key) and not key.endswith(("_env", "_file", "_url", "_id", "_type")):
            return _MASK
        return redact_url(value)
    return value


def _plain(settings: Settings) -> dict[str, Any]:
    data: dict[str, Any] = settings.model_dump(mode="json")
    masked: dict[str, Any] = _mask(data)
    return masked


def settings_yaml(settings: Settings) -> str:
    """``settings`` as YAML with every secret masked (passwords in URLs included)."""
    text: str = yaml.safe_dump(_plain(settings), sort_keys=False, allow_unicode=True)
    return text


def _at(data: Any, path: str) -> Any:
    """The value at a dotted ``path`` of nested mappings (None where it is absent)."""
    for part in path.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """The dotted keys under ``prefix`` whose values differ (the prefix itself for non-mappings)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys: list[str] = []
        for k in list(old) + [k for k in new if k not in old]:
            keys += _changed_keys(old.get(k), new.get(k), f"{prefix}.{k}")
        return keys
    return [prefix] if old != new else []


def restart_needed(old: Settings, new: Settings) -> list[str]:
    """Changed settings (dotted names) that only take effect when the service is restarted."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    found: list[str] = []
    for path in RESTART_SETTINGS:
        found += _changed_keys(_at(a, path), _at(b, path), path)
    return found


def _diff(old: Settings, new: Settings, old_name: str, new_name: str) -> str:
    lines = list(
        difflib.unified_diff(
            settings_yaml(old).splitlines(keepends=True),
            settings_yaml(new).splitlines(keepends=True),
            fromfile=old_name,
            tofile=new_name,
            n=2,
        )
    )
    if len(lines) > _DIFF_MAX_LINES:
        lines = lines[:_DIFF_MAX_LINES] + [f"... ({len(lines) - _DIFF_MAX_LINES} more lines)\n"]
    return "".join(lines)


# ----- the reload ------------------------------------------------------------------------------
def reload_settings(
    live: LiveSettings, accounts: AccountStore, *, actor: str, remote_addr: str | None = None
) -> ReloadResult:
    """Re-read ``live.current.source_file``; replace the live settings only when the file is valid.

    Every attempt is audited (action ``config_reload``, outcome ok / failed) with the diff
    or the problems. Never raises for a bad file: the result says what is wrong.
    """
    with _RELOADING:
        return _reload(live, accounts, actor, remote_addr)


def _reload(live: LiveSettings, accounts: AccountStore, actor: str, remote_addr: str | None) -> ReloadResult:
    old = live.current
    source = old.source_file
    if source is None:
        result = ReloadResult(
            "not_possible",
            None,
            live.generation,
            problems=[
                "the service runs on the embedded defaults (no configuration file), so there is nothing to "
                "re-read; start it with --config FILE (or ECGBRIDGE_CONFIG=FILE) to be able to reload"
            ],
        )
        _audit(accounts, actor, remote_addr, result)
        return result
    report = check_config(source)
    if report.settings is None:
        result = ReloadResult("invalid", source, live.generation, problems=report.problems, warnings=report.warnings)
        _audit(accounts, actor, remote_addr, result)
        return result
    new = report.settings
    diff = _diff(old, new, f"in force (generation {live.generation})", str(source))
    if not diff:
        result = ReloadResult("unchanged", source, live.generation, warnings=report.warnings)
        _audit(accounts, actor, remote_addr, result)
        return result
    restart = restart_needed(old, new)
    live.replace(new)
    result = ReloadResult(
        "reloaded", source, live.generation, diff=diff, restart_needed=restart, warnings=report.warnings
    )
    _audit(accounts, actor, remote_addr, result)
    return result


def _audit(accounts: AccountStore, actor: str, remote_addr: str | None, result: ReloadResult) -> None:
    detail: dict[str, Any] = {"status": result.status, "generation": result.generation}
    if result.diff:
        detail["diff"] = result.diff
    if result.problems:
        detail["problems"] = result.problems
    if result.restart_needed:
        detail["restart_needed"] = result.restart_needed
    if result.warnings:
        detail["warnings"] = result.warnings
    try:
        accounts.audit(
            actor,
            "config_reload",
            target=str(result.source_file) if result.source_file else None,
            outcome="ok" if result.ok else "failed",
            remote_addr=remote_addr,
            detail=detail,
        )
    except Exception:
        # the reload itself stands (or was refused) whatever happens to its audit row
        log.exception("could not write the audit row of a configuration reload")
