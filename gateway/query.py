"""The collection layer: tenant scope, OData options through allow-lists, keyset paging, CSV, workflow edits.

Every query starts from ``tenant_id = :tenant`` and only adds conditions to it: ``$filter``
(``gateway.odata``) becomes a SQLAlchemy expression over the collection's declared fields.
Paging is keyset ("seek") paging: the next page starts after the last row's ordering values,
which travel in a signed, opaque ``$skiptoken`` bound to the tenant, the collection, the
ordering, the filter and the selection, so a client cannot forge another tenant's cursor
and page 10,000 costs what page 1 costs.  ``$skip`` exists for clients that need it, bounded
by ``MAX_SKIP``.  A CSV export walks the same keyset in batches, each in its own short
transaction, so it has no cap, holds no lock or snapshot, and its memory stays flat.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import JSON, Select, String, Table, and_, cast, func, literal, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.util import find_tables

from gateway.errors import BadRequest
from gateway.odata import Field, FilterContext, ListField, parse_filter, parse_select
from gateway.provider_counts import findings_of as provider_findings
from gateway.provider_counts import provider_of

MAX_SKIP = 10_000
CSV_BATCH = 1000
LIST_OPTIONS = ("$filter", "$select", "$orderby", "$top", "$skip", "$skiptoken", "$count", "$format")
FORMATS = {"json": "json", "application/json": "json", "csv": "csv", "text/csv": "csv"}
# JSON Lines (gateway/bulk_export.py): one object per line, the whole result like CSV
FORMATS |= {"jsonl": "jsonl", "application/x-ndjson": "jsonl", "application/jsonl": "jsonl"}
_CSV_RISKY = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class OrderField:
    """An orderable field: its SQL expression (never NULL) and how to read a cursor value."""

    expression: ColumnElement
    kind: str = "str"  # str | int | float | datetime


@dataclass(frozen=True)
class Workflow:
    """The customer-owned fields of a collection's rows, changed by PATCH with history."""

    table: Table
    subject: str  # lifecycle_events.subject_type
    patch_schema: type
    columns: dict[str, str]  # API field -> column
    stamp: Callable[[Table, dict, datetime], dict] | None = None  # extra column values of an edit


@dataclass
class Collection:
    """A queryable collection of tenant-owned rows (add one to serve a new Graph collection)."""

    name: str
    base: Callable[[int], Select]  # tenant id -> SELECT with the tenant condition and an ``id`` column
    id_column: ColumnElement
    fields: dict[str, Field | ListField]  # $filter allow-list, by OData path
    order_fields: dict[str, OrderField]
    default_order: tuple[tuple[str, bool], ...]  # (field, descending)
    selectable: tuple[str, ...]  # output fields, in output order ($select allow-list)
    # (conn, tenant id, rows, selected) -> JSON; what it reads besides ``rows`` is scoped to the tenant too
    serialize: Callable[[Any, int, list, tuple[str, ...] | None], list[dict]]
    workflow: Workflow | None = None
    # ``$count`` without the joins of ``base``: tenant id -> SELECT of the main table alone, used
    # when no condition names a column of ``count_joined`` (joins that never drop or repeat a row:
    # a NOT NULL foreign key).  The join makes PostgreSQL read every matching heap row; without it
    # a count can be an index-only scan.
    count_base: Callable[[int], Select] | None = None
    count_joined: tuple[Table, ...] = ()
    # (conn, tenant id): makes rows the reads need (e.g. a tenant's built-in control profiles), in a
    # short transaction of its own before each read
    prepare: Callable[[Connection, int], None] | None = None


@dataclass
class ListRequest:
    top: int
    order: list[tuple[str, bool]]
    conditions: list[ColumnElement] = field(default_factory=list)
    fingerprint: str = ""
    select: tuple[str, ...] | None = None
    skip: int = 0
    count: bool = False
    csv: bool = False
    jsonl: bool = False  # the whole result as JSON Lines (gateway/bulk_export.py)
    owners: Select | None = None  # the filter's ParsedFilter.owners (see ``count``)
    canonical: str = ""  # the filter's canonical text (gateway/odata.py)


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalidParameter")


def _whole_number(args, name: str, default: int, low: int, high: int) -> int:
    text = args.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or len(text) > 6 or not low <= int(text) <= high:
        raise _invalid(f"'{name}' must be a whole number from {low} to {high}")
    return int(text)


