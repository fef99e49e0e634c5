import io
import json
from datetime import UTC, datetime

import pytest

import connectors
from connectors import asff
from connectors.base import ParseOptions
from connectors.model import FindingRecord, FormatError, Rejected
from tests.connectors.conftest import SAMPLES, parse_all

# Files whose {"findings": [...]} envelope the canonical connector's sniff also matches
# (canonical.sniff looks for "findings" without "Findings"); reported, canonical.py not ours.
LOWERCASE_ENVELOPE = {
    "config_many_findings.json", "config_multiple_resources.json", "config_one_finding.json",
    "config_one_finding_active.json", "config_repeated_findings.json", "issue_10956.json",
    "missing_account_id.json",
}


def _load(sample, name):
    return sample(f"aws_asff/{name}").read_bytes()


def _items(sample, name):
    doc = json.loads(_load(sample, name))
    return doc if isinstance(doc, list) else doc.get("Findings", doc.get("findings"))


def sniffers(data: bytes) -> set[str]:
    return {name for name, module in connectors.REGISTRY.items() if module.sniff(data[:65536])}


@pytest.mark.parametrize("body", [b"[]", b'{"Findings": []}', b'{"findings": [], "NextToken": null}',
                                  b'\xef\xbb\xbf  {"Findings": []}'])
def test_empty_documents_yield_nothing(body):
    assert parse_all("asff", body) == []


def test_one_inspector_finding_bare_list(sample):
    [record] = parse_all("asff", _load(sample, "asff_one_vuln.json"))
    assert isinstance(record, FindingRecord)
    assert record.provider_id == (
        "arn:aws:inspector2:eu-west-1:123456789123:finding/e7dd7a6979b7ce39de463533b1e6cd44")
    assert record.title == "CVE-2017-9735 - org.eclipse.jetty:jetty-server, org.eclipse.jetty:jetty-util"
    assert (record.severity, record.severity_original) == ("high", "HIGH")
    assert record.severity_scale == "asff label"
    assert record.cves == ["CVE-2017-9735"]
    assert record.vendor_id is None
    assert (record.kind, record.status) == ("vulnerability", "open")
    assert record.resource.cloud_id == "arn:aws:ec2:eu-west-1:123456789123:instance/i-0sdg8sa1k2l3j11m2"
    assert record.resource.ipv4 == ["123.123.123.123", "172.31.0.31"]
    assert (record.resource.kind, record.resource.name) == ("vm", "MyWebServer")
    assert record.resource.os == "UBUNTU_20_04"
    assert record.extra["instanceId"] == "i-0sdg8sa1k2l3j11m2"
    assert record.first_seen == datetime(2023, 8, 30, 20, 7, 14, tzinfo=UTC)
    assert record.last_seen == datetime(2023, 9, 15, 7, 0, 24, tzinfo=UTC)
    assert record.provider_timestamp == datetime(2023, 9, 15, 7, 0, 24, tzinfo=UTC)
    assert record.cvss_score == 7.5
    assert record.cvss_vector == "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"
    assert "Update jetty-server to 9.4.6.v20170531" in record.remediation
    assert "org.eclipse.jetty:jetty-server 8.1.14.v20131031 (fixed in 9.4.6.v20170531)" in record.evidence
    assert "https://nvd.nist.gov/vuln/detail/CVE-2017-9735" in record.references
    assert record.extra["awsAccountId"] == "123456789123"


def test_single_finding_object_is_one_record(sample):
    [item] = _items(sample, "asff_one_vuln.json")
    [from_object] = parse_all("asff", json.dumps(item).encode())
    [from_list] = parse_all("asff", _load(sample, "asff_one_vuln.json"))
    assert from_object == from_list


def test_many_inspector_findings(sample):
    records = parse_all("asff", _load(sample, "asff_many_vulns.json"))
    assert [r.cves for r in records] == [["CVE-2017-9735"], ["CVE-2019-10247"], ["CVE-2023-26048"],
                                         ["CVE-2021-28165"], ["CVE-2023-26049"]]
    assert [r.severity for r in records] == ["high", "medium", "medium", "high", "medium"]
    assert {r.resource.cloud_id for r in records} == {
        "arn:aws:ec2:eu-west-1:123456789123:instance/i-0asd2da21c8csd28s"}
    assert records[1].provider_id.endswith("finding/96a4d357714e4eb40e17e4a9c6171ce4")
    assert records[1].cvss_score == 5.3


