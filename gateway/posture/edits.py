"""Edits of a tenant's security policy and exemptions, shared by the API (gateway/api/posture.py)
and the command line (``gateway policy`` / ``gateway exemption``), so both do exactly the same.

Each function runs in the caller's transaction and does all of the edit: it takes the tenant's
score lock (``status.lock_tenant``), checks what it is given (``BadRequest`` naming the field,
``NotFound``, ``Conflict``: gateway/errors.py, which the API answers and the command line prints),
writes the row, brings the recommendations and the Secure Score up to date
(``policy.settle``, ``exemptions.apply`` / ``release``) and records the edit as an event
(subject ``policy`` or ``exemption``) naming ``actor`` (an OAuth client id, or ``cli:<user>``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection

from gateway.errors import BadRequest, Conflict, NotFound
from gateway.models import Exemption, LifecycleEvent, PolicySetting, RecommendationType, Resource, utcnow
from gateway.posture import exemptions as posture_exemptions
from gateway.posture import policy as posture_policy
from gateway.posture import profiles
from gateway.posture import status as posture_status

PS, EX, EV = PolicySetting.__table__, Exemption.__table__, LifecycleEvent.__table__
RT, RS = RecommendationType.__table__, Resource.__table__
POLICY_FIELDS = ("enabled", "severity", "control", "description")


def event(tenant_id: int, subject: str, subject_id: int, name: str, now: datetime, actor: str | None,
          details: dict) -> dict:
    """The row of the event an edit writes about itself."""
    return {"tenant_id": tenant_id, "subject_type": subject, "subject_id": subject_id, "event": name,
            "at": now, "cause": f"{subject} {name} by {actor}", "actor": actor, "details": details}


def _invalid(field: str, message: str) -> BadRequest:
    return BadRequest(f"{field}: {message}", code="invalidBody", details={field: [message]})


# -- policy entries ---------------------------------------------------------------------------------


def check_control(conn: Connection, tenant_id: int, control: str | None) -> None:
    """400 when ``control`` is not one of the tenant's controls (built-in or custom)."""
    if control is not None and not profiles.exists(conn, tenant_id, control):
        raise BadRequest(f"control: '{control[:100]}' is not a control of the tenant (see "
                         "secureScoreControlProfiles)", code="invalidBody",
                         details={"control": ["unknown control"]})


def _type_only(scope: str, data: dict) -> None:
    for name in ("severity", "control"):
        if data.get(name) is not None and scope != "recommendationType":
            raise _invalid(name, f"only a recommendationType entry has a {name}")


def _settle(conn: Connection, tenant_id: int, cause: str, actor: str | None, now: datetime) -> int:
    return len(posture_policy.settle(conn, tenant_id, None, cause=cause, actor=actor, now=now))


def find_policy(conn: Connection, tenant_id: int, scope: str, target: str):
    """The tenant's policy entry for (scope, target), or None."""
    return conn.execute(select(PS).where(PS.c.tenant_id == tenant_id, PS.c.scope == scope,
                                         PS.c.target == target)).first()


def create_policy(conn: Connection, tenant_id: int, data: dict, *, actor: str | None,
                  now: datetime | None = None) -> tuple[int, int]:
    """Add an entry (``scope``, ``target`` and some of ``enabled``, ``severity``, ``control``,
    ``description``); return (its id, how many types changed)."""
    now = now or utcnow()
    if data.get("enabled") is None and data.get("severity") is None and data.get("control") is None:
        raise BadRequest("a policy entry sets at least one of enabled, severity, control", code="invalidBody",
                         details={"enabled": ["set enabled, severity or control"]})
    _type_only(data["scope"], data)
    posture_status.lock_tenant(conn, tenant_id)
    if data["scope"] == "control":
        check_control(conn, tenant_id, data["target"])
    check_control(conn, tenant_id, data.get("control"))
    if find_policy(conn, tenant_id, data["scope"], data["target"]) is not None:
        raise Conflict(f"the policy already has an entry for {data['scope']} '{data['target'][:100]}': "
                       "change it with PATCH")
    values = {name: data[name] for name in ("scope", "target", *POLICY_FIELDS) if name in data}
    policy_id = conn.execute(PS.insert().values(
        tenant_id=tenant_id, created_at=now, updated_at=now, created_by=actor, updated_by=actor, **values,
    ).returning(PS.c.id)).scalar_one()
    changed = _settle(conn, tenant_id, f"policy {policy_id} created", actor, now)
    conn.execute(EV.insert().values(**event(tenant_id, "policy", policy_id, "created", now, actor,
                                            {**values, "changedTypes": changed})))
    return policy_id, changed


