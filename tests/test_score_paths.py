"""The stored Secure Score stays equal to a recount on every path that changes recommendations
besides a plain push (issue 11: "fresh on every change"), on both stores:

(a) an admin's resource merge and split, (b) an ASC assessment PUT, (c) a Qualys KnowledgeBase
back-fill that re-keys and joins findings, (d) an identity rule that merges two resources during a
push.  After each step, tests/posture_reference.py checks that ``recount`` of every control (in a
transaction rolled back) changes no stored row, and that the stored recommendations, control rows
and newest history row equal its plain-Python computation from the raw rows, with policy entries
and exemptions (by type and by resource) in place so their upkeep on these paths is checked too.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from gateway.models import Recommendation, Resource, Tenant
from tests.factories import document, finding
from tests.posture_reference import check
from tests.test_merge import push
from tests.test_score import compliance, rows_of

SEC = "/api/v1/tenants/{}/security/"
ALL = "findings.write security.read posture.manage admin"


def comp(
    pid: str, resource: dict, key: str, title: str, status: str = "open", ts: str = "2024-04-01T00:00:00Z"
) -> dict:
    """A compliance result of type ``key`` on any resource."""
    return finding(
        pid,
        cves=[],
        status=status,
        ts=ts,
        resource=resource,
        kind="compliance",
        recommendation=key,
        title=title,
        vendorId=pid,
    )


def _post(gw, tenant, headers, path, body, status):
    response = gw.http.post(SEC.format(tenant) + path, json=body, headers=headers)
    assert response.status_code == status, response.get_json()
    return response.get_json()


def _resources(gw, tenant) -> dict[str, int]:
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        return {
            r.name: r.id
            for r in session.scalars(
                select(Resource).where(Resource.tenant_id == tenant_id, Resource.merged_into.is_(None))
            )
        }


def _exempt_recs(gw, tenant) -> set[int]:
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        return set(
            session.scalars(
                select(Recommendation.resource_id).where(
                    Recommendation.tenant_id == tenant_id, Recommendation.status_cause == "Exempt"
                )
            )
        )


def test_admin_merge_and_split_keep_the_score(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant], scopes=ALL)
    push(
        gw,
        tenant,
        headers,
        document(
            [
                finding("f-1", resource={"fqdn": "a.example.com"}),
                finding("f-2", cves=["CVE-2023-4863"], resource={"agentId": "X-1"}),
                finding("f-3", resource={"agentId": "X-1"}, status="fixed"),
                comp("m-x", {"agentId": "X-1"}, "mfa", "MFA should be enabled"),
                finding("f-4", cves=["CVE-2022-0001"], resource={"fqdn": "lonely.example.com"}),
                compliance("m-l", "lonely.example.com", "mfa", "MFA should be enabled", status="fixed"),
            ]
        ),
    )
    check(gw.db, tenant, context="pushed")
    names = _resources(gw, tenant)
    a, x, lonely = names["a.example.com"], names["x-1"], names["lonely.example.com"]
    # an exemption of the resource merged away, and a policy entry
    _post(
        gw,
        tenant,
        headers,
        "exemptions",
        {"displayName": "x", "category": "waiver", "resourceId": str(x)},
        201,
    )
    _post(
        gw,
        tenant,
        headers,
        "policies",
        {"scope": "recommendationType", "target": "mfa", "severity": "low"},
        201,
    )
    check(gw.db, tenant, context="exempted")
    assert rows_of(gw, tenant)["remediate-vulnerabilities"].unhealthy == 2

    _post(gw, tenant, headers, f"resources/{a}/merge", {"resourceIds": [x, lonely]}, 200)
    check(gw.db, tenant, context="merged")
    # the exemption now names the survivor: it holds the survivor's recommendations, not only the moved ones
    assert _exempt_recs(gw, tenant) == {a}
    vulnerabilities = rows_of(gw, tenant)["remediate-vulnerabilities"]
    assert (vulnerabilities.healthy, vulnerabilities.unhealthy, vulnerabilities.not_applicable) == (0, 0, 1)

    push(
        gw,
        tenant,
        headers,
        document(
            [finding("f-5", cves=["CVE-2021-44228"], resource={"fqdn": "a.example.com", "agentId": "X-1"})]
        ),
    )
    check(gw.db, tenant, context="pushed again")
    (resource,) = gw.http.get(SEC.format(tenant) + "resources", headers=headers).get_json()["value"]
    agent_only = [s["id"] for s in resource["sources"] if s["identifiers"] == {"agentId": ["contoso:x-1"]}]
    split = _post(gw, tenant, headers, f"resources/{a}/split", {"sourceIds": agent_only}, 201)
    check(gw.db, tenant, context="split")
    assert _exempt_recs(gw, tenant) == {a}  # canonical records carry no host key: nothing moved

    # host records with keys: the split moves the Qualys findings to the new resource, outside the exemption
    from connectors.model import ResourceRef
    from tests.test_resources_api import merge_direct, record

    tenable_host = ResourceRef(fqdn="db-1.example.com", host_key="db-1")
    qualys_host = ResourceRef(fqdn="db-1.example.com", host_key="qualys-42")
    merge_direct(gw, tenant, "Tenable", [record("n-1", tenable_host, status="fixed")], product="Nessus")
    merge_direct(
        gw,
        tenant,
        "Qualys",
        [record("q-1", qualys_host), record("q-2", qualys_host, cve="CVE-2023-4863")],
        product="Qualys VMDR",
        fmt="qualys_hld",
    )
    db1 = _resources(gw, tenant)["db-1.example.com"]
    _post(
        gw,
        tenant,
        headers,
        "exemptions",
        {"displayName": "db", "category": "waiver", "resourceId": str(db1)},
        201,
    )
    check(gw.db, tenant, context="db-1")
    sources = gw.http.get(SEC.format(tenant) + f"resources/{db1}", headers=headers).get_json()["sources"]
    qualys = [s["id"] for s in sources if s["provider"] == "Qualys"]
    split = _post(gw, tenant, headers, f"resources/{db1}/split", {"sourceIds": qualys}, 201)
    check(gw.db, tenant, context="split")
    assert _exempt_recs(gw, tenant) == {a, db1}
    vulnerabilities = rows_of(gw, tenant)["remediate-vulnerabilities"]
    assert (vulnerabilities.healthy, vulnerabilities.unhealthy, vulnerabilities.not_applicable) == (0, 1, 2)
    assert split["name"] == "db-1.example.com"


def test_asc_assessment_puts_keep_the_score(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant], scopes=ALL)
    vm = (
        "/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23/resourceGroups/prod/providers/"
        "Microsoft.Compute/virtualMachines/web-{}"
    )
    name = "8bb8be0a-6010-4789-812f-e4d661c4ed0e"

    def put(index: int, code: str, day: int) -> None:
        body = {
            "properties": {
                "resourceDetails": {"source": "Azure"},
                "status": {"code": code, "statusChangeDate": f"2024-03-{day:02d}T08:30:00Z"},
                "metadata": {
                    "displayName": "Endpoint protection should be installed on machines",
                    "severity": "High",
                },
            }
        }
        response = gw.http.put(
            f"/api/v1/tenants/{tenant}/assessments/{name}?resourceId={vm.format(index)}",
            data=json.dumps(body),
            headers=headers | {"Content-Type": "application/json"},
        )
        assert response.status_code in (200, 201), response.get_json()

    put(1, "Unhealthy", 1)
    check(gw.db, tenant, context="first")
    assert rows_of(gw, tenant)["enable-endpoint-protection"].unhealthy == 1
    put(2, "Unhealthy", 1)
    check(gw.db, tenant, context="second resource")
    expires = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    _post(
        gw,
        tenant,
        headers,
        "exemptions",
        {"displayName": "web", "category": "mitigated", "recommendationType": name, "expiresOn": expires},
        201,
    )
    check(gw.db, tenant, context="exempted")
    put(3, "Unhealthy", 2)  # a new recommendation in the exemption's scope
    check(gw.db, tenant, context="third, exempt")
    put(1, "Healthy", 3)
    check(gw.db, tenant, context="healthy")
    from workers.tasks import expire_due_exemptions

    later = datetime.now(UTC) + timedelta(days=2)
    assert expire_due_exemptions(gw.db, later) == 1
    check(gw.db, tenant, later, context="expired")
    row = rows_of(gw, tenant)["enable-endpoint-protection"]
    assert (row.healthy, row.unhealthy) == (1, 2)
    put(2, "Healthy", 4)
    check(gw.db, tenant, later, context="healthy again")


def test_a_kb_backfill_keeps_the_score(gw):
    from tests.test_knowledge import HLD, KB, TENABLE
    from tests.test_knowledge import push as push_format

    tenant = gw.tenant()
    qualys = gw.partner("Qualys", [tenant], scopes=ALL)
    tenable = gw.partner("Tenable", [tenant], scopes=ALL)
    push_format(gw, tenant, qualys, HLD, "qualys_hld")
    check(gw.db, tenant, context="detections")
    push_format(gw, tenant, tenable, TENABLE, "canonical", "application/json")
    check(gw.db, tenant, context="tenable")
    _post(
        gw,
        tenant,
        qualys,
        "policies",
        {"scope": "recommendationType", "target": "vulnerability-assessment", "severity": "medium"},
        201,
    )
    check(gw.db, tenant, context="policy")
    push_format(gw, tenant, qualys, KB, "qualys_kb")
    check(gw.db, tenant, context="kb back-fill")
    push_format(gw, tenant, qualys, HLD, "qualys_hld")
    check(gw.db, tenant, context="detections again")


def test_an_identity_merge_during_a_push_keeps_the_score(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant], scopes=ALL)
    push(
        gw,
        tenant,
        headers,
        document(
            [
                finding("a-1", resource={"fqdn": "a.example.com"}),
                compliance("a-m", "a.example.com", "mfa", "MFA should be enabled", status="fixed"),
                finding("b-0", cves=["CVE-2020-0001"], resource={"fqdn": "b.example.com"}),
            ]
        ),
    )
    push(
        gw,
        tenant,
        headers,
        document(
            [
                finding("x-1", resource={"agentId": "X-1"}, ts="2024-04-02T00:00:00Z"),
                finding(
                    "x-2", cves=["CVE-2023-4863"], resource={"agentId": "X-1"}, ts="2024-04-02T00:00:00Z"
                ),
                comp("x-m", {"agentId": "X-1"}, "mfa", "MFA should be enabled", ts="2024-04-02T00:00:00Z"),
            ]
        ),
    )
    check(gw.db, tenant, context="two resources")
    names = _resources(gw, tenant)
    _post(
        gw,
        tenant,
        headers,
        "exemptions",
        {"displayName": "agent", "category": "waiver", "resourceId": str(names["x-1"])},
        201,
    )
    _post(
        gw,
        tenant,
        headers,
        "exemptions",
        {
            "displayName": "a's vulnerabilities",
            "category": "mitigated",
            "resourceId": str(names["a.example.com"]),
            "recommendationType": "vulnerability-assessment",
        },
        201,
    )
    _post(gw, tenant, headers, "policies", {"scope": "provider", "target": "Contoso", "enabled": True}, 201)
    check(gw.db, tenant, context="exempted")
    before = rows_of(gw, tenant)

    # one record names both: the agent's resource is merged into the FQDN's during the push
    batch = push(
        gw,
        tenant,
        headers,
        document(
            [
                finding(
                    "both",
                    cves=["CVE-2021-44228"],
                    resource={"fqdn": "a.example.com", "agentId": "X-1"},
                    ts="2024-04-03T00:00:00Z",
                    status="fixed",
                )
            ]
        ),
    )
    assert batch["counts"]["resourcesMerged"] == 1
    check(gw.db, tenant, context="merged in the push")
    assert set(_resources(gw, tenant)) == {"a.example.com", "b.example.com"}
    assert _exempt_recs(gw, tenant) == {names["a.example.com"]}
    after = rows_of(gw, tenant)
    assert [
        (r.healthy, r.unhealthy, r.not_applicable) for r in (before["enable-mfa"], after["enable-mfa"])
    ] == [(1, 0, 1), (0, 0, 1)]  # a's healthy MFA result is the agent's exempt one now
    assert after["remediate-vulnerabilities"].unhealthy == before["remediate-vulnerabilities"].unhealthy == 1

    push(
        gw,
        tenant,
        headers,
        document([finding("x-1", resource={"agentId": "X-1"}, status="fixed", ts="2024-04-04T00:00:00Z")]),
    )
    check(gw.db, tenant, context="fixed after the merge")
