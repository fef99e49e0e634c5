"""marshmallow schemas, one per direction: ``...Out`` for responses, ``...Patch`` for edits."""

from __future__ import annotations

from marshmallow import EXCLUDE, RAISE, Schema, fields, validate

_id = fields.Function(lambda obj: str(_get(obj, "id")))


def _get(obj, name):
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _techniques(obj) -> list:
    found = obj.get("mitre_techniques") if isinstance(obj, dict) else getattr(obj, "mitre_techniques", None)
    return found or []


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
    rejectionsTruncated = fields.Function(
        lambda obj: int((_get(obj, "counts") or {}).get("rejected", 0)) > len(_get(obj, "rejections") or []))
    rejectionsUrl = fields.Function(lambda obj: _rejections_url(obj))
    staleDetails = fields.Function(lambda obj: _get(obj, "stale_details") or [])
    progress = fields.Function(lambda obj: _get(obj, "progress"))
    bodyCheck = fields.String(attribute="body_check", allow_none=True)
    error = fields.String(allow_none=True)
    attempts = fields.Integer()
    receivedAt = fields.DateTime(attribute="received_at")
    startedAt = fields.DateTime(attribute="started_at", allow_none=True)
    finishedAt = fields.DateTime(attribute="finished_at", allow_none=True)


def _rejections_url(obj) -> str | None:
    """The batch's full list of rejected records (in a request naming a tenant), else None."""
    from flask import has_request_context, request, url_for

    if not has_request_context() or not (request.view_args or {}).get("tenant"):
        return None
    return url_for("batches.list_rejections", tenant=request.view_args["tenant"],
                   batch_id=str(_get(obj, "id")), _external=True)


class SourceOut(OutSchema):
    provider = fields.String()
    product = fields.String(allow_none=True)
    format = fields.String(allow_none=True)
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
    batchId = _ref("batch_id")
    scan = fields.String(allow_none=True)
    hostKey = fields.String(attribute="host_key", allow_none=True)


class ItemTicketOut(OutSchema):
    """A ticket of an item (finding, recommendation, alert) in one ITSM connection (gateway/itsm/items.py)."""

    id = _id
    connectionId = _ref("connection_id")
    remoteId = fields.String(attribute="remote_id", allow_none=True)
    remoteKey = fields.String(attribute="remote_key", allow_none=True)
    remoteUrl = fields.String(attribute="remote_url", allow_none=True)
    remoteState = fields.String(attribute="remote_state", allow_none=True)
    syncState = fields.String(attribute="sync_state")
    lastSyncedDateTime = fields.DateTime(attribute="last_synced_at", allow_none=True)


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
    exemptionId = _ref("exemption_id")
    policy = fields.Function(lambda obj: {"enabled": bool(_get(obj, "type_enabled"))})
    # its recommendation's (gateway/api/governance_collections.py adds it to a page)
    governance = fields.Function(lambda obj: _maybe(obj, "governance"))
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
    tickets = fields.List(fields.Nested(ItemTicketOut))  # gateway/itsm/items.py adds them to a page


class RecommendationOut(OutSchema):
    id = _id
    resourceId = _ref("resource_id")
    recommendationType = fields.String(attribute="type_key")
    displayName = fields.String(attribute="type_title")
    kind = fields.String(attribute="type_kind")
    status = fields.String()
    statusCause = fields.String(attribute="status_cause", allow_none=True)
    severity = fields.String()
    actualStatus = fields.String(attribute="actual_status")
    actualSeverity = fields.String(attribute="actual_severity")
    exemptionId = _ref("exemption_id")
    policy = fields.Function(lambda obj: {"enabled": bool(_get(obj, "type_enabled")),
                                          "severityOverride": _get(obj, "type_severity_override")})
    governance = fields.Function(lambda obj: recommendation_governance(obj))
    remediation = fields.String(attribute="type_remediation", allow_none=True)
    firstEvaluated = fields.DateTime(attribute="first_evaluated")
    statusChangedAt = fields.DateTime(attribute="status_changed_at")
    updatedAt = fields.DateTime(attribute="updated_at")
    statusOverride = fields.String(attribute="status_override", allow_none=True)
    assignedTo = fields.String(attribute="assigned_to", allow_none=True)
    comments = fields.List(fields.Dict())
    tags = fields.List(fields.String())
    tickets = fields.List(fields.Nested(ItemTicketOut))  # gateway/itsm/items.py adds them to a page


