"""A Qualys KnowledgeBase that arrives after the detections enriches and re-keys them (PG and SQLite).

The detections are the real Host List Detection sample with two QIDs swapped for QIDs the
real KnowledgeBase sample describes with CVEs (150272: CVE-2019-11041 and CVE-2019-11042;
150461: CVE-2021-40438); QID 38601 is not in that KB and stays as it is.
"""

from __future__ import annotations

import json

from sqlalchemy import select

from gateway.models import Finding, FindingSource, LifecycleEvent, Resource
from tests.connectors.conftest import SAMPLES

HLD = (SAMPLES / "qualys_hld_xml" / "jupiterone_detections.xml").read_bytes().replace(
    b"<QID>38170</QID>", b"<QID>150272</QID>").replace(b"<QID>38173</QID>", b"<QID>150461</QID>")
KB = (SAMPLES / "qualys_hld_xml" / "jupiterone_knowledge_base_vuln_list_response.xml").read_bytes()
TENABLE = json.dumps({"findings": [{
    "id": "2k8r2|155640|443/tcp", "resource": {"hostname": "2k8r2-u-10-11", "ipv4": ["10.10.10.11"]},
    "title": "Apache 2.4.x < 2.4.49 mod_proxy SSRF", "severity": "critical", "cves": ["CVE-2021-40438"],
    "status": "open", "providerTimestamp": "2022-01-01T00:00:00Z"}]}).encode()


def push(gw, tenant, headers, body: bytes, format_name: str, content_type: str = "application/xml") -> dict:
    response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format={format_name}", data=body,
                            headers=headers | {"Content-Type": content_type})
    assert response.status_code == 202, response.get_json()
    batch = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{response.get_json()['id']}", headers=headers)
    assert batch.get_json()["status"] == "succeeded", batch.get_json()
    return batch.get_json()


def stored(gw, tenant_id: int | None = None) -> dict[str, dict]:
    """Findings by correlation key, with their sources' providers and the titles they hold."""
    with gw.db.sessions() as session:
        query = select(Finding)
        if tenant_id is not None:
            query = query.where(Finding.tenant_id == tenant_id)
        result = {}
        for finding in session.scalars(query):
            sources = session.scalars(
                select(FindingSource).where(FindingSource.finding_id == finding.id)).all()
            result[finding.correlation_key] = {
                "id": finding.id, "state": finding.state, "title": finding.title, "cve": finding.cve,
                "resource": finding.resource_id, "providers": sorted(s.provider for s in sources),
                "source_keys": sorted(s.correlation_key for s in sources),
                "description": finding.description,
            }
        return result


def events_of(gw, finding_id: int) -> list[tuple[str, dict]]:
    with gw.db.sessions() as session:
        return [(e.event, e.details) for e in session.scalars(
            select(LifecycleEvent).where(LifecycleEvent.subject_type == "finding",
                                         LifecycleEvent.subject_id == finding_id)
            .order_by(LifecycleEvent.id))]


