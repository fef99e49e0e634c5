"""Collections: list (filter, order, keyset paging), get by id, workflow edits, history."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from flask import Blueprint, current_app, g, jsonify, request, url_for
from marshmallow import ValidationError
from sqlalchemy import case, exists, func, literal, select, update

from connectors.model import SEVERITIES
from gateway.auth import require_scope, tenant_for_caller
from gateway.errors import BadRequest, NotFound
from gateway.models import (
    Alert,
    Finding,
    FindingSource,
    LifecycleEvent,
    Recommendation,
    RecommendationType,
    Resource,
    ResourceIdentifier,
    utcnow,
)
from gateway.query import Collection, OrderField, parse_list_args, run_list
from gateway.schemas import (
    AlertOut,
    AlertPatch,
    EventOut,
    FindingOut,
    FindingPatch,
    RecommendationOut,
    ResourceOut,
    SourceOut,
)

blueprint = Blueprint("collections", __name__, url_prefix="/api/v1/tenants/<tenant>")

F, S, R, RT, RS, A = (Finding.__table__, FindingSource.__table__, Recommendation.__table__,
                      RecommendationType.__table__, Resource.__table__, Alert.__table__)
RI, EV = ResourceIdentifier.__table__, LifecycleEvent.__table__
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _severity_rank(column):
    return case(*[(column == name, rank) for rank, name in enumerate(SEVERITIES)], else_=-1)


def _coalesce_time(column):
    return func.coalesce(column, literal(EPOCH, type_=column.type))


# -- serializers ------------------------------------------------------------------------------


def _serialize_findings(conn, rows) -> list[dict]:
    ids = [row.id for row in rows]
    sources = defaultdict(list)
    if ids:
        for source in conn.execute(select(S).where(S.c.finding_id.in_(ids)).order_by(S.c.id)):
            sources[source.finding_id].append(source._asdict())
    out = []
    for row in rows:
        data = row._asdict()
        data["sources"] = sources.get(row.id, [])
        out.append(data)
    return FindingOut(many=True).dump(out)


def _serialize_resources(conn, rows) -> list[dict]:
    ids = [row.id for row in rows]
    identifiers = defaultdict(lambda: defaultdict(list))
    if ids:
        for ident in conn.execute(select(RI).where(RI.c.resource_id.in_(ids)).order_by(RI.c.kind, RI.c.value)):
            if ident.kind != "ip_only":
                identifiers[ident.resource_id][_camel(ident.kind)].append(ident.value)
    out = []
    for row in rows:
        data = row._asdict()
        data["identifiers"] = dict(identifiers.get(row.id, {}))
        out.append(data)
    return ResourceOut(many=True).dump(out)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _dump(schema):
    return lambda conn, rows: schema(many=True).dump([row._asdict() for row in rows])


# -- collections ------------------------------------------------------------------------------


def _finding_base(tenant_id: int):
    return (select(F, RT.c.key.label("recommendation_type_key"))
            .join(RT, RT.c.id == F.c.recommendation_type_id)
            .where(F.c.tenant_id == tenant_id))


def _rec_base(tenant_id: int):
    return (select(R, RT.c.key.label("type_key"), RT.c.title.label("type_title"),
                   RT.c.kind.label("type_kind"), RT.c.remediation.label("type_remediation"))
            .join(RT, RT.c.id == R.c.type_id)
            .where(R.c.tenant_id == tenant_id))


COLLECTIONS: dict[str, Collection] = {
    "findings": Collection(
        name="findings",
        base=_finding_base,
        id_column=F.c.id,
        filters={
            "severity": lambda values: F.c.severity.in_(values),
            "status": lambda values: F.c.state.in_(values),
            "provider": lambda values: exists().where(S.c.finding_id == F.c.id, S.c.provider.in_(values)),
            "resourceId": lambda values: F.c.resource_id.in_([_int(v) for v in values]),
            "cve": lambda values: F.c.cve.in_([v.upper() for v in values]),
        },
        filter_values={"severity": SEVERITIES, "status": ("new", "active", "resolved", "reopened")},
        order_fields={
            "id": OrderField(F.c.id, "int"),
            "severity": OrderField(_severity_rank(F.c.severity), "int"),
            "lastSeen": OrderField(_coalesce_time(F.c.last_seen), "datetime"),
            "firstSeen": OrderField(_coalesce_time(F.c.first_seen), "datetime"),
            "updatedAt": OrderField(F.c.updated_at, "datetime"),
        },
        default_order=(("id", False),),
        serialize=_serialize_findings,
    ),
    "recommendations": Collection(
        name="recommendations",
        base=_rec_base,
        id_column=R.c.id,
        filters={
            "severity": lambda values: R.c.severity.in_(values),
            "status": lambda values: R.c.status.in_(values),
            "provider": lambda values: exists().where(
                F.c.tenant_id == R.c.tenant_id, F.c.resource_id == R.c.resource_id,
                F.c.recommendation_type_id == R.c.type_id, S.c.finding_id == F.c.id, S.c.provider.in_(values)),
            "resourceId": lambda values: R.c.resource_id.in_([_int(v) for v in values]),
        },
        filter_values={"severity": SEVERITIES, "status": ("Healthy", "Unhealthy", "NotApplicable")},
        order_fields={
            "id": OrderField(R.c.id, "int"),
            "severity": OrderField(_severity_rank(R.c.severity), "int"),
            "updatedAt": OrderField(R.c.updated_at, "datetime"),
        },
        default_order=(("id", False),),
        serialize=_dump(RecommendationOut),
    ),
    "resources": Collection(
        name="resources",
        base=lambda tenant_id: select(RS).where(RS.c.tenant_id == tenant_id),
        id_column=RS.c.id,
        filters={
            "provider": lambda values: exists().where(S.c.resource_id == RS.c.id, S.c.provider.in_(values)),
            "kind": lambda values: RS.c.kind.in_(values),
        },
        filter_values={},
        order_fields={
            "id": OrderField(RS.c.id, "int"),
            "lastSeen": OrderField(_coalesce_time(RS.c.last_seen), "datetime"),
        },
        default_order=(("id", False),),
        serialize=_serialize_resources,
    ),
    "alerts": Collection(
        name="alerts",
        base=lambda tenant_id: select(A).where(A.c.tenant_id == tenant_id),
        id_column=A.c.id,
        filters={
            "severity": lambda values: A.c.severity.in_(values),
            "status": lambda values: A.c.status.in_(values),
            "provider": lambda values: A.c.provider.in_(values),
        },
        filter_values={"severity": SEVERITIES + ("unknown",), "status": ("newAlert", "inProgress", "resolved")},
        order_fields={
            "id": OrderField(A.c.id, "int"),
            "severity": OrderField(_severity_rank(A.c.severity), "int"),
            "createdDateTime": OrderField(_coalesce_time(A.c.created_date_time), "datetime"),
        },
        default_order=(("id", False),),
        serialize=_dump(AlertOut),
    ),
}


def _int(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise BadRequest(f"'{value[:40]}' is not an id", code="invalidParameter")
    return int(value)


def _db():
    return current_app.extensions["gateway.db"]


def _tenant_id(tenant: str) -> int:
    with _db().sessions() as session:
        return tenant_for_caller(session, tenant).id


def _list(tenant: str, name: str):
    collection = COLLECTIONS[name]
    tenant_id = _tenant_id(tenant)
    config = current_app.config
    list_request = parse_list_args(collection, request.args, config["PAGE_SIZE_DEFAULT"], config["PAGE_SIZE_MAX"])
    with _db().engine.connect() as conn:
        values, token = run_list(conn, collection, tenant_id, list_request, config["SECRET_KEY"],
                                 request.args.get("$skiptoken"))
    body = {"@odata.context": url_for("collections.list_" + name, tenant=tenant, _external=True).split("?")[0]
            + "/$metadata#" + name, "value": values}
    if token:
        args = request.args.to_dict()
        args["$skiptoken"] = token
        body["@odata.nextLink"] = url_for("collections.list_" + name, tenant=tenant, _external=True, **args)
    return jsonify(body)


def _get_one(tenant: str, name: str, item_id: str):
    collection = COLLECTIONS[name]
    tenant_id = _tenant_id(tenant)
    if not (item_id.isascii() and item_id.isdigit()) or len(item_id) > 18:
        raise NotFound(f"{name[:-1]} '{item_id[:40]}' not found")
    with _db().engine.connect() as conn:
        rows = conn.execute(collection.base(tenant_id).where(collection.id_column == int(item_id))).all()
        if not rows:
            raise NotFound(f"{name[:-1]} '{item_id}' not found")
        return collection.serialize(conn, rows)[0]


def _register(name: str) -> None:
    @require_scope("security.read")
    def list_view(tenant: str):
        return _list(tenant, name)

    @require_scope("security.read")
    def get_view(tenant: str, item_id: str):
        return jsonify(_get_one(tenant, name, item_id))

    list_view.__doc__ = f"List {name}, scoped to the tenant."
    get_view.__doc__ = f"One of the tenant's {name}."
    blueprint.add_url_rule(f"/{name}", f"list_{name}", list_view, methods=["GET"])
    blueprint.add_url_rule(f"/{name}/<item_id>", f"get_{name}", get_view, methods=["GET"])


for _name in COLLECTIONS:
    _register(_name)


# -- workflow -------------------------------------------------------------------------------------

_WORKFLOW = {
    "findings": (F, FindingPatch, {"statusOverride": "status_override", "assignedTo": "assigned_to",
                                   "comments": "comments", "tags": "tags"}),
    "recommendations": (R, FindingPatch, {"statusOverride": "status_override", "assignedTo": "assigned_to",
                                          "comments": "comments", "tags": "tags"}),
    "alerts": (A, AlertPatch, {"status": "status", "assignedTo": "assigned_to", "feedback": "feedback",
                               "comments": "comments", "tags": "tags", "closedDateTime": "closed_date_time"}),
}


def _patch(tenant: str, name: str, item_id: str):
    table, schema, columns = _WORKFLOW[name]
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict) or not payload:
        raise BadRequest("the body must be a JSON object with the fields to change", code="invalidBody")
    try:
        changes = schema().load(payload)
    except ValidationError as exc:
        raise BadRequest("invalid fields: " + "; ".join(f"{k}: {v}" for k, v in exc.messages.items()),
                         code="invalidBody", details=exc.messages) from None
    tenant_id = _tenant_id(tenant)
    if not (item_id.isascii() and item_id.isdigit()) or len(item_id) > 18:
        raise NotFound(f"{name[:-1]} '{item_id[:40]}' not found")
    now = utcnow()
    values = {}
    for key, value in changes.items():
        if key == "comments":
            value = [{"text": c["text"], "by": g.caller.client_id, "at": now.isoformat()} for c in value]
        values[columns[key]] = value
    if name == "alerts" and changes.get("status") == "resolved" and "closedDateTime" not in changes:
        values["closed_date_time"] = now
    with _db().engine.begin() as conn:
        result = conn.execute(update(table).where(table.c.tenant_id == tenant_id, table.c.id == int(item_id))
                              .values(**values))
        if result.rowcount == 0:
            raise NotFound(f"{name[:-1]} '{item_id}' not found")
        conn.execute(EV.insert().values(
            tenant_id=tenant_id, subject_type=name[:-1], subject_id=int(item_id), event="edited", at=now,
            cause="customer edit", actor=g.caller.client_id,
            details={k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in changes.items()}))
    if "return=representation" in request.headers.get("Prefer", ""):
        return jsonify(_get_one(tenant, name, item_id))
    return "", 204


def _history(tenant: str, name: str, item_id: str):
    tenant_id = _tenant_id(tenant)
    _get_one(tenant, name, item_id)
    with _db().engine.connect() as conn:
        rows = conn.execute(select(EV).where(EV.c.tenant_id == tenant_id, EV.c.subject_type == name[:-1],
                                             EV.c.subject_id == int(item_id)).order_by(EV.c.id)).all()
    return jsonify({"value": EventOut(many=True).dump([row._asdict() for row in rows])})


def _register_workflow(name: str) -> None:
    @require_scope("alerts.manage")
    def patch_view(tenant: str, item_id: str):
        return _patch(tenant, name, item_id)

    @require_scope("security.read")
    def history_view(tenant: str, item_id: str):
        return _history(tenant, name, item_id)

    patch_view.__doc__ = f"Change the customer-owned fields of one of the tenant's {name}."
    history_view.__doc__ = f"The stored lifecycle events of one of the tenant's {name}."
    blueprint.add_url_rule(f"/{name}/<item_id>", f"patch_{name}", patch_view, methods=["PATCH"])
    blueprint.add_url_rule(f"/{name}/<item_id>/history", f"history_{name}", history_view, methods=["GET"])


for _name in _WORKFLOW:
    _register_workflow(_name)

__all__ = ["COLLECTIONS", "SourceOut", "blueprint"]
