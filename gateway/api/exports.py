"""``/api/v1/tenants/<tenant>/exports``: the tenant's event destinations (scope ``exports.manage``).

Create, read, change and delete destinations; each carries an ETag (``"<id>.<version>"``, also
its ``etag`` field) and ``PATCH``/``DELETE`` need ``If-Match`` with it (``428`` without, ``412``
when it is stale), as ASC's automations do.  ``POST .../test`` sends one sample event now and
answers what the receiver said; ``POST .../replay`` moves the cursor back to an event id or a
time; ``POST .../rotateSecret`` replaces the signing secret, the old one signing too for
``EXPORT_SECRET_OVERLAP_SECONDS``; ``GET .../deliveries`` is the recent deliveries log.  Delivery
itself is never done here (gateway/export/delivery.py, by Celery tasks).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import Blueprint, current_app, g, jsonify, request, url_for
from marshmallow import RAISE, Schema, ValidationError, fields, validate
from sqlalchemy import func, select, update

from gateway.auth import require_scope, tenant_for_caller
from gateway.errors import APIError, BadRequest, Conflict, NotFound
from gateway.export import delivery, kinds, subjects, tls
from gateway.export import secrets as export_secrets
from gateway.models import ExportDelivery, ExportDestination, LifecycleEvent, utcnow
from gateway.schemas import ExportDeliveryOut, ExportOut

blueprint = Blueprint("exports", __name__, url_prefix="/api/v1/tenants/<tenant>")
DEST, DLV, EV = ExportDestination.__table__, ExportDelivery.__table__, LifecycleEvent.__table__
MAX_BATCH_SIZE = 100
EVENT_TYPE_PATTERN = r"^(\*|(\*|[A-Za-z]{1,30})\.(\*|[A-Za-z]{1,40}))$"
STATES_SET_BY_CLIENTS = ("active", "paused")


def _event_types():
    return fields.List(
        fields.String(
            validate=validate.Regexp(
                EVENT_TYPE_PATTERN, error="an event type such as 'finding.resolved', 'finding.*' or '*'"
            )
        ),
        validate=validate.Length(min=1, max=50),
    )


class ExportPatch(Schema):
    class Meta:
        unknown = RAISE

    displayName = fields.String(validate=validate.Length(min=1, max=200))
    url = fields.String(validate=validate.Length(min=1, max=2048))
    eventTypes = _event_types()
    filter = fields.String(allow_none=True, validate=validate.Length(min=1, max=4000))
    batchSize = fields.Integer(strict=True, validate=validate.Range(min=1, max=MAX_BATCH_SIZE))
    options = fields.Dict(keys=fields.String())  # kind-specific (gateway/export/kinds.py)
    state = fields.String(validate=validate.OneOf(STATES_SET_BY_CLIENTS))
    # the private key of option ``clientCertificate`` (mTLS): stored encrypted, never shown
    clientKey = fields.String(allow_none=True, load_only=True, validate=validate.Length(min=1, max=20000))


class ExportIn(ExportPatch):
    displayName = fields.String(required=True, validate=validate.Length(min=1, max=200))
    kind = fields.String(validate=validate.OneOf(tuple(sorted(kinds.KINDS))))
    url = fields.String(required=True, validate=validate.Length(min=1, max=2048))
    eventTypes = _event_types()
    secret = fields.String(allow_none=True, validate=validate.Length(min=1, max=200))


class ExportReplayIn(Schema):
    class Meta:
        unknown = RAISE

    since = fields.String(required=True, validate=validate.Length(min=1, max=64))


class ExportRotateIn(Schema):
    class Meta:
        unknown = RAISE

    secret = fields.String(allow_none=True, validate=validate.Length(min=1, max=200))


class PreconditionFailed(APIError):
    status, code = 412, "preconditionFailed"


class PreconditionRequired(APIError):
    status, code = 428, "preconditionRequired"


def _db():
    return current_app.extensions["gateway.db"]


def _tenant(tenant: str):
    with _db().sessions() as session:
        return tenant_for_caller(session, tenant)


def _only(allowed: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(request.args) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown query parameter '{unknown[0][:40]}'", code="invalidParameter")


def _load(schema: Schema, optional: bool = False) -> dict:
    if optional and not request.get_data():
        return {}
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object", code="invalidBody")
    try:
        return schema.load(payload)
    except ValidationError as exc:
        raise BadRequest(
            "invalid fields: " + "; ".join(f"{k}: {v}" for k, v in exc.messages.items()),
            code="invalidBody",
            details=exc.messages,
        ) from None


def _invalid(field: str, message: str) -> BadRequest:
    return BadRequest(f"{field}: {message}", code="invalidBody", details={field: [message]})


def _client_key(data: dict, existing=None) -> str | None:
    """The client key the destination will have: the one given, else the stored one while the
    options keep a client certificate (a PATCH that drops the certificate drops the key)."""
    if "clientKey" in data:
        return data["clientKey"]
    options = data.get("options", existing.options if existing is not None else {}) or {}
    if existing is None or not existing.client_key or not options.get("clientCertificate"):
        return None
    try:
        return export_secrets.unseal(current_app.config, existing.client_key)
    except export_secrets.SecretUnreadable:
        raise _invalid("clientKey", "the stored key cannot be decrypted: give it again") from None


def _sealed_client_key(data: dict, existing=None) -> str | None:
    key = _client_key(data, existing)
    return export_secrets.seal(current_app.config, key) if key else None


def _check(kind_name: str, data: dict, existing=None) -> None:
    """The URL, the filter and the secret, checked against the kind and the settings."""
    kind = kinds.get(kind_name)
    url = data.get("url", existing.url if existing is not None else None)
    try:
        kinds.check_url(url, kind.schemes, bool(current_app.config["EXPORT_ALLOW_PRIVATE_TARGETS"]))
    except ValueError as exc:
        raise _invalid("url", f"the URL {exc}") from None
    options = data.get("options", existing.options if existing is not None else {})
    try:
        kind.check(url, options)
    except ValueError as exc:
        raise _invalid("options", str(exc)) from None
    key = _client_key(data, existing)
    try:
        tls.check_client_certificate(options if isinstance(options, dict) else {}, key)
    except ValueError as exc:
        raise _invalid("clientKey" if "clientKey" in str(exc)[:12] else "options", str(exc)) from None
    patterns = data.get("eventTypes", existing.event_types if existing is not None else ["*"])
    text = data.get("filter", existing.filter if existing is not None else None)
    if text is not None:
        subjects.check_filter(text, patterns, _db().engine.dialect.name)
    if data.get("secret") is not None and not kind.valid_secret(data["secret"]):
        raise _invalid("secret", kind.secret_hint)


def _etag(row) -> str:
    return f'"{row.id}.{row.version}"'


def _if_match(row, noun: str = "destination") -> None:
    header = request.headers.get("If-Match")
    if header is None:
        raise PreconditionRequired(f"this change needs If-Match with the {noun}'s ETag (GET it first)")
    tags = [tag.strip() for tag in header.split(",")]
    if "*" not in tags and _etag(row) not in tags:
        raise PreconditionFailed(f"the {noun} changed since (its ETag is now {_etag(row)}): GET it again")


def _row(conn, tenant_id: int, export_id: str, for_update: bool = False):
    if not (export_id.isascii() and export_id.isdigit()) or len(export_id) > 9:
        raise NotFound(f"export '{export_id[:40]}' not found")
    query = select(DEST).where(DEST.c.tenant_id == tenant_id, DEST.c.id == int(export_id))
    if for_update and _db().is_postgres:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"export '{export_id[:40]}' not found")
    return row


def _shown(conn, row) -> dict:
    data = row._asdict()
    data["status"] = dict(data, **delivery.lag(conn, row, utcnow()))
    return ExportOut().dump(data)


def _answer(row, status: int = 200, extra: dict | None = None):
    with _db().engine.connect() as conn:
        body = _shown(conn, row)
    body.update(extra or {})
    response = jsonify(body)
    response.status_code = status
    response.headers["ETag"] = _etag(row)
    return response


@require_scope("exports.manage")
def list_exports(tenant: str):
    """The tenant's destinations, with their delivery status."""
    _only()
    tenant_id = _tenant(tenant).id
    with _db().engine.connect() as conn:
        rows = conn.execute(select(DEST).where(DEST.c.tenant_id == tenant_id).order_by(DEST.c.id)).all()
        return jsonify({"value": [_shown(conn, row) for row in rows]})


