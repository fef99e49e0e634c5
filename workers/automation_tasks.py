"""Celery tasks of workflow automation (gateway/automation/) and snapshots (gateway/export/snapshot.py).

Each takes ids and is safe to run twice: a rule's run and a snapshot job take a lease first (a
second task finds it held and returns), and each action is recorded once per (rule, event, action).
The beat task re-enqueues rules and jobs whose task was lost once their lease is free.
"""

from __future__ import annotations

import logging
import uuid

from celery import shared_task
from flask import current_app

from gateway.automation import runner
from gateway.export import snapshot

log = logging.getLogger(__name__)


@shared_task(name="workers.automation_tasks.dispatch_automations", acks_late=True)
def dispatch_automations() -> int:
    """Sequence the new events; enqueue each rule with events to act on, and each due snapshot (beat)."""
    rules, jobs = runner.dispatch(
        current_app.extensions["gateway.db"], current_app.config, send_rule, send_snapshot
    )
    return len(rules) + len(jobs)


@shared_task(name="workers.automation_tasks.run_automation", acks_late=True)
def run_automation(rule_id: int) -> dict:
    """Run one rule over the events after its cursor, until done, failed or half its lease passed."""
    result = runner.run_rule(
        current_app.extensions["gateway.db"], current_app.config, int(rule_id), owner=uuid.uuid4().hex
    )
    if result["fired"] or result["status"] not in ("idle", "busy"):
        log.info("automation rule %s: %s, %d events acted on", rule_id, result["status"], result["fired"])
    return result


@shared_task(name="workers.automation_tasks.run_snapshot", acks_late=True)
def run_snapshot(snapshot_id: int) -> dict:
    """Deliver a snapshot job from where it stands; after a failure, again once its backoff passed."""
    result = snapshot.run(current_app.extensions["gateway.db"], current_app.config, int(snapshot_id))
    if result["status"] in ("failed", "budget"):
        send_snapshot(int(snapshot_id), countdown=result.get("retryIn") or 0.0)
    return result


def send_rule(rule_id: int) -> None:
    run_automation.apply_async(args=[rule_id])


def send_snapshot(snapshot_id: int, countdown: float | None = None) -> None:
    """Enqueue a snapshot job (the beat enqueues it again if this is lost)."""
    try:
        run_snapshot.apply_async(args=[snapshot_id], countdown=countdown)
    except Exception:  # noqa: BLE001 - the beat task sends it again
        log.warning("could not enqueue snapshot %s", snapshot_id, exc_info=True)
