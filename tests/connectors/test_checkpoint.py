import json
from datetime import UTC, datetime

import pytest

import connectors
from connectors import checkpoint
from connectors.model import FindingRecord, FormatError, Rejected
from tests.connectors.conftest import SAMPLES, parse_all

# The CloudGuard samples are the API's response *shapes* with placeholder values (every
# value is its field name).  Realistic findings are built from that exact key set.
REALISTIC = {
    "acknowledged": False,
    "action": "Detect",
    "alertType": "Task",
    "bundleId": 226151,
    "bundleName": "AWS CIS Foundations v. 1.4.0",
    "category": "",
    "cloudAccountExternalId": "123456789012",
    "cloudAccountId": "8b1f5a3c-2f3e-4b44-9a0c-7d1c5e2f9a10",
    "cloudAccountType": "Aws",
    "createdTime": "2024-02-01T08:15:30.123Z",
    "description": "Security groups provide stateful filtering of ingress/egress network traffic.",
    "entityDome9Id": "3|8b1f5a3c-2f3e-4b44-9a0c-7d1c5e2f9a10|us_east_1|SecurityGroup|sg-0a1b2c3d",
    "entityExternalId": "sg-0a1b2c3d",
    "entityName": "default",
    "entityNetwork": "vpc-0123abcd",
    "entityObject": {"arn": "arn:aws:ec2:us-east-1:123456789012:security-group/sg-0a1b2c3d"},
    "entityType": "SecurityGroup",
    "entityTypeByEnvironmentType": "SecurityGroup",
    "findingKey": "k5RxNu5f9aTq2oPWm6c2+g",
    "id": "0d6f3b53-1b8c-4c8e-9f9e-5b2f7a6d1c01",
    "isExcluded": False,
    "labels": ["cis"],
    "lastSeenTime": "2024-02-03T08:15:30.456Z",
    "organizationalUnitPath": "",
    "origin": "ComplianceEngine",
    "region": "N. Virginia",
    "remediation": "Remove all inbound and outbound rules from the default security group.",
    "ruleId": "D9.AWS.NET.01",
    "ruleLogic": "SecurityGroup where name='default' should have inboundRules isEmpty()",
    "ruleName": "Ensure the default security group of every VPC restricts all traffic",
    "severity": "High",
    "status": "Active",
    "tag": "4.3",
    "updatedTime": "2024-02-03T09:00:00Z",
}


def _shape(sample, name):
    return json.loads(sample(f"checkpoint_cloudguard/{name}").read_bytes())


def _finding(sample, **changes):
    """The finding_get sample's key set, with realistic values."""
    shape = _shape(sample, "demisto_CheckPointDome9_finding_get.json")
    assert set(REALISTIC) <= set(shape)
    return {**shape, **REALISTIC, **changes}


def _search(sample, *findings):
    response = _shape(sample, "demisto_CheckPointDome9_findings_search.json")
    response["findings"] = list(findings)
    return json.dumps(response).encode()


def sniffers(data: bytes) -> set[str]:
    return {name for name, module in connectors.REGISTRY.items() if module.sniff(data[:65536])}


@pytest.mark.parametrize("body", [b"[]", b'{"findings": [], "searchAfter": null, "totalFindingsCount": 0}'])
def test_empty_documents_yield_nothing(body):
    assert parse_all("checkpoint", body) == []


def test_placeholder_samples_are_rejected_with_positions(sample):
    search = sample("checkpoint_cloudguard/demisto_CheckPointDome9_findings_search.json")
    records = parse_all("checkpoint", search.read_bytes())
    assert [r.position for r in records] == ["findings[0]", "findings[1]"]
    assert all(isinstance(r, Rejected) and "'severity' 'severity'" in r.reason for r in records)
    assert records[0].provider_id == "findingKey"
    get = sample("checkpoint_cloudguard/demisto_CheckPointDome9_finding_get.json")
    [single] = parse_all("checkpoint", get.read_bytes())
    assert single.position == "$" and isinstance(single, Rejected)


