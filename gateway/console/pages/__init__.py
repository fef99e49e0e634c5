"""The console's pages beyond sign-in and the overview: each module here has a blueprint.

``gateway.console.init_app`` registers every blueprint listed in ``BLUEPRINTS``; their URLs live
under ``/console/t/<tenant>/...`` and their views are guarded by
``gateway.console.auth.login_required``.
"""

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
