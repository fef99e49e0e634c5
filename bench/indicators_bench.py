"""Threat-intelligence matching at scale: 100,000 indicators against alerts and resources.

    .venv/bin/python bench/indicators_bench.py [--indicators 100000 --alerts 100000 --resources 100000
                                                --hit-rate 0.01 --alert-push 10000]

On a scratch PostgreSQL database (migrated, dropped at the end, also on error):

1. seeds one tenant straight in SQL with ``--alerts`` alerts, each naming two observables in
   ``alert_observables`` (an IP and a domain), and ``--resources`` resources with an IPv4 and an
   FQDN identifier each;
2. pushes ``--indicators`` Graph tiIndicators (IPs and domains; ``--hit-rate`` of them name an
   observable of a stored alert or resource) as one batch and merges it through ``process_batch``
   (the worker's path): the merge, then set-based matching of the new indicators against alerts
   (enrichment) and resources (a ThreatIntelligenceMatch alert each);
3. pushes the same batch again (unchanged: no new match);
4. pushes ``--alert-push`` Graph alerts_v2 whose evidence names indicators (the alert side arriving);
5. with ``--events`` (security events, gateway/detection/): seeds that many events over the last
   7 days in SQL (one in 1,000 to an indicator's address), runs the sweep that matches the
   indicators against the stored events (the indicator side: one pass over the tenant's events),
   then pushes ``--event-push`` OCSF Network Activity events (1% to an indicator's address) through
   ``process_batch`` (the event side arriving: matched against the indicators at ingest).

Prints the time of each step, the rows per second and the matches made.  Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.ingest_bench import create_database, drop_database  # noqa: E402
from gateway.db import Database  # noqa: E402
from gateway.ingest import Push, store_batch  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from gateway.pipeline import process_batch  # noqa: E402


def ip(n: int) -> str:
    return f"{11 + n // 65536 % 200}.{n // 256 % 256}.{n % 256}.{7 + n // 13_107_200}"


def seed(url: str, alerts: int, resources: int) -> tuple[int, int, int]:
    """The tenant, an indicator client and an alert client; alerts and resources in SQL."""
    with psycopg.connect(url, autocommit=True) as conn:
        tenant = conn.execute(
            "INSERT INTO tenants (external_id, name, created_at) VALUES ('bench', 'bench', now()) "
            "RETURNING id"
        ).fetchone()[0]
        clients = [
            conn.execute(
                "INSERT INTO oauth_clients (client_id, secret_hash, name, provider, scope, disabled, created_at, "
                "secret_rotated_at) VALUES (%s, 'x', %s, %s, %s, false, now(), now()) RETURNING id",
                (name, name, name, scope),
            ).fetchone()[0]
            for name, scope in (("intel", "indicators.write"), ("defender", "alerts.write events.write"))
        ]
        conn.execute(
            """
            INSERT INTO alerts (tenant_id, provider, provider_id, title, severity, recommended_actions,
                                provider_timestamp, content_hash, created_at, updated_at, status, comments, tags)
            SELECT %s, 'Defender', 'seed-' || g, 'seeded alert ' || g, 'medium', '[]', now(), md5(g::text),
                   now(), now(), 'newAlert', '[]', '[]'
            FROM generate_series(0, %s - 1) g""",
            (tenant, alerts),
        )
        conn.execute(
            """
            INSERT INTO alert_observables (alert_id, observable_type, value, tenant_id)
            SELECT a.id, o.kind, o.value, a.tenant_id FROM alerts a,
                   LATERAL (VALUES ('domain', 'a' || substr(a.provider_id, 6) || '.alerts.example'),
                                   ('ipv4', '172.' || (a.id / 65536 %% 200) || '.' || (a.id / 256 %% 256) || '.'
                                             || (a.id %% 256))) o(kind, value)
            WHERE a.tenant_id = %s""",
            (tenant,),
        )
        conn.execute(
            """
            INSERT INTO resources (tenant_id, kind, name, created_at, updated_at, tags)
            SELECT %s, 'host', 'r' || g || '.hosts.example', now(), now(), '[]'
            FROM generate_series(0, %s - 1) g""",
            (tenant, resources),
        )
        conn.execute(
            """
            INSERT INTO resource_identifiers (tenant_id, kind, value, resource_id)
            SELECT r.tenant_id, i.kind, i.value, r.id FROM resources r,
                   LATERAL (VALUES ('fqdn', r.name),
                                   ('ipv4', '198.' || (r.id / 65536 %% 200) || '.' || (r.id / 256 %% 256) || '.'
                                             || (r.id %% 256))) i(kind, value)
            WHERE r.tenant_id = %s""",
            (tenant,),
        )
        conn.execute("ANALYZE")
    return tenant, clients[0], clients[1]


def indicator_body(count: int, hit_rate: float, alerts: int, resources: int) -> bytes:
    """Graph tiIndicators: misses are fresh IPs and domains; hits name seeded alert/resource observables."""
    expires = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    every = max(1, round(1 / hit_rate)) if hit_rate > 0 else 0
    items = []
    for n in range(count):
        hit = every and n % every == 0
        if hit and (n // every) % 2 == 0:  # a seeded alert's domain
            observable = {"domainName": f"a{(n // every) % alerts}.alerts.example"}
        elif hit:  # a seeded resource's FQDN
            observable = {"domainName": f"r{(n // every) % resources}.hosts.example"}
        elif n % 2:
            observable = {"networkIPv4": ip(n)}
        else:
            observable = {"domainName": f"miss-{n}.example.net"}
        items.append(
            {
                "externalId": f"ti-{n}",
                "targetProduct": "Azure Sentinel",
                "threatType": "C2",
                "confidence": 70,
                "tlpLevel": "amber",
                "expirationDateTime": expires,
                "lastReportedDateTime": "2026-11-01T00:00:00Z",
            }
            | observable
        )
    return json.dumps({"value": items}).encode()


def alert_body(count: int, every: int, offset: int) -> bytes:
    """Graph alerts_v2 whose first evidence names an indicator's domain (the alert side arriving)."""
    return json.dumps(
        {
            "value": [
                {
                    "id": f"push-{offset + n}",
                    "title": "beacon",
                    "severity": "medium",
                    "status": "new",
                    "serviceSource": "microsoftDefenderForEndpoint",
                    "createdDateTime": "2026-11-02T00:00:00Z",
                    "lastUpdateDateTime": "2026-11-02T00:00:00Z",
                    "evidence": [
                        {
                            "@odata.type": "#microsoft.graph.security.urlEvidence",
                            "url": f"https://miss-{n * every}.example.net/x",
                            "roles": [],
                            "verdict": "unknown",
                        }
                    ],
                }
                for n in range(count)
            ]
        }
    ).encode()


