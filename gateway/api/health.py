"""Liveness (the process is up) and readiness (store reachable and migrated, broker reachable)."""

from __future__ import annotations

import logging
from functools import cache

from flask import Blueprint, current_app, jsonify
from sqlalchemy import text

blueprint = Blueprint("health", __name__)
log = logging.getLogger(__name__)
BROKER_TIMEOUT = 1.0


@blueprint.get("/healthz")
def healthz():
    """The process is up."""
    return jsonify({"status": "ok"})


@cache
def head_revision() -> str | None:
    """The newest migration shipped with the package."""
    from alembic.script import ScriptDirectory

    from gateway.migrate import MIGRATIONS, alembic_config

    config = alembic_config("sqlite://")
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def check_store(engine) -> tuple[str, str | None]:
    """("up" | "down" | "unmigrated", the store's revision)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        revision = MigrationContext.configure(conn).get_current_revision()
    return ("up" if revision == head_revision() else "unmigrated"), revision


def check_broker(url: str, timeout: float = BROKER_TIMEOUT) -> None:
    """Raise unless the broker answers within ``timeout``: a Redis PING, or a kombu connection."""
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)


@blueprint.get("/readyz")
def readyz():
    """Ready when the store answers and is at the shipped migration, and the broker answers."""
    checks: dict[str, str] = {}
    try:
        checks["database"], revision = check_store(current_app.extensions["gateway.db"].engine)
        checks["migrations"] = "current" if checks["database"] == "up" else f"behind ({revision or 'none'})"
        checks["database"] = "up"
    except Exception as exc:  # noqa: BLE001
        log.warning("readiness: the store does not answer: %s", exc)
        checks["database"] = "down"
        checks["migrations"] = "unknown"
    try:
        check_broker(current_app.config["BROKER_URL"])
        checks["broker"] = "up"
    except Exception as exc:  # noqa: BLE001
        log.warning("readiness: the broker does not answer: %s", exc)
        checks["broker"] = "down"
    ready = checks["database"] == "up" and checks["migrations"] == "current" and checks["broker"] == "up"
    if not ready:
        failed = [name for name, state in checks.items() if state not in ("up", "current")]
        return jsonify({"status": "unavailable", "checks": checks, "failed": failed}), 503
    return jsonify({"status": "ready", "checks": checks})
