import json
from datetime import UTC, datetime

import pytest

import connectors
from connectors import asc_assessment
from connectors.asc_assessment import assessment_from_put_body
from connectors.model import FindingRecord, FormatError, Rejected
from tests.connectors.conftest import SAMPLES, parse_all

SUB = "/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23"
VMSS1 = f"{SUB}/resourceGroups/myRg/providers/Microsoft.Compute/virtualMachineScaleSets/vmss1"
VMSS2 = f"{SUB}/resourceGroups/myRg/providers/Microsoft.Compute/virtualMachineScaleSets/vmss2"
ENDPOINT_PROTECTION = "21300918-b2e3-0346-785f-c77ff57d243b"
INTERNAL_AGENT = "8bb8be0a-6010-4789-812f-e4d661c4ed0e"

# A GET ...?$expand=metadata response (2021-06-01 schema) for an unhealthy VM.
WITH_METADATA = {
    "id": f"{SUB}/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-01/providers/"
          "Microsoft.Security/assessments/4ab6e3c5-74dd-8b35-9ab9-f61b30875b27",
    "name": "4ab6e3c5-74dd-8b35-9ab9-f61b30875b27",
    "type": "Microsoft.Security/assessments",
    "properties": {
        "resourceDetails": {
            "source": "Azure",
            "id": f"{SUB}/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-01",
        },
        "displayName": "System updates should be installed on your machines",
        "status": {"code": "Unhealthy", "firstEvaluationDate": "2024-03-01T10:00:00.1234567Z",
                   "statusChangeDate": "2024-03-05T08:30:00Z"},
        "additionalData": {"missingUpdatesCount": "7"},
        "metadata": {
            "displayName": "System updates should be installed on your machines",
            "severity": "High",
            "description": "Missing security system updates on your servers.",
            "remediationDescription": "Install the missing system security and critical updates.",
            "categories": ["Compute"],
            "assessmentType": "VerifiedPartner",
            "userImpact": "Moderate",
            "implementationEffort": "Low",
            "threats": ["DataExfiltration", "MaliciousInsider"],
            "partnerData": {"partnerName": "Contoso", "productName": "Contoso Patch", "secret": "s3cr3t"},
        },
        "links": {"azurePortalUri": "https://portal.azure.com/#blade/Microsoft_Azure_Security/x"},
    },
}


def _example(sample, name):
    return json.loads(sample(f"azure_defender_rest/{name}").read_bytes())


def _body(sample, name, code="200"):
    return _example(sample, name)["responses"][code]["body"]


def sniffers(data: bytes) -> set[str]:
    return {name for name, module in connectors.REGISTRY.items() if module.sniff(data[:65536])}


@pytest.mark.parametrize("body", [b'{"value": []}', b"[]", b'{"value": [], "nextLink": null}'])
def test_empty_documents_yield_nothing(body):
    assert parse_all("asc_assessment", body) == []


def test_one_not_applicable_assessment(sample):
    body = _body(sample, "2021-06-01_GetAssessmentWithExpand_example.json")
    [record] = parse_all("asc_assessment", json.dumps(body).encode())
    assert isinstance(record, FindingRecord)
    assert record.provider_id == f"{VMSS2.lower()}|{ENDPOINT_PROTECTION}"
    assert record.title == "Install endpoint protection solution on virtual machine scale sets"
    assert (record.kind, record.status) == ("compliance", "fixed")
    assert record.extra["notApplicable"] is True
    assert record.extra["statusCause"] == "OffByPolicy"
    assert record.extra["statusDescription"].startswith("The effective policy for the assessment")
    assert record.resource.cloud_id == VMSS2
    assert (record.resource.name, record.resource.kind) == ("vmss2", "cloud_resource")
    assert record.recommendation == record.vendor_id == ENDPOINT_PROTECTION
    assert (record.severity, record.extra["severityDefaulted"]) == ("medium", True)  # no metadata
    assert record.extra["additionalData"]["linkedWorkspaceId"].endswith("/workspaces/myLaWorkspace")
    assert record.references == [
        "https://www.portal.azure.com/?fea#blade/Microsoft_Azure_Security/RecommendationsBlade/assessmentKey/"
        f"{ENDPOINT_PROTECTION}"]


