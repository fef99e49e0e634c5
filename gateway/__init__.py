"""The partner integration gateway: Flask application factory."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from gateway.config import load_config
from gateway.db import Database


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the WSGI application: defaults, then GATEWAY_* variables, then ``config``."""
    app = Flask(__name__)
    app.config.update(load_config(config))
    app.config["MAX_CONTENT_LENGTH"] = None  # the ingest view enforces its own limit, with a JSON 413
    app.json.sort_keys = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    db = Database(app.config["DATABASE_URL"])
    app.extensions["gateway.db"] = db

    from gateway import auth, errors
    from gateway.api import init_app as init_api
    from workers.celery_app import celery_init_app

    errors.init_app(app)
    auth.init_app(app)
    init_api(app)
    celery_init_app(app)
    return app
