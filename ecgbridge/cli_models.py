"""``ecgbridge models``: the models each route runs now, and shadow models made live (or back).

``models list`` prints every route's live and shadow models in force with the promotions
applied; ``models promote NAME`` makes the shadow model NAME live in the routes that list
it (the live model of its task becomes a shadow there); ``models rollback`` undoes the
latest promotion still in force. Both are audited as done by ``cli:<login name>`` and need
no restart: workers read the promotions every few seconds (:mod:`ecgbridge.core.promotions`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from ecgbridge.cli_common import cli_actor, open_store, settings_command
from ecgbridge.core.accounts import AccountStore
from ecgbridge.core.promotions import active_promotions, apply, promote, rollback
from ecgbridge.core.settings import Route, Settings
from ecgbridge.errors import ConfigError

__all__ = ["add_model_commands"]


def _task_of(settings: Settings, name: str) -> str:
    """A model entry's task, from its manifest (no model runtime loaded)."""
    from ecgbridge.inference.models import ModelRegistry

    paths = {m.name: Path(m.path) for m in settings.models if m.path is not None}
    directory = ModelRegistry(paths=paths).available().get(name)
    if directory is None:
        raise ConfigError(f"model {name!r}: no manifest found (models[].path, or a shipped model)")
    data = json.loads((directory / "manifest.json").read_text())
    return str(data.get("task", "diagnosis"))


def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings)
    promotions = active_promotions(store)
    for route in settings.routes:
        now = apply(route, promotions)
        print(f"{route.name}: live {', '.join(now.live) or '-'}; shadow {', '.join(now.shadow) or '-'}")
        for p in now.applied:
            why = f" ({p.reason})" if p.reason else ""
            print(f"  promoted {p.promoted} over {p.demoted} by {p.promoted_by} at {p.promoted_at:%Y-%m-%d %H:%M}{why}")
    stale = [p for p in promotions if not any(p in apply(r, promotions).applied for r in settings.routes)]
    for p in stale:
        print(f"not in force (the configuration changed): {p.route}: {p.promoted} over {p.demoted}")
    return 0


def _routes(settings: Settings, name: str | None) -> list[Route]:
    return [settings.route(name)] if name else list(settings.routes)


def cmd_promote(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings)
    task = _task_of(settings, args.name)
    promoted_in = []
    for route in _routes(settings, args.route):
        now = apply(route, active_promotions(store, route.name))
        if args.name not in now.shadow:
            continue
        candidates = (
            [m for m in now.live if m == args.replaces]
            if args.replaces
            else [m for m in now.live if _task_of(settings, m) == task]
        )
        if len(candidates) != 1:
            raise ConfigError(
                f"route {route.name}: {len(candidates)} live model(s) of task {task!r} ({', '.join(candidates) or '-'}); "
                "name the one to replace with --replaces"
            )
        made = promote(store, route, args.name, candidates[0], by=cli_actor(), reason=args.reason)
        AccountStore(store).audit(
            cli_actor(),
            "promote_model",
            target=f"{route.name}:{args.name}",
            detail={"route": route.name, "promoted": args.name, "demoted": candidates[0], "promotion": made.id},
            note=args.reason,
        )
        print(f"{route.name}: {args.name} is live, {candidates[0]} is a shadow model (promotion {made.id})")
        promoted_in.append(route.name)
    if not promoted_in:
        where = f"route {args.route}" if args.route else "any route"
        raise ConfigError(f"{args.name!r} is not a shadow model of {where} now (routes[].shadow_models)")
    return 0


def cmd_rollback(settings: Settings, args: argparse.Namespace) -> int:
    store = open_store(settings)
    undone_any = False
    for route in _routes(settings, args.route):
        undone = rollback(store, route.name, by=cli_actor())
        if undone is None:
            continue
        AccountStore(store).audit(
            cli_actor(),
            "rollback_model",
            target=f"{route.name}:{undone.promoted}",
            detail={
                "route": route.name,
                "promoted": undone.promoted,
                "demoted": undone.demoted,
                "promotion": undone.id,
            },
        )
        print(
            f"{route.name}: {undone.demoted} is live again, {undone.promoted} a shadow model (promotion {undone.id} undone)"
        )
        undone_any = True
    if not undone_any:
        print("no promotion in force to undo")
        return 1
    return 0


def add_model_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_config: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add ``models list|promote|rollback`` to the CLI's sub-commands."""

    def bind(parser: argparse.ArgumentParser, func: Callable[[Settings, argparse.Namespace], int]) -> None:
        settings_command(parser, func, add_config, load)

    p = sub.add_parser("models", help="the models each route runs; make a shadow model live, or undo it")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    bind(msub.add_parser("list", help="live and shadow models of every route, with the promotions in force"), cmd_list)
    q = msub.add_parser("promote", help="make shadow model NAME live in the routes that list it (audited)")
    q.add_argument("name", help="a model entry listed in routes[].shadow_models")
    q.add_argument("--route", help="only this route")
    q.add_argument("--replaces", help="the live model it replaces (default: the live model of its task)")
    q.add_argument("--reason", help="why (kept with the promotion; no patient data)")
    bind(q, cmd_promote)
    q = msub.add_parser("rollback", help="undo the latest promotion in force (in each route, or --route)")
    q.add_argument("--route", help="only this route")
    bind(q, cmd_rollback)
