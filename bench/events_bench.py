"""Security events benchmark: ingest through the workers, then the built-in rules over new events.

    .venv/bin/python bench/events_bench.py --events 200000 --store 2000000 --new 100000

1. Ingest: ``--events`` synthetic Winlogbeat-style Windows events (logons, failures, process
   starts, group changes on ``--hosts`` hosts) pushed over HTTP in batches of ``--batch-size``
   (``format=windows_events``) to the API on a loopback socket, merged by ``--workers`` celery
   worker processes on Redis into a scratch PostgreSQL database; events/s end to end (from the
   first push to the last batch finished), with the CPU seconds of the machine, PostgreSQL and
   the workers meanwhile.
2. Rules: a store of ``--store`` events of one tenant (written in SQL, spread over 7 days),
   every built-in rule's watermark at its end, then ``--new`` new events of the last hour
   (SQL too; one source address per 100 consecutive events: 20 failed logons and 10 successes
   of a source within 12 minutes, so the brute-force rule has hits); the time of one evaluation
   of all the tenant's enabled rules (``gateway.detection.engine.evaluate_tenant``, raising the
   alerts), and of a second one (nothing new).
``--skip-ingest`` or ``--skip-rules`` runs one part alone (each a quiet run of its own).
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
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import redis
import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import DATABASE, REDIS, _cpu_seconds, create_database, drop_database  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.detection import engine, events  # noqa: E402
from gateway.detection.rules import builtins  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from tests.conftest import Gateway  # noqa: E402


def windows_events(start: int, count: int, hosts: int, now: datetime) -> bytes:
    """``count`` Winlogbeat-style events: 60% process starts, 20% failed logons, 15% logons, 5% other."""
    found = []
    for i in range(start, start + count):
        host = f"ws-{i % hosts}.bench.example.com"
        at = now - timedelta(seconds=(i * 7) % 3600)
        kind = i % 20
        if kind < 12:
            event_id, data = (
                4688,
                {
                    "SubjectUserName": f"user{i % 97}",
                    "NewProcessName": f"C:\\Program Files\\App{i % 13}\\app.exe",
                },
            )
        elif kind < 16:
            event_id, data = (
                4625,
                {"TargetUserName": f"user{i % 97}", "IpAddress": f"10.9.{i % 200}.{i % 250}"},
            )
        elif kind < 19:
            event_id, data = (
                4624,
                {"TargetUserName": f"user{i % 97}", "IpAddress": f"10.8.{i % 200}.{i % 250}"},
            )
        else:
            event_id, data = (
                4732,
                {"MemberName": f"CN=user{i % 97}", "TargetUserName": "Remote Desktop Users"},
            )
        found.append(
            {
                "@timestamp": at.isoformat(),
                "winlog": {
                    "event_id": event_id,
                    "computer_name": host,
                    "channel": "Security",
                    "record_id": i,
                    "event_data": data,
                },
                "host": {"hostname": host.split(".")[0]},
                "agent": {"id": f"agent-{i % hosts}"},
            }
        )
    return json.dumps(found).encode()


def push_all(base: str, tenant: str, headers: dict, bodies: list[bytes]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:
        responses = list(
            pool.map(
                lambda body: requests.post(
                    f"{base}/api/v1/tenants/{tenant}/batches?format=windows_events",
                    data=body,
                    headers=headers | {"Content-Type": "application/json"},
                    timeout=600,
                ),
                bodies,
            )
        )
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202][
        :1
    ]
    for batch_id in (r.json()["id"] for r in responses):
        while True:
            body = requests.get(
                f"{base}/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers, timeout=30
            ).json()
            if body["status"] in ("succeeded", "partiallySucceeded", "failed"):
                break
            time.sleep(0.1)
        if body["status"] != "succeeded":
            raise SystemExit(f"batch {batch_id} ended {body['status']}: {body.get('error')}")
    return time.perf_counter() - started


def ingest(url: str, args) -> None:
    redis.Redis.from_url(REDIS).flushdb()
    app = create_app({"DATABASE_URL": url, "BROKER_URL": REDIS, "SECRET_KEY": "bench"})
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    env = dict(
        os.environ,
        GATEWAY_DATABASE_URL=url,
        GATEWAY_BROKER_URL=REDIS,
        GATEWAY_SECRET_KEY="bench",
        GATEWAY_MERGE_CHUNK_SIZE=str(args.chunk),
        PYTHONPATH=str(ROOT),
    )
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "worker",
                "--concurrency=1",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"bench{n}@%h",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=open(os.environ["BENCH_WORKER_LOG"], "a")
            if os.environ.get("BENCH_WORKER_LOG")
            else subprocess.DEVNULL,
        )
        for n in range(args.workers)
    ]
    try:
        gw = Gateway(app)
        now = datetime.now(UTC)
        warm = gw.tenant()
        warm_headers = gw.partner("WarmUp", [warm], "events.write security.read")
        push_all(base, warm, warm_headers, [windows_events(10**9 + 1000 * n, 500, 20, now) for n in range(4)])
        tenant = gw.tenant()
        headers = gw.partner("Winlogbeat", [tenant], "events.write security.read")
        bodies = [
            windows_events(start, min(args.batch_size, args.events - start), args.hosts, now)
            for start in range(0, args.events, args.batch_size)
        ]
        size = sum(map(len, bodies))
        before = _cpu_seconds()
        elapsed = push_all(base, tenant, headers, bodies)
        after = _cpu_seconds()
        print(
            f"ingest: {args.events} events ({size / 1e6:.0f} MB JSON) in {len(bodies)} batches, "
            f"{args.workers} workers: {elapsed:.1f}s = {args.events / elapsed:,.0f} events/s end to end"
        )
        print(
            "    CPU s: "
            + ", ".join(f"{key} {after[key] - before[key]:.1f}" for key in before)
            + f" (wall {elapsed:.1f}s, 2 cores = {2 * elapsed:.1f} CPU s)"
        )
        server.shutdown()
        app.extensions["gateway.db"].dispose()
    finally:
        for process in workers:
            process.terminate()
        for process in workers:
            process.wait(timeout=60)


GENERATE = """
    INSERT INTO security_events (occurred_at, tenant_id, provider, resource_id, kind, event_id, outcome,
                                 user_name, target, source_ip, process, ingested_at, raw)
    SELECT %(now)s - make_interval(secs => (g * 7) %% %(spread)s), %(tenant)s, 'Bench', NULL,
           (ARRAY['process_start','process_start','process_start','process_start','process_start',
                  'process_start','network_connection','logon_failure','logon_failure',
                  'logon_success'])[1 + g %% 10],
           (ARRAY[4688,4688,4688,4688,4688,4688,5156,4625,4625,4624])[1 + g %% 10],
           NULL, 'user' || (g %% 97), NULL,
           '10.' || ((g / 100) %% 250) || '.' || ((g / 25000) %% 250) || '.1',
           'C:\\app' || (g %% 13) || '.exe', now(), '{"bench": true}'::jsonb
    FROM generate_series(%(first)s, %(last)s) g
