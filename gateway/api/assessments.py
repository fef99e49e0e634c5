"""ASC-style single assessments: ``PUT .../assessments/{name}``, answered synchronously.

A partner writes one security assessment (Azure Security Center / Defender for Cloud
``PUT {resourceId}/providers/Microsoft.Security/assessments/{name}`` body) and gets the
assessment as stored back at once: 201 when it created it, 200 when it updated it (or
the push was older than, or identical to, the stored one).  It is as durable as a batch:
the normalized body is committed as a one-record batch of format ``asc_assessment``
before anything is merged, then that batch is merged in the request by the same
``process_batch`` the workers run.  If the merge cannot finish (a deadlock that keeps
coming back, a lost connection) the batch is handed to the workers and the answer is a
500: the assessment is kept and lands when a worker merges it.

The resource is the ``resourceId`` query parameter, else the body's
``properties.resourceDetails.id``; when both are given they must name the same resource.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request
from sqlalchemy import select

from connectors.asc_assessment import FORMAT, assessment_from_put_body, normalize_resource_id
from gateway import ratelimit
from gateway.auth import require_scope, tenant_for_caller
from gateway.errors import BadRequest, UnsupportedMediaType, unstorable_path
from gateway.ingest import Push, read_body, store_batch
from gateway.models import Batch, FindingSource
from gateway.pipeline import TransientError, process_batch

log = logging.getLogger(__name__)

blueprint = Blueprint("assessments", __name__, url_prefix="/api/v1/tenants/<tenant>")

MAX_ASSESSMENT_BYTES = 1 << 20
MAX_RESOURCE_ID = 2048  # openapi: resourceId maxLength
MERGE_ATTEMPTS = 3
ASSESSMENT_TYPE = "Microsoft.Security/assessments"


def _db():
    return current_app.extensions["gateway.db"]


@blueprint.put("/assessments/<name>")
@require_scope("findings.write")
def put_assessment(tenant: str, name: str):
    """Create or update one assessment; answer 201/200 with it as stored."""
    with _db().sessions() as session:
        tenant_row = tenant_for_caller(session, tenant)
    ratelimit.before_push_body(tenant_row.external_id)
    if (request.mimetype or "").lower() != "application/json":
        raise UnsupportedMediaType(
            f"an assessment takes Content-Type application/json, not '{request.mimetype or 'none'}'")
    limit = min(current_app.config["MAX_BODY_BYTES"], MAX_ASSESSMENT_BYTES)
    raw = read_body(request.stream, request.headers.get("Content-Encoding", "").strip().lower(),
                    request.content_length, limit)
    ratelimit.after_push_body(tenant_row.external_id, len(raw))
    document = normalized_document(name, raw, request.args.get("resourceId"))
    push = Push(
        tenant_id=tenant_row.id, client_pk=g.caller.client_pk, provider=g.caller.provider, format=FORMAT,
        content_type="application/json", content_encoding="", declared_length=None,
        scan_type="incremental", idempotency_key=None,
    )
    batch, _ = store_batch(_db(), push, document)
    counts = merge_now(batch.id)
    stored = stored_assessment(tenant_row.id, g.caller.provider, json.loads(document))
    response = jsonify(stored)
    response.status_code = 201 if counts.get("created") else 200
    return response


def normalized_document(name: str, raw: bytes, resource_param: str | None) -> bytes:
    """The one-assessment JSON document the batch stores; BadRequest naming what is wrong."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not well-formed JSON: {exc}", code="malformedBody") from None
    except RecursionError:
        raise BadRequest("the body is nested too deeply", code="malformedBody") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise BadRequest(f"the body holds a value that cannot be read: {str(exc)[:120]}",
                         code="malformedBody") from None
    bad = unstorable_path(body)
    if bad:
        raise BadRequest(f"the body at {bad[:120]} contains a character that is not allowed "
                         "(NUL, U+0000, or an unpaired UTF-16 surrogate)", code="invalidCharacter")
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'properties'", code="invalidDocument")
    properties = body.get("properties")
    details = properties.get("resourceDetails") if isinstance(properties, dict) else None
    detail_id = None
    if isinstance(details, dict):
        ids = [v for k, v in details.items() if k.lower() == "id" and isinstance(v, str) and v.strip()]
        detail_id = ids[0] if ids else None
    if resource_param is not None and len(resource_param) > MAX_RESOURCE_ID:
        raise BadRequest(f"'resourceId' is longer than {MAX_RESOURCE_ID} characters", code="invalidParameter")
    if detail_id is not None and len(detail_id) > MAX_RESOURCE_ID:
        raise BadRequest(f"'properties.resourceDetails.id' is longer than {MAX_RESOURCE_ID} characters",
                         code="invalidDocument")
    resource_id = resource_param if resource_param not in (None, "") else detail_id
    if not resource_id:
        raise BadRequest("the resource is unknown: give the 'resourceId' query parameter "
                         "(or 'properties.resourceDetails.id' in the body)", code="invalidParameter")
    if detail_id and normalize_resource_id(detail_id).lower() != normalize_resource_id(resource_id).lower():
        raise BadRequest("'properties.resourceDetails.id' and the 'resourceId' parameter name different "
                         "resources", code="invalidDocument")
    try:
        record = assessment_from_put_body(name, body, resource_id)
    except ValueError as exc:
        raise BadRequest(f"not a valid assessment: {exc}", code="invalidDocument") from None
    resource = normalize_resource_id(resource_id)
    stored_properties = dict(properties)
    stored_properties["resourceDetails"] = {**(details if isinstance(details, dict) else {}), "id": resource}
    document = {"id": record.extra["assessmentId"], "name": record.vendor_id, "type": ASSESSMENT_TYPE,
                "properties": stored_properties}
    return json.dumps(document, separators=(",", ":")).encode()


