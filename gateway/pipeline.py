"""Process one accepted batch: parse its stored bytes, merge, record status and counts.

The whole merge of a batch runs in one database transaction, so a batch is merged
once or not at all: a worker killed mid-merge leaves nothing behind and the batch is
merged again from its stored bytes (DESIGN rule 1); a redelivered task finds the
batch finished and does nothing (rule 2).  Resources are resolved under a per-tenant
lock so concurrent batches agree on them.
"""

from __future__ import annotations

import gc
import io
import logging
import queue
import threading
from collections.abc import Iterator
from itertools import islice

from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError

import connectors
from connectors.base import ParseOptions
from connectors.model import AlertRecord, FindingRecord, FormatError, Rejected, VulnerabilityInfo
from gateway.db import Database
from gateway.merge.findings import FindingMerger
from gateway.models import Batch, BatchBlob, OAuthClient, utcnow

log = logging.getLogger(__name__)

batches = Batch.__table__
blobs = BatchBlob.__table__
clients = OAuthClient.__table__
ALERT_SCOPE_REASON = "an alert record needs a client with the alerts.write scope"

TERMINAL = ("succeeded", "partiallySucceeded", "failed")
OPEN_STATUSES = ("accepted", "processing")
COUNT_KEYS = ("received", "created", "updated", "unchanged", "stale", "resolved", "rejected")


class TransientError(Exception):
    """The merge hit a deadlock or lost its connection: try the batch again later."""


