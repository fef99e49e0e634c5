"""Threat-intelligence indicators (issue 16 part A): Graph tiIndicator and STIX 2.1 pushes, dedup,
expiry, rejected patterns, and matching against alerts and resources from both directions, on
PostgreSQL and SQLite."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from gateway.intel import matching
from gateway.models import Alert, Indicator, IndicatorMatch

FUTURE = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
PAST = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def ti(**fields) -> dict:
    return {
        "externalId": f"ti-{uuid.uuid4().hex[:6]}",
        "targetProduct": "Azure Sentinel",
        "action": "alert",
        "threatType": "C2",
        "tlpLevel": "amber",
        "confidence": 90,
        "expirationDateTime": FUTURE,
        "description": "known C2",
        "lastReportedDateTime": "2026-11-01T00:00:00Z",
    } | fields


def stix_indicator(pattern: str, **fields) -> dict:
    return {
        "type": "indicator",
        "spec_version": "2.1",
        "id": f"indicator--{uuid.uuid4()}",
        "created": "2026-11-01T00:00:00Z",
        "modified": "2026-11-01T00:00:00Z",
        "pattern": pattern,
        "pattern_type": "stix",
        "valid_from": "2026-11-01T00:00:00Z",
        "valid_until": FUTURE,
        "indicator_types": ["malicious-activity"],
        "confidence": 80,
    } | fields


def bundle(*objects) -> bytes:
    return json.dumps({"type": "bundle", "id": f"bundle--{uuid.uuid4()}", "objects": list(objects)}).encode()


def push(gw, tenant: str, headers: dict, body: bytes, fmt: str) -> dict:
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format={fmt}",
        data=body,
        headers=headers | {"Content-Type": "application/json"},
    )
    assert response.status_code == 202, response.get_json()
    return gw.http.get(response.get_json()["statusUrl"].split("localhost", 1)[1], headers=headers).get_json()


def feed(gw, tenant=None):
    tenant = tenant or gw.tenant()
    headers = gw.partner("Intel Feed", [tenant], scopes="indicators.write security.read")
    return tenant, headers


def indicators(gw, tenant, headers, **args) -> list[dict]:
    response = gw.http.get(
        f"/api/v1/tenants/{tenant}/security/indicators", headers=headers, query_string=args
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def alerts(gw, tenant, headers, **args) -> list[dict]:
    response = gw.http.get(f"/api/v1/tenants/{tenant}/security/alerts", headers=headers, query_string=args)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def v2_alert(alert_id: str, *evidence) -> bytes:
    return json.dumps(
        {
            "value": [
                {
                    "id": alert_id,
                    "title": "Beacon",
                    "severity": "medium",
                    "status": "new",
                    "serviceSource": "microsoftDefenderForEndpoint",
                    "createdDateTime": "2026-11-02T00:00:00Z",
                    "lastUpdateDateTime": "2026-11-02T00:00:00Z",
                    "evidence": list(evidence),
                }
            ]
        }
    ).encode()


def ip_evidence(address: str) -> dict:
    return {
        "@odata.type": "#microsoft.graph.security.ipEvidence",
        "ipAddress": address,
        "roles": [],
        "verdict": "unknown",
    }


def host_push(address: str, fqdn: str = "db-1.example.com") -> bytes:
    return json.dumps(
        {
            "findings": [
                {
                    "id": f"scan/{fqdn}/x",
                    "resource": {"fqdn": fqdn, "ipv4": [address]},
                    "title": "xz backdoor",
                    "severity": "critical",
                    "cves": ["CVE-2024-3094"],
                    "status": "open",
                }
            ]
        }
    ).encode()


# -- pushes ---------------------------------------------------------------------------------------


def test_graph_push_stores_one_indicator_per_observable(gw):
    tenant, headers = feed(gw)
    body = json.dumps(
        {
            "value": [
                ti(networkIPv4="203.0.113.7", domainName="Evil.Example.COM."),
                ti(fileHashType="sha256", fileHashValue=SHA256.upper()),
            ]
        }
    ).encode()
    batch = push(gw, tenant, headers, body, "graph_tiindicator")
    assert batch["status"] == "succeeded" and batch["counts"]["created"] == 3, batch
    found = {(i["observableType"], i["value"]): i for i in indicators(gw, tenant, headers)}
    assert set(found) == {("ipv4", "203.0.113.7"), ("domain", "evil.example.com"), ("sha256", SHA256)}
    ip = found[("ipv4", "203.0.113.7")]
    assert (ip["threatType"], ip["tlpLevel"], ip["confidence"], ip["action"], ip["targetProduct"]) == (
        "C2",
        "amber",
        90,
        "alert",
        "Azure Sentinel",
    )
    assert ip["source"] == "Intel Feed" and ip["format"] == "graph_tiindicator" and ip["matchCount"] == 0
    assert ip["expirationDateTime"][:19] == FUTURE[:19]
    # OData over the collection
    only = indicators(gw, tenant, headers, **{"$filter": "observableType eq 'domain'"})
    assert [i["value"] for i in only] == ["evil.example.com"]
    page = gw.http.get(
        f"/api/v1/tenants/{tenant}/security/indicators",
        headers=headers,
        query_string={"$top": "2", "$orderby": "value"},
    ).get_json()
    assert [i["value"] for i in page["value"]] == sorted(found_value for _, found_value in found)[:2]
    rest = gw.http.get(page["@odata.nextLink"].split("localhost", 1)[1], headers=headers).get_json()
    assert [i["value"] for i in rest["value"]] == [sorted(v for _, v in found)[2]]


def test_graph_push_rejects_bad_indicators_per_record(gw):
    tenant, headers = feed(gw)
    body = json.dumps(
        {
            "value": [
                ti(networkIPv4="198.51.100.1"),
                ti(networkIPv4="not-an-ip"),
                ti(networkCidrBlock="10.0.0.0/8"),
                ti(threatType="Nonsense", url="http://x.example/"),
                {k: v for k, v in ti(domainName="a.example").items() if k != "expirationDateTime"},
            ]
        }
    ).encode()
    batch = push(gw, tenant, headers, body, "graph_tiindicator")
    assert batch["status"] == "partiallySucceeded" and batch["counts"]["created"] == 1
    reasons = [r["reason"] for r in batch["rejections"]]
    assert len(reasons) == 4
    assert "not an IP address" in reasons[0]
    assert "networkCidrBlock" in reasons[1]
    assert "threatType" in reasons[2]
    assert "expirationDateTime" in reasons[3]


def test_stix_bundle_accepts_simple_patterns_and_rejects_the_others_with_the_reason(gw):
    tenant, headers = feed(gw)
    body = bundle(
        {
            "type": "identity",
            "spec_version": "2.1",
            "id": f"identity--{uuid.uuid4()}",
            "name": "ACME CERT",
            "created": "2026-11-01T00:00:00Z",
            "modified": "2026-11-01T00:00:00Z",
        },
        stix_indicator("[ipv4-addr:value = '192.0.2.10' OR domain-name:value = 'c2.example.net']"),
        stix_indicator(f"[file:hashes.'SHA-256' = '{SHA256}'] OR [url:value = 'HTTP://Bad.Example/x']"),
        stix_indicator("[ipv4-addr:value = '192.0.2.11' AND domain-name:value = 'b.example']"),
        stix_indicator("[ipv4-addr:value = '192.0.2.12'] WITHIN 60 SECONDS"),
        stix_indicator("[process:name = 'evil.exe']"),
        stix_indicator("[ipv4-addr:value = "),
        stix_indicator("rule x { condition: true }", pattern_type="yara"),
    )
    batch = push(gw, tenant, headers, body, "stix21")
    assert batch["counts"]["created"] == 4, batch
    reasons = [r["reason"] for r in batch["rejections"]]
    assert len(reasons) == 5, reasons
    assert "AND between comparisons" in reasons[0]
    assert "WITHIN" in reasons[1]
    assert "process:name" in reasons[2]
    assert "pattern" in reasons[3]  # stix2's own validation of the pattern
    assert "yara" in reasons[4]
    values = {(i["observableType"], i["value"]) for i in indicators(gw, tenant, headers)}
    assert values == {
        ("ipv4", "192.0.2.10"),
        ("domain", "c2.example.net"),
        ("sha256", SHA256),
        ("url", "http://bad.example/x"),
    }
    one = indicators(gw, tenant, headers, **{"$filter": "observableType eq 'url'"})[0]
    assert one["externalId"].startswith("indicator--") and one["threatType"] == "malicious-activity"
    assert one["pattern"].startswith("[file:hashes")


def test_dedup_per_source_and_observable_and_stale_updates_are_ignored(gw):
    tenant, headers = feed(gw)
    push(
        gw,
        tenant,
        headers,
        json.dumps([ti(networkIPv4="203.0.113.9", confidence=40)]).encode(),
        "graph_tiindicator",
    )
    again = push(
        gw,
        tenant,
        headers,
        json.dumps(
            [ti(networkIPv4="203.0.113.9", confidence=70, lastReportedDateTime="2026-11-05T00:00:00Z")]
        ).encode(),
        "graph_tiindicator",
    )
    assert again["counts"]["updated"] == 1 and again["counts"]["created"] == 0
    stale = push(
        gw,
        tenant,
        headers,
        json.dumps(
            [ti(networkIPv4="203.0.113.9", confidence=10, lastReportedDateTime="2026-10-01T00:00:00Z")]
        ).encode(),
        "graph_tiindicator",
    )
    assert stale["counts"]["stale"] == 1
    [row] = indicators(gw, tenant, headers)
    assert row["confidence"] == 70
    # another source with the same observable is another indicator
    other = gw.partner("Other Feed", [tenant], scopes="indicators.write security.read")
    push(gw, tenant, other, json.dumps([ti(networkIPv4="203.0.113.9")]).encode(), "graph_tiindicator")
    assert sorted(i["source"] for i in indicators(gw, tenant, headers)) == ["Intel Feed", "Other Feed"]


def test_pushing_indicators_needs_the_indicators_write_scope(gw):
    tenant = gw.tenant()
    headers = gw.partner("Scanner", [tenant])  # findings.write alerts.write security.read alerts.manage
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=stix21",
        data=bundle(),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "insufficientScope"
    assert "indicators.write" in response.get_json()["error"]["message"]


# -- matching -------------------------------------------------------------------------------------


def test_indicator_first_then_alert_enriches_the_alert_once(gw):
    tenant, intel = feed(gw)
    partner = gw.partner("Defender", [tenant])
    push(gw, tenant, intel, json.dumps([ti(networkIPv4="203.0.113.50")]).encode(), "graph_tiindicator")
    body = v2_alert("a-1", ip_evidence("203.0.113.50"), ip_evidence("10.1.1.1"))
    assert push(gw, tenant, partner, body, "graph_alert")["status"] == "succeeded"
    [alert] = alerts(gw, tenant, partner)
    [match] = alert["threatIntelligenceMatches"]
    assert (match["observableType"], match["value"], match["threatType"]) == ("ipv4", "203.0.113.50", "C2")
    # the same alert pushed again (a newer version rewrites extra): still one match, enrichment kept
    push(gw, tenant, partner, body.replace(b"2026-11-02T00:00:00Z", b"2026-11-03T00:00:00Z"), "graph_alert")
    assert len(alerts(gw, tenant, partner)[0]["threatIntelligenceMatches"]) == 1
    with gw.db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(IndicatorMatch)).scalar() == 1
    assert indicators(gw, tenant, intel)[0]["matchCount"] == 1


def test_alert_first_then_indicator_matches_the_alert(gw):
    tenant, intel = feed(gw)
    partner = gw.partner("Defender", [tenant])
    url = {
        "@odata.type": "#microsoft.graph.security.urlEvidence",
        "url": "https://Phish.Example.org/login",
        "roles": [],
        "verdict": "unknown",
    }
    push(gw, tenant, partner, v2_alert("a-2", url), "graph_alert")
    body = bundle(stix_indicator("[domain-name:value = 'phish.example.org']"))
    batch = push(gw, tenant, intel, body, "stix21")
    assert batch["counts"]["matched"] == 1, batch
    [match] = alerts(gw, tenant, partner)[0]["threatIntelligenceMatches"]
    assert (match["observableType"], match["value"]) == ("domain", "phish.example.org")
    again = push(gw, tenant, intel, body, "stix21")  # the same bundle again: nothing new
    assert again["counts"].get("matched", 0) == 0 and again["counts"]["unchanged"] == 1


def test_resource_match_raises_one_alert_from_either_direction(gw):
    tenant, intel = feed(gw)
    scanner = gw.partner("Scanner", [tenant])
    # indicator first, then the resource
    push(
        gw,
        tenant,
        intel,
        json.dumps([ti(networkIPv4="198.51.100.20", threatType="Botnet", confidence=20)]).encode(),
        "graph_tiindicator",
    )
    push(gw, tenant, scanner, host_push("198.51.100.20"), "canonical")
    # resource first, then the indicator (an FQDN)
    push(gw, tenant, scanner, host_push("198.51.100.21", fqdn="web-9.example.com"), "canonical")
    push(
        gw,
        tenant,
        intel,
        json.dumps([ti(domainName="web-9.example.com", threatType="WatchList", confidence=90)]).encode(),
        "graph_tiindicator",
    )
    found = alerts(gw, tenant, scanner, **{"$filter": "category eq 'ThreatIntelligenceMatch'"})
    assert len(found) == 2, found
    by_value = {a["title"].rsplit(" ", 1)[1]: a for a in found}
    ip_alert, fqdn_alert = by_value["198.51.100.20"], by_value["web-9.example.com"]
    assert ip_alert["severity"] == "medium"  # Botnet (high), confidence 20: one step down
    assert fqdn_alert["severity"] == "medium"  # WatchList (low), confidence 90: one step up
    with gw.db.engine.connect() as conn:
        rows = conn.execute(
            select(Alert.evidence, Alert.resource_id).where(Alert.provider == matching.PROVIDER)
        ).all()
    for evidence, resource_id in rows:
        kinds = [e["@odata.type"] for e in evidence]
        assert kinds[1:] == ["#gateway.threatIntelligenceIndicator", "#gateway.resource"]
        assert evidence[2]["resourceId"] == str(resource_id)
    # the resource reported again, the sweep run twice: still one alert each
    push(gw, tenant, scanner, host_push("198.51.100.20"), "canonical")
    with gw.db.engine.begin() as conn:
        tenant_id = conn.execute(select(Indicator.tenant_id)).scalars().first()
        assert matching.sweep(conn, tenant_id, datetime(2000, 1, 1, tzinfo=UTC)) == 0
        assert matching.sweep(conn, tenant_id, datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert len(alerts(gw, tenant, scanner, **{"$filter": "category eq 'ThreatIntelligenceMatch'"})) == 2


def test_expired_indicators_do_not_match_and_are_pruned(gw):
    tenant, intel = feed(gw)
    partner = gw.partner("Defender", [tenant])
    push(
        gw,
        tenant,
        intel,
        json.dumps(
            [ti(networkIPv4="203.0.113.77", expirationDateTime=PAST), ti(networkIPv4="203.0.113.78")]
        ).encode(),
        "graph_tiindicator",
    )
    push(gw, tenant, partner, v2_alert("a-3", ip_evidence("203.0.113.77")), "graph_alert")
    assert alerts(gw, tenant, partner)[0]["threatIntelligenceMatches"] == []
    with gw.db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(IndicatorMatch)).scalar() == 0
    from gateway.intel.tasks import prune_expired

    assert prune_expired(gw.db) == 1
    assert [i["value"] for i in indicators(gw, tenant, intel)] == ["203.0.113.78"]


def test_tenant_isolation(gw):
    tenant_a, intel_a = feed(gw)
    tenant_b = gw.tenant()
    partner_b = gw.partner("Defender", [tenant_b], scopes="alerts.write security.read")
    push(gw, tenant_a, intel_a, json.dumps([ti(networkIPv4="203.0.113.99")]).encode(), "graph_tiindicator")
    push(gw, tenant_b, partner_b, v2_alert("b-1", ip_evidence("203.0.113.99")), "graph_alert")
    with gw.db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(IndicatorMatch)).scalar() == 0
    assert indicators(gw, tenant_b, partner_b) == []
    response = gw.http.get(f"/api/v1/tenants/{tenant_a}/security/indicators", headers=partner_b)
    assert response.status_code == 404


# -- through a real worker, over a real socket ------------------------------------------------------


def test_pushes_over_http_are_merged_and_matched_by_the_worker(pg_gw, live_server, worker):
    import requests

    from tests.conftest import wait_for

    tenant, intel = feed(pg_gw)
    partner = pg_gw.partner("Defender", [tenant])

    def pushed(headers, body, fmt) -> dict:
        response = requests.post(
            f"{live_server.url}/api/v1/tenants/{tenant}/batches?format={fmt}",
            data=body,
            headers=headers | {"Content-Type": "application/json"},
            timeout=30,
        )
        assert response.status_code == 202, response.text

        def final():
            batch = requests.get(response.json()["statusUrl"], headers=headers, timeout=10).json()
            return batch if batch["status"] in ("succeeded", "partiallySucceeded", "failed") else None

        return wait_for(final)

    alert = {
        "@odata.type": "#microsoft.graph.security.fileEvidence",
        "roles": [],
        "verdict": "malicious",
        "fileDetails": {"fileName": "x.exe", "sha256": SHA256.upper()},
    }
    assert pushed(partner, v2_alert("w-1", alert), "graph_alert")["status"] == "succeeded"
    batch = pushed(
        intel,
        bundle(
            stix_indicator(f"[file:hashes.'SHA-256' = '{SHA256}']"),
            stix_indicator("[ipv4-addr:value = '10.0.0.0/8']"),
        ),
        "stix21",
    )
    assert batch["status"] == "partiallySucceeded" and batch["counts"]["matched"] == 1, batch
    assert "address range" in batch["rejections"][0]["reason"]
    page = requests.get(
        f"{live_server.url}/api/v1/tenants/{tenant}/security/indicators",
        headers=intel,
        params={"$filter": "observableType eq 'sha256'"},
        timeout=10,
    ).json()
    assert [(i["value"], i["matchCount"]) for i in page["value"]] == [(SHA256, 1)]


# -- security events (gateway/detection/, det16) ------------------------------------------------------


def ocsf_network_events(*pairs, host: str = "ws-7.contoso.com") -> bytes:
    """OCSF Network Activity (4001) events: (remote address, remote host name) each, a minute apart."""
    base = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)
    return json.dumps(
        [
            {
                "class_uid": 4001,
                "category_uid": 4,
                "activity_id": 1,
                "time": base + n * 60_000,
                "device": {"hostname": host.split(".")[0], "name": host, "ip": "10.9.0.7"},
                "src_endpoint": {"ip": "10.9.0.7"},
                "dst_endpoint": {"ip": address, "hostname": name},
            }
            for n, (address, name) in enumerate(pairs)
        ]
    ).encode()


def test_events_match_from_both_directions_one_alert_per_indicator_and_resource(gw):
    tenant, intel = feed(gw)
    agent = gw.partner("Agent", [tenant], scopes="events.write security.read")
    # indicator first: two events to the C2 address on one host raise one alert, naming an event
    push(gw, tenant, intel, json.dumps([ti(networkIPv4="203.0.113.60")]).encode(), "graph_tiindicator")
    batch = push(
        gw,
        tenant,
        agent,
        ocsf_network_events(("203.0.113.60", None), ("203.0.113.60", None), ("198.51.100.1", None)),
        "ocsf_events",
    )
    assert batch["status"] == "succeeded", batch
    found = alerts(gw, tenant, agent, **{"$filter": "category eq 'ThreatIntelligenceMatch'"})
    assert len(found) == 1, found
    with gw.db.engine.connect() as conn:
        evidence, resource_id = conn.execute(
            select(Alert.evidence, Alert.resource_id).where(Alert.id == int(found[0]["id"]))
        ).one()
        assert (
            conn.execute(
                select(func.count()).select_from(IndicatorMatch).where(IndicatorMatch.subject_type == "event")
            ).scalar()
            == 2
        )
    assert (
        evidence[0]["ipAddress"] == "203.0.113.60" and evidence[2]["@odata.type"] == "#gateway.securityEvent"
    )
    assert resource_id is not None and evidence[2]["resourceId"] == str(resource_id)
    # event first (a domain), then the indicator: the sweep (the beat's) matches stored events
    push(
        gw,
        tenant,
        agent,
        ocsf_network_events(("192.0.2.99", "Beacon.Example.org"), host="ws-8.contoso.com"),
        "ocsf_events",
    )
    push(gw, tenant, intel, json.dumps([ti(domainName="beacon.example.org")]).encode(), "graph_tiindicator")
    from gateway.intel.tasks import sweep_recent

    assert sweep_recent(gw.db, 3600) >= 1
    assert sweep_recent(gw.db, 3600) == 0  # twice: nothing new
    found = alerts(gw, tenant, agent, **{"$filter": "category eq 'ThreatIntelligenceMatch'"})
    assert len(found) == 2 and any("beacon.example.org" in a["title"] for a in found)


def test_a_large_stix_bundle_sent_as_a_multipart_upload(gw):
    import hashlib

    from tests.test_uploads import _complete, _create, _put

    tenant, intel = feed(gw)
    body = bundle(*[stix_indicator(f"[ipv4-addr:value = '198.51.100.{n}']") for n in range(1, 41)])
    made = _create(gw, tenant, intel, format="stix21", contentType="application/json")
    assert made.status_code == 201, made.get_json()
    upload_id = made.get_json()["id"]
    half = len(body) // 2
    for number, part in ((2, body[half:]), (1, body[:half])):
        sent = _put(gw, tenant, intel, upload_id, number, part, sha256=hashlib.sha256(part).hexdigest())
        assert sent.status_code in (200, 201), sent.get_json()
    done = _complete(gw, tenant, intel, upload_id)
    assert done.status_code == 202, done.get_json()
    batch = gw.http.get(done.get_json()["statusUrl"].split("localhost", 1)[1], headers=intel).get_json()
    assert batch["status"] == "succeeded" and batch["counts"]["created"] == 40, batch
    assert len(indicators(gw, tenant, intel, **{"$top": "100"})) == 40
