"""Console benchmark: server time of each console page (gateway/console/pages/) over a large store.

    .venv/bin/python bench/console_bench.py [--findings 1000000 --resources 50000 --alerts 200000
                                             --batches 20000 --repeat 100]

Creates a scratch PostgreSQL database at the head revision and loads one tenant with set-based
SQL: ``--findings`` findings on ``--resources`` resources with their sources (the query
benchmark's loader, bench/query_bench.py), six recommendation types in five controls with a
recommendation of each on every resource (about 40% Unhealthy, 50% Healthy), the Secure Score
recounted by ``gateway.score.upkeep.recount``, ``--alerts`` alerts, ``--batches`` batches (one
with 5,000 rejected records) and a second tenant with 100,000 findings, so tenant scoping is
real; then VACUUM ANALYZE.  A local analyst is signed in (tests/console_support.py) and each
page is requested through the app's WSGI interface (the Flask test client: server time, no
network) ``--repeat`` times after a warm-up, printing p50 and p99 and the rows of the largest
statement each page ran (no page reads more than a page of rows).  Figures, not assertions; the
CPU seconds the machine used meanwhile are printed beside each, so a run disturbed by another
process shows.  The scratch database is dropped at the end, also on error (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import create_database, drop_database  # noqa: E402
from bench.query_bench import OTHER, TENANT, _load_tenant  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.score import upkeep  # noqa: E402
from tests.console_support import login, make_user  # noqa: E402

TYPES = [
    ("missing-updates", "System updates should be installed", "apply-system-updates"),
    # a control of two types: the score impact groups its Unhealthy recommendations by resource
    ("endpoint-protection", "Endpoint protection should be installed", "apply-system-updates"),
    ("disk-encryption", "Disks should be encrypted", "encrypt-data-in-transit"),
    ("mfa", "MFA should be enabled", "enable-mfa"),
    ("open-ports", "Management ports should be closed", "restrict-unauthorized-network-access"),
    (
        "secure-config",
        "Vulnerabilities in security configuration should be remediated",
        "remediate-security-configurations",
    ),
]
PASSWORD = "bench password, long enough"


def load_console(url: str, alerts: int, batches: int) -> None:
    """Recommendations of six types on every resource, alerts, batches and rejections, then the score."""
    with psycopg.connect(url, autocommit=True) as conn:
        tenant_id = conn.execute("SELECT id FROM tenants WHERE external_id = %s", (TENANT,)).fetchone()[0]
        conn.execute("DELETE FROM recommendations WHERE tenant_id = %s", (tenant_id,))
        for key, title, control in TYPES:
            type_id = conn.execute(
                "INSERT INTO recommendation_types (tenant_id, key, kind, title, severity, categories, "
                "control, enabled) VALUES (%s, %s, 'compliance', %s, 'medium', '[]', %s, true) RETURNING id",
                (tenant_id, key, title, control),
            ).fetchone()[0]
            conn.execute(
                """
                INSERT INTO recommendations (tenant_id, resource_id, type_id, status, severity, actual_status,
                                             actual_severity, first_evaluated, status_changed_at, updated_at,
                                             comments, tags)
                SELECT %s, id, %s, s, 'medium',
                       CASE WHEN s = 'NotApplicable' THEN 'Healthy' ELSE s END, 'medium',
                       now(), now(), now(), '[]', '[]'
                FROM (SELECT id, CASE WHEN random() < 0.4 THEN 'Unhealthy' WHEN random() < 0.85 THEN 'Healthy'
                                      ELSE 'NotApplicable' END AS s
                      FROM resources WHERE tenant_id = %s) r""",
                (tenant_id, type_id, tenant_id),
            )
        client_pk = conn.execute(
            "INSERT INTO oauth_clients (client_id, secret_hash, name, provider, scope, disabled, created_at, "
            "secret_rotated_at) VALUES ('bench-client', 'x', 'bench', 'Qualys', 'findings.write', false, "
            "now(), "
            "now()) RETURNING id"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO client_tenants (client_pk, tenant_id) VALUES (%s, %s)", (client_pk, tenant_id)
        )
        conn.execute(f"""
            INSERT INTO alerts (tenant_id, provider, provider_id, title, description, severity, category,
                                recommended_actions, created_date_time, last_modified_date_time,
                                provider_timestamp, content_hash, created_at, updated_at, status, comments,
                                tags)
            SELECT {tenant_id}, 'Contoso', 'alert-' || g, 'Suspicious activity ' || (g % 500),
                   'A synthetic alert.', (ARRAY['low','medium','high','critical'])[1 + g % 4], 'Execution',
                   '[]', timestamptz '2024-01-01' + g * interval '1 minute',
                   timestamptz '2024-01-01' + g * interval '1 minute', now(), 'x', now(), now(),
                   (ARRAY['newAlert','inProgress','resolved'])[1 + g % 3], '[]', '[]'
            FROM generate_series(1, {alerts}) g""")
        conn.execute(f"""
            INSERT INTO batches (tenant_id, client_pk, provider, format, content_type, scan_type, body_sha256,
                                 body_size, status, counts, rejections, attempts, received_at, finished_at)
            SELECT {tenant_id}, {client_pk}, 'Qualys', 'qualys_hld', 'application/xml', 'full', md5(g::text),
                   1000000, (ARRAY['succeeded','partiallySucceeded','failed'])[1 + g % 3],
                   json_build_object('received', 1000, 'created', 10, 'updated', 900, 'rejected', g % 3),
                   '[]', 1, timestamptz '2024-01-01' + g * interval '10 minutes',
                   timestamptz '2024-01-01' + g * interval '10 minutes' + interval '1 minute'
            FROM generate_series(1, {batches}) g""")
        last_batch = conn.execute(
            "SELECT max(id) FROM batches WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()[0]
        conn.execute(f"""
            INSERT INTO batch_rejections (batch_id, seq, tenant_id, position, reason, provider_id)
            SELECT {last_batch}, g, {tenant_id}, 'record ' || g, 'title: missing', 'r-' || g
            FROM generate_series(1, 5000) g""")
    from gateway.db import Database

    db = Database(url)
    try:
        with db.engine.begin() as conn:
            upkeep.recount(conn, tenant_id)
    finally:
        db.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def _machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


ONLY: str | None = None


def measure(client, label: str, path: str, repeat: int, warmup: int) -> str:
    """Time GET ``path`` ``repeat`` times; return the body of the last answer."""
    if ONLY and ONLY not in label:
        repeat, warmup = 0, 1
    for _ in range(warmup):
        response = client.get(path)
        if response.status_code != 200:
            raise SystemExit(f"{response.status_code} for {path}: {response.get_data(as_text=True)[:500]}")
    seconds, cpu = [], _machine_busy_seconds()
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(path)
        body = response.get_data(as_text=True)
        seconds.append(time.perf_counter() - started)
    if not repeat:
        return response.get_data(as_text=True)
    busy = _machine_busy_seconds() - cpu
    ms = [s * 1000 for s in seconds]
    print(
        f"  {label:<44} p50 {statistics.median(ms):7.1f} ms   p99 {_quantile(ms, 0.99):7.1f} ms   "
        f"max {max(ms):7.1f} ms   (n={repeat}; machine busy {busy:.0f} CPU-s in {sum(seconds):.0f} s, "
        f"load {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    return body


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--findings", type=int, default=1_000_000)
    parser.add_argument("--resources", type=int, default=50_000)
    parser.add_argument("--alerts", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--other-findings", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database (its URL is printed)")
    parser.add_argument("--load-only", action="store_true", help="load and keep the database, time nothing")
    parser.add_argument(
        "--url", help="time the pages over a database kept by an earlier --keep/--load-only run (not dropped)"
    )
    parser.add_argument("--only", help="time only the pages whose label contains this text")
    args = parser.parse_args()
    global ONLY
    ONLY = args.only
    logging.basicConfig(level=logging.WARNING)
    if args.url:
        name, url = None, args.url
        upgrade(url)  # a kept database follows the code's migrations
    else:
        name, url = create_database("gw_console_bench")
    try:
        if name is not None:
            started = time.perf_counter()
            upgrade(url)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("SELECT setseed(0.42)")
                _load_tenant(conn, TENANT, args.findings, args.resources)
                if args.other_findings:
                    _load_tenant(conn, OTHER, args.other_findings, max(1, args.resources // 10))
            load_console(url, args.alerts, args.batches)
            print(
                f"loaded {args.findings:,} findings on {args.resources:,} resources, "
                f"{args.resources * len(TYPES):,} recommendations, {args.alerts:,} alerts, "
                f"{args.batches:,} batches (+{args.other_findings:,} findings of another tenant) "
                f"in {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        if args.load_only:
            return
        app = create_app(
            {
                "DATABASE_URL": url,
                "SECRET_KEY": "bench",
                "TASK_ALWAYS_EAGER": True,
                "RATELIMIT_ENABLED": False,
                "SESSION_COOKIE_SECURE": False,
            }
        )
        email = f"bench-{os.getpid()}@example.com"  # a kept database may hold an earlier run's user
        make_user(app, email, PASSWORD, "admin", [TENANT])
        client = login(app.test_client(), email, PASSWORD)
        base = f"/console/t/{TENANT}"
        with psycopg.connect(url, autocommit=True) as conn:
            cve = conn.execute(
                "SELECT cve FROM findings f JOIN tenants t ON t.id = f.tenant_id WHERE "
                "t.external_id = %s AND cve IS NOT NULL ORDER BY f.id LIMIT 1",
                (TENANT,),
            ).fetchone()[0]
            tenant_id = conn.execute("SELECT id FROM tenants WHERE external_id = %s", (TENANT,)).fetchone()[0]
            ids = conn.execute(
                "SELECT (SELECT min(id) FROM resources WHERE tenant_id = %(t)s), "
                "(SELECT min(id) FROM alerts WHERE tenant_id = %(t)s), "
                "(SELECT max(id) FROM batches WHERE tenant_id = %(t)s), "
                "(SELECT min(id) FROM findings WHERE tenant_id = %(t)s)",
                {"t": tenant_id},
            ).fetchone()
        resource_id, alert_id, batch_id, finding_id = ids
        print(f"\n== server time per page ({args.repeat} requests each, after {args.warmup}) ==", flush=True)
        r, w = args.repeat, args.warmup
        measure(client, "overview", f"{base}/overview", r, w)
        groups = measure(client, "recommendations (by score impact)", f"{base}/recommendations", r, w)
        type_url = re.search(r'href="(/console/t/[^"]+/recommendations/types/\d+)"', groups).group(1)
        measure(client, "recommendation type (Unhealthy)", f"{type_url}?status=Unhealthy", r, w)
        first = measure(client, "findings, page 1", f"{base}/findings", r, w)
        next_url = re.search(r'href="([^"]+)" rel="next"', first).group(1).replace("&amp;", "&")
        measure(client, "findings, page 2 (keyset cursor)", next_url, r, w)
        measure(
            client,
            "findings severity=high&state=active",
            f"{base}/findings?severity=high&state=active",
            r,
            w,
        )
        measure(client, f"findings cve={cve}", f"{base}/findings?cve={cve}", r, w)
        measure(client, "findings provider=Tenable", f"{base}/findings?provider=Tenable", r, w)
        measure(client, "finding (sources, history)", f"{base}/findings/{finding_id}", r, w)
        measure(client, "resources, page 1", f"{base}/resources", r, w)
        measure(client, "resource (identifiers, findings, history)", f"{base}/resources/{resource_id}", r, w)
        measure(client, "alerts, page 1", f"{base}/alerts", r, w)
        measure(
            client,
            "alerts severity=high&status=newAlert",
            f"{base}/alerts?severity=high&status=newAlert",
            r,
            w,
        )
        measure(client, "alert (evidence, history)", f"{base}/alerts/{alert_id}", r, w)
        measure(client, "ingestion, page 1", f"{base}/ingestion", r, w)
        measure(client, "batch (5,000 rejections, page 1)", f"{base}/ingestion/batches/{batch_id}", r, w)
        measure(client, "batch progress.json", f"{base}/ingestion/batches/{batch_id}/progress.json", r, w)
        measure(client, "admin", f"{base}/admin", r, w)
        measure(client, "admin users", f"{base}/admin/users", r, w)
        app.extensions["gateway.db"].dispose()
    finally:
        if name is not None and (args.keep or args.load_only):
            print(f"kept {url}")
        elif name is not None:
            drop_database(name)


if __name__ == "__main__":
    main()