def _policy_row(conn: Connection, tenant_id: int, policy_id: int, shown: str | None = None):
    row = conn.execute(select(PS).where(PS.c.tenant_id == tenant_id, PS.c.id == policy_id)).first()
    if row is None:
        raise NotFound(f"policy '{(shown or str(policy_id))[:40]}' not found")
    return row


def update_policy(conn: Connection, tenant_id: int, policy_id: int, data: dict, *, actor: str | None,
                  now: datetime | None = None, shown: str | None = None) -> int:
    """Change an entry's ``enabled``, ``severity``, ``control``, ``description`` (those in ``data``;
    None clears); return how many types changed."""
    now = now or utcnow()
    posture_status.lock_tenant(conn, tenant_id)
    old = _policy_row(conn, tenant_id, policy_id, shown)
    _type_only(old.scope, data)
    check_control(conn, tenant_id, data.get("control"))
    values = {name: data[name] for name in POLICY_FIELDS if name in data}
    conn.execute(update(PS).where(PS.c.id == policy_id).values(updated_at=now, updated_by=actor, **values))
    changed = _settle(conn, tenant_id, f"policy {policy_id} updated", actor, now)
    before = {name: getattr(old, name) for name in values}
    conn.execute(EV.insert().values(**event(tenant_id, "policy", policy_id, "updated", now, actor,
                                            {"before": before, "after": values, "changedTypes": changed})))
    return changed


def delete_policy(conn: Connection, tenant_id: int, policy_id: int, *, actor: str | None,
                  now: datetime | None = None, shown: str | None = None) -> int:
    """Remove an entry: what it concerned returns to the defaults; return how many types changed."""
    now = now or utcnow()
    posture_status.lock_tenant(conn, tenant_id)
    old = _policy_row(conn, tenant_id, policy_id, shown)
    conn.execute(delete(PS).where(PS.c.id == policy_id))
    changed = _settle(conn, tenant_id, f"policy {policy_id} deleted", actor, now)
    conn.execute(EV.insert().values(**event(
        tenant_id, "policy", policy_id, "deleted", now, actor,
        {"scope": old.scope, "target": old.target, "enabled": old.enabled, "severity": old.severity,
         "control": old.control, "changedTypes": changed})))
    return changed


# -- exemptions -------------------------------------------------------------------------------------


