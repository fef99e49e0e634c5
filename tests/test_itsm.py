"""ITSM ticket sync (issue 12): connections, rules, tickets against loopback ServiceNow and Jira servers.

The end-to-end tests push findings to the gateway on PostgreSQL and let a real Celery worker merge
them, scan the lifecycle events and deliver the tickets over real HTTP to tests/itsm_sim.py."""

from __future__ import annotations

import json

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select, text

from gateway.itsm import vault
from gateway.models import ItsmConnection, ItsmTicket
from tests.conftest import Worker, wait_for
from tests.factories import document, finding
from tests.itsm_sim import JiraSim, ServiceNowSim

KEY = Fernet.generate_key().decode()
SCOPES = "findings.write security.read alerts.manage itsm.manage"
WORKER_ENV = {
    "GATEWAY_SECRETS_KEYS": KEY,
    "GATEWAY_ITSM_TIMEOUT_SECONDS": "1",
    "GATEWAY_ITSM_RETRY_BASE_SECONDS": "0.05",
}


@pytest.fixture
def sn():
    sim = ServiceNowSim()
    yield sim
    sim.stop()


@pytest.fixture
def jira():
    sim = JiraSim()
    yield sim
    sim.stop()


def _itsm(gw, tenant=None):
    gw.app.config.update(SECRETS_KEYS=KEY, ITSM_TIMEOUT_SECONDS=1, ITSM_RETRY_BASE_SECONDS=0.05)
    tenant = tenant or gw.tenant()
    return tenant, gw.partner("Scanner", [tenant], SCOPES)


def sn_body(sim, **extra):
    return {
        "name": "snow",
        "kind": "servicenow",
        "baseUrl": sim.url,
        "auth": "basic",
        "username": "gateway",
        "secret": "sn-password-0123456789",
        **extra,
    }


def jira_body(sim, **extra):
    return {
        "name": "jira",
        "kind": "jira",
        "baseUrl": sim.url,
        "auth": "basic",
        "username": "bot@example.com",
        "secret": "jira-api-token-0123456789",
        "projectKey": "SEC",
        "issueType": "Bug",
        **extra,
    }


def connect(gw, tenant, auth, body) -> dict:
    response = gw.http.post(f"/api/v1/tenants/{tenant}/itsm/connections", json=body, headers=auth)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def rule(gw, tenant, auth, connection_id, **body) -> dict:
    body = {"name": "high findings", "connectionId": connection_id, "collection": "findings", **body}
    response = gw.http.post(f"/api/v1/tenants/{tenant}/itsm/rules", json=body, headers=auth)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def push(gw, tenant, auth, findings, scan=None) -> int:
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=canonical",
        data=document(findings, scan),
        content_type="application/json",
        headers=auth,
    )
    assert response.status_code == 202, response.get_json()
    return int(response.get_json()["id"])


def tickets(gw, tenant, auth, query="") -> list[dict]:
    response = gw.http.get(f"/api/v1/tenants/{tenant}/itsm/tickets?$top=1000{query}", headers=auth)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["value"]


def merged(gw, tenant, auth, batch_id):
    def done():
        body = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{batch_id}", headers=auth).get_json()
        return body["status"] in ("succeeded", "partiallySucceeded")

    wait_for(done, timeout=60)


@pytest.fixture
def itsm_worker(pg_app, redis_clean):
    process = Worker(pg_app.config["DATABASE_URL"], concurrency=2, extra_env=WORKER_ENV)
    yield process
    process.stop()


# -- connections ------------------------------------------------------------------------------------


