"""Identity resolution, read and admin side: provenance of findings' sources, resources' host records
and identifiers, merged ids answering 301, observations, manual merge and split, resource history.

On PostgreSQL and SQLite (``gw``).  Canonical pushes go through the HTTP API; records that need
provenance or observations the canonical format cannot carry (product, scan, host key, network
scope, observations) are merged with ``FindingMerger`` directly, the code path a batch takes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import func, select

from connectors.model import FindingRecord, ResourceRef
from connectors.model import Observation as ObservationRecord
from gateway.merge.findings import FindingMerger
from gateway.models import Resource, ResourceSeparation, Tenant, utcnow
from tests.factories import document, finding
from tests.test_merge import push

ADMIN_SCOPES = "findings.write security.read admin"
T0 = datetime(2024, 4, 1, tzinfo=UTC)


def url(tenant: str, path: str) -> str:
    return f"/api/v1/tenants/{tenant}/security/{path}"


def get(gw, tenant, headers, path, status=200, **query):
    response = gw.http.get(url(tenant, path), query_string=query, headers=headers)
    assert response.status_code == status, (path, query, response.status_code, response.get_json())
    return response.get_json()


def values(gw, tenant, headers, path, **query) -> list[dict]:
    return get(gw, tenant, headers, path, **query)["value"]


def merge_direct(
    gw, tenant: str, provider: str, findings=(), observations=(), *, product=None, fmt="nessus", batch_id=None
) -> None:
    """Merge records as a batch's merge does (one transaction), with provenance set."""
    with gw.db.engine.begin() as conn:
        tenant_id = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant)).scalar_one()
        merger = FindingMerger(
            conn, tenant_id, provider, batch_id, utcnow(), "test merge", product=product, format=fmt
        )
        merger.merge_chunk(list(findings), list(observations))
        merger.update_recommendations()


def record(provider_id: str, resource: ResourceRef, cve: str = "CVE-2024-3094", **fields) -> FindingRecord:
    return FindingRecord(
        provider_id=provider_id,
        resource=resource,
        title=f"Vulnerability {provider_id}",
        severity="high",
        cves=[cve],
        **({"first_seen": T0, "last_seen": T0, "provider_timestamp": T0} | fields),
    )


def observation(provider_id: str, resource: ResourceRef, **fields) -> ObservationRecord:
    return ObservationRecord(
        provider_id=provider_id,
        resource=resource,
        **({"first_seen": T0, "last_seen": T0, "provider_timestamp": T0} | fields),
    )


def live_resources(gw, tenant) -> int:
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        return session.scalar(
            select(func.count())
            .select_from(Resource)
            .where(Resource.tenant_id == tenant_id, Resource.merged_into.is_(None))
        )


# -- findings' sources: provenance -------------------------------------------------------------


