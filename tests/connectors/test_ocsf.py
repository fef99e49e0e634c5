import copy
import json
from datetime import UTC, datetime

import pytest

import connectors
from connectors import ocsf
from connectors.model import AlertRecord, FindingRecord, FormatError, Rejected
from tests.connectors.conftest import SAMPLES, parse_all

ROLE_ARN = "arn:aws:iam::123456789012:role/myAdministratorExecutionRole"
PROWLER_UID = ("prowler-aws-iam_role_administratoraccess_policy_permissive_trust_relationship-"
               "123456789012-us-east-1-myAdministratorExecutionRole")

VULNERABILITY = {
    "class_uid": 2002,
    "class_name": "Vulnerability Finding",
    "category_uid": 2,
    "activity_id": 1,
    "type_uid": 200201,
    "severity_id": 4,
    "severity": "High",
    "status": "New",
    "status_id": 1,
    "time": 1717416919382,  # epoch milliseconds, as OCSF specifies
    "metadata": {"version": "1.1.0", "product": {"name": "Amazon Inspector", "vendor_name": "AWS"}},
    "finding_info": {
        "uid": "arn:aws:inspector2:us-east-1:123456789012:finding/0a1b2c",
        "title": "CVE-2023-4863 - libwebp",
        "desc": "Heap buffer overflow in libwebp.",
        "first_seen_time_dt": "2024-05-01T10:00:00Z",
        "last_seen_time_dt": "2024-06-03T12:15:19Z",
    },
    "resources": [{"uid": "arn:aws:ec2:us-east-1:123456789012:instance/i-0abc", "type": "AwsEc2Instance",
                   "name": "web-1"}],
    "vulnerabilities": [{
        "cve": {"uid": "CVE-2023-4863", "cvss": [
            {"version": "3.1", "base_score": 8.8,
             "vector_string": "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:H/I:H/A:H"},
            {"version": "2.0", "base_score": 6.8},
        ]},
        "severity": "High",
        "references": ["https://nvd.nist.gov/vuln/detail/CVE-2023-4863"],
        "affected_packages": [{"name": "libwebp", "version": "1.2.4", "fixed_in_version": "1.3.2"}],
    }],
    "remediation": {"desc": "Upgrade libwebp to 1.3.2 or later."},
}

COMPLIANCE = {
    "class_uid": 2003,
    "class_name": "Compliance Finding",
    "category_uid": 2,
    "severity_id": 3,
    "severity": "Medium",
    "time_dt": "2024-06-03T14:15:19Z",
    "finding_info": {"uid": "cis-1.4-1.20-123456789012", "title": "Ensure IAM Access Analyzer is enabled"},
    "compliance": {"control": "1.20", "standards": ["CIS AWS Foundations 1.4.0"], "requirements": ["1.20"],
                   "status_id": 1, "status": "Pass"},
    "resources": [{"uid": "arn:aws:iam::123456789012:root", "type": "AwsAccount"}],
}

THREAT = {
    "class_uid": 2004,
    "class_name": "Detection Finding",
    "category_uid": 2,
    "severity_id": 5,
    "severity": "Critical",
    "status": "In Progress",
    "time": 1717416919382,
    "finding_info": {
        "uid": "gd-7f2a",
        "title": "Cryptocurrency mining detected on i-0abc",
        "desc": "The EC2 instance is querying a domain associated with Bitcoin mining.",
        "types": ["CryptoCurrency:EC2/BitcoinTool.B!DNS"],
        "created_time_dt": "2024-06-03T12:00:00Z",
    },
    "device": {"hostname": "ip-10-0-0-5.ec2.internal", "ip": "10.0.0.5",
               "instance_uid": "arn:aws:ec2:us-east-1:123456789012:instance/i-0abc"},
    "attacks": [{"tactic": {"name": "Impact"}, "technique": {"uid": "T1496", "name": "Resource Hijacking"}}],
    "remediation": {"desc": "Isolate the instance and rotate its credentials."},
}


def _load(sample, name):
    return sample(f"ocsf/{name}").read_bytes()


def sniffers(data: bytes) -> set[str]:
    return {name for name, module in connectors.REGISTRY.items() if module.sniff(data[:65536])}