"""


def rules(url: str, args) -> None:
    import sqlalchemy

    now = datetime.now(UTC)
    engine_ = sqlalchemy.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    events.ensure_partitions(engine_, now, 31)
    with psycopg.connect(url, autocommit=True) as conn:
        tenant = conn.execute(
            "INSERT INTO tenants (external_id, name, created_at) VALUES ('rules', 'rules', now()) "
            "RETURNING id"
        ).fetchone()[0]
        started = time.perf_counter()
        for first in range(0, args.store, 500_000):
            conn.execute(
                GENERATE,
                {
                    "now": now - timedelta(hours=1),
                    "spread": 7 * 86400,
                    "tenant": tenant,
                    "first": first,
                    "last": min(args.store, first + 500_000) - 1,
                },
            )
        conn.execute("VACUUM ANALYZE security_events")
        print(f"rules: stored {args.store:,} events in {time.perf_counter() - started:.0f}s")
        top = conn.execute("SELECT max(id) FROM security_events WHERE tenant_id = %s", (tenant,)).fetchone()[
            0
        ]
        for rule_id in builtins():
            conn.execute(
                "INSERT INTO detection_watermarks (tenant_id, rule_id, watermark) VALUES (%s, %s, %s)",
                (tenant, rule_id, top),
            )
        conn.execute(
            GENERATE,
            {"now": now, "spread": 3600, "tenant": tenant, "first": 10**8, "last": 10**8 + args.new - 1},
        )
        conn.execute("ANALYZE security_events")
    DATABASE["name"] = url.rsplit("/", 1)[1]
    before = _cpu_seconds()
    started = time.perf_counter()
    found = engine.evaluate_tenant(engine_, tenant, now)
    elapsed = time.perf_counter() - started
    after = _cpu_seconds()
    print(
        f"rules: all {len(found)} enabled rules over {args.new:,} new events (store {args.store:,}): "
        f"{elapsed:.2f}s; hits {found}"
    )
    print(
        f"    CPU s of the whole machine meanwhile: {after['machine'] - before['machine']:.1f} "
        f"(wall {elapsed:.1f}s, 2 cores = {2 * elapsed:.1f} CPU s)"
    )
    started = time.perf_counter()
    engine.evaluate_tenant(engine_, tenant, now)
    print(f"rules: the next run, nothing new: {time.perf_counter() - started:.2f}s")
    engine_.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=5000, help="GATEWAY_MERGE_CHUNK_SIZE of the workers")
    parser.add_argument("--hosts", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=100_000)
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-rules", action="store_true")
    args = parser.parse_args()
    name, url = create_database("gw_events_bench")
    DATABASE["name"] = name
    try:
        upgrade(url)
        if not args.skip_ingest:
            ingest(url, args)
        if not args.skip_rules:
            rules(url, args)
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
