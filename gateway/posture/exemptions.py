"""Exemptions: recommendations waived on a scope, for accepted (``waiver``) or mitigated risk.

An exemption's scope is a recommendation type across the tenant, one resource, a type on one
resource, the resources matching an OData ``$filter`` on resources, or a type on those.  While it
applies, every recommendation in its scope carries its id (``recommendations.exemption_id``) and
is NotApplicable with cause ``Exempt`` (gateway/posture/status.py), so it leaves the score:

* on creation it covers the recommendations in scope that no other exemption covers yet (one
  UPDATE), and the merge gives every later recommendation in its scope the id too (``covering``);
* on expiry (the ``expire`` task, by ``expires_on``) or deletion, the recommendations it covered
  pass to another exemption whose scope holds them (oldest first), else return to their real
  status, in the same transaction, with a history event each and the score recounted.

A resource filter is evaluated when the exemption is created and when a recommendation is made;
a resource that comes to match the filter later (a new tag) is covered by its next new
recommendation, not retroactively.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement

from gateway.merge.sql import in_values
from gateway.models import Exemption, LifecycleEvent, Recommendation, Resource, utcnow
from gateway.posture import status as posture_status

EX, R, RS, EV = Exemption.__table__, Recommendation.__table__, Resource.__table__, LifecycleEvent.__table__
CATEGORIES = ("mitigated", "waiver")


def resource_query(conn: Connection, tenant_id: int, text: str) -> Select:
    """The ids of the tenant's live resources matching an OData ``$filter`` on resources (400
    ``invalidFilter`` when the filter is not one)."""
    from gateway.api.collections import COLLECTIONS  # the resources collection's field allow-list
    from gateway.odata import FilterContext, parse_filter

    parsed = parse_filter(
        text, COLLECTIONS["resources"].fields, FilterContext(tenant_id=tenant_id, dialect=conn.dialect.name)
    )
    return select(RS.c.id).where(RS.c.tenant_id == tenant_id, RS.c.merged_into.is_(None), parsed.condition)


def resource_condition(conn: Connection, tenant_id: int, text: str) -> ColumnElement[bool]:
    """``resource_id IN (the tenant's live resources matching the OData filter)``."""
    return R.c.resource_id.in_(resource_query(conn, tenant_id, text))


def scope_condition(conn: Connection, tenant_id: int, exemption) -> ColumnElement[bool]:
    """The recommendations in the exemption's scope (a condition on ``recommendations``)."""
    parts = [R.c.tenant_id == tenant_id]
    if exemption.type_id is not None:
        parts.append(R.c.type_id == exemption.type_id)
    if exemption.resource_id is not None:
        parts.append(R.c.resource_id == exemption.resource_id)
    if exemption.resource_filter:
        parts.append(resource_condition(conn, tenant_id, exemption.resource_filter))
    return and_(*parts)


def active(conn: Connection, tenant_id: int, now: datetime | None = None) -> list:
    """The tenant's exemptions that apply now, oldest first."""
    now = now or utcnow()
    return conn.execute(
        select(EX)
        .where(
            EX.c.tenant_id == tenant_id,
            EX.c.expired_at.is_(None),
            or_(EX.c.expires_on.is_(None), EX.c.expires_on > now),
        )
        .order_by(EX.c.id)
    ).all()


def _event(
    tenant_id: int, exemption_id: int, event: str, now: datetime, actor: str | None, details: dict
) -> dict:
    return {
        "tenant_id": tenant_id,
        "subject_type": "exemption",
        "subject_id": exemption_id,
        "event": event,
        "at": now,
        "cause": f"exemption {exemption_id} {event}",
        "actor": actor,
        "details": details,
    }


def apply(
    conn: Connection,
    tenant_id: int,
    exemption_id: int,
    *,
    actor: str | None,
    now: datetime | None = None,
    event: str = "created",
) -> int:
    """Cover the recommendations in the exemption's scope that no other exemption covers; return
    how many recommendations its scope holds (0 is an answer, not an error)."""
    now = now or utcnow()
    posture_status.lock_tenant(conn, tenant_id)
    row = conn.execute(select(EX).where(EX.c.tenant_id == tenant_id, EX.c.id == exemption_id)).one()
    scope = scope_condition(conn, tenant_id, row)
    posture_status.refresh(  # cover them and re-derive their status: one UPDATE
        conn,
        tenant_id,
        and_(scope, R.c.exemption_id.is_(None)),
        cause=f"exemption {exemption_id} ({row.category})",
        actor=actor,
        now=now,
        exemption_id=exemption_id,
    )
    in_scope = conn.execute(select(func.count()).select_from(R).where(scope)).scalar_one()
    conn.execute(
        EV.insert().values(
            **_event(
                tenant_id,
                exemption_id,
                event,
                now,
                actor,
                {"category": row.category, "recommendations": in_scope},
            )
        )
    )
    return in_scope


def release(
    conn: Connection,
    tenant_id: int,
    exemption_id: int,
    *,
    event: str,
    actor: str | None,
    now: datetime | None = None,
) -> int:
    """The exemption no longer applies (expired or deleted): its recommendations pass to another
    exemption covering them, or return to their real status.  Returns how many were released."""
    now = now or utcnow()
    posture_status.lock_tenant(conn, tenant_id)
    for other in active(conn, tenant_id, now):
        if other.id != exemption_id:
            conn.execute(
                update(R)
                .where(R.c.exemption_id == exemption_id, scope_condition(conn, tenant_id, other))
                .values(exemption_id=other.id)
            )
    released = posture_status.refresh(  # release the rest and re-derive their status: one UPDATE
        conn,
        tenant_id,
        R.c.exemption_id == exemption_id,
        cause=f"exemption {exemption_id} {event}",
        actor=actor,
        now=now,
        exemption_id=None,
    )
    conn.execute(
        EV.insert().values(
            **_event(tenant_id, exemption_id, event, now, actor, {"recommendations": released})
        )
    )
    return released


def covering(
    conn: Connection, tenant_id: int, candidates: Sequence[tuple[int, int]], exemptions: list
) -> dict[tuple[int, int], int]:
    """The exemption (oldest first) covering each new (resource id, type id) pair, for the merge."""
    found: dict[tuple[int, int], int] = {}
    for exemption in exemptions:
        pending = [
            pair
            for pair in candidates
            if pair not in found
            and (exemption.type_id is None or pair[1] == exemption.type_id)
            and (exemption.resource_id is None or pair[0] == exemption.resource_id)
        ]
        if not pending:
            continue
        if exemption.resource_filter:
            resource_ids = sorted({resource_id for resource_id, _ in pending})
            matching = set()
            subquery = resource_query(conn, tenant_id, exemption.resource_filter)
            for start in range(0, len(resource_ids), 5000):
                part = resource_ids[start : start + 5000]
                matching.update(conn.execute(subquery.where(in_values(conn, RS.c.id, part))).scalars())
            pending = [pair for pair in pending if pair[0] in matching]
        for pair in pending:
            found[pair] = exemption.id
    return found


def expire(conn: Connection, now: datetime | None = None, limit: int = 100) -> list[tuple[int, int]]:
    """Release every exemption whose ``expires_on`` has passed (set-based per exemption); return
    (tenant id, exemption id) of those expired.  The beat task calls this every minute."""
    now = now or utcnow()
    due = conn.execute(
        select(EX.c.id, EX.c.tenant_id)
        .where(EX.c.expired_at.is_(None), EX.c.expires_on <= now)
        .order_by(EX.c.tenant_id, EX.c.id)
        .limit(limit)
    ).all()
    for exemption_id, tenant_id in due:
        conn.execute(update(EX).where(EX.c.id == exemption_id).values(expired_at=now, updated_at=now))
        release(conn, tenant_id, exemption_id, event="expired", actor=None, now=now)
    return [(tenant_id, exemption_id) for exemption_id, tenant_id in due]


__all__ = [
    "CATEGORIES",
    "active",
    "apply",
    "covering",
    "expire",
    "release",
    "resource_condition",
    "resource_query",
    "scope_condition",
]
