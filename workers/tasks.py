"""Celery tasks: take ids, are idempotent, and are safe to run twice."""

from __future__ import annotations

import atexit
import logging
import os
import queue
import random
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta

from celery import shared_task
from celery.signals import worker_ready, worker_shutdown
from flask import current_app
from sqlalchemy import or_, select, update

from gateway import logs, metrics, smallbatches, tracing
from gateway.models import Batch, utcnow
from gateway.pipeline import OPEN_STATUSES, TransientError, process_batch

log = logging.getLogger(__name__)

PROCESS_BATCH = "workers.tasks.process_batch"
MERGE_CHUNK = "workers.tasks.merge_chunk"


def parallel_settings(config):
    """The parallel merge's settings (gateway/merge/parallel.py); its chunks go to ``merge_chunk``."""
    from gateway.merge.parallel import Settings, live_slots

    return Settings(min_bytes=int(config["PARALLEL_MERGE_MIN_BYTES"]),
                    chunk_records=max(1, int(config["PARALLEL_MERGE_CHUNK_RECORDS"])),
                    buckets=max(1, int(config["PARALLEL_MERGE_BUCKETS"])),
                    sub_chunk=int(config["MERGE_CHUNK_SIZE"]), max_rejections=int(config["MAX_REJECTION_DETAILS"]),
                    lease_seconds=int(config["LEASE_SECONDS"]), max_attempts=int(config["MAX_ATTEMPTS"]),
                    dispatch=lambda batch_id, seq: merge_chunk_task.apply_async(args=[batch_id, seq]),
                    min_slots=int(config["PARALLEL_MERGE_MIN_SLOTS"]),
                    slots=lambda: live_slots(config["BROKER_URL"], config["TASK_QUEUE"]))


# -- merge slots: each worker announces its processes while it lives (gateway/merge/parallel.py) --

_announcer = None


@worker_ready.connect
def _announce_merge_slots(sender=None, **kwargs) -> None:
    """A worker on a Redis broker announces its merge slots (its pool's processes) for a big
    batch's choice of path, renewed by a thread of the worker's main process until it stops."""
    global _announcer
    from gateway.merge.parallel import SlotAnnouncer, slots_supported

    entry = sys.modules.get("workers.app")  # ``celery -A workers.app worker``: the worker's Flask app
    config = getattr(getattr(entry, "flask_app", None), "config", None)
    if config is None or not slots_supported(config.get("BROKER_URL")) or _announcer is not None:
        return
    controller = getattr(sender, "controller", None)
    concurrency = int(getattr(controller, "concurrency", None) or 1)
    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    _announcer = SlotAnnouncer(config["BROKER_URL"], config["TASK_QUEUE"], f"{name}/{os.getpid()}",
                               concurrency, float(config["MERGE_SLOTS_TTL_SECONDS"]))
    log.info("merge slots announced: %s process(es) on queue %s", concurrency, config["TASK_QUEUE"])


@worker_shutdown.connect
def _withdraw_merge_slots(**kwargs) -> None:
    global _announcer
    if _announcer is not None:
        _announcer.stop()
        _announcer = None



