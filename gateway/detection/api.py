"""HTTP: the ``securityEvents`` collection, ``detectionRules`` (list, tune, create custom), the rows
behind a detection alert, and the global KEV catalogue.

Pushing events is ``POST .../batches?format=windows_events|ocsf_events`` (scope ``events.write``),
the batch machinery of findings.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from flask import Blueprint, current_app, g, jsonify, request, url_for
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.datastructures import MultiDict

from gateway.auth import require_scope, tenant_for_caller
from gateway.detection import kev
from gateway.detection import rules as rule_store
from gateway.detection.collection import SECURITY_EVENTS
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.models import Alert, DetectionLink, DetectionRule, utcnow
from gateway.odata import FilterContext
from gateway.query import count, parse_list_args, run_list

blueprint = Blueprint("detection", __name__, url_prefix="/api/v1")
TENANT = "/tenants/<tenant>"
RANGE_ARGS = ("startDateTime", "endDateTime")
DR, A, LINKS = DetectionRule.__table__, Alert.__table__, DetectionLink.__table__


def _db():
    return current_app.extensions["gateway.db"]


def _tenant_id(tenant: str) -> int:
    with _db().sessions() as session:
        return tenant_for_caller(session, tenant).id


def _time_arg(name: str) -> datetime | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"'{name}' must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z", code="invalidParameter"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@blueprint.get(f"{TENANT}/securityEvents")
@require_scope("security.read")
def list_security_events(tenant: str):
    """The tenant's security events in a time range (default: the last SECURITY_EVENTS_DEFAULT_HOURS),
    newest first, with OData ``$filter``, ``$select``, ``$orderby``, ``$top``, ``$count``, keyset paging."""
    tenant_id = _tenant_id(tenant)
    config = current_app.config
    end = _time_arg("endDateTime") or utcnow()
    start = _time_arg("startDateTime") or end - timedelta(hours=int(config["SECURITY_EVENTS_DEFAULT_HOURS"]))
    if start >= end:
        raise BadRequest("'startDateTime' must be before 'endDateTime'", code="invalidParameter")
    if end - start > timedelta(days=int(config["SECURITY_EVENT_RETENTION_DAYS"]) + 1):
        raise BadRequest(
            "the time range may span at most the retention period "
            f"({config['SECURITY_EVENT_RETENTION_DAYS']} days)",
            code="invalidParameter",
        )
    args = MultiDict([(k, v) for k, v in request.args.items(multi=True) if k not in RANGE_ARGS])
    context = FilterContext(tenant_id=tenant_id, dialect=_db().engine.dialect.name)
    listing = parse_list_args(
        SECURITY_EVENTS, args, context, config["PAGE_SIZE_DEFAULT"], config["PAGE_SIZE_MAX"]
    )
    events = SECURITY_EVENTS.id_column.table
    listing.conditions = [events.c.occurred_at >= start, events.c.occurred_at < end] + listing.conditions
    listing.fingerprint = hashlib.sha256(
        f"{listing.fingerprint}\x1f{start.isoformat()}\x1f{end.isoformat()}".encode()
    ).hexdigest()[:24]
    with _db().engine.connect() as conn:
        total = count(conn, SECURITY_EVENTS, tenant_id, listing) if listing.count else None
        values, token = run_list(
            conn, SECURITY_EVENTS, tenant_id, listing, config["SECRET_KEY"], request.args.get("$skiptoken")
        )
    body: dict = {"@odata.context": f"{request.url_root}api/v1/$metadata#securityEvents"}
    if total is not None:
        body["@odata.count"] = total
    body["value"] = values
    if token:
        next_args = request.args.to_dict()
        next_args.pop("$skip", None)
        next_args.update(
            {"$skiptoken": token, "startDateTime": start.isoformat(), "endDateTime": end.isoformat()}
        )
        body["@odata.nextLink"] = url_for(
            "detection.list_security_events", tenant=tenant, _external=True, **next_args
        )
    return jsonify(body)


# -- detection rules -------------------------------------------------------------------------------


def _rules(tenant_id: int) -> dict[str, rule_store.Rule]:
    with _db().engine.connect() as conn:
        return rule_store.for_tenant(conn, tenant_id)


def _rule(tenant_id: int, rule_id: str) -> rule_store.Rule:
    found = _rules(tenant_id).get(rule_id)
    if found is None:
        raise NotFound(f"detection rule '{rule_id[:100]}' not found")
    return found


@blueprint.get(f"{TENANT}/detectionRules")
@require_scope("security.read", "rules.manage")
def list_detection_rules(tenant: str):
    """Every detection rule of the tenant: the built-ins (with its settings) and its custom rules."""
    if request.args:
        raise BadRequest(
            f"unknown query parameter '{next(iter(request.args))[:40]}'", code="invalidParameter"
        )
    rules = _rules(_tenant_id(tenant))
    return jsonify({"value": [rule.document() for rule in rules.values()]})


@blueprint.get(f"{TENANT}/detectionRules/<rule_id>")
@require_scope("security.read", "rules.manage")
def get_detection_rule(tenant: str, rule_id: str):
    """One detection rule."""
    return jsonify(_rule(_tenant_id(tenant), rule_id).document())


def _payload() -> dict:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object", code="invalidBody")
    return payload


@blueprint.patch(f"{TENANT}/detectionRules/<rule_id>")
@require_scope("rules.manage")
def patch_detection_rule(tenant: str, rule_id: str):
    """Enable or disable a rule, or change its threshold, for this tenant (``threshold: null``: default)."""
    tenant_id = _tenant_id(tenant)
    rule = _rule(tenant_id, rule_id)
    payload = _payload()
    unknown = sorted(set(payload) - {"enabled", "threshold"})
    if unknown or not payload:
        raise BadRequest(
            f"only 'enabled' and 'threshold' can be changed{f', not {unknown[0]!r}' if unknown else ''}",
            code="invalidBody",
        )
    values: dict = {}
    if "enabled" in payload:
        if not isinstance(payload["enabled"], bool):
            raise BadRequest("'enabled' must be true or false", code="invalidBody")
        values["enabled"] = payload["enabled"]
    if "threshold" in payload:
        threshold = payload["threshold"]
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= 1_000_000
        ):
            raise BadRequest(
                "'threshold' must be a whole number from 1 to 1000000, or null", code="invalidBody"
            )
        values["threshold"] = threshold
    values |= {"updated_at": utcnow(), "updated_by": g.caller.client_id}
    with _db().engine.begin() as conn:
        changed = conn.execute(
            DR.update().where(DR.c.tenant_id == tenant_id, DR.c.rule_id == rule.id).values(values)
        ).rowcount
        if not changed:
            conn.execute(DR.insert().values(tenant_id=tenant_id, rule_id=rule.id, **values))
    return jsonify(_rule(tenant_id, rule.id).document())


@blueprint.post(f"{TENANT}/detectionRules")
@require_scope("rules.manage")
def create_detection_rule(tenant: str):
    """Create a custom rule (``logic: threshold`` over events, findings, resources or alerts); 201 with it."""
    tenant_id = _tenant_id(tenant)
    payload = _payload()
    try:
        rule = rule_store.parse(payload, builtin=False)
    except rule_store.RuleError as exc:
        raise BadRequest(str(exc), code="invalidRule") from None
    if rule.id in rule_store.builtins():
        raise Conflict(f"'{rule.id}' is a built-in rule's id", code="ruleExists")
    try:
        with _db().engine.begin() as conn:
            conn.execute(
                DR.insert().values(
                    tenant_id=tenant_id,
                    rule_id=rule.id,
                    definition=payload,
                    updated_at=utcnow(),
                    updated_by=g.caller.client_id,
                )
            )
    except IntegrityError:
        raise Conflict(f"a detection rule '{rule.id}' exists", code="ruleExists") from None
    response = jsonify(_rule(tenant_id, rule.id).document())
    response.status_code = 201
    response.headers["Location"] = url_for(
        "detection.get_detection_rule", tenant=tenant, rule_id=rule.id, _external=True
    )
    return response


@blueprint.get(f"{TENANT}/security/alerts/<alert_id>/detectionRows")
@require_scope("security.read")
def list_detection_rows(tenant: str, alert_id: str):
    """The rows (events, findings, alerts, resources) that made a detection rule raise this alert."""
    tenant_id = _tenant_id(tenant)
    if not (alert_id.isascii() and alert_id.isdigit()) or len(alert_id) > 18:
        raise NotFound(f"alert '{alert_id[:40]}' not found")
    with _db().engine.connect() as conn:
        alert = conn.execute(
            select(A.c.id, A.c.detection_rule).where(A.c.tenant_id == tenant_id, A.c.id == int(alert_id))
        ).first()
        if alert is None:
            raise NotFound(f"alert '{alert_id}' not found")
        rows = conn.execute(
            select(LINKS.c.row_kind, LINKS.c.row_id, LINKS.c.row_time)
            .where(LINKS.c.tenant_id == tenant_id, LINKS.c.alert_id == alert.id)
            .order_by(LINKS.c.row_kind, LINKS.c.row_id)
        ).all()
    return jsonify(
        {
            "detectionRule": alert.detection_rule,
            "value": [
                {
                    "kind": r.row_kind,
                    "id": str(r.row_id),
                    "dateTime": r.row_time.isoformat() if r.row_time else None,
                }
                for r in rows
            ],
        }
    )


# -- the KEV catalogue (global) --------------------------------------------------------------------


@blueprint.put("/knownExploitedVulnerabilities")
@require_scope("admin")
def put_kev():
    """Replace the known-exploited-vulnerabilities catalogue with a pushed CISA KEV JSON document."""
    return jsonify(kev.replace_catalog(_db().engine, request.get_json(silent=True)))


@blueprint.get("/knownExploitedVulnerabilities")
@require_scope("security.read", "admin")
def get_kev():
    """The catalogue's version and size."""
    found = kev.summary(_db().engine)
    found["updatedDateTime"] = found["updatedDateTime"].isoformat() if found["updatedDateTime"] else None
    return jsonify(found)


__all__ = ["blueprint"]
