"""One big batch merged by several real worker processes (gateway/merge/parallel.py, issue 14 item 2).

Each test pushes the same files to two tenants: one merged as today by one worker (the parallel
merge off), one staged in chunks merged by two worker processes; the store must read the same
through the API (findings, resources, recommendations, batches) and hold the same lifecycle
events (the export outbox), with ids, times and batch numbers set aside.
"""

from __future__ import annotations

import re
from collections import Counter

from sqlalchemy import func, select

from gateway.models import Batch, BatchMergeChunk, Finding, FindingSource, LifecycleEvent, Tenant
from gateway.pipeline import process_batch
from tests.conftest import QUEUE, REDIS_URL, Worker, wait_for
from tests.factories import document, finding
from workers.tasks import requeue

# staged whatever the live merge slots (a test's second worker may not have announced itself yet)
PARALLEL = {"GATEWAY_PARALLEL_MERGE_MIN_BYTES": "1", "GATEWAY_PARALLEL_MERGE_CHUNK_RECORDS": "150",
            "GATEWAY_PARALLEL_MERGE_MIN_SLOTS": "1"}
SINGLE = {"GATEWAY_PARALLEL_MERGE_MIN_BYTES": "0"}
TERMINAL = ("succeeded", "partiallySucceeded", "failed")


def _first_push(hosts: int = 24, per_host: int = 40) -> bytes:
    """Hosts one after the other (chunks are cut between them), plus what must go to the tail:
    a host named again at the end, a provider record repeated, and records the store refuses."""
    items = []
    for h in range(hosts):
        for j in range(per_host):
            cves = [f"CVE-2024-{1000 + j}"] + ([f"CVE-2023-{2000 + j}"] if j % 7 == 0 else [])
            items.append(finding(f"h{h}/p{j}", host=f"h{h}.example.com", cves=cves,
                                 severity=["low", "medium", "high", "critical"][(h + j) % 4],
                                 status="fixed" if (h * j) % 11 == 5 else "open"))
    items += [finding(f"h3/late{j}", host="h3.example.com", cves=[f"CVE-2022-{3000 + j}"]) for j in range(5)]
    items.append(finding("h1/p2", host="h1.example.com", cves=["CVE-2024-1002"], evidence="seen again"))
    items += [finding(f"bad-{j}", host="h2.example.com", title="NUL \u0000 inside") for j in range(3)]
    return document(items)


def _full_scan(hosts: int = 12, per_host: int = 40) -> bytes:
    """A full scan of half the hosts: some findings gone (resolved), some changed, one new."""
    items = []
    for h in range(hosts):
        for j in range(per_host):
            if j % 5 == 4:
                continue  # absent from the full scan: resolved
            cves = [f"CVE-2024-{1000 + j}"] + ([f"CVE-2023-{2000 + j}"] if j % 7 == 0 else [])
            items.append(finding(f"h{h}/p{j}", host=f"h{h}.example.com", cves=cves,
                                 severity="critical" if j % 6 == 0 else ["low", "medium", "high", "critical"][(h + j) % 4],
                                 ts="2024-05-01T00:00:00Z"))
        items.append(finding(f"h{h}/new", host=f"h{h}.example.com", cves=["CVE-2025-0001"], ts="2024-05-01T00:00:00Z"))
    return document(items, scan="full")


def _push(gw, tenant: str, headers: dict, body: bytes) -> int:
    response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical", data=body,
                            headers=headers | {"Content-Type": "application/json"})
    assert response.status_code == 202, response.get_json()
    return int(response.get_json()["id"])


