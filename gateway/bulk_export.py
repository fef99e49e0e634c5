"""The whole of a filtered collection as CSV or JSON Lines, at database speed where it can be.

Two paths give the same bytes:

* **The Python path** (every collection, both stores): the collection's keyset pages of
  ``CSV_BATCH`` rows, each in its own short transaction, serialized by the collection's own
  serializer (the objects the paged JSON returns) and written one row or line at a time.
* **The COPY path** (PostgreSQL, collections with a SQL rendering, ``SQL_RENDERINGS``): the
  database renders each row's CSV line or JSON line itself and streams them with
  ``COPY (SELECT ...) TO STDOUT`` in keyset slices of ``COPY_SLICE`` rows.  The slices run in
  one REPEATABLE READ transaction, so they read one snapshot: no row is missed or repeated
  whatever is written meanwhile.  The SELECT is the collection's own (its tenant condition first,
  the ``$filter`` conditions, the ``$orderby`` keyset with the id tie-break); only the
  columns differ, and the tables those read may be joined to it (``SqlRendering.join``: a
  finding's recommendation and current assignment).  Each COPY row is ``line <TAB>
  keyset-as-JSON``: the keyset of a slice's last row starts the next slice, and is cut from the
  lines with one regular expression over a block of rows (C speed, no Python work per row).
  Memory stays flat: one block at a time.

The SQL rendering repeats the Python serialization rules byte for byte: strings through
``to_json`` (which escapes exactly what ``json.dumps(ensure_ascii=False)`` escapes), datetimes
as ``datetime.isoformat`` writes them (microseconds only when not zero, the session's offset),
floats as ``repr`` writes them, JSON columns re-spaced to ``separators=(",", ":")``; CSV cells
with the same formula escaping (``query.csv_cell``) and the quoting of Python's ``csv`` module.
tests/test_bulk_export.py compares both paths byte for byte.

What a row costs is the database's CPU, spread thin over many small expressions (a finding's
sources alone, twenty JSON fields each, are some 45%; each timestamp about 0.6 µs): per-row
correlated subqueries are kept for what is a list (sources, tickets), a lookup of one row is a
join, a lookup that most tenants never need (tickets) is skipped when the tenant has none, and
nothing is sorted twice.  ``bench/export_csv_bench.py`` measures it.  A collection (or a ``$select``
naming a field) without a rendering, and SQLite, take the Python path.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Numeric,
    Text,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.engine import Engine
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.visitors import replacement_traverse

from gateway import query
from gateway.models import Finding, FindingSource, GovernanceAssignment, Recommendation, RecommendationType
from gateway.posture import governance
from gateway.query import Collection, ListRequest

log = logging.getLogger(__name__)

COPY_SLICE = 50_000  # rows a COPY statement reads; the next one starts after its last row
PARALLEL_SLICE = 5_000  # rows of one slice when several connections share an export
BOUNDARIES_PER_QUERY = 200  # slice starts one numbering query finds
READER_TIMEOUT = 120.0  # seconds a slice reader may send nothing (EXPORT_READER_TIMEOUT_SECONDS)
_BLOCK = 1 << 18  # bytes of COPY output handled (and sent) at once
MEDIA = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson; charset=utf-8"}
EXTENSIONS = {"csv": "csv", "jsonl": "jsonl"}
ACCEPTED = ["application/json", "text/csv", "application/x-ndjson", "application/jsonl"]


def accepted(accept) -> dict[str, bool]:
    """``parse_list_args``'s ``accept_csv`` and ``accept_jsonl`` from an Accept header (JSON on ties)."""
    best = accept.best_match(ACCEPTED)
    return {
        "accept_csv": best == "text/csv",
        "accept_jsonl": best in ("application/x-ndjson", "application/jsonl"),
    }


def export_format(request: ListRequest) -> str | None:
    """``csv``, ``jsonl`` or None (a JSON page)."""
    return "csv" if request.csv else "jsonl" if request.jsonl else None


def export_response(
    response_class,
    engine: Engine,
    collection: Collection,
    tenant_id: int,
    request: ListRequest,
    name: str,
    json_default: Callable | None = None,
    connections: int = 1,
    reader_timeout: float = READER_TIMEOUT,
):
    """The streamed download of the whole filtered collection in the request's format."""
    wanted = export_format(request)
    assert wanted is not None
    response = response_class(
        stream(engine, collection, tenant_id, request, wanted, json_default=json_default,
               connections=connections, reader_timeout=reader_timeout),
        content_type=MEDIA[wanted],
    )
    response.headers["Content-Disposition"] = f'attachment; filename="{name}.{EXTENSIONS[wanted]}"'
    return response


def copy_rendering(engine: Engine, collection: Collection, request: ListRequest) -> SqlRendering | None:
    """The collection's SQL rendering when the COPY path can serve the request (PostgreSQL, every
    selected field rendered), else None."""
    rendering = SQL_RENDERINGS.get(collection.name)
    if rendering is None or engine.dialect.name != "postgresql":
        return None
    return (
        rendering
        if all(name in rendering.fields for name in request.select or collection.selectable)
        else None
    )


