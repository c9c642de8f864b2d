"""Message stores for tests and benches: SQLite in a folder, or a fresh PostgreSQL schema at 127.0.0.1:5432.

PostgreSQL runs with trust authentication on the development and CI machines; each store
gets its own schema (dropped afterwards), so tests never see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from ecgbridge.core.store import MessageStore

__all__ = ["POSTGRES_USERS", "PostgresUnavailable", "postgres_schema", "message_store"]

POSTGRES_USERS = ("postgres", "root")


class PostgresUnavailable(RuntimeError):
    """No server at 127.0.0.1:5432 lets user postgres or root create a schema in database test."""


@contextmanager
def postgres_schema(prefix: str) -> Iterator[tuple[str, str]]:
    """(URL whose search_path is a fresh schema, server version); the schema is dropped afterwards."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    problems = []
    for user in POSTGRES_USERS:
        base = f"postgresql+psycopg://{user}@127.0.0.1:5432/test"
        try:
            engine = create_engine(base, connect_args={"connect_timeout": 3})
            with engine.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
                version = str(conn.execute(text("SHOW server_version")).scalar())
        except (ImportError, OperationalError, ProgrammingError) as exc:  # no driver, server, database or rights
            problems.append(f"{user}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        try:
            yield f"{base}?options=-csearch_path%3D{schema}", version
        finally:
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            engine.dispose()
        return
    raise PostgresUnavailable(
        "no server at 127.0.0.1:5432 lets user postgres or root create a schema in database test "
        f"({'; '.join(problems)})"
    )


@contextmanager
def message_store(kind: str, folder: Path, prefix: str = "t") -> Iterator[MessageStore]:
    """A created MessageStore on ``kind`` (sqlite | postgresql), blobs in ``folder``."""
    if kind == "sqlite":
        store = MessageStore(f"sqlite:///{folder / 'store.db'}", folder)
        store.create_schema()
        try:
            yield store
        finally:
            store.engine.dispose()
        return
    with postgres_schema(prefix) as (url, _):
        store = MessageStore(url, folder)
        store.create_schema()
        try:
            yield store
        finally:
            store.engine.dispose()