def _batch(gw, tenant: str, headers: dict, batch_id: int) -> dict:
    return gw.http.get(f"/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers).get_json()


def _final(gw, tenant: str, headers: dict, batch_id: int, timeout: float = 240) -> dict:
    return wait_for(lambda: (lambda b: b if b["status"] in TERMINAL else None)(_batch(gw, tenant, headers, batch_id)),
                    timeout=timeout, interval=0.2)


def _local(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1] if url else ""


def _read_all(gw, tenant: str, headers: dict, collection: str) -> list[dict]:
    rows, url = [], f"/api/v1/tenants/{tenant}/security/{collection}?$top=1000"
    while url:
        page = gw.http.get(url, headers=headers).get_json()
        assert "value" in page, page
        rows += page["value"]
        url = _local(page.get("@odata.nextLink", "")) or None
    return rows


def _comparable(value):
    """A read-API answer without what two tenants and two batches never share (ids, times, links)."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()
                if not (k == "id" or k.endswith(("Id", "Ids", "DateTime", "Url", "At", "Evaluated"))
                        or k in ("tenant", "progress", "attempts", "idempotencyKey"))}
    if isinstance(value, list):
        return sorted((_comparable(v) for v in value), key=repr)
    if isinstance(value, str):
        return re.sub(r"batch \d+", "batch N", value)
    return value


def _events(gw, tenant: str) -> Counter:
    """The tenant's lifecycle events (the export outbox), by subject's natural key, event and details."""
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        keys = dict(session.execute(select(Finding.id, Finding.correlation_key)
                                    .where(Finding.tenant_id == tenant_id)).all())
        rows = session.execute(select(LifecycleEvent.subject_type, LifecycleEvent.subject_id, LifecycleEvent.event,
                                      LifecycleEvent.cause, LifecycleEvent.actor, LifecycleEvent.details)
                               .where(LifecycleEvent.tenant_id == tenant_id)).all()
    return Counter((kind, keys.get(subject) if kind == "finding" else kind, event,
                    re.sub(r"batch \d+", "batch N", cause), actor, repr(_comparable(details)))
                   for kind, subject, event, cause, actor, details in rows)


def _snapshot(gw, tenant: str, headers: dict, batch_ids: list[int]) -> dict:
    return {
        "findings": _comparable(_read_all(gw, tenant, headers, "findings")),
        "resources": _comparable(_read_all(gw, tenant, headers, "resources")),
        "recommendations": _comparable(_read_all(gw, tenant, headers, "recommendations")),
        "batches": [_comparable(_batch(gw, tenant, headers, b)) for b in batch_ids],
        "events": _events(gw, tenant),
    }


def _merge_with(gw, env: dict, processes: int, tenant: str, headers: dict, bodies: list[bytes]) -> list[dict]:
    workers = [Worker(gw.app.config["DATABASE_URL"], extra_env=env) for _ in range(processes)]
    try:
        results = []
        for body in bodies:  # one after the other, as a scanner pushes them
            results.append(_final(gw, tenant, headers, _push(gw, tenant, headers, body)))
        return results
    finally:
        for process in workers:
            process.stop()


def _both_ways(gw, env: dict, bodies: list[bytes]) -> tuple[tuple[str, str], dict, list[dict], list[dict]]:
    """The same pushes merged by one worker (parallel merge off) into one tenant and by two worker
    processes with ``env`` into another: (the two tenants, their headers, reference, results)."""
    single, parallel = gw.tenant(), gw.tenant()
    headers = {name: gw.partner("Qualys", [name]) for name in (single, parallel)}
    reference = _merge_with(gw, SINGLE, 1, single, headers[single], bodies)
    results = _merge_with(gw, env, 2, parallel, headers[parallel], bodies)
    return (single, parallel), headers, reference, results


def test_two_workers_merge_a_big_batch_into_the_store_one_worker_makes(pg_gw, redis_clean):
    bodies = [_first_push(), _full_scan()]
    (single, parallel), headers, reference, results = _both_ways(pg_gw, PARALLEL, bodies)

    assert [r["status"] for r in results] == ["partiallySucceeded", "succeeded"]
    # the first push went in chunks (cut between hosts), the tail after them; progress says so
    progress = results[0]["progress"]
    assert progress["chunksTotal"] >= 5 and progress["chunksDone"] == progress["chunksTotal"] and progress["done"]
    assert "chunksTotal" not in (reference[0]["progress"] or {})
    first = results[0]["counts"]
    assert first["rejected"] == 3 and first["duplicatesInPush"] == 1 and first["created"] == 24 * 40 + 5
    assert results[1]["counts"]["resolved"] > 0 and results[1]["counts"]["updated"] > 0
    for mine, theirs in zip(results, reference, strict=True):
        assert _comparable(mine) == _comparable(theirs)

    expected = _snapshot(pg_gw, single, headers[single], [r["id"] for r in reference])
    actual = _snapshot(pg_gw, parallel, headers[parallel], [r["id"] for r in results])
    assert len(actual["findings"]) > 1000 and len(actual["resources"]) == 24
    for part in expected:
        assert actual[part] == expected[part], part
    with pg_gw.db.sessions() as session:  # staged chunks are gone once their batch is finished
        assert session.scalar(select(func.count()).select_from(BatchMergeChunk)) == 0


def _chunks(gw, batch_id: int) -> list:
    with gw.db.sessions() as session:
        return session.execute(select(BatchMergeChunk.seq, BatchMergeChunk.kind, BatchMergeChunk.state,
                                      BatchMergeChunk.lease_owner)
                               .where(BatchMergeChunk.batch_id == batch_id)).all()


def _doubled(session, tenant_id: int | None = None) -> list:
    """Provider records stored twice (by identity), and findings stored twice (by subject)."""
    s, f = FindingSource, Finding
    sources = select(s.provider_id, s.correlation_key).group_by(s.tenant_id, s.provider, s.provider_id,
                                                                s.correlation_key).having(func.count() > 1)
    findings = select(f.resource_id, f.correlation_key).group_by(f.tenant_id, f.resource_id,
                                                                f.correlation_key).having(func.count() > 1)
    if tenant_id is not None:
        sources, findings = sources.where(s.tenant_id == tenant_id), findings.where(f.tenant_id == tenant_id)
    return session.execute(sources).all() + session.execute(findings).all()


def test_workers_killed_mid_chunk_resume_from_the_chunks_done_without_doubles(pg_gw, redis_clean):
    big = _first_push(hosts=40, per_host=60)
    single, parallel = pg_gw.tenant(), pg_gw.tenant()
    headers = {name: pg_gw.partner("Qualys", [name]) for name in (single, parallel)}
    batch_id = _push(pg_gw, parallel, headers[parallel], big)
    env = PARALLEL | {"GATEWAY_PARALLEL_MERGE_CHUNK_RECORDS": "400", "GATEWAY_LEASE_SECONDS": "3"}
    first = [Worker(pg_gw.app.config["DATABASE_URL"], extra_env=env) for _ in range(2)]
    try:
        def mid_chunk():  # a chunk merged and committed, another one being merged right now
            rows = _chunks(pg_gw, batch_id)
            done = [r for r in rows if r.kind == "chunk" and r.state == "done"]
            running = [r for r in rows if r.kind == "chunk" and r.state == "pending" and r.lease_owner]
            return (done, running) if done and running else None

        done_before, running = wait_for(mid_chunk, timeout=180, interval=0.05)
    finally:
        for process in first:
            process.kill()
    # the tasks still queued are lost too (a broker restarted empty): the sweep alone resumes the batch
    redis_clean.delete(QUEUE)
    with pg_gw.db.sessions() as session:
        assert session.scalar(select(Batch.status).where(Batch.id == batch_id)) == "processing"
        merged = session.scalar(select(func.count()).select_from(FindingSource))
        assert 0 < merged < 40 * 60  # the chunks done are committed; the one killed mid-merge left nothing
        assert _doubled(session) == []
    assert {r.seq for r in done_before} <= {r.seq for r in _chunks(pg_gw, batch_id) if r.state == "done"}

    second = [Worker(pg_gw.app.config["DATABASE_URL"], extra_env=PARALLEL | {
        "GATEWAY_PARALLEL_MERGE_CHUNK_RECORDS": "400"}) for _ in range(2)]
    try:
        with pg_gw.app.app_context():
            # the dead workers' leases run out (nobody renews them), then the sweep sends the batch again
            wait_for(lambda: requeue(pg_gw.db, older_than_seconds=0) == 1, timeout=30, interval=0.5)
        result = _final(pg_gw, parallel, headers[parallel], batch_id)
    finally:
        for process in second:
            process.stop()
    assert result["status"] == "partiallySucceeded" and result["attempts"] >= 2

    # the reference: the same bytes merged once by one worker's code path, in this process
    reference_id = _push(pg_gw, single, headers[single], big)
    assert process_batch(pg_gw.db, reference_id, chunk_size=50) == "partiallySucceeded"
    expected = _snapshot(pg_gw, single, headers[single], [reference_id])
    actual = _snapshot(pg_gw, parallel, headers[parallel], [batch_id])
    for part in expected:
        assert actual[part] == expected[part], part
    with pg_gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == parallel))
        assert _doubled(session, tenant_id) == []
        assert result["counts"]["created"] == 40 * 60 + 5


def test_a_batch_below_the_threshold_merges_as_today(pg_gw, redis_clean):
    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Qualys", [tenant])
    body = _first_push(hosts=4, per_host=10)
    process = Worker(pg_gw.app.config["DATABASE_URL"],
                     extra_env=PARALLEL | {"GATEWAY_PARALLEL_MERGE_MIN_BYTES": str(len(body) + 1)})
    try:
        result = _final(pg_gw, tenant, headers, _push(pg_gw, tenant, headers, body))
    finally:
        process.stop()
    assert result["status"] == "partiallySucceeded" and "chunksTotal" not in result["progress"]
    assert result["counts"]["created"] == 4 * 10 + 5 and result["counts"]["duplicatesInPush"] == 1


def _nessus_with_a_bad_item() -> bytes:
    """30 hosts of 20 items (tests/bigfiles.py), one item of the 12th host without a pluginID."""
    from tests.bigfiles import nessus_hosts

    data = b"".join(nessus_hosts(findings=600, items_per_host=20))
    marker = b'<ReportHost name="10.0.0.11">'
    at = data.index(b' pluginID="100003"', data.index(marker))
    return data[:at] + data[at + len(b' pluginID="100003"'):]


def test_a_nessus_file_is_split_between_hosts_and_parsed_by_the_workers_that_merge_it(pg_gw, redis_clean):
    from pathlib import Path

    from gateway.merge.parallel import split_nessus

    real = (Path(__file__).parent / "fixtures" / "nessus_v2_xml" / "issue_6992.nessus").read_bytes()
    bodies = [_nessus_with_a_bad_item(), real]
    assert len(split_nessus(bodies[0], 150)) == 4  # cut between hosts, about 150 items each
    single, parallel = pg_gw.tenant(), pg_gw.tenant()
    headers = {name: pg_gw.partner("Tenable", [name]) for name in (single, parallel)}

    def merge_with(env, processes, tenant):
        workers = [Worker(pg_gw.app.config["DATABASE_URL"], extra_env=env) for _ in range(processes)]
        try:
            results = []
            for body in bodies:
                response = pg_gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=nessus", data=body,
                                           headers=headers[tenant] | {"Content-Type": "application/xml"})
                assert response.status_code == 202, response.get_json()
                results.append(_final(pg_gw, tenant, headers[tenant], int(response.get_json()["id"])))
            return results
        finally:
            for process in workers:
                process.stop()

    reference = merge_with(SINGLE, 1, single)
    results = merge_with(PARALLEL, 2, parallel)
    assert results[0]["status"] == "partiallySucceeded" and results[0]["progress"]["chunksTotal"] == 4
    assert results[0]["counts"]["rejected"] == 1 and results[0]["counts"]["received"] == 600
    # the rejected item's position names its host in the whole file, as one worker names it
    assert results[0]["rejections"][0]["position"] == reference[0]["rejections"][0]["position"]
    assert "ReportHost[12]" in results[0]["rejections"][0]["position"]
    assert results[1]["status"] == reference[1]["status"] and results[1]["counts"]["received"] > 0
    for mine, theirs in zip(results, reference, strict=True):
        assert _comparable(mine) == _comparable(theirs)
    expected = _snapshot(pg_gw, single, headers[single], [r["id"] for r in reference])
    actual = _snapshot(pg_gw, parallel, headers[parallel], [r["id"] for r in results])
    assert len(actual["findings"]) >= 599
    for part in expected:
        assert actual[part] == expected[part], part


# -- an interleaved file: every resource's records spread over the whole file -----------------

BUCKETED = PARALLEL | {"GATEWAY_PARALLEL_MERGE_CHUNK_RECORDS": "60", "GATEWAY_PARALLEL_MERGE_BUCKETS": "4"}


def _host(h: int) -> dict:
    return {"fqdn": f"rr{h}.example.com", "ipv4": [f"10.9.{h // 200}.{h % 200 + 1}"]}


def _interleaved(hosts: int = 30, per_host: int = 40, scan: str | None = None, skip: int = 0) -> bytes:
    """Round-robin over the hosts (``host = n % hosts``, as bench/million.py writes), so no cut
    between resources exists; plus a provider record repeated on its own host far later (a later
    chunk of its chain), some named again on another host (in another bucket: the tail), and
    records the store refuses."""
    items = []
    for j in range(per_host):
        for h in range(hosts):
            if skip and j % skip == skip - 1:
                continue  # absent from a full scan: resolved
            items.append(finding(f"rr{h}/p{j}", resource=_host(h), cves=[f"CVE-2024-{1000 + j}"],
                                 severity=["low", "medium", "high", "critical"][(h + j + bool(scan)) % 4],
                                 status="fixed" if (h * j) % 13 == 6 else "open",
                                 ts="2024-05-01T00:00:00Z" if scan else "2024-04-01T00:00:00Z"))
        if j == per_host // 2 and not scan:
            items += [finding(f"bad-{h}", resource=_host(h), title="NUL \u0000 inside") for h in range(3)]
    if not scan:
        items.append(finding("rr1/p2", resource=_host(1), cves=["CVE-2024-1002"], evidence="seen again"))
        items += [finding(f"rr{h}/p{h + 1}", resource=_host(h + 3), cves=[f"CVE-2024-{1001 + h}"],
                          evidence="moved") for h in range(2, 6)]
    return document(items, scan=scan)


def test_an_interleaved_file_merged_in_bucket_chains_by_two_workers_as_by_one(pg_gw, redis_clean):
    hosts, per_host = 30, 40
    bodies = [_interleaved(hosts, per_host), _interleaved(hosts // 2, per_host, scan="full", skip=5)]
    (single, parallel), headers, reference, results = _both_ways(pg_gw, BUCKETED, bodies)

    assert [r["status"] for r in results] == ["partiallySucceeded", "succeeded"]
    # 1,200 records in 4 buckets of about 300: chains of several 60-record chunks each
    progress = results[0]["progress"]
    assert progress["chunksTotal"] >= 16 and progress["chunksDone"] == progress["chunksTotal"]
    assert progress["done"]
    assert "chunksTotal" not in (reference[0]["progress"] or {})
    first = results[0]["counts"]
    assert first["rejected"] == 3 and first["duplicatesInPush"] == 5 and first["created"] == hosts * per_host
    assert results[1]["counts"]["resolved"] > 0 and results[1]["counts"]["updated"] > 0
    for mine, theirs in zip(results, reference, strict=True):
        assert _comparable(mine) == _comparable(theirs)

    expected = _snapshot(pg_gw, single, headers[single], [r["id"] for r in reference])
    actual = _snapshot(pg_gw, parallel, headers[parallel], [r["id"] for r in results])
    assert len(actual["findings"]) >= hosts * per_host and len(actual["resources"]) == hosts
    for part in expected:
        assert actual[part] == expected[part], part
    with pg_gw.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(BatchMergeChunk)) == 0
        assert _doubled(session) == []


def test_a_worker_killed_mid_chunk_of_a_chain_resumes_without_doubles(pg_gw, redis_clean):
    hosts, per_host = 40, 60
    big = _interleaved(hosts, per_host)
    single, parallel = pg_gw.tenant(), pg_gw.tenant()
    headers = {name: pg_gw.partner("Qualys", [name]) for name in (single, parallel)}
    batch_id = _push(pg_gw, parallel, headers[parallel], big)
    env = BUCKETED | {"GATEWAY_PARALLEL_MERGE_CHUNK_RECORDS": "200", "GATEWAY_PARALLEL_MERGE_BUCKETS": "2"}
    first = [Worker(pg_gw.app.config["DATABASE_URL"], extra_env=env | {"GATEWAY_LEASE_SECONDS": "3"})
             for _ in range(2)]
    try:
        def mid_chain():  # a chunk of a chain being merged after the chunk before it in its chain
            with pg_gw.db.sessions() as session:
                rows = session.execute(select(BatchMergeChunk.seq, BatchMergeChunk.state,
                                              BatchMergeChunk.after_seq, BatchMergeChunk.lease_owner)
                                       .where(BatchMergeChunk.batch_id == batch_id)).all()
            done = {r.seq for r in rows if r.state == "done"}
            running = [r for r in rows if r.state == "pending" and r.lease_owner and r.after_seq in done]
            return (done, running) if running else None

        done_before, running = wait_for(mid_chain, timeout=180, interval=0.02)
    finally:
        for process in first:
            process.kill()
    # the tasks still queued are lost too (a broker restarted empty): the sweep alone resumes the batch
    redis_clean.delete(QUEUE)
    with pg_gw.db.sessions() as session:
        assert session.scalar(select(Batch.status).where(Batch.id == batch_id)) == "processing"
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == parallel))
        merged = session.scalar(select(func.count()).select_from(FindingSource)
                                .where(FindingSource.tenant_id == tenant_id))
        assert 0 < merged < hosts * per_host  # the chunks done are committed; the one killed left nothing
        assert _doubled(session, tenant_id) == []
        chains = dict(session.execute(select(BatchMergeChunk.seq, BatchMergeChunk.after_seq)
                                      .where(BatchMergeChunk.batch_id == batch_id)).all())
    # every chunk but a chain's first waits for the one before it: no chunk was merged before its
    # predecessor (the chunk seen running may itself have committed just before the kill, so the
    # rule is checked over every chunk's state after the kill), and some are left to resume
    states = {r.seq: r.state for r in _chunks(pg_gw, batch_id)}
    assert running and all(states[after] == "done" for seq, after in chains.items()
                           if after is not None and states[seq] == "done")
    assert any(state != "done" for state in states.values())

    second = [Worker(pg_gw.app.config["DATABASE_URL"], extra_env=env) for _ in range(2)]
    try:
        with pg_gw.app.app_context():
            wait_for(lambda: requeue(pg_gw.db, older_than_seconds=0) == 1, timeout=30, interval=0.5)
        result = _final(pg_gw, parallel, headers[parallel], batch_id)
    finally:
        for process in second:
            process.stop()
    assert result["status"] == "partiallySucceeded" and result["attempts"] >= 2
    assert result["progress"]["chunksTotal"] > 2  # chains, not one chunk a bucket

    reference_id = _push(pg_gw, single, headers[single], big)
    assert process_batch(pg_gw.db, reference_id, chunk_size=50) == "partiallySucceeded"
    expected = _snapshot(pg_gw, single, headers[single], [reference_id])
    actual = _snapshot(pg_gw, parallel, headers[parallel], [batch_id])
    for part in expected:
        assert actual[part] == expected[part], part
    with pg_gw.db.sessions() as session:
        assert _doubled(session, tenant_id) == []
    assert result["counts"]["created"] == hosts * per_host and result["counts"]["duplicatesInPush"] == 5


# -- the resume's two races, in one process (no worker: chunks are merged by calling the code) ----


def _staged(gw, body: bytes, lease_seconds: int = 30):
    """A big batch staged in bucket chains by the batch's own code path: (batch id, settings, the
    chunks sent so far)."""
    from gateway.merge.parallel import Settings

    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    batch_id = _push(gw, tenant, headers, body)
    sent: list[int] = []
    settings = Settings(min_bytes=1, chunk_records=100, buckets=2, sub_chunk=50, max_rejections=100,
                        lease_seconds=lease_seconds, max_attempts=5,
                        dispatch=lambda _batch, seq: sent.append(seq))
    assert process_batch(gw.db, batch_id, parallel=settings, lease_seconds=lease_seconds) == "processing"
    return batch_id, settings, sent, (tenant, headers)


def test_a_chunk_claimed_after_the_batchs_last_renewal_keeps_the_sweep_away(pg_gw, redis_clean):
    """A worker that claims a chunk and dies before its first renewal: the sweep must not resend the
    batch while that chunk's lease is live, or the resumed task skips the chunk (its lease is not
    free) and the chain behind it waits for the next sweep."""
    from datetime import timedelta

    from gateway.merge.parallel import _claim_chunk
    from gateway.models import utcnow

    batch_id, settings, sent, _ = _staged(pg_gw, _interleaved(8, 40), lease_seconds=60)
    with pg_gw.db.engine.begin() as conn:  # the staging's lease has run out (its task ended long ago)
        conn.execute(Batch.__table__.update().where(Batch.id == batch_id)
                     .values(lease_expires_at=utcnow() - timedelta(seconds=1), enqueued_at=None))
    claimed, _ = _claim_chunk(pg_gw.db, batch_id, sent[0], "a-worker-that-dies", settings)
    assert claimed is not None
    with pg_gw.db.sessions() as session:
        batch_lease = session.scalar(select(Batch.lease_expires_at).where(Batch.id == batch_id))
        chunk_lease = session.scalar(select(BatchMergeChunk.lease_expires_at).where(
            BatchMergeChunk.batch_id == batch_id, BatchMergeChunk.seq == sent[0]))
    assert batch_lease >= chunk_lease > utcnow()
    with pg_gw.app.app_context():
        assert requeue(pg_gw.db, older_than_seconds=0) == 0
        with pg_gw.db.engine.begin() as conn:  # a later renewal never shortens it
            from gateway.merge.parallel import _extend_batch_lease

            _extend_batch_lease(conn, batch_id, utcnow())
        assert requeue(pg_gw.db, older_than_seconds=0) == 0


def test_a_finish_check_that_meets_a_held_batch_row_waits_and_finishes(pg_gw, redis_clean):
    """Every chunk merged, and the finish check finds the batch row held by a short transaction (a
    lease renewal, or another chunk's task that looked before the last commit and found a chunk
    pending): it must wait and finish the batch, not skip it and leave the batch processing with
    every chunk merged until the next sweep."""
    import threading
    import time

    from gateway.merge.parallel import finish_if_done, merge_chunk

    batch_id, settings, sent, (tenant, headers) = _staged(pg_gw, _interleaved(8, 40))
    chunks = BatchMergeChunk.__table__
    with pg_gw.db.engine.begin() as conn:  # the tail set aside: the chunks' own finish checks find it missing
        tail = conn.execute(select(chunks).where(chunks.c.batch_id == batch_id,
                                                 chunks.c.kind == "tail")).one()
        conn.execute(chunks.delete().where(chunks.c.batch_id == batch_id, chunks.c.kind == "tail"))
    outcomes = []
    while sent:  # in chain order: each chunk's task sends its successor
        outcomes.append(merge_chunk(pg_gw.db, batch_id, sent.pop(0), settings))
    assert outcomes and set(outcomes) == {"done"}
    assert {r.state for r in _chunks(pg_gw, batch_id)} == {"done"}
    with pg_gw.db.engine.begin() as conn:
        conn.execute(chunks.insert().values(**tail._mapping))
    finished: list = []
    with pg_gw.db.engine.connect() as holder:
        holder.execute(select(Batch.id).where(Batch.id == batch_id).with_for_update())
        thread = threading.Thread(
            target=lambda: finished.append(finish_if_done(pg_gw.db, batch_id, settings)))
        thread.start()
        time.sleep(1.0)  # the finish check meets the held row
        holder.rollback()
    thread.join(timeout=120)
    assert finished == ["partiallySucceeded"]
    result = _batch(pg_gw, tenant, headers, batch_id)
    assert result["status"] == "partiallySucceeded" and result["counts"]["created"] == 8 * 40


def test_a_split_part_reads_its_hosts_from_the_stored_pieces_across_their_edges(pg_gw, redis_clean):
    """A Nessus part is staged as offsets into the batch's body, read back from the 1 MiB pieces
    it spans (here pieces of 7 bytes): every range, within one piece or across several, is the
    body's slice."""
    from gateway.merge.parallel import _read_range
    from gateway.models import BatchBlob

    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Tenable", [tenant])
    batch_id = _push(pg_gw, tenant, headers, document([finding("r/1", host="r.example.com")]))  # no worker
    body = bytes(range(256)) * 3 + b"<ReportHost name='x'></ReportHost>"
    pieces = [body[start : start + 7] for start in range(0, len(body), 7)]
    with pg_gw.db.engine.begin() as conn:
        conn.execute(BatchBlob.__table__.delete().where(BatchBlob.__table__.c.batch_id == batch_id))
        conn.execute(BatchBlob.__table__.insert(), [{"batch_id": batch_id, "seq": seq, "data": piece}
                                                    for seq, piece in enumerate(pieces)])
    with pg_gw.db.engine.connect() as conn:
        for start, end in [(0, 0), (0, 7), (3, 5), (6, 8), (5, 30), (7, 14), (100, len(body)), (0, len(body)),
                           (len(body) - 1, len(body))]:
            assert _read_range(conn, batch_id, start, end) == body[start:end], (start, end)


