"""End-to-end ingest benchmark: HTTP push -> PostgreSQL -> Redis -> celery workers -> merged.

    .venv/bin/python bench/ingest_bench.py --findings 10000 100000 --preload 1000000

Creates a scratch PostgreSQL database, preloads it with ``--preload`` findings (set-based
SQL, on their own tenant's resources, so the indexes are the size of a real store), starts
``--workers`` celery worker processes on Redis and the API on a loopback socket, pushes N
synthetic canonical findings (several hosts and CVEs) in batches of ``--batch-size`` over
HTTP, waits until every batch is finished and prints findings/s end to end; then pushes the
same batches again (nothing changed) and prints that rate too.  A few small warm-up pushes
run first, so that worker start-up is not timed.  With each figure it prints the CPU seconds
used meanwhile by the whole machine, this process (API and client), PostgreSQL and the
workers: when "machine" is well above the sum of the others, something else was running.
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import redis
import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway import create_app  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from tests.conftest import Gateway  # noqa: E402

ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/12")


def create_database(prefix: str) -> tuple[str, str]:
    """A new scratch PostgreSQL database: (name, URL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def preload(url: str, count: int) -> None:
    """Fill the store with ``count`` findings of another tenant, straight in SQL."""
    if count <= 0:
        return
    resources = max(1, count // 20)
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        tenant_id = conn.execute("INSERT INTO tenants (external_id, name, created_at) "
                                 "VALUES ('preload', 'preload', now()) RETURNING id").fetchone()[0]
        type_id = conn.execute(  # recommendation types are per tenant
            "INSERT INTO recommendation_types (tenant_id, key, kind, title, severity, categories) VALUES "
            "(%s, 'vulnerability-assessment', 'vulnerability', 'Vulnerabilities', 'high', '[]') RETURNING id",
            (tenant_id,)).fetchone()[0]
        conn.execute(f"""
            INSERT INTO resources (tenant_id, kind, name, created_at, updated_at, tags)
            SELECT t.id, 'vm', 'pre' || g || '.example.com', now(), now(), '[]'
            FROM tenants t, generate_series(1, {resources}) g WHERE t.external_id = 'preload'""")
        conn.execute("""
            INSERT INTO resource_identifiers (tenant_id, kind, value, resource_id)
            SELECT tenant_id, 'fqdn', name, id FROM resources""")
        conn.execute(f"""
            INSERT INTO findings (tenant_id, resource_id, recommendation_type_id, correlation_key, cve, kind,
                                  title, severity, state, state_changed_at, created_at, updated_at,
                                  comments, tags)
            SELECT r.tenant_id, r.id, {type_id},
                   'CVE-2020-' || (10000 + g), 'CVE-2020-' || (10000 + g), 'vulnerability',
                   'Preloaded ' || g, (ARRAY['low','medium','high','critical'])[1 + g % 4], 'active',
                   now(), now(), now(), '[]', '[]'
            FROM resources r, generate_series(1, {count // resources}) g""")
        conn.execute("""
            INSERT INTO finding_sources (tenant_id, finding_id, resource_id, provider, provider_id,
                                         correlation_key, state, title, severity, "references",
                                         provider_timestamp, content_hash, created_at, updated_at)
            SELECT tenant_id, id, resource_id, 'Preload', 'p-' || id, correlation_key, 'open', title,
                   severity, '[]', now(), 'x', now(), now() FROM findings""")
        conn.execute("VACUUM ANALYZE")  # as autovacuum would have, so that it does not run during the timing
    print(f"preloaded {count} findings on {resources} resources in {time.perf_counter() - started:.1f}s")


def synthetic(start: int, count: int, hosts: int = 500) -> bytes:
    findings = []
    for i in range(start, start + count):
        findings.append({
            "id": f"bench-{i}",
            "resource": {"fqdn": f"host{i % hosts}.bench.example.com", "ipv4": [f"10.{i % hosts // 250}.{i % 250}.1"]},
            "title": f"Synthetic vulnerability {i % 5000}",
            "severity": ("low", "medium", "high", "critical")[i % 4],
            "cves": [f"CVE-2024-{10000 + i // hosts}"],
            "status": "open",
            "firstSeen": "2024-03-01T00:00:00Z",
            "lastSeen": "2024-04-01T00:00:00Z",
            "providerTimestamp": "2024-04-01T00:00:00Z",
            "description": "A synthetic finding for the benchmark.",
            "remediation": "Upgrade the package.",
        })
    return json.dumps({"findings": findings}).encode()


DATABASE = {"name": ""}  # the scratch database, whose PostgreSQL backends _cpu_seconds counts


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far: the whole machine, this process (API and client), the PostgreSQL
    backends of the scratch database (live ones: a backend that ended meanwhile is not
    counted), and the workers."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / tick
    own = sum(os.times()[:2])
    postgres = workers = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        parts = stat[stat.rindex(")") + 2 :].split()
        used = (int(parts[11]) + int(parts[12])) / tick
        if name.startswith("postgres") and DATABASE["name"].encode() in cmdline:
            postgres += used
        elif b"celery" in cmdline and b"bench" in cmdline:
            workers += used
    return {"machine": busy, "api+client": own, "postgres": postgres, "workers": workers}


def run_pushes(base: str, tenant: str, headers: dict, bodies: list[bytes], gw: Gateway,
               quiet: bool = False) -> float:
    before = _cpu_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(pool.map(lambda body: requests.post(
            f"{base}/api/v1/tenants/{tenant}/batches?format=canonical", data=body,
            headers=headers | {"Content-Type": "application/json"}, timeout=300), bodies))
    ids = [r.json()["id"] for r in responses]
    assert all(r.status_code == 202 for r in responses)
    # One status request at a time (the API and the workers share the machine's two cores).
    for batch_id in ids:
        while True:
            body = requests.get(f"{base}/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers,
                                timeout=30).json()
            if body["status"] in ("succeeded", "partiallySucceeded", "failed"):
                break
            time.sleep(0.05)
        if body["status"] != "succeeded":
            raise SystemExit(f"batch {batch_id} ended {body['status']}: {body.get('error')}")
    elapsed = time.perf_counter() - started
    after = _cpu_seconds()
    if not quiet:
        print("    CPU s: " + ", ".join(f"{key} {after[key] - before[key]:.1f}" for key in before)
              + f" (wall {elapsed:.1f}s, 2 cores = {2 * elapsed:.1f} CPU s)")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--findings", type=int, nargs="+", default=[10000, 100000])
    parser.add_argument("--preload", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=10000)
    args = parser.parse_args()

    name, url = create_database("gw_bench")
    DATABASE["name"] = name
    workers = []
    try:
        upgrade(url)
        preload(url, args.preload)
        redis.Redis.from_url(REDIS).flushdb()
        app = create_app({"DATABASE_URL": url, "BROKER_URL": REDIS, "SECRET_KEY": "bench"})
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        env = dict(os.environ, GATEWAY_DATABASE_URL=url, GATEWAY_BROKER_URL=REDIS, GATEWAY_SECRET_KEY="bench",
                   PYTHONPATH=str(ROOT))
        for n in range(args.workers):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--concurrency=1",
                 "--loglevel=WARNING", "--without-gossip", "--without-mingle", "-n", f"bench{n}@%h"],
                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        gw = Gateway(app)
        # Warm-up: both workers started, imported and connected before anything is timed.
        warm_tenant = gw.tenant()
        warm_headers = gw.partner("WarmUp", [warm_tenant])
        run_pushes(base, warm_tenant, warm_headers, [synthetic(10**9 + 1000 * n, 200) for n in range(4)], gw,
                   quiet=True)
        offset = 0
        for total in args.findings:
            tenant = gw.tenant()
            headers = gw.partner("BenchScanner", [tenant])
            bodies = [synthetic(offset + start, min(args.batch_size, total - start))
                      for start in range(0, total, args.batch_size)]
            offset += total
            first = run_pushes(base, tenant, headers, bodies, gw)
            again = run_pushes(base, tenant, headers, bodies, gw)
            print(f"N={total:>7} batches={len(bodies):>3} store={args.preload} workers={args.workers}: "
                  f"new {total / first:8.0f} findings/s ({first:.1f}s)   "
                  f"no-change re-push {total / again:8.0f} findings/s ({again:.1f}s)   ratio {first / again:.2f}x")
        server.shutdown()
        app.extensions["gateway.db"].dispose()
    finally:
        for process in workers:
            process.terminate()
        for process in workers:
            process.wait(timeout=30)
        drop_database(name)


if __name__ == "__main__":
    main()