def parse_list_args(collection: Collection, args, context: FilterContext, default_top: int, max_top: int,
                    accept_csv: bool = False, accept_jsonl: bool = False) -> ListRequest:
    """Read the OData options of a list (or CSV) request; 400 on anything not allowed."""
    unknown = sorted(set(args) - set(LIST_OPTIONS))
    if unknown:
        raise _invalid(f"unknown query parameter '{unknown[0][:40]}'; allowed: {', '.join(LIST_OPTIONS)}")
    repeated = [name for name in LIST_OPTIONS if len(args.getlist(name)) > 1]
    if repeated:
        raise _invalid(f"'{repeated[0]}' is given more than once")
    wanted_format = args.get("$format")
    if wanted_format is not None and wanted_format.lower() not in FORMATS:
        raise _invalid("'$format' is json, csv or jsonl")
    chosen = FORMATS[wanted_format.lower()] if wanted_format is not None else (
        "csv" if accept_csv else "jsonl" if accept_jsonl else "json")
    as_csv = chosen == "csv"
    if chosen != "json":
        paging = [name for name in ("$top", "$skip", "$skiptoken", "$count") if name in args]
        if paging:
            raise _invalid(f"'{paging[0]}' does not apply to {chosen.upper()}, which is the whole result")
    top = _whole_number(args, "$top", default_top, 1, max_top)
    skip = _whole_number(args, "$skip", 0, 0, MAX_SKIP)
    if skip and "$skiptoken" in args:
        raise _invalid("'$skip' and '$skiptoken' cannot be combined: follow @odata.nextLink as it is")
    count_text = args.get("$count")
    if count_text is not None and count_text not in ("true", "false"):
        raise _invalid("'$count' is true or false")
    order = _parse_order(collection, args.get("$orderby"))
    conditions, canonical, owners = [], "", None
    if "$filter" in args:
        parsed = parse_filter(args["$filter"], collection.fields, context)
        conditions.append(parsed.condition)
        canonical, owners = parsed.canonical, parsed.owners
    selected = parse_select(args["$select"], collection.selectable) if "$select" in args else None
    fingerprint = hashlib.sha256("\x1f".join(
        [collection.name, repr(order), canonical, ",".join(selected or ())]).encode()).hexdigest()[:24]
    return ListRequest(top=top, order=order, conditions=conditions, fingerprint=fingerprint, select=selected,
                       skip=skip, count=count_text == "true", csv=as_csv, owners=owners,
                       jsonl=chosen == "jsonl", canonical=canonical)


def _parse_order(collection: Collection, text: str | None) -> list[tuple[str, bool]]:
    if not text:
        return list(collection.default_order)
    order = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or words[0] not in collection.order_fields or (
            len(words) == 2 and words[1].lower() not in ("asc", "desc")
        ):
            raise _invalid(f"'$orderby' takes fields of {', '.join(sorted(collection.order_fields))} "
                           "with asc or desc")
        order.append((words[0], len(words) == 2 and words[1].lower() == "desc"))
    if len({name for name, _ in order}) != len(order):
        raise _invalid("'$orderby' names a field twice")
    return order


# -- paging ---------------------------------------------------------------------------------------


def _serializer(secret: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret, salt="gateway.cursor.v1")


def _bad_token(message: str = "'$skiptoken' is not a valid paging token") -> BadRequest:
    return BadRequest(message, code="invalidSkipToken")


def decode_cursor(secret: str, token: str, tenant_id: int, request: ListRequest) -> dict:
    try:
        data = _serializer(secret).loads(token)
    except BadSignature:
        raise _bad_token() from None
    if not isinstance(data, dict) or data.get("t") != tenant_id or data.get("f") != request.fingerprint:
        raise _bad_token("'$skiptoken' does not belong to this query")
    return data


def encode_cursor(secret: str, tenant_id: int, request: ListRequest, values: list, last_id: int) -> str:
    encoded = [v.isoformat() if isinstance(v, datetime) else v for v in values]
    return _serializer(secret).dumps({"t": tenant_id, "f": request.fingerprint, "v": encoded, "id": last_id})


def filtered(collection: Collection, tenant_id: int, request: ListRequest) -> Select:
    """The tenant's rows that match the request's filter (the tenant condition comes first, always)."""
    query = collection.base(tenant_id)
    for condition in request.conditions:
        query = query.where(condition)
    return query