def test_the_split_reads_the_whole_body_on_several_connections_in_order(pg_gw, redis_clean):
    """The staging reads the body it splits on several connections at once (each a run of
    pieces): the pieces come back joined in order whatever the readers, and a gap in the
    pieces ends the body there, as the one-connection read did."""
    from gateway.merge.parallel import _read_body
    from gateway.models import BatchBlob

    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Tenable", [tenant])
    batch_id = _push(pg_gw, tenant, headers, document([finding("r/1", host="r.example.com")]))  # no worker
    body = bytes(range(256)) * 5
    pieces = [body[start : start + 7] for start in range(0, len(body), 7)]
    blobs = BatchBlob.__table__
    with pg_gw.db.engine.begin() as conn:
        conn.execute(blobs.delete().where(blobs.c.batch_id == batch_id))
        conn.execute(blobs.insert(), [{"batch_id": batch_id, "seq": seq, "data": piece}
                                      for seq, piece in enumerate(pieces)])
    with pg_gw.db.engine.connect() as conn:
        for readers in (1, 2, 3, 5):
            assert _read_body(conn, batch_id, readers=readers) == body, readers
    with pg_gw.db.engine.begin() as conn:  # piece 10 missing: the body ends before it
        conn.execute(blobs.delete().where(blobs.c.batch_id == batch_id, blobs.c.seq == 10))
    with pg_gw.db.engine.connect() as conn:
        assert _read_body(conn, batch_id, readers=3) == body[:70]


