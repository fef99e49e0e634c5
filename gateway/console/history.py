"""The kept daily series behind the Overview's "findings by severity over time" chart (issue 15).

:func:`snapshot` counts every tenant's open findings (``state != 'resolved'``, as the merge and the
ITSM sync count them) by severity in one grouped statement and upserts today's row per (tenant,
severity) in ``finding_severity_days``: a second snapshot on the same day overwrites that day's
rows (a severity no longer open is written as 0, not left stale), earlier days are kept.  The
Celery beat runs it every ``FINDING_HISTORY_SECONDS`` (workers/tasks.py ``snapshot_finding_history``).
"""

from __future__ import annotations

from datetime import date, timedelta

from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from connectors.model import SEVERITIES
from gateway.merge.sql import insert_for
from gateway.models import Finding, FindingSeverityDay, Tenant, utcnow

DAYS = 30  # the days the Overview's chart shows
OPEN = Finding.state != "resolved"


def snapshot(conn: Connection, tenant_id: int | None = None, today: date | None = None) -> int:
    """Write today's (UTC) open-findings count per severity for one tenant or every tenant; returns
    the rows written.  Every known severity gets a row (0 when none is open)."""
    today = today or utcnow().date()
    counts = select(Finding.tenant_id, Finding.severity, func.count()).where(OPEN)
    tenants = select(Tenant.id)
    if tenant_id is not None:
        counts = counts.where(Finding.tenant_id == tenant_id)
        tenants = tenants.where(Tenant.id == tenant_id)
    found: dict[tuple[int, str], int] = {}
    for tenant, severity, number in conn.execute(counts.group_by(Finding.tenant_id, Finding.severity)):
        key = (int(tenant), str(severity).lower())
        found[key] = found.get(key, 0) + int(number)
    severities = list(SEVERITIES) + sorted({s for _, s in found} - set(SEVERITIES))
    rows = [
        {"tenant_id": tenant, "day": today, "severity": severity,
         "open_findings": found.get((tenant, severity), 0)}
        for tenant in conn.execute(tenants).scalars()
        for severity in severities
    ]
    if not rows:
        return 0
    statement = insert_for(conn, FindingSeverityDay.__table__)
    conn.execute(statement.on_conflict_do_update(
        index_elements=["tenant_id", "day", "severity"],
        set_={"open_findings": statement.excluded.open_findings}), rows)
    return len(rows)


def series(conn: Connection, tenant_id: int, days: int = DAYS, today: date | None = None
           ) -> tuple[list[date], dict[str, list[int]]]:
    """The last ``days`` days that have a snapshot, oldest first, and per severity its counts on
    those days (severities that never had an open finding in the range are left out)."""
    today = today or utcnow().date()
    rows = conn.execute(
        select(FindingSeverityDay.day, FindingSeverityDay.severity, FindingSeverityDay.open_findings)
        .where(FindingSeverityDay.tenant_id == tenant_id,
               FindingSeverityDay.day > today - timedelta(days=days))
        .order_by(FindingSeverityDay.day)
    ).all()
    day_list = sorted({row.day for row in rows})
    index = {day: i for i, day in enumerate(day_list)}
    table: dict[str, list[int]] = {}
    for row in rows:
        table.setdefault(row.severity, [0] * len(day_list))[index[row.day]] = int(row.open_findings)
    order = {name: rank for rank, name in enumerate(reversed(SEVERITIES))}  # critical first
    named = sorted(table, key=lambda s: (order.get(s, 99), s))
    return day_list, {severity: table[severity] for severity in named if any(table[severity])}
