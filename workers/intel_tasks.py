"""Threat-intelligence beat tasks (gateway/intel/): TAXII pulls, the matching sweep, expiry."""

from __future__ import annotations

import logging
import os

from celery import shared_task
from flask import current_app

log = logging.getLogger(__name__)


@shared_task(name="workers.intel_tasks.pull_feeds", acks_late=True)
def pull_feeds() -> int:
    """Pull every TAXII feed that is due, one after the other; how many were pulled."""
    from gateway.intel import taxii

    db, pulled = current_app.extensions["gateway.db"], 0
    for feed_id in taxii.due_feeds(db):
        try:
            taxii.pull(db, feed_id, current_app.config)
            pulled += 1
        except Exception:  # noqa: BLE001 - recorded on the feed; the others still run
            log.warning("TAXII feed %s not pulled", feed_id, exc_info=True)
    return pulled


@shared_task(name="workers.intel_tasks.sweep_matches", acks_late=True)
def sweep_matches() -> int:
    """Match again the indicators changed lately (two merges that committed together)."""
    from gateway.intel import tasks

    window = int(os.environ.get("GATEWAY_INTEL_SWEEP_WINDOW", "900"))
    return tasks.sweep_recent(current_app.extensions["gateway.db"], window)


@shared_task(name="workers.intel_tasks.prune_indicators", acks_late=True)
def prune_indicators() -> int:
    """Delete the expired indicators, set-based."""
    from gateway.intel import tasks

    return tasks.prune_expired(current_app.extensions["gateway.db"])
