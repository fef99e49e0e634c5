"""The stored Secure Score, brought up to date in the transaction of the merge that changed
recommendations (ASC's definition).

Per control: a resource counts once; it is unhealthy when any recommendation of the control on
it is Unhealthy, healthy when it has recommendations of the control and none is Unhealthy (and
not all NotApplicable); a resource whose recommendations of the control are all NotApplicable
counts in neither.  ``current = max * healthy / (healthy + unhealthy)`` (0 with no resource).
The tenant's score is the sum of ``current``; its max the sum of the max scores of the controls
that apply (at least one healthy or unhealthy resource); percentage = score / max (4 decimals).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Select, and_, case, func, select, text
from sqlalchemy.engine import Connection

from gateway.merge.sql import in_values, insert_for, is_postgres
from gateway.models import Recommendation, RecommendationType, SecureScore, SecureScoreControl, utcnow
from gateway.posture import profiles

R, RT = Recommendation.__table__, RecommendationType.__table__
SSC, SS = SecureScoreControl.__table__, SecureScore.__table__
SCORE_LOCKS = 7102  # advisory lock space: one lock per tenant while its score is brought up to date


def control_score(max_score: float, healthy: int, unhealthy: int) -> float:
    return round(max_score * healthy / (healthy + unhealthy), 4) if healthy + unhealthy else 0.0


def control_counts(conn: Connection, tenant_id: int, controls: Iterable[str] | None = None,
                   resources: Select | None = None) -> dict[str, tuple[int, int, int]]:
    """(healthy, unhealthy, notApplicable) resource counts of each of the tenant's controls that has
    recommendations: of ``controls`` (all when None), counting only the resources whose ids
    ``resources`` selects (all when None).  One grouped SELECT; the stored recount and the scoped
    score both count with it, so they cannot differ."""
    unhealthy = func.max(case((R.c.status == "Unhealthy", 1), else_=0)).label("u")
    healthy = func.max(case((R.c.status == "Healthy", 1), else_=0)).label("h")
    condition = [R.c.tenant_id == tenant_id]
    if controls is not None:
        condition.append(in_values(conn, RT.c.control, sorted(set(controls))))
    if resources is not None:
        condition.append(R.c.resource_id.in_(resources))
    per_resource = (select(RT.c.control, R.c.resource_id, unhealthy, healthy)
                    .join(RT, and_(RT.c.id == R.c.type_id, RT.c.tenant_id == tenant_id))
                    .where(*condition).group_by(RT.c.control, R.c.resource_id).subquery())
    u, h = per_resource.c.u, per_resource.c.h
    grouped = (select(per_resource.c.control,
                      func.sum(u).label("unhealthy"),
                      func.sum(case((and_(u == 0, h == 1), 1), else_=0)).label("healthy"),
                      func.sum(case((and_(u == 0, h == 0), 1), else_=0)).label("na"))
               .group_by(per_resource.c.control))
    return {row.control: (int(row.healthy or 0), int(row.unhealthy or 0), int(row.na or 0))
            for row in conn.execute(grouped) if row.control is not None}


def control_rows(conn: Connection, tenant_id: int, counts: dict[str, tuple[int, int, int]],
                 controls: Iterable[str]) -> list[dict]:
    """Each control's counts with its score as the tenant counts it (max score and state of its
    profile: ``profiles.counted``)."""
    wanted = sorted(set(controls))
    scoring = profiles.scoring(conn, tenant_id, wanted)
    rows = []
    for control in wanted:
        good, bad, na = counts.get(control, (0, 0, 0))
        current, max_score = profiles.counted(*scoring[control], good, bad)
        rows.append({"control": control, "healthy": good, "unhealthy": bad, "not_applicable": na,
                     "current": current, "max": max_score})
    return rows


def recount(conn: Connection, tenant_id: int, controls: Iterable[str] | None = None) -> None:
    """Recount the tenant's ``controls`` (all its controls when None) and write the score history
    row when the tenant's score changed.  Set-based: one grouped SELECT, one upsert.  A control
    with no recommendation and no stored row gets none (it shows nowhere until it applies)."""
    if is_postgres(conn):  # two merges of a tenant take turns (each recounts what the other committed)
        conn.execute(text("SELECT pg_advisory_xact_lock(:space, :tenant)"),
                     {"space": SCORE_LOCKS, "tenant": tenant_id})
    wanted = None if controls is None else sorted(set(controls))
    if wanted == []:
        return
    counts = control_counts(conn, tenant_id, wanted)
    stored = set(conn.execute(select(SSC.c.control).where(SSC.c.tenant_id == tenant_id)).scalars())
    if wanted is None:
        wanted = sorted(set(counts) | stored)
    else:
        wanted = [control for control in wanted if control in counts or control in stored]
    if not wanted:
        return
    now = utcnow()
    rows = [{"tenant_id": tenant_id, **row, "updated_at": now}
            for row in control_rows(conn, tenant_id, counts, wanted)]
    statement = insert_for(conn, SSC)
    conn.execute(statement.on_conflict_do_update(
        index_elements=["tenant_id", "control"],
        set_={name: statement.excluded[name] for name in
              ("healthy", "unhealthy", "not_applicable", "current", "max", "updated_at")}), rows)
    write_history(conn, tenant_id, now)


def summarize(rows: Iterable) -> dict:
    """The score of control rows (mappings or rows with control, healthy, unhealthy, current, max):
    the controls that apply (a healthy or unhealthy resource) add up."""
    applying = [row for row in (_mapping(r) for r in rows) if row["healthy"] + row["unhealthy"]]
    current = round(sum(row["current"] for row in applying), 4)
    max_score = float(sum(row["max"] for row in applying))
    return {
        "current": current, "max": max_score,
        "percentage": round(current / max_score, 4) if max_score else 0.0,
        "control_scores": [{"controlName": row["control"], "score": row["current"], "maxScore": row["max"],
                            "healthyResourceCount": row["healthy"],
                            "unhealthyResourceCount": row["unhealthy"]} for row in applying],
    }


def _mapping(row) -> dict:
    return row if isinstance(row, dict) else row._mapping


def tenant_score(conn: Connection, tenant_id: int) -> dict:
    """The tenant's current score from the stored control rows."""
    rows = conn.execute(select(SSC).where(SSC.c.tenant_id == tenant_id).order_by(SSC.c.control)).all()
    return {**summarize(rows), "controls": rows}


