"""Multipart uploads: create, PUT numbered parts, complete into one batch (gateway/uploads.py)."""

from __future__ import annotations

from flask import Blueprint, current_app, g, jsonify, request, url_for

import connectors
from gateway import ratelimit, uploads
from gateway.api.batches import _SCOPE_FOR_KIND, accepted
from gateway.auth import require_scope, tenant_for_caller
from gateway.errors import BadRequest, Forbidden, UnsupportedMediaType
from gateway.ingest import Push
from gateway.models import Upload
from gateway.streaming import Inflow

blueprint = Blueprint("uploads", __name__, url_prefix="/api/v1/tenants/<tenant>")

# indicators.write: the indicator formats (stix21, graph_tiindicator); events.write: the event formats
WRITE_SCOPES = ("findings.write", "alerts.write", "indicators.write", "events.write")


def _db():
    return current_app.extensions["gateway.db"]


def _tenant_id(tenant: str) -> int:
    with _db().sessions() as session:
        return tenant_for_caller(session, tenant).id


def _text(body: dict, key: str, default: str | None = None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"'{key}' must be a string", code="invalidBody")
    return value


def _describe(tenant: str, upload: Upload) -> dict:
    body = {
        "id": upload.id,
        "status": upload.status,
        "format": upload.format,
        "contentType": upload.content_type,
        "contentEncoding": upload.content_encoding or "identity",
        "scanType": upload.scan_type,
        "idempotencyKey": upload.idempotency_key,
        "createdAt": upload.created_at.isoformat(),
        "expiresAt": upload.expires_at.isoformat(),
        "parts": uploads.parts(_db(), upload.id),
        "batchId": str(upload.batch_id) if upload.batch_id is not None else None,
        "batchUrl": None,
    }
    if upload.batch_id is not None:
        body["batchUrl"] = url_for(
            "batches.get_batch", tenant=tenant, batch_id=upload.batch_id, _external=True
        )
    return body


@blueprint.post("/uploads")
@require_scope(*WRITE_SCOPES)
def create_upload(tenant: str):
    """Start a multipart upload of one document: 201 with its id (200 for a replayed Idempotency-Key)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object naming at least 'format'", code="invalidBody")
    format_name = _text(body, "format")
    if not format_name:
        raise BadRequest(
            "'format' is required; one of: auto, " + ", ".join(connectors.formats()), code="missingFormat"
        )
    scan_type = _text(body, "scanType", "unspecified")
    if scan_type not in ("unspecified", "full", "incremental"):
        raise BadRequest("'scanType' must be 'full' or 'incremental'", code="invalidParameter")
    encoding = (_text(body, "contentEncoding", "") or "").strip().lower()
    if encoding not in ("", "identity", "gzip"):
        raise UnsupportedMediaType(
            f"contentEncoding '{encoding}' is not supported (use gzip or none)", code="unsupportedEncoding"
        )
    content_type = (_text(body, "contentType") or "").strip().lower()
    if format_name != "auto":
        try:
            connector = connectors.get(format_name)
        except connectors.UnknownFormat:
            raise BadRequest(
                f"unknown format '{format_name}'; one of: auto, " + ", ".join(connectors.formats()),
                code="unknownFormat",
            ) from None
        needed = _SCOPE_FOR_KIND[connector.RECORD_KIND]
        if needed not in g.caller.scopes:
            raise Forbidden(f"format '{format_name}' needs the scope {needed}", code="insufficientScope")
        content_type = content_type or connector.CONTENT_TYPES[0]
        if content_type not in connector.CONTENT_TYPES:
            raise UnsupportedMediaType(
                f"format '{format_name}' takes contentType "
                f"{' or '.join(connector.CONTENT_TYPES)}, not '{content_type}'"
            )
    elif not content_type:
        raise BadRequest("'contentType' is required with format 'auto'", code="invalidBody")
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 200):
        raise BadRequest("Idempotency-Key must be 1 to 200 characters", code="invalidParameter")
    push = Push(
        tenant_id=_tenant_id(tenant),
        client_pk=g.caller.client_pk,
        provider=g.caller.provider,
        format=format_name,
        content_type=content_type,
        content_encoding=encoding if encoding != "identity" else "",
        declared_length=None,
        scan_type=scan_type,
        idempotency_key=key,
    )
    upload, replayed = uploads.create(_db(), push, current_app.config["UPLOAD_EXPIRY_SECONDS"])
    response = jsonify(_describe(tenant, upload))
    response.status_code = 200 if replayed else 201
    response.headers["Location"] = url_for(
        "uploads.get_upload", tenant=tenant, upload_id=upload.id, _external=True
    )
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@blueprint.get("/uploads/<upload_id>")
@require_scope(*WRITE_SCOPES)
def get_upload(tenant: str, upload_id: str):
    """An upload: its status, the parts received (number, size, checksums) and, once completed, its batch."""
    upload = uploads.find(_db(), _tenant_id(tenant), g.caller.client_pk, upload_id)
    return jsonify(_describe(tenant, upload))


@blueprint.put("/uploads/<upload_id>/parts/<int:part_number>")
@require_scope(*WRITE_SCOPES)
def put_part(tenant: str, upload_id: str, part_number: int):
    """Store one part (201 new, 200 replacing the same number): idempotent, retryable, checksummed."""
    tenant_id = _tenant_id(tenant)
    upload = uploads.find(_db(), tenant_id, g.caller.client_pk, upload_id)
    if request.mimetype not in ("", "application/octet-stream"):  # a form body would be parsed, not streamed
        raise UnsupportedMediaType(
            f"a part is sent as application/octet-stream, not '{request.mimetype}'"
        )
    checksums = uploads.Checksums.from_headers(
        request.headers.get("x-checksum-sha256"), request.headers.get("Content-MD5")
    )
    ratelimit.before_push_body(tenant)
    config = current_app.config
    inflow = Inflow(request.stream, "", request.content_length, config["MAX_BODY_BYTES"])
    part, created = uploads.put_part(
        _db(),
        upload,
        part_number,
        inflow.chunks(),
        checksums,
        on_piece=lambda size: ratelimit.count_arriving_bytes(tenant, size, inflow.total),
    )
    response = jsonify(part)
    response.status_code = 201 if created else 200
    return response


@blueprint.post("/uploads/<upload_id>/complete")
@require_scope(*WRITE_SCOPES)
def complete_upload(tenant: str, upload_id: str):
    """Turn the parts into one batch: 202 as a push answers (the same batch when completed before)."""
    upload = uploads.find(_db(), _tenant_id(tenant), g.caller.client_pk, upload_id)
    body = request.get_json(silent=True) if request.get_data(cache=True) else None
    expected = None
    if body is not None:
        expected = body.get("parts") if isinstance(body, dict) else None
        if not isinstance(expected, list) or not all(isinstance(p, dict) for p in expected):
            raise BadRequest(
                'the body, when given, is {"parts": [{"partNumber", "sha256"}, ...]}', code="invalidBody"
            )
    batch, replayed = uploads.complete(_db(), upload, current_app.config, expected)
    return accepted(tenant, batch, replayed)


@blueprint.delete("/uploads/<upload_id>")
@require_scope(*WRITE_SCOPES)
def abort_upload(tenant: str, upload_id: str):
    """Abandon an unfinished upload: it and its parts are deleted (204)."""
    upload = uploads.find(_db(), _tenant_id(tenant), g.caller.client_pk, upload_id)
    uploads.abort(_db(), upload)
    return "", 204
