"""Graph security alerts: inline fixtures written from the documented Graph schema.

There is no Graph alert sample in shared/samples; the shapes follow the Microsoft Graph
v1.0 ``alert`` (security/alerts, with vendorInformation/hostStates) and
``microsoft.graph.security.alert`` (security/alerts_v2, with evidence) resources.
"""

import copy
import json
from datetime import UTC, datetime

import pytest

import connectors
from connectors import graph_alert
from connectors.model import AlertRecord, FormatError, Rejected
from tests.connectors.conftest import SAMPLES, parse_all

LEGACY = {
    "id": "2518267967999999999_13d1b29c-5a6f-4d1d-9a2b-6c5c4d9b8f21",
    "azureTenantId": "b3c1b5fc-828c-45fa-a1e1-10d74f6d6e9c",
    "azureSubscriptionId": "9cfbad7a-7369-42e4-bcce-7677c5b3a44b",
    "activityGroupName": None,
    "assignedTo": None,
    "category": "Malware",
    "closedDateTime": None,
    "cloudAppStates": [],
    "comments": [],
    "confidence": 80,
    "createdDateTime": "2024-04-02T09:21:14.0343519Z",
    "description": "A process launched an encoded PowerShell command commonly used by malware loaders.",
    "detectionIds": [],
    "eventDateTime": "2024-04-02T09:17:02Z",
    "feedback": None,
    "fileStates": [],
    "hostStates": [
        {"fqdn": "web-01.contoso.com", "isAzureAdJoined": True, "isAzureAdRegistered": None,
         "isHybridAzureDomainJoined": False, "netBiosName": "WEB-01", "os": "Windows Server 2019",
         "privateIpAddress": "10.0.0.4", "publicIpAddress": "20.51.10.7", "riskScore": "High"},
        {"fqdn": "web-02.contoso.com", "netBiosName": "WEB-02", "privateIpAddress": "10.0.0.5"},
    ],
    "lastModifiedDateTime": "2024-04-02T10:02:40.5Z",
    "malwareStates": [],
    "networkConnections": [],
    "processes": [],
    "recommendedActions": ["Isolate the host from the network", "Run a full antivirus scan"],
    "registryKeyStates": [],
    "securityResources": [],
    "severity": "high",
    "sourceMaterials": ["https://portal.contoso-edr.com/alerts/13d1b29c"],
    "status": "newAlert",
    "tags": [],
    "title": "Suspicious encoded PowerShell command",
    "triggers": [],
    "userStates": [{"accountName": "alice", "domainName": "CONTOSO",
                    "userPrincipalName": "alice@contoso.com"}],
    "vendorInformation": {"provider": "Contoso EDR", "providerVersion": "3.2", "subProvider": "Behavior",
                          "vendor": "Contoso"},
    "vulnerabilityStates": [],
}

V2 = {
    "@odata.type": "#microsoft.graph.security.alert",
    "id": "da637578995287051192_756343937",
    "providerAlertId": "da637578995287051192_756343937",
    "incidentId": "28282",
    "status": "inProgress",
    "severity": "medium",
    "classification": "unknown",
    "determination": "unknown",
    "serviceSource": "microsoftDefenderForEndpoint",
    "detectionSource": "antivirus",
    "productName": "Microsoft Defender for Endpoint",
    "detectorId": "e0da400f-affd-43ef-b1d5-afc2eb6f2756",
    "tenantId": "b3c1b5fc-828c-45fa-a1e1-10d74f6d6e9c",
    "title": "Suspicious execution of hidden file",
    "description": "A hidden file has been launched. This activity could indicate a compromised host.",
    "recommendedActions": "Collect artifacts and determine scope\n- Review the machine timeline",
    "category": "DefenseEvasion",
    "assignedTo": None,
    "alertWebUrl": "https://security.microsoft.com/alerts/da637578995287051192_756343937",
    "incidentWebUrl": "https://security.microsoft.com/incidents/28282",
    "actorDisplayName": None,
    "threatDisplayName": None,
    "threatFamilyName": None,
    "mitreTechniques": ["T1564.001"],
    "createdDateTime": "2021-04-27T12:19:27.7211305Z",
    "lastUpdateDateTime": "2021-05-02T14:19:01.3266667Z",
    "resolvedDateTime": None,
    "firstActivityDateTime": "2021-04-26T07:45:50.116Z",
    "lastActivityDateTime": "2021-05-02T07:56:58.222Z",
    "comments": [],
    "evidence": [
        {"@odata.type": "#microsoft.graph.security.deviceEvidence",
         "createdDateTime": "2021-04-27T12:19:27.7211305Z", "verdict": "unknown", "remediationStatus": "none",
         "roles": [], "firstSeenDateTime": "2020-09-12T07:28:32.4321753Z",
         "mdeDeviceId": "73e7e2de709dff64ef64b1d0c30e67fab63279db", "azureAdDeviceId": None,
         "deviceDnsName": "tempDns", "osPlatform": "Windows10", "osBuild": 22424,
         "healthStatus": "active", "riskScore": "medium", "rbacGroupName": "UnassignedGroup",
         "ipInterfaces": ["10.1.2.3", "fe80::1c2d:3e4f:5a6b:7c8d"], "loggedOnUsers": []},
        {"@odata.type": "#microsoft.graph.security.fileEvidence", "verdict": "suspicious", "roles": [],
         "fileDetails": {"fileName": "MsSense.exe", "filePath": "C:\\Program Files\\temp",
                         "sha256": "ada3e3d4e7c7fa0e7bca7b8c4e34f2b1f1c0f1b67d6e2c9d6c6e5f8d6f0b9a1c"}},
        {"@odata.type": "#microsoft.graph.security.userEvidence", "verdict": "unknown",
         "roles": ["compromised"],
         "userAccount": {"accountName": "bob", "userPrincipalName": "bob@contoso.com"}},
    ],
    "systemTags": [],
}