def test_a_connection_keeps_its_secret_encrypted_and_never_answers_it(gw, sn, jira):
    tenant, auth = _itsm(gw)
    made = connect(gw, tenant, auth, sn_body(sn))
    assert "secret" not in made and made["hasSecret"] is True and made["secretHint"] == "…6789"
    assert made["health"] == "unknown" and made["table"] is None
    with gw.db.engine.connect() as conn:
        stored = conn.execute(select(ItsmConnection.secret, ItsmConnection.webhook_secret)).one()
        dumped = json.dumps(
            [list(r) for r in conn.execute(text("SELECT * FROM itsm_connections"))], default=str
        )
    assert "sn-password" not in dumped
    assert vault.decrypt(gw.app.config, stored.secret) == "sn-password-0123456789"
    listed = gw.http.get(f"/api/v1/tenants/{tenant}/itsm/connections", headers=auth).get_json()["value"]
    assert "sn-password" not in json.dumps(listed)

    url = f"/api/v1/tenants/{tenant}/itsm/connections"
    test = gw.http.post(f"{url}/{made['id']}/test", headers=auth).get_json()
    assert test["ok"] is True, test
    # key rotation: a new first key still opens what the old one sealed
    gw.app.config["SECRETS_KEYS"] = Fernet.generate_key().decode() + "," + KEY
    assert gw.http.post(f"{url}/{made['id']}/test", headers=auth).get_json()["ok"] is True
    assert (
        vault.decrypt(gw.app.config, vault.rotate(gw.app.config, stored.secret)) == "sn-password-0123456789"
    )
    gw.app.config["SECRETS_KEYS"] = KEY

    wrong = gw.http.patch(f"{url}/{made['id']}", json={"secret": "not-the-password"}, headers=auth)
    assert wrong.status_code == 200 and wrong.get_json()["secretHint"] == "…word"
    test = gw.http.post(f"{url}/{made['id']}/test", headers=auth).get_json()
    assert (test["ok"], test["stage"], test["status"]) == (False, "credentials", 401)
    gw.http.patch(
        f"{url}/{made['id']}",
        json={"table": "no_such_table", "secret": "sn-password-0123456789"},
        headers=auth,
    )
    test = gw.http.post(f"{url}/{made['id']}/test", headers=auth).get_json()
    assert (test["ok"], test["stage"]) == (False, "configuration") and "Invalid table" in test["message"]

    bad_project = connect(gw, tenant, auth, jira_body(jira, projectKey="NOPE"))
    test = gw.http.post(f"{url}/{bad_project['id']}/test", headers=auth).get_json()
    assert (test["ok"], test["stage"], test["status"]) == (False, "configuration", 404)
    gone = connect(gw, tenant, auth, {**jira_body(jira), "name": "gone", "baseUrl": "http://127.0.0.1:9"})
    test = gw.http.post(f"{url}/{gone['id']}/test", headers=auth).get_json()
    assert (test["ok"], test["stage"]) == (False, "reachability")

    assert gw.http.post(url, json=sn_body(sn), headers=auth).status_code == 409
    assert (
        gw.http.post(url, json={**sn_body(sn), "name": "x", "auth": "bearer"}, headers=auth).status_code
        == 400
    )
    assert (
        gw.http.post(url, json={**jira_body(jira), "name": "y", "projectKey": None}, headers=auth).status_code
        == 400
    )
    reader = gw.partner("Reader", [tenant], "security.read")
    assert gw.http.post(url, json=sn_body(sn, name="z"), headers=reader).status_code == 403
    assert gw.http.get(url, headers=reader).status_code == 403


def test_connections_rules_and_tickets_are_per_tenant(gw, sn):
    tenant, auth = _itsm(gw)
    other, other_auth = _itsm(gw)
    made = connect(gw, tenant, auth, sn_body(sn))
    made_rule = rule(gw, tenant, auth, made["id"])
    base = f"/api/v1/tenants/{tenant}/itsm"
    theirs = f"/api/v1/tenants/{other}/itsm"
    for name, item in (("connections", made["id"]), ("rules", made_rule["id"])):
        assert gw.http.get(f"{base}/{name}/{item}", headers=other_auth).status_code == 404
        assert gw.http.get(f"{theirs}/{name}/{item}", headers=other_auth).status_code == 404
        assert gw.http.get(f"{theirs}/{name}", headers=other_auth).get_json()["value"] == []
        assert (
            gw.http.patch(f"{theirs}/{name}/{item}", json={"name": "x"}, headers=other_auth).status_code
            == 404
        )
        assert gw.http.delete(f"{theirs}/{name}/{item}", headers=other_auth).status_code == 404
    assert gw.http.post(f"{theirs}/connections/{made['id']}/test", headers=other_auth).status_code == 404
    # a rule cannot name another tenant's connection; a manual ticket neither
    response = gw.http.post(
        f"{theirs}/rules",
        json={"name": "r", "connectionId": made["id"], "collection": "findings"},
        headers=other_auth,
    )
    assert response.status_code == 400
    batch = push(gw, tenant, auth, [finding("a-1")])
    finding_id = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings", headers=auth).get_json()["value"][
        0
    ]["id"]
    assert batch
    response = gw.http.post(
        f"/api/v1/tenants/{other}/security/findings/{finding_id}/tickets",
        json={"connectionId": made["id"]},
        headers=other_auth,
    )
    assert response.status_code == 400
    other_connection = connect(gw, other, other_auth, sn_body(sn))
    response = gw.http.post(
        f"/api/v1/tenants/{other}/security/findings/{finding_id}/tickets",
        json={"connectionId": other_connection["id"]},
        headers=other_auth,
    )
    assert response.status_code == 404
    assert gw.http.get(f"{theirs}/tickets", headers=other_auth).get_json()["value"] == []
    assert gw.http.get(f"{base}/rules?$filter=collection eq 'findings'", headers=auth).get_json()["value"]
    assert (
        gw.http.post(
            f"{base}/rules",
            json={
                "name": "bad",
                "connectionId": made["id"],
                "collection": "findings",
                "filter": "nothing eq 1",
            },
            headers=auth,
        ).status_code
        == 400
    )


# -- end to end (PostgreSQL, Redis, a real worker) --------------------------------------------------