@require_scope("exports.manage")
def create_export(tenant: str):
    """Add a destination; its events start with those committed from now on (replay reaches back)."""
    _only()
    data = _load(ExportIn())
    kind_name = data.get("kind", "webhook")
    tenant_id = _tenant(tenant).id
    _check(kind_name, data)
    kind = kinds.get(kind_name)
    secret = data.get("secret") or (kind.new_secret() if kind.uses_secret else None)
    if not secret and getattr(kind, "secret_required", False):
        raise _invalid("secret", f"a {kind_name} destination needs its secret: {kind.secret_hint}")
    shown = secret if secret and (getattr(kind, "echoes_secret", True) or "secret" not in data) else None
    now = utcnow()
    with _db().engine.begin() as conn:
        count = conn.execute(
            select(func.count()).select_from(DEST).where(DEST.c.tenant_id == tenant_id)
        ).scalar_one()
        if count >= current_app.config["EXPORT_MAX_DESTINATIONS"]:
            raise Conflict(
                f"the tenant has {count} destinations, the most it may have "
                "(GATEWAY_EXPORT_MAX_DESTINATIONS): delete one first"
            )
        latest = conn.execute(select(func.max(EV.c.seq)).where(EV.c.tenant_id == tenant_id)).scalar() or 0
        export_id = conn.execute(
            DEST.insert()
            .values(
                tenant_id=tenant_id,
                display_name=data["displayName"],
                kind=kind_name,
                url=data["url"],
                event_types=data.get("eventTypes", ["*"]),
                filter=data.get("filter"),
                batch_size=data.get("batchSize", 1),
                options=data.get("options", {}),
                client_key=_sealed_client_key(data),
                state=data.get("state", "active"),
                secret=export_secrets.seal(current_app.config, secret) if secret else None,
                secret_hint=export_secrets.hint(secret) if secret else None,
                secret_rotated_at=now if secret else None,
                version=1,
                cursor_seq=latest,
                attempts=0,
                delivered_events=0,
                created_at=now,
                created_by=g.caller.client_id,
                updated_at=now,
                updated_by=g.caller.client_id,
            )
            .returning(DEST.c.id)
        ).scalar_one()
        row = _row(conn, tenant_id, str(export_id))
    response = _answer(row, 201, {"secret": shown} if shown else None)
    response.headers["Location"] = url_for(
        "exports.get_export", tenant=tenant, export_id=export_id, _external=True
    )
    return response


