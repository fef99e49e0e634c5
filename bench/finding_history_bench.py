"""The beat's open-findings snapshot (gateway/console/history.py) over a large PostgreSQL store.

    .venv/bin/python bench/finding_history_bench.py --url postgresql://... [--repeat 10]

Times ``snapshot()`` (one grouped count of every tenant's open findings, then the upsert of today's
rows) over a database kept by ``bench/console_overview_bench.py --load-only`` (1,000,000 findings
of one tenant and 100,000 of another), each run in its own transaction, and prints p50 and max,
the rows written and the plan of the count.  Figures, not assertions; the rows it writes are
today's, as the beat's would be.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from gateway.console.history import OPEN, snapshot  # noqa: E402
from gateway.db import make_engine  # noqa: E402
from gateway.models import Finding  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    engine = make_engine(args.url)
    try:
        with engine.connect() as conn:
            findings = conn.execute(select(func.count()).select_from(Finding)).scalar_one()
            count = select(Finding.tenant_id, Finding.severity, func.count()).where(OPEN).group_by(
                Finding.tenant_id, Finding.severity)
            compiled = count.compile(engine, compile_kwargs={"literal_binds": True})
            plan = conn.exec_driver_sql(f"EXPLAIN {compiled}").scalars().all()
        times, written = [], 0
        for _ in range(args.repeat + 1):
            started = time.perf_counter()
            with engine.begin() as conn:
                written = snapshot(conn)
            times.append(time.perf_counter() - started)
        times = times[1:]  # the first run warms the cache
        print(f"findings {findings:,}; snapshot x{args.repeat}: p50 {statistics.median(times) * 1000:.0f} ms,"
              f" max {max(times) * 1000:.0f} ms; rows written {written}")
        print("\n".join(plan))
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
