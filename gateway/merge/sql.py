"""Small helpers that let one merge run on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlalchemy import Column, bindparam, literal
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
        element_type = BigInteger() if isinstance(column.type, Integer) else String()
        return column == bindparam(None, list(values), type_=ARRAY(element_type)).any_()  # type: ignore[attr-defined]
    return column.in_(list(values))


def chunks(values: Sequence, size: int = SQLITE_IN_LIMIT) -> Iterable[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


__all__ = ["chunks", "in_values", "insert_for", "is_postgres", "literal"]
