"""Liveness and readiness."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz():
    """The process is up."""
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz():
    """The store answers."""
    try:
        with current_app.extensions["gateway.db"].engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:
        current_app.logger.exception("readiness check failed")
        return jsonify({"status": "unavailable", "checks": {"database": "down"}}), 503
    return jsonify({"status": "ready", "checks": {"database": "up"}})