def ip_sql(n: str) -> str:
    """:func:`ip` in SQL, of the integer expression ``n``."""
    return (f"(11 + ({n}) / 65536 %% 200) || '.' || (({n}) / 256 %% 256) || '.' || (({n}) %% 256) || '.' "
            f"|| (7 + ({n}) / 13107200)")


def seed_events(db, url: str, tenant: int, count: int, indicators: int) -> None:
    """``count`` network events over the last 7 days; one in 1,000 to an indicator's (odd n) address."""
    from gateway.detection.events import DEFAULT_RETENTION_DAYS, ensure_partitions

    ensure_partitions(db.engine, datetime.now(UTC), DEFAULT_RETENTION_DAYS)
    hit = ip_sql(f"2 * ((g / 1000) %% {max(1, indicators // 2)}) + 1")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"""
            INSERT INTO security_events (occurred_at, tenant_id, provider, kind, event_id, source_ip, remote_ip,
                                         ingested_at)
            SELECT now() - (g %% 604800) * interval '1 second', %s, 'Agent', 'network_connection', 4001,
                   '10.0.0.' || (g %% 250),
                   CASE WHEN g %% 1000 = 0 THEN {hit}
                        ELSE '100.' || (g / 65536 %% 64 + 64) || '.' || (g / 256 %% 256) || '.' || (g %% 256) END,
                   now()
            FROM generate_series(0, %s - 1) g""", (tenant, count))
        conn.execute("ANALYZE security_events")


