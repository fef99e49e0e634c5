"""Alert suppression rules (gateway/suppression.py): pushes through the real pipeline on PostgreSQL and
SQLite (and a real worker), apply-to-existing with its dry run, the scope matrix, bad bodies, OData."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from connectors import graph_alert, ocsf
from gateway import suppression
from gateway.cli import main as cli_main
from gateway.models import utcnow
from tests.conftest import wait_for
from tests.connectors.test_graph_alert import LEGACY
from tests.connectors.test_ocsf import THREAT
from tests.test_workflow import graph_alerts

SCOPES = "findings.write alerts.write security.read alerts.manage posture.manage"
V2_EXAMPLE = json.loads((Path(__file__).parent / "fixtures" / "graph" / "alert_v2_example.json").read_text())
SHA256 = "8963A19FB992AD9A76576C5638FD68292CFFB9AAAC29EB8285F9ABF6196A7DEC"

# A legacy Graph alert with the entity states the connector keeps for rules
LEGACY_ALERT = copy.deepcopy(LEGACY) | {
    "id": "legacy-enc-web-7",
    "hostStates": [{"fqdn": "web-7.contoso.com", "netBiosName": "WEB-7", "privateIpAddress": "10.0.0.7"}],
    "processes": [{"name": "powershell.exe", "commandLine": "powershell.exe -NoP -Enc SQBFAFgA",
                   "path": "C:\\Windows\\System32\\WindowsPowerShell\\v1.0\\powershell.exe",
                   "fileHash": {"hashType": "sha256", "hashValue": SHA256.lower()}}],
    "fileStates": [{"name": "loader.ps1", "path": "C:\\Users\\alice\\AppData\\loader.ps1",
                    "fileHash": {"hashType": "md5", "hashValue": "0CC175B9C0F1B6A831C399E269772661"}}],
    "networkConnections": [{"destinationAddress": "203.0.113.9", "destinationDomain": "cdn.evil.example"}],
}
# an OCSF Detection Finding with evidence artifacts (OCSF 1.1)
EVIDENCES = [{"process": {"name": "xmrig", "cmd_line": "/tmp/xmrig -o pool.minexmr.com:443",
                          "file": {"name": "xmrig", "path": "/tmp/xmrig",
                                   "hashes": [{"algorithm_id": 3, "value": SHA256}]},
                          "user": {"name": "ec2-user"}},
              "dst_endpoint": {"ip": "198.51.100.7", "hostname": "pool.minexmr.com"}}]
OCSF_MINER = THREAT | {"evidences": EVIDENCES}
OCSF_OTHER_HOST = THREAT | {"evidences": EVIDENCES,
                            "finding_info": THREAT["finding_info"] | {"uid": "gd-7f2b"},
                            "device": {"hostname": "ip-10-0-0-6.ec2.internal", "ip": "10.0.0.6",
                                       "instance_uid": "arn:aws:ec2:us-east-1:123456789012:instance/i-0abd"}}


def rules_url(tenant: str) -> str:
    return f"/api/v1/tenants/{tenant}/security/alertSuppressionRules"


def security(tenant: str, name: str) -> str:
    return f"/api/v1/tenants/{tenant}/security/{name}"


def setup(gw, scopes: str = SCOPES) -> tuple[str, dict]:
    tenant = gw.tenant()
    return tenant, gw.partner("Contoso", [tenant], scopes=scopes)


def create(gw, tenant: str, headers: dict, query: str = "", **body) -> dict:
    response = gw.http.post(rules_url(tenant) + query, json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def push(gw, tenant: str, headers: dict, document, fmt: str) -> dict:
    response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format={fmt}",
                            data=document if isinstance(document, bytes) else json.dumps(document).encode(),
                            headers=headers | {"Content-Type": "application/json"})
    assert response.status_code == 202, response.get_json()
    batch = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{response.get_json()['id']}", headers=headers)
    return batch.get_json()


def listing(gw, tenant: str, headers: dict, name: str = "alerts_v2", **query) -> list[dict]:
    response = gw.http.get(security(tenant, name), headers=headers, query_string=query | {"$top": "1000"})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def by_provider_id(gw, tenant, headers) -> dict[str, dict]:
    return {alert["providerAlertId"]: alert for alert in listing(gw, tenant, headers)}


def history(gw, tenant: str, headers: dict, alert_id: str) -> list[dict]:
    response = gw.http.get(f"{security(tenant, 'alerts')}/{alert_id}/history", headers=headers)
    assert response.status_code == 200
    return response.get_json()["value"]


# -- matching, as a pure function ---------------------------------------------------------------


def _row(record, identifiers=()) -> dict:
    """An alert row as the merge inserts it, from a connector's AlertRecord."""
    return {"title": record.title, "category": record.category, "severity": record.severity,
            "provider": "Contoso", "extra": json.loads(json.dumps(record.extra)),
            "evidence": record.evidence, "detection_source": record.detection_source,
            "service_source": record.service_source, "resource_identifiers": list(identifiers)}