def test_finding_sources_show_provenance_and_filter_on_it(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    host = ResourceRef(fqdn="db-1.example.com", host_key="db-1.example.com")
    merge_direct(
        gw,
        tenant,
        "Tenable",
        [record("n-1", host, scan="Weekly scan")],
        product="Nessus",
        fmt="nessus",
        batch_id=12,
    )
    merge_direct(
        gw,
        tenant,
        "Tenable",
        [record("io-1", ResourceRef(fqdn="db-1.example.com", host_key="uuid-1"), cve="CVE-2023-4863")],
        product="Tenable.io",
        fmt="tenable_io",
        batch_id=13,
    )
    pushed = push(gw, tenant, headers, document([finding("c-1", cves=["CVE-2021-44228"])]))

    rows = {row["correlationKey"]: row for row in values(gw, tenant, headers, "findings")}
    nessus = rows["CVE-2024-3094"]["sources"][0]
    assert (nessus["product"], nessus["format"], nessus["batchId"], nessus["scan"], nessus["hostKey"]) == (
        "Nessus",
        "nessus",
        "12",
        "Weekly scan",
        "db-1.example.com",
    )
    io = rows["CVE-2023-4863"]["sources"][0]
    assert (io["product"], io["format"], io["batchId"], io["hostKey"]) == (
        "Tenable.io",
        "tenable_io",
        "13",
        "uuid-1",
    )
    canonical = rows["CVE-2021-44228"]["sources"][0]
    assert canonical["format"] == "canonical" and canonical["batchId"] == pushed["id"]
    assert canonical["scan"] is None and canonical["hostKey"] is None

    def keys(odata_filter: str) -> list[str]:
        return sorted(
            r["correlationKey"] for r in values(gw, tenant, headers, "findings", **{"$filter": odata_filter})
        )

    assert keys("sources/any(s: s/product eq 'Nessus')") == ["CVE-2024-3094"]
    assert keys("sources/any(s: s/hostKey eq 'uuid-1')") == ["CVE-2023-4863"]
    assert keys("sources/any(s: s/batchId eq 12)") == ["CVE-2024-3094"]
    assert keys("sources/any(s: s/batchId eq '13')") == ["CVE-2023-4863"]
    assert keys("sources/any(s: s/format eq 'canonical')") == ["CVE-2021-44228"]
    assert keys("sources/any(s: startswith(s/scan, 'Weekly'))") == ["CVE-2024-3094"]
    assert canonical["product"] == "Gateway canonical"  # the connector's PRODUCT
    assert keys("sources/any(s: s/product eq 'Gateway canonical')") == ["CVE-2021-44228"]
    assert keys("sources/any(s: s/hostKey eq null)") == ["CVE-2021-44228"]
    selected = values(
        gw,
        tenant,
        headers,
        "findings",
        **{"$select": "sources", "$filter": "sources/any(s: s/product eq 'Nessus')"},
    )
    assert set(selected[0]) == {"id", "sources"} and selected[0]["sources"][0]["product"] == "Nessus"
    bad = gw.http.get(
        url(tenant, "findings"), query_string={"$filter": "sources/any(s: s/batchId eq 'x')"}, headers=headers
    )
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalidFilter"


# -- resources: host records and identifiers -----------------------------------------------------


def test_resources_show_host_records_and_identifiers_with_scopes(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    tenable = ResourceRef(
        hostname="web-01",
        ipv4=["10.0.0.5"],
        network="vpc-1",
        host_key="asset-1",
        agent_id="ABC-1",
        os="Ubuntu 22.04",
    )
    merge_direct(gw, tenant, "Tenable", [record("t-1", tenable)], product="Tenable.io", batch_id=7)
    qualys = ResourceRef(fqdn="web-01.corp.example.com", ipv4=["10.0.0.5"], host_key="qid-9")
    merge_direct(
        gw,
        tenant,
        "Qualys",
        [record("q-1", qualys, cve="CVE-2023-4863")],
        product="Qualys VMDR",
        fmt="qualys_hld",
        batch_id=8,
    )

    (resource,) = values(gw, tenant, headers, "resources")
    assert resource["os"] == "Ubuntu 22.04"
    identifiers = resource["identifiers"]
    assert identifiers["ipv4"] == ["10.0.0.5"], "addresses show without their scope"
    assert identifiers["ipScopes"] == {"10.0.0.5": ["vpc-1"]}
    assert identifiers["shortNames"] == ["web-01"]
    assert identifiers["agentId"] == ["tenable:abc-1"]
    assert identifiers["fqdn"] == ["web-01.corp.example.com"] and identifiers["hostname"] == ["web-01"]
    assert not any(
        "%" in value for name, found in identifiers.items() if name != "ipScopes" for value in found
    )

    sources = {source["provider"]: source for source in resource["sources"]}
    assert set(sources) == {"Tenable", "Qualys"}
    tenable_source = sources["Tenable"]
    assert set(tenable_source) == {
        "id",
        "provider",
        "product",
        "hostKey",
        "identifiers",
        "firstSeen",
        "lastSeen",
        "batchId",
    }
    assert (tenable_source["product"], tenable_source["hostKey"], tenable_source["batchId"]) == (
        "Tenable.io",
        "asset-1",
        "7",
    )
    assert tenable_source["identifiers"]["ipv4"] == ["10.0.0.5"]
    assert tenable_source["identifiers"]["ipScopes"] == {"10.0.0.5": ["vpc-1"]}
    assert "shortNames" not in tenable_source["identifiers"]
    assert sources["Qualys"]["identifiers"] == {"fqdn": ["web-01.corp.example.com"], "ipv4": ["10.0.0.5"]}
    assert tenable_source["lastSeen"].startswith("2024-04-01")

    def ids(odata_filter: str) -> list[str]:
        return [r["id"] for r in values(gw, tenant, headers, "resources", **{"$filter": odata_filter})]

    assert ids("sources/any(s: s/product eq 'Tenable.io')") == [resource["id"]]
    assert ids("sources/any(s: s/product eq 'Nessus')") == []
    assert ids("sources/any(s: s/hostKey eq 'qid-9' and s/provider eq 'Qualys')") == [resource["id"]]
    assert ids("sources/any(s: s/batchId eq 8)") == [resource["id"]]
    assert ids("identifiers/ipv4/any(i: i eq '10.0.0.5')") == [resource["id"]]
    assert ids("identifiers/ipv4/any(i: i eq '10.0.0.5%vpc-1')") == []
    assert ids("identifiers/shortNames/any(n: n eq 'web-01')") == [resource["id"]]
    assert ids("identifiers/agentId/any(a: endswith(a, ':abc-1'))") == [resource["id"]]
    selected = values(gw, tenant, headers, "resources", **{"$select": "sources"})
    assert set(selected[0]) == {"id", "sources"}
    exported = gw.http.get(url(tenant, "resources"), query_string={"$format": "csv"}, headers=headers)
    assert exported.status_code == 200 and "Tenable.io" in exported.get_data(as_text=True)


# -- merged ids -----------------------------------------------------------------------------------


def _two_then_one(gw, tenant, headers) -> tuple[str, str, dict]:
    """Two pushes that make two resources, then a record proving them one machine."""
    push(gw, tenant, headers, document([finding("f-1", resource={"fqdn": "a.example.com"})]))
    push(gw, tenant, headers, document([finding("f-2", cves=["CVE-2023-4863"], resource={"agentId": "X-1"})]))
    first, second = sorted((r["id"] for r in values(gw, tenant, headers, "resources")), key=int)
    batch = push(
        gw,
        tenant,
        headers,
        document(
            [finding("f-3", cves=["CVE-2021-44228"], resource={"fqdn": "a.example.com", "agentId": "X-1"})]
        ),
    )
    return first, second, batch


def test_a_merged_resource_id_answers_301_with_the_survivor(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant])
    survivor, loser, batch = _two_then_one(gw, tenant, headers)
    assert batch["counts"]["resourcesMerged"] == 1
    listed = values(gw, tenant, headers, "resources")
    assert [r["id"] for r in listed] == [survivor], "a merged-away resource is not listed"
    assert len(listed[0]["sources"]) == 3
    assert {f["resourceId"] for f in values(gw, tenant, headers, "findings")} == {survivor}

    response = gw.http.get(url(tenant, f"resources/{loser}"), headers=headers)
    assert response.status_code == 301
    assert response.headers["Location"].endswith(url(tenant, f"resources/{survivor}"))
    assert response.get_json() == {"id": loser, "mergedInto": survivor}
    with_select = gw.http.get(
        url(tenant, f"resources/{loser}"), query_string={"$select": "name"}, headers=headers
    )
    assert with_select.status_code == 301 and "select=name" in with_select.headers["Location"]
    followed = gw.http.get(url(tenant, f"resources/{loser}"), headers=headers, follow_redirects=True)
    assert followed.status_code == 200 and followed.get_json()["id"] == survivor

    survivor_events = [e["event"] for e in get(gw, tenant, headers, f"resources/{survivor}/history")["value"]]
    assert survivor_events == ["merged"]
    loser_history = get(gw, tenant, headers, f"resources/{loser}/history")["value"]
    assert [e["event"] for e in loser_history] == ["mergedInto"]
    assert loser_history[0]["details"]["into"] == int(survivor)

    other = gw.tenant()
    other_headers = gw.partner("Contoso", [other], scopes=ADMIN_SCOPES)
    for path in (
        f"resources/{loser}",
        f"resources/{survivor}",
        f"resources/{survivor}/history",
        f"resources/{survivor}/observations",
        f"resources/{loser}/observations",
    ):
        answer = gw.http.get(url(other, path), headers=other_headers)
        assert answer.status_code == 404, path
        assert answer.get_json()["error"]["code"] == "notFound"
    assert gw.http.get(url(tenant, "resources/999999"), headers=headers).status_code == 404
    assert gw.http.get(url(tenant, "resources/999999/history"), headers=headers).status_code == 404


# -- observations ---------------------------------------------------------------------------------


def _observed(gw, tenant) -> None:
    host = ResourceRef(fqdn="db-1.example.com", host_key="db-1")
    merge_direct(
        gw,
        tenant,
        "Tenable",
        [record("n-1", host)],
        [
            observation(
                "11936",
                host,
                name="OS Identification",
                category="os",
                value="Linux Kernel 5.15",
                vendor_id="11936",
                evidence="Remote operating system : Linux Kernel 5.15",
                scan="Weekly",
            ),
            observation(
                "10107/443",
                host,
                name="HTTP Server Type and Version",
                category="port",
                port=443,
                protocol="tcp",
                service="www",
                value="443/tcp https",
            ),
            observation(
                "10267/22",
                host,
                name="SSH Server Type and Version",
                category="port",
                port=22,
                protocol="tcp",
                service="ssh",
                value="22/tcp ssh",
            ),
        ],
        product="Nessus",
        batch_id=21,
    )
    other_host = ResourceRef(fqdn="web-9.example.com", host_key="web-9")
    merge_direct(
        gw,
        tenant,
        "Tenable",
        [],
        [
            observation(
                "10107/443@web-9",
                other_host,
                name="HTTP Server Type and Version",
                category="port",
                port=443,
                protocol="tcp",
                service="www",
            ),
            observation("11936@web-9", other_host, name="OS Identification", category="os", value="Windows"),
        ],
        product="Nessus",
        batch_id=22,
    )


def test_observations_of_a_resource_and_of_the_tenant(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    _observed(gw, tenant)
    resources = {r["name"]: r["id"] for r in values(gw, tenant, headers, "resources")}
    db = resources["db-1.example.com"]

    rows = values(gw, tenant, headers, f"resources/{db}/observations")
    assert [r["providerId"] for r in rows] == ["11936", "10107/443", "10267/22"]
    os_row = rows[0]
    assert set(os_row) == {
        "id",
        "resourceId",
        "provider",
        "product",
        "providerId",
        "vendorId",
        "category",
        "name",
        "value",
        "port",
        "protocol",
        "service",
        "evidence",
        "scan",
        "hostKey",
        "batchId",
        "firstSeen",
        "lastSeen",
        "providerTimestamp",
    }
    assert (
        os_row["resourceId"],
        os_row["provider"],
        os_row["product"],
        os_row["category"],
        os_row["value"],
        os_row["scan"],
        os_row["hostKey"],
        os_row["batchId"],
    ) == (db, "Tenable", "Nessus", "os", "Linux Kernel 5.15", "Weekly", "db-1", "21")
    assert rows[1]["port"] == 443 and rows[1]["protocol"] == "tcp" and rows[1]["service"] == "www"

    def provider_ids(path, **query) -> list[str]:
        return [r["providerId"] for r in values(gw, tenant, headers, path, **query)]

    assert provider_ids(
        f"resources/{db}/observations", **{"$filter": "category eq 'port'", "$orderby": "id desc"}
    ) == ["10267/22", "10107/443"]
    assert provider_ids(f"resources/{db}/observations", **{"$filter": "port eq 443"}) == ["10107/443"]
    assert provider_ids(
        f"resources/{db}/observations", **{"$filter": "port gt 100 and protocol eq 'tcp'"}
    ) == ["10107/443"]
    page = get(
        gw,
        tenant,
        headers,
        f"resources/{db}/observations",
        **{"$top": "2", "$count": "true", "$select": "name"},
    )
    assert page["@odata.count"] == 3 and len(page["value"]) == 2 and set(page["value"][0]) == {"id", "name"}
    following = gw.http.get(page["@odata.nextLink"].split("localhost", 1)[1], headers=headers)
    assert following.status_code == 200 and len(following.get_json()["value"]) == 1
    assert f"/resources/{db}/observations" in page["@odata.nextLink"]
    # a paging token of one resource's observations is not valid for another's
    token = parse_qs(urlsplit(page["@odata.nextLink"]).query)["$skiptoken"][0]
    web = resources["web-9.example.com"]
    forged = gw.http.get(
        url(tenant, f"resources/{web}/observations"),
        headers=headers,
        query_string={"$top": "2", "$select": "name", "$count": "true", "$skiptoken": token},
    )
    assert forged.status_code == 400 and forged.get_json()["error"]["code"] == "invalidSkipToken"
    exported = gw.http.get(
        url(tenant, f"resources/{db}/observations"), query_string={"$format": "csv"}, headers=headers
    )
    assert exported.status_code == 200 and exported.get_data(as_text=True).count("\r\n") == 4

    # tenant-wide
    assert len(values(gw, tenant, headers, "observations")) == 5
    assert provider_ids("observations", **{"$filter": f"resourceId eq {web}"}) == [
        "10107/443@web-9",
        "11936@web-9",
    ]
    assert sorted(provider_ids("observations", **{"$filter": "category eq 'os'"})) == ["11936", "11936@web-9"]
    assert sorted(provider_ids("observations", **{"$filter": "port eq 443"})) == [
        "10107/443",
        "10107/443@web-9",
    ]
    one = values(gw, tenant, headers, "observations", **{"$filter": "port eq 22"})[0]
    assert get(gw, tenant, headers, f"observations/{one['id']}")["providerId"] == "10267/22"

    # resources by their observations
    def names(odata_filter: str) -> list[str]:
        return sorted(
            r["name"] for r in values(gw, tenant, headers, "resources", **{"$filter": odata_filter})
        )

    assert names("observations/any(o: o/category eq 'port' and o/port eq 443)") == [
        "db-1.example.com",
        "web-9.example.com",
    ]
    assert names("observations/any(o: o/port eq 22)") == ["db-1.example.com"]
    assert names("observations/any(o: o/category eq 'os' and o/value eq 'Windows')") == ["web-9.example.com"]

    # isolation: another tenant sees none of it
    other = gw.tenant()
    other_headers = gw.partner("Tenable", [other])
    assert values(gw, other, other_headers, "observations") == []
    assert gw.http.get(url(other, f"observations/{one['id']}"), headers=other_headers).status_code == 404
    assert gw.http.get(url(other, f"resources/{db}/observations"), headers=other_headers).status_code == 404
    bad = gw.http.get(
        url(tenant, f"resources/{db}/observations"), query_string={"$filter": "port eq 'x'"}, headers=headers
    )
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalidFilter"


def test_observations_of_a_merged_id_redirect(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant])
    survivor, loser, _ = _two_then_one(gw, tenant, headers)
    response = gw.http.get(
        url(tenant, f"resources/{loser}/observations"), query_string={"$top": "5"}, headers=headers
    )
    assert response.status_code == 301
    assert response.get_json() == {"id": loser, "mergedInto": survivor}
    assert url(tenant, f"resources/{survivor}/observations") in response.headers["Location"]
    assert "top=5" in response.headers["Location"]


# -- manual merge and split ------------------------------------------------------------------------


def test_manual_merge_and_split_and_the_split_survives_the_next_push(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant], scopes=ADMIN_SCOPES)
    records = [
        finding("f-1", resource={"fqdn": "a.example.com"}),
        finding("f-2", cves=["CVE-2023-4863"], resource={"agentId": "X-1"}),
        finding("f-3", cves=["CVE-2022-0001"], resource={"fqdn": "lonely.example.com"}),
    ]
    push(gw, tenant, headers, document(records))
    by_name = {r["name"]: r["id"] for r in values(gw, tenant, headers, "resources")}
    a, x, lonely = by_name["a.example.com"], by_name["x-1"], by_name["lonely.example.com"]

    merged = gw.http.post(
        url(tenant, f"resources/{a}/merge"), json={"resourceIds": [x, int(lonely)]}, headers=headers
    )
    assert merged.status_code == 200, merged.get_json()
    body = merged.get_json()
    assert body["id"] == a and len(body["sources"]) == 3
    assert sorted(
        values(gw, tenant, headers, "findings", **{"$select": "resourceId"})[i]["resourceId"]
        for i in range(3)
    ) == [a, a, a]
    assert gw.http.get(url(tenant, f"resources/{x}"), headers=headers).status_code == 301
    assert live_resources(gw, tenant) == 1
    events = get(gw, tenant, headers, f"resources/{a}/history")["value"]
    assert [e["event"] for e in events] == ["merged", "merged"]
    assert {e["details"]["mergedFrom"] for e in events} == {int(x), int(lonely)}
    assert all(e["actor"] and e["cause"].startswith("merged by admin") for e in events)

    # evidence that joins the two host records: stays one resource
    push(
        gw,
        tenant,
        headers,
        document(
            [finding("f-4", cves=["CVE-2021-44228"], resource={"fqdn": "a.example.com", "agentId": "X-1"})]
        ),
    )
    assert live_resources(gw, tenant) == 1
    (resource,) = values(gw, tenant, headers, "resources")
    agent_only = [s["id"] for s in resource["sources"] if s["identifiers"] == {"agentId": ["contoso:x-1"]}]
    assert len(agent_only) == 1

    split = gw.http.post(url(tenant, f"resources/{a}/split"), json={"sourceIds": agent_only}, headers=headers)
    assert split.status_code == 201, split.get_json()
    new = split.get_json()
    assert split.headers["Location"].endswith(url(tenant, f"resources/{new['id']}"))
    assert [s["id"] for s in new["sources"]] == agent_only
    assert new["identifiers"]["agentId"] == ["contoso:x-1"]
    assert get(gw, tenant, headers, f"resources/{new['id']}")["id"] == new["id"]
    assert live_resources(gw, tenant) == 2
    assert [e["event"] for e in get(gw, tenant, headers, f"resources/{a}/history")["value"]] == [
        "merged",
        "merged",
        "split",
    ]
    assert [e["event"] for e in get(gw, tenant, headers, f"resources/{new['id']}/history")["value"]] == [
        "new"
    ]
    with gw.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(ResourceSeparation)) == 1

    # the same evidence again: the split holds
    again = push(
        gw,
        tenant,
        headers,
        document(
            records
            + [
                finding(
                    "f-4",
                    cves=["CVE-2021-44228"],
                    resource={"fqdn": "a.example.com", "agentId": "X-1"},
                    ts="2024-04-02T00:00:00Z",
                )
            ]
        ),
    )
    assert again["counts"]["resourcesMerged"] == 0
    assert live_resources(gw, tenant) == 2
    resources = {r["id"]: r for r in values(gw, tenant, headers, "resources")}
    assert set(resources) == {a, new["id"]}
    assert [s["id"] for s in resources[new["id"]]["sources"]] == agent_only
    assert agent_only[0] not in [s["id"] for s in resources[a]["sources"]]


