"""Celery tasks: take ids, are idempotent, and are safe to run twice."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from flask import current_app
from sqlalchemy import or_, select, update

from gateway.models import Batch, utcnow
from gateway.pipeline import OPEN_STATUSES, TransientError, process_batch

log = logging.getLogger(__name__)

PROCESS_BATCH = "workers.tasks.process_batch"


@shared_task(name=PROCESS_BATCH, bind=True, acks_late=True, max_retries=None)
def process_batch_task(self, batch_id: int) -> str:
    """Merge one batch; retried with back-off on deadlocks or lost connections."""
    config = current_app.config
    try:
        return process_batch(current_app.extensions["gateway.db"], int(batch_id),
                             chunk_size=config["MERGE_CHUNK_SIZE"],
                             max_rejections=config["MAX_REJECTION_DETAILS"])
    except TransientError as exc:
        delay = min(60, 2 ** min(self.request.retries, 6))
        log.warning("batch %s hit a transient error, retrying in %ss: %s", batch_id, delay, exc)
        raise self.retry(countdown=delay) from exc


@shared_task(name="workers.tasks.requeue_unprocessed_batches", acks_late=True)
def requeue_unprocessed_batches() -> int:
    """Find batches left unprocessed (a lost message, a killed worker) and enqueue them again."""
    return requeue(current_app.extensions["gateway.db"], current_app.config["SWEEP_AFTER_SECONDS"])


def requeue(db, older_than_seconds: int) -> int:
    """Re-enqueue open batches not enqueued or started within ``older_than_seconds``."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    batches = Batch.__table__
    with db.engine.begin() as conn:
        ids = conn.execute(
            select(batches.c.id).where(
                batches.c.status.in_(OPEN_STATUSES),
                or_(batches.c.enqueued_at.is_(None), batches.c.enqueued_at < cutoff),
                or_(batches.c.started_at.is_(None), batches.c.started_at < cutoff),
            ).order_by(batches.c.id).limit(1000)
        ).scalars().all()
    for batch_id in ids:
        enqueue(db, batch_id)
    if ids:
        log.info("re-enqueued %d unprocessed batches", len(ids))
    return len(ids)


def enqueue(db, batch_id: int) -> bool:
    """Send the batch's task; record when.  A broker failure is logged: the sweep retries."""
    try:
        process_batch_task.apply_async(args=[batch_id])
    except Exception:  # the batch is durable; the periodic sweep enqueues it again
        log.exception("could not enqueue batch %s", batch_id)
        return False
    with db.engine.begin() as conn:
        conn.execute(update(Batch.__table__).where(Batch.__table__.c.id == batch_id)
                     .values(enqueued_at=utcnow()))
    return True
