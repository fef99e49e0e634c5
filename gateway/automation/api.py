"""``/api/v1/tenants/<tenant>/automations``: workflow automation rules (scope ``exports.manage``).

The list is an OData collection (``$filter``, ``$orderby``, ``$top``, ``$skiptoken``, ``$count``,
``$select`` through gateway/query.py).  Each rule carries an ETag (``"<id>.<version>"``, also its
``etag`` field); ``PATCH`` and ``DELETE`` need ``If-Match`` with it (``428`` without, ``412`` when
stale), as for exports.  The rule's webhook signing secret (``whsec_...``) is in the answer that
creates it only.  ``POST .../test`` is a dry run on one event (the one named, else the tenant's
latest that the trigger's event types name): whether the trigger matches it and what each action
would do; nothing is sent or written.  Rules run in the workers (gateway/automation/runner.py).
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request, url_for
from marshmallow import Schema
from sqlalchemy import func, select, update

from gateway.api import exports as export_api
from gateway.auth import require_scope
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.export import delivery, subjects
from gateway.export import events as outbox
from gateway.export import secrets as export_secrets
from gateway.models import AutomationActionDone, AutomationRule, LifecycleEvent, Tenant, utcnow
from gateway.odata import Field, FilterContext
from gateway.query import Collection, OrderField, count, parse_list_args, run_list

from . import actions, runner
from .schemas import AutomationIn, AutomationOut, AutomationPatch, AutomationTestIn

blueprint = Blueprint("automations", __name__, url_prefix="/api/v1/tenants/<tenant>")
RULE, DONE, EV, TEN = (
    AutomationRule.__table__,
    AutomationActionDone.__table__,
    LifecycleEvent.__table__,
    Tenant.__table__,
)
LOOK_BACK = 1000  # events searched for a dry run's sample
_DUMP = AutomationOut(many=True).dump


def _serialize(conn, tenant_id, rows, selected) -> list[dict]:
    return _DUMP([row._asdict() for row in rows])


COLLECTION = Collection(
    name="automations",
    base=lambda tenant_id: select(RULE).where(RULE.c.tenant_id == tenant_id),
    id_column=RULE.c.id,
    fields={
        "id": Field(RULE.c.id, "id"),
        "displayName": Field(RULE.c.display_name, "string"),
        "description": Field(RULE.c.description, "string", nullable=True),
        "enabled": Field(RULE.c.enabled, "bool"),
        "filter": Field(RULE.c.filter, "string", nullable=True),
        "lastError": Field(RULE.c.last_error, "string", nullable=True),
        "lastErrorDateTime": Field(RULE.c.last_error_at, "datetime", nullable=True),
        "state": Field(RULE.c.state, "enum", values=("active", "failing")),
        "firedEvents": Field(RULE.c.fired_events, "number"),
        "createdDateTime": Field(RULE.c.created_at, "datetime"),
        "lastModifiedDateTime": Field(RULE.c.updated_at, "datetime"),
    },
    order_fields={
        "id": OrderField(RULE.c.id, "int"),
        "displayName": OrderField(RULE.c.display_name, "str"),
        "createdDateTime": OrderField(RULE.c.created_at, "datetime"),
        "lastModifiedDateTime": OrderField(RULE.c.updated_at, "datetime"),
    },
    default_order=(("id", False),),
    selectable=tuple(AutomationOut().fields),
    serialize=_serialize,
)


def _db():
    return current_app.extensions["gateway.db"]


def _load(schema: Schema, optional: bool = False) -> dict:
    return export_api._load(schema, optional)


def _row(conn, tenant_id: int, rule_id: str, for_update: bool = False):
    if not (rule_id.isascii() and rule_id.isdigit()) or len(rule_id) > 9:
        raise NotFound(f"automation '{rule_id[:40]}' not found")
    query = select(RULE).where(RULE.c.tenant_id == tenant_id, RULE.c.id == int(rule_id))
    if for_update and _db().is_postgres:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"automation '{rule_id[:40]}' not found")
    return row


def _answer(row, status: int = 200, extra: dict | None = None):
    body = AutomationOut().dump(row._asdict())
    body.update(extra or {})
    response = jsonify(body)
    response.status_code = status
    response.headers["ETag"] = export_api._etag(row)
    return response


def _check(conn, tenant_id: int, data: dict, existing=None) -> None:
    """The trigger's filter and the actions, against the tenant and the settings."""
    patterns = data.get("eventTypes", existing.event_types if existing is not None else ["*"])
    text = data.get("filter", existing.filter if existing is not None else None)
    if text is not None:
        subject_types = subjects.check_filter(text, patterns, conn.dialect.name)
    else:
        subject_types = subjects.subjects_for(patterns)
    acts = data.get("actions", existing.actions if existing is not None else [])
    actions.check(
        conn, tenant_id, acts, subject_types, bool(current_app.config["EXPORT_ALLOW_PRIVATE_TARGETS"])
    )


