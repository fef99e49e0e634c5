"""Should security events' value columns be indexed?  The write cost against the matching gain.

    .venv/bin/python bench/event_index_bench.py [--events 1000000 --indicators 100000 --write 100000]

On a scratch PostgreSQL database (migrated, dropped at the end):

1. seeds ``--events`` events of one tenant over the last 7 days in SQL (remote and source
   addresses, a domain on a third, a SHA-256 on a third) and ``--indicators`` live indicators
   (IPv4 addresses and domains; one in ten names a stored event's value);
2. times the matching of new indicators against the stored events as the sweep runs it today
   (gateway/intel/matching.py ``_event_queries``: one hashed pass over the tenant's events, nested
   loops off) for 1,000 indicators (a push) and for all of them;
3. times the write path (``EventMerger.merge_chunk``: COPY into the day partitions, in chunks of
   ``--chunk``) of ``--write`` parsed Windows events (their hosts' resources made beforehand);
4. creates partial indexes on (tenant_id, remote_ip), (tenant_id, source_ip), (tenant_id,
   lower(domain)) and (tenant_id, lower(hash)) (on the partitioned table: one per day partition)
   and times that;
5. times 2 and 3 again with the indexes (nested loops allowed: the planner's choice).

Figures, not assertions.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import create_engine, func, select, union_all  # noqa: E402

from bench.events_bench import windows_events  # noqa: E402
from bench.ingest_bench import create_database, drop_database  # noqa: E402
from connectors import windows_events as win  # noqa: E402
from connectors.base import ParseOptions  # noqa: E402
from gateway.detection.events import EventMerger, ensure_partitions  # noqa: E402
from gateway.intel.matching import IND, _event_queries  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402

INDEXES = {
    "ix_security_events_remote_ip": "(tenant_id, remote_ip) WHERE remote_ip IS NOT NULL",
    "ix_security_events_source_ip": "(tenant_id, source_ip) WHERE source_ip IS NOT NULL",
    "ix_security_events_domain": "(tenant_id, lower(domain)) WHERE domain IS NOT NULL",
    "ix_security_events_hash": "(tenant_id, lower(hash)) WHERE hash IS NOT NULL",
}


def seed(url: str, tenant: int, events: int, indicators: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO security_events (occurred_at, tenant_id, provider, kind, event_id, source_ip,
                                         remote_ip, domain, hash, ingested_at)
            SELECT now() - (g %% 604800) * interval '1 second', %s, 'Agent', 'network_connection', 5156,
                   '10.' || (g / 65536 %% 256) || '.' || (g / 256 %% 256) || '.' || (g %% 256),
                   '100.' || (g / 65536 %% 64 + 64) || '.' || (g / 256 %% 256) || '.' || (g %% 256),
                   CASE WHEN g %% 3 = 0 THEN 'host' || g || '.example.net' END,
                   CASE WHEN g %% 3 = 1 THEN md5(g::text) || md5((g + 1)::text) END,
                   now()
            FROM generate_series(0, %s - 1) g""",
            (tenant, events),
        )
        # one in ten indicators names a stored remote address or domain; the rest nothing stored
        conn.execute(
            """
            INSERT INTO ti_indicators (tenant_id, source, observable_type, value, format, confidence,
                                       threat_type, provider_timestamp, created_at, updated_at, tags)
            SELECT %s, 'Bench', CASE WHEN g %% 2 = 0 THEN 'ipv4' ELSE 'domain' END,
                   CASE WHEN g %% 2 = 0 THEN
                            CASE WHEN g %% 10 = 0
                                 THEN '100.' || (g * 7 / 65536 %% 64 + 64) || '.' || (g * 7 / 256 %% 256)
                                      || '.' || (g * 7 %% 256)
                                 ELSE '203.' || (g / 65536 %% 256) || '.' || (g / 256 %% 256) || '.'
                                      || (g %% 256)
                            END
                        ELSE CASE WHEN g %% 10 = 1 THEN 'host' || (g * 3 %% %s) || '.example.net'
                                  ELSE 'miss' || g || '.example.org' END
                   END,
                   'graph_tiindicator', 80, 'C2', now(), now(), now(), '[]'
            FROM generate_series(1, %s) g""",
            (tenant, events, indicators),
        )
        conn.execute("VACUUM ANALYZE security_events")
        conn.execute("ANALYZE ti_indicators")


