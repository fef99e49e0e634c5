"""Concurrent batches of one tenant that overlap in records: how many task retries they need.

    .venv/bin/python bench/concurrency_bench.py [--batches 60] [--workers 2] [--per-batch 150]
                                                [--stride 75] [--records N] [--providers 2]

Creates a scratch PostgreSQL database, starts ``--workers`` real celery worker processes
(``--concurrency=1`` each) on Redis and the API on a loopback socket, then pushes
``--batches`` canonical batches of one tenant at once (8 client threads).  Batch k takes
``--per-batch`` consecutive records of one pool (same provider ids, CVEs and hosts) starting at
``k * --stride`` (wrapping around a pool of ``--records``, by default just large enough not
to wrap; a smaller pool makes later batches update what earlier ones created): with the
default stride of half a batch, the batches the two workers merge at the same moment share
half their records, most of them new.  Pairs of consecutive batches come from one provider
(``--providers`` take turns pair by pair), each batch carries its own provider timestamp, so
the pushes of one record are creations, updates and stale updates depending on the order the
workers take them, and one record in three is pushed fixed.  It waits until every batch is
final and prints:

* retries: the sum of ``attempts - 1`` over the batches (each retry is a task that hit a
  transient error: a unique violation, a deadlock...), the batches that needed one, the most
  attempts of one batch, and the worker log's "transient error" lines by cause (SQLSTATE);
* whether the store is right: one resource per host, one finding per (host, CVE), one source
  per (provider, record, CVE) holding the newest version pushed, each finding's state,
  severity, title, description and last seen those of its sources as stored (no lost update),
  one "new" event per finding, every batch succeeded, and created + updated + unchanged +
  stale counts adding up to what was received (the first push of each record counted as
  created once).

Figures, not assertions; the exit status is 1 when the store is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests
from sqlalchemy import func, select
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import REDIS, create_database, drop_database  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.merge.findings import _aggregate  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.models import Batch, Finding, FindingSource, LifecycleEvent, Resource  # noqa: E402
from tests.conftest import Gateway  # noqa: E402

PROVIDERS = ("Qualys", "Tenable", "Rapid7", "Nessus")
HOSTS = 20


def record(j: int, batch: int) -> dict:
    """Record j of the pool as pushed by batch ``batch`` (its timestamp and texts are the batch's)."""
    ts = f"2024-04-01T{batch // 60:02d}:{batch % 60:02d}:00Z"
    return {
        "id": f"rec-{j}", "resource": {"fqdn": f"h{j % HOSTS}.concurrency.example.com"},
        "title": f"Vulnerability {j}", "severity": ("low", "medium", "high", "critical")[(j + batch) % 4],
        "cves": [f"CVE-2024-{10000 + j}"], "status": "fixed" if (j + batch) % 3 == 0 else "open",
        "firstSeen": "2024-03-01T00:00:00Z",
        "lastSeen": ts, "providerTimestamp": ts, "description": f"Pushed by batch {batch}.",
        "remediation": "Upgrade the package.",
    }


def bodies(batches: int, pool: int, per_batch: int, stride: int,
           providers: int) -> list[tuple[str, int, bytes, list[int]]]:
    out = []
    for k in range(batches):
        start = (k * stride) % pool
        members = sorted({(start + i) % pool for i in range(per_batch)})
        provider = PROVIDERS[(k // 2) % providers]  # pairs of consecutive batches share a provider
        out.append((provider, k, json.dumps({"findings": [record(j, k) for j in members]}).encode(), members))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--per-batch", type=int, default=150)
    parser.add_argument("--stride", type=int, help="records between the starts of consecutive batches "
                        "(default: half a batch)")
    parser.add_argument("--records", type=int, help="the pool (default: batches x stride + a batch)")
    parser.add_argument("--providers", type=int, default=2, choices=range(1, len(PROVIDERS) + 1))
    parser.add_argument("--chunk", type=int, default=50, help="GATEWAY_MERGE_CHUNK_SIZE of the workers")
    parser.add_argument("--keep-logs", action="store_true",
                        help="print where the worker logs are and keep them")
    args = parser.parse_args()
    args.stride = args.stride if args.stride is not None else max(1, args.per_batch // 2)
    args.records = args.records or args.batches * args.stride + args.per_batch

    name, url = create_database("gw_cbench")
    queue = f"gw-cbench-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(REDIS)
    logs_dir = Path(tempfile.mkdtemp(prefix="gw-cbench-"))
    workers: list[subprocess.Popen] = []
    ok = False
    try:
        upgrade(url)
        app = create_app({"DATABASE_URL": url, "BROKER_URL": REDIS, "SECRET_KEY": "bench",
                          "TASK_QUEUE": queue})
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        env = dict(os.environ, GATEWAY_DATABASE_URL=url, GATEWAY_BROKER_URL=REDIS, GATEWAY_SECRET_KEY="bench",
                   GATEWAY_TASK_QUEUE=queue, GATEWAY_MERGE_CHUNK_SIZE=str(args.chunk), PYTHONPATH=str(ROOT))
        for n in range(args.workers):
            log = open(logs_dir / f"worker{n}.log", "w")
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--concurrency=1",
                 "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-n", f"cbench{n}-{queue}@%h"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        gw = Gateway(app)
        tenant = gw.tenant()
        headers = {provider: gw.partner(provider, [tenant]) for provider in PROVIDERS[: args.providers]}
        work = bodies(args.batches, args.records, args.per_batch, args.stride, args.providers)
        db = gw.db

        # warm-up on another tenant: every worker started and connected before the pushes
        warm = gw.tenant()
        warm_headers = gw.partner("WarmUp", [warm])
        warm_ids = [requests.post(f"{base}/api/v1/tenants/{warm}/batches?format=canonical",
                                  data=json.dumps({"findings": [record(j, 0)]}),
                                  headers=warm_headers | {"Content-Type": "application/json"},
                                  timeout=60).json()["id"] for j in range(2 * args.workers)]
        _wait(db, [int(i) for i in warm_ids], timeout=120)

        started = time.perf_counter()

        def send(item):
            provider, _, body, _ = item
            response = requests.post(f"{base}/api/v1/tenants/{tenant}/batches?format=canonical", data=body,
                                     headers=headers[provider] | {"Content-Type": "application/json"},
                                     timeout=120)
            assert response.status_code == 202, response.text
            return int(response.json()["id"])

        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = list(pool.map(send, work))
        _wait(db, ids, timeout=900)
        elapsed = time.perf_counter() - started
        server.shutdown()

        with db.sessions() as session:
            rows = session.execute(select(Batch.id, Batch.status, Batch.attempts, Batch.counts, Batch.error)
                                   .where(Batch.id.in_(ids))).all()
        retries = sum(row.attempts - 1 for row in rows)
        retried = sum(1 for row in rows if row.attempts > 1)
        statuses = Counter(row.status for row in rows)
        causes = Counter()
        for path in logs_dir.glob("worker*.log"):
            for line in path.read_text(errors="replace").splitlines():
                if "transient error" in line:
                    code = re.search(r"\b(23505|40P01|40001|55P03)\b|(deadlock detected|duplicate key)", line)
                    causes[code.group(0) if code else "other"] += 1
        print(f"{args.batches} batches of {args.per_batch} records "
              f"(stride {args.stride}, pool {args.records}) "
              f"on {HOSTS} hosts, "
              f"{args.providers} provider(s), {args.workers} workers, chunk {args.chunk}: {elapsed:.1f}s")
        print(f"  retries: {retries} (sum of attempts - 1), batches retried: {retried}, most attempts: "
              f"{max(row.attempts for row in rows)}; worker log 'transient error' lines: "
              f"{sum(causes.values())} "
              f"{dict(causes)}")
        print(f"  batch statuses: {dict(statuses)}")
        ok = _check(db, work, rows) and statuses == Counter({"succeeded": len(ids)})
        print(f"  store right: {ok}")
    finally:
        for process in workers:
            process.terminate()
        for process in workers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.delete(queue)
        drop_database(name)
        if args.keep_logs:
            print(f"  worker logs: {logs_dir}")
        else:
            for path in logs_dir.glob("*"):
                path.unlink()
            logs_dir.rmdir()
    sys.exit(0 if ok else 1)


def _wait(db, ids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with db.sessions() as session:
            open_count = session.scalar(select(func.count()).select_from(Batch).where(
                Batch.id.in_(ids), Batch.status.in_(("accepted", "processing"))))
        if not open_count:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{open_count} batches still open after {timeout}s")
        time.sleep(0.2)


def _check(db, work, rows) -> bool:
    """The store holds what the pushes say, whatever order the workers merged them in."""
    pool = sorted({j for *_, members in work for j in members})
    newest: dict[tuple[str, int], int] = {}
    for provider, k, _, members in work:
        for j in members:
            newest[(provider, j)] = max(newest.get((provider, j), -1), k)
    problems = []
    with db.sessions() as session:
        tenant_ids = {t for (t,) in session.execute(select(Batch.tenant_id).where(Batch.id == rows[0].id))}
        tenant_id = tenant_ids.pop()
        resources = session.scalar(select(func.count()).select_from(Resource)
                                   .where(Resource.tenant_id == tenant_id))
        if resources != HOSTS:
            problems.append(f"{resources} resources, expected {HOSTS}")
        findings = session.execute(select(Finding.resource_id, Finding.correlation_key, Finding.id)
                                   .where(Finding.tenant_id == tenant_id)).all()
        if len(findings) != len(pool) or len({(r, k) for r, k, _ in findings}) != len(findings):
            problems.append(f"{len(findings)} findings, expected one per (host, CVE): {len(pool)}")
        sources = session.execute(select(FindingSource.provider, FindingSource.provider_id,
                                         FindingSource.correlation_key, FindingSource.description,
                                         FindingSource.finding_id)
                                  .where(FindingSource.tenant_id == tenant_id)).all()
        identities = Counter((s.provider, s.provider_id, s.correlation_key) for s in sources)
        if len(sources) != len(newest) or max(identities.values()) != 1:
            problems.append(f"{len(sources)} sources, expected one per (provider, record): {len(newest)}")
        stale = [(s.provider, s.provider_id) for s in sources
                 if s.description != f"Pushed by batch {newest[(s.provider, int(s.provider_id[4:]))]}."]
        if stale:
            problems.append(f"{len(stale)} sources do not hold the newest push (lost updates), "
                            f"e.g. {stale[:3]}")
        # each finding's provider fields are the aggregate of its sources as stored (no lost update)
        full = session.execute(select(FindingSource)
                               .where(FindingSource.tenant_id == tenant_id)).scalars().all()
        by_finding: dict[int, list] = {}
        for source in full:
            by_finding.setdefault(source.finding_id, []).append(
                {c.name: getattr(source, c.name) for c in FindingSource.__table__.columns})
        drifted = []
        for finding in session.execute(select(Finding).where(Finding.tenant_id == tenant_id)).scalars():
            expected = _aggregate(by_finding.get(finding.id, []))
            if (finding.severity, finding.title, finding.description, finding.last_seen,
                    finding.state == "resolved") != (expected["severity"], expected["title"],
                                                     expected["description"], expected["last_seen"],
                                                     not expected["open"]):
                drifted.append(finding.id)
        if drifted:
            problems.append(f"{len(drifted)} findings differ from the aggregate of their sources, "
                            f"e.g. {drifted[:3]}")
        new_events = Counter(subject for (subject,) in session.execute(
            select(LifecycleEvent.subject_id).where(LifecycleEvent.tenant_id == tenant_id,
                                                    LifecycleEvent.subject_type == "finding",
                                                    LifecycleEvent.event == "new")))
        if len(new_events) != len(findings) or (new_events and max(new_events.values()) != 1):
            problems.append(f"'new' events on {len(new_events)} findings (most on one: "
                            f"{max(new_events.values(), default=0)}), "
                            f"expected one on each of {len(findings)}")
    counts = Counter()
    for row in rows:
        counts.update({key: value for key, value in (row.counts or {}).items() if isinstance(value, int)})
    if counts["created"] != len(newest):
        problems.append(f"created counts add up to {counts['created']}, expected {len(newest)}")
    if counts["created"] + counts["updated"] + counts["unchanged"] + counts["stale"] != counts["received"]:
        problems.append(f"counts do not add up: {dict(counts)}")
    print(f"  counts over all batches: {dict(counts)}")
    for problem in problems:
        print(f"  WRONG: {problem}")
    return not problems


if __name__ == "__main__":
    main()