def test_many_assessments_in_a_list_response(sample):
    body = _body(sample, "2021-06-01_ListAssessments_example.json")
    records = parse_all("asc_assessment", json.dumps(body).encode())
    assert [r.resource.cloud_id for r in records] == [VMSS1, VMSS2]
    assert [r.extra["statusCode"] for r in records] == ["Healthy", "NotApplicable"]
    assert [r.status for r in records] == ["fixed", "fixed"]
    assert "notApplicable" not in records[0].extra
    # a bare array of the same assessments gives the same records
    assert parse_all("asc_assessment", json.dumps(body["value"]).encode()) == records


def test_metadata_severity_times_and_partner_secret():
    [record] = parse_all("asc_assessment", json.dumps(WITH_METADATA).encode())
    assert (record.severity, record.severity_original, record.status) == ("high", "High", "open")
    assert record.description == "Missing security system updates on your servers."
    assert record.remediation == "Install the missing system security and critical updates."
    assert record.resource.kind == "vm" and record.resource.name == "web-01"
    assert record.first_seen == datetime(2024, 3, 1, 10, 0, 0, 123456, tzinfo=UTC)
    assert record.provider_timestamp == datetime(2024, 3, 5, 8, 30, tzinfo=UTC)
    assert record.extra["categories"] == ["Compute"]
    assert record.extra["assessmentType"] == "VerifiedPartner"
    assert record.extra["partner"] == {"partnerName": "Contoso", "productName": "Contoso Patch"}
    assert "s3cr3t" not in json.dumps(record.extra)
    assert "severityDefaulted" not in record.extra


def test_resource_details_id_that_is_the_assessment_id(sample):
    # the 2020-01-01 PUT response's resourceDetails.Id is the assessment's own id (PascalCase quirk)
    body = _body(sample, "2020-01-01_PutAssessment_example.json")
    [record] = parse_all("asc_assessment", json.dumps(body).encode())
    assert record.resource.cloud_id == VMSS1
    assert record.provider_id == f"{VMSS1.lower()}|{INTERNAL_AGENT}"
    assert record.title == "Install internal agent on VM"
    assert record.extra["source"] == "Azure"


@pytest.mark.parametrize("name", ["2020-01-01_PutAssessment_example.json",
                                  "2025-05-04_PutAssessment_example.json"])
def test_assessment_from_put_body(sample, name):
    parameters = _example(sample, name)["parameters"]
    record = assessment_from_put_body(parameters["assessmentName"], parameters["assessment"],
                                      parameters["resourceId"])
    assert record.provider_id == f"{VMSS2.lower()}|{INTERNAL_AGENT}"
    assert record.resource.cloud_id == VMSS2  # the leading "/" is added
    assert (record.status, record.kind, record.recommendation) == ("fixed", "compliance", INTERNAL_AGENT)
    assert record.title == f"Assessment {INTERNAL_AGENT}"
    assert record.extra["source"] == "Azure"
    assert record.extra["assessmentId"] == (
        f"{VMSS2}/providers/Microsoft.Security/assessments/{INTERNAL_AGENT}")


def test_assessment_from_put_body_with_registered_metadata_and_on_premise_machine():
    body = {"properties": {
        "resourceDetails": {"source": "OnPremise", "machineName": "db-01.corp.contoso.com",
                            "sourceComputerId": "f5c1a1f2-0b6b-4c4a-9f33-0b4c2f6e8d21",
                            "vmuuid": "a1b2c3d4-0000-1111-2222-333344445555",
                            "workspaceId": "00000000-0000-0000-0000-000000000001"},
        "status": {"code": "Unhealthy", "cause": "MissingAgent", "description": "The agent is not installed"},
    }}
    resource_id = f"{SUB}/resourceGroups/onprem/providers/Microsoft.HybridCompute/machines/db-01"
    metadata = {"displayName": "Install the Contoso agent", "severity": "Low"}
    record = assessment_from_put_body("0d4b2e1c-aaaa-bbbb-cccc-111122223333", body, resource_id,
                                      metadata=metadata)
    assert (record.title, record.severity, record.status) == ("Install the Contoso agent", "low", "open")
    assert record.resource.fqdn == "db-01.corp.contoso.com"
    assert record.resource.agent_id == "f5c1a1f2-0b6b-4c4a-9f33-0b4c2f6e8d21"
    assert record.resource.kind == "host"
    assert record.extra["vmUuid"] == "a1b2c3d4-0000-1111-2222-333344445555"
    assert record.extra["statusCause"] == "MissingAgent"