@require_scope("exports.manage")
def list_automations(tenant: str):
    """The tenant's rules (an OData collection), with their last error."""
    tenant_id = export_api._tenant(tenant).id
    config = current_app.config
    context = FilterContext(tenant_id=tenant_id, dialect=_db().engine.dialect.name)
    if "$format" in request.args:
        raise BadRequest("'$format' does not apply to automations", code="invalidParameter")
    list_request = parse_list_args(
        COLLECTION, request.args, context, config["PAGE_SIZE_DEFAULT"], config["PAGE_SIZE_MAX"]
    )
    with _db().engine.connect() as conn:
        total = count(conn, COLLECTION, tenant_id, list_request) if list_request.count else None
        values, token = run_list(
            conn, COLLECTION, tenant_id, list_request, config["SECRET_KEY"], request.args.get("$skiptoken")
        )
    body: dict = {}
    if total is not None:
        body["@odata.count"] = total
    body["value"] = values
    if token:
        args = request.args.to_dict()
        args.pop("$skip", None)
        args["$skiptoken"] = token
        body["@odata.nextLink"] = url_for(
            "automations.list_automations", tenant=tenant, _external=True, **args
        )
    return jsonify(body)


@require_scope("exports.manage")
def create_automation(tenant: str):
    """Add a rule; it acts on the events committed from now on.  Its signing secret is in this answer only."""
    export_api._only()
    data = _load(AutomationIn())
    tenant_id = export_api._tenant(tenant).id
    secret = export_secrets.new_webhook_secret()
    now = utcnow()
    with _db().engine.begin() as conn:
        _check(conn, tenant_id, data)
        existing = conn.execute(
            select(func.count()).select_from(RULE).where(RULE.c.tenant_id == tenant_id)
        ).scalar_one()
        if existing >= current_app.config["AUTOMATION_MAX_RULES"]:
            raise Conflict(
                f"the tenant has {existing} automations, the most it may have "
                "(GATEWAY_AUTOMATION_MAX_RULES): delete one first"
            )
        latest = conn.execute(select(func.max(EV.c.seq)).where(EV.c.tenant_id == tenant_id)).scalar() or 0
        rule_id = conn.execute(
            RULE.insert()
            .values(
                tenant_id=tenant_id,
                display_name=data["displayName"],
                description=data.get("description"),
                enabled=data.get("enabled", True),
                event_types=data.get("eventTypes", ["*"]),
                filter=data.get("filter"),
                actions=data["actions"],
                secret=export_secrets.seal(current_app.config, secret),
                secret_hint=export_secrets.hint(secret),
                version=1,
                cursor_seq=latest,
                attempts=0,
                fired_events=0,
                created_at=now,
                created_by=g.caller.client_id,
                updated_at=now,
                updated_by=g.caller.client_id,
            )
            .returning(RULE.c.id)
        ).scalar_one()
        row = _row(conn, tenant_id, str(rule_id))
    response = _answer(row, 201, {"secret": secret})
    response.headers["Location"] = url_for(
        "automations.get_automation", tenant=tenant, rule_id=rule_id, _external=True
    )
    return response


@require_scope("exports.manage")
def get_automation(tenant: str, rule_id: str):
    """One rule, with its progress and last error."""
    export_api._only()
    tenant_id = export_api._tenant(tenant).id
    with _db().engine.connect() as conn:
        row = _row(conn, tenant_id, rule_id)
    return _answer(row)


