"""One big batch merged by several workers: staged chunks, merged in parallel, finished once.

Where a single-worker merge of a big file spends its time (py-spy and cProfile of a 120,000-record
Nessus merge, bench/merge_bench.py): about a quarter of the Python time parsing, the rest building
and writing source, finding and event rows, with PostgreSQL busy for about as long again.  The
parse already runs one chunk ahead in a thread, so parallelising it alone gains little (a
previous attempt: 1.03-1.15x): the merge itself, Python and SQL, has to run in several
processes at once.  So a batch of at least ``PARALLEL_MERGE_MIN_BYTES`` (PostgreSQL only) is
merged in three steps:

1. **Stage** (the batch's own task, holding the batch's lease): the stored bytes are parsed once,
   each record checked as in a single merge (rejections keep their positions), and each
   finding and observation is routed to one of ``PARALLEL_MERGE_BUCKETS`` **buckets** by a
   stable hash (CRC-32) of its resource reference (the msgpack of what identity resolution
   keys on), so every record of one resource lands in one bucket whatever the file's order.
   A bucket's records are held encoded (msgpack) and cut as a chunk when they reach
   ``PARALLEL_MERGE_CHUNK_RECORDS``; the chunks of one bucket form a **chain**: each names the
   one before it (``after_seq``) and is merged only once that one is done (its claim checks it,
   in SQL), so two chunks merging at once never hold one resource.  A provider record stays in
   the bucket it was first met in; one met again on a resource of another bucket goes to the
   **tail** (as does every later record of it, and knowledge-base entries and alerts), so two
   chunks merging at once never hold one provider record either, and a chunk knows its chain's
   earlier provider ids (their ``result``): a repeat is a repeat, as in one merge.  The tail is
   spilled to the store in pieces (``spill`` rows) as it grows.  What stays in memory is the
   open chunk of each bucket (at most buckets x chunk records, encoded), the tail piece being
   filled, and an 8-byte digest per distinct provider id (its bucket; about 70 bytes a record
   in CPython).  Each chunk is committed (``batch_merge_chunks``, with the rejections and the
   new recommendation types met since the previous row) and sent at once if it is a chain's
   first or its predecessor is merged already; otherwise the task that merges the predecessor
   sends it (it looks after its own commit, the staging after the chunk's commit: one of them
   sees the other).  So workers merge the first chunks while the rest is parsed (when the body
   passed the well-formedness check before the 202; otherwise no chunk is sent before every
   one is staged, so a malformed file merges nothing).  The tail row is written last, with the
   batch's parsed and rejected totals: its presence means staging is complete.  A staging
   stopped by a crash starts again from the bytes; the rows already committed are kept (the
   routing and the cut are deterministic for the same settings, and a resume cuts with the
   settings stored with the batch when its staging began, ``merge_plan``, whatever they are
   by then) and not sent twice.  A file
   that keeps each resource's records together (as scanners write them) fills the buckets in
   turn; a file that interleaves resources (round-robin) fills them all at once: either way
   every bucket's chain advances and up to ``buckets`` chunks merge at the same time.

   The parse is then the serial part (it was the critical path in the bench: chunks were
   merged as fast as one worker parsed them), so a format whose document splits into
   independent parts is not parsed here at all: a Nessus file (``split_nessus``) is cut between
   its ``ReportHost`` elements into documents of whole hosts (its head and end around each
   run of hosts), staged as the offsets of its hosts in the stored body (read back by the
   worker from the blob's pieces: no second copy of the body is written; the staging and the
   workers read the pieces in PostgreSQL's binary format, not as the hex text a ``bytea`` is
   sent as by default), and each part is parsed and checked by the worker that merges it; its
   rejections are numbered in the whole file by the final step.  The split
   applies only to a simple document (one ``Report``, uniquely named hosts, nothing between
   them, at most ``SPLIT_MAX_BYTES``); any other is parsed here as above.
2. **Merge chunks** (``workers.tasks.merge_chunk``, any worker): a chunk is claimed with a lease
   of its own (only once its chain predecessor is done) and merged with the ordinary mergers
   (gateway/merge/findings.py etc.), in one transaction that also marks it done and stores
   what the final step needs (counts, the resources in scope, the reported identities of a
   full scan, touched recommendations, stale examples, the provider ids seen); after the
   commit it sends its chain's next chunk.  A worker killed mid-chunk loses that transaction
   only; its chunk's lease expires, the batch's too (a chunk's claim and its renewals extend
   the batch's lease to cover the chunk's, so the sweep never resends a batch while a chunk's
   lease is live), and the sweep's task re-sends every pending chunk whose lease is free and
   whose predecessor is done (the rest of its chain follows).  A chunk merged twice is
   impossible: ``done`` is written in the chunk's transaction, under its lease.
3. **Finish** (whichever chunk task sees every chunk done, or the batch's task on a resume): the
   batch row is locked (``FOR UPDATE``, waited for: one finisher, and a task that looked before
   the last chunk's commit never leaves the batch unfinished), the tail is merged with the
   earlier chunks' provider ids known (a repeat is a repeat, as in one merge), then once for the
   whole batch: the full-scan resolve and observation removal over every chunk's scope and
   reported identities, the recommendations of every touched resource (with governance and the
   Secure Score), and the batch's status, counts, rejections and ``batch.finished`` event; the
   staged rows are deleted.  The tail's pieces are read and merged one at a time, in file
   order.  A knowledge-base entry in a big batch is merged here, so its
   back-fill runs once, after every chunk (the store ends as it would had the KB come first).

The outcome is the single merge's: the same mergers see the same records in file order within
each resource (a bucket's chain keeps its records in file order), provider records are never
split, counts are sums.  What differs: a provider record met on resources of two buckets is
merged from the tail, after every chunk, so its resource's records that follow it in the file
are merged before it (one merge takes it first; a record moved between resources); chunks commit
before the batch finishes (readers see the batch's findings arrive chunk by chunk), a batch
failed by an unexpected error after some chunks merged keeps those chunks' findings (its
stored bytes are kept; a new push merges as an update), and records of one resource named in
two shapes that identity resolution joins land in different chunks (they are merged like two
concurrent batches of one tenant, which the store already keeps consistent).

**Choice of path: merge slots.**  Staging costs CPU a single merge does not spend (the split or
the routing, a transaction and a result per chunk, the finish) and on one worker process the
chunks merge one after the other without the single merge's parse running ahead: one process
merges a big batch faster whole (120,000 Nessus records: 5,310 findings/s staged against 6,722).
So the staged path is taken only while at least ``PARALLEL_MERGE_MIN_SLOTS`` (2) merge slots are
live.  Every worker announces itself in the broker's Redis when it is ready (Celery's
``worker_ready``, workers/tasks.py): a sorted set per task queue, ``gateway:merge-slots:<queue>``,
holds each worker's name scored with the expiry of its announcement, a hash beside it the
worker's pool processes (its concurrency); a thread of the worker's main process renews it every
``MERGE_SLOTS_TTL_SECONDS / 3`` (15 s by default) and the worker withdraws it when it stops
(``worker_shutdown``).  A worker killed outright drops out when its announcement expires: until
then a batch may be staged with one live slot (slower, never wrong).  The batch's task counts the
live slots (expired members removed, processes summed, one round trip) when it picks the path;
the count is a hint, not a reservation (a slot busy with another batch still counts: its chunks
queue behind it).  ``PARALLEL_MERGE_MIN_SLOTS`` 0 or 1 stages whatever the slots; a broker that
is not Redis (or does not answer) leaves the size alone to decide, as before; SQLite never
stages.  A batch whose staging began (its ``merge_plan`` stored) resumes staged whatever the
slots or the threshold say by then (gateway/pipeline.py): some of its chunks may be merged.

**CPU budget (2 cores, PostgreSQL on them).**  A 1.5x wall-time gain with two workers needs the
staged merge's whole CPU (workers and PostgreSQL) to fit in two cores for 1/1.5 of the single
merge's time, while the single merge itself keeps only about 1.2 cores busy (its parse runs ahead
in a thread while it waits on PostgreSQL).  So work the staged path adds costs it twice over, and
work both paths do gains the single merge as much as it gains the staged one.  Measured
(bench/parallel_merge_bench.py, 120,000 Nessus records, one run each, a machine then about twice
slower per record than the session before): the staged path used to cost 3.6 CPU-s more than the
single merge; with the body read in binary (the staging's read and the parts' reads had the
server hex-encode 120 MiB), the chunk's type and knowledge-base look-ups not repeated, and a
host's end time parsed once a host, the single merge took 37.1 CPU-s (18.5 workers, 18.6
PostgreSQL) and the staged merge on two workers 36.8 (19.5, 17.3): no CPU left to cut that one
merge does not spend.  Two workers then ran 1.44x the single merge (23.1 s against 33.3 s, both
cores about 88% busy after the 202); smaller parts (5,000 records, 24 chunks) did not help
(24.1 s).  A second run: single 34.0 s, two workers 24.3 s (1.40x) staged by force and 22.3 s
(1.53x) with the default choice (two slots live: staged), one worker with the default choice
31.6 s (merged whole: no chunks), one worker staged by force 41.6 s.  What is left is idle
time: the staging before the first part is sent, the last parts' imbalance, and the tenant's
resolver lock between concurrent chunks.

Measured again on a VM about three times faster (the bench's docstring has the runs: single
11.2-11.6 s, two workers 7.8-8.3 s, 1.35-1.46x), the idle time is smaller than thought.  The
resolver lock is not it: timed in both workers, a run's 24 resolutions waited 0.04 s in all for
the lock and held it 0.57 s.  The parts are equal (100 items a host) and the two workers end
within 0.12 s of each other, so longest-first ordering has nothing to gain here (it would for
hosts of very different sizes).  From the POST: the upload 0.7-0.8 s on one core (the API), the
batch's task 0.1 s later, the split 0.3 s (the body read, now on two connections at once, 0.095
instead of 0.12 s; the three scans of 60 MiB 0.12 s), the chunks 6.8-7.4 s with both cores
~190% busy, the finish 0.16 s.  Sending the first part before the whole body is scanned would
save at most the split's 0.3 s, and is not safe as it stands: the split's checks (one Report,
unique host names) hold only once the whole body is seen, and a part sent before a late check
fails cannot be taken back.  Parsing a part's next sub-chunk while one merges (as the single
merge does) adds no core.  So with both cores full while chunks merge, and the staged path
spending what the single merge spends (workers plus PostgreSQL 13.6-14.4 CPU-s against 12.8-
13.2), two cores reach about 1.45x on this file; 1.5x needs the merge's own CPU cut (the parse:
~35% of a chunk's Python, hidden behind PostgreSQL in the single merge's thread but not in the
staged one; the inserts' SQL).

**Scaling.** Nothing in the chunk step is shared but PostgreSQL: each worker process merges a
chunk with its own connection and transaction; the only tenant-wide lock a chunk takes is the
short resolver lock around its resource resolution (committed at once, as for concurrent
batches); new recommendation types are committed before a chunk's transaction, so no chunk
waits for another's uncommitted insert.  Up to ``PARALLEL_MERGE_BUCKETS`` chunks (one per chain)
merge at once, so more worker processes (on more cores or machines) take more chunks at once
as long as the buckets are at least as many as the processes (16 by default; raising it costs
one open chunk of memory each in the staging task).  The serial parts are the staging (a byte
scan for a split Nessus file; for other formats the whole parse and the routing, overlapped
with the chunk merges) and the finish (the tail, the recommendations of the touched resources
and, for a full scan, the resolve), which grow with resources, not records.  Chunk progress is
in the batch's ``progress`` (``chunksTotal``, ``chunksDone``).  SQLite has one writer at a time:
batches there merge as before.
"""