@require_scope("exports.manage")
def get_export(tenant: str, export_id: str):
    """One destination, with its delivery status and lag."""
    _only()
    tenant_id = _tenant(tenant).id
    with _db().engine.connect() as conn:
        row = _row(conn, tenant_id, export_id)
    return _answer(row)


@require_scope("exports.manage")
def update_export(tenant: str, export_id: str):
    """Change a destination (``If-Match`` required).  ``state: paused`` stops its deliveries (the
    cursor stays: resuming with ``active`` catches up); ``active`` also retries a failing one now."""
    _only()
    data = _load(ExportPatch())
    if not data:
        raise BadRequest("the body names no field to change", code="invalidBody")
    tenant_id = _tenant(tenant).id
    now = utcnow()
    with _db().engine.begin() as conn:
        row = _row(conn, tenant_id, export_id, for_update=True)
        _if_match(row)
        _check(row.kind, data, row)
        values = {"updated_at": now, "updated_by": g.caller.client_id, "version": row.version + 1}
        for name, column in (
            ("displayName", "display_name"),
            ("url", "url"),
            ("eventTypes", "event_types"),
            ("filter", "filter"),
            ("batchSize", "batch_size"),
            ("options", "options"),
        ):
            if name in data:
                values[column] = data[name]
        if "clientKey" in data or "options" in data:
            values["client_key"] = _sealed_client_key(data, row)
        if "url" in data:  # a new address is tried at once
            values["next_attempt_at"] = None
        if data.get("state") == "paused":
            values["state"] = "paused"
        elif data.get("state") == "active":
            values.update(state="failing" if row.state == "failing" else "active", next_attempt_at=None)
        conn.execute(update(DEST).where(DEST.c.id == row.id).values(values))
        row = _row(conn, tenant_id, export_id)
    return _answer(row)


@require_scope("exports.manage")
def delete_export(tenant: str, export_id: str):
    """Delete a destination and its deliveries log (``If-Match`` required)."""
    _only()
    tenant_id = _tenant(tenant).id
    with _db().engine.begin() as conn:
        row = _row(conn, tenant_id, export_id, for_update=True)
        _if_match(row)
        conn.execute(DLV.delete().where(DLV.c.destination_id == row.id))
        conn.execute(DEST.delete().where(DEST.c.id == row.id))
    response = current_app.response_class(status=204)
    del response.headers["Content-Type"]
    return response


@require_scope("exports.manage")
def test_export(tenant: str, export_id: str):
    """Send one sample event (type ``export.test``) now, signed as deliveries are, and answer what the
    receiver said.  It takes no position and moves nothing; it is logged in the deliveries."""
    _only()
    tenant_row = _tenant(tenant)
    with _db().engine.connect() as conn:
        row = _row(conn, tenant_row.id, export_id)
    message_id, outcome = delivery.send_test(_db(), current_app.config, row, tenant, g.caller.client_id)
    return jsonify(
        {
            "delivered": outcome.ok,
            "messageId": message_id,
            "statusCode": outcome.status_code,
            "durationMs": outcome.duration_ms,
            "error": outcome.error,
            "responseBody": outcome.response_excerpt,
        }
    )


