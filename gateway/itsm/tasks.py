"""Celery tasks of the ITSM sync: every remote call of the sync runs here, never in a request.

* ``itsm.scan`` (connection id): numbers the newly committed events (the export outbox's
  sequencer), then the connection's feed -> tickets and queued operations, in one transaction
  holding the connection's row lock; then ``itsm.deliver`` if anything was queued.
* ``itsm.deliver`` (connection id): the queue, in order (gateway/itsm/deliver.py); when the system
  fails, the task sends itself again for when the connection's ``retry_at`` comes.
* ``itsm.poll`` (connection id): inbound sync, the records changed since the connection's watermark
  taken back as the items' customer-owned fields (gateway/itsm/inbound.py).
* ``itsm.tick`` (beat, every ``GATEWAY_ITSM_INTERVAL`` seconds, 30): a scan of every enabled
  connection, and a delivery of every queue with pending work, so that a lost message or a worker
  killed mid-task delays the sync and loses nothing.

A merged batch sends ``itsm.scan`` for its tenant's connections at once (``after_merge``), so a
ticket follows a merge within seconds, not at the next tick.
"""

from __future__ import annotations

import logging

from celery import shared_task
from flask import current_app
from sqlalchemy import select

from gateway.models import Batch, ItsmConnection, ItsmOp, utcnow

from . import sync
from .deliver import Delivery

log = logging.getLogger(__name__)
CN, OP = ItsmConnection.__table__, ItsmOp.__table__
SCAN, DELIVER, TICK, POLL = (
    "gateway.itsm.scan",
    "gateway.itsm.deliver",
    "gateway.itsm.tick",
    "gateway.itsm.poll",
)


def _db():
    return current_app.extensions["gateway.db"]


def scan_connection(db, connection_id: int) -> tuple[int, bool]:
    """One scan of the connection's feed in one transaction: (operations queued, more to read)."""
    with db.engine.begin() as conn:
        query = select(CN).where(CN.c.id == connection_id)
        if db.is_postgres:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None or not row.enabled:
            return 0, False
        return sync.scan(conn, row)


@shared_task(name=SCAN, acks_late=True)
def scan(connection_id: int) -> int:
    from gateway.export.events import sequence_events

    sequence_events(_db())  # the feed reads events by their position in commit order
    total = 0
    for _ in range(100):
        queued, more = scan_connection(_db(), int(connection_id))
        total += queued
        if not more:
            break
    if total:
        send_deliver(int(connection_id))
    return total


@shared_task(name=DELIVER, acks_late=True)
def deliver(connection_id: int) -> str:
    outcome, wait = Delivery(_db(), current_app.config, int(connection_id)).run()
    if outcome == "more":
        send_deliver(int(connection_id))
    elif outcome == "waiting" and wait is not None:
        send_deliver(int(connection_id), countdown=max(0.05, wait))
    return outcome


@shared_task(name=POLL, acks_late=True)
def poll(connection_id: int) -> int:
    """Inbound sync of one connection: its records changed since its watermark (gateway/itsm/inbound.py)."""
    from . import inbound

    return inbound.poll(_db(), current_app.config, int(connection_id))


@shared_task(name=TICK, acks_late=True)
def tick() -> int:
    db, now = _db(), utcnow()
    with db.engine.connect() as conn:
        rows = conn.execute(select(CN.c.id, CN.c.retry_at).where(CN.c.enabled.is_(True))).all()
        pending = set(
            conn.execute(select(OP.c.connection_id).where(OP.c.status == "pending").distinct()).scalars()
        )
    for row in rows:
        send_scan(row.id)
        if row.retry_at is None or row.retry_at <= now:
            send_poll(row.id)
        if row.id in pending and (row.retry_at is None or row.retry_at <= now):
            send_deliver(row.id)
    return len(rows)


def send_scan(connection_id: int) -> None:
    try:
        scan.apply_async(args=[connection_id])
    except Exception:  # noqa: BLE001 - the tick sends it again
        log.warning("could not send the ITSM scan of connection %s", connection_id, exc_info=True)


def send_poll(connection_id: int) -> None:
    try:
        poll.apply_async(args=[connection_id])
    except Exception:  # noqa: BLE001 - the tick sends it again
        log.warning("could not send the ITSM poll of connection %s", connection_id, exc_info=True)


def send_deliver(connection_id: int, countdown: float | None = None) -> None:
    try:
        deliver.apply_async(args=[connection_id], countdown=countdown)
    except Exception:  # noqa: BLE001 - the tick sends it again
        log.warning("could not send the ITSM delivery of connection %s", connection_id, exc_info=True)


def after_merge(db, batch_id: int) -> None:
    """A batch merged: scan the feeds of its tenant's connections now (never fails the merge)."""
    try:
        with db.engine.connect() as conn:
            tenant_id = conn.execute(
                select(Batch.__table__.c.tenant_id).where(Batch.__table__.c.id == batch_id)
            ).scalar()
            ids = (
                conn.execute(select(CN.c.id).where(CN.c.tenant_id == tenant_id, CN.c.enabled.is_(True)))
                .scalars()
                .all()
            )
    except Exception:  # noqa: BLE001
        log.warning("could not read the ITSM connections after batch %s", batch_id, exc_info=True)
        return
    for connection_id in ids:
        send_scan(connection_id)