def test_matching_findings_get_one_ticket_each_and_the_rest_none(pg_gw, sn, jira, itsm_worker):
    gw = pg_gw
    tenant, auth = _itsm(gw)
    snow = connect(gw, tenant, auth, sn_body(sn, assignmentGroup="secops", category="security"))
    rule(gw, tenant, auth, snow["id"], filter="severity ge 'high' and state ne 'resolved'")
    grouped = connect(gw, tenant, auth, jira_body(jira))
    rule(gw, tenant, auth, grouped["id"], name="per host", filter="severity ge 'medium'", grouping="resource")
    batch = push(
        gw,
        tenant,
        auth,
        [
            finding("h-1", "web-1.example.com", ("CVE-2024-0001",), severity="critical"),
            finding("h-2", "web-1.example.com", ("CVE-2024-0002",), severity="high"),
            finding("h-3", "db-1.example.com", ("CVE-2024-0003",), severity="high"),
            finding("l-1", "web-1.example.com", ("CVE-2024-0004",), severity="low"),
            finding("m-1", "db-1.example.com", ("CVE-2024-0005",), severity="medium"),
        ],
    )
    merged(gw, tenant, auth, batch)
    wait_for(lambda: len(sn.incidents) == 3 and len(jira.issues) == 2, timeout=60)
    wait_for(lambda: all(t["syncState"] == "synced" for t in tickets(gw, tenant, auth)), timeout=30)
    incidents = sorted(sn.incidents.values(), key=lambda r: r["correlation_id"])
    assert all(r["assignment_group"] == "secops" and r["category"] == "security" for r in incidents)
    assert [r["urgency"] + r["impact"] for r in incidents] == ["11", "12", "12"]
    findings = {
        f["id"]: f
        for f in gw.http.get(f"/api/v1/tenants/{tenant}/security/findings", headers=auth).get_json()["value"]
    }
    links = tickets(gw, tenant, auth, f"&$filter=connectionId eq '{snow['id']}'")
    assert {(t["subjectType"], findings[t["subjectId"]]["severity"]) for t in links} == {
        ("finding", "critical"),
        ("finding", "high"),
    }
    assert {t["remoteId"] for t in links} == set(sn.incidents)
    assert {r["correlation_id"] for r in incidents} == {
        f"gw-{snow['id']}-finding-{t['subjectId']}" for t in links
    }
    assert all(t["remoteKey"].startswith("INC") and t["remoteState"] == "New" for t in links)
    per_host = tickets(gw, tenant, auth, f"&$filter=connectionId eq '{grouped['id']}'")
    assert sorted(len(t["items"]) for t in per_host) == [2, 2] and {t["subjectType"] for t in per_host} == {
        "resource"
    }
    assert all(len(i["fields"]["labels"]) == 1 for i in jira.issues.values())
    web = next(i for i in jira.issues.values() if "web-1" in i["fields"]["summary"])
    assert web["fields"]["priority"] == {"name": "Highest"} and web["fields"]["issuetype"] == {"name": "Bug"}
    # an item filter on the tickets
    one = next(t for t in links)
    found = tickets(gw, tenant, auth, f"&$filter=items/any(i: i/subjectId eq '{one['subjectId']}')")
    assert {t["id"] for t in found} >= {one["id"]}
    # the same findings pushed again make no ticket
    again = push(
        gw,
        tenant,
        auth,
        [
            finding(
                "h-1", "web-1.example.com", ("CVE-2024-0001",), severity="critical", ts="2024-04-02T00:00:00Z"
            )
        ],
    )
    merged(gw, tenant, auth, again)
    manual = gw.http.post(
        f"/api/v1/tenants/{tenant}/security/findings/{one['subjectId']}/tickets",
        json={"connectionId": snow["id"]},
        headers=auth,
    )
    assert manual.status_code == 200 and manual.get_json()["id"] == one["id"]
    low = next(f for f in findings.values() if f["severity"] == "low")
    manual = gw.http.post(
        f"/api/v1/tenants/{tenant}/security/findings/{low['id']}/tickets",
        json={"connectionId": snow["id"]},
        headers=auth,
    )
    assert manual.status_code == 201
    wait_for(lambda: len(sn.incidents) == 4, timeout=30)
    assert len(jira.issues) == 2


CUSTOM_WORKFLOW = {
    "statuses": {
        "7": ("Open", "new"),
        "42": ("Working", "indeterminate"),
        "9001": ("Closed", "done"),
        "9002": ("Won't Do", "done"),
    },
    "transitions": [("501", "Start", "42"), ("777", "Close", "9001"), ("502", "Reopen", "7")],
}


