"""Observations, not findings: informational items on resources, and migration 0006 moving stored ones."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text

from gateway.db import make_engine
from gateway.migrate import upgrade
from gateway.models import Finding, FindingSource, Observation, ResourceIdentifier
from tests.conftest import scratch_postgres


def push(gw, tenant, headers, body, format):
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format={format}",
        data=body,
        headers=headers | {"Content-Type": "application/xml"},
    )
    assert response.status_code == 202, response.get_json()
    return gw.http.get(
        f"/api/v1/tenants/{tenant}/batches/{response.get_json()['id']}", headers=headers
    ).get_json()


FIXTURE = Path(__file__).parent / "fixtures" / "nessus_v2_xml" / "identity_facts_late.nessus"


def test_a_nessus_file_with_severity_0_items_yields_observations_and_identifiers(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    body = FIXTURE.read_bytes()
    batch = push(gw, tenant, headers, body, format="nessus")
    assert batch["status"] == "succeeded", batch
    informational = body.count(b'severity="0"')
    assert batch["counts"]["observations"] == informational
    with gw.db.sessions() as session:
        # no informational item became a finding
        assert not session.scalars(
            select(FindingSource).where(FindingSource.severity == "informational")
        ).all()
        assert session.scalar(select(Finding.id).limit(1)) is not None  # the real vulnerabilities did
        observations = session.scalars(select(Observation)).all()
        assert len(observations) == informational
        by_plugin = {o.vendor_id: o for o in observations}
        assert by_plugin["12053"].category == "identity"
        assert by_plugin["11936"].category == "os"
        # the FQDN only plugin 12053 gave (the host's tags name none) is an identifier of the resource
        resource_id = by_plugin["12053"].resource_id
        idents = {
            (i.kind, i.value)
            for i in session.scalars(
                select(ResourceIdentifier).where(ResourceIdentifier.resource_id == resource_id)
            )
        }
        assert ("fqdn", "db-1.corp.example.com") in idents
        assert ("ipv4", "10.20.30.40") in idents
    # the read API serves them under the resource, filterable
    url = f"/api/v1/tenants/{tenant}/security/resources/{resource_id}/observations"
    page = gw.http.get(url, query_string={"$filter": "category eq 'os'"}, headers=headers)
    assert page.status_code == 200, page.get_json()
    assert [o["vendorId"] for o in page.get_json()["value"]] == ["11936"]
    # the same file again: nothing new, nothing lost
    again = push(gw, tenant, headers, body, format="nessus")
    assert again["counts"]["created"] == 0 and again["counts"]["observations"] == informational
    with gw.db.sessions() as session:
        assert len(session.scalars(select(Observation)).all()) == informational


# -- migration 0006 on existing data ---------------------------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _seed(url: str) -> None:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:

            def insert(table: str, **values) -> int:
                columns = ", ".join(f'"{name}"' for name in values)
                marks = ", ".join(f":{name}" for name in values)
                return conn.execute(
                    text(f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING id"), values
                ).scalar_one()

            tenant = insert("tenants", external_id="t-0006", name="t", created_at=T0)
            resource = insert(
                "resources",
                tenant_id=tenant,
                kind="host",
                name="db-1",
                created_at=T0,
                updated_at=T0,
                tags="[]",
            )
            for kind, value in (
                ("fqdn", "db-1.example.com"),
                ("agent_id", "abc"),
                ("ip_only", "10.0.0.5"),
                ("ipv4", "10.0.0.5"),
            ):
                conn.execute(
                    text(
                        "INSERT INTO resource_identifiers (tenant_id, kind, value, resource_id) "
                        "VALUES (:t, :k, :v, :r)"
                    ),
                    {"t": tenant, "k": kind, "v": value, "r": resource},
                )
            type_id = insert(
                "recommendation_types",
                tenant_id=tenant,
                key="vulnerability-assessment",
                title="Vulnerabilities",
                kind="vulnerability",
                severity="high",
                categories="[]",
            )
            common = {
                "tenant_id": tenant,
                "resource_id": resource,
                "recommendation_type_id": type_id,
                "kind": "vulnerability",
                "state_changed_at": T0,
                "created_at": T0,
                "updated_at": T0,
                "comments": "[]",
                "tags": "[]",
            }
            info = insert(
                "findings",
                correlation_key="Tenable/19506",
                title="Nessus Scan Information",
                severity="informational",
                state="new",
                **common,
            )
            real = insert(
                "findings",
                correlation_key="CVE-2024-3094",
                cve="CVE-2024-3094",
                title="xz backdoor",
                severity="critical",
                state="resolved",
                **common,
            )
            source = {
                "tenant_id": tenant,
                "resource_id": resource,
                "provider": "Tenable",
                "state": "open",
                "provider_timestamp": T0,
                "content_hash": "x",
                "references": "[]",
                "created_at": T0,
                "updated_at": T0,
            }
            insert(
                "finding_sources",
                finding_id=info,
                provider_id="h|19506|0",
                correlation_key="Tenable/19506",
                vendor_id="19506",
                title="Nessus Scan Information",
                severity="informational",
                evidence="Nessus version : 10.7",
                **source,
            )
            insert(
                "finding_sources",
                finding_id=real,
                provider_id="h|1|0",
                correlation_key="CVE-2024-3094",
                vendor_id="1",
                title="xz backdoor",
                severity="critical",
                **(source | {"state": "fixed"}),
            )
            # Unhealthy only because of the informational finding
            insert(
                "recommendations",
                tenant_id=tenant,
                resource_id=resource,
                type_id=type_id,
                status="Unhealthy",
                severity="informational",
                first_evaluated=T0,
                status_changed_at=T0,
                updated_at=T0,
                comments="[]",
                tags="[]",
            )
    finally:
        engine.dispose()


def _check_0006(url: str) -> None:
    upgrade(url, "0005")
    _seed(url)
    upgrade(url, "0006")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            keys = [row[0] for row in conn.execute(text("SELECT correlation_key FROM findings ORDER BY id"))]
            assert keys == ["CVE-2024-3094"]
            [(name, evidence, vendor)] = conn.execute(
                text("SELECT name, evidence, vendor_id FROM observations")
            ).all()
            assert (name, evidence, vendor) == ("Nessus Scan Information", "Nessus version : 10.7", "19506")
            assert conn.execute(text("SELECT count(*) FROM finding_sources")).scalar_one() == 1
            assert conn.execute(text("SELECT status FROM recommendations")).scalar_one() == "Healthy"
            idents = set(conn.execute(text("SELECT kind, value FROM resource_identifiers")).all())
            assert idents == {
                ("fqdn", "db-1.example.com"),
                ("agent_id", "tenable:abc"),
                ("ipv4", "10.0.0.5"),
                ("name", "db-1"),
            }
    finally:
        engine.dispose()
    upgrade(url)


def test_migration_0006_on_existing_data_on_sqlite(tmp_path):
    _check_0006(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_migration_0006_on_existing_data_on_postgresql():
    with scratch_postgres("gw_m6") as url:
        _check_0006(url)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
