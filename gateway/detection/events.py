"""Security events: the merge of a batch's events, and the day partitions they live in.

A batch of events (``windows_events``, ``ocsf_events``) is merged like findings: in the batch's
transaction, once.  Each event's host is resolved to a resource by the identity rules of the merge
(gateway/merge/resources.py, without merging stored resources: an event is weak evidence), then
the chunk is one INSERT.  An event outside the stored window (older than the retention period,
or more than a day ahead) is rejected with that reason.

On PostgreSQL ``security_events`` is partitioned by day.  The partitions of the whole window
(retention days back, ``PARTITIONS_AHEAD`` ahead) are created by the beat (``maintain``) and, if
missing, before a batch's first insert on a connection of their own (creating a partition locks
the parent table, which the batch's transaction must not hold yet).  Retention drops whole
partitions; SQLite deletes old rows.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta

import msgspec
from sqlalchemy import delete
from sqlalchemy.engine import Connection, Engine

from connectors.model import SecurityEventRecord
from gateway.merge import resources as resource_identity
from gateway.merge.sql import insert_rows, is_postgres
from gateway.models import SecurityEvent, utcnow

log = logging.getLogger(__name__)

events_t = SecurityEvent.__table__
PARTITIONS_AHEAD = 3
COPY_EVENTS = (
    "COPY security_events (occurred_at, tenant_id, batch_id, provider, resource_id, kind, event_id, "
    "outcome, user_name, target, source_ip, remote_ip, domain, process, hash, raw, ingested_at) "
    "FROM STDIN"
)
PARTITION_LOCK = 7_316_016  # pg_advisory_lock key of partition creation and dropping
PARTITION = re.compile(r"\Asecurity_events_p(\d{8})\Z")
_ensured: set[tuple[str, date]] = set()  # (database url, day) whose partitions this process made


DEFAULT_RETENTION_DAYS = 31


def configured_retention_days() -> int:
    """``SECURITY_EVENT_RETENTION_DAYS`` of the running app (a worker's task), else the default."""
    from flask import current_app, has_app_context

    if has_app_context():
        return int(current_app.config.get("SECURITY_EVENT_RETENTION_DAYS") or DEFAULT_RETENTION_DAYS)
    return DEFAULT_RETENTION_DAYS


def window(now: datetime, retention_days: int) -> tuple[datetime, datetime]:
    """The stored event times: from the start of the oldest kept day to a day ahead of ``now``."""
    oldest = datetime.combine(now.date() - timedelta(days=retention_days - 1), time(), tzinfo=UTC)
    return oldest, now + timedelta(days=1)


def partition_name(day: date) -> str:
    return f"security_events_p{day:%Y%m%d}"


def ensure_partitions(engine: Engine, now: datetime, retention_days: int) -> list[str]:
    """Create the missing day partitions of the stored window (PostgreSQL); their names."""
    if engine.dialect.name != "postgresql":
        return []
    key = (str(engine.url), now.date())
    if key in _ensured:
        return []
    oldest, _ = window(now, retention_days)
    days = [oldest.date() + timedelta(days=n) for n in range(retention_days + PARTITIONS_AHEAD)]
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # one creator at a time (a session lock, held for the few statements below): two workers'
        # first batches of a day would otherwise both see a partition missing and race to create it
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({PARTITION_LOCK})")
        try:
            existing = set(
                conn.exec_driver_sql(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "WHERE i.inhparent = 'security_events'::regclass"
                ).scalars()
            )
            made = []
            for day in days:
                name = partition_name(day)
                if name in existing:
                    continue
                conn.exec_driver_sql(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF security_events "
                    f"FOR VALUES FROM ('{day.isoformat()} 00:00:00+00') "
                    f"TO ('{(day + timedelta(days=1)).isoformat()} 00:00:00+00')"
                )
                made.append(name)
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({PARTITION_LOCK})")
    _ensured.add(key)
    if made:
        log.info("created security event partitions %s", ", ".join(made))
    return made


def drop_expired(engine: Engine, now: datetime, retention_days: int) -> list[str]:
    """Drop the day partitions older than the retention period (PostgreSQL), or delete the old
    rows (SQLite); the names of the dropped partitions."""
    oldest, _ = window(now, retention_days)
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            conn.execute(delete(events_t).where(events_t.c.occurred_at < oldest))
        return []
    dropped = []
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        names = (
            conn.exec_driver_sql(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "WHERE i.inhparent = 'security_events'::regclass"
            )
            .scalars()
            .all()
        )
        conn.exec_driver_sql(f"SELECT pg_advisory_lock({PARTITION_LOCK})")
        try:
            for name in sorted(names):
                match = PARTITION.match(name)
                if match and datetime.strptime(match.group(1), "%Y%m%d").date() < oldest.date():
                    conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
                    dropped.append(name)
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({PARTITION_LOCK})")
    if dropped:
        log.info("dropped expired security event partitions %s", ", ".join(dropped))
    return dropped


def maintain(engine: Engine, retention_days: int, now: datetime | None = None) -> dict:
    """The beat's work: partitions ahead, expired days dropped."""
    now = now or utcnow()
    _ensured.discard((str(engine.url), now.date()))  # look again: someone may have dropped one
    return {
        "created": ensure_partitions(engine, now, retention_days),
        "dropped": drop_expired(engine, now, retention_days),
    }


class EventMerger:
    """Inserts a batch's security events, chunk by chunk, in the batch's transaction."""

    def __init__(
        self,
        conn: Connection,
        tenant_id: int,
        provider: str,
        batch_id: int,
        retention_days: int,
        now: datetime | None = None,
    ) -> None:
        self.conn, self.tenant_id, self.provider, self.batch_id = conn, tenant_id, provider, batch_id
        self.now = now or utcnow()
        self.retention_days = retention_days
        self.oldest, self.newest = window(self.now, retention_days)
        self.counts: Counter = Counter()
        self._identity_cache: dict = {}
        self._resolved: dict[bytes, int] = {}  # host record (msgpack of its ResourceRef) -> resource id
        self._ready = False

    def outside(self, record: SecurityEventRecord) -> str | None:
        """Why the event is not stored (its time is outside the kept window), or None."""
        if record.occurred_at < self.oldest:
            return (
                f"the event time {record.occurred_at.isoformat()} is older than the retention period "
                f"({self.retention_days} days)"
            )
        if record.occurred_at >= self.newest:
            return f"the event time {record.occurred_at.isoformat()} is more than a day ahead"
        return None

    def merge_chunk(self, records: Sequence[SecurityEventRecord]) -> None:
        if not records:
            return
        conn = self.conn
        if not self._ready and is_postgres(conn):
            ensure_partitions(conn.engine, self.now, self.retention_days)
        self._ready = True
        # A batch names the same hosts in every chunk: each host record is resolved once per batch
        # (its first chunk), later chunks reuse the id (an event is not evidence that moves identity).
        keys = [msgspec.msgpack.encode(r.resource) if r.resource is not None else None for r in records]
        latest: dict[bytes, datetime] = {}  # each new host record's last event in the chunk
        for record, key in zip(records, keys, strict=True):
            if key is not None and key not in self._resolved:
                seen = latest.get(key)
                latest[key] = record.occurred_at if seen is None or record.occurred_at > seen else seen
        unknown = sorted({key: i for i, key in enumerate(keys) if key in latest}.values())
        if unknown:
            resolved = resource_identity.resolve_committed(
                conn,
                self.tenant_id,
                [records[i].resource for i in unknown],
                [latest[keys[i]] for i in unknown],
                provider=self.provider,
                batch_id=self.batch_id,
                allow_merge=False,
                cache=self._identity_cache,
            ).ids
            self._resolved.update({keys[i]: rid for i, rid in zip(unknown, resolved, strict=True)})
        resource_ids = {i: self._resolved[key] for i, key in enumerate(keys) if key is not None}
        if is_postgres(conn):
            self._copy(records, resource_ids)
        else:
            rows = [
                {
                    "occurred_at": r.occurred_at,
                    "resource_id": resource_ids.get(i),
                    "kind": r.kind,
                    "event_id": r.event_id,
                    "outcome": r.outcome,
                    "user_name": r.user,
                    "target": r.target,
                    "source_ip": r.source_ip,
                    "remote_ip": r.remote_ip,
                    "domain": r.domain,
                    "process": r.process,
                    "hash": r.hash,
                    "raw": r.raw if r.raw_json is None else msgspec.json.decode(r.raw_json),
                }
                for i, r in enumerate(records)
            ]
            insert_rows(
                conn,
                events_t,
                rows,
                constants={
                    "tenant_id": self.tenant_id,
                    "batch_id": self.batch_id,
                    "provider": self.provider,
                    "ingested_at": self.now,
                },
            )
        self.counts["created"] += len(records)

    def _copy(self, records: Sequence[SecurityEventRecord], resource_ids: dict[int, int]) -> None:
        """The chunk by ``COPY ... FROM STDIN`` on the batch's own connection (in its transaction)."""
        encode = msgspec.json.encode
        tenant, batch, provider, now = self.tenant_id, self.batch_id, self.provider, self.now
        driver = self.conn.connection.driver_connection
        with driver.cursor() as cursor, cursor.copy(COPY_EVENTS) as copy:
            for i, r in enumerate(records):
                copy.write_row(
                    (
                        r.occurred_at,
                        tenant,
                        batch,
                        provider,
                        resource_ids.get(i),
                        r.kind,
                        r.event_id,
                        r.outcome,
                        r.user,
                        r.target,
                        r.source_ip,
                        r.remote_ip,
                        r.domain,
                        r.process,
                        r.hash,
                        r.raw_json if r.raw is None else encode(r.raw).decode(),
                        now,
                    )
                )
