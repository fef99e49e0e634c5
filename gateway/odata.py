"""OData ``$filter`` and ``$select`` for the collection layer.

The filter text is parsed by the maintained ``odata-query`` grammar; this module walks its
syntax tree and builds SQLAlchemy Core expressions from the fields a collection declares,
and from nothing else: no SQL is ever built from text, an unknown name is a 400, and the
result is only ever ANDed to the tenant's query.  Every expression built here is two-valued
(a NULL column never turns a condition into SQL's unknown), so ``not`` and ``ne`` keep
OData's meaning: ``assignedTo ne 'sam'`` includes the alerts nobody is assigned to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time
from typing import Any

from odata_query import ast
from odata_query import exceptions as odata_errors
from odata_query.grammar import ODataLexer, ODataParser
from odata_query.roundtrip import AstToODataVisitor
from sqlalchemy import Select, String, and_, false, func, literal, not_, or_, select, true, type_coerce
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.util import find_tables

from gateway.errors import BadRequest

MAX_FILTER_LENGTH = 4000
TEXT_FUNCTIONS = ("contains", "startswith", "endswith")
_ORDERING = (ast.Gt, ast.GtE, ast.Lt, ast.LtE)


@dataclass(frozen=True)
class Field:
    """A filterable value: its SQL expression and its OData type.

    ``type`` is ``string``, ``enum`` (``values`` allowed; with ``rank``, ``gt``/``lt`` compare
    the position in ``values``), ``id`` (a decimal id, given as ``'42'`` or ``42``),
    ``number``, ``datetime`` or ``bool`` (``true``/``false``).
    """

    expression: ColumnElement
    type: str = "string"
    nullable: bool = False
    values: tuple[str, ...] = ()
    rank: ColumnElement | None = None


@dataclass(frozen=True)
class ListField:
    """A collection-valued field, filtered with ``any()`` and ``all()``.

    ``rows(context)`` gives a fresh FROM clause of the elements and the condition tying them to
    the outer row and the tenant: the lambda becomes an EXISTS subquery.  The lambda variable is
    either a value (``element(rows)``, e.g. ``tags/any(t: t eq 'pci')``) or an object with fields
    (``members(rows)``, e.g. ``sources/any(s: s/provider eq 'Tenable')``).  Without ``rows`` the
    list is one nullable column of the outer row (``element(None)``): empty when it is NULL.
    """

    element: Callable[[Any], Field] | None = None
    members: Callable[[Any], dict[str, Field]] | None = None
    rows: Callable[[FilterContext], tuple[Any, ColumnElement]] | None = None
    # ``owner(rows, context)``: the element column holding its owner's id, and the condition that
    # scopes the elements to the tenant (``rows``' link without the tie to the outer row).  A
    # ``$count`` whose whole filter is one ``any()`` of the field then counts the distinct owners
    # of the matching elements, from the elements alone (``ParsedFilter.owners``).  Declare it
    # only where every element in that scope belongs to a row of the collection.
    owner: Callable[[Any, FilterContext], tuple[ColumnElement, ColumnElement]] | None = None


@dataclass(frozen=True)
class FilterContext:
    tenant_id: int
    dialect: str  # "postgresql" | "sqlite"


@dataclass
class ParsedFilter:
    condition: ColumnElement
    canonical: str  # the filter re-rendered from its syntax tree (for the paging fingerprint)
    # When the whole filter is one any() of a list field with an ``owner`` and its lambda names
    # the elements only: the owners' ids of the matching elements (a SELECT of one column, with
    # repeats), whose distinct count is the filter's count.
    owners: Select | None = None


class _Invalid(Exception):
    def __init__(self, message: str, token: str) -> None:
        super().__init__(message)
        self.message = message
        self.token = token


MAX_CONDITION_DEPTH = 64  # and/or/not nesting of a $filter
MAX_LAMBDA_DEPTH = 3  # any()/all() inside any()/all()


def _render(node: Any) -> str:
    try:
        return AstToODataVisitor().visit(node)
    except Exception:  # noqa: BLE001 - only used to quote the user's own input back
        return type(node).__name__


def _bad(message: str, position: int | None = None) -> BadRequest:
    at = "" if position is None else f" at position {position}"
    return BadRequest(f"invalid $filter{at}: {message}", code="invalidFilter")


def parse_filter(text: str, fields: dict[str, Field | ListField], context: FilterContext) -> ParsedFilter:
    """The SQL condition of an OData ``$filter``; ``400 invalidFilter`` naming the token and position."""
    if len(text) > MAX_FILTER_LENGTH:
        raise _bad(f"longer than {MAX_FILTER_LENGTH} characters")
    if not text.strip():
        raise _bad("empty")
    try:
        tree = ODataParser().parse(ODataLexer().tokenize(text))
    except odata_errors.TokenizingException as exc:
        raise _bad(f"unexpected {str(exc.token.value)[:40]}", exc.token.index) from None
    except odata_errors.ParsingException as exc:
        if exc.token is None or exc.eof:
            raise _bad("unexpected end", len(text)) from None
        shown = "whitespace" if not str(exc.token.value).strip() else str(exc.token.value)[:40]
        raise _bad(f"unexpected {shown}", exc.token.index) from None
    except odata_errors.FunctionCallException as exc:
        name = getattr(exc, "function_name", "")
        raise _bad(str(exc)[:200], max(text.find(name), 0)) from None
    except odata_errors.ODataException as exc:
        raise _bad(str(exc)[:200]) from None
    except RecursionError:
        raise _bad("nested too deeply") from None
    if tree is None:
        raise _bad("empty")
    translator = _Translator(fields, context)
    try:
        condition = translator.condition(tree)
    except _Invalid as exc:
        where = text.find(exc.token)
        at = f" at position {where}" if where >= 0 else ""
        raise BadRequest(f"invalid $filter{at} ({exc.token[:60]}): {exc.message}",
                         code="invalidFilter") from None
    except RecursionError:
        raise _bad("nested too deeply") from None
    return ParsedFilter(condition=condition, canonical=_render(tree), owners=translator.owners.get(id(tree)))


def parse_select(text: str, selectable: tuple[str, ...]) -> tuple[str, ...]:
    """The fields named by ``$select`` (plus ``id``), in the collection's field order."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        if name not in selectable:
            shown = f"unknown field '{name[:60]}'" if name else "an empty field name"
            raise BadRequest(f"'$select' names {shown}; selectable fields: {', '.join(selectable)}",
                             code="invalidParameter")
    wanted = set(names) | {"id"}
    return tuple(name for name in selectable if name in wanted)


