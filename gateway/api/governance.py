"""Governance edits under ``/api/v1/tenants/<tenant>/security`` (scope ``posture.manage``):
governance rules (``governanceRules``, and ``.../{id}/apply`` to assign the Unhealthy
recommendations that have no owner yet) and assignments (``governanceAssignments``: an owner and
a due date on one recommendation, by hand).  Reads are the OData collections of
gateway/api/governance_collections.py; what rules do on merges is gateway/posture/governance.py.

Each edit is an event (subject ``governanceRule`` or ``governanceAssignment``) naming the client.
"""

from __future__ import annotations

from datetime import UTC

from flask import Blueprint, g, jsonify, request
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema
from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.exc import IntegrityError

from connectors.model import SEVERITIES
from gateway.api.collections import _get_one, _item_id, _only, _tenant_id
from gateway.api.posture import _created, _db, _event, _no_content, _plain
from gateway.auth import require_scope
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.models import (
    GovernanceAssignment,
    GovernanceRule,
    LifecycleEvent,
    Recommendation,
    RecommendationType,
    utcnow,
)
from gateway.posture import governance
from gateway.posture import status as posture_status
from gateway.posture.exemptions import resource_query

PREFIX = "/api/v1/tenants/<tenant>/security"
blueprint = Blueprint("governance", __name__, url_prefix=PREFIX)
GR, GA, EV = GovernanceRule.__table__, GovernanceAssignment.__table__, LifecycleEvent.__table__
R, RT = Recommendation.__table__, RecommendationType.__table__
TIMEFRAME = r"^(?:[0-9]{1,4}\.)?[0-9]{1,2}:[0-9]{2}:[0-9]{2}$"
MAX_PRIORITY = 1000


def _flatten(messages, path: str = "") -> list[tuple[str, str]]:
    """marshmallow's nested messages as (``conditionSets[0].conditions[1].value``, message) pairs."""
    if isinstance(messages, dict):
        out = []
        for key, value in messages.items():
            step = f"[{key}]" if isinstance(key, int) else (f".{key}" if path else str(key))
            out.extend(_flatten(value, path + step))
        return out
    if isinstance(messages, list) and all(isinstance(item, str) for item in messages):
        return [(path or "body", " ".join(messages))]
    return [(path or "body", str(messages))]


def _body(schema: Schema) -> dict:
    """The body loaded by ``schema`` (the Patch schemas require nothing themselves, and not loading
    them ``partial`` keeps what nested objects require: an ``ownerSource`` has a type and a value)."""
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict) or not payload:
        raise BadRequest("the body must be a JSON object", code="invalidBody")
    try:
        return schema.load(payload)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        pairs = _flatten(messages)
        raise BadRequest(
            "invalid fields: " + "; ".join(f"{path}: {message}" for path, message in pairs),
            code="invalidBody",
            details={path: message for path, message in pairs},
        ) from None


def _invalid(field: str, message: str) -> BadRequest:
    return BadRequest(f"{field}: {message}", code="invalidBody", details={field: message})


# -- input schemas ----------------------------------------------------------------------------------