def test_resolve_and_reopen_follow_the_finding(pg_gw, sn, itsm_worker):
    gw = pg_gw
    jira = JiraSim(workflow=CUSTOM_WORKFLOW)
    try:
        tenant, auth = _itsm(gw)
        snow = connect(gw, tenant, auth, sn_body(sn))
        rule(gw, tenant, auth, snow["id"])
        issues = connect(gw, tenant, auth, jira_body(jira))
        rule(gw, tenant, auth, issues["id"])
        merged(gw, tenant, auth, push(gw, tenant, auth, [finding("r-1", severity="high")]))
        wait_for(lambda: len(sn.incidents) == 1 and len(jira.issues) == 1, timeout=60)
        (incident,) = sn.incidents.values()
        (key,) = jira.issues
        merged(
            gw,
            tenant,
            auth,
            push(
                gw, tenant, auth, [finding("r-1", severity="high", status="fixed", ts="2024-04-02T00:00:00Z")]
            ),
        )
        wait_for(lambda: incident["state"] == "6" and jira.category(key) == "done", timeout=60)
        assert incident["close_code"] and "resolved" in incident["close_notes"]
        assert jira.issues[key]["fields"]["status"]["id"] == "9001"
        merged(
            gw,
            tenant,
            auth,
            push(gw, tenant, auth, [finding("r-1", severity="critical", ts="2024-04-03T00:00:00Z")]),
        )
        wait_for(lambda: incident["state"] == "2" and jira.category(key) == "new", timeout=60)
        wait_for(
            lambda: (
                incident["urgency"] + incident["impact"] == "11"
                and jira.issues[key]["fields"].get("priority") == {"name": "Highest"}
            ),
            timeout=30,
        )
        assert any("Reopened" in e["value"] for e in sn.journal(incident["sys_id"], "work_notes"))
        state = {t["remoteState"] for t in tickets(gw, tenant, auth)}
        assert state <= {"In Progress", "Open"}
    finally:
        jira.stop()


# the fault soak at the issue's size (2,000 findings): tests/test_itsm_soak.py


def test_itsm_down_then_up_loses_nothing_and_keeps_order(pg_gw, itsm_worker):
    gw = pg_gw
    jira = JiraSim()
    jira.down = True
    try:
        tenant, auth = _itsm(gw)
        made = connect(gw, tenant, auth, jira_body(jira))
        rule(gw, tenant, auth, made["id"])
        merged(
            gw,
            tenant,
            auth,
            push(gw, tenant, auth, [finding(f"d-{n}", cves=(f"CVE-2024-1{n:04d}",)) for n in range(5)]),
        )
        merged(
            gw,
            tenant,
            auth,
            push(
                gw,
                tenant,
                auth,
                [finding("d-0", cves=("CVE-2024-10000",), status="fixed", ts="2024-04-02T00:00:00Z")],
            ),
        )
        url = f"/api/v1/tenants/{tenant}/itsm/connections/{made['id']}"
        wait_for(lambda: gw.http.get(url, headers=auth).get_json()["health"] == "degraded", timeout=60)
        body = gw.http.get(url, headers=auth).get_json()
        # Operations wait while the system is down, none sent. How many are planned by then varies
        # (full-suite runs saw 4 of the 6, and once not 6 within 60 s); that nothing is lost and
        # the order holds is checked once it is back up, below.
        assert "503" in body["lastError"] and 1 <= body["pendingOperations"] <= 6
        assert not jira.issues
        jira.down = False
        wait_for(lambda: gw.http.get(url, headers=auth).get_json()["pendingOperations"] == 0, timeout=60)
        assert len(jira.issues) == 5
        assert sum(1 for i in jira.issues if jira.category(i) == "done") == 1
        assert gw.http.get(url, headers=auth).get_json()["health"] == "healthy"
        done = [path for method, path, _ in jira.calls if method == "POST" and path.endswith("/transitions")]
        created = [
            n
            for n, (method, path, _) in enumerate(jira.calls)
            if method == "POST" and path.endswith("/issue")
        ]
        first_transition = next(n for n, (m, p, _) in enumerate(jira.calls) if p.endswith("/transitions"))
        assert len(done) == 1 and first_transition > min(created)
    finally:
        jira.stop()


def test_a_refused_ticket_is_parked_and_the_rest_continue(pg_gw, itsm_worker):
    gw = pg_gw
    jira = JiraSim()
    try:
        tenant, auth = _itsm(gw)
        made = connect(gw, tenant, auth, jira_body(jira, priorityMap={"critical": "Blocker"}))
        rule(gw, tenant, auth, made["id"])
        merged(
            gw,
            tenant,
            auth,
            push(
                gw,
                tenant,
                auth,
                [
                    finding("p-1", cves=("CVE-2024-20001",), severity="critical"),
                    finding("p-2", cves=("CVE-2024-20002",), severity="high"),
                ],
            ),
        )
        wait_for(
            lambda: {t["syncState"] for t in tickets(gw, tenant, auth)} == {"parked", "synced"}, timeout=60
        )
        parked = next(t for t in tickets(gw, tenant, auth) if t["syncState"] == "parked")
        assert "priority" in parked["lastError"] and parked["remoteKey"] is None
        assert len(jira.issues) == 1
        url = f"/api/v1/tenants/{tenant}/itsm/connections/{made['id']}"
        assert gw.http.get(url, headers=auth).get_json()["parkedTickets"] == 1
        gw.http.patch(url, json={"priorityMap": None}, headers=auth)
        assert (
            gw.http.post(
                f"/api/v1/tenants/{tenant}/itsm/tickets/{parked['id']}/resync", headers=auth
            ).status_code
            == 202
        )
        wait_for(lambda: len(jira.issues) == 2, timeout=30)
        with gw.db.engine.connect() as conn:
            assert conn.execute(
                select(ItsmTicket.sync_state).where(ItsmTicket.id == int(parked["id"]))
            ).scalar()
    finally:
        jira.stop()