@pytest.mark.parametrize("name", ["prowler_prowler_zero_vul.json", "prowler_v3plus_no_vuln.ocsf.json"])
def test_empty_arrays_yield_nothing(sample, name):
    assert parse_all("ocsf", _load(sample, name)) == []


@pytest.mark.parametrize("name", ["prowler_v3plus_one_vuln.ocsf.json",
                                  "prowler_v3plus_one_vuln_after_4_5_0.ocsf.json"])
def test_one_prowler_finding(sample, name):
    [record] = parse_all("ocsf", _load(sample, name))
    assert isinstance(record, FindingRecord)
    assert record.provider_id == PROWLER_UID
    assert record.title == ("Ensure IAM Roles with attached AdministratorAccess policy have a well defined "
                            "trust relationship")
    assert record.description == record.title
    assert (record.severity, record.severity_original) == ("high", "High")
    assert (record.kind, record.status) == ("compliance", "open")
    assert record.vendor_id == "iam_role_administratoraccess_policy_permissive_trust_relationship"
    assert record.resource.cloud_id == ROLE_ARN
    assert (record.resource.name, record.resource.kind) == ("myAdministratorExecutionRole", "cloud_resource")
    assert record.extra["resourceType"] == "AwsIamRole"
    assert record.extra["account"] == "123456789012"
    assert record.extra["className"] == "DetectionFinding"  # Prowler 3 class_name drift
    assert record.evidence.startswith("IAM Role myAdministratorExecutionRole has AdministratorAccess")
    assert record.remediation.startswith("Apply the principle of least privilege")
    assert record.references == [
        "https://docs.aws.amazon.com/IAM/latest/UserGuide/best-practices.html#grant-least-privilege",
        "https://docs.aws.amazon.com/IAM/latest/UserGuide/access_policies_job-functions.html#jf_administrator",
    ]
    seen = datetime(2024, 6, 3, 14, 15, 19, 382075, tzinfo=UTC)
    assert record.first_seen == record.last_seen == record.provider_timestamp == seen
    assert record.cves == []


def test_many_prowler_findings_and_suppressed_is_fixed(sample):
    records = parse_all("ocsf", _load(sample, "prowler_v3plus_many_vuln.ocsf.json"))
    assert [r.status for r in records] == ["open", "open", "fixed"]  # the third is "Suppressed"
    assert records[1].resource.cloud_id == "arn:aws:iam::123456789012:role/AuditRole"
    assert records[1].extra["compliance"]["frameworks"]["MITRE-ATTACK"] == ["T1078"]
    assert records[2].extra["status"] == "Suppressed"


def test_prowler_4_example_with_manual_check(sample):
    records = parse_all("ocsf", _load(sample, "prowler_example_output_aws.ocsf.json"))
    assert [type(r).__name__ for r in records] == ["FindingRecord", "Rejected", "FindingRecord"]
    first = records[0]
    assert first.title == "Check if IAM Access Analyzer is enabled"
    assert (first.severity, first.status, first.vendor_id) == ("low", "open", "accessanalyzer_enabled")
    assert first.extra["compliance"]["frameworks"]["CIS-3.0"] == ["1.20"]
    assert first.extra["remediationSnippets"] == [
        "aws accessanalyzer create-analyzer --analyzer-name <NAME> --type <ACCOUNT|ORGANIZATION>"]
    assert first.last_seen == datetime(2025, 2, 14, 14, 27, 3, 913874, tzinfo=UTC)
    assert records[1].position == "[1]"
    assert "MANUAL" in records[1].reason
    assert records[2].resource.cloud_id == "arn:aws:iam::<account_uid>:root"


@pytest.mark.parametrize(("name", "count", "severities"), [
    ("prowler_example_output_azure.ocsf.json", 3, ["low", "medium", "high"]),
    ("prowler_example_output_gcp.ocsf.json", 3, ["medium", "medium", "critical"]),
    ("prowler_example_output_kubernetes.ocsf.json", 4, ["medium"] * 4),
])
def test_prowler_4_examples(sample, name, count, severities):
    records = parse_all("ocsf", _load(sample, name))
    assert len(records) == count
    assert [r.severity for r in records] == severities
    assert all(r.kind == "compliance" and r.status == "open" for r in records)