def stream(
    engine: Engine,
    collection: Collection,
    tenant_id: int,
    request: ListRequest,
    wanted: str,
    *,
    fast: bool = True,
    json_default: Callable | None = None,
    connections: int = 1,
    slice_rows: int | None = None,
    reader_timeout: float = READER_TIMEOUT,
) -> Iterator[bytes]:
    """The export's bytes: by COPY where the store and the selection allow (``fast``), else in Python.

    With ``connections`` above 1 the COPY slices (``slice_rows`` each, ``PARALLEL_SLICE`` by
    default) are read by that many connections at once, all in one snapshot; a reader that sends
    nothing for ``reader_timeout`` seconds ends the export with :class:`ExportStalled`."""
    rendering = copy_rendering(engine, collection, request) if fast else None
    if rendering is not None and connections > 1 and reads_in_order(engine, collection, tenant_id, request):
        return _parallel_copy_stream(engine, collection, rendering, tenant_id, request, wanted,
                                     connections, slice_rows or PARALLEL_SLICE, reader_timeout)
    if rendering is not None:
        return _copy_stream(engine, collection, rendering, tenant_id, request, wanted)
    if wanted == "csv":
        return _python_csv(engine, collection, tenant_id, request)
    return _python_jsonl(engine, collection, tenant_id, request, json_default)


# -- the Python path -------------------------------------------------------------------------------


def jsonl_line(item: dict, default: Callable | None = None) -> str:
    """One object as a JSON Lines line (compact, UTF-8 as is)."""
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=default) + "\n"


def _python_pages(
    engine: Engine, collection: Collection, tenant_id: int, request: ListRequest
) -> Iterator[list]:
    """The objects of the paged JSON, ``query.CSV_BATCH`` at a time, each batch in its own transaction."""
    after = None
    while True:
        with engine.connect() as conn:
            rows, after = query._page(conn, collection, tenant_id, request, after, query.CSV_BATCH)
            objects = query.project(
                collection.serialize(conn, tenant_id, rows, request.select), request.select
            )
        yield objects  # with the connection given back: each batch is a short transaction of its own
        if after is None:
            return
        # the position as a cursor carries it (``query._after`` reads datetimes from ISO text)
        after = (
            [value.isoformat() if isinstance(value, datetime) else value for value in after[0]],
            after[1],
        )


def _python_csv(
    engine: Engine, collection: Collection, tenant_id: int, request: ListRequest
) -> Iterator[bytes]:
    columns = request.select or collection.selectable
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    for objects in _python_pages(engine, collection, tenant_id, request):
        writer.writerows([query.csv_cell(item[name]) for name in columns] for item in objects)
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()


def _python_jsonl(
    engine: Engine, collection: Collection, tenant_id: int, request: ListRequest, default: Callable | None
) -> Iterator[bytes]:
    for objects in _python_pages(engine, collection, tenant_id, request):
        yield "".join(jsonl_line(item, default) for item in objects).encode()


# -- the COPY path ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqlField:
    """A field rendered by the database: ``json`` its JSON text (never NULL: ``null``); ``text`` the
    raw string of a string field (NULL when null), None for other values, whose CSV cell is their
    JSON text (and empty for null).  ``kind`` tells how much CSV escaping the cell can need:
    ``string`` any; ``plain`` none (ids, datetimes, booleans); ``number`` a formula prefix when
    negative; ``json`` (lists and objects) quoting, never a prefix (they start with [ or {)."""

    json: ColumnElement
    text: ColumnElement | None = None
    kind: str = "json"


@dataclass(frozen=True)
class SqlRendering:
    """A collection's fields as SQL (tenant id -> field name -> SqlField)."""

    fields: tuple[str, ...]
    render: Callable[[int], dict[str, SqlField]]
    # (tenant id, the collection's SELECT) -> that SELECT with the tables the fields read joined
    join: Callable[[int, Any], Any] | None = None


def _lit(text: str) -> ColumnElement:
    return literal(text, Text)


def _concat(*parts: ColumnElement) -> ColumnElement:
    out = parts[0]
    for part in parts[1:]:
        out = out.op("||", return_type=Text)(part)
    return out


def j_string(expression: ColumnElement) -> SqlField:
    """A string (or null): ``to_json`` escapes what ``json.dumps(ensure_ascii=False)`` escapes."""
    text = cast(expression, Text)
    return SqlField(func.coalesce(cast(func.to_json(text), Text), _lit("null")), text, "string")


def j_id(expression: ColumnElement) -> SqlField:
    """An id shown as a decimal string (or null)."""
    text = cast(expression, Text)
    return SqlField(func.coalesce(_concat(_lit('"'), text, _lit('"')), _lit("null")), text, "plain")


def _iso(expression: ColumnElement) -> ColumnElement:
    """``datetime.isoformat()`` of a timestamptz in the session's time zone (NULL stays NULL)."""
    full = func.to_char(expression, literal_column("""'YYYY-MM-DD"T"HH24:MI:SS.USTZH:TZM'"""))
    return func.replace(full, literal_column("'.000000'"), literal_column("''"))


def j_time(expression: ColumnElement) -> SqlField:
    text = _iso(expression)
    return SqlField(func.coalesce(_concat(_lit('"'), text, _lit('"')), _lit("null")), text, "plain")


def _bool(expression: ColumnElement) -> ColumnElement:
    return case((expression, literal_column("'true'")), else_=literal_column("'false'"))


