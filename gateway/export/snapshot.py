"""Snapshots: the current state of a destination's filtered collections, as ``<subject>.snapshot`` events.

``POST .../exports/{id}/snapshot`` records a job (``export_snapshots``, state ``queued``) and a
Celery task runs it (:func:`run`, ``workers.automation_tasks.run_snapshot``).  Like ASC's weekly
snapshot, the job delivers every subject the destination's filter matches *now*: for each subject
type its ``eventTypes`` name (``finding.*`` -> findings; ``*`` -> findings, recommendations, alerts,
resources, policies, exemptions) and its ``filter`` fits, the collection is walked by id in keyset
slices of ``SNAPSHOT_SLICE_SIZE`` rows (``id > last id``, one short read each), each rendered
through the collection's own serializer (what ``GET .../security/<collection>/{id}`` shows) and
sent through the destination's kind in its batch size.  Memory holds one slice, whatever the size
of the collection.  Snapshot events do not go through the outbox: they take no position and do
not move the destination's cursor (its live events keep flowing beside them).

**At least once, stable ids.**  An event's id is ``snap_<job>_<subject>_<subject id>`` and a
delivery's message id is that id (one event) or ``snap_<job>_<subject>_<first id>_<last id>`` (a
batch), so a receiver drops a redelivery.  Progress (the subject type being walked and the last id
delivered) is committed after each delivery; a worker killed between sending and recording sends
the same events again under the same ids.  A failed delivery keeps the job's position; the job
waits ``EXPORT_RETRY_*`` backoff (or ``Retry-After``) and tries again from there (the task
re-enqueues itself, and the automation beat task picks up a job whose task was lost once its lease
expired).  ``GET .../exports/{id}/snapshots/{sid}`` shows the state, the counts and the last error.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from gateway.errors import BadRequest
from gateway.export import delivery, kinds, lease, subjects
from gateway.models import ExportDestination, ExportSnapshot, Tenant, utcnow
from gateway.odata import FilterContext, parse_filter

log = logging.getLogger(__name__)

SNAP, DEST, TEN = ExportSnapshot.__table__, ExportDestination.__table__, Tenant.__table__
RUNNING = ("queued", "running")


def subject_types(dest, dialect: str) -> list[str]:
    """The subject types a snapshot of the destination walks: those its event types name (with a
    collection) and its filter, if any, fits."""
    patterns = dest.event_types or ["*"]
    if not dest.filter:
        return subjects.subjects_for(patterns)
    try:
        return subjects.check_filter(dest.filter, patterns, dialect)
    except BadRequest:
        return []


def start(conn: Connection, dest, actor: str | None, now: datetime) -> int | None:
    """Record a queued job for the destination; None when one is already queued or running."""
    busy = conn.execute(
        select(SNAP.c.id).where(SNAP.c.destination_id == dest.id, SNAP.c.state.in_(RUNNING)).limit(1)
    ).scalar()
    if busy is not None:
        return None
    return conn.execute(
        SNAP.insert()
        .values(
            tenant_id=dest.tenant_id,
            destination_id=dest.id,
            state="queued",
            subjects=subject_types(dest, conn.dialect.name),
            subject_index=0,
            after_id=0,
            delivered=0,
            attempts=0,
            created_at=now,
            created_by=actor,
            updated_at=now,
        )
        .returning(SNAP.c.id)
    ).scalar_one()


def due(conn: Connection, now: datetime) -> list[int]:
    """Jobs to (re)start now: queued or running, past their backoff, nobody holding their lease."""
    query = select(SNAP.c.id).where(SNAP.c.state.in_(RUNNING), lease.due(SNAP, now), lease.free(SNAP, now))
    return conn.execute(query.order_by(SNAP.c.id)).scalars().all()


def _claim(db, snapshot_id: int, owner: str, now: datetime, seconds: int) -> bool:
    workable = (SNAP.c.state.in_(RUNNING), lease.due(SNAP, now))
    return lease.claim(db, SNAP, snapshot_id, owner, now, seconds, *workable)


def _collection(subject_type: str):
    return subjects._collections()[subjects.COLLECTION_OF[subject_type]]


def _filtered(conn: Connection, job, dest, subject_type: str):
    collection = _collection(subject_type)
    query = collection.base(job.tenant_id)
    if dest.filter:
        context = FilterContext(tenant_id=job.tenant_id, dialect=conn.dialect.name)
        query = query.where(parse_filter(dest.filter, collection.fields, context).condition)
    return collection, query


def _total(conn: Connection, job, dest) -> int:
    total = 0
    for subject_type in job.subjects:
        collection, query = _filtered(conn, job, dest, subject_type)
        ids = query.with_only_columns(collection.id_column).subquery()
        total += conn.execute(select(func.count()).select_from(ids)).scalar_one()
    return total


def event(job, tenant: str, subject_type: str, item: dict) -> dict:
    """A snapshot event, shaped as a destination receives outbox events (``sequence`` null)."""
    return {
        "id": f"snap_{job.id}_{subject_type}_{item['id']}",
        "sequence": None,
        "type": f"{subject_type}.snapshot",
        "timestamp": job.created_at.isoformat().replace("+00:00", "Z"),
        "tenant": tenant,
        "subjectType": subject_type,
        "subjectId": str(item["id"]),
        "event": "snapshot",
        "cause": f"snapshot {job.id}",
        "actor": job.created_by,
        "batchId": None,
        "details": {"snapshotId": str(job.id)},
        "data": item,
    }


def message_id(job_id: int, subject_type: str, ids: list, batched: bool) -> str:
    if not batched and len(ids) == 1:
        return f"snap_{job_id}_{subject_type}_{ids[0]}"
    return f"snap_{job_id}_{subject_type}_{ids[0]}_{ids[-1]}"


def run(db, config: dict, snapshot_id: int, owner: str | None = None, clock=utcnow) -> dict:
    """Deliver the job from where it stands until done, a delivery fails, or half the lease passed:
    ``{"status": succeeded|failed|busy|budget|gone, "delivered": events, "retryIn": seconds}``."""
    owner = owner or uuid.uuid4().hex
    lease_seconds = int(config["EXPORT_LEASE_SECONDS"])
    if not _claim(db, snapshot_id, owner, clock(), lease_seconds):
        return {"status": "busy", "delivered": 0}
    started, sent = time.monotonic(), 0
    try:
        with db.engine.connect() as conn:
            while True:
                status, count, retry_in = _step(conn, config, snapshot_id, owner, clock(), lease_seconds)
                sent += count
                if status != "continue":
                    return {"status": status, "delivered": sent, "retryIn": retry_in}
                if time.monotonic() - started > lease_seconds / 2:
                    return {"status": "budget", "delivered": sent, "retryIn": 0.0}
    finally:
        lease.release(db, SNAP, snapshot_id, owner)


def _step(conn: Connection, config: dict, snapshot_id: int, owner: str, now: datetime, lease_seconds: int):
    """Read the next slice and deliver it: (status, events delivered, seconds to wait)."""
    with conn.begin():
        job = conn.execute(select(SNAP).where(SNAP.c.id == snapshot_id)).first()
        if job is None or job.lease_owner != owner:
            return "gone", 0, None
        dest = conn.execute(select(DEST).where(DEST.c.id == job.destination_id)).first()
        if dest is None:
            return "gone", 0, None
        values = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
        if job.state == "queued":
            values.update(state="running", started_at=now, total=_total(conn, job, dest))
        if job.subject_index >= len(job.subjects):
            conn.execute(
                update(SNAP).where(SNAP.c.id == job.id).values(state="succeeded", finished_at=now, **values)
            )
            return "succeeded", 0, None
        subject_type = job.subjects[job.subject_index]
        collection, query = _filtered(conn, job, dest, subject_type)
        rows = conn.execute(
            query.where(collection.id_column > job.after_id)
            .order_by(collection.id_column)
            .limit(max(1, int(config["SNAPSHOT_SLICE_SIZE"])))
        ).all()
        if not rows:  # this subject type is done: the next one
            conn.execute(
                update(SNAP)
                .where(SNAP.c.id == job.id)
                .values(subject_index=job.subject_index + 1, after_id=0, **values)
            )
            return "continue", 0, None
        items = collection.serialize(conn, job.tenant_id, rows, None)
        tenant = conn.execute(select(TEN.c.external_id).where(TEN.c.id == job.tenant_id)).scalar_one()
        conn.execute(update(SNAP).where(SNAP.c.id == job.id).values(**values))
    if dest.state not in delivery.DELIVERING:
        return _failed(conn, config, job, now, kinds.Outcome(False, error=f"the destination is {dest.state}"))
    size, batched = max(1, dest.batch_size), dest.batch_size > 1
    sent = 0
    for start_at in range(0, len(items), size):
        chunk = items[start_at : start_at + size]
        ids = [item["id"] for item in chunk]
        outcome = delivery._send(
            config,
            dest,
            now,
            config["EXPORT_TIMEOUT_SECONDS"],
            message_id(job.id, subject_type, ids, batched),
            [event(job, tenant, subject_type, item) for item in chunk],
        )
        if not outcome.ok:
            return _failed(conn, config, job, now, outcome)
        with conn.begin():
            conn.execute(
                update(SNAP)
                .where(SNAP.c.id == job.id, SNAP.c.lease_owner == owner)
                .values(
                    after_id=int(ids[-1]), delivered=SNAP.c.delivered + len(chunk), attempts=0, updated_at=now
                )
            )
        sent += len(chunk)
    return "continue", sent, None


def _failed(conn: Connection, config: dict, job, now: datetime, outcome: kinds.Outcome):
    attempts = job.attempts + 1
    delay = delivery.backoff(
        attempts, config["EXPORT_RETRY_BASE_SECONDS"], config["EXPORT_RETRY_MAX_SECONDS"], outcome.retry_after
    )
    with conn.begin():
        conn.execute(
            update(SNAP)
            .where(SNAP.c.id == job.id)
            .values(
                attempts=attempts,
                last_error=(outcome.error or "")[:2000],
                last_error_at=now,
                next_attempt_at=now + timedelta(seconds=delay),
                updated_at=now,
            )
        )
    log.info("snapshot %s: delivery failed (%s); next attempt in %.1fs", job.id, outcome.error, delay)
    return "failed", 0, delay