def sniffers(data: bytes) -> set[str]:
    return {name for name, module in connectors.REGISTRY.items() if module.sniff(data[:65536])}


@pytest.mark.parametrize("body", [b'{"value": []}', b"[]",
                                  b'{"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#security/alerts",'
                                  b' "value": []}'])
def test_empty_documents_yield_nothing(body):
    assert parse_all("graph_alert", body) == []


def test_one_legacy_alert():
    [alert] = parse_all("graph_alert", json.dumps(LEGACY).encode())
    assert isinstance(alert, AlertRecord)
    assert alert.provider_id == LEGACY["id"]
    assert alert.title == "Suspicious encoded PowerShell command"
    assert (alert.severity, alert.status, alert.category) == ("high", "newAlert", "Malware")
    assert alert.description.startswith("A process launched an encoded PowerShell")
    assert alert.created == datetime(2024, 4, 2, 9, 21, 14, 34351, tzinfo=UTC)
    modified = datetime(2024, 4, 2, 10, 2, 40, 500000, tzinfo=UTC)
    assert alert.last_modified == alert.provider_timestamp == modified
    assert alert.recommended_actions == ["Isolate the host from the network", "Run a full antivirus scan"]
    assert alert.resource.fqdn == "web-01.contoso.com"
    assert alert.resource.netbios == "WEB-01"
    assert alert.resource.ipv4 == ["10.0.0.4", "20.51.10.7"]
    assert (alert.resource.os, alert.resource.kind) == ("Windows Server 2019", "host")
    assert alert.extra["vendorInformation"] == LEGACY["vendorInformation"]
    assert alert.extra["providerStatus"] == "newAlert"
    assert alert.extra["otherHosts"] == ["web-02.contoso.com"]
    assert alert.extra["users"] == ["alice@contoso.com"]
    assert alert.extra["eventDateTime"] == "2024-04-02T09:17:02+00:00"
    assert alert.extra["schema"] == "alert"


def test_one_v2_alert():
    [alert] = parse_all("graph_alert", json.dumps(V2).encode())
    assert alert.provider_id == "da637578995287051192_756343937"
    assert (alert.severity, alert.status, alert.category) == ("medium", "inProgress", "DefenseEvasion")
    assert alert.created == datetime(2021, 4, 27, 12, 19, 27, 721130, tzinfo=UTC)
    assert alert.last_modified == datetime(2021, 5, 2, 14, 19, 1, 326666, tzinfo=UTC)
    assert alert.recommended_actions == [V2["recommendedActions"]]
    assert alert.resource.hostname == "tempDns"
    assert alert.resource.agent_id == "73e7e2de709dff64ef64b1d0c30e67fab63279db"
    assert alert.resource.ipv4 == ["10.1.2.3"]
    assert alert.resource.ipv6 == ["fe80::1c2d:3e4f:5a6b:7c8d"]
    assert alert.resource.os == "Windows10"
    assert alert.extra["schema"] == "alerts_v2"
    assert alert.extra["serviceSource"] == "microsoftDefenderForEndpoint"
    assert alert.extra["mitreTechniques"] == ["T1564.001"]
    assert alert.extra["providerStatus"] == "inProgress"
    assert alert.extra["evidence"] == [
        {"type": "deviceEvidence", "name": "tempDns", "verdict": "unknown"},
        {"type": "fileEvidence", "name": "MsSense.exe", "verdict": "suspicious"},
        {"type": "userEvidence", "name": "bob@contoso.com", "verdict": "unknown", "roles": ["compromised"]},
    ]


