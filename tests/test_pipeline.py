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


def _logged_worker(database_url: str, log_path, concurrency: int = 2):
    """A real celery worker like ``tests.conftest.Worker``, whose log goes to ``log_path``."""
    import os
    import subprocess
    import sys
    import uuid

    from tests.conftest import QUEUE, REDIS_URL, ROOT, SECRET

    env = dict(os.environ, GATEWAY_DATABASE_URL=database_url, GATEWAY_BROKER_URL=REDIS_URL,
               GATEWAY_TASK_QUEUE=QUEUE, GATEWAY_SECRET_KEY=SECRET, GATEWAY_MERGE_CHUNK_SIZE="50",
               PYTHONPATH=str(ROOT))
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel=INFO",
         f"--concurrency={concurrency}", "--without-gossip", "--without-mingle", "--without-heartbeat",
         "-n", f"test-{uuid.uuid4().hex[:6]}@%h"],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def _stop(process, log) -> None:
    import os
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    log.close()


def test_concurrent_batches_overlapping_in_new_records_need_no_retry_for_unique_violations(
        pg_gw, live_server, redis_clean, tmp_path):
    """Sixteen batches of one tenant, merged two at a time, each sharing half its records with the
    next (new records, most of them, from the same scanner): a record two batches create at once
    is one source, inserted by one and merged as an update (or a stale report) by the other, with
    no unique violation and so no retry.  A deadlock between two batches can still be retried
    (their chunks lock rows in different orders): every retry must be one.  Whatever the order,
    the store ends as the pushes say: one finding per (host, CVE) with one "new" event, one source
    per record holding its newest push, and each finding's state and fields those of its sources."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.merge.findings import _aggregate
    from gateway.models import LifecycleEvent

    tenant = pg_gw.tenant()
    scanners = {name: _token_headers(pg_gw, tenant, provider=name) for name in ("Qualys", "Tenable")}
    batches, per_batch, stride = 16, 100, 50
    work, newest = [], {}
    for k in range(batches):
        provider = ("Qualys", "Tenable")[(k // 2) % 2]
        ts = f"2024-04-01T00:{k:02d}:00Z"
        items = [finding(f"r-{j}", host=f"h{j % 10}.example.com", cves=[f"CVE-2024-{20000 + j}"],
                         severity=("low", "medium", "high", "critical")[(j + k) % 4],
                         status="fixed" if (j + k) % 3 == 0 else "open", ts=ts, description=f"batch {k}")
                 for j in range(k * stride, k * stride + per_batch)]
        for j in range(k * stride, k * stride + per_batch):
            newest[(provider, f"r-{j}")] = k
        work.append((provider, document(items)))
    process, log = _logged_worker(pg_gw.app.config["DATABASE_URL"], tmp_path / "worker.log")
    try:
        def push(item):
            provider, body = item
            response = requests.post(f"{live_server.url}/api/v1/tenants/{tenant}/batches?format=canonical",
                                     data=body, timeout=30,
                                     headers=scanners[provider] | {"Content-Type": "application/json"})
            assert response.status_code == 202, response.text
            return provider, response.json()["id"]

        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(push, work))
        results = [_wait_final(live_server, tenant, batch_id, scanners[name], timeout=180)
                   for name, batch_id in ids]
    finally:
        _stop(process, log)
    lines = (tmp_path / "worker.log").read_text(errors="replace").splitlines()
    assert not [line for line in lines if "duplicate key" in line or "UniqueViolation" in line]
    retried = [line for line in lines if "transient error" in line]
    assert all("deadlock detected" in line for line in retried), retried
    assert sum(r["attempts"] - 1 for r in results) == len(retried)
    assert [r["status"] for r in results] == ["succeeded"] * batches
    totals = {key: sum(r["counts"][key] for r in results)
              for key in ("created", "updated", "stale", "unchanged")}
    assert totals["created"] == len(newest) and sum(totals.values()) == batches * per_batch
    with pg_gw.db.sessions() as session:
        findings = session.scalars(select(Finding)).all()
        assert len(findings) == len({(f.resource_id, f.correlation_key) for f in findings}) == \
            len({j for _, j in newest})
        sources = session.scalars(select(FindingSource)).all()
        assert len(sources) == len(newest)
        assert all(s.description == f"batch {newest[(s.provider, s.provider_id)]}" for s in sources)
        by_finding: dict[int, list] = {}
        for s in sources:
            by_finding.setdefault(s.finding_id, []).append(
                {c.name: getattr(s, c.name) for c in FindingSource.__table__.columns})
        for f in findings:
            expected = _aggregate(by_finding[f.id])
            assert (f.state == "resolved", f.severity, f.description) == \
                (not expected["open"], expected["severity"], expected["description"]), f.id
        new_events = session.execute(
            select(LifecycleEvent.subject_id, func.count()).where(
                LifecycleEvent.subject_type == "finding", LifecycleEvent.event == "new")
            .group_by(LifecycleEvent.subject_id)).all()
        assert len(new_events) == len(findings) and {n for _, n in new_events} == {1}