@pytest.mark.parametrize(("name", "body", "resource_id", "message"), [
    ("a/b", {"properties": {"status": {"code": "Healthy"}}}, VMSS1, "path segment"),
    ("x", {"status": {"code": "Healthy"}}, VMSS1, "'properties' is required"),
    ("x", {"properties": {"status": {"code": "Broken"}}}, VMSS1, "Healthy, Unhealthy or NotApplicable"),
    ("x", {"properties": {"status": {"code": "Healthy"}, "metadata": {"severity": "Urgent"}}}, VMSS1,
     "severity"),
    ("x", {"properties": {"status": {"code": "Healthy"}}}, "/", "resource id"),
])
def test_assessment_from_put_body_rejects_invalid_bodies(name, body, resource_id, message):
    with pytest.raises(ValueError, match=message):
        assessment_from_put_body(name, body, resource_id)


def test_malformed_assessments_rejected_with_position(sample):
    good = _body(sample, "2021-06-01_ListAssessments_example.json")["value"]
    no_status = {**good[0], "properties": {**good[0]["properties"], "status": {}}}
    sub_assessment = _body(sample, "2019-01-01-preview_GetSubAssessment_example.json")
    records = parse_all("asc_assessment", json.dumps({"value": [good[0], no_status, sub_assessment, good[1]]})
                        .encode())
    assert [type(r).__name__ for r in records] == ["FindingRecord", "Rejected", "Rejected", "FindingRecord"]
    assert records[1] == Rejected(position="value[1]", reason=records[1].reason, provider_id=good[0]["id"])
    assert "status.code" in records[1].reason
    assert "sub-assessment" in records[2].reason


def test_put_body_without_url_is_rejected():
    [record] = parse_all("asc_assessment", b'{"properties": {"resourceDetails": {"source": "Azure"}, '
                                           b'"status": {"code": "Healthy"}}}')
    assert isinstance(record, Rejected) and record.position == "$"
    assert "PUT" in record.reason


def test_truncated_or_not_json_is_a_format_error(sample):
    data = json.dumps(_body(sample, "2021-06-01_ListAssessments_example.json")).encode()
    with pytest.raises(FormatError, match="not well-formed JSON after value\\[0\\]"):
        parse_all("asc_assessment", data[:-30])
    with pytest.raises(FormatError):
        parse_all("asc_assessment", b"")


@pytest.mark.parametrize(("name", "code"), [
    ("2020-01-01_PutAssessment_example.json", "200"),
    ("2020-01-01_PutAssessment_example.json", "201"),
    ("2025-05-04_PutAssessment_example.json", "200"),
    ("2021-06-01_GetAssessmentWithExpand_example.json", "200"),
    ("2021-06-01_ListAssessments_example.json", "200"),
])
def test_detect_assessment_bodies(sample, name, code):
    assert connectors.detect(json.dumps(_body(sample, name, code), indent=2).encode()) == "asc_assessment"


def test_detect_put_body_and_metadata_example(sample):
    parameters = _example(sample, "2025-05-04_PutAssessment_example.json")["parameters"]
    assert connectors.detect(json.dumps(parameters["assessment"]).encode()) == "asc_assessment"
    assert connectors.detect(json.dumps(WITH_METADATA).encode()) == "asc_assessment"


@pytest.mark.parametrize("name", [
    "2019-01-01-preview_GetSubAssessment_example.json",
    "2019-01-01-preview_ListSubAssessments_example.json",
    "2019-01-01-preview_ListSubscriptionSubAssessments_example.json",
    "2020-01-01_ListSecureScores_example.json",
    "2022-01-01_GetAlertSubscriptionLocation_example.json",
])
def test_other_defender_bodies_are_not_assessments(sample, name):
    assert not asc_assessment.sniff(json.dumps(_body(sample, name)).encode())


def test_sniff_ignores_other_formats():
    others = [p for p in SAMPLES.rglob("*") if p.is_file() and p.parent.name != "azure_defender_rest"]
    assert [p.name for p in others if asc_assessment.sniff(p.read_bytes()[:65536])] == []
