"""Items and their tickets (issue 12, gateway/itsm/items.py): ``tickets[]`` on findings, recommendations
and alerts with their filters; alert closure both ways; risk acceptance as an exemption; the customer's
assignee and status override sent to the ticket; configurable close codes, notes and Jira done status.

The store tests run on PostgreSQL and SQLite with eager tasks (a merge scans and delivers in the request,
over real HTTP to the loopback simulators of tests/itsm_sim.py); one test runs a real Celery worker."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from sqlalchemy import event, select, update

from gateway.itsm.clients import adf_text
from gateway.models import ItsmTicket
from tests import test_itsm
from tests.conftest import wait_for
from tests.factories import finding
from tests.itsm_sim import JiraSim
from tests.test_itsm import (
    KEY,
    SCOPES,
    _history,
    _item,
    _itsm,
    _poll,
    _receiver,
    _tick,
    _webhook_secret,
    connect,
    jira_body,
    merged,
    push,
    rule,
    sn_body,
    tickets,
)
from tests.test_workflow import graph_alerts
from tests.test_workflow import push as push_format

# the simulators' and the worker's fixtures
sn, jira, itsm_worker = test_itsm.sn, test_itsm.jira, test_itsm.itsm_worker


def security(gw, tenant, auth, collection, query="") -> list[dict]:
    response = gw.http.get(f"/api/v1/tenants/{tenant}/security/{collection}?$top=1000{query}", headers=auth)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def ids(items) -> set[str]:
    return {item["id"] for item in items}


class Queries:
    """Counts the SQL statements the store runs (to show a page costs the same whatever its size)."""

    def __init__(self, engine) -> None:
        self.engine, self.count = engine, 0

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, *args) -> None:
        self.count += 1


# -- item 1: tickets on items ----------------------------------------------------------------------


def test_findings_show_their_tickets_and_filter_on_them(gw, sn, jira):
    tenant, auth = _itsm(gw)
    snow = connect(gw, tenant, auth, sn_body(sn))
    issues = connect(gw, tenant, auth, jira_body(jira))
    rule(gw, tenant, auth, snow["id"], filter="severity ge 'high'")
    rule(gw, tenant, auth, issues["id"], filter="severity eq 'critical'")
    push(
        gw,
        tenant,
        auth,
        [
            finding("crit", "app-1.example.com", ("CVE-2024-0001",), severity="critical"),
            finding("high", "app-1.example.com", ("CVE-2024-0002",), severity="high"),
            finding("low", "app-1.example.com", ("CVE-2024-0003",), severity="low"),
        ],
    )
    by_title = {f["title"]: f for f in security(gw, tenant, auth, "findings")}
    crit, high, low = (by_title[f"Vulnerability {n}"] for n in ("crit", "high", "low"))
    assert low["tickets"] == []
    (mine,) = high["tickets"]
    link = next(t for t in tickets(gw, tenant, auth) if t["items"][0]["subjectId"] == high["id"])
    assert mine == {
        "id": link["id"],
        "connectionId": snow["id"],
        "remoteId": link["remoteId"],
        "remoteKey": link["remoteKey"],
        "remoteUrl": link["remoteUrl"],
        "remoteState": "New",
        "syncState": "synced",
        "lastSyncedDateTime": link["lastSyncedDateTime"],
    }
    assert (
        mine["remoteKey"].startswith("INC") and sn.incidents[mine["remoteId"]]["number"] == mine["remoteKey"]
    )
    assert [t["connectionId"] for t in crit["tickets"]] == sorted([snow["id"], issues["id"]], key=int)
    assert {t["remoteKey"] for t in crit["tickets"]} & set(jira.issues)
    # one item, $select, and the filters
    one = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings/{high['id']}", headers=auth).get_json()
    assert one["tickets"] == [mine]
    chosen = security(gw, tenant, auth, "findings", "&$select=id,tickets")
    assert {tuple(f) for f in chosen} == {("id", "tickets")}
    assert ids(security(gw, tenant, auth, "findings", "&$filter=tickets/any()")) == {crit["id"], high["id"]}
    assert ids(security(gw, tenant, auth, "findings", "&$filter=not tickets/any()")) == {low["id"]}
    jira_only = f"&$filter=tickets/any(t: t/connectionId eq '{issues['id']}')"
    assert ids(security(gw, tenant, auth, "findings", jira_only)) == {crit["id"]}
    # resolved in ServiceNow, read back by the poll: the item's ticket says so and filters by it
    sn.human(mine["remoteId"], state="6", close_code="Solved (Permanently)", close_notes="patched")
    _poll(gw, snow["id"])
    resolved = "&$filter=tickets/any(t: t/remoteState eq 'Resolved')"
    assert ids(security(gw, tenant, auth, "findings", resolved)) == {high["id"]}
    both = (
        "&$filter=tickets/any(t: t/remoteState eq 'Resolved' and t/remoteKey eq '" + mine["remoteKey"] + "')"
    )
    assert ids(security(gw, tenant, auth, "findings", both)) == {high["id"]}
    counted = gw.http.get(
        f"/api/v1/tenants/{tenant}/security/findings?$count=true"
        "&$filter=tickets/any(t: t/syncState eq 'synced')",
        headers=auth,
    ).get_json()
    assert counted["@odata.count"] == 2
    bad = gw.http.get(
        f"/api/v1/tenants/{tenant}/security/findings?$filter=tickets/any(t: t/nope eq 'x')", headers=auth
    )
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalidFilter"
    assert "remoteState" in bad.get_json()["error"]["message"]
    # CSV carries them as JSON text
    csv = gw.http.get(
        f"/api/v1/tenants/{tenant}/security/findings?$select=id,tickets",
        headers={**auth, "Accept": "text/csv"},
    )
    assert csv.status_code == 200 and mine["remoteKey"] in csv.get_data(as_text=True)


def test_a_page_reads_its_tickets_in_one_query_whatever_its_size(gw, sn):
    tenant, auth = _itsm(gw)
    made = connect(gw, tenant, auth, sn_body(sn))
    rule(gw, tenant, auth, made["id"])
    push(
        gw,
        tenant,
        auth,
        [finding(f"f-{n}", f"h-{n}.example.com", (f"CVE-2024-1{n:04d}",)) for n in range(12)],
    )
    url = f"/api/v1/tenants/{tenant}/security/findings?$top="

    def queries(top: int, select: str) -> tuple[int, list]:
        gw.http.get(f"{url}{top}&$select={select}", headers=auth)  # warm (token, tenant caches)
        with Queries(gw.db.engine) as seen:
            page = gw.http.get(f"{url}{top}&$select={select}", headers=auth).get_json()["value"]
        assert len(page) == top
        return seen.count, page

    without, _ = queries(12, "id")  # tickets not selected: not read
    for top in (1, 12):
        count, page = queries(top, "id,tickets")
        assert all(len(f["tickets"]) == 1 for f in page)
        assert count == without + 1


def test_recommendations_and_alerts_show_their_tickets(gw, sn):
    tenant = gw.tenant()
    auth = gw.partner("Contoso", [tenant], SCOPES + " alerts.write")
    gw.app.config.update(SECRETS_KEYS=KEY)
    made = connect(gw, tenant, auth, sn_body(sn))
    rule(gw, tenant, auth, made["id"], name="alerts", collection="alerts", filter="severity eq 'high'")
    rule(gw, tenant, auth, made["id"], name="recs", collection="recommendations")
    push_format(gw, tenant, auth, graph_alerts(count=2), "graph_alert")
    push(gw, tenant, auth, [finding("r-1", "app-1.example.com")])
    alerts = security(gw, tenant, auth, "alerts")
    assert len(alerts) == 2 and all(len(a["tickets"]) == 1 for a in alerts)
    assert all(a["tickets"][0]["remoteKey"].startswith("INC") for a in alerts)
    recs = security(gw, tenant, auth, "recommendations")
    assert recs and all(len(r["tickets"]) == 1 for r in recs)
    assert ids(
        security(gw, tenant, auth, "alerts", "&$filter=tickets/any(t: t/remoteState eq 'New')")
    ) == ids(alerts)
    assert security(gw, tenant, auth, "recommendations", "&$filter=not tickets/any()") == []
    # another tenant sees none of them, and its filter finds nothing
    other, other_auth = _itsm(gw)
    assert security(gw, other, other_auth, "alerts", "&$filter=tickets/any()") == []


# -- item 2: alert closure, both ways ----------------------------------------------------------------


def _alerts_world(gw, sim, body):
    tenant = gw.tenant()
    auth = gw.partner("Contoso", [tenant], SCOPES + " alerts.write")
    _itsm(gw, tenant)
    made = connect(gw, tenant, auth, body)
    rule(gw, tenant, auth, made["id"], name="alerts", collection="alerts")
    push_format(gw, tenant, auth, graph_alerts(count=2), "graph_alert")
    alerts = security(gw, tenant, auth, "alerts")
    assert len(alerts) == 2 and all(a["tickets"][0]["syncState"] == "synced" for a in alerts)
    return tenant, auth, made, alerts


def _alert(gw, tenant, auth, alert_id) -> dict:
    return gw.http.get(f"/api/v1/tenants/{tenant}/security/alerts/{alert_id}", headers=auth).get_json()


def _alert_history(gw, tenant, auth, alert_id) -> list[dict]:
    url = f"/api/v1/tenants/{tenant}/security/alerts/{alert_id}/history"
    return gw.http.get(url, headers=auth).get_json()["value"]


def test_a_ticket_closed_in_servicenow_closes_its_alert_and_reopened_reopens_it(gw, sn):
    tenant, auth, made, (first, second) = _alerts_world(gw, sn, sn_body(sn))
    sys_id = first["tickets"][0]["remoteId"]
    sn.human(sys_id, state="6", close_code="Solved (Permanently)", close_notes="contained")
    _poll(gw, made["id"])
    alert = _alert(gw, tenant, auth, first["id"])
    assert alert["status"] == "resolved" and alert["closedDateTime"] is not None
    edit = [e for e in _alert_history(gw, tenant, auth, first["id"]) if e["event"] == "edited"][-1]
    assert edit["actor"] == f"itsm:{made['id']}" and edit["details"] == {"status": "resolved"}
    assert _alert(gw, tenant, auth, second["id"])["status"] == "newAlert"  # the other alert's ticket is open
    # the gateway sends nothing back for the closure it took in, and reads it once
    calls = len(sn.calls)
    _tick(gw)
    assert [c for c in sn.calls[calls:] if c[0] == "PATCH"] == []
    assert _poll(gw, made["id"]) == 0
    # reopened in ServiceNow: the alert is worked on again
    sn.human(sys_id, state="2")
    _poll(gw, made["id"])
    alert = _alert(gw, tenant, auth, first["id"])
    assert alert["status"] == "inProgress" and alert["closedDateTime"] is None


def test_an_alert_resolved_in_the_gateway_resolves_its_ticket(gw, sn):
    tenant, auth, made, (first, _) = _alerts_world(gw, sn, sn_body(sn))
    sys_id = first["tickets"][0]["remoteId"]
    url = f"/api/v1/tenants/{tenant}/security/alerts/{first['id']}"
    assert gw.http.patch(url, json={"status": "resolved"}, headers=auth).status_code == 204
    _tick(gw)
    incident = sn.incidents[sys_id]
    assert incident["state"] == "6" and incident["close_code"] == "Solved (Permanently)"
    assert f"alert {first['id']}" in incident["close_notes"] or first["id"] in incident["close_notes"]
    assert _alert(gw, tenant, auth, first["id"])["tickets"][0]["remoteState"] == "Resolved"
    # the poll reads the closure the gateway made: no edit of the alert
    before = _alert_history(gw, tenant, auth, first["id"])
    _poll(gw, made["id"])
    assert _alert_history(gw, tenant, auth, first["id"]) == before
    # reopened in the gateway: the incident is reopened
    assert gw.http.patch(url, json={"status": "inProgress"}, headers=auth).status_code == 204
    _tick(gw)
    assert sn.incidents[sys_id]["state"] == "2"


def test_a_jira_issue_done_by_webhook_resolves_its_alert(gw, jira):
    tenant, auth, made, (first, _) = _alerts_world(gw, jira, jira_body(jira))
    secret = _webhook_secret(gw, tenant, auth, made["id"])["webhookSecret"]
    jira.webhooks_to(_receiver(gw, made["id"]), secret)
    key = first["tickets"][0]["remoteKey"]
    response = jira.move(key, "10001")
    assert response.status_code == 200, response.get_json()
    assert _alert(gw, tenant, auth, first["id"])["status"] == "resolved"
    jira.move(key, "3")
    assert _alert(gw, tenant, auth, first["id"])["status"] == "inProgress"


# -- item 3: risk acceptance -> exemption -------------------------------------------------------------


RISK = {"enabled": True, "closeCodes": ["Risk Accepted", "Won't Do"], "expiresInDays": 30}


def _exemptions(gw, tenant, auth) -> list[dict]:
    response = gw.http.get(f"/api/v1/tenants/{tenant}/security/exemptions", headers=auth)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def _recommendation(gw, tenant, auth, finding_id) -> dict:
    item = _item(gw, tenant, auth, finding_id)
    query = f"&$filter=resourceId eq '{item['resourceId']}'"
    query += f" and recommendationType eq '{item['recommendationType']}'"
    (rec,) = security(gw, tenant, auth, "recommendations", query)
    return rec


def test_a_servicenow_risk_acceptance_exempts_the_recommendation_until_reopened(gw, sn):
    tenant, auth = _itsm(gw)
    made = connect(gw, tenant, auth, sn_body(sn, riskAcceptance=RISK))
    assert made["riskAcceptance"] == RISK
    rule(gw, tenant, auth, made["id"])
    push(gw, tenant, auth, [finding("ra-1", "app-1.example.com"), finding("ra-2", "app-2.example.com")])
    first, second = sorted(tickets(gw, tenant, auth), key=lambda t: int(t["id"]))
    finding_id = first["items"][0]["subjectId"]
    assert _recommendation(gw, tenant, auth, finding_id)["status"] == "Unhealthy"
    # closed as fixed: no exemption
    sn.human(second["remoteId"], state="6", close_code="Solved (Permanently)", close_notes="patched")
    _poll(gw, made["id"])
    assert _exemptions(gw, tenant, auth) == []
    # closed with a risk-acceptance code: a waiver of that recommendation on that resource, expiring
    sn.human(first["remoteId"], state="7", close_code="Risk Accepted", close_notes="accepted by the CISO")
    _poll(gw, made["id"])
    (exemption,) = _exemptions(gw, tenant, auth)
    item = _item(gw, tenant, auth, finding_id)
    assert exemption["category"] == "waiver" and exemption["resourceId"] == item["resourceId"]
    assert exemption["recommendationType"] == item["recommendationType"]
    assert exemption["expiresOn"] is not None and first["remoteKey"] in exemption["displayName"]
    assert exemption["createdBy"] == f"itsm:{made['id']}"
    rec = _recommendation(gw, tenant, auth, finding_id)
    assert (rec["status"], rec["statusCause"], rec["exemptionId"]) == (
        "NotApplicable",
        "Exempt",
        exemption["id"],
    )
    assert item["exemptionId"] == exemption["id"] and item["statusOverride"] == "riskAccepted"
    # read again: nothing more
    assert _poll(gw, made["id"]) == 0 and len(_exemptions(gw, tenant, auth)) == 1
    # reopened: the exemption goes, the recommendation is Unhealthy again
    sn.human(first["remoteId"], state="2")
    _poll(gw, made["id"])
    assert _exemptions(gw, tenant, auth) == []
    assert _recommendation(gw, tenant, auth, finding_id)["status"] == "Unhealthy"
    assert _item(gw, tenant, auth, finding_id)["statusOverride"] is None


def test_a_jira_wont_do_by_webhook_exempts_only_where_the_connection_opted_in(gw, jira):
    tenant, auth = _itsm(gw)
    opted = connect(
        gw, tenant, auth, jira_body(jira, riskAcceptance={"enabled": True, "closeCodes": ["Won't Do"]})
    )
    plain = connect(gw, tenant, auth, jira_body(jira, name="plain"))
    assert plain["riskAcceptance"] == {"enabled": False, "closeCodes": [], "expiresInDays": None}
    rule(gw, tenant, auth, opted["id"], filter="startswith(title, 'Vulnerability opted')")
    rule(gw, tenant, auth, plain["id"], filter="startswith(title, 'Vulnerability plain')")
    push(gw, tenant, auth, [finding("opted", "app-1.example.com"), finding("plain", "app-2.example.com")])
    for made in (opted, plain):
        secret = _webhook_secret(gw, tenant, auth, made["id"])["webhookSecret"]
        jira.webhooks_to(_receiver(gw, made["id"]), secret)
        (link,) = tickets(gw, tenant, auth, f"&$filter=connectionId eq '{made['id']}'")
        response = jira.move(link["remoteKey"], "10001", resolution="Won't Do")
        assert response.status_code == 200, response.get_json()
        assert _item(gw, tenant, auth, link["items"][0]["subjectId"])["statusOverride"] == "riskAccepted"
    (exemption,) = _exemptions(gw, tenant, auth)
    assert exemption["createdBy"] == f"itsm:{opted['id']}" and exemption["expiresOn"] is None
    bad = gw.http.patch(
        f"/api/v1/tenants/{tenant}/itsm/connections/{opted['id']}",
        json={"riskAcceptance": {"enabled": True, "expiresInDays": 0}},
        headers=auth,
    )
    assert bad.status_code == 400 and "expiresInDays" in bad.get_json()["error"]["message"]


# -- item 4: the customer's assignee and status override to the ticket ------------------------------


class JiraWithPeople(JiraSim):
    """Jira's ``PUT /rest/api/3/issue/{key}/assignee`` (``{"accountId"}``) over the simulator's users."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.people: dict[str, str] = {}  # account id -> email

    def person(self, email: str) -> str:
        account = uuid.uuid5(uuid.NAMESPACE_DNS, email).hex[:24]
        self.people[account] = email
        return account

    def route(self, method, path, query, raw, user):
        match = re.fullmatch(r"/rest/api/3/issue/([^/]+)/assignee", path)
        if not match or method != "PUT":
            return super().route(method, path, query, raw, user)
        issue = self._issue(match.group(1))
        account = (json.loads(raw or b"{}") or {}).get("accountId")
        if issue is None:
            return (
                404,
                self.error_body(404, "Issue does not exist or you do not have permission to see it."),
                {},
            )
        if account is not None and account not in self.people:
            return (
                400,
                {"errorMessages": [], "errors": {"assignee": f"User '{account}' cannot be assigned."}},
                {},
            )
        email = self.people.get(account)
        issue["fields"]["assignee"] = (
            {"accountId": account, "emailAddress": email, "displayName": email.split("@")[0].title()}
            if email
            else None
        )
        self._touch(issue)
        return 204, None, {}


