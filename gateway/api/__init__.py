"""HTTP API: ingest, batches, collections, workflow."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from gateway.api import (
        assessments,
        batches,
        collections,
        discovery,
        exports,
        governance,
        health,
        itsm,
        metadata,
        posture,
        resources,
        score,
    )
    from gateway.api import suppression as suppression_rules

    app.register_blueprint(batches.blueprint)
    app.register_blueprint(collections.blueprint)
    app.register_blueprint(resources.blueprint)
    app.register_blueprint(health.blueprint)
    app.register_blueprint(assessments.blueprint)
    app.register_blueprint(discovery.blueprint)
    app.register_blueprint(metadata.blueprint)
    app.register_blueprint(score.blueprint)
    app.register_blueprint(posture.blueprint)
    app.register_blueprint(suppression_rules.blueprint)
    app.register_blueprint(governance.blueprint)
    app.register_blueprint(itsm.blueprint)
    app.register_blueprint(exports.blueprint)
    app.register_blueprint(itsm.webhooks)
    # export snapshots and workflow automation (issue 13 items 3-4)
    from gateway.api import export_snapshots
    from gateway.automation import api as automations

    app.register_blueprint(export_snapshots.blueprint)
    app.register_blueprint(automations.blueprint)

    from gateway.api import uploads  # multipart uploads (gateway/uploads.py)

    app.register_blueprint(uploads.blueprint)

    from gateway.detection import api as detection  # security events, detection rules, KEV (issue 16)

    app.register_blueprint(detection.blueprint)
