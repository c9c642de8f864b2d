"""``ecgbridge validate`` and ``ecgbridge drift``: the models on this site's own patients, and its inputs over time.

    ecgbridge validate [--since 30d | 2026-11-01] [--until DATE] [--route NAME] [--bootstrap 1000] [--json]
    ecgbridge drift [--reference-since DATE --reference-until DATE | --reference-weeks 4] [--since 8w] [--json]

What they compute and the rules they follow are in :mod:`ecgbridge.core.validation` and
:mod:`ecgbridge.core.drift`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from ecgbridge.cli_common import open_store
from ecgbridge.core.settings import Settings
from ecgbridge.core.training_set import parse_when

__all__ = ["add_validate_command", "cmd_drift", "cmd_validate"]


def cmd_validate(settings: Settings, args: argparse.Namespace) -> int:
    from ecgbridge.core.validation import format_report, validation_report

    if args.route is not None:
        settings.route(args.route)  # an unknown route is a clear error, not an empty report
    store = open_store(settings)
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


def cmd_drift(settings: Settings, args: argparse.Namespace) -> int:
    from ecgbridge.core.drift import drift_report, format_drift

    store = open_store(settings)
    report = drift_report(
        store,
        reference_since=parse_when(args.reference_since),
        reference_until=parse_when(args.reference_until),
        reference_weeks=args.reference_weeks,
        since=parse_when(args.since),
    )
    print(json.dumps(report, indent=2, default=str) if args.json else format_drift(report))
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

    p = sub.add_parser("drift", help="input statistics and positive rates per week against reference weeks (PSI)")
    add_config(p)
    p.add_argument("--reference-since", help="start of the reference window (default: the first week with data)")
    p.add_argument("--reference-until", help="end of the reference window (default: --reference-weeks later)")
    p.add_argument("--reference-weeks", type=int, default=4, help="length of the default reference window (4)")
    p.add_argument("--since", help="only the weeks from this date (30d, 2026-11-01)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=lambda args: cmd_drift(load(args), args))