def _rule(alert_type: str = "*", *conditions: tuple[str, str, object]) -> suppression.Rule:
    return suppression.Rule.from_row({"id": 1, "name": "r", "reason": "Other", "alert_type": alert_type,
                                      "conditions": [{"field": f, "operator": o, "value": v}
                                                     for f, o, v in conditions]})


def test_alert_entities_of_a_legacy_graph_alert():
    record = graph_alert.to_record(LEGACY_ALERT)
    entities = suppression.alert_entities(_row(record))
    assert entities["entities.host.hostname"] == {"web-7"}
    assert entities["entities.host.fqdn"] == {"web-7.contoso.com"}
    assert entities["entities.ip.address"] == {"10.0.0.7", "203.0.113.9"}
    assert {"alice", "contoso\\alice", "alice@contoso.com"} <= entities["entities.account.name"]
    assert entities["entities.process.name"] == {"powershell.exe"}
    assert entities["entities.process.commandline"] == {"powershell.exe -nop -enc sqbfafga"}
    assert entities["entities.file.hash"] == {SHA256.lower(), "0cc175b9c0f1b6a831c399e269772661"}
    assert entities["entities.file.name"] == {"loader.ps1"}
    assert entities["entities.dns.domainname"] == {"cdn.evil.example"}
    assert entities["alert.productName"] == {"contoso edr"}  # vendorInformation.provider
    assert suppression.alert_types(_row(record)) == {"malware", "suspicious encoded powershell command"}


def test_alert_entities_of_a_graph_v2_alert_and_its_resource():
    record = graph_alert.to_record(V2_EXAMPLE)
    resource = [("ipv4", "10.9.9.9%vpc-1"), ("fqdn", "tempdns.corp")]
    entities = suppression.alert_entities(_row(record, resource))
    assert entities["entities.host.hostname"] == {"tempdns"}
    assert entities["entities.host.fqdn"] == {"tempdns.corp"}  # the resource's
    assert entities["entities.ip.address"] == {"1.1.1.1", "10.9.9.9"}  # the scope is not part of it
    assert entities["entities.file.hash"] == {SHA256.lower(), "5f1e8acedc065031aad553b710838eb366cfee9a"}
    assert entities["entities.file.path"] == {"c:\\program files\\temp"}
    accounts = entities["entities.account.name"]
    assert {"identitytest", "domain\\identitytest", "testuser@contoso.com"} <= accounts
    vm = V2_EXAMPLE["evidence"][0]["vmMetadata"]["resourceId"]
    assert entities["entities.cloudresource.id"] == {vm.lower()}
    assert entities["alert.detectionSource"] == {"antivirus"}
    assert "e0da400f-affd-43ef-b1d5-afc2eb6f2756" in suppression.alert_types(_row(record))  # detectorId


def test_alert_entities_of_an_ocsf_detection():
    record = ocsf.to_record(OCSF_MINER)
    entities = suppression.alert_entities(_row(record))
    assert entities["entities.process.name"] == {"xmrig"}
    assert entities["entities.process.commandline"] == {"/tmp/xmrig -o pool.minexmr.com:443"}
    assert entities["entities.file.hash"] == {SHA256.lower()}
    assert entities["entities.account.name"] == {"ec2-user"}
    assert entities["entities.ip.address"] == {"198.51.100.7"}
    assert entities["entities.dns.domainname"] == {"pool.minexmr.com"}
    assert suppression.alert_types(_row(record)) >= {"cryptocurrency:ec2/bitcointool.b!dns"}


