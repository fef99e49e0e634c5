"""Console tables on the API's collection layer: the same OData parsing, tenant scope and keyset
cursors (gateway/query.py), and the same bulk export for CSV (gateway/bulk_export.py).

A console filter is a URL parameter (``?severity=high&cve=CVE-2024-3094``) that becomes one
clause of an OData ``$filter`` on the collection's declared fields, so a console view and an API
call with the same filter read the same rows in the same order, and the cursor of the next page
is the API's signed ``$skiptoken`` (carried as ``cursor``).  No page reads more than ``top`` rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import current_app, request, url_for
from werkzeug.datastructures import MultiDict

from gateway import bulk_export
from gateway.console.pages.common import tenant_id
from gateway.errors import BadRequest
from gateway.odata import FilterContext
from gateway.query import Collection, count, parse_list_args, run_list

PAGE_SIZE = 50
MAX_VALUE = 200  # characters of one filter value


def quoted(value: str) -> str:
    """An OData string literal (a quote inside is doubled)."""
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class Filter:
    """One console filter: a URL parameter, its label, and the OData clause a value becomes."""

    param: str
    label: str
    clause: Callable[[str], str]
    choices: tuple[str, ...] = ()


def equals(path: str) -> Callable[[str], str]:
    return lambda value: f"{path} eq {quoted(value)}"


def any_of(path: str, member: str = "") -> Callable[[str], str]:
    """``path/any(x: x[/member] eq 'value')``."""
    target = f"x/{member}" if member else "x"
    return lambda value: f"{path}/any(x: {target} eq {quoted(value)})"


def one_of(*clauses: Callable[[str], str]) -> Callable[[str], str]:
    return lambda value: "(" + " or ".join(clause(value) for clause in clauses) + ")"


@dataclass
class Table:
    """A page of a collection as the console shows it."""

    rows: list[dict]
    next_url: str | None
    first_url: str | None  # back to the first page (keyset paging goes forward only)
    csv_url: str | None
    filters: dict[str, str]
    order: str
    total: int | None = None
    error: str | None = None


def db():
    return current_app.extensions["gateway.db"]


def chosen_filters(filters: tuple[Filter, ...], args=None) -> dict[str, str]:
    """The filters the URL names (blank ones dropped); 400 on a value that is too long or not a choice."""
    args = request.args if args is None else args
    chosen = {}
    for item in filters:
        value = (args.get(item.param) or "").strip()
        if not value:
            continue
        if len(value) > MAX_VALUE:
            raise BadRequest(f"'{item.param}' is longer than {MAX_VALUE} characters", code="invalidParameter")
        if item.choices and value not in item.choices:
            raise BadRequest(f"'{item.param}' is one of {', '.join(item.choices)}", code="invalidParameter")
        chosen[item.param] = value
    return chosen


def odata_args(
    filters: tuple[Filter, ...], chosen: dict[str, str], order: str, top: int, extra_filter: str = ""
) -> MultiDict:
    """The API's query options for the chosen filters (ANDed, with ``extra_filter`` first)."""
    by_param = {item.param: item for item in filters}
    clauses = [extra_filter] if extra_filter else []
    clauses += [by_param[name].clause(value) for name, value in chosen.items()]
    args = MultiDict({"$top": str(top)})
    if clauses:
        args["$filter"] = " and ".join(clauses)
    if order:
        args["$orderby"] = order
    return args


def page(
    collection: Collection,
    tenant_id: int,
    endpoint_url: Callable[..., str],
    filters: tuple[Filter, ...],
    orders: dict[str, str],
    *,
    extra_filter: str = "",
    top: int = PAGE_SIZE,
    with_count: bool = False,
    csv_endpoint_url: Callable[..., str] | None = None,
    cursor_param: str = "cursor",
    sort_param: str | None = "sort",
) -> Table:
    """One page of ``collection`` for the console's URL arguments (filters, ``sort``, ``cursor``).

    ``orders`` maps the console's sort names to ``$orderby`` text (the first is the default).
    ``endpoint_url(**args)`` builds this view's URL with other arguments (for the next page).
    """
    chosen = chosen_filters(filters)
    sort = _sort(orders, sort_param)
    args = odata_args(filters, chosen, orders[sort], top, extra_filter)
    engine = db().engine
    context = FilterContext(tenant_id=tenant_id, dialect=engine.dialect.name)
    list_request = parse_list_args(collection, args, context, top, top)
    cursor = request.args.get(cursor_param) or None
    if collection.prepare is not None:
        with engine.begin() as conn:
            collection.prepare(conn, tenant_id)
    with engine.connect() as conn:
        total = count(conn, collection, tenant_id, list_request) if with_count else None
        rows, token = run_list(
            conn, collection, tenant_id, list_request, current_app.config["SECRET_KEY"], cursor
        )
    shown = dict(chosen)
    if sort_param and sort != next(iter(orders)):
        shown[sort_param] = sort
    return Table(
        rows=rows,
        next_url=endpoint_url(**shown, **{cursor_param: token}) if token else None,
        first_url=endpoint_url(**shown) if cursor else None,
        csv_url=csv_endpoint_url(**shown) if csv_endpoint_url else None,
        filters=chosen,
        order=sort,
        total=total,
    )


def _sort(orders: dict[str, str], sort_param: str | None) -> str:
    """The sort the URL names (the first of ``orders`` by default); 400 on another."""
    sort = (request.args.get(sort_param) if sort_param else None) or next(iter(orders))
    if sort not in orders:
        raise BadRequest(f"'{sort_param}' is one of {', '.join(orders)}", code="invalidParameter")
    return sort



def listing(collection: Collection, tenant: str, filters, orders: dict[str, str]) -> Table:
    """A page's main table: the URL's filters, sort and cursor on ``collection``, with the CSV link
    of exactly what it shows (the page's blueprint serves ``.index`` and ``.export``)."""
    return page(collection, tenant_id(), lambda **a: url_for(".index", tenant=tenant, **a), filters, orders,
                csv_endpoint_url=lambda **a: url_for(".export", tenant=tenant, **a))


def csv_download(
    collection: Collection,
    tenant_id: int,
    filters: tuple[Filter, ...],
    orders: dict[str, str],
    name: str,
    *,
    extra_filter: str = "",
    select: str = "",
):
    """The whole filtered collection as CSV, in the page's order: the API's bulk export, same filter."""
    chosen = chosen_filters(filters)
    sort = _sort(orders, "sort")
    args = odata_args(filters, chosen, orders[sort], 1, extra_filter)
    del args["$top"]
    args["$format"] = "csv"
    if select:
        args["$select"] = select
    engine = db().engine
    context = FilterContext(tenant_id=tenant_id, dialect=engine.dialect.name)
    list_request = parse_list_args(collection, args, context, 1, 1)
    if collection.prepare is not None:
        with engine.begin() as conn:
            collection.prepare(conn, tenant_id)
    return bulk_export.export_response(
        current_app.response_class,
        engine,
        collection,
        tenant_id,
        list_request,
        name,
        current_app.json.default,
    )