def test_the_customers_assignee_goes_to_servicenow_mapped_or_as_a_note_without_echo(gw, sn):
    bob = sn.user("Bob Builder", "bob")
    tenant, auth = _itsm(gw)
    made = connect(gw, tenant, auth, sn_body(sn, assigneeMap={"bob@contoso.com": bob}))
    assert made["assigneeMap"] == {"bob@contoso.com": bob}
    rule(gw, tenant, auth, made["id"])
    push(gw, tenant, auth, [finding("as-1", "app-1.example.com")])
    (link,) = tickets(gw, tenant, auth)
    finding_id, sys_id = link["items"][0]["subjectId"], link["remoteId"]
    url = f"/api/v1/tenants/{tenant}/security/findings/{finding_id}"
    notes = len(sn.journal(sys_id))
    gw.http.patch(url, json={"assignedTo": "bob@contoso.com"}, headers=auth)
    _tick(gw)
    assert sn.incidents[sys_id]["assigned_to"] == bob and len(sn.journal(sys_id)) == notes
    # read back: the gateway's own change is not taken in, the customer's value stays
    for _ in range(3):
        _tick(gw)
        assert _poll(gw, made["id"]) == 0
    item = _item(gw, tenant, auth, finding_id)
    assert item["assignedTo"] == "bob@contoso.com"
    assert not [e for e in _history(gw, tenant, auth, finding_id) if e["actor"] == f"itsm:{made['id']}"]
    # ServiceNow's business rule posts the gateway's own change, as if before the gateway read the
    # answer (what the ticket said is not recorded yet): still not taken in
    with gw.db.engine.begin() as conn:
        inbound = conn.execute(select(ItsmTicket.inbound).where(ItsmTicket.id == int(link["id"]))).scalar()
        assert inbound["sentAssignee"] == bob
        conn.execute(
            update(ItsmTicket)
            .where(ItsmTicket.id == int(link["id"]))
            .values(inbound={**inbound, "assignee": None, "updated": None})
        )
    sn.webhooks_to(_receiver(gw, made["id"]), _webhook_secret(gw, tenant, auth, made["id"])["webhookSecret"])
    assert sn.human(sys_id, user="gateway").get_json()["edits"] == 0
    assert _item(gw, tenant, auth, finding_id)["assignedTo"] == "bob@contoso.com"
    # someone not in the map, and a status override: work notes, once each
    gw.http.patch(url, json={"assignedTo": "zed", "statusOverride": "falsePositive"}, headers=auth)
    for _ in range(3):
        _tick(gw)
    written = [e["value"] for e in sn.journal(sys_id, "work_notes")][notes:]
    assert len(written) == 2
    assert written[0].startswith(f"Assigned to zed in the partner gateway (finding {finding_id}")
    assert written[1].startswith("Status override set to falsePositive in the partner gateway")
    assert sn.incidents[sys_id]["assigned_to"] == bob  # a note does not reassign
    item = _item(gw, tenant, auth, finding_id)
    assert (item["assignedTo"], item["statusOverride"], item["comments"]) == ("zed", "falsePositive", [])
    # a person assigned in ServiceNow comes in, and is not sent back
    sn.human(sys_id, user="alice", assigned_to=sn.user("Carol Carpenter", "carol"))
    _tick(gw)
    _tick(gw)
    assert _item(gw, tenant, auth, finding_id)["assignedTo"] == "Carol Carpenter"
    assert len(sn.journal(sys_id)) == notes + 2


