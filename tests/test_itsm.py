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


def test_fault_soak_makes_exactly_one_ticket_per_finding(pg_gw, itsm_worker):
    """200 findings (the issue's 2,000 are for bench/itsm_bench.py); a fifth of the calls fail: 10%
    committed then dropped before the answer, 5% 429, 5% 500."""
    gw, count = pg_gw, 200
    sn = ServiceNowSim(seed=7)
    sn.rates = {"drop": 0.10, "429": 0.05, "500": 0.05}
    sn.retry_after = "0"
    try:
        tenant, auth = _itsm(gw)
        snow = connect(gw, tenant, auth, sn_body(sn))
        rule(gw, tenant, auth, snow["id"])
        merged(
            gw,
            tenant,
            auth,
            push(
                gw,
                tenant,
                auth,
                [
                    finding(f"s-{n}", f"host-{n % 20}.example.com", (f"CVE-2024-{n:05d}",))
                    for n in range(count)
                ],
            ),
        )
        wait_for(
            lambda: (
                len(sn.incidents) >= count
                and all(t["syncState"] == "synced" for t in tickets(gw, tenant, auth))
            ),
            timeout=120,
            interval=0.5,
        )
        links = tickets(gw, tenant, auth)
        assert len(links) == count and len(sn.incidents) == count
        markers = [r["correlation_id"] for r in sn.incidents.values()]
        assert len(set(markers)) == count
        assert {t["remoteId"] for t in links} == set(sn.incidents)
        assert {f"gw-{snow['id']}-finding-{t['subjectId']}" for t in links} == set(markers)
        assert sum(1 for _, path, status in sn.calls if status == 201) == count
        assert any(m == "GET" for m, _, _ in sn.calls), "lost answers were looked up"
    finally:
        sn.stop()


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
        assert "503" in body["lastError"] and body["pendingOperations"] == 6
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


# -- the feed: ids that commit out of order ---------------------------------------------------------


def test_the_feed_sees_an_event_that_commits_after_a_later_id(pg_url):
    """Transaction A takes an event id and commits after transaction B took and committed a larger one:
    the feed reads B's event, keeps A's id as a gap, and reads A's event once it commits."""
    import psycopg

    from gateway.db import Database
    from gateway.itsm import feed
    from tests.conftest import wipe

    db = Database(pg_url)
    wipe(db)
    insert = (
        "INSERT INTO lifecycle_events (tenant_id, subject_type, subject_id, event, at, cause) "
        "VALUES (%s, 'finding', %s, 'new', now(), 'test') RETURNING id"
    )
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with db.engine.begin() as conn:
            state = feed.start(conn)
        with psycopg.connect(dsn) as slow, psycopg.connect(dsn, autocommit=True) as fast:
            first = slow.execute(insert, (7, 1)).fetchone()[0]
            second = fast.execute(insert, (7, 2)).fetchone()[0]
            assert second > first
            with db.engine.begin() as conn:
                events, state, _ = feed.read(conn, 7, state)
            assert [e.subject_id for e in events] == [2] and state["gaps"][0][:2] == [first, first]
            with db.engine.begin() as conn:  # still running: the gap stays
                events, state, _ = feed.read(conn, 7, state)
            assert events == [] and len(state["gaps"]) == 1
            slow.commit()
        with db.engine.begin() as conn:
            events, state, _ = feed.read(conn, 7, state)
        assert [e.subject_id for e in events] == [1] and state["gaps"] == []
        with db.engine.begin() as conn:
            events, state, _ = feed.read(conn, 7, state)
        assert events == [] and state["watermark"] == second
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