def test_one_finding_object(sample):
    [record] = parse_all("checkpoint", json.dumps(_finding(sample)).encode())
    assert isinstance(record, FindingRecord)
    assert record.provider_id == "k5RxNu5f9aTq2oPWm6c2+g"
    assert record.title == "Ensure the default security group of every VPC restricts all traffic"
    assert (record.severity, record.severity_original) == ("high", "High")
    assert (record.kind, record.status) == ("compliance", "open")
    assert record.vendor_id == "D9.AWS.NET.01"
    assert record.recommendation == "checkpoint:D9.AWS.NET.01"
    assert record.resource.cloud_id == "arn:aws:ec2:us-east-1:123456789012:security-group/sg-0a1b2c3d"
    assert (record.resource.name, record.resource.kind) == ("default", "cloud_resource")
    assert record.remediation.startswith("Remove all inbound")
    assert record.description.startswith("Security groups provide")
    assert record.first_seen == datetime(2024, 2, 1, 8, 15, 30, 123000, tzinfo=UTC)
    assert record.last_seen == datetime(2024, 2, 3, 8, 15, 30, 456000, tzinfo=UTC)
    assert record.provider_timestamp == datetime(2024, 2, 3, 9, 0, tzinfo=UTC)
    assert record.cves == []
    assert record.extra["cloudAccountExternalId"] == "123456789012"
    assert record.extra["entityExternalId"] == "sg-0a1b2c3d"
    assert record.extra["entityType"] == "SecurityGroup"
    assert record.extra["bundleName"] == "AWS CIS Foundations v. 1.4.0"
    assert record.extra["findingId"] == "0d6f3b53-1b8c-4c8e-9f9e-5b2f7a6d1c01"
    assert record.extra["region"] == "N. Virginia"


def test_many_findings_in_a_search_response(sample):
    azure_vm = _finding(
        sample, findingKey="azure-1", entityObject={}, entityType="VirtualMachine", entityName="web-01",
        entityExternalId="/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/web-01",
        ruleId="", ruleName="Ensure VM disks are encrypted", severity="Critical", cloudAccountType="Azure")
    passed = _finding(sample, findingKey="passed-1", status="Passed", severity="Low")
    excluded = _finding(sample, findingKey="excluded-1", isExcluded=True, severity="Medium")
    no_arn = _finding(sample, findingKey="plain-1", entityObject={}, severity="Informational")
    records = parse_all("checkpoint", _search(sample, _finding(sample), azure_vm, passed, excluded, no_arn))
    assert [r.provider_id for r in records] == ["k5RxNu5f9aTq2oPWm6c2+g", "azure-1", "passed-1", "excluded-1",
                                                "plain-1"]
    assert [r.status for r in records] == ["open", "open", "fixed", "fixed", "open"]
    assert [r.severity for r in records] == ["high", "critical", "low", "medium", "informational"]
    vm = records[1]
    assert vm.resource.cloud_id.endswith("/virtualMachines/web-01")
    assert (vm.resource.kind, vm.resource.name) == ("vm", "web-01")
    # an empty ruleId falls back to the rule logic (vendor id) and the rule name (recommendation)
    assert vm.vendor_id == REALISTIC["ruleLogic"]
    assert vm.recommendation == "checkpoint:Ensure VM disks are encrypted"
    assert records[4].resource.cloud_id == "sg-0a1b2c3d"  # no full id: the entity's external id


def test_malformed_finding_rejected_while_others_come_out(sample):
    no_rule = _finding(sample, findingKey="bad-1")
    del no_rule["ruleName"]
    no_entity = _finding(sample, findingKey="bad-2", entityExternalId="", entityDome9Id=None, entityObject={})
    bad_time = _finding(sample, findingKey="bad-3", createdTime="yesterday")
    records = parse_all("checkpoint", _search(sample, _finding(sample), no_rule, no_entity, bad_time,
                                              _finding(sample, findingKey="ok-2")))
    assert [type(r).__name__ for r in records] == ["FindingRecord", "Rejected", "Rejected", "Rejected",
                                                   "FindingRecord"]
    assert records[1] == Rejected(position="findings[1]", reason=records[1].reason, provider_id="bad-1")
    assert "ruleName" in records[1].reason
    assert "entity" in records[2].reason
    assert "createdTime" in records[3].reason


