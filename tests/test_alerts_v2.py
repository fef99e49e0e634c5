"""Alerts in Graph's security alert (v2) shape: /security/alerts_v2 on PostgreSQL and SQLite."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tests.test_workflow import graph_alerts, history, push

EXAMPLE = json.loads((Path(__file__).parent / "fixtures" / "graph" / "alert_v2_example.json").read_text())


def v2_url(tenant: str) -> str:
    return f"/api/v1/tenants/{tenant}/security/alerts_v2"


def listing(gw, tenant, headers, **args) -> list[dict]:
    response = gw.http.get(v2_url(tenant), headers=headers, query_string=args)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def pushed_example(gw, **changes):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant])
    push(gw, tenant, headers, json.dumps(EXAMPLE | changes).encode(), "graph_alert")
    [alert] = listing(gw, tenant, headers)
    return tenant, headers, alert


def test_the_documented_example_reads_back_in_the_v2_shape(gw):
    tenant, headers, alert = pushed_example(gw)
    for key in ("providerAlertId", "incidentId", "status", "severity", "classification", "determination",
                "serviceSource", "detectionSource", "productName", "detectorId", "title", "description",
                "recommendedActions", "category", "assignedTo", "alertWebUrl", "incidentWebUrl",
                "mitreTechniques", "comments", "actorDisplayName", "threatDisplayName"):
        assert alert[key] == EXAMPLE[key], key
    assert alert["tenantId"] == tenant  # our tenant, not the partner's directory
    for key in ("createdDateTime", "lastUpdateDateTime", "firstActivityDateTime", "lastActivityDateTime"):
        assert alert[key][:19] == EXAMPLE[key][:19], key
    assert alert["resolvedDateTime"] is None
    assert [e["@odata.type"] for e in alert["evidence"]] == [e["@odata.type"] for e in EXAMPLE["evidence"]]
    device = alert["evidence"][0]
    assert (device["deviceDnsName"], device["ipInterfaces"], device["roles"]) == ("tempDns", ["1.1.1.1"],
                                                                                 ["compromised"])
    one = gw.http.get(f"{v2_url(tenant)}/{alert['id']}", headers=headers)
    assert one.status_code == 200 and one.get_json() == alert
    # the legacy collection still serves the same alert
    legacy = gw.http.get(f"/api/v1/tenants/{tenant}/security/alerts/{alert['id']}",
                         headers=headers).get_json()
    assert legacy["title"] == EXAMPLE["title"] and legacy["status"] == "newAlert"
    assert legacy["vendorInformation"]["providerAlertId"] == EXAMPLE["id"]


def test_evidence_from_the_resource_of_a_legacy_alert(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant])
    body = json.loads(graph_alerts(count=1))
    body["value"][0]["hostStates"] = [{"fqdn": "web-1.contoso.com", "privateIpAddress": "10.0.0.4"}]
    push(gw, tenant, headers, json.dumps(body).encode(), "graph_alert")
    [alert] = listing(gw, tenant, headers)
    kinds = [e["@odata.type"].rsplit(".", 1)[-1] for e in alert["evidence"]]
    assert kinds == ["deviceEvidence", "ipEvidence"]
    device, ip = alert["evidence"]
    assert (device["deviceDnsName"], device["hostName"], device["ipInterfaces"]) == (
        "web-1.contoso.com", "web-1", ["10.0.0.4"])
    assert ip["ipAddress"] == "10.0.0.4" and ip["verdict"] == "unknown" and ip["remediationStatus"] == "none"
    assert alert["status"] == "new" and alert["severity"] == "high" and alert["classification"] == "unknown"
    assert alert["recommendedActions"] is None and alert["mitreTechniques"] == []


def test_patch_status_classification_determination_with_a_lifecycle_event(gw):
    tenant, headers, alert = pushed_example(gw)
    url = f"{v2_url(tenant)}/{alert['id']}"
    changed = gw.http.patch(url, json={"status": "resolved", "classification": "truePositive",
                                       "determination": "malware", "assignedTo": "secAdmin@contoso.com"},
                            headers=headers)
    assert changed.status_code == 200, changed.get_json()
    body = changed.get_json()
    assert (body["status"], body["classification"], body["determination"], body["assignedTo"]) == (
        "resolved", "truePositive", "malware", "secAdmin@contoso.com")
    assert body["resolvedDateTime"] and body["lastUpdateDateTime"] > alert["lastUpdateDateTime"]
    legacy_url = f"/api/v1/tenants/{tenant}/security/alerts/{alert['id']}"
    legacy = gw.http.get(legacy_url, headers=headers).get_json()
    assert (legacy["status"], legacy["feedback"]) == ("resolved", "truePositive")
    events = history(gw, legacy_url, headers)
    assert [e["event"] for e in events] == ["new", "edited"]
    assert events[-1]["details"] == {"status": "resolved", "classification": "truePositive",
                                     "determination": "malware", "assignedTo": "secAdmin@contoso.com"}
    # a legacy feedback edit shows as the v2 classification
    gw.http.patch(legacy_url, json={"feedback": "benignPositive", "status": "inProgress"}, headers=headers)
    again = gw.http.get(url, headers=headers).get_json()
    assert (again["classification"], again["status"], again["resolvedDateTime"]) == (
        "informationalExpectedActivity", "inProgress", None)
    for bad in ({"status": "newAlert"}, {"classification": "benignPositive"}, {"severity": "high"},
                {"title": "x"}, {}, {"determination": "nope"}):
        response = gw.http.patch(url, json=bad, headers=headers)
        assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalidBody", bad
    reader = gw.partner("Reader", [tenant], scopes="security.read")
    assert gw.http.patch(url, json={"status": "new"}, headers=reader).status_code == 403
    missing = gw.http.patch(f"{v2_url(tenant)}/999999", json={"status": "new"}, headers=headers)
    assert missing.status_code == 404


def test_comments_good_and_bad_shape(gw):
    tenant, headers, alert = pushed_example(gw)
    url = f"{v2_url(tenant)}/{alert['id']}/comments"
    good = {"@odata.type": "microsoft.graph.security.alertComment", "comment": "Demo for docs"}
    response = gw.http.post(url, json=good, headers=headers)
    assert response.status_code == 200, response.get_json()
    [comment] = response.get_json()["value"]
    assert comment["comment"] == "Demo for docs"
    assert comment["createdByDisplayName"] and comment["createdDateTime"]
    second = gw.http.post(url, json={"comment": "second"}, headers=headers).get_json()["value"]
    assert [c["comment"] for c in second] == ["Demo for docs", "second"]
    for bad in ({"text": "legacy shape"}, {"comment": ""}, ["x"], {"@odata.type": "other", "comment": "x"},
                {"comment": "x", "extra": 1}):
        answer = gw.http.post(url, json=bad, headers=headers)
        assert answer.status_code == 400, bad
        error = answer.get_json()["error"]
        assert error["code"] == "invalidBody" and "microsoft.graph.security.alertComment" in error["message"]
        assert error["details"]["expected"]["comment"]
    events = history(gw, f"/api/v1/tenants/{tenant}/security/alerts/{alert['id']}", headers)
    assert [e["event"] for e in events] == ["new", "edited", "edited"]
    reader = gw.partner("Reader", [tenant], scopes="security.read")
    assert gw.http.post(url, json=good, headers=reader).status_code == 403
    assert gw.http.post(f"{v2_url(tenant)}/999999/comments", json=good, headers=headers).status_code == 404


def test_last_update_never_moves_back(gw):
    tenant, headers, alert = pushed_example(gw)
    url = f"{v2_url(tenant)}/{alert['id']}"
    edited = gw.http.patch(url, json={"assignedTo": "sam"}, headers=headers).get_json()["lastUpdateDateTime"]
    # a newer provider version whose lastUpdateDateTime is before the customer's edit
    push(gw, tenant, headers, json.dumps(EXAMPLE | {"lastUpdateDateTime": "2021-06-01T00:00:00Z",
                                                    "severity": "medium"}).encode(), "graph_alert")
    after = gw.http.get(url, headers=headers).get_json()
    assert after["severity"] == "medium" and after["lastUpdateDateTime"] == edited
    assert after["assignedTo"] == "sam"
    # an older push is stale: nothing moves
    push(gw, tenant, headers, json.dumps(EXAMPLE | {"lastUpdateDateTime": "2021-05-01T00:00:00Z",
                                                    "severity": "high"}).encode(), "graph_alert")
    assert gw.http.get(url, headers=headers).get_json() == after


def test_filters_paging_and_tenant_isolation(gw):
    tenant, other = gw.tenant(), gw.tenant()
    headers = gw.partner("Contoso", [tenant, other])
    alerts = []
    for i, (severity, classification) in enumerate([("high", "truePositive"), ("high", "unknown"),
                                                    ("low", "falsePositive"), ("critical", None)]):
        item = copy.deepcopy(EXAMPLE) | {"id": f"a-{i}", "severity": severity}
        if classification:
            item["classification"] = classification
        else:
            item.pop("classification")
        alerts.append(item)
    alerts[3]["severity"] = "high"
    push(gw, tenant, headers, json.dumps({"value": alerts}).encode(), "graph_alert")
    push(gw, other, headers, json.dumps(EXAMPLE).encode(), "graph_alert")
    every = listing(gw, tenant, headers)
    assert len(every) == 4
    gw.http.patch(f"{v2_url(tenant)}/{every[1]['id']}", json={"status": "inProgress"}, headers=headers)

    def ids(expression):
        return [a["providerAlertId"] for a in listing(gw, tenant, headers, **{"$filter": expression})]

    assert ids("status eq 'new'") == ["a-0", "a-2", "a-3"]
    assert ids("severity eq 'high'") == ["a-0", "a-1", "a-3"]
    assert ids("classification eq 'truePositive'") == ["a-0"]
    assert ids("classification eq 'unknown' and status eq 'inProgress'") == ["a-1"]
    assert ids("mitreTechniques/any(t: t eq 'T1564.001')") == ["a-0", "a-1", "a-2", "a-3"]
    page = gw.http.get(v2_url(tenant), headers=headers, query_string={
        "$top": "2", "$count": "true", "$orderby": "severity desc", "$select": "id,severity"}).get_json()
    assert page["@odata.count"] == 4 and len(page["value"]) == 2
    assert set(page["value"][0]) == {"id", "severity"}
    rest = gw.http.get(page["@odata.nextLink"].split("localhost", 1)[1], headers=headers).get_json()
    assert [a["severity"] for a in page["value"] + rest["value"]] == ["high", "high", "high", "low"]
    assert gw.http.get(v2_url(tenant), headers=headers,
                       query_string={"$filter": "status eq 'newAlert'"}).status_code == 400

    [theirs] = listing(gw, other, headers)
    assert gw.http.get(f"{v2_url(tenant)}/{theirs['id']}", headers=headers).status_code == 404
    assert gw.http.patch(f"{v2_url(tenant)}/{theirs['id']}", json={"status": "resolved"},
                         headers=headers).status_code == 404
    assert gw.http.post(f"{v2_url(tenant)}/{theirs['id']}/comments", json={"comment": "x"},
                        headers=headers).status_code == 404
    assert gw.http.get(f"{v2_url(other)}/{theirs['id']}", headers=headers).get_json()["status"] == "new"
    outsider = gw.partner("Outsider", [other])
    assert gw.http.get(v2_url(tenant), headers=outsider).status_code in (403, 404)
