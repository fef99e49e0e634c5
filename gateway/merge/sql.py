"""Small helpers that let one merge run on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Column, and_, bindparam, func, literal, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement
from sqlalchemy.types import ARRAY, BigInteger, Integer, String

SQLITE_IN_LIMIT = 30000


def is_postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def insert_for(conn: Connection, table):
    """The dialect's INSERT, which has ``on_conflict_do_*``."""
    return postgresql.insert(table) if is_postgres(conn) else sqlite.insert(table)


def in_values(conn: Connection, column: Column, values: Sequence) -> ColumnElement[bool]:
    """``column IN values``: one array parameter on PostgreSQL, a plain IN list elsewhere."""
    if is_postgres(conn):
        return column == bindparam(None, list(values), type_=ARRAY(_element_type(column))).any_()  # type: ignore[attr-defined]
    return column.in_(list(values))


def _element_type(column: Column):
    return BigInteger() if isinstance(column.type, Integer) else String()


def pair_join(conn: Connection, query, first: Column, second: Column, pairs: Sequence[tuple]):
    """Restrict ``query`` to rows whose (first, second) is one of ``pairs``.

    PostgreSQL joins two array parameters through ``unnest`` (two parameters, whatever
    the number of pairs); elsewhere a row-value IN list is used.
    """
    if is_postgres(conn):
        keys = func.unnest(
            bindparam(None, [p[0] for p in pairs], type_=ARRAY(_element_type(first))),
            bindparam(None, [p[1] for p in pairs], type_=ARRAY(_element_type(second))),
        ).table_valued("a", "b").render_derived(name="wanted")
        return query.join(keys, and_(first == keys.c.a, second == keys.c.b))
    return query.where(tuple_(first, second).in_(list(pairs)))


def chunks(values: Sequence, size: int = SQLITE_IN_LIMIT) -> Iterable[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


__all__ = ["chunks", "in_values", "insert_for", "is_postgres", "literal"]
