"""The kept count of a provider's findings (migration 0026, gateway/provider_counts.py) stays equal
to counting them, on every path that writes sources, and under concurrent transactions.

``$count`` of findings with exactly ``sources/any(s: s/provider eq 'P')`` is answered from it on
PostgreSQL (its triggers keep it); SQLite counts as before (tests/test_plans.py covers both).
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from sqlalchemy import select, text

from gateway import statistics
from gateway.models import Tenant
from gateway.provider_counts import compact, findings_of
from tests.conftest import Gateway, make_app, wipe
from tests.factories import document, finding
from tests.test_merge import push
from tests.test_score_paths import ALL, SEC, _post, _resources


@pytest.fixture
def pg_gw(pg_url):
    """PostgreSQL (the triggers' store), merging pushes inline (the worker's code path)."""
    app = make_app(pg_url, eager=True)
    wipe(app.extensions["gateway.db"])
    yield Gateway(app)
    app.extensions["gateway.db"].dispose()


def _tenant_id(gw, tenant: str) -> int:
    with gw.db.sessions() as session:
        return session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))


def _check(gw, tenant: str, headers: dict, context: str) -> dict[str, int]:
    """The kept count of every provider equals the distinct findings of its sources, and $count."""
    tenant_id = _tenant_id(gw, tenant)
    with gw.db.engine.connect() as conn:
        counted = dict(
            conn.execute(
                text(
                    "SELECT provider, count(DISTINCT finding_id) FROM finding_sources "
                    "WHERE tenant_id = :t GROUP BY 1"
                ),
                {"t": tenant_id},
            ).all()
        )
        kept = {provider: findings_of(conn, tenant_id, provider) for provider in counted}
        stray = conn.execute(
            text(
                "SELECT provider, sum(findings) FROM provider_finding_counts WHERE tenant_id = :t GROUP BY 1"
            ),
            {"t": tenant_id},
        ).all()
    assert kept == counted, context
    assert {provider: total for provider, total in stray if total} == {
        p: n for p, n in counted.items() if n
    }, context
    for provider, expected in counted.items():
        body = gw.http.get(
            SEC.format(tenant) + "findings",
            headers=headers,
            query_string={
                "$filter": f"sources/any(s: s/provider eq '{provider}')",
                "$count": "true",
                "$top": "1",
            },
        ).get_json()
        assert body["@odata.count"] == expected, (context, provider)
    return counted


def test_the_kept_count_follows_pushes_resolves_merges_splits_and_deletes(pg_gw):
    gw = pg_gw
    tenant = gw.tenant()
    contoso = gw.partner("Contoso", [tenant], scopes=ALL)
    tenable = gw.partner("Tenable", [tenant], scopes=ALL)
    push(
        gw,
        tenant,
        contoso,
        document(
            [
                finding("f-1", resource={"fqdn": "a.example.com"}),
                finding("f-1b", resource={"fqdn": "a.example.com"}),  # a second source of f-1's finding
                finding("f-2", cves=["CVE-2023-4863"], resource={"agentId": "X-1"}),
                finding("f-3", resource={"agentId": "X-1"}),
                finding("f-4", cves=["CVE-2022-0001"], resource={"fqdn": "lonely.example.com"}),
            ]
        ),
    )
    assert _check(gw, tenant, contoso, "pushed") == {"Contoso": 3 + 1 - 0}
    push(
        gw,
        tenant,
        tenable,
        document(
            [
                finding("t-1", resource={"fqdn": "a.example.com"}),
                finding("t-9", cves=["CVE-2020-0009"], resource={"fqdn": "b.example.com"}),
            ]
        ),
    )
    assert _check(gw, tenant, contoso, "second provider") == {"Contoso": 4, "Tenable": 2}
    # a full scan that omits most: sources are resolved, not removed; the count holds
    push(
        gw,
        tenant,
        contoso,
        document(
            [finding("f-4", cves=["CVE-2022-0001"], resource={"fqdn": "lonely.example.com"})], scan="full"
        ),
    )
    _check(gw, tenant, contoso, "full scan")
    # an admin merge: the findings of one CVE on both resources become one
    names = _resources(gw, tenant)
    _post(
        gw,
        tenant,
        contoso,
        f"resources/{names['a.example.com']}/merge",
        {"resourceIds": [names["x-1"], names["lonely.example.com"]]},
        200,
    )
    assert _check(gw, tenant, contoso, "merged") == {"Contoso": 3, "Tenable": 2}
    push(
        gw,
        tenant,
        contoso,
        document(
            [finding("f-5", cves=["CVE-2021-44228"], resource={"fqdn": "a.example.com", "agentId": "X-1"})]
        ),
    )
    _check(gw, tenant, contoso, "pushed again")
    (resource,) = [
        r
        for r in gw.http.get(SEC.format(tenant) + "resources", headers=contoso).get_json()["value"]
        if r["id"] == str(names["a.example.com"])
    ]
    agent_only = [s["id"] for s in resource["sources"] if s["identifiers"] == {"agentId": ["contoso:x-1"]}]
    _post(gw, tenant, contoso, f"resources/{names['a.example.com']}/split", {"sourceIds": agent_only}, 201)
    _check(gw, tenant, contoso, "split")
    assert statistics.wait_for_analysis()  # (the worker's statistics round compacts too)
    with gw.db.engine.begin() as conn:
        compact(conn)
        rows = conn.execute(
            text("SELECT provider, count(*) FROM provider_finding_counts WHERE tenant_id = :t GROUP BY 1"),
            {"t": _tenant_id(gw, tenant)},
        ).all()
    assert sorted(rows) == [("Contoso", 1), ("Tenable", 1)]  # folded: one row each, the sums stay
    before = _check(gw, tenant, contoso, "compacted")
    # a finding deleted (its sources go with it, by cascade)
    with gw.db.engine.begin() as conn:
        conn.execute(
            text(
                "DELETE FROM findings WHERE id = (SELECT min(finding_id) FROM finding_sources "
                "WHERE tenant_id = :t AND provider = 'Tenable')"
            ),
            {"t": _tenant_id(gw, tenant)},
        )
    after = _check(gw, tenant, contoso, "deleted")  # (f-1's finding: Tenable's and Contoso's)
    assert (after["Tenable"], after["Contoso"]) == (before["Tenable"] - 1, before["Contoso"] - 1)


def test_concurrent_transactions_keep_the_count_exact(pg_gw, pg_url):
    """Two transactions add the first source of a provider to one finding at once, then two remove
    the last two at once: the second of each waits for the first, and counts what it committed."""
    gw = pg_gw
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant], scopes=ALL)
    push(gw, tenant, headers, document([finding("f-1", resource={"fqdn": "a.example.com"})]))
    tenant_id = _tenant_id(gw, tenant)
    with gw.db.engine.connect() as conn:
        finding_id, resource_id = conn.execute(
            text("SELECT id, resource_id FROM findings WHERE tenant_id = :t"), {"t": tenant_id}
        ).one()
    insert = (
        "INSERT INTO finding_sources (tenant_id, finding_id, resource_id, provider, provider_id, "
        "correlation_key, state, title, severity, provider_timestamp, created_at, updated_at, content_hash, "
        "\"references\") VALUES (%s, %s, %s, 'Racer', %s, 'CVE-2024-3094', 'open', 't', 'high', now(), "
        "now(), now(), 'x', '[]')"
    )
    delete = "DELETE FROM finding_sources WHERE tenant_id = %s AND provider = 'Racer' AND provider_id = %s"

    def race(statement: str, first: tuple, second: tuple) -> None:
        with psycopg.connect(pg_url) as one, psycopg.connect(pg_url) as two:
            one.execute(statement, first)
            done = threading.Event()

            def other() -> None:
                two.execute(statement, second)  # waits for one's row of provider_findings
                two.commit()
                done.set()

            thread = threading.Thread(target=other)
            thread.start()
            assert not done.wait(1.0)  # it waits for one (the wait only lets it get there)
            one.commit()
            thread.join(30)
            assert done.is_set()

    race(insert, (tenant_id, finding_id, resource_id, "r-1"), (tenant_id, finding_id, resource_id, "r-2"))
    with gw.db.engine.connect() as conn:
        assert findings_of(conn, tenant_id, "Racer") == 1
    race(delete, (tenant_id, "r-1"), (tenant_id, "r-2"))
    with gw.db.engine.connect() as conn:
        assert findings_of(conn, tenant_id, "Racer") == 0
        assert (
            conn.execute(
                text("SELECT sources FROM provider_findings WHERE tenant_id = :t AND provider = 'Racer'"),
                {"t": tenant_id},
            ).scalar_one()
            == 0
        )
    _check(gw, tenant, headers, "after the races")
