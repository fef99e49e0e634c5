"""Small helpers that let one merge run on PostgreSQL and SQLite."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec
from sqlalchemy import Column, Select, bindparam, func, literal, select, true, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.visitors import replacement_traverse
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
    """Restrict ``query`` to rows whose (first, second) is one of ``pairs`` (see :func:`keyed`)."""
    return keyed(conn, query, (first, second), pairs)


def keyed(conn: Connection, query: Select, columns: Sequence[Column], keys: Sequence, *,
          unique: bool = False) -> Select:
    """``query`` (a SELECT of one table) restricted to its rows whose ``columns`` equal one of
    ``keys`` (tuples, or plain values for one column), looked up key by key.

    On PostgreSQL the keys travel as one array per column (two parameters for 5,000 pairs) and
    ``query``, with ``column = key`` added, is a LATERAL subquery run once per key: each key is
    an index lookup whatever the table's statistics.  The plain shapes (``col = ANY(:keys)``
    beside ``tenant_id = :t``, or a join to ``unnest``) leave the planner the choice, and
    without statistics (a tenant created since the last ANALYZE, a fresh store) it guesses
    that a tenant holds 0.5% of the table and reads all the tenant's rows for every chunk
    (issue 17: 20M source rows read by one 100,000-record re-push into a 1M-finding tenant).
    ``LIMIT 1`` (``unique``: the columns and ``query``'s conditions cover a unique key) or
    ``OFFSET 0`` keeps PostgreSQL from flattening the subquery into a join it could reorder.
    Duplicate keys are looked up once; rows come in key order, and a ``FOR UPDATE`` of ``query``
    locks them in that order.  Elsewhere (SQLite) an IN list of the keys.

    The key columns (with ``query``'s equality conditions) should be the leading columns of an
    index, and ``query``'s conditions alone should not lead another index that looks as cheap:
    without statistics ``tenant_id = :t AND provider = :p`` looks like a handful of rows, and
    ``tenant_id = :t`` beside a key that only a later column of an index holds makes that index
    read the whole tenant for every key (tests/test_plans.py checks the merge's lookups).
    """
    columns = list(columns)
    keys = list(dict.fromkeys(keys))
    if not is_postgres(conn):
        if len(columns) == 1:
            return query.where(columns[0].in_(keys))
        return query.where(tuple_(*columns).in_(keys))
    query = _unknown_values(query)
    names = [f"k{index}" for index in range(len(columns))]
    arrays = [bindparam(None, keys if len(columns) == 1 else [key[index] for key in keys],
                        type_=ARRAY(_element_type(column))) for index, column in enumerate(columns)]
    wanted = func.unnest(*arrays).table_valued(*names).render_derived(name="wanted")
    inner = query.where(*[column == wanted.c[name] for column, name in zip(columns, names, strict=True)])
    found = (inner.limit(1) if unique else inner.offset(0)).lateral("found")
    return select(*found.c).select_from(wanted).join(found, true())


def locked_by_key(conn: Connection, columns: Sequence[Column], conditions: Sequence[ColumnElement],
                  key_columns: Sequence[Column], keys: Sequence, id_column: Column):
    """The rows (``columns``) of one table that meet ``conditions`` and whose ``key_columns`` (a
    unique key with the conditions) equal one of ``keys``, locked in ``id_column`` order.

    On PostgreSQL they are found key by key through the unique index (:func:`keyed`), then read
    again by primary key with ``FOR UPDATE`` in id order: two merges of the same records lock
    them in the same order and never wait for each other in a cycle, and the lock needs no
    statistics either (beside the tenant and provider, which the planner guesses pick a handful
    of rows, a plain ``id = ANY(...)`` would not be sure to win over reading the provider's rows).
    Elsewhere (SQLite, which has no row locks) one IN query in id order.
    """
    if not is_postgres(conn):
        return conn.execute(keyed(conn, select(*columns).where(*conditions), key_columns, keys)
                            .order_by(id_column))
    ids = sorted(conn.execute(keyed(conn, select(id_column).where(*conditions), key_columns, keys,
                                    unique=True)).scalars())
    return conn.execute(keyed(conn, select(*columns).with_for_update(), (id_column,), ids, unique=True))


def _unknown_values(query: Select) -> Select:
    """``query`` with each parameter of its WHERE clause read through a scalar subquery (``tenant_id =
    (SELECT :t)``), a value the planner does not know when it plans.

    With statistics taken before a tenant existed, ``tenant_id = 3`` is a value the statistics
    never saw: the planner estimates one row, and an index led by the tenant alone (e.g.
    (tenant_id, resource_id)) looks as cheap as the unique key, so each key read the whole
    tenant (a 40,000-finding push into a tenant created after an ANALYZE stalled for minutes on
    its host records).  For a value it does not know, the planner estimates the column's
    average share (1 / distinct tenants), and the unique key, which holds the key too, wins.
    """
    if query.whereclause is None:
        return query

    def unknown(element):
        if isinstance(element, BindParameter):
            return select(element).scalar_subquery()
        return None

    # Only the WHERE clause (the select list's literals stay plain): SQLAlchemy has no public
    # way to replace a Select's criteria, so the copy gets the rewritten clause as its only one.
    rebuilt = query._generate()
    rebuilt._where_criteria = (replacement_traverse(query.whereclause, {}, unknown),)
    return rebuilt


def chunks(values: Sequence, size: int = SQLITE_IN_LIMIT) -> Iterable[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


__all__ = ["chunks", "in_values", "insert_count", "insert_for", "insert_rows", "is_postgres", "keyed",
           "locked_by_key",
           "literal", "pair_join", "update_rows"]


# -- many rows in one statement ------------------------------------------------------------
#
# On PostgreSQL a set of rows travels as one array parameter per column and is turned
# back into rows by ``unnest``: the statement text stays a few hundred bytes whatever the
# number of rows, so neither SQLAlchemy nor psycopg spend time building or parsing a
# multi-row VALUES list, and the server plans it once.  SQLite gets an executemany.


def _pg_type(column: Column, dialect) -> str:
    compiled = column.type.compile(dialect=dialect)
    return "jsonb" if compiled in ("JSONB", "JSON") else compiled


def _pg_array(column: Column, values: list, dialect) -> tuple[str, list]:
    """(SQL element type, parameter list) for one column's values."""
    sql_type = _pg_type(column, dialect)
    if sql_type == "jsonb":
        encode = msgspec.json.encode
        return "text", [None if v is None else encode(v).decode() for v in values]
    return sql_type, values


def _unnest_select(conn: Connection, table, names: list[str], rows: Sequence[dict],
                   constants: dict | None = None) -> tuple[str, tuple, list[str]]:
    """``SELECT %s AS c ..., v.a AS a ... FROM unnest(%b::t[], ...) AS v(a ...)``, its parameters
    and the names of its output columns in order.

    Each of ``names`` travels as one array, or as one scalar when it has the same value in
    every row; each of ``constants`` as one scalar.
    """
    dialect = conn.dialect
    constants = dict(constants or {})
    columns: dict[str, list] = {}
    for name in names:
        values = [row[name] for row in rows]
        # A column with one value in every row (common: a scan's times, empty fields)
        # travels as one scalar instead of an array of copies.
        if values.count(values[0]) == len(values):
            constants[name] = values[0]
        else:
            columns[name] = values
    params, unnest_args, select_list = [], [], []
    for name, value in constants.items():
        target = _pg_type(table.c[name], dialect)
        element, [value] = _pg_array(table.c[name], [value], dialect)
        params.append(value)
        select_list.append((f"%s::{element}::{target}" if target == "jsonb" else f"%s::{target}")
                           + f' AS "{name}"')
    if not columns:  # every column is uniform: unnest one array of row numbers
        columns = {"_n": list(range(len(rows)))}
    for name, values in columns.items():
        if name == "_n":
            params.append(values)
            unnest_args.append("%b::bigint[]")
            continue
        column = table.c[name]
        element, values = _pg_array(column, values, dialect)
        params.append(values)
        unnest_args.append(f"%b::{element}[]")
        target = _pg_type(column, dialect)
        cast = f'v."{name}"::{target}' if target == "jsonb" else f'v."{name}"'
        select_list.append(cast + f' AS "{name}"')
    names = list(columns)
    alias = ", ".join(f'"{name}"' for name in names)
    sql = f"SELECT {', '.join(select_list)} FROM unnest({', '.join(unnest_args)}) AS v({alias})"
    return sql, tuple(params), [name for name in constants] + [name for name in names if name != "_n"]


def insert_rows(conn: Connection, table, rows: Sequence[dict], returning: Sequence[str] = (),
                conflict: Sequence[str] | None = None, constants: dict | None = None,
                columns: Sequence[str] | None = None) -> list[tuple]:
    """Insert ``rows`` (dicts with the same keys) in one statement; return ``returning`` columns.

    ``constants`` are column values shared by every row.  ``conflict`` names a unique
    constraint's columns: rows that collide with it are skipped (and not returned); an
    empty ``conflict`` skips rows that collide with any constraint.  ``columns`` names the
    keys of the rows to insert (default: every key of the first row; the rows may carry
    others).  Rows are returned in no particular order.
    """
    if not rows:
        return []
    result = _insert(conn, table, rows, returning, conflict, constants, columns)
    return [tuple(row) for row in result] if returning else []


def insert_count(conn: Connection, table, rows: Sequence[dict], conflict: Sequence[str] | None = None,
                 constants: dict | None = None, columns: Sequence[str] | None = None) -> int:
    """``insert_rows`` without RETURNING: how many rows were inserted (not those ``conflict`` skipped)."""
    if not rows:
        return 0
    return _insert(conn, table, rows, (), conflict, constants, columns).rowcount


def _insert(conn: Connection, table, rows: Sequence[dict], returning: Sequence[str],
            conflict: Sequence[str] | None, constants: dict | None, columns: Sequence[str] | None):
    constants = constants or {}
    names = list(columns) if columns is not None else list(rows[0])
    if is_postgres(conn):
        select_sql, params, output = _unnest_select(conn, table, names, rows, constants)
        column_list = ", ".join(f'"{name}"' for name in output)
        sql = f"INSERT INTO {table.name} ({column_list}) {select_sql}"
        if conflict is not None:
            target = f"({', '.join(conflict)}) " if conflict else ""
            sql += f" ON CONFLICT {target}DO NOTHING"
        if returning:
            sql += f" RETURNING {', '.join(returning)}"
        return conn.exec_driver_sql(sql, params)
    if columns is not None:
        rows = [{name: row[name] for name in names} for row in rows]
    if constants:
        rows = [dict(row) | constants for row in rows]
    statement = insert_for(conn, table)
    if conflict is not None:
        statement = statement.on_conflict_do_nothing(index_elements=list(conflict) or None)
    if returning:
        statement = statement.returning(*[table.c[name] for name in returning])
    return conn.execute(statement, list(rows))


def update_rows(conn: Connection, table, rows: Sequence[dict], key: str = "id",
                constants: dict | None = None) -> None:
    """``UPDATE table SET col = row[col] ... WHERE key = row[key]`` for every row, in one statement.

    Every row has the same keys; ``constants`` are set to the same value on every row.
    """
    if not rows:
        return
    constants = constants or {}
    names = [name for name in rows[0] if name != key]
    if is_postgres(conn):
        select_sql, params, _ = _unnest_select(conn, table, [key] + names, rows)
        assignments = [f'"{name}" = v."{name}"' for name in names]
        assignments += [f'"{name}" = %s' for name in constants]
        sql = (f"UPDATE {table.name} AS t SET {', '.join(assignments)} FROM ({select_sql}) AS v "
               f'WHERE t."{key}" = v."{key}"')
        conn.exec_driver_sql(sql, tuple(constants.values()) + params)
        return
    statement = (
        update(table)
        .where(table.c[key] == bindparam(f"_k_{key}"))
        .values({name: bindparam(f"_v_{name}") for name in names} | constants)
    )
    conn.execute(statement, [{f"_v_{n}": row[n] for n in names} | {f"_k_{key}": row[key]} for row in rows])