def scoped_score(conn: Connection, tenant_id: int, resources: Select) -> dict:
    """The score of the tenant's resources that ``resources`` selects (their ids), computed now from
    their recommendations as the stored score is (``control_counts``, ``control_rows``)."""
    counts = control_counts(conn, tenant_id, resources=resources)
    return summarize(control_rows(conn, tenant_id, counts, counts))


def write_history(conn: Connection, tenant_id: int, now) -> None:
    """A history row when the tenant's score (or a control's counts) differs from the newest one."""
    score = tenant_score(conn, tenant_id)
    last = conn.execute(select(SS.c.current, SS.c.max, SS.c.control_scores).where(SS.c.tenant_id == tenant_id)
                        .order_by(SS.c.id.desc()).limit(1)).first()
    if last is None and not score["control_scores"]:
        return
    if last is not None and (last.current, last.max, last.control_scores) == \
            (score["current"], score["max"], score["control_scores"]):
        return
    conn.execute(SS.insert().values(tenant_id=tenant_id, current=score["current"], max=score["max"],
                                    percentage=score["percentage"], control_scores=score["control_scores"],
                                    created_at=now))


def controls_of_types(conn: Connection, tenant_id: int, type_ids: Iterable[int]) -> list[str]:
    ids = sorted(set(type_ids))
    if not ids:
        return []
    return sorted(c for c in conn.execute(select(RT.c.control).distinct().where(
        RT.c.tenant_id == tenant_id, in_values(conn, RT.c.id, ids))).scalars() if c is not None)


__all__ = ["control_counts", "control_rows", "control_score", "controls_of_types", "recount", "scoped_score",
           "summarize", "tenant_score", "write_history"]