def lookups(engine, tenant: int, indicators: int, nestloop: bool) -> None:
    now = datetime.now(UTC)
    first = engine.connect().exec_driver_sql("SELECT min(id) FROM ti_indicators").scalar()
    for count in (1000, indicators):
        queries = _event_queries(tenant, now, IND.c.id.between(first, first + count - 1))
        query = select(func.count()).select_from(union_all(*queries).subquery())
        with engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL jit = off")
            conn.exec_driver_sql(f"SET LOCAL enable_nestloop = {'on' if nestloop else 'off'}")
            started = time.perf_counter()
            matched = conn.execute(query).scalar()
            elapsed = time.perf_counter() - started
        print(f"    match {count:,} indicators against the stored events: {elapsed:.2f}s "
              f"({matched:,} matches)")


def write(engine, tenant: int, records: list, chunk: int, show: bool = True) -> None:
    started = time.perf_counter()
    with engine.begin() as conn:
        merger = EventMerger(conn, tenant, "Bench", None, 31)
        for n in range(0, len(records), chunk):
            merger.merge_chunk(records[n : n + chunk])
    elapsed = time.perf_counter() - started
    if show:
            print(f"    write {len(records):,} events (COPY, chunks of {chunk}): {elapsed:.2f}s "
              f"= {len(records) / elapsed:,.0f} events/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--indicators", type=int, default=100_000)
    parser.add_argument("--write", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=5000)
    args = parser.parse_args()
    name, url = create_database("gw_event_index_bench")
    try:
        upgrade(url)
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        now = datetime.now(UTC)
        ensure_partitions(engine, now, 31)
        with psycopg.connect(url, autocommit=True) as conn:
            tenant = conn.execute(
                "INSERT INTO tenants (external_id, name, created_at) VALUES ('ix', 'ix', now()) RETURNING id"
            ).fetchone()[0]
        started = time.perf_counter()
        seed(url, tenant, args.events, args.indicators)
        print(f"seeded {args.events:,} events and {args.indicators:,} indicators "
              f"in {time.perf_counter() - started:.0f}s")
        options = ParseOptions(provider="Bench", received_at=now)
        batches = [
            [r for r in win.parse(io.BytesIO(windows_events(n * args.write, args.write, 500, now)), options)]
            for n in range(2)
        ]
        write(engine, tenant, batches[0][:2000], args.chunk, show=False)  # the hosts' resources made
        print("without value indexes (today):")
        lookups(engine, tenant, args.indicators, nestloop=False)
        write(engine, tenant, batches[0], args.chunk)
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            for index, definition in INDEXES.items():
                conn.execute(f"CREATE INDEX {index} ON security_events {definition}")
            conn.execute("ANALYZE security_events")
        print(f"created the 4 value indexes in {time.perf_counter() - started:.1f}s")
        print("with the value indexes:")
        lookups(engine, tenant, args.indicators, nestloop=True)
        write(engine, tenant, batches[1], args.chunk)
        with psycopg.connect(url) as conn:
            sizes = conn.execute(
                "SELECT pg_size_pretty(sum(pg_relation_size(i.indexrelid))) FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname LIKE 'security_events_p%%' "
                "AND (c.relname LIKE '%%remote_ip%%' OR c.relname LIKE '%%source_ip%%' "
                "OR c.relname LIKE '%%lower%%' OR c.relname LIKE '%%domain%%' OR c.relname LIKE '%%hash%%')"
            ).fetchone()[0]
        print(f"    the value indexes' size: {sizes}")
        engine.dispose()
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