class _Translator:
    """Walks one filter's syntax tree; ``scopes`` holds the lambda variables in reach."""

    def __init__(self, fields: dict[str, Field | ListField], context: FilterContext) -> None:
        self.fields = fields
        self.context = context
        self.scopes: list[tuple[str, Field | dict[str, Field]]] = []
        self.depth = 0
        self.owners: dict[int, Select] = {}  # id of an any() node -> its owners (ParsedFilter.owners)

    # -- conditions ----------------------------------------------------------------------------

    def condition(self, node: Any) -> ColumnElement:
        # Bounded here, not by Python's recursion limit: SQLAlchemy compiles the condition
        # recursively later, where a RecursionError would no longer be the caller's 400.
        self.depth += 1
        try:
            if self.depth > MAX_CONDITION_DEPTH:
                raise _Invalid(f"conditions nest deeper than {MAX_CONDITION_DEPTH} levels", _render(node)[:60])
            return self._condition(node)
        finally:
            self.depth -= 1

    def _condition(self, node: Any) -> ColumnElement:
        if isinstance(node, ast.BoolOp):
            # A chain of one operator (a or b or c ...) is one flat SQL condition and one level.
            kind, operands, pending = type(node.op), [], [node]
            while pending:
                item = pending.pop()
                if isinstance(item, ast.BoolOp) and isinstance(item.op, kind):
                    pending.extend((item.right, item.left))
                else:
                    operands.append(item)
            parts = [self.condition(operand) for operand in operands]
            return and_(*parts) if kind is ast.And else or_(*parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not_(self.condition(node.operand))
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.CollectionLambda):
            return self.collection(node)
        if isinstance(node, ast.Boolean):
            return true() if node.py_val else false()
        raise _Invalid("expected a condition", _render(node))

    def compare(self, node: ast.Compare) -> ColumnElement:
        op = node.comparator
        if isinstance(node.left, ast.Call) and isinstance(node.right, ast.Boolean) and isinstance(
                op, (ast.Eq, ast.NotEq)):
            matched = self.call(node.left)
            return matched if node.right.py_val == isinstance(op, ast.Eq) else not_(matched)
        name, spec = self.field(node.left)
        column = spec.expression
        if isinstance(op, ast.In):
            if not isinstance(node.right, ast.List) or not node.right.val:
                raise _Invalid("'in' takes a parenthesized list of values", _render(node.right))
            values = [self.value(name, spec, item) for item in node.right.val]
            return self.guard(spec, column.in_(values))
        if isinstance(node.right, ast.Null):
            if isinstance(op, ast.Eq):
                return column.is_(None) if spec.nullable else false()
            if isinstance(op, ast.NotEq):
                return column.is_not(None) if spec.nullable else true()
            raise _Invalid("null can only be compared with eq or ne", _render(node))
        value = self.value(name, spec, node.right)
        if isinstance(op, _ORDERING) and spec.rank is not None:
            column, value = spec.rank, spec.values.index(value)
        if isinstance(op, ast.NotEq):
            return or_(column.is_(None), column != value) if spec.nullable else column != value
        compared = {ast.Eq: column.__eq__, ast.Gt: column.__gt__, ast.GtE: column.__ge__,
                    ast.Lt: column.__lt__, ast.LtE: column.__le__}[type(op)](value)
        return self.guard(spec, compared)

    def call(self, node: ast.Call) -> ColumnElement:
        function = node.func.name
        if function not in TEXT_FUNCTIONS or node.func.namespace:
            raise _Invalid(f"unsupported function; supported: {', '.join(TEXT_FUNCTIONS)}",
                           node.func.full_name())
        if len(node.args) != 2 or not isinstance(node.args[1], ast.String):
            raise _Invalid(f"{function} takes a field and a string", _render(node))
        name, spec = self.field(node.args[0])
        if spec.type not in ("string", "enum"):
            raise _Invalid(f"{function} needs a text field, '{name}' is {spec.type}", name)
        return self.guard(spec, self.text_match(function, spec.expression, node.args[1].val))

    def text_match(self, function: str, column: ColumnElement, needle: str) -> ColumnElement:
        """Case-sensitive, like OData; SQLite's LIKE ignores ASCII case, so it compares substrings."""
        if self.context.dialect == "postgresql":
            text = type_coerce(column, String)
            match = {"contains": text.contains, "startswith": text.startswith, "endswith": text.endswith}
            return match[function](needle, autoescape=True)
        if not needle:
            return true()
        if function == "contains":
            return func.instr(column, needle) > 0
        if function == "startswith":
            return func.substr(column, 1, len(needle)) == needle
        return func.substr(column, -len(needle)) == needle

    def collection(self, node: ast.CollectionLambda) -> ColumnElement:
        owner = _path(node.owner)
        spec = self.fields.get(owner) if owner is not None else None
        if not isinstance(spec, ListField):
            raise _Invalid("any() and all() apply to collection fields only; collection fields: "
                           + ", ".join(n for n, f in self.fields.items() if isinstance(f, ListField)),
                           owner or _render(node.owner))
        if len(self.scopes) >= MAX_LAMBDA_DEPTH:
            raise _Invalid(f"any() and all() nest at most {MAX_LAMBDA_DEPTH} levels deep", owner)
        every = isinstance(node.operator, ast.All)
        rows, link = spec.rows(self.context) if spec.rows else (None, None)
        variable = spec.element(rows) if spec.element else spec.members(rows)
        if node.lambda_ is None:
            if every:
                raise _Invalid("all() needs a condition", owner)
            matched = true()
        else:
            name = node.lambda_.identifier.name
            if name in self.fields or node.lambda_.identifier.namespace:
                raise _Invalid("the lambda variable must not be a field name",
                               node.lambda_.identifier.full_name())
            self.scopes.append((name, variable))
            try:
                matched = self.condition(node.lambda_.expression)
            finally:
                self.scopes.pop()
        if rows is None:  # an inline column: one value, or none when NULL
            present = variable.expression.is_not(None)
            return or_(not_(present), matched) if every else and_(present, matched)
        if every:
            return not_(select(literal(1)).select_from(rows).where(link, not_(matched)).exists())
        named = set(find_tables(matched, check_columns=True, include_aliases=True))
        if spec.owner is not None and named <= {rows}:  # the lambda names the elements only
            owner, scope = spec.owner(rows, self.context)
            self.owners[id(node)] = select(owner).select_from(rows).where(scope, matched)
        return select(literal(1)).select_from(rows).where(link, matched).exists()

    # -- operands ------------------------------------------------------------------------------

    def field(self, node: Any) -> tuple[str, Field]:
        path = _path(node)
        if path is None:
            raise _Invalid("expected a field name", _render(node))
        head, _, rest = path.partition("/")
        for name, variable in reversed(self.scopes):
            if head != name:
                continue
            if isinstance(variable, Field):
                if rest:
                    raise _Invalid(f"'{name}' is a value and has no fields", path)
                return path, variable
            if rest not in variable:
                raise _Invalid(f"unknown field; fields of '{name}': {', '.join(variable)}", path)
            return path, variable[rest]
        spec = self.fields.get(path)
        if spec is None:
            raise _Invalid("unknown field; filterable fields: " + ", ".join(self.fields), path)
        if isinstance(spec, ListField):
            raise _Invalid(f"'{path}' is a collection: use {path}/any(...)", path)
        return path, spec

    def value(self, name: str, spec: Field, node: Any) -> Any:
        shown = _render(node)
        if spec.type in ("string", "enum"):
            if not isinstance(node, ast.String):
                raise _Invalid(f"'{name}' takes a quoted string", shown)
            if spec.type == "enum" and node.val not in spec.values:
                raise _Invalid(f"'{name}' is one of {', '.join(spec.values)}", shown)
            return node.val
        if spec.type == "bool":
            if not isinstance(node, ast.Boolean):
                raise _Invalid(f"'{name}' takes true or false", shown)
            return bool(node.py_val)
        if spec.type == "id":
            text = node.val if isinstance(node, (ast.String, ast.Integer)) else ""
            if not (text.isascii() and text.isdigit()) or len(text) > 18:
                raise _Invalid(f"'{name}' takes an id such as '42'", shown)
            return int(text)
        if spec.type == "number":
            if not isinstance(node, (ast.Integer, ast.Float)) or not math.isfinite(float(node.val)):
                raise _Invalid(f"'{name}' takes a number", shown)
            return float(node.val)
        if spec.type == "datetime":
            try:
                if isinstance(node, ast.DateTime):
                    moment = node.py_val
                    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
                if isinstance(node, ast.Date):
                    return datetime.combine(node.py_val, time(), UTC)
            except ValueError:
                pass
            raise _Invalid(f"'{name}' takes a date-time such as 2024-04-01T00:00:00Z", shown)
        raise AssertionError(spec.type)

    @staticmethod
    def guard(spec: Field, condition: ColumnElement) -> ColumnElement:
        """False rather than unknown when the column is NULL."""
        return and_(spec.expression.is_not(None), condition) if spec.nullable else condition


def _path(node: Any) -> str | None:
    """``a/b/c`` for an identifier or a property path, else None."""
    if isinstance(node, ast.Identifier):
        return None if node.namespace else node.name
    if isinstance(node, ast.Attribute):
        owner = _path(node.owner)
        return None if owner is None else f"{owner}/{node.attr}"
    return None


def json_elements(column: ColumnElement) -> Callable[[FilterContext], tuple[Any, ColumnElement]]:
    """``rows`` of a JSON array column of strings (a list field over its elements)."""

    def rows(context: FilterContext) -> tuple[Any, ColumnElement]:
        function = func.jsonb_array_elements_text if context.dialect == "postgresql" else func.json_each
        return function(column).table_valued("value"), true()

    return rows


def json_element(rows: Any) -> Field:
    return Field(rows.c.value)


__all__ = ["Field", "FilterContext", "ListField", "ParsedFilter", "json_element", "json_elements",
           "parse_filter",
           "parse_select"]
