"""Entry point for ``celery -A workers.app worker``: builds the app from the environment."""

from gateway import create_app

flask_app = create_app()
celery = flask_app.extensions["celery"]
