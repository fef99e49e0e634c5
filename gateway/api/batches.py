"""Ingest: POST a batch in a named format; GET its status and counts."""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, current_app, g, jsonify, request, url_for
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import and_, or_, select

import connectors
from gateway import logs, ratelimit, smallbatches
from gateway.auth import caller_tenant, require_scope, tenant_for_caller
from gateway.errors import BadRequest, Forbidden, NotFound, UnsupportedMediaType
from gateway.ingest import WELLFORMED_CHECK_MAX_BYTES, Push, store_batch
from gateway.models import Batch, BatchRejection
from gateway.schemas import BatchOut
from gateway.streaming import STREAM_THRESHOLD, Inflow, read_head, store_streamed

blueprint = Blueprint("batches", __name__, url_prefix="/api/v1/tenants/<tenant>")

_SCOPE_FOR_KIND = {"findings": "findings.write", "knowledge_base": "findings.write", "alerts": "alerts.write",
                   "indicators": "indicators.write",
                   "events": "events.write"}


def _db():
    return current_app.extensions["gateway.db"]


DEFAULT_TOP = 100
MAX_TOP = 1000
BATCH_STATUSES = ("receiving", "accepted", "processing", "succeeded", "partiallySucceeded", "failed")


def _visible(query, tenant_id: int):
    """The tenant's batches the caller may see: all of them with security.read, else its own."""
    query = query.where(Batch.tenant_id == tenant_id)
    if "security.read" not in g.caller.scopes:
        query = query.where(Batch.client_pk == g.caller.client_pk)
    return query


def _find_batch(session, tenant_row, batch_id: str) -> Batch:
    batch = None
    if batch_id.isascii() and batch_id.isdigit() and len(batch_id) < 19:
        batch = session.scalar(_visible(select(Batch).where(Batch.id == int(batch_id)), tenant_row.id))
    if batch is None:
        raise NotFound(f"batch '{batch_id}' not found")
    return batch


def _serializer() -> URLSafeSerializer:
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt="gateway.batches.cursor.v1")


def _top() -> int:
    raw = request.args.get("$top")
    if raw is None:
        return DEFAULT_TOP
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_TOP:
        raise BadRequest(f"'$top' must be an integer from 1 to {MAX_TOP}", code="invalidParameter")
    return int(raw)


def _cursor(fingerprint: list):
    """The keyset position a ``$skiptoken`` carries, checked to belong to this query; or None."""
    token = request.args.get("$skiptoken")
    if token is None:
        return None
    try:
        data = _serializer().loads(token)
    except BadSignature:
        raise BadRequest("'$skiptoken' is not a valid paging token", code="invalidSkipToken") from None
    if not isinstance(data, dict) or data.get("f") != fingerprint or not isinstance(data.get("v"), list):
        raise BadRequest("'$skiptoken' does not belong to this query", code="invalidSkipToken")
    return data["v"]


def _when(name: str) -> datetime | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"'{name}' must be an ISO 8601 date-time, e.g. 2026-01-31T12:00:00Z",
                         code="invalidParameter") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _next_link(endpoint: str, token: str, **values) -> str:
    args = {k: v for k, v in request.args.items() if k != "$skiptoken"}
    args["$skiptoken"] = token
    return url_for(endpoint, **values, **args, _external=True)