def test_matches_all_of_the_conditions_ignoring_case_and_ip_spelling():
    row = _row(graph_alert.to_record(LEGACY_ALERT), [("ipv6", "FE80:0:0:0::1")])
    assert suppression.matches(_rule("MALWARE", ("entities.host.hostname", "equals", "Web-7")), row)
    assert suppression.matches(_rule("*", ("entities.ip.address", "in", ["192.0.2.1", "fe80::1"]),
                                     ("entities.process.commandline", "contains", "-ENC ")), row)
    assert not suppression.matches(_rule("*", ("entities.ip.address", "in", ["fe80::1"]),
                                         ("entities.process.commandline", "contains", "-ENCODED")), row)
    other_type = _rule("DefenseEvasion", ("entities.host.hostname", "equals", "web-7"))
    assert not suppression.matches(other_type, row)
    # a field the alert has no value for fails its condition
    assert not suppression.matches(_rule("*", ("entities.url.url", "contains", "http")), row)
    assert suppression.matches(_rule("Malware"), row)  # a type with no conditions: every alert of it


# -- pushes -------------------------------------------------------------------------------------


def _rules_for_the_three_shapes(gw, tenant, headers) -> tuple[dict, dict, dict]:
    graph = create(gw, tenant, headers, name="encoded-powershell-on-web-7", alertType="malware",
                   reason="FalsePositive", suppressionAlertsScope={"allOf": [
                       {"field": "entities.host.hostname", "equals": "WEB-7"},
                       {"field": "entities.process.commandline", "contains": "-enc"}]})
    miner = create(gw, tenant, headers, name="miner-lab", alertType="cryptocurrency:ec2/bitcointool.b!dns",
                   reason="BenignPositive", suppressionAlertsScope={"allOf": [
                       {"field": "entities.ip.address", "in": ["10.0.0.5", "10.0.0.50"]},
                       {"field": "entities.file.hash", "equals": SHA256},
                       {"field": "entities.dns.domainname", "contains": "minexmr"}]})
    test_user = create(gw, tenant, headers, name="test-user", alertType="*", reason="ValidActivity",
                       suppressionAlertsScope={"allOf": [
                           {"field": "entities.account.name", "equals": "testUser@contoso.com"}]})
    return graph, miner, test_user


def _assert_suppressed(gw, tenant, headers, alert: dict, rule: dict, batch_id: str) -> None:
    assert (alert["status"], alert["suppressedBy"]) == ("resolved", rule["id"])
    assert alert["resolvedDateTime"]
    legacy = gw.http.get(f"{security(tenant, 'alerts')}/{alert['id']}", headers=headers).get_json()
    assert (legacy["status"], legacy["suppressedBy"]) == ("resolved", rule["id"]) and legacy["closedDateTime"]
    events = history(gw, tenant, headers, alert["id"])
    assert [e["event"] for e in events] == ["new", "suppressed"]
    assert events[1]["cause"] == f"suppression rule {rule['id']} ({rule['name']})"
    assert events[1]["batchId"] == batch_id
    assert events[1]["details"] == {"ruleId": rule["id"], "ruleName": rule["name"], "reason": rule["reason"],
                                    "existingAlert": False}