class PolicyOut(OutSchema):
    """One entry of the tenant's security policy (gateway/posture/policy.py)."""

    id = _id
    scope = fields.String()
    target = fields.String()
    enabled = fields.Boolean(allow_none=True)
    severity = fields.String(allow_none=True)
    control = fields.String(allow_none=True)
    description = fields.String(allow_none=True)
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)


class ExemptionOut(OutSchema):
    """An exemption (gateway/posture/exemptions.py)."""

    id = _id
    displayName = fields.String(attribute="display_name")
    description = fields.String(allow_none=True)
    category = fields.String()
    recommendationType = fields.String(attribute="type_key", allow_none=True)
    resourceId = _ref("resource_id")
    resourceFilter = fields.String(attribute="resource_filter", allow_none=True)
    expiresOn = fields.DateTime(attribute="expires_on", allow_none=True)
    state = fields.Function(lambda obj: "expired" if _get(obj, "expired_at") is not None else "active")
    expiredDateTime = fields.DateTime(attribute="expired_at", allow_none=True)
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)


class ControlScoreOut(OutSchema):
    """One control's part of a Secure Score (Graph's controlScores item)."""

    controlName = fields.String()
    score = fields.Float()
    maxScore = fields.Float()
    healthyResourceCount = fields.Integer()
    unhealthyResourceCount = fields.Integer()


class SecureScoreOut(OutSchema):
    """The tenant's Secure Score at one time (Graph's secureScore): a history row."""

    id = _id
    currentScore = fields.Float(attribute="current")
    maxScore = fields.Float(attribute="max")
    percentage = fields.Float()
    controlScores = fields.List(fields.Nested(ControlScoreOut), attribute="control_scores")
    createdDateTime = fields.DateTime(attribute="created_at")


class SecureScoreControlOut(OutSchema):
    """The tenant's current score of one control (the stored row, gateway/score/upkeep.py)."""

    id = _id
    displayName = fields.String(attribute="display_name")
    controlCategory = fields.String(attribute="category", allow_none=True)
    currentScore = fields.Float(attribute="current")
    maxScore = fields.Float(attribute="max")
    percentage = fields.Float()
    healthyResourceCount = fields.Integer(attribute="healthy")
    unhealthyResourceCount = fields.Integer(attribute="unhealthy")
    notApplicableResourceCount = fields.Integer(attribute="not_applicable")
    weight = fields.Float()
    state = fields.String()
    updatedDateTime = fields.DateTime(attribute="updated_at")


class ControlStateUpdateOut(OutSchema):
    """One of Graph's controlStateUpdates of a control profile."""

    assignedTo = fields.String(allow_none=True)
    comment = fields.String(allow_none=True)
    state = fields.String()
    updatedBy = fields.String()
    updatedDateTime = fields.String()


class SecureScoreControlProfileOut(OutSchema):
    """A Secure Score control as the tenant has it (Graph's secureScoreControlProfile)."""

    id = _id
    controlName = fields.String(attribute="control")
    title = fields.String()
    description = fields.String(allow_none=True)
    remediation = fields.String(allow_none=True)  # Graph's name: what to do (the description)
    maxScore = fields.Float(attribute="max_score")
    controlCategory = fields.String(attribute="category", allow_none=True)
    rank = fields.Integer()
    deprecated = fields.Boolean()
    tier = fields.String()
    service = fields.String()
    builtIn = fields.Boolean(attribute="builtin")
    state = fields.String()
    controlStateUpdates = fields.List(fields.Nested(ControlStateUpdateOut), attribute="state_updates")
    vendorInformation = fields.Dict(attribute="vendor_information")
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")


def _maybe(obj, name):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _iso(value):
    return None if value is None else value.isoformat()


def recommendation_governance(obj) -> dict | None:
    """A recommendation's current governance assignment (the ``gov_*`` columns of its row), or None."""
    if _maybe(obj, "gov_id") is None:
        return None
    rule_id = _maybe(obj, "gov_rule_id")
    return {"assignmentId": str(_maybe(obj, "gov_id")), "ruleId": None if rule_id is None else str(rule_id),
            "owner": _maybe(obj, "gov_owner"), "dueDate": _iso(_maybe(obj, "gov_due_date")),
            "isGracePeriod": bool(_maybe(obj, "gov_is_grace_period")),
            "isOverdue": bool(_maybe(obj, "gov_overdue")),
            "completedDateTime": _iso(_maybe(obj, "gov_completed_at"))}


