"""Qualys and Tenable native files about one host and one CVE: one resource, one finding.

The two fixtures (tests/fixtures/cross_scanner, cut from the real samples) describe host
64.41.200.243 / demo13.s02.sjc01.qualys.com with CVE-1999-0524: a Qualys scan report
(ASSET_DATA_REPORT, QID 82003 whose glossary names the CVE) and a Nessus v2 file (plugin
10114).  They go through the HTTP push and the real merge (the eager app runs
gateway.pipeline.process_batch inline) on PostgreSQL and on SQLite.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from gateway.models import Finding, FindingSource, Resource, ResourceIdentifier

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cross_scanner"
CVE = "CVE-1999-0524"
HOST_FQDN = "demo13.s02.sjc01.qualys.com"
HOST_IP = "64.41.200.243"
# Another ReportItem of the same Nessus sample host (nessus_with_cvssv3.nessus, plugin 40984): a
# finding (severity 2), so that the full scan reports the host (a severity 0 item would be an Observation)
OTHER_NESSUS_ITEM = """<ReportItem port="80" svc_name="www" protocol="tcp" severity="2" pluginID="40984"
                        pluginName="Browsable Web Directories" pluginFamily="CGI abuses">
                <cvss3_base_score>5.3</cvss3_base_score>
                <cvss3_vector>CVSS:3.0/AV:N/AC:L/PR:N/UI:N/S:U/C:L/I:N/A:N</cvss3_vector>
                <description>Multiple Nessus plugins identified directories on the web server that are
                browsable.
                </description>
                <plugin_name>Browsable Web Directories</plugin_name>
                <risk_factor>Medium</risk_factor>
                <synopsis>Some directories on the remote web server are browsable.</synopsis>
            </ReportItem>"""


def qualys_report(status: str = "New", last_fixed: str | None = None) -> bytes:
    text = (FIXTURES / "qualys_scan_report.xml").read_text()
    text = text.replace("<VULN_STATUS>New</VULN_STATUS>", f"<VULN_STATUS>{status}</VULN_STATUS>")
    if last_fixed:
        text = text.replace("</VULN_STATUS>", f"</VULN_STATUS><LAST_FIXED>{last_fixed}</LAST_FIXED>")
    return text.encode()


def nessus_scan(host_end: int = 1648044472, state: str | None = None, without_cve_item: bool = False
                ) -> bytes:
    text = (FIXTURES / "nessus_scan.nessus").read_text()
    # The sample rates plugin 10114 severity 0 (informational); a severity 0 ReportItem is an
    # Observation, never a finding, so the item is raised to severity 1 (low) to stay a finding.
    text = text.replace('severity="0" pluginID="10114"', 'severity="1" pluginID="10114"')
    text = text.replace(">1648044472<", f">{host_end}<")
    if state:
        state_tag = f"<vulnerability_state>{state}</vulnerability_state>"
        text = text.replace(f"<cve>{CVE}</cve>", f"<cve>{CVE}</cve>{state_tag}")
    if without_cve_item:
        start = text.index('<ReportItem port="0" svc_name="general" protocol="icmp"')
        end = text.index("</ReportItem>", start) + len("</ReportItem>")
        text = text[:start] + OTHER_NESSUS_ITEM + text[end:]
    return text.encode()


def push(gw, tenant, headers, body: bytes, format_name: str, scan_type: str | None = None) -> dict:
    query = f"format={format_name}" + (f"&scanType={scan_type}" if scan_type else "")
    response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?{query}", data=body,
                            headers=headers | {"Content-Type": "application/xml"})
    assert response.status_code == 202, response.get_json()
    batch = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{response.get_json()['id']}", headers=headers)
    assert batch.get_json()["status"] == "succeeded", batch.get_json()
    return batch.get_json()


def the_cve_finding(gw) -> dict:
    """The finding of CVE-1999-0524 as stored, with its sources (read from the store directly)."""
    with gw.db.sessions() as session:
        [finding] = session.scalars(select(Finding).where(Finding.correlation_key == CVE)).all()
        sources = session.scalars(
            select(FindingSource).where(FindingSource.finding_id == finding.id)
            .order_by(FindingSource.provider)
        ).all()
        return {
            "id": finding.id, "state": finding.state, "severity": finding.severity, "cve": finding.cve,
            "resourceId": finding.resource_id, "title": finding.title,
            "sources": [{"provider": s.provider, "providerId": s.provider_id, "state": s.state}
                        for s in sources],
        }


def count(gw, model) -> int:
    with gw.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def first_pushes(gw) -> tuple[str, dict, dict]:
    tenant = gw.tenant()
    qualys = gw.partner("Qualys", [tenant])
    tenable = gw.partner("Tenable", [tenant])
    push(gw, tenant, qualys, qualys_report(), "qualys_scan_xml")
    push(gw, tenant, tenable, nessus_scan(), "nessus")
    return tenant, qualys, tenable


def test_same_host_and_cve_from_both_scanners_is_one_resource_and_one_finding(gw):
    tenant, qualys, _ = first_pushes(gw)
    assert count(gw, Resource) == 1
    assert count(gw, Finding) == 1 and count(gw, FindingSource) == 2
    row = the_cve_finding(gw)
    assert row["cve"] == CVE
    assert row["state"] == "new"
    assert row["severity"] == "low"  # Qualys severity 1 (informational), Nessus severity 1 (low): the higher
    sources = {source["provider"]: source for source in row["sources"]}
    assert set(sources) == {"Qualys", "Tenable"}
    assert sources["Qualys"]["providerId"] == f"{HOST_IP}|82003|/"
    assert sources["Tenable"]["providerId"] == f"{HOST_FQDN}|10114|0/icmp"
    assert {source["state"] for source in row["sources"]} == {"open"}
    with gw.db.sessions() as session:
        [resource] = session.scalars(select(Resource)).all()
        identifiers = {(i.kind, i.value) for i in session.scalars(
            select(ResourceIdentifier).where(ResourceIdentifier.resource_id == resource.id))}
    assert resource.id == row["resourceId"]
    assert {("fqdn", HOST_FQDN), ("ipv4", HOST_IP)} <= identifiers


def test_resolved_only_when_both_scanners_report_it_fixed(gw):
    tenant, qualys, tenable = first_pushes(gw)
    push(gw, tenant, qualys, qualys_report("Fixed", last_fixed="2022-04-01T00:00:00Z"), "qualys_scan_xml")
    row = the_cve_finding(gw)
    assert row["state"] != "resolved"  # Tenable still reports it
    assert {s["provider"]: s["state"] for s in row["sources"]} == {"Qualys": "fixed", "Tenable": "open"}
    push(gw, tenant, tenable, nessus_scan(host_end=1649000000, state="Fixed"), "nessus")
    row = the_cve_finding(gw)
    assert row["state"] == "resolved"
    assert {s["state"] for s in row["sources"]} == {"fixed"}
    assert count(gw, Finding) == 1 and count(gw, Resource) == 1


def test_resolved_when_fixed_by_one_and_absent_from_the_others_full_scan(gw):
    tenant, qualys, tenable = first_pushes(gw)
    push(gw, tenant, tenable, nessus_scan(host_end=1649000000, without_cve_item=True), "nessus", "full")
    row = the_cve_finding(gw)
    assert row["state"] != "resolved"  # Qualys still reports it open
    assert {s["provider"]: s["state"] for s in row["sources"]} == {"Qualys": "open", "Tenable": "fixed"}
    push(gw, tenant, qualys, qualys_report("Fixed", last_fixed="2022-04-01T00:00:00Z"), "qualys_scan_xml")
    row = the_cve_finding(gw)
    assert row["state"] == "resolved"
    assert count(gw, Resource) == 1  # the full scan's other plugin landed on the same host