class _Crash(Exception):
    pass


def test_a_staging_resumed_after_its_settings_changed_cuts_as_it_first_did(pg_gw, redis_clean, monkeypatch):
    """A staging stopped after some chunks resumes with the cut it started with (the batch's
    ``merge_plan``), not the settings changed meanwhile: the store ends as the single merge's,
    nothing doubled or lost.  Both staging paths: resource buckets (an interleaved canonical
    file) and a Nessus file split between hosts.  In one process (the staging and the chunk
    merges called as the tasks call them), against the real store."""
    from gateway.merge import parallel
    from gateway.pipeline import _claim

    cases = [("canonical", "Qualys", _interleaved(30, 40)), ("nessus", "Tenable", _nessus_with_a_bad_item())]
    for fmt, provider, body in cases:
        single, resumed = pg_gw.tenant(), pg_gw.tenant()
        headers = {name: pg_gw.partner(provider, [name]) for name in (single, resumed)}
        content_type = "application/json" if fmt == "canonical" else "application/xml"

        def push(tenant):
            response = pg_gw.http.post(f"/api/v1/tenants/{tenant}/batches?format={fmt}", data=body,
                                       headers=headers[tenant] | {"Content-Type": content_type})
            assert response.status_code == 202, response.get_json()
            return int(response.get_json()["id"])

        workers = [Worker(pg_gw.app.config["DATABASE_URL"], extra_env=SINGLE)]
        try:
            reference = _final(pg_gw, single, headers[single], push(single))
        finally:
            workers[0].stop()

        batch_id = push(resumed)  # no worker runs: this test is the worker
        queue: list[int] = []

        def settings(chunk_records: int, buckets: int, dispatch) -> parallel.Settings:
            return parallel.Settings(min_bytes=1, chunk_records=chunk_records, buckets=buckets, sub_chunk=50,
                                     max_rejections=1000, lease_seconds=60, max_attempts=5, dispatch=dispatch)

        def crash_after_two_chunks(*args, **kwargs):
            cut = pg_gw.db.engine.connect()
            with cut:
                staged = cut.execute(select(func.count()).select_from(BatchMergeChunk).where(
                    BatchMergeChunk.batch_id == batch_id)).scalar()
            if staged >= 2:
                raise _Crash()

        assert _claim(pg_gw.db, batch_id, "stager", 5, 60) is None
        with monkeypatch.context() as patch:  # the staging dies once two chunks are committed
            patch.setattr(parallel, "_write_progress", crash_after_two_chunks)
            try:
                parallel.coordinate(pg_gw.db, batch_id, "stager", settings(150, 4, crash_after_two_chunks))
            except _Crash:
                pass
        with pg_gw.db.sessions() as session:
            kinds = session.scalars(select(BatchMergeChunk.kind)
                                    .where(BatchMergeChunk.batch_id == batch_id)).all()
        assert len(kinds) >= 2 and "tail" not in kinds, kinds  # stopped mid-way, some chunks committed

        # the settings change before the resume: another cut would double or lose records
        changed = settings(97, 3, lambda _batch, seq: queue.append(seq))
        assert _claim(pg_gw.db, batch_id, "stager", 5, 60) is None
        status = parallel.coordinate(pg_gw.db, batch_id, "stager", changed)
        while queue:
            status = parallel.merge_chunk(pg_gw.db, batch_id, queue.pop(0), changed)
        assert status in TERMINAL, status
        result = _final(pg_gw, resumed, headers[resumed], batch_id)
        assert _comparable(result) == _comparable(reference)
        expected = _snapshot(pg_gw, single, headers[single], [reference["id"]])
        actual = _snapshot(pg_gw, resumed, headers[resumed], [batch_id])
        assert len(actual["findings"]) >= 599
        for part in expected:
            assert actual[part] == expected[part], (fmt, part)
        with pg_gw.db.sessions() as session:
            assert session.scalar(select(Batch.merge_plan).where(Batch.id == batch_id)) == {
                "chunk_records": 150, "buckets": 4, "sub_chunk": 50}
            assert _doubled(session) == []


