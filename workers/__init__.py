"""Celery application and tasks of the gateway."""
