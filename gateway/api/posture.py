"""Edits of the tenant's posture under ``/api/v1/tenants/<tenant>/security`` (scope
``posture.manage``): security policy entries and exemptions.  Reads are the OData collections
``policies`` and ``exemptions`` (gateway/api/posture_collections.py, served by collections.py).

Every edit runs in one transaction with its effect: the types' policy columns, the effective
status of the recommendations concerned, their history events and the Secure Score of the
controls that moved (gateway/posture/).  Each edit is itself an event (subject ``policy`` or
``exemption``) naming the client that made it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, current_app, g, jsonify, request, url_for
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import delete, select, update

from gateway.api.collections import _get_one, _item_id, _only, _tenant_id
from gateway.api.posture_collections import POLICY_SCOPES, SEVERITIES
from gateway.auth import require_scope
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.models import Exemption, LifecycleEvent, PolicySetting, RecommendationType, Resource, utcnow
from gateway.posture import exemptions as posture_exemptions
from gateway.posture import policy as posture_policy
from gateway.posture import profiles
from gateway.posture import status as posture_status

PREFIX = "/api/v1/tenants/<tenant>/security"
blueprint = Blueprint("posture", __name__, url_prefix=PREFIX)
PS, EX, EV = PolicySetting.__table__, Exemption.__table__, LifecycleEvent.__table__
RT, RS = RecommendationType.__table__, Resource.__table__


def _db():
    return current_app.extensions["gateway.db"]


def _body(schema: Schema, partial: bool = False) -> dict:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict) or not payload:
        raise BadRequest("the body must be a JSON object", code="invalidBody")
    try:
        return schema.load(payload, partial=partial)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise BadRequest("invalid fields: " + "; ".join(f"{k}: {v}" for k, v in messages.items()),
                         code="invalidBody", details=messages) from None


def _event(tenant_id: int, subject: str, subject_id: int, event: str, now: datetime, details: dict) -> dict:
    return {"tenant_id": tenant_id, "subject_type": subject, "subject_id": subject_id, "event": event, "at": now,
            "cause": f"{subject} {event} by {g.caller.client_id}", "actor": g.caller.client_id,
            "details": details}


def _created(name: str, endpoint: str, tenant: str, item_id: int, extra: dict | None = None):
    body = _get_one(tenant, name, str(item_id))
    body.update(extra or {})
    response = jsonify(body)
    response.status_code = 201
    response.headers["Location"] = url_for(endpoint, tenant=tenant, item_id=str(item_id), _external=True)
    return response


def _no_content():
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


# -- policies ---------------------------------------------------------------------------------------


class PolicyPatch(Schema):
    class Meta:
        unknown = RAISE

    enabled = fields.Boolean(allow_none=True)
    severity = fields.String(allow_none=True, validate=validate.OneOf(SEVERITIES))
    control = fields.String(allow_none=True, validate=validate.Length(min=1, max=100))
    description = fields.String(allow_none=True, validate=validate.Length(max=2000))


class PolicyIn(PolicyPatch):
    scope = fields.String(required=True, validate=validate.OneOf(POLICY_SCOPES))
    target = fields.String(required=True, validate=validate.Length(min=1, max=300))

    @validates_schema
    def _type_only(self, data, **kwargs):
        for name in ("severity", "control"):
            if data.get(name) is not None and data.get("scope", "recommendationType") != "recommendationType":
                raise ValidationError(f"only a recommendationType entry has a {name}", name)


def _settle_policy(conn, tenant_id: int, cause: str) -> int:
    return len(posture_policy.settle(conn, tenant_id, None, cause=cause, actor=g.caller.client_id))


def _check_control(conn, tenant_id: int, control: str | None) -> None:
    if control is not None and not profiles.exists(conn, tenant_id, control):
        raise BadRequest(f"control: '{control[:100]}' is not a control of the tenant (see "
                         "secureScoreControlProfiles)", code="invalidBody", details={"control": ["unknown control"]})


@require_scope("posture.manage")
def create_policy(tenant: str):
    """Add an entry to the tenant's security policy; the recommendations it concerns change now."""
    _only(())
    data = _body(PolicyIn())
    if data.get("enabled") is None and data.get("severity") is None and data.get("control") is None:
        raise BadRequest("a policy entry sets at least one of enabled, severity, control", code="invalidBody",
                         details={"enabled": ["set enabled, severity or control"]})
    if data["scope"] == "control":
        with _db().engine.connect() as conn:
            _check_control(conn, _tenant_id(tenant), data["target"])
    tenant_id, now = _tenant_id(tenant), utcnow()
    with _db().engine.begin() as conn:
        posture_status.lock_tenant(conn, tenant_id)
        _check_control(conn, tenant_id, data.get("control"))
        if conn.execute(select(PS.c.id).where(PS.c.tenant_id == tenant_id, PS.c.scope == data["scope"],
                                              PS.c.target == data["target"])).first():
            raise Conflict(f"the policy already has an entry for {data['scope']} '{data['target'][:100]}': "
                           "change it with PATCH")
        policy_id = conn.execute(PS.insert().values(
            tenant_id=tenant_id, created_at=now, updated_at=now, created_by=g.caller.client_id,
            updated_by=g.caller.client_id, **data).returning(PS.c.id)).scalar_one()
        changed = _settle_policy(conn, tenant_id, f"policy {policy_id} created")
        conn.execute(EV.insert().values(**_event(tenant_id, "policy", policy_id, "created", now,
                                                 {**data, "changedTypes": changed})))
    return _created("policies", "collections.get_policies", tenant, policy_id, {"changedTypeCount": changed})