@require_scope("exports.manage")
def update_automation(tenant: str, rule_id: str):
    """Change a rule (``If-Match`` required); ``enabled: true`` also retries a failing rule now."""
    export_api._only()
    data = _load(AutomationPatch())
    if not data:
        raise BadRequest("the body names no field to change", code="invalidBody")
    tenant_id = export_api._tenant(tenant).id
    now = utcnow()
    with _db().engine.begin() as conn:
        row = _row(conn, tenant_id, rule_id, for_update=True)
        export_api._if_match(row, "automation")
        _check(conn, tenant_id, data, row)
        values = {"updated_at": now, "updated_by": g.caller.client_id, "version": row.version + 1}
        for name, column in (
            ("displayName", "display_name"),
            ("description", "description"),
            ("enabled", "enabled"),
            ("eventTypes", "event_types"),
            ("filter", "filter"),
            ("actions", "actions"),
        ):
            if name in data:
                values[column] = data[name]
        if data.get("enabled") is True:
            values["next_attempt_at"] = None
        conn.execute(update(RULE).where(RULE.c.id == row.id).values(values))
        row = _row(conn, tenant_id, rule_id)
    return _answer(row)


@require_scope("exports.manage")
def delete_automation(tenant: str, rule_id: str):
    """Delete a rule and its record of actions done (``If-Match`` required)."""
    export_api._only()
    tenant_id = export_api._tenant(tenant).id
    with _db().engine.begin() as conn:
        row = _row(conn, tenant_id, rule_id, for_update=True)
        export_api._if_match(row, "automation")
        conn.execute(DONE.delete().where(DONE.c.rule_id == row.id))
        conn.execute(RULE.delete().where(RULE.c.id == row.id))
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


def _sample(conn, rule, event_id: str | None):
    if event_id is not None:
        if not (event_id.isascii() and event_id.isdigit()):
            raise export_api._invalid("eventId", "an event id such as '42'")
        found = conn.execute(
            select(EV).where(EV.c.tenant_id == rule.tenant_id, EV.c.id == int(event_id))
        ).first()
        if found is None:
            raise export_api._invalid("eventId", f"the tenant has no event {event_id}")
        return found
    recent = conn.execute(
        select(EV).where(EV.c.tenant_id == rule.tenant_id).order_by(EV.c.id.desc()).limit(LOOK_BACK)
    ).all()
    typed = [
        row
        for row in recent
        if outbox.matches_type(rule.event_types or [], outbox.event_type(row.subject_type, row.event))
    ]
    return (runner.matching(conn, rule, typed, 1_000_000) or typed or [None])[0]


@require_scope("exports.manage")
def test_automation(tenant: str, rule_id: str):
    """A dry run on one event: whether the trigger matches and what each action would do."""
    export_api._only()
    data = _load(AutomationTestIn(), optional=True)
    tenant_row = export_api._tenant(tenant)
    with _db().engine.connect() as conn:
        rule = _row(conn, tenant_row.id, rule_id)
        event = _sample(conn, rule, data.get("eventId"))
        if event is None:
            return jsonify(
                {
                    "event": None,
                    "matches": False,
                    "reason": "no event of the trigger's types yet",
                    "actions": [],
                }
            )
        chain_limit = int(current_app.config["AUTOMATION_MAX_CHAIN"])
        typed = runner.triggers(rule, event, chain_limit)
        matches = bool(runner.matching(conn, rule, [event], chain_limit))
        rendered = delivery.render_events(conn, rule.tenant_id, tenant, [event.id])[0]
        planned = [
            {
                "index": index,
                "type": action["type"],
                "alreadyDone": runner.is_done(conn, rule.id, event.id, index),
                "would": actions.describe(conn, rule, event, index, action),
            }
            for index, action in enumerate(rule.actions or [])
        ]
    reason = (
        None
        if matches
        else ("its type or the chain limit" if not typed else "the filter does not match the subject")
    )
    return jsonify({"event": rendered, "matches": matches, "reason": reason, "actions": planned})


blueprint.add_url_rule("/automations", "list_automations", list_automations, methods=["GET"])
blueprint.add_url_rule("/automations", "create_automation", create_automation, methods=["POST"])
blueprint.add_url_rule("/automations/<rule_id>", "get_automation", get_automation, methods=["GET"])
blueprint.add_url_rule("/automations/<rule_id>", "update_automation", update_automation, methods=["PATCH"])
blueprint.add_url_rule("/automations/<rule_id>", "delete_automation", delete_automation, methods=["DELETE"])
blueprint.add_url_rule("/automations/<rule_id>/test", "test_automation", test_automation, methods=["POST"])
