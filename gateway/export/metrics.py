"""Prometheus metrics of continuous export, per destination (served by ``GET /metrics``).

Counted by the process that delivers (a worker; aggregated with ``PROMETHEUS_MULTIPROC_DIR``):

* ``gateway_export_events_delivered_total{kind, destination}``: events a destination accepted;
* ``gateway_export_delivery_failures_total{kind, destination}``: failed delivery attempts;
* ``gateway_export_delivery_lag_seconds{kind}``: for each delivered event, the time from its
  commit in the store (the event's time) to the receiver's answer.

Read from the store at scrape time (right whichever process delivered):

* ``gateway_export_pending_events{tenant, destination, kind, state}``: events after the
  destination's cursor (before its filter; counted up to 10,000);
* ``gateway_export_lag_seconds{tenant, destination, kind, state}``: the age of the oldest of them
  (0 when it is caught up).
"""

from __future__ import annotations

import logging
from datetime import datetime

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select

log = logging.getLogger(__name__)

DELIVERED = Counter(
    "gateway_export_events_delivered_total", "Events delivered, per destination", ["kind", "destination"]
)
FAILURES = Counter(
    "gateway_export_delivery_failures_total",
    "Failed delivery attempts, per destination",
    ["kind", "destination"],
)
LAG = Histogram(
    "gateway_export_delivery_lag_seconds",
    "Seconds from an event's commit to its delivery",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400),
)


def observe(kind: str, destination_id: int, ok: bool, events: list[dict], now: datetime) -> None:
    """Count one delivery attempt of ``events`` (rendered: their ``timestamp`` is the commit time)."""
    if not ok:
        FAILURES.labels(kind, str(destination_id)).inc()
        return
    DELIVERED.labels(kind, str(destination_id)).inc(len(events))
    for event in events:
        try:
            at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        except (KeyError, AttributeError, ValueError):
            continue
        if at.tzinfo is None and now.tzinfo is not None:
            at = at.replace(tzinfo=now.tzinfo)
        elif at.tzinfo is not None and now.tzinfo is None:
            at = at.replace(tzinfo=None)
        LAG.labels(kind).observe(max(0.0, (now - at).total_seconds()))


class ExportCollector:
    """Per destination: the events waiting and the age of the oldest, read from the store."""

    def __init__(self, app) -> None:
        self.app = app

    def collect(self):
        from gateway.export import delivery
        from gateway.models import ExportDestination, Tenant, utcnow

        dest, ten = ExportDestination.__table__, Tenant.__table__
        pending = GaugeMetricFamily(
            "gateway_export_pending_events",
            "Events after a destination's cursor (before its filter, up to 10,000)",
            labels=["tenant", "destination", "kind", "state"],
        )
        lag = GaugeMetricFamily(
            "gateway_export_lag_seconds",
            "Age of the oldest event a destination has not passed yet (0: caught up)",
            labels=["tenant", "destination", "kind", "state"],
        )
        try:
            with self.app.extensions["gateway.db"].engine.connect() as conn:
                now = utcnow()
                rows = conn.execute(
                    select(dest, ten.c.external_id.label("tenant"))
                    .join(ten, ten.c.id == dest.c.tenant_id)
                    .order_by(dest.c.id)
                ).all()
                for row in rows:
                    status = delivery.lag(conn, row, now)
                    labels = [row.tenant, str(row.id), row.kind, row.state]
                    pending.add_metric(labels, status["pending_events"])
                    lag.add_metric(labels, status["lag_seconds"])
        except Exception as exc:  # noqa: BLE001 - a scrape still answers the other metrics
            log.warning("metrics: the export status could not be read: %s", exc)
            return
        yield pending
        yield lag
