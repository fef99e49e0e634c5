"""Merge observations: informational facts on resources, upserted by (tenant, provider, provider id).

An observation is never a finding: it has no state, no recommendation and no score.  A
report older than the stored one is ignored (stale); every reported observation is marked
with the batch, so that a full scan removes the provider's observations of the scanned
resources it no longer reports (a port closed, software removed).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select

from connectors.model import Observation as ObservationRecord
from gateway.merge.sql import insert_for, keyed, locked_by_key, update_rows
from gateway.models import Observation

observations_t = Observation.__table__
FIELDS = (
    "resource_id",
    "product",
    "vendor_id",
    "category",
    "name",
    "value",
    "port",
    "protocol",
    "service",
    "evidence",
    "scan",
    "host_key",
    "first_seen",
    "last_seen",
    "provider_timestamp",
)


def merge_observations(
    merger, records: Sequence[ObservationRecord], resource_ids: Sequence[int], now: datetime
) -> None:
    conn, tenant = merger.conn, merger.tenant_id
    rows: dict[str, dict] = {}
    for record, resource_id in zip(records, resource_ids, strict=True):
        row = {
            "resource_id": resource_id,
            "product": record.product or merger.product,
            "provider_id": record.provider_id[:512],
            "vendor_id": (record.vendor_id or None) and record.vendor_id[:100],
            "category": (record.category or "other")[:30],
            "name": record.name or record.vendor_id or "observation",
            "value": record.value,
            "port": record.port,
            "protocol": (record.protocol or None) and record.protocol[:20],
            "service": (record.service or None) and record.service[:100],
            "evidence": record.evidence,
            "scan": (record.scan or None) and record.scan[:500],
            "host_key": (record.resource.host_key or None) and record.resource.host_key[:500],
            "first_seen": record.first_seen,
            "last_seen": record.last_seen,
            "provider_timestamp": record.provider_timestamp or record.last_seen or merger.received_at,
        }
        previous = rows.get(row["provider_id"])
        if previous is not None:  # repeated in one push: one observation, both outputs kept
            if row["evidence"] and row["evidence"] not in (previous["evidence"] or ""):
                previous["evidence"] = (
                    f"{previous['evidence']}\n\n{row['evidence']}"
                    if previous["evidence"]
                    else row["evidence"]
                )
            continue
        rows[row["provider_id"]] = row
    # found by (tenant, provider, provider id) whatever the statistics, locked in id order
    existing = {row.provider_id: row for row in locked_by_key(
        conn,
        (observations_t.c.id, observations_t.c.provider_id, observations_t.c.provider_timestamp,
         *[observations_t.c[name] for name in FIELDS if name != "provider_timestamp"]),
        (observations_t.c.tenant_id == tenant, observations_t.c.provider == merger.provider),
        (observations_t.c.provider_id,), sorted(rows), observations_t.c.id)}
    inserts, changes = [], []
    for provider_id, row in rows.items():
        old = existing.get(provider_id)
        if old is None:
            inserts.append(
                row
                | {
                    "tenant_id": tenant,
                    "provider": merger.provider,
                    "batch_id": merger.batch_id,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            continue
        stored_ts = old.provider_timestamp
        if stored_ts is not None and stored_ts.tzinfo is None:
            from datetime import UTC

            stored_ts = stored_ts.replace(tzinfo=UTC)
        if stored_ts is not None and row["provider_timestamp"] < stored_ts:
            merger.counts["stale"] += 1
            continue
        change = {"id": old.id, "batch_id": merger.batch_id}
        if any(
            getattr(old, name) != row[name]
            for name in FIELDS
            if name not in ("first_seen", "provider_timestamp")
        ):
            change |= {name: row[name] for name in FIELDS if name != "first_seen"} | {"updated_at": now}
        else:
            change |= {"last_seen": row["last_seen"], "provider_timestamp": row["provider_timestamp"]}
        changes.append(change)
    if inserts:
        conn.execute(
            insert_for(conn, observations_t).on_conflict_do_nothing(
                index_elements=["tenant_id", "provider", "provider_id"]
            ),
            inserts,
        )
    by_shape: dict[tuple, list[dict]] = {}
    for change in changes:
        by_shape.setdefault(tuple(sorted(change)), []).append(change)
    for group in by_shape.values():
        update_rows(conn, observations_t, sorted(group, key=lambda c: c["id"]))
    merger.counts["observations"] += len(rows)
    merger.observed_resources.update(resource_ids)


def remove_unreported(merger) -> int:
    """Full scan: the provider's observations of the scanned resources that this batch did not report."""
    scope = sorted(merger.scope | merger.observed_resources)
    removed = 0
    o = observations_t.c
    for start in range(0, len(scope), 5000):
        # looked up resource by resource through (tenant_id, resource_id, id), whatever the statistics
        unreported = keyed(merger.conn, select(o.id).where(
            o.tenant_id == merger.tenant_id, o.provider == merger.provider,
            o.batch_id.is_distinct_from(merger.batch_id)), (o.resource_id,), scope[start : start + 5000])
        removed += merger.conn.execute(
            observations_t.delete().where(o.tenant_id == merger.tenant_id, o.id.in_(unreported))).rowcount
    return removed
