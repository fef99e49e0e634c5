"""Merge finding records: sources, correlated findings, lifecycle, recommendations.

A provider record is identified by (tenant, provider, provider_id) and relates to
one finding per correlation key: each CVE it names, or the provider's vendor id
when it names none (DESIGN rule 4).  Each (record, key) pair is a *source* row.
All reads and writes are set-based: a handful of statements per chunk of records.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
from sqlalchemy import BigInteger, bindparam, case, func, or_, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.types import ARRAY

from connectors.model import SEVERITIES, SEVERITY_RANK, FindingRecord
from gateway.merge import resources as resource_identity
from gateway.merge.sql import (
    in_values,
    insert_count,
    insert_for,
    insert_rows,
    is_postgres,
    keyed,
    pair_join,
    update_rows,
)
from gateway.models import (
    Finding,
    FindingSource,
    LifecycleEvent,
    Recommendation,
    RecommendationType,
    utcnow,
)
from gateway.posture import exemptions as posture_exemptions
from gateway.posture import governance as posture_governance
from gateway.posture import policy as posture_policy
from gateway.posture import status as posture_status
from gateway.score import controls as score_controls
from gateway.score import upkeep as score_upkeep

findings_t = Finding.__table__
sources_t = FindingSource.__table__
events_t = LifecycleEvent.__table__
types_t = RecommendationType.__table__
recs_t = Recommendation.__table__
# the columns of a new source that vary by row (the others are the chunk's constants)
_SOURCE_CONSTANTS = ("id", "tenant_id", "provider", "batch_id", "created_at", "updated_at")
_SOURCE_COLUMNS = tuple(c.name for c in sources_t.columns if c.name not in _SOURCE_CONSTANTS)

VULNERABILITY_TYPE = {
    "key": "vulnerability-assessment",
    "title": "Vulnerabilities in your machines should be remediated",
    "description": "Vulnerability assessment solutions found vulnerabilities on the resource.",
    "remediation": "Review the findings and apply the remediation each one names.",
    "severity": "high",
    "kind": "vulnerability",
    "provider": None,
    "categories": ["Compute"],
    "control": "remediate-vulnerabilities",
}

_OUTCOME_PRIORITY = ("created", "updated", "stale", "unchanged")
LOST_RACE_ROUNDS = 5  # a row whose conflicting row is deleted again and again (a KB back-fill) ends here
RECOMMENDATION_LOCKS = 7101  # advisory lock space: the locks taken while recommendations are recomputed
RECOMMENDATION_BUCKETS = 128  # resources of a tenant share this many locks (see update_recommendations)


def correlation_key(provider: str, record: FindingRecord) -> list[tuple[str, str | None]]:
    """(correlation key, CVE) pairs of a record: one per CVE, else the vendor id."""
    if record.cves and record.kind == "vulnerability":
        return [(cve, cve) for cve in record.cves]
    vendor = record.vendor_id or record.recommendation or record.provider_id
    return [(f"{provider}/{vendor}"[:300], None)]


def content_hash(row: dict) -> str:
    """Hash of the provider-observed content, without the seen times."""
    payload = msgspec.msgpack.encode((
        row["state"], row["title"], row["severity"], row["severity_original"], row["description"],
        row["remediation"], row["evidence"], row["cvss_score"], row["cvss_vector"], row["references"],
        row["vendor_id"], row["resource_id"], row["extra"],
    ))
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


@dataclass
class MergeResult:
    """What a batch's merge did, in counts and rejections."""

    counts: Counter = field(default_factory=Counter)