def test_matching_graph_and_ocsf_alerts_land_suppressed_and_the_others_do_not(gw):
    tenant, headers = setup(gw)
    graph, miner, test_user = _rules_for_the_three_shapes(gw, tenant, headers)
    web_8 = copy.deepcopy(LEGACY_ALERT) | {"id": "legacy-enc-web-8",
                                           "hostStates": [{"fqdn": "web-8.contoso.com"}]}
    legacy_batch = push(gw, tenant, headers, {"value": [LEGACY_ALERT, web_8]}, "graph_alert")
    ocsf_batch = push(gw, tenant, headers, [OCSF_MINER, OCSF_OTHER_HOST], "ocsf")
    v2_batch = push(gw, tenant, headers, V2_EXAMPLE, "graph_alert")
    assert [b["counts"]["suppressed"] for b in (legacy_batch, ocsf_batch, v2_batch)] == [1, 1, 1]
    assert [b["counts"]["created"] for b in (legacy_batch, ocsf_batch, v2_batch)] == [2, 2, 1]

    alerts = by_provider_id(gw, tenant, headers)
    _assert_suppressed(gw, tenant, headers, alerts["legacy-enc-web-7"], graph, legacy_batch["id"])
    _assert_suppressed(gw, tenant, headers, alerts["gd-7f2a"], miner, ocsf_batch["id"])
    _assert_suppressed(gw, tenant, headers, alerts[V2_EXAMPLE["id"]], test_user, v2_batch["id"])
    for provider_id in ("legacy-enc-web-8", "gd-7f2b"):  # another host: not suppressed
        assert (alerts[provider_id]["status"], alerts[provider_id]["suppressedBy"]) == ("new", None)
        assert [e["event"] for e in history(gw, tenant, headers, alerts[provider_id]["id"])] == ["new"]
    # suppressed alerts stay queryable, in both shapes
    suppressed = {a["providerAlertId"]
                  for a in listing(gw, tenant, headers, **{"$filter": "suppressedBy ne null"})}
    assert suppressed == {"legacy-enc-web-7", "gd-7f2a", V2_EXAMPLE["id"]}
    legacy = listing(gw, tenant, headers, "alerts", **{"$filter": f"suppressedBy eq '{miner['id']}'"})
    assert [a["vendorInformation"]["providerAlertId"] for a in legacy] == ["gd-7f2a"]
    assert len(listing(gw, tenant, headers, "alerts", **{"$filter": "suppressedBy eq null"})) == 2


def test_an_update_of_a_stored_alert_is_not_suppressed(gw):
    tenant, headers = setup(gw)
    push(gw, tenant, headers, graph_alerts(count=1), "graph_alert")
    create(gw, tenant, headers, name="sign-ins", alertType="CredentialAccess", reason="Other")
    newer = graph_alerts(count=2, severity="medium", modified="2024-04-02T00:00:00Z")
    counts = push(gw, tenant, headers, newer, "graph_alert")["counts"]
    assert (counts["updated"], counts["created"], counts["suppressed"]) == (1, 1, 1)
    alerts = by_provider_id(gw, tenant, headers)
    assert (alerts["alert-0"]["status"], alerts["alert-0"]["suppressedBy"]) == ("new", None)
    assert alerts["alert-0"]["severity"] == "medium"
    assert alerts["alert-1"]["status"] == "resolved" and alerts["alert-1"]["suppressedBy"]


def test_disabled_and_expired_rules_do_not_suppress(gw, monkeypatch):
    tenant, headers = setup(gw)
    now = utcnow()
    create(gw, tenant, headers, name="disabled", alertType="CredentialAccess", reason="Other",
           state="Disabled")
    expiring = create(gw, tenant, headers, name="expiring", alertType="*", reason="Other",
                      expirationDateUtc=(now + timedelta(days=1)).isoformat(),
                      suppressionAlertsScope={"allOf": [{"field": "alert.title", "contains": "sign-in"}]})
    assert expiring["state"] == "Enabled"
    monkeypatch.setattr(suppression, "clock", lambda: now + timedelta(days=2))
    states = {r["name"]: r["state"] for r in listing(gw, tenant, headers, "alertSuppressionRules")}
    assert states == {"disabled": "Disabled", "expiring": "Expired"}
    expired = listing(gw, tenant, headers, "alertSuppressionRules", **{"$filter": "state eq 'Expired'"})
    assert [r["name"] for r in expired] == ["expiring"]
    batch = push(gw, tenant, headers, graph_alerts(count=2), "graph_alert")
    assert batch["counts"]["suppressed"] == 0
    assert {a["status"] for a in listing(gw, tenant, headers)} == {"new"}
    apply = gw.http.post(f"{rules_url(tenant)}/{expiring['id']}/apply", headers=headers)
    assert apply.status_code == 409 and "Expired" in apply.get_json()["error"]["message"]
    # the same rule before its expiry suppresses the next push's new alerts
    monkeypatch.setattr(suppression, "clock", lambda: now)
    later = json.loads(graph_alerts(count=3, title="Another sign-in"))
    for alert in later["value"]:
        alert["id"] = "later-" + alert["id"]
    batch = push(gw, tenant, headers, later, "graph_alert")
    assert batch["counts"]["suppressed"] == 3
    suppressed = listing(gw, tenant, headers, **{"$filter": "suppressedBy ne null"})
    assert {a["suppressedBy"] for a in suppressed} == {expiring["id"]}


