"""The many-rows statements of the merge (``insert_rows``/``update_rows``) on both stores.

On PostgreSQL they are hand-written ``unnest`` statements with array and scalar
parameters, so they get tests of their own: JSON, NULLs, uniform columns (sent as one
scalar), a single row, conflicts and RETURNING.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select

from gateway.db import Database
from gateway.merge.sql import insert_rows, update_rows
from gateway.models import LifecycleEvent, Tenant
from tests.conftest import wipe

EV = LifecycleEvent.__table__
T = Tenant.__table__
WHEN = datetime(2024, 4, 1, 12, 30, tzinfo=UTC)


def _db(url: str) -> Database:
    db = Database(url)
    wipe(db)
    return db


def _events(conn) -> list[dict]:
    return [dict(row._mapping) for row in conn.execute(select(EV).order_by(EV.c.subject_id))]


def test_insert_rows_json_nulls_uniform_and_varied_columns(store_url):
    db = _db(store_url)
    try:
        with db.engine.begin() as conn:
            [(tenant_id,)] = insert_rows(conn, T, [{"external_id": "t", "name": "T", "created_at": WHEN}],
                                         returning=("id",))
            rows = [{"subject_id": i, "event": "new" if i % 2 else "updated",
                     "details": None if i == 3 else {"n": i, "tags": ["a", i], "s": "quote ' \" \\ ü"},
                     "actor": None} for i in range(1, 6)]
            insert_rows(conn, EV, rows, constants={"tenant_id": tenant_id, "subject_type": "finding",
                                                   "at": WHEN, "cause": "c", "batch_id": None})
            stored = _events(conn)
        assert [e["subject_id"] for e in stored] == [1, 2, 3, 4, 5]
        assert [e["event"] for e in stored] == ["new", "updated", "new", "updated", "new"]
        assert stored[0]["details"] == {"n": 1, "tags": ["a", 1], "s": "quote ' \" \\ ü"}
        assert stored[2]["details"] is None
        assert all(e["tenant_id"] == tenant_id and e["at"] == WHEN and e["actor"] is None for e in stored)
    finally:
        db.dispose()


def test_insert_rows_single_row_conflict_and_returning(store_url):
    db = _db(store_url)
    try:
        with db.engine.begin() as conn:
            first = insert_rows(conn, T, [{"external_id": "a", "name": "A", "created_at": WHEN}],
                                returning=("id", "external_id"))
            again = insert_rows(conn, T, [{"external_id": "a", "name": "A2", "created_at": WHEN},
                                          {"external_id": "b", "name": "B", "created_at": WHEN}],
                                returning=("id", "external_id"), conflict=("external_id",))
            names = dict(conn.execute(select(T.c.external_id, T.c.name)).all())
        assert [row[1] for row in first] == ["a"]
        assert [row[1] for row in again] == ["b"]  # the colliding row is skipped, not returned
        assert names == {"a": "A", "b": "B"}
    finally:
        db.dispose()


def test_update_rows_by_key_with_constants(store_url):
    db = _db(store_url)
    try:
        with db.engine.begin() as conn:
            [(tenant_id,)] = insert_rows(conn, T, [{"external_id": "t", "name": "T", "created_at": WHEN}],
                                         returning=("id",))
            insert_rows(conn, EV, [{"subject_id": i, "event": "new", "details": {"i": i}} for i in range(4)],
                        constants={"tenant_id": tenant_id, "subject_type": "finding", "at": WHEN, "cause": "c"})
            ids = [row.id for row in conn.execute(select(EV.c.id).order_by(EV.c.subject_id))]
            update_rows(conn, EV, [{"id": ids[1], "event": "resolved", "details": {"from": "new"}},
                                   {"id": ids[3], "event": "resolved", "details": None}],
                        constants={"cause": "later", "actor": "Qualys"})
            update_rows(conn, EV, [{"id": ids[0], "event": "active", "details": {"only": True}}])
            stored = _events(conn)
        assert [e["event"] for e in stored] == ["active", "resolved", "new", "resolved"]
        assert [e["details"] for e in stored] == [{"only": True}, {"from": "new"}, {"i": 2}, None]
        assert [e["cause"] for e in stored] == ["c", "later", "c", "later"]
        assert [e["actor"] for e in stored] == [None, "Qualys", None, "Qualys"]
    finally:
        db.dispose()
