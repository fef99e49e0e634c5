"""The compiled dumpers give what marshmallow's own ``dump`` gives, for every response schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from marshmallow import fields

from gateway import schemas
from gateway.schemas import fast_dumper

OUT_SCHEMAS = [schemas.BatchOut, schemas.SourceOut, schemas.FindingOut, schemas.RecommendationOut,
               schemas.ResourceOut, schemas.AlertOut, schemas.EventOut, schemas.ResourceSourceOut,
               schemas.ObservationOut, schemas.MergedOut, schemas.PolicyOut, schemas.ExemptionOut,
               schemas.AlertSuppressionRuleOut,
               schemas.GovernanceRuleOut, schemas.GovernanceAssignmentOut, schemas.ItemTicketOut]


def _value(field, filled: int):
    """A value of the field's type (``filled`` varies it); None where the field allows it."""
    if not filled and field.allow_none:
        return None
    kind = type(field)
    if kind is fields.String:
        return f"text ü {filled}"
    if kind is fields.Integer:
        return 7 + filled
    if kind is fields.Float:
        return 9.8 if filled % 2 else 5
    if kind is fields.Boolean:
        return bool(filled % 2)
    if kind is fields.DateTime:
        zone = UTC if filled % 2 else timezone(timedelta(hours=2))
        return datetime(2024, 4, 1, 12, 30, 5, 123456 * (filled % 2), tzinfo=zone)
    if kind is fields.List:
        return [_value(field.inner, filled + 1), _value(field.inner, filled + 2)] if filled else []
    if kind is fields.Nested:
        return _object(field.nested, filled)
    if kind is fields.Dict:
        if field.value_field is not None:
            return {"a": _value(field.value_field, filled), "b": _value(field.value_field, filled + 1)}
        return {"a": ["1", "2"], "n": filled} if filled else {}
    raise AssertionError(kind)


def _object(schema_class, filled: int) -> dict:
    obj = {"id": 40 + filled, "resource_id": None if not filled else 3, "cve": "CVE-2024-3094" if filled else None,
           "provider": "Qualys", "provider_id": "p-1", "vendor_id": "QID-1", "batch_id": filled or None,
           "merged_into": filled or None, "stale_details": [{"providerId": "p-1"}] if filled else None,
           "progress": {"chunks": filled} if filled else None, "exemption_id": filled or None,
           "type_enabled": bool(filled % 2), "type_severity_override": "high" if filled else None,
           "expired_at": None if filled % 2 else datetime(2024, 4, 1, tzinfo=UTC), "suppressed_by": filled or None,
           "conditions": [{"field": "alert.title", "operator": "in", "value": ["a", "b"]}] if filled else [],
           # governance (rules, assignments, a recommendation's current assignment, a finding's)
           "owner_source_type": "ByTag" if filled % 2 else "Manually", "owner_source_value": f"o{filled}",
           "remediation_seconds": 86400 * filled + 61,
           "email_notification": {"disableOwnerEmailNotification": True} if filled else {},
           "remediation_eta": datetime(2024, 5, 1, tzinfo=UTC) if filled else None,
           "eta_justification": "window" if filled else None, "gov_id": filled or None,
           "gov_rule_id": filled or None, "gov_owner": "sam",
           "gov_due_date": datetime(2024, 5, 1, tzinfo=UTC),
           "gov_is_grace_period": 1, "gov_overdue": filled % 2, "gov_completed_at": None,
           "governance": {"owner": "sam"} if filled else None,
           "recommendation_id": 50 + filled, "rule_id": filled or None,
           "connection_id": 60 + filled,  # an item's ticket (ItemTicketOut)
           # an alert's threat-intelligence matches (gateway/intel/matching.py keeps them in ``extra``)
           "extra": {"threatIntelligenceMatches": [{"indicatorId": str(filled)}]} if filled else None}
    for name, field in schema_class().dump_fields.items():
        if type(field) is not fields.Function:
            obj[field.attribute or name] = _value(field, filled)
    return obj


@pytest.mark.parametrize("schema_class", OUT_SCHEMAS, ids=lambda c: c.__name__)
def test_fast_dumper_matches_marshmallow(schema_class):
    rows = [_object(schema_class, filled) for filled in range(4)]
    expected = schema_class(many=True).dump(rows)
    assert fast_dumper(schema_class)(rows) == expected
    assert [list(item) for item in fast_dumper(schema_class)(rows)] == [list(item) for item in expected]


def test_a_missing_attribute_is_left_out_like_marshmallow():
    row = _object(schemas.SourceOut, 1)
    del row["evidence"]
    assert fast_dumper(schemas.SourceOut)([row]) == schemas.SourceOut(many=True).dump([row])
