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
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import islice

import msgspec
from sqlalchemy import or_, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, DBAPIError

import connectors
from connectors.base import ParseOptions
from connectors.model import (
    AlertRecord,
    FindingRecord,
    FormatError,
    IndicatorRecord,
    Observation,
    Rejected,
    SecurityEventRecord,
    VulnerabilityInfo,
)
from gateway.db import Database, binary_cursor
from gateway.errors import is_unavailable
from gateway.export import events as outbox
from gateway.merge.findings import FindingMerger
from gateway.merge.sql import insert_rows
from gateway.models import Batch, BatchBlob, BatchRejection, OAuthClient, utcnow
from gateway.statistics import analyze_in_background

log = logging.getLogger(__name__)

batches = Batch.__table__
blobs = BatchBlob.__table__
rejections_t = BatchRejection.__table__
clients = OAuthClient.__table__
ALERT_SCOPE_REASON = "an alert record needs a client with the alerts.write scope"

TERMINAL = ("succeeded", "partiallySucceeded", "failed")
OPEN_STATUSES = ("accepted", "processing")
COUNT_KEYS = ("received", "created", "updated", "unchanged", "stale", "resolved", "rejected", "observations",
              "duplicatesInPush", "resourcesMerged", "suppressed")


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
        if self.conn.dialect.name == "postgresql":
            # In binary, as the staged merge's reads (merge/parallel.py): no hex text.
            with binary_cursor(self.conn) as cursor:
                cursor.execute(f"SELECT data FROM {blobs.name} WHERE batch_id = %s AND seq = %s",
                               (self.batch_id, self.seq))
                row = cursor.fetchone()
            data = None if row is None else row[0]
        else:
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


# Characters a PostgreSQL text or JSONB value cannot hold: NUL, and UTF-16 surrogates that
# are not part of a pair (a lone surrogate cannot be encoded as UTF-8).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str | None) -> str | None:
    """``value`` with the characters the store refuses replaced by U+FFFD (for messages we write)."""
    if value is None:
        return None
    return _UNSTORABLE.sub("\ufffd", str(value))


def unstorable_text(record) -> str | None:
    """Why ``record`` cannot be stored as it is (a text with NUL or a lone surrogate), or None.

    Checked on every record before the store sees it, so one bad record is rejected with its
    reason and the rest of its batch lands (DESIGN rule 7).  The common case costs one
    msgspec encode; the field is named only for a record that fails.
    """
    try:
        if b"\\u0000" not in msgspec.json.encode(record):
            return None
    except UnicodeEncodeError:
        pass
    path = _bad_path(msgspec.to_builtins(record, str_keys=True, builtin_types=(datetime,)), "$")
    if path is None:  # an escaped backslash followed by "u0000": ordinary text
        return None
    return (f"{path} contains a character the store cannot hold "
            "(NUL, U+0000, or an unpaired UTF-16 surrogate)")


def _bad_path(value, path: str) -> str | None:
    if isinstance(value, str):
        return path if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _UNSTORABLE.search(key):
                return f"{path} (a key)"
            found = _bad_path(item, f"{path}.{key}")
            if found:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _bad_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


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


INLINE_PARSE_BYTES = 64 * 1024  # bodies this small are parsed in the merging thread


class LeaseLost(Exception):
    """Another worker took the batch over (this one's lease expired): its merge is dropped."""