class TextOrTexts(fields.Field):
    """A condition's value: one string (``Equals``, ``Matches``), or a list of them (``In``)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) and 0 < len(value) <= 2000:
            return value
        if (
            isinstance(value, list)
            and 0 < len(value) <= 100
            and all(isinstance(item, str) and 0 < len(item) <= 300 for item in value)
        ):
            return list(value)
        raise ValidationError(
            "a non-empty string (at most 2000 characters), or a list of 1 to 100 of them "
            "(at most 300 characters each)"
        )


class GovernanceConditionIn(Schema):
    class Meta:
        unknown = RAISE

    property = fields.String(required=True, validate=validate.OneOf(governance.PROPERTIES))
    operator = fields.String(required=True, validate=validate.OneOf(("Equals", "In", "Matches")))
    value = TextOrTexts(required=True)

    @validates_schema
    def _consistent(self, data, **kwargs):
        prop, operator, value = data.get("property"), data.get("operator"), data.get("value")
        if prop is None or operator is None or value is None:
            return
        if operator not in governance.OPERATORS[prop]:
            raise ValidationError(f"{prop} takes {' or '.join(governance.OPERATORS[prop])}", "operator")
        if (operator == "In") != isinstance(value, list):
            raise ValidationError("In takes a list of values, Equals and Matches one string", "value")
        if prop == "severity":
            wrong = [
                item for item in (value if isinstance(value, list) else [value]) if item not in SEVERITIES
            ]
            if wrong:
                raise ValidationError(
                    f"'{wrong[0][:40]}' is not a severity ({', '.join(SEVERITIES)})", "value"
                )


class GovernanceConditionSetIn(Schema):
    class Meta:
        unknown = RAISE

    conditions = fields.List(
        fields.Nested(GovernanceConditionIn), required=True, validate=validate.Length(min=1, max=20)
    )


class GovernanceOwnerSourceIn(Schema):
    class Meta:
        unknown = RAISE

    type = fields.String(required=True, validate=validate.OneOf(governance.OWNER_SOURCES))
    value = fields.String(required=True, validate=validate.Length(min=1, max=320))


class GovernanceEmailNotificationIn(Schema):
    class Meta:
        unknown = RAISE

    disableManagerEmailNotification = fields.Boolean()
    disableOwnerEmailNotification = fields.Boolean()


class GovernanceRulePatch(Schema):
    class Meta:
        unknown = RAISE

    displayName = fields.String(validate=validate.Length(min=1, max=200))
    description = fields.String(allow_none=True, validate=validate.Length(max=4000))
    rulePriority = fields.Integer(strict=True, validate=validate.Range(min=0, max=MAX_PRIORITY))
    ruleType = fields.String(validate=validate.OneOf(governance.RULE_TYPES))
    sourceResourceType = fields.String(validate=validate.OneOf(governance.SOURCE_RESOURCE_TYPES))
    conditionSets = fields.List(fields.Nested(GovernanceConditionSetIn), validate=validate.Length(max=20))
    ownerSource = fields.Nested(GovernanceOwnerSourceIn)
    remediationTimeframe = fields.String(
        validate=validate.Regexp(
            TIMEFRAME, error="a duration such as '7.00:00:00' (days.hours:minutes:seconds)"
        )
    )
    isGracePeriod = fields.Boolean()
    governanceEmailNotification = fields.Nested(GovernanceEmailNotificationIn)
    isDisabled = fields.Boolean()

    @validates_schema
    def _timeframe(self, data, **kwargs):
        if data.get("remediationTimeframe") is not None:
            try:
                governance.parse_timeframe(data["remediationTimeframe"])
            except ValueError as exc:
                raise ValidationError(str(exc), "remediationTimeframe") from None


class GovernanceRuleIn(GovernanceRulePatch):
    displayName = fields.String(required=True, validate=validate.Length(min=1, max=200))
    rulePriority = fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=MAX_PRIORITY)
    )
    conditionSets = fields.List(
        fields.Nested(GovernanceConditionSetIn), required=True, validate=validate.Length(max=20)
    )
    ownerSource = fields.Nested(GovernanceOwnerSourceIn, required=True)
    remediationTimeframe = fields.String(
        required=True,
        validate=validate.Regexp(
            TIMEFRAME, error="a duration such as '7.00:00:00' (days.hours:minutes:seconds)"
        ),
    )


class GovernanceApplyIn(Schema):
    class Meta:
        unknown = RAISE

    dryRun = fields.Boolean()


class GovernanceEtaIn(Schema):
    class Meta:
        unknown = RAISE

    eta = fields.AwareDateTime(required=True, default_timezone=UTC)
    justification = fields.String(allow_none=True, validate=validate.Length(max=2000))


class GovernanceAdditionalDataIn(Schema):
    class Meta:
        unknown = RAISE

    ticketNumber = fields.Integer(allow_none=True, strict=True, validate=validate.Range(min=0, max=2**31 - 1))
    ticketLink = fields.String(allow_none=True, validate=validate.Length(max=2000))
    ticketStatus = fields.String(allow_none=True, validate=validate.Length(max=100))


class GovernanceAssignmentPatch(Schema):
    class Meta:
        unknown = RAISE

    owner = fields.String(validate=validate.Length(min=1, max=320))
    remediationDueDate = fields.AwareDateTime(default_timezone=UTC)
    isGracePeriod = fields.Boolean()
    remediationEta = fields.Nested(GovernanceEtaIn, allow_none=True)
    additionalData = fields.Nested(GovernanceAdditionalDataIn)


class GovernanceAssignmentIn(GovernanceAssignmentPatch):
    recommendationId = fields.String(
        required=True, validate=validate.Regexp(r"^[0-9]{1,18}$", error="an id such as '42'")
    )
    owner = fields.String(required=True, validate=validate.Length(min=1, max=320))
    remediationDueDate = fields.AwareDateTime(required=True, default_timezone=UTC)


# -- rules ----------------------------------------------------------------------------------------

_RULE_COLUMNS = {
    "displayName": "display_name",
    "description": "description",
    "rulePriority": "rule_priority",
    "ruleType": "rule_type",
    "sourceResourceType": "source_resource_type",
    "conditionSets": "condition_sets",
    "isGracePeriod": "is_grace_period",
    "isDisabled": "is_disabled",
}


def _rule_values(data: dict) -> dict:
    values = {column: data[name] for name, column in _RULE_COLUMNS.items() if name in data}
    if "ownerSource" in data:
        values["owner_source_type"] = data["ownerSource"]["type"]
        values["owner_source_value"] = data["ownerSource"]["value"]
    if "remediationTimeframe" in data:
        values["remediation_seconds"] = governance.parse_timeframe(data["remediationTimeframe"])
    if "governanceEmailNotification" in data:
        values["email_notification"] = dict(data["governanceEmailNotification"])
    return values


def _check_conditions(conn, tenant_id: int, condition_sets: list | None) -> None:
    """A resource filter that is not one is a 400 naming the condition."""
    for i, condition_set in enumerate(condition_sets or ()):
        for j, condition in enumerate(condition_set["conditions"]):
            if condition["property"] == "resourceFilter":
                try:
                    resource_query(conn, tenant_id, condition["value"])
                except BadRequest as exc:
                    raise _invalid(f"conditionSets[{i}].conditions[{j}].value", exc.message) from None


def _priority_taken(conn, tenant_id: int, priority: int, rule_id: int | None = None) -> None:
    query = select(GR.c.id).where(GR.c.tenant_id == tenant_id, GR.c.rule_priority == priority)
    if rule_id is not None:
        query = query.where(GR.c.id != rule_id)
    if conn.execute(query).first() is not None:
        raise Conflict(f"rulePriority: another governance rule of the tenant has priority {priority}")


def _matched(conn, tenant_id: int, condition_sets: list) -> int:
    """How many of the tenant's Unhealthy recommendations the conditions match now."""
    condition = governance.rule_sql(conn, tenant_id, condition_sets)
    joined = R.join(RT, and_(RT.c.tenant_id == R.c.tenant_id, RT.c.id == R.c.type_id))
    return conn.execute(
        select(func.count())
        .select_from(joined)
        .where(R.c.tenant_id == tenant_id, R.c.status == "Unhealthy", condition)
    ).scalar_one()


