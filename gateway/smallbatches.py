"""Many small pushes: a worker that merges a small batch also merges its tenant's other queued ones.

A push of ten findings costs a worker far more in the task around it (broker round trips,
ack, app context, lease claim, metrics, the ITSM scan after it, the ANALYZE check) than in
its merge.  So the task of a small batch, once its own merge is done, claims the tenant's
other small batches still ``accepted`` (oldest first, up to ``SMALL_BATCHES_PER_TASK`` in all)
and merges them one after the other, then runs the per-tenant follow-ups (ITSM scan,
ANALYZE check) once for the group.

Guarantees, each from the existing lease (``lease_owner``/``lease_expires_at``):

* **Claimed once.** A batch is taken with one ``UPDATE ... WHERE id = (SELECT ... LIMIT 1
  FOR UPDATE SKIP LOCKED)`` that sets a fresh lease owner only when the lease is free, so two
  coalescing workers (or a batch's own task) never both merge it; on SQLite the statement runs
  under ``BEGIN IMMEDIATE``, which serialises it the same way.  The merge itself then goes
  through :func:`gateway.pipeline.process_batch` with that owner, like any task.
* **Each batch its own.** Every batch is merged in its own transaction with its own status,
  counts, rejections, events and ``batch.finished`` outbox row: coalescing changes who runs
  the merge, not what it writes.  A poison batch ends ``failed`` alone; a transient error
  (deadlock, lost connection) gives its lease back, re-enqueues it and stops the group.
* **Never lost or doubled.** A worker killed mid-group loses only the uncommitted merge it was
  running (rolled back); those before it are committed, those after it were never claimed
  and are merged by their own tasks (or, pushed while a pending mark was set, by the next
  task of the tenant's or the sweep).  The one it held is picked up when its lease expires
  (its own task, redelivered, or the sweep).  The leftover task of a batch merged in another's
  task finds it finished with one read and does nothing else.

**One task per tenant on its way, not one per push.**  Where the broker is Redis, the API
does not send a task for every small push: after the batch is committed, its publisher sets
the tenant's *pending mark* (``SET key NX EX``, :func:`take_mark`) and sends the task only if
it set it; otherwise a task of that tenant's is already on its way and will claim the batch.
The task carries the mark's key; it deletes the mark first (:func:`release_mark`), before it
claims anything, and then always runs the claim loop, even when its own batch was already
merged by another task or is held by another worker.  Why no batch is left behind: a push
that found the mark set found it set by some push P whose ``SET`` succeeded, with no delete
since; P's task deletes the mark only after that (it is sent after the ``SET``) and claims
only after its delete, so it claims after the batch was committed, and sees it.  A group
that stops at ``SMALL_BATCHES_PER_TASK`` takes the mark again and sends a task for the rest
(the ``more`` callback of :func:`merge_queued`); so does a task as soon as it claims a first
queued batch, so that with one busy tenant every worker process still has a task to claim
from its queue (with one task at a time, one process merged a backlog while the others
idled).  A mark deleted by someone else (a retried or redelivered task) only lets a push send
a task it could have spared.  A send that fails releases the mark; a task lost on the way
(the broker lost it, the API process died with it unsent, a worker was killed mid-group)
leaves the mark to expire (``PENDING_SECONDS``) and the batches meanwhile to the sweep, as a
lost task always did.  The API process saves the task's send (Celery and kombu, some 0.65 ms
of CPU a push) and the workers the task around every leftover batch.  The API and the
workers must agree on ``SMALL_BATCH_MAX_BYTES`` (a batch the API deems small and the worker
does not is left to the sweep).
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import DBAPIError

from gateway import broker_redis, logs, tracing
from gateway.db import Database
from gateway.models import Batch, utcnow
from gateway.pipeline import TERMINAL, TransientError, _raise_if_transient, analyze_if_due, process_batch

log = logging.getLogger(__name__)

batches = Batch.__table__
DEFAULT_MAX_BYTES = 64 * 1024
DEFAULT_PER_TASK = 20
# How long a tenant's pending mark outlives a task that never comes (lost on the way): pushes in
# that time send no task of their own and wait for the sweep.
PENDING_SECONDS = 60


def coalescing(config) -> bool:
    """Whether a small batch's task merges the tenant's other queued small batches."""
    return (int(config.get("SMALL_BATCHES_PER_TASK", DEFAULT_PER_TASK)) > 1
            and int(config.get("SMALL_BATCH_MAX_BYTES", DEFAULT_MAX_BYTES)) > 0)


def _marks_url(config) -> str | None:
    return broker_redis.url_of(config.get("BROKER_URL"))


def _marks(url: str):
    return broker_redis.client(url, 5)


def pending_key(config, tenant_id: int, tenant_created=None, body_size: int | None = None) -> str | None:
    """The Redis key of the tenant's pending mark for a push of ``body_size`` bytes, or None when
    that push sends its own task (a larger batch, coalescing off, tasks run eagerly, a broker
    other than Redis).  The key names the task queue and the tenant (its id and creation time,
    so that a tenant made again under a reused id never meets an old mark)."""
    if body_size is not None and body_size > int(config.get("SMALL_BATCH_MAX_BYTES", DEFAULT_MAX_BYTES)):
        return None
    if not coalescing(config) or config.get("TASK_ALWAYS_EAGER") or _marks_url(config) is None:
        return None
    born = int(tenant_created.timestamp() * 1_000_000) if tenant_created is not None else 0
    return f"gateway:small-batches-pending:{config.get('TASK_QUEUE') or 'celery'}:{tenant_id}:{born}"


def take_mark(config, key: str) -> bool:
    """Set the tenant's pending mark; False when it was set already (a task is on its way).
    True when Redis cannot be reached: the push then sends its own task."""
    try:
        return bool(_marks(_marks_url(config)).set(key, b"1", nx=True, ex=PENDING_SECONDS))
    except Exception as exc:  # noqa: BLE001 - a task too many, never one too few
        log.warning("could not set the pending mark %s, sending the task: %s", key, exc)
        return True


def release_mark(config, key: str) -> None:
    """Delete the tenant's pending mark: the next push sends a task again.  Best effort: a mark
    left set expires after ``PENDING_SECONDS``, and the sweep takes the batches meanwhile."""
    try:
        _marks(_marks_url(config)).delete(key)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not delete the pending mark %s: %s", key, exc)


def finished_status(db: Database, batch_id: int) -> str | None:
    """The batch's final status if it has one (it was merged in another batch's task), else None."""
    try:
        with db.reader.connect() as conn:
            status = conn.execute(select(batches.c.status).where(batches.c.id == batch_id)).scalar()
    except DBAPIError as exc:  # the store is down (or restarting): the task retries, as for a merge
        _raise_if_transient(exc)
        raise
    return status if status in TERMINAL else None


def _lease_free(now):
    return or_(batches.c.lease_owner.is_(None), batches.c.lease_expires_at.is_(None),
               batches.c.lease_expires_at <= now)


def claim_next(db: Database, tenant_id: int, max_bytes: int, lease_seconds: int) -> tuple[int, str] | None:
    """Take the lease of the tenant's oldest queued small batch; (batch id, lease owner) or None."""
    now = utcnow()
    owner = uuid.uuid4().hex
    candidate = (select(batches.c.id)
                 .where(batches.c.tenant_id == tenant_id, batches.c.status == "accepted",
                        batches.c.body_size <= max_bytes, _lease_free(now))
                 .order_by(batches.c.id).limit(1))
    if db.is_postgres:  # a batch another worker is claiming is skipped, never waited on
        candidate = candidate.with_for_update(skip_locked=True)
    with db.engine.begin() as conn:
        batch_id = conn.execute(
            update(batches)
            .where(batches.c.id == candidate.scalar_subquery(), batches.c.status == "accepted",
                   _lease_free(now))
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
            .returning(batches.c.id)
        ).scalar()
    return (batch_id, owner) if batch_id is not None else None