# -- applying to existing alerts -----------------------------------------------------------------


def _statuses(gw, tenant, headers) -> dict[str, tuple]:
    return {a["providerAlertId"]: (a["status"], a["suppressedBy"], a["resolvedDateTime"])
            for a in listing(gw, tenant, headers)}


def test_apply_to_existing_counts_first_then_suppresses_exactly_that_many(gw, monkeypatch):
    monkeypatch.setattr(suppression, "APPLY_BATCH", 2)  # several keyset batches
    tenant, headers = setup(gw)
    push(gw, tenant, headers, graph_alerts(count=7), "graph_alert")
    other_host = json.loads(graph_alerts(count=1))
    other_host["value"][0] |= {"id": "elsewhere", "hostStates": [{"fqdn": "db-1.contoso.com"}]}
    push(gw, tenant, headers, other_host, "graph_alert")
    closed = by_provider_id(gw, tenant, headers)["alert-3"]["id"]  # resolved by the customer: not open
    assert gw.http.patch(f"{security(tenant, 'alerts_v2')}/{closed}", json={"status": "resolved"},
                         headers=headers).status_code == 200
    before = _statuses(gw, tenant, headers)
    body = {"name": "web-1-sign-ins", "alertType": "CredentialAccess", "reason": "FalsePositive",
            "suppressionAlertsScope": {"allOf": [
                {"field": "entities.host.fqdn", "equals": "WEB-1.contoso.com"}]}}

    dry = gw.http.post(rules_url(tenant) + "?dryRun=true&applyToExisting=true", json=body, headers=headers)
    assert dry.status_code == 200
    assert dry.get_json() == {"ruleId": None, "dryRun": True, "appliedAlertCount": 6}
    assert _statuses(gw, tenant, headers) == before  # nothing changed
    assert listing(gw, tenant, headers, "alertSuppressionRules") == []  # nothing created

    rule = create(gw, tenant, headers, "?applyToExisting=true", **body)
    assert rule["appliedAlertCount"] == 6
    after = _statuses(gw, tenant, headers)
    suppressed = sorted(pid for pid, (status, by, _) in after.items() if by == rule["id"])
    assert suppressed == sorted(f"alert-{i}" for i in range(7) if i != 3)
    assert all(after[pid][0] == "resolved" and after[pid][2] for pid in suppressed)
    assert after["alert-3"] == before["alert-3"] and after["elsewhere"] == before["elsewhere"]
    events = history(gw, tenant, headers, by_provider_id(gw, tenant, headers)["alert-0"]["id"])
    assert [e["event"] for e in events] == ["new", "suppressed"]
    assert events[1]["details"]["existingAlert"] is True
    assert events[1]["actor"] and events[1]["batchId"] is None

    again = gw.http.post(f"{rules_url(tenant)}/{rule['id']}/apply?dryRun=true", headers=headers).get_json()
    assert again == {"ruleId": rule["id"], "dryRun": True, "appliedAlertCount": 0}
    # a rule that matches nothing is accepted: it applies to no alert
    nothing = create(gw, tenant, headers, "?applyToExisting=true", name="nothing", alertType="NoSuchType",
                     reason="Other")
    assert nothing["appliedAlertCount"] == 0
    # a later apply of an existing rule: dry run, then the same number
    push(gw, tenant, headers, graph_alerts(count=9), "graph_alert")  # alert-7, alert-8: new and suppressed
    reopened = gw.http.patch(f"{security(tenant, 'alerts_v2')}/{closed}", json={"status": "inProgress"},
                             headers=headers)
    assert reopened.status_code == 200
    counted = gw.http.post(f"{rules_url(tenant)}/{rule['id']}/apply?dryRun=true", headers=headers).get_json()
    applied = gw.http.post(f"{rules_url(tenant)}/{rule['id']}/apply", headers=headers).get_json()
    assert counted["appliedAlertCount"] == applied["appliedAlertCount"] == 1
    assert _statuses(gw, tenant, headers)["alert-3"][:2] == ("resolved", rule["id"])


