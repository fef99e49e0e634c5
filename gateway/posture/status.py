"""A recommendation's effective status, and bringing it up to date set-based.

A recommendation keeps two statuses:

* ``actual_status`` / ``actual_severity``: what its findings say (the merge computes them);
* ``status`` / ``severity`` / ``status_cause``: what the tenant sees and the Secure Score counts.

The effective values follow from the actual ones, the type's policy and the exemption:

===============================  ===============  ==================  =============================
condition (first that holds)     status           status_cause        severity
===============================  ===============  ==================  =============================
type disabled by policy          NotApplicable    DisabledByPolicy    override, else actual
an exemption covers it           NotApplicable    Exempt              override, else actual
otherwise                        actual_status    (none)              override, else actual
===============================  ===============  ==================  =============================

``refresh`` re-derives them for the recommendations matching a condition, in three statements
whatever their number (the history events, the update, and the controls whose score moved), and
recounts those controls: a policy change, an exemption, its expiry or deletion moves the score
in its own transaction.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    String,
    and_,
    case,
    cast,
    false,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement

from gateway.merge.sql import is_postgres
from gateway.models import LifecycleEvent, Recommendation, RecommendationType, utcnow
from gateway.score import upkeep

R, RT, EV = Recommendation.__table__, RecommendationType.__table__, LifecycleEvent.__table__
DISABLED, EXEMPT = "DisabledByPolicy", "Exempt"


def effective(
    actual_status: str, actual_severity: str, enabled: bool, override: str | None, exemption_id: int | None
) -> tuple[str, str | None, str]:
    """(status, status_cause, severity) of one recommendation: the table above, in Python."""
    severity = override or actual_severity
    if not enabled:
        return "NotApplicable", DISABLED, severity
    if exemption_id is not None:
        return "NotApplicable", EXEMPT, severity
    return actual_status, None, severity


KEEP = object()  # ``refresh``'s exemption_id: the recommendations keep the one they have


def _expressions(exemption_id=KEEP):
    if exemption_id is KEEP:
        exempt = R.c.exemption_id.is_not(None)
    else:
        exempt = true() if exemption_id is not None else false()
    status = case(
        (RT.c.enabled.is_(False), "NotApplicable"),
        (exempt, "NotApplicable"),
        else_=R.c.actual_status,
    )
    cause = case((RT.c.enabled.is_(False), DISABLED), (exempt, EXEMPT), else_=None)
    severity = func.coalesce(RT.c.severity_override, R.c.actual_severity)
    return status, cause, severity


def lock_tenant(conn: Connection, tenant_id: int) -> None:
    """Take the tenant's score lock (PostgreSQL): merges, policy changes and exemptions of a
    tenant take turns, so each sees what the other committed."""
    if is_postgres(conn):
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:space, :tenant)"),
            {"space": upkeep.SCORE_LOCKS, "tenant": tenant_id},
        )


def refresh(
    conn: Connection,
    tenant_id: int,
    condition: ColumnElement[bool] | None,
    *,
    cause: str,
    actor: str | None,
    now: datetime | None = None,
    controls: set[str] | None = None,
    exemption_id=KEEP,
) -> int:
    """Re-derive the effective status of the tenant's recommendations matching ``condition``
    (all when None), write a history event for each whose status changes, and recount the
    controls whose counts may have moved (those, plus ``controls``).  Returns how many changed.

    With ``exemption_id`` (an id, or None), the recommendations matching ``condition`` are given
    that exemption in the same UPDATE that re-derives their status (one pass over the rows, not
    two, when an exemption covers or releases them); it then returns how many it updated."""
    now = now or utcnow()
    status, status_cause, severity = _expressions(exemption_id)
    joined = and_(RT.c.tenant_id == R.c.tenant_id, RT.c.id == R.c.type_id)
    where = [R.c.tenant_id == tenant_id, joined]
    if condition is not None:
        where.append(condition)
    differs = or_(
        R.c.status != status, R.c.severity != severity, R.c.status_cause.is_distinct_from(status_cause)
    )
    touched = set(controls or ())
    touched.update(
        c
        for c in conn.execute(
            select(RT.c.control)
            .distinct()
            .select_from(R)
            .join(RT, joined)
            .where(*where[:1], *where[2:], R.c.status != status)
        ).scalars()
        if c
    )
    details = (func.jsonb_build_object if is_postgres(conn) else func.json_object)(
        literal_column("'from'"), R.c.status, literal_column("'cause'"), cast(status_cause, String)
    )
    conn.execute(
        insert(EV).from_select(
            ["tenant_id", "subject_type", "subject_id", "event", "at", "cause", "actor", "details"],
            select(
                literal(tenant_id),
                literal("recommendation", String),
                R.c.id,
                func.lower(status),
                literal(now, EV.c.at.type),
                literal(cause[:200], String),
                literal(actor, String),
                details,
            )
            .select_from(R)
            .join(RT, joined)
            .where(*where[:1], *where[2:], R.c.status != status),
        )
    )
    values = {
        "status": status,
        "status_cause": status_cause,
        "severity": severity,
        "updated_at": now,
        "status_changed_at": case((R.c.status != status, now), else_=R.c.status_changed_at),
    }
    if exemption_id is not KEEP:
        values["exemption_id"] = exemption_id
    else:
        where.append(differs)
    changed = conn.execute(update(R).where(*where).values(**values)).rowcount
    if touched:
        upkeep.recount(conn, tenant_id, touched)
    return changed


__all__ = ["DISABLED", "EXEMPT", "effective", "lock_tenant", "refresh"]
