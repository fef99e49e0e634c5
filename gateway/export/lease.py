"""Leases on rows worked by one task at a time (destinations, snapshot jobs, automation rules).

A row has ``lease_owner`` and ``lease_expires_at``.  A task takes the lease when it is free, its
own, or expired (a worker died holding it), in one UPDATE that also checks the row is workable now
(``conditions``); it renews it as it goes and frees it when done.  A second task for the same row
finds it held and returns, which keeps the row's work in order and makes running a task twice
harmless.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import Table, or_, update
from sqlalchemy.sql import ColumnElement

log = logging.getLogger(__name__)


def claim(
    db, table: Table, row_id: int, owner: str, now: datetime, seconds: int, *conditions, **values
) -> bool:
    """Take the lease of row ``row_id`` for ``seconds`` when it is free and ``conditions`` hold."""
    with db.engine.begin() as conn:
        return bool(
            conn.execute(
                update(table)
                .where(
                    table.c.id == row_id,
                    *conditions,
                    or_(
                        table.c.lease_owner.is_(None),
                        table.c.lease_owner == owner,
                        table.c.lease_expires_at <= now,
                    ),
                )
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=seconds), **values)
            ).rowcount
        )


def release(db, table: Table, row_id: int, owner: str) -> None:
    """Free the lease if it is still ``owner``'s (it expires anyway when this fails)."""
    try:
        with db.engine.begin() as conn:
            conn.execute(
                update(table)
                .where(table.c.id == row_id, table.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )
    except Exception:  # noqa: BLE001 - the lease expires anyway
        log.warning("%s %s: lease not released", table.name, row_id, exc_info=True)


def due(table: Table, now: datetime) -> ColumnElement:
    """Past its backoff (``next_attempt_at``)."""
    return or_(table.c.next_attempt_at.is_(None), table.c.next_attempt_at <= now)


def free(table: Table, now: datetime) -> ColumnElement:
    """Nobody holds the lease (or it expired)."""
    return or_(table.c.lease_owner.is_(None), table.c.lease_expires_at <= now)


def to_enqueue(table: Table, now: datetime, seconds: int) -> tuple[ColumnElement, ...]:
    """A row a beat task may enqueue a task for now: due, free, and not enqueued within a lease's time
    (``enqueued_at``: a task already waits in the queue)."""
    stale = now - timedelta(seconds=seconds)
    return due(table, now), free(table, now), or_(table.c.enqueued_at.is_(None), table.c.enqueued_at <= stale)