def test_the_customers_assignee_goes_to_jira_by_account_id(gw):
    jira = JiraWithPeople()
    try:
        dana = jira.person("dana@contoso.com")
        tenant, auth = _itsm(gw)
        made = connect(gw, tenant, auth, jira_body(jira, assigneeMap={"dana": dana}))
        rule(gw, tenant, auth, made["id"])
        push(gw, tenant, auth, [finding("as-2", "app-1.example.com")])
        (link,) = tickets(gw, tenant, auth)
        finding_id, key = link["items"][0]["subjectId"], link["remoteKey"]
        url = f"/api/v1/tenants/{tenant}/security/findings/{finding_id}"
        gw.http.patch(url, json={"assignedTo": "dana"}, headers=auth)
        _tick(gw)
        assert jira.issues[key]["fields"]["assignee"]["accountId"] == dana
        _tick(gw)
        assert _item(gw, tenant, auth, finding_id)["assignedTo"] == "dana"
        # unassigned in the gateway: a comment (no map entry for nobody)
        comments = len(jira.comments.get(key, []))
        gw.http.patch(url, json={"assignedTo": None}, headers=auth)
        _tick(gw)
        _tick(gw)
        (added,) = jira.comments[key][comments:]
        assert adf_text(added["body"]).startswith("Unassigned in the partner gateway")
        assert _item(gw, tenant, auth, finding_id)["assignedTo"] is None
    finally:
        jira.stop()