def event_body(count: int, indicators: int) -> bytes:
    """OCSF Network Activity events: 1% to an indicator's (odd n) address, the rest elsewhere."""
    base = int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000)
    return json.dumps([{
        "class_uid": 4001, "category_uid": 4, "activity_id": 1, "time": base + n,
        "device": {"hostname": f"ws-{n % 50}", "ip": "10.9.0.7"}, "src_endpoint": {"ip": "10.9.0.7"},
        "dst_endpoint": {"ip": ip(2 * (n % max(1, indicators // 2)) + 1) if n % 100 == 0
                         else f"100.{64 + n // 65536 % 64}.{n // 256 % 256}.{n % 256}"},
    } for n in range(count)]).encode()


def timed_merge(
    db, tenant: int, client: int, provider: str, fmt: str, body: bytes, chunk: int
) -> tuple[float, dict]:
    push = Push(
        tenant_id=tenant,
        client_pk=client,
        provider=provider,
        format=fmt,
        content_type="application/json",
        content_encoding="identity",
        declared_length=len(body),
        scan_type="unspecified",
        idempotency_key=None,
    )
    batch, _ = store_batch(db, push, body)
    started = time.perf_counter()
    status = process_batch(db, batch.id, chunk_size=chunk)
    elapsed = time.perf_counter() - started
    with db.engine.connect() as conn:
        counts = conn.exec_driver_sql("SELECT counts FROM batches WHERE id = %s", (batch.id,)).scalar()
    if status not in ("succeeded", "partiallySucceeded"):
        raise SystemExit(f"batch {batch.id} ended {status}")
    return elapsed, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--indicators", type=int, default=100_000)
    parser.add_argument("--alerts", type=int, default=100_000)
    parser.add_argument("--resources", type=int, default=100_000)
    parser.add_argument("--hit-rate", type=float, default=0.01)
    parser.add_argument("--alert-push", type=int, default=10_000)
    parser.add_argument("--chunk", type=int, default=5000)
    parser.add_argument("--events", type=int, default=1_000_000, help="security events seeded (0: none)")
    parser.add_argument("--event-push", type=int, default=10_000)
    args = parser.parse_args()
    name, url = create_database("gw_intel_bench")
    try:
        upgrade(url)
        started = time.perf_counter()
        tenant, intel, defender = seed(url, args.alerts, args.resources)
        print(
            f"seeded {args.alerts:,} alerts ({2 * args.alerts:,} observables) and {args.resources:,} resources "
            f"({2 * args.resources:,} identifiers) in {time.perf_counter() - started:.1f}s"
        )
        db = Database(url)
        try:
            body = indicator_body(args.indicators, args.hit_rate, args.alerts, args.resources)
            elapsed, counts = timed_merge(db, tenant, intel, "intel", "graph_tiindicator", body, args.chunk)
            print(
                f"indicator push: {args.indicators:,} indicators merged and matched in {elapsed:.2f}s "
                f"({args.indicators / elapsed:,.0f}/s); created {counts.get('created')}, "
                f"matches {counts.get('matched')}"
            )
            with db.engine.connect() as conn:
                raised = conn.exec_driver_sql(
                    "SELECT count(*) FROM alerts WHERE provider = 'Threat Intelligence'"
                ).scalar()
                enriched = conn.exec_driver_sql(
                    "SELECT count(DISTINCT subject_id) FROM ti_matches WHERE subject_type = 'alert'"
                ).scalar()
            print(f"  -> {enriched:,} alerts enriched, {raised:,} ThreatIntelligenceMatch alerts raised")
            elapsed, counts = timed_merge(db, tenant, intel, "intel", "graph_tiindicator", body, args.chunk)
            print(
                f"same push again: {elapsed:.2f}s ({args.indicators / elapsed:,.0f}/s); unchanged "
                f"{counts.get('unchanged')}, new matches {counts.get('matched', 0)}"
            )
            every = 2  # every second indicator of the push is a 'miss-<even n>' domain
            elapsed, counts = timed_merge(
                db,
                tenant,
                defender,
                "Defender",
                "graph_alert",
                alert_body(args.alert_push, every, 0),
                args.chunk,
            )
            with db.engine.connect() as conn:
                pushed_matches = conn.exec_driver_sql(
                    "SELECT count(*) FROM ti_matches m JOIN alerts a ON a.id = m.subject_id "
                    "WHERE m.subject_type = 'alert' AND a.provider_id LIKE 'push-%%'"
                ).scalar()
            print(
                f"alert push: {args.alert_push:,} alerts merged, observables kept and matched against "
                f"{args.indicators:,} indicators in {elapsed:.2f}s ({args.alert_push / elapsed:,.0f}/s); "
                f"{pushed_matches:,} matched"
            )
            if args.events:
                started = time.perf_counter()
                seed_events(db, url, tenant, args.events, args.indicators)
                print(f"seeded {args.events:,} security events in {time.perf_counter() - started:.1f}s")
                from gateway.intel import matching

                started = time.perf_counter()
                with db.engine.begin() as conn:
                    found = matching.sweep(conn, tenant, datetime(2000, 1, 1, tzinfo=UTC))
                elapsed = time.perf_counter() - started
                print(f"sweep: {args.indicators:,} indicators matched against {args.events:,} stored events in "
                      f"{elapsed:.2f}s; {found:,} new matches")
                elapsed, counts = timed_merge(db, tenant, defender, "Agent", "ocsf_events",
                                              event_body(args.event_push, args.indicators), args.chunk)
                with db.engine.connect() as conn:
                    event_matches = conn.exec_driver_sql(
                        "SELECT count(*) FROM ti_matches WHERE subject_type = 'event'").scalar()
                print(f"event push: {args.event_push:,} events merged and matched against {args.indicators:,} "
                      f"indicators in {elapsed:.2f}s ({args.event_push / elapsed:,.0f}/s); created "
                      f"{counts.get('created')}; event matches in all {event_matches:,}")
        finally:
            db.dispose()
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
