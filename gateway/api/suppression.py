"""Alert suppression rules under ``/api/v1/tenants/<tenant>/security/alertSuppressionRules``.

Reads are the generic collection's (``gateway/api/collections.py`` registers ``COLLECTION``:
OData options, paging, CSV; scope ``security.read``).  Writes need ``posture.manage``:

    POST   .../alertSuppressionRules[?applyToExisting=true][&dryRun=true]
           201 with the rule and ``appliedAlertCount`` (the open alerts it suppressed now: 0
           unless ``applyToExisting=true``, which needs an Enabled rule); with ``dryRun=true``
           nothing is created and the answer is ``200 {"ruleId": null, "dryRun": true,
           "appliedAlertCount": n}``: how many open alerts the rule would suppress.
    PATCH  .../alertSuppressionRules/{id}       the fields to change; 200 with the rule
    DELETE .../alertSuppressionRules/{id}       204 (suppressed alerts keep ``suppressedBy``)
    POST   .../alertSuppressionRules/{id}/apply[?dryRun=true]
           200 {"ruleId", "dryRun", "appliedAlertCount"}; 409 for a Disabled or expired rule
           unless it is a dry run

A bad body is ``400 invalidBody`` naming each field (``details``: path -> messages); a second
rule of the same name in the tenant is ``409``; another tenant's rule is ``404``.  The rules
themselves, the fields and how alerts match are in ``gateway/suppression.py``.  A rule's ``state``
reads ``Expired`` once an Enabled rule's ``expirationDateUtc`` has passed (``$filter=state eq
'Expired'`` works); only Enabled and Disabled are written.
"""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request, url_for
from sqlalchemy import and_, bindparam, case, delete, func, literal_column, select, update
from sqlalchemy.exc import IntegrityError

from gateway import suppression
from gateway.auth import require_scope, tenant_for_caller
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.models import AlertSuppressionRule, Epoch, UTCDateTime
from gateway.odata import Field
from gateway.query import Collection, OrderField
from gateway.schemas import AlertSuppressionRuleOut, fast_dumper

PREFIX = "/api/v1/tenants/<tenant>/security"
NAME = "alertSuppressionRules"
blueprint = Blueprint("suppression", __name__, url_prefix=PREFIX)
RULES = AlertSuppressionRule.__table__

# Now, when the statement runs (the clock tests replace): an Enabled rule past its expiry shows Expired.
_NOW = bindparam("suppression_now", callable_=lambda: suppression.clock(), type_=UTCDateTime())
STATE = case((and_(RULES.c.state == literal_column("'Enabled'"), RULES.c.expiration_date_utc.is_not(None),
                   RULES.c.expiration_date_utc <= _NOW), literal_column("'Expired'")), else_=RULES.c.state)


def _base(tenant_id: int):
    return select(RULES, STATE.label("shown_state")).where(RULES.c.tenant_id == tenant_id)


_DUMP = fast_dumper(AlertSuppressionRuleOut)


def _serialize(conn, tenant_id, rows, selected) -> list[dict]:
    return _DUMP([row._asdict() for row in rows])


def _text(column, nullable: bool = False) -> Field:
    return Field(column, "string", nullable=nullable)


def _time(column, nullable: bool = False) -> Field:
    return Field(column, "datetime", nullable=nullable)


COLLECTION = Collection(
    name=NAME,
    base=_base,
    id_column=RULES.c.id,
    fields={
        "id": Field(RULES.c.id, "id"),
        "name": _text(RULES.c.name),
        "alertType": _text(RULES.c.alert_type),
        "reason": Field(RULES.c.reason, "enum", values=suppression.REASONS),
        "comment": _text(RULES.c.comment, nullable=True),
        "state": Field(STATE, "enum", values=suppression.SHOWN_STATES),
        "expirationDateUtc": _time(RULES.c.expiration_date_utc, nullable=True),
        "createdDateTime": _time(RULES.c.created_at),
        "createdBy": _text(RULES.c.created_by, nullable=True),
        "lastModifiedUtc": _time(RULES.c.updated_at),
        "lastModifiedBy": _text(RULES.c.updated_by, nullable=True),
    },
    order_fields={
        "id": OrderField(RULES.c.id, "int"),
        "name": OrderField(RULES.c.name, "str"),
        "createdDateTime": OrderField(RULES.c.created_at, "datetime"),
        "lastModifiedUtc": OrderField(RULES.c.updated_at, "datetime"),
        "expirationDateUtc": OrderField(func.coalesce(RULES.c.expiration_date_utc, Epoch()), "datetime"),
    },
    default_order=(("id", False),),
    selectable=tuple(AlertSuppressionRuleOut().fields),
    serialize=_serialize,
)


