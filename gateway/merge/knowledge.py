"""A provider's vulnerability knowledge base (e.g. Qualys QIDs), kept per tenant.

Detections that name a vendor id but carry no title or CVEs are enriched from it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import msgspec
from sqlalchemy import select
from sqlalchemy.engine import Connection

from connectors.model import FindingRecord, VulnerabilityInfo
from gateway.merge.sql import in_values, insert_for
from gateway.models import VulnerabilityKB, utcnow

kb_t = VulnerabilityKB.__table__
KB_FIELDS = ("title", "severity", "cves", "description", "remediation", "cvss_score", "provider_timestamp")


class KnowledgeMerger:
    """Stores knowledge-base entries and enriches finding records from them."""

    def __init__(self, conn: Connection, tenant_id: int, provider: str, batch_id: int | None) -> None:
        self.conn = conn
        self.tenant_id = tenant_id
        self.provider = provider
        self.batch_id = batch_id
        self.counts: Counter = Counter()
        self._cache: dict[str, dict | None] = {}

    def merge_chunk(self, entries: Sequence[VulnerabilityInfo]) -> None:
        """Upsert entries; an entry older than the stored one is stale."""
        by_id = {entry.vendor_id: entry for entry in entries}
        existing = {row.vendor_id: row for row in self.conn.execute(
            select(kb_t).where(kb_t.c.tenant_id == self.tenant_id, kb_t.c.provider == self.provider,
                               in_values(self.conn, kb_t.c.vendor_id, sorted(by_id))))}
        rows = []
        for vendor_id, entry in sorted(by_id.items()):
            old = existing.get(vendor_id)
            values = {name: getattr(entry, name) for name in KB_FIELDS}
            if old is not None:
                if entry.provider_timestamp and old.provider_timestamp and \
                        entry.provider_timestamp < old.provider_timestamp:
                    self.counts["stale"] += 1
                    continue
                if all(getattr(old, name) == values[name] for name in KB_FIELDS):
                    self.counts["unchanged"] += 1
                    continue
                self.counts["updated"] += 1
            else:
                self.counts["created"] += 1
            rows.append({"tenant_id": self.tenant_id, "provider": self.provider, "vendor_id": vendor_id,
                         "updated_at": utcnow(), **values})
            self._cache.pop(vendor_id, None)
        if rows:
            statement = insert_for(self.conn, kb_t)
            statement = statement.on_conflict_do_update(
                index_elements=["tenant_id", "provider", "vendor_id"],
                set_={name: statement.excluded[name] for name in KB_FIELDS + ("updated_at",)},
            )
            self.conn.execute(statement, rows)

    def enrich(self, records: list[FindingRecord]) -> list[FindingRecord]:
        """Fill titles, CVEs and texts that detections lack from the knowledge base."""
        wanted = sorted({r.vendor_id for r in records if r.vendor_id and _needs(r)} - set(self._cache))
        if wanted:
            found = {row.vendor_id: row._asdict() for row in self.conn.execute(
                select(kb_t).where(kb_t.c.tenant_id == self.tenant_id, kb_t.c.provider == self.provider,
                                   in_values(self.conn, kb_t.c.vendor_id, wanted)))}
            for vendor_id in wanted:
                self._cache[vendor_id] = found.get(vendor_id)
        result = []
        for record in records:
            entry = self._cache.get(record.vendor_id) if record.vendor_id and _needs(record) else None
            if entry is None:
                result.append(record)
                continue
            changes = {}
            if _placeholder_title(record) and entry["title"]:
                changes["title"] = entry["title"]
            if not record.cves and entry["cves"]:
                changes["cves"] = list(entry["cves"])
            if not record.description and entry["description"]:
                changes["description"] = entry["description"]
            if not record.remediation and entry["remediation"]:
                changes["remediation"] = entry["remediation"]
            if record.cvss_score is None and entry["cvss_score"] is not None:
                changes["cvss_score"] = entry["cvss_score"]
            result.append(msgspec.structs.replace(record, **changes) if changes else record)
        return result


def _placeholder_title(record: FindingRecord) -> bool:
    title = (record.title or "").strip()
    return not title or title in (record.vendor_id, f"QID {record.vendor_id}")


def _needs(record: FindingRecord) -> bool:
    return _placeholder_title(record) or not record.cves or not record.description
