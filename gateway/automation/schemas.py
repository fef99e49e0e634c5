"""Schemas of ``/automations`` (in and out) and of export snapshot jobs."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from gateway.schemas import OutSchema, _get, _id, _ref

EVENT_TYPE_PATTERN = r"^(\*|(\*|[A-Za-z]{1,30})\.(\*|[A-Za-z]{1,40}))$"
ACTION_TYPES = ("webhook", "setFields", "createTicket")


# One action; which keys it takes depends on ``type`` (gateway/automation/actions.py).  Built from a
# dict because its key ``fields`` is also the name of a Schema attribute.
ActionIn = Schema.from_dict(
    {
        "type": fields.String(required=True, validate=validate.OneOf(ACTION_TYPES)),
        "url": fields.String(validate=validate.Length(min=1, max=2048)),
        "fields": fields.Dict(keys=fields.String()),
        "connectionId": fields.String(validate=validate.Length(min=1, max=18)),
    },
    name="ActionIn",
)


class AutomationPatch(Schema):
    class Meta:
        unknown = RAISE

    displayName = fields.String(validate=validate.Length(min=1, max=200))
    description = fields.String(allow_none=True, validate=validate.Length(max=4000))
    enabled = fields.Boolean()
    eventTypes = fields.List(
        fields.String(
            validate=validate.Regexp(
                EVENT_TYPE_PATTERN, error="an event type such as 'alert.created', 'finding.*' or '*'"
            )
        ),
        validate=validate.Length(min=1, max=50),
    )
    filter = fields.String(allow_none=True, validate=validate.Length(min=1, max=4000))
    actions = fields.List(fields.Nested(ActionIn), validate=validate.Length(min=1, max=20))


class AutomationIn(AutomationPatch):
    displayName = fields.String(required=True, validate=validate.Length(min=1, max=200))
    eventTypes = AutomationPatch._declared_fields["eventTypes"]
    actions = fields.List(fields.Nested(ActionIn), required=True, validate=validate.Length(min=1, max=20))


class AutomationTestIn(Schema):
    class Meta:
        unknown = RAISE

    eventId = fields.String(validate=validate.Length(min=1, max=18))


class AutomationOut(OutSchema):
    """A workflow automation rule (its secret is never shown again: only a hint)."""

    id = _id
    displayName = fields.String(attribute="display_name")
    description = fields.String(allow_none=True)
    enabled = fields.Boolean()
    eventTypes = fields.List(fields.String(), attribute="event_types")
    filter = fields.String(allow_none=True)
    actions = fields.List(fields.Dict())
    secretHint = fields.String(attribute="secret_hint", allow_none=True)
    etag = fields.Function(lambda obj: f'"{_get(obj, "id")}.{_get(obj, "version")}"')
    cursorSequence = fields.Integer(attribute="cursor_seq")
    firedEvents = fields.Integer(attribute="fired_events")
    lastRunDateTime = fields.DateTime(attribute="last_run_at", allow_none=True)
    lastError = fields.String(attribute="last_error", allow_none=True)
    lastErrorDateTime = fields.DateTime(attribute="last_error_at", allow_none=True)
    nextAttemptDateTime = fields.DateTime(attribute="next_attempt_at", allow_none=True)
    state = fields.String()
    failingSince = fields.DateTime(attribute="failing_since", allow_none=True)
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    lastModifiedDateTime = fields.DateTime(attribute="updated_at")
    lastModifiedBy = fields.String(attribute="updated_by", allow_none=True)


class ExportSnapshotOut(OutSchema):
    """A snapshot job of a destination and how far it got."""

    id = _id
    exportId = _ref("destination_id")
    state = fields.String()
    subjectTypes = fields.List(fields.String(), attribute="subjects")
    currentSubjectType = fields.Function(
        lambda obj: (
            _get(obj, "subjects")[_get(obj, "subject_index")]
            if _get(obj, "subject_index") < len(_get(obj, "subjects"))
            else None
        )
    )
    delivered = fields.Integer()
    total = fields.Integer(allow_none=True)
    attempts = fields.Integer()
    lastError = fields.String(attribute="last_error", allow_none=True)
    lastErrorDateTime = fields.DateTime(attribute="last_error_at", allow_none=True)
    nextAttemptDateTime = fields.DateTime(attribute="next_attempt_at", allow_none=True)
    createdDateTime = fields.DateTime(attribute="created_at")
    createdBy = fields.String(attribute="created_by", allow_none=True)
    startedDateTime = fields.DateTime(attribute="started_at", allow_none=True)
    finishedDateTime = fields.DateTime(attribute="finished_at", allow_none=True)
