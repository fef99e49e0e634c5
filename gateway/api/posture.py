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

from gateway.api.collections import _get_one, _item_id, _only, _tenant_id
from gateway.api.posture_collections import POLICY_SCOPES, SEVERITIES
from gateway.auth import require_scope
from gateway.errors import BadRequest
from gateway.posture import edits
from gateway.posture import exemptions as posture_exemptions

PREFIX = "/api/v1/tenants/<tenant>/security"
blueprint = Blueprint("posture", __name__, url_prefix=PREFIX)


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
    """The event row of an edit by the calling client (the posture edits' own: edits.event)."""
    return edits.event(tenant_id, subject, subject_id, event, now, g.caller.client_id, details)


def _plain(value):
    return value.isoformat() if isinstance(value, datetime) else value


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


@require_scope("posture.manage")
def create_policy(tenant: str):
    """Add an entry to the tenant's security policy; the recommendations it concerns change now."""
    _only(())
    data = _body(PolicyIn())
    tenant_id = _tenant_id(tenant)
    with _db().engine.begin() as conn:
        policy_id, changed = edits.create_policy(conn, tenant_id, data, actor=g.caller.client_id)
    return _created("policies", "collections.get_policies", tenant, policy_id, {"changedTypeCount": changed})


@require_scope("posture.manage")
def patch_policy(tenant: str, item_id: str):
    """Change a policy entry (enabled, severity, control, description)."""
    _only(())
    data = _body(PolicyPatch(), partial=True)
    tenant_id, policy_id = _tenant_id(tenant), _item_id("policies", item_id)
    with _db().engine.begin() as conn:
        changed = edits.update_policy(conn, tenant_id, policy_id, data, actor=g.caller.client_id,
                                      shown=item_id)
    body = _get_one(tenant, "policies", str(policy_id))
    body["changedTypeCount"] = changed
    return jsonify(body)


@require_scope("posture.manage")
def delete_policy(tenant: str, item_id: str):
    """Remove a policy entry: what it concerned returns to the defaults (enabled, computed severity)."""
    _only(())
    tenant_id, policy_id = _tenant_id(tenant), _item_id("policies", item_id)
    with _db().engine.begin() as conn:
        edits.delete_policy(conn, tenant_id, policy_id, actor=g.caller.client_id, shown=item_id)
    return _no_content()


# -- exemptions -------------------------------------------------------------------------------------


class ExemptionIn(Schema):
    class Meta:
        unknown = RAISE

    displayName = fields.String(required=True, validate=validate.Length(min=1, max=200))
    description = fields.String(allow_none=True, validate=validate.Length(max=4000))
    category = fields.String(required=True, validate=validate.OneOf(posture_exemptions.CATEGORIES))
    recommendationType = fields.String(allow_none=True, validate=validate.Length(min=1, max=300))
    resourceId = fields.String(allow_none=True,
                               validate=validate.Regexp(r"^[0-9]{1,18}$", error="an id such as '42'"))
    resourceFilter = fields.String(allow_none=True, validate=validate.Length(min=1, max=2000))
    expiresOn = fields.AwareDateTime(allow_none=True, default_timezone=UTC)

    @validates_schema
    def _scope(self, data, **kwargs):
        if data.get("resourceId") is not None and data.get("resourceFilter") is not None:
            raise ValidationError("give resourceId or resourceFilter, not both", "resourceFilter")
        if all(data.get(name) is None for name in ("recommendationType", "resourceId", "resourceFilter")):
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
    tenant_id = _tenant_id(tenant)
    with _db().engine.begin() as conn:
        exemption_id, matched = edits.create_exemption(conn, tenant_id, data, actor=g.caller.client_id)
    return _created("exemptions", "collections.get_exemptions", tenant, exemption_id,
                    {"matchedRecommendationCount": matched})


@require_scope("posture.manage")
def patch_exemption(tenant: str, item_id: str):
    """Change an active exemption's name, description, category or expiry (its scope is fixed: make
    a new exemption for another scope).  An expiry in the past ends it now."""
    _only(())
    data = _body(ExemptionPatch(), partial=True)
    tenant_id, exemption_id = _tenant_id(tenant), _item_id("exemptions", item_id)
    with _db().engine.begin() as conn:
        edits.update_exemption(conn, tenant_id, exemption_id, data, actor=g.caller.client_id, shown=item_id)
    return jsonify(_get_one(tenant, "exemptions", str(exemption_id)))


@require_scope("posture.manage")
def delete_exemption(tenant: str, item_id: str):
    """Delete an exemption: the recommendations it covered return to their real status at once."""
    _only(())
    tenant_id, exemption_id = _tenant_id(tenant), _item_id("exemptions", item_id)
    with _db().engine.begin() as conn:
        edits.delete_exemption(conn, tenant_id, exemption_id, actor=g.caller.client_id, shown=item_id)
    return _no_content()


blueprint.add_url_rule("/policies", "create_policy", create_policy, methods=["POST"])
blueprint.add_url_rule("/policies/<item_id>", "patch_policy", patch_policy, methods=["PATCH"])
blueprint.add_url_rule("/policies/<item_id>", "delete_policy", delete_policy, methods=["DELETE"])
blueprint.add_url_rule("/exemptions", "create_exemption", create_exemption, methods=["POST"])
blueprint.add_url_rule("/exemptions/<item_id>", "patch_exemption", patch_exemption, methods=["PATCH"])
blueprint.add_url_rule("/exemptions/<item_id>", "delete_exemption", delete_exemption, methods=["DELETE"])
