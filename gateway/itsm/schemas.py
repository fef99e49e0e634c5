"""marshmallow schemas of the ITSM API (gateway/api/itsm.py): ``...Out`` answers, ``...In`` and ``...Patch``
edits.
A connection's secret is load-only: no answer ever carries it (``hasSecret``, ``secretHint``)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from gateway.schemas import OutSchema, _get, _id, _ref

KINDS = ("servicenow", "jira")
AUTHS = ("basic", "oauth", "bearer")
COLLECTIONS = ("findings", "recommendations", "alerts")
GROUPINGS = ("item", "resource")
MODES = ("automatic", "manual")
SEVERITIES = ("informational", "low", "medium", "high", "critical")
# settings kept in itsm_connections.settings, as the API names them
SETTINGS = (
    "table",
    "shortDescriptionField",
    "descriptionField",
    "assignmentGroup",
    "category",
    "closeCode",
    "projectKey",
    "issueType",
    "labels",
    "priorityMap",
    # gateway/itsm/items.py: close codes and notes, Jira's done status, assignees, risk acceptance
    "closeCodeExempt",
    "closeNotesTemplate",
    "doneStatus",
    "assigneeMap",
    "riskAcceptance",
)


def _setting(name: str):
    return fields.Function(lambda obj: (_get(obj, "settings") or {}).get(name))


class ConnectionOut(OutSchema):
    id = _id
    name = fields.String()
    kind = fields.String()
    baseUrl = fields.String(attribute="base_url")
    auth = fields.String()
    username = fields.String(allow_none=True)
    hasSecret = fields.Function(lambda obj: _get(obj, "secret") is not None)
    secretHint = fields.String(attribute="secret_hint", allow_none=True)
    enabled = fields.Boolean()
    health = fields.String()
    lastError = fields.String(attribute="last_error", allow_none=True)
    consecutiveFailures = fields.Integer(attribute="consecutive_failures")
    lastSuccessDateTime = fields.DateTime(attribute="last_success_at", allow_none=True)
    lastFailureDateTime = fields.DateTime(attribute="last_failure_at", allow_none=True)
    retryAt = fields.DateTime(attribute="retry_at", allow_none=True)
    pendingOperations = fields.Function(lambda obj: _get(obj, "pending_ops") or 0)
    parkedTickets = fields.Function(lambda obj: _get(obj, "parked_tickets") or 0)
    table = _setting("table")
    shortDescriptionField = _setting("shortDescriptionField")
    descriptionField = _setting("descriptionField")
    assignmentGroup = _setting("assignmentGroup")
    category = _setting("category")
    closeCode = _setting("closeCode")
    projectKey = _setting("projectKey")
    issueType = _setting("issueType")
    labels = fields.Function(lambda obj: (_get(obj, "settings") or {}).get("labels") or [])
    priorityMap = _setting("priorityMap")
    closeCodeExempt = _setting("closeCodeExempt")
    closeNotesTemplate = _setting("closeNotesTemplate")
    doneStatus = _setting("doneStatus")
    assigneeMap = fields.Function(lambda obj: (_get(obj, "settings") or {}).get("assigneeMap") or {})
    riskAcceptance = fields.Function(
        lambda obj: risk_acceptance((_get(obj, "settings") or {}).get("riskAcceptance"))
    )
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)
    inbound = fields.Function(lambda obj: _inbound(_get(obj, "poll_state")))


def _inbound(state: dict | None) -> dict:
    """The connection's polling health (gateway/itsm/inbound.py keeps it in ``poll_state``)."""
    state = state or {}
    return {
        "lastPollDateTime": state.get("lastPolledAt"),
        "lastError": state.get("lastError"),
        "lastErrorDateTime": state.get("lastErrorAt"),
    }


class RuleOut(OutSchema):
    id = _id
    connectionId = _ref("connection_id")
    name = fields.String()
    collection = fields.String()
    filter = fields.String(allow_none=True)
    grouping = fields.String()
    mode = fields.String()
    enabled = fields.Boolean()
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)


class TicketItemOut(OutSchema):
    subjectType = fields.String(attribute="subject_type")
    subjectId = _ref("subject_id")


class TicketOut(OutSchema):
    id = _id
    connectionId = _ref("connection_id")
    ruleId = _ref("rule_id")
    subjectType = fields.String(attribute="subject_type")
    subjectId = _ref("subject_id")
    collection = fields.String()
    items = fields.List(fields.Nested(TicketItemOut))
    syncState = fields.String(attribute="sync_state")
    remoteId = fields.String(attribute="remote_id", allow_none=True)
    remoteKey = fields.String(attribute="remote_key", allow_none=True)
    remoteUrl = fields.String(attribute="remote_url", allow_none=True)
    remoteState = fields.String(attribute="remote_state", allow_none=True)
    desiredState = fields.String(attribute="desired_state")
    severity = fields.String(allow_none=True)
    createAttempts = fields.Integer(attribute="create_attempts")
    lastError = fields.String(attribute="last_error", allow_none=True)
    lastSyncedDateTime = fields.DateTime(attribute="last_synced_at", allow_none=True)
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")