from __future__ import annotations

import gc
import io
import logging
import re
import threading
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import timedelta

import msgspec
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import DBAPIError

import connectors
from connectors.base import ParseOptions
from connectors.model import AlertRecord, FindingRecord, FormatError, Observation, Rejected, VulnerabilityInfo
from gateway import broker_redis
from gateway.db import Database, binary_cursor
from gateway.export import events as outbox
from gateway.merge.findings import STALE_EXAMPLES, FindingMerger, _digest
from gateway.merge.sql import insert_rows
from gateway.models import Batch, BatchMergeChunk, BatchRejection, OAuthClient, utcnow

log = logging.getLogger(__name__)

batches = Batch.__table__
chunks_t = BatchMergeChunk.__table__
rejections_t = BatchRejection.__table__
clients = OAuthClient.__table__

# A staged chunk: its records in sub-chunks of MERGE_CHUNK_SIZE, each split by kind in file order.
SubChunk = tuple[list[FindingRecord], list[Observation], list[VulnerabilityInfo], list[AlertRecord]]
_decode_records = msgspec.msgpack.Decoder(list[SubChunk]).decode


class ChunkResult(msgspec.Struct):
    """What the final step needs of a merged chunk."""

    counts: dict[str, int]
    scope: list[int]
    observed: list[int]
    touched: list[tuple[int, int]]
    reported: list[tuple[str, str]]
    stale: list[dict]
    seen: list[int]
    received: int = 0  # an XML chunk (parsed by its worker): the records it parsed
    # ... and those it rejected: (index among its records or -1, position, reason, provider id)
    rejections: list[tuple[int, str | None, str, str | None]] = []


_decode_result = msgspec.msgpack.Decoder(ChunkResult).decode


@dataclass
class Settings:
    """The parallel merge's settings (from the app's config) and how a chunk's task is sent."""

    min_bytes: int
    chunk_records: int
    buckets: int
    sub_chunk: int
    max_rejections: int
    lease_seconds: int
    max_attempts: int
    dispatch: Callable[[int, int], object]
    # stage only when at least this many merge slots are live (``live_slots``); 0 or 1: always
    min_slots: int = 0
    slots: Callable[[], int | None] | None = None  # the live merge slots (None: unknown)

    def applies(self, db: Database, body_size: int | None) -> bool:
        """A batch of this size is staged: PostgreSQL, big enough, and enough merge slots live to
        take its chunks at once (one slot merges a batch faster whole: the staging costs CPU)."""
        if not (db.is_postgres and self.min_bytes > 0 and (body_size or 0) >= self.min_bytes):
            return False
        if self.min_slots <= 1 or self.slots is None:
            return True
        live = self.slots()
        return live is None or live >= self.min_slots


# -- merge slots: the worker processes that can take a chunk now ------------------------------

SLOTS_KEY = "gateway:merge-slots:{queue}"  # sorted set: worker name -> its announcement's expiry
SLOTS_CONCURRENCY_KEY = "gateway:merge-slots:{queue}:concurrency"  # hash: worker name -> processes


def _slot_client(url: str):
    return broker_redis.client(url, 2)


def slots_supported(url: str | None) -> bool:
    return broker_redis.url_of(url) is not None


def announce_slots(url: str, queue: str, name: str, concurrency: int, ttl: float) -> None:
    """This worker (``name``) takes ``queue``'s tasks with ``concurrency`` processes for the next
    ``ttl`` seconds (renewed while it lives, withdrawn when it stops)."""
    import time

    key, counts = SLOTS_KEY.format(queue=queue), SLOTS_CONCURRENCY_KEY.format(queue=queue)
    with _slot_client(url).pipeline(transaction=True) as pipe:
        pipe.zadd(key, {name: time.time() + ttl})
        pipe.hset(counts, name, int(concurrency))
        pipe.expire(key, int(ttl) + 1)  # every worker gone: the keys go too
        pipe.expire(counts, int(ttl) + 1)
        pipe.execute()


