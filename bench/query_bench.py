"""Query API benchmark: OData pages, deep keyset pages, any(), $count and CSV over HTTP on PostgreSQL.

    .venv/bin/python bench/query_bench.py [--findings 1000000 --resources 50000 --repeat 200] [--plans]

Creates a scratch PostgreSQL database, migrates it to revision 0002 (the indexes the query API
shipped with) and loads ``--findings`` findings on ``--resources`` resources for one tenant with
set-based SQL (plus a second tenant with ``--other-findings`` findings, so tenant scoping is
real), then VACUUM ANALYZE.  The app is served on a loopback socket and read over HTTP with a
``security.read`` token; each query is timed ``--repeat`` times after a warm-up (p50, p99).
Then the schema is upgraded to head (the indexes of 0003 and later), analyzed, and every
query is timed again, so one load gives the before and after figures (``--phases`` picks).

With ``--plans`` each query's SQL (captured with a ``before_cursor_execute`` listener on the
app's engine) is run again under ``EXPLAIN (ANALYZE, BUFFERS)`` with the same parameters on a
separate connection, and the plan is printed.  Figures only: nothing here asserts a timing
(the machine is shared).  The scratch database is dropped at the end, also on error.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import psycopg
import requests
from sqlalchemy import event
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import create_database, drop_database  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.migrate import alembic_config, upgrade  # noqa: E402
from tests.conftest import Gateway  # noqa: E402

TENANT, OTHER = "bench", "bench-other"
BASE_REVISION = "0002"  # the schema the query API shipped with: the "before" of the indexes

# Severity and state weights: 'high' and 'active' are common enough that
# "severity eq 'high' and state eq 'active'" matches about 55% of the findings (> 500,000 of
# a million), so page 5,000 at $top=100 exists.
SEVERITY_CASE = """CASE WHEN u1 < 0.02 THEN 'informational' WHEN u1 < 0.10 THEN 'low'
                       WHEN u1 < 0.28 THEN 'medium' WHEN u1 < 0.92 THEN 'high' ELSE 'critical' END"""
STATE_CASE = """CASE WHEN u2 < 0.05 THEN 'new' WHEN u2 < 0.91 THEN 'active'
                    WHEN u2 < 0.93 THEN 'reopened' ELSE 'resolved' END"""
CVE_POOL = 4000


def _load_tenant(conn: psycopg.Connection, external_id: str, findings: int, resources: int,
                 tenant_id: int | None = None) -> None:
    """One tenant's resources (fqdn identifiers), findings (one CVE or QID on one resource each),
    one or two sources per finding (Qualys, and Tenable for ~40%) and a few recommendations.
    ``tenant_id``: load into that existing tenant (its hosts named after ``external_id``)."""
    per_resource = math.ceil(findings / resources)
    if per_resource > 190:
        raise SystemExit("at most 190 findings per resource (CVE keys must be distinct per resource)")
    if tenant_id is None:
        tenant_id = conn.execute("INSERT INTO tenants (external_id, name, created_at) VALUES (%s, %s, now()) "
                                 "RETURNING id", (external_id, external_id)).fetchone()[0]
    conn.execute(f"""
        INSERT INTO resources (tenant_id, kind, name, os, first_seen, last_seen, created_at, updated_at, tags)
        SELECT {tenant_id}, 'vm', 'host' || g || '.{external_id}.example.com', 'Ubuntu 22.04',
               timestamptz '2024-01-01' + g * interval '1 minute', timestamptz '2024-06-01',
               now(), now(), '[]'
        FROM generate_series(1, {resources}) g""")
    conn.execute(f"""
        INSERT INTO resource_identifiers (tenant_id, kind, value, resource_id)
        SELECT tenant_id, 'fqdn', name, id FROM resources WHERE tenant_id = {tenant_id}""")
    rt = conn.execute(  # recommendation types are per tenant
        "INSERT INTO recommendation_types (tenant_id, key, kind, title, severity, categories) VALUES "
        "(%s, 'vulnerability-assessment', 'vulnerability', 'Vulnerabilities', 'high', '[]') RETURNING id",
        (tenant_id,)).fetchone()[0]
    first = conn.execute(f"SELECT min(id) FROM resources WHERE tenant_id = {tenant_id}").fetchone()[0]
    # Finding g sits on resource (g mod R); its k-th finding on that resource (k = g div R) takes
    # CVE number (7r + 21k) mod CVE_POOL, distinct per resource for k < 190; one in ten is a
    # QID-keyed finding without a CVE.
    conn.execute(f"""
        INSERT INTO findings (tenant_id, resource_id, recommendation_type_id, correlation_key, cve, kind,
                              title, description, remediation, severity, cvss_score, state,
                              first_seen, last_seen, resolved_at, state_changed_at, created_at, updated_at,
                              comments, tags)
        SELECT {tenant_id}, {first} + r, {rt}, key, cve, 'vulnerability',
               'Vulnerability ' || key, 'A synthetic finding of the query benchmark, about ' || key
                   || ' on host ' || r || '; it carries a description of a realistic length.',
               'Upgrade the affected package to the fixed version.',
               {SEVERITY_CASE}, round((u1 * 10)::numeric, 1),
               {STATE_CASE},
               seen, CASE WHEN u3 < 0.01 THEN NULL ELSE seen + (u3 * 60) * interval '1 day' END,
               CASE WHEN u2 >= 0.93 THEN seen + interval '61 days' END,
               seen, seen, seen + (u3 * 60) * interval '1 day', '[]', '[]'
        FROM (SELECT g, r, CASE WHEN g % 10 = 0 THEN NULL ELSE c END AS cve,
                     CASE WHEN g % 10 = 0 THEN 'qualys:' || (100000 + g) ELSE c END AS key,
                     u1, u2, u3, timestamptz '2024-01-01' + (u4 * 180) * interval '1 day' AS seen
              FROM (SELECT g, (g - 1) % {resources} AS r,
                           'CVE-2024-' || (10000 + (7 * ((g - 1) % {resources})
                                                    + 21 * ((g - 1) / {resources}))
                                                   % {CVE_POOL}) AS c,
                           random() AS u1, random() AS u2, random() AS u3, random() AS u4
                    FROM generate_series(1, {findings}) g) numbered) shaped
        ORDER BY g""")
    conn.execute(f"""
        INSERT INTO finding_sources (tenant_id, finding_id, resource_id, provider, provider_id,
                                     correlation_key,
                                     vendor_id, state, title, severity, "references", first_seen, last_seen,
                                     provider_timestamp, content_hash, created_at, updated_at)
        SELECT f.tenant_id, f.id, f.resource_id, p.provider, p.prefix || f.id, f.correlation_key,
               '1' || (f.id % 90000), CASE WHEN f.state = 'resolved' THEN 'fixed' ELSE 'open' END, f.title,
               f.severity, '[]', f.first_seen, f.last_seen, f.updated_at, 'x', f.created_at, f.updated_at
        FROM findings f
        JOIN (VALUES ('Qualys', 'q-', 0), ('Tenable', 't-', 1)) AS p(provider, prefix, second)
          ON p.second = 0 OR f.id % 5 < 2
        WHERE f.tenant_id = {tenant_id}""")
    # (the policy's actual_* columns came with migration 0013: load them when the schema has them)
    actual = conn.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                          "'recommendations' AND column_name = 'actual_status'").fetchone()[0]
    columns, values = (", actual_status, actual_severity", ", 'Unhealthy', 'high'") if actual else ("", "")
    conn.execute(f"""
        INSERT INTO recommendations (tenant_id, resource_id, type_id, status, severity, first_evaluated,
                                     status_changed_at, updated_at, comments, tags{columns})
        SELECT {tenant_id}, id, {rt}, 'Unhealthy', 'high', now(), now(), now(), '[]', '[]'{values}
        FROM resources WHERE tenant_id = {tenant_id} ORDER BY id LIMIT 1000""")


def load(url: str, findings: int, resources: int, other_findings: int) -> None:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setseed(0.42)")
        _load_tenant(conn, TENANT, findings, resources)
        if other_findings:
            _load_tenant(conn, OTHER, other_findings, max(1, resources // 10))
        loaded = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE")  # what autovacuum leaves: statistics and the visibility map
        sizes = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('findings')), "
                             "pg_size_pretty(pg_total_relation_size('finding_sources'))").fetchone()
    print(f"loaded {findings:,} findings on {resources:,} resources (+{other_findings:,} of another tenant) "
          f"in {loaded:.1f}s, VACUUM ANALYZE {time.perf_counter() - started - loaded:.1f}s; "
          f"findings {sizes[0]}, finding_sources {sizes[1]} with indexes")


# -- measuring --------------------------------------------------------------------------------


class Capture:
    """The statements the app runs while ``on`` (a before_cursor_execute listener)."""

    def __init__(self, engine) -> None:
        self.on = False
        self.statements: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._record)

    def _record(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.on:
            with self.lock:
                self.statements.append((statement, parameters))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _with_top(link: str, top: int) -> str:
    parts = urlsplit(link)
    args = parse_qs(parts.query, keep_blank_values=True)
    args["$top"] = [str(top)]
    return urlunsplit(parts._replace(query=urlencode(args, doseq=True)))


class Bench:
    def __init__(self, base: str, session: requests.Session, capture: Capture, url: str, args) -> None:
        self.base, self.session, self.capture, self.url, self.args = base, session, capture, url, args
        self.findings = f"{base}/api/v1/tenants/{TENANT}/security/findings"
        self.results: list[tuple[str, str]] = []

    def get(self, link: str, params: dict | None = None) -> requests.Response:
        response = self.session.get(link, params=params, timeout=600)
        if response.status_code != 200:
            raise SystemExit(f"{response.status_code} for {response.url}: {response.text[:500]}")
        return response

    def time(self, label: str, link: str, params: dict | None = None, repeat: int | None = None) -> dict:
        repeat = repeat or self.args.repeat
        for _ in range(self.args.warmup):
            self.get(link, params)
        seconds = []
        for _ in range(repeat):
            started = time.perf_counter()
            body = self.get(link, params).json()
            seconds.append(time.perf_counter() - started)
        ms = [s * 1000 for s in seconds]
        figure = (f"p50 {statistics.median(ms):7.1f} ms   p99 {_quantile(ms, 0.99):7.1f} ms   "
                  f"max {max(ms):7.1f} ms   (n={repeat}, {len(body['value'])} rows"
                  + (f", @odata.count {body['@odata.count']:,}" if "@odata.count" in body else "") + ")")
        print(f"  {label:<46} {figure}", flush=True)
        self.results.append((label, figure))
        if self.args.plans:
            self.explain(link, params)
        return body

    def walk(self, params: dict, page: int) -> str:
        """The nextLink of page ``page`` (1-based) at $top=100, reached by following nextLinks once:
        pages of ``--walk-top`` rows up to the row before it (the token does not bind $top), then
        $top=100."""
        started = time.perf_counter()
        rows_before, walk_top = (page - 1) * 100, self.args.walk_top
        body = self.get(self.findings, dict(params, **{"$top": str(walk_top)})).json()
        done, requests_made = len(body["value"]), 1
        while done + walk_top <= rows_before:
            body = self.get(body["@odata.nextLink"]).json()
            done += len(body["value"])
            requests_made += 1
        link = _with_top(body["@odata.nextLink"], 100)
        while done < rows_before:
            body = self.get(link).json()
            done += len(body["value"])
            link = body["@odata.nextLink"]
            requests_made += 1
        elapsed = time.perf_counter() - started
        print(f"  (walked to page {page:,} in {requests_made} requests, {elapsed:.1f}s)",
              flush=True)
        return link

    def explain(self, link: str, params: dict | None) -> None:
        self.capture.statements.clear()
        self.capture.on = True
        try:
            # Only the first chunk of a CSV export: its first keyset batches show the plans.
            with self.session.get(link, params=params, stream=True, timeout=600) as response:
                next(response.iter_content(chunk_size=1 << 16), None)
        finally:
            self.capture.on = False
        shown = [(s, p) for s, p in self.capture.statements
                 if "findings" in s and "oauth" not in s and "FROM tenants" not in s]
        with psycopg.connect(self.url, autocommit=True) as conn:
            for statement, parameters in shown[:2]:
                print("    SQL: " + " ".join(statement.split())[:1500])
                print(f"    parameters: {parameters}")
                plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement, parameters).fetchall()
                for (line,) in plan:
                    print("      " + line)
        print(flush=True)

    def csv_export(self, params: dict) -> None:
        rss_before = _rss_kib("VmRSS")
        _reset_peak()
        started = time.perf_counter()
        rows, size = -1, 0  # the header is not a row
        with self.session.get(self.findings, params=dict(params, **{"$format": "csv"}), stream=True,
                              timeout=3600) as response:
            if response.status_code != 200:
                raise SystemExit(f"CSV export: {response.status_code} {response.text[:300]}")
            for chunk in response.iter_content(chunk_size=1 << 16):
                rows += chunk.count(b"\n")  # rows end in CRLF; a chunk may split one
                size += len(chunk)
        elapsed = time.perf_counter() - started
        growth = (_rss_kib("VmHWM") - rss_before) / 1024
        figure = (f"{rows:,} rows, {size / 2**20:.0f} MiB in {elapsed:.1f}s = {rows / elapsed:,.0f} rows/s; "
                  f"peak RSS growth {growth:.1f} MiB (server and client share this process)")
        print(f"  {'CSV export of (a)':<46} {figure}", flush=True)
        self.results.append(("CSV export of (a)", figure))
        if self.args.plans:
            self.explain(self.findings, dict(params, **{"$format": "csv"}))


def _rss_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def measure(bench: Bench, url: str, phase: str) -> None:
    print(f"\n== {phase} ==", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        cve = conn.execute("SELECT cve FROM findings f JOIN tenants t ON t.id = f.tenant_id "
                           "WHERE t.external_id = %s AND cve IS NOT NULL ORDER BY f.id LIMIT 1",
                           (TENANT,)).fetchone()[0]
        indexes = conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'findings' "
                               "ORDER BY indexname").fetchall()
    print("  findings indexes: " + ", ".join(name for (name,) in indexes))
    high_active = {"$filter": "severity eq 'high' and state eq 'active'"}
    bench.time("(a) severity+state, page 1", bench.findings, high_active)
    deep = bench.walk(high_active, bench.args.deep_page)
    bench.time(f"(b) severity+state, page {bench.args.deep_page:,} (nextLink)", deep)
    bench.time(f"(c) cves/any(c: c eq '{cve}')", bench.findings,
               {"$filter": f"cves/any(c: c eq '{cve}')"})
    bench.time("(d) $count=true with the filter of (a)", bench.findings,
               dict(high_active, **{"$count": "true"}),
               repeat=max(10, bench.args.repeat // 4))
    ordered = dict(high_active, **{"$orderby": "lastSeen desc"})
    slow = max(10, bench.args.repeat // 4)  # these sort the filtered set: fewer repetitions
    bench.time("(f) (a) $orderby=lastSeen desc, page 1", bench.findings, ordered, repeat=slow)
    deep_ordered = bench.walk(ordered, bench.args.ordered_deep_page)
    bench.time(f"(g) (a) lastSeen desc, page {bench.args.ordered_deep_page:,}", deep_ordered, repeat=slow)
    by_severity = {"$filter": "state eq 'active'", "$orderby": "severity desc"}
    bench.time("(h) state eq active, $orderby=severity desc, p1", bench.findings, by_severity, repeat=slow)
    if bench.args.csv:
        bench.csv_export(high_active)


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--findings", type=int, default=1_000_000)
    parser.add_argument("--resources", type=int, default=50_000)
    parser.add_argument("--other-findings", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--deep-page", type=int, default=5000, help="the deep page (at $top=100)")
    parser.add_argument("--ordered-deep-page", type=int, default=1000,
                        help="the deep page of the lastSeen ordering (each page of the walk sorts)")
    parser.add_argument("--walk-top", type=int, default=1000, help="$top of the pages walked to reach it")
    parser.add_argument("--phases", default="before,after",
                        help=f"before: schema at {BASE_REVISION}; after: schema at head")
    parser.add_argument("--no-csv", dest="csv", action="store_false")
    parser.add_argument("--plans", action="store_true", help="print EXPLAIN (ANALYZE, BUFFERS) of each query")
    args = parser.parse_args()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if _head_revision() == BASE_REVISION and phases == ["before", "after"]:
        phases = ["before"]  # no later migration: one phase, the schema at head

    name, url = create_database("gw_qbench")
    app = server = None
    try:
        head = _head_revision()
        upgrade(url, BASE_REVISION if "before" in phases else "head")
        load(url, args.findings, args.resources, args.other_findings)
        app = create_app({"DATABASE_URL": url, "BROKER_URL": "memory://", "SECRET_KEY": "bench"})
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"
        gw = Gateway(app)
        client_id, secret = gw.client("BenchReader", "security.read", [TENANT])
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {gw.token(client_id, secret)}"
        capture = Capture(app.extensions["gateway.db"].engine)
        bench = Bench(base, session, capture, url, args)
        summary = []
        for phase in phases:
            if phase == "after":
                started = time.perf_counter()
                upgrade(url, "head")
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("VACUUM ANALYZE findings")
                app.extensions["gateway.db"].engine.dispose()  # no plan cached for the old schema
                elapsed = time.perf_counter() - started
                print(f"\nupgraded to {head} (+ VACUUM ANALYZE findings) in {elapsed:.1f}s")
            label = f"schema at {BASE_REVISION}" if phase == "before" else f"schema at {head}"
            bench.results = []
            measure(bench, url, label)
            summary.append((label, bench.results))
        print("\nsummary (" + " ".join(sys.argv[1:]) + ")")
        for label, results in summary:
            print(f"  {label}")
            for query, figure in results:
                print(f"    {query:<46} {figure}")
    finally:
        if server is not None:
            server.shutdown()
        if app is not None:
            app.extensions["gateway.db"].dispose()
        drop_database(name)


if __name__ == "__main__":
    main()