def process_batch(db: Database, batch_id: int, chunk_size: int = 5000, max_rejections: int = 1000, *,
                  owner: str | None = None, max_attempts: int = 5, lease_seconds: int = 60,
                  analyze_after_rows: int = 50_000, analyze_after_growth: float = 0.1,
                  parallel=None) -> str:
    """Merge a batch once; return its final status, or ``"busy"`` if another worker holds it.

    ``owner`` names this merge's lease: a retry of the same task passes the same owner so it
    takes its own lease back at once.  A database error that may pass (lost connection,
    deadlock, a locked SQLite file) raises :class:`TransientError` from every step, the claim
    included; any other error ends the batch ``failed`` with the error recorded, and so does
    a batch claimed ``max_attempts`` times without finishing.  After a merge that landed, the
    tables the merges grew are analyzed when due (:func:`analyze_if_due`).

    ``parallel`` (:class:`gateway.merge.parallel.Settings`): a batch at least that big is staged
    in chunks that several workers merge (gateway/merge/parallel.py) when enough merge slots are
    live to take them (``Settings.applies``; one slot merges it whole, faster), and a batch whose
    staging began always resumes staged; this returns ``processing`` once its chunks are sent, or
    its final status if they were all merged.
    """
    owner = owner or uuid.uuid4().hex
    try:
        claimed = _claim(db, batch_id, owner, max_attempts, lease_seconds)
        if claimed is not None:
            return claimed
    except DBAPIError as exc:
        _raise_if_transient(exc)
        raise
    if parallel is not None and db.is_postgres:
        try:
            with db.engine.connect() as conn:
                body_size, plan = conn.execute(select(batches.c.body_size, batches.c.merge_plan)
                                               .where(batches.c.id == batch_id)).one()
            # A batch whose staging began (its plan stored) resumes staged whatever the size
            # threshold or the live merge slots say by now: chunks of it may be merged already.
            if plan or parallel.applies(db, body_size):
                from gateway.merge import parallel as parallel_merge

                status = parallel_merge.coordinate(db, batch_id, owner, parallel)
                if status not in ("processing", "failed"):
                    analyze_in_background(db, analyze_after_rows, analyze_after_growth, batch_id)
                return status
        except DBAPIError as exc:
            if _transient(exc):
                _release(db, batch_id, owner)
                raise TransientError(_describe(exc)) from exc
            return _fail_unexpected(db, batch_id, owner, exc)
    collecting = gc.isenabled()
    # A merge allocates millions of short-lived objects and no long-lived cycles: the cyclic
    # collector would only rescan them (a tenth of the merge's time); it runs after the batch.
    gc.disable()
    heartbeat = Heartbeat(db, batch_id, owner, lease_seconds) if db.is_postgres else None
    try:
        with db.engine.begin() as conn:
            batch = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
            status = _merge(conn, batch, chunk_size, max_rejections, owner)
    except FormatError as exc:
        _finish_failed(db, batch_id, owner, clean_text(str(exc))[:2000])
        log.info("batch %s failed: %s", batch_id, exc)
        return "failed"
    except LeaseLost:
        log.warning("batch %s: lease lost to another worker, this merge was rolled back", batch_id)
        return "busy"
    except DBAPIError as exc:
        if _transient(exc):
            _release(db, batch_id, owner)
            raise TransientError(_describe(exc)) from exc
        return _fail_unexpected(db, batch_id, owner, exc)
    except Exception as exc:  # a defect or a record the checks missed: the batch fails, visibly
        return _fail_unexpected(db, batch_id, owner, exc)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if collecting:
            gc.enable()
    if status != "failed":  # in a thread of its own: the next batch never waits for it
        analyze_in_background(db, analyze_after_rows, analyze_after_growth, batch_id)
    return status


# The tables a merge writes, and the fewest changed rows that make one worth analyzing.
ANALYZED_TABLES = ("findings", "finding_sources", "lifecycle_events", "resources", "resource_identifiers",
                   "resource_sources", "recommendations", "observations", "alerts")
ANALYZE_MIN_ROWS = 1000
# Tables whose counts are index-only scans (``$count`` of findings, of ``sources/any()``): VACUUM
# (ANALYZE) marks their pages all-visible, so the scan reads no heap page (after a 1M push, none
# are until autovacuum comes, if it is on).
VACUUMED_TABLES = ("findings", "finding_sources")