def test_ruleset_bundle_is_not_findings(sample):
    data = sample("checkpoint_cloudguard/cloudbots_sample_bundle.json").read_bytes()
    [record] = parse_all("checkpoint", data)
    assert isinstance(record, Rejected)
    assert record.position == "[0]"
    assert "rule definition" in record.reason
    assert connectors.detect(data) is None


def test_truncated_json_is_a_format_error(sample):
    data = _search(sample, _finding(sample), _finding(sample, findingKey="two"))
    with pytest.raises(FormatError, match="not well-formed JSON"):
        parse_all("checkpoint", data[:-40])
    with pytest.raises(FormatError, match="not JSON"):
        parse_all("checkpoint", b"ruleName,entityType\n")


def test_detect(sample):
    single = json.dumps(_finding(sample)).encode()
    assert connectors.detect(single) == "checkpoint"
    assert connectors.detect(json.dumps([_finding(sample)]).encode()) == "checkpoint"
    raw = sample("checkpoint_cloudguard/demisto_CheckPointDome9_finding_get.json").read_bytes()
    assert connectors.detect(raw) == "checkpoint"


def test_detect_search_response_conflicts_only_with_canonical(sample):
    # canonical.sniff matches any object naming "findings": the CloudGuard search response
    # too (reported).  Once it stops doing so, detect() must pick checkpoint.
    for data in (_search(sample, _finding(sample)),
                 sample("checkpoint_cloudguard/demisto_CheckPointDome9_findings_search.json").read_bytes()):
        matches = sniffers(data)
        assert "checkpoint" in matches
        assert matches <= {"checkpoint", "canonical"}
        if "canonical" not in matches:
            assert connectors.detect(data) == "checkpoint"


def test_sniff_ignores_other_formats():
    others = [p for p in SAMPLES.rglob("*") if p.is_file() and p.parent.name != "checkpoint_cloudguard"]
    assert [p.name for p in others if checkpoint.sniff(p.read_bytes()[:65536])] == []


def test_webhook_and_bot_findings(sample):
    records = parse_all("checkpoint", sample("checkpoint_cloudguard/webhook_findings.json").read_bytes())
    sg, instance, bad = records
    assert (type(sg).__name__, type(instance).__name__, type(bad).__name__) == (
        "FindingRecord", "FindingRecord", "Rejected")
    assert sg.provider_id == "Q9qW3tZ1n3l0m2dYk3Y5bA"
    assert sg.title.startswith("Ensure no security groups allow ingress from 0.0.0.0/0")
    assert (sg.severity, sg.severity_original, sg.severity_scale) == ("high", "High", "cloudguard")
    assert (sg.vendor_id, sg.status, sg.kind) == ("D9.AWS.NET.AG2.3.TCP.22", "open", "compliance")
    assert sg.resource.cloud_id == "arn:aws:ec2:eu-west-1:123456789012:security-group/sg-0a1b2c3d4e5f67890"
    assert sg.resource.host_key == sg.resource.cloud_id
    assert (sg.resource.name, sg.resource.cloud_name, sg.resource.network) == (
        "bastion-ssh", "bastion-ssh", "vpc-0f1e2d3c4b5a69788")
    assert sg.resource.instance_id is None
    assert sg.extra["cloudAccountExternalId"] == "123456789012" and sg.extra["cloudAccountType"] == "aws"
    # no severity anywhere: the documented default, marked by its scale
    assert (instance.severity, instance.severity_original, instance.severity_scale) == (
        "medium", "Medium", "cloudguard default")
    assert instance.vendor_id == "D9.AWS.NET.14"
    assert (instance.resource.kind, instance.resource.instance_id) == ("vm", "i-0abc1234def567890")
    assert instance.resource.network == "vpc-0f1e2d3c4b5a69788"
    assert bad.position == "[2]" and "entity" in bad.reason and bad.provider_id == "no-entity-0001"
