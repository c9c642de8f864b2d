"""The ``ecgbridge`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecgbridge import __version__
from ecgbridge.core.settings import Settings, load_settings, redact_url
from ecgbridge.errors import ConfigError, EcgBridgeError, InputError

if TYPE_CHECKING:
    from ecgbridge.core.store import MessageStore

__all__ = ["main", "build_parser"]

log = logging.getLogger("ecgbridge")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom's DEBUG/INFO output can dump dataset contents (patient names): keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # httpx logs request URLs at INFO; a Patient search URL carries the MRN.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # matplotlib (the worker's report rendering) lists every font it scans at DEBUG.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


#: The configuration file every command reads when --config is not given.
CONFIG_ENV = "ECGBRIDGE_CONFIG"


def _config_path(args: argparse.Namespace) -> str | None:
    """--config, else $ECGBRIDGE_CONFIG, else None (the embedded defaults)."""
    return getattr(args, "config", None) or os.environ.get(CONFIG_ENV) or None


def _config_origin(args: argparse.Namespace) -> str:
    if getattr(args, "config", None):
        return f"config: {args.config}"
    if os.environ.get(CONFIG_ENV):
        return f"config: {os.environ[CONFIG_ENV]} from {CONFIG_ENV}"
    return "no config file: embedded defaults"


def _settings(args: argparse.Namespace) -> Settings:
    path = _config_path(args)
    try:
        return load_settings(path)
    except ConfigError as exc:
        if path is not None and not getattr(args, "config", None) and not exc.problems:
            raise ConfigError(f"{exc.message} (named by {CONFIG_ENV})", exc.problems) from exc
        raise


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help=f"YAML configuration (default: ${CONFIG_ENV}, else the embedded defaults)",
    )


# ----- commands ---------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from ecgbridge.service import run_all

    settings = _settings(args)
    _setup_logging(settings.log_level)
    run_all(settings)
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from ecgbridge.service import Gateway, _wait_for_signal, reload_on_sighup

    settings = _settings(args)
    _setup_logging(settings.log_level)
    if settings.embedded_broker:
        raise ConfigError(
            "'ecgbridge gateway' needs broker.url (or ECGBRIDGE_BROKER_URL): "
            "the embedded broker runs only under 'ecgbridge run'"
        )
    gw = Gateway(settings)
    gw.start()
    reloads = ", SIGHUP reloads the configuration file" if settings.source_file else ""
    print(
        f"ecgbridge gateway running (DICOM port {gw.dicom.port if gw.dicom else '-'}, console "
        f"{f'{gw.console.scheme}://{settings.console.host}:{gw.console.port}/' if gw.console else 'off'}). "
        f"Ctrl-C stops{reloads}.",
        flush=True,
    )

    def _workers_note(result: Any) -> None:
        if result.changed:
            log.info(
                "workers read the configuration when they start: restart them (or send them SIGHUP) "
                "so that they know new routes, models and destinations"
            )

    try:
        _wait_for_signal(reload_on_sighup(gw, after=_workers_note))
    finally:
        gw.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ecgbridge.service import run_worker

    settings = _settings(args)
    _setup_logging(settings.log_level)
    if settings.embedded_broker:
        raise ConfigError("'ecgbridge worker' needs broker.url (or ECGBRIDGE_BROKER_URL) to reach the broker")
    code = run_worker(settings, concurrency=args.concurrency, queues=args.queues)
    if code:
        # Celery gave up by itself (kombu's Redis transport can, while reconnecting to a broker that
        # restarted): start afresh in this process, so the worker comes back with or without a supervisor.
        log.error("the worker stopped on an unrecoverable error (status %d); starting it again in 5 s", code)
        time.sleep(5)
        os.execv(sys.executable, [sys.executable, "-m", "ecgbridge", *sys.argv[1:]])
    return 0


def _read_file(path: Path):  # type: ignore[no-untyped-def]
    from ecgbridge.mapping.readers import read_ecg_file

    return read_ecg_file(path)


#: Measurement key -> (label, unit) as printed; the units are those of the FHIR / HL7 results.
_MEASUREMENT_DISPLAY: dict[str, tuple[str, str]] = {
    "heart_rate": ("heart rate", "/min"),
    "rr_interval": ("RR interval", "ms"),
    "pr_interval": ("PR interval", "ms"),
    "qrs_duration": ("QRS duration", "ms"),
    "qt_interval": ("QT interval", "ms"),
    "qtc_interval": ("QTc (Bazett)", "ms"),
    "qtc_fridericia": ("QTc (Fridericia)", "ms"),
    "p_axis": ("P axis", "deg"),
    "qrs_axis": ("QRS axis", "deg"),
    "t_axis": ("T axis", "deg"),
    "sokolow_lyon": ("Sokolow-Lyon voltage", "mV"),
    "cornell": ("Cornell voltage", "mV"),
    "lvef": ("LVEF", "%"),
}


def _measurement_lines(extra: dict[str, Any]) -> list[str]:
    """A measurements output's values with their units, one per line ("heart rate  61 /min")."""
    values: dict[str, Any] = dict(extra.get("measurements") or {})
    features = extra.get("features") or {}
    for key in ("rr_interval", "qtc_fridericia", "sokolow_lyon", "cornell"):
        if key not in values and isinstance(features.get(key), int | float):
            values[key] = features[key]
    order = list(_MEASUREMENT_DISPLAY)
    lines = []
    for key in sorted(values, key=lambda k: order.index(k) if k in order else len(order)):
        value = values[key]
        label, unit = _MEASUREMENT_DISPLAY.get(key, (key.replace("_", " "), ""))
        if isinstance(value, int | float):
            shown = (
                f"{value:.2f}" if unit == "mV" else f"{value:.0f}" if unit in ("ms", "/min", "deg") else f"{value:g}"
            )
        else:
            shown = str(value)
        lines.append(f"{label:<22} {shown} {unit}".rstrip())
    return lines


