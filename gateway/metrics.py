"""Prometheus metrics: ``GET /metrics``.

Process metrics (requests, merges) are prometheus-client metrics; with
``PROMETHEUS_MULTIPROC_DIR`` set (before the processes start) every API and worker process
writes them there and the API aggregates them at scrape time.  The store-derived gauges
(batches by status and format, the age of the oldest open batch) and the queue depth are
read at scrape time by a collector of the API, so they are right whichever process merged.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from datetime import UTC, datetime

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from gateway.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)
blueprint = Blueprint("metrics", __name__)

HTTP_REQUESTS = Counter("gateway_http_requests_total", "HTTP requests answered, by route and status",
                        ["method", "route", "status"])
HTTP_LATENCY = Histogram("gateway_http_request_duration_seconds", "HTTP request latency, by route and status",
                         ["method", "route", "status"])
RECORDS_MERGED = Counter("gateway_records_merged_total", "Records merged by workers (received less rejected)",
                         ["format"])
RECORDS_REJECTED = Counter("gateway_records_rejected_total", "Records rejected by workers", ["format"])
BATCHES_MERGED = Counter("gateway_batches_merged_total", "Batch merges finished, by outcome",
                         ["format", "status"])
MERGE_DURATION = Histogram("gateway_merge_duration_seconds", "Time to merge one batch", ["format"],
                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))


def observe_merge(format_name: str, status: str, seconds: float, counts: dict | None) -> None:
    """Called by the worker task when a merge ends."""
    MERGE_DURATION.labels(format_name).observe(seconds)
    BATCHES_MERGED.labels(format_name, status).inc()
    counts = counts or {}
    rejected = int(counts.get("rejected") or 0)
    merged = max(0, int(counts.get("received") or 0) - rejected)
    RECORDS_MERGED.labels(format_name).inc(merged)
    RECORDS_REJECTED.labels(format_name).inc(rejected)


class StoreCollector:
    """Gauges read from the store and the broker at scrape time (all tenants together)."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self):
        from gateway.models import Batch
        from gateway.pipeline import OPEN_STATUSES

        batches = GaugeMetricFamily("gateway_batches", "Stored batches by status and format",
                                    labels=["status", "format"])
        oldest = GaugeMetricFamily("gateway_oldest_open_batch_age_seconds",
                                   "Age of the oldest batch not yet merged (0 when none)")
        table = Batch.__table__
        db = self.app.extensions["gateway.db"]
        try:
            with db.engine.connect() as conn:
                rows = conn.execute(select(table.c.status, table.c.format, func.count())
                                    .group_by(table.c.status, table.c.format)).all()
                first = conn.execute(select(func.min(table.c.received_at))
                                     .where(table.c.status.in_(OPEN_STATUSES))).scalar()
        except Exception as exc:  # noqa: BLE001 - a scrape still answers the process metrics
            log.warning("metrics: the store did not answer: %s", exc)
        else:
            for status, format_name, count in rows:
                batches.add_metric([status, format_name], count)
            age = 0.0
            if first is not None:
                first = first if first.tzinfo else first.replace(tzinfo=UTC)
                age = max(0.0, (datetime.now(UTC) - first).total_seconds())
            oldest.add_metric([], age)
            yield batches
            yield oldest
        depth = queue_depth(self.app)
        if depth is not None:
            queue = GaugeMetricFamily("gateway_queue_depth", "Tasks waiting in the broker's queue",
                                      labels=["queue"])
            queue.add_metric([self.app.config["TASK_QUEUE"]], depth)
            yield queue


def queue_depth(app: Flask) -> int | None:
    """The Redis list length of the task queue; None for another broker or when Redis does not answer."""
    url = app.config["BROKER_URL"]
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return int(client.llen(app.config["TASK_QUEUE"]))
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001
        log.warning("metrics: the broker did not answer: %s", exc)
        return None


def _loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address((address or "").split("%")[0]).is_loopback
    except ValueError:
        return False


@blueprint.get("/metrics")
def metrics():
    """Prometheus text format; bearer ``GATEWAY_METRICS_TOKEN`` if set, else loopback callers only."""
    token = current_app.config.get("METRICS_TOKEN")
    if token:
        kind, _, value = request.headers.get("Authorization", "").partition(" ")
        if kind.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise Unauthorized("the metrics need the bearer token configured in GATEWAY_METRICS_TOKEN",
                               headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    elif not _loopback(request.remote_addr):
        raise Forbidden("the metrics are served to loopback callers only; set GATEWAY_METRICS_TOKEN "
                        "to serve them to others", code="forbidden")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        processes = CollectorRegistry()
        multiprocess.MultiProcessCollector(processes)
    else:
        processes = REGISTRY
    store = CollectorRegistry(auto_describe=False)
    store.register(StoreCollector(current_app._get_current_object()))
    from gateway.export.metrics import ExportCollector  # per destination: pending events, lag

    store.register(ExportCollector(current_app._get_current_object()))
    return Response(generate_latest(processes) + generate_latest(store), mimetype=CONTENT_TYPE_LATEST)


def _start_timer() -> None:
    g.metrics_started = time.perf_counter()


def _count(response):
    started = g.pop("metrics_started", None)
    if started is not None:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        labels = (request.method, route, str(response.status_code))
        HTTP_REQUESTS.labels(*labels).inc()
        HTTP_LATENCY.labels(*labels).observe(time.perf_counter() - started)
    return response


def init_app(app: Flask) -> None:
    app.before_request(_start_timer)
    app.after_request(_count)
    app.register_blueprint(blueprint)