@blueprint.get("/batches")
@require_scope("security.read", "findings.write", "alerts.write", "indicators.write", "events.write")
def list_batches(tenant: str):
    """The tenant's batches, newest first (a provider client's own only), with keyset paging."""
    status = request.args.get("status")
    if status is not None and status not in BATCH_STATUSES:
        raise BadRequest("'status' must be one of: " + ", ".join(BATCH_STATUSES), code="invalidParameter")
    format_name = request.args.get("format")
    if format_name is not None and format_name not in connectors.formats():
        raise BadRequest(f"unknown format '{format_name}'; one of: " + ", ".join(connectors.formats()),
                         code="unknownFormat")
    after, before = _when("receivedAfter"), _when("receivedBefore")
    top = _top()
    with _db().sessions() as session:
        tenant_row = tenant_for_caller(session, tenant)
        fingerprint = [tenant_row.id, g.caller.client_pk if "security.read" not in g.caller.scopes else None,
                       status, format_name, after and after.isoformat(), before and before.isoformat()]
        query = _visible(select(Batch), tenant_row.id)
        if status is not None:
            query = query.where(Batch.status == status)
        if format_name is not None:
            query = query.where(Batch.format == format_name)
        if after is not None:
            query = query.where(Batch.received_at > after)
        if before is not None:
            query = query.where(Batch.received_at < before)
        cursor = _cursor(fingerprint)
        if cursor is not None:
            try:
                at, last_id = datetime.fromisoformat(cursor[0]), int(cursor[1])
            except (ValueError, TypeError, IndexError):
                raise BadRequest("'$skiptoken' is not a valid paging token",
                                 code="invalidSkipToken") from None
            query = query.where(or_(Batch.received_at < at,
                                    and_(Batch.received_at == at, Batch.id < last_id)))
        rows = session.scalars(query.order_by(Batch.received_at.desc(), Batch.id.desc()).limit(top + 1)).all()
        body: dict = {"value": BatchOut(many=True).dump(rows[:top])}
        if len(rows) > top:
            last = rows[top - 1]
            token = _serializer().dumps({"f": fingerprint, "v": [last.received_at.isoformat(), last.id]})
            body["@odata.nextLink"] = _next_link("batches.list_batches", token, tenant=tenant)
    return jsonify(body)


@blueprint.get("/batches/<batch_id>/rejections")
@require_scope("security.read", "findings.write", "alerts.write", "indicators.write", "events.write")
def list_rejections(tenant: str, batch_id: str):
    """Every rejected record of a batch, in order, with keyset paging."""
    top = _top()
    with _db().sessions() as session:
        tenant_row = tenant_for_caller(session, tenant)
        batch = _find_batch(session, tenant_row, batch_id)
        fingerprint = [tenant_row.id, batch.id]
        query = select(BatchRejection).where(BatchRejection.tenant_id == tenant_row.id,
                                             BatchRejection.batch_id == batch.id)
        cursor = _cursor(fingerprint)
        if cursor is not None:
            if len(cursor) != 1 or not isinstance(cursor[0], int):
                raise BadRequest("'$skiptoken' is not a valid paging token", code="invalidSkipToken")
            query = query.where(BatchRejection.seq > cursor[0])
        rows = session.scalars(query.order_by(BatchRejection.seq).limit(top + 1)).all()
        body: dict = {"@odata.count": int((batch.counts or {}).get("rejected", 0)),
                      "value": [{"seq": row.seq, "position": row.position, "reason": row.reason,
                                 "providerId": row.provider_id} for row in rows[:top]]}
        if len(rows) > top:
            token = _serializer().dumps({"f": fingerprint, "v": [rows[top - 1].seq]})
            body["@odata.nextLink"] = _next_link("batches.list_rejections", token, tenant=tenant,
                                                 batch_id=batch_id)
    return jsonify(body)