def _finding_lines(findings: list[dict[str, Any]]) -> list[str]:
    """One aligned line per finding: code, name, probability, threshold, decision, risk tier."""
    code_w = max((len(str(f["code"])) for f in findings), default=0)
    name_w = max((len(str(f.get("display") or "")) for f in findings), default=0)
    lines = []
    for f in findings:
        mark = "PRESENT" if f["present"] else "-"
        tier = f"  risk tier {f['tier']}" if f.get("tier") else ""
        threshold = f" (threshold {f['threshold']:.2f})" if f.get("threshold") is not None else ""
        lines.append(
            f"{f['code']:<{code_w}}  {str(f.get('display') or ''):<{name_w}}  p={f['probability']:.3f}"
            f"{threshold}  {mark:<7}{tier}".rstrip()
        )
    return lines


def _with_model_inputs(registry: Any, names: list[str]) -> tuple[list[str], list[str]]:
    """``names`` plus the signal models whose outputs a listed derived model reads; (names, notes)."""
    from ecgbridge.inference.models import LoadedModel

    names = list(dict.fromkeys(names))
    notes: list[str] = []
    for name in list(names):
        model = registry.get(name)
        wanted = getattr(getattr(model, "manifest", None), "diagnosis_model", None)
        if isinstance(model, LoadedModel) or not wanted:
            continue
        loaded = [registry.get(n) for n in names]
        if any(isinstance(m, LoadedModel) and m.manifest.task == "diagnosis" for m in loaded):
            continue
        needed = str(wanted).split()[0]
        names.insert(0, needed)
        notes.append(f"model {name} reads the output of the {needed} model ({wanted}): running {needed} too")
    return names, notes


