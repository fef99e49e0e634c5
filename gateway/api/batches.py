"""Ingest: POST a batch in a named format; GET its status and counts."""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request, url_for
from sqlalchemy import select

import connectors
from gateway import logs
from gateway.auth import require_scope, tenant_for_caller
from gateway.errors import BadRequest, Forbidden, NotFound, UnsupportedMediaType
from gateway.ingest import Push, read_body, store_batch
from gateway.models import Batch
from gateway.schemas import BatchOut

blueprint = Blueprint("batches", __name__, url_prefix="/api/v1/tenants/<tenant>")

_SCOPE_FOR_KIND = {"findings": "findings.write", "knowledge_base": "findings.write", "alerts": "alerts.write"}


def _db():
    return current_app.extensions["gateway.db"]


@blueprint.post("/batches")
@require_scope("findings.write", "alerts.write")
def push_batch(tenant: str):
    """Accept a batch: 202 once its bytes are committed, then the worker merges it."""
    format_name = request.args.get("format")
    if not format_name:
        raise BadRequest("the 'format' query parameter is required; one of: " + ", ".join(connectors.formats()),
                         code="missingFormat")
    scan_type = request.args.get("scanType", "unspecified")
    if scan_type not in ("unspecified", "full", "incremental"):
        raise BadRequest("'scanType' must be 'full' or 'incremental'", code="invalidParameter")
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not (1 <= len(idempotency_key) <= 200):
        raise BadRequest("Idempotency-Key must be 1 to 200 characters", code="invalidParameter")
    with _db().sessions() as session:
        tenant_row = tenant_for_caller(session, tenant)
    limit = current_app.config["MAX_BODY_BYTES"]
    body = read_body(request.stream, request.headers.get("Content-Encoding", "").strip().lower(),
                     request.content_length, limit)
    if format_name == "auto":
        format_name = connectors.detect(body[:65536]) or ""
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
    batch, replayed = store_batch(_db(), push, body)
    logs.bind(batch_id=batch.id)  # on the request's remaining log lines (reset at teardown)
    if not replayed:
        from workers.tasks import enqueue

        enqueue(_db(), batch.id)
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
@require_scope("security.read", "findings.write", "alerts.write")
def get_batch(tenant: str, batch_id: str):
    """A batch's status, counts and rejected records."""
    with _db().sessions() as session:
        tenant_row = tenant_for_caller(session, tenant)
        batch = None
        if batch_id.isascii() and batch_id.isdigit() and len(batch_id) < 19:
            batch = session.scalar(
                select(Batch).where(Batch.id == int(batch_id), Batch.tenant_id == tenant_row.id))
        if batch is None:
            raise NotFound(f"batch '{batch_id}' not found")
    return jsonify(BatchOut().dump(batch))
