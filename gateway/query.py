"""The collection query layer: tenant scope, allow-listed filters and ordering, keyset paging.

Every query starts from ``tenant_id = :tenant`` and only adds conditions to it.  Paging
is keyset ("seek") paging: the next page starts after the last row's ordering values,
which travel in a signed, opaque ``$skiptoken`` bound to the tenant, the collection,
the ordering and the filters, so a client cannot forge another tenant's cursor and
page 10,000 costs what page 1 costs.  The full OData layer plugs in here: it adds
conditions from ``$filter`` and fields from ``$select`` to a ``ListRequest``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import Select, and_, or_
from sqlalchemy.sql import ColumnElement

from gateway.errors import BadRequest


@dataclass(frozen=True)
class OrderField:
    """An orderable field: its SQL expression (never NULL) and how to read a cursor value."""

    expression: ColumnElement
    kind: str = "str"  # str | int | datetime


@dataclass
class Collection:
    """A queryable collection of tenant-owned rows."""

    name: str
    base: Callable[[int], Select]  # tenant id -> SELECT with the tenant condition and id column
    id_column: ColumnElement
    filters: dict[str, Callable[[list[str]], ColumnElement]]
    filter_values: dict[str, tuple[str, ...]]
    order_fields: dict[str, OrderField]
    default_order: tuple[tuple[str, bool], ...]  # (field, descending)
    serialize: Callable[[Any, list], list[dict]]  # (connection, rows) -> JSON objects


@dataclass
class ListRequest:
    top: int
    order: list[tuple[str, bool]]
    conditions: list[ColumnElement] = field(default_factory=list)
    fingerprint: str = ""
    after: dict | None = None


def parse_list_args(collection: Collection, args, default_top: int, max_top: int) -> ListRequest:
    """Read ``$top``, ``$orderby``, ``$skiptoken`` and the simple filters from query args."""
    known = {"$top", "$orderby", "$skiptoken"} | set(collection.filters)
    unknown = sorted(set(args) - known)
    if unknown:
        raise BadRequest(f"unknown query parameter '{unknown[0]}'; allowed: {', '.join(sorted(known))}",
                         code="invalidParameter")
    top_text = args.get("$top", str(default_top))
    if not (top_text.isascii() and top_text.isdigit()) or len(top_text) > 6 or not 1 <= int(top_text) <= max_top:
        raise BadRequest(f"'$top' must be a whole number from 1 to {max_top}", code="invalidParameter")
    order = _parse_order(collection, args.get("$orderby"))
    conditions = []
    canonical_filters = []
    for name, build in collection.filters.items():
        raw = args.get(name)
        if raw is None:
            continue
        values = [v.strip() for v in raw.split(",") if v.strip()]
        allowed = collection.filter_values.get(name)
        bad = [v for v in values if allowed and v not in allowed]
        if not values or bad:
            raise BadRequest(f"'{name}' takes a comma-separated list of: {', '.join(allowed or ('values',))}",
                             code="invalidParameter")
        conditions.append(build(values))
        canonical_filters.append(f"{name}={','.join(sorted(values))}")
    fingerprint = hashlib.sha256(
        "|".join([collection.name, repr(order)] + canonical_filters).encode()
    ).hexdigest()[:24]
    return ListRequest(top=int(top_text), order=order, conditions=conditions, fingerprint=fingerprint)


def _parse_order(collection: Collection, text: str | None) -> list[tuple[str, bool]]:
    if not text:
        return list(collection.default_order)
    order = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or words[0] not in collection.order_fields or (
            len(words) == 2 and words[1].lower() not in ("asc", "desc")
        ):
            raise BadRequest(
                f"'$orderby' takes fields of {', '.join(sorted(collection.order_fields))} with asc or desc",
                code="invalidParameter")
        order.append((words[0], len(words) == 2 and words[1].lower() == "desc"))
    if len({name for name, _ in order}) != len(order):
        raise BadRequest("'$orderby' names a field twice", code="invalidParameter")
    return order


def _serializer(secret: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret, salt="gateway.cursor.v1")


def decode_cursor(secret: str, token: str, tenant_id: int, request: ListRequest) -> dict:
    try:
        data = _serializer(secret).loads(token)
    except BadSignature:
        raise BadRequest("'$skiptoken' is not a valid paging token", code="invalidSkipToken") from None
    if not isinstance(data, dict) or data.get("t") != tenant_id or data.get("f") != request.fingerprint:
        raise BadRequest("'$skiptoken' does not belong to this query", code="invalidSkipToken")
    return data


def encode_cursor(secret: str, tenant_id: int, request: ListRequest, values: list, last_id: int) -> str:
    encoded = [v.isoformat() if isinstance(v, datetime) else v for v in values]
    return _serializer(secret).dumps({"t": tenant_id, "f": request.fingerprint, "v": encoded, "id": last_id})


def run_list(conn, collection: Collection, tenant_id: int, request: ListRequest, secret: str,
             skiptoken: str | None) -> tuple[list[dict], str | None]:
    """One page of the collection and the next page's token (None on the last page)."""
    query = collection.base(tenant_id)
    for condition in request.conditions:
        query = query.where(condition)
    expressions = [(collection.order_fields[name], desc) for name, desc in request.order]
    if skiptoken:
        cursor = decode_cursor(secret, skiptoken, tenant_id, request)
        values = cursor.get("v")
        if not isinstance(values, list) or len(values) != len(expressions) or not isinstance(cursor.get("id"), int):
            raise BadRequest("'$skiptoken' is not a valid paging token", code="invalidSkipToken")
        query = query.where(_after(expressions, values, collection.id_column, cursor["id"]))
    order_by = [(f.expression.desc() if desc else f.expression.asc()) for f, desc in expressions]
    last_desc = request.order[-1][1] if request.order else False
    order_by.append(collection.id_column.desc() if last_desc else collection.id_column.asc())
    query = query.add_columns(*[f.expression.label(f"_o{i}") for i, (f, _) in enumerate(expressions)])
    rows = conn.execute(query.order_by(*order_by).limit(request.top + 1)).all()
    more = len(rows) > request.top
    rows = rows[: request.top]
    token = None
    if more and rows:
        last = rows[-1]._mapping
        token = encode_cursor(secret, tenant_id, request,
                              [last[f"_o{i}"] for i in range(len(expressions))], int(last["id"]))
    return collection.serialize(conn, rows), token


def _after(expressions, values, id_column, last_id) -> ColumnElement:
    """Rows strictly after (values, last_id) in the ordering: (a > x) or (a = x and (b > y ...))."""
    parsed = []
    for (order_field, desc), value in zip(expressions, values):
        if order_field.kind == "datetime":
            try:
                value = datetime.fromisoformat(value)
            except (TypeError, ValueError):
                raise BadRequest("'$skiptoken' is not a valid paging token", code="invalidSkipToken") from None
        elif order_field.kind == "int" and not isinstance(value, int):
            raise BadRequest("'$skiptoken' is not a valid paging token", code="invalidSkipToken")
        parsed.append((order_field.expression, desc, value))
    last_desc = expressions[-1][1] if expressions else False
    condition: ColumnElement = id_column < last_id if last_desc else id_column > last_id
    for expression, desc, value in reversed(parsed):
        beyond = expression < value if desc else expression > value
        condition = or_(beyond, and_(expression == value, condition))
    return condition