def _page(conn: Connection, collection: Collection, tenant_id: int, request: ListRequest,
          after: tuple[list, int] | None, limit: int, offset: int = 0) -> tuple[list, tuple[list,
                                                                                            int] | None]:
    """Up to ``limit`` rows after the keyset position ``after``; and the position of the last row
    when more follow."""
    expressions = [(collection.order_fields[name], desc) for name, desc in request.order]
    query = _owners_page(collection, tenant_id, request, after, limit + 1 + offset)
    if query is None:
        query = filtered(collection, tenant_id, request)
    if after is not None:
        query = query.where(_after(expressions, after[0], collection.id_column, after[1]))
    order_by = [(f.expression.desc() if desc else f.expression.asc()) for f, desc in expressions]
    last_desc = request.order[-1][1] if request.order else False
    order_by.append(collection.id_column.desc() if last_desc else collection.id_column.asc())
    query = query.add_columns(*[f.expression.label(f"_o{i}") for i, (f, _) in enumerate(expressions)])
    rows = conn.execute(query.order_by(*order_by).offset(offset or None).limit(limit + 1)).all()
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    last = rows[-1]._mapping
    last_id = last["id"] if isinstance(last["id"], str) else int(last["id"])  # str: a named key
    return rows, ([last[f"_o{i}"] for i in range(len(expressions))], last_id)


def _owners_page(collection: Collection, tenant_id: int, request: ListRequest, after: tuple[list, int] | None,
                 rows: int) -> Select | None:
    """A page in id order whose whole filter is one ``any()`` of a list field with an owner: the
    collection's rows whose ids are the first ``rows`` distinct owners of the matching elements
    after the cursor (None for any other request).

    The owners come in order from the index on the elements (finding_sources (tenant_id,
    provider, finding_id), migration 0012), so a page reads about a page of elements whatever
    the statistics.  The EXISTS the filter otherwise is lets the planner, which without
    statistics guesses that a provider has a handful of sources, hash all the provider's
    sources, join them to their findings and sort them all, for every page (issue 17).
    """
    if request.owners is None or len(request.order) != 1:
        return None
    name, desc = request.order[0]
    if collection.order_fields[name].expression is not collection.id_column:
        return None
    owners = request.owners
    (owner,) = owners.selected_columns
    if after is not None:
        owners = owners.where(owner < after[1] if desc else owner > after[1])
    owners = owners.distinct().order_by(owner.desc() if desc else owner.asc()).limit(rows)
    return collection.base(tenant_id).where(collection.id_column.in_(owners))


def count(conn: Connection, collection: Collection, tenant_id: int, request: ListRequest) -> int:
    """How many rows the filter matches (``$count=true``).

    A filter that is one ``any()`` of a list field with an owner (``sources/any(s: s/provider eq
    'Tenable')``) is counted from the matching elements alone: their distinct owners, one scan
    of an index on the elements (finding_sources (tenant_id, provider, finding_id), migration
    0012).  The EXISTS the filter is otherwise joins every owner row to its elements: 1 s for
    400,000 of a 1M-finding tenant with statistics, tens of seconds without (issue 17).
    """
    if request.owners is not None:
        # exactly sources/any(s: s/provider eq 'P') on PostgreSQL: the kept count (migration 0026)
        provider = provider_of(request.canonical) if collection.name == "findings" else None
        if provider is not None and conn.dialect.name == "postgresql":
            return provider_findings(conn, tenant_id, provider)
        owners = request.owners.distinct().subquery()
        return conn.execute(select(func.count()).select_from(owners)).scalar_one()
    named = {table for condition in request.conditions
             for table in find_tables(condition, check_columns=True, include_aliases=True)}
    if collection.count_base is not None and not named & set(collection.count_joined):
        query = collection.count_base(tenant_id)
        for condition in request.conditions:
            query = query.where(condition)
        return conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()
    matching = filtered(collection, tenant_id, request).with_only_columns(collection.id_column).subquery()
    return conn.execute(select(func.count()).select_from(matching)).scalar_one()


def run_list(conn: Connection, collection: Collection, tenant_id: int, request: ListRequest, secret: str,
             skiptoken: str | None) -> tuple[list[dict], str | None]:
    """One page of the collection and the next page's token (None on the last page)."""
    after = None
    if skiptoken is not None:
        cursor = decode_cursor(secret, skiptoken, tenant_id, request)
        values = cursor.get("v")
        if not isinstance(values, list) or len(values) != len(request.order) or not isinstance(
                cursor.get("id"), int | str):
            raise _bad_token()
        after = (values, cursor["id"])
    rows, last = _page(conn, collection, tenant_id, request, after, request.top, 0 if after else request.skip)
    token = encode_cursor(secret, tenant_id, request, last[0], last[1]) if last else None
    return project(collection.serialize(conn, tenant_id, rows, request.select), request.select), token


def project(objects: list[dict], selected: tuple[str, ...] | None) -> list[dict]:
    if selected is None:
        return objects
    return [{name: item[name] for name in selected} for item in objects]


