"""Celery beat tasks of detection (gateway/detection/): rule evaluation and event partitions."""

from __future__ import annotations

from celery import shared_task
from flask import current_app

EVALUATE = "workers.detection_tasks.evaluate_rules"
MAINTAIN = "workers.detection_tasks.maintain_event_partitions"


@shared_task(name=EVALUATE, acks_late=True)
def evaluate_rules() -> int:
    """Every tenant's enabled rules over the rows since their watermarks; how many hits were raised.

    Safe to run twice or concurrently: a (tenant, rule) is evaluated under its watermark row's lock
    (PostgreSQL), and a hit is one alert whatever the number of runs that find it.
    """
    from gateway.detection.engine import evaluate_all

    results = evaluate_all(current_app.extensions["gateway.db"].engine)
    return sum(sum(found.values()) for found in results.values())


@shared_task(name=MAINTAIN, acks_late=True)
def maintain_event_partitions() -> dict:
    """Create the security event partitions ahead; drop (PostgreSQL) or delete (SQLite) expired days."""
    from gateway.detection.events import maintain

    return maintain(
        current_app.extensions["gateway.db"].engine, int(current_app.config["SECURITY_EVENT_RETENTION_DAYS"])
    )
