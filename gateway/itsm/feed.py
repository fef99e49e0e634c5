"""Which items changed: a per-connection watermark over ``lifecycle_events``.

This is a small, isolated reader that the general outbox (issue 13: ``lifecycle_events`` with a
per-destination cursor) will replace; its whole interface is :func:`start` and :func:`read`, and
what a connection keeps of it is one JSON value (``itsm_connections.feed_state``).

**Ids commit out of order on PostgreSQL.**  Two merges take ids from one sequence and commit in
either order, so "every event with id > watermark" misses the rows of a transaction that took
smaller ids and committed later.  The reader therefore keeps *gaps*: ids below the new watermark
that it did not see.  Each read looks again at the gaps (an event that filled one is processed
then) and forgets a gap only when no transaction that could still fill it is running: one of this
database, holding a transaction id, begun before the gap was first seen (``pg_stat_activity``; a
sequence value is taken inside the transaction that inserts it, so a later transaction cannot fill
an older gap).  A rolled-back insert leaves a permanent gap, which goes the same way.  Gaps older
than ``GAP_MAX_AGE`` are dropped whatever happens (the database role cannot see other roles'
sessions without ``pg_read_all_stats``; give it that role, or run every writer as one role).
SQLite has one writer at a time and assigns ids at commit order, so it has no such gaps.

Processing of what is read must be idempotent (gateway/itsm/sync.py is: tickets, items and queued
operations are unique rows, and a re-read event finds its work done); the watermark moves in the
same transaction as that processing.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, text

from gateway.models import LifecycleEvent, utcnow

EV = LifecycleEvent.__table__
SUBJECTS = ("finding", "recommendation", "alert")
GAP_MAX_AGE = timedelta(hours=1)
MAX_GAPS = 1000  # ranges; beyond it the oldest are given up (logged by the caller)


def start(conn) -> dict:
    """The state of a new connection's feed: from now on (earlier changes are not its business)."""
    top = conn.execute(select(func.max(EV.c.id))).scalar()
    return {"watermark": int(top or 0), "gaps": []}


def _db_now(conn) -> datetime:
    if conn.dialect.name == "postgresql":
        return conn.execute(text("SELECT clock_timestamp()")).scalar()
    return utcnow()


def _oldest_writer(conn) -> datetime | None:
    """When the oldest other writing transaction of this database began (None: there is none)."""
    return conn.execute(
        text(
            "SELECT min(xact_start) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL"
        )
    ).scalar()


def read(conn, tenant_id: int, state: dict | None, limit: int = 5000) -> tuple[list, dict, bool]:
    """(the tenant's events to process, the new state, whether more may follow at once)."""
    state = dict(state or start(conn))
    watermark = int(state.get("watermark") or 0)
    gaps = [list(gap) for gap in state.get("gaps") or []]
    postgres = conn.dialect.name == "postgresql"
    now = _db_now(conn)
    # gaps that nobody can fill any more: looked at once more below, then forgotten
    final: set[int] = set()
    if gaps:
        if postgres:
            oldest = _oldest_writer(conn)
        for index, (_low, _high, seen) in enumerate(gaps):
            first_seen = datetime.fromisoformat(seen)
            if not postgres or oldest is None or oldest > first_seen or now - first_seen > GAP_MAX_AGE:
                final.add(index)
    ids = (
        conn.execute(select(EV.c.id).where(EV.c.id > watermark).order_by(EV.c.id).limit(limit))
        .scalars()
        .all()
    )
    more = len(ids) == limit
    top = ids[-1] if ids else watermark
    expected = watermark + 1
    for value in ids:
        if value > expected and postgres:
            gaps.append([expected, value - 1, now.isoformat()])
        expected = value + 1
    ranges = [and_(EV.c.id >= low, EV.c.id <= high) for low, high, _ in gaps]
    window = and_(EV.c.id > watermark, EV.c.id <= top)
    events = conn.execute(
        select(EV)
        .where(EV.c.tenant_id == tenant_id, EV.c.subject_type.in_(SUBJECTS), or_(window, *ranges))
        .order_by(EV.c.id)
    ).all()
    # what is left of the gaps: the ids still missing, unless final
    kept = []
    old = len(state.get("gaps") or [])
    for index, (low, high, seen) in enumerate(gaps):
        if index < old and index in final:
            continue
        present = (
            sorted(conn.execute(select(EV.c.id).where(EV.c.id >= low, EV.c.id <= high)).scalars())
            if index < old
            else []
        )
        cursor = low
        for value in present + [high + 1]:
            if value > cursor:
                kept.append([cursor, value - 1, seen])
            cursor = value + 1
    kept = kept[-MAX_GAPS:]
    return events, {"watermark": int(top), "gaps": kept}, more
