"""A tenant's Secure Score controls: the built-in ones (gateway/score/controls.py) and its custom
controls, each with Graph's control state.

Rows of ``control_profiles`` for the built-in controls are made on first use (``ensure``), so a
tenant's profiles are one table for reads, OData and PATCH.  The state a PATCH sets changes how
the control counts (``counted``):

* ``Default`` / ``Reviewed``: as computed from its recommendations;
* ``ThirdParty``: addressed by a third-party tool: full points whenever the control applies;
* ``Ignored``: the tenant accepts the risk: the control counts in neither score nor max.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.engine import Connection

from gateway.merge.sql import in_values, insert_for
from gateway.models import ControlProfile, utcnow
from gateway.score.controls import BY_ID, CONTROLS

CP = ControlProfile.__table__
STATES = ("Default", "Ignored", "ThirdParty", "Reviewed")


def ensure(conn: Connection, tenant_id: int) -> None:
    """Make the tenant's rows of the built-in controls that do not exist yet."""
    have = set(
        conn.execute(
            select(CP.c.control).where(CP.c.tenant_id == tenant_id, CP.c.builtin.is_(True))
        ).scalars()
    )
    missing = [control for control in CONTROLS if control.id not in have]
    if not missing:
        return
    now = utcnow()
    conn.execute(
        insert_for(conn, CP).on_conflict_do_nothing(index_elements=["tenant_id", "control"]),
        [
            {
                "tenant_id": tenant_id,
                "control": c.id,
                "builtin": True,
                "title": c.title,
                "description": c.description,
                "category": c.category,
                "max_score": float(c.max_score),
                "rank": index + 1,
                "state": "Default",
                "state_updates": [],
                "updated_at": now,
            }
            for index, c in enumerate(CONTROLS)
            if c in missing
        ],
    )


def exists(conn: Connection, tenant_id: int, control: str) -> bool:
    if control in BY_ID:
        return True
    return (
        conn.execute(select(CP.c.control).where(CP.c.tenant_id == tenant_id, CP.c.control == control)).first()
        is not None
    )


def scoring(conn: Connection, tenant_id: int, controls: list[str]) -> dict[str, tuple[float, str]]:
    """(max score, state) of each control: the tenant's row, else the built-in definition."""
    found = (
        {
            row.control: (float(row.max_score), row.state)
            for row in conn.execute(
                select(CP.c.control, CP.c.max_score, CP.c.state).where(
                    CP.c.tenant_id == tenant_id, in_values(conn, CP.c.control, controls)
                )
            )
        }
        if controls
        else {}
    )
    return {
        control: found.get(control)
        or (float(BY_ID[control].max_score) if control in BY_ID else 0.0, "Default")
        for control in controls
    }


def counted(max_score: float, state: str, healthy: int, unhealthy: int) -> tuple[float, float]:
    """(current, max) of a control as the score counts it, given its state."""
    if state == "Ignored":
        return 0.0, 0.0
    if state == "ThirdParty":
        return (max_score, max_score) if healthy + unhealthy else (0.0, max_score)
    current = round(max_score * healthy / (healthy + unhealthy), 4) if healthy + unhealthy else 0.0
    return current, max_score


__all__ = ["STATES", "counted", "ensure", "exists", "scoring"]
