"""Shared fixtures: a migrated database on SQLite and (when reachable) PostgreSQL.

Store and integration tests take the ``db_url`` fixture, which runs each test
once per backend.  PostgreSQL comes from DISPATCH_TEST_PG_URL (default
postgresql+psycopg://postgres@127.0.0.1/test); without it the PostgreSQL
variants skip with the reason, unless CI=true, where they fail instead so a
missing database can never pass silently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from dispatch import logs

PG_URL = os.environ.get("DISPATCH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1/test")

logs.configure("warning", "json")


def _pg_problem() -> str | None:
    try:
        engine = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # any failure means "not available here"
        return f"PostgreSQL at {PG_URL} not reachable: {type(exc).__name__}: {exc}"[:300]
    return None


_PG_PROBLEM: str | None | bool = False


def pg_problem() -> str | None:
    """Why PostgreSQL cannot be used (cached), or None."""
    global _PG_PROBLEM
    if _PG_PROBLEM is False:
        _PG_PROBLEM = _pg_problem()
    return _PG_PROBLEM  # type: ignore[return-value]


# Each test process works in its own schema, so two runs on one machine (or a developer's
# own tables in public) never trample each other.
PG_SCHEMA = f"dispatch_test_{os.getpid()}"


def pg_url_for_tests() -> str:
    """PG_URL with the search_path set to this process's schema."""
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{PG_SCHEMA}"


def reset_pg() -> None:
    """Drop and recreate this process's schema so each test starts empty."""
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE"))
        conn.execute(text(f"CREATE SCHEMA {PG_SCHEMA}"))
    engine.dispose()


@pytest.fixture(scope="session", autouse=True)
def _drop_pg_schema() -> Iterator[None]:
    """Leave nothing behind in the shared database."""
    yield
    if _PG_PROBLEM is None:
        engine = create_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE"))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.pg)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A database URL with an empty schema, once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dispatch.db'}"
        return
    problem = pg_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL tests: {problem}")
        pytest.skip(problem)
    reset_pg()
    yield pg_url_for_tests()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A throwaway SQLite database URL (for tests that need only one backend)."""
    return f"sqlite:///{tmp_path / 'dispatch.db'}"
