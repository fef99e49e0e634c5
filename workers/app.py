"""Entry point for ``celery -A workers.app worker``: builds the app from the environment."""

import sys

from celery.signals import setup_logging

from gateway import create_app, logs
from gateway.config import ConfigError


@setup_logging.connect
def _gateway_logging(loglevel=None, **kwargs):
    """Celery leaves the logging to us: the gateway's JSON or text lines, with the batch ids."""
    logs.configure(flask_app.config["LOG_FORMAT"], flask_app.config["LOG_LEVEL"])


try:
    flask_app = create_app(role="worker")
except ConfigError as exc:
    print(f"gateway worker: {exc}", file=sys.stderr)
    raise SystemExit(2) from None
celery = flask_app.extensions["celery"]
