"""The partner integration gateway: Flask application factory."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, g, request

from gateway import logs, tracing
from gateway.config import check_startup, load_config, startup_line, unknown_environment_names
from gateway.db import Database

log = logging.getLogger(__name__)
_warned: set[str] = set()


def create_app(config: dict[str, Any] | None = None, role: str = "api") -> Flask:
    """Build the WSGI application: defaults, then GATEWAY_* variables, then ``config``.

    ``role`` is "api" or "worker" (``workers.app``): both check their settings and log one
    line of what they use; a misconfiguration raises :class:`gateway.config.ConfigError`.
    """
    app = Flask(__name__)
    app.config.update(load_config(config))
    app.config["MAX_CONTENT_LENGTH"] = None  # the ingest view enforces its own limit, with a JSON 413
    app.json.sort_keys = False
    app.config["OTEL_ON"] = tracing.configure(app.config, role)  # imports opentelemetry only when on
    logs.configure(app.config["LOG_FORMAT"], app.config["LOG_LEVEL"])
    for name in unknown_environment_names():
        if name not in _warned:
            _warned.add(name)
            log.warning("unknown setting %s ignored (see the README's settings table)", name)
    check_startup(app.config, role)
    log.info(startup_line(app.config, role))

    db = Database(app.config["DATABASE_URL"])
    app.extensions["gateway.db"] = db

    from sqlalchemy.orm import configure_mappers

    from gateway import auth, errors, metrics, ratelimit
    from gateway.api import init_app as init_api
    from workers.celery_app import celery_init_app

    tracing.init_app(app)  # before the request context: its server span is current in our hooks
    _init_request_context(app)
    metrics.init_app(app)
    errors.init_app(app)
    ratelimit.init_app(app)
    auth.init_app(app)
    init_api(app)
    if role == "api":
        from gateway import console

        console.init_app(app)  # the web console (issue 15), after errors: its HTML pages wrap the JSON ones
    celery_init_app(app)
    # the ORM's mappers are configured once per process; done here, the first request of each API
    # process (under load, hundreds of milliseconds) does not pay for it
    configure_mappers()
    return app


def _init_request_context(app: Flask) -> None:
    """The request id (``X-Request-Id`` in and out), tenant and client id on every log line."""

    @app.before_request
    def _bind_ids():
        request_id = logs.valid_request_id(request.headers.get("X-Request-Id")) or logs.new_request_id()
        g.request_id = request_id
        tenant = (request.view_args or {}).get("tenant")
        g.log_tokens = logs.bind(request_id=request_id, tenant=tenant, batch_id=None, client_id=None)
        tracing.set_attributes(request_id=request_id, tenant=tenant)

    @app.after_request
    def _return_id(response):
        if "request_id" in g:
            response.headers["X-Request-Id"] = g.request_id
        return response

    @app.teardown_request
    def _unbind_ids(exc=None):
        tokens = g.pop("log_tokens", None)
        if tokens:
            logs.unbind(tokens)