def _timeframe(obj) -> str:
    from gateway.posture.governance import format_timeframe

    return format_timeframe(_get(obj, "remediation_seconds"))


class GovernanceRuleOut(OutSchema):
    """A governance rule (gateway/posture/governance.py), in ASC's shape."""

    id = _id
    displayName = fields.String(attribute="display_name")
    description = fields.String(allow_none=True)
    rulePriority = fields.Integer(attribute="rule_priority")
    ruleType = fields.String(attribute="rule_type")
    sourceResourceType = fields.String(attribute="source_resource_type")
    conditionSets = fields.List(fields.Dict(), attribute="condition_sets")
    ownerSource = fields.Function(lambda obj: {"type": _get(obj, "owner_source_type"),
                                               "value": _get(obj, "owner_source_value")})
    remediationTimeframe = fields.Function(_timeframe)
    isGracePeriod = fields.Boolean(attribute="is_grace_period")
    governanceEmailNotification = fields.Function(lambda obj: {
        "disableManagerEmailNotification": bool((_get(obj, "email_notification") or {}).get(
            "disableManagerEmailNotification", False)),
        "disableOwnerEmailNotification": bool((_get(obj, "email_notification") or {}).get(
            "disableOwnerEmailNotification", False))})
    isDisabled = fields.Boolean(attribute="is_disabled")
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)


class GovernanceAssignmentOut(OutSchema):
    """An owner and a due date on a recommendation, in ASC's shape plus its state."""

    id = _id
    recommendationId = _ref("recommendation_id")
    resourceId = _ref("resource_id")
    recommendationType = fields.String(attribute="type_key")
    ruleId = _ref("rule_id")
    owner = fields.String(allow_none=True)
    remediationDueDate = fields.DateTime(attribute="due_date")
    isGracePeriod = fields.Boolean(attribute="is_grace_period")
    isOverdue = fields.Boolean(attribute="overdue")
    remediationEta = fields.Function(lambda obj: None if _get(obj, "remediation_eta") is None else {
        "eta": _get(obj, "remediation_eta").isoformat(), "justification": _get(obj, "eta_justification")})
    additionalData = fields.Dict(attribute="additional_data")
    state = fields.Function(lambda obj: "open" if _get(obj, "completed_at") is None else "completed")
    completedDateTime = fields.DateTime(attribute="completed_at", allow_none=True)
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)


class ResourceSourceOut(OutSchema):
    """A provider's host record merged into a resource, with the identifiers it contributed."""

    id = _id
    provider = fields.String()
    product = fields.String(allow_none=True)
    hostKey = fields.String(attribute="host_key", allow_none=True)
    identifiers = fields.Dict()  # presented by gateway.api.collections.present_identifiers
    firstSeen = fields.DateTime(attribute="first_seen", allow_none=True)
    lastSeen = fields.DateTime(attribute="last_seen", allow_none=True)
    batchId = _ref("batch_id")


class ResourceOut(OutSchema):
    id = _id
    kind = fields.String(allow_none=True)
    name = fields.String(allow_none=True)
    os = fields.String(allow_none=True)
    identifiers = fields.Dict()  # presented by gateway.api.collections.present_identifiers
    firstSeen = fields.DateTime(attribute="first_seen", allow_none=True)
    lastSeen = fields.DateTime(attribute="last_seen", allow_none=True)
    createdAt = fields.DateTime(attribute="created_at")
    tags = fields.List(fields.String())
    sources = fields.List(fields.Nested(ResourceSourceOut))


class ObservationOut(OutSchema):
    id = _id
    resourceId = _ref("resource_id")
    provider = fields.String()
    product = fields.String(allow_none=True)
    providerId = fields.String(attribute="provider_id")
    vendorId = fields.String(attribute="vendor_id", allow_none=True)
    category = fields.String()
    name = fields.String()
    value = fields.String(allow_none=True)
    port = fields.Integer(allow_none=True)
    protocol = fields.String(allow_none=True)
    service = fields.String(allow_none=True)
    evidence = fields.String(allow_none=True)
    scan = fields.String(allow_none=True)
    hostKey = fields.String(attribute="host_key", allow_none=True)
    batchId = _ref("batch_id")
    firstSeen = fields.DateTime(attribute="first_seen", allow_none=True)
    lastSeen = fields.DateTime(attribute="last_seen", allow_none=True)
    providerTimestamp = fields.DateTime(attribute="provider_timestamp")