@require_scope("posture.manage")
def patch_policy(tenant: str, item_id: str):
    """Change a policy entry (enabled, severity, control, description)."""
    _only(())
    data = _body(PolicyPatch(), partial=True)
    tenant_id, now, policy_id = _tenant_id(tenant), utcnow(), _item_id("policies", item_id)
    with _db().engine.begin() as conn:
        posture_status.lock_tenant(conn, tenant_id)
        old = conn.execute(select(PS).where(PS.c.tenant_id == tenant_id, PS.c.id == policy_id)).first()
        if old is None:
            raise NotFound(f"policy '{item_id[:40]}' not found")
        for name in ("severity", "control"):
            if data.get(name) is not None and old.scope != "recommendationType":
                raise BadRequest(f"{name}: only a recommendationType entry has a {name}", code="invalidBody",
                                 details={name: [f"only a recommendationType entry has a {name}"]})
        _check_control(conn, tenant_id, data.get("control"))
        conn.execute(update(PS).where(PS.c.id == policy_id).values(updated_at=now, updated_by=g.caller.client_id,
                                                                     **data))
        changed = _settle_policy(conn, tenant_id, f"policy {policy_id} updated")
        before = {name: getattr(old, name) for name in data}
        conn.execute(EV.insert().values(**_event(tenant_id, "policy", policy_id, "updated", now,
                                                 {"before": before, "after": data, "changedTypes": changed})))
    body = _get_one(tenant, "policies", str(policy_id))
    body["changedTypeCount"] = changed
    return jsonify(body)


@require_scope("posture.manage")
def delete_policy(tenant: str, item_id: str):
    """Remove a policy entry: what it concerned returns to the defaults (enabled, computed severity)."""
    _only(())
    tenant_id, now, policy_id = _tenant_id(tenant), utcnow(), _item_id("policies", item_id)
    with _db().engine.begin() as conn:
        posture_status.lock_tenant(conn, tenant_id)
        old = conn.execute(select(PS).where(PS.c.tenant_id == tenant_id, PS.c.id == policy_id)).first()
        if old is None:
            raise NotFound(f"policy '{item_id[:40]}' not found")
        conn.execute(delete(PS).where(PS.c.id == policy_id))
        changed = _settle_policy(conn, tenant_id, f"policy {policy_id} deleted")
        conn.execute(EV.insert().values(**_event(
            tenant_id, "policy", policy_id, "deleted", now,
            {"scope": old.scope, "target": old.target, "enabled": old.enabled, "severity": old.severity,
             "control": old.control, "changedTypes": changed})))
    return _no_content()


# -- exemptions -------------------------------------------------------------------------------------


class ExemptionIn(Schema):
    class Meta:
        unknown = RAISE

    displayName = fields.String(required=True, validate=validate.Length(min=1, max=200))
    description = fields.String(allow_none=True, validate=validate.Length(max=4000))
    category = fields.String(required=True, validate=validate.OneOf(posture_exemptions.CATEGORIES))
    recommendationType = fields.String(allow_none=True, validate=validate.Length(min=1, max=300))
    resourceId = fields.String(allow_none=True, validate=validate.Regexp(r"^[0-9]{1,18}$", error="an id such as '42'"))
    resourceFilter = fields.String(allow_none=True, validate=validate.Length(min=1, max=2000))
    expiresOn = fields.AwareDateTime(allow_none=True, default_timezone=UTC)

    @validates_schema
    def _scope(self, data, **kwargs):
        if data.get("resourceId") is not None and data.get("resourceFilter") is not None:
            raise ValidationError("give resourceId or resourceFilter, not both", "resourceFilter")
        if not any(data.get(name) is not None for name in ("recommendationType", "resourceId", "resourceFilter")):
            raise ValidationError("an exemption's scope is a recommendationType, a resourceId or a "
                                  "resourceFilter (or a type with one of the others)", "recommendationType")


class ExemptionPatch(Schema):
    class Meta:
        unknown = RAISE

    displayName = fields.String(validate=validate.Length(min=1, max=200))
    description = fields.String(allow_none=True, validate=validate.Length(max=4000))
    category = fields.String(validate=validate.OneOf(posture_exemptions.CATEGORIES))
    expiresOn = fields.AwareDateTime(allow_none=True, default_timezone=UTC)