# -- writes -----------------------------------------------------------------------------------------


def _db():
    return current_app.extensions["gateway.db"]


def _tenant_id(tenant: str) -> int:
    with _db().sessions() as session:
        return tenant_for_caller(session, tenant).id


def _only(allowed: tuple[str, ...]) -> dict[str, bool]:
    """The boolean query flags of a write (``true``/``false``); 400 on anything else."""
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        names = ", ".join(allowed) or "none"
        raise BadRequest(f"unknown query parameter '{unknown[0][:40]}'; allowed: {names}",
                         code="invalidParameter")
    flags = {}
    for name in allowed:
        values = request.args.getlist(name)
        if len(values) > 1 or (values and values[0] not in ("true", "false")):
            raise BadRequest(f"'{name}' is true or false, given once", code="invalidParameter")
        flags[name] = bool(values) and values[0] == "true"
    return flags


def _rule_id(item_id: str) -> int:
    if not (item_id.isascii() and item_id.isdigit()) or len(item_id) > 18:
        raise NotFound(f"alertSuppressionRule '{item_id[:40]}' not found")
    return int(item_id)


def _validated(now, current=None) -> dict:
    try:
        return suppression.validate_rule(request.get_json(silent=True), now=now, current=current)
    except suppression.RuleError as exc:
        raise BadRequest(f"invalid fields: {exc}"[:2000], code="invalidBody",
                         details={path: [message] for path, message in exc.errors.items()}) from None


def _stored(conn, tenant_id: int, rule_id: int, lock: bool = False):
    query = select(RULES).where(RULES.c.tenant_id == tenant_id, RULES.c.id == rule_id)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"alertSuppressionRule '{rule_id}' not found")
    return row


def _name_taken(conn, tenant_id: int, name: str, other_than: int | None = None) -> None:
    query = select(RULES.c.id).where(RULES.c.tenant_id == tenant_id, RULES.c.name == name)
    if other_than is not None:
        query = query.where(RULES.c.id != other_than)
    if conn.execute(query).first() is not None:
        raise Conflict(f"the tenant already has an alertSuppressionRule named '{name[:100]}'")


def _shown(conn, tenant_id: int, rule_id: int) -> dict:
    rows = conn.execute(_base(tenant_id).where(RULES.c.id == rule_id)).all()
    return _serialize(conn, tenant_id, rows, None)[0]


def _transient(values: dict) -> suppression.Rule:
    """The rule a body describes, before it is stored (a dry run)."""
    return suppression.Rule.from_row(values | {"id": 0})


