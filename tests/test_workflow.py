"""Workflow edits (DESIGN rules 3 and 5): alert PATCH, bulk PATCH, history, and re-pushes that keep them."""

from __future__ import annotations

import json

from tests.factories import document, finding
from tests.test_odata import alerts_url, fetch_all, seed_alerts


def graph_alerts(severity: str = "high", modified: str = "2024-04-01T11:00:00Z",
                 title: str = "Suspicious sign-in",
                 count: int = 3) -> bytes:
    return json.dumps({"value": [{
        "id": f"alert-{i}", "title": f"{title} {i}", "severity": severity, "status": "newAlert",
        "category": "CredentialAccess", "createdDateTime": "2024-04-01T10:00:00Z",
        "lastModifiedDateTime": modified,
        "hostStates": [{"fqdn": "web-1.contoso.com"}], "vendorInformation": {"provider": "Contoso",
                                                                             "vendor": "C"},
    } for i in range(count)]}).encode()


def push(gw, tenant: str, headers: dict, body: bytes, fmt: str) -> None:
    response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format={fmt}", data=body,
                            headers=headers | {"Content-Type": "application/json"})
    assert response.status_code == 202, response.get_json()
    batch = gw.http.get(response.get_json()["statusUrl"].split("localhost", 1)[1], headers=headers).get_json()
    assert batch["status"] == "succeeded", batch


def history(gw, url: str, headers: dict) -> list[dict]:
    response = gw.http.get(url + "/history", headers=headers)
    assert response.status_code == 200
    return response.get_json()["value"]


def test_alert_patch_records_who_and_when_and_survives_a_repush(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant])
    push(gw, tenant, headers, graph_alerts(), "graph_alert")
    alert = fetch_all(gw, tenant, headers, **{"$filter": "title eq 'Suspicious sign-in 0'"})[0]
    url = f"{alerts_url(tenant)}/{alert['id']}"

    changed = gw.http.patch(url, json={"status": "inProgress", "assignedTo": "sam", "tags": ["p1"],
                                       "comments": [{"text": "looking"}]}, headers=headers)
    assert changed.status_code == 204 and changed.get_data() == b"" and "Content-Type" not in changed.headers
    resolved = gw.http.patch(url, json={"status": "resolved", "feedback": "truePositive",
                                        "comments": [{"text": "contained"}]},
                             headers=headers | {"Prefer": "return=representation"})
    assert resolved.status_code == 200
    body = resolved.get_json()
    assert body["status"] == "resolved" and body["feedback"] == "truePositive" and body["assignedTo"] == "sam"
    assert [c["text"] for c in body["comments"]] == ["looking", "contained"]  # comments are appended
    assert all(c["by"] and c["at"] for c in body["comments"]) and body["tags"] == ["p1"]
    assert body["closedDateTime"] and body["lastModifiedDateTime"] > alert["lastModifiedDateTime"]
    edits = [e for e in history(gw, url, headers) if e["event"] == "edited"]
    assert [e["details"].get("status") for e in edits] == ["inProgress", "resolved"]
    assert all(e["actor"] and e["at"] and e["cause"] == "customer edit" for e in edits)

    # The provider pushes a newer version: its fields change, the customer's stay.
    push(gw, tenant, headers, graph_alerts(severity="critical", modified="2024-05-01T00:00:00Z",
                                           title="Renamed"),
         "graph_alert")
    after = gw.http.get(url, headers=headers).get_json()
    assert after["severity"] == "critical" and after["title"] == "Renamed 0"
    for name in ("status", "feedback", "assignedTo", "comments", "tags", "closedDateTime"):
        assert after[name] == body[name], name
    assert [e["event"] for e in history(gw, url, headers)] == ["new", "edited", "edited", "updated"]

    reopened = gw.http.patch(url, json={"status": "inProgress"},
                             headers=headers | {"Prefer": "return=representation"})
    assert reopened.get_json()["closedDateTime"] is None
    for bad in ({"status": "closed"}, {"feedback": "maybe"}, {"comments": "text"}, {"severity": "low"}, {},
                {"closedDateTime": "2024-01-01T00:00:00"}):
        response = gw.http.patch(url, json=bad, headers=headers)
        assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalidBody", bad
    assert gw.http.patch(f"{alerts_url(tenant)}/999999", json={"status": "resolved"},
                         headers=headers).status_code == 404