def analyze_if_due(db: Database, after_rows: int, after_growth: float,
                   batch_id: int | None = None) -> list[str]:
    """ANALYZE the merged tables that changed enough since their last ANALYZE; their names.

    PostgreSQL plans from the statistics ANALYZE leaves (rows per tenant, per provider...).
    A store whose autovacuum is off never gets them, and even with autovacuum a table of 100M
    rows waits for 10M changed rows: a tenant created since then is a guess of 0.5% of each
    table, which sends ``$count`` and pages with ``any()`` filters down plans that read all of
    a big tenant's rows.  So after each merge that landed, a table is analyzed once the rows
    changed since its last ANALYZE (``pg_stat_user_tables.n_mod_since_analyze``, every
    batch's together) reach ``after_rows``, or ``after_growth`` of the table's rows when that
    is less (at least ``ANALYZE_MIN_ROWS``).  Outside the merge's transaction (it has
    committed), each table in a transaction of its own, skipping a table another session is
    analyzing or vacuuming; a failure is logged, never the batch's.  ``VACUUMED_TABLES`` get
    ``VACUUM (ANALYZE)``.  A worker runs it in a thread of its own (gateway/statistics.py).  (The merge's own lookups
    do not depend on statistics: gateway/merge/sql.py ``keyed``.)
    """
    if not db.is_postgres or after_rows <= 0:
        return []
    try:
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            changed, due = _due(conn, after_rows, after_growth)
            if due:
                started = time.perf_counter()
                vacuumed = [name for name in due if name in VACUUMED_TABLES]
                if vacuumed:
                    conn.exec_driver_sql(f"VACUUM (ANALYZE, SKIP_LOCKED) {', '.join(vacuumed)}")
                if len(vacuumed) < len(due):
                    conn.exec_driver_sql(
                        f"ANALYZE (SKIP_LOCKED) {', '.join(name for name in due if name not in vacuumed)}")
                log.info("analyzed %s after batch %s in %.1fs (rows changed since their last analyze: %s)",
                         ", ".join(due), batch_id, time.perf_counter() - started,
                         ", ".join(f"{name} {modified}" for name, modified, _ in changed if name in due))
            return due
    except Exception as exc:  # noqa: BLE001 - statistics are advisory: the batch has landed
        log.warning("tables not analyzed after batch %s: %s", batch_id, exc)
        return []


def _due(conn: Connection, after_rows: int, after_growth: float) -> tuple[list, list[str]]:
    """(every merged table's changed rows, the names of those due for ANALYZE)."""
    changed = conn.execute(text(
        "SELECT s.relname, s.n_mod_since_analyze, greatest(c.reltuples, 0) "
        "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
        "WHERE s.relname = ANY(:names) ORDER BY s.relname"),
        {"names": list(ANALYZED_TABLES)}).all()
    return changed, [name for name, modified, size in changed
                     if modified >= min(after_rows, max(ANALYZE_MIN_ROWS, after_growth * size))]


def analysis_due(db: Database, after_rows: int, after_growth: float) -> bool:
    """Whether a merged table is due for ANALYZE (one quick read of the statistics views)."""
    if not db.is_postgres or after_rows <= 0:
        return False
    try:
        with db.engine.connect() as conn:
            return bool(_due(conn, after_rows, after_growth)[1])
    except Exception:  # noqa: BLE001 - statistics are advisory: the batch has landed
        log.warning("could not read the tables' changed rows", exc_info=True)
        return False


