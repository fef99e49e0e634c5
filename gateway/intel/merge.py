"""Merge indicators: one row per (tenant, source, observable type, value).

A record updates its row when its provider timestamp is not older than the stored one (else it is
counted stale, DESIGN rule 2), and leaves it alone when nothing changed; the indicators created or
changed are matched at once (gateway/intel/matching.py), in the merge's transaction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.engine import Connection

from connectors.model import IndicatorRecord
from gateway.intel import matching
from gateway.merge.sql import insert_rows, keyed, update_rows
from gateway.models import Indicator, utcnow

IND = Indicator.__table__
CONTENT = (
    "external_id",
    "description",
    "threat_type",
    "tlp_level",
    "confidence",
    "action",
    "target_product",
    "pattern",
    "tags",
    "extra",
    "valid_from",
    "expires_at",
)


class IndicatorMerger:
    """Upserts a source's indicators of one tenant, chunk by chunk."""

    def __init__(
        self, conn: Connection, tenant_id: int, source: str, format: str, batch_id: int | None, cause: str
    ) -> None:
        self.conn, self.tenant_id, self.source, self.format = conn, tenant_id, source, format
        self.batch_id, self.cause = batch_id, cause
        self.counts: Counter = Counter()

    def merge_chunk(self, records: Sequence[IndicatorRecord]) -> list[int]:
        """Merge the records; return the ids of the indicators created or changed (matched already)."""
        conn, now = self.conn, utcnow()
        rows: dict[tuple[str, str], dict] = {}
        for record in records:
            row = {name: getattr(record, name) for name in CONTENT}
            row["provider_timestamp"] = record.provider_timestamp or now
            key = (record.observable_type, record.value)
            previous = rows.get(key)
            if previous is not None:
                self.counts["duplicatesInPush"] += 1
            if previous is None or row["provider_timestamp"] >= previous["provider_timestamp"]:
                rows[key] = row
        existing = {
            (row.observable_type, row.value): row
            for row in conn.execute(
                keyed(
                    conn,
                    select(
                        IND.c.id,
                        IND.c.observable_type,
                        IND.c.value,
                        IND.c.provider_timestamp,
                        *[IND.c[name] for name in CONTENT],
                    ).where(IND.c.tenant_id == self.tenant_id, IND.c.source == self.source),
                    (IND.c.observable_type, IND.c.value),
                    sorted(rows),
                    unique=True,
                )
            )
        }
        inserts, changes = [], []
        for (kind, value), row in rows.items():
            old = existing.get((kind, value))
            if old is None:
                inserts.append(
                    {name: row[name] for name in CONTENT}
                    | {
                        "observable_type": kind,
                        "value": value,
                        "provider_timestamp": row["provider_timestamp"],
                        "tags": row["tags"] or [],
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            elif row["provider_timestamp"] < old.provider_timestamp:
                self.counts["stale"] += 1
            elif all(_same(getattr(old, name), row[name]) for name in CONTENT):
                self.counts["unchanged"] += 1
            else:
                changes.append(
                    {"id": old.id, "provider_timestamp": row["provider_timestamp"], "tags": row["tags"] or []}
                    | {name: row[name] for name in CONTENT if name != "tags"}
                )
        created = (
            [
                new_id
                for (new_id,) in insert_rows(
                    conn,
                    IND,
                    inserts,
                    returning=("id",),
                    conflict=("tenant_id", "source", "observable_type", "value"),
                    constants={
                        "tenant_id": self.tenant_id,
                        "source": self.source,
                        "format": self.format,
                        "batch_id": self.batch_id,
                    },
                )
            ]
            if inserts
            else []
        )
        # a row a concurrent push of the same source inserted meanwhile was skipped: its push stands
        self.counts["created"] += len(created)
        self.counts["unchanged"] += len(inserts) - len(created)
        if changes:
            update_rows(conn, IND, changes, constants={"updated_at": now, "batch_id": self.batch_id})
            self.counts["updated"] += len(changes)
        touched = created + [change["id"] for change in changes]
        if touched:
            self.counts["matched"] += matching.match_indicators(
                conn, self.tenant_id, touched, self.cause, self.batch_id
            )
        return touched


def _same(stored, incoming) -> bool:
    empty = (None, [], {})
    return stored == incoming or (stored in empty and incoming in empty)