class MergedOut(OutSchema):
    """The answer of a resource id that was merged away (301)."""

    id = _id
    mergedInto = _ref("merged_into")


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
    suppressedBy = _ref("suppressed_by")
    tickets = fields.List(fields.Nested(ItemTicketOut))  # gateway/itsm/items.py adds them to a page
    detectionRule = fields.String(attribute="detection_rule", allow_none=True)  # gateway/detection/
    mitreTechniques = fields.Function(lambda obj: _techniques(obj))  # a partner's may have none: []
    # the indicators its evidence matched (gateway/intel/matching.py keeps them in ``extra``)
    threatIntelligenceMatches = fields.Function(
        lambda obj: (_get(obj, "extra") or {}).get("threatIntelligenceMatches") or [])


class AlertV2Out(OutSchema):
    """An alert in the Microsoft Graph security ``alert`` (alerts_v2) shape."""

    id = fields.String()
    providerAlertId = fields.String()
    incidentId = fields.String(allow_none=True)
    status = fields.String()
    severity = fields.String()
    classification = fields.String()
    determination = fields.String()
    serviceSource = fields.String(allow_none=True)
    detectionSource = fields.String(allow_none=True)
    productName = fields.String(allow_none=True)
    detectorId = fields.String(allow_none=True)
    tenantId = fields.String()
    title = fields.String()
    description = fields.String(allow_none=True)
    recommendedActions = fields.String(allow_none=True)
    category = fields.String(allow_none=True)
    assignedTo = fields.String(allow_none=True)
    alertWebUrl = fields.String(allow_none=True)
    incidentWebUrl = fields.String(allow_none=True)
    actorDisplayName = fields.String(allow_none=True)
    threatDisplayName = fields.String(allow_none=True)
    mitreTechniques = fields.List(fields.String())
    createdDateTime = fields.DateTime(allow_none=True)
    lastUpdateDateTime = fields.DateTime(allow_none=True)
    resolvedDateTime = fields.DateTime(allow_none=True)
    firstActivityDateTime = fields.DateTime(allow_none=True)
    lastActivityDateTime = fields.DateTime(allow_none=True)
    comments = fields.List(fields.Dict())
    evidence = fields.List(fields.Dict())
    suppressedBy = fields.String(allow_none=True)


class AlertSuppressionRuleOut(OutSchema):
    """A suppression rule: ASC's alertsSuppressionRule properties, flat (gateway/suppression.py)."""

    id = _id
    name = fields.String()
    alertType = fields.String(attribute="alert_type")
    reason = fields.String()
    comment = fields.String(allow_none=True)
    state = fields.String(attribute="shown_state")
    expirationDateUtc = fields.DateTime(attribute="expiration_date_utc", allow_none=True)
    suppressionAlertsScope = fields.Function(lambda obj: {"allOf": [
        {"field": c["field"], c["operator"]: c["value"]} for c in _get(obj, "conditions") or ()]})
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedUtc = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)


class EventOut(OutSchema):
    id = _id
    event = fields.String()
    at = fields.DateTime()
    cause = fields.String()
    actor = fields.String(allow_none=True)
    batchId = _ref("batch_id")
    details = fields.Dict(allow_none=True)


class StoreEventOut(OutSchema):
    """An event of the outbox as ``.../security/events`` shows it (gateway/export/delivery.py ``present``)."""

    id = _id
    sequence = fields.Integer(attribute="seq", allow_none=True)
    type = fields.String()
    timestamp = fields.DateTime(attribute="at")
    subjectType = fields.String(attribute="subject_type")
    subjectId = _ref("subject_id")
    event = fields.String()
    cause = fields.String()
    actor = fields.String(allow_none=True)
    batchId = _ref("batch_id")
    details = fields.Dict(allow_none=True)