def j_bool(expression: ColumnElement) -> SqlField:
    """A boolean as ``bool()`` sees it (NULL is false)."""
    return SqlField(_bool(expression), kind="plain")


def _float(expression: ColumnElement) -> ColumnElement:
    """``repr`` of a double: PostgreSQL's shortest text, with ``.0`` on whole numbers and fixed
    notation below 1e16 (where PostgreSQL switches to an exponent at 1e15)."""
    text = cast(expression, Text)
    whole, size = expression == func.trunc(expression), func.abs(expression)
    exact = cast(cast(text, Numeric()), Text)  # '1.5e+15' -> '1500000000000000'
    return case(
        (expression.is_(None), _lit("null")),
        (and_(whole, size < 1e15), _concat(text, _lit(".0"))),
        (and_(size >= 1e15, size < 1e16), case((whole, _concat(exact, _lit(".0"))), else_=exact)),
        else_=text,
    )


def j_float(expression: ColumnElement) -> SqlField:
    return SqlField(_float(expression), kind="number")


# jsonb's text is spaced (``{"a": 1, "b": [2, 3]}``): outside strings a space follows only ``,`` and
# ``:``.  Matching whole strings first, and each run of other characters with one optional space
# after it, drops exactly those spaces.
_COMPACT = r'("(?:[^"\\]|\\.)*"|[^" ]+) ?'


def j_json(expression: ColumnElement) -> SqlField:
    """A JSON (jsonb) column as ``json.dumps(separators=(",", ":"))`` writes what psycopg reads of it."""
    compact = func.regexp_replace(
        cast(expression, Text),
        literal_column(f"'{_COMPACT}'"),
        literal_column("'\\1'"),
        literal_column("'g'"),
    )
    return SqlField(
        func.coalesce(
            case((cast(expression, Text) == "[]", literal_column("'[]'")), else_=compact), _lit("null")
        )
    )


def j_object(pairs: list[tuple[str, SqlField]]) -> ColumnElement:
    """``{"name":value,...}`` from rendered fields, in the given order."""
    parts: list[ColumnElement] = []
    for position, (name, rendered) in enumerate(pairs):
        parts += [_lit(("{" if position == 0 else ",") + json.dumps(name) + ":"), rendered.json]
    parts.append(_lit("}"))
    return _concat(*parts)


def _csv_cell(rendered: SqlField) -> ColumnElement:
    """``query.csv_cell`` and the quoting of the ``csv`` module (a cell with , " CR or LF is quoted)."""
    if rendered.kind == "plain":
        return rendered.json if rendered.text is None else func.coalesce(rendered.text, _lit(""))
    if rendered.kind == "number":  # no quoting; a minus sign is a formula's start
        return case(
            (rendered.json == "null", _lit("")),
            (func.left(rendered.json, 1) == "-", _concat(_lit("'"), rendered.json)),
            else_=rendered.json,
        )
    if rendered.kind == "json":  # JSON text escapes CR and LF; [ and { start no formula
        needs_quotes = or_(func.strpos(rendered.json, '"') > 0, func.strpos(rendered.json, ",") > 0)
        return case(
            (rendered.json == "null", _lit("")),
            (needs_quotes, _quoted(rendered.json)),
            else_=rendered.json,
        )
    text = func.coalesce(rendered.text, _lit(""))
    # the first character's code (0 for ''), and four substring searches: a regular expression
    # (``~ '[,"\r\n]'``) and ``left(text, 1) IN (...)`` cost some 2.5 µs more a CSV row
    risky = func.ascii(text).in_([literal_column(str(ord(c))) for c in "=+-@\t\r"])
    cell = case((risky, _concat(_lit("'"), text)), else_=text)  # the prefix adds nothing to quote
    needs_quotes = or_(*(func.strpos(text, literal_column(f"E'{c}'")) > 0 for c in (",", '"', "\\r", "\\n")))
    return case((needs_quotes, _quoted(cell)), else_=cell)


def _quoted(text: ColumnElement) -> ColumnElement:
    return _concat(_lit('"'), func.replace(text, literal_column("'\"'"), literal_column("'\"\"'")), _lit('"'))


def _line(rendered: dict[str, SqlField], columns: tuple[str, ...], wanted: str) -> ColumnElement:
    if wanted == "jsonl":
        return j_object([(name, rendered[name]) for name in columns])
    cells = [_csv_cell(rendered[name]) for name in columns]
    if len(cells) == 1:  # csv writes a lone empty cell as ""
        cells = [case((cells[0] == "", _lit('""')), else_=cells[0])]
    parts: list[ColumnElement] = []
    for position, cell in enumerate(cells):
        if position:
            parts.append(_lit(","))
        parts.append(cell)
    parts.append(literal_column("E'\\r'"))  # the CR of CRLF; COPY ends each row with the LF
    return _concat(*parts)


_ESCAPED = re.compile(rb"\\[\\nrtbfv]")  # COPY's text format escapes
_UNESCAPE = {
    b"\\\\": b"\\",
    b"\\n": b"\n",
    b"\\r": b"\r",
    b"\\t": b"\t",
    b"\\b": b"\b",
    b"\\f": b"\f",
    b"\\v": b"\v",
}
_KEYSET = re.compile(rb"\t[^\n]*")  # the keyset column after each line (data tabs are escaped)


