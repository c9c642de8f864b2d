"""``ecgbridge export training-set``: a de-identified copy of the site's over-read ECGs, for research.

    ECGBRIDGE_DEID_SECRET=... ecgbridge export training-set --out DIR [--since 2026-01-01] [--until DATE]
        [--secret-env VAR] [--format wfdb|npz] [--config FILE]

What is hashed, shifted, capped and left out is :mod:`ecgbridge.core.deid`'s docstring; the labels and
the training set themselves stay in the store. The secret is read from an environment variable
only (never an argument: command lines end up in shell histories and process lists); without one
the export is refused. Prints counts and the folder, never an identifier.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from ecgbridge.cli_common import open_store
from ecgbridge.core.settings import Settings

__all__ = ["add_export_commands"]


def cmd_export_training_set(settings: Settings, args: argparse.Namespace) -> int:
    from ecgbridge.core.deid import export_training_set, secret_from_env
    from ecgbridge.core.training_set import parse_when

    secret = secret_from_env(args.secret_env)  # first: no store is opened without a secret
    since, until = parse_when(args.since), parse_when(args.until)
    store = open_store(settings, announce=True)
    report = export_training_set(store, Path(args.out), secret=secret, since=since, until=until, fmt=args.format)
    print("\n".join(report.lines()))
    return 0


def add_export_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_config: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add ``export training-set`` to the CLI's sub-commands."""
    from ecgbridge.core.deid import FORMATS, SECRET_ENV

    p = sub.add_parser("export", help="write a de-identified copy of the site's data for research")
    esub = p.add_subparsers(dest="export_command", required=True, metavar="WHAT")
    q = esub.add_parser(
        "training-set",
        help="the over-read ECGs and their labels, de-identified (hashed ids, shifted dates, ages capped at 90)",
        description="Write the ECGs that have a cardiologist's confirmed read, with their labels, de-identified: "
        "ids as HMAC-SHA256 pseudonyms under a site secret (from an environment variable; refused without one), "
        "dates shifted per patient (same shift for all of a patient's records), no names or birth dates "
        "(age in years, capped at 90), waveforms as WFDB or NumPy, labels.csv, manifest.json and README.md.",
    )
    add_config(q)
    q.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder to write into")
    q.add_argument("--since", help="ECGs recorded since: a date (2026-01-01) or 30d, 12h, 2w ago (default: all)")
    q.add_argument("--until", help="ECGs recorded before this date (default: now)")
    q.add_argument(
        "--secret-env",
        default=SECRET_ENV,
        metavar="VAR",
        help=f"environment variable holding the site secret (default {SECRET_ENV}; at least 16 characters)",
    )
    q.add_argument("--format", choices=FORMATS, default="wfdb", help="waveform files: WFDB (default) or NumPy .npz")
    q.set_defaults(func=lambda args: cmd_export_training_set(load(args), args))
