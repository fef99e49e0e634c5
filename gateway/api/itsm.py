"""ITSM ticket sync API under ``/api/v1/tenants/<tenant>/itsm`` (gateway/itsm/).

* ``connections``: ServiceNow or Jira, with encrypted secrets (never answered), health and the last
  error; ``POST .../connections/{id}/test`` calls the system once (short timeout) and says what failed.
* ``rules``: which items make tickets (collection + ``$filter``), grouping, automatic or manual.
* ``tickets``: the links between items and remote records (read-only, plus ``resync``).
* ``POST .../security/{findings|recommendations|alerts}/{id}/tickets``: a ticket now, by hand.

The three collections take the usual OData options.  Writes need ``itsm.manage``; reading
connections and rules too (they describe the tenant's ITSM), reading tickets ``security.read`` or
``itsm.manage``.  No view calls the ITSM system except ``test``: tickets are made by the workers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets as stdlib_secrets
from collections import defaultdict

from flask import Blueprint, current_app, g, jsonify, request, url_for
from marshmallow import Schema, ValidationError
from sqlalchemy import delete, func, select, update

from gateway import bulk_export, ratelimit
from gateway.api.collections import _context, _item_id, _only, _tenant_id
from gateway.auth import require_scope
from gateway.errors import APIError, BadRequest, Conflict, NotFound
from gateway.itsm import inbound, sync, vault
from gateway.itsm import schemas as itsm_schemas
from gateway.itsm.clients import RemoteError, client_for
from gateway.itsm.deliver import connection_for
from gateway.models import (
    ItsmConnection,
    ItsmInboundSeen,
    ItsmOp,
    ItsmRule,
    ItsmTicket,
    ItsmTicketItem,
    utcnow,
)
from gateway.odata import Field, ListField, parse_select
from gateway.query import Collection, OrderField, count, parse_list_args, project, run_list
from gateway.schemas import fast_dumper

PREFIX = "/api/v1/tenants/<tenant>"
blueprint = Blueprint("itsm", __name__, url_prefix=PREFIX)
CN, RU, TK, TI, OP = (
    ItsmConnection.__table__,
    ItsmRule.__table__,
    ItsmTicket.__table__,
    ItsmTicketItem.__table__,
    ItsmOp.__table__,
)
TEST_TIMEOUT = 5.0


class SecretsUnavailableError(APIError):
    status, code = 503, "secretsUnavailable"


class InvalidSignature(APIError):
    status, code = 401, "invalidSignature"


def _db():
    return current_app.extensions["gateway.db"]


def _text(column, nullable=False):
    return Field(column, "string", nullable=nullable)


def _time(column, nullable=False):
    return Field(column, "datetime", nullable=nullable)


# -- collections -----------------------------------------------------------------------------------

_DUMP_RULES = fast_dumper(itsm_schemas.RuleOut)
_DUMP_CONNECTIONS = itsm_schemas.ConnectionOut(many=True).dump
_DUMP_TICKETS = itsm_schemas.TicketOut(many=True).dump


def _serialize_connections(conn, tenant_id, rows, selected):
    ids = [row.id for row in rows]
    pending, parked = {}, {}
    if ids:
        pending = dict(
            conn.execute(
                select(OP.c.connection_id, func.count())
                .where(OP.c.connection_id.in_(ids), OP.c.status == "pending")
                .group_by(OP.c.connection_id)
            ).all()
        )
        parked = dict(
            conn.execute(
                select(TK.c.connection_id, func.count())
                .where(TK.c.connection_id.in_(ids), TK.c.sync_state == "parked")
                .group_by(TK.c.connection_id)
            ).all()
        )
    return _DUMP_CONNECTIONS(
        [
            {**row._asdict(), "pending_ops": pending.get(row.id, 0), "parked_tickets": parked.get(row.id, 0)}
            for row in rows
        ]
    )


def _serialize_tickets(conn, tenant_id, rows, selected):
    items = defaultdict(list)
    ids = [row.id for row in rows]
    if ids:
        for item in conn.execute(
            select(TI)
            .where(TI.c.tenant_id == tenant_id, TI.c.ticket_id.in_(ids))
            .order_by(TI.c.subject_type, TI.c.subject_id)
        ):
            items[item.ticket_id].append(item._asdict())
    return _DUMP_TICKETS([{**row._asdict(), "items": items.get(row.id, [])} for row in rows])


def _ticket_items(context):
    table = TI.alias()
    return table, (table.c.ticket_id == TK.c.id) & (table.c.tenant_id == context.tenant_id)


COLLECTIONS: dict[str, Collection] = {
    "connections": Collection(
        name="connections",
        base=lambda tenant_id: select(CN).where(CN.c.tenant_id == tenant_id),
        id_column=CN.c.id,
        fields={
            "id": Field(CN.c.id, "id"),
            "name": _text(CN.c.name),
            "kind": Field(CN.c.kind, "enum", values=itsm_schemas.KINDS),
            "baseUrl": _text(CN.c.base_url),
            "enabled": Field(CN.c.enabled, "bool"),
            "health": Field(CN.c.health, "enum", values=("unknown", "healthy", "degraded")),
            "lastSuccessDateTime": _time(CN.c.last_success_at, True),
            "lastFailureDateTime": _time(CN.c.last_failure_at, True),
            "createdDateTime": _time(CN.c.created_at),
        },
        order_fields={"id": OrderField(CN.c.id, "int"), "name": OrderField(CN.c.name, "str")},
        default_order=(("id", False),),
        selectable=tuple(itsm_schemas.ConnectionOut().fields),
        serialize=_serialize_connections,
    ),
    "rules": Collection(
        name="rules",
        base=lambda tenant_id: select(RU).where(RU.c.tenant_id == tenant_id),
        id_column=RU.c.id,
        fields={
            "id": Field(RU.c.id, "id"),
            "connectionId": Field(RU.c.connection_id, "id"),
            "name": _text(RU.c.name),
            "collection": Field(RU.c.collection, "enum", values=itsm_schemas.COLLECTIONS),
            "grouping": Field(RU.c.grouping, "enum", values=itsm_schemas.GROUPINGS),
            "mode": Field(RU.c.mode, "enum", values=itsm_schemas.MODES),
            "enabled": Field(RU.c.enabled, "bool"),
            "createdDateTime": _time(RU.c.created_at),
        },
        order_fields={"id": OrderField(RU.c.id, "int"), "name": OrderField(RU.c.name, "str")},
        default_order=(("id", False),),
        selectable=tuple(itsm_schemas.RuleOut().fields),
        serialize=lambda conn, tenant_id, rows, selected: _DUMP_RULES([row._asdict() for row in rows]),
    ),
    "tickets": Collection(
        name="tickets",
        base=lambda tenant_id: select(TK).where(TK.c.tenant_id == tenant_id),
        id_column=TK.c.id,
        fields={
            "id": Field(TK.c.id, "id"),
            "connectionId": Field(TK.c.connection_id, "id"),
            "ruleId": Field(TK.c.rule_id, "id", nullable=True),
            "subjectType": Field(
                TK.c.subject_type, "enum", values=("finding", "recommendation", "alert", "resource")
            ),
            "subjectId": Field(TK.c.subject_id, "id"),
            "collection": Field(TK.c.collection, "enum", values=itsm_schemas.COLLECTIONS),
            "syncState": Field(TK.c.sync_state, "enum", values=("pending", "synced", "parked")),
            "remoteKey": _text(TK.c.remote_key, True),
            "remoteState": _text(TK.c.remote_state, True),
            "desiredState": Field(TK.c.desired_state, "enum", values=("open", "resolved")),
            "severity": Field(
                TK.c.severity, "enum", nullable=True, values=itsm_schemas.SEVERITIES + ("unknown",)
            ),
            "lastSyncedDateTime": _time(TK.c.last_synced_at, True),
            "createdDateTime": _time(TK.c.created_at),
            "items": ListField(
                members=lambda t: {
                    "subjectType": _text(t.c.subject_type),
                    "subjectId": Field(t.c.subject_id, "id"),
                },
                rows=_ticket_items,
            ),
        },
        order_fields={"id": OrderField(TK.c.id, "int"), "updatedAt": OrderField(TK.c.updated_at, "datetime")},
        default_order=(("id", False),),
        selectable=tuple(itsm_schemas.TicketOut().fields),
        serialize=_serialize_tickets,
    ),
}


def _list(tenant: str, name: str):
    collection = COLLECTIONS[name]
    tenant_id = _tenant_id(tenant)
    config = current_app.config
    list_request = parse_list_args(
        collection,
        request.args,
        _context(tenant_id),
        config["PAGE_SIZE_DEFAULT"],
        config["PAGE_SIZE_MAX"],
        **bulk_export.accepted(request.accept_mimetypes),
    )
    if bulk_export.export_format(list_request):  # the whole result, CSV or JSON Lines
        return bulk_export.export_response(current_app.response_class, _db().engine, collection, tenant_id,
                                           list_request, name, current_app.json.default)
    with _db().engine.connect() as conn:
        total = count(conn, collection, tenant_id, list_request) if list_request.count else None
        values, token = run_list(
            conn, collection, tenant_id, list_request, config["SECRET_KEY"], request.args.get("$skiptoken")
        )
    context = f"{request.url_root}api/v1/$metadata#itsm/{name}"
    if list_request.select:
        context += f"({','.join(list_request.select)})"
    body: dict = {"@odata.context": context}
    if total is not None:
        body["@odata.count"] = total
    body["value"] = values
    if token:
        args = request.args.to_dict()
        args.pop("$skip", None)
        args["$skiptoken"] = token
        body["@odata.nextLink"] = url_for(f"itsm.list_{name}", tenant=tenant, _external=True, **args)
    return jsonify(body)


def _singular(name: str) -> str:
    return name.removesuffix("s")


def _get_one(tenant: str, name: str, item_id: str, selected=None) -> dict:
    collection = COLLECTIONS[name]
    tenant_id = _tenant_id(tenant)
    if not (item_id.isascii() and item_id.isdigit()) or len(item_id) > 18:
        raise NotFound(f"{_singular(name)} '{item_id[:40]}' not found")
    with _db().engine.connect() as conn:
        rows = conn.execute(collection.base(tenant_id).where(collection.id_column == int(item_id))).all()
        if not rows:
            raise NotFound(f"{_singular(name)} '{item_id[:40]}' not found")
        return project(collection.serialize(conn, tenant_id, rows, selected), selected)[0]


def _register(name: str, scopes: tuple[str, ...]) -> None:
    @require_scope(*scopes)
    def list_view(tenant: str):
        return _list(tenant, name)

    @require_scope(*scopes)
    def get_view(tenant: str, item_id: str):
        _only(("$select",))
        selected = (
            parse_select(request.args["$select"], COLLECTIONS[name].selectable)
            if "$select" in request.args
            else None
        )
        return jsonify(_get_one(tenant, name, item_id, selected))

    list_view.__doc__ = f"List the tenant's ITSM {name} (OData options; JSON or CSV)."
    get_view.__doc__ = f"One of the tenant's ITSM {name}."
    blueprint.add_url_rule(f"/itsm/{name}", f"list_{name}", list_view, methods=["GET"])
    blueprint.add_url_rule(f"/itsm/{name}/<item_id>", f"get_{name}", get_view, methods=["GET"])


_register("connections", ("itsm.manage",))
_register("rules", ("itsm.manage",))
_register("tickets", ("security.read", "itsm.manage"))


# -- edits -----------------------------------------------------------------------------------------


def _body(schema: Schema, partial: bool = False) -> dict:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict) or not payload:
        raise BadRequest("the body must be a JSON object", code="invalidBody")
    try:
        return schema.load(payload, partial=partial)
    except ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        raise BadRequest(
            "invalid fields: " + "; ".join(f"{k}: {v}" for k, v in messages.items()),
            code="invalidBody",
            details=messages,
        ) from None


def _invalid(field: str, message: str) -> BadRequest:
    return BadRequest(f"{field}: {message}", code="invalidBody", details={field: [message]})


def _created(name: str, tenant: str, item_id: int, status: int = 201):
    response = jsonify(_get_one(tenant, name, str(item_id)))
    response.status_code = status
    response.headers["Location"] = url_for(
        f"itsm.get_{name}", tenant=tenant, item_id=str(item_id), _external=True
    )
    return response


def _no_content():
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


def _encrypt(secret: str | None) -> str | None:
    try:
        return vault.encrypt(current_app.config, secret)
    except vault.SecretsUnavailable as exc:
        raise SecretsUnavailableError(str(exc), headers={"Retry-After": "60"}) from None


def _check_connection(kind: str, auth: str, username, secret_set: bool, settings: dict) -> None:
    if kind == "servicenow" and auth not in ("basic", "oauth"):
        raise _invalid("auth", "ServiceNow takes basic or oauth")
    if kind == "jira" and auth not in ("basic", "bearer"):
        raise _invalid("auth", "Jira takes basic (email + API token) or bearer")
    if auth in ("basic", "oauth") and not username:
        raise _invalid(
            "username", f"{auth} authentication needs a username (a Jira email, an OAuth client id)"
        )
    if not secret_set:
        raise _invalid("secret", "the connection needs its password, API token or client secret")
    if kind == "jira" and not settings.get("projectKey"):
        raise _invalid("projectKey", "a Jira connection names its project")


def _split(data: dict) -> tuple[dict, dict]:
    """(column values, settings) of a connection body."""
    settings = {name: data.pop(name) for name in itsm_schemas.SETTINGS if name in data}
    columns = {}
    for name, column in (
        ("name", "name"),
        ("kind", "kind"),
        ("baseUrl", "base_url"),
        ("auth", "auth"),
        ("username", "username"),
        ("enabled", "enabled"),
    ):
        if name in data:
            columns[column] = data[name]
    return columns, settings


@require_scope("itsm.manage")
def create_connection(tenant: str):
    """Add a ServiceNow or Jira connection; its secret is stored encrypted and never answered."""
    _only(())
    data = _body(itsm_schemas.ConnectionIn())
    secret = data.pop("secret", None)
    columns, settings = _split(data)
    settings = {k: v for k, v in settings.items() if v is not None}
    _check_connection(columns["kind"], columns["auth"], columns.get("username"), secret is not None, settings)
    tenant_id, now = _tenant_id(tenant), utcnow()
    from gateway.itsm import feed

    with _db().engine.begin() as conn:
        if conn.execute(
            select(CN.c.id).where(CN.c.tenant_id == tenant_id, CN.c.name == columns["name"])
        ).first():
            raise Conflict(f"the tenant already has a connection named '{columns['name'][:100]}'")
        connection_id = conn.execute(
            CN.insert()
            .values(
                tenant_id=tenant_id,
                secret=_encrypt(secret),
                secret_hint=vault.hint(secret),
                webhook_secret=_encrypt(stdlib_secrets.token_urlsafe(32)),
                settings=settings,
                enabled=columns.pop("enabled", True),
                health="unknown",
                consecutive_failures=0,
                feed_state=feed.start(conn),
                created_at=now,
                updated_at=now,
                created_by=g.caller.client_id,
                updated_by=g.caller.client_id,
                **columns,
            )
            .returning(CN.c.id)
        ).scalar_one()
    return _created("connections", tenant, connection_id)


def _connection(conn, tenant_id: int, item_id: str, lock: bool = False):
    query = select(CN).where(CN.c.tenant_id == tenant_id, CN.c.id == _item_id("connections", item_id))
    if lock and _db().is_postgres:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"connection '{item_id[:40]}' not found")
    return row


@require_scope("itsm.manage")
def patch_connection(tenant: str, item_id: str):
    """Change a connection (a new ``secret`` replaces the stored one; ``null`` settings are removed)."""
    _only(())
    data = _body(itsm_schemas.ConnectionPatch(), partial=True)
    tenant_id, now = _tenant_id(tenant), utcnow()
    with _db().engine.begin() as conn:
        old = _connection(conn, tenant_id, item_id, lock=True)
        values = {}
        if "secret" in data:
            secret = data.pop("secret")
            values.update(secret=_encrypt(secret), secret_hint=vault.hint(secret))
        columns, changes = _split(data)
        settings = {**(old.settings or {}), **changes}
        settings = {k: v for k, v in settings.items() if v is not None}
        merged = {**old._asdict(), **columns, **values}
        _check_connection(
            merged["kind"], merged["auth"], merged.get("username"), merged["secret"] is not None, settings
        )
        if (
            "name" in columns
            and conn.execute(
                select(CN.c.id).where(
                    CN.c.tenant_id == tenant_id, CN.c.name == columns["name"], CN.c.id != old.id
                )
            ).first()
        ):
            raise Conflict(f"the tenant already has a connection named '{columns['name'][:100]}'")
        if columns.get("enabled") is True or "secret" in values:  # try again at once
            values.update(retry_at=None)
        conn.execute(
            update(CN)
            .where(CN.c.id == old.id)
            .values(settings=settings, updated_at=now, updated_by=g.caller.client_id, **columns, **values)
        )
    return jsonify(_get_one(tenant, "connections", item_id))


@require_scope("itsm.manage")
def delete_connection(tenant: str, item_id: str):
    """Delete a connection with its rules, ticket links and queue (the remote records stay)."""
    _only(())
    tenant_id = _tenant_id(tenant)
    with _db().engine.begin() as conn:
        row = _connection(conn, tenant_id, item_id, lock=True)
        ticket_ids = select(TK.c.id).where(TK.c.connection_id == row.id)
        conn.execute(delete(OP).where(OP.c.connection_id == row.id))
        conn.execute(delete(TI).where(TI.c.ticket_id.in_(ticket_ids)))
        conn.execute(delete(TK).where(TK.c.connection_id == row.id))
        conn.execute(delete(RU).where(RU.c.connection_id == row.id))
        conn.execute(
            delete(ItsmInboundSeen.__table__).where(ItsmInboundSeen.__table__.c.connection_id == row.id)
        )
        conn.execute(delete(CN).where(CN.c.id == row.id))
    return _no_content()


@require_scope("itsm.manage")
def test_connection(tenant: str, item_id: str):
    """Call the system once (short timeout): is it reachable, do the credentials work, does the table or
    project exist?  Answers ``{"ok": ..., "stage": ..., "status": ..., "message": ...}``."""
    _only(())
    tenant_id = _tenant_id(tenant)
    with _db().engine.connect() as conn:
        row = _connection(conn, tenant_id, item_id)
    try:
        connection = connection_for(current_app.config, row)
    except vault.SecretsUnavailable as exc:
        raise SecretsUnavailableError(str(exc), headers={"Retry-After": "60"}) from None
    client = client_for(connection, TEST_TIMEOUT)
    try:
        client.test()
    except RemoteError as exc:
        stage = (
            "reachability"
            if exc.status is None
            else "credentials"
            if exc.status in (401, 403)
            else "configuration"
            if 400 <= exc.status < 500
            else "service"
        )
        return jsonify({"ok": False, "stage": stage, "status": exc.status, "message": exc.message})
    finally:
        client.close()
    return jsonify({"ok": True, "stage": None, "status": None, "message": "reachable, credentials accepted"})


# -- rules -----------------------------------------------------------------------------------------


def _check_filter(conn, tenant_id: int, collection: str, text: str | None) -> None:
    try:
        sync.rule_condition(conn, tenant_id, collection, text)
    except BadRequest as exc:
        raise _invalid("filter", exc.message) from None


@require_scope("itsm.manage")
def create_rule(tenant: str):
    """Add a sync rule to a connection: which items of a collection make tickets, grouped how, and
    whether automatically (new, opened and reopened items from now on) or by hand."""
    _only(())
    data = _body(itsm_schemas.RuleIn())
    tenant_id, now = _tenant_id(tenant), utcnow()
    with _db().engine.begin() as conn:
        connection_id = int(data["connectionId"])
        if (
            conn.execute(select(CN.c.id).where(CN.c.tenant_id == tenant_id, CN.c.id == connection_id)).first()
            is None
        ):
            raise _invalid("connectionId", f"the tenant has no connection '{connection_id}'")
        if data.get("grouping") == "resource" and data["collection"] == "alerts":
            raise _invalid("grouping", "alerts are ticketed one by one")
        _check_filter(conn, tenant_id, data["collection"], data.get("filter"))
        rule_id = conn.execute(
            RU.insert()
            .values(
                tenant_id=tenant_id,
                connection_id=connection_id,
                name=data["name"],
                collection=data["collection"],
                filter=data.get("filter"),
                grouping=data.get("grouping", "item"),
                mode=data.get("mode", "automatic"),
                enabled=data.get("enabled", True),
                created_at=now,
                updated_at=now,
                created_by=g.caller.client_id,
                updated_by=g.caller.client_id,
            )
            .returning(RU.c.id)
        ).scalar_one()
    return _created("rules", tenant, rule_id)


@require_scope("itsm.manage")
def patch_rule(tenant: str, item_id: str):
    """Change a sync rule (it applies to changes from now on; existing tickets stay)."""
    _only(())
    data = _body(itsm_schemas.RulePatch(), partial=True)
    tenant_id = _tenant_id(tenant)
    with _db().engine.begin() as conn:
        old = conn.execute(
            select(RU).where(RU.c.tenant_id == tenant_id, RU.c.id == _item_id("rules", item_id))
        ).first()
        if old is None:
            raise NotFound(f"rule '{item_id[:40]}' not found")
        if data.get("grouping") == "resource" and old.collection == "alerts":
            raise _invalid("grouping", "alerts are ticketed one by one")
        if "filter" in data:
            _check_filter(conn, tenant_id, old.collection, data["filter"])
        conn.execute(
            update(RU)
            .where(RU.c.id == old.id)
            .values(updated_at=utcnow(), updated_by=g.caller.client_id, **data)
        )
    return jsonify(_get_one(tenant, "rules", item_id))


@require_scope("itsm.manage")
def delete_rule(tenant: str, item_id: str):
    """Delete a sync rule (its tickets stay, and keep following their items)."""
    _only(())
    tenant_id = _tenant_id(tenant)
    with _db().engine.begin() as conn:
        if not conn.execute(
            delete(RU).where(RU.c.tenant_id == tenant_id, RU.c.id == _item_id("rules", item_id))
        ).rowcount:
            raise NotFound(f"rule '{item_id[:40]}' not found")
    return _no_content()


# -- tickets ---------------------------------------------------------------------------------------


def _send_deliver(connection_id: int) -> None:
    from gateway.itsm.tasks import send_deliver

    send_deliver(connection_id)


def _manual(tenant: str, collection: str, item_id: str):
    _only(())
    data = _body(itsm_schemas.TicketIn())
    tenant_id = _tenant_id(tenant)
    subject = sync.SUBJECT_OF[collection]
    number = _item_id(collection, item_id)
    with _db().engine.begin() as conn:
        connection = conn.execute(
            select(CN).where(CN.c.tenant_id == tenant_id, CN.c.id == int(data["connectionId"]))
        ).first()
        if connection is None:
            raise _invalid("connectionId", f"the tenant has no connection '{data['connectionId']}'")
        if not sync.item_states(conn, tenant_id, subject, [number]):
            raise NotFound(f"{subject} '{item_id[:40]}' not found")
        rule = conn.execute(
            select(RU)
            .where(RU.c.connection_id == connection.id, RU.c.collection == collection, RU.c.enabled.is_(True))
            .order_by(RU.c.id)
        ).first()
        grouping = rule.grouping if rule is not None else "item"
        tickets, made = sync.open_tickets(
            conn, tenant_id, connection.id, collection, [number], grouping, None, g.caller.client_id
        )
    _send_deliver(connection.id)
    return _created("tickets", tenant, tickets[0], 201 if made else 200)


def _register_manual(collection: str) -> None:
    @require_scope("itsm.manage")
    def view(tenant: str, item_id: str):
        return _manual(tenant, collection, item_id)

    view.__doc__ = f"Open a ticket for one of the tenant's {collection} now (or answer the one it has)."
    blueprint.add_url_rule(
        f"/security/{collection}/<item_id>/tickets", f"ticket_{collection}", view, methods=["POST"]
    )


for _collection in ("findings", "recommendations", "alerts"):
    _register_manual(_collection)


@require_scope("itsm.manage")
def resync_ticket(tenant: str, item_id: str):
    """Send a ticket's parked operations again (after fixing what the ITSM refused), and bring its
    desired state and severity in line with its items."""
    _only(())
    tenant_id = _tenant_id(tenant)
    with _db().engine.begin() as conn:
        ticket = conn.execute(
            select(TK).where(TK.c.tenant_id == tenant_id, TK.c.id == _item_id("tickets", item_id))
        ).first()
        if ticket is None:
            raise NotFound(f"ticket '{item_id[:40]}' not found")
        conn.execute(
            update(OP)
            .where(OP.c.ticket_id == ticket.id, OP.c.status == "parked")
            .values(status="pending", attempts=0)
        )
        conn.execute(
            update(TK)
            .where(TK.c.id == ticket.id)
            .values(
                sync_state="synced" if ticket.remote_id else "pending", last_error=None, updated_at=utcnow()
            )
        )
        conn.execute(update(CN).where(CN.c.id == ticket.connection_id).values(retry_at=None))
        sync.refresh_tickets(conn, tenant_id, {ticket.id}, "resync")
    _send_deliver(ticket.connection_id)
    response = jsonify(_get_one(tenant, "tickets", item_id))
    response.status_code = 202
    return response


blueprint.add_url_rule("/itsm/connections", "create_connection", create_connection, methods=["POST"])
blueprint.add_url_rule("/itsm/connections/<item_id>", "patch_connection", patch_connection, methods=["PATCH"])
blueprint.add_url_rule(
    "/itsm/connections/<item_id>", "delete_connection", delete_connection, methods=["DELETE"]
)
blueprint.add_url_rule(
    "/itsm/connections/<item_id>/test", "test_connection", test_connection, methods=["POST"]
)
blueprint.add_url_rule("/itsm/rules", "create_rule", create_rule, methods=["POST"])
blueprint.add_url_rule("/itsm/rules/<item_id>", "patch_rule", patch_rule, methods=["PATCH"])
blueprint.add_url_rule("/itsm/rules/<item_id>", "delete_rule", delete_rule, methods=["DELETE"])
blueprint.add_url_rule("/itsm/tickets/<item_id>/resync", "resync_ticket", resync_ticket, methods=["POST"])


# -- inbound: webhook receivers --------------------------------------------------------------------

webhooks = Blueprint("itsm_webhooks", __name__)
SIGNATURE_HEADERS = ("X-Hub-Signature-256", "X-Hub-Signature", "X-Gateway-Signature")
TOKEN_HEADER = "X-Gateway-Token"
_DUMMY_SECRET = stdlib_secrets.token_bytes(32)


def webhook_path(connection_id) -> str:
    return f"/api/v1/itsm/webhooks/{connection_id}"


@require_scope("itsm.manage")
def rotate_webhook_secret(tenant: str, item_id: str):
    """A new webhook secret for the connection, answered this once (the old one stops working):
    configure it in the ITSM's webhook (Jira: the webhook's secret; ServiceNow: the outbound REST
    message signs the body with HMAC-SHA256 in ``X-Gateway-Signature`` or sends ``X-Gateway-Token``)."""
    _only(())
    tenant_id, secret = _tenant_id(tenant), stdlib_secrets.token_urlsafe(32)
    with _db().engine.begin() as conn:
        row = _connection(conn, tenant_id, item_id, lock=True)
        conn.execute(
            update(CN)
            .where(CN.c.id == row.id)
            .values(webhook_secret=_encrypt(secret), updated_at=utcnow(), updated_by=g.caller.client_id)
        )
    return jsonify(
        {
            "webhookUrl": request.url_root.rstrip("/") + webhook_path(row.id),
            "webhookSecret": secret,
            "signatureHeader": "X-Hub-Signature" if row.kind == "jira" else "X-Gateway-Signature",
            "tokenHeader": TOKEN_HEADER,
        }
    )


def _verified(secret: str | None, raw: bytes) -> bool:
    """An HMAC-SHA256 signature of the body (``sha256=<hex>``) or the shared token, compared in
    constant time; an unknown connection is compared against a random secret (same work, no hint)."""
    key = secret.encode() if secret else _DUMMY_SECRET
    expected = "sha256=" + hmac.new(key, raw, hashlib.sha256).hexdigest()
    ok = False
    for name in SIGNATURE_HEADERS:
        given = request.headers.get(name)
        if given is not None:
            ok = hmac.compare_digest(expected.encode(), given.strip().encode()) or ok
    token = request.headers.get(TOKEN_HEADER)
    if token is not None:
        ok = hmac.compare_digest(key, token.strip().encode()) or ok
    return ok and secret is not None


def receive_webhook(connection: str):
    """A ServiceNow outbound REST message or a Jira webhook about a ticket: its assignee, closure and
    comments become the items' customer-owned fields.  No token: the connection's webhook secret signs
    the body (or is sent as a shared token).  Idempotent: a delivery or comment seen before changes
    nothing."""
    _only(())
    limits = ratelimit.current()
    window = limits.consume(
        [
            (limits.read, "webhook.connection", connection[:40]),
            (limits.read, "webhook.address", request.remote_addr or "-"),
        ]
    )
    if window is not None:
        g.ratelimit_window = window
    raw = request.get_data(cache=True)
    row = None
    if connection.isascii() and connection.isdigit() and len(connection) <= 18:
        with _db().engine.connect() as conn:
            row = conn.execute(select(CN).where(CN.c.id == int(connection))).first()
    try:
        secret = vault.decrypt(current_app.config, row.webhook_secret) if row is not None else None
    except vault.SecretsUnavailable as exc:
        raise SecretsUnavailableError(str(exc), headers={"Retry-After": "60"}) from None
    if not _verified(secret, raw) or not row.enabled:
        raise InvalidSignature("the webhook's signature or token is not the connection's")
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object", code="invalidBody")
    snap, comments, delivery = inbound.parse_webhook(row.kind, payload)
    delivery = request.headers.get("X-Atlassian-Webhook-Identifier") or delivery
    delivery = delivery or hashlib.sha256(raw).hexdigest()
    with _db().engine.begin() as conn:
        if inbound.seen(conn, row.id, f"webhook:{delivery}"):
            return jsonify({"accepted": True, "duplicate": True, "edits": 0})
        edits = inbound.take_in(conn, row, snap, comments)
    return jsonify({"accepted": True, "duplicate": False, "edits": edits})


blueprint.add_url_rule(
    "/itsm/connections/<item_id>/rotateWebhookSecret",
    "rotate_webhook_secret",
    rotate_webhook_secret,
    methods=["POST"],
)
webhooks.add_url_rule(
    "/api/v1/itsm/webhooks/<connection>", "receive_webhook", receive_webhook, methods=["POST"]
)