def withdraw_slots(url: str, queue: str, name: str) -> None:
    with _slot_client(url).pipeline(transaction=True) as pipe:
        pipe.zrem(SLOTS_KEY.format(queue=queue), name)
        pipe.hdel(SLOTS_CONCURRENCY_KEY.format(queue=queue), name)
        pipe.execute()


def live_slots(url: str | None, queue: str) -> int | None:
    """The merge slots (worker processes) of the workers announced live on ``queue``; None when
    the broker is not Redis or does not answer (the caller then stages as before)."""
    import time

    if not slots_supported(url):
        return None
    key, counts = SLOTS_KEY.format(queue=queue), SLOTS_CONCURRENCY_KEY.format(queue=queue)
    try:
        with _slot_client(url).pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", time.time())
            pipe.zrange(key, 0, -1)
            pipe.hgetall(counts)
            _, names, concurrency = pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the choice falls back to the size alone
        log.warning("merge slots not known (%s): the size alone decides", exc)
        return None
    gone = set(concurrency) - set(names)
    if gone:  # workers whose announcement expired (killed): their counts go too
        try:
            _slot_client(url).hdel(counts, *gone)
        except Exception as exc:  # noqa: BLE001 - left for the next look
            log.warning("merge slots: could not drop expired workers' counts: %s", exc)
    return sum(max(1, int(concurrency.get(name, 1))) for name in names)


class SlotAnnouncer:
    """A worker's thread that announces its merge slots every ``ttl / 3`` seconds until stopped
    (then withdraws them); a worker killed outright drops out when its last announcement expires."""

    def __init__(self, url: str, queue: str, name: str, concurrency: int, ttl: float) -> None:
        self.url, self.queue, self.name, self.concurrency, self.ttl = url, queue, name, concurrency, ttl
        self.stopped = threading.Event()
        self._announce()  # at once: the worker's first task may ask already
        self.thread = threading.Thread(target=self._run, name="merge-slots", daemon=True)
        self.thread.start()

    def _announce(self) -> None:
        try:
            announce_slots(self.url, self.queue, self.name, self.concurrency, self.ttl)
        except Exception as exc:  # noqa: BLE001 - Redis away: batches are merged whole meanwhile
            log.warning("merge slots not announced: %s", exc)

    def _run(self) -> None:
        while not self.stopped.wait(max(0.5, self.ttl / 3)):
            self._announce()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        try:
            withdraw_slots(self.url, self.queue, self.name)
        except Exception as exc:  # noqa: BLE001 - they expire anyway
            log.warning("merge slots not withdrawn: %s", exc)


# -- 1. stage -------------------------------------------------------------------------------


def coordinate(db: Database, batch_id: int, owner: str, settings: Settings) -> str:
    """The batch's task for a big batch (its lease taken): stage it, send its chunks, finish it
    if every chunk is done already.  Returns ``processing`` while chunks are merged, else the
    batch's final status."""
    from gateway.pipeline import Heartbeat, _finish_failed, clean_text

    heartbeat = Heartbeat(db, batch_id, owner, settings.lease_seconds)
    try:
        with db.engine.connect() as conn:
            batch = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
        settings = _planned(db, batch, settings)
        try:
            sent = _stage(db, batch, settings)
        except FormatError as exc:
            _finish_failed(db, batch_id, owner, clean_text(str(exc))[:2000])
            _drop_staged(db, batch)
            log.info("batch %s failed: %s", batch_id, exc)
            return "failed"
        for seq in _abandoned(db, batch):  # on a resume: chunks never taken, or whose worker died
            if seq not in sent:
                settings.dispatch(batch_id, seq)
    finally:
        heartbeat.stop()
    _write_progress(db, batch)
    return finish_if_done(db, batch_id, settings) or "processing"


PLANNED = ("chunk_records", "buckets", "sub_chunk")  # the settings a batch's cut depends on


def _planned(db: Database, batch, settings: Settings) -> Settings:
    """``settings`` with the cut's settings the batch was first staged with (``merge_plan``).

    A staging stopped by a crash starts again from the bytes and keeps the rows already
    committed: the new cut must be the old one, or records are doubled or lost, so a resume
    cuts with the stored values whatever the settings say by then.  The first staging stores
    its own before it commits any chunk (a concurrent first staging cannot exist: the batch's
    lease is held; the update keeps the first plan anyway).
    """
    plan = batch.merge_plan
    if not plan:
        with db.engine.begin() as conn:
            conn.execute(update(batches).where(batches.c.id == batch.id, batches.c.merge_plan.is_(None))
                         .values(merge_plan={name: getattr(settings, name) for name in PLANNED}))
            plan = conn.execute(select(batches.c.merge_plan).where(batches.c.id == batch.id)).scalar_one()
    return replace(settings, **{name: int(plan[name]) for name in PLANNED if name in plan})