# -- the feed: the outbox cursor, whatever the commit order --------------------------------------------


def test_the_feed_sees_an_event_that_commits_after_a_later_id(pg_url):
    """Transaction A takes an event id and commits after transaction B took and committed a larger one:
    the feed (a cursor over the outbox's ``seq``) reads B's event, then A's once it commits."""
    import psycopg

    from gateway.db import Database
    from gateway.export.events import sequence_events
    from gateway.itsm import feed
    from tests.conftest import wipe

    db = Database(pg_url)
    wipe(db)
    insert = (
        "INSERT INTO lifecycle_events (tenant_id, subject_type, subject_id, event, at, cause) "
        "VALUES (%s, %s, %s, 'new', now(), 'test') RETURNING id"
    )
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with db.engine.begin() as conn:
            state = feed.start(conn)
        with psycopg.connect(dsn) as slow, psycopg.connect(dsn, autocommit=True) as fast:
            first = slow.execute(insert, (7, "finding", 1)).fetchone()[0]
            second = fast.execute(insert, (7, "finding", 2)).fetchone()[0]
            fast.execute(insert, (7, "resource", 3))  # not an item: passed, not returned
            fast.execute(insert, (8, "finding", 4))  # another tenant's
            assert second > first
            sequence_events(db)
            with db.engine.begin() as conn:
                events, state, _ = feed.read(conn, 7, state)
            assert [e.subject_id for e in events] == [2] and set(state) == {"seq"}
            sequence_events(db)
            with db.engine.begin() as conn:  # still running: nothing new
                events, state, _ = feed.read(conn, 7, state)
            assert events == []
            slow.commit()
        sequence_events(db)
        with db.engine.begin() as conn:
            events, state, _ = feed.read(conn, 7, state)
        assert [e.subject_id for e in events] == [1]
        with db.engine.begin() as conn:
            events, again, _ = feed.read(conn, 7, state)
        assert events == [] and again == state
    finally:
        db.dispose()


def test_the_feed_converts_an_old_watermark_without_missing_an_event(pg_url):
    """A state of the old reader (``watermark`` and ``gaps`` of event ids) becomes a ``seq`` cursor
    that reads the events of its gaps and after its watermark: some twice perhaps, none missed."""
    from gateway.db import Database
    from gateway.export.events import sequence_events
    from gateway.itsm import feed
    from tests.conftest import wipe

    db = Database(pg_url)
    wipe(db)
    try:
        with db.engine.begin() as conn:
            ids = [
                conn.execute(
                    text(
                        "INSERT INTO lifecycle_events (tenant_id, subject_type, subject_id, event, at, "
                        "cause) VALUES (7, 'finding', :n, 'new', now(), 'test') RETURNING id"
                    ),
                    {"n": n},
                ).scalar()
                for n in range(6)
            ]
        sequence_events(db)
        old = {"watermark": ids[3], "gaps": [[ids[1], ids[1], "2026-01-01T00:00:00+00:00"]]}
        with db.engine.begin() as conn:
            events, state, _ = feed.read(conn, 7, old)
        read = [e.subject_id for e in events]
        assert {1, 4, 5} <= set(read) and 0 not in read and set(state) == {"seq"}
        with db.engine.begin() as conn:
            assert feed.read(conn, 7, {"watermark": ids[-1], "gaps": []})[0] == []
    finally:
        db.dispose()


def test_gateway_itsm_commands(gw, sn, monkeypatch):
    from click.testing import CliRunner

    from gateway.cli import main

    tenant, auth = _itsm(gw)
    made = connect(gw, tenant, auth, sn_body(sn))
    monkeypatch.setenv("GATEWAY_DATABASE_URL", gw.app.config["DATABASE_URL"])
    monkeypatch.setenv("GATEWAY_SECRETS_KEYS", Fernet.generate_key().decode() + "," + KEY)
    monkeypatch.setenv("GATEWAY_SECRET_KEY", "x")
    runner = CliRunner()
    listed = runner.invoke(main, ["itsm", "list", "--tenant", tenant])
    assert listed.exit_code == 0 and "snow" in listed.output and "sn-password" not in listed.output
    rotated = runner.invoke(main, ["itsm", "rotate-secrets"])
    assert rotated.exit_code == 0, rotated.output
    with gw.db.engine.connect() as conn:
        stored = conn.execute(
            select(ItsmConnection.secret).where(ItsmConnection.id == int(made["id"]))
        ).scalar()
    with pytest.raises(vault.SecretsUnavailable):
        vault.decrypt({"SECRETS_KEYS": KEY}, stored)  # only the new first key opens it now
    assert runner.invoke(main, ["itsm", "resync", "--ticket", "999999"]).exit_code == 1
    assert len(runner.invoke(main, ["itsm", "new-key"]).output.strip()) == 44


