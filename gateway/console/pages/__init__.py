"""The console's working pages, one blueprint each, at /console/t/<tenant>/<page> (gateway/console
registers every blueprint of ``BLUEPRINTS``)."""

from __future__ import annotations

from gateway.console.pages import admin, alerts, findings, ingestion, recommendations, resources
from gateway.console.pages.common import install

BLUEPRINTS = [
    recommendations.blueprint,
    findings.blueprint,
    resources.blueprint,
    alerts.blueprint,
    ingestion.blueprint,
    admin.blueprint,
]

for _blueprint in BLUEPRINTS:
    install(_blueprint)