class ExportStatusOut(OutSchema):
    """Where a destination's delivery stands (gateway/export/delivery.py)."""

    cursorSequence = fields.Integer(attribute="cursor_seq")
    latestSequence = fields.Integer(attribute="latest_sequence")
    pendingEvents = fields.Integer(attribute="pending_events")
    lagSeconds = fields.Float(attribute="lag_seconds")
    deliveredEvents = fields.Integer(attribute="delivered_events")
    consecutiveFailures = fields.Integer(attribute="attempts")
    lastDeliveredDateTime = fields.DateTime(attribute="last_delivered_at", allow_none=True)
    lastStatusCode = fields.Integer(attribute="last_status_code", allow_none=True)
    lastError = fields.String(attribute="last_error", allow_none=True)
    lastErrorDateTime = fields.DateTime(attribute="last_error_at", allow_none=True)
    failingSince = fields.DateTime(attribute="failing_since", allow_none=True)
    nextAttemptDateTime = fields.DateTime(attribute="next_attempt_at", allow_none=True)


class ExportOut(OutSchema):
    """A destination of the tenant's events (secrets are never shown: only a hint)."""

    id = _id
    displayName = fields.String(attribute="display_name")
    kind = fields.String()
    url = fields.String()
    eventTypes = fields.List(fields.String(), attribute="event_types")
    filter = fields.String(allow_none=True)
    batchSize = fields.Integer(attribute="batch_size")
    options = fields.Dict()
    state = fields.String()
    secretHint = fields.String(attribute="secret_hint", allow_none=True)
    secretRotatedDateTime = fields.DateTime(attribute="secret_rotated_at", allow_none=True)
    previousSecretExpiresDateTime = fields.DateTime(attribute="previous_secret_expires_at", allow_none=True)
    etag = fields.Function(lambda obj: f'"{_get(obj, "id")}.{_get(obj, "version")}"')
    status = fields.Function(lambda obj: ExportStatusOut().dump(_get(obj, "status")))
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)


class ExportDeliveryOut(OutSchema):
    """One delivery attempt of a destination (the recent ones are kept)."""

    id = _id
    dateTime = fields.DateTime(attribute="at")
    messageId = fields.String(attribute="message_id")
    outcome = fields.String()
    attempt = fields.Integer()
    eventCount = fields.Integer(attribute="event_count")
    firstEventId = _ref("first_event_id")
    lastEventId = _ref("last_event_id")
    firstSequence = fields.Integer(attribute="first_seq", allow_none=True)
    lastSequence = fields.Integer(attribute="last_seq", allow_none=True)
    statusCode = fields.Integer(attribute="status_code", allow_none=True)
    durationMs = fields.Integer(attribute="duration_ms", allow_none=True)
    error = fields.String(allow_none=True)


class ResourceIdIn(fields.Field):
    """A resource id as the API writes it (\"42\") or as a JSON integer (42)."""

    default_error_messages = {"invalid": "an id such as '42'"}

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.make_error("invalid")
        text = str(value)
        if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) < 1:
            raise self.make_error("invalid")
        return int(text)


class ResourceMergeIn(Schema):
    """The resources to merge into the one named in the path."""

    class Meta:
        unknown = RAISE

    resourceIds = fields.List(ResourceIdIn(), required=True, validate=validate.Length(min=1, max=100))


class ResourceSplitIn(Schema):
    """The host records (``sources[].id``) to move to a new resource."""

    class Meta:
        unknown = RAISE

    sourceIds = fields.List(ResourceIdIn(), required=True, validate=validate.Length(min=1, max=1000))


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


V2_STATUSES = ("new", "inProgress", "resolved")
V2_CLASSIFICATIONS = ("unknown", "falsePositive", "truePositive", "informationalExpectedActivity")
V2_DETERMINATIONS = ("unknown", "apt", "malware", "securityPersonnel", "securityTesting", "unwantedSoftware",
                     "other", "multiStagedAttack", "compromisedAccount", "phishing", "maliciousUserActivity",
                     "notMalicious", "notEnoughDataToValidate", "confirmedUserActivity",
                     "lineOfBusinessApplication")


class AlertV2Patch(Schema):
    """Customer-owned fields of an alert, as Graph's alerts_v2 update takes them."""

    class Meta:
        unknown = RAISE

    status = fields.String(validate=validate.OneOf(V2_STATUSES))
    classification = fields.String(validate=validate.OneOf(V2_CLASSIFICATIONS))
    determination = fields.String(validate=validate.OneOf(V2_DETERMINATIONS))
    assignedTo = fields.String(allow_none=True, validate=validate.Length(max=200))