# -- the choice of path: staged only when enough merge slots are live --------------------------

AUTO = {"GATEWAY_PARALLEL_MERGE_MIN_BYTES": "1", "GATEWAY_PARALLEL_MERGE_CHUNK_RECORDS": "150",
        "GATEWAY_MERGE_SLOTS_TTL_SECONDS": "3"}  # (the default: at least 2 slots live)


def test_one_live_worker_merges_a_big_batch_whole_and_two_stage_it(pg_gw, redis_clean):
    """Workers announce their processes in Redis while they live: a big batch with one worker
    process live is merged whole (the staged path on one process is slower), with two it is
    staged in chunks; a worker with two processes counts two; a stopped worker withdraws."""
    from gateway.merge.parallel import SLOTS_CONCURRENCY_KEY, SLOTS_KEY, live_slots

    # workers killed by earlier tests stay announced until their last announcement expires
    redis_clean.delete(SLOTS_KEY.format(queue=QUEUE), SLOTS_CONCURRENCY_KEY.format(queue=QUEUE))
    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Qualys", [tenant])
    url = pg_gw.app.config["DATABASE_URL"]
    workers = [Worker(url, extra_env=AUTO)]
    try:
        wait_for(lambda: live_slots(REDIS_URL, QUEUE) == 1, timeout=60, interval=0.2)
        alone = _final(pg_gw, tenant, headers, _push(pg_gw, tenant, headers, _first_push()))
        workers.append(Worker(url, extra_env=AUTO))
        wait_for(lambda: live_slots(REDIS_URL, QUEUE) == 2, timeout=60, interval=0.2)
        together = _final(pg_gw, tenant, headers, _push(pg_gw, tenant, headers, _full_scan()))
        workers.pop(0).stop()
        wait_for(lambda: live_slots(REDIS_URL, QUEUE) == 1, timeout=30, interval=0.2)  # withdrawn at once
        workers.append(Worker(url, concurrency=2, extra_env=AUTO))
        wait_for(lambda: live_slots(REDIS_URL, QUEUE) == 3, timeout=60, interval=0.2)
    finally:
        for process in workers:
            process.stop()
    assert alone["status"] == "partiallySucceeded" and "chunksTotal" not in (alone["progress"] or {})
    assert alone["counts"]["created"] == 24 * 40 + 5 and alone["counts"]["duplicatesInPush"] == 1
    assert together["status"] == "succeeded" and together["counts"]["resolved"] > 0
    progress = together["progress"]
    assert progress["chunksTotal"] >= 3 and progress["chunksDone"] == progress["chunksTotal"]
    assert live_slots(REDIS_URL, QUEUE) == 0