def _unescape(data: bytes) -> bytes:
    return _ESCAPED.sub(lambda match: _UNESCAPE[match.group()], data) if b"\\" in data else data


def _slice_query(
    collection: Collection,
    rendering: SqlRendering,
    tenant_id: int,
    request: ListRequest,
    after: tuple[list, Any] | None,
    wanted: str,
    limit: int | None = None,
    after_condition: ColumnElement | None = None,
    aggregate: bool = False,
):
    """One slice: the rows after ``after`` (or ``after_condition``) in the request's order, each as
    ``line, keyset JSON``; with ``aggregate``, one row: the slice's lines (each with its line
    end) joined in order, as UTF-8 bytes (``bytea``).

    The inner SELECT renders each field once (a subquery such as a finding's sources runs once a
    row); the outer one builds the line from those columns, which a CSV cell reads several times.
    """
    expressions = [(collection.order_fields[name], desc) for name, desc in request.order]
    statement = query.filtered(collection, tenant_id, request)
    if rendering.join is not None:
        statement = rendering.join(tenant_id, statement)
    if after is not None:
        after_condition = query._after(expressions, after[0], collection.id_column, after[1])
    if after_condition is not None:
        statement = statement.where(after_condition)
    order_by = [(f.expression.desc() if desc else f.expression.asc()) for f, desc in expressions]
    last_desc = request.order[-1][1] if request.order else False
    order_by.append(collection.id_column.desc() if last_desc else collection.id_column.asc())
    columns = request.select or collection.selectable
    rendered = rendering.render(tenant_id)
    inner_columns = [collection.id_column.label("_id")]
    inner_columns += [f.expression.label(f"_o{i}") for i, (f, _) in enumerate(expressions)]
    for i, name in enumerate(columns):
        inner_columns.append(rendered[name].json.label(f"_j{i}"))
        if rendered[name].text is not None:
            inner_columns.append(rendered[name].text.label(f"_t{i}"))
    inner = (
        statement.with_only_columns(*inner_columns, maintain_column_froms=True)
        .order_by(*order_by)
        .limit(COPY_SLICE if limit is None else limit)
        .subquery("export_slice")
    )
    fields = {
        name: SqlField(
            inner.c[f"_j{i}"],
            inner.c[f"_t{i}"] if rendered[name].text is not None else None,
            rendered[name].kind,
        )
        for i, name in enumerate(columns)
    }
    keys = [inner.c[f"_o{i}"] for i in range(len(expressions))]
    outer_order = [
        (key.desc() if desc else key.asc()) for key, (_, desc) in zip(keys, expressions, strict=True)
    ]
    outer_order.append(inner.c._id.desc() if last_desc else inner.c._id.asc())
    line = _line(fields, columns, wanted)
    if aggregate:  # the CR of a CSV line's CRLF is in the line; COPY would add the LF
        # The lines are joined in the order the slice gives them: the inner SELECT's ORDER BY
        # (the aggregate reads the subquery's rows as they come, from one Limit over one ordered
        # scan or sort: nothing below a LIMIT is aggregated in parallel parts).  An ORDER BY in
        # the aggregate would copy and sort every line again: some 3 µs a row of the backend.
        lines = func.string_agg(_concat(line, literal_column("E'\\n'")), literal_column("''"))
        return select(func.convert_to(lines, literal_column("'UTF8'")))
    keyset = cast(func.json_build_array(*keys, inner.c._id), Text)
    return select(line, keyset).order_by(*outer_order)


def _copy_stream(
    engine: Engine,
    collection: Collection,
    rendering: SqlRendering,
    tenant_id: int,
    request: ListRequest,
    wanted: str,
) -> Iterator[bytes]:
    columns = request.select or collection.selectable
    if wanted == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerow(columns)
        yield buffer.getvalue().encode()
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        _export_settings(conn)
        cursor = conn.connection.dbapi_connection.cursor()
        after = None
        while True:
            statement = _slice_query(collection, rendering, tenant_id, request, after, wanted)
            rows, last = 0, b""
            for block, keyset, count in _copy_blocks(cursor, engine, statement):
                rows, last = rows + count, keyset
                yield block
            if rows < COPY_SLICE:
                return
            keys = json.loads(_unescape(last))
            after = (keys[:-1], keys[-1])


def _copy_blocks(cursor, engine: Engine, statement) -> Iterator[tuple[bytes, bytes, int]]:
    """One slice's COPY output in blocks of whole rows: (lines, the last row's keyset, rows)."""
    compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
    return _copy_text_blocks(cursor, f"COPY ({compiled}) TO STDOUT", compiled.params)


def _copy_text_blocks(cursor, text: str, params: dict) -> Iterator[tuple[bytes, bytes, int]]:
    pending = bytearray()
    with cursor.copy(text, params) as copy:
        for data in copy:
            pending += data
            if len(pending) >= _BLOCK and pending.endswith(b"\n"):  # (COPY sends whole rows)
                yield _complete(pending)
    if pending:
        yield _complete(pending)


