"""``ecgbridge overreads``: the cardiologists' reads IT staff look after, from the gateway machine's shell.

``list`` shows the stored reads (``--unlinked``: those no ECG was found for, with why);
``unmatched`` the statement wordings no table knows, most frequent first (the ones to add to
``mapping/overread.py``'s table); ``relink`` tries the unlinked reads again, e.g. once ECGs that
came after their reads have arrived. Nothing printed names a patient: reads are listed by
message ids, statuses, readers and statements. The rules are :mod:`ecgbridge.core.labels`'.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from ecgbridge.cli_common import open_store, settings_command
from ecgbridge.core import labels
from ecgbridge.core.settings import Settings

__all__ = ["add_overread_commands"]


def _list(settings: Settings, args: argparse.Namespace) -> int:
    reads = labels.overreads(
        open_store(settings, announce=True), unlinked=True if args.unlinked else None, limit=args.limit
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in reads], indent=2, default=str))
        return 0
    if not reads:
        print("no unlinked over-reads" if args.unlinked else "no over-reads")
        return 0
    print(f"{'ID':>6}  {'STATUS':<6}  {'STATE':<11}  {'MESSAGE':<36}  ECG / WHY NOT  LABELS")
    for r in reads:
        target = r.ecg_message_id or (r.unlinked_reason or "-")
        present = ",".join(k for k, v in (r.labels or {}).items() if v) or ("-" if r.labels is None else "none")
        tier = f" tier {r.severity4}" if r.severity4 else ""
        print(f"{r.id:>6}  {r.status:<6}  {r.state:<11}  {r.message_id:<36}  {target}  {present}{tier}")
    return 0


def _unmatched(settings: Settings, args: argparse.Namespace) -> int:
    found = labels.unmatched_statements(open_store(settings, announce=True))
    if args.json:
        print(json.dumps([{"statement": text, "reads": n} for text, n in found], indent=2))
        return 0
    if not found:
        print("every statement of every over-read was understood")
        return 0
    print(f"{'READS':>6}  STATEMENT NO TABLE KNOWS")
    for text, n in found:
        print(f"{n:>6}  {text}")
    return 0


def _relink(settings: Settings, args: argparse.Namespace) -> int:
    done = labels.relink(open_store(settings, announce=True), window_min=settings.overreads.link_window_min)
    print(f"{len(done)} over-read(s) linked" + (f": {', '.join(map(str, done))}" if done else ""))
    return 0


def add_overread_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_config: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add ``overreads`` (list, unmatched, relink) to the CLI's sub-commands."""

    def bind(parser: argparse.ArgumentParser, func: Callable[[Settings, argparse.Namespace], int]) -> None:
        settings_command(parser, func, add_config, load)

    p = sub.add_parser("overreads", help="cardiologists' confirmed reads (labels): list, unmatched statements, relink")
    osub = p.add_subparsers(dest="overreads_command", required=True, metavar="ACTION")
    q = osub.add_parser("list", help="stored over-reads, newest first")
    q.add_argument("--unlinked", action="store_true", help="only those no ECG was found for, with the reason")
    q.add_argument("--limit", type=int, default=100, help="at most this many (0: all)")
    q.add_argument("--json", action="store_true")
    bind(q, _list)
    q = osub.add_parser("unmatched", help="statement wordings no table knows, with how many reads had them")
    q.add_argument("--json", action="store_true")
    bind(q, _unmatched)
    q = osub.add_parser("relink", help="try to link the unlinked over-reads again (their ECG may have come since)")
    bind(q, _relink)