def _rule_event(tenant_id: int, rule_id: int, event: str, now, details: dict) -> dict:
    return _event(tenant_id, governance.RULE_SUBJECT, rule_id, event, now, details)


@require_scope("posture.manage")
def create_rule(tenant: str):
    """Add a governance rule: from now on, new Unhealthy recommendations it matches (and that no rule
    of a lower priority number matches) get its owner and due date."""
    _only(())
    data = _body(GovernanceRuleIn())
    tenant_id, now = _tenant_id(tenant), utcnow()
    values = {
        "rule_type": "Integrated",
        "source_resource_type": "Assessments",
        "is_grace_period": False,
        "is_disabled": False,
        "email_notification": {},
        **_rule_values(data),
    }
    try:
        with _db().engine.begin() as conn:
            _check_conditions(conn, tenant_id, data["conditionSets"])
            _priority_taken(conn, tenant_id, data["rulePriority"])
            rule_id = conn.execute(
                GR.insert()
                .values(
                    tenant_id=tenant_id,
                    created_at=now,
                    updated_at=now,
                    created_by=g.caller.client_id,
                    updated_by=g.caller.client_id,
                    **values,
                )
                .returning(GR.c.id)
            ).scalar_one()
            matched = _matched(conn, tenant_id, data["conditionSets"])
            conn.execute(
                EV.insert().values(
                    **_rule_event(
                        tenant_id,
                        rule_id,
                        "created",
                        now,
                        {
                            "displayName": data["displayName"],
                            "rulePriority": data["rulePriority"],
                            "matched": matched,
                        },
                    )
                )
            )
    except IntegrityError:
        raise Conflict(
            f"rulePriority: another governance rule of the tenant has priority {data['rulePriority']}"
        ) from None
    return _created(
        "governanceRules",
        "collections.get_governanceRules",
        tenant,
        rule_id,
        {"matchedRecommendationCount": matched},
    )