def test_a_hostname_only_record_pushed_twice_stays_one_resource(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant])
    for ts in ("2024-04-01T00:00:00Z", "2024-04-02T00:00:00Z"):
        push(gw, tenant, headers, document([finding("h-1", resource={"hostname": "lonely"}, ts=ts)]))
    assert live_resources(gw, tenant) == 1


def test_merge_and_split_refuse_bad_requests(gw):
    tenant = gw.tenant()
    admin = gw.partner("Contoso", [tenant], scopes=ADMIN_SCOPES)
    reader = gw.partner("Contoso", [tenant])
    survivor, loser, _ = _two_then_one(gw, tenant, admin)
    push(
        gw, tenant, admin, document([finding("f-9", cves=["CVE-2022-0009"], resource={"hostname": "other"})])
    )
    other_id = next(r["id"] for r in values(gw, tenant, admin, "resources") if r["name"] == "other")

    def post(path, body, headers=admin, status=400, code=None, tenant_=tenant):
        response = gw.http.post(url(tenant_, path), json=body, headers=headers)
        assert response.status_code == status, (path, body, response.get_json())
        if code:
            assert response.get_json()["error"]["code"] == code, response.get_json()
        return response.get_json()

    merge, split = f"resources/{survivor}/merge", f"resources/{survivor}/split"
    post(merge, {"resourceIds": [survivor]}, code="invalidBody")
    post(merge, {"resourceIds": []}, code="invalidBody")
    post(merge, {"resourceIds": ["x"]}, code="invalidBody")
    post(merge, {"resourceIds": [True]}, code="invalidBody")
    post(merge, {"ids": [other_id]}, code="invalidBody")
    post(merge, [other_id], code="invalidBody")
    message = post(merge, {"resourceIds": [other_id, "999999"]}, status=404, code="notFound")
    assert "999999" in message["error"]["message"]
    message = post(merge, {"resourceIds": [loser]}, status=409, code="resourceMerged")
    assert f"{loser} was merged into {survivor}" in message["error"]["message"]
    post(f"resources/{loser}/merge", {"resourceIds": [other_id]}, status=409, code="resourceMerged")
    post("resources/999999/merge", {"resourceIds": [other_id]}, status=404, code="notFound")
    post(merge, {"resourceIds": [other_id]}, headers=reader, status=403, code="insufficientScope")
    post(split, {"sourceIds": ["1"]}, headers=reader, status=403, code="insufficientScope")
    assert live_resources(gw, tenant) == 2, "nothing changed"

    sources = [s["id"] for s in get(gw, tenant, admin, f"resources/{survivor}")["sources"]]
    post(split, {"sourceIds": sources}, code="invalidBody")
    other_source = get(gw, tenant, admin, f"resources/{other_id}")["sources"][0]["id"]
    message = post(split, {"sourceIds": [other_source]}, code="invalidBody")
    assert other_source in message["error"]["message"]
    post(split, {"sourceIds": "1"}, code="invalidBody")
    post(f"resources/{loser}/split", {"sourceIds": sources[:1]}, status=409, code="resourceMerged")

    # another tenant's ids are not found, even for its admin
    stranger = gw.tenant()
    stranger_admin = gw.partner("Contoso", [stranger], scopes=ADMIN_SCOPES)
    push(gw, stranger, stranger_admin, document([finding("s-1", resource={"hostname": "theirs"})]))
    theirs = values(gw, stranger, stranger_admin, "resources")[0]["id"]
    post(merge, {"resourceIds": [theirs]}, status=404, code="notFound")
    post(
        f"resources/{survivor}/merge",
        {"resourceIds": [theirs]},
        headers=stranger_admin,
        status=404,
        tenant_=stranger,
    )
    post(
        f"resources/{theirs}/merge",
        {"resourceIds": [survivor]},
        headers=stranger_admin,
        status=404,
        tenant_=stranger,
    )
    post(
        f"resources/{survivor}/split",
        {"sourceIds": sources[:1]},
        headers=stranger_admin,
        status=404,
        tenant_=stranger,
    )
    post(
        f"resources/{survivor}/merge",
        {"resourceIds": [other_id]},
        headers=stranger_admin,
        status=404,
        tenant_=stranger,
    )
    assert live_resources(gw, tenant) == 2 and live_resources(gw, stranger) == 1


