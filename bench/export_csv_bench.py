"""Export benchmark: CSV and JSON Lines of a whole findings collection, Python path vs COPY path.

    .venv/bin/python bench/export_csv_bench.py [--rows 1000000] [--resources 50000] [--filter ...]
        [--orderby ...] [--select ...] [--formats csv,jsonl] [--paths copy,python] [--connections 1,2]
        [--no-http] [--keep | --url postgresql://.../gw_export_bench_xxxxxx]

Creates a scratch PostgreSQL database migrated to head, loads ``--rows`` findings (one or two
sources each) for one tenant and a tenth as many for another (bench/query_bench.py's set-based
loader), then VACUUM ANALYZE.  Each (format, path) pair streams the whole export through
``gateway.bulk_export.stream`` in this process, counting rows and bytes: rows/s, MB/s and the
peak RSS growth while it ran (VmHWM reset before each run).  The two paths' outputs are compared
by SHA-256 (they must be byte-identical).  Then, unless ``--no-http``, the COPY path is read over
HTTP from the real endpoint on a loopback socket (``$format=csv`` and ``$format=jsonl``,
streamed by ``requests``).  Figures only: nothing here asserts a timing (the machine is shared).
The scratch database is dropped at the end, also on error, unless ``--keep`` (its URL is printed):
``--url`` then runs the exports again over that database without loading it (``--rows`` is
ignored; the figures count the rows actually exported).

Figures (2 cores shared with ~9 other sessions, load average 11-22; wall times mostly measure
the load, CPU seconds do not):

    --rows 50000: csv copy 3,814 rows/s (PostgreSQL 2.3 CPU-s: 21,930 rows/CPU-s), python 594 rows/s
    (Python 13.8 CPU-s: 3,619 rows/CPU-s); jsonl copy 4,670 rows/s (27,027 rows/CPU-s), python
    713 rows/s (4,277 rows/CPU-s); outputs byte-identical; peak RSS +3 MiB copy, +20 MiB python.
    --rows 1000000 --paths copy --no-http: csv 200.7 s, 4,982 rows/s, 26,882 rows/CPU-s, peak RSS
    +12 MiB; jsonl 110.2 s, 9,074 rows/s, 34,235 rows/CPU-s, peak RSS +0 MiB.
    --rows 1000000 --paths copy --connections 1,2 --no-http (load average 11-12): csv x1 74.8 s,
    13,369 rows/s, 41,152 rows/CPU-s of its backend; csv x2 66.6 s, 15,024 rows/s, 78,740 rows/CPU-s
    of the busiest backend (two of 12.7 s); jsonl x1 97.1 s, 10,294 rows/s, 46,125 rows/CPU-s;
    jsonl x2 61.7 s, 16,196 rows/s, 92,937 rows/CPU-s; peak RSS +17 MiB at most; byte-identical.
    --url (1,000,000 rows kept) --paths copy --connections 1,2 under /work/bin/quiet (load average
    2.2-2.7; the README's export paragraph has the whole series): before the joined lookups, csv x2
    48,364 rows/s, jsonl x2 47,934, http 51,670 / 54,126; after, csv x2 45,675, jsonl x2 55,012,
    http 47,563 / 58,115 (backends 31-38 CPU-s per million rows; byte-identical to before).
    Alternated in one quiet slot (--connections 2 --no-http, load average 1.6-2.0): jsonl x2
    53,222 / 51,379 after, 44,020 / 45,368 before; csv x2 41,317 / 50,890 after, 41,607 / 45,580.

A new, slower VM (2026-12-03; the same 1,000,000 rows loaded again with --keep, 194.5 s):
    --url ... --paths copy --connections 1,2 --no-http under /work/bin/quiet, load average 1.1-1.5,
    the code of main (a9b0530): csv x1 14,802 rows/s (backend 60.8 CPU-s), csv x2 24,443 (backends
    66.7 CPU-s, busiest 33.0), jsonl x1 18,976 (44.3), jsonl x2 33,222 (52.1, busiest 25.4); sha256
    csv 503defba5033ee58..., jsonl bf4a9b1e461a1aa2...  The backends' CPU a row is some 1.7 times
    last session's (67 against 34-41 µs for CSV): the same SQL on a slower core.
    The same code again at the end (--url ... --paths copy --connections 2, with HTTP, quiet, load
    average 1.2-2.1): csv x2 33,317 rows/s (backends 50.8 CPU-s), jsonl x2 43,199 (40.3); over HTTP
    csv 31,920 (55.2), jsonl 32,758 (53.2); peak RSS +88 MiB at most.  The VM's speed varies by a
    third between quiet runs (66.7 against 50.8 backend CPU-s for the same CSV export).
    Tried, not kept (the backend's CPU seconds of one 10,000-row slice, /proc ticks of 10 ms, under
    /work/bin/shared, three runs each): timestamps from their own text output in a UTC session
    (``replace(rpad(ts::timestamp::text, 26, '0'), ' ', 'T') || '+00:00'``, falling back to to_char
    in other zones; byte-identical, also on 300,000 findings and sources compared in SQL): six
    timestamps 7-8 µs a row against 7 with to_char, the whole CSV row 38-41 against 40: no gain.
    The sources' ``string_agg`` without its ORDER BY (a per-row sort): sources 22 µs against 24-25
    (not kept: the only index on finding_sources.finding_id gives TID order, not id order).

A faster VM (2026-12-03 evening session; 1,000,000 rows loaded with --keep in 72.4 s), all under
/work/bin/quiet, the code of main (7397c57, unchanged by this series):
    --url ... --paths copy --connections 1,2 --no-http, load average 2.5 before, 1.9 after: csv x1
    42,988 rows/s (backend 22.0 CPU-s), csv x2 68,360 (23.9, busiest 11.7), jsonl x1 57,960 (15.4),
    jsonl x2 74,598 (21.9, busiest 10.8); Python 3.3-5.9 CPU-s (most of it this bench's SHA-256);
    peak RSS +76 MiB at most; sha256 csv 503defba5033ee58..., jsonl bf4a9b1e461a1aa2... (as before).
    --url ... --paths copy --connections 2 (with HTTP), load average 3.7 before, 3.1 after: csv x2
    65,271, jsonl x2 70,738; over HTTP csv 71,779 rows/s (backends 23.8 CPU-s, server and client
    2.8), jsonl 76,611 (22.3, 2.8); peak RSS +88 MiB at most.
    --connections 2,3 --no-http (load average 2.8 before, 1.5-2.2 after): csv 68,337 / 69,661,
    jsonl 71,254 / 74,128: a third connection adds 2-4% (within the runs' spread) on 2 cores
    that two backends and this process already keep ~94% busy (27 CPU-s in 14.6 s); not changed.
    Where a 10,000-row slice's backend CPU goes (one slice of the two-connection path after id
    500,000, best of three, µs a row, wall and /proc CPU agree within 1-3): jsonl 20.5, csv 22.3;
    without the sources jsonl 11.2, csv 11.9; the sources alone 13-14 (of which the correlated
    lookup and an ordered string_agg of one column are 1.2-2.0: the rest is the twenty fields'
    rendering); the six finding and three source timestamps as constants: jsonl 16.6, csv 16.8
    (to_char some 0.4 µs each).  Tried, not kept (no gain, same bytes): each source object by
    ``row_to_json`` of a subquery (fields as text/json columns) instead of concatenated fields,
    13.5-14.3 against 13.6; ``concat()`` of the parts instead of chained ``||``, 19.8 against 20.5
    (within the spread).  Rendering in Python instead: fetching the raw rows alone (binary
    protocol, psycopg's C loaders) costs 14.3 µs a finding row and 11.8 µs per finding for its
    sources, wall, nearly all of it this process's (backend 5 and 2): some 26 µs of one GIL-bound
    Python thread before any rendering, against 20-22 µs of a backend that two connections
    spread over two cores, so that path would be slower (not built; orjson is not installed).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import psycopg
import requests
from sqlalchemy import select
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import create_database, drop_database  # noqa: E402
from bench.query_bench import _load_tenant, _reset_peak, _rss_kib  # noqa: E402
from gateway import bulk_export, create_app, query  # noqa: E402
from gateway.api.collections import COLLECTIONS  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.models import Tenant  # noqa: E402
from gateway.odata import FilterContext  # noqa: E402
from tests.conftest import Gateway  # noqa: E402

TENANT, OTHER = "bench", "bench-other"


class _Args(dict):
    """The query string as ``parse_list_args`` reads it."""

    def getlist(self, name: str) -> list:
        return [self[name]] if name in self else []


def load(url: str, rows: int, resources: int) -> None:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setseed(0.42)")
        _load_tenant(conn, TENANT, rows, resources)
        _load_tenant(conn, OTHER, max(1, rows // 10), max(1, resources // 10))
        loaded = time.perf_counter() - started
        conn.execute("VACUUM ANALYZE")
        sources = conn.execute("SELECT count(*) FROM finding_sources").fetchone()[0]
    print(f"loaded {rows:,} findings (+{max(1, rows // 10):,} of another tenant, {sources:,} sources) "
          f"in {loaded:.1f}s, VACUUM ANALYZE {time.perf_counter() - started - loaded:.1f}s", flush=True)


def _backend_cpu(url: str) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend connected to the bench database (this machine's /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [row[0] for row in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = "
                                               "current_database() AND pid <> pg_backend_pid()")]
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            found[pid] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError):
            pass
    return found


def run(engine, tenant_id: int, options: dict, fmt: str, path: str, connections: int = 1) -> tuple[int, str]:
    """Stream one export; print its figures; (rows, sha256)."""
    collection = COLLECTIONS["findings"]
    context = FilterContext(tenant_id=tenant_id, dialect="postgresql")
    request = query.parse_list_args(collection, _Args(options | {"$format": fmt}), context, 100, 1000)
    if path == "copy" and bulk_export.copy_rendering(engine, collection, request) is None:
        print(f"  {fmt:5} {path:6}  (no SQL rendering for this selection: the Python path would serve it)")
        return 0, ""
    digest, size, lines = hashlib.sha256(), 0, 0
    _reset_peak()
    base = _rss_kib("VmRSS")
    url = engine.url.render_as_string(hide_password=False).replace("+psycopg", "")
    backend_before, cpu_before = _backend_cpu(url), time.process_time()
    started = time.perf_counter()
    for chunk in bulk_export.stream(engine, collection, tenant_id, request, fmt, fast=path == "copy",
                                    connections=connections):
        digest.update(chunk)
        size += len(chunk)
        lines += chunk.count(b"\n")
    elapsed = time.perf_counter() - started
    rows = lines - (fmt == "csv")  # (a CSV cell with a line break would count twice: the loader writes none)
    peak = (_rss_kib("VmHWM") - base) / 1024
    python_cpu = time.process_time() - cpu_before
    backends = [seconds - backend_before.get(pid, 0.0) for pid, seconds in _backend_cpu(url).items()]
    backend_cpu, busiest_backend = sum(backends), max(backends, default=0.0)
    # CPU seconds do not depend on how busy the shared machine is: rows per CPU-second of the
    # busiest process (this one, or one PostgreSQL backend) is about the rate on idle cores, one
    # core per process (the backends of a several-connection export each read some slices)
    label = f"{path}x{connections}" if path == "copy" else path
    print(f"  {fmt:5} {label:6} {rows:>10,} rows {elapsed:7.1f}s {rows / elapsed:>9,.0f} rows/s "
          f"{size / elapsed / 2**20:6.1f} MB/s  {size / 2**20:7.1f} MB  peak RSS +{peak:.0f} MiB  "
          f"CPU: Python {python_cpu:.1f}s, PostgreSQL {backend_cpu:.1f}s (busiest backend "
          f"{busiest_backend:.1f}s; {rows / max(python_cpu, busiest_backend, 1e-9):,.0f} rows per CPU-second "
          f"of the busiest process)", flush=True)
    return rows, digest.hexdigest()


def over_http(app, options: dict, fmt: str) -> None:
    gateway = Gateway(app)
    client_id, secret = gateway.client("Bench", "security.read", [TENANT])
    headers = {"Authorization": f"Bearer {gateway.token(client_id, secret)}"}
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/api/v1/tenants/{TENANT}/security/findings"
        _reset_peak()
        base = _rss_kib("VmRSS")
        database = app.extensions["gateway.db"].engine.url.render_as_string(hide_password=False)
        database = database.replace("+psycopg", "")
        backend_before, cpu_before = _backend_cpu(database), time.process_time()
        started = time.perf_counter()
        size = lines = 0
        with requests.get(url, params=options | {"$format": fmt}, headers=headers, stream=True,
                          timeout=600) as response:
            response.raise_for_status()
            for chunk in response.iter_content(chunk_size=1 << 16):
                size += len(chunk)
                lines += chunk.count(b"\n")
        elapsed = time.perf_counter() - started
        rows = lines - (fmt == "csv")
        python_cpu = time.process_time() - cpu_before
        backend_cpu = sum(seconds - backend_before.get(pid, 0.0)
                          for pid, seconds in _backend_cpu(database).items())
        print(f"  {fmt:5} http   {rows:>10,} rows {elapsed:7.1f}s {rows / elapsed:>9,.0f} rows/s "
              f"{size / elapsed / 2**20:6.1f} MB/s  peak RSS (server and client) "
              f"+{(_rss_kib('VmHWM') - base) / 1024:.0f} MiB  CPU: Python (server and client) "
              f"{python_cpu:.1f}s, PostgreSQL {backend_cpu:.1f}s", flush=True)
    finally:
        server.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--resources", type=int, default=0, help="default: rows / 20")
    parser.add_argument("--filter")
    parser.add_argument("--orderby")
    parser.add_argument("--select")
    parser.add_argument("--formats", default="csv,jsonl", help="empty: load only (with --keep)")
    parser.add_argument("--paths", default="copy,python")
    parser.add_argument("--connections", default="1",
                        help="COPY path: connections sharing the export, e.g. 1,2 (each run separately)")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the loaded database (its URL is printed)")
    parser.add_argument("--url", help="a database loaded by an earlier --keep run: export only")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    options = {name: value for name, value in (("$filter", args.filter), ("$orderby", args.orderby),
                                               ("$select", args.select)) if value}
    if args.url:
        name, url = None, args.url
    else:
        name, url = create_database("gw_export_bench")
    try:
        if name is not None:
            upgrade(url)
            load(url, args.rows, args.resources or max(1, args.rows // 20))
            if args.keep:
                print(f"kept: --url {url}", flush=True)
        app = create_app({"DATABASE_URL": url, "SECRET_KEY": "bench", "TASK_ALWAYS_EAGER": True,
                          "RATELIMIT_ENABLED": False})
        engine = app.extensions["gateway.db"].engine
        with engine.connect() as conn:
            tenant_id = conn.scalar(select(Tenant.id).where(Tenant.external_id == TENANT))
        print(f"findings export, options {options or 'none'}, COPY slices of {bulk_export.COPY_SLICE:,} "
              f"rows, Python batches of {query.CSV_BATCH:,}", flush=True)
        for fmt in filter(None, args.formats.split(",")):
            digests = {}
            for path in args.paths.split(","):
                for connections in ([int(n) for n in args.connections.split(",")] if path == "copy" else [1]):
                    digests[f"{path}x{connections}" if path == "copy" else path] = run(
                        engine, tenant_id, options, fmt, path, connections)
            if len({digest for _, digest in digests.values() if digest}) == 1 and len(digests) > 1:
                print(f"  {fmt}: the paths' outputs are byte-identical (sha256 "
                      f"{next(iter(digests.values()))[1][:16]}...)")
            elif len(digests) > 1:
                print(f"  {fmt}: the paths' outputs DIFFER: {digests}")
        if not args.no_http:
            for fmt in filter(None, args.formats.split(",")):
                over_http(app, options, fmt)
        app.extensions["gateway.db"].dispose()
    finally:
        if name is not None and not args.keep:
            drop_database(name)


if __name__ == "__main__":
    main()