# -- inbound sync (item 5): polling, webhooks, no echo ----------------------------------------------


def _item(gw, tenant, auth, finding_id) -> dict:
    response = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings/{finding_id}", headers=auth)
    assert response.status_code == 200
    return response.get_json()


def _history(gw, tenant, auth, finding_id) -> list[dict]:
    url = f"/api/v1/tenants/{tenant}/security/findings/{finding_id}/history"
    return gw.http.get(url, headers=auth).get_json()["value"]


def _ticketed(gw, sim, body, grouping="item", count=1):
    """A tenant, a connection with an automatic rule, ``count`` findings on one host ticketed
    (eager tasks: the merge scans and delivers in the request)."""
    tenant, auth = _itsm(gw)
    made = connect(gw, tenant, auth, body)
    rule(gw, tenant, auth, made["id"], grouping=grouping)
    push(
        gw,
        tenant,
        auth,
        [finding(f"i-{n}", "app-1.example.com", (f"CVE-2024-3{n:04d}",)) for n in range(count)],
    )
    links = tickets(gw, tenant, auth)
    assert links and all(t["syncState"] == "synced" for t in links), links
    return tenant, auth, made, links


def _poll(gw, connection_id) -> int:
    from gateway.itsm import inbound

    with gw.app.app_context():
        return inbound.poll(gw.db, gw.app.config, int(connection_id))


def _tick(gw) -> None:
    from gateway.itsm import tasks

    with gw.app.app_context():
        tasks.tick()


def test_servicenow_assignee_closure_and_comments_come_back_by_polling(gw, sn):
    tenant, auth, made, (link,) = _ticketed(gw, sn, sn_body(sn))
    finding_id = link["items"][0]["subjectId"]
    sys_id = link["remoteId"]
    url = f"/api/v1/tenants/{tenant}/itsm/connections/{made['id']}"
    assert gw.http.get(url, headers=auth).get_json()["inbound"] == {
        "lastPollDateTime": None,
        "lastError": None,
        "lastErrorDateTime": None,
    }
    bob = sn.user("Bob Builder", "bob")  # assigned_to is a reference: the gateway shows the name
    sn.human(sys_id, user="alice", assigned_to=bob, comments="Looking at it")
    sn.fault("500")  # a failed poll is shown on the connection, and changes nothing
    assert _poll(gw, made["id"]) == 0
    inbound = gw.http.get(url, headers=auth).get_json()["inbound"]
    assert "500" in inbound["lastError"] and inbound["lastErrorDateTime"] and not inbound["lastPollDateTime"]
    assert _item(gw, tenant, auth, finding_id)["assignedTo"] is None
    assert _poll(gw, made["id"]) >= 1
    inbound = gw.http.get(url, headers=auth).get_json()["inbound"]
    assert inbound["lastPollDateTime"] > inbound["lastErrorDateTime"]
    item = _item(gw, tenant, auth, finding_id)
    assert item["assignedTo"] == "Bob Builder"
    assert [(c["text"], c["by"]) for c in item["comments"]] == [("Looking at it", "alice")]
    edits = [e for e in _history(gw, tenant, auth, finding_id) if e["event"] == "edited"]
    assert edits and all(e["actor"] == f"itsm:{made['id']}" for e in edits)
    # polled again: nothing new, nothing written twice
    assert _poll(gw, made["id"]) == 0
    assert len(_item(gw, tenant, auth, finding_id)["comments"]) == 1
    # a customer reassigns on the gateway; an unrelated poll does not undo it
    gw.http.patch(
        f"/api/v1/tenants/{tenant}/security/findings/{finding_id}", json={"assignedTo": "carol"}, headers=auth
    )
    _poll(gw, made["id"])
    assert _item(gw, tenant, auth, finding_id)["assignedTo"] == "carol"
    # closed as risk accepted -> statusOverride; the provider's state stays the scanner's
    sn.human(sys_id, state="7", close_code="Risk Accepted", close_notes="accepted by the CISO")
    _tick(gw)
    item = _item(gw, tenant, auth, finding_id)
    assert item["statusOverride"] == "riskAccepted" and item["state"] != "resolved"
    # reopened in ServiceNow: the override the ITSM set is cleared
    sn.human(sys_id, state="2")
    _poll(gw, made["id"])
    assert _item(gw, tenant, auth, finding_id)["statusOverride"] is None