# -- item 5: close codes, close notes, Jira's done status ------------------------------------------


def test_servicenow_close_code_and_notes_template(gw, sn):
    tenant, auth = _itsm(gw)
    template = "Gateway: {count} {kind}(s) {reason} [{severity}] {titles}. {unknown} {notes}"
    made = connect(gw, tenant, auth, sn_body(sn, closeCode="Fixed by vendor", closeNotesTemplate=template))
    assert (made["closeCode"], made["closeNotesTemplate"]) == ("Fixed by vendor", template)
    rule(gw, tenant, auth, made["id"])
    push(gw, tenant, auth, [finding("cc-1", "app-1.example.com")])
    push(gw, tenant, auth, [finding("cc-1", "app-1.example.com", status="fixed", ts="2024-04-02T00:00:00Z")])
    (link,) = tickets(gw, tenant, auth)
    incident = sn.incidents[link["remoteId"]]
    assert incident["state"] == "6" and incident["close_code"] == "Fixed by vendor"
    assert incident["close_notes"].startswith(
        "Gateway: 1 finding(s) fixed [high] Vulnerability cc-1. {unknown} Resolved by the partner gateway"
    )


def test_servicenow_close_code_when_the_recommendation_is_exempt(gw, sn):
    tenant = gw.tenant()
    auth = gw.partner("Scanner", [tenant], SCOPES + " posture.manage")
    _itsm(gw, tenant)
    made = connect(gw, tenant, auth, sn_body(sn, closeCode="Fixed", closeCodeExempt="Risk Accepted"))
    rule(gw, tenant, auth, made["id"], name="recs", collection="recommendations")
    push(gw, tenant, auth, [finding("ex-1", "app-1.example.com"), finding("ex-2", "app-2.example.com")])
    recs = {r["id"]: r for r in security(gw, tenant, auth, "recommendations")}
    exempt, fixed = sorted(recs, key=int)
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/security/exemptions",
        json={
            "displayName": "accepted",
            "category": "waiver",
            "recommendationType": recs[exempt]["recommendationType"],
            "resourceId": recs[exempt]["resourceId"],
        },
        headers=auth,
    )
    assert response.status_code == 201, response.get_json()
    push(gw, tenant, auth, [finding("ex-2", "app-2.example.com", status="fixed", ts="2024-04-02T00:00:00Z")])
    _tick(gw)
    codes = {r: sn.incidents[recs[r]["tickets"][0]["remoteId"]]["close_code"] for r in (exempt, fixed)}
    assert codes == {exempt: "Risk Accepted", fixed: "Fixed"}