def _export_settings(conn) -> None:
    # shortest exact doubles, as psycopg reads them; no JIT: the subqueries' estimates look costly,
    # and compiling them took longer than a 20,000-row export runs without it
    conn.exec_driver_sql("SET LOCAL extra_float_digits = 1")
    conn.exec_driver_sql("SET LOCAL jit = off")


# -- the COPY path on several connections ---------------------------------------------------------
#
# One connection renders rows at the speed of one PostgreSQL backend (one core).  To use more,
# the export's transaction publishes its snapshot (``pg_export_snapshot()``) and ``connections``
# reader threads, each with a connection of its own that adopts it (``SET TRANSACTION
# SNAPSHOT``), run the slices at once: every reader sees exactly the rows the export's
# transaction sees.  Where each slice starts is known beforehand: the export's own connection
# numbers the filtered rows in the request's order (their keys only, no rendering) and takes
# the keyset of every ``slice_rows``-th, ``BOUNDARIES_PER_QUERY`` slices at a time.  A slice is
# then the very SELECT of the one-connection path (rows after its start, LIMIT slice_rows), its
# lines joined in order by ``string_agg`` into one ``bytea`` value read in the binary protocol:
# no keyset column, no COPY escaping to undo, and one message a slice instead of one a row (the
# COPY rows cost the response's process more CPU than the rest of the export).
# The response takes the slices' output in order; at most ``connections + 1`` slices are ahead of
# it, so memory stays bounded by a few slices whatever the export's size.
#
# Nothing waits on a reader forever.  A reader can be stuck where no timeout of its own ends it:
# its COPY waiting for a lock (a queued ``ALTER TABLE`` or ``LOCK TABLE`` waits behind the export's
# own transaction, and the reader's new lock request behind that: a cycle through Python that
# PostgreSQL's deadlock detector cannot see), a backend that stopped answering.  The response waits
# at most ``reader_timeout`` seconds for the next block of output, then ends with
# :class:`ExportStalled` (the download is cut short: its headers are long sent).  However the
# export ends, each reader is joined for at most ``reader_timeout`` seconds; one still running is
# then cancelled (PostgreSQL's cancel request ends its statement, the reader rolls back and gives
# its connection back) and joined again, and one that even that does not end is left behind, a
# daemon thread, with a warning logged, so the request ends and the export's own transaction,
# which may be what the reader waits for, is ended too.


class ExportStalled(RuntimeError):
    """A slice reader sent nothing for the export's ``reader_timeout``."""


def _numbering(collection: Collection, tenant_id: int, request: ListRequest, after: tuple[list, Any] | None,
               slice_rows: int):
    """The keyset of every ``slice_rows``-th row after ``after``, ``BOUNDARIES_PER_QUERY`` at most."""
    numbered = _numbered(collection, tenant_id, request, after, slice_rows).subquery("export_numbered")
    every = numbered.c.position % slice_rows == 0
    # the keyset's JSON only for the rows that start a slice (building it for every row cost more
    # than numbering them)
    keys = [numbered.c[f"key{i}"] for i in range(len(request.order))] + [numbered.c.key_id]
    keyset = cast(func.json_build_array(*keys), Text)
    return select(keyset).where(every).order_by(numbered.c.position)


def _numbered(collection: Collection, tenant_id: int, request: ListRequest, after: tuple[list, Any] | None,
              slice_rows: int):
    """The next ``slice_rows * BOUNDARIES_PER_QUERY`` rows' keys (``key0``..., ``key_id``) and
    positions, in order."""
    expressions = [(collection.order_fields[name], desc) for name, desc in request.order]
    order_by = [(f.expression.desc() if desc else f.expression.asc()) for f, desc in expressions]
    last_desc = request.order[-1][1] if request.order else False
    order_by.append(collection.id_column.desc() if last_desc else collection.id_column.asc())
    keys = [f.expression.label(f"key{i}") for i, (f, _) in enumerate(expressions)]
    statement = query.filtered(collection, tenant_id, request)
    if after is not None:
        statement = statement.where(query._after(expressions, after[0], collection.id_column, after[1]))
    return (
        statement.with_only_columns(
            *keys,
            collection.id_column.label("key_id"),
            func.row_number().over(order_by=order_by).label("position"),
            maintain_column_froms=True,
        )
        .order_by(*order_by)
        .limit(slice_rows * BOUNDARIES_PER_QUERY)
    )


def _slice_starts(
    conn, collection: Collection, tenant_id: int, request: ListRequest, slice_rows: int
) -> Iterator[tuple[list, Any]]:
    """The keyset each slice after the first starts after: that of every ``slice_rows``-th row."""
    after = None
    while True:
        starts = conn.execute(_numbering(collection, tenant_id, request, after, slice_rows)).scalars().all()
        for text in starts:
            keys = json.loads(text)
            after = (keys[:-1], keys[-1])
            yield after
        if len(starts) < BOUNDARIES_PER_QUERY:
            return


def reads_in_order(engine: Engine, collection: Collection, tenant_id: int, request: ListRequest) -> bool:
    """Whether PostgreSQL reads the request's rows in its order (an index, no Sort nor Incremental Sort).

    Only then do many short slices pay: a slice that has to sort reads every row after its start,
    so the more slices, the more of the collection is read again (the one-connection path's
    large slices read it a few times at most)."""
    statement = _numbered(collection, tenant_id, request, None, PARALLEL_SLICE)
    compiled = statement.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})
    with engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar()
    if isinstance(plan, str):
        plan = json.loads(plan)

    def sorts(node: dict) -> bool:
        children = node.get("Plans", ())
        return node.get("Node Type", "").endswith("Sort") or any(sorts(child) for child in children)

    return not sorts(plan[0]["Plan"])


