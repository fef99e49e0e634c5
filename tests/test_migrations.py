"""The migrations build the schema the models describe, on PostgreSQL and SQLite, and undo it."""

from __future__ import annotations

import uuid

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from gateway.db import make_engine
from gateway.migrate import downgrade, upgrade
from gateway.models import Base
from tests.conftest import PG_ADMIN


def _modelled(obj, name, type_, reflected, compare_to) -> bool:
    """PostgreSQL-only expression indexes (migration 0003, ``ixpg_*``) are not in the models."""
    return not (type_ == "index" and (name or "").startswith("ixpg_"))


def _check(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"include_object": _modelled})
            diff = compare_metadata(context, Base.metadata)
            assert diff == [], diff
        downgrade(url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)
        assert {"findings", "finding_sources", "batches", "lifecycle_events"} <= set(inspect(engine).get_table_names())
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                names = set(conn.exec_driver_sql(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'findings'").scalars())
            assert {"ixpg_findings_last_seen", "ixpg_findings_severity"} <= names
    finally:
        engine.dispose()


def test_migrations_on_sqlite(tmp_path):
    _check(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_migrations_on_postgresql():
    name = f"gw_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        _check(PG_ADMIN.rsplit("/", 1)[0] + "/" + name)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
