"""Edits of a tenant's Secure Score control profiles (gateway/posture/profiles.py): custom controls
(create, change, delete) and Graph's ``controlStateUpdates``.

Each edit runs in the caller's transaction under the tenant's score lock, with its effect: a
changed max score or state recounts the control (``upkeep.recount``: the stored control row and,
when the tenant's score moved, a history row), and the edit itself is a lifecycle event (subject
``controlProfile``, ``subject_id`` the profile's ``rank``, ``details.control`` its id) naming the
client.  Ranks identify profiles in events: the built-in controls have 1..N, custom controls get
the next number above ``CUSTOM_RANKS`` that no profile or event of the tenant ever used, so a
deleted control's events are never mistaken for a later control's.
"""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.engine import Connection

from gateway.errors import BadRequest, Conflict, NotFound
from gateway.models import LifecycleEvent, PolicySetting, RecommendationType, SecureScoreControl
from gateway.posture import profiles
from gateway.posture.status import lock_tenant
from gateway.score import upkeep
from gateway.score.controls import BY_ID

CP, EV, PS = profiles.CP, LifecycleEvent.__table__, PolicySetting.__table__
RT, SSC = RecommendationType.__table__, SecureScoreControl.__table__
SUBJECT = "controlProfile"
CUSTOM_RANKS = 1000
DEFINITION = {"title": "title", "description": "description", "maxScore": "max_score",
              "controlCategory": "category"}  # API field -> column of a custom control's definition


def slug(title: str) -> str:
    """The id a custom control gets from its title: lowercase words joined by ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:100].strip("-")


def get(conn: Connection, tenant_id: int, control: str):
    return conn.execute(select(CP).where(CP.c.tenant_id == tenant_id, CP.c.control == control)).first()


def _event(tenant_id: int, rank: int, control: str, event: str, actor: str, now: datetime,
           details: dict) -> dict:
    return {"tenant_id": tenant_id, "subject_type": SUBJECT, "subject_id": rank, "event": event, "at": now,
            "cause": f"control {control} {event} by {actor}"[:200], "actor": actor,
            "details": {"control": control, **details}}


def _next_rank(conn: Connection, tenant_id: int) -> int:
    used = conn.execute(select(func.max(CP.c.rank)).where(CP.c.tenant_id == tenant_id)).scalar() or 0
    logged = conn.execute(select(func.max(EV.c.subject_id)).where(
        EV.c.tenant_id == tenant_id, EV.c.subject_type == SUBJECT)).scalar() or 0
    return max(CUSTOM_RANKS, used, logged) + 1


def create(conn: Connection, tenant_id: int, data: dict, *, actor: str, now: datetime) -> str:
    """Add a custom control (``id`` given or derived from ``title``); returns its id.  It counts once
    a policy entry maps a recommendation type to it."""
    lock_tenant(conn, tenant_id)
    profiles.ensure(conn, tenant_id)
    control = data.get("id") or slug(data["title"])
    if not control:
        raise BadRequest("id: the title gives no id (no letter or digit): give an id", code="invalidBody",
                         details={"id": ["give an id"]})
    if control in BY_ID or get(conn, tenant_id, control) is not None:
        raise Conflict(f"the tenant already has a control '{control}': give another id")
    rank = _next_rank(conn, tenant_id)
    values = {"title": data["title"], "description": data.get("description"),
              "max_score": float(data["maxScore"]), "category": data.get("controlCategory") or "Custom"}
    conn.execute(CP.insert().values(tenant_id=tenant_id, control=control, builtin=False, rank=rank,
                                    state="Default", state_updates=[], updated_at=now, **values))
    conn.execute(EV.insert().values(**_event(tenant_id, rank, control, "created", actor, now, {
        "title": values["title"], "maxScore": values["max_score"], "controlCategory": values["category"]})))
    return control


def edit(conn: Connection, tenant_id: int, control: str, data: dict, *, actor: str, now: datetime) -> None:
    """Change a custom control's definition and/or append Graph control state updates (any
    control); the latest state applies.  A new max score or state recounts the control."""
    lock_tenant(conn, tenant_id)
    profiles.ensure(conn, tenant_id)
    row = get(conn, tenant_id, control)
    if row is None:
        raise NotFound(f"control profile '{control[:100]}' not found")
    fixed = [name for name in DEFINITION if name in data]
    if fixed and row.builtin:
        raise BadRequest(f"{fixed[0]}: a built-in control's definition is fixed (change its state with "
                         "controlStateUpdates)", code="invalidBody",
                         details={fixed[0]: ["a built-in control's definition is fixed"]})
    values = {DEFINITION[name]: data[name] for name in fixed}
    if "controlCategory" in values:
        values["category"] = values["category"] or "Custom"
    before = {name: getattr(row, DEFINITION[name]) for name in fixed}
    after = {name: data[name] for name in fixed}
    updates = [{"assignedTo": item.get("assignedTo"), "comment": item.get("comment"), "state": item["state"],
                "updatedBy": actor, "updatedDateTime": now.isoformat().replace("+00:00", "Z")}
               for item in data.get("controlStateUpdates") or ()]
    if updates:
        values["state_updates"] = list(row.state_updates or []) + updates
        values["state"] = updates[-1]["state"]
        before["state"], after["state"] = row.state, values["state"]
        after["controlStateUpdates"] = updates
    conn.execute(update(CP).where(CP.c.tenant_id == tenant_id, CP.c.control == control)
                 .values(updated_at=now, **values))
    if values.get("max_score", row.max_score) != row.max_score or values.get("state", row.state) != row.state:
        upkeep.recount(conn, tenant_id, [control])
    conn.execute(EV.insert().values(**_event(tenant_id, row.rank, control, "updated", actor, now,
                                             {"before": before, "after": after})))


def remove(conn: Connection, tenant_id: int, control: str, *, actor: str, now: datetime) -> None:
    """Delete a custom control; 409 while the policy maps a type to it (or names it) or a type counts
    in it."""
    lock_tenant(conn, tenant_id)
    row = get(conn, tenant_id, control)
    if row is None and control not in BY_ID:
        raise NotFound(f"control profile '{control[:100]}' not found")
    if row is None or row.builtin:
        raise Conflict(f"'{control[:100]}' is a built-in control: it cannot be deleted (set its state to "
                       "Ignored with controlStateUpdates to leave it out of the score)")
    entries = conn.execute(select(PS.c.id).where(PS.c.tenant_id == tenant_id, or_(
        (PS.c.scope == "recommendationType") & (PS.c.control == control),
        (PS.c.scope == "control") & (PS.c.target == control))).order_by(PS.c.id)).scalars().all()
    if entries:
        raise Conflict(f"the security policy names control '{control}' (entries "
                       f"{', '.join(map(str, entries[:10]))}): change or delete them first")
    if conn.execute(select(RT.c.id).where(RT.c.tenant_id == tenant_id, RT.c.control == control)
                    .limit(1)).first():
        raise Conflict(f"recommendation types count in control '{control}': re-map them first")
    conn.execute(delete(CP).where(CP.c.tenant_id == tenant_id, CP.c.control == control))
    conn.execute(delete(SSC).where(SSC.c.tenant_id == tenant_id, SSC.c.control == control))
    upkeep.write_history(conn, tenant_id, now)
    conn.execute(EV.insert().values(**_event(tenant_id, row.rank, control, "deleted", actor, now, {
        "title": row.title, "maxScore": row.max_score})))


__all__ = ["CUSTOM_RANKS", "SUBJECT", "create", "edit", "get", "remove", "slug"]
