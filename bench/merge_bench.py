"""In-process merge benchmark: the worker's ``process_batch`` alone, without HTTP or Celery.

    .venv/bin/python bench/merge_bench.py --findings 10000 --preload 1000000 [--profile new|unchanged]

Creates a scratch PostgreSQL database (or uses ``--database sqlite``), preloads it like
``ingest_bench.py``, stores synthetic canonical batches as the API would and times
``process_batch`` on them: new findings, an identical re-push (nothing changed) and a
re-push where every finding changed.  ``--profile new`` (or ``unchanged``) prints the top of a cProfile of
that merge.  Figures, not assertions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import DATABASE, _cpu_seconds, create_database, drop_database, preload, synthetic  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.ingest import Push, store_batch  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.models import OAuthClient, Tenant  # noqa: E402
from gateway.pipeline import process_batch  # noqa: E402


def store(db, tenant_id: int, client_pk: int, body: bytes, format_name: str = "canonical") -> int:
    push = Push(tenant_id=tenant_id, client_pk=client_pk, provider="BenchScanner", format=format_name,
                content_type="application/json" if format_name == "canonical" else "application/xml", content_encoding="identity", declared_length=len(body),
                scan_type="unspecified", idempotency_key=None)
    batch, _ = store_batch(db, push, body)
    return batch.id


def timed(db, batch_ids: list[int], chunk: int, profile: bool = False) -> float:
    profiler = cProfile.Profile() if profile else None
    before = _cpu_seconds()
    started, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    for batch_id in batch_ids:
        status = process_batch(db, batch_id, chunk_size=chunk)
        if status != "succeeded":
            raise SystemExit(f"batch {batch_id} ended {status}")
    elapsed = time.perf_counter() - started
    postgres = _cpu_seconds()["postgres"] - before["postgres"]
    print(f"  {len(batch_ids)} batches: {elapsed:.2f}s wall, CPU {time.process_time() - cpu:.2f}s in this process, "
          f"{postgres:.2f}s in PostgreSQL")
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--findings", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=10000)
    parser.add_argument("--preload", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=5000)
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--format", choices=("canonical", "nessus"), default="canonical",
                        help="synthetic canonical JSON, or a synthetic Nessus v2 file (bench/connector_bench.py's)")
    parser.add_argument("--profile", choices=("new", "unchanged"), help="print a cProfile of that merge")
    parser.add_argument("--without-count-triggers", action="store_true",
                        help="disable the kept provider counts' triggers (migration 0026): their cost")
    args = parser.parse_args()

    name = ""
    if args.database == "postgresql":
        name, url = create_database("gw_mbench")
        DATABASE["name"] = name
    else:
        url = f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3"
    try:
        upgrade(url)
        if args.database == "postgresql":
            preload(url, args.preload)
            if args.without_count_triggers:
                import psycopg

                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("ALTER TABLE finding_sources DISABLE TRIGGER USER")
        app = create_app({"DATABASE_URL": url, "BROKER_URL": "memory://", "SECRET_KEY": "bench"})
        db = app.extensions["gateway.db"]
        with db.session() as session:
            tenant = Tenant(external_id="bench", name="bench")
            session.add(tenant)
            session.flush()
            client = OAuthClient(client_id="bench", secret_hash="x", provider="BenchScanner",
                                 name="bench", scope="findings.write")
            session.add(client)
            session.flush()
            tenant_id, client_pk = tenant.id, client.id
        sizes = [min(args.batch_size, args.findings - s) for s in range(0, args.findings, args.batch_size)]
        fmt = args.format
        if fmt == "canonical":
            bodies = [synthetic(sum(sizes[:i]), n) for i, n in enumerate(sizes)]
            changed = [b.replace(b"2024-04-01T00:00:00Z", b"2024-05-01T00:00:00Z").replace(
                b"Upgrade the package.", b"Upgrade the package now.") for b in bodies]
        else:
            from bench.connector_bench import synthetic_nessus

            path = Path(tempfile.mkdtemp()) / "bench.nessus"
            synthetic_nessus(path, findings=args.findings)
            bodies = [path.read_bytes()]
            changed = [bodies[0].replace(b"1711929600", b"1714521600").replace(
                b"Upgrade the service.", b"Upgrade the service now.")]
        first = timed(db, [store(db, tenant_id, client_pk, b, fmt) for b in bodies], args.chunk,
                      args.profile == "new")
        again = timed(db, [store(db, tenant_id, client_pk, b, fmt) for b in bodies], args.chunk,
                      args.profile == "unchanged")
        third = timed(db, [store(db, tenant_id, client_pk, b, fmt) for b in changed], args.chunk)
        n = args.findings
        print(f"{args.database} {fmt} N={n} store={args.preload if args.database == 'postgresql' else 0} "
              f"chunk={args.chunk}: new {n / first:7.0f}/s ({first:.2f}s)  unchanged {n / again:7.0f}/s "
              f"({again:.2f}s)  all changed {n / third:7.0f}/s ({third:.2f}s)")
        db.dispose()
    finally:
        if args.database == "postgresql":
            drop_database(name)


if __name__ == "__main__":
    os.environ.setdefault("GATEWAY_LOG_LEVEL", "WARNING")
    main()
