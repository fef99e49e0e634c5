"""Workflow automation rules and export snapshots (issue 13 items 3-4), on PostgreSQL and SQLite.

Webhook receivers are real loopback HTTP servers verifying every delivery with ``standardwebhooks``
(tests/receiver.py); tickets go to the loopback ServiceNow of tests/itsm_sim.py.  The issue's test
runs the rules through a real Celery worker; the others call the task functions directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from gateway.automation import runner
from gateway.cli import main
from gateway.export import events as outbox
from gateway.export import snapshot
from gateway.models import AutomationActionDone, AutomationRule, LifecycleEvent, utcnow
from tests.conftest import QUEUE, SECRET, Gateway, Worker, make_app, wait_for, wipe
from tests.factories import document, finding
from tests.receiver import Receiver, free_port

RULE, DONE, EV = AutomationRule.__table__, AutomationActionDone.__table__, LifecycleEvent.__table__
SCOPES = "findings.write alerts.write security.read alerts.manage exports.manage itsm.manage"
CRITICAL_RULE = {
    "displayName": "Critical alerts to the on-call",
    "eventTypes": ["alert.*"],  # its own edits are alert.updated events: the chain limit stops them
    "filter": "severity eq 'high'",  # Graph's alert severities end at high: its "critical" alerts
}


# -- helpers ----------------------------------------------------------------------------------------


def graph_alerts(prefix: str, severity: str, count: int) -> bytes:
    return json.dumps(
        {
            "value": [
                {
                    "id": f"{prefix}-{i}",
                    "title": f"Suspicious sign-in {prefix} {i}",
                    "severity": severity,
                    "status": "newAlert",
                    "category": "CredentialAccess",
                    "createdDateTime": "2024-04-01T10:00:00Z",
                    "lastModifiedDateTime": "2024-04-01T11:00:00Z",
                    "hostStates": [{"fqdn": f"web-{i}.contoso.com"}],
                    "vendorInformation": {"provider": "Contoso", "vendor": "C"},
                }
                for i in range(count)
            ]
        }
    ).encode()


def push(gw, tenant: str, headers: dict, body: bytes, fmt: str) -> str:
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format={fmt}",
        data=body,
        headers=headers | {"Content-Type": "application/json"},
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def merged(gw, tenant: str, headers: dict, batch_id: str) -> None:
    def done():
        body = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers).get_json()
        return body["status"] in ("succeeded", "partiallySucceeded")

    wait_for(done, timeout=120)


def automations_url(tenant: str) -> str:
    return f"/api/v1/tenants/{tenant}/automations"


def create_rule(gw, tenant: str, headers: dict, **body) -> dict:
    response = gw.http.post(automations_url(tenant), json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert created["secret"].startswith("whsec_") and response.headers["ETag"] == created["etag"]
    return created


def rule_row(gw, rule_id):
    with gw.db.engine.connect() as conn:
        return conn.execute(select(RULE).where(RULE.c.id == int(rule_id))).first()


def run(gw, rule_id, clock=utcnow) -> dict:
    outbox.sequence_events(gw.db)
    return runner.run_rule(gw.db, gw.app.config, int(rule_id), clock=clock)


def alerts(gw, tenant: str, headers: dict) -> list[dict]:
    response = gw.http.get(f"/api/v1/tenants/{tenant}/security/alerts?$top=1000", headers=headers)
    assert response.status_code == 200
    return response.get_json()["value"]


def history(gw, tenant: str, headers: dict, alert_id: str) -> list[dict]:
    return gw.http.get(
        f"/api/v1/tenants/{tenant}/security/alerts/{alert_id}/history", headers=headers
    ).get_json()["value"]


@pytest.fixture
def receivers():
    started = []

    def start(*args, **kwargs) -> Receiver:
        receiver = Receiver(*args, **kwargs)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


# -- the test: through a real worker, the task run twice --------------------------------------


@pytest.fixture
def queued_gw(store_url, redis_clean):
    """An app on each store whose pushes and tasks go to Redis, for a real worker."""
    app = make_app(store_url, eager=False)
    wipe(app.extensions["gateway.db"])
    yield Gateway(app)
    app.extensions["gateway.db"].dispose()


def test_a_rule_assigns_new_critical_alerts_and_calls_a_webhook_once_per_event_even_when_the_task_runs_twice(
    queued_gw, receivers
):
    gw = queued_gw
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant], SCOPES)
    receiver = receivers()
    rule = create_rule(
        gw,
        tenant,
        headers,
        **CRITICAL_RULE,
        actions=[
            {
                "type": "setFields",
                "fields": {
                    "assignedTo": "soc-oncall",
                    "status": "inProgress",
                    "comments": [{"text": "triaged by automation"}],
                },
            },
            {"type": "webhook", "url": receiver.url},
        ],
    )
    receiver.secrets.append(rule["secret"])
    sqlite = gw.db.engine.dialect.name == "sqlite"
    worker = Worker(gw.app.config["DATABASE_URL"], concurrency=1 if sqlite else 2)
    try:
        batch = push(gw, tenant, headers, graph_alerts("crit", "high", 3), "graph_alert")
        merged(gw, tenant, headers, batch)
        merged(gw, tenant, headers, push(gw, tenant, headers, graph_alerts("low", "low", 2), "graph_alert"))
        celery = gw.app.extensions["celery"]
        outbox.sequence_events(gw.db)
        for _ in range(2):  # the task runs twice (concurrently on PostgreSQL), and the beat's dispatch too
            celery.send_task("workers.automation_tasks.run_automation", args=[int(rule["id"])], queue=QUEUE)
        celery.send_task("workers.automation_tasks.dispatch_automations", queue=QUEUE)
        wait_for(lambda: len(receiver.accepted()) >= 3, timeout=120)
        latest = lambda: rule_row(gw, rule["id"])  # noqa: E731
        with gw.db.engine.connect() as conn:
            top = conn.execute(select(func.max(EV.c.seq))).scalar()
        wait_for(lambda: latest().cursor_seq >= top and latest().lease_owner is None, timeout=120)
        # and once more after everything is done: nothing is repeated
        celery.send_task("workers.automation_tasks.run_automation", args=[int(rule["id"])], queue=QUEUE)
    finally:
        worker.stop()
    assert run(gw, rule["id"])["fired"] == 0, "the rule's own edits (alert.updated) do not retrigger it"
    ids = Counter(d.webhook_id for d in receiver.accepted())
    assert len(ids) == 3 and set(ids.values()) == {1}, ids
    events = [d.payload for d in receiver.accepted()]
    assert {e["type"] for e in events} == {"alert.created"}
    assert all(e["data"]["severity"] == "high" for e in events)
    shown = {a["vendorInformation"]["providerAlertId"]: a for a in alerts(gw, tenant, headers)}
    for name, alert in shown.items():
        critical = name.startswith("crit")
        assert (alert["assignedTo"], alert["status"]) == (
            ("soc-oncall", "inProgress") if critical else (None, "newAlert")
        ), alert
        edits = [e for e in history(gw, tenant, headers, alert["id"]) if e["event"] == "edited"]
        assert len(edits) == (1 if critical else 0)
        if critical:
            assert edits[0]["cause"] == f"automation rule {rule['id']}"
            assert edits[0]["actor"] == f"automation:{rule['id']}"
            assert [c["text"] for c in alert["comments"]] == ["triaged by automation"]
    with gw.db.engine.connect() as conn:
        done = conn.execute(select(DONE.c.action_index, func.count()).group_by(DONE.c.action_index)).all()
    assert dict(done) == {0: 3, 1: 3}
    row = rule_row(gw, rule["id"])
    assert row.fired_events == 3 and row.last_error is None


# -- errors are isolated; actions done are not repeated ----------------------------------------------


def test_a_failing_rule_shows_its_error_blocks_no_other_rule_and_retries_without_repeating(gw, receivers):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant], SCOPES)
    answers = {"status": 500}
    failing_receiver = receivers(respond=lambda d: (answers["status"], {}))
    good_receiver = receivers()
    failing = create_rule(
        gw,
        tenant,
        headers,
        **CRITICAL_RULE,
        actions=[
            {"type": "setFields", "fields": {"tags": ["auto"]}},
            {"type": "webhook", "url": failing_receiver.url},
        ],
    )
    failing_receiver.secrets.append(failing["secret"])
    good = create_rule(
        gw,
        tenant,
        headers,
        displayName="all new alerts",
        eventTypes=["alert.created"],
        actions=[{"type": "webhook", "url": good_receiver.url}],
    )
    good_receiver.secrets.append(good["secret"])
    push(gw, tenant, headers, graph_alerts("crit", "high", 2), "graph_alert")

    assert run(gw, failing["id"])["status"] == "failed"
    assert run(gw, good["id"])["fired"] == 2, "the other rule goes on"
    row = rule_row(gw, failing["id"])
    assert "answered 500" in row.last_error and row.attempts == 1 and row.next_attempt_at is not None
    shown = gw.http.get(f"{automations_url(tenant)}/{failing['id']}", headers=headers).get_json()
    assert "answered 500" in shown["lastError"] and shown["nextAttemptDateTime"]
    assert shown["state"] == "active" and shown["failingSince"], "failing, but not for long enough yet"
    assert run(gw, failing["id"])["status"] == "busy", "it waits for its backoff"
    # still failing AUTOMATION_FAILING_AFTER_SECONDS later: the rule shows it, and a filter finds it
    soon = lambda: utcnow() + timedelta(seconds=gw.app.config["AUTOMATION_FAILING_AFTER_SECONDS"] + 1)  # noqa: E731
    assert run(gw, failing["id"], clock=soon)["status"] == "failed"
    shown = gw.http.get(f"{automations_url(tenant)}/{failing['id']}", headers=headers).get_json()
    assert shown["state"] == "failing" and "answered 500" in shown["lastError"]
    listed = gw.http.get(
        automations_url(tenant), query_string={"$filter": "state eq 'failing'"}, headers=headers
    ).get_json()["value"]
    assert [r["id"] for r in listed] == [failing["id"]], "the good rule is not failing"
    # a later push is merged as usual (rules never hold the merge)
    push(gw, tenant, headers, graph_alerts("more", "high", 1), "graph_alert")

    answers["status"] = 200
    later = lambda: utcnow() + timedelta(hours=1)  # noqa: E731
    assert run(gw, failing["id"], clock=later)["fired"] == 3
    assert run(gw, failing["id"], clock=later)["fired"] == 0
    delivered = [d for d in failing_receiver.deliveries if d.status == 200]
    assert len({d.webhook_id for d in delivered}) == 3
    failed_ids = {d.webhook_id for d in failing_receiver.deliveries if d.status == 500}
    assert failed_ids <= {d.webhook_id for d in delivered}, "the retry has the same webhook-id"
    for alert in alerts(gw, tenant, headers):
        tags_edits = [e for e in history(gw, tenant, headers, alert["id"]) if e["event"] == "edited"]
        assert len(tags_edits) == 1, "setFields ran once although the event was taken up again"
        assert alert["tags"] == ["auto"]
    row = rule_row(gw, failing["id"])
    assert row.attempts == 0 and row.state == "active" and row.failing_since is None, "recovered"


def test_rules_do_not_trigger_each_other_forever(gw):
    """Two rules that each edit what the other listens to: the chain stops at the limit."""
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant], SCOPES)
    first = create_rule(
        gw,
        tenant,
        headers,
        displayName="a",
        eventTypes=["alert.*"],
        actions=[{"type": "setFields", "fields": {"tags": ["a"]}}],
    )
    second = create_rule(
        gw,
        tenant,
        headers,
        displayName="b",
        eventTypes=["alert.*"],
        actions=[{"type": "setFields", "fields": {"tags": ["b"]}}],
    )
    push(gw, tenant, headers, graph_alerts("x", "high", 1), "graph_alert")
    for _ in range(6):
        run(gw, first["id"])
        run(gw, second["id"])
    alert = alerts(gw, tenant, headers)[0]
    actors = [e["actor"] for e in history(gw, tenant, headers, alert["id"]) if e["event"] == "edited"]
    a, b = first["id"], second["id"]
    assert actors == [f"automation:{a}", f"automation:{b}", f"automation:{a}>{b}", f"automation:{b}>{a}"]
    assert run(gw, first["id"])["fired"] == 0 and run(gw, second["id"])["fired"] == 0


def test_a_rule_opens_exactly_one_ticket(gw):
    from cryptography.fernet import Fernet

    from tests.itsm_sim import ServiceNowSim

    gw.app.config.update(
        SECRETS_KEYS=Fernet.generate_key().decode(), ITSM_TIMEOUT_SECONDS=1, ITSM_RETRY_BASE_SECONDS=0.05
    )
    sim = ServiceNowSim()
    try:
        tenant = gw.tenant()
        headers = gw.partner("Qualys", [tenant], SCOPES)
        response = gw.http.post(
            f"/api/v1/tenants/{tenant}/itsm/connections",
            headers=headers,
            json={
                "name": "snow",
                "kind": "servicenow",
                "baseUrl": sim.url,
                "auth": "basic",
                "username": "gateway",
                "secret": "sn-password-0123456789",
            },
        )
        assert response.status_code == 201, response.get_json()
        connection = response.get_json()
        rule = create_rule(
            gw,
            tenant,
            headers,
            displayName="tickets",
            eventTypes=["finding.created"],
            filter="severity eq 'critical'",
            actions=[{"type": "createTicket", "connectionId": connection["id"]}],
        )
        push(
            gw,
            tenant,
            headers,
            document(
                [finding("f-1", severity="critical"), finding("f-2", cves=["CVE-2024-1"], severity="low")]
            ),
            "canonical",
        )
        assert run(gw, rule["id"])["fired"] == 1
        with gw.db.engine.begin() as conn:  # as if the run had died before moving its cursor
            conn.execute(RULE.update().where(RULE.c.id == int(rule["id"])).values(cursor_seq=0))
        assert run(gw, rule["id"])["fired"] == 1, "the event is taken up again"
        listed = gw.http.get(f"/api/v1/tenants/{tenant}/itsm/tickets", headers=headers).get_json()["value"]
        assert len(listed) == 1 and listed[0]["createdBy"] == f"automation:{rule['id']}"
        wait_for(lambda: len(sim.incidents) == 1, timeout=30)
    finally:
        sim.stop()


# -- the API ------------------------------------------------------------------------------------------


def test_the_automation_api_checks_rules_and_needs_current_etags(gw, receivers):
    tenant, other = gw.tenant(), gw.tenant()
    headers = gw.partner("Contoso", [tenant], SCOPES)
    reader = gw.partner("Contoso", [tenant], "security.read")
    url = automations_url(tenant)
    receiver = receivers()
    hook = {"type": "webhook", "url": receiver.url}
    bad = [
        {"displayName": "x"},
        {"displayName": "x", "actions": []},
        {"displayName": "x", "actions": [{"type": "email"}]},
        {"displayName": "x", "actions": [{"type": "webhook"}]},
        {"displayName": "x", "actions": [{"type": "webhook", "url": "ftp://x/"}]},
        {"displayName": "x", "actions": [{"type": "webhook", "url": receiver.url, "fields": {}}]},
        {
            "displayName": "x",
            "eventTypes": ["alert.*"],
            "actions": [{"type": "setFields", "fields": {"x": 1}}],
        },
        {
            "displayName": "x",
            "eventTypes": ["alert.*"],
            "actions": [{"type": "setFields", "fields": {"status": "closed"}}],
        },
        {
            "displayName": "x",
            "eventTypes": ["batch.finished"],
            "actions": [{"type": "setFields", "fields": {"assignedTo": "a"}}],
        },
        {
            "displayName": "x",
            "eventTypes": ["finding.*"],
            "actions": [{"type": "createTicket", "connectionId": "9"}],
        },
        {"displayName": "x", "filter": "nothing eq 1", "actions": [hook]},
    ]
    for body in bad:
        response = gw.http.post(url, json=body, headers=headers)
        assert response.status_code == 400, (body, response.get_json())
        assert response.get_json()["error"]["message"]
    assert gw.http.post(url, json={"displayName": "x", "actions": [hook]}, headers=reader).status_code == 403
    assert (
        gw.http.post(
            automations_url(other), json={"displayName": "x", "actions": [hook]}, headers=headers
        ).status_code
        == 404
    )
    made = [
        create_rule(
            gw,
            tenant,
            headers,
            displayName=f"rule {n}",
            eventTypes=["alert.created"],
            actions=[hook, {"type": "setFields", "fields": {"assignedTo": "sam"}}],
        )
        for n in range(3)
    ]
    page = gw.http.get(url, query_string={"$top": "2", "$count": "true"}, headers=headers).get_json()
    assert page["@odata.count"] == 3 and len(page["value"]) == 2 and "secret" not in page["value"][0]
    rest = gw.http.get(page["@odata.nextLink"].split("localhost", 1)[1], headers=headers).get_json()
    assert [r["id"] for r in page["value"] + rest["value"]] == [m["id"] for m in made]
    found = gw.http.get(url, query_string={"$filter": "displayName eq 'rule 1'"}, headers=headers).get_json()
    assert [r["id"] for r in found["value"]] == [made[1]["id"]]
    assert gw.http.get(url, query_string={"$filter": "bogus eq 1"}, headers=headers).status_code == 400
    one = f"{url}/{made[0]['id']}"
    shown = gw.http.get(one, headers=headers)
    assert shown.status_code == 200 and shown.headers["ETag"] == made[0]["etag"]
    assert gw.http.patch(one, json={"enabled": False}, headers=headers).status_code == 428
    assert (
        gw.http.patch(one, json={"enabled": False}, headers=headers | {"If-Match": '"0.0"'}).status_code
        == 412
    )
    changed = gw.http.patch(one, json={"enabled": False}, headers=headers | {"If-Match": made[0]["etag"]})
    assert changed.status_code == 200 and changed.get_json()["enabled"] is False
    assert changed.headers["ETag"] != made[0]["etag"]
    assert (
        gw.http.patch(
            one, json={"enabled": True}, headers=headers | {"If-Match": made[0]["etag"]}
        ).status_code
        == 412
    )
    assert (
        gw.http.patch(
            one, json={"actions": [{"type": "nope"}]}, headers=headers | {"If-Match": "*"}
        ).status_code
        == 400
    )
    assert (
        gw.http.get(
            f"{automations_url(other)}/{made[0]['id']}", headers=gw.partner("Contoso", [other], SCOPES)
        ).status_code
        == 404
    )

    # the dry run: what would happen for an event, nothing done
    push(gw, tenant, headers, graph_alerts("a", "high", 1), "graph_alert")
    outbox.sequence_events(gw.db)
    test = gw.http.post(f"{url}/{made[1]['id']}/test", headers=headers)
    assert test.status_code == 200, test.get_json()
    dry = test.get_json()
    assert dry["matches"] is True and dry["event"]["type"] == "alert.created"
    assert [a["type"] for a in dry["actions"]] == ["webhook", "setFields"]
    assert dry["actions"][1]["would"]["changes"] == {"assignedTo": "sam"}
    assert receiver.deliveries == [] and alerts(gw, tenant, headers)[0]["assignedTo"] is None
    assert (
        gw.http.post(f"{url}/{made[1]['id']}/test", json={"eventId": "99999999"}, headers=headers).status_code
        == 400
    )

    current = gw.http.get(one, headers=headers).get_json()
    assert gw.http.delete(one, headers=headers).status_code == 428
    assert gw.http.delete(one, headers=headers | {"If-Match": made[0]["etag"]}).status_code == 412
    assert gw.http.delete(one, headers=headers | {"If-Match": current["etag"]}).status_code == 204
    assert gw.http.get(one, headers=headers).status_code == 404

    result = CliRunner().invoke(
        main,
        ["automation", "list", "--tenant", tenant],
        env={"GATEWAY_DATABASE_URL": gw.app.config["DATABASE_URL"], "GATEWAY_SECRET_KEY": SECRET},
    )
    assert result.exit_code == 0, result.output
    assert "rule 1" in result.output and "rule 0" not in result.output


# -- snapshots ------------------------------------------------------------------------------------------


def exports_url(tenant: str) -> str:
    return f"/api/v1/tenants/{tenant}/exports"


def test_a_snapshot_delivers_the_filtered_collection_with_stable_ids(gw, receivers):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    push(
        gw,
        tenant,
        headers,
        document(
            [
                finding(f"f-{n}", cves=[f"CVE-2024-{1000 + n}"], severity="high" if n % 2 else "low")
                for n in range(7)
            ]
        ),
        "canonical",
    )
    receiver = receivers()
    response = gw.http.post(
        exports_url(tenant),
        headers=headers,
        json={
            "displayName": "SIEM",
            "url": receiver.url,
            "eventTypes": ["finding.*"],
            "filter": "severity eq 'high'",
        },
    )
    export = response.get_json()
    receiver.secrets.append(export["secret"])
    started = gw.http.post(f"{exports_url(tenant)}/{export['id']}/snapshot", headers=headers)
    assert started.status_code == 202, started.get_json()
    job = started.get_json()
    # the eager test app ran it in the request; the job's URL shows the outcome
    shown = gw.http.get(started.headers["Location"].split("localhost", 1)[1], headers=headers).get_json()
    assert shown["state"] == "succeeded" and shown["delivered"] == shown["total"] == 3, shown
    events = receiver.events()
    assert [e["type"] for e in events] == ["finding.snapshot"] * 3
    assert all(e["data"]["severity"] == "high" and e["sequence"] is None for e in events)
    assert [d.webhook_id for d in receiver.accepted()] == [
        f"snap_{job['id']}_finding_{e['subjectId']}" for e in events
    ]
    # redelivery (the job taken up again from the start) sends the same ids
    with gw.db.engine.begin() as conn:
        conn.execute(snapshot.SNAP.update().values(state="running", subject_index=0, after_id=0))
    snapshot.run(gw.db, gw.app.config, int(job["id"]))
    ids = Counter(d.webhook_id for d in receiver.accepted())
    assert len(ids) == 3 and set(ids.values()) == {2}
    assert (
        gw.http.get(f"{exports_url(tenant)}/{export['id']}/snapshots/999", headers=headers).status_code == 404
    )
    # the destination's live cursor did not move for the snapshot
    listed = gw.http.get(f"{exports_url(tenant)}/{export['id']}", headers=headers).get_json()
    assert listed["status"]["deliveredEvents"] == 0


COUNTING_RECEIVER = r"""
import sys, json
from http.server import BaseHTTPRequestHandler, HTTPServer
from standardwebhooks.webhooks import Webhook
port, secret, out = int(sys.argv[1]), sys.argv[2], open(sys.argv[3], "a", buffering=1)
hook = Webhook(secret)
class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        payload = hook.verify(body, {k.lower(): v for k, v in self.headers.items()})
        events = payload["data"] if payload.get("type") == "batch" else [payload]
        out.write(json.dumps([self.headers["webhook-id"], [e["id"] for e in events]]) + "\n")
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def big_gw(store_url):
    app = make_app(store_url, eager=True, MERGE_CHUNK_SIZE=5000, SNAPSHOT_SLICE_SIZE=500)
    wipe(app.extensions["gateway.db"])
    yield Gateway(app)
    app.extensions["gateway.db"].dispose()


