"""What the CLI's sub-command modules share: the audit actor, opening the store, binding a command.

``cli_users``, ``cli_models``, ``cli_overreads``, ``cli_validate`` and ``cli_export`` each add
commands that take the loaded settings; one copy of these three helpers serves them all.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from ecgbridge.core.settings import Settings, redact_url
from ecgbridge.core.store import MessageStore

__all__ = ["cli_actor", "open_store", "settings_command"]


def cli_actor() -> str:
    """Who the audit log names for a change made from the shell: ``cli:<login name>``."""
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):
        return "cli"


def open_store(settings: Settings, *, announce: bool = False) -> MessageStore:
    """The configuration's store, its schema brought up to date; ``announce``: say which on stderr."""
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    if announce:
        print(f"store: {redact_url(settings.database_url)}", file=sys.stderr)
    return store


def settings_command(
    parser: argparse.ArgumentParser,
    func: Callable[[Settings, argparse.Namespace], int],
    add_config: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace], Settings],
) -> None:
    """Give ``parser`` the ``--config`` option and run ``func(settings, args)`` for it."""
    add_config(parser)
    parser.set_defaults(func=lambda args: func(load(args), args))