@require_scope("posture.manage")
def patch_rule(tenant: str, item_id: str):
    """Change a governance rule (what it assigned stays as it is)."""
    _only(())
    data = _body(GovernanceRulePatch())
    tenant_id, now, rule_id = _tenant_id(tenant), utcnow(), _item_id("governanceRules", item_id)
    values = _rule_values(data)
    try:
        with _db().engine.begin() as conn:
            old = conn.execute(select(GR).where(GR.c.tenant_id == tenant_id, GR.c.id == rule_id)).first()
            if old is None:
                raise NotFound(f"governanceRule '{item_id[:40]}' not found")
            _check_conditions(conn, tenant_id, data.get("conditionSets"))
            if "rulePriority" in data:
                _priority_taken(conn, tenant_id, data["rulePriority"], rule_id)
            conn.execute(
                update(GR)
                .where(GR.c.id == rule_id)
                .values(updated_at=now, updated_by=g.caller.client_id, **values)
            )
            conn.execute(
                EV.insert().values(
                    **_rule_event(
                        tenant_id,
                        rule_id,
                        "updated",
                        now,
                        {
                            "before": {column: _plain(getattr(old, column)) for column in values},
                            "after": {column: _plain(value) for column, value in values.items()},
                        },
                    )
                )
            )
    except IntegrityError:
        raise Conflict(
            f"rulePriority: another governance rule of the tenant has priority {data.get('rulePriority')}"
        ) from None
    return jsonify(_get_one(tenant, "governanceRules", str(rule_id)))


@require_scope("posture.manage")
def delete_rule(tenant: str, item_id: str):
    """Delete a governance rule; the assignments it made stay (their ``ruleId`` names it still)."""
    _only(())
    tenant_id, now, rule_id = _tenant_id(tenant), utcnow(), _item_id("governanceRules", item_id)
    with _db().engine.begin() as conn:
        old = conn.execute(select(GR).where(GR.c.tenant_id == tenant_id, GR.c.id == rule_id)).first()
        if old is None:
            raise NotFound(f"governanceRule '{item_id[:40]}' not found")
        conn.execute(delete(GR).where(GR.c.id == rule_id))
        conn.execute(
            EV.insert().values(
                **_rule_event(
                    tenant_id,
                    rule_id,
                    "deleted",
                    now,
                    {"displayName": old.display_name, "rulePriority": old.rule_priority},
                )
            )
        )
    return _no_content()


@require_scope("posture.manage")
def apply_rule(tenant: str, item_id: str):
    """Apply the rule to the tenant's Unhealthy recommendations that have no open assignment (those
    from before the rule, which it does not take on its own); ``dryRun`` only counts them."""
    _only(())
    payload = request.get_json(silent=True)
    if payload is None and not request.get_data():
        payload = {}
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object (or empty)", code="invalidBody")
    try:
        dry_run = bool(GovernanceApplyIn().load(payload).get("dryRun", False))
    except ValidationError as exc:
        raise BadRequest(
            "invalid fields: " + "; ".join(f"{k}: {v}" for k, v in exc.messages.items()),
            code="invalidBody",
            details=exc.messages,
        ) from None
    tenant_id, now, rule_id = _tenant_id(tenant), utcnow(), _item_id("governanceRules", item_id)
    with _db().engine.begin() as conn:
        posture_status.lock_tenant(conn, tenant_id)
        rule = conn.execute(select(GR).where(GR.c.tenant_id == tenant_id, GR.c.id == rule_id)).first()
        if rule is None:
            raise NotFound(f"governanceRule '{item_id[:40]}' not found")
        if rule.is_disabled:
            raise Conflict(f"governanceRule '{rule_id}' is disabled: enable it first")
        count = governance.assign_by_rules(
            conn,
            tenant_id,
            [rule],
            candidates=None,
            now=now,
            cause=f"governance rule {rule_id} applied by {g.caller.client_id}",
            actor=g.caller.client_id,
            dry_run=dry_run,
        )
        if not dry_run:
            conn.execute(
                EV.insert().values(**_rule_event(tenant_id, rule_id, "applied", now, {"assigned": count}))
            )
    return jsonify({"id": str(rule_id), "dryRun": dry_run, "assignedCount": count})


# -- assignments ------------------------------------------------------------------------------------


