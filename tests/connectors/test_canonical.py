import json

import pytest

import connectors
from connectors.model import FindingRecord, FormatError, Rejected
from tests.connectors.conftest import parse_all


def _doc(*findings):
    return json.dumps({"findings": list(findings)}).encode()


GOOD = {
    "id": "rec-1",
    "resource": {"fqdn": "DB-1.example.com", "ipv4": ["10.0.0.5"]},
    "title": "xz backdoor",
    "severity": "critical",
    "cves": ["cve-2024-3094"],
    "status": "open",
    "firstSeen": "2024-03-29T10:00:00Z",
    "lastSeen": "2024-03-30T10:00:00+02:00",
    "cvssScore": 10,
}


def test_empty_document_yields_nothing():
    assert parse_all("canonical", b'{"findings": []}') == []


def test_one_finding_fields():
    [record] = parse_all("canonical", _doc(GOOD))
    assert isinstance(record, FindingRecord)
    assert record.provider_id == "rec-1"
    assert record.resource.fqdn == "DB-1.example.com"
    assert record.resource.ipv4 == ["10.0.0.5"]
    assert record.cves == ["CVE-2024-3094"]
    assert record.severity == "critical"
    assert record.last_seen.isoformat() == "2024-03-30T08:00:00+00:00"
    assert record.cvss_score == 10.0


def test_bad_records_rejected_with_position_and_others_kept():
    bad_severity = dict(GOOD, id="rec-2", severity="urgent")
    no_resource = dict(GOOD, id="rec-3", resource={})
    records = parse_all("canonical", _doc(GOOD, bad_severity, no_resource, dict(GOOD, id="rec-4")))
    assert [type(r).__name__ for r in records] == ["FindingRecord", "Rejected", "Rejected", "FindingRecord"]
    assert records[1] == Rejected(position="findings[1]", reason=records[1].reason, provider_id="rec-2")
    assert "severity" in records[1].reason
    assert "identifier" in records[2].reason


def test_truncated_json_is_a_format_error():
    with pytest.raises(FormatError):
        parse_all("canonical", _doc(GOOD)[:-10])


def test_detect():
    assert connectors.detect(_doc(GOOD)) == "canonical"
