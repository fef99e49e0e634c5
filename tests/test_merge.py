"""Merge semantics (DESIGN rules 2-5) on PostgreSQL and on SQLite, through the HTTP API."""

from __future__ import annotations

from sqlalchemy import func, select

from gateway.models import Finding, FindingSource, LifecycleEvent, Resource
from tests.factories import document, finding


def push(gw, tenant, headers, body, **params):
    query = "&".join(f"{k}={v}" for k, v in {"format": "canonical", **params}.items())
    response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?{query}", data=body,
                            headers=headers | {"Content-Type": "application/json"})
    assert response.status_code == 202, response.get_json()
    batch = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{response.get_json()['id']}", headers=headers)
    assert batch.status_code == 200
    return batch.get_json()


def count(gw, model) -> int:
    with gw.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def findings_of(gw, tenant, headers, odata_filter=None):
    query = {"$filter": odata_filter} if odata_filter else {}
    response = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings", query_string=query, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def test_push_merges_fields_and_counts(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    body = document([finding("q-1"), finding("q-2", cves=["CVE-2023-4863", "CVE-2023-5217"], severity="critical"),
                     finding("q-3", host="web-1.example.com", cves=[], vendorId="38739", severity="low")])
    batch = push(gw, tenant, headers, body)
    assert batch["status"] == "succeeded"
    assert batch["counts"] == {"received": 3, "created": 3, "updated": 0, "unchanged": 0, "stale": 0,
                               "resolved": 0, "rejected": 0, "observations": 0, "duplicatesInPush": 0,
                               "resourcesMerged": 0, "suppressed": 0}
    rows = findings_of(gw, tenant, headers)
    assert len(rows) == 4  # q-2 names two CVEs: one finding per CVE
    by_key = {row["correlationKey"]: row for row in rows}
    assert set(by_key) == {"CVE-2024-3094", "CVE-2023-4863", "CVE-2023-5217", "Qualys/38739"}
    xz = by_key["CVE-2024-3094"]
    assert xz["title"] == "Vulnerability q-1"
    assert xz["severity"] == "high"
    assert xz["state"] == "new"
    assert xz["cves"] == ["CVE-2024-3094"]
    assert xz["lastSeen"].startswith("2024-04-01T00:00:00")
    assert xz["sources"][0]["provider"] == "Qualys" and xz["sources"][0]["providerId"] == "q-1"
    assert by_key["CVE-2023-4863"]["resourceId"] == xz["resourceId"]  # same host, one resource
    assert by_key["Qualys/38739"]["resourceId"] != xz["resourceId"]
    resources = gw.http.get(f"/api/v1/tenants/{tenant}/security/resources",
                            headers=headers).get_json()["value"]
    assert sorted(r["name"] for r in resources) == ["db-1.example.com", "web-1.example.com"]
    recs = gw.http.get(f"/api/v1/tenants/{tenant}/security/recommendations",
                       headers=headers).get_json()["value"]
    assert {(r["recommendationType"], r["status"]) for r in recs} == {("vulnerability-assessment", "Unhealthy")}
    assert {r["severity"] for r in recs} == {"critical", "low"}


