"""The beat's threat-intelligence work (tasks in workers/intel_tasks.py): prune expired indicators,
sweep recent indicators for matches two concurrent merges missed, pull the TAXII feeds that are due."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from gateway.intel import matching
from gateway.models import Indicator, utcnow

log = logging.getLogger(__name__)
IND = Indicator.__table__
PRUNE_SLICE = 10_000


def prune_expired(db, now: datetime | None = None) -> int:
    """Delete the indicators whose expiry has passed (their matches go with them), a slice of ids per
    statement and transaction; how many."""
    now = now or utcnow()
    total = 0
    while True:
        with db.engine.begin() as conn:
            ids = select(IND.c.id).where(IND.c.expires_at <= now).order_by(IND.c.id).limit(PRUNE_SLICE)
            deleted = conn.execute(delete(IND).where(IND.c.id.in_(ids.scalar_subquery()))).rowcount
        total += deleted
        if deleted < PRUNE_SLICE:
            if total:
                log.info("pruned %d expired indicators", total)
            return total


def sweep_recent(db, window_seconds: int, now: datetime | None = None) -> int:
    """Match again the indicators changed within the window, tenant by tenant; the new matches."""
    now = now or utcnow()
    since = now - timedelta(seconds=window_seconds)
    with db.engine.connect() as conn:
        tenants = matching.recent_tenants(conn, since)
    found = 0
    for tenant_id in tenants:
        with db.engine.begin() as conn:
            found += matching.sweep(conn, tenant_id, since, now)
    return found
