"""marshmallow schemas, one per direction: ``...Out`` for responses, ``...Patch`` for edits."""

from __future__ import annotations

from marshmallow import EXCLUDE, RAISE, Schema, fields, validate

_id = fields.Function(lambda obj: str(_get(obj, "id")))


def _get(obj, name):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _ref(name: str):
    return fields.Function(lambda obj: None if _get(obj, name) is None else str(_get(obj, name)))


class OutSchema(Schema):
    class Meta:
        unknown = EXCLUDE
        ordered = True


class BatchOut(OutSchema):
    id = _id
    status = fields.String()
    format = fields.String()
    provider = fields.String()
    scanType = fields.String(attribute="scan_type")
    contentType = fields.String(attribute="content_type")
    bodySize = fields.Integer(attribute="body_size")
    bodySha256 = fields.String(attribute="body_sha256")
    idempotencyKey = fields.String(attribute="idempotency_key", allow_none=True)
    counts = fields.Dict()
    rejections = fields.List(fields.Dict())
    error = fields.String(allow_none=True)
    attempts = fields.Integer()
    receivedAt = fields.DateTime(attribute="received_at")
    startedAt = fields.DateTime(attribute="started_at", allow_none=True)
    finishedAt = fields.DateTime(attribute="finished_at", allow_none=True)


class SourceOut(OutSchema):
    provider = fields.String()
    providerId = fields.String(attribute="provider_id")
    vendorId = fields.String(attribute="vendor_id", allow_none=True)
    state = fields.String()
    title = fields.String()
    severity = fields.String()
    severityOriginal = fields.String(attribute="severity_original", allow_none=True)
    severityScale = fields.String(attribute="severity_scale", allow_none=True)
    evidence = fields.String(allow_none=True)
    cvssScore = fields.Float(attribute="cvss_score", allow_none=True)
    cvssVector = fields.String(attribute="cvss_vector", allow_none=True)
    references = fields.List(fields.String())
    firstSeen = fields.DateTime(attribute="first_seen", allow_none=True)
    lastSeen = fields.DateTime(attribute="last_seen", allow_none=True)
    providerTimestamp = fields.DateTime(attribute="provider_timestamp")


class FindingOut(OutSchema):
    id = _id
    resourceId = _ref("resource_id")
    recommendationType = fields.String(attribute="recommendation_type_key")
    correlationKey = fields.String(attribute="correlation_key")
    cves = fields.Function(lambda obj: [_get(obj, "cve")] if _get(obj, "cve") else [])
    kind = fields.String()
    title = fields.String()
    description = fields.String(allow_none=True)
    remediation = fields.String(allow_none=True)
    severity = fields.String()
    cvssScore = fields.Float(attribute="cvss_score", allow_none=True)
    state = fields.String()
    firstSeen = fields.DateTime(attribute="first_seen", allow_none=True)
    lastSeen = fields.DateTime(attribute="last_seen", allow_none=True)
    resolvedAt = fields.DateTime(attribute="resolved_at", allow_none=True)
    stateChangedAt = fields.DateTime(attribute="state_changed_at")
    createdAt = fields.DateTime(attribute="created_at")
    updatedAt = fields.DateTime(attribute="updated_at")
    statusOverride = fields.String(attribute="status_override", allow_none=True)
    assignedTo = fields.String(attribute="assigned_to", allow_none=True)
    comments = fields.List(fields.Dict())
    tags = fields.List(fields.String())
    sources = fields.List(fields.Nested(SourceOut))


class RecommendationOut(OutSchema):
    id = _id
    resourceId = _ref("resource_id")
    recommendationType = fields.String(attribute="type_key")
    displayName = fields.String(attribute="type_title")
    kind = fields.String(attribute="type_kind")
    status = fields.String()
    severity = fields.String()
    remediation = fields.String(attribute="type_remediation", allow_none=True)
    firstEvaluated = fields.DateTime(attribute="first_evaluated")
    statusChangedAt = fields.DateTime(attribute="status_changed_at")
    updatedAt = fields.DateTime(attribute="updated_at")
    statusOverride = fields.String(attribute="status_override", allow_none=True)
    assignedTo = fields.String(attribute="assigned_to", allow_none=True)
    comments = fields.List(fields.Dict())
    tags = fields.List(fields.String())


class ResourceOut(OutSchema):
    id = _id
    kind = fields.String(allow_none=True)
    name = fields.String(allow_none=True)
    os = fields.String(allow_none=True)
    identifiers = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))
    firstSeen = fields.DateTime(attribute="first_seen", allow_none=True)
    lastSeen = fields.DateTime(attribute="last_seen", allow_none=True)
    createdAt = fields.DateTime(attribute="created_at")
    tags = fields.List(fields.String())


class AlertOut(OutSchema):
    id = _id
    title = fields.String()
    description = fields.String(allow_none=True)
    severity = fields.String()
    category = fields.String(allow_none=True)
    status = fields.String()
    feedback = fields.String(allow_none=True)
    assignedTo = fields.String(attribute="assigned_to", allow_none=True)
    comments = fields.List(fields.Dict())
    tags = fields.List(fields.String())
    closedDateTime = fields.DateTime(attribute="closed_date_time", allow_none=True)
    createdDateTime = fields.DateTime(attribute="created_date_time", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="last_modified_date_time", allow_none=True)
    recommendedActions = fields.List(fields.String(), attribute="recommended_actions")
    resourceId = _ref("resource_id")
    vendorInformation = fields.Function(lambda obj: {"provider": _get(obj, "provider"),
                                                     "providerAlertId": _get(obj, "provider_id")})


class EventOut(OutSchema):
    id = _id
    event = fields.String()
    at = fields.DateTime()
    cause = fields.String()
    actor = fields.String(allow_none=True)
    batchId = _ref("batch_id")
    details = fields.Dict(allow_none=True)


class CommentIn(Schema):
    class Meta:
        unknown = RAISE

    text = fields.String(required=True, validate=validate.Length(min=1, max=4000))


_tags = fields.List(fields.String(validate=validate.Length(min=1, max=100)), validate=validate.Length(max=50))


class FindingPatch(Schema):
    """Customer-owned fields of a finding or recommendation."""

    class Meta:
        unknown = RAISE

    statusOverride = fields.String(
        allow_none=True, validate=validate.OneOf(["inProgress", "riskAccepted", "falsePositive", "mitigated"]))
    assignedTo = fields.String(allow_none=True, validate=validate.Length(max=200))
    comments = fields.List(fields.Nested(CommentIn), validate=validate.Length(max=200))
    tags = _tags


class AlertPatch(Schema):
    """Customer-owned fields of an alert (Graph's alert update)."""

    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(["newAlert", "inProgress", "resolved"]))
    assignedTo = fields.String(allow_none=True, validate=validate.Length(max=200))
    feedback = fields.String(allow_none=True,
                             validate=validate.OneOf(["truePositive", "falsePositive", "benignPositive"]))
    comments = fields.List(fields.Nested(CommentIn), validate=validate.Length(max=200))
    tags = _tags
    closedDateTime = fields.AwareDateTime(allow_none=True)
