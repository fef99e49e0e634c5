"""Two time expressions that read the same on PostgreSQL and SQLite (the rules' SQL uses them)."""

from __future__ import annotations

from sqlalchemy import Float, Integer
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from gateway.models import UTCDateTime


class epoch(FunctionElement):  # noqa: N801 - a SQL function
    """Seconds since 1970 of a timestamp."""

    type = Float()
    inherit_cache = True


@compiles(epoch, "postgresql")
def _epoch_pg(element, compiler, **kw) -> str:
    return f"extract(epoch from {compiler.process(element.clauses, **kw)})"


@compiles(epoch)
def _epoch_default(element, compiler, **kw) -> str:
    return f"CAST(strftime('%s', {compiler.process(element.clauses, **kw)}) AS INTEGER)"


class minus_minutes(FunctionElement):  # noqa: N801 - a SQL function
    """A timestamp ``minutes`` earlier (``minutes`` is a rule's whole number, written into the SQL)."""

    type = UTCDateTime()
    inherit_cache = False

    def __init__(self, column, minutes: int) -> None:
        self.minutes = int(minutes)
        super().__init__(column)


@compiles(minus_minutes, "postgresql")
def _minus_pg(element, compiler, **kw) -> str:
    return f"({compiler.process(element.clauses, **kw)} - interval '{element.minutes} minutes')"


@compiles(minus_minutes)
def _minus_default(element, compiler, **kw) -> str:
    # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff': the same shape compares as text
    return (
        f"(strftime('%Y-%m-%d %H:%M:%f', {compiler.process(element.clauses, **kw)}, "
        f"'-{element.minutes} minutes') || '000')"
    )


class bucket(FunctionElement):  # noqa: N801 - a SQL function
    """The number of the ``minutes``-long window a timestamp falls in (0 when ``minutes`` is 0)."""

    type = Integer()
    inherit_cache = False

    def __init__(self, column, minutes: int) -> None:
        self.seconds = max(0, int(minutes)) * 60
        super().__init__(column)


@compiles(bucket, "postgresql")
def _bucket_pg(element, compiler, **kw) -> str:
    if not element.seconds:
        return "0"
    column = compiler.process(element.clauses, **kw)
    return f"CAST(floor(extract(epoch from {column}) / {element.seconds}) AS bigint)"


@compiles(bucket)
def _bucket_default(element, compiler, **kw) -> str:
    if not element.seconds:
        return "0"
    return f"(CAST(strftime('%s', {compiler.process(element.clauses, **kw)}) AS INTEGER) / {element.seconds})"