def cmd_analyse(args: argparse.Namespace) -> int:
    from ecgbridge.inference.models import ModelRegistry
    from ecgbridge.inference.pipeline import analyse_ecg
    from ecgbridge.mapping.abnormality_result import summary_lines
    from ecgbridge.mapping.ecg import AnalysisResult
    from ecgbridge.mapping.lvef_result import LVEF_TASK, explanation_lines

    settings = _settings(args)
    _setup_logging("WARNING")
    paths = {m.name: Path(m.path) for m in settings.models if m.path is not None}
    registry = ModelRegistry(paths=paths)
    models, notes = _with_model_inputs(registry, args.model or [m.name for m in settings.models])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    reports: list[dict[str, Any]] = []
    failed = 0
    for name in args.files:
        path = Path(name)
        try:
            ecg = _read_file(path)
            result = analyse_ecg(ecg, registry, models, message_id=path.name)
            reports.append(
                {
                    "file": str(path),
                    "ok": True,
                    "leads": list(ecg.leads),
                    "fs": ecg.fs,
                    "duration_s": round(ecg.duration_s, 3),
                    **result.to_dict(),
                }
            )
        except (EcgBridgeError, OSError) as exc:
            failed += 1
            reports.append({"file": str(path), "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        for r in reports:
            print(f"{r['file']}:")
            if not r["ok"]:
                print(f"  error: {r['error']}")
                continue
            print(f"  {len(r['leads'])} leads, {r['fs']:g} Hz, {r['duration_s']:g} s")
            for flag in r["ecg_flags"] + r["quality_flags"]:
                print(f"  flag: {flag}")
            for out in AnalysisResult.from_dict(r).outputs:
                if out.task == "measurements":
                    print(f"  measurements ({out.model} {out.version}):")
                    for line in _measurement_lines(out.extra):
                        print(f"    {line}")
                    continue
                print(f"  model {out.model} {out.version}:")
                for line in _finding_lines([f.__dict__ for f in out.findings]):
                    print(f"    {line}")
                severity = out.extra.get("severity4_display") or out.extra.get("severity_display")
                if severity:
                    print(f"    severity tier: {severity}")
                if out.task == LVEF_TASK:
                    for line in explanation_lines(out):
                        print(f"    {line}")
                for line in summary_lines(out):  # a knowledge-transfer model's predicted abnormalities
                    print(f"    {line}")
            print(f"  {r['label']}")
    return 1 if failed else 0


def _store(settings: Settings, args: argparse.Namespace | None = None):  # type: ignore[no-untyped-def]
    """The message store, saying on stderr which one it is (and which config named it)."""
    from ecgbridge.core.store import MessageStore

    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    origin = _config_origin(args) if args is not None else "config"
    if os.environ.get("ECGBRIDGE_DATABASE_URL"):
        origin += "; ECGBRIDGE_DATABASE_URL overrides it"
    print(f"store: {redact_url(settings.database_url)} ({origin})", file=sys.stderr)
    return store


def _summary(row: Any, result: dict[str, Any] | None) -> dict[str, Any]:
    findings: dict[str, float] = {}
    if result:
        for out in result.get("outputs", []):
            for f in out["findings"]:
                findings[f["code"]] = f["probability"]
    return {
        "id": row.id,
        "received_at": row.received_at.isoformat(),
        "source": row.source,
        "remote": row.remote,
        "sop_instance_uid": row.sop_instance_uid,
        "state": row.state,
        "route": row.route,
        "error": row.error,
        "flags": row.flags or [],
        "findings": findings,
    }


def _write_csv(store: Any, rows: list[Any], out: Any) -> None:
    """One line per message: what it is, its state, and each model's probability per class (``model:code``).

    For a spreadsheet or a notebook after ``ecgbridge import``; the probabilities are the
    result's (not for clinical use), the columns the union of every message's classes.
    """
    import csv

    records = []
    columns: dict[str, None] = {}
    for row in rows:
        res = store.get_result(row.id)
        values: dict[str, Any] = {}
        for output in (res.result or {}).get("outputs", []) if res else []:
            for f in output.get("findings", []):
                key = f"{output.get('model')}:{f['code']}"
                values[key] = f["probability"]
                columns.setdefault(key)
        records.append((row, values))
    writer = csv.writer(out)
    fixed = ["id", "received_at", "source", "remote", "sop_instance_uid", "state", "route", "error"]
    writer.writerow([*fixed, *columns])
    for row, values in records:
        head = [row.id, row.received_at.isoformat(), row.source, row.remote, row.sop_instance_uid]
        writer.writerow([*head, row.state, row.route, row.error, *(values.get(c, "") for c in columns)])


def cmd_messages_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings, args)
    rows = store.list(limit=args.limit, state=args.state, route=args.route)
    if args.csv:
        _write_csv(store, rows, sys.stdout)
        return 0
    items = []
    for row in rows:
        res = store.get_result(row.id)
        items.append(_summary(row, res.result if res else None))
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    if not items:
        print("no messages")
        return 0
    print(f"{'ID':<36}  {'RECEIVED':<19}  {'SOURCE':<6}  {'STATE':<9}  FINDINGS / ERROR")
    for it in items:
        detail = it["error"] or " ".join(f"{k}={v:.2f}" for k, v in it["findings"].items())
        print(f"{it['id']:<36}  {it['received_at'][:19]:<19}  {it['source']:<6}  {it['state']:<9}  {detail}")
    return 0


_EXTENSIONS = {"application/pdf": "pdf", "image/png": "png"}


def _size(n: int) -> str:
    return f"{n} bytes" if n < 10 * 1024 else f"{n / 1024:.0f} KiB" if n < 10 * 1024 * 1024 else f"{n / 2**20:.1f} MiB"


def _show_lines(view: Any) -> list[str]:
    """``messages show`` as text: only what the message has (no empty headings, no 'None')."""
    from ecgbridge.mapping.abnormality_result import summary_lines
    from ecgbridge.mapping.ecg import AnalysisResult
    from ecgbridge.mapping.lvef_result import LVEF_TASK, explanation_lines

    m = view.message
    via = f"via {m['source']}" + (f" from {m['remote']}" if m.get("remote") else "")
    lines = [f"message {m['id']}", f"  state: {m['state']}", f"  received: {m['received_at']} {via}"]
    for label, key in (
        ("message type", "message_type"),
        ("SOP class", "sop_class_uid"),
        ("SOP instance", "sop_instance_uid"),
    ):
        if m.get(key):
            lines.append(f"  {label}: {m[key]}")
    orders = [
        f"{label} {m[key]}"
        for label, key in (("placer", "placer_order_number"), ("filler", "filler_order_number"))
        if m.get(key)
    ]
    if orders:
        lines.append(f"  order numbers: {', '.join(orders)}")
    if m.get("route"):
        lines.append(f"  route: {m['route']}")
    elif m["state"] == "unrouted":
        lines.append("  route: none matched (see 'ecgbridge routes explain ID')")
    if m.get("error"):
        lines.append(f"  error: {m['error']}")
    lines += [f"  flag: {flag}" for flag in m.get("flags") or []]
    result = view.result
    if result:
        for flag in result.get("quality_flags", []) + result.get("ecg_flags", []):
            if flag not in (m.get("flags") or []):
                lines.append(f"  flag: {flag}")
        for out in result.get("outputs", []):
            extra = out.get("extra") or {}
            if out.get("task") == "measurements":
                measured = _measurement_lines(extra)
                if measured:
                    lines.append(f"  measurements ({out['model']} {out['version']}):")
                    lines += [f"    {line}" for line in measured]
                continue
            lines.append(f"  model {out['model']} {out['version']}:")
            lines += [f"    {line}" for line in _finding_lines(out.get("findings", []))]
            severity = extra.get("severity4_display") or extra.get("severity_display")
            if severity:
                lines.append(f"    severity tier: {severity}")
            parsed = AnalysisResult.from_dict({"message_id": m["id"], "outputs": [out]}).outputs[0]
            if out.get("task") == LVEF_TASK:
                lines += [f"    {line}" for line in explanation_lines(parsed)]
            lines += [f"    {line}" for line in summary_lines(parsed)]  # predicted abnormalities (KT model)
        attachments = result.get("attachments") or []
        if attachments:
            lines.append("  attachments:")
            for i, a in enumerate(attachments, 1):
                ext = _EXTENSIONS.get(a["content_type"], "bin")
                lines.append(
                    f"    {i}. {a['title']} ({a['content_type']}, {_size(int(a['size']))}): "
                    f"ecgbridge messages attachment {m['id'][:8]} {i} --out report-{m['id'][:8]}.{ext}"
                )
        if result.get("label"):
            lines.append(f"  {result['label']}")
    for d in view.deliveries:
        lines.append(
            f"  delivery to {d['destination']}: {d['state']} after {d['attempts']} attempt(s)"
            + (f", {d['remote_ref']}" if d["remote_ref"] else "")
            + (f"; last error: {d['last_error']}" if d["last_error"] else "")
        )
    for e in view.events:
        lines.append(f"  {e['at'][:19]} {e['level']}: {e['kind']}: {e['detail']}")
    return lines


def cmd_messages_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings, args)
    view = store.view(args.id)
    if view is None:
        print(f"no message with id {args.id}", file=sys.stderr)
        return 1
    data = {"message": view.message, "result": view.result, "deliveries": view.deliveries, "errors": view.events}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print("\n".join(_show_lines(view)))
    return 0