@require_scope("posture.manage")
def create_rule(tenant: str):
    """Create a suppression rule; optionally apply it to the open alerts, or only count them."""
    flags = _only(("applyToExisting", "dryRun"))
    tenant_id = _tenant_id(tenant)
    now = suppression.clock()
    values = _validated(now)
    actor = g.caller.client_id
    if flags["dryRun"]:
        with _db().engine.connect() as conn:
            count = suppression.apply_rule(conn, tenant_id, _transient(values), actor=actor, now=now,
                                           dry_run=True)
        return jsonify({"ruleId": None, "dryRun": True, "appliedAlertCount": count})
    if flags["applyToExisting"] and values["state"] != "Enabled":
        raise BadRequest("applyToExisting=true needs an Enabled rule", code="invalidParameter")
    try:
        with _db().engine.begin() as conn:
            _name_taken(conn, tenant_id, values["name"])
            rule_id = conn.execute(RULES.insert().values(
                tenant_id=tenant_id, created_at=now, created_by=actor, updated_at=now, updated_by=actor,
                **values).returning(RULES.c.id)).scalar_one()
            applied = 0
            if flags["applyToExisting"]:
                rule = suppression.Rule.from_row(_stored(conn, tenant_id, rule_id))
                applied = suppression.apply_rule(conn, tenant_id, rule, actor=actor, now=now)
            body = _shown(conn, tenant_id, rule_id) | {"appliedAlertCount": applied}
    except IntegrityError:  # a concurrent request took the name
        raise Conflict("the tenant already has an alertSuppressionRule of that name") from None
    response = jsonify(body)
    response.status_code = 201
    response.headers["Location"] = url_for(f"collections.get_{NAME}", tenant=tenant, item_id=str(rule_id),
                                           _external=True)
    return response


@require_scope("posture.manage")
def patch_rule(tenant: str, item_id: str):
    """Change the fields given of one suppression rule."""
    _only(())
    tenant_id = _tenant_id(tenant)
    rule_id = _rule_id(item_id)
    now = suppression.clock()
    try:
        with _db().engine.begin() as conn:
            current = _stored(conn, tenant_id, rule_id, lock=True)
            values = _validated(now, current._mapping)
            if "name" in values:
                _name_taken(conn, tenant_id, values["name"], other_than=rule_id)
            conn.execute(update(RULES).where(RULES.c.tenant_id == tenant_id, RULES.c.id == rule_id)
                         .values(updated_at=now, updated_by=g.caller.client_id, **values))
            body = _shown(conn, tenant_id, rule_id)
    except IntegrityError:
        raise Conflict("the tenant already has an alertSuppressionRule of that name") from None
    return jsonify(body)


@require_scope("posture.manage")
def delete_rule(tenant: str, item_id: str):
    """Delete one suppression rule (the alerts it suppressed stay as they are)."""
    _only(())
    tenant_id = _tenant_id(tenant)
    rule_id = _rule_id(item_id)
    with _db().engine.begin() as conn:
        gone = conn.execute(delete(RULES).where(RULES.c.tenant_id == tenant_id,
                                                RULES.c.id == rule_id)).rowcount
    if not gone:
        raise NotFound(f"alertSuppressionRule '{rule_id}' not found")
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


@require_scope("posture.manage")
def apply_rule(tenant: str, item_id: str):
    """Suppress the tenant's open alerts the rule matches (or, with dryRun=true, count them)."""
    flags = _only(("dryRun",))
    tenant_id = _tenant_id(tenant)
    rule_id = _rule_id(item_id)
    now = suppression.clock()
    engine = _db().engine
    with engine.connect() if flags["dryRun"] else engine.begin() as conn:
        row = _stored(conn, tenant_id, rule_id)
        if not flags["dryRun"] and not suppression.is_active(row, now):
            state = "Disabled" if row.state != "Enabled" else "Expired"
            raise Conflict(f"alertSuppressionRule '{rule_id}' is {state}: enable it (or give a later "
                           "expirationDateUtc) first, or ask for a dry run")
        count = suppression.apply_rule(conn, tenant_id, suppression.Rule.from_row(row),
                                       actor=g.caller.client_id, now=now, dry_run=flags["dryRun"])
    return jsonify({"ruleId": str(rule_id), "dryRun": flags["dryRun"], "appliedAlertCount": count})


blueprint.add_url_rule(f"/{NAME}", "create_rule", create_rule, methods=["POST"])
blueprint.add_url_rule(f"/{NAME}/<item_id>", "patch_rule", patch_rule, methods=["PATCH"])
blueprint.add_url_rule(f"/{NAME}/<item_id>", "delete_rule", delete_rule, methods=["DELETE"])
blueprint.add_url_rule(f"/{NAME}/<item_id>/apply", "apply_rule", apply_rule, methods=["POST"])