def test_bulk_patch_updates_every_match_with_one_event_each(gw):
    tenant, other = gw.tenant(), gw.tenant()
    headers = gw.partner("Qualys", [tenant, other])
    mine = seed_alerts(gw.db, tenant, 30)
    seed_alerts(gw.db, other, 30, start=100)
    target = "severity ge 'high' and status ne 'resolved'"
    expected = {int(a["id"]) for a in fetch_all(gw, tenant, headers, **{"$filter": target})}
    assert expected
    response = gw.http.patch(alerts_url(tenant), query_string={"$filter": target},
                             json={"status": "inProgress", "assignedTo": "soc",
                                   "comments": [{"text": "triage"}]},
                             headers=headers)
    assert response.status_code == 200 and response.get_json() == {"updated": len(expected)}
    for alert in fetch_all(gw, tenant, headers):
        url = f"{alerts_url(tenant)}/{alert['id']}"
        if int(alert["id"]) in expected:
            assert alert["status"] == "inProgress" and alert["assignedTo"] == "soc"
            assert [c["text"] for c in alert["comments"]] == ["triage"]
            assert [e["event"] for e in history(gw, url, headers)] == ["edited"]
        else:
            assert alert["assignedTo"] != "soc" and history(gw, url, headers) == []
    assert all(a["assignedTo"] != "soc" for a in fetch_all(gw, other, headers))
    assert len(mine) == 30

    nothing = gw.http.patch(alerts_url(tenant), json={"status": "resolved"}, headers=headers)
    assert nothing.status_code == 400 and "$filter" in nothing.get_json()["error"]["message"]
    assert gw.http.patch(alerts_url(tenant), query_string={"$filter": "bogus eq 1"},
                         json={"status": "resolved"},
                         headers=headers).status_code == 400
    none = gw.http.patch(alerts_url(tenant), query_string={"$filter": "title eq 'no such title'"},
                         json={"status": "resolved"}, headers=headers)
    assert none.get_json() == {"updated": 0}
    reader = gw.partner("Reader", [tenant], scopes="security.read")
    assert gw.http.patch(alerts_url(tenant), query_string={"$filter": target}, json={"status": "resolved"},
                         headers=reader).status_code == 403


def test_finding_and_recommendation_workflow_with_history_and_bulk(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    push(gw, tenant, headers, document([finding("q-1"), finding("q-2", cves=["CVE-2023-4863"],
                                                                severity="low")]),
         "canonical")
    base = f"/api/v1/tenants/{tenant}/security"
    bulk = gw.http.patch(f"{base}/findings", query_string={"$filter": "severity eq 'low'"},
                         json={"statusOverride": "riskAccepted", "assignedTo": "alice", "tags": ["pci"],
                               "comments": [{"text": "accepted until Q3"}]}, headers=headers)
    assert bulk.get_json() == {"updated": 1}
    rows = {r["correlationKey"]: r for r in gw.http.get(f"{base}/findings",
                                                        headers=headers).get_json()["value"]}
    low = rows["CVE-2023-4863"]
    assert (low["statusOverride"], low["assignedTo"], low["tags"]) == ("riskAccepted", "alice", ["pci"])
    assert low["updatedAt"] > rows["CVE-2024-3094"]["updatedAt"]
    assert rows["CVE-2024-3094"]["assignedTo"] is None
    events = history(gw, f"{base}/findings/{low['id']}", headers)
    assert [e["event"] for e in events] == ["new", "edited"]
    assert events[1]["details"]["statusOverride"] == "riskAccepted"

    push(gw, tenant, headers, document([finding("q-2", cves=["CVE-2023-4863"], severity="high",
                                                ts="2024-06-01T00:00:00Z")]), "canonical")
    again = gw.http.get(f"{base}/findings/{low['id']}", headers=headers).get_json()
    assert again["severity"] == "high" and again["statusOverride"] == "riskAccepted"
    assert again["tags"] == ["pci"]
    assert [c["text"] for c in again["comments"]] == ["accepted until Q3"]

    [rec] = gw.http.get(f"{base}/recommendations", headers=headers).get_json()["value"]
    edited = gw.http.patch(f"{base}/recommendations/{rec['id']}", json={"assignedTo": "bob"},
                           headers=headers | {"Prefer": "return=representation"})
    assert edited.status_code == 200 and edited.get_json()["assignedTo"] == "bob"
    assert history(gw, f"{base}/recommendations/{rec['id']}", headers)[-1]["details"] == {"assignedTo": "bob"}
    assert gw.http.patch(f"{base}/resources/1", json={"tags": ["x"]}, headers=headers).status_code == 405
