"""Shared fixtures: the real data, the real ECG, and real servers (Redis, FHIR, PostgreSQL)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import RedisServer, redis_binary
from tests.support.stack import Stack

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def shared_data_dir() -> Path | None:
    env = os.environ.get("ECGBRIDGE_SHARED_DATA")
    candidate = Path(env) if env else REPO.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("the large data set ../shared/data is absent (set ECGBRIDGE_SHARED_DATA to use another path)")
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
        pytest.skip("no redis-server binary (apt-get install redis-server)")
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fhir_server() -> Iterator[object]:
    from tests.support.fhir_server import FhirServer, node_available

    reason = node_available()
    if reason:
        pytest.skip(f"FHIR server peer unavailable: {reason}")
    server = FhirServer()
    server.start()
    yield server
    server.stop()


def _postgres_url() -> str | None:
    try:
        import psycopg  # noqa: F401
        from sqlalchemy import create_engine, text
    except ImportError:
        return None
    name = f"ecgbridge_test_{uuid.uuid4().hex[:10]}"
    try:
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
    except Exception:
        return None
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _drop_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    url = _postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL server answers at 127.0.0.1:5432 (user postgres, trust auth)")
    yield url
    _drop_postgres(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
    else:
        yield request.getfixturevalue("postgres_url")


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
