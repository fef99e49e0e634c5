"""Governance (issue 11): rules that give new Unhealthy recommendations an owner and a due date, manual
assignments, completion when the findings are fixed, and the overdue state, through the API, on both
stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from gateway.models import GovernanceRule, LifecycleEvent, Resource, Tenant
from tests.factories import document, finding
from tests.test_merge import push
from tests.test_score import compliance, vuln

SEC = "/api/v1/tenants/{}/security/"
MANAGE = "findings.write security.read posture.manage"


def _setup(gw, provider="Qualys"):
    tenant = gw.tenant()
    return tenant, gw.partner(provider, [tenant], scopes=MANAGE)


def _post(gw, tenant, headers, name, body):
    return gw.http.post(SEC.format(tenant) + name, json=body, headers=headers)


def _patch(gw, tenant, headers, path, body):
    return gw.http.patch(SEC.format(tenant) + path, json=body, headers=headers)


def _list(gw, tenant, headers, name, odata_filter=None):
    query = {"$filter": odata_filter} if odata_filter else {}
    response = gw.http.get(SEC.format(tenant) + name, query_string=query, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def _by_host(gw, tenant, headers, odata_filter=None) -> dict[tuple[str, str], dict]:
    """(resource name, type key) -> recommendation."""
    names = {r["id"]: r["name"] for r in _list(gw, tenant, headers, "resources")}
    return {
        (names[r["resourceId"]], r["recommendationType"]): r
        for r in _list(gw, tenant, headers, "recommendations", odata_filter)
    }


def _rule(gw, tenant, headers, **body):
    body = {
        "displayName": "rule",
        "ownerSource": {"type": "Manually", "value": "owner@example.com"},
        "remediationTimeframe": "7.00:00:00",
        "conditionSets": [],
        **body,
    }
    response = _post(gw, tenant, headers, "governanceRules", body)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def _check(gw, tenant, key: str, value) -> dict:
    return {
        "conditions": [
            {"property": key, "operator": "In" if isinstance(value, list) else "Equals", "value": value}
        ]
    }


def _events(gw, tenant, subject: str) -> list[tuple[int, str]]:
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        return list(
            session.execute(
                select(LifecycleEvent.subject_id, LifecycleEvent.event)
                .where(LifecycleEvent.tenant_id == tenant_id, LifecycleEvent.subject_type == subject)
                .order_by(LifecycleEvent.id)
            ).all()
        )


def _rule_finding(pid, host, key, severity="high", status="open", ts="2024-04-01T00:00:00Z"):
    return finding(
        pid,
        host,
        cves=[],
        status=status,
        ts=ts,
        resource={"fqdn": host},
        kind="compliance",
        recommendation=key,
        title=f"{key} should be fixed",
        vendorId=pid,
        severity=severity,
    )


def _due(item) -> datetime:
    return datetime.fromisoformat(
        item["governance"]["dueDate"] if "governance" in item else item["remediationDueDate"]
    )


def test_rules_assign_new_unhealthy_recommendations_only_the_first_in_priority_order(gw):
    tenant, headers = _setup(gw)
    push(
        gw,
        tenant,
        headers,
        document(
            [
                vuln("v-a", "a.example.com"),
                compliance("m-a", "a.example.com", "mfa", "MFA should be enabled", status="fixed"),
            ]
        ),
    )
    by_severity = _rule(
        gw,
        tenant,
        headers,
        displayName="high and critical",
        rulePriority=20,
        conditionSets=[_check(gw, tenant, "severity", ["high", "critical"])],
        ownerSource={"type": "Manually", "value": "sec-team@example.com"},
    )
    by_type = _rule(
        gw,
        tenant,
        headers,
        displayName="vulnerabilities",
        rulePriority=10,
        conditionSets=[_check(gw, tenant, "recommendationType", "vulnerability-assessment")],
        ownerSource={"type": "Manually", "value": "vuln-team@example.com"},
        remediationTimeframe="3.12:00:00",
        isGracePeriod=True,
    )
    # the answer counts the Unhealthy recommendations it matches now, and assigns none of them
    assert by_type["matchedRecommendationCount"] == 1 and by_type["remediationTimeframe"] == "3.12:00:00"
    assert by_type["ownerSource"] == {"type": "Manually", "value": "vuln-team@example.com"}
    assert {r["governance"] for r in _list(gw, tenant, headers, "recommendations")} == {None}
    listed = _list(gw, tenant, headers, "governanceRules")
    assert [r["id"] for r in listed] == [by_type["id"], by_severity["id"]]  # by priority

    before = datetime.now(UTC)
    push(
        gw,
        tenant,
        headers,
        document(
            [
                vuln(
                    "v-c", "c.example.com"
                ),  # a new Unhealthy vulnerability: both rules match, the type rule wins
                _rule_finding(
                    "t-c", "c.example.com", "tls", severity="high"
                ),  # only the severity rule matches
                _rule_finding("l-c", "c.example.com", "logging", severity="low"),  # no rule matches
                _rule_finding("h-c", "c.example.com", "healthy", status="fixed"),  # new but Healthy
                compliance(
                    "m-a",
                    "a.example.com",
                    "mfa",
                    "MFA should be enabled",
                    status="fixed",
                    ts="2024-04-02T00:00:00Z",
                ),  # stays Healthy
            ]
        ),
    )
    after = datetime.now(UTC)
    recs = _by_host(gw, tenant, headers)
    vuln_c = recs[("c.example.com", "vulnerability-assessment")]["governance"]
    assert (vuln_c["owner"], vuln_c["ruleId"], vuln_c["isGracePeriod"], vuln_c["isOverdue"]) == (
        "vuln-team@example.com",
        by_type["id"],
        True,
        False,
    )
    assert (
        before + timedelta(days=3, hours=12)
        <= _due(recs[("c.example.com", "vulnerability-assessment")])
        <= after + timedelta(days=3, hours=12)
    )
    tls_c = recs[("c.example.com", "tls")]["governance"]
    assert (tls_c["owner"], tls_c["ruleId"], tls_c["isGracePeriod"]) == (
        "sec-team@example.com",
        by_severity["id"],
        False,
    )
    assert recs[("c.example.com", "logging")]["governance"] is None
    assert recs[("c.example.com", "healthy")]["governance"] is None
    assert recs[("a.example.com", "mfa")]["governance"] is None
    assert (
        recs[("a.example.com", "vulnerability-assessment")]["governance"] is None
    )  # existed before the rules
    # the assignments, their events, and the filters on them
    assignments = _list(gw, tenant, headers, "governanceAssignments")
    assert sorted((a["owner"], a["state"], a["recommendationType"]) for a in assignments) == [
        ("sec-team@example.com", "open", "tls"),
        ("vuln-team@example.com", "open", "vulnerability-assessment"),
    ]
    assert {event for _, event in _events(gw, tenant, "governanceAssignment")} == {"created"}
    assert [
        r["recommendationType"]
        for r in _list(gw, tenant, headers, "recommendations", "governance/owner eq 'sec-team@example.com'")
    ] == ["tls"]
    assert len(_list(gw, tenant, headers, "recommendations", "governance/assignmentId ne null")) == 2
    assert len(_list(gw, tenant, headers, "governanceAssignments", f"ruleId eq '{by_type['id']}'")) == 1
    assert [
        f["governance"]["owner"]
        for f in _list(gw, tenant, headers, "findings", "governance/owner eq 'vuln-team@example.com'")
    ] == ["vuln-team@example.com"]

    # a disabled rule assigns nothing: the next rule in order does
    assert (
        _patch(gw, tenant, headers, f"governanceRules/{by_type['id']}", {"isDisabled": True}).status_code
        == 200
    )
    push(gw, tenant, headers, document([vuln("v-d", "d.example.com")]))
    assert (
        _by_host(gw, tenant, headers)[("d.example.com", "vulnerability-assessment")]["governance"]["owner"]
        == "sec-team@example.com"
    )
    # apply: the recommendations from before the rule, on request; a dry run counts first
    apply = SEC.format(tenant) + f"governanceRules/{by_type['id']}/apply"
    assert gw.http.post(apply, json={"dryRun": True}, headers=headers).status_code == 409  # disabled
    _patch(gw, tenant, headers, f"governanceRules/{by_type['id']}", {"isDisabled": False})
    dry = gw.http.post(apply, json={"dryRun": True}, headers=headers)
    assert (
        dry.status_code == 200 and dry.get_json()["assignedCount"] == 1 and dry.get_json()["dryRun"] is True
    )
    assert _by_host(gw, tenant, headers)[("a.example.com", "vulnerability-assessment")]["governance"] is None
    done = gw.http.post(apply, headers=headers)
    assert done.status_code == 200 and done.get_json()["assignedCount"] == 1
    assert (
        _by_host(gw, tenant, headers)[("a.example.com", "vulnerability-assessment")]["governance"]["owner"]
        == "vuln-team@example.com"
    )
    assert gw.http.post(apply, json={}, headers=headers).get_json()["assignedCount"] == 0
    assert "applied" in {event for _, event in _events(gw, tenant, "governanceRule")}


def test_conditions_on_provider_resource_filter_and_owner_by_tag(gw):
    tenant, qualys = _setup(gw, "Qualys")
    tenable = gw.partner("Tenable", [tenant], scopes=MANAGE)
    push(gw, tenant, qualys, document([_rule_finding("seed", "db-1.example.com", "seed")]))
    with gw.db.engine.begin() as conn:  # an owner tag on the resource (tags are the tenant's own)
        conn.execute(
            update(Resource.__table__)
            .where(Resource.__table__.c.name.like("db-1%"))
            .values(tags=["env:prod", "Owner: dba@example.com"])
        )
    nothing = _rule(
        gw,
        tenant,
        qualys,
        displayName="nothing",
        rulePriority=1,
        conditionSets=[
            {
                "conditions": [
                    {"property": "resourceFilter", "operator": "Matches", "value": "name eq 'nobody'"}
                ]
            }
        ],
    )
    assert nothing["matchedRecommendationCount"] == 0  # accepted, a warning
    by_filter = _rule(
        gw,
        tenant,
        qualys,
        displayName="databases",
        rulePriority=2,
        conditionSets=[
            {
                "conditions": [
                    {"property": "resourceFilter", "operator": "Matches", "value": "startswith(name, 'db')"},
                    {"property": "severity", "operator": "Equals", "value": "high"},
                ]
            }
        ],
        ownerSource={"type": "ByTag", "value": "owner"},
    )
    by_provider = _rule(
        gw,
        tenant,
        qualys,
        displayName="tenable",
        rulePriority=3,
        conditionSets=[_check(gw, tenant, "provider", "Tenable")],
        ownerSource={"type": "Manually", "value": "tenable-team@example.com"},
    )
    assert by_filter["matchedRecommendationCount"] == 1
    push(
        gw,
        tenant,
        qualys,
        document(
            [
                _rule_finding(
                    "db-hi", "db-1.example.com", "patching", severity="high"
                ),  # the filter rule, owner by tag
                _rule_finding("db-lo", "db-1.example.com", "logging", severity="low"),  # not high: no rule
                _rule_finding("web-q", "web-1.example.com", "patching"),  # no rule: Qualys on a web server
                _rule_finding("db2", "db-2.example.com", "patching", severity="critical"),
            ]
        ),
    )  # not high
    push(
        gw,
        tenant,
        tenable,
        document(
            [
                vuln("web-t", "web-2.example.com"),  # a Tenable source of the shared vulnerability type
                _rule_finding("db3", "db-3.example.com", "patching", severity="high"),
            ]
        ),
    )  # db, high, no owner tag
    owners = {
        key: (r["governance"] or {}).get("owner", "-") for key, r in _by_host(gw, tenant, qualys).items()
    }
    assert owners == {
        ("db-1.example.com", "seed"): "-",
        ("db-1.example.com", "patching"): "dba@example.com",
        ("db-1.example.com", "logging"): "-",
        ("web-1.example.com", "patching"): "-",
        ("db-2.example.com", "patching"): "-",
        ("web-2.example.com", "vulnerability-assessment"): "tenable-team@example.com",
        ("db-3.example.com", "patching"): None,
    }
    rules = {
        a["recommendationType"] + "@" + a["resourceId"]: a["ruleId"]
        for a in _list(gw, tenant, qualys, "governanceAssignments")
    }
    assert sorted(rules.values()) == sorted([by_filter["id"], by_filter["id"], by_provider["id"]])
    # the rule's conditions are a list: any set matches
    either = _rule(
        gw,
        tenant,
        qualys,
        displayName="either",
        rulePriority=4,
        conditionSets=[
            _check(gw, tenant, "recommendationType", ["logging", "nothing"]),
            _check(gw, tenant, "severity", "critical"),
        ],
    )
    assert either["matchedRecommendationCount"] == 2  # logging on db-1, the critical one on db-2
    assert len(_list(gw, tenant, qualys, "governanceRules", "ownerSource/type eq 'ByTag'")) == 1
    assert len(_list(gw, tenant, qualys, "governanceRules", "rulePriority ge 3")) == 2
    # a stored filter the resources collection no longer accepts skips its rule, not the merge
    with gw.db.engine.begin() as conn:
        conn.execute(
            update(GovernanceRule.__table__)
            .where(GovernanceRule.__table__.c.id == int(nothing["id"]))
            .values(
                condition_sets=[
                    {
                        "conditions": [
                            {"property": "resourceFilter", "operator": "Matches", "value": "gone eq 1"}
                        ]
                    }
                ]
            )
        )
    batch = push(gw, tenant, tenable, document([vuln("web-t3", "web-3.example.com")]))
    assert batch["status"] == "succeeded"
    assert (
        _by_host(gw, tenant, qualys)[("web-3.example.com", "vulnerability-assessment")]["governance"]["owner"]
        == "tenable-team@example.com"
    )


def test_completed_when_fixed_and_the_overdue_filter(gw):
    tenant, headers = _setup(gw)
    rule = _rule(
        gw, tenant, headers, rulePriority=5, ownerSource={"type": "Manually", "value": "ops@example.com"}
    )
    push(gw, tenant, headers, document([vuln(f"v-{h}", f"{h}.example.com") for h in ("a", "b", "c", "d")]))
    recs = _by_host(gw, tenant, headers)
    assert {r["governance"]["owner"] for r in recs.values()} == {"ops@example.com"}
    assert _list(gw, tenant, headers, "recommendations", "governance/isOverdue eq true") == []
    # a due date in the past (PATCH): overdue, and only those
    ids = {host: r["governance"]["assignmentId"] for (host, _), r in recs.items()}
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    for host in ("a.example.com", "b.example.com", "c.example.com"):
        patched = _patch(
            gw,
            tenant,
            headers,
            f"governanceAssignments/{ids[host]}",
            {"remediationDueDate": past, "owner": f"owner-{host[0]}@example.com"},
        )
        assert patched.status_code == 200, patched.get_json()
        assert (
            patched.get_json()["isOverdue"] is True
            and patched.get_json()["owner"] == f"owner-{host[0]}@example.com"
        )

    def overdue(name="recommendations", field="governance/isOverdue"):
        items = _list(gw, tenant, headers, name, f"{field} eq true")
        return sorted(i["governance"]["owner"] if "governance" in i else i["owner"] for i in items)

    assert overdue() == ["owner-a@example.com", "owner-b@example.com", "owner-c@example.com"]
    counted = gw.http.get(
        SEC.format(tenant) + "recommendations",
        headers=headers,
        query_string={"$filter": "governance/isOverdue eq true", "$count": "true", "$top": "1"},
    ).get_json()
    assert counted["@odata.count"] == 3 and len(counted["value"]) == 1
    assert overdue("findings") == overdue()
    assert overdue("governanceAssignments", "isOverdue") == overdue()
    assert len(_list(gw, tenant, headers, "recommendations", "governance/isOverdue eq false")) == 1
    assert len(_list(gw, tenant, headers, "recommendations", f"governance/dueDate lt {past[:19]}Z")) == 0
    assert (
        len(
            _list(
                gw,
                tenant,
                headers,
                "recommendations",
                f"governance/dueDate le {datetime.now(UTC).isoformat()[:19]}Z",
            )
        )
        == 3
    )

    # the findings of a are fixed: its assignment is completed (with an event), no longer overdue
    push(
        gw,
        tenant,
        headers,
        document([vuln("v-a", "a.example.com", status="fixed", ts="2024-04-02T00:00:00Z")]),
    )
    done = gw.http.get(SEC.format(tenant) + f"governanceAssignments/{ids['a.example.com']}", headers=headers)
    assert done.get_json()["state"] == "completed" and done.get_json()["completedDateTime"]
    assert done.get_json()["isOverdue"] is False
    assert (int(ids["a.example.com"]), "completed") in _events(gw, tenant, "governanceAssignment")
    shown = _by_host(gw, tenant, headers)[("a.example.com", "vulnerability-assessment")]
    assert shown["status"] == "Healthy" and shown["governance"]["completedDateTime"]
    assert overdue() == ["owner-b@example.com", "owner-c@example.com"]
    assert (
        _patch(
            gw, tenant, headers, f"governanceAssignments/{ids['a.example.com']}", {"owner": "x@example.com"}
        ).status_code
        == 409
    )  # completed
    # an exemption does not complete an assignment: it stays open and is not overdue meanwhile
    resource_b = _by_host(gw, tenant, headers)[("b.example.com", "vulnerability-assessment")]["resourceId"]
    exemption = _post(
        gw,
        tenant,
        headers,
        "exemptions",
        {"displayName": "b", "category": "waiver", "resourceId": resource_b},
    ).get_json()
    b = gw.http.get(
        SEC.format(tenant) + f"governanceAssignments/{ids['b.example.com']}", headers=headers
    ).get_json()
    assert (b["state"], b["isOverdue"]) == ("open", False)
    assert overdue() == ["owner-c@example.com"]
    assert (
        gw.http.delete(SEC.format(tenant) + f"exemptions/{exemption['id']}", headers=headers).status_code
        == 204
    )
    assert overdue() == ["owner-b@example.com", "owner-c@example.com"]
    # a finding that comes back makes the recommendation Unhealthy again: a new assignment by the rule
    push(gw, tenant, headers, document([vuln("v-a", "a.example.com", ts="2024-04-03T00:00:00Z")]))
    again = _by_host(gw, tenant, headers)[("a.example.com", "vulnerability-assessment")]["governance"]
    assert again["assignmentId"] != ids["a.example.com"] and again["completedDateTime"] is None
    assert (again["ruleId"], again["owner"], again["isOverdue"]) == (rule["id"], "ops@example.com", False)
    history = _list(
        gw,
        tenant,
        headers,
        "governanceAssignments",
        f"recommendationType eq 'vulnerability-assessment' and resourceId eq '{shown['resourceId']}'",
    )
    assert sorted(a["state"] for a in history) == ["completed", "open"]


def test_manual_assignments_conflicts_and_bad_bodies(gw):
    tenant, headers = _setup(gw)
    push(
        gw,
        tenant,
        headers,
        document(
            [vuln("v-a", "a.example.com"), compliance("m-a", "a.example.com", "mfa", "MFA", status="fixed")]
        ),
    )
    recs = _by_host(gw, tenant, headers)
    unhealthy = recs[("a.example.com", "vulnerability-assessment")]["id"]
    healthy = recs[("a.example.com", "mfa")]["id"]
    due = (datetime.now(UTC) + timedelta(days=14)).replace(microsecond=0)
    body = {
        "recommendationId": unhealthy,
        "owner": "sam@example.com",
        "remediationDueDate": due.isoformat(),
        "isGracePeriod": True,
        "remediationEta": {"eta": due.isoformat(), "justification": "next window"},
        "additionalData": {
            "ticketNumber": 4711,
            "ticketLink": "https://itsm.example.com/4711",
            "ticketStatus": "Active",
        },
    }
    created = _post(gw, tenant, headers, "governanceAssignments", body)
    assert created.status_code == 201, created.get_json()
    made = created.get_json()
    assert created.headers["Location"].endswith(f"/governanceAssignments/{made['id']}")
    assert (
        made["owner"],
        made["isGracePeriod"],
        made["ruleId"],
        made["state"],
        made["recommendationId"],
    ) == ("sam@example.com", True, None, "open", unhealthy)
    assert datetime.fromisoformat(made["remediationDueDate"]) == due
    assert made["remediationEta"] == {"eta": due.isoformat(), "justification": "next window"}
    assert made["additionalData"]["ticketNumber"] == 4711 and made["createdBy"]
    assert _post(gw, tenant, headers, "governanceAssignments", body).status_code == 409  # one open at a time
    patched = _patch(
        gw,
        tenant,
        headers,
        f"governanceAssignments/{made['id']}",
        {"owner": "kim@example.com", "isGracePeriod": False, "remediationEta": None},
    )
    assert patched.status_code == 200, patched.get_json()
    assert (
        patched.get_json()["owner"],
        patched.get_json()["isGracePeriod"],
        patched.get_json()["remediationEta"],
    ) == ("kim@example.com", False, None)
    shown = gw.http.get(SEC.format(tenant) + f"recommendations/{unhealthy}", headers=headers).get_json()
    assert (
        shown["governance"]["owner"] == "kim@example.com"
        and shown["governance"]["assignmentId"] == made["id"]
    )
    one = SEC.format(tenant) + f"governanceAssignments/{made['id']}"
    assert gw.http.delete(one, headers=headers).status_code == 204
    assert gw.http.get(one, headers=headers).status_code == 404
    assert gw.http.delete(one, headers=headers).status_code == 404
    assert (
        gw.http.get(SEC.format(tenant) + f"recommendations/{unhealthy}", headers=headers).get_json()[
            "governance"
        ]
        is None
    )
    assert _post(gw, tenant, headers, "governanceAssignments", body).status_code == 201  # free again
    assert [e for _, e in _events(gw, tenant, "governanceAssignment")] == [
        "created",
        "updated",
        "deleted",
        "created",
    ]
    # bad bodies name the field
    for bad_body, field in (
        ({**body, "recommendationId": healthy}, "recommendationId"),  # Healthy: nothing to remediate
        ({**body, "recommendationId": "999999"}, "recommendationId"),
        ({**body, "recommendationId": "x"}, "recommendationId"),
        ({k: v for k, v in body.items() if k != "owner"}, "owner"),
        ({**body, "remediationDueDate": "soon"}, "remediationDueDate"),
        ({**body, "additionalData": {"ticketNumber": "T-1"}}, "additionalData.ticketNumber"),
        ({**body, "remediationEta": {"justification": "x"}}, "remediationEta.eta"),
        ({**body, "color": "red"}, "color"),
    ):
        bad = _post(gw, tenant, headers, "governanceAssignments", bad_body)
        assert bad.status_code == 400, (bad_body, bad.get_json())
        assert field in bad.get_json()["error"]["message"], bad.get_json()
    rule = {
        "displayName": "r",
        "rulePriority": 1,
        "conditionSets": [],
        "ownerSource": {"type": "Manually", "value": "o@example.com"},
        "remediationTimeframe": "7.00:00:00",
    }
    for bad_body, field in (
        ({k: v for k, v in rule.items() if k != "rulePriority"}, "rulePriority"),
        ({**rule, "rulePriority": "1"}, "rulePriority"),
        ({**rule, "remediationTimeframe": "7 days"}, "remediationTimeframe"),
        ({**rule, "remediationTimeframe": "0.00:00:00"}, "remediationTimeframe"),
        ({**rule, "remediationTimeframe": "1.25:00:00"}, "remediationTimeframe"),
        ({**rule, "ownerSource": {"type": "ByManager", "value": "x"}}, "ownerSource.type"),
        ({**rule, "ruleType": "ServiceNow"}, "ruleType"),
        ({**rule, "conditionSets": [{"conditions": []}]}, "conditionSets[0].conditions"),
        (
            {**rule, "conditionSets": [_check(gw, tenant, "severity", ["urgent"])]},
            "conditionSets[0].conditions[0].value",
        ),
        (
            {
                **rule,
                "conditionSets": [
                    {"conditions": [{"property": "severity", "operator": "Matches", "value": "high"}]}
                ],
            },
            "conditionSets[0].conditions[0].operator",
        ),
        (
            {
                **rule,
                "conditionSets": [
                    {"conditions": [{"property": "color", "operator": "Equals", "value": "red"}]}
                ],
            },
            "conditionSets[0].conditions[0].property",
        ),
        (
            {
                **rule,
                "conditionSets": [
                    {"conditions": [{"property": "provider", "operator": "In", "value": "Qualys"}]}
                ],
            },
            "conditionSets[0].conditions[0].value",
        ),
        (
            {
                **rule,
                "conditionSets": [
                    {
                        "conditions": [
                            {"property": "resourceFilter", "operator": "Matches", "value": "nope eq 1"}
                        ]
                    }
                ],
            },
            "conditionSets[0].conditions[0].value",
        ),
    ):
        bad = _post(gw, tenant, headers, "governanceRules", bad_body)
        assert bad.status_code == 400, (bad_body, bad.get_json())
        assert field in bad.get_json()["error"]["message"], bad.get_json()
    first = _post(gw, tenant, headers, "governanceRules", rule)
    assert first.status_code == 201
    assert _post(gw, tenant, headers, "governanceRules", rule).status_code == 409  # the same priority
    other = _post(gw, tenant, headers, "governanceRules", {**rule, "rulePriority": 2}).get_json()
    assert (
        _patch(gw, tenant, headers, f"governanceRules/{other['id']}", {"rulePriority": 1}).status_code == 409
    )
    assert _patch(gw, tenant, headers, f"governanceRules/{other['id']}", {"ruleType": "x"}).status_code == 400
    renamed = _patch(
        gw,
        tenant,
        headers,
        f"governanceRules/{other['id']}",
        {"displayName": "renamed", "governanceEmailNotification": {"disableOwnerEmailNotification": True}},
    )
    assert renamed.status_code == 200 and renamed.get_json()["displayName"] == "renamed"
    assert renamed.get_json()["governanceEmailNotification"] == {
        "disableManagerEmailNotification": False,
        "disableOwnerEmailNotification": True,
    }
    for path, patch, field in (
        (f"governanceRules/{other['id']}", {"ownerSource": {"type": "ByTag"}}, "ownerSource.value"),
        (
            f"governanceRules/{other['id']}",
            {"conditionSets": [{"conditions": [{"property": "severity", "value": "high"}]}]},
            "conditions[0].operator",
        ),
        (
            f"governanceAssignments/{made['id']}",
            {"remediationEta": {"justification": "x"}},
            "remediationEta.eta",
        ),
    ):
        bad = _patch(gw, tenant, headers, path, patch)
        assert bad.status_code == 400 and field in bad.get_json()["error"]["message"], bad.get_json()
    assert (
        gw.http.delete(SEC.format(tenant) + f"governanceRules/{other['id']}", headers=headers).status_code
        == 204
    )
    assert [e for _, e in _events(gw, tenant, "governanceRule")] == [
        "created",
        "created",
        "updated",
        "deleted",
    ]


def test_governance_writes_need_posture_manage_and_stay_in_the_tenant(gw):
    tenant, headers = _setup(gw)
    push(gw, tenant, headers, document([vuln("v-a", "a.example.com"), vuln("v-b", "b.example.com")]))
    rec_ids = [r["id"] for r in _list(gw, tenant, headers, "recommendations")]
    rule = _rule(gw, tenant, headers, rulePriority=1)
    due = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    made = _post(
        gw,
        tenant,
        headers,
        "governanceAssignments",
        {"recommendationId": rec_ids[0], "owner": "o@example.com", "remediationDueDate": due},
    ).get_json()
    reader = gw.partner("Reader", [tenant], scopes="security.read")
    for method, path, body in (
        (
            "post",
            "governanceRules",
            {
                "displayName": "x",
                "rulePriority": 2,
                "conditionSets": [],
                "ownerSource": {"type": "Manually", "value": "x"},
                "remediationTimeframe": "1.00:00:00",
            },
        ),
        ("patch", f"governanceRules/{rule['id']}", {"displayName": "y"}),
        ("delete", f"governanceRules/{rule['id']}", None),
        ("post", f"governanceRules/{rule['id']}/apply", {"dryRun": True}),
        (
            "post",
            "governanceAssignments",
            {"recommendationId": rec_ids[1], "owner": "x", "remediationDueDate": due},
        ),
        ("patch", f"governanceAssignments/{made['id']}", {"owner": "z"}),
        ("delete", f"governanceAssignments/{made['id']}", None),
    ):
        response = getattr(gw.http, method)(SEC.format(tenant) + path, json=body, headers=reader)
        assert response.status_code == 403, (method, path, response.get_json())
    assert len(_list(gw, tenant, reader, "governanceRules")) == 1
    assert len(_list(gw, tenant, reader, "governanceAssignments")) == 1
    # another tenant sees none of it
    other, other_headers = _setup(gw, "Tenable")
    for path in (f"governanceRules/{rule['id']}", f"governanceAssignments/{made['id']}"):
        assert gw.http.get(SEC.format(other) + path, headers=other_headers).status_code == 404
        assert (
            gw.http.patch(
                SEC.format(other) + path,
                json={"owner" if "Assign" in path else "displayName": "x"},
                headers=other_headers,
            ).status_code
            == 404
        )
        assert gw.http.delete(SEC.format(other) + path, headers=other_headers).status_code == 404
    assert (
        gw.http.post(
            SEC.format(other) + f"governanceRules/{rule['id']}/apply", headers=other_headers
        ).status_code
        == 404
    )
    assert _list(gw, other, other_headers, "governanceRules") == []
    assert _list(gw, other, other_headers, "governanceAssignments") == []
    stolen = _post(
        gw,
        other,
        other_headers,
        "governanceAssignments",
        {"recommendationId": rec_ids[1], "owner": "x@example.com", "remediationDueDate": due},
    )
    assert stolen.status_code == 400 and "recommendationId" in stolen.get_json()["error"]["message"]
    # nothing changed in the first tenant
    assert (
        gw.http.get(SEC.format(tenant) + f"governanceRules/{rule['id']}", headers=headers).status_code == 200
    )
    assert len(_list(gw, tenant, headers, "governanceAssignments")) == 1


def test_merged_resources_keep_one_current_assignment_per_recommendation(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], scopes=MANAGE + " admin")
    _rule(gw, tenant, headers, rulePriority=1)
    pairs = [(kind, host) for kind in ("v", "t", "m") for host in ("a", "b")]
    push(
        gw,
        tenant,
        headers,
        document(
            [
                vuln(f"{kind}-{host}", f"{host}.example.com")
                if kind == "v"
                else _rule_finding(f"{kind}-{host}", f"{host}.example.com", {"t": "tls", "m": "mfa"}[kind])
                for kind, host in pairs
            ]
        ),
    )
    # a's mfa is fixed: its assignment completed; a's tls assignment is deleted
    push(
        gw,
        tenant,
        headers,
        document([_rule_finding("m-a", "a.example.com", "mfa", status="fixed", ts="2024-04-02T00:00:00Z")]),
    )
    recs = {key: r["governance"]["assignmentId"] for key, r in _by_host(gw, tenant, headers).items()}
    deleted = gw.http.delete(
        SEC.format(tenant) + "governanceAssignments/" + recs[("a.example.com", "tls")], headers=headers
    )
    assert deleted.status_code == 204
    survivor, loser = (_by_host(gw, tenant, headers)[(f"{h}.example.com", "tls")]["resourceId"] for h in "ab")
    merged = gw.http.post(
        SEC.format(tenant) + f"resources/{survivor}/merge", json={"resourceIds": [loser]}, headers=headers
    )
    assert merged.status_code == 200, merged.get_json()
    after = {key[1]: r for key, r in _by_host(gw, tenant, headers).items()}
    assert len(after) == 3 and {r["resourceId"] for r in after.values()} == {survivor}
    # one current assignment each: the survivor's open one, else the open one of the folded recommendation
    assert {kind: r["governance"]["assignmentId"] for kind, r in after.items()} == {
        "vulnerability-assessment": recs[("a.example.com", "vulnerability-assessment")],
        "tls": recs[("b.example.com", "tls")],
        "mfa": recs[("b.example.com", "mfa")],
    }
    assert {r["governance"]["completedDateTime"] for r in after.values()} == {None}
    # the folded recommendation's other open assignment is completed, on the surviving recommendation
    gone_id = recs[("b.example.com", "vulnerability-assessment")]
    gone = gw.http.get(SEC.format(tenant) + f"governanceAssignments/{gone_id}", headers=headers).get_json()
    assert (gone["state"], gone["recommendationId"]) == ("completed", after["vulnerability-assessment"]["id"])
    assert (int(gone_id), "completed") in _events(gw, tenant, "governanceAssignment")
    states = sorted(
        (a["recommendationType"], a["state"]) for a in _list(gw, tenant, headers, "governanceAssignments")
    )
    assert states == [
        ("mfa", "completed"),
        ("mfa", "open"),
        ("tls", "open"),
        ("vulnerability-assessment", "completed"),
        ("vulnerability-assessment", "open"),
    ]
