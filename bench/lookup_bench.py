"""Merge lookups on a store whose statistics are missing: time and rows read per statement.

    .venv/bin/python bench/lookup_bench.py [--pushes 3 --findings 100000 --hosts 10000] [--repush] [--plans]

Creates a scratch PostgreSQL database, migrates it and never analyzes it (autovacuum is turned
off on every table, so the planner sees a freshly created tenant's state: table sizes from
their pages, no column statistics).  Merges ``--pushes`` pushes of ``--findings`` new
canonical findings each into one tenant through ``process_batch`` (the worker's path), then
with ``--repush`` the first push again (unchanged), and prints the rows each push read per
table (``pg_stat_user_tables``/``_indexes``: rows of sequential scans plus index entries).
The worker's ANALYZE after a large merge is turned off here.  Every statement the merge
issues is captured (a ``before_cursor_execute`` listener) and timed; after each push the last
statement of each kind is run again under ``EXPLAIN (ANALYZE, BUFFERS)`` in a transaction
that is rolled back, and the rows its scans read from each table (rows returned plus rows a
filter removed, times loops) are printed with the push's slowest statement kinds.  Figures,
not assertions.  The scratch database is dropped at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import event, text  # noqa: E402

from bench.ingest_bench import create_database, drop_database, synthetic  # noqa: E402
from bench.merge_bench import store  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.models import Base, OAuthClient, Tenant  # noqa: E402
from gateway.pipeline import process_batch  # noqa: E402

SCANS = ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan")


def kind_of(statement: str) -> str:
    """A short name for a statement: its first words and the tables it names."""
    flat = re.sub(r"\s+", " ", statement).strip()
    tables = sorted(set(re.findall(r"\b(?:FROM|JOIN|INTO|UPDATE) \(?(\w+)", flat)) - {"SELECT", "unnest"})
    keys = re.findall(r"(\w+\.\w+) = ANY", flat) + re.findall(r"(\w+\.\w+) = \w+\.\w+", flat)
    return f"{flat.split(' ')[0]} {','.join(tables)} {' '.join(keys)}"[:140]


def rows_read(plan: dict, found: dict) -> None:
    """Sum, per table, the rows each scan node read (returned + removed by a filter) x loops."""
    if plan.get("Node Type") in SCANS and plan.get("Relation Name"):
        loops = plan.get("Actual Loops", 1)
        read = (
            plan.get("Actual Rows", 0)
            + plan.get("Rows Removed by Filter", 0)
            + plan.get("Rows Removed by Index Recheck", 0)
        ) * loops
        key = f"{plan['Relation Name']}:{plan['Node Type']}"
        if plan.get("Index Name"):
            key += f"({plan['Index Name']})"
        found[key] = found.get(key, 0) + read
    for child in plan.get("Plans", ()):
        rows_read(child, found)


def explain(engine, statement: str, parameters, show: bool = False) -> tuple[float, dict]:
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters)
        (document,) = cursor.fetchone()
        if show:
            cursor.execute("EXPLAIN " + statement, parameters)
            print(
                "\n".join(
                    "            | " + (line if len(line) < 160 else line[:150] + " ...")
                    for (line,) in cursor.fetchall()
                )
            )
        raw.rollback()
    finally:
        raw.close()
    found: dict = {}
    rows_read(document[0]["Plan"], found)
    return document[0]["Execution Time"], found


TABLES = (
    "finding_sources",
    "findings",
    "resources",
    "resource_identifiers",
    "resource_sources",
    "recommendations",
)


def table_reads(engine) -> dict[str, int]:
    """Rows read so far per table: sequential scans' rows plus index entries read (pg_stat views,
    which a backend flushes when idle at least every 10 s: call after a pause)."""
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        rows = conn.execute(
            text(
                "SELECT t.relname, coalesce(t.seq_tup_read, 0) + coalesce(sum(i.idx_tup_read), 0) "
                "FROM pg_stat_user_tables t LEFT JOIN pg_stat_user_indexes i ON i.relid = t.relid "
                "WHERE t.relname = ANY(:names) GROUP BY t.relname, t.seq_tup_read"
            ),
            {"names": list(TABLES)},
        ).all()
    return {name: int(count) for name, count in rows}


def make_body(start: int, count: int, hosts: int, host_offset: int = 0) -> bytes:
    """``count`` canonical findings from number ``start`` on, over ``hosts`` hosts from ``host_offset`` on."""
    if not host_offset:
        return synthetic(start, count, hosts)
    findings = json.loads(synthetic(start, count, hosts))["findings"]
    for n, finding in enumerate(findings):
        host = host_offset + (start + n) % hosts
        finding["resource"] = {
            "fqdn": f"host{host}.bench.example.com",
            "ipv4": [f"10.{host >> 16 & 255}.{host >> 8 & 255}.{host & 255}"],
        }
    return json.dumps({"findings": findings}).encode()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--findings", type=int, default=100_000)
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=5000)
    parser.add_argument("--repush", action="store_true", help="push the first body again at the end")
    parser.add_argument("--top", type=int, default=8, help="statement kinds shown per push")
    parser.add_argument("--keep", action="store_true", help="do not drop the scratch database")
    parser.add_argument("--plans", action="store_true", help="print the plan of each statement explained")
    parser.add_argument(
        "--new-hosts",
        action="store_true",
        help="each push on hosts of its own (else every push names the same --hosts hosts)",
    )
    args = parser.parse_args()

    name, url = create_database("gw_lbench")
    try:
        upgrade(url)
        app = create_app({"DATABASE_URL": url, "BROKER_URL": "memory://", "SECRET_KEY": "bench"})
        db = app.extensions["gateway.db"]
        with db.engine.begin() as conn:
            for table in Base.metadata.sorted_tables:
                conn.execute(text(f"ALTER TABLE {table.name} SET (autovacuum_enabled = false)"))
        with db.session() as session:
            tenant = Tenant(external_id="bench", name="bench")
            session.add(tenant)
            client = OAuthClient(
                client_id="bench",
                secret_hash="x",
                provider="BenchScanner",
                name="bench",
                scope="findings.write",
            )
            session.add(client)
            session.flush()
            tenant_id, client_pk = tenant.id, client.id
        captured: dict[str, list] = defaultdict(lambda: [0, 0.0, None])  # kind -> [count, seconds, last]
        started: dict[int, float] = {}

        @event.listens_for(db.engine, "before_cursor_execute")
        def _before(conn, cursor, statement, parameters, context, executemany):
            started[id(cursor)] = time.perf_counter()

        @event.listens_for(db.engine, "after_cursor_execute")
        def _after(conn, cursor, statement, parameters, context, executemany):
            if executemany or not statement.lstrip().upper().startswith(
                ("SELECT", "UPDATE", "INSERT", "DELETE", "WITH")
            ):
                return
            entry = captured[kind_of(statement)]
            entry[0] += 1
            entry[1] += time.perf_counter() - started.pop(id(cursor), time.perf_counter())
            entry[2] = (statement, parameters)

        bodies = [
            make_body(n * args.findings, args.findings, args.hosts, n * args.hosts if args.new_hosts else 0)
            for n in range(args.pushes)
        ]
        plan = [(f"push {n + 1} (new)", body) for n, body in enumerate(bodies)]
        if args.repush:
            plan.append(("push 1 again (unchanged)", bodies[0]))
        for label, body in plan:
            batch_id = store(db, tenant_id, client_pk, body)
            time.sleep(11)  # every backend's statistics flushed
            reads_before = table_reads(db.engine)
            captured.clear()
            began = time.perf_counter()
            status = process_batch(db, batch_id, chunk_size=args.chunk, analyze_after_rows=0)
            elapsed = time.perf_counter() - began
            print(
                f"{label}: {args.findings} findings, {status} in {elapsed:.1f}s "
                f"({args.findings / elapsed:,.0f}/s)"
            )
            time.sleep(11)
            reads = table_reads(db.engine)
            print(
                "  rows read (sequential scans + index entries): "
                + ", ".join(f"{name} {reads.get(name, 0) - reads_before.get(name, 0):,}" for name in TABLES),
                flush=True,
            )
            ranked = sorted(captured.items(), key=lambda item: -item[1][1])[: args.top]
            for kind, (count, seconds, (statement, parameters)) in ranked:
                if kind.startswith(("SELECT", "UPDATE", "WITH")) and "pg_advisory" not in statement:
                    took, read = explain(db.engine, statement, parameters, args.plans)
                    shown = ", ".join(f"{k} {v:,}" for k, v in sorted(read.items()))
                    detail = f"   last one again: {took:.1f} ms, read {shown}"
                else:
                    detail = ""
                print(f"  {seconds:7.2f}s {count:5}x  {kind}\n          {detail}")
        db.dispose()
    finally:
        if args.keep:
            print(f"kept {url}")
        else:
            drop_database(name)


if __name__ == "__main__":
    os.environ.setdefault("GATEWAY_LOG_LEVEL", "WARNING")
    main()