def risk_acceptance(value: dict | None) -> dict:
    """A connection's ``riskAcceptance`` as answered (off, no codes, no expiry when unset)."""
    value = value or {}
    return {
        "enabled": bool(value.get("enabled")),
        "closeCodes": list(value.get("closeCodes") or []),
        "expiresInDays": value.get("expiresInDays"),
    }


class RiskAcceptanceIn(Schema):
    """Opt-in: a ticket closed with one of ``closeCodes`` exempts its items' recommendations."""

    class Meta:
        unknown = RAISE

    enabled = fields.Boolean(required=True)
    closeCodes = fields.List(
        fields.String(validate=validate.Length(min=1, max=200)), validate=validate.Length(max=50)
    )
    expiresInDays = fields.Integer(allow_none=True, validate=validate.Range(min=1, max=3650))


_NAME = validate.Length(min=1, max=200)
_FIELD = validate.Regexp(r"^[a-z][a-z0-9_]{0,79}$", error="a ServiceNow field or table name")


class ConnectionPatch(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(validate=_NAME)
    baseUrl = fields.String(validate=validate.Regexp(r"^https?://[^\s/?#]+[^\s?#]*$", error="an http(s) URL"))
    auth = fields.String(validate=validate.OneOf(AUTHS))
    username = fields.String(allow_none=True, validate=validate.Length(min=1, max=300))
    secret = fields.String(allow_none=True, load_only=True, validate=validate.Length(min=1, max=4000))
    enabled = fields.Boolean()
    table = fields.String(allow_none=True, validate=_FIELD)
    shortDescriptionField = fields.String(allow_none=True, validate=_FIELD)
    descriptionField = fields.String(allow_none=True, validate=_FIELD)
    assignmentGroup = fields.String(allow_none=True, validate=validate.Length(min=1, max=200))
    category = fields.String(allow_none=True, validate=validate.Length(min=1, max=200))
    closeCode = fields.String(allow_none=True, validate=validate.Length(min=1, max=200))
    projectKey = fields.String(
        allow_none=True, validate=validate.Regexp(r"^[A-Z][A-Z0-9_]{0,19}$", error="a Jira project key")
    )
    issueType = fields.String(allow_none=True, validate=validate.Length(min=1, max=100))
    labels = fields.List(
        fields.String(validate=validate.Regexp(r"^\S{1,255}$", error="a label without spaces")),
        allow_none=True,
        validate=validate.Length(max=20),
    )
    priorityMap = fields.Dict(keys=fields.String(validate=validate.OneOf(SEVERITIES)),
                              values=fields.String(validate=validate.Length(min=1, max=100)), allow_none=True)
    closeCodeExempt = fields.String(allow_none=True, validate=validate.Length(min=1, max=200))
    closeNotesTemplate = fields.String(allow_none=True, validate=validate.Length(min=1, max=4000))
    doneStatus = fields.String(allow_none=True, validate=validate.Length(min=1, max=100))
    assigneeMap = fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=200)),
                              values=fields.String(validate=validate.Length(min=1, max=200)), allow_none=True)
    riskAcceptance = fields.Nested(RiskAcceptanceIn, allow_none=True)


class ConnectionIn(ConnectionPatch):
    name = fields.String(required=True, validate=_NAME)
    kind = fields.String(required=True, validate=validate.OneOf(KINDS))
    baseUrl = fields.String(
        required=True, validate=validate.Regexp(r"^https?://[^\s/?#]+[^\s?#]*$", error="an http(s) URL")
    )
    auth = fields.String(required=True, validate=validate.OneOf(AUTHS))


class RulePatch(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(validate=_NAME)
    filter = fields.String(allow_none=True, validate=validate.Length(min=1, max=4000))
    grouping = fields.String(validate=validate.OneOf(GROUPINGS))
    mode = fields.String(validate=validate.OneOf(MODES))
    enabled = fields.Boolean()


class RuleIn(RulePatch):
    name = fields.String(required=True, validate=_NAME)
    connectionId = fields.String(
        required=True, validate=validate.Regexp(r"^[0-9]{1,18}$", error="an id such as '42'")
    )
    collection = fields.String(required=True, validate=validate.OneOf(COLLECTIONS))


class TicketIn(Schema):
    class Meta:
        unknown = RAISE

    connectionId = fields.String(
        required=True, validate=validate.Regexp(r"^[0-9]{1,18}$", error="an id such as '42'")
    )
