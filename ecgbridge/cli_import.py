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

If the broker cannot be reached, the files are still recorded (``received``) and the
gateway's recovery sweep enqueues them once it runs; the summary says so.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from ecgbridge.core.queue import Dispatcher
from ecgbridge.core.settings import Settings
from ecgbridge.errors import ConfigError, EcgBridgeError, StorageError

__all__ = ["add_import_command"]

#: Names an exporter uses while still writing, and files never taken (as in the inbox).
_SKIPPED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp", "~")
_MAX_FILE_BYTES = 64 * 1024 * 1024


def archive_files(paths: list[Path], patterns: list[str]) -> Iterator[tuple[Path, str]]:
    """(file, name to record) for every regular file under ``paths`` matching ``patterns``, sorted.

    The recorded name is ``import:`` plus the path relative to the folder given (the file's
    own name for a file given directly), so the same archive imported again matches.
    """
    for root in paths:
        if root.is_file():
            candidates = [(root, root.name)]
        elif root.is_dir():
            candidates = sorted(
                ((p, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file() and not p.is_symlink()),
                key=lambda item: item[1],
            )
        else:
            raise ConfigError(f"{root}: no such file or folder")
        for path, rel in candidates:
            name = path.name
            if name.startswith(".") or name.lower().endswith(_SKIPPED_SUFFIXES):
                continue
            if patterns and not any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns):
                continue
            yield path, f"import:{rel}"


def cmd_import(args: argparse.Namespace, load: Callable[[argparse.Namespace], Settings]) -> int:
    from ecgbridge.core.intake import Intake
    from ecgbridge.core.queue import make_celery
    from ecgbridge.core.store import MessageStore
    from ecgbridge.gateway.file_intake import Taken, take_file

    settings = load(args)
    if args.route:
        settings.route(args.route)  # an unknown route stops here, naming the ones there are
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    dispatcher = Dispatcher(make_celery(settings))
    broker_up = dispatcher.broker_instance() is not None
    intake = Intake(settings, store, dispatcher if broker_up else _unreachable(dispatcher))

    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    files = list(archive_files([Path(p) for p in args.paths], args.pattern))
    for n, (path, name) in enumerate(files, 1):
        try:
            if path.stat().st_size > _MAX_FILE_BYTES:
                raise OSError(f"more than {_MAX_FILE_BYTES} bytes: not an ECG")
            data = path.read_bytes()
            outcome = take_file(intake, data, name, route_name=args.route)
        except (OSError, EcgBridgeError) as exc:  # not recorded: running the import again retries it
            counts["not recorded"] += 1
            failures.append(f"{name}: {exc}")
            continue
        counts[outcome.taken.value] += 1
        if outcome.taken is Taken.REJECTED and outcome.error:
            reasons[outcome.error.splitlines()[0][:120]] += 1
        if not args.json and n % 100 == 0:
            print(f"{n}/{len(files)} files ...", file=sys.stderr, flush=True)

    summary = {
        "files": len(files),
        **{t.value: counts[t.value] for t in Taken},
        "not_recorded": counts["not recorded"],
        "rejections": dict(reasons.most_common()),
        "not_recorded_files": failures[:50],
        "queued": broker_up,
        "route": args.route,
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{len(files)} file(s) in {summary['seconds']} s: {counts['stored']} stored for analysis"
            + (f" by route {args.route}" if args.route else "")
            + f", {counts['unrouted']} unrouted, {counts['already']} imported before, "
            f"{counts['duplicate']} identical resends of ECGs already taken, {counts['rejected']} rejected, "
            f"{counts['not recorded']} not recorded"
        )
        for reason, count in reasons.most_common(10):
            print(f"  rejected x{count}: {reason}")
        for line in failures[:10]:
            print(f"  not recorded: {line}")
        if not broker_up:
            print(
                "the broker was not reachable: the messages wait as 'received' and the gateway enqueues them "
                "when it runs (its recovery sweep)"
            )
    return 1 if failures else 0


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
    p.add_argument("paths", nargs="+", help="files and folders (folders are read recursively)")
    p.add_argument("--pattern", action="append", default=[], help="only file names matching (e.g. '*.dcm'); repeatable")
    p.add_argument("--route", help="send every file through this route, whatever the routing rules say")
    p.add_argument("--json", action="store_true", help="the summary as JSON")
    p.set_defaults(func=lambda args: cmd_import(args, load))