def _stage(db: Database, batch, settings: Settings) -> set[int]:
    """Parse the batch into bucket chains of chunks (committed and sent one by one), the tail in
    spilled pieces, then the tail row; the chunks sent."""
    with db.engine.connect() as conn:
        staged = dict(conn.execute(select(chunks_t.c.seq, chunks_t.c.kind).where(
            chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch.id)).all())
        client_scopes = conn.execute(select(clients.c.scope).where(clients.c.id == batch.client_pk)).scalar() or ""
    if "tail" in staged.values():
        return set()
    from gateway.pipeline import ALERT_SCOPE_REASON, BlobReader, clean_text, unstorable_text

    if batch.format in SPLITTERS and (batch.body_size or 0) <= SPLIT_MAX_BYTES:
        with db.engine.connect() as reader:
            split = SPLITTERS[batch.format](_read_body(reader, batch.id), settings.chunk_records)
        if split is not None:
            return _stage_split(db, batch, settings, split, staged)

    connector = connectors.get(batch.format)
    options = ParseOptions(provider=batch.provider, received_at=batch.received_at)
    may_push_alerts = connector.RECORD_KIND == "alerts" or "alerts.write" in client_scopes.split()
    # send each chunk as it is cut only when the body is known to be well formed: a format error
    # found late then cannot leave earlier chunks merged
    early = batch.body_check in ("passed", "notNeeded")
    buckets = max(1, settings.buckets)
    received = rejected = 0
    stretch_rejections: list[dict] = []
    # the findings parsed since the last flush, one per distinct set of type-defining fields, in
    # the order of their last occurrence (what _create_types needs of them, in bounded memory)
    stretch_types: dict[tuple, FindingRecord] = {}
    open_chunks: list[list[tuple[int, msgspec.Raw]]] = [[] for _ in range(buckets)]  # (kind, encoded)
    chain_end: list[int | None] = [None] * buckets  # the bucket's last chunk cut
    owner: dict[int, int] = {}  # provider id digest -> its bucket (TAIL: its records go to the tail)
    tail: list[tuple[int, msgspec.Raw]] = []  # the tail records not spilled yet
    last_resource = None
    bucket = 0
    seq = 0
    cut_chunks: list[tuple[int, int | None]] = []  # (seq, after_seq) of the chunks cut, unsent
    sent: set[int] = set()
    encode = msgspec.msgpack.encode

    def reject(position, reason, provider_id) -> None:
        nonlocal rejected
        stretch_rejections.append({"seq": rejected, "position": clean_text(position),
                                   "reason": clean_text(reason) or "", "provider_id": clean_text(provider_id)})
        rejected += 1

    def flush(kind: str, records: list, chain: int | None, final: bool = False) -> None:
        """Commit one staged row (a chunk of a bucket, a spilled piece of the tail, or the tail)
        with the rejections and new recommendation types met since the last one."""
        nonlocal seq
        after = chain_end[chain] if chain is not None else None
        if seq not in staged:
            with db.engine.begin() as conn:
                _create_types(conn, batch, list(stretch_types.values()))
                conn.execute(chunks_t.insert().values(
                    batch_id=batch.id, seq=seq, tenant_id=batch.tenant_id, kind=kind, state="pending",
                    records=encode(_raw_sub_chunks(records, settings.sub_chunk)), record_count=len(records),
                    received=received if final else 0, rejected=rejected if final else 0, attempts=0,
                    bucket=chain, after_seq=after))
                insert_rows(conn, rejections_t, stretch_rejections,
                            constants={"batch_id": batch.id, "tenant_id": batch.tenant_id})
            if kind == "chunk":
                cut_chunks.append((seq, after))
                if early:
                    _send_ready(db, batch, settings, cut_chunks, sent)
                _write_progress(db, batch, parsed=received)
        if chain is not None:
            chain_end[chain] = seq
        records.clear()
        stretch_rejections.clear()
        stretch_types.clear()
        seq += 1

    with db.engine.connect() as reader:
        for record in connector.parse(BlobReader(reader, batch.id), options):
            position = received
            received += 1
            if isinstance(record, Rejected):
                reject(record.position, record.reason, record.provider_id)
                continue
            problem = unstorable_text(record)
            if problem:
                reject(f"record {position}", problem,
                       getattr(record, "provider_id", None) or getattr(record, "vendor_id", None))
                continue
            if isinstance(record, AlertRecord) and not may_push_alerts:
                reject(f"record {position}", ALERT_SCOPE_REASON, record.provider_id)
                continue
            if isinstance(record, FindingRecord):
                key = (record.kind, record.recommendation, record.vendor_id, record.title, record.description,
                       record.remediation, record.severity, record.severity_original, record.cvss_score,
                       not record.cves)
                stretch_types.pop(key, None)  # (last occurrence last: the last of a type gives its texts)
                stretch_types[key] = record
            kind = _KIND_INDEX[type(record)]
            if kind >= 2:  # knowledge-base entries and alerts: merged by the final step
                target = TAIL
            else:
                if record.resource is not last_resource:  # a connector gives a host's records one ref
                    last_resource = record.resource
                    bucket = zlib.crc32(encode(record.resource)) % buckets
                target = bucket
                if kind == 0:  # a provider record stays in one bucket (or, once met in two, the tail)
                    digest = _digest(record.provider_id)
                    first = owner.setdefault(digest, bucket)
                    if first != bucket:
                        owner[digest] = target = TAIL
            if target == TAIL:
                tail.append((kind, msgspec.Raw(encode(record))))
                if len(tail) >= settings.chunk_records:
                    flush("spill", tail, None)
                continue
            chunk = open_chunks[target]
            chunk.append((kind, msgspec.Raw(encode(record))))
            if len(chunk) >= settings.chunk_records:
                flush("chunk", chunk, target)
    for index, chunk in enumerate(open_chunks):
        if chunk:
            flush("chunk", chunk, index)
    cuts = seq
    flush("tail", tail, None, final=True)
    _send_ready(db, batch, settings, cut_chunks, sent)
    log.info("batch %s staged in %d chunks (%d buckets) and a tail", batch.id, cuts, buckets)
    return sent


TAIL = -1
_KIND_INDEX = {FindingRecord: 0, Observation: 1, VulnerabilityInfo: 2, AlertRecord: 3}


def _raw_sub_chunks(records: list[tuple[int, msgspec.Raw]], sub_chunk: int) -> list[tuple[list, ...]]:
    """Encoded records as a staged chunk's sub-chunks (decoded as ``SubChunk``), in file order by kind."""
    parts = []
    for start in range(0, len(records), sub_chunk):
        part: tuple[list, ...] = ([], [], [], [])
        for kind, raw in records[start : start + sub_chunk]:
            part[kind].append(raw)
        parts.append(part)
    return parts


def _send_ready(db: Database, batch, settings: Settings, cut: list[tuple[int, int | None]],
                sent: set[int]) -> None:
    """Send the chunks cut whose chain predecessor is merged (or that have none); the others are
    sent by the task that merges their predecessor (it looks for its successor after its commit,
    and this looks after the successor's commit: one of the two sees the other)."""
    waiting = [(seq, after) for seq, after in cut if seq not in sent]
    if not waiting:
        return
    befores = {after for _, after in waiting if after is not None}
    done: set[int] = set()
    if befores:
        with db.engine.connect() as conn:
            done = set(conn.execute(select(chunks_t.c.seq).where(
                chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch.id,
                chunks_t.c.seq.in_(sorted(befores)), chunks_t.c.state == "done")).scalars())
    for seq, after in waiting:
        if after is None or after in done:
            settings.dispatch(batch.id, seq)
        sent.add(seq)  # (or left to its predecessor's task)
    cut.clear()


# -- the parse split too: a Nessus file cut between its ReportHost elements ---------------------

SPLIT_MAX_BYTES = 256 * 1024 * 1024  # the split reads the body whole: larger ones are parsed by one worker
_HOST_START = re.compile(rb"<ReportHost[\s>]")
_HOST_NAME = re.compile(rb'\sname\s*=\s*"([^"]*)"')
_REPORT_START = re.compile(rb"<Report[\s>]")


def split_nessus(data: bytes, chunk_records: int) -> list[tuple[int, bytes, int, int, bytes]] | None:
    """A Nessus v2 document as several documents of whole hosts: (hosts before it, head, start,
    end, foot) each, the part being ``head + data[start:end] + foot``.

    Each part is the document's head (everything before the first ``ReportHost``: the policy,
    the ``Report`` start tag), some consecutive hosts holding about ``chunk_records`` items, and
    the document's end; parsed alone, a part gives exactly the records the whole document gives
    for those hosts (a host's records depend only on its own element; a host's repeats are next
    to each other).  A part names its hosts by their offsets in the stored body, not by a copy:
    the worker that merges it reads them from the batch's blob (staging writes a few bytes per
    part instead of the whole body again, which PostgreSQL compressed into TOAST and the
    workers decompressed: a second of the database's CPU per 60 MiB, on the staging's critical
    path).  None when the document is not that simple (one ``Report``, host elements with
    unique names and only whitespace between them): it is then parsed whole.
    """
    starts = [m.start() for m in _HOST_START.finditer(data)]
    if len(starts) < 2 or len(_REPORT_START.findall(data)) != 1:
        return None
    spans, names, items = [], set(), []
    for index, start in enumerate(starts):
        end = data.find(b"</ReportHost>", start)
        if end < 0 or (index + 1 < len(starts) and end > starts[index + 1]):
            return None
        end += len(b"</ReportHost>")
        tag_end = data.find(b">", start)
        name = _HOST_NAME.search(data, start, tag_end)
        if name is None or name.group(1) in names:
            return None  # a host named twice (or unnamed): its records must stay in one part
        names.add(name.group(1))
        if spans and not _BLANK.fullmatch(data, spans[-1][1], start):
            return None  # something between two hosts
        spans.append((start, end))
        items.append(data.count(b"<ReportItem", start, end))
    head, foot = data[: spans[0][0]], data[spans[-1][1] :]
    if b"<ReportItem" in head or b"<ReportItem" in foot:
        return None
    parts, first, count = [], 0, 0
    for index, (_start, end) in enumerate(spans):
        count += items[index]
        if count >= chunk_records or index == len(spans) - 1:
            parts.append((first, head, spans[first][0], end, foot))
            first, count = index + 1, 0
    return parts if len(parts) > 1 else None


