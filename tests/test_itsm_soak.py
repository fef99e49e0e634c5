"""The ITSM fault soak at the issue's size (issue 12): 2,000 findings, a fifth of the remote calls failing.

A real Celery worker merges the push and delivers the tickets over real HTTP to the loopback
ServiceNow of tests/itsm_sim.py, in delivery lanes (``ITSM_DELIVERY_LANES``, 4).  10% of the
calls are committed by the simulator and then dropped before the answer, 5% are answered 429 and
5% 500.  Exactly one incident per finding must come out, every link pointing at its own incident;
a fix pushed while the creations are still under way resolves exactly the fixed findings'
incidents, each after its creation.
"""

from __future__ import annotations

import pytest

from tests.conftest import Worker, wait_for
from tests.factories import finding
from tests.itsm_sim import ServiceNowSim
from tests.test_itsm import WORKER_ENV, _itsm, connect, merged, push, rule, sn_body

COUNT = 2000
FIXED = 200  # findings fixed by a second push, while the first one's tickets are being delivered


@pytest.fixture
def lanes_worker(pg_app, redis_clean):
    process = Worker(
        pg_app.config["DATABASE_URL"],
        concurrency=2,
        extra_env={**WORKER_ENV, "GATEWAY_ITSM_DELIVERY_LANES": "4"},
    )
    yield process
    process.stop()


def _findings(status: str = "open", ts: str = "2024-04-01T00:00:00Z", count: int = COUNT) -> list[dict]:
    return [
        finding(f"s-{n}", f"host-{n % 50}.example.com", (f"CVE-2024-{n:05d}",), status=status, ts=ts)
        for n in range(count)
    ]


def test_fault_soak_makes_exactly_one_ticket_per_finding(pg_gw, lanes_worker):
    gw = pg_gw
    sn = ServiceNowSim(seed=12)
    sn.rates = {"drop": 0.10, "429": 0.05, "500": 0.05}
    sn.retry_after = "0"
    try:
        tenant, auth = _itsm(gw)
        snow = connect(gw, tenant, auth, sn_body(sn))
        rule(gw, tenant, auth, snow["id"])
        merged(gw, tenant, auth, push(gw, tenant, auth, _findings()))
        wait_for(lambda: len(sn.incidents) >= COUNT // 10, timeout=300, interval=0.5)
        fixed = push(gw, tenant, auth, _findings("fixed", "2024-04-02T00:00:00Z", FIXED))
        merged(gw, tenant, auth, fixed)

        def settled() -> bool:
            if len(sn.incidents) < COUNT:
                return False
            links = _all_tickets(gw, tenant, auth)
            url = f"/api/v1/tenants/{tenant}/itsm/connections/{snow['id']}"
            pending = gw.http.get(url, headers=auth).get_json()["pendingOperations"]
            return pending == 0 and all(t["syncState"] == "synced" for t in links)

        wait_for(settled, timeout=900, interval=1.0)
        links = _all_tickets(gw, tenant, auth)
        assert len(links) == COUNT and len(sn.incidents) == COUNT
        markers = [r["correlation_id"] for r in sn.incidents.values()]
        assert len(set(markers)) == COUNT, "no finding has two incidents"
        assert {t["remoteId"] for t in links} == set(sn.incidents)
        for link in links:  # every link points at the incident that carries its own marker
            assert sn.incidents[link["remoteId"]]["correlation_id"] == (
                f"gw-{snow['id']}-finding-{link['subjectId']}"
            )
        assert sum(1 for method, path, status in sn.calls if method == "POST" and status == 201) == COUNT
        assert any(method == "GET" for method, _, _ in sn.calls), "lost answers were looked up"

        # the fixed findings' incidents, and only theirs, are resolved, each after its creation
        findings = _all_findings(gw, tenant, auth)
        resolved = {f["id"] for f in findings if f["state"] == "resolved"}
        assert len(resolved) == FIXED
        by_item = {t["subjectId"]: t["remoteId"] for t in links}
        assert {sys_id for sys_id, r in sn.incidents.items() if r["state"] == "6"} == {
            by_item[i] for i in resolved
        }
        patched = {path.rsplit("/", 1)[-1] for method, path, status in sn.calls if method == "PATCH"}
        assert {by_item[i] for i in resolved} <= patched
    finally:
        sn.stop()


def _all(gw, auth, url: str) -> list[dict]:
    """Every page of a collection, following ``@odata.nextLink``."""
    out = []
    while url:
        body = gw.http.get(url, headers=auth).get_json()
        out += body["value"]
        url = body.get("@odata.nextLink")
        if url and "://" in url:
            url = "/" + url.split("://", 1)[1].split("/", 1)[1]
    return out


def _all_tickets(gw, tenant, auth) -> list[dict]:
    return _all(gw, auth, f"/api/v1/tenants/{tenant}/itsm/tickets?$top=1000")


def _all_findings(gw, tenant, auth) -> list[dict]:
    return _all(gw, auth, f"/api/v1/tenants/{tenant}/security/findings?$top=1000&$select=id,state")