def test_a_snapshot_of_10000_findings_keeps_memory_flat(big_gw, tmp_path):
    """The task's peak memory (tracemalloc) for 10,000 findings is that of 1,000: one slice at a time.
    The receiver runs in another process, so that only the snapshot's memory is traced."""
    gw = big_gw
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    records = [
        finding(
            f"f-{n}",
            host=f"h-{n % 500}.example.com",
            cves=[f"CVE-2024-{10000 + n}"],
            severity="critical" if n < 1000 else "medium",
        )
        for n in range(10_000)
    ]
    for start in range(0, len(records), 5000):
        push(gw, tenant, headers, document(records[start : start + 5000]), "canonical")
    port, log_path = free_port(), tmp_path / "received.jsonl"
    secret = "whsec_" + __import__("base64").b64encode(uuid.uuid4().bytes * 2).decode()
    process = subprocess.Popen([sys.executable, "-c", COUNTING_RECEIVER, str(port), secret, str(log_path)])
    try:
        wait_for(lambda: _listening(port), timeout=20)
        peaks = {}
        for name, flt in (("1000", "severity eq 'critical'"), ("10000", None)):
            body = {
                "displayName": name,
                "url": f"http://127.0.0.1:{port}/",
                "eventTypes": ["finding.*"],
                "batchSize": 100,
                "secret": secret,
            }
            if flt:
                body["filter"] = flt
            export = gw.http.post(exports_url(tenant), json=body, headers=headers).get_json()
            with gw.db.engine.begin() as conn:
                dest = conn.execute(
                    select(snapshot.DEST).where(snapshot.DEST.c.id == int(export["id"]))
                ).first()
                job_id = snapshot.start(conn, dest, "test", utcnow())
            tracemalloc.start()
            result = snapshot.run(gw.db, gw.app.config, job_id)
            while result["status"] == "budget":
                result = snapshot.run(gw.db, gw.app.config, job_id)
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert result["status"] == "succeeded", result
    finally:
        process.terminate()
        process.wait(10)
    received = [json.loads(line) for line in log_path.read_text().splitlines()]
    ids = [event_id for _, events in received for event_id in events]
    assert len(ids) == 11_000 and len(set(ids)) == 11_000
    print(
        f"\nsnapshot peak memory ({gw.db.engine.dialect.name}): "
        f"1,000 findings {peaks['1000'] / 2**20:.1f} MiB, "
        f"10,000 findings {peaks['10000'] / 2**20:.1f} MiB"
    )
    assert peaks["10000"] < 1.5 * peaks["1000"] + 2 * 2**20, peaks


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_failed_snapshot_delivery_is_retried_from_where_it_stopped_under_the_same_id(gw, receivers):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    push(
        gw,
        tenant,
        headers,
        document([finding(f"f-{n}", cves=[f"CVE-2024-{1000 + n}"]) for n in range(5)]),
        "canonical",
    )
    answers = iter([200, 500])
    receiver = receivers(respond=lambda d: (next(answers, 200), {}))
    export = gw.http.post(
        exports_url(tenant),
        headers=headers,
        json={"displayName": "SIEM", "url": receiver.url, "eventTypes": ["finding.*"], "batchSize": 2},
    ).get_json()
    receiver.secrets.append(export["secret"])
    with gw.db.engine.begin() as conn:
        dest = conn.execute(select(snapshot.DEST).where(snapshot.DEST.c.id == int(export["id"]))).first()
        job_id = snapshot.start(conn, dest, "test", utcnow())
    assert snapshot.run(gw.db, gw.app.config, job_id)["status"] == "failed"
    shown = gw.http.get(
        f"{exports_url(tenant)}/{export['id']}/snapshots/{job_id}", headers=headers
    ).get_json()
    assert shown["state"] == "running" and shown["delivered"] == 2 and "answered 500" in shown["lastError"]
    assert snapshot.run(gw.db, gw.app.config, job_id)["status"] == "busy", "it waits for its backoff"
    later = lambda: utcnow() + timedelta(hours=1)  # noqa: E731
    assert snapshot.run(gw.db, gw.app.config, job_id, clock=later)["status"] == "succeeded"
    sent = [d.webhook_id for d in receiver.deliveries]
    assert len(sent) == 4 and sent[1] == sent[2], "the failed batch came again, under the same id"
    assert sorted(e["subjectId"] for e in receiver.events()) == sorted(
        {e["subjectId"] for e in receiver.events()}
    )
    assert len(receiver.events()) == 5
    with gw.db.engine.connect() as conn:
        assert (
            conn.execute(select(snapshot.SNAP.c.delivered).where(snapshot.SNAP.c.id == job_id)).scalar() == 5
        )