def test_jira_assignee_and_wont_do_come_back_by_polling_for_every_item_of_a_group(gw, jira):
    tenant, auth, made, (link,) = _ticketed(gw, jira, jira_body(jira), grouping="resource", count=2)
    key = link["remoteKey"]
    jira.assign(key, "dave@example.com")
    jira.add_comment(key, "Patch scheduled for Friday", user="erin@example.com")
    assert _poll(gw, made["id"]) >= 2
    for item in link["items"]:
        body = _item(gw, tenant, auth, item["subjectId"])
        assert body["assignedTo"] == "dave@example.com"
        assert [(c["text"], c["by"]) for c in body["comments"]] == [
            ("Patch scheduled for Friday", "erin@example.com")
        ]
    jira.down = True  # a failed poll keeps its watermark and says why
    assert _poll(gw, made["id"]) == 0
    with gw.db.engine.connect() as conn:
        state = conn.execute(
            select(ItsmConnection.poll_state).where(ItsmConnection.id == int(made["id"]))
        ).scalar()
    assert "503" in state["lastError"]
    jira.down = False
    jira.move(key, "10001", resolution="Won't Do")
    _poll(gw, made["id"])
    assert {_item(gw, tenant, auth, i["subjectId"])["statusOverride"] for i in link["items"]} == {
        "riskAccepted"
    }
    # a plain Done (fixed) is the provider's business, not a risk acceptance
    assert _poll(gw, made["id"]) == 0


def _webhook_secret(gw, tenant, auth, connection_id) -> dict:
    url = f"/api/v1/tenants/{tenant}/itsm/connections/{connection_id}/rotateWebhookSecret"
    response = gw.http.post(url, headers=auth)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _receiver(gw, connection_id):
    def send(body, headers):
        return gw.http.post(f"/api/v1/itsm/webhooks/{connection_id}", data=body, headers=headers)

    return send


def test_servicenow_and_jira_webhooks_apply_once_and_forged_ones_change_nothing(gw, sn, jira):
    tenant, auth, snow, (incident,) = _ticketed(gw, sn, sn_body(sn))
    answer = _webhook_secret(gw, tenant, auth, snow["id"])
    assert (
        answer["webhookUrl"].endswith(f"/api/v1/itsm/webhooks/{snow['id']}")
        and len(answer["webhookSecret"]) > 30
    )
    sn.webhooks_to(_receiver(gw, snow["id"]), answer["webhookSecret"])
    finding_id = incident["items"][0]["subjectId"]
    bob = sn.user("Bob Builder", "bob")
    response = sn.human(incident["remoteId"], user="alice", assigned_to=bob, work_notes="on it")
    assert response.status_code == 200 and response.get_json()["edits"] >= 1
    item = _item(gw, tenant, auth, finding_id)
    assert item["assignedTo"] == "Bob Builder" and [c["by"] for c in item["comments"]] == ["alice"]
    # the same delivery again: idempotent
    body, headers = sn.sent_webhooks[-1]
    again = gw.http.post(f"/api/v1/itsm/webhooks/{snow['id']}", data=body, headers=headers)
    assert again.status_code == 200 and again.get_json()["edits"] == 0
    # the poll afterwards finds it all taken in
    assert _poll(gw, snow["id"]) == 0
    assert len(_item(gw, tenant, auth, finding_id)["comments"]) == 1
    # forged: a wrong secret, no signature, a tampered body, an unknown connection -> 401, nothing changes
    before = (_item(gw, tenant, auth, finding_id), _history(gw, tenant, auth, finding_id))
    forged = json.dumps(
        {
            "record": {
                "sys_id": incident["remoteId"],
                "state": "8",
                "assigned_to": "mallory",
                "sys_updated_on": "2999-01-01 00:00:00",
            }
        }
    ).encode()
    import hashlib
    import hmac

    bad = "sha256=" + hmac.new(b"not-the-secret", forged, hashlib.sha256).hexdigest()
    tampered = headers[sn.SIGNATURE_HEADER]
    for path, sent_headers in (
        (snow["id"], {"X-Gateway-Signature": bad}),
        (snow["id"], {}),
        (snow["id"], {"X-Gateway-Signature": tampered}),
        (snow["id"], {"X-Gateway-Token": "guess"}),
        ("999999", {"X-Gateway-Signature": bad}),
    ):
        response = gw.http.post(
            f"/api/v1/itsm/webhooks/{path}",
            data=forged,
            headers={"Content-Type": "application/json", **sent_headers},
        )
        assert response.status_code == 401, response.get_json()
        assert response.get_json()["error"]["code"] == "invalidSignature"
    assert (_item(gw, tenant, auth, finding_id), _history(gw, tenant, auth, finding_id)) == before
    # closure by webhook
    sn.human(incident["remoteId"], state="8")
    assert _item(gw, tenant, auth, finding_id)["statusOverride"] == "riskAccepted"
    # a rotated secret: the old one is refused
    old = sn.webhook_secret
    _webhook_secret(gw, tenant, auth, snow["id"])
    assert sn.human(incident["remoteId"], assigned_to="zed").status_code == 401
    assert _item(gw, tenant, auth, finding_id)["assignedTo"] == "Bob Builder" and old

    # Jira: X-Hub-Signature, issue and comment events
    issues = connect(gw, tenant, auth, jira_body(jira))
    rule(gw, tenant, auth, issues["id"])
    push(gw, tenant, auth, [finding("j-1", "app-2.example.com", ("CVE-2024-39999",))])
    link = tickets(gw, tenant, auth, f"&$filter=connectionId eq '{issues['id']}'")[0]
    jira.webhooks_to(
        _receiver(gw, issues["id"]), _webhook_secret(gw, tenant, auth, issues["id"])["webhookSecret"]
    )
    jira_item = link["items"][0]["subjectId"]
    assert jira.assign(link["remoteKey"], "dave@example.com").status_code == 200
    assert jira.add_comment(link["remoteKey"], "Will fix", user="erin@example.com").status_code == 200
    assert jira.move(link["remoteKey"], "10001", resolution="Won't Fix").status_code == 200
    body = _item(gw, tenant, auth, jira_item)
    assert body["assignedTo"] == "dave@example.com" and body["statusOverride"] == "riskAccepted"
    assert [(c["text"], c["by"]) for c in body["comments"]] == [("Will fix", "erin@example.com")]
    assert _poll(gw, issues["id"]) == 0


