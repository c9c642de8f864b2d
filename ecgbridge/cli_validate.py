"""``ecgbridge validate``: the models on this site's own patients, against the cardiologists' over-reads.

    ecgbridge validate [--since 30d | 2026-11-01] [--until DATE] [--route NAME] [--bootstrap 1000] [--json]

What it computes and the rules it follows are in :mod:`ecgbridge.core.validation`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from ecgbridge.core.settings import Settings
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import ConfigError

__all__ = ["add_validate_command", "parse_when"]

_AGO = re.compile(r"^(\d+)\s*([dhw])$")


def parse_when(value: str | None) -> datetime | None:
    """``30d`` / ``12h`` / ``2w`` ago, or an ISO date / date-time (UTC when it names no zone)."""
    if value is None:
        return None
    m = _AGO.match(value.strip())
    if m:
        unit = {"d": "days", "h": "hours", "w": "weeks"}[m[2]]
        return datetime.now(UTC) - timedelta(**{unit: int(m[1])})
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ConfigError(f"{value!r} is neither a duration (30d, 12h, 2w) nor a date (2026-11-01)") from exc
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def cmd_validate(settings: Settings, args: argparse.Namespace) -> int:
    from ecgbridge.core.validation import format_report, validation_report

    if args.route is not None:
        settings.route(args.route)  # an unknown route is a clear error, not an empty report
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    report = validation_report(
        store,
        settings,
        since=parse_when(args.since),
        until=parse_when(args.until),
        route=args.route,
        n_bootstrap=args.bootstrap,
    )
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def add_validate_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_config: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add ``validate`` to the CLI's sub-commands."""
    p = sub.add_parser(
        "validate", help="the models on this site's patients: AUROC, sensitivity, calibration vs over-reads"
    )
    add_config(p)
    p.add_argument("--since", help="ECGs received since: 30d, 12h, 2w ago, or a date (default: all)")
    p.add_argument("--until", help="ECGs received before this (same forms; default: now)")
    p.add_argument("--route", help="only this route's ECGs")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the intervals (default 1000)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=lambda args: cmd_validate(load(args), args))