def _claim(db: Database, batch_id: int, owner: str, max_attempts: int, lease_seconds: int) -> str | None:
    """Take the batch's lease; ``None`` when taken, else the status to return.

    Only an open batch (``accepted``/``processing``) whose lease is free, expired or already
    this owner's is claimed; a terminal batch is never moved.  Nothing here waits on a row
    lock: the merge itself holds none on the batch row until its last statement.
    """
    now = utcnow()
    with db.engine.begin() as conn:
        batch = conn.execute(
            select(batches.c.status, batches.c.attempts, batches.c.lease_owner, batches.c.lease_expires_at,
                   batches.c.error).where(batches.c.id == batch_id)
        ).first()
        if batch is None:
            log.warning("batch %s does not exist", batch_id)
            return "missing"
        if batch.status in TERMINAL:
            return batch.status
        if batch.lease_owner not in (None, owner) and batch.lease_expires_at and batch.lease_expires_at > now:
            return "busy"
        if batch.attempts >= max_attempts:
            error = f"gave up after {batch.attempts} merge attempts"
            if batch.error:
                error += f"; the last one: {batch.error}"
            ended = conn.execute(
                update(batches).where(batches.c.id == batch_id, batches.c.status.in_(OPEN_STATUSES))
                .values(status="failed", error=error[:2000], counts=dict.fromkeys(COUNT_KEYS, 0),
                        rejections=[], finished_at=now, lease_owner=None, lease_expires_at=None)
                .returning(batches.c.tenant_id, batches.c.provider)
            ).first()
            if ended is not None:
                outbox.batch_finished(conn, ended.tenant_id, batch_id, "failed", dict.fromkeys(COUNT_KEYS, 0),
                                      ended.provider, error)
            log.error("batch %s failed: %s", batch_id, error)
            return "failed"
        claimed = conn.execute(
            update(batches).where(
                batches.c.id == batch_id, batches.c.status.in_(OPEN_STATUSES),
                or_(batches.c.lease_owner.is_(None), batches.c.lease_owner == owner,
                    batches.c.lease_expires_at.is_(None), batches.c.lease_expires_at <= now),
            ).values(status="processing", attempts=batches.c.attempts + 1, started_at=now,
                     progress={"chunks": 0, "recordsParsed": 0, "recordsMerged": 0, "recordsRejected": 0,
                               "done": False, "updatedAt": now.isoformat()},
                     lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
        ).rowcount
        return None if claimed else "busy"


class Heartbeat:
    """Renews a merge's lease from a thread of its own while the merge runs (PostgreSQL).

    On SQLite the merge holds the database's write lock for its whole transaction, so no
    other worker can claim the batch meanwhile and no renewal is needed (nor possible).
    """

    def __init__(self, db: Database, batch_id: int, owner: str, lease_seconds: int) -> None:
        self.db, self.batch_id, self.owner, self.lease_seconds = db, batch_id, owner, lease_seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lease-batch-{batch_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        interval = max(0.2, self.lease_seconds / 3)
        while not self.stopped.wait(interval):
            try:
                with self.db.engine.begin() as conn:
                    conn.execute(
                        update(batches).where(batches.c.id == self.batch_id, batches.c.lease_owner == self.owner,
                                              batches.c.status == "processing")
                        .values(lease_expires_at=utcnow() + timedelta(seconds=self.lease_seconds))
                    )
            except Exception as exc:  # the merge sees the same trouble and decides
                log.warning("batch %s: lease not renewed: %s", self.batch_id, exc)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)


def _finish_failed(db: Database, batch_id: int, owner: str, error: str) -> None:
    with db.engine.begin() as conn:
        ended = conn.execute(
            update(batches).where(batches.c.id == batch_id, batches.c.status.in_(OPEN_STATUSES),
                                  or_(batches.c.lease_owner.is_(None), batches.c.lease_owner == owner))
            .values(status="failed", error=error, counts=dict.fromkeys(COUNT_KEYS, 0), rejections=[],
                    finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
            .returning(batches.c.tenant_id, batches.c.provider)
        ).first()
        if ended is not None:
            outbox.batch_finished(conn, ended.tenant_id, batch_id, "failed", dict.fromkeys(COUNT_KEYS, 0),
                                  ended.provider, error)


def _fail_unexpected(db: Database, batch_id: int, owner: str, exc: Exception) -> str:
    """End the batch ``failed`` after an error that retrying would only repeat."""
    reference = uuid.uuid4().hex[:12]
    log.error("batch %s failed with an unexpected error (reference %s)", batch_id, reference, exc_info=exc)
    kind = "a value the store refused" if isinstance(exc, DataError) else "an internal error"
    try:
        _finish_failed(db, batch_id, owner, f"the merge stopped on {kind} (reference {reference}); "
                                            "the batch's stored bytes are kept")
    except DBAPIError as again:
        _raise_if_transient(again)
        raise
    return "failed"


def _release(db: Database, batch_id: int, owner: str) -> None:
    """Give the lease up after a transient error (best effort: it expires anyway)."""
    try:
        with db.engine.begin() as conn:
            conn.execute(update(batches).where(batches.c.id == batch_id, batches.c.lease_owner == owner,
                                               batches.c.status.in_(OPEN_STATUSES))
                         .values(lease_expires_at=utcnow()))
    except Exception:  # noqa: BLE001 - the database may be the thing that is down
        pass


def _describe(exc: DBAPIError) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:500]


def _raise_if_transient(exc: DBAPIError) -> None:
    if _transient(exc):
        raise TransientError(_describe(exc)) from exc


def _transient(exc: DBAPIError) -> bool:
    """Worth retrying: the store was unreachable, or the statement lost a race (see below)."""
    return is_unavailable(exc) or _is_transient(exc)


def _is_transient(exc: DBAPIError) -> bool:
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    # deadlock, serialization failure, lock not available; and a unique violation, which in a
    # merge can only be a concurrent batch that inserted the same row first (e.g. a KB
    # back-fill re-keying a finding another batch just created): the retry sees that row.
    if sqlstate in ("40P01", "40001", "55P03", "23505"):
        return True
    return "database is locked" in str(exc)


def _progress(chunks: int, parsed: int, rejected: int, done: bool) -> dict:
    return {"chunks": chunks, "recordsParsed": parsed, "recordsMerged": parsed - rejected,
            "recordsRejected": rejected, "done": done, "updatedAt": utcnow().isoformat()}


def _write_progress(engine, batch_id: int, owner: str, progress: dict) -> None:
    """Record a merge's progress in a short transaction of its own (PostgreSQL).

    The merge's own transaction is invisible until it commits, so progress is written beside
    it: the update takes no lock the merge holds (the merge locks the batch row only in its
    last statement; its rejection rows take a key-share lock, which a non-key update does not
    wait for).  On SQLite the merge holds the only write lock, so progress is kept in memory
    and written with the final status.  A failed write is only logged: progress is advisory.
    """
    try:
        with engine.begin() as other:
            other.execute(update(batches).where(batches.c.id == batch_id, batches.c.lease_owner == owner,
                                                batches.c.status == "processing").values(progress=progress))
    except Exception as exc:  # noqa: BLE001 - the merge sees real trouble itself
        log.warning("batch %s: progress not recorded: %s", batch_id, exc)


def _merge(conn: Connection, batch, chunk_size: int, max_rejections: int, owner: str) -> str:
    connector = connectors.get(batch.format)
    options = ParseOptions(provider=batch.provider, received_at=batch.received_at)
    cause = f"batch {batch.id}"
    finding_merger = FindingMerger(conn, batch.tenant_id, batch.provider, batch.id, batch.received_at, cause,
                                   product=getattr(connector, "PRODUCT", None), format=batch.format)
    from gateway.merge.alerts import AlertMerger
    from gateway.merge.knowledge import KnowledgeMerger

    alert_merger = AlertMerger(conn, batch.tenant_id, batch.provider, batch.id, cause)
    knowledge_merger = KnowledgeMerger(conn, batch.tenant_id, batch.provider, batch.id)
    from gateway.intel import matching as intel_matching
    from gateway.intel.merge import IndicatorMerger

    indicator_merger = IndicatorMerger(conn, batch.tenant_id, batch.provider, batch.format, batch.id, cause)
    event_merger = None
    if connector.RECORD_KIND == "events":  # host security events (gateway/detection/events.py)
        from gateway.detection.events import EventMerger, configured_retention_days

        event_merger = EventMerger(conn, batch.tenant_id, batch.provider, batch.id,
                                   configured_retention_days())
    received = rejected = chunk_count = 0
    event_span: tuple = ()  # the first and last time of the events stored (matched with indicators at the end)
    rejections: list[dict] = []  # the first ``max_rejections``, embedded in the batch's answer
    chunk_rejections: list[dict] = []  # every one, written to batch_rejections once per chunk

    def reject(position, reason, provider_id) -> None:
        nonlocal rejected
        entry = {"position": clean_text(position), "reason": clean_text(reason),
                 "providerId": clean_text(provider_id)}
        chunk_rejections.append({"seq": rejected, "position": entry["position"],
                                 "reason": entry["reason"] or "", "provider_id": entry["providerId"]})
        rejected += 1
        if len(rejections) < max_rejections:
            rejections.append(entry)

    # Alerts need alerts.write: a findings format that carries some (OCSF Detection findings)
    # lands them only for a client registered with that scope.
    client_scopes = conn.execute(select(clients.c.scope).where(clients.c.id == batch.client_pk)).scalar() or ""
    may_push_alerts = connector.RECORD_KIND == "alerts" or "alerts.write" in client_scopes.split()
    # A small body (issue 14: many small pushes) is parsed inline and reports no progress before
    # its end: a parse thread, its connection and a progress transaction would cost more than it.
    ahead = conn.dialect.name == "postgresql" and (batch.body_size or 0) > INLINE_PARSE_BYTES
    if ahead:
        chunks = _parsed_chunks(conn.engine, batch.id, connector, options, chunk_size)
    else:  # SQLite: a second connection would wait for this transaction's lock
        chunks = _chunks(connector.parse(BlobReader(conn, batch.id), options), chunk_size)
    for chunk in chunks:
        findings, alerts, knowledge, observations, indicators, events = [], [], [], [], [], []
        for record in chunk:
            received += 1
            if not isinstance(record, Rejected):
                problem = unstorable_text(record)
                if problem:
                    reject(f"record {received - 1}", problem,
                           getattr(record, "provider_id", None) or getattr(record, "vendor_id", None))
                    continue
            if isinstance(record, FindingRecord):
                findings.append(record)
            elif isinstance(record, Observation):
                observations.append(record)
            elif isinstance(record, AlertRecord):
                if may_push_alerts:
                    alerts.append(record)
                else:  # a findings format that also carries alerts (OCSF detections)
                    reject(f"record {received - 1}", ALERT_SCOPE_REASON, record.provider_id)
            elif isinstance(record, VulnerabilityInfo):
                knowledge.append(record)
            elif isinstance(record, IndicatorRecord):
                indicators.append(record)
            elif isinstance(record, SecurityEventRecord) and event_merger is not None:
                outside = event_merger.outside(record)
                if outside:
                    reject(f"record {received - 1}", outside, None)
                else:
                    events.append(record)
            elif isinstance(record, Rejected):
                reject(record.position, record.reason, record.provider_id)
        if knowledge:
            knowledge_merger.merge_chunk(knowledge)
        if findings or observations:
            finding_merger.merge_chunk(knowledge_merger.enrich(findings) if findings else [], observations)
        if alerts:  # their evidence's observables are kept and matched with the tenant's indicators
            intel_matching.alerts_merged(conn, batch.tenant_id, alert_merger.merge_chunk(alerts), cause, batch.id)
        if indicators:  # matched at once with the tenant's alerts and resources (gateway/intel/)
            indicator_merger.merge_chunk(indicators)
        if events:
            event_merger.merge_chunk(events)
            first, last = min(e.occurred_at for e in events), max(e.occurred_at for e in events)
            event_span = (min(first, event_span[0]), max(last, event_span[1])) if event_span else (first, last)
        if chunk_rejections:  # one statement per chunk, in the merge's transaction
            insert_rows(conn, rejections_t, chunk_rejections, constants={"batch_id": batch.id,
                                                                         "tenant_id": batch.tenant_id})
            chunk_rejections.clear()
        chunk_count += 1
        progress = _progress(chunk_count, received, rejected, done=False)
        if ahead:
            _write_progress(conn.engine, batch.id, owner, progress)
    if batch.scan_type == "full":
        finding_merger.resolve_unreported()
        from gateway.merge.observations import remove_unreported

        remove_unreported(finding_merger)
    finding_merger.update_recommendations()
    intel_matching.batch_merged(conn, batch.tenant_id, batch.id, cause)  # the resources it reported
    if event_span:  # the events it stored, against the tenant's indicators
        intel_matching.events_merged(conn, batch.tenant_id, batch.id, *event_span, cause)

    counts = dict.fromkeys(COUNT_KEYS, 0)
    for merger_counts in (finding_merger.counts, alert_merger.counts, knowledge_merger.counts,
                          indicator_merger.counts,
                          event_merger.counts if event_merger is not None else {}):
        for key, value in merger_counts.items():
            counts[key] = counts.get(key, 0) + value
    # a record repeated in one push is one record (its outputs folded into one)
    counts["received"] = received - counts.get("duplicatesInPush", 0)
    counts["rejected"] = rejected
    if received and rejected == received:
        status = "failed"
    elif rejected:
        status = "partiallySucceeded"
    else:
        status = "succeeded"
    finished = conn.execute(
        update(batches).where(batches.c.id == batch.id, batches.c.lease_owner == owner,
                              batches.c.status == "processing").values(
            status=status, counts=counts, rejections=rejections, finished_at=utcnow(),
            progress=_progress(chunk_count, received, rejected, done=True),
            stale_details=finding_merger.stale_examples,
            error="every record was rejected" if status == "failed" else None,
            lease_owner=None, lease_expires_at=None,
        )
    ).rowcount
    if not finished:  # the lease expired and another worker took the batch: roll this merge back
        raise LeaseLost(batch.id)
    outbox.batch_finished(conn, batch.tenant_id, batch.id, status, counts, batch.provider)
    return status
