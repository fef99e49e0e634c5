"""A provider's vulnerability knowledge base (e.g. Qualys QIDs), kept per tenant.

Detections that name a vendor id but carry no title or CVEs are enriched from it, in
both orders:

* **KB first**: ``enrich`` fills the records of later detection pushes before they are
  merged (title, CVEs, description, remediation, CVSS score, severity when the provider
  gave none), so they correlate by CVE from the start.
* **Detections first**: ``merge_chunk`` also back-fills the stored sources of that
  tenant and provider whose vendor id a new or changed entry describes, with the same
  rules.  A source that had no CVE was correlated by its vendor id (key
  ``"<provider>/<QID>"``); once the entry names CVEs it is **re-keyed** to them, so that
  the store ends as it would had the KB come first:

  - its first CVE: when no finding of that CVE exists on the resource, the QID finding
    itself is re-keyed in place (same id, history, customer fields; a ``rekeyed``
    event); when one exists (another scanner's, or another QID of the same provider
    naming that CVE), the sources move to it as further sources, and the emptied QID
    finding is removed from the findings collection: its history joins the finding it went
    into (whose ``merged`` event names it), and its assignee, comments and tags are carried
    over, so the store reads as if the KB had come first.
  - each further CVE: a copy of the source joins the finding of that CVE on the
    resource, created when missing (a ``new`` event).
  - a source whose CVE-keyed twin already exists (the same record was pushed again after
    the KB) is deleted: the twin is the current one.

  The findings touched are recomputed from their sources (state, severity, title...)
  and their recommendations re-evaluated.  Back-filled sources get the content hash
  ``kb-enriched``, so the next report of the record counts once as ``updated`` (the
  stored provider fields were changed by the gateway, not by the provider).

Everything runs in the batch's transaction with set-based statements (a few per page of
findings, whatever the number of rows); on PostgreSQL under a per-tenant back-fill lock, so
two KB pushes never re-key the same findings at once.  A detection batch of the tenant
merging at the same moment is not serialized with the back-fill (resource resolution no
longer holds the tenant's lock for the whole merge): a finding it creates that the back-fill
also creates, or a CVE-keyed source it inserts that the back-fill copies, is inserted once
(``ON CONFLICT DO NOTHING``; the back-fill joins the other batch's finding and keeps its
source as the current twin).  Limitations: a re-key *in place* is an UPDATE, so if that
detection batch creates the very (resource, CVE) finding (or CVE-keyed source) a re-key in
place targets, the KB batch fails on the unique constraint, rolls back whole, and its task is
retried, when that finding exists and the sources join it; a vendor-keyed correlation key
cut at 300 characters is not recognised (vendor ids are short).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import msgspec
from sqlalchemy import and_, bindparam, delete, literal, or_, select, text, update
from sqlalchemy.engine import Connection

from connectors.model import FindingRecord, VulnerabilityInfo
from gateway.merge.findings import FindingMerger
from gateway.merge.sql import in_values, insert_for, is_postgres, pair_join
from gateway.models import Finding, FindingSource, LifecycleEvent, VulnerabilityKB, utcnow

kb_t = VulnerabilityKB.__table__
sources_t = FindingSource.__table__
findings_t = Finding.__table__
events_t = LifecycleEvent.__table__
KB_FIELDS = ("title", "severity", "cves", "description", "remediation", "cvss_score", "provider_timestamp")
ENRICHED_HASH = "kb-enriched"
FINDINGS_PAGE = 1000


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
        """Upsert entries (an entry older than the stored one is stale), then back-fill stored findings."""
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
            Backfill(self.conn, self.tenant_id, self.provider, self.batch_id).run(
                {row["vendor_id"]: row for row in rows})

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
            changes = _enrichment(record.title, record.vendor_id, record.description, record.remediation,
                                  record.cvss_score, record.severity_original, entry)
            if not record.cves and entry["cves"]:
                changes["cves"] = list(entry["cves"])
            result.append(msgspec.structs.replace(record, **changes) if changes else record)
        return result


BACKFILL_LOCK = 7_200_000_000  # advisory lock space: one KB back-fill per tenant at a time


class Backfill:
    """Enrich (and re-key) the stored sources a batch's new or changed KB entries describe."""

    def __init__(self, conn: Connection, tenant_id: int, provider: str, batch_id: int | None) -> None:
        self.conn = conn
        self.tenant_id = tenant_id
        self.provider = provider
        self.batch_id = batch_id
        self.cause = f"knowledge base (batch {batch_id})"
        self.merger = FindingMerger(conn, tenant_id, provider, batch_id, utcnow(), self.cause)
        self.created: set[int] = set()  # findings this back-fill created (for their "new" events)
        self.retired: dict[int, int] = {}  # emptied vendor-keyed finding -> the finding it joined

    def run(self, entries: dict[str, dict]) -> None:
        """Back-fill every stored source of these vendor ids that lacks what the entries give."""
        if is_postgres(self.conn):
            # One back-fill per tenant at a time (two KB pushes re-keying the same findings).
            # Not the resource-resolution lock: that one is taken by short transactions of
            # their own, which must never wait for this batch's transaction.
            lock = {"key": BACKFILL_LOCK + self.tenant_id}
            self.conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), lock)
        last = 0
        while True:
            finding_ids = list(self.conn.execute(
                select(sources_t.c.finding_id).distinct()
                .where(self._candidates(sorted(entries)), sources_t.c.finding_id > last)
                .order_by(sources_t.c.finding_id).limit(FINDINGS_PAGE)
            ).scalars())
            if not finding_ids:
                break
            self._page(finding_ids, entries)
            last = finding_ids[-1]
        self.merger.update_recommendations()

    def _candidates(self, vendor_ids: list[str]):
        s = sources_t.c
        return and_(
            s.tenant_id == self.tenant_id, s.provider == self.provider,
            in_values(self.conn, s.vendor_id, vendor_ids),
            or_(s.title == s.vendor_id, s.title == literal("QID ") + s.vendor_id, s.title == "",
                s.correlation_key == literal(f"{self.provider}/") + s.vendor_id,
                s.description.is_(None)),
        )

    def _page(self, finding_ids: list[int], entries: dict[str, dict]) -> None:
        conn, now = self.conn, utcnow()
        rows = [row._asdict() for row in conn.execute(
            select(sources_t, findings_t.c.kind.label("_kind"),
                   findings_t.c.recommendation_type_id.label("_type"),
                   findings_t.c.correlation_key.label("_finding_key"))
            .join(findings_t, findings_t.c.id == sources_t.c.finding_id)
            .where(self._candidates(sorted(entries)), in_values(conn, sources_t.c.finding_id, finding_ids))
            .order_by(sources_t.c.finding_id, sources_t.c.id)
        )]
        # what each source gains, and the CVEs it is re-keyed to (vendor-keyed vulnerabilities only)
        for row in rows:
            entry = entries[row["vendor_id"]]
            row["_changes"] = _enrichment(
                row["title"], row["vendor_id"], row["description"], row["remediation"], row["cvss_score"],
                row["severity_original"], entry)
            vendor_keyed = row["correlation_key"] == f"{self.provider}/{row['vendor_id']}"
            rekey = vendor_keyed and row["_kind"] == "vulnerability" and entry["cves"]
            row["_cves"] = list(entry["cves"]) if rekey else []
        targets = self._targets(rows)
        self._write(rows, targets, now)

    def _targets(self, rows: list[dict]) -> dict[tuple[int, str], int]:
        """The finding of each (resource, CVE) the re-keyed sources go to, re-keying or creating findings."""
        rekeyed = [row for row in rows if row["_cves"]]
        wanted = sorted({(row["resource_id"], cve) for row in rekeyed for cve in row["_cves"]})
        targets: dict[tuple[int, str], int | None] = {}
        for start in range(0, len(wanted), 5000):
            query = select(findings_t.c.id, findings_t.c.resource_id, findings_t.c.correlation_key).where(
                findings_t.c.tenant_id == self.tenant_id)
            for finding_id, resource_id, key in self.conn.execute(pair_join(
                    self.conn, query, findings_t.c.resource_id, findings_t.c.correlation_key,
                    wanted[start : start + 5000])):
                targets[(resource_id, key)] = finding_id
        in_place, merged, new = [], [], {}
        first_of: dict[int, dict] = {}
        for row in rekeyed:
            first_of.setdefault(row["finding_id"], row)
        for finding_id, row in first_of.items():
            key = (row["resource_id"], row["_cves"][0])
            if key not in targets:
                targets[key] = finding_id
                in_place.append({"_id": finding_id, "_key": key[1], "_from": row["_finding_key"]})
            elif targets[key] != finding_id:
                merged.append((finding_id, key, row))
        for row in rekeyed:
            for cve in row["_cves"][1:]:
                key = (row["resource_id"], cve)
                if key not in targets:
                    targets[key] = None
                    new[key] = row
        if in_place:
            self.conn.execute(update(findings_t).where(findings_t.c.id == bindparam("_id")).values(
                correlation_key=bindparam("_key"), cve=bindparam("_key"), updated_at=utcnow()), in_place)
        if new:
            now = utcnow()
            # ON CONFLICT DO NOTHING: a finding a concurrent batch created meanwhile is joined instead
            statement = insert_for(self.conn, findings_t).on_conflict_do_nothing(
                index_elements=["tenant_id", "resource_id", "correlation_key"]).returning(
                findings_t.c.id, findings_t.c.resource_id, findings_t.c.correlation_key)
            inserted = self.conn.execute(statement, [{
                "tenant_id": self.tenant_id, "resource_id": key[0], "correlation_key": key[1], "cve": key[1],
                "recommendation_type_id": row["_type"], "kind": "vulnerability", "title": row["title"],
                "severity": row["severity"], "state": "new" if row["state"] == "open" else "resolved",
                "resolved_at": None if row["state"] == "open" else now, "state_changed_at": now, "created_at": now,
                "updated_at": now, "comments": [], "tags": [],
            } for key, row in sorted(new.items())])
            for finding_id, resource_id, key in inserted:
                targets[(resource_id, key)] = finding_id
                self.created.add(finding_id)
            missing = sorted(key for key in new if targets[key] is None)
            if missing:
                targets.update(self.merger._select_findings(missing))
        self._events(in_place, merged, targets)
        return targets  # type: ignore[return-value]

    def _events(self, in_place: list[dict], merged: list, targets: dict) -> None:
        now = utcnow()
        base = {"tenant_id": self.tenant_id, "subject_type": "finding", "at": now, "cause": self.cause,
                "batch_id": self.batch_id, "actor": self.provider}
        events = [base | {"subject_id": item["_id"], "event": "rekeyed",
                          "details": {"from": item["_from"], "to": item["_key"]}} for item in in_place]
        for finding_id, key, row in merged:
            self.retired[finding_id] = targets[key]
            events.append(base | {"subject_id": targets[key], "event": "merged", "details": {
                "from": row["_finding_key"], "mergedFinding": finding_id, "correlationKey": key[1]}})
            self.merger.touched_recommendations.add((row["resource_id"], row["_type"]))
        if events:
            self.conn.execute(events_t.insert(), events)

    def _write(self, rows: list[dict], targets: dict[tuple[int, str], int], now) -> None:
        conn = self.conn
        pids = sorted({row["provider_id"] for row in rows if row["_cves"]})
        twins: set[tuple[str, str]] = set()
        if pids:
            twins = {(pid, key) for pid, key in conn.execute(
                select(sources_t.c.provider_id, sources_t.c.correlation_key).where(
                    sources_t.c.tenant_id == self.tenant_id, sources_t.c.provider == self.provider,
                    in_values(conn, sources_t.c.provider_id, pids)))}
        updates, copies, deletes = [], [], []
        affected = set()
        columns = [c.name for c in sources_t.columns if c.name != "id"]
        for row in rows:
            values = {**{name: row[name] for name in columns}, **row["_changes"]}
            if not row["_cves"]:
                if row["_changes"]:
                    updates.append(_update_params(row, values, row["correlation_key"], row["finding_id"]))
                    affected.add(row["finding_id"])
                continue
            first = row["_cves"][0]
            if (row["provider_id"], first) in twins:
                deletes.append({"_id": row["id"]})
            else:
                updates.append(_update_params(row, values, first, targets[(row["resource_id"], first)]))
            for cve in row["_cves"][1:]:
                if (row["provider_id"], cve) not in twins:
                    twins.add((row["provider_id"], cve))
                    copies.append(values | {
                        "correlation_key": cve, "finding_id": targets[(row["resource_id"], cve)],
                        "content_hash": ENRICHED_HASH, "batch_id": self.batch_id, "created_at": now,
                        "updated_at": now})
            affected.update(targets[(row["resource_id"], cve)] for cve in row["_cves"])
            affected.add(row["finding_id"])
        if deletes:
            conn.execute(delete(sources_t).where(sources_t.c.id == bindparam("_id")), deletes)
        if updates:
            fields = ("correlation_key", "finding_id", "title", "severity", "description", "remediation",
                      "cvss_score")
            conn.execute(update(sources_t).where(sources_t.c.id == bindparam("_id")).values(
                {name: bindparam(f"_{name}") for name in fields}
                | {"content_hash": ENRICHED_HASH, "batch_id": self.batch_id, "updated_at": now}),
                sorted(updates, key=lambda p: p["_id"]))
        if copies:  # a twin a concurrent batch inserted meanwhile is the current one: keep it
            conn.execute(insert_for(conn, sources_t).on_conflict_do_nothing(
                index_elements=["tenant_id", "provider", "provider_id", "correlation_key"]), copies)
        # findings this back-fill created get their "new" event, then the refresh their final state
        self.merger._insert_events([self.merger._event(finding_id, "new", now, {"state": "new"}, self.cause)
                                    for finding_id in sorted(self.created)])
        dropped = self._drop_retired()
        self.merger._refresh_findings(affected - dropped, {}, set(), now, cause=self.cause)

    def _drop_retired(self) -> set[int]:
        """Emptied vendor-keyed findings go: their history joins the finding they went into.

        The store then reads as it would had the KB come first (no resolved "QID nnn" shell);
        the assignee, comments and tags of the emptied finding are carried over.
        """
        dropped: set[int] = set()
        if not self.retired:
            return dropped
        from gateway.merge.combine import fold_into

        conn = self.conn
        for gone, kept in sorted(self.retired.items()):
            left = conn.execute(select(sources_t.c.id).where(
                sources_t.c.tenant_id == self.tenant_id, sources_t.c.finding_id == gone).limit(1)).first()
            if left is not None:  # a source of it stayed (not re-keyed): it is still a finding
                continue
            fold_into(conn, findings_t, "finding", self.tenant_id, gone, kept)
            dropped.add(gone)
        self.retired.clear()
        return dropped