def _after(expressions, values, id_column, last_id) -> ColumnElement:
    """Rows strictly after (values, last_id) in the ordering: (a > x) or (a = x and (b > y ...))."""
    parsed = []
    for (order_field, desc), value in zip(expressions, values, strict=True):
        if order_field.kind == "datetime":
            try:
                value = datetime.fromisoformat(value)
            except (TypeError, ValueError):
                raise _bad_token() from None
        elif order_field.kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
            raise _bad_token()
        elif order_field.kind == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise _bad_token()
        elif order_field.kind == "str" and not isinstance(value, str):
            raise _bad_token()
        parsed.append((order_field.expression, desc, value))
    last_desc = expressions[-1][1] if expressions else False
    if parsed and parsed[-1][0] is id_column:  # ordered by id last: the id tie-break is that order
        parsed.pop()
    if parsed and all(desc == last_desc for _, desc, _ in parsed) and all(
            expression is not id_column for expression, _, _ in parsed):
        # One direction: a row comparison, which an index on (tenant, expressions..., id)
        # can start from (the OR form below makes PostgreSQL read every row before the cursor).
        left = tuple_(*[expression for expression, _, _ in parsed], id_column)
        right = tuple_(*[literal(value, type_=expression.type) for expression, _, value in parsed],
                       literal(last_id, type_=id_column.type))
        return left < right if last_desc else left > right
    condition: ColumnElement = id_column < last_id if last_desc else id_column > last_id
    for expression, desc, value in reversed(parsed):
        beyond = expression < value if desc else expression > value
        condition = or_(beyond, and_(expression == value, condition))
    return condition


# -- CSV ------------------------------------------------------------------------------------------


def csv_cell(value: Any) -> str:
    """A CSV cell; text a spreadsheet would run as a formula gets a leading apostrophe."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    text = str(value)
    return "'" + text if text.startswith(_CSV_RISKY) else text


def stream_csv(engine: Engine, collection: Collection, tenant_id: int,
               request: ListRequest) -> Iterator[bytes]:
    """The whole filtered collection as CSV (header first), read in keyset batches."""
    columns = list(request.select or collection.selectable)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(columns)
    after = None
    while True:
        with engine.connect() as conn:
            rows, after = _page(conn, collection, tenant_id, request, after, CSV_BATCH)
            objects = collection.serialize(conn, tenant_id, rows, request.select)
        for item in objects:
            writer.writerow([csv_cell(item[name]) for name in columns])
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
        if after is None:
            return


# -- workflow -------------------------------------------------------------------------------------


def json_append(column: ColumnElement, items: list[dict], dialect: str) -> ColumnElement:
    """``column`` (a JSON array) with ``items`` appended, computed in SQL (no read-modify-write)."""
    if dialect == "postgresql":
        empty = cast(literal("[]", String), JSONB)
        return func.coalesce(column, empty).op("||", return_type=JSONB)(
            cast(literal(json.dumps(items), String), JSONB))
    arguments: list[Any] = []
    for item in items:
        arguments += ["$[#]", func.json(json.dumps(item))]
    return func.json_insert(func.coalesce(column, "[]"), *arguments, type_=JSON)


def apply_edit(conn: Connection, collection: Collection, tenant_id: int, conditions: list[ColumnElement],
               changes: dict, actor: str, now: datetime, events_table: Table, cause: str = "customer edit") -> int:
    """Apply one edit to every row of the tenant matching ``conditions``: one UPDATE, one INSERT of
    history events (``cause``: an automation rule's edit names the rule).  Returns how many rows changed."""
    workflow = collection.workflow
    assert workflow is not None
    table = workflow.table
    dialect = conn.dialect.name
    recorded: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for key, value in changes.items():
        if key == "comments":
            value = [{"text": c["text"], "by": c.get("by") or actor, "at": now.isoformat()} for c in value]
            values[workflow.columns[key]] = json_append(table.c[workflow.columns[key]], value, dialect)
        else:
            values[workflow.columns[key]] = value
        recorded[key] = value.isoformat() if isinstance(value, datetime) else value
    values["updated_at"] = now
    if workflow.stamp:
        values.update(workflow.stamp(table, changes, now))
    # The filter is written against the collection's query (which may join other tables), so the
    # rows to change are chosen by a self-contained subquery of it.
    matching = (filtered(collection, tenant_id, ListRequest(top=0, order=[], conditions=conditions))
                .with_only_columns(collection.id_column).correlate(None))
    ids = conn.execute(update(table).where(table.c.tenant_id == tenant_id, table.c.id.in_(matching))
                       .values(values).returning(table.c.id)).scalars().all()
    if ids:
        conn.execute(events_table.insert(), [
            {"tenant_id": tenant_id, "subject_type": workflow.subject, "subject_id": subject_id,
             "event": "edited",
             "at": now, "cause": cause, "actor": actor, "batch_id": None, "details": recorded}
            for subject_id in sorted(ids)])
    return len(ids)