def create_exemption(conn: Connection, tenant_id: int, data: dict, *, actor: str | None,
                     now: datetime | None = None) -> tuple[int, int]:
    """Exempt the recommendations in a scope; ``data`` has the API's names (``displayName``,
    ``category``, ``description``, ``recommendationType`` (a key), ``resourceId``,
    ``resourceFilter``, ``expiresOn``).  Returns (its id, how many recommendations its scope
    holds: 0 is an answer, not an error)."""
    now = now or utcnow()
    if data.get("category") not in posture_exemptions.CATEGORIES:
        raise _invalid("category", f"must be one of {', '.join(posture_exemptions.CATEGORIES)}")
    if data.get("resourceId") is not None and data.get("resourceFilter") is not None:
        raise _invalid("resourceFilter", "give resourceId or resourceFilter, not both")
    if all(data.get(name) is None for name in ("recommendationType", "resourceId", "resourceFilter")):
        raise _invalid("recommendationType", "an exemption's scope is a recommendationType, a resourceId "
                       "or a resourceFilter (or a type with one of the others)")
    if data.get("expiresOn") is not None and data["expiresOn"] <= now:
        raise _invalid("expiresOn", "must be in the future")
    posture_status.lock_tenant(conn, tenant_id)
    type_id = None
    if data.get("recommendationType") is not None:
        type_id = conn.execute(select(RT.c.id).where(RT.c.tenant_id == tenant_id,
                                                     RT.c.key == data["recommendationType"])).scalar()
        if type_id is None:
            raise BadRequest(f"recommendationType: the tenant has no type "
                             f"'{data['recommendationType'][:100]}'",
                             code="invalidBody", details={"recommendationType": ["unknown type"]})
    resource_id = None if data.get("resourceId") is None else int(data["resourceId"])
    if resource_id is not None and conn.execute(select(RS.c.id).where(
            RS.c.tenant_id == tenant_id, RS.c.id == resource_id, RS.c.merged_into.is_(None))).first() is None:
        raise BadRequest(f"resourceId: the tenant has no resource '{resource_id}'", code="invalidBody",
                         details={"resourceId": ["unknown resource"]})
    if data.get("resourceFilter") is not None:
        try:
            posture_exemptions.resource_query(conn, tenant_id, data["resourceFilter"])
        except BadRequest as exc:
            raise BadRequest(f"resourceFilter: {exc.message}", code="invalidBody",
                             details={"resourceFilter": [exc.message]}) from None
    exemption_id = conn.execute(EX.insert().values(
        tenant_id=tenant_id, display_name=data["displayName"], description=data.get("description"),
        category=data["category"], type_id=type_id, resource_id=resource_id,
        resource_filter=data.get("resourceFilter"), expires_on=data.get("expiresOn"), created_at=now,
        updated_at=now, created_by=actor, updated_by=actor,
    ).returning(EX.c.id)).scalar_one()
    matched = posture_exemptions.apply(conn, tenant_id, exemption_id, actor=actor, now=now)
    return exemption_id, matched


def _plain(value):
    return value.isoformat() if isinstance(value, datetime) else value


def _exemption_row(conn: Connection, tenant_id: int, exemption_id: int, shown: str | None = None):
    row = conn.execute(select(EX).where(EX.c.tenant_id == tenant_id, EX.c.id == exemption_id)).first()
    if row is None:
        raise NotFound(f"exemption '{(shown or str(exemption_id))[:40]}' not found")
    return row


def update_exemption(conn: Connection, tenant_id: int, exemption_id: int, data: dict, *, actor: str | None,
                     now: datetime | None = None, shown: str | None = None) -> None:
    """Change an active exemption's ``displayName``, ``description``, ``category`` or ``expiresOn``
    (its scope is fixed); an expiry in the past ends it now."""
    now = now or utcnow()
    names = (("displayName", "display_name"), ("description", "description"), ("category", "category"),
             ("expiresOn", "expires_on"))
    values = {column: data[name] for name, column in names if name in data}
    posture_status.lock_tenant(conn, tenant_id)
    old = _exemption_row(conn, tenant_id, exemption_id, shown)
    if old.expired_at is not None:
        raise Conflict(f"exemption '{exemption_id}' has expired: create a new one")
    conn.execute(update(EX).where(EX.c.id == exemption_id).values(updated_at=now, updated_by=actor, **values))
    conn.execute(EV.insert().values(**event(tenant_id, "exemption", exemption_id, "updated", now, actor, {
        "before": {name: _plain(getattr(old, name)) for name in values},
        "after": {name: _plain(value) for name, value in values.items()}})))
    if values.get("expires_on") is not None and values["expires_on"] <= now:
        conn.execute(update(EX).where(EX.c.id == exemption_id).values(expired_at=now))
        posture_exemptions.release(conn, tenant_id, exemption_id, event="expired", actor=actor, now=now)


def delete_exemption(conn: Connection, tenant_id: int, exemption_id: int, *, actor: str | None,
                     now: datetime | None = None, shown: str | None = None) -> int:
    """Delete an exemption: what it covered passes to another exemption holding it, or returns to
    its real status, at once.  Returns how many recommendations it released."""
    now = now or utcnow()
    posture_status.lock_tenant(conn, tenant_id)
    _exemption_row(conn, tenant_id, exemption_id, shown)
    conn.execute(delete(EX).where(EX.c.id == exemption_id))
    return posture_exemptions.release(conn, tenant_id, exemption_id, event="deleted", actor=actor, now=now)


__all__ = [
    "check_control",
    "create_exemption",
    "create_policy",
    "delete_exemption",
    "delete_policy",
    "event",
    "find_policy",
    "update_exemption",
    "update_policy",
]