def test_a_split_moves_the_findings_and_observations_of_the_host_records(gw):
    tenant = gw.tenant()
    admin = gw.partner("Contoso", [tenant], scopes=ADMIN_SCOPES)
    tenable_host = ResourceRef(fqdn="db-1.example.com", host_key="db-1")
    qualys_host = ResourceRef(fqdn="db-1.example.com", host_key="qualys-42")

    def both_scanners(ts=T0):
        merge_direct(
            gw,
            tenant,
            "Tenable",
            [record("n-1", tenable_host, provider_timestamp=ts)],
            [observation("11936", tenable_host, name="OS Identification", category="os")],
            product="Nessus",
        )
        merge_direct(
            gw,
            tenant,
            "Qualys",
            [
                record("q-1", qualys_host, provider_timestamp=ts),
                record("q-2", qualys_host, cve="CVE-2023-4863", provider_timestamp=ts),
            ],
            [observation("qualys-os", qualys_host, name="OS", category="os")],
            product="Qualys VMDR",
            fmt="qualys_hld",
        )

    both_scanners()
    (resource,) = values(gw, tenant, admin, "resources")
    findings = values(gw, tenant, admin, "findings")
    assert len(findings) == 2 and {len(f["sources"]) for f in findings} == {1, 2}
    qualys_record = next(s["id"] for s in resource["sources"] if s["provider"] == "Qualys")

    split = gw.http.post(
        url(tenant, f"resources/{resource['id']}/split"), json={"sourceIds": [qualys_record]}, headers=admin
    )
    assert split.status_code == 201, split.get_json()
    new = split.get_json()["id"]
    by_resource: dict[str, list] = {}
    for row in values(gw, tenant, admin, "findings"):
        by_resource.setdefault(row["resourceId"], []).append(
            (row["correlationKey"], sorted(s["provider"] for s in row["sources"]))
        )
    assert sorted(by_resource[resource["id"]]) == [("CVE-2024-3094", ["Tenable"])]
    assert sorted(by_resource[new]) == [("CVE-2023-4863", ["Qualys"]), ("CVE-2024-3094", ["Qualys"])]
    observed = {
        r["providerId"]: r["resourceId"]
        for r in values(gw, tenant, admin, "observations", **{"$orderby": "id"})
    }
    assert observed == {"11936": resource["id"], "qualys-os": new}
    recommendations = values(gw, tenant, admin, "recommendations")
    assert sorted(r["resourceId"] for r in recommendations) == sorted([resource["id"], new])

    both_scanners(datetime(2024, 4, 2, tzinfo=UTC))  # the next scans: the split holds
    assert live_resources(gw, tenant) == 2
    assert {r["resourceId"] for r in values(gw, tenant, admin, "findings")} == {resource["id"], new}
    assert [s["provider"] for s in get(gw, tenant, admin, f"resources/{new}")["sources"]] == ["Qualys"]