def test_same_batch_twice_is_unchanged_and_writes_no_events(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    body = document([finding(f"q-{i}", cves=[f"CVE-2024-{1000 + i}"]) for i in range(120)])
    first = push(gw, tenant, headers, body)
    assert first["counts"]["created"] == 120
    events = count(gw, LifecycleEvent)
    second = push(gw, tenant, headers, body)
    assert second["status"] == "succeeded"
    assert second["counts"]["unchanged"] == 120
    assert second["counts"]["created"] == second["counts"]["updated"] == 0
    assert count(gw, LifecycleEvent) == events
    assert count(gw, Finding) == 120 and count(gw, FindingSource) == 120 and count(gw, Resource) == 1


def test_stale_update_is_ignored_and_newer_one_applies(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    push(gw, tenant, headers, document([finding("t-1", severity="high", ts="2024-04-02T00:00:00Z")]))
    stale = push(gw, tenant, headers, document([finding("t-1", severity="low", ts="2024-04-01T00:00:00Z")]))
    assert stale["counts"]["stale"] == 1 and stale["counts"]["updated"] == 0
    assert findings_of(gw, tenant, headers)[0]["severity"] == "high"
    newer = push(gw, tenant, headers, document([finding("t-1", severity="critical", ts="2024-04-03T00:00:00Z")]))
    assert newer["counts"]["updated"] == 1
    [row] = findings_of(gw, tenant, headers)
    assert row["severity"] == "critical"
    assert row["state"] == "active"
    history = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings/{row['id']}/history",
                          headers=headers).get_json()
    assert [e["event"] for e in history["value"]] == ["new", "active"]


def test_customer_fields_survive_a_repush(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    push(gw, tenant, headers, document([finding("q-1", severity="medium")]))
    [row] = findings_of(gw, tenant, headers)
    response = gw.http.patch(f"/api/v1/tenants/{tenant}/security/findings/{row['id']}",
                             json={"assignedTo": "alice@contoso.com", "statusOverride": "riskAccepted",
                                   "tags": ["pci"]},
                             headers=headers | {"Prefer": "return=representation"})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["assignedTo"] == "alice@contoso.com"
    push(gw, tenant, headers, document([finding("q-1", severity="critical", title="Renamed",
                                                ts="2024-05-01T00:00:00Z")]))
    [row] = findings_of(gw, tenant, headers)
    assert row["severity"] == "critical" and row["title"] == "Renamed"
    assert row["assignedTo"] == "alice@contoso.com"
    assert row["statusOverride"] == "riskAccepted"
    assert row["tags"] == ["pci"]
    events = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings/{row['id']}/history",
                         headers=headers).get_json()
    edited = [e for e in events["value"] if e["event"] == "edited"]
    assert edited and edited[0]["details"]["assignedTo"] == "alice@contoso.com" and edited[0]["actor"]


def test_full_scan_resolves_missing_and_reopens_returning(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    both = [finding("t-1", cves=["CVE-2024-0001"]), finding("t-2", cves=["CVE-2024-0002"])]
    push(gw, tenant, headers, document(both, scan="full"))
    # t-2 is missing from the next full scan of the same host: resolved
    batch = push(gw, tenant, headers, document([finding("t-1", cves=["CVE-2024-0001"], ts="2024-04-02T00:00:00Z")],
                                               scan="full"))
    assert batch["counts"]["resolved"] == 1
    states = {r["correlationKey"]: r["state"] for r in findings_of(gw, tenant, headers)}
    assert states == {"CVE-2024-0001": "active", "CVE-2024-0002": "resolved"}
    # an incremental push without t-1 resolves nothing
    push(gw, tenant, headers, document([finding("t-3", cves=["CVE-2024-0003"])]))
    assert {r["state"] for r in findings_of(gw, tenant, headers, "state eq 'resolved'")} == {"resolved"}
    assert len(findings_of(gw, tenant, headers, "state eq 'resolved'")) == 1
    # t-2 comes back: reopened
    again = push(gw, tenant, headers, document([finding("t-2", cves=["CVE-2024-0002"], ts="2024-04-03T00:00:00Z")]))
    assert again["counts"]["updated"] == 1
    [row] = findings_of(gw, tenant, headers, "cves/any(c: c eq 'CVE-2024-0002')")
    assert row["state"] == "reopened" and row["resolvedAt"] is None
    history = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings/{row['id']}/history",
                          headers=headers).get_json()
    assert [e["event"] for e in history["value"]] == ["new", "resolved", "reopened"]
    assert "full scan" in history["value"][1]["cause"]


def test_fixed_status_resolves_and_recommendation_turns_healthy(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    push(gw, tenant, headers, document([finding("q-1")]))
    batch = push(gw, tenant, headers, document([finding("q-1", status="fixed", ts="2024-04-05T00:00:00Z")]))
    assert batch["counts"]["resolved"] == 1
    [row] = findings_of(gw, tenant, headers)
    assert row["state"] == "resolved" and row["resolvedAt"]
    [rec] = gw.http.get(f"/api/v1/tenants/{tenant}/security/recommendations",
                        headers=headers).get_json()["value"]
    assert rec["status"] == "Healthy"


def test_rejected_records_are_reported_and_good_ones_land(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    body = document([finding("q-1"), {"id": "q-2", "title": "no resource", "severity": "high"},
                     finding("q-3", severity="urgent")])
    batch = push(gw, tenant, headers, body)
    assert batch["status"] == "partiallySucceeded"
    assert batch["counts"]["received"] == 3 and batch["counts"]["created"] == 1
    assert batch["counts"]["rejected"] == 2
    assert [(r["position"], r["providerId"]) for r in batch["rejections"]] == [("findings[1]", "q-2"),
                                                                             ("findings[2]", "q-3")]
    assert "resource" in batch["rejections"][0]["reason"] and "severity" in batch["rejections"][1]["reason"]
    assert len(findings_of(gw, tenant, headers)) == 1


def test_paging_with_next_link_returns_every_row_once(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    push(gw, tenant, headers, document([finding(f"q-{i}", cves=[f"CVE-2024-{2000 + i}"],
                                                severity=["low", "high", "critical"][i % 3]) for i in range(57)]))
    seen = []
    url = f"/api/v1/tenants/{tenant}/security/findings?$top=10&$orderby=severity desc"
    while url:
        page = gw.http.get(url, headers=headers).get_json()
        seen.extend(page["value"])
        url = page.get("@odata.nextLink")
        if url:
            url = url.split("localhost", 1)[1]
    assert len(seen) == 57 and len({row["id"] for row in seen}) == 57
    ranks = {"low": 1, "high": 3, "critical": 4}
    assert [ranks[r["severity"]] for r in seen] == sorted((ranks[r["severity"]] for r in seen), reverse=True)


def test_two_scanners_one_resource_one_finding_resolved_when_both_fixed(gw):
    tenant = gw.tenant()
    qualys = gw.partner("Qualys", [tenant])
    tenable = gw.partner("Tenable", [tenant])
    # Qualys knows the host by IP + DNS name, Tenable by FQDN + IP + agent id.
    q = finding("qid-38739", host="DB-1.Example.com.", cves=["CVE-2024-3094"], severity="high")
    t = finding("db-1|171340|22/tcp", host="db-1.example.com", cves=["CVE-2024-3094"], severity="critical",
                resource={"fqdn": "db-1.example.com", "agentId": "5F0E-AB", "ipv4": ["10.0.0.5"]})
    push(gw, tenant, qualys, document([q]))
    push(gw, tenant, tenable, document([t]))
    [row] = findings_of(gw, tenant, qualys)
    assert sorted(s["provider"] for s in row["sources"]) == ["Qualys", "Tenable"]
    assert row["severity"] == "critical"  # the worst open source
    assert count(gw, Resource) == 1
    push(gw, tenant, qualys, document([dict(q, status="fixed", providerTimestamp="2024-05-01T00:00:00Z")]))
    [row] = findings_of(gw, tenant, qualys)
    assert row["state"] != "resolved"  # Tenable still reports it open
    push(gw, tenant, tenable, document([dict(t, status="fixed", providerTimestamp="2024-05-02T00:00:00Z")]))
    [row] = findings_of(gw, tenant, qualys)
    assert row["state"] == "resolved"
    assert {s["state"] for s in row["sources"]} == {"fixed"}


def test_non_ascii_digits_are_refused_cleanly(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    assert gw.http.get(f"/api/v1/tenants/{tenant}/security/findings?$top=²",
                       headers=headers).status_code == 400
    assert gw.http.get(f"/api/v1/tenants/{tenant}/security/findings/²", headers=headers).status_code == 404
    assert gw.http.get(f"/api/v1/tenants/{tenant}/batches/٣", headers=headers).status_code == 404
    assert gw.http.get(f"/api/v1/tenants/{tenant}/security/findings?$filter=resourceId eq '²'",
                       headers=headers).status_code == 400


def test_alerts_in_a_findings_format_need_the_alerts_write_scope(gw):
    """An OCSF push is a findings push; its Detection findings are alerts, landed only for a
    client that may write alerts.  The other records land either way."""
    import json

    from gateway.models import Alert
    from tests.connectors.test_ocsf import THREAT, VULNERABILITY

    tenant = gw.tenant()
    body = json.dumps([VULNERABILITY, THREAT]).encode()
    narrow = gw.partner("Prowler", [tenant], scopes="findings.write security.read")
    batch = push(gw, tenant, narrow, body, format="ocsf")
    assert batch["status"] == "partiallySucceeded"
    assert batch["counts"]["rejected"] == 1 and batch["counts"]["created"] == 1
    assert batch["rejections"][0]["reason"] == "an alert record needs a client with the alerts.write scope"
    assert count(gw, Alert) == 0 and count(gw, Finding) == 1

    wide = gw.partner("Prowler", [tenant])  # findings.write and alerts.write
    batch = push(gw, tenant, wide, body, format="ocsf")
    assert batch["status"] == "succeeded" and batch["counts"]["rejected"] == 0
    assert count(gw, Alert) == 1


# -- concurrent batches of one tenant (PostgreSQL) ---------------------------------------------


def _stored_batch(gw, tenant: str, provider: str, body: bytes, format_name: str = "canonical") -> int:
    from gateway.ingest import Push, store_batch
    from gateway.models import OAuthClient, Tenant

    gw.partner(provider, [tenant])
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        client_pk = session.scalar(select(func.max(OAuthClient.id)).where(OAuthClient.provider == provider))
    push = Push(tenant_id=tenant_id, client_pk=client_pk, provider=provider, format=format_name,
                content_type="application/json", content_encoding="identity", declared_length=len(body),
                scan_type="incremental", idempotency_key=None)
    return store_batch(gw.db, push, body)[0].id


def _race(monkeypatch, method: str, first_batch, run_first) -> None:
    """Run ``run_first`` (another batch's whole merge, committed) the first time ``method`` of the
    findings merger is called: after this batch read the stored sources, before it writes."""
    from gateway.merge.findings import FindingMerger

    original = getattr(FindingMerger, method)
    state = {"done": False}

    def hooked(self, *args, **kwargs):
        if not state["done"] and self.batch_id != first_batch:
            state["done"] = True
            run_first()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FindingMerger, method, hooked)


def test_a_source_inserted_by_a_concurrent_batch_is_merged_as_an_update_without_a_retry(pg_gw, monkeypatch):
    """Batch B reads the stored sources, then batch A inserts and commits the same records, then B
    writes: B's inserts lose the race.  B must not fail (no unique violation, no retry): each of its
    records is merged as what it now is against A's row (updated, stale or unchanged), and B's own
    new records are created; one finding and one "new" event per (host, CVE), the newest push
    wins everywhere."""
    from gateway.models import Batch, Recommendation
    from gateway.pipeline import process_batch

    gw = pg_gw
    tenant = gw.tenant()
    first = [finding("r-newer", cves=["CVE-2024-0001"], ts="2024-04-01T00:00:00Z", severity="low"),
             finding("r-older", cves=["CVE-2024-0002"], ts="2024-04-03T00:00:00Z", severity="critical"),
             finding("r-same", cves=["CVE-2024-0003"]),
             finding("r-moved-older", host="x.example.com", cves=["CVE-2024-0005"],
                     ts="2024-04-03T00:00:00Z")]
    second = [finding("r-newer", cves=["CVE-2024-0001"], ts="2024-04-02T00:00:00Z", severity="high"),
              finding("r-older", cves=["CVE-2024-0002"], ts="2024-04-02T00:00:00Z", severity="low"),
              finding("r-same", cves=["CVE-2024-0003"]),
              finding("r-only-b", cves=["CVE-2024-0004"]),
              finding("r-moved-older", host="y.example.com", cves=["CVE-2024-0005"],
                      ts="2024-04-02T00:00:00Z")]
    # the tenant's recommendation type exists: B's transaction holds no lock A's merge needs
    setup = _stored_batch(gw, tenant, "Qualys", document([finding("r-setup", host="z.example.com",
                                                                  cves=["CVE-2024-0099"])]))
    assert process_batch(gw.db, setup) == "succeeded"
    batch_a = _stored_batch(gw, tenant, "Qualys", document(first))
    batch_b = _stored_batch(gw, tenant, "Qualys", document(second))
    _race(monkeypatch, "_ensure_findings", batch_a, lambda: process_batch(gw.db, batch_a))

    assert process_batch(gw.db, batch_b) == "succeeded"
    with gw.db.sessions() as session:
        a, b = (session.get(Batch, batch_id) for batch_id in (batch_a, batch_b))
        assert a.status == "succeeded" and a.counts["created"] == 4
        assert b.attempts == 1
        assert {k: b.counts[k] for k in ("created", "updated", "stale", "unchanged")} == \
            {"created": 1, "updated": 1, "stale": 2, "unchanged": 1}
        sources = {s.provider_id: s for s in session.scalars(select(FindingSource))}
        assert len(sources) == 6
        assert sources["r-newer"].severity == "high" and sources["r-newer"].batch_id == batch_b
        assert sources["r-older"].severity == "critical" and sources["r-older"].batch_id == batch_a
        findings = session.scalars(select(Finding)).all()
        assert sorted(f.correlation_key for f in findings) == \
            [f"CVE-2024-00{i:02d}" for i in (1, 2, 3, 4, 5, 99)]
        by_key = {f.correlation_key: f for f in findings}
        assert by_key["CVE-2024-0001"].severity == "high" and by_key["CVE-2024-0002"].severity == "critical"
        # B's stale report of a record A put on another host leaves no finding on B's host
        [resource_x] = session.scalars(select(Resource.id).where(Resource.name == "x.example.com")).all()
        assert by_key["CVE-2024-0005"].resource_id == resource_x
        new_events = session.execute(
            select(LifecycleEvent.subject_id, LifecycleEvent.batch_id).where(
                LifecycleEvent.subject_type == "finding", LifecycleEvent.event == "new")).all()
        assert sorted(subject for subject, _ in new_events) == sorted(f.id for f in findings)
        assert {batch for subject, batch in new_events if subject == by_key["CVE-2024-0004"].id} == {batch_b}
        by_b = session.execute(select(LifecycleEvent.subject_id, LifecycleEvent.event).where(
            LifecycleEvent.subject_type == "finding", LifecycleEvent.batch_id == batch_b)).all()
        assert sorted(by_b) == sorted([(by_key["CVE-2024-0001"].id, "active"),  # seen again, changed
                                       (by_key["CVE-2024-0004"].id, "new")])
        assert len(session.scalars(select(Recommendation)).all()) == 3  # hosts db-1, x and z: not y


def test_an_alert_inserted_by_a_concurrent_batch_is_merged_as_an_update_without_a_retry(pg_gw, monkeypatch):
    import json

    from gateway.merge.alerts import AlertMerger
    from gateway.models import Alert, Batch
    from gateway.pipeline import process_batch

    gw = pg_gw
    tenant = gw.tenant()

    def alerts(title: str, modified: str) -> bytes:
        return json.dumps({"value": [{
            "id": f"alert-{i}", "title": f"{title} {i}", "severity": "high", "status": "newAlert",
            "createdDateTime": "2024-04-01T10:00:00Z", "lastModifiedDateTime": modified,
            "vendorInformation": {"provider": "Contoso", "vendor": "C"}} for i in range(3)]}).encode()

    batch_a = _stored_batch(gw, tenant, "Contoso", alerts("first", "2024-04-01T11:00:00Z"), "graph_alert")
    batch_b = _stored_batch(gw, tenant, "Contoso", alerts("second", "2024-04-01T12:00:00Z"), "graph_alert")
    original = AlertMerger.__init__
    state = {"done": False}

    class Racing:
        """B's connection: A's merge runs and commits just before B's first INSERT into alerts."""

        def __init__(self, conn) -> None:
            self.conn = conn

        def execute(self, statement, *args, **kwargs):
            if not state["done"] and getattr(getattr(statement, "table", None), "name", None) == "alerts" \
                    and statement.is_insert:
                state["done"] = True
                assert process_batch(gw.db, batch_a) == "succeeded"
            return self.conn.execute(statement, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    def init(self, conn, tenant_id, provider, batch_id, cause):
        original(self, Racing(conn) if batch_id == batch_b else conn, tenant_id, provider, batch_id, cause)

    monkeypatch.setattr(AlertMerger, "__init__", init)
    assert process_batch(gw.db, batch_b) == "succeeded"
    with gw.db.sessions() as session:
        b = session.get(Batch, batch_b)
        assert b.attempts == 1 and b.counts["created"] == 0 and b.counts["updated"] == 3
        assert sorted(a.title for a in session.scalars(select(Alert))) == [f"second {i}" for i in range(3)]
        events = session.execute(select(LifecycleEvent.event, func.count()).where(
            LifecycleEvent.subject_type == "alert").group_by(LifecycleEvent.event)).all()
        assert dict(events) == {"new": 3, "updated": 3}


def test_two_scanners_fixing_one_finding_at_once_resolve_it(pg_gw, monkeypatch):
    """Qualys and Tenable report the same finding fixed in two batches merged at the same moment.
    Each batch recomputes the finding from its sources; the one that commits last must see the
    other's source (the finding is locked before its sources are read), or it writes the state
    it computed without it and the finding stays open for good (a lost update)."""
    import threading

    from sqlalchemy import text

    from gateway.merge import findings as merge_findings
    from gateway.pipeline import process_batch
    from tests.conftest import wait_for

    gw = pg_gw
    tenant = gw.tenant()
    q = finding("q-1", cves=["CVE-2024-3094"], ts="2024-04-01T00:00:00Z")
    t = finding("t-1", cves=["CVE-2024-3094"], ts="2024-04-01T00:00:00Z")
    for provider, item in (("Qualys", q), ("Tenable", t)):
        assert process_batch(gw.db, _stored_batch(gw, tenant, provider, document([item]))) == "succeeded"
    batch_a = _stored_batch(gw, tenant, "Qualys", document([dict(q, status="fixed",
                                                                 providerTimestamp="2024-05-01T00:00:00Z")]))
    batch_b = _stored_batch(gw, tenant, "Tenable", document([dict(t, status="fixed",
                                                                  providerTimestamp="2024-05-01T00:00:00Z")]))
    original_refresh = merge_findings.FindingMerger._refresh_findings
    original_aggregate = merge_findings._aggregate
    state = {"in_b": False, "thread": None}

    def refresh(self, *args, **kwargs):
        state["in_b"] = self.batch_id == batch_b
        return original_refresh(self, *args, **kwargs)

    def waiting() -> bool:
        with gw.db.engine.connect() as conn:
            return bool(conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                          "current_database() AND wait_event_type = 'Lock'")).scalar())

    def aggregate(sources):
        if state["in_b"] and state["thread"] is None:  # B has read the sources: A merges now
            state["thread"] = threading.Thread(target=process_batch, args=(gw.db, batch_a))
            state["thread"].start()
            wait_for(lambda: not state["thread"].is_alive() or waiting(), timeout=30)
        return original_aggregate(sources)

    monkeypatch.setattr(merge_findings.FindingMerger, "_refresh_findings", refresh)
    monkeypatch.setattr(merge_findings, "_aggregate", aggregate)
    assert process_batch(gw.db, batch_b) == "succeeded"
    state["thread"].join(timeout=60)
    with gw.db.sessions() as session:
        [row] = session.scalars(select(Finding)).all()
        assert {s.state for s in session.scalars(select(FindingSource))} == {"fixed"}
        assert row.state == "resolved"
        events = session.scalars(select(LifecycleEvent.event).where(
            LifecycleEvent.subject_type == "finding").order_by(LifecycleEvent.id)).all()
        assert events == ["new", "active", "resolved"]  # as if B had merged first, then A
