"""Identity resolution (gateway/merge/resources.py): evidence, conflicts, scopes, later evidence.

Every test pushes canonical documents through the ingest API on PostgreSQL and SQLite and
reads the store back; the rules are the table in the resolver's docstring.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from connectors.model import ResourceRef
from gateway.merge.resources import conflicts, normalize
from gateway.models import Finding, FindingSource, LifecycleEvent, Resource, ResourceIdentifier
from tests.test_merge import push

TS = "2024-04-01T00:00:00Z"


def item(provider_id: str, resource: dict, cves=("CVE-2024-3094",), **extra) -> dict:
    body = {
        "id": provider_id,
        "resource": resource,
        "title": f"Vulnerability {provider_id}",
        "severity": "high",
        "cves": list(cves),
        "providerTimestamp": extra.pop("ts", TS),
        "lastSeen": TS,
    }
    body.update(extra)
    return body


def doc(*items) -> bytes:
    return json.dumps({"findings": list(items)}).encode()


def live_resources(gw) -> list[Resource]:
    with gw.db.sessions() as session:
        return session.scalars(
            select(Resource).where(Resource.merged_into.is_(None)).order_by(Resource.id)
        ).all()


def resource_of(gw, provider_id: str) -> int:
    with gw.db.sessions() as session:
        return session.scalars(
            select(FindingSource.resource_id).where(FindingSource.provider_id == provider_id)
        ).first()


def setup(gw, *providers):
    tenant = gw.tenant()
    return tenant, [gw.partner(provider, [tenant]) for provider in providers]


# -- the rules, one by one ------------------------------------------------------------------------


def test_short_hostname_fqdn_and_netbios_with_a_shared_ip_are_one_machine(gw):
    tenant, (nessus, qualys, tenable) = setup(gw, "Tenable", "Qualys", "Microsoft")
    push(gw, tenant, nessus, doc(item("n-1", {"fqdn": "WEB-01.Corp.Example.com.", "ipv4": ["10.1.0.5"]})))
    push(gw, tenant, qualys, doc(item("q-1", {"netbios": "WEB-01", "ipv4": ["10.1.0.5"]})))
    push(
        gw,
        tenant,
        tenable,
        doc(item("t-1", {"hostname": "web-01", "mac": "00-50-56-AA-BB-01", "ipv4": ["10.1.0.5"]})),
    )
    assert len(live_resources(gw)) == 1
    assert len({resource_of(gw, pid) for pid in ("n-1", "q-1", "t-1")}) == 1


def test_two_machines_called_web_in_two_domains_stay_apart(gw):
    tenant, (a, b) = setup(gw, "Tenable", "Qualys")
    push(gw, tenant, a, doc(item("a-1", {"fqdn": "web.east.example.com", "ipv4": ["10.0.0.5"]})))
    push(gw, tenant, b, doc(item("b-1", {"fqdn": "web.west.example.com", "ipv4": ["10.0.0.5"]})))
    # a short name plus an IP would match, but the FQDNs conflict
    push(gw, tenant, b, doc(item("b-2", {"hostname": "web", "ipv4": ["10.0.0.9"]})))
    assert resource_of(gw, "a-1") != resource_of(gw, "b-1")
    assert resource_of(gw, "b-2") not in (resource_of(gw, "a-1"), resource_of(gw, "b-1"))


def test_the_same_private_ip_in_two_networks_is_two_machines(gw):
    tenant, (cloud, scanner) = setup(gw, "AWS", "Qualys")
    push(
        gw,
        tenant,
        cloud,
        doc(
            item(
                "c-1",
                {
                    "cloudId": "arn:aws:ec2:eu-west-1:1:instance/i-0a",
                    "network": "vpc-1",
                    "ipv4": ["10.0.0.5"],
                },
            ),
            item(
                "c-2",
                {
                    "cloudId": "arn:aws:ec2:eu-west-1:1:instance/i-0b",
                    "network": "vpc-2",
                    "ipv4": ["10.0.0.5"],
                },
            ),
        ),
    )
    assert resource_of(gw, "c-1") != resource_of(gw, "c-2")
    # an IP-only record in vpc-1 joins the one machine holding that IP there
    push(gw, tenant, scanner, doc(item("q-1", {"ipv4": ["10.0.0.5"], "network": "vpc-1"})))
    assert resource_of(gw, "q-1") == resource_of(gw, "c-1")
    # in the default scope nobody holds it: a machine of its own
    push(gw, tenant, scanner, doc(item("q-2", {"ipv4": ["10.0.0.5"]})))
    assert resource_of(gw, "q-2") not in (resource_of(gw, "c-1"), resource_of(gw, "c-2"))


def test_an_ip_held_by_two_resources_is_ambiguous(gw):
    tenant, (a, b) = setup(gw, "Tenable", "Qualys")
    push(
        gw,
        tenant,
        a,
        doc(
            item("a-1", {"fqdn": "one.example.com", "ipv4": ["10.0.0.7"]}),
            item("a-2", {"fqdn": "two.example.com", "ipv4": ["10.0.0.7"]}),
        ),
    )
    push(gw, tenant, b, doc(item("b-1", {"ipv4": ["10.0.0.7"]})))
    assert resource_of(gw, "b-1") not in (resource_of(gw, "a-1"), resource_of(gw, "a-2"))
    assert len(live_resources(gw)) == 3


def test_ip_only_host_joins_the_scanner_host_in_either_order(gw):
    for order in ((0, 1), (1, 0)):
        tenant, (qualys, nessus) = setup(gw, "Qualys", "Tenable")
        pushes = [
            (qualys, doc(item("q-1", {"ipv4": ["192.168.7.20"]}))),
            (
                nessus,
                doc(
                    item(
                        "n-1",
                        {"fqdn": "db7.example.com", "mac": "00:11:22:33:44:55", "ipv4": ["192.168.7.20"]},
                    )
                ),
            ),
        ]
        for index in order:
            push(gw, tenant, *pushes[index])
        with gw.db.sessions() as session:
            rid = session.scalar(
                select(FindingSource.resource_id)
                .join(Finding, Finding.id == FindingSource.finding_id)
                .where(FindingSource.provider_id == "q-1", Finding.tenant_id == FindingSource.tenant_id)
                .order_by(FindingSource.id.desc())
            )
            other = session.scalar(
                select(FindingSource.resource_id)
                .where(FindingSource.provider_id == "n-1")
                .order_by(FindingSource.id.desc())
            )
        assert rid == other, order


def test_dhcp_change_keeps_one_machine_by_mac_and_fqdn(gw):
    tenant, (a, b) = setup(gw, "Tenable", "Qualys")
    push(
        gw,
        tenant,
        a,
        doc(item("a-1", {"fqdn": "lap-9.example.com", "mac": "aa:bb:cc:00:00:09", "ipv4": ["10.0.3.10"]})),
    )
    push(
        gw,
        tenant,
        b,
        doc(item("b-1", {"netbios": "LAP-9", "mac": "AA-BB-CC-00-00-09", "ipv4": ["10.0.3.77"]})),
    )
    assert resource_of(gw, "a-1") == resource_of(gw, "b-1")


def test_different_agent_ids_of_one_vendor_conflict_but_other_vendors_do_not(gw):
    tenant, (tenable, qualys) = setup(gw, "Tenable", "Qualys")
    push(
        gw,
        tenant,
        tenable,
        doc(
            item("t-1", {"agentId": "11111111-1111-1111-1111-111111111111", "fqdn": "dup.example.com"}),
            item(
                "t-2",
                {"agentId": "22222222-2222-2222-2222-222222222222", "fqdn": "dup.example.com"},
                cves=["CVE-2024-0001"],
            ),
        ),
    )
    assert resource_of(gw, "t-1") != resource_of(gw, "t-2")
    # a Qualys agent id next to a Tenable one on the same machine is no conflict
    push(gw, tenant, qualys, doc(item("q-1", {"agentId": "q-agent-1", "fqdn": "solo.example.com"})))
    push(
        gw,
        tenant,
        tenable,
        doc(item("t-3", {"agentId": "33333333-3333-3333-3333-333333333333", "fqdn": "solo.example.com"})),
    )
    assert resource_of(gw, "q-1") == resource_of(gw, "t-3")


def test_cloud_instance_meets_its_agent_through_instance_id_and_name_tag(gw):
    tenant, (aws, qualys, tenable) = setup(gw, "AWS", "Qualys", "Tenable")
    push(
        gw,
        tenant,
        aws,
        doc(
            item(
                "arn-f-1",
                {
                    "cloudId": "arn:aws:ec2:us-east-1:123:instance/i-0abc",
                    "cloudName": "billing-02",
                    "network": "vpc-9",
                    "ipv4": ["172.31.5.4"],
                },
            )
        ),
    )
    push(
        gw,
        tenant,
        qualys,
        doc(item("q-1", {"agentId": "qg-77", "instanceId": "i-0abc", "fqdn": "ip-172-31-5-4.ec2.internal"})),
    )
    push(
        gw,
        tenant,
        tenable,
        doc(item("t-1", {"agentId": "tn-88", "hostname": "billing-02", "ipv4": ["172.31.5.4"]})),
    )
    assert len({resource_of(gw, pid) for pid in ("arn-f-1", "q-1", "t-1")}) == 1


def test_conflict_rules_in_isolation():
    one = normalize(ResourceRef(fqdn="a.example.com"))
    assert conflicts(one, normalize(ResourceRef(fqdn="b.example.com")))
    assert not conflicts(one, normalize(ResourceRef(cloud_id="arn:aws:ec2:x:1:instance/i-1")))
    assert conflicts(
        normalize(ResourceRef(agent_id="x"), "Tenable"), normalize(ResourceRef(agent_id="y"), "Tenable")
    )
    assert not conflicts(
        normalize(ResourceRef(agent_id="x"), "Tenable"), normalize(ResourceRef(agent_id="y"), "Qualys")
    )
    scoped = normalize(ResourceRef(ipv4=["10.0.0.5", "8.8.8.8"], network="VPC-1", hostname="localhost"))
    assert scoped["ipv4"] == ["10.0.0.5%vpc-1", "8.8.8.8"]  # public addresses are tenant-wide
    assert "name" not in scoped  # a placeholder name is no evidence
    assert normalize(ResourceRef(cloud_id="arn:aws:ec2:us-east-1:1:instance/i-0ABC"))["instance_id"] == [
        "i-0abc"
    ]


# -- later evidence joins resources -----------------------------------------------------------------


def test_later_evidence_merges_two_resources_and_their_findings(gw):
    tenant, (nessus, tenable) = setup(gw, "Nessus Inc", "Tenable")
    push(
        gw,
        tenant,
        nessus,
        doc(
            item("n-1", {"fqdn": "app-3.example.com"}),
            item("n-2", {"fqdn": "app-3.example.com"}, cves=["CVE-2023-1111"]),
        ),
    )
    push(
        gw,
        tenant,
        tenable,
        doc(
            item("t-1", {"agentId": "agent-3"}, status="fixed"),
            item("t-2", {"agentId": "agent-3"}, cves=["CVE-2023-2222"]),
        ),
    )
    first, second = resource_of(gw, "n-1"), resource_of(gw, "t-1")
    assert first != second
    # Tenable's agent now also reports the FQDN: the two resources are one machine
    batch = push(
        gw,
        tenant,
        tenable,
        doc(item("b-1", {"fqdn": "app-3.example.com", "agentId": "agent-3"}, cves=["CVE-2024-9999"])),
    )
    assert batch["counts"]["resourcesMerged"] == 1
    survivor = min(first, second)
    assert {resource_of(gw, pid) for pid in ("n-1", "n-2", "t-1", "t-2", "b-1")} == {survivor}
    with gw.db.sessions() as session:
        merged = session.get(Resource, max(first, second))
        assert merged.merged_into == survivor
        # CVE-2024-3094 was on both: one finding with both sources, open (Nessus still says open)
        rows = session.scalars(
            select(Finding).where(Finding.resource_id == survivor, Finding.correlation_key == "CVE-2024-3094")
        ).all()
        assert len(rows) == 1
        providers = sorted(
            session.scalars(
                select(FindingSource.provider).where(FindingSource.finding_id == rows[0].id)
            ).all()
        )
        assert providers == ["Nessus Inc", "Tenable"]
        assert rows[0].state in ("new", "active")
        assert not session.scalars(select(Finding).where(Finding.resource_id == max(first, second))).all()
        # the emptied finding's history joined the surviving finding
        history = session.scalars(
            select(LifecycleEvent.event).where(
                LifecycleEvent.subject_type == "finding", LifecycleEvent.subject_id == rows[0].id
            )
        ).all()
        assert "merged" in history and history.count("new") == 2
        events = session.scalars(
            select(LifecycleEvent.event).where(
                LifecycleEvent.subject_type == "resource", LifecycleEvent.subject_id == survivor
            )
        ).all()
        assert "merged" in events
        kinds = {
            i.kind
            for i in session.scalars(
                select(ResourceIdentifier).where(ResourceIdentifier.resource_id == survivor)
            )
        }
        assert {"fqdn", "agent_id", "name"} <= kinds
        assert not session.scalars(
            select(ResourceIdentifier).where(ResourceIdentifier.resource_id == max(first, second))
        ).all()
    recs = gw.http.get(f"/api/v1/tenants/{tenant}/security/recommendations", headers=nessus).get_json()[
        "value"
    ]
    assert [r["resourceId"] for r in recs] == [str(survivor)]


def test_conflicting_candidates_are_not_merged(gw):
    tenant, (a, b, c) = setup(gw, "Tenable", "Qualys", "Other")
    push(gw, tenant, a, doc(item("a-1", {"fqdn": "x1.example.com", "agentId": "agent-a"})))
    push(gw, tenant, b, doc(item("b-1", {"fqdn": "x2.example.com", "agentId": "agent-b"})))
    # names both FQDNs: the two resources conflict (different FQDNs), so nothing is merged
    batch = push(
        gw,
        tenant,
        c,
        doc(
            item("c-1", {"fqdn": "x1.example.com", "cloudId": "/subscriptions/s/vm1"}),
            item("c-2", {"fqdn": "x2.example.com", "cloudId": "/subscriptions/s/vm1"}),
        ),
    )
    assert batch["counts"]["resourcesMerged"] == 0
    assert resource_of(gw, "a-1") != resource_of(gw, "b-1")


# -- duplicates within a push ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk_apart", [False, True])
def test_a_record_repeated_in_one_push_is_one_record_with_both_outputs(gw, chunk_apart):
    tenant, (tenable,) = setup(gw, "Tenable")
    host = {"fqdn": "rep.example.com"}
    filler = [item(f"f-{n}", host, cves=[f"CVE-2020-{1000 + n}"]) for n in range(3)]
    first = item("dup", host, evidence="port 443: TLS 1.0 enabled")
    again = item("dup", host, evidence="port 8443: TLS 1.0 enabled")
    records = [first, *filler, again]
    if chunk_apart:
        gw.app.config["MERGE_CHUNK_SIZE"] = 2
    try:
        batch = push(gw, tenant, tenable, doc(*records))
    finally:
        gw.app.config["MERGE_CHUNK_SIZE"] = 5000
    assert batch["counts"]["received"] == 4
    assert batch["counts"]["created"] == 4
    assert batch["counts"]["duplicatesInPush"] == 1
    with gw.db.sessions() as session:
        [evidence] = session.scalars(
            select(FindingSource.evidence).where(FindingSource.provider_id == "dup")
        ).all()
    assert "port 443" in evidence and "port 8443" in evidence
    # the same push again is unchanged: nothing rewritten, nothing lost
    again_batch = push(gw, tenant, tenable, doc(*records))
    assert again_batch["counts"]["unchanged"] == 4 and again_batch["counts"]["updated"] == 0
    with gw.db.sessions() as session:
        [evidence] = session.scalars(
            select(FindingSource.evidence).where(FindingSource.provider_id == "dup")
        ).all()
    assert "port 443" in evidence and "port 8443" in evidence


def test_an_address_taken_over_after_a_dhcp_change_is_split_off_again(gw):
    """An IP-tracked record joins the machine that held its address; the next scan of that machine
    shows it moved on (same name, new address, a week later): the IP-tracked host is split off."""
    tenant, (nessus, qualys) = setup(gw, "Tenable", "Qualys")
    push(gw, tenant, nessus, doc(item("n-1", {"fqdn": "lap-3.example.com", "mac": "00:11:22:33:44:03",
                                              "ipv4": ["10.9.0.13"]}, lastSeen="2024-05-01T02:00:00Z",
                                      ts="2024-05-01T02:00:00Z")))
    # a week later Qualys sees some host at that address (and only its address)
    push(gw, tenant, qualys, doc(item("q-ip", {"ipv4": ["10.9.0.13"], "hostKey": "host-77"},
                                      cves=["CVE-2021-0001"], lastSeen="2024-05-08T02:00:00Z",
                                      ts="2024-05-08T02:00:00Z")))
    assert resource_of(gw, "q-ip") == resource_of(gw, "n-1")  # the only holder of that address
    # ... and the laptop itself, by name, at its new address the same day
    push(gw, tenant, qualys, doc(item("q-dns", {"fqdn": "lap-3.example.com", "ipv4": ["10.9.0.77"],
                                                "hostKey": "host-12"},
                                      cves=["CVE-2021-0002"], lastSeen="2024-05-08T03:00:00Z",
                                      ts="2024-05-08T03:00:00Z")))
    laptop = resource_of(gw, "n-1")
    assert resource_of(gw, "q-dns") == laptop
    assert resource_of(gw, "q-ip") != laptop
    with gw.db.sessions() as session:
        events = session.scalars(select(LifecycleEvent.event).where(
            LifecycleEvent.subject_type == "resource", LifecycleEvent.subject_id == laptop)).all()
    assert "split" in events
    # the address does not pull it back on the next push
    push(gw, tenant, qualys, doc(item("q-ip", {"ipv4": ["10.9.0.13"], "hostKey": "host-77"},
                                      cves=["CVE-2021-0001"], lastSeen="2024-05-09T02:00:00Z",
                                      ts="2024-05-09T02:00:00Z")))
    assert resource_of(gw, "q-ip") != resource_of(gw, "n-1")
