"""Tenant isolation of everything a response shows (DESIGN rule 6), on PostgreSQL and SQLite.

Two tenants, each with its own client of the same provider, push records with the SAME keys
(the same ASC assessment name, canonical ``recommendation`` key, provider ids, CVEs, vendor
ids, alert ids and Qualys QIDs) and different secret texts.  Every read a tenant can make
(each collection as JSON and CSV, each item, each history, the assessment PUT's answer)
must show its own texts and never the other tenant's.  The texts of rows that are shared
by key (recommendation types) are the ones at risk: the first tenant to use a key must not
fix what the second reads.
"""

from __future__ import annotations

import json

import pytest

from tests.factories import document, finding

ASSESSMENT = "8bb8be0a-6010-4789-812f-e4d661c4ed0e"  # a well-known ASC assessment key
VM = ("/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23/resourceGroups/prod/providers/"
      "Microsoft.Compute/virtualMachines/web-01")
QID = "990001"
COLLECTIONS = ("alerts", "recommendations", "findings", "resources")
WORKFLOW = ("alerts", "recommendations", "findings")
PROVIDER = "Qualys"  # both tenants' clients: provider-derived type keys collide too


def secrets(tag: str) -> dict[str, str]:
    """Distinct texts of one tenant, each of which must reach only that tenant's responses."""
    names = ("assessment_title", "assessment_description", "assessment_remediation", "vuln_title",
             "vuln_description", "vuln_remediation", "rec_title", "rec_description", "rec_remediation",
             "vendor_title", "vendor_description", "vendor_remediation", "kb_title", "kb_description",
             "kb_remediation", "alert_title", "alert_description", "alert_action", "resource_name")
    return {name: f"zz{tag}-{name}-secret" for name in names}


def knowledge_base(texts: dict[str, str]) -> bytes:
    return f"""<?xml version="1.0" encoding="UTF-8" ?>
<KNOWLEDGE_BASE_VULN_LIST_OUTPUT><RESPONSE><DATETIME>2024-01-01T00:00:00Z</DATETIME><VULN_LIST>
  <VULN><QID>{QID}</QID><VULN_TYPE>Vulnerability</VULN_TYPE><SEVERITY_LEVEL>4</SEVERITY_LEVEL>
    <TITLE><![CDATA[{texts['kb_title']}]]></TITLE>
    <LAST_SERVICE_MODIFICATION_DATETIME>2024-01-01T00:00:00Z</LAST_SERVICE_MODIFICATION_DATETIME>
    <DIAGNOSIS><![CDATA[{texts['kb_description']}]]></DIAGNOSIS>
    <SOLUTION><![CDATA[{texts['kb_remediation']}]]></SOLUTION>
  </VULN>
</VULN_LIST></RESPONSE></KNOWLEDGE_BASE_VULN_LIST_OUTPUT>""".encode()


def findings_document(texts: dict[str, str]) -> bytes:
    # the resource's name is its FQDN (gateway/merge/resources.py best_name); the tenant's own text
    # is its cloud Name tag, which the resource shows among its identifiers
    host = {"fqdn": "db-1.example.com", "ipv4": ["10.0.0.5"], "cloudName": texts["resource_name"]}
    return document([
        # a CVE under the built-in vulnerability type
        finding("shared-1", cves=["CVE-2024-3094"], title=texts["vuln_title"],
                description=texts["vuln_description"], remediation=texts["vuln_remediation"], resource=host),
        # a canonical recommendation key both tenants choose
        finding("shared-2", cves=[], kind="compliance", recommendation="custom-recommendation-key",
                vendorId="CIS-1.1", title=texts["rec_title"], description=texts["rec_description"],
                remediation=texts["rec_remediation"], resource=host),
        # no recommendation key: the type key is derived from the provider and vendor id
        finding("shared-3", cves=[], kind="compliance", vendorId="V-1", title=texts["vendor_title"],
                description=texts["vendor_description"], remediation=texts["vendor_remediation"],
                resource=host),
        # a bare QID, enriched from the tenant's knowledge base
        finding("shared-4", cves=[], vendorId=QID, title=f"QID {QID}", description=None, remediation=None,
                resource=host),
    ])


def graph_alerts(texts: dict[str, str]) -> bytes:
    return json.dumps({"value": [{
        "id": "shared-alert-1", "title": texts["alert_title"], "description": texts["alert_description"],
        "severity": "high", "status": "newAlert", "category": "CredentialAccess",
        "createdDateTime": "2024-04-01T10:00:00Z", "lastModifiedDateTime": "2024-04-01T11:00:00Z",
        "recommendedActions": [texts["alert_action"]],
        "hostStates": [{"fqdn": "db-1.example.com"}],
        "vendorInformation": {"provider": PROVIDER, "vendor": "Q"},
    }]}).encode()


def assessment(texts: dict[str, str]) -> dict:
    return {"properties": {
        "resourceDetails": {"source": "Azure"},
        "status": {"code": "Unhealthy", "cause": "Custom", "statusChangeDate": "2024-03-05T08:30:00Z"},
        "metadata": {"displayName": texts["assessment_title"], "severity": "High",
                     "description": texts["assessment_description"],
                     "remediationDescription": texts["assessment_remediation"]},
    }}


def push(gw, tenant: str, headers: dict, body: bytes, fmt: str, content_type: str) -> None:
    response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format={fmt}", data=body,
                            headers=headers | {"Content-Type": content_type})
    assert response.status_code == 202, response.get_json()
    batch = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{response.get_json()['id']}", headers=headers)
    assert batch.get_json()["status"] == "succeeded", batch.get_json()