# -- the API: scopes, tenants, bodies, OData --------------------------------------------------------


def test_every_write_needs_posture_manage_and_other_tenants_rules_are_404(gw):
    tenant, headers = setup(gw)
    rule = create(gw, tenant, headers, name="r1", alertType="X", reason="Other")
    item = f"{rules_url(tenant)}/{rule['id']}"
    reader = gw.partner("Reader", [tenant], scopes="security.read alerts.manage admin")
    body = {"name": "r2", "alertType": "X", "reason": "Other"}
    writes = [("POST", rules_url(tenant), body), ("POST", rules_url(tenant) + "?dryRun=true", body),
              ("PATCH", item, {"state": "Disabled"}), ("DELETE", item, None), ("POST", item + "/apply", None),
              ("POST", item + "/apply?dryRun=true", None)]
    for method, url, payload in writes:
        response = gw.http.open(url, method=method, json=payload, headers=reader)
        assert response.status_code == 403, (method, url)
        assert response.get_json()["error"]["code"] == "insufficientScope"
    assert gw.http.get(item, headers=reader).get_json()["name"] == "r1"
    assert [r["id"] for r in listing(gw, tenant, reader, "alertSuppressionRules")] == [rule["id"]]

    other, other_headers = setup(gw)  # a client of another tenant, with every scope
    for method, url, payload in [("GET", f"{rules_url(other)}/{rule['id']}", None)] + [
            (m, u.replace(tenant, other), p) for m, u, p in writes[2:]]:
        response = gw.http.open(url, method=method, json=payload, headers=other_headers)
        assert response.status_code == 404, (method, url)
    assert gw.http.get(item, headers=other_headers).status_code == 404  # not enabled for the tenant
    assert gw.http.post(rules_url(tenant), json=body, headers=other_headers).status_code == 404
    assert listing(gw, other, other_headers, "alertSuppressionRules") == []
    assert gw.http.get(item, headers=headers).get_json()["state"] == "Enabled"  # untouched


GOOD = {"name": "ok", "alertType": "Malware", "reason": "FalsePositive"}


@pytest.mark.parametrize(("body", "path"), [
    (GOOD | {"suppressionAlertsScope": {"allOf": [{"field": "alert.title", "startsWith": "x"}]}},
     "suppressionAlertsScope.allOf[0]"),
    (GOOD | {"suppressionAlertsScope": {"allOf": [{"field": "entities.nope", "equals": "x"}]}},
     "suppressionAlertsScope.allOf[0].field"),
    (GOOD | {"suppressionAlertsScope": {"allOf": [{"field": {}, "contains": "x"}]}},
     "suppressionAlertsScope.allOf[0].field"),
    (GOOD | {"suppressionAlertsScope": {"allOf": [{"field": "alert.title", "equals": "a", "in": ["b"]}]}},
     "suppressionAlertsScope.allOf[0]"),
    (GOOD | {"suppressionAlertsScope": {"allOf": [{"field": "alert.title", "in": []}]}},
     "suppressionAlertsScope.allOf[0].in"),
    (GOOD | {"suppressionAlertsScope": {"allOf": [{"field": "alert.title", "in": ["a", 7]}]}},
     "suppressionAlertsScope.allOf[0].in[1]"),
    (GOOD | {"suppressionAlertsScope": {"allOf": [{"field": "entities.ip.address", "equals": "10.0.0.x"}]}},
     "suppressionAlertsScope.allOf[0].equals"),
    (GOOD | {"suppressionAlertsScope": {"allOf": "entities.ip.address"}}, "suppressionAlertsScope.allOf"),
    (GOOD | {"alertType": "*"}, "suppressionAlertsScope.allOf"),
    (GOOD | {"reason": "NotInteresting"}, "reason"),
    (GOOD | {"state": "Expired"}, "state"),
    (GOOD | {"expirationDateUtc": "2020-01-01T00:00:00Z"}, "expirationDateUtc"),
    (GOOD | {"expirationDateUtc": "2099-01-01T00:00:00"}, "expirationDateUtc"),
    (GOOD | {"name": "has spaces"}, "name"),
    (GOOD | {"name": "rùle"}, "name"),
    (GOOD | {"alertType": "  "}, "alertType"),
    (GOOD | {"severity": "high"}, "severity"),
    ({"alertType": "Malware", "reason": "Other"}, "name"),
    (["not", "an", "object"], "body"),
])
def test_a_bad_body_is_400_naming_the_field(gw, body, path):
    tenant, headers = setup(gw)
    response = gw.http.post(rules_url(tenant), json=body, headers=headers)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalidBody" and path in error["details"] and f"{path}:" in error["message"]
    assert listing(gw, tenant, headers, "alertSuppressionRules") == []