def cmd_messages_attachment(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings, args)
    view = store.view(args.id)
    if view is None:
        print(f"no message with id {args.id}", file=sys.stderr)
        return 1
    attachments = (view.result or {}).get("attachments") or []
    if not attachments and view.result is not None:
        attachments = _draw_report(settings, store, view.message["id"])
    if not attachments:
        print(
            f"message {view.message['id']} has no attachments (not analysed yet, or drawing its report failed: "
            "see its render_failed event)",
            file=sys.stderr,
        )
        return 1
    if not 1 <= args.n <= len(attachments):
        print(f"message {view.message['id']} has attachments 1 to {len(attachments)}, not {args.n}", file=sys.stderr)
        return 1
    a = attachments[args.n - 1]
    try:
        data = store.read_blob(a["blob_sha256"])
    except OSError as exc:
        raise InputError(f"attachment {args.n} is missing from the blob store ({exc.strerror or exc})") from exc
    out = args.out or f"report-{view.message['id'][:8]}.{_EXTENSIONS.get(a['content_type'], 'bin')}"
    if out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    target = Path(out)
    target.write_bytes(data)
    print(f"wrote {target} ({a['content_type']}, {len(data)} bytes): {a['title']}")
    return 0


def _draw_report(settings: Settings, store: MessageStore, message_id: str) -> list[dict[str, Any]]:
    """Draw the report of a result no destination wanted one for, here (reports are drawn only when wanted)."""
    from ecgbridge.worker.jobs import WorkerContext, render_report

    print(f"message {message_id}: drawing its report (no destination of its route carries one)", file=sys.stderr)
    ctx = WorkerContext.create(settings, store=store)
    return [a.__dict__.copy() for a in render_report(ctx, message_id)]


