"""Continuous export: the outbox (``lifecycle_events`` in commit order), destinations of a registry of
kinds (``webhook`` first), delivery by Celery tasks at least once and in order, replay.

``events`` (event types, the sequencer, retention), ``kinds`` (the registry, outbound URL checks),
``webhook`` (Standard Webhooks), ``subjects`` (rendering and filtering subjects), ``secrets``
(encrypted at rest), ``delivery`` (dispatch, the delivery loop, retries, test, replay, lag).
"""
