"""Which items changed: a per-connection cursor over the export outbox (``lifecycle_events.seq``).

A connection keeps one JSON value (``itsm_connections.feed_state``): ``{"seq": N}``, the position
in commit order of the last event it processed, exactly as an export destination keeps its
``cursor_seq`` (gateway/export/delivery.py).  Events get their ``seq`` after they commit, from the
sequencer (gateway/export/events.py, :func:`sequence_events`; the ITSM scan runs it before it
reads), so ``seq > N`` never skips an event that committed after a later id: that is the
sequencer's whole point, and why this reader keeps no gaps of its own.

Processing of what is read must be idempotent (gateway/itsm/sync.py is: tickets, items and queued
operations are unique rows, and a re-read event finds its work done); the cursor moves in the same
transaction as that processing.

**Old states.**  A connection made before this reader kept ``{"watermark": id, "gaps": [[low,
high, seen], ...]}``: every event up to the watermark and outside the gaps processed.  It is read
as the cursor just before the first sequenced event it had not processed (so an event can be read
twice, never missed), and stored as ``{"seq": N}`` by the scan that reads it.
"""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select

from gateway.models import LifecycleEvent

EV = LifecycleEvent.__table__
SUBJECTS = ("finding", "recommendation", "alert")


def start(conn) -> dict:
    """The state of a new connection's feed: from now on (earlier changes are not its business)."""
    top = conn.execute(select(func.max(EV.c.seq))).scalar()
    return {"seq": int(top or 0)}


def cursor(conn, state: dict | None) -> int:
    """The position a stored state stands for (converting the old watermark-and-gaps form)."""
    if not state:
        return start(conn)["seq"]
    if "seq" in state:
        return int(state["seq"] or 0)
    watermark = int(state.get("watermark") or 0)
    unread = [EV.c.id > watermark] + [
        and_(EV.c.id >= int(low), EV.c.id <= int(high)) for low, high, *_ in state.get("gaps") or []
    ]
    first = conn.execute(select(func.min(EV.c.seq)).where(EV.c.seq.is_not(None), or_(*unread))).scalar()
    if first is not None:
        return int(first) - 1
    return int(conn.execute(select(func.max(EV.c.seq))).scalar() or 0)


def read(conn, tenant_id: int, state: dict | None, limit: int = 5000) -> tuple[list, dict, bool]:
    """(the tenant's item events after the cursor, in commit order; the new state; whether more may
    follow at once).  The cursor passes the tenant's other events too, so they are read once."""
    position = cursor(conn, state)
    rows = conn.execute(
        select(EV)
        .where(EV.c.tenant_id == tenant_id, EV.c.seq.is_not(None), EV.c.seq > position)
        .order_by(EV.c.seq)
        .limit(limit)
    ).all()
    more = len(rows) == limit
    top = rows[-1].seq if rows else position
    return [row for row in rows if row.subject_type in SUBJECTS], {"seq": int(top)}, more