_BLANK = re.compile(rb"\s*")


def _read_body(conn, batch_id: int, readers: int = 2) -> bytes:
    """A batch's stored body whole (the split reads it whole anyway), piece by piece, in binary.

    The pieces are read by ``readers`` connections at once (this one and others of its engine,
    each a contiguous run of pieces, in threads): the split is the serial part of the staging,
    every other worker waits for its first part meanwhile, and most of the read is PostgreSQL
    decompressing the pieces (TOAST), which two backends do on two cores.  60 MiB (120,000
    Nessus items): about 0.25 s on one connection, 0.15 s on two (bench/parallel_merge_bench.py).
    """
    from gateway.pipeline import blobs

    seqs = conn.execute(select(blobs.c.seq).where(blobs.c.batch_id == batch_id).order_by(blobs.c.seq)).scalars().all()
    seqs = seqs[: next((i for i, seq in enumerate(seqs) if seq != i), len(seqs))]  # up to a gap, as before
    pieces: list[bytes | None] = [None] * len(seqs)

    def read(connection, wanted: list[int]) -> None:
        with binary_cursor(connection) as cursor:
            for seq in wanted:
                cursor.execute(f"SELECT data FROM {blobs.name} WHERE batch_id = %s AND seq = %s", (batch_id, seq))
                pieces[seq] = bytes(cursor.fetchone()[0])

    step = -(-len(seqs) // max(1, readers)) if seqs else 1
    runs = [seqs[start : start + step] for start in range(0, len(seqs), step)]
    failures: list[BaseException] = []

    def helper(wanted: list[int]) -> None:
        try:
            with conn.engine.connect() as other:
                read(other, wanted)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            failures.append(exc)

    threads = [threading.Thread(target=helper, args=(run,), name="read-body", daemon=True) for run in runs[1:]]
    for thread in threads:
        thread.start()
    try:
        if runs:
            read(conn, runs[0])
    finally:
        for thread in threads:
            thread.join()
    if failures:
        raise failures[0]
    return b"".join(pieces)  # type: ignore[arg-type]


def _read_range(conn, batch_id: int, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of a batch's stored body: only the pieces (and the parts of them) in
    range, in binary (``binary_cursor``)."""
    from gateway.pipeline import blobs

    pieces, offset = [], 0
    with binary_cursor(conn) as cursor:
        for seq, size in conn.execute(select(blobs.c.seq, func.octet_length(blobs.c.data))
                                      .where(blobs.c.batch_id == batch_id).order_by(blobs.c.seq)).all():
            low, high = max(start, offset), min(end, offset + size)
            if low < high:
                cursor.execute(f"SELECT substring(data FROM %s FOR %s) FROM {blobs.name} "
                               "WHERE batch_id = %s AND seq = %s",
                               (low - offset + 1, high - low, batch_id, seq))
                pieces.append(bytes(cursor.fetchone()[0]))
            offset += size
            if offset >= end:
                break
    return b"".join(pieces)


SPLITTERS = {"nessus": split_nessus}
_decode_split = msgspec.msgpack.Decoder(tuple[int, bytes, int, int, bytes]).decode


def _stage_split(db: Database, batch, settings: Settings, parts: list[tuple[int, bytes, int, int, bytes]],
                 staged: dict[int, str]) -> set[int]:
    """Stage the parts of a split document (each parsed by the worker that merges it), then an
    empty tail; the chunks sent."""
    sent: set[int] = set()
    for seq, part in enumerate(parts):
        if seq not in staged:
            with db.engine.begin() as conn:
                conn.execute(chunks_t.insert().values(
                    batch_id=batch.id, seq=seq, tenant_id=batch.tenant_id, kind="xml", state="pending",
                    records=msgspec.msgpack.encode(part), record_count=0, received=0, rejected=0,
                    attempts=0))
            sent.add(seq)
            settings.dispatch(batch.id, seq)
    with db.engine.begin() as conn:
        _insert_chunk(conn, batch, len(parts), "tail", [], settings.sub_chunk)
    log.info("batch %s split in %d parts, each parsed and merged by a worker", batch.id, len(parts))
    return sent


def _parse_part(batch, data: bytes, hosts_before: int, may_push_alerts: bool, sub_chunk: int):
    """A split part's records, checked as in a single merge: (sub-chunks, received, rejections)."""
    from gateway.pipeline import ALERT_SCOPE_REASON, clean_text, unstorable_text

    connector = connectors.get(batch.format)
    options = ParseOptions(provider=batch.provider, received_at=batch.received_at)
    kept, rejections, received = [], [], 0

    def shifted(position):  # the host's index in the whole document
        return clean_text(re.sub(r"ReportHost\[(\d+)\]",
                                 lambda m: f"ReportHost[{int(m.group(1)) + hosts_before}]", position or ""))

    for record in connector.parse(io.BytesIO(data), options):
        index = received
        received += 1
        if isinstance(record, Rejected):
            rejections.append((-1, shifted(record.position), clean_text(record.reason) or "",
                               clean_text(record.provider_id)))
            continue
        problem = unstorable_text(record)
        if problem:
            rejections.append((index, None, clean_text(problem) or "", clean_text(
                getattr(record, "provider_id", None) or getattr(record, "vendor_id", None))))
            continue
        if isinstance(record, AlertRecord) and not may_push_alerts:
            rejections.append((index, None, ALERT_SCOPE_REASON, clean_text(record.provider_id)))
            continue
        kept.append(record)
    return _sub_chunks(kept, sub_chunk), received, rejections


def _create_types(conn, batch, findings: list[FindingRecord]) -> tuple[dict, dict]:
    """Create the recommendation types these records fall under, committed with their chunk.

    In file order, so the first record of a new type gives its texts, as in one merge; and
    committed before any chunk merges, so two chunks never wait for each other's insert of
    the same new type (an insert waits for the uncommitted row of another transaction).
    Returns what it looked up, the type ids by key and the knowledge-base entries by vendor id,
    for a chunk's mergers to start from (``_Mergers.warm``) instead of reading them again.
    """
    if not findings:
        return {}, {}
    from gateway.merge.knowledge import KnowledgeMerger

    cause = f"batch {batch.id}"
    merger = FindingMerger(conn, batch.tenant_id, batch.provider, batch.id, batch.received_at, cause,
                           format=batch.format)
    knowledge = KnowledgeMerger(conn, batch.tenant_id, batch.provider, batch.id)
    merger._type_ids_for(knowledge.enrich(findings))
    return merger._type_ids, knowledge._cache


def _insert_chunk(conn, batch, seq: int, kind: str, records: list, sub_chunk: int, received: int = 0,
                  rejected: int = 0) -> None:
    conn.execute(chunks_t.insert().values(
        batch_id=batch.id, seq=seq, tenant_id=batch.tenant_id, kind=kind, state="pending",
        records=msgspec.msgpack.encode(_sub_chunks(records, sub_chunk)), record_count=len(records),
        received=received, rejected=rejected, attempts=0))


def _sub_chunks(records: list, sub_chunk: int) -> list[SubChunk]:
    parts: list[SubChunk] = []
    for start in range(0, len(records), sub_chunk):
        part: SubChunk = ([], [], [], [])
        for record in records[start : start + sub_chunk]:
            index = (0 if isinstance(record, FindingRecord) else 1 if isinstance(record, Observation)
                     else 2 if isinstance(record, VulnerabilityInfo) else 3)
            part[index].append(record)
        parts.append(part)
    return parts


def _abandoned(db: Database, batch) -> list[int]:
    """Chunks not merged whose lease is free and whose chain predecessor is merged (or that have
    none): never taken, or their worker died.  A later chunk of a chain is sent by the task that
    merges the one before it."""
    now = utcnow()
    before = chunks_t.alias("before")
    with db.engine.connect() as conn:
        return conn.execute(select(chunks_t.c.seq).where(
            chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch.id,
            chunks_t.c.kind.in_(MERGED_KINDS), chunks_t.c.state == "pending",
            or_(chunks_t.c.lease_owner.is_(None), chunks_t.c.lease_expires_at <= now),
            _predecessor_done(before),
        ).order_by(chunks_t.c.seq)).scalars().all()


MERGED_KINDS = ("chunk", "xml")  # merged by a chunk task (a spill and the tail: by the final step)


def _predecessor_done(before):
    """SQL: the chunk has no chain predecessor, or that one is merged."""
    return or_(chunks_t.c.after_seq.is_(None), select(before.c.seq).where(
        before.c.batch_id == chunks_t.c.batch_id, before.c.seq == chunks_t.c.after_seq,
        before.c.state == "done").exists())


def _drop_staged(db: Database, batch) -> None:
    with db.engine.begin() as conn:
        conn.execute(delete(chunks_t).where(chunks_t.c.tenant_id == batch.tenant_id,
                                            chunks_t.c.batch_id == batch.id))


def _write_progress(db: Database, batch, parsed: int | None = None) -> None:
    """The batch's ``progress`` from its staged chunks (a short transaction; advisory)."""
    try:
        with db.engine.begin() as conn:
            rows = conn.execute(select(chunks_t.c.kind, chunks_t.c.state, func.count(),
                                       func.sum(chunks_t.c.record_count), func.max(chunks_t.c.received),
                                       func.max(chunks_t.c.rejected))
                                .where(chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch.id)
                                .group_by(chunks_t.c.kind, chunks_t.c.state)).all()
            staged = sum(n for kind, _, n, _, _, _ in rows if kind in MERGED_KINDS)
            done = sum(n for kind, state, n, _, _, _ in rows if kind in MERGED_KINDS and state == "done")
            merged = sum(int(records or 0) for kind, state, _, records, _, _ in rows
                         if kind in MERGED_KINDS and state == "done")
            tail = next((row for row in rows if row[0] == "tail"), None)
            total_rejected = int(tail[5]) if tail is not None else 0
            progress = {"chunks": done, "chunksTotal": staged if tail is not None else None, "chunksDone": done,
                        "recordsParsed": int(tail[4]) if tail is not None else (parsed or 0),
                        "recordsMerged": merged, "recordsRejected": total_rejected, "done": False,
                        "updatedAt": utcnow().isoformat()}
            conn.execute(update(batches).where(batches.c.id == batch.id, batches.c.status == "processing")
                         .values(progress=progress))
    except Exception as exc:  # noqa: BLE001 - progress is advisory
        log.warning("batch %s: progress not recorded: %s", batch.id, exc)


# -- 2. merge a chunk -----------------------------------------------------------------------


class _ChunkHeartbeat:
    """Renews a chunk's lease, and the batch's (no sweep takes a batch whose chunks are merging)."""

    def __init__(self, db: Database, batch_id: int, seq: int, owner: str, lease_seconds: int) -> None:
        self.db, self.batch_id, self.seq, self.owner, self.lease_seconds = db, batch_id, seq, owner, lease_seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lease-chunk-{batch_id}-{seq}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(max(0.2, self.lease_seconds / 3)):
            try:
                expires = utcnow() + timedelta(seconds=self.lease_seconds)
                with self.db.engine.begin() as conn:
                    renewed = conn.execute(update(chunks_t).where(
                        chunks_t.c.batch_id == self.batch_id, chunks_t.c.seq == self.seq,
                        chunks_t.c.lease_owner == self.owner).values(lease_expires_at=expires)).rowcount
                    if renewed:
                        _extend_batch_lease(conn, self.batch_id, expires)
            except Exception as exc:  # noqa: BLE001 - the merge sees the same trouble and decides
                log.warning("batch %s chunk %s: lease not renewed: %s", self.batch_id, self.seq, exc)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)


def _extend_batch_lease(conn, batch_id: int, expires) -> None:
    """Keep the batch's lease at least as long as a chunk lease just taken or renewed.

    The sweep resends a batch only once its lease has run out, and the resumed batch's task
    sends only the chunks whose lease is free: were a chunk's lease to outlive the batch's (a
    chunk claimed after the last renewal, its worker killed before renewing), the resume would
    skip that chunk, and its chain (every later chunk is sent by the one before it) would wait
    for the next sweep.  Never shortened: another chunk's lease may run longer."""
    conn.execute(update(batches).where(batches.c.id == batch_id, batches.c.status == "processing")
                 .values(lease_expires_at=func.greatest(func.coalesce(batches.c.lease_expires_at, expires),
                                                        expires)))


def merge_chunk(db: Database, batch_id: int, seq: int, settings: Settings, owner: str | None = None) -> str:
    """Merge one staged chunk (``done``, ``busy``: another worker holds it, or the batch's final
    status when this task finished it).  Raises ``TransientError`` for the task to retry."""
    from gateway.pipeline import TransientError, _describe, _transient

    owner = owner or uuid.uuid4().hex
    try:
        claimed, state = _claim_chunk(db, batch_id, seq, owner, settings)
    except DBAPIError as exc:
        if _transient(exc):
            raise TransientError(_describe(exc)) from exc
        raise
    if claimed is None:
        if state == "done":  # merged already: the batch may still wait for its final step
            return finish_if_done(db, batch_id, settings) or "done"
        # busy: another worker holds it, or its chain predecessor is not merged yet (whose task
        # sends this one again when it is)
        return "busy" if state is not None else "missing"
    return _merge_claimed(db, batch_id, seq, settings, owner, claimed)


def _claim_chunk(db: Database, batch_id: int, seq: int, owner: str, settings: Settings):
    """Take a chunk's lease (and extend the batch's to cover it): (the claimed row or None, the
    chunk's state when not claimed)."""
    now = utcnow()
    with db.engine.begin() as conn:
        claimed = conn.execute(update(chunks_t).where(
            chunks_t.c.batch_id == batch_id, chunks_t.c.seq == seq, chunks_t.c.kind.in_(MERGED_KINDS),
            chunks_t.c.state == "pending",
            or_(chunks_t.c.lease_owner.is_(None), chunks_t.c.lease_owner == owner,
                chunks_t.c.lease_expires_at <= now),
            _predecessor_done(chunks_t.alias("before")),  # a chain's chunks merge one after the other
        ).values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
                 attempts=chunks_t.c.attempts + 1).returning(
            chunks_t.c.attempts, chunks_t.c.tenant_id, chunks_t.c.kind, chunks_t.c.bucket)).first()
        if claimed:  # the batch's lease covers its chunks': no sweep resends a batch with a live chunk
            _extend_batch_lease(conn, batch_id, now + timedelta(seconds=settings.lease_seconds))
        state = None if claimed else conn.execute(select(chunks_t.c.state).where(
            chunks_t.c.batch_id == batch_id, chunks_t.c.seq == seq)).scalar()
    return claimed, state


