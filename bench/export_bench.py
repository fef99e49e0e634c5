"""Continuous-export benchmark: one large push delivered to a webhook (batching off and on), a Splunk
HEC collector and a NATS JetStream stream, in process (the delivery loop of the Celery task, one
thread per destination, and the sequencer every half second, as the beat runs it).

    .venv/bin/python bench/export_bench.py --findings 100000     # --findings 20000 when the machine is busy

Prints, per destination, the events delivered per second (from the merge's start to the last
receipt) and the p50/p99 lag from an event's merge transaction to its receipt (the webhook
receiver's and the HEC collector's clock when the request arrived; JetStream's own stored time);
then the merge time with the outbox "off" (no destination, no sequencer, and without the one
index the outbox adds to the merge's inserts, ``ix_lifecycle_events_unsequenced``), "on" (that
index and the events, nothing delivering) and "on" with the four destinations delivering while
the merge runs, in this same process (their CPU competes with the merge's: in production the
workers deliver elsewhere), each on a fresh scratch PostgreSQL database.  The receivers are the
tests' loopback ones (tests/receiver.py, tests/siem_sim.py) and the real ``nats-server`` on
127.0.0.1:4222.  Figures, not assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GATEWAY_EXPORT_ALLOW_PRIVATE_TARGETS", "true")

from sqlalchemy import func, select, text  # noqa: E402

from bench.ingest_bench import create_database, drop_database, synthetic  # noqa: E402
from bench.merge_bench import store  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.export import delivery, secrets  # noqa: E402
from gateway.export import events as outbox  # noqa: E402
from gateway.export import nats as nats_kind  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.models import ExportDestination, LifecycleEvent, OAuthClient, Tenant, utcnow  # noqa: E402
from gateway.pipeline import process_batch  # noqa: E402
from tests.receiver import Receiver  # noqa: E402
from tests.siem_sim import HecCollector, parse_hec_batch, with_jetstream  # noqa: E402

DEST, EV = ExportDestination.__table__, LifecycleEvent.__table__
NATS_URL = os.environ.get("BENCH_NATS", "nats://127.0.0.1:4222")
TOKEN = "bench-hec-token"
SECRET_KEY = "bench"


def _when(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


class Receipts:
    """Per destination: (event id, the event's time, when it arrived)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[str, list[tuple[str, float, float]]] = {}

    def add(self, name: str, events: list[dict], arrived: float | None = None) -> None:
        arrived = time.time() if arrived is None else arrived
        with self.lock:
            self.seen.setdefault(name, []).extend((e["id"], _when(e["timestamp"]), arrived) for e in events)


def setup(findings: int, outbox_on: bool):
    name, url = create_database("gw_xbench")
    upgrade(url)
    app = create_app(
        {
            "DATABASE_URL": url,
            "BROKER_URL": "memory://",
            "SECRET_KEY": SECRET_KEY,
            "EXPORT_ALLOW_PRIVATE_TARGETS": True,
        }
    )
    db = app.extensions["gateway.db"]
    if not outbox_on:
        with db.engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_lifecycle_events_unsequenced"))
    with db.session() as session:
        tenant = Tenant(external_id="bench", name="bench")
        session.add(tenant)
        session.flush()
        client = OAuthClient(
            client_id="bench", secret_hash="x", provider="BenchScanner", name="bench", scope="findings.write"
        )
        session.add(client)
        session.flush()
        ids = tenant.id, client.id
    bodies = [synthetic(start, min(10_000, findings - start)) for start in range(0, findings, 10_000)]
    batches = [store(db, ids[0], ids[1], body) for body in bodies]
    return name, app, db, ids[0], batches


def destinations(
    db, config, tenant_id: int, webhook_url: str, webhook_secret: str, hec_url: str, prefix: str, stream: str
) -> dict[int, str]:
    now = utcnow()
    rows = {
        "webhook (batch 1)": ("webhook", webhook_url, 1, {}, webhook_secret),
        "webhook (batch 100)": ("webhook", webhook_url, 100, {}, webhook_secret),
        "splunk_hec (batch 100, ack)": (
            "splunk_hec",
            hec_url,
            100,
            {"ack": True, "ackPollSeconds": 0.02},
            TOKEN,
        ),
        "nats (batch 100)": ("nats", NATS_URL, 100, {"subjectPrefix": prefix, "stream": stream}, None),
    }
    out = {}
    with db.engine.begin() as conn:
        for label, (kind, url, size, options, secret) in rows.items():
            dest_id = conn.execute(
                DEST.insert()
                .values(
                    tenant_id=tenant_id,
                    display_name=label,
                    kind=kind,
                    url=url,
                    event_types=["*"],
                    batch_size=size,
                    options=options,
                    state="active",
                    version=1,
                    cursor_seq=0,
                    attempts=0,
                    delivered_events=0,
                    secret=secrets.seal(config, secret) if secret else None,
                    created_at=now,
                    updated_at=now,
                )
                .returning(DEST.c.id)
            ).scalar_one()
            out[dest_id] = label
    return out


def deliver_loop(db, config, destination_id: int, stop: threading.Event) -> None:
    while not stop.is_set():
        result = delivery.deliver(db, config, destination_id, budget_seconds=5)
        if result["status"] in ("idle", "busy", "failed") and not result["delivered"]:
            time.sleep(0.05)


def sequencer_loop(db, stop: threading.Event) -> None:
    while not stop.is_set():
        outbox.sequence_events(db)
        stop.wait(0.5)


async def _js(action):
    return await with_jetstream(NATS_URL, action)


def jetstream_receipts(stream: str) -> list[tuple[dict, float]]:
    """Every message of the stream with the time the stream stored it."""
    import json

    async def pull(js):
        sub = await js.pull_subscribe("", durable=f"bench-{uuid.uuid4().hex[:6]}", stream=stream)
        got = []
        while True:
            try:
                messages = await sub.fetch(1000, timeout=1)
            except TimeoutError:
                await sub.unsubscribe()
                return got
            for message in messages:
                await message.ack()
                got.append((json.loads(message.data), message.metadata.timestamp.timestamp()))

    return asyncio.run(_js(pull))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def merge(db, batches: list[int]) -> float:
    started = time.perf_counter()
    for batch_id in batches:
        status = process_batch(db, batch_id, chunk_size=5000)
        if status != "succeeded":
            raise SystemExit(f"batch {batch_id} ended {status}")
    return time.perf_counter() - started


def run_off(findings: int, outbox_on: bool = False) -> float:
    """The merge alone: outbox off, or on (its index, the events) with nothing delivering meanwhile."""
    name, app, db, _, batches = setup(findings, outbox_on=outbox_on)
    try:
        took = merge(db, batches)
        db.dispose()
        return took
    finally:
        drop_database(name)


def run_on(findings: int, timeout: float) -> tuple[float, dict, int]:
    receipts = Receipts()
    webhook_secret = secrets.new_webhook_secret()

    def on_webhook(delivery_):
        receipts.add(
            "webhook:" + ("batch" if delivery_.payload.get("type") == "batch" else "single"), delivery_.events
        )
        return 200, {}

    def on_hec(request):
        if request.path.endswith("/event"):
            receipts.add("hec", [item["event"] for item in parse_hec_batch(request.body)])
        return None

    receiver = Receiver([webhook_secret], respond=on_webhook)
    collector = HecCollector(TOKEN, ack=True, respond=on_hec)
    prefix = f"xbench{uuid.uuid4().hex[:8]}"
    stream = prefix.upper()

    async def create(js):
        from nats.js.api import StreamConfig

        await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"], duplicate_window=600))

    asyncio.run(_js(create))
    name, app, db, tenant_id, batches = setup(findings, outbox_on=True)
    stop = threading.Event()
    try:
        ids = destinations(
            db, app.config, tenant_id, receiver.url, webhook_secret, collector.url, prefix, stream
        )
        threads = [threading.Thread(target=sequencer_loop, args=(db, stop), daemon=True)] + [
            threading.Thread(target=deliver_loop, args=(db, app.config, i, stop), daemon=True) for i in ids
        ]
        for thread in threads:
            thread.start()
        started = time.time()
        took = merge(db, batches)
        print(f"  merge with the outbox on and 4 destinations delivering: {took:.2f}s")
        outbox.sequence_events(db)
        with db.engine.connect() as conn:
            latest = conn.execute(select(func.max(EV.c.seq)).where(EV.c.tenant_id == tenant_id)).scalar()
            total = conn.execute(
                select(func.count()).select_from(EV).where(EV.c.tenant_id == tenant_id)
            ).scalar()
        deadline = time.time() + timeout
        while time.time() < deadline:
            with db.engine.connect() as conn:
                cursors = dict(conn.execute(select(DEST.c.id, DEST.c.cursor_seq)).all())
            if all(cursors[i] >= latest for i in ids):
                break
            time.sleep(0.5)
        else:
            print(f"  not every destination caught up within {timeout:.0f}s: {cursors} (latest {latest})")
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for event, stored_at in jetstream_receipts(stream):
            receipts.add("nats", [event], stored_at)
        print(f"  {total} events in the outbox for {findings} findings")
        labels = {
            "webhook:single": "webhook (batch 1)",
            "webhook:batch": "webhook (batch 100)",
            "hec": "splunk_hec (batch 100, ack)",
            "nats": "nats JetStream (batch 100)",
        }
        results = {}
        for key, label in labels.items():
            seen = receipts.seen.get(key, [])
            unique = {event_id: (at, arrived) for event_id, at, arrived in seen}
            lags = sorted(arrived - at for at, arrived in unique.values())
            span = (max(arrived for _, arrived in unique.values()) - started) if unique else float("nan")
            results[label] = (
                len(unique),
                len(seen) - len(unique),
                len(unique) / span if unique else 0.0,
                percentile(lags, 50),
                percentile(lags, 99),
            )
        db.dispose()
        return took, results, total
    finally:
        stop.set()
        nats_kind.close_connections()
        receiver.stop()
        collector.stop()
        drop_database(name)

        async def delete(js):
            await js.delete_stream(stream)

        asyncio.run(_js(delete))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--findings", type=int, default=100_000)
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds to wait for deliveries to catch up"
    )
    args = parser.parse_args()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"export bench: {args.findings} findings, {datetime.now(UTC):%H:%M} UTC, "
        f"{os.cpu_count()} cores, load {load}"
    )
    run_off(min(args.findings, 5000))  # warm-up: the first merge of a process pays for imports and caches
    off = run_off(args.findings)
    print(f"  merge with the outbox off (no destination, no sequencer, no unsequenced index): {off:.2f}s")
    quiet = run_off(args.findings, outbox_on=True)
    print(f"  merge with the outbox on, nothing delivering in this process: {quiet:.2f}s")
    on, results, total = run_on(args.findings, args.timeout)
    print(
        f"\n{'destination':32} {'events':>8} {'dups':>5} {'events/s':>9} {'lag p50 s':>10} {'lag p99 s':>10}"
    )
    for label, (count, dups, rate, p50, p99) in results.items():
        print(f"{label:32} {count:8d} {dups:5d} {rate:9.0f} {p50:10.2f} {p99:10.2f}")
    print(
        f"\nmerge: outbox off {off:.2f}s, on {quiet:.2f}s ({100 * (quiet / off - 1):+.1f}%), "
        f"on with 4 destinations delivering in the same process {on:.2f}s ({100 * (on / off - 1):+.1f}%)"
    )
    print(f"load at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    os.environ.setdefault("GATEWAY_LOG_LEVEL", "WARNING")
    main()