def _small_batch_tenant(db: Database, batch_id: int, max_bytes: int) -> int | None:
    with db.reader.connect() as conn:
        row = conn.execute(select(batches.c.tenant_id, batches.c.body_size)
                           .where(batches.c.id == batch_id)).first()
    return row.tenant_id if row is not None and row.body_size <= max_bytes else None


def merge_queued(db: Database, batch_id: int, config: dict[str, Any], observe=None,
                 enqueue=None, more=None) -> list[tuple[int, str]]:
    """After batch ``batch_id`` (small) merged: merge its tenant's queued small batches in turn.

    Returns (batch id, status) of each batch merged here.  ``observe(batch_id, status,
    seconds, span)`` records each merge's metrics; ``enqueue(db, batch_id)`` sends a batch's task
    again (after a transient error); ``more(db, batch_id)`` is called once a first queued batch is
    claimed (so that another worker, if one is idle, claims from the same queue meanwhile) and
    when the group stopped at ``SMALL_BATCHES_PER_TASK`` with batches perhaps still queued: a task
    sent for the tenant's pending mark sends one more for it then (no other task may be on its
    way: the batches pushed while the mark was set sent none).  Nothing happens when the batch is larger
    than ``SMALL_BATCH_MAX_BYTES`` or ``SMALL_BATCHES_PER_TASK`` is 1 or less.
    """
    import time

    max_bytes = int(config.get("SMALL_BATCH_MAX_BYTES", DEFAULT_MAX_BYTES))
    per_task = int(config.get("SMALL_BATCHES_PER_TASK", DEFAULT_PER_TASK))
    if per_task <= 1 or max_bytes <= 0:
        return []
    tenant_id = _small_batch_tenant(db, batch_id, max_bytes)
    if tenant_id is None:
        return []
    merged: list[tuple[int, str]] = []
    while True:
        if len(merged) >= per_task - 1:
            if more is not None:
                more(db, merged[-1][0] if merged else batch_id)
            break
        claimed = claim_next(db, tenant_id, max_bytes, config["LEASE_SECONDS"])
        if claimed is None:
            break
        if not merged and more is not None:  # more are queued: an idle worker may take some meanwhile
            more(db, batch_id)
        other_id, owner = claimed
        with logs.context(batch_id=other_id, request_id=None), \
                tracing.span("gateway.merge", batch_id=int(other_id), coalesced_into=int(batch_id)) as span:
            started = time.perf_counter()
            try:
                status = process_batch(db, other_id, chunk_size=config["MERGE_CHUNK_SIZE"],
                                       max_rejections=config["MAX_REJECTION_DETAILS"], owner=owner,
                                       max_attempts=config["MAX_ATTEMPTS"],
                                       lease_seconds=config["LEASE_SECONDS"], analyze_after_rows=0)
            except TransientError as exc:
                # Its lease is given back; its own task may be gone already, so send another.
                log.warning("batch %s (merged in the task of batch %s) hit a transient error, "
                            "re-enqueued: %s", other_id, batch_id, exc)
                if enqueue is not None:
                    enqueue(db, other_id)
                break
            if observe is not None and status != "busy":
                observe(other_id, status, time.perf_counter() - started, span)
            log.info("batch %s merged in the task of batch %s: %s", other_id, batch_id, status)
        merged.append((other_id, status))
    if merged:
        analyze_if_due(db, config["ANALYZE_AFTER_ROWS"], config["ANALYZE_AFTER_GROWTH"], batch_id)
    return merged