class _SliceStatements:
    """The SQL of each slice, compiled once per shape of its start condition.

    Building and compiling a slice's SELECT costs some 30 ms of Python (the rendering is a large
    expression), as much as PostgreSQL takes for a thousand rows.  Slices differ only in the
    values their start condition compares with, so that condition's bound values get names of
    their own (``export_after_N``); the compiled text is kept by the condition's own SQL (its
    shape: a NULL key, say, compares differently) and a slice only sets those values."""

    def __init__(self, engine: Engine, collection: Collection, rendering: SqlRendering, tenant_id: int,
                 request: ListRequest, wanted: str, slice_rows: int) -> None:
        self.engine, self.collection, self.rendering = engine, collection, rendering
        self.tenant_id, self.request, self.wanted, self.slice_rows = tenant_id, request, wanted, slice_rows
        self.expressions = [(collection.order_fields[name], desc) for name, desc in request.order]
        self.compiled: dict[str | None, tuple[str, dict]] = {}

    def sql(self, after: tuple[list, Any] | None) -> tuple[str, dict]:
        """The statement of the slice after ``after`` (its lines as one value) and its parameters."""
        condition, values = None, {}
        if after is not None:
            def named(element):
                if isinstance(element, BindParameter):
                    name = f"export_after_{len(values)}"
                    values[name] = element.value
                    return bindparam(name, element.value, type_=element.type)
                return None

            condition = replacement_traverse(
                query._after(self.expressions, after[0], self.collection.id_column, after[1]), {}, named)
        shape = None if condition is None else str(condition.compile(dialect=self.engine.dialect))
        if shape not in self.compiled:
            statement = _slice_query(self.collection, self.rendering, self.tenant_id, self.request, None,
                                     self.wanted, self.slice_rows, after_condition=condition, aggregate=True)
            compiled = statement.compile(dialect=self.engine.dialect,
                                         compile_kwargs={"render_postcompile": True})
            self.compiled[shape] = (str(compiled), compiled.params)
        text, params = self.compiled[shape]
        return text, params | values


_SNAPSHOT_ID = re.compile(r"[0-9A-Fa-f-]+")


class _SliceReader(threading.Thread):
    """A connection in the export's snapshot that runs the slices it takes from ``tasks``; each
    slice's blocks go to its own queue, then None (or the exception that stopped it)."""

    def __init__(self, engine: Engine, snapshot: str, tasks: queue.Queue, stop: threading.Event) -> None:
        super().__init__(name="export-slice-reader", daemon=True)
        self.engine, self.snapshot, self.tasks, self.stop = engine, snapshot, tasks, stop
        # the reader's connection while it holds it (cancel() needs it); the lock keeps a cancel
        # from reaching the connection after it went back to the pool, maybe to another thread
        self.dbapi_connection = None
        self.holding = threading.Lock()

    def cancel(self) -> None:
        """Ask PostgreSQL to end the reader's running statement (nothing if none runs)."""
        with self.holding:
            if self.dbapi_connection is None:
                return
            try:
                self.dbapi_connection.cancel_safe(timeout=10)
            except Exception:  # noqa: BLE001 - the reader is then left behind, logged by the caller
                log.warning("could not cancel an export slice reader's statement", exc_info=True)

    def run(self) -> None:
        try:
            with self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, \
                    conn.begin():
                with self.holding:
                    self.dbapi_connection = conn.connection.dbapi_connection
                try:
                    self._read(conn)
                finally:
                    with self.holding:
                        self.dbapi_connection = None
        except Exception as exc:  # noqa: BLE001 - answered on every slice left, raised by the response
            while (task := self.tasks.get()) is not None:
                task[1].put(exc)

    def _read(self, conn) -> None:
        conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{self.snapshot}'")
        _export_settings(conn)
        cursor = conn.connection.dbapi_connection.cursor()
        while (task := self.tasks.get()) is not None:
            (text, params), out = task
            if self.stop.is_set():  # the response is gone: no more reading
                out.put(None)
                continue
            try:  # the slice as one value, in the binary protocol: no escaping, no work per row here
                out.put(cursor.execute(text, params, binary=True).fetchone()[0] or b"")
            except BaseException as exc:
                out.put(exc)
                raise
            out.put(None)