def test_many_alerts_in_a_graph_list_response_and_a_bare_list():
    resolved = {**V2, "id": "v2-resolved", "status": "resolved", "severity": "unknown",
                "evidence": [{"@odata.type": "#microsoft.graph.security.azureResourceEvidence",
                              "resourceId": "/subscriptions/0000/resourceGroups/rg/providers/"
                                            "Microsoft.Compute/virtualMachines/vm-1",
                              "resourceName": "vm-1", "resourceType": "Virtual Machine"}]}
    new = {**V2, "id": "v2-new", "status": "new", "severity": "informational", "evidence": []}
    document = {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#security/alerts_v2",
                "value": [LEGACY, V2, resolved, new], "@odata.nextLink": None}
    alerts = parse_all("graph_alert", json.dumps(document).encode())
    assert [a.provider_id for a in alerts] == [LEGACY["id"], V2["id"], "v2-resolved", "v2-new"]
    assert [a.status for a in alerts] == ["newAlert", "inProgress", "resolved", "newAlert"]
    assert [a.severity for a in alerts] == ["high", "medium", "medium", "informational"]
    assert alerts[2].extra["severityOriginal"] == "unknown"
    assert alerts[2].resource.cloud_id.endswith("/virtualMachines/vm-1")
    assert alerts[3].resource is None
    assert parse_all("graph_alert", json.dumps(document["value"]).encode()) == alerts


def test_malformed_alerts_rejected_with_position():
    no_title = {k: v for k, v in V2.items() if k != "title"}
    bad_severity = {**LEGACY, "id": "bad-severity", "severity": "urgent"}
    bad_time = {**V2, "id": "bad-time", "createdDateTime": "27/04/2021"}
    alerts = parse_all("graph_alert", json.dumps({"value": [LEGACY, no_title, bad_severity, bad_time, V2]})
                       .encode())
    assert [type(a).__name__ for a in alerts] == ["AlertRecord", "Rejected", "Rejected", "Rejected",
                                                  "AlertRecord"]
    assert alerts[1] == Rejected(position="value[1]", reason="'title' is required (a non-empty string)",
                                 provider_id=V2["id"])
    assert "urgent" in alerts[2].reason
    assert "createdDateTime" in alerts[3].reason


def test_truncated_or_not_json_is_a_format_error():
    data = json.dumps({"value": [LEGACY, V2]}).encode()
    with pytest.raises(FormatError, match="not well-formed JSON after value\\[0\\]"):
        parse_all("graph_alert", data[:-200])
    with pytest.raises(FormatError, match="not JSON"):
        parse_all("graph_alert", b"id,title,severity\n")


def test_legacy_status_values_are_kept():
    changed = copy.deepcopy(LEGACY)
    changed["status"] = "resolved"
    [alert] = parse_all("graph_alert", json.dumps([changed]).encode())
    assert alert.status == "resolved"


@pytest.mark.parametrize("document", [LEGACY, V2, {"value": [LEGACY]}, [V2]])
def test_detect(document):
    assert connectors.detect(json.dumps(document).encode()) == "graph_alert"


def test_detect_legacy_alert_whose_vendor_information_is_beyond_the_head():
    big = {k: v for k, v in LEGACY.items() if k != "vendorInformation"}
    big["processes"] = [{"commandLine": "powershell -enc " + "A" * 70_000}]
    big["vendorInformation"] = LEGACY["vendorInformation"]
    data = json.dumps(big).encode()
    assert data.index(b'"vendorInformation"') > 65536
    assert connectors.detect(data[:65536]) == "graph_alert"
    [alert] = parse_all("graph_alert", data)
    assert alert.extra["vendorInformation"]["provider"] == "Contoso EDR"


def test_defender_endpoint_vulnerability_reports_are_not_alerts():
    for path in sorted((SAMPLES / "ms_defender_endpoint_json").glob("*.json")):
        assert "graph_alert" not in sniffers(path.read_bytes())


def test_sniff_ignores_other_formats():
    others = [p for p in SAMPLES.rglob("*") if p.is_file() and p.parent.name != "graph"]
    assert [p.name for p in others if graph_alert.sniff(p.read_bytes()[:65536])] == []


def test_the_documented_v2_example_keeps_its_v2_state():
    document = (SAMPLES / "graph" / "alert_v2_example.json").read_bytes()
    assert graph_alert.sniff(document)
    [alert] = parse_all("graph_alert", document)
    assert (alert.incident_id, alert.service_source, alert.detection_source) == (
        "28282", "microsoftDefenderForEndpoint", "antivirus")
    assert alert.mitre_techniques == ["T1564.001"] and alert.classification == "unknown"
    assert [e["@odata.type"].rsplit(".", 1)[-1] for e in alert.evidence] == [
        "deviceEvidence", "fileEvidence", "userEvidence"]
    assert alert.first_activity == datetime(2021, 4, 26, 7, 45, 50, 116000, tzinfo=UTC)
