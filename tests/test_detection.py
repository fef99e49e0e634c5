"""Security events in, the KEV catalogue, detection rules (gateway/detection/): pushes through the real
pipeline on PostgreSQL and SQLite, rules evaluated in SQL, alerts raised through the alert merge."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text, update

from connectors.model import AlertRecord
from gateway.detection import engine, events
from gateway.detection import rules as rule_store
from gateway.merge.alerts import AlertMerger
from gateway.models import Alert, DetectionLink, FindingSource, SecurityEvent, Tenant, utcnow

EVENTS_SCOPES = "events.write findings.write alerts.write security.read rules.manage"
NOW = utcnow().replace(microsecond=0)
T0 = NOW - timedelta(hours=2)


def win(event_id: int, at: datetime, host: str = "ws-1.contoso.com", **data) -> dict:
    """One Winlogbeat-style Windows Security event."""
    return {
        "@timestamp": at.isoformat().replace("+00:00", "Z"),
        "winlog": {"event_id": event_id, "computer_name": host, "channel": "Security", "event_data": data},
        "host": {"hostname": host.split(".")[0], "ip": ["10.1.0.5"]},
    }


def logons(
    source: str,
    failures: list[int],
    success_at: int | None,
    host: str = "ws-1.contoso.com",
    base: datetime = T0,
) -> list[dict]:
    """Failed logons at ``failures`` minutes after ``base``, then a success at ``success_at``."""
    found = [
        win(4625, base + timedelta(minutes=m), host, TargetUserName="alice", IpAddress=source)
        for m in failures
    ]
    if success_at is not None:
        found.append(
            win(4624, base + timedelta(minutes=success_at), host, TargetUserName="alice", IpAddress=source)
        )
    return found


def push(gw, headers, tenant: str, body, format_name: str = "windows_events") -> dict:
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format={format_name}",
        data=json.dumps(body),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert response.status_code == 202, response.get_json()
    batch = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{response.get_json()['id']}", headers=headers)
    return batch.get_json()


def tenant_id(gw, external: str) -> int:
    with gw.db.engine.connect() as conn:
        return conn.execute(select(Tenant.id).where(Tenant.external_id == external)).scalar_one()


def run(gw, external: str, rule_id: str, now: datetime | None = None) -> int:
    rule, owner = rule_store.builtins()[rule_id], tenant_id(gw, external)
    with gw.db.engine.begin() as conn:
        return engine.run_rule(conn, rule, owner, now)


def detection_alerts(gw, external: str, rule_id: str) -> list:
    with gw.db.engine.connect() as conn:
        return conn.execute(
            select(Alert.__table__).where(
                Alert.tenant_id == tenant_id(gw, external), Alert.detection_rule == rule_id
            )
        ).all()


@pytest.fixture
def agent(gw):
    tenant = gw.tenant()
    return tenant, gw.partner("Winlogbeat", [tenant], EVENTS_SCOPES)


# -- events in ------------------------------------------------------------------------------------


def test_windows_events_land_typed_and_attach_to_the_findings_resource(gw, agent):
    tenant, headers = agent
    finding = {
        "findings": [
            {
                "id": "f-1",
                "resource": {"fqdn": "ws-1.contoso.com"},
                "title": "xz",
                "severity": "high",
                "cves": ["CVE-2024-3094"],
            }
        ]
    }
    answer = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=canonical",
        data=json.dumps(finding),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert answer.status_code == 202
    body = [
        win(4625, T0, TargetUserName="alice", IpAddress="203.0.113.7"),
        win(
            4688,
            T0 + timedelta(seconds=5),
            SubjectUserName="bob",
            NewProcessName="C:\\x\\evil.exe",
            Hashes="MD5=00,SHA256=ABCDEF",
        ),
        win(4732, T0 + timedelta(seconds=9), MemberName="CN=eve", TargetUserName="Administrators"),
        {"winlog": {"event_id": 4624}},
    ]  # no time: rejected with the reason
    batch = push(gw, headers, tenant, body)
    assert batch["status"] == "partiallySucceeded"
    assert batch["counts"]["created"] == 3 and batch["counts"]["rejected"] == 1
    assert "@timestamp" in batch["rejections"][0]["reason"]
    listing = gw.http.get(
        f"/api/v1/tenants/{tenant}/securityEvents?$orderby=occurredDateTime", headers=headers
    ).get_json()["value"]
    assert [e["kind"] for e in listing] == ["logon_failure", "process_start", "group_member_added"]
    failure, process, member = listing
    assert failure["sourceIp"] == "203.0.113.7" and failure["user"] == "alice" and failure["eventId"] == 4625
    assert (
        process["process"] == "C:\\x\\evil.exe" and process["hash"] == "abcdef" and process["user"] == "bob"
    )
    assert member["user"] == "CN=eve" and member["target"] == "Administrators"
    resources = gw.http.get(f"/api/v1/tenants/{tenant}/security/resources", headers=headers).get_json()[
        "value"
    ]
    assert len(resources) == 1  # the event's host is the finding's resource
    assert {e["resourceId"] for e in listing} == {resources[0]["id"]}
    filtered = gw.http.get(
        f"/api/v1/tenants/{tenant}/securityEvents",
        query_string={"$filter": "kind eq 'process_start'"},
        headers=headers,
    ).get_json()
    assert [e["id"] for e in filtered["value"]] == [process["id"]]


def test_ocsf_events_land_and_format_auto_tells_them_from_ocsf_findings(gw, agent):
    tenant, headers = agent
    millis = int(T0.timestamp() * 1000)
    device = {"hostname": "db-2.contoso.com", "ip": "10.2.0.9"}
    body = [
        {
            "class_uid": 3002,
            "category_uid": 3,
            "activity_id": 1,
            "status_id": 2,
            "time": millis,
            "user": {"name": "root"},
            "src_endpoint": {"ip": "198.51.100.4"},
            "device": device,
        },
        {
            "class_uid": 1007,
            "category_uid": 1,
            "activity_id": 1,
            "time": millis + 1000,
            "device": device,
            "process": {
                "name": "nc",
                "file": {"path": "/usr/bin/nc", "hashes": [{"algorithm_id": 3, "value": "AA11"}]},
            },
            "actor": {"user": {"name": "www-data"}},
        },
        {
            "class_uid": 4001,
            "category_uid": 4,
            "activity_id": 1,
            "time": millis + 2000,
            "device": device,
            "src_endpoint": {"ip": "10.2.0.9"},
            "dst_endpoint": {"ip": "203.0.113.50", "hostname": "c2.example"},
        },
    ]
    batch = push(gw, headers, tenant, body, "auto")
    assert batch["format"] == "ocsf_events" and batch["status"] == "succeeded", batch
    listing = gw.http.get(
        f"/api/v1/tenants/{tenant}/securityEvents?$orderby=occurredDateTime", headers=headers
    ).get_json()["value"]
    assert [(e["kind"], e["eventId"]) for e in listing] == [
        ("logon_failure", 3002),
        ("process_start", 1007),
        ("network_connection", 4001),
    ]
    assert listing[0]["sourceIp"] == "198.51.100.4" and listing[1]["hash"] == "aa11"
    assert listing[2]["remoteIp"] == "203.0.113.50" and listing[2]["domain"] == "c2.example"


def test_event_pushes_need_events_write_and_a_time_range_bounds_the_collection(gw):
    tenant = gw.tenant()
    findings_only = gw.partner("Scanner", [tenant], "findings.write security.read")
    answer = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=windows_events",
        data=json.dumps([win(4625, T0)]),
        headers=findings_only | {"Content-Type": "application/json"},
    )
    assert answer.status_code == 403
    headers = gw.partner("Winlogbeat", [tenant], EVENTS_SCOPES)
    push(gw, headers, tenant, [win(4625, NOW - timedelta(days=2)), win(4625, NOW - timedelta(hours=1))])
    default = gw.http.get(f"/api/v1/tenants/{tenant}/securityEvents", headers=headers).get_json()["value"]
    assert len(default) == 1  # the last 24 hours
    start = (NOW - timedelta(days=3)).isoformat()
    wide = gw.http.get(
        f"/api/v1/tenants/{tenant}/securityEvents",
        query_string={"startDateTime": start, "$top": 1},
        headers=headers,
    ).get_json()
    assert len(wide["value"]) == 1 and "@odata.nextLink" in wide
    second = gw.http.get(wide["@odata.nextLink"], headers=headers).get_json()
    assert len(second["value"]) == 1 and second["value"][0]["id"] != wide["value"][0]["id"]
    bad = gw.http.get(
        f"/api/v1/tenants/{tenant}/securityEvents",
        query_string={"startDateTime": "yesterday"},
        headers=headers,
    )
    assert bad.status_code == 400 and "startDateTime" in bad.get_json()["error"]["message"]
    too_old = push(gw, headers, tenant, [win(4625, NOW - timedelta(days=40))])
    assert too_old["status"] == "failed" and "retention" in too_old["rejections"][0]["reason"]


def test_an_events_write_client_sends_a_large_event_file_as_a_multipart_upload(gw):
    import hashlib

    from tests.test_uploads import _complete, _create, _put

    tenant = gw.tenant()
    shipper = gw.partner("Winlogbeat", [tenant], "events.write")  # events.write and nothing else
    refused = _create(gw, tenant, shipper, format="nessus")
    assert refused.status_code == 403 and "findings.write" in refused.get_json()["error"]["message"]
    body = json.dumps(
        [win(4688, T0 + timedelta(seconds=n), NewProcessName=f"C:\\p{n}.exe") for n in range(60)]
    )
    made = _create(gw, tenant, shipper, format="windows_events")
    assert made.status_code == 201, made.get_json()
    upload_id = made.get_json()["id"]
    half = len(body) // 2
    for number, part in ((1, body[:half].encode()), (2, body[half:].encode())):
        sent = _put(gw, tenant, shipper, upload_id, number, part, sha256=hashlib.sha256(part).hexdigest())
        assert sent.status_code in (200, 201), sent.get_json()
    done = _complete(gw, tenant, shipper, upload_id)
    assert done.status_code == 202, done.get_json()
    batch = gw.http.get(done.get_json()["statusUrl"].split("localhost", 1)[1], headers=shipper).get_json()
    assert batch["status"] == "succeeded" and batch["counts"]["created"] == 60, batch
    with gw.db.engine.connect() as conn:
        stored = conn.execute(
            select(SecurityEvent.process).where(SecurityEvent.tenant_id == tenant_id(gw, tenant))
        ).scalars().all()
    assert sorted(stored) == sorted(f"C:\\p{n}.exe" for n in range(60))


def test_events_keep_their_json_as_sent_and_one_the_store_cannot_hold_is_rejected(gw, agent):
    tenant, headers = agent
    accented = win(4624, T0, TargetUserName="jos\u00e9", IpAddress="10.2.0.1")
    emoji = win(4624, T0, TargetUserName="bob \U0001f600", IpAddress="10.2.0.2")
    nul = win(4624, T0, TargetUserName="a\u0000b", IpAddress="10.2.0.3")
    # json.dumps escapes every non-ASCII character (\u00e9, a surrogate pair for the emoji)
    batch = push(gw, headers, tenant, [accented, emoji, nul, accented | {"extra": [1, 2.5, None, True]}])
    assert batch["status"] == "partiallySucceeded" and batch["counts"]["created"] == 3, batch
    assert batch["rejections"][0]["position"] == "record 2" and "NUL" in batch["rejections"][0]["reason"]
    with gw.db.engine.connect() as conn:
        rows = conn.execute(
            select(SecurityEvent.user_name, SecurityEvent.raw)
            .where(SecurityEvent.tenant_id == tenant_id(gw, tenant))
            .order_by(SecurityEvent.id)
        ).all()
    assert [r.user_name for r in rows] == ["jos\u00e9", "bob \U0001f600", "jos\u00e9"]
    assert [r.raw for r in rows] == [accented, emoji, accented | {"extra": [1, 2.5, None, True]}]


def test_event_records_are_the_same_whether_the_body_is_decoded_whole_or_streamed():
    import io

    from connectors._json import iter_json_documents, iter_json_records

    items = [win(4625, T0 + timedelta(minutes=n), IpAddress=f"10.0.0.{n}") for n in range(30)]
    for body in (json.dumps(items), json.dumps({"events": items}), json.dumps(items[0])):
        data = body.encode()
        streamed = list(iter_json_records(io.BytesIO(data), ("events",)))
        whole = list(iter_json_documents(io.BytesIO(data), ("events",)))
        assert [(p, i) for p, i, _ in whole] == streamed
        assert [json.loads(text) for _, _, text in whole] == [i for _, i in streamed]
        big = list(iter_json_documents(io.BytesIO(data), ("events",), whole_limit=len(data) // 3))
        assert big == [(p, i, None) for p, i in streamed]  # too big to hold: streamed, no text
    for broken in (b'[{"a": 1}, {"b": ', b"", b"nope"):  # the streaming reader's errors, as before
        with pytest.raises(Exception) as whole_error:
            list(iter_json_documents(io.BytesIO(broken), ("events",)))
        with pytest.raises(Exception) as streamed_error:
            list(iter_json_records(io.BytesIO(broken), ("events",)))
        assert str(whole_error.value) == str(streamed_error.value)


# -- built-in rules -------------------------------------------------------------------------------


def test_failed_logons_then_success_fires_once_and_not_on_near_misses(gw, agent):
    tenant, headers = agent
    push(
        gw,
        headers,
        tenant,
        logons("203.0.113.7", [0, 1, 2, 3, 4], 6)  # 5 failures, then a success
        + logons("203.0.113.8", [0, 1, 2, 3], 6)  # one failure too few
        + logons("203.0.113.9", [0, 1, 2, 3, 4], 11),
    )  # the first failure 11 minutes before: a minute too long
    assert run(gw, tenant, "failed-logons-then-success") == 1
    assert run(gw, tenant, "failed-logons-then-success") == 0  # the watermark moved: nothing new
    owner = tenant_id(gw, tenant)
    with gw.db.engine.begin() as conn:  # evaluated again from the start: the same alert, not a second one
        engine.raise_alerts(
            conn, owner, engine.find(conn, rule_store.builtins()["failed-logons-then-success"], owner, 0)
        )
    [alert] = detection_alerts(gw, tenant, "failed-logons-then-success")
    assert alert.extra["sourceIp"] == "203.0.113.7" and alert.extra["failedLogons"] == 5
    assert alert.mitre_techniques == ["T1110", "T1110.001", "T1110.003"] and alert.severity == "high"
    assert alert.resource_id is not None
    rows = gw.http.get(
        f"/api/v1/tenants/{tenant}/security/alerts/{alert.id}/detectionRows", headers=headers
    ).get_json()
    assert rows["detectionRule"] == "failed-logons-then-success" and len(rows["value"]) == 6
    listed = gw.http.get(
        f"/api/v1/tenants/{tenant}/security/alerts",
        query_string={"$filter": "detectionRule eq 'failed-logons-then-success'"},
        headers=headers,
    ).get_json()["value"]
    assert [a["id"] for a in listed] == [str(alert.id)]
    assert listed[0]["mitreTechniques"] == ["T1110", "T1110.001", "T1110.003"]


def test_a_success_pushed_later_is_judged_with_the_earlier_failures(gw, agent):
    tenant, headers = agent
    push(gw, headers, tenant, logons("198.51.100.1", [0, 1, 2, 3, 4], None))
    assert run(gw, tenant, "failed-logons-then-success") == 0
    push(gw, headers, tenant, logons("198.51.100.1", [], 5))
    assert run(gw, tenant, "failed-logons-then-success") == 1


def test_new_local_admin_fires_for_administrators_only(gw, agent):
    tenant, headers = agent
    push(
        gw,
        headers,
        tenant,
        [
            win(
                4732,
                T0,
                MemberName="CN=eve,DC=contoso",
                TargetUserName="Administrators",
                TargetSid="S-1-5-32-544",
            ),
            win(4732, T0, "ws-2.contoso.com", MemberName="CN=joe", TargetUserName="Remote Desktop Users"),
            win(4728, T0, "ws-3.contoso.com", MemberName="CN=ann", TargetUserName="Domain Users"),
        ],
    )
    assert run(gw, tenant, "new-local-admin") == 1
    assert run(gw, tenant, "new-local-admin") == 0
    [alert] = detection_alerts(gw, tenant, "new-local-admin")
    assert alert.extra["group"].endswith(":cn=eve,dc=contoso") or "CN=eve" in alert.extra["group"]


KEV = {
    "title": "CISA Catalog of Known Exploited Vulnerabilities",
    "catalogVersion": "2026.12.01",
    "count": 2,
    "vulnerabilities": [
        {
            "cveID": "CVE-2024-3094",
            "vendorProject": "Tukaani",
            "product": "xz",
            "vulnerabilityName": "XZ Utils Embedded Malicious Code",
            "dateAdded": "2024-04-01",
            "dueDate": "2024-04-22",
            "knownRansomwareCampaignUse": "Unknown",
        },
        {
            "cveID": "CVE-2021-44228",
            "vendorProject": "Apache",
            "product": "Log4j2",
            "vulnerabilityName": "Log4Shell",
            "dateAdded": "2021-12-10",
        },
    ],
}


def test_exploited_vulnerability_needs_a_kev_cve_open_on_a_public_resource(gw, agent):
    tenant, headers = agent
    admin = gw.partner("Operator", [tenant], "admin security.read")
    assert gw.http.put("/api/v1/knownExploitedVulnerabilities", json=KEV, headers=headers).status_code == 403
    stored = gw.http.put("/api/v1/knownExploitedVulnerabilities", json=KEV, headers=admin)
    assert stored.status_code == 200 and stored.get_json()["count"] == 2
    bad = gw.http.put(
        "/api/v1/knownExploitedVulnerabilities", json={"vulnerabilities": [{"cveID": "xz"}]}, headers=admin
    )
    assert bad.status_code == 400 and "vulnerabilities[0].cveID" in bad.get_json()["error"]["message"]

    def finding(fid, host, ips, cve, status="open"):
        return {
            "id": fid,
            "resource": {"fqdn": host, "ipv4": ips},
            "title": cve,
            "severity": "critical",
            "cves": [cve],
            "status": status,
        }

    body = {
        "findings": [
            finding("a", "web-1.contoso.com", ["8.8.4.4"], "CVE-2024-3094"),  # fires
            finding("b", "db-1.contoso.com", ["10.0.0.5"], "CVE-2024-3094"),  # private only
            finding("c", "web-2.contoso.com", ["8.8.8.8"], "CVE-2023-0001"),  # not in KEV
            finding("d", "web-3.contoso.com", ["1.1.1.1"], "CVE-2021-44228", "fixed"),
        ]
    }  # fixed
    answer = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=canonical",
        data=json.dumps(body),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert answer.status_code == 202
    assert run(gw, tenant, "exploited-vulnerability-exposed") == 1
    assert run(gw, tenant, "exploited-vulnerability-exposed") == 0
    [alert] = detection_alerts(gw, tenant, "exploited-vulnerability-exposed")
    assert (
        alert.extra["cve"] == "CVE-2024-3094" and alert.extra["kevName"] == "XZ Utils Embedded Malicious Code"
    )
    # a newer catalogue without the CVE drops it; one adding CVE-2023-0001 makes web-2 fire
    newer = KEV | {"catalogVersion": "2026.12.02", "vulnerabilities": [{"cveID": "CVE-2023-0001"}]}
    assert (
        gw.http.put("/api/v1/knownExploitedVulnerabilities", json=newer, headers=admin).get_json()["removed"]
        == 2
    )
    assert run(gw, tenant, "exploited-vulnerability-exposed") == 1


def _alert(provider_id: str, category: str, host: str, at: datetime) -> AlertRecord:
    from connectors.model import ResourceRef

    return AlertRecord(
        provider_id=provider_id,
        title=category,
        severity="medium",
        category=category,
        resource=ResourceRef(fqdn=host),
        created=at,
        last_modified=at,
    )


def _merge_alerts(gw, external: str, records: list[AlertRecord]) -> None:
    owner = tenant_id(gw, external)
    with gw.db.engine.begin() as conn:
        AlertMerger(conn, owner, "Defender", None, "test").merge_chunk(records)


def test_same_alert_type_on_three_resources_is_one_correlated_alert(gw, agent):
    tenant, _ = agent
    _merge_alerts(
        gw,
        tenant,
        [
            _alert(f"m-{n}", "Mimikatz", f"h{n}.contoso.com", T0 + timedelta(minutes=10 * n))
            for n in range(3)
        ]  # 3 resources within 20 minutes
        + [
            _alert(f"r-{n}", "Ransomware", f"h{n}.contoso.com", T0 + timedelta(minutes=15.5 * n))
            for n in range(3)
        ]  # 3 resources over 31 minutes: a minute too long
        + [_alert(f"p-{n}", "PortScan", "h0.contoso.com", T0 + timedelta(minutes=n)) for n in range(3)],
    )
    assert run(gw, tenant, "correlated-alerts") == 1
    assert run(gw, tenant, "correlated-alerts") == 0
    [alert] = detection_alerts(gw, tenant, "correlated-alerts")
    assert alert.extra["alertType"] == "mimikatz" and len(alert.extra["resources"]) == 3
    with gw.db.engine.connect() as conn:
        kinds = conn.execute(
            select(DetectionLink.row_kind, func.count())
            .where(DetectionLink.alert_id == alert.id)
            .group_by(DetectionLink.row_kind)
        ).all()
    assert dict(kinds) == {"alert": 3, "resource": 3}


def _critical_findings(gw, headers, tenant: str, count: int, prefix: str) -> None:
    body = {
        "findings": [
            {
                "id": f"{prefix}-{n}",
                "resource": {"fqdn": f"{prefix}-{n}.contoso.com"},
                "title": "t",
                "severity": "critical",
                "vendorId": f"{prefix}-{n}",
            }
            for n in range(count)
        ]
    }
    answer = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=canonical",
        data=json.dumps(body),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert answer.status_code == 202


def test_a_rise_of_critical_findings_over_the_baseline_fires_and_a_usual_day_does_not(gw, agent):
    tenant, headers = agent
    noon = datetime.combine(NOW.date(), datetime.min.time(), tzinfo=UTC) + timedelta(hours=23, minutes=59)
    _critical_findings(gw, headers, tenant, 9, "few")  # 9 today, no history: below the minimum of 10
    assert run(gw, tenant, "critical-findings-rise", now=noon) == 0
    _critical_findings(gw, headers, tenant, 3, "more")  # 12 today, nothing before: a rise
    assert run(gw, tenant, "critical-findings-rise", now=noon) == 1
    [alert] = detection_alerts(gw, tenant, "critical-findings-rise")
    assert alert.extra["today"] == 12 and alert.extra["baselineMean"] == 0

    other = gw.tenant()
    busy = gw.partner("Busy", [other], EVENTS_SCOPES)
    _critical_findings(gw, busy, other, 12 + 14 * 12, "busy")  # 12 a day for the 14 days before, 12 today
    other_id = tenant_id(gw, other)
    with gw.db.engine.begin() as conn:
        ids = (
            conn.execute(
                select(FindingSource.id).where(FindingSource.tenant_id == other_id).order_by(FindingSource.id)
            )
            .scalars()
            .all()
        )
        for day in range(1, 15):
            chunk = ids[12 * day : 12 * (day + 1)]
            conn.execute(
                update(FindingSource)
                .where(FindingSource.id.in_(chunk))
                .values(created_at=noon - timedelta(days=day))
            )
    assert run(gw, other, "critical-findings-rise", now=noon) == 0


# -- rules API, isolation ---------------------------------------------------------------------------


def test_rules_are_listed_tuned_and_created_per_tenant(gw, agent):
    tenant, headers = agent
    other = gw.tenant()
    other_headers = gw.partner("Winlogbeat", [other], EVENTS_SCOPES)
    base = f"/api/v1/tenants/{tenant}/detectionRules"
    listed = gw.http.get(base, headers=headers).get_json()["value"]
    assert {r["id"] for r in listed} == set(rule_store.builtins())
    patched = gw.http.patch(f"{base}/failed-logons-then-success", json={"threshold": 3}, headers=headers)
    assert patched.status_code == 200 and patched.get_json()["threshold"] == 3
    assert patched.get_json()["defaultThreshold"] == 5
    reader = gw.partner("Reader", [tenant], "security.read")
    assert (
        gw.http.patch(f"{base}/new-local-admin", json={"enabled": False}, headers=reader).status_code == 403
    )
    assert (
        gw.http.patch(f"{base}/new-local-admin", json={"enabled": "no"}, headers=headers).status_code == 400
    )
    custom = {
        "id": "encoded-powershell",
        "title": "PowerShell started 3 times",
        "severity": "low",
        "techniques": ["T1059.001"],
        "windowMinutes": 5,
        "threshold": 3,
        "groupBy": "resource_id",
        "where": [
            {"field": "kind", "op": "eq", "value": "process_start"},
            {"field": "process", "op": "contains", "value": "powershell"},
        ],
    }
    created = gw.http.post(base, json=custom, headers=headers)
    assert created.status_code == 201, created.get_json()
    assert gw.http.post(base, json=custom, headers=headers).status_code == 409
    bad = gw.http.post(base, json=custom | {"id": "x2x", "groupBy": "password"}, headers=headers)
    assert bad.status_code == 400 and "groupBy" in bad.get_json()["error"]["message"]
    assert (
        gw.http.get(
            f"/api/v1/tenants/{other}/detectionRules/encoded-powershell", headers=other_headers
        ).status_code
        == 404
    )
    assert (
        gw.http.get(
            f"/api/v1/tenants/{other}/detectionRules/failed-logons-then-success", headers=other_headers
        ).get_json()["threshold"]
        == 5
    )
    assert gw.http.get(f"/api/v1/tenants/{other}/detectionRules", headers=headers).status_code == 404
    assert gw.http.get(f"/api/v1/tenants/{other}/securityEvents", headers=headers).status_code == 404

    # the tuned threshold and the custom rule act on this tenant's rows only
    shell = [win(4688, T0 + timedelta(minutes=m), NewProcessName="C:\\powershell.exe") for m in range(3)]
    push(gw, headers, tenant, logons("192.0.2.1", [0, 1, 2], 3) + shell)
    push(gw, other_headers, other, logons("192.0.2.1", [0, 1, 2], 3) + shell)
    found = engine.evaluate_tenant(gw.db.engine, tenant_id(gw, tenant))
    assert found["failed-logons-then-success"] == 1 and found["encoded-powershell"] == 1
    assert engine.evaluate_tenant(gw.db.engine, tenant_id(gw, other))["failed-logons-then-success"] == 0
    assert "encoded-powershell" not in engine.evaluate_tenant(gw.db.engine, tenant_id(gw, other))
    assert detection_alerts(gw, other, "failed-logons-then-success") == []
    events_of_other = gw.http.get(f"/api/v1/tenants/{tenant}/securityEvents", headers=headers).get_json()[
        "value"
    ]
    assert {e["batchId"] for e in events_of_other} and all(
        e["provider"] == "Winlogbeat" for e in events_of_other
    )
    assert len(events_of_other) == 7


def _custom(gw, headers, tenant: str, **rule) -> dict:
    created = gw.http.post(f"/api/v1/tenants/{tenant}/detectionRules", json=rule, headers=headers)
    assert created.status_code == 201, created.get_json()
    return created.get_json()


def _findings(gw, headers, tenant: str, items: list[tuple[str, str, str]]) -> None:
    """Canonical findings (id, host, cve), critical, merged inline (a small push)."""
    body = {
        "findings": [
            {"id": fid, "resource": {"fqdn": host, "os": "Windows XP"}, "title": f"{cve} on {host}",
             "severity": "critical", "cves": [cve]}
            for fid, host, cve in items
        ]
    }
    answer = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=canonical",
        data=json.dumps(body),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert answer.status_code == 202, answer.get_json()
    status = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{answer.get_json()['id']}", headers=headers)
    assert status.get_json()["status"] == "succeeded", status.get_json()


def test_custom_rules_count_findings_resources_or_alerts_of_their_tenant_only(gw, agent):
    tenant, headers = agent
    other = gw.tenant()
    other_headers = gw.partner("Scanner", [other], EVENTS_SCOPES)
    base = f"/api/v1/tenants/{tenant}/detectionRules"
    rule = {"severity": "high", "windowMinutes": 60, "threshold": 3}
    spread = _custom(
        gw, headers, tenant, id="cve-spread", title="One CVE on 3 hosts", source="findings",
        groupBy="cve", where=[{"field": "severity", "op": "eq", "value": "critical"}], **rule,
    )
    assert spread["source"] == "findings"
    _custom(
        gw, headers, tenant, id="old-os-hosts", title="3 Windows XP hosts", source="resources",
        groupBy="os", where=[{"field": "os", "op": "contains", "value": "windows xp"}], **rule,
    )
    _custom(
        gw, headers, tenant, id="mimikatz-twice", title="Mimikatz seen twice", source="alerts",
        groupBy="category", where=[{"field": "category", "op": "eq", "value": "mimikatz"}],
        **(rule | {"threshold": 2, "category": "Mimikatz"}),
    )
    # a field outside the source's whitelist (and anything that is not a field) is refused, naming them
    for field in ("user_name", "extra", "1=1; DROP TABLE alerts"):
        bad = gw.http.post(
            base, json={"id": "bad-rule", "title": "x", "source": "alerts", "groupBy": "category",
                        "where": [{"field": field, "value": "x"}], **rule}, headers=headers,
        )
        assert bad.status_code == 400 and "detection_source" in bad.get_json()["error"]["message"], field
    bad = gw.http.post(
        base, json={"id": "bad-rule", "title": "x", "source": "rows", "groupBy": "kind", **rule},
        headers=headers,
    )
    assert bad.status_code == 400 and "'source'" in bad.get_json()["error"]["message"]

    # CVE-1 on 3 hosts fires; CVE-2 on 2 hosts here (and 2 more in another tenant) is a near miss
    _findings(gw, headers, tenant, [(f"a{n}", f"h{n}.contoso.com", "CVE-2024-0001") for n in range(3)]
              + [(f"b{n}", f"h{n}.contoso.com", "CVE-2024-0002") for n in range(2)])
    _findings(gw, other_headers, other, [(f"b{n}", f"x{n}.fabrikam.com", "CVE-2024-0002") for n in range(2)])
    # 2 Mimikatz alerts fire; a single PortScan does not (nor do the other tenant's Mimikatz alerts)
    _merge_alerts(gw, tenant, [_alert(f"m-{n}", "Mimikatz", f"h{n}.contoso.com", NOW) for n in range(2)]
                  + [_alert("p-0", "PortScan", "h0.contoso.com", NOW)])
    _merge_alerts(gw, other, [_alert(f"m-{n}", "Mimikatz", f"x{n}.fabrikam.com", NOW) for n in range(1)])
    found = engine.evaluate_tenant(gw.db.engine, tenant_id(gw, tenant))
    assert (found["cve-spread"], found["old-os-hosts"], found["mimikatz-twice"]) == (1, 1, 1), found
    # twice over the same rows: nothing (the Mimikatz alert the rule raised is new, and not counted)
    again = engine.evaluate_tenant(gw.db.engine, tenant_id(gw, tenant))
    assert (again["cve-spread"], again["old-os-hosts"], again["mimikatz-twice"]) == (0, 0, 0), again
    [cve_alert] = detection_alerts(gw, tenant, "cve-spread")
    assert cve_alert.extra["group"] == "CVE-2024-0001" and cve_alert.extra["count"] == 3
    [os_alert] = detection_alerts(gw, tenant, "old-os-hosts")
    assert os_alert.extra["group"] == "Windows XP" and os_alert.extra["count"] == 3
    [mimikatz] = detection_alerts(gw, tenant, "mimikatz-twice")
    assert mimikatz.extra["count"] == 2
    with gw.db.engine.connect() as conn:
        links = dict(
            conn.execute(
                select(DetectionLink.alert_id, func.count()).where(
                    DetectionLink.alert_id.in_([cve_alert.id, os_alert.id, mimikatz.id])
                ).group_by(DetectionLink.alert_id)
            ).all()
        )
        kinds = set(
            conn.execute(
                select(DetectionLink.row_kind).where(DetectionLink.alert_id == os_alert.id)
            ).scalars()
        )
    assert links == {cve_alert.id: 3, os_alert.id: 3, mimikatz.id: 2} and kinds == {"resource"}
    assert engine.evaluate_tenant(gw.db.engine, tenant_id(gw, other)).get("cve-spread") is None


# -- retention ------------------------------------------------------------------------------------


def test_retention_drops_whole_days(gw, agent):
    tenant, headers = agent
    push(
        gw,
        headers,
        tenant,
        [win(4625, NOW - timedelta(days=2)), win(4625, NOW - timedelta(days=1)), win(4625, NOW)],
    )
    later = NOW + timedelta(days=1)
    result = events.maintain(
        gw.db.engine, retention_days=2, now=later
    )  # keeps yesterday and today of ``later``
    with gw.db.engine.connect() as conn:
        left = (
            conn.execute(select(SecurityEvent.occurred_at).order_by(SecurityEvent.occurred_at))
            .scalars()
            .all()
        )
        assert [t.date() for t in left] == [NOW.date()]  # the two older days are gone, whole
        if gw.db.is_postgres:
            assert events.partition_name((NOW - timedelta(days=2)).date()) in result["dropped"]
            assert events.partition_name((NOW - timedelta(days=1)).date()) in result["dropped"]
            names = set(
                conn.execute(
                    text(
                        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                        "WHERE i.inhparent = 'security_events'::regclass"
                    )
                ).scalars()
            )
            assert events.partition_name(NOW.date()) in names
            assert (
                events.partition_name((later + timedelta(days=events.PARTITIONS_AHEAD - 1)).date()) in names
            )
            assert not any(events.partition_name((NOW - timedelta(days=d)).date()) in names for d in (1, 2))
        else:
            assert result["dropped"] == []


# -- through a real worker, and the command line -----------------------------------------------------


def test_events_merge_and_rules_run_in_a_real_worker(pg_gw, worker):
    """A push of events is merged by a Celery worker on Redis; the beat's evaluation task, sent twice
    (the second copy runs concurrently or after), raises the alert once."""
    from tests.conftest import QUEUE, wait_for

    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Winlogbeat", [tenant], EVENTS_SCOPES)
    body = logons("203.0.113.77", [0, 1, 2, 3, 4], 5) + [
        win(4688, T0 + timedelta(seconds=n)) for n in range(300)
    ]
    answer = pg_gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=windows_events",
        data=json.dumps(body),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert answer.status_code == 202
    url = f"/api/v1/tenants/{tenant}/batches/{answer.get_json()['id']}"
    done = wait_for(
        lambda: (b := pg_gw.http.get(url, headers=headers).get_json())["status"] == "succeeded" and b,
        timeout=120,
    )
    assert done["counts"]["created"] == 306
    celery = pg_gw.app.extensions["celery"]
    for _ in range(2):
        celery.send_task("workers.detection_tasks.evaluate_rules", queue=QUEUE)
    wait_for(lambda: detection_alerts(pg_gw, tenant, "failed-logons-then-success"), timeout=120)
    owner = tenant_id(pg_gw, tenant)

    def evaluated() -> bool:
        with pg_gw.db.engine.connect() as conn:
            marks = conn.execute(
                text(
                    "SELECT count(*) FROM detection_watermarks WHERE tenant_id = :t "
                    "AND last_run_at IS NOT NULL"
                ),
                {"t": owner},
            ).scalar()
        return marks >= len(rule_store.builtins())

    wait_for(evaluated, timeout=120)
    celery.send_task("workers.detection_tasks.evaluate_rules", queue=QUEUE)
    celery.send_task("workers.detection_tasks.maintain_event_partitions", queue=QUEUE)
    wait_for(lambda: redis_empty(), timeout=120)
    assert len(detection_alerts(pg_gw, tenant, "failed-logons-then-success")) == 1


def redis_empty() -> bool:
    import redis as redis_client

    from tests.conftest import QUEUE, REDIS_URL

    return redis_client.Redis.from_url(REDIS_URL).llen(QUEUE) == 0


def test_rules_list_and_test_print_without_raising(gw, agent):
    from click.testing import CliRunner

    from gateway import cli
    from tests.conftest import SECRET

    tenant, headers = agent
    push(gw, headers, tenant, logons("203.0.113.5", [0, 1, 2, 3, 4], 5))
    env = {"GATEWAY_DATABASE_URL": gw.app.config["DATABASE_URL"], "GATEWAY_SECRET_KEY": SECRET}
    listed = CliRunner().invoke(
        cli.main, ["rules", "list", "--tenant", tenant], env=env, catch_exceptions=False
    )
    assert listed.exit_code == 0 and "failed-logons-then-success" in listed.output
    tested = CliRunner().invoke(
        cli.main,
        ["rules", "test", "failed-logons-then-success", "--tenant", tenant, "--since", "7d"],
        env=env,
        catch_exceptions=False,
    )
    assert tested.exit_code == 0, tested.output
    hits = [json.loads(line) for line in tested.stdout.splitlines() if line.startswith("{")]
    assert [(h["group"], h["count"]) for h in hits] == [("203.0.113.5", 5)]
    assert detection_alerts(gw, tenant, "failed-logons-then-success") == []  # nothing raised
    later = CliRunner().invoke(
        cli.main,
        ["rules", "test", "failed-logons-then-success", "--tenant", tenant, "--since", "10m"],
        env=env,
        catch_exceptions=False,
    )
    assert [line for line in later.stdout.splitlines() if line.startswith("{")] == []  # rows before --since
    unknown = CliRunner().invoke(cli.main, ["rules", "test", "nope", "--tenant", tenant], env=env)
    assert unknown.exit_code != 0 and "no detection rule nope" in unknown.output


def test_concurrent_first_batches_create_the_partitions_once(pg_url):
    """Two workers' first batches of a day both find partitions missing: one creates them, the other
    waits and finds them (a race here failed batches with 'relation already exists')."""
    import threading

    from gateway.db import Database

    db = Database(pg_url)
    try:
        later = NOW + timedelta(days=400)  # a window of days no other test made
        errors: list[BaseException] = []

        def create() -> None:
            try:
                events.ensure_partitions(db.engine, later, 5)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        events._ensured.clear()
        threads = [threading.Thread(target=create) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        with db.engine.connect() as conn:
            names = set(
                conn.execute(
                    text(
                        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                        "WHERE i.inhparent = 'security_events'::regclass"
                    )
                ).scalars()
            )
        assert {events.partition_name((later + timedelta(days=n)).date()) for n in range(-4, 3)} <= names
        events.drop_expired(db.engine, later + timedelta(days=40), 1)  # leave no far-future day behind
    finally:
        events._ensured.clear()
        db.dispose()


def test_a_suppression_rule_resolves_a_detection_alert_by_its_host(gw):
    """Detection alerts go through the alert merge: a tenant's suppression rule for their type and
    host stores them already resolved (the host is known when the alert is inserted)."""
    tenant = gw.tenant()
    headers = gw.partner("Winlogbeat", [tenant], EVENTS_SCOPES + " posture.manage")
    rule = {
        "name": "lab-admins",
        "alertType": "NewLocalAdmin",
        "reason": "ValidActivity",
        "suppressionAlertsScope": {"allOf": [{"field": "entities.host.hostname", "equals": "lab-1"}]},
    }
    created = gw.http.post(
        f"/api/v1/tenants/{tenant}/security/alertSuppressionRules", json=rule, headers=headers
    )
    assert created.status_code == 201, created.get_json()
    push(
        gw,
        headers,
        tenant,
        [
            win(4732, T0, "lab-1.contoso.com", MemberName="CN=a", TargetUserName="Administrators"),
            win(4732, T0, "ws-9.contoso.com", MemberName="CN=b", TargetUserName="Administrators"),
        ],
    )
    assert run(gw, tenant, "new-local-admin") == 2
    alerts = {a.extra["group"].split(":")[1]: a for a in detection_alerts(gw, tenant, "new-local-admin")}
    assert alerts["CN=a"].status == "resolved" and alerts["CN=a"].suppressed_by == int(
        created.get_json()["id"]
    )
    assert alerts["CN=b"].status == "newAlert" and alerts["CN=b"].suppressed_by is None