def _parallel_copy_stream(
    engine: Engine,
    collection: Collection,
    rendering: SqlRendering,
    tenant_id: int,
    request: ListRequest,
    wanted: str,
    connections: int,
    slice_rows: int,
    reader_timeout: float = READER_TIMEOUT,
) -> Iterator[bytes]:
    columns = request.select or collection.selectable
    if wanted == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerow(columns)
        yield buffer.getvalue().encode()
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
        _export_settings(conn)
        snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
        assert _SNAPSHOT_ID.fullmatch(snapshot), snapshot
        tasks: queue.Queue = queue.Queue()
        stop = threading.Event()
        readers = [_SliceReader(engine, snapshot, tasks, stop) for _ in range(connections)]
        for reader in readers:
            reader.start()
        try:
            statements = _SliceStatements(engine, collection, rendering, tenant_id, request, wanted,
                                          slice_rows)
            starts = _slice_starts(conn, collection, tenant_id, request, slice_rows)
            ahead: deque[queue.Queue] = deque()
            for after in itertools.chain([None], starts):
                out: queue.Queue = queue.Queue()
                tasks.put((statements.sql(after), out))
                ahead.append(out)
                if len(ahead) > connections:
                    yield from _slice_output(ahead.popleft(), reader_timeout)
            while ahead:
                yield from _slice_output(ahead.popleft(), reader_timeout)
        finally:  # also when the client went away (the generator is closed) or a reader stalled
            stop.set()
            for _ in readers:
                tasks.put(None)
            _end_readers(readers, reader_timeout)


def _end_readers(readers: list[_SliceReader], timeout: float) -> None:
    """Join the readers, each for at most ``timeout`` seconds; cancel the statement of any still
    running and join it again; one that does not end even then is left behind (logged)."""
    deadline = time.monotonic() + timeout
    for reader in readers:
        reader.join(max(0.0, deadline - time.monotonic()))
    for reader in readers:
        if reader.is_alive():
            reader.cancel()
    for reader in readers:
        reader.join(timeout)
        if reader.is_alive():
            log.warning("an export slice reader did not end %.0f s after its statement was cancelled; "
                        "left behind", timeout)


def _slice_output(out: queue.Queue, timeout: float = READER_TIMEOUT) -> Iterator[bytes]:
    while True:
        try:
            block = out.get(timeout=timeout)
        except queue.Empty:
            log.error("an export slice reader sent nothing for %.0f s; the export is ended", timeout)
            raise ExportStalled(f"an export slice reader sent nothing for {timeout:.0f} s") from None
        if block is None:
            return
        if isinstance(block, BaseException):
            raise block
        yield block


def _complete(pending: bytearray) -> tuple[bytes, bytes, int]:
    """The whole rows of ``pending`` as output (cut from it), the last row's keyset, how many rows."""
    end = pending.rindex(b"\n") + 1
    rows = bytes(pending[:end])
    del pending[:end]
    last = rows[rows.rindex(b"\t") + 1 : -1]
    return _unescape(_KEYSET.sub(b"", rows)), last, rows.count(b"\n")


# -- the renderings --------------------------------------------------------------------------------

F, S, R, RT = (
    Finding.__table__,
    FindingSource.__table__,
    Recommendation.__table__,
    RecommendationType.__table__,
)
GA = GovernanceAssignment.__table__


def _finding_sources(tenant_id: int) -> SqlField:
    """The finding's sources (``SourceOut``, by id), one correlated aggregate."""
    source = S.alias("export_source")
    fields = [
        ("provider", j_string(source.c.provider)),
        ("product", j_string(source.c.product)),
        ("format", j_string(source.c.format)),
        ("providerId", j_string(source.c.provider_id)),
        ("vendorId", j_string(source.c.vendor_id)),
        ("state", j_string(source.c.state)),
        ("title", j_string(source.c.title)),
        ("severity", j_string(source.c.severity)),
        ("severityOriginal", j_string(source.c.severity_original)),
        ("severityScale", j_string(source.c.severity_scale)),
        ("evidence", j_string(source.c.evidence)),
        ("cvssScore", j_float(source.c.cvss_score)),
        ("cvssVector", j_string(source.c.cvss_vector)),
        ("references", j_json(source.c.references)),
        ("firstSeen", j_time(source.c.first_seen)),
        ("lastSeen", j_time(source.c.last_seen)),
        ("providerTimestamp", j_time(source.c.provider_timestamp)),
        ("batchId", j_id(source.c.batch_id)),
        ("scan", j_string(source.c.scan)),
        ("hostKey", j_string(source.c.host_key)),
    ]
    listed = (
        select(
            _concat(
                _lit("["),
                func.string_agg(j_object(fields), aggregate_order_by(literal_column("','"), source.c.id)),
                _lit("]"),
            )
        )
        .where(source.c.tenant_id == tenant_id, source.c.finding_id == F.c.id)
        .scalar_subquery()
    )
    return SqlField(func.coalesce(listed, _lit("[]")))