class BlobReader(io.RawIOBase):
    """A readable stream over a batch's stored pieces, fetched one at a time."""

    def __init__(self, conn: Connection, batch_id: int) -> None:
        self.conn = conn
        self.batch_id = batch_id
        self.seq = 0
        self.buffer = memoryview(b"")
        self.done = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        data = self.conn.execute(
            select(blobs.c.data).where(blobs.c.batch_id == self.batch_id, blobs.c.seq == self.seq)
        ).scalar()
        if data is None:
            self.done = True
            self.buffer = memoryview(b"")
        else:
            self.seq += 1
            self.buffer = memoryview(bytes(data))

    def readinto(self, target) -> int:  # type: ignore[override]
        while not self.buffer and not self.done:
            self._fill()
        n = min(len(target), len(self.buffer))
        target[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while True:
                chunk = self.read(1 << 20)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
        while not self.buffer and not self.done:
            self._fill()
        chunk = bytes(self.buffer[:size])
        self.buffer = self.buffer[size:]
        return chunk


def _chunks(records: Iterator, size: int) -> Iterator[list]:
    while True:
        chunk = list(islice(records, size))
        if not chunk:
            return
        yield chunk


def _parsed_chunks(engine, batch_id: int, connector, options: ParseOptions, size: int) -> Iterator[list]:
    """The batch's records in chunks, parsed by a thread of their own one chunk ahead.

    Parsing is CPU work and merging mostly waits for the database, so the next chunk is
    parsed while the current one is written.  The parser reads the stored bytes on a
    connection of its own (they were committed before the batch was enqueued); its
    errors (``FormatError``) are raised here, in the merging thread.
    """
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with engine.connect() as reader:
                for chunk in _chunks(connector.parse(BlobReader(reader, batch_id), options), size):
                    if not put(("chunk", chunk)):
                        return
            put(("end", None))
        except BaseException as exc:  # handed to the merging thread
            put(("error", exc))

    thread = threading.Thread(target=produce, name=f"parse-batch-{batch_id}", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == "chunk":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join(timeout=30)


def process_batch(db: Database, batch_id: int, chunk_size: int = 5000, max_rejections: int = 1000) -> str:
    """Merge a batch once; return its final status (or its status if already final)."""
    with db.engine.begin() as conn:
        batch = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
        if batch is None:
            log.warning("batch %s does not exist", batch_id)
            return "missing"
        if batch.status in TERMINAL:
            return batch.status
        conn.execute(
            update(batches).where(batches.c.id == batch_id)
            .values(status="processing", attempts=batches.c.attempts + 1, started_at=utcnow())
        )
    collecting = gc.isenabled()
    # A merge allocates millions of short-lived objects and no long-lived cycles: the cyclic
    # collector would only rescan them (a tenth of the merge's time); it runs after the batch.
    gc.disable()
    try:
        with db.engine.begin() as conn:
            query = select(batches).where(batches.c.id == batch_id)
            if db.is_postgres:
                query = query.with_for_update()
            batch = conn.execute(query).first()
            if batch.status in TERMINAL:  # another worker finished it while we waited
                return batch.status
            return _merge(conn, batch, chunk_size, max_rejections)
    except FormatError as exc:
        with db.engine.begin() as conn:
            counts = dict.fromkeys(COUNT_KEYS, 0)
            conn.execute(
                update(batches).where(batches.c.id == batch_id)
                .values(status="failed", error=str(exc)[:2000], counts=counts, rejections=[],
                        finished_at=utcnow())
            )
        log.info("batch %s failed: %s", batch_id, exc)
        return "failed"
    except (OperationalError, DBAPIError) as exc:
        if getattr(exc, "connection_invalidated", False) or _is_transient(exc):
            raise TransientError(str(exc.orig if hasattr(exc, "orig") else exc)) from exc
        raise
    finally:
        if collecting:
            gc.enable()


def _is_transient(exc: DBAPIError) -> bool:
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    # deadlock, serialization failure, lock not available; and a unique violation, which in a
    # merge can only be a concurrent batch that inserted the same row first (e.g. a KB
    # back-fill re-keying a finding another batch just created): the retry sees that row.
    if sqlstate in ("40P01", "40001", "55P03", "23505"):
        return True
    return "database is locked" in str(exc)


def _merge(conn: Connection, batch, chunk_size: int, max_rejections: int) -> str:
    connector = connectors.get(batch.format)
    options = ParseOptions(provider=batch.provider, received_at=batch.received_at)
    cause = f"batch {batch.id}"
    finding_merger = FindingMerger(conn, batch.tenant_id, batch.provider, batch.id, batch.received_at, cause)
    from gateway.merge.alerts import AlertMerger
    from gateway.merge.knowledge import KnowledgeMerger

    alert_merger = AlertMerger(conn, batch.tenant_id, batch.provider, batch.id, cause)
    knowledge_merger = KnowledgeMerger(conn, batch.tenant_id, batch.provider, batch.id)
    received = rejected = 0
    rejections: list[dict] = []
    # Alerts need alerts.write: a findings format that carries some (OCSF Detection findings)
    # lands them only for a client registered with that scope.
    client_scopes = conn.execute(select(clients.c.scope).where(clients.c.id == batch.client_pk)).scalar() or ""
    may_push_alerts = connector.RECORD_KIND == "alerts" or "alerts.write" in client_scopes.split()
    if conn.dialect.name == "postgresql":
        chunks = _parsed_chunks(conn.engine, batch.id, connector, options, chunk_size)
    else:  # SQLite: a second connection would wait for this transaction's lock
        chunks = _chunks(connector.parse(BlobReader(conn, batch.id), options), chunk_size)
    for chunk in chunks:
        findings, alerts, knowledge = [], [], []
        for record in chunk:
            received += 1
            if isinstance(record, FindingRecord):
                findings.append(record)
            elif isinstance(record, AlertRecord):
                if may_push_alerts:
                    alerts.append(record)
                else:  # a findings format that also carries alerts (OCSF detections)
                    rejected += 1
                    if len(rejections) < max_rejections:
                        rejections.append({"position": f"record {received - 1}", "reason": ALERT_SCOPE_REASON,
                                           "providerId": record.provider_id})
            elif isinstance(record, VulnerabilityInfo):
                knowledge.append(record)
            elif isinstance(record, Rejected):
                rejected += 1
                if len(rejections) < max_rejections:
                    rejections.append({"position": record.position, "reason": record.reason,
                                       "providerId": record.provider_id})
        if knowledge:
            knowledge_merger.merge_chunk(knowledge)
        if findings:
            finding_merger.merge_chunk(knowledge_merger.enrich(findings))
        if alerts:
            alert_merger.merge_chunk(alerts)
    if batch.scan_type == "full":
        finding_merger.resolve_unreported()
    finding_merger.update_recommendations()

    counts = dict.fromkeys(COUNT_KEYS, 0)
    for merger_counts in (finding_merger.counts, alert_merger.counts, knowledge_merger.counts):
        for key, value in merger_counts.items():
            counts[key] = counts.get(key, 0) + value
    counts["received"] = received
    counts["rejected"] = rejected
    if received and rejected == received:
        status = "failed"
    elif rejected:
        status = "partiallySucceeded"
    else:
        status = "succeeded"
    conn.execute(
        update(batches).where(batches.c.id == batch.id).values(
            status=status, counts=counts, rejections=rejections, finished_at=utcnow(),
            error="every record was rejected" if status == "failed" else None,
        )
    )
    return status