def _merge_claimed(db: Database, batch_id: int, seq: int, settings: Settings, owner: str, claimed) -> str:
    from gateway.pipeline import LeaseLost, TransientError, _describe, _transient

    if claimed.attempts > settings.max_attempts:
        return _fail(db, batch_id, claimed.tenant_id,
                     f"chunk {seq} gave up after {claimed.attempts - 1} merge attempts")
    collecting = gc.isenabled()
    gc.disable()  # as in a single merge (gateway/pipeline.py): no long-lived cycles to collect
    heartbeat = _ChunkHeartbeat(db, batch_id, seq, owner, settings.lease_seconds)
    try:
        received, rejections, parts, looked_up = 0, [], None, ({}, {})
        if claimed.kind == "xml":  # a part of a split document: parsed here, before the merge's transaction
            with db.engine.connect() as conn:
                batch = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
                staged = conn.execute(select(chunks_t.c.records).where(
                    chunks_t.c.tenant_id == claimed.tenant_id, chunks_t.c.batch_id == batch_id,
                    chunks_t.c.seq == seq)).scalar_one()
                hosts_before, head, start, end, foot = _decode_split(staged)
                data = head + _read_range(conn, batch_id, start, end) + foot
                scopes = conn.execute(select(clients.c.scope).where(clients.c.id == batch.client_pk)).scalar() or ""
            connector = connectors.get(batch.format)
            parts, received, rejections = _parse_part(
                batch, data, hosts_before, connector.RECORD_KIND == "alerts" or "alerts.write" in scopes.split(),
                settings.sub_chunk)
            del data
            with db.engine.begin() as conn:  # new types committed first: no chunk waits on another's insert
                looked_up = _create_types(conn, batch, [r for part in parts for r in part[0]])
        with db.engine.begin() as conn:
            batch = conn.execute(select(batches).where(batches.c.id == batch_id)).first()
            if batch is None or batch.status != "processing":
                return "done"  # the batch was finished (or failed) meanwhile: nothing to merge
            if parts is None:
                parts = _decode_records(conn.execute(select(chunks_t.c.records).where(
                    chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch_id,
                    chunks_t.c.seq == seq)).scalar_one())
            mergers = _Mergers(conn, batch)
            if claimed.kind == "xml":  # the types and KB entries just read (committed): not read twice
                mergers.warm(*looked_up)
            if claimed.bucket is not None:  # its chain's provider records: repeats, as in one merge
                for earlier in conn.execute(select(chunks_t.c.result).where(
                        chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch_id,
                        chunks_t.c.bucket == claimed.bucket, chunks_t.c.seq < seq,
                        chunks_t.c.state == "done")).scalars():
                    mergers.findings._seen_records.update(_decode_result(earlier).seen)
            mergers.merge(parts)
            result = mergers.result(full=batch.scan_type == "full")
            result.received, result.rejections = received, rejections
            finished = conn.execute(update(chunks_t).where(
                chunks_t.c.batch_id == batch_id, chunks_t.c.seq == seq, chunks_t.c.lease_owner == owner,
                chunks_t.c.state == "pending",
            ).values(state="done", result=msgspec.msgpack.encode(result), lease_owner=None,
                     lease_expires_at=None, finished_at=utcnow(),
                     record_count=received - len(rejections) if claimed.kind == "xml" else chunks_t.c.record_count,
                     records=b"" if claimed.kind == "xml" else chunks_t.c.records)).rowcount
            if not finished:  # the lease expired and another worker took the chunk: roll back
                raise LeaseLost(batch_id)
    except LeaseLost:
        log.warning("batch %s chunk %s: lease lost to another worker, rolled back", batch_id, seq)
        return "busy"
    except DBAPIError as exc:
        if _transient(exc):
            _release_chunk(db, batch_id, seq, owner)
            raise TransientError(_describe(exc)) from exc
        return _fail_unexpected(db, batch_id, exc)
    except Exception as exc:  # a defect: the batch fails, visibly
        return _fail_unexpected(db, batch_id, exc)
    finally:
        heartbeat.stop()
        # The chunk's records and mergers go by their reference counts before the collector is
        # back on: turned on with them alive, its first pass walked all the chunk had made
        # (py-spy: up to 30 ms a chunk, on the critical path of two busy cores).
        parts = mergers = result = None  # noqa: F841
        if collecting:
            gc.enable()
    log.info("batch %s chunk %s merged", batch_id, seq)
    _send_successor(db, batch, seq, settings)
    _write_progress(db, batch)
    return finish_if_done(db, batch_id, settings) or "done"