def test_no_comment_echo_after_three_round_trips(gw, jira, sn):
    for sim, body in ((jira, jira_body(jira)), (sn, sn_body(sn))):
        tenant, auth, made, (link,) = _ticketed(gw, sim, body)
        finding_id = link["items"][0]["subjectId"]
        url = f"/api/v1/tenants/{tenant}/security/findings/{finding_id}"

        def remote_comments(sim=sim, link=link):
            if sim is jira:
                return [c for c in jira.comments.get(link["remoteKey"], [])]
            return sn.journal(link["remoteId"])

        start = len(remote_comments())  # what the gateway wrote when it made the ticket
        for n in range(3):
            if sim is jira:
                jira.add_comment(link["remoteKey"], f"from the ITSM {n}", user="erin@example.com")
            else:
                sn.human(link["remoteId"], user="erin", comments=f"from the ITSM {n}")
            _tick(gw)  # poll: the ITSM comment comes in
            response = gw.http.patch(
                url, json={"comments": [{"text": f"from the gateway {n}"}]}, headers=auth
            )
            assert response.status_code == 204
            _tick(gw)  # scan + deliver: the customer's comment goes out
            _tick(gw)  # poll again: the gateway's own comment is not taken back
            _tick(gw)
        comments = _item(gw, tenant, auth, finding_id)["comments"]
        assert sorted(c["text"] for c in comments) == sorted(
            [f"from the ITSM {n}" for n in range(3)] + [f"from the gateway {n}" for n in range(3)]
        )
        texts = [(jira_text(c) if sim is jira else c["value"]) for c in remote_comments()]
        assert len(texts) == start + 6, texts
        assert sum("from the gateway" in t for t in texts) == 3
        assert sum("from the ITSM" in t for t in texts) == 3


def jira_text(comment):
    from gateway.itsm.clients import adf_text

    return adf_text(comment["body"])


def test_webhooks_are_per_connection_and_tenant(gw, sn):
    tenant, auth, mine, (link,) = _ticketed(gw, sn, sn_body(sn))
    other, other_auth = _itsm(gw)
    theirs = connect(gw, other, other_auth, sn_body(sn))
    their_secret = _webhook_secret(gw, other, other_auth, theirs["id"])["webhookSecret"]
    # another tenant cannot rotate (or learn) this connection's secret
    url = f"/api/v1/tenants/{other}/itsm/connections/{mine['id']}/rotateWebhookSecret"
    assert gw.http.post(url, headers=other_auth).status_code == 404
    # signed with the other tenant's secret: refused on this connection; on its own connection the
    # record (this tenant's ticket) is not found and nothing changes
    finding_id = link["items"][0]["subjectId"]
    sn.webhooks_to(_receiver(gw, mine["id"]), their_secret)
    assert sn.human(link["remoteId"], assigned_to="mallory").status_code == 401
    sn.webhooks_to(_receiver(gw, theirs["id"]), their_secret)
    response = sn.human(link["remoteId"], assigned_to="mallory", comments="hello")
    assert response.status_code == 200 and response.get_json()["edits"] == 0
    item = _item(gw, tenant, auth, finding_id)
    assert item["assignedTo"] is None and item["comments"] == []