def write_everything(gw, tenant: str, headers: dict, texts: dict[str, str]) -> str:
    """Push every kind of record with the shared keys; return the assessment PUT's answer."""
    push(gw, tenant, headers, knowledge_base(texts), "qualys_kb", "application/xml")
    push(gw, tenant, headers, findings_document(texts), "canonical", "application/json")
    push(gw, tenant, headers, graph_alerts(texts), "graph_alert", "application/json")
    response = gw.http.put(f"/api/v1/tenants/{tenant}/assessments/{ASSESSMENT}?resourceId={VM}",
                           data=json.dumps(assessment(texts)),
                           headers=headers | {"Content-Type": "application/json"})
    assert response.status_code == 201, response.get_json()
    return response.get_data(as_text=True)


def everything_read(gw, tenant: str, headers: dict) -> dict[str, str]:
    """Every response the tenant's reader gets, by what was asked."""
    base = f"/api/v1/tenants/{tenant}/security"
    seen: dict[str, str] = {}
    for name in COLLECTIONS:
        listed = gw.http.get(f"{base}/{name}", query_string={"$top": "1000"}, headers=headers)
        assert listed.status_code == 200, listed.get_json()
        seen[f"{name} json"] = listed.get_data(as_text=True)
        as_csv = gw.http.get(f"{base}/{name}", query_string={"$format": "csv"}, headers=headers)
        assert as_csv.status_code == 200 and as_csv.mimetype == "text/csv"
        seen[f"{name} csv"] = as_csv.get_data(as_text=True)
        ids = [item["id"] for item in listed.get_json()["value"]]
        assert ids, f"the tenant has {name}"
        for item_id in ids:
            one = gw.http.get(f"{base}/{name}/{item_id}", headers=headers)
            assert one.status_code == 200
            seen[f"{name}/{item_id}"] = one.get_data(as_text=True)
            if name in WORKFLOW:
                history = gw.http.get(f"{base}/{name}/{item_id}/history", headers=headers)
                assert history.status_code == 200
                seen[f"{name}/{item_id}/history"] = history.get_data(as_text=True)
    return seen


def test_same_keys_in_two_tenants_never_show_the_other_tenants_texts(gw):
    tenants = {"A": gw.tenant(), "B": gw.tenant()}
    headers = {tag: gw.partner(PROVIDER, [tenant]) for tag, tenant in tenants.items()}
    texts = {tag: secrets(tag) for tag in tenants}
    answers = {}
    for tag in ("B", "A"):  # B first: B's records create whatever is shared by key
        answers[tag] = write_everything(gw, tenants[tag], headers[tag], texts[tag])

    for tag, other in (("A", "B"), ("B", "A")):
        seen = everything_read(gw, tenants[tag], headers[tag])
        seen["assessment PUT"] = answers[tag]
        for where, body in seen.items():
            leaked = [text for text in texts[other].values() if text in body]
            assert not leaked, f"tenant {tag}'s {where} shows tenant {other}'s {leaked}"
        everything = "\n".join(seen.values())
        missing = [name for name, text in texts[tag].items() if text not in everything]
        assert not missing, f"tenant {tag} does not see its own {missing}"
        # the recommendation types a tenant reads carry its own texts
        recommendations = json.loads(seen["recommendations json"])["value"]
        by_type = {rec["recommendationType"]: rec for rec in recommendations}
        assert by_type[ASSESSMENT]["displayName"] == texts[tag]["assessment_title"]
        assert by_type[ASSESSMENT]["remediation"] == texts[tag]["assessment_remediation"]
        assert by_type["custom-recommendation-key"]["displayName"] == texts[tag]["rec_title"]
        assert by_type[f"{PROVIDER}:V-1"]["displayName"] == texts[tag]["vendor_title"]
        assert by_type["vulnerability-assessment"]["kind"] == "vulnerability"


@pytest.mark.parametrize("name", ["recommendations", "findings"])
def test_filters_on_type_fields_see_only_the_tenants_own_types(gw, name):
    """``$filter`` on the joined type's fields matches the tenant's own type texts only."""
    tenants = {"A": gw.tenant(), "B": gw.tenant()}
    headers = {tag: gw.partner(PROVIDER, [tenant]) for tag, tenant in tenants.items()}
    texts = {tag: secrets(tag) for tag in tenants}
    for tag in ("B", "A"):
        push(gw, tenants[tag], headers[tag], findings_document(texts[tag]), "canonical", "application/json")
    url = f"/api/v1/tenants/{tenants['A']}/security/{name}"
    wanted = {"$filter": "recommendationType eq 'custom-recommendation-key'", "$count": "true"}
    body = gw.http.get(url, query_string=wanted, headers=headers["A"]).get_json()
    assert body["@odata.count"] == len(body["value"]) == 1
    assert all(texts["B"]["rec_title"] not in json.dumps(item) for item in body["value"])
    if name == "recommendations":
        probe = {"$filter": f"displayName eq '{texts['B']['rec_title']}'", "$count": "true"}
        assert gw.http.get(url, query_string=probe, headers=headers["A"]).get_json()["@odata.count"] == 0
        own = {"$filter": f"displayName eq '{texts['A']['rec_title']}'", "$count": "true"}
        assert gw.http.get(url, query_string=own, headers=headers["A"]).get_json()["@odata.count"] == 1