# ----- routes ---------------------------------------------------------------------------------
def cmd_routes_list(args: argparse.Namespace) -> int:
    from ecgbridge.core.routing import route_criteria

    settings = _settings(args)
    print(_config_origin(args), file=sys.stderr)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in settings.routes], indent=2))
        return 0
    print("tried in this order; the first route that matches takes the message, none: unrouted (kept, not analysed)")
    for i, r in enumerate(settings.routes):
        print(f"{i + 1}. {r.name}")
        print(f"   matches: {route_criteria(r)}")
        print(f"   models: {', '.join(r.models) or '-'}; destinations: {', '.join(r.destinations) or '-'}")
        if r.ehr_context:
            print(f"   EHR context: {r.ehr_context}")
    return 0


def cmd_routes_explain(args: argparse.Namespace) -> int:
    from ecgbridge.core.explain import explain_bytes, explain_message

    settings = _settings(args)
    target = Path(args.target)
    if target.is_file():
        explanation = explain_bytes(
            settings.routes,
            target.read_bytes(),
            name=target.name,
            calling_ae_title=args.calling_ae,
            source=args.source,
        )
    elif target.exists():
        raise InputError(f"{target} is not a file")
    else:
        if args.calling_ae or args.source:
            raise InputError(
                f"{args.target!r} is not a file here, so it is taken as a message id; --calling-ae and --source "
                "apply to files only (a stored message has its own)"
            )
        store = _store(settings, args)
        if store.get(args.target) is None and store.find_by_prefix(args.target) is None:
            raise InputError(f"{args.target!r} is neither a file nor the id (or unique id prefix) of a stored message")
        explanation = explain_message(settings.routes, store, args.target)
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=2))
    else:
        print("\n".join(explanation.lines()))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from ecgbridge.core.settings import check_config

    path = args.file or os.environ.get(CONFIG_ENV) or None
    where = path or "(embedded defaults)"
    report = check_config(path)
    if report.settings is None or report.problems:
        count = len(report.problems)
        print(f"configuration error: {where}: {count} problem(s) in the configuration", file=sys.stderr)
        for p in report.problems:
            print(f"  - {p}", file=sys.stderr)
        for w in report.warnings:
            print(f"  warning: {w}", file=sys.stderr)
        return 2
    settings = report.settings
    dests = ", ".join(d.name for d in settings.destinations) or "none"
    print(
        f"{where}: OK — {len(settings.routes)} route(s), destinations: {dests}, "
        f"store: {'PostgreSQL' if settings.database_url.startswith('postgresql') else 'SQLite'}, "
        f"broker: {'embedded' if settings.embedded_broker else 'external'}"
        + (f"; {len(report.warnings)} warning(s):" if report.warnings else "")
    )
    for w in report.warnings:
        print(f"  warning: {w}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Apply retention once, from the shell (cron, or before a disk fills); audited as ``prune``."""
    from ecgbridge.cli_common import cli_actor
    from ecgbridge.core.retention import prune

    settings = _settings(args)
    _setup_logging("WARNING")
    store = _store(settings, args)
    report = prune(store, settings, dry_run=args.dry_run, actor=cli_actor())
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print("\n".join(report.lines()))
    return 0


#: model -> (module of its trainer, module of its evaluator); each module has ``main(argv)``.
TRAINING_ENTRIES: dict[str, tuple[str, str]] = {
    "diagnosis": ("ecgbridge.training.train", "ecgbridge.training.evaluate"),
    "triage": ("ecgbridge.training.triage", "ecgbridge.training.triage_evaluate"),
    "lvef": ("ecgbridge.training.lvef_model", "ecgbridge.training.lvef_evaluate"),
    "kt": ("ecgbridge.training.kt", "ecgbridge.training.evaluate"),  # issue #14; its export is a diagnosis model
}


def _training_entry(kind: str, args: argparse.Namespace) -> int:
    """``ecgbridge train|evaluate MODEL ...`` -> that model's own argument parser."""
    import importlib

    trainer, evaluator = TRAINING_ENTRIES[args.model]
    module_name = trainer if kind == "train" else evaluator
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and not exc.name.startswith("training"):
            raise ConfigError(
                f"'ecgbridge {kind} {args.model}' needs the training extra: "
                f"pip install 'ecgbridge[train]' ({exc.name} missing)"
            ) from exc
        raise
    return int(module.main(args.rest) or 0)


def cmd_train(args: argparse.Namespace) -> int:
    return _training_entry("train", args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    return _training_entry("evaluate", args)


# ----- parser -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecgbridge", description="Receive ECGs, analyse them with explainable models, write results to the EHR."
    )
    parser.add_argument("--version", action="version", version=f"ecgbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="gateway + workers + broker (embedded defaults without a config)")
    _add_config(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("gateway", help="only the listeners (needs broker.url)")
    _add_config(p)
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser("worker", help="one Celery worker process (needs broker.url)")
    _add_config(p)
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="pool size (default: workers.concurrency processes; workers.delivery_threads threads for delivery)",
    )
    p.add_argument(
        "--queues",
        choices=("all", "analysis", "delivery"),
        default="all",
        help="analysis (CPU, a process pool), delivery (network I/O, a thread pool), or all in one process pool",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "analyse", aliases=["analyze"], help="analyse local ECG files with the same pipeline, no network"
    )
    _add_config(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM ECG (.dcm) or WFDB record (.hea)")
    p.add_argument("--model", action="append", help="model name (repeatable; default: all configured)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_analyse)

    p = sub.add_parser("messages", help="received messages and what happened to them")
    msub = p.add_subparsers(dest="messages_command", required=True, metavar="ACTION")
    q = msub.add_parser("list", help="messages, newest first")
    _add_config(q)
    q.add_argument("--json", action="store_true")
    q.add_argument(
        "--state", help="only this state (received, queued, analysed, delivered, failed, unrouted, rejected)"
    )
    q.add_argument("--route", help="only messages this route took")
    q.add_argument("--csv", action="store_true", help="one CSV line per message with each class's probability")
    q.add_argument("--limit", type=int, default=100, help="at most this many, newest first (0: all)")
    q.set_defaults(func=cmd_messages_list)
    q = msub.add_parser("show", help="one message: state, findings, measurements, attachments, deliveries, errors")
    _add_config(q)
    q.add_argument("id", help="message id (or a unique prefix)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_messages_show)
    q = msub.add_parser("attachment", help="save a message's attachment N (PDF report, PNG) to a file")
    _add_config(q)
    q.add_argument("id", help="message id (or a unique prefix)")
    q.add_argument("n", type=int, metavar="N", help="attachment number, as 'messages show' lists them (1, 2, ...)")
    q.add_argument("--out", "-o", metavar="FILE", help="file to write ('-': standard output; default: report-ID.EXT)")
    q.set_defaults(func=cmd_messages_attachment)

    p = sub.add_parser("routes", help="the routes in force, and which one takes a message and why")
    rsub = p.add_subparsers(dest="routes_command", required=True, metavar="ACTION")
    q = rsub.add_parser("list", help="the routes in the order they are tried")
    _add_config(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_routes_list)
    q = rsub.add_parser(
        "explain",
        help="which route takes a file or a stored message, and why each other route does not",
        description="Explain routing for a file (DICOM, HL7 v2, ECG XML) or a stored message id: the route that "
        "matches (first match wins) and, for every other route, the first criterion that failed.",
    )
    _add_config(q)
    q.add_argument("target", metavar="FILE|MESSAGE_ID", help="a file, or the id (or unique prefix) of a stored message")
    q.add_argument("--calling-ae", metavar="AE", help="DICOM file: the calling AE title it would be sent from")
    q.add_argument(
        "--source",
        choices=["dicom", "hl7", "file"],
        help="how the file would arrive (default: dicom for DICOM, hl7 for HL7, file for XML; file = the inbox)",
    )
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_routes_explain)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = csub.add_parser("check", help="validate a configuration file and say exactly what is wrong")
    q.add_argument("file", nargs="?", help=f"YAML file (default: ${CONFIG_ENV}, else the embedded defaults)")
    q.set_defaults(func=cmd_config_check)

    p = sub.add_parser(
        "prune",
        help="delete old messages' content (and rows) as the retention settings say",
        description="Delete the content (inbound bytes, attachments, artifacts, EHR values in the result) of "
        "finished messages older than retention.content_days, keeping their rows, states and events; with "
        "retention.metadata_days, delete those rows too. A blob another message still uses is kept.",
    )
    _add_config(p)
    p.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_prune)

    from ecgbridge.cli_export import add_export_commands
    from ecgbridge.cli_import import add_import_command
    from ecgbridge.cli_models import add_model_commands
    from ecgbridge.cli_overreads import add_overread_commands
    from ecgbridge.cli_users import add_user_commands
    from ecgbridge.cli_validate import add_validate_command

    add_import_command(sub, _add_config, _settings)
    add_user_commands(sub, _add_config, _settings)
    add_model_commands(sub, _add_config, _settings)
    add_validate_command(sub, _add_config, _settings)
    add_overread_commands(sub, _add_config, _settings)
    add_export_commands(sub, _add_config, _settings)

    for name, func, what in (("train", cmd_train, "train a model"), ("evaluate", cmd_evaluate, "evaluate a model")):
        p = sub.add_parser(
            name,
            help=f"{what} (needs the 'train' extra: torch); see '{name} diagnosis --help'",
            description=f"{what}; options: ecgbridge {name} diagnosis --help",
        )
        p.add_argument("model", choices=sorted(TRAINING_ENTRIES), help="which model")
        p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the model's trainer/evaluator")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except EcgBridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
