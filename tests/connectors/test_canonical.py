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


@pytest.fixture(params=["whole", "streamed"])
def mode(request, monkeypatch):
    """Small documents are decoded whole, large ones streamed: both must read the same."""
    from connectors import canonical

    if request.param == "streamed":
        monkeypatch.setattr(canonical, "WHOLE_DOCUMENT_BYTES", 64)
    return request.param


def test_whole_and_streamed_documents_read_the_same(mode):
    findings = [dict(GOOD, id=f"rec-{i}", title=f"finding {i}") for i in range(300)]
    findings[7] = dict(GOOD, id="rec-7", severity="urgent")
    records = parse_all("canonical", json.dumps({"scan": {"type": "full"}, "findings": findings}).encode())
    assert len(records) == 300
    assert isinstance(records[7], Rejected) and records[7].position == "findings[7]"
    assert [r.provider_id for r in records] == [f"rec-{i}" for i in range(300)]
    assert records[299].title == "finding 299" and records[299].cves == ["CVE-2024-3094"]


def test_malformed_tail_fails_in_both_modes(mode):
    body = _doc(*[dict(GOOD, id=f"rec-{i}") for i in range(50)])
    with pytest.raises(FormatError, match="not well-formed JSON"):
        parse_all("canonical", body[:-30] + b"nonsense")


def test_a_record_of_the_wrong_types_is_rejected_naming_the_field(mode):
    wrong = [dict(GOOD, id="rec-1", title=5), dict(GOOD, id="rec-2", resource="db-1"),
             dict(GOOD, id=True), dict(GOOD, id="rec-4", cves="CVE-2024-3094"), dict(GOOD, id="rec-5")]
    records = parse_all("canonical", _doc(*wrong))
    assert [type(r).__name__ for r in records] == ["Rejected"] * 4 + ["FindingRecord"]
    assert "$.title" in records[0].reason and records[0].provider_id == "rec-1"
    assert "$.resource" in records[1].reason
    assert "$.id" in records[2].reason and records[2].provider_id is None
    assert "$.cves" in records[3].reason
    assert records[4].provider_id == "rec-5" and records[4].cves == ["CVE-2024-3094"]
