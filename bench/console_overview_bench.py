"""Console page benchmark: the server time of the Overview (and the Users page) on PostgreSQL.

    .venv/bin/python bench/console_overview_bench.py [--findings 1000000 --resources 50000 --alerts 100000
                                             --batches 20000 --repeat 100]

Creates a scratch PostgreSQL database migrated to head and loads one tenant with set-based SQL:
``--findings`` findings on ``--resources`` resources (bench/query_bench.py's loader, with a second
tenant of 100,000 findings so tenant scoping is real), five recommendations per resource in five
controls (random status and severity), the Secure Score recounted by the gateway's own
``recount`` plus 500 history rows, ``--alerts`` alerts (random severity and status) and
``--batches`` batches of three providers spread over the last 30 days.  Then VACUUM ANALYZE.

The app is served on a loopback socket; a local console user signs in through the real form
(CSRF token and all) and each page is fetched ``--repeat`` times after a warm-up.  The server
time of each request (from the app's first ``before_request`` to its last ``after_request``,
recorded by hooks this script adds to the app instance) and the client's wall time are printed
as p50/p99, with the rows each page read.  Figures, not assertions; the scratch database is
dropped at the end, also on error.  ``--load-only`` loads and keeps it (its URL is printed);
``--url URL`` times a kept one without loading (and without dropping it).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import psycopg
import requests
from flask import g
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import create_database, drop_database  # noqa: E402
from bench.query_bench import _load_tenant, _quantile  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.score.upkeep import recount  # noqa: E402
from tests.console_support import make_user  # noqa: E402

TENANT = "bench"
CONTROLS = ("enable-mfa", "encrypt-data", "secure-network", "system-updates", "endpoint-protection")


def load_console_data(url: str, args) -> None:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setseed(0.15)")
        _load_tenant(conn, TENANT, args.findings, args.resources)
        _load_tenant(conn, "bench-other", 100_000, 5_000)
        tenant_id = conn.execute("SELECT id FROM tenants WHERE external_id = %s", (TENANT,)).fetchone()[0]
        conn.execute("UPDATE recommendation_types SET control = 'remediate-vulnerabilities'")
        for control in CONTROLS:
            type_id = conn.execute(
                "INSERT INTO recommendation_types (tenant_id, key, kind, title, severity, categories, "
                "control, enabled) VALUES (%s, %s, 'compliance', %s, 'medium', '[]', %s, true) RETURNING id",
                (tenant_id, f"check-{control}", f"Check {control}", control),
            ).fetchone()[0]
            conn.execute(f"""
                INSERT INTO recommendations (tenant_id, resource_id, type_id, status, severity, actual_status,
                                             actual_severity, first_evaluated, status_changed_at, updated_at,
                                             comments, tags)
                SELECT {tenant_id}, id, {type_id}, s, v, s, v, now(), now(), now(), '[]', '[]'
                FROM (SELECT id, CASE WHEN random() < 0.4 THEN 'Unhealthy' ELSE 'Healthy' END AS s,
                             (ARRAY['low', 'medium', 'high', 'critical'])[1 + floor(random() * 4)::int] AS v
                      FROM resources WHERE tenant_id = {tenant_id}) r""")
        conn.execute("""
            INSERT INTO oauth_clients (client_id, secret_hash, name, provider, scope, disabled, created_at,
                                       secret_rotated_at)
            VALUES ('bench-client', 'x', 'bench', 'Qualys', 'findings.write', false, now(), now())""")
        client_pk = conn.execute("SELECT id FROM oauth_clients WHERE client_id = 'bench-client'").fetchone()[
            0
        ]
        conn.execute(f"""
            INSERT INTO batches (tenant_id, client_pk, provider, format, content_type, scan_type, body_sha256,
                                 body_size, status, counts, rejections, attempts, received_at, finished_at)
            SELECT {tenant_id}, {client_pk}, (ARRAY['Qualys', 'Tenable', 'CheckPoint'])[1 + g % 3],
                   'canonical', 'application/json', 'incremental', md5(g::text) || md5(g::text), 1000,
                   'succeeded',
                   jsonb_build_object('received', 50 + g % 100, 'rejected', g % 7, 'created', 10),
                   '[]', 1, now() - (g % 43200) * interval '1 minute', now()
            FROM generate_series(1, {args.batches}) g""")
        conn.execute(f"""
            INSERT INTO alerts (tenant_id, provider, provider_id, title, severity, provider_timestamp,
                                content_hash, created_at, updated_at, status, comments, tags,
                                recommended_actions)
            SELECT {tenant_id}, 'Sentinel', 'a-' || g, 'Alert ' || g,
                   (ARRAY['low', 'medium', 'high', 'critical'])[1 + g % 4], now(), 'x', now(), now(),
                   (ARRAY['newAlert', 'inProgress', 'resolved', 'dismissed', 'newAlert'])[1 + (g / 4) % 5],
                   '[]', '[]', '[]'
            FROM generate_series(1, {args.alerts}) g""")
    from gateway.db import Database

    db = Database(url)
    with db.engine.begin() as conn:
        recount(conn, tenant_id)  # the stored control rows, as a merge leaves them
    db.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"""
            INSERT INTO secure_scores (tenant_id, current, max, percentage, control_scores, created_at)
            SELECT {tenant_id}, 20 + g % 17, 60, (20 + g % 17) / 60.0, '[]', now() - g * interval '1 hour'
            FROM generate_series(1, 500) g""")
        conn.execute("VACUUM ANALYZE")
        counts = conn.execute(f"""
            SELECT (SELECT count(*) FROM recommendations WHERE tenant_id = {tenant_id}),
                   (SELECT count(*) FROM alerts), (SELECT count(*) FROM batches)""").fetchone()
    print(
        f"loaded {args.findings:,} findings, {counts[0]:,} recommendations, {counts[1]:,} alerts, "
        f"{counts[2]:,} batches in {time.perf_counter() - started:.1f}s (with VACUUM ANALYZE)",
        flush=True,
    )


def serve(url: str):
    os.environ.setdefault("GATEWAY_RATELIMIT_ENABLED", "false")
    app = create_app(
        {
            "DATABASE_URL": url,
            "BROKER_URL": "memory://",
            "SECRET_KEY": "bench",
            "ISSUER": "http://127.0.0.1",
            "CONSOLE_COOKIE_SECURE": False,
            "RATELIMIT_ENABLED": False,
            "LOG_LEVEL": "WARNING",
        }
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    timings: list[float] = []

    @app.before_request
    def _start():
        g.bench_started = time.perf_counter()

    @app.after_request
    def _stop(response):
        if "bench_started" in g and "/console/t/" in (g.get("bench_path") or ""):
            timings.append(time.perf_counter() - g.bench_started)
        return response

    @app.before_request
    def _path():
        from flask import request

        g.bench_path = request.path

    app.before_request_funcs[None].insert(0, app.before_request_funcs[None].pop())  # _start runs first
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return app, server, timings


def statement_times(app, http: requests.Session, link: str, rounds: int = 10) -> None:
    """The overview's statements, each with its median time over ``rounds`` requests."""
    from sqlalchemy import event

    engine = app.extensions["gateway.db"].engine
    spent: dict[str, list[float]] = {}

    def before(conn, cursor, statement, parameters, context, executemany):
        conn.info["bench_started"] = time.perf_counter()

    def after(conn, cursor, statement, parameters, context, executemany):
        key = " ".join(statement.split())[:150]
        spent.setdefault(key, []).append((time.perf_counter() - conn.info.pop("bench_started")) * 1000)

    for reader in (engine,):
        event.listen(reader, "before_cursor_execute", before)
        event.listen(reader, "after_cursor_execute", after)
    for _ in range(rounds):
        http.get(link, timeout=60)
    event.remove(engine, "before_cursor_execute", before)
    event.remove(engine, "after_cursor_execute", after)
    print("  overview statements (median ms over the requests):")
    for key, values in sorted(spent.items(), key=lambda item: -statistics.median(item[1])):
        print(f"    {statistics.median(values):7.1f}  {key}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--findings", type=int, default=1_000_000)
    parser.add_argument("--resources", type=int, default=50_000)
    parser.add_argument("--alerts", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--load-only", action="store_true", help="load and keep the database, time nothing")
    parser.add_argument("--url", help="time the pages over a database kept by --load-only (not dropped)")
    args = parser.parse_args()
    name, url = (None, args.url) if args.url else create_database("gw_console_overview_bench")
    server = None
    try:
        upgrade(url)
        if name is not None:
            load_console_data(url, args)
        if args.load_only:
            print(f"kept {url}")
            name = None
            return
        app, server, timings = serve(url)
        email = f"bench-{os.getpid()}@example.com"  # a kept database may hold an earlier run's user
        make_user(app, email, "a bench password", "admin", [TENANT])
        base = f"http://127.0.0.1:{server.server_port}"
        http = requests.Session()
        page = http.get(f"{base}/console/login", timeout=60).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        answer = http.post(
            f"{base}/console/login",
            timeout=60,
            allow_redirects=False,
            data={"email": email, "password": "a bench password", "csrf_token": token},
        )
        assert answer.status_code == 302, answer.text[:300]
        load = os.getloadavg()
        print(
            f"load average before timing: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)",
            flush=True,
        )
        for label, path in (
            ("overview", f"/console/t/{TENANT}/overview"),
            ("admin users", f"/console/t/{TENANT}/admin/users"),
        ):
            for _ in range(args.warmup):
                assert http.get(base + path, timeout=60).status_code == 200
            timings.clear()
            wall = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                response = http.get(base + path, timeout=60)
                wall.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200
            server_ms = [t * 1000 for t in timings]
            print(
                f"  {label:<12} server p50 {statistics.median(server_ms):7.1f} ms  p99 "
                f"{_quantile(server_ms, 0.99):7.1f} ms  max {max(server_ms):7.1f} ms | client p50 "
                f"{statistics.median(wall):7.1f} ms  p99 {_quantile(wall, 0.99):7.1f} ms  (n={args.repeat}, "
                f"{len(response.content):,} bytes)",
                flush=True,
            )
        statement_times(app, http, base + f"/console/t/{TENANT}/overview")
        load = os.getloadavg()
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
        app.extensions["gateway.db"].dispose()
    finally:
        if server is not None:
            server.shutdown()
        if name is not None:
            drop_database(name)


if __name__ == "__main__":
    main()