def test_azure_example_resource(sample):
    first = parse_all("ocsf", _load(sample, "prowler_example_output_azure.ocsf.json"))[0]
    assert first.resource.cloud_id == "AppInsights"
    assert first.extra["resourceType"] == "Microsoft.Insights/components"
    assert first.extra["cloudProvider"] == "azure"


def test_vulnerability_finding():
    [record] = parse_all("ocsf", json.dumps(VULNERABILITY).encode())  # a single object
    assert (record.kind, record.status, record.severity) == ("vulnerability", "open", "high")
    assert record.cves == ["CVE-2023-4863"]
    assert record.vendor_id is None
    assert (record.cvss_score, record.cvss_vector) == (8.8, "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:H/I:H/A:H")
    assert record.evidence == "libwebp 1.2.4 (fixed in 1.3.2)"
    assert record.resource.kind == "vm"
    assert record.first_seen == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert record.last_seen == datetime(2024, 6, 3, 12, 15, 19, tzinfo=UTC)
    assert record.provider_timestamp == datetime(2024, 6, 3, 12, 15, 19, 382000, tzinfo=UTC)  # epoch ms
    assert record.references == ["https://nvd.nist.gov/vuln/detail/CVE-2023-4863"]


def test_vulnerability_status_codes_of_other_vendors_do_not_matter():
    records = parse_all("ocsf", json.dumps([{**VULNERABILITY, "status_code": "ACTIVE"},
                                            {**VULNERABILITY, "status": "Resolved"}]).encode())
    assert [r.status for r in records] == ["open", "fixed"]


def test_compliance_finding_without_a_result_is_rejected():
    no_result = copy.deepcopy(COMPLIANCE)
    del no_result["compliance"]["status_id"], no_result["compliance"]["status"]
    [record] = parse_all("ocsf", json.dumps(no_result).encode())
    assert isinstance(record, Rejected) and record.position == "$"
    assert "no check result" in record.reason


def test_compliance_finding_pass_and_fail():
    failing = copy.deepcopy(COMPLIANCE)
    failing["finding_info"]["uid"] = "cis-fail"
    failing["compliance"].update(status_id=3, status="Fail")
    records = parse_all("ocsf", json.dumps([COMPLIANCE, failing]).encode())
    assert [(r.kind, r.status) for r in records] == [("compliance", "fixed"), ("compliance", "open")]
    assert records[0].vendor_id == "1.20"
    assert records[0].extra["compliance"]["standards"] == ["CIS AWS Foundations 1.4.0"]


def test_threat_detection_without_check_result_is_an_alert():
    [alert] = parse_all("ocsf", json.dumps([THREAT]).encode())
    assert isinstance(alert, AlertRecord)
    assert alert.provider_id == "gd-7f2a"
    assert (alert.title, alert.severity) == ("Cryptocurrency mining detected on i-0abc", "critical")
    assert alert.category == "CryptoCurrency:EC2/BitcoinTool.B!DNS"
    assert alert.status == "inProgress"
    assert alert.description.startswith("The EC2 instance is querying")
    assert alert.resource.cloud_id == "arn:aws:ec2:us-east-1:123456789012:instance/i-0abc"
    assert alert.resource.fqdn == "ip-10-0-0-5.ec2.internal"
    assert alert.resource.ipv4 == ["10.0.0.5"]
    assert alert.created == datetime(2024, 6, 3, 12, tzinfo=UTC)
    assert alert.recommended_actions == ["Isolate the instance and rotate its credentials."]
    assert alert.extra["attacks"][0]["technique"]["uid"] == "T1496"
    # the same event with a Prowler status_code is a check, not an alert
    [check] = parse_all("ocsf", json.dumps([{**THREAT, "status_code": "PASS"}]).encode())
    assert isinstance(check, FindingRecord) and check.status == "fixed"


def test_class_decided_by_name_then_objects():
    by_name = {k: v for k, v in VULNERABILITY.items() if k != "class_uid"}
    by_objects = {k: v for k, v in COMPLIANCE.items() if k not in ("class_uid", "class_name")}
    records = parse_all("ocsf", json.dumps([by_name, by_objects]).encode())
    assert [r.kind for r in records] == ["vulnerability", "compliance"]


