"""``ecgbridge users`` and ``ecgbridge tokens``: console accounts, from the gateway machine's shell.

The first administrator is made here (the console has no sign-up page):
``ecgbridge users add NAME --role admin`` asks for the password twice (or reads one line
from standard input with ``--password-stdin``, for scripts). Every change is audited as
done by ``cli:<login name>``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from ecgbridge.cli_common import cli_actor, settings_command
from ecgbridge.core.accounts import AccountStore, Role
from ecgbridge.core.settings import Settings
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import ConfigError

__all__ = ["add_user_commands"]


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise ConfigError("no password on standard input")
        return line
    first = getpass.getpass("password (12 characters or more): ")
    if first != getpass.getpass("again: "):
        raise ConfigError("the two passwords differ")
    return first


def _accounts(settings: Settings) -> AccountStore:
    store = MessageStore(settings.database_url, settings.data_dir)
    store.create_schema()
    print(f"store: {settings.database_url.split('@')[-1]}", file=sys.stderr)
    return AccountStore(store)


def _users_add(settings: Settings, args: argparse.Namespace) -> int:
    accounts = _accounts(settings)
    accounts.create_user(args.name, _password(args), Role(args.role))
    accounts.audit(cli_actor(), "user_created", target=args.name, detail={"role": args.role})
    print(
        f"user {args.name} ({args.role}) created; sign in at the console "
        f"(http://{settings.console.host}:{settings.console.port}/)"
    )
    return 0


def _users_list(settings: Settings, args: argparse.Namespace) -> int:
    for row in _accounts(settings).users():
        print(f"{row.username}\t{row.role}\t{'disabled' if row.disabled else 'active'}\t{row.created_at:%Y-%m-%d}")
    return 0


def _users_passwd(settings: Settings, args: argparse.Namespace) -> int:
    accounts = _accounts(settings)
    accounts.set_password(args.name, _password(args))
    accounts.audit(cli_actor(), "password_changed", target=args.name)
    print(f"password of {args.name} changed")
    return 0


def _users_set(settings: Settings, args: argparse.Namespace) -> int:
    accounts = _accounts(settings)
    user = accounts.user(args.name)
    if user is None:
        raise ConfigError(f"no user named {args.name!r}")
    role = args.role or user.role
    disabled = True if args.disable else False if args.enable else None
    accounts.set_role(args.name, role, disabled=disabled)
    accounts.audit(cli_actor(), "user_changed", target=args.name, detail={"role": role, "disabled": disabled})
    print(f"user {args.name}: role {role}" + ("" if disabled is None else (", disabled" if disabled else ", enabled")))
    return 0


def _tokens_create(settings: Settings, args: argparse.Namespace) -> int:
    accounts = _accounts(settings)
    secret = accounts.create_token(args.user, args.name, args.role)
    accounts.audit(cli_actor(), "token_created", target=f"{args.name}@{args.user}", detail={"role": args.role})
    print(secret)
    print("shown once: send it as 'Authorization: Bearer <token>'", file=sys.stderr)
    return 0


def _tokens_revoke(settings: Settings, args: argparse.Namespace) -> int:
    accounts = _accounts(settings)
    if not accounts.revoke_token(args.name, args.user):
        raise ConfigError(f"user {args.user} has no token named {args.name!r}")
    accounts.audit(cli_actor(), "token_revoked", target=f"{args.name}@{args.user}")
    print(f"token {args.name} of {args.user} revoked")
    return 0


def add_user_commands(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    add_config: Callable[[argparse.ArgumentParser], None],
    load: Callable[[argparse.Namespace], Settings],
) -> None:
    """Add ``users`` and ``tokens`` to the CLI's sub-commands."""
    roles = [r.value for r in Role]

    def bind(parser: argparse.ArgumentParser, func: Callable[[Settings, argparse.Namespace], int]) -> None:
        settings_command(parser, func, add_config, load)

    p = sub.add_parser("users", help="console users (the first admin is made here)")
    usub = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    q = usub.add_parser("add", help="create a user; asks for the password")
    q.add_argument("name")
    q.add_argument("--role", choices=roles, default="viewer")
    q.add_argument("--password-stdin", action="store_true", help="read the password from one line of standard input")
    bind(q, _users_add)
    q = usub.add_parser("list", help="users and their roles")
    bind(q, _users_list)
    q = usub.add_parser("passwd", help="set a user's password")
    q.add_argument("name")
    q.add_argument("--password-stdin", action="store_true")
    bind(q, _users_passwd)
    q = usub.add_parser("set", help="change a user's role, or disable / enable the user")
    q.add_argument("name")
    q.add_argument("--role", choices=roles)
    state = q.add_mutually_exclusive_group()
    state.add_argument("--disable", action="store_true")
    state.add_argument("--enable", action="store_true")
    bind(q, _users_set)

    p = sub.add_parser("tokens", help="API tokens for scripts (Authorization: Bearer)")
    tsub = p.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    q = tsub.add_parser("create", help="a new token for USER (printed once)")
    q.add_argument("user")
    q.add_argument("name", help="what the token is for, e.g. replay-script")
    q.add_argument("--role", choices=roles, help="default: the user's role; never more")
    bind(q, _tokens_create)
    q = tsub.add_parser("revoke", help="revoke USER's token NAME")
    q.add_argument("user")
    q.add_argument("name")
    bind(q, _tokens_revoke)