def _finding_tickets(tenant_id: int) -> SqlField:
    """The finding's tickets (``ItemTicketOut``, by connection then id, as gateway/itsm/items.py
    lists them), one correlated aggregate."""
    from gateway.models import ItsmTicket, ItsmTicketItem

    link, ticket = ItsmTicketItem.__table__.alias("export_link"), ItsmTicket.__table__.alias("export_ticket")
    fields = [
        ("id", j_id(ticket.c.id)),
        ("connectionId", j_id(ticket.c.connection_id)),
        ("remoteId", j_string(ticket.c.remote_id)),
        ("remoteKey", j_string(ticket.c.remote_key)),
        ("remoteUrl", j_string(ticket.c.remote_url)),
        ("remoteState", j_string(ticket.c.remote_state)),
        ("syncState", j_string(ticket.c.sync_state)),
        ("lastSyncedDateTime", j_time(ticket.c.last_synced_at)),
    ]
    listed = (
        select(
            _concat(
                _lit("["),
                func.string_agg(
                    j_object(fields),
                    aggregate_order_by(literal_column("','"), ticket.c.connection_id, ticket.c.id),
                ),
                _lit("]"),
            )
        )
        .select_from(link.join(ticket, ticket.c.id == link.c.ticket_id))
        .where(
            link.c.tenant_id == tenant_id,
            ticket.c.tenant_id == tenant_id,
            link.c.subject_type == "finding",
            link.c.subject_id == F.c.id,
        )
        .scalar_subquery()
    )
    # most tenants' findings have no ticket: one look a statement (an InitPlan) whether the tenant
    # has any spares the lookup a row (some 2 µs of the backend's CPU) when it has none
    items = ItsmTicketItem.__table__
    any_item = exists(select(literal(1)).select_from(items)
                      .where(items.c.tenant_id == tenant_id, items.c.subject_type == "finding"))
    return SqlField(case((any_item, func.coalesce(listed, _lit("[]"))), else_=_lit("[]")))


# The finding's recommendation (one at most: unique by tenant, resource and type) and its current
# assignment (one at most: unique where latest), outer-joined to the slice's findings: one index
# probe a row gives both ``exemptionId`` and ``governance``, where two correlated subqueries a
# row cost some 3.5 µs of the backend's CPU (of about 31 a row; bench/export_csv_bench.py).
_EXPORT_REC, _EXPORT_GA = R.alias("export_rec"), GA.alias("export_ga")


def _finding_joins(tenant_id: int, statement):
    """The slice's FROM with the finding's recommendation and current assignment (outer joins)."""
    return statement.outerjoin(
        _EXPORT_REC,
        and_(
            _EXPORT_REC.c.tenant_id == tenant_id,
            _EXPORT_REC.c.resource_id == F.c.resource_id,
            _EXPORT_REC.c.type_id == F.c.recommendation_type_id,
        ),
    ).outerjoin(_EXPORT_GA, governance.latest_join(_EXPORT_GA, _EXPORT_REC))


def _finding_governance() -> SqlField:
    """The current assignment of the finding's recommendation (``recommendation_governance``), or null."""
    recommendation, assignment = _EXPORT_REC, _EXPORT_GA
    fields = [
        ("assignmentId", j_id(assignment.c.id)),
        ("ruleId", j_id(assignment.c.rule_id)),
        ("owner", j_string(assignment.c.owner)),
        ("dueDate", j_time(assignment.c.due_date)),
        ("isGracePeriod", j_bool(assignment.c.is_grace_period)),
        ("isOverdue", j_bool(governance.overdue(assignment, recommendation.c.status))),
        ("completedDateTime", j_time(assignment.c.completed_at)),
    ]
    return SqlField(case((assignment.c.id.is_(None), _lit("null")), else_=j_object(fields)))


def _findings(tenant_id: int) -> dict[str, SqlField]:
    cve = cast(F.c.cve, Text)
    return {
        "id": j_id(F.c.id),
        "resourceId": j_id(F.c.resource_id),
        "recommendationType": j_string(RT.c.key),
        "correlationKey": j_string(F.c.correlation_key),
        "cves": SqlField(
            case(
                (func.coalesce(cve, _lit("")) == "", _lit("[]")),
                else_=_concat(_lit("["), cast(func.to_json(cve), Text), _lit("]")),
            )
        ),
        "kind": j_string(F.c.kind),
        "title": j_string(F.c.title),
        "description": j_string(F.c.description),
        "remediation": j_string(F.c.remediation),
        "severity": j_string(F.c.severity),
        "cvssScore": j_float(F.c.cvss_score),
        "state": j_string(F.c.state),
        "exemptionId": j_id(_EXPORT_REC.c.exemption_id),
        "policy": SqlField(_concat(_lit('{"enabled":'), _bool(RT.c.enabled), _lit("}"))),
        "governance": _finding_governance(),
        "firstSeen": j_time(F.c.first_seen),
        "lastSeen": j_time(F.c.last_seen),
        "resolvedAt": j_time(F.c.resolved_at),
        "stateChangedAt": j_time(F.c.state_changed_at),
        "createdAt": j_time(F.c.created_at),
        "updatedAt": j_time(F.c.updated_at),
        "statusOverride": j_string(F.c.status_override),
        "assignedTo": j_string(F.c.assigned_to),
        "comments": j_json(F.c.comments),
        "tags": j_json(F.c.tags),
        "sources": _finding_sources(tenant_id),
        "tickets": _finding_tickets(tenant_id),
    }


_FINDING_FIELDS = (
    "id",
    "resourceId",
    "recommendationType",
    "correlationKey",
    "cves",
    "kind",
    "title",
    "description",
    "remediation",
    "severity",
    "cvssScore",
    "state",
    "exemptionId",
    "policy",
    "governance",
    "firstSeen",
    "lastSeen",
    "resolvedAt",
    "stateChangedAt",
    "createdAt",
    "updatedAt",
    "statusOverride",
    "assignedTo",
    "comments",
    "tags",
    "sources",
    "tickets",
)

SQL_RENDERINGS: dict[str, SqlRendering] = {
    "findings": SqlRendering(fields=_FINDING_FIELDS, render=_findings, join=_finding_joins),
}