def _send_successor(db: Database, batch, seq: int, settings: Settings) -> None:
    """Send the next chunk of this chunk's chain, if it is staged (read after this chunk's commit:
    a successor committed later is sent by the staging, which then sees this one done)."""
    try:
        with db.engine.connect() as conn:
            successors = conn.execute(select(chunks_t.c.seq).where(
                chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch.id,
                chunks_t.c.after_seq == seq, chunks_t.c.state == "pending")).scalars().all()
    except DBAPIError as exc:  # the sweep sends it once the batch's lease runs out
        log.warning("batch %s chunk %s: next chunk of its chain not sent: %s", batch.id, seq, exc)
        return
    for successor in successors:
        settings.dispatch(batch.id, successor)



def _release_chunk(db: Database, batch_id: int, seq: int, owner: str) -> None:
    try:
        with db.engine.begin() as conn:
            conn.execute(update(chunks_t).where(chunks_t.c.batch_id == batch_id, chunks_t.c.seq == seq,
                                                chunks_t.c.lease_owner == owner).values(lease_expires_at=utcnow()))
    except Exception:  # noqa: BLE001 - the database may be the thing that is down
        pass


class _Mergers:
    """The mergers of one chunk (or of the final step), fed sub-chunks as a single merge feeds them."""

    def __init__(self, conn, batch) -> None:
        from gateway.merge.alerts import AlertMerger
        from gateway.merge.knowledge import KnowledgeMerger

        connector = connectors.get(batch.format)
        cause = f"batch {batch.id}"
        self.findings = FindingMerger(conn, batch.tenant_id, batch.provider, batch.id, batch.received_at, cause,
                                      product=getattr(connector, "PRODUCT", None), format=batch.format)
        self.alerts = AlertMerger(conn, batch.tenant_id, batch.provider, batch.id, cause)
        self.knowledge = KnowledgeMerger(conn, batch.tenant_id, batch.provider, batch.id)

    def warm(self, type_ids: dict, knowledge: dict) -> None:
        """Start from type ids and knowledge-base entries looked up (and committed) just before."""
        self.findings._type_ids.update(type_ids)
        self.knowledge._cache.update(knowledge)

    def merge(self, parts: Iterable[SubChunk]) -> None:
        for findings, observations, knowledge, alerts in parts:
            if knowledge:
                self.knowledge.merge_chunk(knowledge)
            if findings or observations:
                self.findings.merge_chunk(self.knowledge.enrich(findings) if findings else [], observations)
            if alerts:
                self.alerts.merge_chunk(alerts)

    def counts(self) -> Counter:
        total: Counter = Counter()
        for counts in (self.findings.counts, self.alerts.counts, self.knowledge.counts):
            total.update(counts)
        return total

    def result(self, full: bool) -> ChunkResult:
        merger = self.findings
        return ChunkResult(counts=dict(self.counts()), scope=sorted(merger.scope),
                           observed=sorted(merger.observed_resources),
                           touched=sorted(merger.touched_recommendations),
                           reported=sorted(merger.reported) if full else [], stale=merger.stale_examples,
                           seen=sorted(merger._seen_records))


# -- 3. finish ------------------------------------------------------------------------------


def finish_if_done(db: Database, batch_id: int, settings: Settings) -> str | None:
    """Finish the batch if it is staged and every chunk is merged: its final status when this
    call finished it, else None (chunks left, or another worker finishes or finished it)."""
    from gateway.pipeline import TransientError, _describe, _transient

    try:
        return _finish(db, batch_id, settings)
    except DBAPIError as exc:
        if _transient(exc):
            raise TransientError(_describe(exc)) from exc
        return _fail_unexpected(db, batch_id, exc)
    except Exception as exc:  # a defect: the batch fails, visibly
        return _fail_unexpected(db, batch_id, exc)