@require_scope("posture.manage")
def create_exemption(tenant: str):
    """Exempt recommendations in a scope; they are NotApplicable (cause Exempt) at once, and so is
    every later one in the scope, until the exemption expires or is deleted."""
    _only(())
    data = _body(ExemptionIn())
    tenant_id, now = _tenant_id(tenant), utcnow()
    if data.get("expiresOn") is not None and data["expiresOn"] <= now:
        raise BadRequest("expiresOn: must be in the future", code="invalidBody",
                         details={"expiresOn": ["must be in the future"]})
    with _db().engine.begin() as conn:
        type_id = None
        if data.get("recommendationType") is not None:
            type_id = conn.execute(select(RT.c.id).where(RT.c.tenant_id == tenant_id,
                                                         RT.c.key == data["recommendationType"])).scalar()
            if type_id is None:
                raise BadRequest(f"recommendationType: the tenant has no type '{data['recommendationType'][:100]}'",
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
            updated_at=now, created_by=g.caller.client_id, updated_by=g.caller.client_id,
        ).returning(EX.c.id)).scalar_one()
        matched = posture_exemptions.apply(conn, tenant_id, exemption_id, actor=g.caller.client_id, now=now)
    return _created("exemptions", "collections.get_exemptions", tenant, exemption_id,
                    {"matchedRecommendationCount": matched})


@require_scope("posture.manage")
def patch_exemption(tenant: str, item_id: str):
    """Change an active exemption's name, description, category or expiry (its scope is fixed: make
    a new exemption for another scope).  An expiry in the past ends it now."""
    _only(())
    data = _body(ExemptionPatch(), partial=True)
    tenant_id, now, exemption_id = _tenant_id(tenant), utcnow(), _item_id("exemptions", item_id)
    values = {column: data[name] for name, column in (("displayName", "display_name"), ("description", "description"),
                                                       ("category", "category"), ("expiresOn", "expires_on"))
              if name in data}
    with _db().engine.begin() as conn:
        posture_status.lock_tenant(conn, tenant_id)
        old = conn.execute(select(EX).where(EX.c.tenant_id == tenant_id, EX.c.id == exemption_id)).first()
        if old is None:
            raise NotFound(f"exemption '{item_id[:40]}' not found")
        if old.expired_at is not None:
            raise Conflict(f"exemption '{exemption_id}' has expired: create a new one")
        conn.execute(update(EX).where(EX.c.id == exemption_id).values(updated_at=now,
                                                                     updated_by=g.caller.client_id, **values))
        conn.execute(EV.insert().values(**_event(tenant_id, "exemption", exemption_id, "updated", now, {
            "before": {name: _plain(getattr(old, name)) for name in values},
            "after": {name: _plain(value) for name, value in values.items()}})))
        if values.get("expires_on") is not None and values["expires_on"] <= now:
            conn.execute(update(EX).where(EX.c.id == exemption_id).values(expired_at=now))
            posture_exemptions.release(conn, tenant_id, exemption_id, event="expired", actor=g.caller.client_id,
                                       now=now)
    return jsonify(_get_one(tenant, "exemptions", str(exemption_id)))


def _plain(value):
    return value.isoformat() if isinstance(value, datetime) else value


@require_scope("posture.manage")
def delete_exemption(tenant: str, item_id: str):
    """Delete an exemption: the recommendations it covered return to their real status at once."""
    _only(())
    tenant_id, now, exemption_id = _tenant_id(tenant), utcnow(), _item_id("exemptions", item_id)
    with _db().engine.begin() as conn:
        posture_status.lock_tenant(conn, tenant_id)
        old = conn.execute(select(EX).where(EX.c.tenant_id == tenant_id, EX.c.id == exemption_id)).first()
        if old is None:
            raise NotFound(f"exemption '{item_id[:40]}' not found")
        conn.execute(delete(EX).where(EX.c.id == exemption_id))
        posture_exemptions.release(conn, tenant_id, exemption_id, event="deleted", actor=g.caller.client_id,
                                   now=now)
    return _no_content()


blueprint.add_url_rule("/policies", "create_policy", create_policy, methods=["POST"])
blueprint.add_url_rule("/policies/<item_id>", "patch_policy", patch_policy, methods=["PATCH"])
blueprint.add_url_rule("/policies/<item_id>", "delete_policy", delete_policy, methods=["DELETE"])
blueprint.add_url_rule("/exemptions", "create_exemption", create_exemption, methods=["POST"])
blueprint.add_url_rule("/exemptions/<item_id>", "patch_exemption", patch_exemption, methods=["PATCH"])
blueprint.add_url_rule("/exemptions/<item_id>", "delete_exemption", delete_exemption, methods=["DELETE"])