def test_security_hub_controls_in_lowercase_envelope(sample):
    records = parse_all("asff", _load(sample, "config_many_findings.json"))
    assert [r.vendor_id for r in records] == ["IAM.5", "SSM.2", "ELBv2.1"]
    assert all(r.kind == "compliance" and r.status == "fixed" for r in records)  # Compliance.Status PASSED
    first = records[0]
    assert first.title == "IAM.5 MFA should be enabled for all IAM users that have console password"
    assert first.severity == "informational"
    assert first.resource.cloud_id == "AWS::::Account:012345678912"
    assert first.resource.kind == "cloud_resource"
    assert first.references == ["https://docs.aws.amazon.com/console/securityhub/IAM.5/remediation"]
    assert first.extra["complianceStatus"] == "PASSED"
    assert records[2].last_seen is None  # the third has no LastObservedAt
    assert records[2].first_seen == datetime(2020, 6, 8, 14, 33, 35, 245000, tzinfo=UTC)


def test_failed_control_is_open(sample):
    [record] = parse_all("asff", _load(sample, "config_one_finding_active.json"))
    assert (record.kind, record.status, record.severity, record.vendor_id) == ("compliance", "open", "medium",
                                                                               "IAM.5")


def test_first_of_multiple_resources_is_the_resource(sample):
    records = parse_all("asff", _load(sample, "config_multiple_resources.json"))
    assert records[0].resource.cloud_id == (
        "arn:aws:ec2:us-east-1:012345678912:security-group/sg-0fff2222bbbb1111a")
    assert records[0].extra["otherResources"] == [
        "arn:aws:ec2:us-east-1:012345678912:security-group/sg-0aaa1111cccc2222b",
        "arn:aws:ec2:us-east-1:012345678912:vpc/vpc-0bbb3333dddd4444c",
    ]
    assert records[1].resource.cloud_id == "arn:aws:s3:::zeta-reports-bucket"
    assert [r.severity for r in records] == ["high", "medium"]


def test_guardduty_threat_findings(sample):
    records = parse_all("asff", _load(sample, "guardduty.json"))
    assert len(records) == 4
    first = records[0]
    assert first.title == "EC2 instance i-1234567890 is communicating with an Unusual DNS Resolver 1.1.1.1."
    assert (first.kind, first.status, first.severity) == ("vulnerability", "open", "medium")
    assert first.vendor_id == "TTPs/Defense Evasion/DefenseEvasion:EC2-UnusualDNSResolver"
    assert first.resource.name == "asdf-namenamename"
    assert first.first_seen == datetime(2024, 1, 17, 11, 19, 23, tzinfo=UTC)
    # LastObservedAt is in year 2200: dropped, kept in extra
    assert first.last_seen is None
    assert first.extra["ignoredTimes"] == {"LastObservedAt": "2200-01-17T11:21:23.000Z"}
    assert records[3].resource.cloud_id == "AWS::IAM::AccessKey:123123123"


def test_guardduty_file_name_with_spaces(sample):
    name = "asff_guardduty_Unusual Behaviors-User-Persistence IAMUser-NetworkPermissions.json"
    path = SAMPLES / "aws_asff" / name
    [record] = parse_all("asff", path.read_bytes())
    assert record.title == "Unusual changes to network permissions by GeneratedFindingUserName."
    assert record.resource.cloud_id == "arn:aws:ec2:eu-west-1:123456789012:instance/i-99999999"
    assert record.resource.ipv4 == ["10.0.0.1", "198.51.100.0"]
    assert record.extra["otherResources"] == ["AWS::IAM::AccessKey:GeneratedFindingAccessKeyId"]


def test_ghsa_and_ecr_and_missing_vulnerabilities(sample):
    [ghsa] = parse_all("asff", _load(sample, "inspector_ec2_ghsa.json"))
    assert (ghsa.cves, ghsa.vendor_id) == ([], "GHSA-p98r-538v-jgw5")
    ecr = parse_all("asff", _load(sample, "inspector_ecr.json"))
    assert len(ecr) == 7
    assert ecr[0].resource.kind == "container_image"
    assert ecr[0].resource.name == "repo-os:2023-08-23"
    assert ecr[0].cves == ["CVE-2023-2650"]
    [no_vulns] = parse_all("asff", _load(sample, "inspector_ec2_cve_no_vulnerabilities.json"))
    assert no_vulns.cves == ["CVE-2022-3643"]  # from the title
    assert no_vulns.severity == "critical"
    assert no_vulns.remediation is None  # Inspector's "None Provided"
    [bare_id] = parse_all("asff", _load(sample, "missing_account_id.json"))
    assert bare_id.resource.cloud_id == "i-1234xxyy"
    assert "awsAccountId" not in bare_id.extra
    assert bare_id.cves == ["CVE-2024-1234"]  # "CVE-2024-123" in the title is not a CVE id


@pytest.mark.parametrize(("changes", "status"), [
    ({"RecordState": "ARCHIVED"}, "fixed"),
    ({"Workflow": {"Status": "RESOLVED"}}, "fixed"),
    ({"Workflow": {"Status": "SUPPRESSED"}}, "fixed"),
    ({"Workflow": {"Status": "NOTIFIED"}}, "open"),
    ({"Compliance": {"Status": "WARNING"}}, "open"),
    ({"Compliance": {"Status": "NOT_AVAILABLE"}}, "fixed"),
])
def test_status_rules(sample, changes, status):
    [item] = _items(sample, "config_one_finding_active.json")
    [record] = parse_all("asff", json.dumps([{**item, **changes}]).encode())
    assert record.status == status