def test_unknown_class_and_malformed_events_rejected_with_position(sample):
    [good] = json.loads(_load(sample, "prowler_v3plus_one_vuln.ocsf.json"))
    auth = {**good, "class_uid": 3002, "class_name": "Authentication"}
    no_uid = copy.deepcopy(good)
    del no_uid["finding_info"]["uid"]
    bad_severity = {**good, "severity": "Whatever", "severity_id": 42}
    records = parse_all("ocsf", json.dumps([good, auth, no_uid, bad_severity, good]).encode())
    assert [type(r).__name__ for r in records] == ["FindingRecord", "Rejected", "Rejected", "Rejected",
                                                   "FindingRecord"]
    assert records[1] == Rejected(position="[1]", reason=records[1].reason, provider_id=PROWLER_UID)
    assert "class_uid 3002 (Authentication)" in records[1].reason
    assert "finding_info.uid" in records[2].reason
    assert "severity" in records[3].reason


def test_truncated_or_not_json_is_a_format_error(sample):
    data = _load(sample, "prowler_example_output_kubernetes.ocsf.json")
    with pytest.raises(FormatError, match="not well-formed JSON after \\[0\\]: parse error"):
        parse_all("ocsf", data[: len(data) // 2])  # cut inside the second event
    with pytest.raises(FormatError, match="not JSON"):
        parse_all("ocsf", b"<xml/>")


@pytest.mark.parametrize("path", sorted((SAMPLES / "ocsf").glob("*.json")), ids=lambda p: p.name)
def test_detect_picks_ocsf(path):
    data = path.read_bytes()
    if json.loads(data):
        assert connectors.detect(data[:65536]) == "ocsf"
    else:  # "[]": nothing to recognise; no connector claims it
        assert "ocsf" not in sniffers(data)


def test_detect_inline_events():
    for event in (VULNERABILITY, COMPLIANCE, THREAT):
        assert connectors.detect(json.dumps([event]).encode()) == "ocsf"


def test_sniff_ignores_other_formats():
    others = [p for p in SAMPLES.rglob("*") if p.is_file() and p.parent.name != "ocsf"]
    assert [p.name for p in others if ocsf.sniff(p.read_bytes()[:65536])] == []


def test_field_variants_seen_in_the_field(sample):
    records = parse_all("ocsf", _load(sample, "field_variants.ocsf.json"))
    assert [type(r).__name__ for r in records] == ["FindingRecord"] * 4 + ["Rejected"]
    xz, failed, passed, warning, bad = records
    # severity_id 99 (Other) and 0 (Unknown) are valid: informational, the original kept
    assert (xz.severity, xz.severity_original) == ("informational", "99")
    assert (failed.severity, failed.severity_original) == ("informational", "0")
    # vulnerabilities[].remediation.desc when the event has no top-level remediation
    assert xz.remediation == "Downgrade xz-utils to 5.4.x (5.6.1+really5.4.5)."
    assert xz.cvss_vector == "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H"  # prefix kept
    assert xz.product == "Trivy"
    resource = xz.resource
    assert resource.cloud_id == "arn:aws:ec2:us-east-1:123456789012:instance/i-0abc1234def567890"
    assert resource.instance_id == "i-0abc1234def567890"
    assert resource.host_key == resource.cloud_id
    # compliance.status as producers write it, with or without status_id
    assert [(r.status, r.kind) for r in (failed, passed, warning)] == [
        ("open", "compliance"), ("fixed", "compliance"), ("open", "compliance")]
    assert failed.product == "Cloud Custodian"
    assert bad.position == "[4]" and "severity" in bad.reason and bad.provider_id == "custodian-bad-severity"


def test_severity_ids_without_words():
    for severity_id, expected in ((0, "informational"), (99, "informational"), ("4", "high")):
        event = {k: v for k, v in VULNERABILITY.items() if k != "severity"}
        [record] = parse_all("ocsf", json.dumps([dict(event, severity_id=severity_id)]).encode())
        assert (record.severity, record.severity_original) == (expected, str(severity_id))