def test_patch_checks_the_whole_rule_and_names_are_unique(gw):
    tenant, headers = setup(gw)
    rule = create(gw, tenant, headers, name="any-lab", alertType="*", reason="Other", comment="lab",
                  suppressionAlertsScope={"allOf": [{"field": "entities.host.hostname", "in": ["lab-1"]}]})
    create(gw, tenant, headers, name="taken", alertType="X", reason="Other")
    item = f"{rules_url(tenant)}/{rule['id']}"
    emptied = gw.http.patch(item, json={"suppressionAlertsScope": None}, headers=headers)
    assert emptied.status_code == 400
    assert "suppressionAlertsScope.allOf" in emptied.get_json()["error"]["details"]
    assert gw.http.patch(item, json={"name": "taken"}, headers=headers).status_code == 409
    assert gw.http.post(rules_url(tenant), json={"name": "taken", "alertType": "Y", "reason": "Other"},
                        headers=headers).status_code == 409
    changed = gw.http.patch(item, json={"alertType": "Malware", "suppressionAlertsScope": None,
                                        "comment": None, "state": "Disabled"}, headers=headers)
    assert changed.status_code == 200, changed.get_json()
    body = changed.get_json()
    assert (body["alertType"], body["comment"], body["state"], body["suppressionAlertsScope"]) == (
        "Malware", None, "Disabled", {"allOf": []})
    assert body["lastModifiedUtc"] >= rule["lastModifiedUtc"]
    assert body["createdDateTime"] == rule["createdDateTime"]
    assert gw.http.delete(item, headers=headers).status_code == 204
    assert gw.http.get(item, headers=headers).status_code == 404


def test_the_rules_collection_takes_the_odata_options(gw):
    tenant, headers = setup(gw)
    for index, (name, state) in enumerate([("delta", "Enabled"), ("alpha", "Disabled"), ("echo", "Enabled"),
                                           ("charlie", "Disabled"), ("bravo", "Enabled")]):
        create(gw, tenant, headers, name=name, alertType=f"Type{index}", state=state,
               reason="FalsePositive" if index % 2 else "Other")

    def names(**query) -> list[str]:
        return [r["name"] for r in listing(gw, tenant, headers, "alertSuppressionRules", **query)]

    assert names(**{"$filter": "state eq 'Disabled'"}) == ["alpha", "charlie"]
    assert names(**{"$filter": "state ne 'Disabled' and reason eq 'FalsePositive'"}) == []
    assert names(**{"$filter": "state ne 'Disabled' and reason eq 'Other'", "$orderby": "name"}) == [
        "bravo", "delta", "echo"]
    assert names(**{"$orderby": "name desc"}) == ["echo", "delta", "charlie", "bravo", "alpha"]
    assert names(**{"$filter": "startswith(alertType, 'Type')", "$skip": "3"}) == ["charlie", "bravo"]
    url = rules_url(tenant)
    page = gw.http.get(url, headers=headers, query_string={"$top": "2", "$count": "true", "$orderby": "name",
                                                           "$select": "name,state"}).get_json()
    assert page["@odata.count"] == 5 and page["value"] == [{"id": page["value"][0]["id"], "name": "alpha",
                                                             "state": "Disabled"},
                                                            {"id": page["value"][1]["id"], "name": "bravo",
                                                             "state": "Enabled"}]
    seen = [r["name"] for r in page["value"]]
    while "@odata.nextLink" in page:
        page = gw.http.get(page["@odata.nextLink"].split("localhost", 1)[1], headers=headers).get_json()
        seen += [r["name"] for r in page["value"]]
    assert seen == ["alpha", "bravo", "charlie", "delta", "echo"]
    assert gw.http.get(url, headers=headers, query_string={"$filter": "state eq 'Paused'"}).status_code == 400
    assert gw.http.get(url, headers=headers, query_string={"$orderby": "reason"}).status_code == 400
    csv = gw.http.get(url, headers=headers, query_string={"$format": "csv", "$select": "name,state",
                                                          "$orderby": "name"})
    lines = csv.get_data(as_text=True).splitlines()
    assert lines[0] == "id,name,state" and [line.split(",", 1)[1] for line in lines[1:3]] == [
        "alpha,Disabled", "bravo,Enabled"]