TWO_DONE = {
    "statuses": {
        "1": ("Open", "new"),
        "2": ("Doing", "indeterminate"),
        "7": ("Won't Do", "done"),
        "8": ("Done", "done"),
    },
    "transitions": [
        ("701", "Reject", "7"),
        ("801", "Finish", "8"),
        ("101", "Reopen", "1"),
        ("201", "Start", "2"),
    ],
}


@pytest.mark.parametrize("preferred, reached", [("Done", "Done"), ("Finish", "Done"), ("Closed", "Won't Do")])
def test_jira_done_status_is_preferred_among_done_transitions(gw, preferred, reached):
    jira = JiraSim(workflow=TWO_DONE)
    try:
        tenant, auth = _itsm(gw)
        made = connect(gw, tenant, auth, jira_body(jira, doneStatus=preferred))
        assert made["doneStatus"] == preferred
        rule(gw, tenant, auth, made["id"])
        push(gw, tenant, auth, [finding("js-1", "app-1.example.com")])
        push(
            gw,
            tenant,
            auth,
            [finding("js-1", "app-1.example.com", status="fixed", ts="2024-04-02T00:00:00Z")],
        )
        (link,) = tickets(gw, tenant, auth)
        # without the preferred status on offer: the first transition into a done-category status
        assert jira.issues[link["remoteKey"]]["fields"]["status"]["name"] == reached
        assert link["remoteState"] == reached
    finally:
        jira.stop()


