"""Security policy and exemptions (issue 11): what they do to recommendations, findings and the
score, through the API, on both stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from gateway.models import LifecycleEvent, Tenant
from tests.factories import document
from tests.test_merge import push
from tests.test_score import compliance, history, rows_of, vuln

SEC = "/api/v1/tenants/{}/security/"
MANAGE = "findings.write security.read posture.manage"


def _setup(gw, provider="Qualys"):
    tenant = gw.tenant()
    return tenant, gw.partner(provider, [tenant], scopes=MANAGE)


def _recs(gw, tenant, headers, odata_filter=None):
    query = {"$filter": odata_filter} if odata_filter else {}
    response = gw.http.get(SEC.format(tenant) + "recommendations", query_string=query, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def _post(gw, tenant, headers, name, body):
    return gw.http.post(SEC.format(tenant) + name, json=body, headers=headers)


def _findings(gw, tenant, headers, odata_filter=None):
    query = {"$filter": odata_filter} if odata_filter else {}
    response = gw.http.get(SEC.format(tenant) + "findings", query_string=query, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def _vuln_score(gw, tenant):
    row = rows_of(gw, tenant).get("remediate-vulnerabilities")
    return None if row is None else (row.healthy, row.unhealthy, row.not_applicable, row.current)


def test_disabled_type_is_not_applicable_findings_kept_and_reenabling_restores(gw):
    tenant, headers = _setup(gw)
    push(gw, tenant, headers, document([
        vuln("v-a", "a.example.com"), vuln("v-b", "b.example.com"),
        compliance("m-a", "a.example.com", "mfa", "MFA should be enabled"),
    ]))
    assert _vuln_score(gw, tenant) == (0, 2, 0, 0.0)
    created = _post(gw, tenant, headers, "policies",
                    {"scope": "recommendationType", "target": "vulnerability-assessment", "enabled": False})
    assert created.status_code == 201, created.get_json()
    policy = created.get_json()
    assert policy["enabled"] is False and policy["changedTypeCount"] == 1
    assert created.headers["Location"].endswith(f"/policies/{policy['id']}")
    recs = {r["recommendationType"]: r for r in _recs(gw, tenant, headers, "recommendationType eq "
                                                                             "'vulnerability-assessment'")}
    assert recs["vulnerability-assessment"]["status"] == "NotApplicable"
    assert recs["vulnerability-assessment"]["statusCause"] == "DisabledByPolicy"
    assert recs["vulnerability-assessment"]["actualStatus"] == "Unhealthy"
    assert recs["vulnerability-assessment"]["policy"] == {"enabled": False, "severityOverride": None}
    assert _vuln_score(gw, tenant) == (0, 0, 2, 0.0)  # counts in neither
    assert len(_findings(gw, tenant, headers)) == 3  # findings kept
    assert {f["policy"]["enabled"] for f in _findings(gw, tenant, headers, "policy/enabled eq false")} == {False}
    assert len(_recs(gw, tenant, headers, "statusCause eq 'DisabledByPolicy'")) == 2
    # the other control is untouched
    assert rows_of(gw, tenant)["enable-mfa"].unhealthy == 1
    # a push while disabled: merged, still NotApplicable
    push(gw, tenant, headers, document([vuln("v-c", "c.example.com")]))
    assert len(_recs(gw, tenant, headers, "statusCause eq 'DisabledByPolicy'")) == 3
    assert _vuln_score(gw, tenant) == (0, 0, 3, 0.0)
    # re-enable: restored without a push
    patched = gw.http.patch(SEC.format(tenant) + f"policies/{policy['id']}", json={"enabled": True},
                            headers=headers)
    assert patched.status_code == 200, patched.get_json()
    assert _vuln_score(gw, tenant) == (0, 3, 0, 0.0)
    assert not _recs(gw, tenant, headers, "status eq 'NotApplicable'")
    # events: the policy's own and the recommendations'
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        events = session.execute(select(LifecycleEvent.subject_type, LifecycleEvent.event, LifecycleEvent.actor)
                                 .where(LifecycleEvent.tenant_id == tenant_id,
                                        LifecycleEvent.subject_type.in_(["policy", "recommendation"]))).all()
    assert ("policy", "created", policy["createdBy"]) in events
    assert ("policy", "updated", policy["createdBy"]) in events
    assert sum(1 for e in events if e[:2] == ("recommendation", "notapplicable")) == 2
    # the score history moved with each change
    assert [h.max for h in history(gw, tenant)] == [16.0, 10.0, 16.0]


def test_provider_and_control_entries_and_severity_override(gw):
    tenant, headers = _setup(gw, "CheckPoint")
    push(gw, tenant, headers, document([
        compliance("m-a", "a.example.com", "mfa", "MFA should be enabled"),
        compliance("t-a", "a.example.com", "tls", "TLS 1.2 should be required"),
    ]))
    response = _post(gw, tenant, headers, "policies", {"scope": "control", "target": "enable-mfa", "enabled": False})
    assert response.status_code == 201, response.get_json()
    recs = {r["recommendationType"]: r for r in _recs(gw, tenant, headers)}
    assert recs["mfa"]["status"] == "NotApplicable" and recs["tls"]["status"] == "Unhealthy"
    # a type entry wins over its control's
    assert _post(gw, tenant, headers, "policies", {"scope": "recommendationType", "target": "mfa",
                                                   "enabled": True, "severity": "critical"}).status_code == 201
    recs = {r["recommendationType"]: r for r in _recs(gw, tenant, headers)}
    assert recs["mfa"]["status"] == "Unhealthy" and recs["mfa"]["severity"] == "critical"
    assert recs["mfa"]["actualSeverity"] == "high"
    assert len(_recs(gw, tenant, headers, "policy/severityOverride eq 'critical'")) == 1
    # a provider entry disables every type of the provider that says nothing itself
    assert _post(gw, tenant, headers, "policies", {"scope": "provider", "target": "CheckPoint",
                                                   "enabled": False}).status_code == 201
    recs = {r["recommendationType"]: r for r in _recs(gw, tenant, headers)}
    assert recs["tls"]["status"] == "NotApplicable" and recs["mfa"]["status"] == "Unhealthy"
    # duplicates, unknown controls and misplaced fields are 4xx naming the field
    again = _post(gw, tenant, headers, "policies", {"scope": "provider", "target": "CheckPoint", "enabled": True})
    assert again.status_code == 409
    bad = _post(gw, tenant, headers, "policies", {"scope": "provider", "target": "x", "severity": "high"})
    assert bad.status_code == 400 and "severity" in bad.get_json()["error"]["message"]
    bad = _post(gw, tenant, headers, "policies", {"scope": "recommendationType", "target": "x", "control": "nope"})
    assert bad.status_code == 400 and "control" in bad.get_json()["error"]["message"]
    bad = _post(gw, tenant, headers, "policies", {"scope": "galaxy", "target": "x", "enabled": True})
    assert bad.status_code == 400 and "scope" in bad.get_json()["error"]["message"]
    listed = gw.http.get(SEC.format(tenant) + "policies?$filter=scope eq 'provider'&$count=true",
                         headers=headers).get_json()
    assert listed["@odata.count"] == 1 and listed["value"][0]["target"] == "CheckPoint"
    # remapping a type to another control moves it there
    mfa_entry = gw.http.get(SEC.format(tenant) + "policies?$filter=target eq 'mfa'", headers=headers).get_json()
    entry_id = mfa_entry["value"][0]["id"]
    moved = gw.http.patch(SEC.format(tenant) + f"policies/{entry_id}",
                          json={"control": "manage-access-and-permissions"}, headers=headers)
    assert moved.status_code == 200, moved.get_json()
    rows = rows_of(gw, tenant)
    assert rows["enable-mfa"].unhealthy == 0 and rows["manage-access-and-permissions"].unhealthy == 1
    # deleting entries restores the defaults
    for item in gw.http.get(SEC.format(tenant) + "policies", headers=headers).get_json()["value"]:
        assert gw.http.delete(SEC.format(tenant) + f"policies/{item['id']}", headers=headers).status_code == 204
    recs = {r["recommendationType"]: r for r in _recs(gw, tenant, headers)}
    assert {r["status"] for r in recs.values()} == {"Unhealthy"} and recs["mfa"]["severity"] == "high"
    assert rows_of(gw, tenant)["enable-mfa"].unhealthy == 1


def test_exemption_before_the_finding_applies_to_it_expiry_and_delete_restore(gw):
    from workers.tasks import expire_due_exemptions

    tenant, headers = _setup(gw)
    push(gw, tenant, headers, document([vuln("v-a", "a.example.com")]))
    soon = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    created = _post(gw, tenant, headers, "exemptions", {
        "displayName": "Scanner noise", "category": "waiver", "recommendationType": "vulnerability-assessment",
        "expiresOn": soon, "description": "accepted until the patch window"})
    assert created.status_code == 201, created.get_json()
    exemption = created.get_json()
    assert exemption["matchedRecommendationCount"] == 1 and exemption["state"] == "active"
    assert _vuln_score(gw, tenant) == (0, 0, 1, 0.0)
    # a finding that arrives later falls in the scope too
    push(gw, tenant, headers, document([vuln("v-b", "b.example.com")]))
    recs = _recs(gw, tenant, headers)
    assert {(r["status"], r["statusCause"], r["exemptionId"]) for r in recs} == {
        ("NotApplicable", "Exempt", exemption["id"])}
    assert {f["exemptionId"] for f in _findings(gw, tenant, headers)} == {exemption["id"]}
    assert len(_findings(gw, tenant, headers, f"exemptionId eq '{exemption['id']}'")) == 2
    assert _vuln_score(gw, tenant) == (0, 0, 2, 0.0)
    # expiry (clock injected): back to the real status, with events, on its own
    assert expire_due_exemptions(gw.db, datetime.now(UTC)) == 0
    assert expire_due_exemptions(gw.db, datetime.now(UTC) + timedelta(days=2)) == 1
    assert {r["status"] for r in _recs(gw, tenant, headers)} == {"Unhealthy"}
    assert _vuln_score(gw, tenant) == (0, 2, 0, 0.0)
    shown = gw.http.get(SEC.format(tenant) + f"exemptions/{exemption['id']}", headers=headers).get_json()
    assert shown["state"] == "expired" and shown["expiredDateTime"]
    # a resource exemption, deleted: restores at once
    resource_id = _recs(gw, tenant, headers)[0]["resourceId"]
    created = _post(gw, tenant, headers, "exemptions", {"displayName": "Decommissioning", "category": "mitigated",
                                                        "resourceId": resource_id})
    assert created.status_code == 201 and created.get_json()["matchedRecommendationCount"] == 1
    assert _vuln_score(gw, tenant) == (0, 1, 1, 0.0)
    assert gw.http.delete(SEC.format(tenant) + f"exemptions/{created.get_json()['id']}",
                          headers=headers).status_code == 204
    assert _vuln_score(gw, tenant) == (0, 2, 0, 0.0)
    assert gw.http.get(SEC.format(tenant) + f"exemptions/{created.get_json()['id']}",
                       headers=headers).status_code == 404


def test_filter_exemptions_overlap_and_hand_over(gw):
    tenant, headers = _setup(gw)
    push(gw, tenant, headers, document([vuln("v-a", "a.example.com"), vuln("v-b", "b.example.com"),
                                        compliance("m-a", "a.example.com", "mfa", "MFA should be enabled")]))
    nothing = _post(gw, tenant, headers, "exemptions", {"displayName": "none", "category": "waiver",
                                                        "resourceFilter": "name eq 'zzz'"})
    assert nothing.status_code == 201 and nothing.get_json()["matchedRecommendationCount"] == 0
    broad = _post(gw, tenant, headers, "exemptions", {"displayName": "host a", "category": "waiver",
                                                      "resourceFilter": "startswith(name, 'a')"}).get_json()
    assert broad["matchedRecommendationCount"] == 2
    narrow = _post(gw, tenant, headers, "exemptions", {
        "displayName": "vulns on a", "category": "mitigated", "recommendationType": "vulnerability-assessment",
        "resourceFilter": "startswith(name, 'a')"}).get_json()
    assert narrow["matchedRecommendationCount"] == 1
    exempt = {r["recommendationType"]: r["exemptionId"] for r in _recs(gw, tenant, headers, "exemptionId ne null")}
    assert exempt == {"vulnerability-assessment": broad["id"], "mfa": broad["id"]}
    # deleting the older one hands its vulnerability recommendation over to the newer one
    assert gw.http.delete(SEC.format(tenant) + f"exemptions/{broad['id']}", headers=headers).status_code == 204
    exempt = {r["recommendationType"]: r["exemptionId"] for r in _recs(gw, tenant, headers, "exemptionId ne null")}
    assert exempt == {"vulnerability-assessment": narrow["id"]}
    assert rows_of(gw, tenant)["enable-mfa"].unhealthy == 1
    # bad bodies name the field
    for body, field in (({"category": "waiver", "resourceFilter": "x eq 1"}, "displayName"),
                        ({"displayName": "x", "category": "forever", "resourceId": "1"}, "category"),
                        ({"displayName": "x", "category": "waiver"}, "recommendationType"),
                        ({"displayName": "x", "category": "waiver", "resourceFilter": "nope eq 1"}, "resourceFilter"),
                        ({"displayName": "x", "category": "waiver", "recommendationType": "unknown"},
                         "recommendationType"),
                        ({"displayName": "x", "category": "waiver", "resourceId": "999999"}, "resourceId"),
                        ({"displayName": "x", "category": "waiver", "resourceId": "1",
                          "expiresOn": "2000-01-01T00:00:00Z"}, "expiresOn")):
        bad = _post(gw, tenant, headers, "exemptions", body)
        assert bad.status_code == 400, (body, bad.get_json())
        assert field in bad.get_json()["error"]["message"], bad.get_json()


def test_posture_writes_need_posture_manage_and_stay_in_the_tenant(gw):
    tenant, headers = _setup(gw)
    push(gw, tenant, headers, document([vuln("v-a", "a.example.com")]))
    entry = _post(gw, tenant, headers, "policies", {"scope": "provider", "target": "Qualys", "enabled": True})
    exemption = _post(gw, tenant, headers, "exemptions", {"displayName": "x", "category": "waiver",
                                                          "recommendationType": "vulnerability-assessment"})
    reader = gw.partner("Reader", [tenant], scopes="security.read")
    for method, path, body in (("post", "policies", {"scope": "provider", "target": "Z", "enabled": False}),
                               ("patch", f"policies/{entry.get_json()['id']}", {"enabled": False}),
                               ("delete", f"policies/{entry.get_json()['id']}", None),
                               ("post", "exemptions", {"displayName": "y", "category": "waiver",
                                                       "recommendationType": "vulnerability-assessment"}),
                               ("patch", f"exemptions/{exemption.get_json()['id']}", {"displayName": "z"}),
                               ("delete", f"exemptions/{exemption.get_json()['id']}", None)):
        response = getattr(gw.http, method)(SEC.format(tenant) + path, json=body, headers=reader)
        assert response.status_code == 403, (method, path)
    assert gw.http.get(SEC.format(tenant) + "policies", headers=reader).status_code == 200
    other, other_headers = _setup(gw, "Tenable")
    for path in (f"policies/{entry.get_json()['id']}", f"exemptions/{exemption.get_json()['id']}"):
        assert gw.http.get(SEC.format(other) + path, headers=other_headers).status_code == 404
        assert gw.http.patch(SEC.format(other) + path, json={"description": "x"},
                             headers=other_headers).status_code == 404
        assert gw.http.delete(SEC.format(other) + path, headers=other_headers).status_code == 404
    assert gw.http.get(SEC.format(other) + "exemptions", headers=other_headers).get_json()["value"] == []