def test_an_expired_announcement_counts_no_slot_and_its_count_is_dropped(redis_clean):
    """A worker killed outright (no withdrawal) stops counting once its announcement expires, and
    its process count is dropped then, so restarts over months leave no counts behind."""
    import time

    from gateway.merge.parallel import SLOTS_CONCURRENCY_KEY, SLOTS_KEY, announce_slots, live_slots

    queue = "slots-expiry-test"
    key, counts = SLOTS_KEY.format(queue=queue), SLOTS_CONCURRENCY_KEY.format(queue=queue)
    redis_clean.delete(key, counts)
    announce_slots(REDIS_URL, queue, "killed/1", 4, ttl=0.2)
    announce_slots(REDIS_URL, queue, "alive/2", 2, ttl=30)
    assert live_slots(REDIS_URL, queue) == 6
    time.sleep(0.4)
    assert live_slots(REDIS_URL, queue) == 2
    assert redis_clean.hkeys(counts) == [b"alive/2"]
    redis_clean.delete(key, counts)


def test_a_staged_batch_resumes_staged_when_one_slot_is_left(pg_gw, redis_clean):
    """A batch whose staging began resumes staged even when the live slots say "merge whole" by
    then: chunks of it may be merged already, and one merge over them would redo them."""
    from dataclasses import replace
    from datetime import timedelta

    from gateway.merge.parallel import merge_chunk
    from gateway.models import utcnow

    batch_id, settings, sent, (tenant, headers) = _staged(pg_gw, _interleaved(8, 40))
    merge_chunk(pg_gw.db, batch_id, sent.pop(0), settings)  # one chunk merged, then the workers die
    sent.clear()
    with pg_gw.db.engine.begin() as conn:
        conn.execute(Batch.__table__.update().where(Batch.id == batch_id)
                     .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    alone = replace(settings, min_slots=2, slots=lambda: 1)
    assert not alone.applies(pg_gw.db, 10**9)  # a new batch would be merged whole
    assert process_batch(pg_gw.db, batch_id, parallel=alone, lease_seconds=30) == "processing"
    status = None
    while sent:
        status = merge_chunk(pg_gw.db, batch_id, sent.pop(0), alone)
    assert status == "partiallySucceeded"
    result = _batch(pg_gw, tenant, headers, batch_id)
    assert result["status"] == "partiallySucceeded" and result["counts"]["created"] == 8 * 40
    assert result["progress"]["chunksDone"] == result["progress"]["chunksTotal"]
    with pg_gw.db.sessions() as session:
        assert _doubled(session) == []
