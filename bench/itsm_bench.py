"""ITSM delivery: tickets per second and the lag from merge commit to ticket created (issue 12).

    .venv/bin/python bench/itsm_bench.py [--findings 10000] [--kinds servicenow,jira]
                                         [--lanes 4,1] [--faults 0,0.1] [--batch 1000]

For each simulator kind, each fault rate and each lane count: a scratch PostgreSQL database, the
simulator (tests/itsm_sim.py) in its own process (``python -m tests.itsm_sim KIND``), one real
celery worker (``--concurrency=2``, ``GATEWAY_ITSM_DELIVERY_LANES``), a connection with an
automatic rule that every finding matches, and ``--findings`` findings pushed in batches of
``--batch`` (on 200 hosts).  With a fault rate f, the simulator answers f/2 of the calls
"committed, connection dropped" and f/4 each 429 (``Retry-After: 0``) and 500.

Printed per run: tickets created per second (from the first batch's acceptance to the last
ticket created), the lag of each ticket from its finding's merge commit (the time of its ``new``
event, written in the merge chunk's transaction; chunks of 500) to its creation on the simulator
(p50, p99, max), the faults served, and whether the result is exact (one remote record per
finding, no duplicate, every link synced).  Figures, not assertions; exit status 1 when a run
is not exact.
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
from datetime import UTC
from pathlib import Path

import redis
import requests
from cryptography.fernet import Fernet
from sqlalchemy import func, select
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import REDIS, create_database, drop_database  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.models import Batch, ItsmTicket, LifecycleEvent  # noqa: E402
from tests.conftest import Gateway  # noqa: E402

HOSTS = 200
KEY = Fernet.generate_key().decode()
SCOPES = "findings.write security.read itsm.manage"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _body(kind: str, url: str) -> dict:
    if kind == "servicenow":
        return {
            "name": "snow",
            "kind": "servicenow",
            "baseUrl": url,
            "auth": "basic",
            "username": "gateway",
            "secret": "sn-password-0123456789",
        }
    return {
        "name": "jira",
        "kind": "jira",
        "baseUrl": url,
        "auth": "basic",
        "username": "bot@example.com",
        "secret": "jira-api-token-0123456789",
        "projectKey": "SEC",
        "issueType": "Bug",
    }


def _findings(first: int, count: int) -> bytes:
    return json.dumps(
        {
            "findings": [
                {
                    "id": f"b-{n}",
                    "resource": {"fqdn": f"host-{n % HOSTS}.itsm.example.com"},
                    "title": f"Vulnerability {n}",
                    "severity": "high",
                    "cves": [f"CVE-2024-{n:06d}"],
                    "status": "open",
                    "firstSeen": "2024-03-01T00:00:00Z",
                    "lastSeen": "2024-04-01T00:00:00Z",
                    "providerTimestamp": "2024-04-01T00:00:00Z",
                }
                for n in range(first, first + count)
            ]
        }
    ).encode()


def run(kind: str, lanes: int, fault: float, args) -> bool:
    name, url = create_database("gw_itsmbench")
    queue = f"gw-itsmbench-{uuid.uuid4().hex[:8]}"
    sim = subprocess.Popen(
        [sys.executable, "-m", "tests.itsm_sim", kind, "--seed", "12"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    worker = None
    try:
        sim_url = sim.stdout.readline().strip()
        rates = {"drop": fault / 2, "429": fault / 4, "500": fault / 4} if fault else {}
        requests.post(f"{sim_url}/_sim/faults", json={"rates": rates, "retryAfter": "0"}, timeout=10)
        upgrade(url)
        config = {
            "DATABASE_URL": url,
            "BROKER_URL": REDIS,
            "SECRET_KEY": "bench",
            "TASK_QUEUE": queue,
            "SECRETS_KEYS": KEY,
        }
        app = create_app(config)
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
            GATEWAY_TASK_QUEUE=queue,
            GATEWAY_MERGE_CHUNK_SIZE="500",
            GATEWAY_SECRETS_KEYS=KEY,
            GATEWAY_ITSM_DELIVERY_LANES=str(lanes),
            GATEWAY_ITSM_TIMEOUT_SECONDS="5",
            GATEWAY_ITSM_RETRY_BASE_SECONDS="0.05",
            PYTHONPATH=str(ROOT),
        )
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "worker",
                "--concurrency=2",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"itsmbench-{queue}@%h",
            ],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        gw = Gateway(app)
        tenant = gw.tenant()
        headers = gw.partner("Scanner", [tenant], SCOPES)
        made = requests.post(
            f"{base}/api/v1/tenants/{tenant}/itsm/connections",
            json=_body(kind, sim_url),
            headers=headers,
            timeout=30,
        ).json()
        answer = requests.post(
            f"{base}/api/v1/tenants/{tenant}/itsm/rules",
            headers=headers,
            timeout=30,
            json={"name": "all", "connectionId": made["id"], "collection": "findings"},
        )
        assert answer.status_code == 201, answer.text
        started = time.time()
        ids = []
        for first in range(0, args.findings, args.batch):
            response = requests.post(
                f"{base}/api/v1/tenants/{tenant}/batches?format=canonical",
                data=_findings(first, min(args.batch, args.findings - first)),
                headers=headers | {"Content-Type": "application/json"},
                timeout=120,
            )
            assert response.status_code == 202, response.text
            ids.append(int(response.json()["id"]))
        deadline = time.monotonic() + args.timeout
        stats = {}
        while time.monotonic() < deadline:
            stats = requests.get(f"{sim_url}/_sim/stats", timeout=30).json()
            if stats["records"] >= args.findings:
                with gw.db.engine.connect() as conn:
                    unsynced = conn.execute(
                        select(func.count()).select_from(ItsmTicket).where(ItsmTicket.sync_state != "synced")
                    ).scalar()
                if not unsynced:
                    break
            time.sleep(1.0)
        server.shutdown()
        created = stats.get("created") or {}
        with gw.db.engine.connect() as conn:
            tickets = conn.execute(
                select(ItsmTicket.subject_id, ItsmTicket.sync_state, ItsmTicket.remote_id)
            ).all()
            merged_at = {
                row.subject_id: row.at.replace(tzinfo=UTC).timestamp()
                if row.at.tzinfo is None
                else row.at.timestamp()
                for row in conn.execute(
                    select(LifecycleEvent.subject_id, LifecycleEvent.at).where(
                        LifecycleEvent.subject_type == "finding", LifecycleEvent.event == "new"
                    )
                )
            }
            statuses = conn.execute(select(Batch.status).where(Batch.id.in_(ids))).scalars().all()
        lags = [
            when - merged_at[int(marker.rsplit("-", 1)[1])]
            for marker, when in created.items()
            if int(marker.rsplit("-", 1)[1]) in merged_at
        ]
        elapsed = (max(created.values()) - started) if created else float("nan")
        exact = (
            len(created) == args.findings
            and stats.get("records") == args.findings
            and len(tickets) == args.findings
            and all(t.sync_state == "synced" for t in tickets)
            and len({t.remote_id for t in tickets}) == args.findings
            and set(statuses) == {"succeeded"}
        )
        print(
            f"{kind:<10} lanes {lanes}  faults {fault:>4.0%}: {len(created)} tickets in {elapsed:6.1f}s = "
            f"{len(created) / elapsed:6.1f} tickets/s; lag from merge commit "
            f"p50 {_quantile(lags, 0.5):6.2f}s "
            f"p99 {_quantile(lags, 0.99):6.2f}s max {max(lags, default=float('nan')):6.2f}s; "
            f"calls {stats.get('calls')}, faults served {stats.get('faults')}; exact: {exact}",
            flush=True,
        )
        return exact
    finally:
        for process in (worker, sim):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        redis.Redis.from_url(REDIS).delete(queue)
        drop_database(name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--findings", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000, help="findings per pushed batch")
    parser.add_argument("--kinds", default="servicenow,jira")
    parser.add_argument("--lanes", default="4,1", help="ITSM_DELIVERY_LANES values to compare")
    parser.add_argument("--faults", default="0,0.1", help="fault rates (a fraction of the remote calls)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a run may take")
    args = parser.parse_args()
    ok = True
    for kind in args.kinds.split(","):
        for fault in (float(f) for f in args.faults.split(",")):
            for lanes in (int(n) for n in args.lanes.split(",")):
                ok = run(kind, lanes, fault, args) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