@shared_task(name=PROCESS_BATCH, bind=True, acks_late=True, max_retries=None)
def process_batch_task(self, batch_id: int, owner: str | None = None, request_id: str | None = None,
                       pending: str | None = None) -> str:
    """Merge one batch; retried soon after a deadlock or a lost connection.

    A retry carries the lease ``owner`` of the attempt it repeats, so it takes its own
    lease back at once instead of waiting for it to expire.  The number of merge attempts
    is capped in the store (``GATEWAY_MAX_ATTEMPTS``), not here.  ``pending``: the tenant's
    pending mark this task was sent for (gateway/smallbatches.py): deleted before anything is
    claimed, and the tenant's queued small batches are claimed even when this one was merged
    already (they were pushed while the mark was set, and sent no task of their own).
    """
    config = current_app.config
    owner = owner or uuid.uuid4().hex
    db = current_app.extensions["gateway.db"]
    if pending is not None:
        smallbatches.release_mark(config, pending)
    retry_kwargs = {"owner": owner, "request_id": request_id} | ({"pending": pending} if pending else {})
    # The push's request id (carried in the task's kwargs) and the batch id on every line of the merge.
    with logs.context(batch_id=batch_id, request_id=request_id), \
            tracing.span("gateway.merge", batch_id=int(batch_id), request_id=request_id) as span:
        started = time.perf_counter()
        try:
            finished = smallbatches.finished_status(db, int(batch_id))
            if finished is not None:  # merged already (in another small batch's task)
                if pending is None:
                    return finished  # nothing to do
                return _merge_pending(db, int(batch_id), config, pending, finished)
            status = process_batch(db, int(batch_id), chunk_size=config["MERGE_CHUNK_SIZE"],
                                   max_rejections=config["MAX_REJECTION_DETAILS"], owner=owner,
                                   max_attempts=config["MAX_ATTEMPTS"], lease_seconds=config["LEASE_SECONDS"],
                                   analyze_after_rows=config["ANALYZE_AFTER_ROWS"],
                                   analyze_after_growth=config["ANALYZE_AFTER_GROWTH"],
                                   parallel=parallel_settings(config))
            if status == "processing":  # a big batch: its chunks are merged by merge_chunk tasks
                log.info("batch %s staged for a parallel merge", batch_id)
                return status
        except TransientError as exc:
            # Soon and often: a restarted database is back within seconds, and the batch with it.
            delay = min(5.0, 0.5 * 2 ** min(self.request.retries, 4)) + random.uniform(0, 0.5)
            log.warning("batch %s hit a transient error, retrying in %.1fs: %s", batch_id, delay, exc)
            raise self.retry(countdown=delay, kwargs=retry_kwargs) from exc
        if status != "busy" or span is not None:
            _observe(db, int(batch_id), status, time.perf_counter() - started, span)
        log.info("batch %s merged: %s", batch_id, status)
    if status == "busy" and pending is not None:  # another worker holds it; the queued ones are ours
        return _merge_pending(db, int(batch_id), config, pending, status)
    # The tenant's other queued small batches, merged here one by one (gateway/smallbatches.py).
    group = [] if status == "busy" else smallbatches.merge_queued(
        db, int(batch_id), config, observe=lambda other, *args: _observe(db, other, *args), enqueue=enqueue,
        more=_more(pending))
    if any(merged in ("succeeded", "partiallySucceeded") for merged in [status, *(s for _, s in group)]):
        from gateway.itsm.tasks import after_merge

        after_merge(db, int(batch_id))  # ITSM tickets follow at once (never fails it), once a group
    return status


def _more(pending: str | None):
    """A group that stopped at ``SMALL_BATCHES_PER_TASK``: a task sent for the tenant's pending mark
    takes the mark again and sends one more task for the batches still queued (none of them sent
    its own).  Without a mark every batch has its task already."""
    if pending is None:
        return None
    return lambda db, last_id: _enqueue(db, last_id, recorded=True, pending=pending, record=False)


def _merge_pending(db, batch_id: int, config, pending: str, status: str) -> str:
    """The claim loop of a task sent for a pending mark whose own batch was merged or held elsewhere."""
    group = smallbatches.merge_queued(db, batch_id, config,
                                      observe=lambda other, *args: _observe(db, other, *args),
                                      enqueue=enqueue, more=_more(pending))
    if any(merged in ("succeeded", "partiallySucceeded") for _, merged in group):
        from gateway.itsm.tasks import after_merge

        after_merge(db, batch_id)
    return status


@shared_task(name=MERGE_CHUNK, bind=True, acks_late=True, max_retries=None)
def merge_chunk_task(self, batch_id: int, seq: int, owner: str | None = None) -> str:
    """Merge one staged chunk of a big batch (gateway/merge/parallel.py); the task that merges
    the last one finishes the batch.  Retried like ``process_batch`` after a transient error."""
    from gateway.merge import parallel

    config = current_app.config
    owner = owner or uuid.uuid4().hex
    db = current_app.extensions["gateway.db"]
    with logs.context(batch_id=batch_id), tracing.span("gateway.merge_chunk", batch_id=int(batch_id),
                                                       chunk=int(seq)):
        started = time.perf_counter()
        try:
            status = parallel.merge_chunk(db, int(batch_id), int(seq), parallel_settings(config), owner=owner)
        except TransientError as exc:
            delay = min(5.0, 0.5 * 2 ** min(self.request.retries, 4)) + random.uniform(0, 0.5)
            log.warning("batch %s chunk %s hit a transient error, retrying in %.1fs: %s", batch_id, seq, delay, exc)
            raise self.retry(countdown=delay, kwargs={"owner": owner}) from exc
    if status in ("succeeded", "partiallySucceeded", "failed"):  # this task finished the batch
        _observe(db, int(batch_id), status, time.perf_counter() - started)
        if status != "failed":
            from gateway.itsm.tasks import after_merge
            from gateway.statistics import analyze_in_background

            analyze_in_background(db, config["ANALYZE_AFTER_ROWS"], config["ANALYZE_AFTER_GROWTH"], int(batch_id))
            after_merge(db, int(batch_id))
    return status