# -- through a real worker ---------------------------------------------------------------------------


def test_a_real_worker_sends_the_assignee_and_takes_a_risk_acceptance_in_and_out(pg_gw, sn, itsm_worker):
    gw = pg_gw
    bob = sn.user("Bob Builder", "bob")
    tenant, auth = _itsm(gw)
    made = connect(gw, tenant, auth, sn_body(sn, assigneeMap={"bob": bob}, riskAcceptance=RISK))
    rule(gw, tenant, auth, made["id"])
    merged(gw, tenant, auth, push(gw, tenant, auth, [finding("rw-1", "app-1.example.com")]))
    wait_for(lambda: [t for t in tickets(gw, tenant, auth) if t["syncState"] == "synced"], timeout=60)
    (link,) = tickets(gw, tenant, auth)
    finding_id, sys_id = link["items"][0]["subjectId"], link["remoteId"]
    url = f"/api/v1/tenants/{tenant}/security/findings/{finding_id}"
    assert gw.http.patch(url, json={"assignedTo": "bob"}, headers=auth).status_code == 204
    _tick(gw)  # the beat's tick: scan, then delivery, in the worker
    wait_for(lambda: sn.incidents[sys_id]["assigned_to"] == bob, timeout=60)
    sn.human(sys_id, state="7", close_code="Won't Do", close_notes="accepted")
    _tick(gw)  # the poll, in the worker
    wait_for(lambda: len(_exemptions(gw, tenant, auth)) == 1, timeout=60)
    assert _item(gw, tenant, auth, finding_id)["tickets"][0]["remoteState"] == "Closed"
    sn.human(sys_id, state="2")
    _tick(gw)
    wait_for(lambda: _exemptions(gw, tenant, auth) == [], timeout=60)
    item = _item(gw, tenant, auth, finding_id)
    assert item["assignedTo"] == "bob" and item["statusOverride"] is None
    assert item["tickets"][0]["remoteState"] == "In Progress"