def test_cli_lists_creates_and_disables_rules(gw, monkeypatch):
    tenant, headers = setup(gw)
    push(gw, tenant, headers, graph_alerts(count=2), "graph_alert")
    monkeypatch.setenv("GATEWAY_DATABASE_URL", gw.db.engine.url.render_as_string(hide_password=False))
    runner = CliRunner()
    base = ["suppression", "create", "--tenant", tenant, "--name", "cli-rule",
            "--alert-type", "CredentialAccess", "--reason", "BenignPositive",
            "--condition", "entities.host.hostname", "in", "web-1,web-2"]
    dry = runner.invoke(cli_main, base + ["--dry-run"])
    assert dry.exit_code == 0 and "would suppress 2 open alerts" in dry.output, dry.output
    created = runner.invoke(cli_main, base + ["--apply-to-existing"])
    assert created.exit_code == 0, created.output
    rule_id = created.stdout.strip()
    assert {a["suppressedBy"] for a in listing(gw, tenant, headers)} == {rule_id}
    listed = runner.invoke(cli_main, ["suppression", "list", "--tenant", tenant])
    assert listed.output.startswith(f"{rule_id}\tcli-rule\tEnabled\tCredentialAccess\tBenignPositive\t-\t")
    bad = runner.invoke(cli_main, base[:5] + ["other", "--alert-type", "*", "--reason", "Other"])
    assert bad.exit_code == 1 and "suppressionAlertsScope.allOf" in bad.output
    disabled = runner.invoke(cli_main, ["suppression", "disable", "--tenant", tenant, "cli-rule"])
    assert disabled.exit_code == 0, disabled.output
    assert listing(gw, tenant, headers, "alertSuppressionRules")[0]["state"] == "Disabled"


# -- a real worker -----------------------------------------------------------------------------------


def test_a_real_worker_suppresses_graph_and_ocsf_alerts(pg_gw, worker):
    gw = pg_gw
    tenant, headers = setup(gw)
    graph, miner, test_user = _rules_for_the_three_shapes(gw, tenant, headers)
    ids = []
    pushes = (({"value": [LEGACY_ALERT]}, "graph_alert"), ([OCSF_MINER, OCSF_OTHER_HOST], "ocsf"))
    for document, fmt in pushes:
        response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format={fmt}", data=json.dumps(document),
                                headers=headers | {"Content-Type": "application/json"})
        assert response.status_code == 202, response.get_json()
        ids.append(response.get_json()["id"])

    def finished():
        batches = [gw.http.get(f"/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers).get_json()
                   for batch_id in ids]
        return batches if all(b["status"] == "succeeded" for b in batches) else None

    batches = wait_for(finished, timeout=90)
    assert [b["counts"]["suppressed"] for b in batches] == [1, 1]
    alerts = by_provider_id(gw, tenant, headers)
    _assert_suppressed(gw, tenant, headers, alerts["legacy-enc-web-7"], graph, batches[0]["id"])
    _assert_suppressed(gw, tenant, headers, alerts["gd-7f2a"], miner, batches[1]["id"])
    assert (alerts["gd-7f2b"]["status"], alerts["gd-7f2b"]["suppressedBy"]) == ("new", None)