def _assignment_values(data: dict) -> dict:
    values = {}
    for name, column in (
        ("owner", "owner"),
        ("remediationDueDate", "due_date"),
        ("isGracePeriod", "is_grace_period"),
    ):
        if name in data:
            values[column] = data[name]
    if "remediationEta" in data:
        eta = data["remediationEta"]
        values["remediation_eta"] = None if eta is None else eta["eta"]
        values["eta_justification"] = None if eta is None else eta.get("justification")
    if "additionalData" in data:
        values["additional_data"] = {
            key: value for key, value in data["additionalData"].items() if value is not None
        }
    return values


@require_scope("posture.manage")
def create_assignment(tenant: str):
    """Give an Unhealthy recommendation an owner and a due date (one open assignment at a time)."""
    _only(())
    data = _body(GovernanceAssignmentIn())
    tenant_id, now = _tenant_id(tenant), utcnow()
    recommendation_id = int(data["recommendationId"])
    try:
        with _db().engine.begin() as conn:
            assignment_id = governance.assign(conn, tenant_id, recommendation_id, _assignment_values(data),
                                              actor=g.caller.client_id, now=now)
    except IntegrityError:
        raise Conflict(
            f"recommendation '{recommendation_id}' already has an open governance assignment"
        ) from None
    return _created("governanceAssignments", "collections.get_governanceAssignments", tenant, assignment_id)


def _assignment(conn, tenant_id: int, assignment_id: int, item_id: str):
    old = conn.execute(select(GA).where(GA.c.tenant_id == tenant_id, GA.c.id == assignment_id)).first()
    if old is None:
        raise NotFound(f"governanceAssignment '{item_id[:40]}' not found")
    return old


@require_scope("posture.manage")
def patch_assignment(tenant: str, item_id: str):
    """Change an open assignment's owner, due date, grace period, ETA or ticket data."""
    _only(())
    data = _body(GovernanceAssignmentPatch())
    tenant_id, now, assignment_id = _tenant_id(tenant), utcnow(), _item_id("governanceAssignments", item_id)
    values = _assignment_values(data)
    with _db().engine.begin() as conn:
        posture_status.lock_tenant(conn, tenant_id)
        old = _assignment(conn, tenant_id, assignment_id, item_id)
        if old.completed_at is not None:
            raise Conflict(
                f"governanceAssignment '{assignment_id}' is completed: the recommendation was fixed"
            )
        conn.execute(
            update(GA)
            .where(GA.c.id == assignment_id)
            .values(updated_at=now, updated_by=g.caller.client_id, **values)
        )
        conn.execute(
            EV.insert().values(
                **_event(
                    tenant_id,
                    governance.ASSIGNMENT_SUBJECT,
                    assignment_id,
                    "updated",
                    now,
                    {
                        "before": {c: _plain(getattr(old, c)) for c in values},
                        "after": {c: _plain(v) for c, v in values.items()},
                    },
                )
            )
        )
    return jsonify(_get_one(tenant, "governanceAssignments", str(assignment_id)))


@require_scope("posture.manage")
def delete_assignment(tenant: str, item_id: str):
    """Delete an assignment: its recommendation has no governance until another is made."""
    _only(())
    tenant_id, now, assignment_id = _tenant_id(tenant), utcnow(), _item_id("governanceAssignments", item_id)
    with _db().engine.begin() as conn:
        posture_status.lock_tenant(conn, tenant_id)
        old = _assignment(conn, tenant_id, assignment_id, item_id)
        conn.execute(delete(GA).where(GA.c.id == assignment_id))
        conn.execute(
            EV.insert().values(
                **_event(
                    tenant_id,
                    governance.ASSIGNMENT_SUBJECT,
                    assignment_id,
                    "deleted",
                    now,
                    {"recommendationId": str(old.recommendation_id), "owner": old.owner},
                )
            )
        )
    return _no_content()


blueprint.add_url_rule("/governanceRules", "create_rule", create_rule, methods=["POST"])
blueprint.add_url_rule("/governanceRules/<item_id>", "patch_rule", patch_rule, methods=["PATCH"])
blueprint.add_url_rule("/governanceRules/<item_id>", "delete_rule", delete_rule, methods=["DELETE"])
blueprint.add_url_rule("/governanceRules/<item_id>/apply", "apply_rule", apply_rule, methods=["POST"])
blueprint.add_url_rule("/governanceAssignments", "create_assignment", create_assignment, methods=["POST"])
blueprint.add_url_rule(
    "/governanceAssignments/<item_id>", "patch_assignment", patch_assignment, methods=["PATCH"]
)
blueprint.add_url_rule(
    "/governanceAssignments/<item_id>", "delete_assignment", delete_assignment, methods=["DELETE"]
)
