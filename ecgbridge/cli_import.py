"""``ecgbridge import``: push an archive of ECG files through the pipeline (store, route, analyse, deliver).

What a site does first with ECG AI is run a model over the past years' ECGs (for example to
find patients with a likely low ejection fraction). ``ecgbridge analyse`` only prints; this
records each file as a message, exactly as the inbox would (one code path:
:func:`ecgbridge.gateway.file_intake.take_file`), so the workers analyse it and the route's
destinations receive the results, and the console shows every one.

Re-running it over the same archive records nothing new (a file already imported under the
same name and content is recognised, and an identical SOP Instance is a resend), so an
interrupted import is finished by running it again. ``--route NAME`` sends every file
through that route whatever the routing rules say (a screening route whose destinations are
a research share rather than the EHR, say). The archive is only read, never moved.

A WFDB record (PhysioNet: a ``.hea`` header and the ``.dat``/``.mat`` signal files it names)
is one ECG: its header is taken as the record, stored with its signal files as one blob
(:func:`ecgbridge.gateway.file_intake.file_bytes`), and its signal files are not taken on
their own. A header whose signal file is missing is rejected, naming the file.

If the broker cannot be reached, the files are still recorded (``received``) and the
gateway's recovery sweep enqueues them once it runs; the summary says so.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ecgbridge.core.settings import Settings
from ecgbridge.errors import ConfigError, EcgBridgeError, StorageError

if TYPE_CHECKING:  # the CLI builds its parser on every command: load the intake path only for an import
    from ecgbridge.core.intake import Intake
    from ecgbridge.core.queue import Dispatcher
    from ecgbridge.core.store import MessageStore

__all__ = ["add_import_command"]


def archive_files(paths: list[Path], patterns: list[str]) -> Iterator[tuple[Path, str]]:
    """(file, name to record) for every regular file under ``paths`` matching ``patterns``.

    Streamed folder by folder in name order (an archive of any size is never listed whole in
    memory). The recorded name is ``import:`` plus the path relative to the folder given (the
    file's own name for a file given directly), so the same archive imported again matches.
    Symbolic links are not followed.

    A WFDB record is yielded once, as its ``.hea`` header (which is taken with the signal files
    it names): its signal files beside it are not yielded, whatever the patterns, and a signal
    file given directly stands for its header (once, however many of the record's files are given).
    """
    from ecgbridge.gateway.inbox import PARTIAL_SUFFIXES  # what the inbox never takes either

    given: set[Path] = set()
    for root in paths:
        if root.is_file():
            root = _header_of(root)
            if root.resolve() in given:
                continue
            given.add(root.resolve())
            found: Iterator[tuple[Path, str]] = iter([(root, root.name)])
        elif root.is_dir():
            found = _walk(root)
        else:
            raise ConfigError(f"{root}: no such file or folder")
        for path, rel in found:
            name = path.name
            if name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES):
                continue
            if patterns and not any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns):
                continue
            yield path, f"import:{rel}"


def _header_of(path: Path) -> Path:
    """The WFDB header beside ``path`` (same stem) when it names ``path`` as a signal file; else ``path``."""
    from ecgbridge.gateway.file_intake import is_wfdb_header, record_parts

    if is_wfdb_header(path):
        return path
    for suffix in (".hea", ".HEA"):
        header = path.with_suffix(suffix)
        if header.is_file() and not header.is_symlink() and record_parts(path.parent, [header.name, path.name]):
            return header
    return path


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    from ecgbridge.gateway.file_intake import record_parts

    for folder, dirs, files in os.walk(root):
        dirs.sort()
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        parts = record_parts(Path(folder), files)  # a WFDB record's signal files: taken with its header
        for name in sorted(files):
            if name in parts:
                continue
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path, path.relative_to(root).as_posix()


def cmd_import(args: argparse.Namespace, load: Callable[[argparse.Namespace], Settings]) -> int:
    from ecgbridge.core.intake import Intake
    from ecgbridge.core.queue import Dispatcher, make_celery
    from ecgbridge.core.states import NO_DELIVERY_FLAG
    from ecgbridge.core.store import MessageStore
    from ecgbridge.gateway.file_intake import Taken

    settings = load(args)
    if args.route:
        settings.route(args.route)  # an unknown route stops here, naming the ones there are
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    dispatcher = Dispatcher(make_celery(settings))
    broker_up = args.dry_run or dispatcher.broker_instance() is not None
    intake = Intake(settings, store, dispatcher if broker_up else _unreachable(dispatcher))
    flags = (NO_DELIVERY_FLAG,) if args.no_deliver else ()

    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    failures: list[str] = []
    progress = _Progress(quiet=args.json)
    interrupted = False
    try:
        _import_all(args, store, intake, flags, counts, reasons, failures, progress)
    except KeyboardInterrupt:  # Ctrl-C: what was recorded stays; the same command finishes the rest
        interrupted = True
    progress.done()

    summary = {
        "files": sum(counts.values()),
        **{t.value: counts[t.value] for t in Taken},
        "not_recorded": counts["not recorded"],
        "rejections": dict(reasons.most_common()),
        "not_recorded_files": failures,
        "dry_run": args.dry_run,
        "deliver": not args.no_deliver,
        "queued": broker_up and not args.dry_run,
        "route": args.route,
        "seconds": round(progress.elapsed, 1),
        "interrupted": interrupted,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_summary_text(summary, args))
    if interrupted:
        print(
            "interrupted: what is listed was recorded; run the same command again to import the rest", file=sys.stderr
        )
        return 130
    return 1 if failures else 0


def _import_all(
    args: argparse.Namespace,
    store: MessageStore,
    intake: Intake,
    flags: tuple[str, ...],
    counts: Counter[str],
    reasons: Counter[str],
    failures: list[str],
    progress: _Progress,
) -> None:
    from ecgbridge.gateway.file_intake import Taken, file_bytes, take_file, would_take
    from ecgbridge.gateway.inbox import MAX_FILE_BYTES

    for path, name in archive_files([Path(p) for p in args.paths], args.pattern):
        try:
            data = file_bytes(path, max_bytes=MAX_FILE_BYTES)  # a WFDB header: its record, packed as one
            outcome = (
                would_take(store, data, name)
                if args.dry_run
                else take_file(intake, data, name, route_name=args.route, flags=flags)
            )
        except (OSError, EcgBridgeError) as exc:  # not recorded: running the import again retries it
            counts["not recorded"] += 1
            if len(failures) < 50:
                failures.append(f"{name}: {exc}")
            progress.tick(counts)
            continue
        counts[outcome.taken.value] += 1
        if outcome.taken is Taken.REJECTED and outcome.error:
            reasons[outcome.error.splitlines()[0][:120]] += 1
        progress.tick(counts)


def _summary_text(summary: dict[str, object], args: argparse.Namespace) -> str:
    verb = "would be stored" if args.dry_run else "stored"
    lines = [
        f"{summary['files']} file(s) in {summary['seconds']} s: {summary['stored']} {verb} for analysis"
        + (f" by route {args.route}" if args.route else "")
        + (" (not delivered)" if args.no_deliver else "")
        + f", {summary['unrouted']} unrouted, {summary['already']} imported before, "
        f"{summary['duplicate']} identical resends of ECGs already taken, {summary['rejected']} "
        f"{'unreadable' if args.dry_run else 'rejected'}, {summary['not_recorded']} not recorded"
    ]
    rejections = summary["rejections"]
    assert isinstance(rejections, dict)
    lines += [
        f"  {'unreadable' if args.dry_run else 'rejected'} x{n}: {why}" for why, n in list(rejections.items())[:10]
    ]
    failures = summary["not_recorded_files"]
    assert isinstance(failures, list)
    lines += [f"  not recorded: {line}" for line in failures[:10]]
    if not args.dry_run and not summary["queued"]:
        lines.append(
            "the broker was not reachable: the messages wait as 'received' and the gateway enqueues them "
            "when it runs (its recovery sweep)"
        )
    return "\n".join(lines)


class _Progress:
    """A progress line on stderr every second or so: files so far, by outcome, and the rate."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet or not sys.stderr.isatty() and os.environ.get("ECGBRIDGE_PROGRESS") != "1"
        self.started = time.monotonic()
        self._shown = self.started

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def tick(self, counts: Counter[str]) -> None:
        now = time.monotonic()
        if self.quiet or now - self._shown < 1.0:
            return
        self._shown = now
        n = sum(counts.values())
        by = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"\r{n} files ({by}), {n / max(self.elapsed, 1e-6):.1f}/s", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if not self.quiet:
            print(file=sys.stderr)


def _unreachable(dispatcher: Dispatcher) -> Dispatcher:
    """A dispatcher for a broker that did not answer: every message waits for the recovery sweep
    (instead of each file waiting for the broker's connection timeout)."""

    class Unreachable(type(dispatcher)):  # type: ignore[misc]
        def analyse(self, message_id: str) -> None:
            raise StorageError("the broker was not reachable when the archive was imported")

    return Unreachable(dispatcher.app)


def add_import_command(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_config: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace], Settings],
) -> None:
    p = sub.add_parser(
        "import",
        help="record an archive of ECG files as messages: analysed and delivered like any other",
        description="Record each ECG file under PATHS as a message, as the inbox does: the workers analyse it and "
        "the route's destinations receive the results. Running it again over the same archive records nothing new. "
        "The files are only read.",
    )
    add_config(p)
    p.add_argument(
        "paths", nargs="+", help="files and folders (folders are read recursively; a WFDB record by its .hea header)"
    )
    p.add_argument(
        "--pattern",
        action="append",
        default=[],
        help="only file names matching (e.g. '*.dcm'; '*.hea' for WFDB records); repeatable",
    )
    p.add_argument("--route", help="send every file through this route, whatever the routing rules say")
    p.add_argument("--no-deliver", action="store_true", help="analyse, but deliver the results nowhere")
    p.add_argument("--dry-run", action="store_true", help="say what would be imported; record nothing")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=lambda args: cmd_import(args, load))
