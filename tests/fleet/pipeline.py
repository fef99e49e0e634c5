"""Push a fleet through the real pipeline and read the store back through the read API.

Pushes go through the app's ingest API (``POST /api/v1/tenants/<t>/batches?format=...``)
with one OAuth client per provider, as partners push; with ``TASK_ALWAYS_EAGER`` the app
runs ``gateway.pipeline.process_batch`` inline, the same code path as the worker's task.
The store is read through the Graph-style API (``/security/findings`` with sources,
``/security/resources``, ``/security/recommendations``), following ``@odata.nextLink``.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit

from gateway.auth import hash_secret
from gateway.models import ClientTenant, OAuthClient, Tenant
from tests.fleet.generate import Fleet, FleetFile

SCOPES = "findings.write security.read"
# Push orders the tests and the command line use: KB before / after the detections, Nessus
# before / after Tenable.io, ASFF first / last.
ORDERS: dict[str, tuple[str, ...]] = {
    "kb-first.nessus-first.asff-first": ("asff", "qualys_kb", "qualys_hld", "nessus", "tenable_io", "ocsf"),
    "kb-last.tio-first.asff-last": ("qualys_hld", "tenable_io", "nessus", "ocsf", "qualys_kb", "asff"),
    "mixed": ("ocsf", "nessus", "qualys_hld", "asff", "tenable_io", "qualys_kb"),
}


class Pusher:
    """Tenants, OAuth clients per provider, pushes and reads against one app."""

    def __init__(self, app) -> None:
        self.app = app
        self.db = app.extensions["gateway.db"]
        self.http = app.test_client()

    def tenant(self) -> str:
        external_id = f"fleet-{uuid.uuid4().hex[:8]}"
        with self.db.session() as session:
            session.add(Tenant(external_id=external_id, name=external_id))
        return external_id

    def headers(self, provider: str, tenant: str) -> dict[str, str]:
        client_id, secret = uuid.uuid4().hex, uuid.uuid4().hex + uuid.uuid4().hex
        with self.db.session() as session:
            row = OAuthClient(
                client_id=client_id,
                secret_hash=hash_secret(secret),
                name=provider,
                provider=provider,
                scope=SCOPES,
            )
            session.add(row)
            session.flush()
            tenant_row = session.query(Tenant).filter_by(external_id=tenant).one()
            session.add(ClientTenant(client_pk=row.id, tenant_id=tenant_row.id))
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        response = self.http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {basic}"},
        )
        assert response.status_code == 200, response.get_json()
        return {"Authorization": f"Bearer {response.get_json()['access_token']}"}

    def push(self, tenant: str, headers: dict[str, str], fleet_file: FleetFile) -> dict:
        response = self.http.post(
            f"/api/v1/tenants/{tenant}/batches?format={fleet_file.format}",
            data=fleet_file.body,
            headers=headers | {"Content-Type": fleet_file.content_type},
        )
        assert response.status_code == 202, response.get_json()
        batch = self.http.get(
            f"/api/v1/tenants/{tenant}/batches/{response.get_json()['id']}", headers=headers
        )
        body = batch.get_json()
        assert body["status"] == "succeeded", (fleet_file.name, body)
        return body

    def push_fleet(self, fleet: Fleet, order: Sequence[str]) -> tuple[str, dict[str, str]]:
        """Push the fleet's files in ``order`` (format names) into a fresh tenant: (tenant, read headers)."""
        tenant = self.tenant()
        clients: dict[str, dict[str, str]] = {}
        files = {f.format: f for f in fleet.files}
        assert sorted(order) == sorted(files), order
        for format_name in order:
            fleet_file = files[format_name]
            if fleet_file.provider not in clients:
                clients[fleet_file.provider] = self.headers(fleet_file.provider, tenant)
            self.push(tenant, clients[fleet_file.provider], fleet_file)
        reader = next(iter(clients.values()))
        return tenant, reader

    def read(self, tenant: str, headers: dict[str, str], collection: str) -> list[dict]:
        """Every item of a collection, following @odata.nextLink."""
        url = f"/api/v1/tenants/{tenant}/security/{collection}?$top=1000"
        items: list[dict] = []
        while url:
            response = self.http.get(url, headers=headers)
            assert response.status_code == 200, response.get_json()
            body = response.get_json()
            items += body["value"]
            link = body.get("@odata.nextLink")
            url = None
            if link:
                parts = urlsplit(link)
                url = parts.path + ("?" + parts.query if parts.query else "")
        return items