def test_a_later_kb_enriches_and_rekeys_stored_detections(gw):
    tenant = gw.tenant()
    qualys = gw.partner("Qualys", [tenant])
    tenable = gw.partner("Tenable", [tenant])
    push(gw, tenant, qualys, HLD, "qualys_hld")
    push(gw, tenant, tenable, TENABLE, "canonical", "application/json")
    before = stored(gw)
    assert set(before) == {"Qualys/150272", "Qualys/150461", "Qualys/38601", "CVE-2021-40438"}
    assert before["Qualys/150272"]["title"] == "QID 150272"
    php_id, apache_qid_id = before["Qualys/150272"]["id"], before["Qualys/150461"]["id"]
    tenable_id = before["CVE-2021-40438"]["id"]

    kb_batch = push(gw, tenant, qualys, KB, "qualys_kb")
    assert kb_batch["counts"]["created"] == 42

    after = stored(gw)
    # the emptied QID finding is gone from the findings: only its history remains, on the finding it joined
    assert set(after) == {"CVE-2019-11041", "CVE-2019-11042", "CVE-2021-40438", "Qualys/38601"}
    # QID 150272 -> its first CVE: the same finding, re-keyed in place
    php = after["CVE-2019-11041"]
    assert php["id"] == php_id and php["cve"] == "CVE-2019-11041"
    assert php["title"] == "PHP 7 Multiple Vulnerabilities" and php["description"]
    assert php["providers"] == ["Qualys"] and php["state"] == "new"
    assert ("rekeyed", {"from": "Qualys/150272", "to": "CVE-2019-11041"}) in events_of(gw, php_id)
    # ... and its second CVE: a new finding on the same resource, with a copy of the source
    second = after["CVE-2019-11042"]
    assert second["id"] != php_id and second["resource"] == php["resource"]
    assert second["providers"] == ["Qualys"] and second["title"] == "PHP 7 Multiple Vulnerabilities"
    assert [event for event, _ in events_of(gw, second["id"])] == ["new"]
    # QID 150461 -> CVE-2021-40438, which Tenable already reported: one finding, two sources
    apache = after["CVE-2021-40438"]
    assert apache["id"] == tenable_id and apache["providers"] == ["Qualys", "Tenable"]
    assert apache["source_keys"] == ["CVE-2021-40438", "CVE-2021-40438"]
    assert events_of(gw, apache_qid_id) == []  # re-pointed, not lost:
    history = events_of(gw, tenable_id)
    assert ("merged", {"from": "Qualys/150461", "mergedFinding": apache_qid_id,
                       "correlationKey": "CVE-2021-40438"}) in history
    assert [event for event, _ in history].count("new") == 2  # Tenable's finding's and the QID finding's
    # a QID the KB does not describe is left alone
    assert after["Qualys/38601"]["title"] == "QID 38601"
    with gw.db.sessions() as session:
        assert len(session.scalars(select(Resource)).all()) == 1

    # the detections again, now enriched on arrival: the same keys, nothing new
    again = push(gw, tenant, qualys, HLD, "qualys_hld")
    assert again["counts"]["created"] == 0
    assert set(stored(gw)) == set(after)
    assert push(gw, tenant, qualys, HLD, "qualys_hld")["counts"]["unchanged"] == 3


def test_kb_after_detections_ends_like_kb_before_detections(gw):
    late, early = gw.tenant(), gw.tenant()
    headers = gw.partner("Qualys", [late, early])
    push(gw, late, headers, HLD, "qualys_hld")
    push(gw, late, headers, KB, "qualys_kb")
    push(gw, early, headers, KB, "qualys_kb")
    push(gw, early, headers, HLD, "qualys_hld")
    with gw.db.sessions() as session:
        from gateway.models import Tenant

        ids = {t.external_id: t.id for t in session.scalars(select(Tenant))}

    def shape(tenant_id):
        return {key: (row["title"], row["providers"], row["source_keys"], row["description"] is not None)
                for key, row in stored(gw, tenant_id).items()}

    assert shape(ids[late]) == shape(ids[early])
    assert set(shape(ids[late])) == {"CVE-2019-11041", "CVE-2019-11042", "CVE-2021-40438", "Qualys/38601"}


def test_an_unchanged_kb_push_does_nothing_more(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    push(gw, tenant, headers, HLD, "qualys_hld")
    push(gw, tenant, headers, KB, "qualys_kb")
    # the history, without the outbox's batch.finished (one per batch, whatever it changed)
    history = select(LifecycleEvent).where(LifecycleEvent.subject_type != "batch")
    with gw.db.sessions() as session:
        events = len(session.scalars(history).all())
    assert push(gw, tenant, headers, KB, "qualys_kb")["counts"]["unchanged"] == 42
    with gw.db.sessions() as session:
        assert len(session.scalars(history).all()) == events