@blueprint.post("/batches")
@require_scope("findings.write", "alerts.write", "indicators.write", "events.write")
def push_batch(tenant: str):
    """Accept a batch: 202 once its bytes are committed, then the worker merges it."""
    format_name = request.args.get("format")
    if not format_name:
        raise BadRequest("the 'format' query parameter is required; one of: "
                         + ", ".join(connectors.formats()), code="missingFormat")
    scan_type = request.args.get("scanType", "unspecified")
    if scan_type not in ("unspecified", "full", "incremental"):
        raise BadRequest("'scanType' must be 'full' or 'incremental'", code="invalidParameter")
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 200):
        raise BadRequest("Idempotency-Key must be 1 to 200 characters", code="invalidParameter")
    tenant_row = caller_tenant(tenant)  # read with the token: no query of its own
    # a small body's declared bytes are counted with the tenant's request (one call to Redis fewer)
    counted = ratelimit.before_push_body(tenant_row.external_id, count_up_to=STREAM_THRESHOLD)
    config = current_app.config
    inflow = Inflow(request.stream, request.headers.get("Content-Encoding", "").strip().lower(),
                    request.content_length, config["MAX_BODY_BYTES"], config["GZIP_MAX_RATIO"])
    chunks = inflow.chunks()
    head = read_head(chunks, STREAM_THRESHOLD + 1)
    streamed = len(head) > STREAM_THRESHOLD  # a large body is stored piece by piece (gateway/streaming.py)
    if not streamed and not counted:
        ratelimit.after_push_body(tenant_row.external_id, len(head))
    if format_name == "auto":
        format_name = connectors.detect(head[:65536]) or ""
        if not format_name:
            raise BadRequest("the format could not be detected; name it with ?format=", code="unknownFormat")
    try:
        connector = connectors.get(format_name)
    except connectors.UnknownFormat:
        raise BadRequest(f"unknown format '{format_name}'; one of: " + ", ".join(connectors.formats()),
                         code="unknownFormat") from None
    needed = _SCOPE_FOR_KIND[connector.RECORD_KIND]
    if needed not in g.caller.scopes:
        raise Forbidden(f"format '{format_name}' needs the scope {needed}", code="insufficientScope")
    media_type = (request.mimetype or "").lower()
    if media_type not in connector.CONTENT_TYPES:
        raise UnsupportedMediaType(
            f"format '{format_name}' takes Content-Type {' or '.join(connector.CONTENT_TYPES)}, "
            f"not '{media_type or 'none'}'")
    push = Push(
        tenant_id=tenant_row.id, client_pk=g.caller.client_pk, provider=g.caller.provider,
        format=format_name, content_type=media_type,
        content_encoding=request.headers.get("Content-Encoding", ""),
        declared_length=request.content_length, scan_type=scan_type, idempotency_key=idempotency_key,
    )
    check_limit = config.get("WELLFORMED_CHECK_MAX_BYTES", WELLFORMED_CHECK_MAX_BYTES)
    if streamed:
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        batch, replayed = store_streamed(
            _db(), push, head, chunks, check_limit=check_limit,
            declared_length=request.content_length if encoding in ("", "identity") else None,
            timeout_seconds=config["RECEIVING_TIMEOUT_SECONDS"],
            on_piece=lambda size: ratelimit.count_arriving_bytes(tenant_row.external_id, size, inflow.total))
    else:
        batch, replayed = store_batch(_db(), push, head, check_limit)
    # a small batch sends no task while one of its tenant's is on its way (gateway/smallbatches.py)
    pending = None if streamed else smallbatches.pending_key(config, tenant_row.id, tenant_row.created_at,
                                                            batch.body_size)
    return accepted(tenant, batch, replayed, pending)


def accepted(tenant: str, batch: Batch, replayed: bool, pending: str | None = None):
    """The 202 of a stored batch (a push, a completed upload), enqueued unless it is a replay."""
    logs.bind(batch_id=batch.id)  # on the request's remaining log lines (reset at teardown)
    if not replayed:  # sent after the answer, by the process's publisher thread (workers/tasks.py)
        from workers.tasks import enqueue_soon

        enqueue_soon(current_app._get_current_object(), _db(), batch.id,
                     recorded=batch.enqueued_at is not None, pending=pending)
    status_url = url_for("batches.get_batch", tenant=tenant, batch_id=batch.id, _external=True)
    response = jsonify({"id": str(batch.id), "status": batch.status if replayed else "accepted",
                        "statusUrl": status_url, "format": batch.format, "scanType": batch.scan_type,
                        "receivedAt": batch.received_at.isoformat()})
    response.status_code = 202
    response.headers["Location"] = status_url
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response



@blueprint.get("/batches/<batch_id>")
@require_scope("security.read", "findings.write", "alerts.write", "indicators.write", "events.write")
def get_batch(tenant: str, batch_id: str):
    """A batch's status, counts and rejected records."""
    with _db().sessions() as session:
        tenant_row = tenant_for_caller(session, tenant)
        batch = _find_batch(session, tenant_row, batch_id)
    return jsonify(BatchOut().dump(batch))