def test_severity_from_normalized_when_no_label(sample):
    [item] = _items(sample, "asff_one_vuln.json")
    item["Severity"] = {"Normalized": 92}
    [record] = parse_all("asff", json.dumps(item).encode())
    assert (record.severity, record.severity_original, record.severity_scale) == ("critical", "92",
                                                                                  "asff normalized 0-100")


def test_malformed_records_rejected_with_position(sample):
    good = _items(sample, "config_one_finding_active.json")[0]
    no_resources = {**good, "Id": "arn:bad-1", "Resources": []}
    bad_severity = {**good, "Id": "arn:bad-2", "Severity": {"Label": "URGENT"}}
    body = json.dumps({"Findings": [good, no_resources, "not an object", bad_severity, good]}).encode()
    records = parse_all("asff", body)
    assert [type(r).__name__ for r in records] == ["FindingRecord", "Rejected", "Rejected", "Rejected",
                                                   "FindingRecord"]
    assert records[1] == Rejected(position="Findings[1]", reason="'Resources' must be a non-empty list",
                                  provider_id="arn:bad-1")
    assert records[2].position == "Findings[2]" and "object" in records[2].reason
    assert records[3].position == "Findings[3]" and "URGENT" in records[3].reason


def test_truncated_json_is_a_format_error(sample):
    data = _load(sample, "inspector_ecr.json")
    with pytest.raises(FormatError, match="not well-formed JSON after Findings\\[1\\]"):
        parse_all("asff", data[: len(data) // 3])


@pytest.mark.parametrize("body", [b"", b"   ", b"SchemaVersion,Id\n1,2\n", b'"just a string"',
                                  b'{"Findings": [}'])
def test_not_json_is_a_format_error(body):
    with pytest.raises(FormatError):
        parse_all("asff", body)


def test_envelope_after_a_large_key_and_a_large_single_object(sample):
    [item] = _items(sample, "asff_one_vuln.json")
    body = json.dumps({"NextToken": "x" * 100_000, "Findings": [item, item]}).encode()
    assert [r.provider_id for r in parse_all("asff", body)] == [item["Id"]] * 2
    big = {**item, "Description": "y" * 100_000}
    [record] = parse_all("asff", json.dumps(big).encode())
    assert record.provider_id == item["Id"] and len(record.description) == 65536


class _Trickle(io.RawIOBase):
    """A non-seekable stream that returns at most 7 bytes per read, like a blob reader."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        n = min(7, len(target), len(self.data))
        target[:n] = self.data[:n]
        self.data = self.data[n:]
        return n


@pytest.mark.parametrize("name", ["guardduty.json", "asff_many_vulns.json", "config_many_findings.json"])
def test_reads_a_trickling_stream(sample, name):
    data = _load(sample, name)
    records = list(asff.parse(_Trickle(data), ParseOptions(provider="Test")))
    assert records == parse_all("asff", data)


@pytest.mark.parametrize("path", sorted((SAMPLES / "aws_asff").glob("*.json")), ids=lambda p: p.name)
def test_detect_picks_asff(path):
    data = path.read_bytes()
    matches = sniffers(data)
    assert "asff" in matches
    if path.name in LOWERCASE_ENVELOPE:
        assert matches <= {"asff", "canonical"}
        if "canonical" not in matches:
            assert connectors.detect(data[:65536]) == "asff"
    else:
        assert connectors.detect(data[:65536]) == "asff"


def test_sniff_ignores_other_formats():
    others = [p for p in SAMPLES.rglob("*") if p.is_file() and p.parent.name != "aws_asff"]
    assert [p.name for p in others if asff.sniff(p.read_bytes()[:65536])] == []


def test_ec2_identity_evidence_and_scan(sample):
    [record, *_] = parse_all("asff", sample("aws_asff/asff_many_vulns.json").read_bytes())
    resource = record.resource
    assert resource.cloud_id == "arn:aws:ec2:eu-west-1:123456789123:instance/i-0asd2da21c8csd28s"
    assert resource.host_key == resource.cloud_id
    assert resource.instance_id == "i-0asd2da21c8csd28s"
    assert resource.network == "vpc-12kk2qwe"  # Details.AwsEc2Instance.VpcId
    assert resource.cloud_name == "MyServer1"  # Tags.Name
    assert resource.ipv4 == ["123.123.123.123", "172.31.0.31"]
    assert record.scan == "Inspector"  # ProductName
    [inspector] = parse_all("asff", sample("aws_asff/inspector_ec2_cve.json").read_bytes())[:1]
    assert inspector.resource.instance_id == "i-11111111111111111"  # an ARN without "instance/"
    assert inspector.resource.network == "vpc-11111111111111111"