def _finish(db: Database, batch_id: int, settings: Settings) -> str | None:
    from gateway.merge.observations import remove_unreported
    from gateway.pipeline import COUNT_KEYS

    # A cheap look first, without a lock: every chunk task asks after its commit, so the last one
    # to commit sees every chunk done (and the staging, after the tail's commit, sees the tail).
    with db.engine.connect() as conn:
        if not _all_merged(conn, batch_id):
            return None
    collecting = gc.isenabled()
    gc.disable()
    try:
        with db.engine.begin() as conn:
            # One finisher.  The batch row is waited for, not skipped: a holder may be a task that
            # looked at the chunks before this one's commit and found one pending (it finishes
            # nothing), or a lease renewal; skipping it left a batch whose chunks were all merged
            # unfinished until the sweep.  Only a finisher holds it long, and then every chunk is
            # merged: a task waiting on it finds the batch finished and returns.
            batch = conn.execute(select(batches).where(batches.c.id == batch_id).with_for_update()).first()
            if batch is None or batch.status != "processing":
                return None  # finished (or failed) meanwhile
            if not _all_merged(conn, batch_id):
                return None
            rows = conn.execute(select(chunks_t.c.seq, chunks_t.c.kind, chunks_t.c.state, chunks_t.c.result,
                                       chunks_t.c.received, chunks_t.c.rejected, chunks_t.c.record_count)
                                .where(chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch_id)
                                .order_by(chunks_t.c.seq)).all()
            tail = next((row for row in rows if row.kind == "tail"), None)
            if tail is None or any(row.kind in MERGED_KINDS and row.state != "done" for row in rows):
                return None
            mergers = _Mergers(conn, batch)
            merger = mergers.findings
            chunk_counts: Counter = Counter()
            seen: set[int] = set()
            tail_records = any(row.record_count for row in rows if row.kind in ("spill", "tail"))
            received, rejected = tail.received, tail.rejected
            split_rejections: list[dict] = []  # the parts' rejections, numbered in the whole document
            for row in rows:
                if row.kind not in MERGED_KINDS:
                    continue
                result = _decode_result(row.result)
                for index, position, reason, provider_id in result.rejections:
                    split_rejections.append({"seq": rejected, "reason": reason, "provider_id": provider_id,
                                             "position": position if index < 0 else f"record {received + index}"})
                    rejected += 1
                received += result.received
                chunk_counts.update(result.counts)
                merger.scope.update(result.scope)
                merger.observed_resources.update(result.observed)
                merger.touched_recommendations.update(map(tuple, result.touched))
                merger.reported.update(map(tuple, result.reported))
                merger.stale_examples.extend(result.stale[: STALE_EXAMPLES - len(merger.stale_examples)])
                if tail_records:  # (only a tail's records need them)
                    seen.update(result.seen)
            merger._seen_records = seen  # a tail record an earlier chunk merged is a repeat, as in one merge
            for row in rows:  # the tail's spilled pieces, then its last one, in file order, one at a time
                if row.kind in ("spill", "tail"):
                    mergers.merge(_decode_records(conn.execute(select(chunks_t.c.records).where(
                        chunks_t.c.tenant_id == batch.tenant_id, chunks_t.c.batch_id == batch_id,
                        chunks_t.c.seq == row.seq)).scalar_one()))
            if batch.scan_type == "full":
                merger.resolve_unreported()
                remove_unreported(merger)
            merger.update_recommendations()

            counts = dict.fromkeys(COUNT_KEYS, 0)
            for key, value in (chunk_counts + mergers.counts()).items():
                counts[key] = counts.get(key, 0) + value
            insert_rows(conn, rejections_t, split_rejections,
                        constants={"batch_id": batch_id, "tenant_id": batch.tenant_id})
            counts["received"] = received - counts.get("duplicatesInPush", 0)
            counts["rejected"] = rejected
            rejections = [{"position": r.position, "reason": r.reason, "providerId": r.provider_id}
                          for r in conn.execute(select(rejections_t.c.position, rejections_t.c.reason,
                                                       rejections_t.c.provider_id)
                                                .where(rejections_t.c.tenant_id == batch.tenant_id,
                                                       rejections_t.c.batch_id == batch_id)
                                                .order_by(rejections_t.c.seq).limit(settings.max_rejections))]
            if received and rejected == received:
                status = "failed"
            elif rejected:
                status = "partiallySucceeded"
            else:
                status = "succeeded"
            total = sum(1 for row in rows if row.kind in MERGED_KINDS)
            conn.execute(update(batches).where(batches.c.id == batch_id, batches.c.status == "processing").values(
                status=status, counts=counts, rejections=rejections, finished_at=utcnow(),
                progress={"chunks": total, "chunksTotal": total, "chunksDone": total, "recordsParsed": received,
                          "recordsMerged": received - rejected, "recordsRejected": rejected, "done": True,
                          "updatedAt": utcnow().isoformat()},
                stale_details=merger.stale_examples,
                error="every record was rejected" if status == "failed" else None,
                lease_owner=None, lease_expires_at=None))
            outbox.batch_finished(conn, batch.tenant_id, batch_id, status, counts, batch.provider)
            conn.execute(delete(chunks_t).where(chunks_t.c.tenant_id == batch.tenant_id,
                                                chunks_t.c.batch_id == batch_id))
    finally:
        if collecting:
            gc.enable()
    log.info("batch %s finished after %d chunks: %s", batch_id, total, status)
    return status


def _all_merged(conn, batch_id: int) -> bool:
    """The batch is staged (its tail row written) and every chunk of it is merged."""
    states = conn.execute(select(chunks_t.c.kind, chunks_t.c.state, func.count()).where(
        chunks_t.c.tenant_id == select(batches.c.tenant_id).where(batches.c.id == batch_id).scalar_subquery(),
        chunks_t.c.batch_id == batch_id).group_by(chunks_t.c.kind, chunks_t.c.state)).all()
    return any(kind == "tail" for kind, _, _ in states) and not any(
        kind in MERGED_KINDS and state != "done" for kind, state, _ in states)


def _fail(db: Database, batch_id: int, tenant_id: int | None, error: str) -> str:
    """End the batch ``failed`` (whoever holds its lease); chunks merged before stay merged."""
    from gateway.pipeline import COUNT_KEYS

    with db.engine.begin() as conn:
        ended = conn.execute(
            update(batches).where(batches.c.id == batch_id, batches.c.status == "processing")
            .values(status="failed", error=error[:2000], counts=dict.fromkeys(COUNT_KEYS, 0), rejections=[],
                    finished_at=utcnow(), lease_owner=None, lease_expires_at=None)
            .returning(batches.c.tenant_id, batches.c.provider)).first()
        if ended is not None:
            outbox.batch_finished(conn, ended.tenant_id, batch_id, "failed", dict.fromkeys(COUNT_KEYS, 0),
                                  ended.provider, error)
            conn.execute(delete(chunks_t).where(chunks_t.c.tenant_id == ended.tenant_id,
                                                chunks_t.c.batch_id == batch_id))
    log.error("batch %s failed: %s", batch_id, error)
    return "failed"


def _fail_unexpected(db: Database, batch_id: int, exc: Exception) -> str:
    from sqlalchemy.exc import DataError

    reference = uuid.uuid4().hex[:12]
    log.error("batch %s failed with an unexpected error (reference %s)", batch_id, reference, exc_info=exc)
    kind = "a value the store refused" if isinstance(exc, DataError) else "an internal error"
    return _fail(db, batch_id, None, f"the merge stopped on {kind} (reference {reference}); the batch's "
                                     "stored bytes are kept; chunks merged before it stay merged")
