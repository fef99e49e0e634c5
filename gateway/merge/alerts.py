"""Merge partner alerts: provider fields only; the customer's workflow fields stay.

An alert the merge creates that an active suppression rule of the tenant matches is inserted
already resolved, with ``suppressed_by`` and a ``suppressed`` event (gateway/suppression.py); an
update of a stored alert is never re-suppressed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import msgspec
from sqlalchemy import bindparam, case, select, update
from sqlalchemy.engine import Connection

from connectors.model import AlertRecord
from gateway import suppression
from gateway.merge import resources as resource_identity
from gateway.merge.sql import insert_for, keyed, locked_by_key
from gateway.models import Alert, LifecycleEvent, utcnow

alerts_t = Alert.__table__
events_t = LifecycleEvent.__table__

LOST_RACE_ROUNDS = 5
PROVIDER_FIELDS = ("title", "description", "severity", "category", "provider_status", "recommended_actions",
                   "extra", "created_date_time", "last_modified_date_time", "resource_id", "incident_id",
                   "service_source", "detection_source", "mitre_techniques", "first_activity_date_time",
                   "last_activity_date_time", "evidence")
_TIMES = ("created_date_time", "last_modified_date_time", "first_activity_date_time",
          "last_activity_date_time")
# A v2 push's classification gives the legacy feedback its first value too (and the other way round
# in the API): informationalExpectedActivity is Graph v2's word for the legacy benignPositive.
FEEDBACK_FOR_CLASSIFICATION = {"truePositive": "truePositive", "falsePositive": "falsePositive",
                               "informationalExpectedActivity": "benignPositive"}


class AlertMerger:
    """Upserts alerts by (tenant, provider, provider id), ignoring stale updates."""

    def __init__(self, conn: Connection, tenant_id: int, provider: str, batch_id: int | None, cause: str):
        self.conn = conn
        self.tenant_id = tenant_id
        self.provider = provider
        self.batch_id = batch_id
        self.cause = cause
        self.counts: Counter = Counter()
        self._rules: list[suppression.Rule] | None = None  # the tenant's active rules, loaded once

    def merge_chunk(self, records: Sequence[AlertRecord],
                    known_resources: Sequence[int | None] | None = None) -> list[int]:
        """Merge alerts; return their ids in record order.  ``known_resources`` gives each record's
        resource id when the caller knows it already (the gateway's detection rules), instead of
        resolving the records' host records."""
        conn, now = self.conn, utcnow()
        with_resource = [i for i, r in enumerate(records) if r.resource is not None]
        resource_ids: dict[int, int] = {}
        if known_resources is not None:
            resource_ids = {i: rid for i, rid in enumerate(known_resources) if rid is not None}
        elif with_resource:
            resolved = resource_identity.resolve_committed(
                conn, self.tenant_id, [records[i].resource for i in with_resource],
                [records[i].last_modified or records[i].created for i in with_resource],
                provider=self.provider, batch_id=self.batch_id, allow_merge=False).ids
            resource_ids = dict(zip(with_resource, resolved, strict=True))
        rows: dict[str, dict] = {}
        for index, record in enumerate(records):
            row = {
                "tenant_id": self.tenant_id, "provider": self.provider, "provider_id": record.provider_id,
                "resource_id": resource_ids.get(index), "title": record.title,
                "description": record.description, "severity": record.severity,
                "category": record.category, "provider_status": record.status,
                "recommended_actions": record.recommended_actions, "extra": record.extra,
                "created_date_time": record.created, "last_modified_date_time": record.last_modified,
                "provider_timestamp": record.provider_timestamp or record.last_modified or record.created or now,
                "incident_id": record.incident_id, "service_source": record.service_source,
                "detection_source": record.detection_source, "mitre_techniques": record.mitre_techniques,
                "first_activity_date_time": record.first_activity,
                "last_activity_date_time": record.last_activity,
                "evidence": record.evidence,
            }
            row["content_hash"] = hashlib.blake2b(msgspec.msgpack.encode(
                [row[name] for name in PROVIDER_FIELDS if name not in _TIMES]
                + [str(row[name]) for name in _TIMES]
            ), digest_size=16).hexdigest()
            row["_first_words"] = {"classification": record.classification,
                                   "determination": record.determination,
                                   "feedback": FEEDBACK_FOR_CLASSIFICATION.get(record.classification or "")}
            previous = rows.get(record.provider_id)
            if previous is None or row["provider_timestamp"] >= previous["provider_timestamp"]:
                rows[record.provider_id] = row
        pending = rows
        for _ in range(LOST_RACE_ROUNDS):
            inserts = self._merge_existing(pending, now)
            if not inserts:
                break
            # ON CONFLICT DO NOTHING: an alert a concurrent batch of the tenant inserted since it was
            # read is skipped (after that batch commits) and merged again as an update of that row.
            statement = insert_for(conn, alerts_t).on_conflict_do_nothing(
                index_elements=["tenant_id", "provider", "provider_id"])
            suppressed = self._suppress(inserts, now)
            new = conn.execute(statement.returning(alerts_t.c.id, alerts_t.c.provider_id), inserts).all()
            self.counts["created"] += len(new)
            if new:
                events = [self._event(alert_id, "new", now) for alert_id, _ in new]
                for alert_id, provider_id in new:
                    rule = suppressed.get(provider_id)
                    if rule is not None:
                        events.append(suppression.event(self.tenant_id, alert_id, rule, now,
                                                        actor=self.provider, batch_id=self.batch_id,
                                                        existing=False))
                        self.counts["suppressed"] += 1
                conn.execute(events_t.insert(), events)
            inserted = {provider_id for _, provider_id in new}
            pending = {row["provider_id"]: rows[row["provider_id"]] for row in inserts
                       if row["provider_id"] not in inserted}
            if not pending:
                break
        else:
            raise RuntimeError(f"{len(pending)} alerts kept losing their insert to concurrent batches")
        ids = {row.provider_id: row.id for row in conn.execute(keyed(
            conn, select(alerts_t.c.id, alerts_t.c.provider_id).where(
                alerts_t.c.tenant_id == self.tenant_id, alerts_t.c.provider == self.provider),
            (alerts_t.c.provider_id,), sorted(rows), unique=True))}
        return [ids[record.provider_id] for record in records]

    def _merge_existing(self, rows: dict[str, dict], now) -> list[dict]:
        """Update the stored alerts of ``rows`` (stale and unchanged ones are counted); return the
        rows of alerts not stored yet, to insert."""
        conn = self.conn
        # found by (tenant, provider, provider id) whatever the statistics, locked in id order
        existing = {row.provider_id: row for row in locked_by_key(
            conn,
            (alerts_t.c.id, alerts_t.c.provider_id, alerts_t.c.provider_timestamp, alerts_t.c.content_hash),
            (alerts_t.c.tenant_id == self.tenant_id, alerts_t.c.provider == self.provider),
            (alerts_t.c.provider_id,), sorted(rows), alerts_t.c.id)}
        inserts, changes, events = [], [], []
        for provider_id, row in rows.items():
            old = existing.get(provider_id)
            if old is None:
                inserts.append({k: v for k, v in row.items() if k != "_first_words"} | row["_first_words"]
                               | {"status": "newAlert", "comments": [], "tags": [], "created_at": now,
                                  "updated_at": now})
            elif row["provider_timestamp"] < old.provider_timestamp:
                self.counts["stale"] += 1
            elif row["content_hash"] == old.content_hash:
                self.counts["unchanged"] += 1
            else:
                changes.append({f"_{k}": row[k] for k in PROVIDER_FIELDS + ("provider_timestamp", "content_hash")}
                               | {"_id": old.id})
                events.append(self._event(old.id, "updated", now))
                self.counts["updated"] += 1
        if changes:
            # lastUpdateDateTime never moves back: a customer edit stamped it later than the push says
            stored = alerts_t.c.last_modified_date_time
            incoming = bindparam("_last_modified_date_time", type_=stored.type)
            conn.execute(
                update(alerts_t).where(alerts_t.c.id == bindparam("_id")).values(
                    {k: bindparam(f"_{k}") for k in PROVIDER_FIELDS + ("provider_timestamp", "content_hash")}
                    | {"updated_at": now,
                       "last_modified_date_time": case((stored.is_(None), incoming),
                                                       (incoming.is_(None), stored),
                                                       (incoming > stored, incoming), else_=stored)}),
                sorted(changes, key=lambda c: c["_id"]),
            )
        if events:
            conn.execute(events_t.insert(), events)
        return inserts

    def _suppress(self, inserts: list[dict], now) -> dict[str, suppression.Rule]:
        """Resolve the new alerts an active rule matches, in their insert rows (every row gets
        ``suppressed_by``: one INSERT statement takes rows of one shape); the rule of each."""
        if self._rules is None:
            self._rules = suppression.active_rules(self.conn, self.tenant_id, suppression.clock())
        found: dict[str, suppression.Rule] = {}
        identifiers = suppression.resource_identifiers(
            self.conn, self.tenant_id, (row["resource_id"] for row in inserts)) if self._rules else {}
        for row in inserts:
            rule = suppression.first_match(self._rules, row | {
                "resource_identifiers": identifiers.get(row["resource_id"], ())}) if self._rules else None
            row["suppressed_by"] = rule.id if rule else None
            row["closed_date_time"] = now if rule else None
            if rule is not None:
                row["status"] = "resolved"
                found[row["provider_id"]] = rule
        return found

    def _event(self, alert_id: int, event: str, now) -> dict:
        return {"tenant_id": self.tenant_id, "subject_type": "alert", "subject_id": alert_id, "event": event,
                "at": now, "cause": self.cause, "batch_id": self.batch_id, "actor": self.provider,
                "details": None}
