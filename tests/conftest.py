"""Shared fixtures: the real data, the real ECG, and real servers (Redis, FHIR, PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.peers import need
from tests.support.processes import RedisServer, redis_binary
from tests.support.stack import Stack

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_peer(reason): reason None, or why a peer is missing (skip locally, fail in CI)"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``tests.support.peers.needs(reason)`` marks: skip locally, fail in CI, before any fixture runs."""
    for mark in item.iter_markers("needs_peer"):
        reason = mark.args[0] if mark.args else None
        if reason:
            need(reason)


def shared_data_dir() -> Path | None:
    env = os.environ.get("ECGBRIDGE_SHARED_DATA")
    candidate = Path(env) if env else REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        need("the large data set ../shared/data is absent (set ECGBRIDGE_SHARED_DATA to use another path)")
    return path


@pytest.fixture(scope="session")
def waveform_ecg_path() -> Path:
    """The real Mortara 12-lead ECG shipped with pydicom's test data."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("waveform_ecg.dcm"))


POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if redis_binary() is None:
        need("no redis-server binary (apt-get install redis-server)")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fhir_server() -> Iterator[object]:
    from tests.support.fhir_server import FhirServer, require_node

    require_node()
    server = FhirServer()
    server.start()
    yield server
    server.stop()


def _postgres_url() -> str:
    """A fresh database on the local server; a server or driver that is not there is :func:`need`."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        need("psycopg is not installed (pip install -e '.[test]'): the PostgreSQL runs need it")
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    name = f"ecgbridge_test_{uuid.uuid4().hex[:10]}"
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:  # only a connection that fails means "no server"; other errors are errors
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        detail = str(exc.orig or exc).strip().splitlines() or [type(exc).__name__]
        need(f"no PostgreSQL server answers at 127.0.0.1:5432 (user postgres, trust auth): {detail[0]}")
    finally:
        engine.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _drop_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@contextmanager
def _postgres_database() -> Iterator[str]:
    url = _postgres_url()
    try:
        yield url
    finally:
        _drop_postgres(url)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with _postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (the default SQLite store) or the URL of a fresh PostgreSQL database: run a test on both."""
    if request.param == "sqlite":
        yield None
    else:
        yield request.getfixturevalue("postgres_url")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """``database_url`` for a module-scoped deployment (one database for the module's tests)."""
    if request.param == "sqlite":
        yield None
    else:
        with _postgres_database() as url:
            yield url


@pytest.fixture
def make_stack(tmp_path: Path, redis_server: RedisServer) -> Iterator[callable]:
    stacks: list[Stack] = []

    def make(**kwargs: object) -> Stack:
        stack = Stack(tmp=tmp_path / f"stack{len(stacks)}", broker_url=redis_server.url, **kwargs)  # type: ignore[arg-type]
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
