"""Secure Score under ``/api/v1/tenants/<tenant>/security``.

Reads are OData collections served by gateway/api/collections.py (``secureScores``,
``secureScoreControls``, ``secureScoreControlProfiles``: gateway/api/score_collections.py).  Here:

* the edits of control profiles (scope ``posture.manage``): ``POST .../secureScoreControlProfiles``
  adds a custom control, ``PATCH .../secureScoreControlProfiles/{id}`` changes a custom control's
  definition and/or appends Graph ``controlStateUpdates`` (any control; the latest state applies),
  ``DELETE`` removes a custom control no policy entry names.  A new max score or state recounts the
  control in the same transaction (the stored score and its history move with it);
* ``GET .../secureScores/scoped?resourceFilter=<OData $filter on resources>`` (``security.read``):
  the score of the matching resources only, computed on request as the stored score is.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request
from marshmallow import RAISE, Schema, fields, validate
from sqlalchemy import func, select

from gateway.api.collections import _get_one, _item_id, _only, _tenant_id
from gateway.api.posture import _body, _created, _no_content
from gateway.auth import require_scope
from gateway.errors import BadRequest
from gateway.models import utcnow
from gateway.posture import profiles
from gateway.posture.exemptions import resource_query
from gateway.score import profile_edits, upkeep

PREFIX = "/api/v1/tenants/<tenant>/security"
blueprint = Blueprint("score", __name__, url_prefix=PREFIX)
PROFILES = "secureScoreControlProfiles"


def _db():
    return current_app.extensions["gateway.db"]


# -- control profiles -------------------------------------------------------------------------------


class ControlStateUpdateIn(Schema):
    """One of Graph's controlStateUpdates; ``updatedBy`` (the client) and ``updatedDateTime`` (now)
    are stamped by the gateway."""

    class Meta:
        unknown = RAISE

    state = fields.String(required=True, validate=validate.OneOf(profiles.STATES))
    comment = fields.String(allow_none=True, validate=validate.Length(max=2000))
    assignedTo = fields.String(allow_none=True, validate=validate.Length(max=200))


class ControlProfilePatch(Schema):
    class Meta:
        unknown = RAISE

    title = fields.String(validate=validate.Length(min=1, max=200))
    description = fields.String(allow_none=True, validate=validate.Length(max=4000))
    maxScore = fields.Float(validate=validate.Range(min=0, max=1000))
    controlCategory = fields.String(allow_none=True, validate=validate.Length(min=1, max=50))
    controlStateUpdates = fields.List(fields.Nested(ControlStateUpdateIn),
                                      validate=validate.Length(min=1, max=10))


class ControlProfileIn(Schema):
    class Meta:
        unknown = RAISE

    id = fields.String(validate=validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                                                error="letters, digits, '.', '_' and '-', at most 100"))
    title = fields.String(required=True, validate=validate.Length(min=1, max=200))
    description = fields.String(allow_none=True, validate=validate.Length(max=4000))
    maxScore = fields.Float(required=True, validate=validate.Range(min=0, max=1000))
    controlCategory = fields.String(allow_none=True, validate=validate.Length(min=1, max=50))


@require_scope("posture.manage")
def create_control_profile(tenant: str):
    """Add a custom Secure Score control; map recommendation types to it with policy entries."""
    _only(())
    data = _body(ControlProfileIn())
    tenant_id = _tenant_id(tenant)
    with _db().engine.begin() as conn:
        control = profile_edits.create(conn, tenant_id, data, actor=g.caller.client_id, now=utcnow())
    return _created(PROFILES, f"collections.get_{PROFILES}", tenant, control)


@require_scope("posture.manage")
def patch_control_profile(tenant: str, item_id: str):
    """Append control state updates (any control) or change a custom control's definition."""
    _only(())
    data = _body(ControlProfilePatch())  # no field is required (partial would reach the nested ones)
    tenant_id, control = _tenant_id(tenant), _item_id(PROFILES, item_id)
    with _db().engine.begin() as conn:
        profile_edits.edit(conn, tenant_id, control, data, actor=g.caller.client_id, now=utcnow())
    return jsonify(_get_one(tenant, PROFILES, control))


@require_scope("posture.manage")
def delete_control_profile(tenant: str, item_id: str):
    """Delete a custom control (409 while the security policy names it)."""
    _only(())
    tenant_id, control = _tenant_id(tenant), _item_id(PROFILES, item_id)
    with _db().engine.begin() as conn:
        profile_edits.remove(conn, tenant_id, control, actor=g.caller.client_id, now=utcnow())
    return _no_content()


# -- the score of a scope -----------------------------------------------------------------------------


def _bad_filter(message: str, code: str = "invalidParameter") -> BadRequest:
    return BadRequest(f"resourceFilter: {message}", code=code, details={"resourceFilter": [message]})


@require_scope("security.read")
def scoped_secure_score(tenant: str):
    """The Secure Score of the tenant's resources matching an OData $filter on resources, now."""
    _only(("resourceFilter",))
    given = request.args.getlist("resourceFilter")
    if len(given) != 1 or not given[0].strip():
        raise _bad_filter("give one OData $filter on resources, e.g. tags/any(t: t eq 'pci')")
    tenant_id = _tenant_id(tenant)
    with _db().engine.connect() as conn:
        try:
            resources = resource_query(conn, tenant_id, given[0])
        except BadRequest as exc:
            raise _bad_filter(exc.message, exc.code) from None
        score = upkeep.scoped_score(conn, tenant_id, resources)
        matched = conn.execute(select(func.count()).select_from(resources.subquery())).scalar_one()
    return jsonify({
        "resourceFilter": given[0], "resourceCount": matched, "currentScore": score["current"],
        "maxScore": score["max"], "percentage": score["percentage"], "controlScores": score["control_scores"],
        "createdDateTime": utcnow().isoformat(),
    })


blueprint.add_url_rule(f"/{PROFILES}", "create_control_profile", create_control_profile, methods=["POST"])
blueprint.add_url_rule(f"/{PROFILES}/<item_id>", "patch_control_profile", patch_control_profile,
                       methods=["PATCH"])
blueprint.add_url_rule(f"/{PROFILES}/<item_id>", "delete_control_profile", delete_control_profile,
                       methods=["DELETE"])
blueprint.add_url_rule("/secureScores/scoped", "scoped_secure_score", scoped_secure_score, methods=["GET"])