class FindingMerger:
    """Merges the finding records of one batch, chunk by chunk, inside one transaction."""

    def __init__(self, conn: Connection, tenant_id: int, provider: str, batch_id: int | None,
                 received_at: datetime, cause: str, *, product: str | None = None,
                 format: str | None = None) -> None:
        self.conn = conn
        self.tenant_id = tenant_id
        self.provider = provider
        self.batch_id = batch_id
        self.received_at = received_at
        self.cause = cause
        self.product = product
        self.format = format
        self.resolve_on_main = False  # set once this batch holds the tenant's resolver lock
        self._seen_records: set[int] = set()  # 64-bit digests of the provider ids this push merged
        self._identity_cache: dict[bytes, dict] = {}  # normalized host records of this batch
        self.counts: Counter = Counter()
        self.reported: set[tuple[str, str]] = set()
        self.scope: set[int] = set()
        self.observed_resources: set[int] = set()
        self.touched_recommendations: set[tuple[int, int]] = set()
        # (recommendation id, effective status before (None: new), after) of every change of status
        self.recommendation_transitions: list[tuple[int, str | None, str]] = []
        # (recommendation id, actual status before, after) of every change of an existing one's actual status
        self.actual_transitions: list[tuple[int, str, str]] = []
        self._type_ids: dict[str, int] = {}
        self.stale_examples: list[dict] = []  # a few records counted stale, and what they lost to

    # -- recommendation types -------------------------------------------------------------

    def _type_spec(self, record: FindingRecord) -> dict:
        """The recommendation type a record falls under: the built-in one, or the provider's.

        Types are per tenant (their texts come from what this tenant's providers pushed), and
        the first record of a key in the tenant gives its texts.  A partner cannot redefine a
        built-in type: a record naming the built-in key gets the built-in texts.
        """
        if (record.kind == "vulnerability" and not record.recommendation) or \
                record.recommendation == VULNERABILITY_TYPE["key"]:
            return VULNERABILITY_TYPE
        key = record.recommendation or f"{self.provider}:{record.vendor_id or record.title}"
        spec = {
            "key": key[:300],
            "title": record.title[:500],
            "description": record.description,
            "remediation": record.remediation,
            "severity": record.severity,
            "kind": record.kind,
            "provider": self.provider,
            "categories": [],
            "control": None,
        }
        spec["control"] = score_controls.resolve(spec)  # the type's Secure Score control, once
        return spec

    def _type_ids_for(self, records: Sequence[FindingRecord]) -> list[int]:
        specs = [self._type_spec(record) for record in records]
        missing = {spec["key"]: spec for spec in specs if spec["key"] not in self._type_ids}
        if missing:
            self.conn.execute(
                insert_for(self.conn, types_t).on_conflict_do_nothing(index_elements=["tenant_id", "key"]),
                [missing[key] | {"tenant_id": self.tenant_id} for key in sorted(missing)],
            )
            rows = self.conn.execute(select(types_t.c.key, types_t.c.id).where(
                types_t.c.tenant_id == self.tenant_id, in_values(self.conn, types_t.c.key, sorted(missing))))
            self._type_ids.update(dict(rows.all()))
        return [self._type_ids[spec["key"]] for spec in specs]

    # -- one chunk ------------------------------------------------------------------------

    def resolve(self, refs: Sequence, seen: Sequence[datetime | None], product: str | None = None,
                allow_merge: bool = True) -> list[int]:
        """The resources of the refs (gateway/merge/resources.py); stored resources the evidence
        proves to be one are merged first, in this transaction."""
        resolution = resource_identity.resolve_committed(
            self.conn, self.tenant_id, refs, seen, provider=self.provider, product=product or self.product,
            batch_id=self.batch_id, allow_merge=allow_merge, on_main=self.resolve_on_main,
            cache=self._identity_cache)
        if resolution.merges or resolution.detach:
            self.resolve_on_main = True  # the tenant's resolver lock is held by this transaction now
            for loser, survivor in resolution.merges:
                self.merge_resources(loser, survivor, evidence="identifiers of a later record")
            if resolution.detach:
                from gateway.merge.combine import split_resource

                for resource_id, source_id in resolution.detach:
                    split_resource(self, resource_id, [source_id], actor="identity resolution",
                                   reevaluate=False)
        return resolution.ids

    def merge_resources(self, loser: int, survivor: int, evidence: str, actor: str | None = None) -> None:
        """Resource ``loser`` is ``survivor``: move all it holds (gateway/merge/combine.py)."""
        from gateway.merge.combine import merge_resources

        merge_resources(self, loser, survivor, evidence, actor)

    def merge_chunk(self, records: Sequence[FindingRecord], observations: Sequence = ()) -> None:
        """Merge a chunk of records (already validated by the connector), and the chunk's observations."""
        if not records and not observations:
            return
        now = utcnow()
        refs = [r.resource for r in records] + [o.resource for o in observations]
        seen = [r.last_seen or r.provider_timestamp or r.first_seen for r in records] + \
               [o.last_seen or o.provider_timestamp or o.first_seen for o in observations]
        product = next((r.product for r in list(records) + list(observations) if r.product), None)
        all_ids = self.resolve(refs, seen, product)
        resource_ids = all_ids[: len(records)]
        if observations:
            from gateway.merge.observations import merge_observations

            merge_observations(self, observations, all_ids[len(records):], now)
        if not records:
            return
        type_ids = self._type_ids_for(records)
        self.scope.update(resource_ids)

        incoming: dict[tuple[str, str], dict] = {}
        record_keys: list[list[tuple[str, str]]] = []
        in_chunk: set[str] = set()
        earlier: list[tuple[FindingRecord, int]] = []  # repeats of records an earlier chunk merged
        for index, record in enumerate(records):
            digest = _digest(record.provider_id)
            if record.provider_id not in in_chunk and digest in self._seen_records:
                earlier.append((record, resource_ids[index]))
                self.counts["duplicatesInPush"] += 1
                continue
            self._seen_records.add(digest)
            repeated = record.provider_id in in_chunk
            in_chunk.add(record.provider_id)
            keys = []
            for key, cve in correlation_key(self.provider, record):
                row = self._source_row(record, key, cve, resource_ids[index], type_ids[index])
                identity = (record.provider_id, key)
                keys.append(identity)
                previous = incoming.get(identity)
                if previous is not None and repeated:
                    incoming[identity] = _fold(previous, row)
                elif previous is None or row["provider_timestamp"] >= previous["provider_timestamp"]:
                    incoming[identity] = row
            if repeated:  # the same record twice in one push: one record, both outputs kept
                self.counts["duplicatesInPush"] += 1
            else:
                record_keys.append(keys)
        self.reported.update(incoming)
        if earlier:
            self._fold_stored(earlier)

        existing = self._existing_sources(sorted(incoming))
        outcome, created, updated, touched = _classify(incoming, existing, self.stale_examples)
        moved = [row for row in updated if row["resource_id"] != row["_old"]["resource_id"]]
        finding_ids = self._ensure_findings(created + moved, now)
        for row in created + moved:
            row["finding_id"] = finding_ids[(row["resource_id"], row["correlation_key"])]
        for row in updated + touched:
            row.setdefault("finding_id", row["_old"]["finding_id"])
        created_ids = {finding_ids[key] for key in self._created_finding_keys}

        # A concurrent batch of the tenant may have inserted some of these sources since they were
        # read: the insert skips them (ON CONFLICT DO NOTHING, after waiting for that batch to
        # commit), and they are merged again as what they now are, updates (or stale or
        # unchanged reports) of the rows that batch inserted.
        lost = self._insert_sources(created, now)
        recheck: set[int] = set()
        for _ in range(LOST_RACE_ROUNDS):
            if not lost:
                break
            recheck |= {row["finding_id"] for row in lost} & created_ids
            again, created_again, updated_again, touched_again = _classify(
                {(row["provider_id"], row["correlation_key"]): row for row in lost},
                self._existing_sources(sorted({(row["provider_id"], row["correlation_key"])
                                               for row in lost})), self.stale_examples)
            outcome.update(again)
            for row in updated_again + touched_again:
                if row["resource_id"] == row["_old"]["resource_id"]:
                    row["finding_id"] = row["_old"]["finding_id"]
                else:
                    moved.append(row)  # its finding on the new resource was ensured above
            created = [row for row in created if outcome[(row["provider_id"], row["correlation_key"])]
                       == "created"]
            updated += updated_again
            touched += touched_again
            lost = self._insert_sources(created_again, now)  # rows whose conflicting row went away
        else:
            if lost:
                raise RuntimeError(f"{len(lost)} sources kept losing their insert to concurrent batches")

        for keys in record_keys:
            kinds = {outcome[key] for key in keys}
            self.counts[next(kind for kind in _OUTCOME_PRIORITY if kind in kinds)] += 1
        self._update_sources(updated, touched, now)
        affected = {row["finding_id"] for row in created + updated + touched}
        affected |= {row["_old"]["finding_id"] for row in moved}
        affected -= created_ids - recheck  # inserted with their final values
        seen_again = {row["finding_id"] for row in updated + touched} - created_ids
        self._refresh_findings(affected, changed={row["finding_id"]: row for row in updated},
                               seen_again=seen_again, now=now)
        if recheck:
            self._drop_empty_findings(recheck)

    def _source_row(self, record: FindingRecord, key: str, cve: str | None, resource_id: int,
                    type_id: int) -> dict:
        provider_ts = record.provider_timestamp or record.last_seen or self.received_at
        row = {
            "tenant_id": self.tenant_id,
            "provider": self.provider,
            "provider_id": record.provider_id,
            "correlation_key": key,
            "cve": cve,
            "type_id": type_id,
            "kind": record.kind,
            "resource_id": resource_id,
            "vendor_id": record.vendor_id,
            "state": "open" if record.status == "open" else "fixed",
            "title": record.title,
            "severity": record.severity,
            "severity_original": record.severity_original,
            "severity_scale": record.severity_scale,
            "description": record.description,
            "remediation": record.remediation,
            "evidence": record.evidence,
            "cvss_score": record.cvss_score,
            "cvss_vector": record.cvss_vector,
            "references": record.references,
            "extra": record.extra,
            "first_seen": record.first_seen,
            "last_seen": record.last_seen,
            "provider_timestamp": provider_ts,
            "provider_timestamp_is_fallback": not (record.provider_timestamp or record.last_seen),
            "product": record.product or self.product,
            "format": self.format,
            "scan": (record.scan or None) and record.scan[:500],
            "host_key": (record.resource.host_key or None) and record.resource.host_key[:500],
        }
        row["content_hash"] = content_hash(row)
        if row["references"] is None:  # stored as [] (after hashing: the hash of a stored row stays)
            row["references"] = []
        return row

    def _existing_sources(self, identities: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
        """The stored sources of these (provider id, correlation key) identities, locked on PostgreSQL."""
        if not identities:
            return {}
        s = sources_t.c
        columns = (s.id, s.provider_id, s.correlation_key, s.finding_id, s.resource_id, s.provider_timestamp,
                   s.provider_timestamp_is_fallback, s.batch_id, s.content_hash, s.state, s.first_seen,
                   s.last_seen)
        mine = (s.tenant_id == self.tenant_id, s.provider == self.provider)
        if is_postgres(self.conn):
            # Found through the unique index, one identity at a time (gateway/merge/sql.py ``keyed``),
            # then locked in id order, as they always were: two batches of the same records lock
            # them in the same order and never wait for each other in a cycle.  The lock reads them
            # by primary key alone (they are the tenant's and provider's, found just above): beside
            # the tenant and provider, which the planner guesses pick 0.0025% of the table, the
            # primary key would not be sure to win over a scan of the provider's sources per id.
            ids = sorted(self.conn.execute(keyed(self.conn, select(s.id).where(*mine),
                                                 (s.provider_id, s.correlation_key), identities,
                                                 unique=True)).scalars())
            if not ids:
                return {}
            result = self.conn.execute(keyed(self.conn, select(*columns).with_for_update(), (s.id,), ids,
                                             unique=True))
        else:
            result = self.conn.execute(select(*columns).where(*mine, in_values(
                self.conn, s.provider_id, sorted({pid for pid, _ in identities}))).order_by(s.id))
        keys = list(result.keys())
        return {(row[1], row[2]): dict(zip(keys, row, strict=True)) for row in result}

    def _fold_stored(self, repeats: list[tuple[FindingRecord, int]]) -> None:
        """Records an earlier chunk of this push merged, seen again: their outputs join the stored evidence.

        The stored content hash stays that of the first occurrence, so the same push again
        finds the record unchanged; an output already in the evidence is not added twice.
        """
        s = sources_t.c
        query = select(s.id, s.provider_id, s.correlation_key, s.evidence).where(
            s.tenant_id == self.tenant_id, s.provider == self.provider)
        if is_postgres(self.conn):
            identities = sorted({(record.provider_id, key) for record, _ in repeats
                                 for key, _ in correlation_key(self.provider, record)})
            query = keyed(self.conn, query, (s.provider_id, s.correlation_key), identities, unique=True)
        else:
            query = query.where(in_values(self.conn, s.provider_id,
                                          sorted({record.provider_id for record, _ in repeats})))
        stored = {(row.provider_id, row.correlation_key): row for row in self.conn.execute(query)}
        evidence: dict[int, str | None] = {}
        for record, _ in repeats:
            if not record.evidence:
                continue
            for key, _ in correlation_key(self.provider, record):
                row = stored.get((record.provider_id, key))
                if row is None:
                    continue
                current = evidence.get(row.id, row.evidence)
                if not current or record.evidence not in current:
                    evidence[row.id] = _join_evidence(current, record.evidence)
        if evidence:
            update_rows(self.conn, sources_t, [{"id": sid, "evidence": text_} for sid, text_ in
                                               sorted(evidence.items())])

    def _ensure_findings(self, rows: list[dict], now: datetime) -> dict[tuple[int, str], int]:
        """Finding ids for (resource, correlation key) pairs, inserting missing findings.

        A finding created here has no sources but the rows given, so it is inserted with
        its final values (state, worst severity, seen times) and its "new" event; it needs
        no refresh.  Findings that already existed are refreshed by the caller.
        """
        self._created_finding_keys: set[tuple[int, str]] = set()
        wanted: dict[tuple[int, str], list[dict]] = defaultdict(list)
        for row in rows:
            wanted[(row["resource_id"], row["correlation_key"])].append(row)
        if not wanted:
            return {}
        new_rows = []
        for key in sorted(wanted):
            group = wanted[key]
            first = group[0]
            values = _aggregate(group)
            new_rows.append({
                "resource_id": key[0], "correlation_key": key[1],
                "recommendation_type_id": first["type_id"], "cve": first["cve"], "kind": first["kind"],
                "title": values["title"], "description": values["description"],
                "remediation": values["remediation"], "severity": values["severity"],
                "cvss_score": values["cvss_score"], "state": "new" if values["open"] else "resolved",
                "first_seen": values["first_seen"], "last_seen": values["last_seen"],
                "resolved_at": None if values["open"] else now,
            })
        found: dict[tuple[int, str], int] = {}
        inserted = insert_rows(self.conn, findings_t, new_rows,
                               returning=("id", "resource_id", "correlation_key"),
                               conflict=("tenant_id", "resource_id", "correlation_key"),
                               constants={"tenant_id": self.tenant_id, "state_changed_at": now,
                                          "created_at": now, "updated_at": now, "comments": [], "tags": []})
        by_key = {(row["resource_id"], row["correlation_key"]): row for row in new_rows}
        events = []
        for finding_id, resource_id, key in inserted:
            found[(resource_id, key)] = finding_id
            self._created_finding_keys.add((resource_id, key))
            row = by_key[(resource_id, key)]
            self.touched_recommendations.add((resource_id, row["recommendation_type_id"]))
            events.append(self._event(finding_id, "new", now, {"state": row["state"], "severity": row["severity"]}))
        self._insert_events(events)
        missing = [key for key in sorted(wanted) if key not in found]
        if missing:  # the finding existed (another provider's, or created concurrently)
            found.update(self._select_findings(missing))
        return found

    def _event(self, finding_id: int, event: str, now: datetime, details: dict, cause: str | None = None) -> dict:
        return {"subject_id": finding_id, "event": event, "at": now, "cause": cause or self.cause,
                "details": details}

    def _insert_events(self, events: list[dict]) -> None:
        insert_rows(self.conn, events_t, events, constants={
            "tenant_id": self.tenant_id, "subject_type": "finding", "batch_id": self.batch_id,
            "actor": self.provider})

    def _select_findings(self, keys: list[tuple[int, str]]) -> dict[tuple[int, str], int]:
        result: dict[tuple[int, str], int] = {}
        for start in range(0, len(keys), 5000):
            part = keys[start : start + 5000]
            query = select(findings_t.c.id, findings_t.c.resource_id, findings_t.c.correlation_key).where(
                findings_t.c.tenant_id == self.tenant_id)
            rows = self.conn.execute(
                pair_join(self.conn, query, findings_t.c.resource_id, findings_t.c.correlation_key, part))
            for finding_id, resource_id, key in rows:
                result[(resource_id, key)] = finding_id
        return result

    def _insert_sources(self, created: list[dict], now: datetime) -> list[dict]:
        """Insert new sources; return those a concurrent batch inserted first (none on SQLite).

        On PostgreSQL the insert is ``ON CONFLICT DO NOTHING`` on the record's unique key: a row
        another batch inserted meanwhile (and committed: the insert waits for it) is skipped,
        instead of failing the batch with a unique violation, and returned to the caller.
        Which rows those are is read only when the insert came short (no RETURNING of every
        row): the rows of these records that this chunk did not write.  SQLite has one writer
        at a time, so what was read is still what is stored.
        """
        if not created:
            return []
        constants = {"tenant_id": self.tenant_id, "provider": self.provider, "batch_id": self.batch_id,
                     "created_at": now, "updated_at": now}
        columns = _SOURCE_COLUMNS
        if not is_postgres(self.conn):
            insert_rows(self.conn, sources_t, created, constants=constants, columns=columns)
            return []
        inserted = insert_count(self.conn, sources_t, created, constants=constants, columns=columns,
                                conflict=("tenant_id", "provider", "provider_id", "correlation_key"))
        if inserted == len(created):
            return []
        s = sources_t.c
        theirs = set(self.conn.execute(keyed(
            self.conn, select(s.provider_id, s.correlation_key).where(
                s.tenant_id == self.tenant_id, s.provider == self.provider,
                or_(s.batch_id.is_distinct_from(self.batch_id), s.created_at != now)),
            (s.provider_id, s.correlation_key),
            sorted({(row["provider_id"], row["correlation_key"]) for row in created}), unique=True)).all())
        lost = [row for row in created if (row["provider_id"], row["correlation_key"]) in theirs]
        if len(lost) != len(created) - inserted:
            raise RuntimeError(f"{len(created) - inserted} sources not inserted, {len(lost)} found")
        return lost

    def _update_sources(self, updated: list[dict], touched: list[dict], now: datetime) -> None:
        if updated:
            fields = ["finding_id", "resource_id", "vendor_id", "state", "title", "severity",
                      "severity_original", "severity_scale", "description", "remediation", "evidence",
                      "cvss_score", "cvss_vector", "references", "extra", "last_seen",
                      "provider_timestamp", "provider_timestamp_is_fallback", "content_hash", "product",
                      "format", "scan", "host_key"]
            changes = []
            for row in sorted(updated, key=lambda r: r["_old"]["id"]):
                change = {"id": row["_old"]["id"]} | {name: row[name] for name in fields}
                change["references"] = row["references"] or []
                change["first_seen"] = _earliest(row["first_seen"], row["_old"]["first_seen"])
                changes.append(change)
            update_rows(self.conn, sources_t, changes, constants={"batch_id": self.batch_id, "updated_at": now})
        if touched:
            update_rows(self.conn, sources_t, [
                {"id": row["_old"]["id"], "last_seen": _latest(row["last_seen"], row["_old"]["last_seen"]),
                 "provider_timestamp": row["provider_timestamp"],
                 "provider_timestamp_is_fallback": row["provider_timestamp_is_fallback"],
                 "product": row["product"],
                 "format": row["format"], "scan": row["scan"], "host_key": row["host_key"]}
                for row in sorted(touched, key=lambda r: r["_old"]["id"])
            ], constants={"batch_id": self.batch_id})

    def _drop_empty_findings(self, finding_ids: set[int]) -> None:
        """Delete findings this chunk inserted that ended with no source, and their "new" events.

        Only after a lost insert race whose record the other batch put on another resource:
        the finding this batch created for it on its own resource then has nothing to show.
        It was inserted by this transaction, so no one else has seen it.
        """
        ids = sorted(finding_ids)
        empty = [finding_id for (finding_id,) in self.conn.execute(
            select(findings_t.c.id).where(
                findings_t.c.tenant_id == self.tenant_id, in_values(self.conn, findings_t.c.id, ids),
                ~select(sources_t.c.id).where(sources_t.c.tenant_id == self.tenant_id,
                                               sources_t.c.finding_id == findings_t.c.id).exists()))]
        if not empty:
            return
        self.conn.execute(events_t.delete().where(
            events_t.c.tenant_id == self.tenant_id, events_t.c.subject_type == "finding",
            in_values(self.conn, events_t.c.subject_id, empty), events_t.c.batch_id == self.batch_id))
        self.conn.execute(findings_t.delete().where(findings_t.c.tenant_id == self.tenant_id,
                                                    in_values(self.conn, findings_t.c.id, empty)))

    # -- findings' state and history ------------------------------------------------------

    def _refresh_findings(self, affected: set[int], changed: dict[int, dict], seen_again: set[int],
                          now: datetime, cause: str | None = None) -> None:
        """Recompute state and provider fields of stored findings from all their sources."""
        if not affected:
            return
        ids = sorted(affected)
        query = (select(findings_t.c.id, findings_t.c.state, findings_t.c.resource_id,
                        findings_t.c.recommendation_type_id, findings_t.c.state_changed_at,
                        findings_t.c.resolved_at, findings_t.c.created_at)
                 .where(findings_t.c.tenant_id == self.tenant_id))
        if is_postgres(self.conn):
            # Lock the findings (in id order: ``keyed`` reads the sorted ids in turn) before reading
            # their sources: a concurrent batch that changed another source of one of them has
            # committed by the time the lock is granted, and the read below sees its change (READ
            # COMMITTED), so neither batch writes a state computed without the other's source.  FOR
            # NO KEY UPDATE, the lock the UPDATE below takes anyway: it does not block inserting
            # sources of the finding.
            query = keyed(self.conn, query.with_for_update(key_share=True), (findings_t.c.id,), ids,
                          unique=True)
        else:
            query = query.where(in_values(self.conn, findings_t.c.id, ids))
        current = {row.id: row for row in self.conn.execute(query)}
        by_finding: dict[int, list] = defaultdict(list)
        # The sources of the tenant's findings just read, by finding id alone (a source is its
        # finding's tenant's): one index, whatever the statistics say of the tenant.
        for row in self.conn.execute(keyed(
            self.conn,
            select(sources_t.c.finding_id, sources_t.c.state, sources_t.c.severity, sources_t.c.title,
                   sources_t.c.description, sources_t.c.remediation, sources_t.c.cvss_score,
                   sources_t.c.first_seen, sources_t.c.last_seen, sources_t.c.provider_timestamp),
            (sources_t.c.finding_id,), sorted(current))
        ):
            by_finding[row.finding_id].append(row._mapping)

        updates, events = [], []
        for finding_id in ids:
            finding = current.get(finding_id)
            sources = by_finding.get(finding_id, [])
            if finding is None or not sources:
                continue
            values = _aggregate(sources)
            any_open = values.pop("open")
            previous = finding.state
            if previous == "resolved" and any_open and finding.state_changed_at == finding.created_at:
                # created resolved (its first source said fixed) and never open since: a source
                # now says open, which makes it new, not reopened (as had that source come first)
                state = "new"
            elif previous == "resolved":
                state = "reopened" if any_open else "resolved"
            elif not any_open:
                state = "resolved"
            elif finding_id in seen_again and previous in ("new", "reopened"):
                state = "active"
            else:
                state = previous
            values.update(
                id=finding_id, state=state,
                state_changed_at=now if state != previous else finding.state_changed_at,
                resolved_at=None if state != "resolved" else (
                    now if previous != "resolved" else finding.resolved_at),
            )
            updates.append(values)
            self.touched_recommendations.add((finding.resource_id, finding.recommendation_type_id))
            cause_text = cause or self.cause
            if state != previous:
                if state == "resolved":
                    self.counts["resolved"] += 1
                # a finding created resolved that a source now reports open is "opened" (state new):
                # its one "new" event is its creation
                name = "opened" if state == "new" else state
                events.append(self._event(finding_id, name, now, {"from": previous}, cause_text))
            elif finding_id in changed:
                row = changed[finding_id]
                events.append(self._event(finding_id, "updated", now, {
                    "provider": self.provider, "providerId": row["provider_id"], "state": row["state"],
                    "severity": row["severity"]}, cause_text))
        update_rows(self.conn, findings_t, updates, constants={"updated_at": now})
        self._insert_events(events)

    # -- end of batch ---------------------------------------------------------------------

    def resolve_unreported(self) -> int:
        """Full scan: resolve this provider's open sources on the scanned resources it omitted."""
        if not self.scope:
            return 0
        conn, now = self.conn, utcnow()
        stale_sources = []
        scope = sorted(self.scope)
        s, f = sources_t.c, findings_t.c
        # The sources of a resource are found through its findings, key by key (``keyed``): the
        # resources' findings by uq_findings_subject, then their sources by (tenant, provider,
        # finding).  There is no index on the sources' resource, and ``resource_id = ANY(...)``
        # beside the tenant and provider reads all the provider's sources whenever the
        # statistics are missing (as does a join of the two, planned per resource).
        findings_of = select(f.id).where(f.tenant_id == self.tenant_id)
        open_sources = select(s.id, s.provider_id, s.correlation_key, s.finding_id).where(
            s.tenant_id == self.tenant_id, s.provider == self.provider, s.state == "open")
        for start in range(0, len(scope), 5000):
            finding_ids = conn.execute(keyed(conn, findings_of, (f.resource_id,),
                                             scope[start : start + 5000])).scalars().all()
            for row in conn.execute(keyed(conn, open_sources, (s.finding_id,), finding_ids)):
                if (row.provider_id, row.correlation_key) not in self.reported:
                    stale_sources.append(row)
        if not stale_sources:
            return 0
        stale_sources.sort(key=lambda row: row.id)
        # the next report of this record must count as a change, not as unchanged
        update_rows(conn, sources_t, [{"id": row.id, "state": "fixed"} for row in stale_sources],
                    constants={"batch_id": self.batch_id, "updated_at": now,
                               "content_hash": "absent-from-full-scan"})
        affected = {row.finding_id for row in stale_sources}
        self._refresh_findings(affected, {}, set(), now,
                               cause=f"absent from full scan (batch {self.batch_id})")
        return len(stale_sources)

    def update_recommendations(self) -> None:
        """Recompute the status of every recommendation the batch touched."""
        if not self.touched_recommendations:
            return
        conn, now = self.conn, utcnow()
        first, first_actual = len(self.recommendation_transitions), len(self.actual_transitions)
        pairs = sorted(self.touched_recommendations)
        resource_ids = sorted({resource_id for resource_id, _ in pairs})
        if is_postgres(conn):
            # The tenant's score lock first (recount takes it again, re-entrantly), then the
            # buckets: whoever holds a bucket also holds the score lock, so two merges never wait
            # for each other in a cycle, even when one transaction comes here twice (a KB back-fill).
            conn.execute(text("SELECT pg_advisory_xact_lock(:space, :tenant)"),
                         {"space": score_upkeep.SCORE_LOCKS, "tenant": self.tenant_id})
            # Concurrent batches on the same resources take turns here, and each counts the
            # findings the other committed (READ COMMITTED: every statement sees the latest).
            # One lock per bucket of resources, not per resource: a merge holds at most
            # RECOMMENDATION_BUCKETS locks whatever its size (the server's lock table is shared and
            # sized by max_locks_per_transaction), taken in order so two merges never deadlock.
            conn.execute(text(
                "SELECT pg_advisory_xact_lock(:space, (:tenant * :buckets + b)::int) "
                "FROM (SELECT DISTINCT r % :buckets AS b FROM unnest(:ids) AS r ORDER BY 1) AS ordered"
            ).bindparams(bindparam("ids", type_=ARRAY(BigInteger))), {
                "space": RECOMMENDATION_LOCKS, "ids": resource_ids, "buckets": RECOMMENDATION_BUCKETS,
                "tenant": self.tenant_id % (2**31 // RECOMMENDATION_BUCKETS)})
        rank = case(*[(findings_t.c.severity == name, index) for index, name in enumerate(SEVERITIES)],
                    else_=0)
        aggregate: dict[tuple[int, int], tuple[int, int]] = {}
        # per resource through uq_findings_subject (tenant_id, resource_id, ...), whatever the statistics
        per_type = (select(findings_t.c.resource_id, findings_t.c.recommendation_type_id,
                           func.sum(case((findings_t.c.state != "resolved", 1), else_=0)).label("open"),
                           func.max(case((findings_t.c.state != "resolved", rank), else_=-1)).label("worst"))
                    .where(findings_t.c.tenant_id == self.tenant_id)
                    .group_by(findings_t.c.resource_id, findings_t.c.recommendation_type_id))
        for start in range(0, len(resource_ids), 5000):
            rows = conn.execute(keyed(conn, per_type, (findings_t.c.resource_id,),
                                      resource_ids[start : start + 5000]))
            for resource_id, type_id, open_count, worst in rows:
                aggregate[(resource_id, type_id)] = (int(open_count or 0), int(worst if worst is not None else -1))
        type_ids = sorted({type_id for _, type_id in pairs})
        # the tenant's policy as it applies to the touched types (new ones included), then the
        # types' settings and the exemptions that apply: read under the score lock, so a policy
        # change or an exemption committed meanwhile is seen (and one committed later sees this)
        if posture_policy.has_settings(conn, self.tenant_id):
            posture_policy.settle(conn, self.tenant_id, type_ids, cause=self.cause, actor=self.provider, now=now)
        type_rows = {row.id: row for row in conn.execute(
            select(types_t.c.id, types_t.c.severity, types_t.c.enabled, types_t.c.severity_override).where(
                types_t.c.tenant_id == self.tenant_id, in_values(conn, types_t.c.id, type_ids)))}
        active_exemptions = posture_exemptions.active(conn, self.tenant_id, now)
        events: list[dict] = []
        pending = pairs
        for _ in range(LOST_RACE_ROUNDS):
            inserts, changes = [], []
            existing = self._existing_recommendations(pending)
            covered = posture_exemptions.covering(
                conn, self.tenant_id, [pair for pair in pending if pair not in existing and pair in aggregate],
                active_exemptions) if active_exemptions else {}
            for pair in pending:
                open_count, worst = aggregate.get(pair, (0, -1))
                actual = "Unhealthy" if open_count else "Healthy"
                kind = type_rows.get(pair[1])
                actual_severity = SEVERITIES[worst] if worst >= 0 else (kind.severity if kind else "medium")
                enabled, override = (kind.enabled, kind.severity_override) if kind else (True, None)
                old = existing.get(pair)
                exemption_id = covered.get(pair) if old is None else old.exemption_id
                status, cause, severity = posture_status.effective(actual, actual_severity, enabled, override,
                                                                   exemption_id)
                if old is None:
                    if pair not in aggregate:  # no finding of this type on the resource (any more)
                        continue
                    inserts.append({"tenant_id": self.tenant_id, "resource_id": pair[0], "type_id": pair[1],
                                    "status": status, "severity": severity, "actual_status": actual,
                                    "actual_severity": actual_severity, "status_cause": cause,
                                    "exemption_id": exemption_id, "first_evaluated": now,
                                    "status_changed_at": now, "updated_at": now, "comments": [], "tags": []})
                elif (old.status, old.severity, old.status_cause, old.actual_status, old.actual_severity) != \
                        (status, severity, cause, actual, actual_severity):
                    changes.append({"id": old.id, "status": status, "severity": severity, "status_cause": cause,
                                    "actual_status": actual, "actual_severity": actual_severity,
                                    "status_changed_at": now if old.status != status
                                    else old.status_changed_at})
                    if old.actual_status != actual:
                        self.actual_transitions.append((old.id, old.actual_status, actual))
                    if old.status != status:
                        self.recommendation_transitions.append((old.id, old.status, status))
                        events.append({"tenant_id": self.tenant_id, "subject_type": "recommendation",
                                       "subject_id": old.id, "event": status.lower(), "at": now,
                                       "cause": self.cause, "batch_id": self.batch_id, "actor": self.provider,
                                       "details": {"from": old.status, "cause": cause}})
            update_rows(conn, recs_t, changes, constants={"updated_at": now})
            # ON CONFLICT DO NOTHING: a recommendation another batch inserted meanwhile is read
            # again and updated (on PostgreSQL the resource locks above make that rare).
            new = insert_rows(conn, recs_t, inserts, returning=("id", "resource_id", "type_id", "status"),
                              conflict=("tenant_id", "resource_id", "type_id") if is_postgres(conn) else None)
            events.extend({"tenant_id": self.tenant_id, "subject_type": "recommendation", "subject_id": rid,
                           "event": "new", "at": now, "cause": self.cause, "batch_id": self.batch_id,
                           "actor": self.provider, "details": {"status": status}}
                          for rid, _, _, status in new)
            self.recommendation_transitions.extend((rid, None, status) for rid, _, _, status in new)
            done = {(resource_id, type_id) for _, resource_id, type_id, _ in new}
            pending = [(row["resource_id"], row["type_id"]) for row in inserts
                       if (row["resource_id"], row["type_id"]) not in done]
            if not pending:
                break
        else:
            raise RuntimeError(f"{len(pending)} recommendations kept losing their insert to concurrent "
                               "batches")
        insert_rows(conn, events_t, events)
        # the Secure Score of the controls of the touched types, in this transaction
        score_upkeep.recount(conn, self.tenant_id, score_upkeep.controls_of_types(conn, self.tenant_id, type_ids))
        # governance: complete the assignments of fixed recommendations, assign new Unhealthy ones by rule
        posture_governance.after_merge(conn, self.tenant_id, self.recommendation_transitions[first:],
                                       self.actual_transitions[first_actual:], now, cause=self.cause,
                                       actor=self.provider, batch_id=self.batch_id)

    def _existing_recommendations(self, pairs: list[tuple[int, int]]) -> dict[tuple[int, int], object]:
        existing = {}
        for start in range(0, len(pairs), 5000):
            part = pairs[start : start + 5000]
            query = select(recs_t.c.id, recs_t.c.resource_id, recs_t.c.type_id, recs_t.c.status,
                           recs_t.c.severity, recs_t.c.status_changed_at, recs_t.c.actual_status,
                           recs_t.c.actual_severity, recs_t.c.status_cause, recs_t.c.exemption_id).where(
                recs_t.c.tenant_id == self.tenant_id)
            for row in self.conn.execute(pair_join(self.conn, query, recs_t.c.resource_id, recs_t.c.type_id,
                                                   part)):
                existing[(row.resource_id, row.type_id)] = row
        return existing


STALE_EXAMPLES = 10


def _older(row: dict, old: dict) -> bool:
    """The incoming row is older than the stored one (and so stale).

    A stored timestamp that is only a fallback (the receive time of a batch whose record had
    no time of its own) is older than any real provider timestamp.
    """
    if old.get("provider_timestamp_is_fallback") and not row.get("provider_timestamp_is_fallback"):
        return False
    return row["provider_timestamp"] < _aware(old["provider_timestamp"])


def _classify(incoming: dict[tuple[str, str], dict], existing: dict[tuple[str, str], dict],
              stale_examples: list[dict] | None = None):
    """Each incoming source row against the stored one: (outcome by identity, created, updated, touched).

    ``updated`` and ``touched`` rows (unchanged content, but seen later) get the stored row as
    ``_old``; stale rows (older than the stored one) are only counted, and the first few
    described in ``stale_examples``.
    """
    outcome: dict[tuple[str, str], str] = {}
    created, updated, touched = [], [], []
    for identity, row in incoming.items():
        old = existing.get(identity)
        if old is None:
            outcome[identity] = "created"
            created.append(row)
        elif _older(row, old):
            outcome[identity] = "stale"
            if stale_examples is not None and len(stale_examples) < STALE_EXAMPLES:
                stale_examples.append({
                    "providerId": row["provider_id"], "correlationKey": row["correlation_key"],
                    "providerTimestamp": _aware(row["provider_timestamp"]).isoformat(),
                    "storedProviderTimestamp": _aware(old["provider_timestamp"]).isoformat(),
                    "storedFromBatch": None if old.get("batch_id") is None else str(old["batch_id"]),
                })
        elif row["content_hash"] != old["content_hash"] or row["resource_id"] != old["resource_id"]:
            outcome[identity] = "updated"
            row["_old"] = old
            updated.append(row)
        else:
            outcome[identity] = "unchanged"
            if row["provider_timestamp"] > _aware(old["provider_timestamp"]) or _later(
                row["last_seen"], old["last_seen"]
            ) or bool(old.get("provider_timestamp_is_fallback")) != bool(
                row["provider_timestamp_is_fallback"]
            ):
                row["_old"] = old
                touched.append(row)
    return outcome, created, updated, touched


EVIDENCE_SEPARATOR = "\n\n"


def _digest(provider_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(provider_id.encode("utf-8", "surrogatepass"), digest_size=8).digest())


def _join_evidence(current: str | None, more: str | None) -> str | None:
    if not more or (current and more in current):
        return current
    return f"{current}{EVIDENCE_SEPARATOR}{more}" if current else more


def _fold(first: dict, again: dict) -> dict:
    """One push's two rows of one record: the first, with the evidence of both.

    The content hash stays the first row's: pushing the same file again finds it unchanged.
    """
    folded = dict(first)
    folded["evidence"] = _join_evidence(first["evidence"], again["evidence"])
    folded["last_seen"] = _latest(again["last_seen"], first["last_seen"])
    return folded


def _aggregate(sources) -> dict:
    """A finding's provider fields from its sources (mappings with the source columns).

    Open sources decide the severity (the worst, then the latest); the latest report
    gives title, description and remediation; seen times span all sources.
    """
    if len(sources) == 1:  # most findings have one source: the same values, without the searches
        (only,) = sources
        return {"open": only["state"] == "open", "severity": only["severity"], "title": only["title"],
                "description": only["description"], "remediation": only["remediation"],
                "cvss_score": only["cvss_score"], "first_seen": _aware(only["first_seen"]),
                "last_seen": _aware(only["last_seen"])}
    any_open = any(s["state"] == "open" for s in sources)
    pool = [s for s in sources if s["state"] == "open"] or sources
    # ties are broken by content, never by the order the store returns rows in: the result is
    # the same whichever scanner reported first (and on either store)
    worst = max(pool, key=lambda s: (SEVERITY_RANK.get(s["severity"], 0), _ts(s["provider_timestamp"]),
                                     s["cvss_score"] or -1.0, s["title"] or ""))
    latest = max(sources, key=lambda s: (_ts(s["provider_timestamp"]), s["title"] or "", s["description"] or "",
                                         s["remediation"] or ""))
    return {
        "open": any_open,
        "severity": worst["severity"],
        "title": latest["title"],
        "description": latest["description"],
        "remediation": latest["remediation"],
        "cvss_score": worst["cvss_score"],
        "first_seen": min((_aware(s["first_seen"]) for s in sources if s["first_seen"]), default=None),
        "last_seen": max((_aware(s["last_seen"]) for s in sources if s["last_seen"]), default=None),
    }


def _aware(value: datetime | None) -> datetime | None:

    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _ts(value: datetime | None) -> float:
    value = _aware(value)
    return value.timestamp() if value else 0.0


def _later(new: datetime | None, old: datetime | None) -> bool:
    return new is not None and (old is None or new > _aware(old))


def _latest(new: datetime | None, old: datetime | None) -> datetime | None:
    return new if _later(new, old) else _aware(old)


def _earliest(new: datetime | None, old: datetime | None) -> datetime | None:
    old = _aware(old)
    if new is None:
        return old
    if old is None:
        return new
    return min(new, old)
