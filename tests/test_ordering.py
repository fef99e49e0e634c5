"""Ordered keyset paging over findings: every row once, in order, on both stores; and on
PostgreSQL the ordering indexes of migration 0003 serve the page queries."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import event

from connectors.model import SEVERITIES
from tests.factories import document, finding
from tests.test_merge import push
from tests.test_odata import alerts_url, seed_alerts

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _seed(gw) -> tuple[str, dict]:
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    items = []
    for i in range(40):
        item = finding(f"q-{i}", host=f"h{i % 3}.example.com", cves=[f"CVE-2024-{1000 + i}"],
                       severity=SEVERITIES[i % 5], last_seen=f"2024-04-{1 + i % 7:02d}T00:00:00Z")
        if i % 6 == 0:
            del item["lastSeen"]  # no lastSeen at all: sorts as 1970-01-01
        items.append(item)
    assert push(gw, tenant, headers, document(items))["counts"]["created"] == 40
    return tenant, headers


def _pages(gw, tenant, headers, order: str) -> list[dict]:
    rows, url, args = [], f"/api/v1/tenants/{tenant}/security/findings", {"$top": "4", "$orderby": order}
    while url:
        response = gw.http.get(url, query_string=args, headers=headers)
        assert response.status_code == 200, response.get_json()
        rows += response.get_json()["value"]
        url, args = response.get_json().get("@odata.nextLink"), None
        if url:
            url = url.split("localhost", 1)[1]
    return rows


def _seen(row) -> datetime:
    return datetime.fromisoformat(row["lastSeen"]) if row["lastSeen"] else EPOCH


@pytest.mark.parametrize("order, key, descending", [
    ("lastSeen desc", _seen, True),
    ("lastSeen", _seen, False),
    ("severity desc", lambda row: SEVERITIES.index(row["severity"]), True),
])
def test_ordered_pages_visit_every_finding_once_in_order(gw, order, key, descending):
    tenant, headers = _seed(gw)
    rows = _pages(gw, tenant, headers, order)
    ids = [int(row["id"]) for row in rows]
    assert len(ids) == len(set(ids)) == 40
    expected = sorted(rows, key=lambda row: (key(row), int(row["id"])), reverse=descending)
    assert ids == [int(row["id"]) for row in expected]


def _next_page_plan(gw, url: str, headers: dict, order: str) -> str:
    """EXPLAIN of the query of the second page (a keyset page), as the planner can serve it."""
    db = gw.db
    first = gw.http.get(url, query_string={"$top": "4", "$orderby": order}, headers=headers).get_json()
    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "LIMIT" in statement and "oauth" not in statement:
            statements.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        page = gw.http.get(first["@odata.nextLink"].split("localhost", 1)[1], headers=headers)
        assert page.status_code == 200
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    [(statement, parameters)] = statements
    with db.engine.connect() as conn:
        raw = conn.connection.driver_connection
        raw.execute("SET enable_seqscan = off")  # a few rows: make the planner show what it can use
        raw.execute("SET enable_sort = off")
        plan = "\n".join(line for (line,) in raw.execute("EXPLAIN " + statement, parameters))
        raw.rollback()
    return plan


@pytest.mark.parametrize("order, index", [("lastSeen desc", "ixpg_findings_last_seen"),
                                          ("severity desc", "ixpg_findings_severity"),
                                          ("firstSeen", "ixpg_findings_first_seen")])
def test_the_ordering_indexes_serve_finding_pages_on_postgresql(gw, order, index):
    """The query's order expression must be the index's expression, or every page sorts."""
    if not gw.db.is_postgres:
        pytest.skip("the ordering indexes are PostgreSQL's")
    tenant, headers = _seed(gw)
    plan = _next_page_plan(gw, f"/api/v1/tenants/{tenant}/security/findings", headers, order)
    assert index in plan, plan


@pytest.mark.parametrize("order, index", [("severity desc", "ixpg_alerts_severity"),
                                          ("createdDateTime desc", "ixpg_alerts_created"),
                                          ("lastModifiedDateTime", "ixpg_alerts_modified")])
def test_the_ordering_indexes_serve_alert_pages_on_postgresql(gw, order, index):
    if not gw.db.is_postgres:
        pytest.skip("the ordering indexes are PostgreSQL's")
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    seed_alerts(gw.db, tenant, 20)
    plan = _next_page_plan(gw, alerts_url(tenant), headers, order)
    assert index in plan, plan