ALERT_COMMENT_TYPE = "microsoft.graph.security.alertComment"


class AlertCommentIn(Schema):
    """Graph's alertComment, as ``POST .../alerts_v2/{id}/comments`` takes it."""

    class Meta:
        unknown = RAISE

    odata_type = fields.String(data_key="@odata.type", validate=validate.OneOf(
        [ALERT_COMMENT_TYPE, "#" + ALERT_COMMENT_TYPE]))
    comment = fields.String(required=True, validate=validate.Length(min=1, max=4000))


# -- fast dumping --------------------------------------------------------------------------------
#
# marshmallow walks every field of every row through several method calls: about 60 µs a
# finding with its sources, which is most of the time of a 1,000-row page or a CSV export of
# half a million rows.  ``fast_dumper`` compiles an ``...Out`` schema (the source of truth)
# into one function per field, for the field types these schemas use, with marshmallow's
# serialization rules; a schema with any other field type is dumped by marshmallow itself.
# tests/test_schemas.py checks that both give the same output.


class _Unsupported(Exception):
    pass


def _none_or(convert):
    return lambda value: None if value is None else convert(value)


def _converter(field):
    kind = type(field)
    if kind is fields.String:
        return _none_or(str)
    if kind is fields.Integer and not field.as_string:
        return _none_or(int)
    if kind is fields.Float and not field.as_string:
        return _none_or(float)
    if kind is fields.Boolean:
        return _none_or(bool)
    if kind is fields.DateTime and field.format in (None, "iso"):
        return _none_or(lambda value: value.isoformat())
    if kind is fields.List:
        inner = _converter(field.inner)
        return _none_or(lambda values: [inner(item) for item in values])
    if kind is fields.Nested and isinstance(field.nested, type) and not field.many:
        nested = _compile(field.nested)
        return _none_or(nested)
    if kind is fields.Dict:
        keys = _converter(field.key_field) if field.key_field else None
        values = _converter(field.value_field) if field.value_field else None
        if keys is None and values is None:
            return _none_or(dict)
        return _none_or(lambda mapping: {
            (keys(k) if keys else k): (values(v) if values else v) for k, v in mapping.items()})
    raise _Unsupported(kind.__name__)


def _compile(schema_class):
    """One object's dump function: [(output name, attribute, converter or None for Function)]."""
    plan = []
    for name, field in schema_class().dump_fields.items():
        if type(field) is fields.Function:
            plan.append((field.data_key or name, field.serialize_func, True))
            continue
        plan.append((field.data_key or name, field.attribute or name, _converter(field)))

    def dump(obj: dict) -> dict:
        out = {}
        for key, source, convert in plan:
            if convert is True:
                out[key] = source(obj)
            elif source in obj:
                out[key] = convert(obj[source])
        return out

    return dump


class IndicatorOut(OutSchema):
    """A threat-intelligence indicator (gateway/intel/): one observable of a source, Graph tiIndicator names."""

    id = _id
    source = fields.String()
    format = fields.String()
    externalId = fields.String(attribute="external_id", allow_none=True)
    observableType = fields.String(attribute="observable_type")
    value = fields.String()
    description = fields.String(allow_none=True)
    threatType = fields.String(attribute="threat_type", allow_none=True)
    tlpLevel = fields.String(attribute="tlp_level", allow_none=True)
    confidence = fields.Integer(allow_none=True)
    action = fields.String(allow_none=True)
    targetProduct = fields.String(attribute="target_product", allow_none=True)
    pattern = fields.String(allow_none=True)
    tags = fields.List(fields.String())
    validFrom = fields.DateTime(attribute="valid_from", allow_none=True)
    expirationDateTime = fields.DateTime(attribute="expires_at", allow_none=True)
    lastReportedDateTime = fields.DateTime(attribute="provider_timestamp")
    matchCount = fields.Integer(attribute="match_count")
    createdDateTime = fields.DateTime(attribute="created_at")
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")


def fast_dumper(schema_class):
    """``rows (dicts) -> dumped dicts``, as ``schema_class(many=True).dump`` would give."""
    try:
        dump = _compile(schema_class)
    except _Unsupported:
        return schema_class(many=True).dump
    return lambda rows: [dump(row) for row in rows]