def _observe(db, batch_id: int, status: str, seconds: float, span=None) -> None:
    """The merge's metrics (duration, records merged and rejected) and span attributes."""
    try:
        with db.engine.connect() as conn:
            row = conn.execute(select(Batch.__table__.c.format, Batch.__table__.c.counts,
                                      Batch.__table__.c.tenant_id)
                               .where(Batch.__table__.c.id == batch_id)).first()
    except Exception:  # noqa: BLE001 - metrics never fail a merge
        log.warning("could not read the counts of batch %s for the metrics", batch_id, exc_info=True)
        return
    if row is None:
        return
    if status != "busy":
        metrics.observe_merge(row.format, status, seconds, row.counts)
    if span is not None:
        span.set_attributes(tracing.merge_attributes(status, row.tenant_id, row.format, row.counts))


@shared_task(name="workers.tasks.requeue_unprocessed_batches", acks_late=True)
def requeue_unprocessed_batches() -> int:
    """Find batches left unprocessed (a lost message, a killed worker) and enqueue them again."""
    return requeue(current_app.extensions["gateway.db"], current_app.config["SWEEP_AFTER_SECONDS"])


@shared_task(name="workers.tasks.expire_exemptions", acks_late=True)
def expire_exemptions(now: str | None = None) -> int:
    """End the exemptions whose expiry has passed (beat, every minute); ``now`` (ISO 8601) is
    for tests and replays."""
    return expire_due_exemptions(current_app.extensions["gateway.db"],
                                 datetime.fromisoformat(now) if now else None)


@shared_task(name="workers.tasks.snapshot_finding_history", acks_late=True)
def snapshot_finding_history(today: str | None = None) -> int:
    """Upsert today's open findings per tenant and severity (beat, every ``FINDING_HISTORY_SECONDS``;
    gateway/console/history.py); ``today`` (ISO date) is for tests and replays.  Idempotent."""
    from datetime import date

    from gateway.console.history import snapshot

    with current_app.extensions["gateway.db"].engine.begin() as conn:
        return snapshot(conn, today=date.fromisoformat(today) if today else None)


def expire_due_exemptions(db, now: datetime | None = None) -> int:
    """Each due exemption ends in its own transaction (its tenant's recommendations return to
    their real status, with events and the score recounted); returns how many ended."""
    from gateway.posture import exemptions

    total = 0
    while True:
        with db.engine.begin() as conn:
            ended = exemptions.expire(conn, now, limit=1)
        if not ended:
            return total
        total += len(ended)
        log.info("exemption %s of tenant %s expired", ended[0][1], ended[0][0])


