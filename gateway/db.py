"""The SQL store: engine and sessions, for PostgreSQL (production) and SQLite (embedded)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain postgresql:// URLs."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str) -> Engine:
    """An engine with the settings each backend needs."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:
            # A writer takes the write lock at BEGIN, so two writers queue instead of
            # deadlocking; a read-only request begins deferred and, with WAL, reads alongside a
            # merge that holds the write lock.  A request waits for the lock only briefly (the
            # caller gets 503 + Retry-After), a worker a minute.
            reading = True if conn.get_execution_options().get("read_only") else _read_only_request()
            busy_ms = SQLITE_WORKER_BUSY_MS if reading is None else SQLITE_REQUEST_BUSY_MS
            if conn.connection.info.get("busy_ms") != busy_ms:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={busy_ms}")
                conn.connection.info["busy_ms"] = busy_ms
            conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

        _sqlite_isolation(engine)
        return engine
    # No server-side prepared statements: psycopg prepares a statement run five times, and
    # PostgreSQL may then plan it generically, blind to the array parameters the merge
    # passes (``= ANY(:ids)`` over a chunk's 5,000 ids): a generic plan compares every
    # stored row with every element, seconds per chunk once a tenant holds 100,000
    # sources.  A custom plan per statement costs well under a millisecond.
    # No JIT compilation in the gateway's sessions (``jit = off`` as a connection option; a
    # statement or a database setting can still turn it on): the merge's statements are keyed
    # lookups and set-based writes of a chunk whose cost estimates grow with the store (5,000
    # keys times the rows a key is guessed to match) past ``jit_above_cost`` while they run in
    # milliseconds, so PostgreSQL compiled them for 100-300 ms each, in a store of millions
    # (README, issue 14: the recommendations' aggregate spent a third of its time compiling).
    # bulk_export and the detection engine turned it off for their statements already.
    # A pool that keeps every connection it opened (up to 15, as 5 plus 10 overflow did): with 8
    # request threads a process checked out more than 5 at once under load, and each overflow
    # connection was closed on its return and opened again on the next peak (103 connections in a
    # run of 1,000 small pushes, each a PostgreSQL backend started and a login).  Connections are
    # opened as they are first needed, so a process with few threads still holds few.
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=0,
                           connect_args={"prepare_threshold": None, "options": _options(url)})
    _ping_when_idle(engine)
    return engine


POOL_SIZE = 15
# A connection back in the pool for longer than this is pinged on its next checkout; one used
# more recently is handed out as it is (see _ping_when_idle).
PING_AFTER_IDLE_SECONDS = 1.0


def binary_cursor(conn):
    """A cursor of a SQLAlchemy connection's psycopg connection that takes results in binary: a
    ``bytea`` comes as its bytes, not as the hex text the server encodes (twice the size) and the
    client decodes (a stored body's 60 MiB cost PostgreSQL about a second as hex, a quarter of it
    in binary).  PostgreSQL only."""
    return conn.connection.driver_connection.cursor(binary=True)


def _ping_when_idle(engine: Engine) -> None:
    """The pool's pessimistic disconnect check, for connections that sat idle a while only.

    ``pool_pre_ping`` pings on every checkout: a round trip to the server before each
    transaction, 12% of a small push's time in the API process (README, issue 14).  A connection
    returned less than :data:`PING_AFTER_IDLE_SECONDS` ago was working then, so it is handed out
    unpinged; an older one is pinged, and a dead one (a restarted server, a backend ended by
    ``pg_terminate_backend`` or an idle timeout, a dropped link) raises ``DisconnectionError``,
    on which the pool discards it and checks out another, opening a fresh one if need be (up to
    three tries): the request does not see it.  What is left is a connection that dies within
    a second of being used: its statement fails, as any connection lost mid-statement does, and
    the pool then drops every connection opened before that moment."""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection, record) -> None:
        if record is not None:
            record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection, record, _proxy) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < PING_AFTER_IDLE_SECONDS:
            return  # just opened, or used a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # noqa: BLE001 - the dialect says whether it is a disconnect
            if not engine.dialect.is_disconnect(exc, dbapi_connection, None):
                raise
            alive = False
        if not alive:
            raise DisconnectionError("the connection was lost while idle in the pool")


NO_JIT = "-c jit=off"


def _options(url: str) -> str:
    """The connection's ``options``: the URL's own (``?options=...``), then ``jit = off``."""
    given = make_url(url).query.get("options")
    if isinstance(given, tuple):
        given = " ".join(given)
    return f"{NO_JIT} {given}" if given else NO_JIT


SQLITE_WORKER_BUSY_MS = 60_000
SQLITE_REQUEST_BUSY_MS = 3_000
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _read_only_request() -> bool | None:
    """True in a GET/HEAD request, False in another request, None outside any request."""
    try:
        from flask import has_request_context, request
    except ImportError:  # pragma: no cover - flask is a dependency
        return None
    if not has_request_context():
        return None
    return request.method in READ_METHODS


def _sqlite_isolation(engine: Engine) -> None:
    """Let SQLAlchemy's BEGIN IMMEDIATE replace pysqlite's own transaction handling."""

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None


class Database:
    """Holds the engine and the session factory of one application."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # For work outside a request that only reads (SQLite: a deferred BEGIN, which reads
        # alongside a merge's write instead of queueing behind it).
        self.reader = self.engine.execution_options(read_only=True)
        self.read_sessions = sessionmaker(self.reader, expire_on_commit=False)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        session = self.sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        # a statistics round (gateway/statistics.py) may still be using this store: let it end first,
        # else it checks a connection out of the fresh pool dispose leaves, and nothing closes that one
        from gateway.statistics import wait_for_analysis

        wait_for_analysis(timeout=120)
        self.engine.dispose()