def merge_now(batch_id: int) -> dict[str, int]:
    """Merge the one-record batch in this request; its counts.  Left to the workers on failure."""
    config = current_app.config
    for attempt in range(1, MERGE_ATTEMPTS + 1):
        try:
            process_batch(_db(), batch_id, chunk_size=config["MERGE_CHUNK_SIZE"],
                          max_rejections=config["MAX_REJECTION_DETAILS"])
            break
        except TransientError:
            log.warning("assessment batch %s: transient merge error (attempt %s)", batch_id, attempt)
    else:
        from workers.tasks import enqueue

        enqueue(_db(), batch_id)  # stored: a worker merges it; the caller sees a 500 and may retry
        raise RuntimeError(f"assessment batch {batch_id} could not be merged in the request")
    with _db().sessions() as session:
        batch = session.get(Batch, batch_id)
        if batch.status == "failed":  # validated above, so only an unexpected rejection lands here
            reasons = "; ".join(r["reason"] for r in batch.rejections) or batch.error or "rejected"
            raise BadRequest(f"not a valid assessment: {reasons}", code="invalidDocument")
        return dict(batch.counts)


def stored_assessment(tenant_id: int, provider: str, document: dict[str, Any]) -> dict[str, Any]:
    """The assessment as the store now holds it, in the ASC resource shape."""
    resource_id = document["properties"]["resourceDetails"]["id"]
    provider_id = f"{resource_id.lower()}|{document['name'].lower()}"[:512]
    with _db().sessions() as session:
        source = session.scalars(
            select(FindingSource).where(FindingSource.tenant_id == tenant_id,
                                        FindingSource.provider == provider,
                                        FindingSource.provider_id == provider_id)
            .order_by(FindingSource.id)
        ).first()
    return assessment_out(source, document)


def assessment_out(source: FindingSource, document: dict[str, Any]) -> dict[str, Any]:
    """ASC's assessment shape (id, name, type, properties) of a stored source row."""
    extra = source.extra or {}
    if source.state == "open":
        code = "Unhealthy"
    else:
        code = "NotApplicable" if extra.get("notApplicable") else "Healthy"
    status: dict[str, Any] = {"code": code}
    if extra.get("statusCause"):
        status["cause"] = extra["statusCause"]
    if extra.get("statusDescription"):
        status["description"] = extra["statusDescription"]
    if source.first_seen:
        status["firstEvaluationDate"] = source.first_seen.isoformat()
    status["statusChangeDate"] = source.provider_timestamp.isoformat()
    metadata: dict[str, Any] = {
        "displayName": source.title,
        "severity": source.severity_original or source.severity.capitalize(),
    }
    if source.description:
        metadata["description"] = source.description
    if source.remediation:
        metadata["remediationDescription"] = source.remediation
    for key in ("assessmentType", "categories", "userImpact", "implementationEffort", "threats",
                "policyDefinitionId", "preview", "tactics", "techniques"):
        if extra.get(key) not in (None, "", []):
            metadata[key] = extra[key]
    details = {"source": extra.get("source", "Azure"), "id": document["properties"]["resourceDetails"]["id"]}
    properties: dict[str, Any] = {"resourceDetails": details, "displayName": source.title, "status": status}
    if extra.get("additionalData"):
        properties["additionalData"] = extra["additionalData"]
    if source.references:
        properties["links"] = {"azurePortalUri": source.references[0]}
    properties["metadata"] = metadata
    return {"id": extra.get("assessmentId", document["id"]), "name": document["name"],
            "type": ASSESSMENT_TYPE, "properties": properties}