def test_a_snapshot_runs_in_a_real_worker(queued_gw, receivers):
    gw = queued_gw
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers()
    export = gw.http.post(
        exports_url(tenant),
        headers=headers,
        json={
            "displayName": "SIEM",
            "url": receiver.url,
            "eventTypes": ["finding.*", "recommendation.*"],
            "batchSize": 10,
        },
    ).get_json()
    receiver.secrets.append(export["secret"])
    sqlite = gw.db.engine.dialect.name == "sqlite"
    worker = Worker(gw.app.config["DATABASE_URL"], concurrency=1 if sqlite else 2)
    try:
        records = [finding(f"f-{n}", cves=[f"CVE-2024-{1000 + n}"]) for n in range(25)]
        merged(gw, tenant, headers, push(gw, tenant, headers, document(records), "canonical"))
        started = gw.http.post(f"{exports_url(tenant)}/{export['id']}/snapshot", headers=headers)
        assert started.status_code == 202, started.get_json()
        job_url = started.headers["Location"].split("localhost", 1)[1]
        done = wait_for(
            lambda: (lambda job: job if job["state"] == "succeeded" else None)(
                gw.http.get(job_url, headers=headers).get_json()
            ),
            timeout=120,
        )
    finally:
        worker.stop()
    assert done["subjectTypes"] == ["finding", "recommendation"] and done["delivered"] == done["total"]
    types = Counter(e["type"] for e in receiver.events())
    assert types["finding.snapshot"] == 25 and types["recommendation.snapshot"] == done["total"] - 25