def requeue(db, older_than_seconds: int) -> int:
    """Re-enqueue open batches that nobody is merging and that were not enqueued lately.

    A batch qualifies when it was received and last enqueued more than ``older_than_seconds``
    ago and no worker holds a live lease on it: a merge that runs longer than the sweep
    interval renews its lease and is left alone.  Rows locked by someone else are skipped,
    never waited on.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=older_than_seconds)
    batches = Batch.__table__
    query = select(batches.c.id).where(
        batches.c.status.in_(OPEN_STATUSES),
        batches.c.received_at < cutoff,
        or_(batches.c.enqueued_at.is_(None), batches.c.enqueued_at < cutoff),
        or_(batches.c.lease_expires_at.is_(None), batches.c.lease_expires_at <= now),
    ).order_by(batches.c.id).limit(1000)
    if db.is_postgres:
        query = query.with_for_update(skip_locked=True)
    with db.engine.begin() as conn:
        ids = conn.execute(query).scalars().all()
    for batch_id in ids:
        enqueue(db, batch_id)
    if ids:
        log.info("re-enqueued %d unprocessed batches", len(ids))
    return len(ids)


def enqueue(db, batch_id: int, recorded: bool = False) -> bool:
    """Send the batch's task; record when.  A broker failure is logged: the sweep retries.

    ``recorded``: the batch was stored with ``enqueued_at`` already set (a push, whose 202 then
    waits on one transaction fewer); it is cleared if the send fails."""
    with logs.context(batch_id=batch_id):
        return _enqueue(db, batch_id, recorded)


def _enqueue(db, batch_id: int, recorded: bool = False, task=None, pending: str | None = None,
             record: bool = True) -> bool:
    """Send the batch's task.  ``pending``: the tenant's pending mark (gateway/smallbatches.py):
    nothing is sent when it is set already (a task on its way claims this batch), and the task
    sent carries it.  ``record``: on a failed send, clear ``enqueued_at`` (``recorded``)."""
    if pending is not None and not smallbatches.take_mark(current_app.config, pending):
        return True
    request_id = logs.get("request_id")
    kwargs = {"request_id": request_id} if request_id else {}
    if pending is not None:
        kwargs["pending"] = pending
    try:
        (task or process_batch_task).apply_async(args=[batch_id], kwargs=kwargs)
    except Exception:  # the batch is durable; the periodic sweep enqueues it again
        log.exception("could not enqueue batch %s", batch_id)
        if pending is not None:  # the next push sends a task again
            smallbatches.release_mark(current_app.config, pending)
        if recorded and record:
            _record_enqueued(db, batch_id, None)
        return False
    if not recorded:
        _record_enqueued(db, batch_id, utcnow())
    return True


def enqueue_soon(app, db, batch_id: int, recorded: bool = False, pending: str | None = None) -> None:
    """:func:`enqueue` from this process's publisher thread (:class:`Publisher`), so that a push's
    202 does not wait on the broker; at once where tasks run eagerly, ``ENQUEUE_IN_BACKGROUND``
    is off, or tracing is on (the task's producer span then stays inside the request's trace, as
    gateway/tracing.py describes it)."""
    if (app.config.get("TASK_ALWAYS_EAGER") or not app.config.get("ENQUEUE_IN_BACKGROUND", True)
            or tracing.is_on()):
        with logs.context(batch_id=batch_id):
            _enqueue(db, batch_id, recorded, pending=pending)
        return
    publisher = app.extensions.get("gateway.publisher")
    if publisher is None:
        publisher = app.extensions.setdefault("gateway.publisher", Publisher(app, db))
    publisher.submit(batch_id, recorded, logs.get("request_id"), pending)


class Publisher:
    """Sends the tasks of the batches an API process stored, from a thread of its own.

    A push is answered ``202`` once its batch is committed; sending its task (a Redis ``LPUSH``
    through Celery and kombu, a round trip and a millisecond or two of Python) is done here,
    after the answer, by one thread per API process, the tasks in the order their batches were
    stored.  Nothing accepted can be lost on the way: the batch is durable and stored with
    ``enqueued_at`` set, and when the send fails (the broker is down) or never happens (the
    process dies with the task still queued here) the sweep (``requeue``, every
    ``SWEEP_INTERVAL``) sends it once ``SWEEP_AFTER_SECONDS`` have passed since the batch was
    received.  At exit the process waits a few seconds for the tasks still queued here.
    The thread is started on first use in each process (so after gunicorn's fork)."""

    EXIT_WAIT_SECONDS = 5.0

    def __init__(self, app, db) -> None:
        self.app, self.db = app, db
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.unsent = 0
        self.pid: int | None = None

    def submit(self, batch_id: int, recorded: bool, request_id: str | None,
               pending: str | None = None) -> None:
        with self.lock:
            if self.pid != os.getpid():  # first use in this process
                self.pid, self.queue, self.unsent = os.getpid(), queue.SimpleQueue(), 0
                threading.Thread(target=self._run, args=(self.queue,), name="task-publisher",
                                 daemon=True).start()
                atexit.register(self.flush, self.EXIT_WAIT_SECONDS)
            self.unsent += 1
            self.queue.put((batch_id, recorded, request_id, pending))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every task submitted so far was sent (or given to the sweep); whether it was."""
        with self.idle:
            return self.idle.wait_for(lambda: self.unsent == 0, timeout)

    def _run(self, items: queue.SimpleQueue) -> None:
        with self.app.app_context():
            task = self.app.extensions["celery"].tasks[PROCESS_BATCH]
            while True:
                batch_id, recorded, request_id, pending = items.get()
                try:
                    with logs.context(batch_id=batch_id, request_id=request_id):
                        _enqueue(self.db, batch_id, recorded, task, pending)
                except Exception:  # noqa: BLE001 - the sweep sends it; the thread goes on
                    log.exception("could not enqueue batch %s", batch_id)
                finally:
                    with self.idle:
                        self.unsent -= 1
                        if not self.unsent:
                            self.idle.notify_all()


def _record_enqueued(db, batch_id: int, when) -> None:
    batches = Batch.__table__
    target = select(batches.c.id).where(batches.c.id == batch_id)
    if db.is_postgres:  # a row being finished by a merge is skipped, not waited on
        target = target.with_for_update(skip_locked=True)
    try:
        with db.engine.begin() as conn:
            conn.execute(update(batches).where(batches.c.id.in_(target)).values(enqueued_at=when))
    except Exception:  # noqa: BLE001 - the time is only a hint for the sweep
        log.warning("could not record when batch %s was enqueued", batch_id, exc_info=True)


@shared_task(name="workers.tasks.sweep_incomplete_uploads", acks_late=True)
def sweep_incomplete_uploads() -> int:
    """Streamed pushes whose bytes stopped arriving end ``failed``; expired multipart uploads are deleted."""
    from gateway import streaming, uploads

    db = current_app.extensions["gateway.db"]
    return streaming.fail_abandoned(db) + uploads.delete_expired(db)
