"""The Celery app, bound to the Flask app (the Flask docs' ``celery_init_app`` pattern)."""

from __future__ import annotations

import os

from celery import Celery, Task
from flask import Flask


def celery_init_app(app: Flask) -> Celery:
    """Create the Celery app for a Flask app and keep it in ``app.extensions['celery']``."""

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask)
    broker = app.config["BROKER_URL"]
    visibility = int(os.environ.get("GATEWAY_VISIBILITY_TIMEOUT", "3600"))
    celery.conf.update(
        broker_url=broker,
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_always_eager=bool(app.config.get("TASK_ALWAYS_EAGER")),
        task_default_queue=app.config.get("TASK_QUEUE") or "gateway",
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # A push is durable before it is enqueued: fail fast and let the sweep re-enqueue.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5},
        # Redis redelivers an unacknowledged task after this long (a worker died with it).
        broker_transport_options={"visibility_timeout": visibility} if broker.startswith(("redis", "rediss"))
        else {},
        beat_schedule={
            "requeue-unprocessed-batches": {
                "task": "workers.tasks.requeue_unprocessed_batches",
                "schedule": float(os.environ.get("GATEWAY_SWEEP_INTERVAL", "60")),
            },
            "expire-exemptions": {
                "task": "workers.tasks.expire_exemptions",
                "schedule": float(os.environ.get("GATEWAY_EXPIRY_INTERVAL", "60")),
            },
            # ITSM sync: scan every connection's feed, deliver what waits (gateway/itsm/tasks.py)
            "itsm-tick": {
                "task": "gateway.itsm.tick",
                "schedule": float(os.environ.get("GATEWAY_ITSM_INTERVAL", "30")),
            },
            # continuous export (workers/export_tasks.py): sequence events, enqueue deliveries; retention
            "dispatch-exports": {
                "task": "workers.export_tasks.dispatch_exports",
                "schedule": float(app.config.get("EXPORT_DISPATCH_INTERVAL") or 2.0),
                # runs that waited behind a long task are dropped, not piled up: the next one does their work
                "options": {"expires": max(10.0, 5 * float(app.config.get("EXPORT_DISPATCH_INTERVAL") or 2.0))},
            },
            # pushes abandoned mid-body, expired multipart uploads (gateway/streaming.py, uploads.py)
            "sweep-incomplete-uploads": {
                "task": "workers.tasks.sweep_incomplete_uploads",
                "schedule": float(os.environ.get("GATEWAY_SWEEP_INTERVAL", "60")),
            },
            "prune-events": {
                "task": "workers.export_tasks.prune_events",
                "schedule": float(app.config.get("EVENT_PRUNE_INTERVAL") or 3600.0),
            },
            # the console's daily series of open findings by severity (gateway/console/history.py)
            "snapshot-finding-history": {
                "task": "workers.tasks.snapshot_finding_history",
                "schedule": float(app.config.get("FINDING_HISTORY_SECONDS") or 900.0),
                "options": {"expires": float(app.config.get("FINDING_HISTORY_SECONDS") or 900.0)},
            },
            # workflow automation and export snapshots (workers/automation_tasks.py)
            "dispatch-automations": {
                "task": "workers.automation_tasks.dispatch_automations",
                "schedule": float(app.config.get("EXPORT_DISPATCH_INTERVAL") or 2.0),
                "options": {"expires": max(10.0, 5 * float(app.config.get("EXPORT_DISPATCH_INTERVAL") or 2.0))},
            },
            # threat intelligence (workers/intel_tasks.py): TAXII pulls, the matching sweep, expiry
            "pull-indicator-feeds": {
                "task": "workers.intel_tasks.pull_feeds",
                "schedule": float(os.environ.get("GATEWAY_INTEL_PULL_INTERVAL", "60")),
                "options": {"expires": 300.0},
            },
            "sweep-indicator-matches": {
                "task": "workers.intel_tasks.sweep_matches",
                "schedule": float(os.environ.get("GATEWAY_INTEL_SWEEP_INTERVAL", "300")),
            },
            "prune-indicators": {
                "task": "workers.intel_tasks.prune_indicators",
                "schedule": float(os.environ.get("GATEWAY_INTEL_PRUNE_INTERVAL", "3600")),
            },
            # detection (workers/detection_tasks.py): rules over new rows; event partitions and retention
            "evaluate-detection-rules": {
                "task": "workers.detection_tasks.evaluate_rules",
                "schedule": float(app.config.get("DETECTION_INTERVAL") or 60.0),
                "options": {"expires": max(30.0, 2 * float(app.config.get("DETECTION_INTERVAL") or 60.0))},
            },
            "maintain-event-partitions": {
                "task": "workers.detection_tasks.maintain_event_partitions",
                "schedule": 3600.0,
            },
        },
        imports=("workers.tasks", "workers.export_tasks", "gateway.itsm.tasks", "workers.automation_tasks",
                 "workers.intel_tasks", "workers.detection_tasks"),
    )
    celery.set_default()
    app.extensions["celery"] = celery
    return celery
