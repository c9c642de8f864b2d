"""The ``ecgbridge`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ecgbridge import __version__
from ecgbridge.core.settings import Settings, load_settings
from ecgbridge.errors import ConfigError, EcgBridgeError

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


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML configuration (default: embedded defaults)")


# ----- commands ---------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from ecgbridge.service import run_all

    settings = _settings(args)
    _setup_logging(settings.log_level)
    run_all(settings)
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from ecgbridge.service import Gateway, _wait_for_signal

    settings = _settings(args)
    _setup_logging(settings.log_level)
    if settings.embedded_broker:
        raise ConfigError(
            "'ecgbridge gateway' needs broker.url (or ECGBRIDGE_BROKER_URL): "
            "the embedded broker runs only under 'ecgbridge run'"
        )
    gw = Gateway(settings)
    gw.start()
    print(f"ecgbridge gateway running (DICOM port {gw.dicom.port if gw.dicom else '-'}). Ctrl-C stops.", flush=True)
    try:
        _wait_for_signal()
    finally:
        gw.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ecgbridge.service import run_worker

    settings = _settings(args)
    _setup_logging(settings.log_level)
    if settings.embedded_broker:
        raise ConfigError("'ecgbridge worker' needs broker.url (or ECGBRIDGE_BROKER_URL) to reach the broker")
    run_worker(settings, concurrency=args.concurrency)
    return 0


def _read_file(path: Path):  # type: ignore[no-untyped-def]
    from ecgbridge.mapping.readers import read_ecg_file

    return read_ecg_file(path)


def cmd_analyse(args: argparse.Namespace) -> int:
    from ecgbridge.inference.models import ModelRegistry
    from ecgbridge.inference.pipeline import analyse_ecg
    from ecgbridge.mapping.ecg import AnalysisResult
    from ecgbridge.mapping.lvef_result import LVEF_TASK, explanation_lines

    settings = _settings(args)
    _setup_logging("WARNING")
    paths = {m.name: Path(m.path) for m in settings.models if m.path is not None}
    registry = ModelRegistry(paths=paths)
    models = args.model or [m.name for m in settings.models]
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
                print(f"  model {out.model} {out.version}:")
                for name, value in out.extra.get("measurements", {}).items():
                    print(f"    {name:<22} {value}")
                for f in out.findings:
                    mark = "PRESENT" if f.present else "-"
                    print(f"    {f.code:<5} {f.display:<26} p={f.probability:.3f} (threshold {f.threshold:.2f}) {mark}")
                severity = out.extra.get("severity4_display") or out.extra.get("severity_display")
                if severity:
                    print(f"    severity: {severity}")
                if out.task == LVEF_TASK:
                    for line in explanation_lines(out):
                        print(f"    {line}")
            print(f"  {r['label']}")
    return 1 if failed else 0


def _store(settings: Settings):  # type: ignore[no-untyped-def]
    from ecgbridge.core.store import MessageStore

    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
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


def cmd_messages_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings)
    rows = store.list(limit=args.limit, state=args.state)
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


def cmd_messages_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _store(settings)
    view = store.view(args.id)
    if view is None:
        print(f"no message with id {args.id}", file=sys.stderr)
        return 1
    data = {"message": view.message, "result": view.result, "deliveries": view.deliveries, "errors": view.events}
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    m = view.message
    print(
        f"message {m['id']}\n  state: {m['state']}\n  received: {m['received_at']} via {m['source']} from {m['remote']}"
    )
    print(f"  SOP instance: {m['sop_instance_uid']}\n  route: {m['route']}")
    if m["error"]:
        print(f"  error: {m['error']}")
    for flag in m["flags"] or []:
        print(f"  flag: {flag}")
    if view.result:
        for out in view.result["outputs"]:
            print(f"  model {out['model']} {out['version']}:")
            for f in out["findings"]:
                print(f"    {f['code']:<5} p={f['probability']:.3f} {'PRESENT' if f['present'] else '-'}")
        print(f"  {view.result['label']}")
    for d in view.deliveries:
        print(
            f"  delivery to {d['destination']}: {d['state']} after {d['attempts']} attempt(s)"
            + (f", {d['remote_ref']}" if d["remote_ref"] else "")
            + (f"; last error: {d['last_error']}" if d["last_error"] else "")
        )
    for e in view.events:
        print(f"  {e['at'][:19]} {e['level']}: {e['kind']}: {e['detail']}")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    where = args.file or "(embedded defaults)"
    dests = ", ".join(d.name for d in settings.destinations) or "none"
    print(
        f"{where}: OK — {len(settings.routes)} route(s), destinations: {dests}, "
        f"store: {'PostgreSQL' if settings.database_url.startswith('postgresql') else 'SQLite'}, "
        f"broker: {'embedded' if settings.embedded_broker else 'external'}"
    )
    return 0


#: model -> (module of its trainer, module of its evaluator); each module has ``main(argv)``.
TRAINING_ENTRIES: dict[str, tuple[str, str]] = {
    "diagnosis": ("ecgbridge.training.train", "ecgbridge.training.evaluate"),
    "triage": ("ecgbridge.training.triage", "ecgbridge.training.triage_evaluate"),
    "lvef": ("ecgbridge.training.lvef_model", "ecgbridge.training.lvef_evaluate"),
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
    p.add_argument("--concurrency", type=int, default=None, help="pool processes (default: workers.concurrency)")
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
    q.add_argument("--limit", type=int, default=100)
    q.set_defaults(func=cmd_messages_list)
    q = msub.add_parser("show", help="one message: state, findings, deliveries, errors")
    _add_config(q)
    q.add_argument("id", help="message id (or a unique prefix)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_messages_show)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    q = csub.add_parser("check", help="validate a configuration file and say exactly what is wrong")
    q.add_argument("file", nargs="?", help="YAML file (default: the embedded defaults)")
    q.set_defaults(func=cmd_config_check)

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