def _update_params(row: dict, values: dict, key: str, finding_id: int) -> dict:
    return {"_id": row["id"], "_correlation_key": key, "_finding_id": finding_id, "_title": values["title"],
            "_severity": values["severity"], "_description": values["description"],
            "_remediation": values["remediation"], "_cvss_score": values["cvss_score"]}


def _enrichment(title: str | None, vendor_id: str | None, description: str | None, remediation: str | None,
                cvss_score: float | None, severity_original: str | None, entry: dict) -> dict:
    """The provider fields a KB entry fills in a detection that lacks them (CVEs aside)."""
    changes: dict = {}
    if _is_placeholder(title, vendor_id) and entry["title"]:
        changes["title"] = entry["title"]
    if not description and entry["description"]:
        changes["description"] = entry["description"]
    if not remediation and entry["remediation"]:
        changes["remediation"] = entry["remediation"]
    if cvss_score is None and entry["cvss_score"] is not None:
        changes["cvss_score"] = entry["cvss_score"]
    if severity_original is None and entry["severity"]:
        changes["severity"] = entry["severity"]
    return changes


def _is_placeholder(title: str | None, vendor_id: str | None) -> bool:
    title = (title or "").strip()
    return not title or title in (vendor_id, f"QID {vendor_id}")


def _needs(record: FindingRecord) -> bool:
    return _is_placeholder(record.title, record.vendor_id) or not record.cves or not record.description


__all__ = ["Backfill", "KnowledgeMerger"]