def _since(text: str) -> int | datetime:
    if text.isascii() and text.isdigit() and len(text) <= 18:
        return int(text)
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _invalid(
            "since", "an event id (e.g. '42') or a date-time (e.g. '2024-04-01T00:00:00Z')"
        ) from None
    if when.tzinfo is None:
        raise _invalid("since", "a date-time needs its offset (Z or +hh:mm)")
    return when.astimezone(UTC)


@require_scope("exports.manage")
def replay_export(tenant: str, export_id: str):
    """Deliver again from an event (``since``: its id, that event included) or a time (every event
    at or after it): the cursor moves back there; the events after it are delivered again, in order,
    with their original message ids."""
    _only()
    since = _since(_load(ExportReplayIn())["since"])
    tenant_id = _tenant(tenant).id
    with _db().engine.begin() as conn:
        row = _row(conn, tenant_id, export_id, for_update=True)
        if (
            isinstance(since, int)
            and conn.execute(select(EV.c.id).where(EV.c.tenant_id == tenant_id, EV.c.id == since)).first()
            is None
        ):
            raise _invalid("since", f"the tenant has no event {since}")
        moved = delivery.replay(conn, row, since, g.caller.client_id, utcnow())
        row = _row(conn, tenant_id, export_id)
    response = _answer(row, 202, {"replay": moved})
    return response


@require_scope("exports.manage")
def rotate_export_secret(tenant: str, export_id: str):
    """Replace the signing secret (generated, or the body's ``secret``); the old one keeps signing
    beside it for ``EXPORT_SECRET_OVERLAP_SECONDS``, so receivers can switch without a gap.  The new
    secret is in this answer only."""
    _only()
    data = _load(ExportRotateIn(), optional=True)
    tenant_id = _tenant(tenant).id
    now = utcnow()
    with _db().engine.begin() as conn:
        row = _row(conn, tenant_id, export_id, for_update=True)
        kind = kinds.get(row.kind)
        if not kind.uses_secret:
            raise BadRequest(f"a {row.kind} destination has no signing secret", code="invalidBody")
        if data.get("secret") is not None and not kind.valid_secret(data["secret"]):
            raise _invalid("secret", kind.secret_hint)
        secret = data.get("secret") or kind.new_secret()
        if not secret:
            raise _invalid("secret", f"give the {row.kind} destination's new secret: {kind.secret_hint}")
        overlap = timedelta(seconds=current_app.config["EXPORT_SECRET_OVERLAP_SECONDS"])
        conn.execute(
            update(DEST)
            .where(DEST.c.id == row.id)
            .values(
                secret=export_secrets.seal(current_app.config, secret),
                secret_hint=export_secrets.hint(secret),
                previous_secret=row.secret,
                previous_secret_expires_at=now + overlap if row.secret else None,
                secret_rotated_at=now,
                version=row.version + 1,
                updated_at=now,
                updated_by=g.caller.client_id,
            )
        )
        row = _row(conn, tenant_id, export_id)
    return _answer(row, 200, {"secret": secret} if getattr(kind, "echoes_secret", True) else None)


@require_scope("exports.manage")
def list_export_deliveries(tenant: str, export_id: str):
    """The destination's recent deliveries, newest first (``EXPORT_DELIVERY_LOG_SIZE`` are kept)."""
    _only()
    tenant_id = _tenant(tenant).id
    with _db().engine.connect() as conn:
        row = _row(conn, tenant_id, export_id)
        rows = conn.execute(select(DLV).where(DLV.c.destination_id == row.id).order_by(DLV.c.id.desc())).all()
    return jsonify({"value": ExportDeliveryOut(many=True).dump([r._asdict() for r in rows])})


blueprint.add_url_rule("/exports", "list_exports", list_exports, methods=["GET"])
blueprint.add_url_rule("/exports", "create_export", create_export, methods=["POST"])
blueprint.add_url_rule("/exports/<export_id>", "get_export", get_export, methods=["GET"])
blueprint.add_url_rule("/exports/<export_id>", "update_export", update_export, methods=["PATCH"])
blueprint.add_url_rule("/exports/<export_id>", "delete_export", delete_export, methods=["DELETE"])
blueprint.add_url_rule("/exports/<export_id>/test", "test_export", test_export, methods=["POST"])
blueprint.add_url_rule("/exports/<export_id>/replay", "replay_export", replay_export, methods=["POST"])
blueprint.add_url_rule(
    "/exports/<export_id>/rotateSecret", "rotate_export_secret", rotate_export_secret, methods=["POST"]
)
blueprint.add_url_rule(
    "/exports/<export_id>/deliveries", "list_export_deliveries", list_export_deliveries, methods=["GET"]
)
