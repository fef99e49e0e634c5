"""The whole path over real parts: HTTP socket -> PostgreSQL -> Redis -> celery worker -> query."""

from __future__ import annotations

import time

import requests
from sqlalchemy import func, select

from gateway.models import Batch, Finding, FindingSource, Resource
from tests.conftest import Worker, wait_for
from tests.factories import document, finding, gz
from workers.tasks import requeue


def _token_headers(gw, tenant, provider="Qualys"):
    return gw.partner(provider, [tenant])


def _wait_final(server, tenant, batch_id, headers, timeout=90):
    def final():
        body = requests.get(f"{server.url}/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers,
                            timeout=10).json()
        return body if body["status"] in ("succeeded", "partiallySucceeded", "failed") else None

    return wait_for(final, timeout=timeout)


def test_push_over_http_is_merged_by_the_worker(pg_gw, live_server, worker):
    tenant = pg_gw.tenant()
    headers = _token_headers(pg_gw, tenant)
    body = document([finding(f"q-{i}", host=f"h{i % 7}.example.com", cves=[f"CVE-2024-{3000 + i}"],
                             severity=["medium", "high"][i % 2]) for i in range(300)])
    response = requests.post(f"{live_server.url}/api/v1/tenants/{tenant}/batches?format=canonical",
                             data=gz(body), headers=headers | {"Content-Type": "application/json",
                                                               "Content-Encoding": "gzip"}, timeout=30)
    assert response.status_code == 202, response.text
    batch = _wait_final(live_server, tenant, response.json()["id"], headers)
    assert batch["status"] == "succeeded"
    assert batch["counts"]["received"] == 300 and batch["counts"]["created"] == 300
    page = requests.get(f"{live_server.url}/api/v1/tenants/{tenant}/security/findings",
                        params={"$filter": "severity eq 'high'",
                                "$top": "1000"}, headers=headers, timeout=10).json()
    assert len(page["value"]) == 150
    assert all(row["severity"] == "high" and row["sources"][0]["provider"] == "Qualys" for row in page["value"])
    resources = requests.get(f"{live_server.url}/api/v1/tenants/{tenant}/security/resources", headers=headers,
                             timeout=10).json()["value"]
    assert len(resources) == 7
    assert {r["identifiers"]["fqdn"][0] for r in resources} == {f"h{i}.example.com" for i in range(7)}


def test_worker_killed_mid_merge_completes_once_after_restart(pg_gw, live_server, redis_clean):
    tenant = pg_gw.tenant()
    headers = _token_headers(pg_gw, tenant)
    count = 20000
    body = document([finding(f"q-{i}", host=f"h{i % 50}.example.com", cves=[f"CVE-2024-{10000 + i}"])
                     for i in range(count)])
    response = requests.post(f"{live_server.url}/api/v1/tenants/{tenant}/batches?format=canonical",
                             data=body, headers=headers | {"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 202
    batch_id = int(response.json()["id"])

    def status():
        with pg_gw.db.sessions() as session:
            return session.scalar(select(Batch.status).where(Batch.id == batch_id))

    first = Worker(pg_gw.app.config["DATABASE_URL"], extra_env={"GATEWAY_LEASE_SECONDS": "3"})
    try:
        wait_for(lambda: status() == "processing", timeout=60, interval=0.05)
        time.sleep(1.0)  # well inside the merge: 20,000 findings in chunks of 50
        assert status() == "processing"
    finally:
        first.kill()
    with pg_gw.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Finding)) == 0  # nothing half-merged

    second = Worker(pg_gw.app.config["DATABASE_URL"])
    try:
        with pg_gw.app.app_context():
            # The dead worker's lease is still live for a moment: the sweep leaves the batch
            # alone, then takes it once the lease has expired (nobody renews it).
            assert requeue(pg_gw.db, older_than_seconds=0) == 0
            wait_for(lambda: requeue(pg_gw.db, older_than_seconds=0) == 1, timeout=10, interval=0.5)
        batch = _wait_final(live_server, tenant, batch_id, headers, timeout=180)
    finally:
        second.stop()
    assert batch["status"] == "succeeded"
    assert batch["counts"]["created"] == count and batch["attempts"] >= 2
    with pg_gw.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Finding)) == count
        assert session.scalar(select(func.count()).select_from(FindingSource)) == count
        assert session.scalar(select(func.count(func.distinct(FindingSource.provider_id)))) == count
        assert session.scalar(select(func.count()).select_from(Resource)) == 50  # none twice


def test_concurrent_batches_of_one_tenant_agree_on_resources_findings_and_recommendations(
        pg_gw, live_server, redis_clean):
    """Two worker processes merge six batches of one tenant at once, from two scanners that
    report the same CVEs on the same new hosts: each host becomes one resource (resolved in
    short transactions of their own), each (host, CVE) one finding with two sources and one
    "new" event, and each host's recommendation counts both scanners' findings."""
    from gateway.models import LifecycleEvent, Recommendation

    tenant = pg_gw.tenant()
    scanners = {name: _token_headers(pg_gw, tenant, provider=name) for name in ("Qualys", "Tenable")}
    bodies = []
    for k in range(3):
        items = [finding(f"{k}-{j}", host=f"h{j % 10}.example.com", cves=[f"CVE-2024-{1000 + 100 * k + j}"])
                 for j in range(100)]
        bodies += [(name, document(items)) for name in scanners]
    process = Worker(pg_gw.app.config["DATABASE_URL"], concurrency=2)
    try:
        ids = []
        for name, body in bodies:
            response = requests.post(f"{live_server.url}/api/v1/tenants/{tenant}/batches?format=canonical",
                                     data=body, headers=scanners[name] | {"Content-Type": "application/json"},
                                     timeout=30)
            assert response.status_code == 202, response.text
            ids.append((name, response.json()["id"]))
        results = [_wait_final(live_server, tenant, batch_id, scanners[name]) for name, batch_id in ids]
    finally:
        process.stop()
    assert [r["status"] for r in results] == ["succeeded"] * 6
    assert sum(r["counts"]["created"] for r in results) == 600
    with pg_gw.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Resource)) == 10
        assert session.scalar(select(func.count()).select_from(Finding)) == 300
        assert session.scalar(select(func.count()).select_from(FindingSource)) == 600
        per_finding = session.execute(
            select(FindingSource.finding_id, func.count()).group_by(FindingSource.finding_id)).all()
        assert {n for _, n in per_finding} == {2}
        new_events = session.execute(
            select(LifecycleEvent.subject_id, func.count()).where(
                LifecycleEvent.subject_type == "finding", LifecycleEvent.event == "new")
            .group_by(LifecycleEvent.subject_id)).all()
        assert len(new_events) == 300 and {n for _, n in new_events} == {1}
        recommendations = session.execute(select(Recommendation.status)).scalars().all()
        assert recommendations == ["Unhealthy"] * 10
