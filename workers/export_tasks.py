"""Celery tasks of continuous export (gateway/export/): dispatch (beat), delivery, retention (beat).

Delivery runs only here, never in a request.  Each task takes ids, and running one twice is
harmless: a delivery task takes the destination's lease first (a second one finds it held and
returns), and the beat re-enqueues a destination whose task was lost once its lease is free.
"""

from __future__ import annotations

import logging
import uuid

from celery import shared_task
from flask import current_app

from gateway.export import delivery
from gateway.export import events as outbox

log = logging.getLogger(__name__)

DELIVER_EXPORT = "workers.export_tasks.deliver_export"


@shared_task(name="workers.export_tasks.dispatch_exports", acks_late=True)
def dispatch_exports() -> int:
    """Sequence the new events and enqueue a delivery per destination that has some due (beat)."""
    sent = delivery.dispatch(
        current_app.extensions["gateway.db"],
        current_app.config,
        lambda destination_id: deliver_export.apply_async(args=[destination_id]),
    )
    return len(sent)


@shared_task(name=DELIVER_EXPORT, acks_late=True)
def deliver_export(destination_id: int) -> dict:
    """Deliver what one destination is owed, in order, until done, failed or half its lease passed."""
    result = delivery.deliver(
        current_app.extensions["gateway.db"], current_app.config, int(destination_id), owner=uuid.uuid4().hex
    )
    if result["delivered"] or result["status"] not in ("idle", "busy"):
        log.info("export %s: %s, %d events delivered", destination_id, result["status"], result["delivered"])
    return result


@shared_task(name="workers.export_tasks.prune_events", acks_late=True)
def prune_events() -> int:
    """Delete the export-only events past the retention that no destination still needs (beat)."""
    return outbox.prune_events(
        current_app.extensions["gateway.db"],
        current_app.config["EVENT_RETENTION_DAYS"],
        max_days=current_app.config["EVENT_RETENTION_MAX_DAYS"],
    )
