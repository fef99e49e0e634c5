"""Continuous export (issue 13, first slice): the outbox in commit order, signed webhooks, delivery
at least once and in order through outages, replay, filters, the API, the CLI.

Receivers are real HTTP servers on loopback sockets (tests/receiver.py) verifying every delivery
with the ``standardwebhooks`` library.  Delivery steps are the task functions called directly with
a clock where the order of events matters; the worker tests run real Celery workers.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select, text
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.cli import main
from gateway.export import delivery, webhook
from gateway.export import events as outbox
from gateway.models import ExportDestination, LifecycleEvent, Tenant, utcnow
from tests.conftest import QUEUE, REDIS_URL, ROOT, SECRET, Worker, wait_for
from tests.factories import document, finding
from tests.receiver import Receiver, free_port

EV, DEST = LifecycleEvent.__table__, ExportDestination.__table__
SCOPES = "findings.write alerts.write security.read alerts.manage exports.manage"


# -- helpers ----------------------------------------------------------------------------------------


def exports_url(tenant: str) -> str:
    return f"/api/v1/tenants/{tenant}/exports"


def create(gw, tenant: str, headers: dict, url: str, **fields) -> dict:
    body = {"displayName": "SIEM", "url": url} | fields
    response = gw.http.post(exports_url(tenant), json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    created = response.get_json()
    assert response.headers["ETag"] == created["etag"] and created["secret"].startswith("whsec_")
    return created


def push(gw, tenant: str, headers: dict, findings: list[dict], scan: str | None = None) -> str:
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=canonical",
        data=document(findings, scan),
        headers=headers | {"Content-Type": "application/json"},
    )
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def sequence(gw) -> None:
    outbox.sequence_events(gw.db)


def run(gw, export_id, clock=None, budget: float = 30.0) -> dict:
    """One delivery task, called directly (the events are sequenced first, as the beat does)."""
    sequence(gw)
    return delivery.deliver(
        gw.db, gw.app.config, int(export_id), clock=clock or utcnow, budget_seconds=budget
    )


def state(gw, export_id):
    with gw.db.engine.connect() as conn:
        return conn.execute(select(DEST).where(DEST.c.id == int(export_id))).first()


def per_subject(events: list[dict]) -> dict[tuple[str, str], list[str]]:
    seen = defaultdict(list)
    for event in events:
        seen[(event["subjectType"], event["subjectId"])].append(event["id"])
    return seen


def stored_events(gw, tenant: str) -> list:
    with gw.db.engine.connect() as conn:
        tenant_id = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant)).scalar_one()
        return conn.execute(select(EV).where(EV.c.tenant_id == tenant_id).order_by(EV.c.seq)).all()


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


# -- the outbox -------------------------------------------------------------------------------------


def test_event_types_in_python_and_in_sql_agree(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    push(
        gw,
        tenant,
        headers,
        [
            finding("f-1", severity="high"),
            finding("f-2", host="db-2.example.com", cves=["CVE-2024-1001"], severity="low"),
        ],
    )
    push(gw, tenant, headers, [finding("f-1", status="fixed", ts="2024-05-01T00:00:00Z")])
    items = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings", headers=headers).get_json()["value"]
    gw.http.patch(
        f"/api/v1/tenants/{tenant}/security/findings/{items[0]['id']}",
        json={"assignedTo": "sam"},
        headers=headers,
    )
    with gw.db.engine.connect() as conn:
        rows = conn.execute(
            select(EV.c.subject_type, EV.c.event, outbox.type_expression().label("kind"))
        ).all()
    types = {row.kind for row in rows}
    assert all(row.kind == outbox.event_type(row.subject_type, row.event) for row in rows)
    assert {
        "finding.created",
        "finding.resolved",
        "finding.updated",
        "recommendation.created",
        "recommendation.statusChanged",
        "batch.finished",
        "secureScore.changed",
    } <= types
    assert types <= set(outbox.KNOWN_TYPES)
    assert outbox.matches_type(["finding.*"], "finding.resolved") and outbox.matches_type(
        ["*.created"], "alert.created"
    )
    assert not outbox.matches_type(["finding.created"], "finding.resolved")
    batches = [row for row in stored_events(gw, tenant) if row.subject_type == "batch"]
    assert [b.details["status"] for b in batches] == ["succeeded", "succeeded"]
    assert batches[0].details["counts"]["created"] == 2


def test_the_sequence_is_commit_order_and_a_cursor_never_skips_a_late_commit(pg_gw):
    """Two transactions commit out of id order: the event with the smaller id, committed later, is
    sequenced after the other and delivered; a cursor on ids would have skipped it."""
    gw = pg_gw
    tenant = gw.tenant()
    with gw.db.engine.connect() as conn:
        tenant_id = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant)).scalar_one()
    row = {
        "tenant_id": tenant_id,
        "subject_type": "alert",
        "event": "edited",
        "at": utcnow(),
        "cause": "customer edit",
    }
    early, late = gw.db.engine.connect(), gw.db.engine.connect()
    try:
        early_tx = early.begin()
        first = early.execute(EV.insert().values(row | {"subject_id": 1}).returning(EV.c.id)).scalar_one()
        with late.begin():
            second = late.execute(EV.insert().values(row | {"subject_id": 2}).returning(EV.c.id)).scalar_one()
        assert first < second
        sequence(gw)  # sees the second only
        with gw.db.engine.connect() as conn:
            seqs = dict(conn.execute(select(EV.c.id, EV.c.seq).where(EV.c.id.in_([first, second]))).all())
        assert first not in seqs and seqs[second] is not None  # the first is not committed yet
        naive_cursor = second  # "the last id read"
        early_tx.commit()
    finally:
        early.close()
        late.close()
    sequence(gw)
    with gw.db.engine.connect() as conn:
        seqs = dict(conn.execute(select(EV.c.id, EV.c.seq).where(EV.c.id.in_([first, second]))).all())
        after_naive = conn.execute(
            select(EV.c.id).where(EV.c.tenant_id == tenant_id, EV.c.id > naive_cursor)
        ).all()
        after_cursor = (
            conn.execute(select(EV.c.id).where(EV.c.tenant_id == tenant_id, EV.c.seq > seqs[second]))
            .scalars()
            .all()
        )
    assert seqs[first] > seqs[second], "sequenced in commit order"
    assert after_naive == [] and after_cursor == [first], "the id cursor skips it, the sequence does not"


def test_out_of_order_commits_all_reach_the_destination(pg_gw, receivers):
    gw = pg_gw
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers()
    export = create(gw, tenant, headers, receiver.url, eventTypes=["alert.*"])
    receiver.secrets.append(export["secret"])
    with gw.db.engine.connect() as conn:
        tenant_id = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant)).scalar_one()
    row = {
        "tenant_id": tenant_id,
        "subject_type": "alert",
        "event": "edited",
        "at": utcnow(),
        "cause": "edit",
    }
    slow = gw.db.engine.connect()
    try:
        slow_tx = slow.begin()
        first = slow.execute(EV.insert().values(row | {"subject_id": 10}).returning(EV.c.id)).scalar_one()
        with gw.db.engine.begin() as conn:
            second = conn.execute(
                EV.insert().values(row | {"subject_id": 20}).returning(EV.c.id)
            ).scalar_one()
        assert run(gw, export["id"])["delivered"] == 1
        slow_tx.commit()
    finally:
        slow.close()
    assert run(gw, export["id"])["delivered"] == 1
    assert [e["id"] for e in receiver.events()] == [str(second), str(first)]


# -- signing ----------------------------------------------------------------------------------------


def test_deliveries_are_signed_and_the_receiver_rejects_forged_and_replayed_ones(gw, receivers, monkeypatch):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers()
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.created"])
    receiver.secrets.append(export["secret"])
    push(gw, tenant, headers, [finding("f-1")])

    # A delivery signed 10 minutes ago (what a replay of a captured delivery looks like) is refused.
    monkeypatch.setattr(webhook, "_clock", lambda: time.time() - 600)
    assert run(gw, export["id"])["status"] == "failed"
    refused = receiver.deliveries[-1]
    assert not refused.verified and "too old" in refused.error
    monkeypatch.undo()
    assert run(gw, export["id"], clock=lambda: utcnow() + timedelta(hours=1))["delivered"] == 1
    good = receiver.accepted()[-1]
    assert good.webhook_id == refused.webhook_id == f"evt_{good.events[0]['id']}"
    event = good.events[0]
    assert event["type"] == "finding.created" and event["tenant"] == tenant
    assert event["data"]["title"] == "Vulnerability f-1" and event["data"]["severity"] == "high"
    assert (
        event["data"]
        == gw.http.get(
            f"/api/v1/tenants/{tenant}/security/findings/{event['subjectId']}", headers=headers
        ).get_json()
    )

    verifier = Webhook(export["secret"])
    verifier.verify(good.body, good.headers)
    with pytest.raises(WebhookVerificationError):  # the body changed
        verifier.verify(good.body.replace(b"Vulnerability", b"Harmless thing"), good.headers)
    with pytest.raises(WebhookVerificationError):  # another secret
        Webhook(webhook.secrets.new_webhook_secret()).verify(good.body, good.headers)
    with pytest.raises(WebhookVerificationError):  # the same signature under a fresh timestamp
        verifier.verify(good.body, good.headers | {"webhook-timestamp": str(int(time.time()) + 5)})
    import requests

    forged = requests.post(
        receiver.url,
        data=good.body,
        timeout=5,
        headers=good.headers | {"webhook-signature": "v1," + "A" * 43 + "="},
    )
    assert forged.status_code == 400 and not receiver.deliveries[-1].verified


def test_a_rotated_secret_signs_beside_the_old_one_during_the_overlap(gw, receivers):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers()
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.*"])
    old = export["secret"]
    receiver.secrets.append(old)
    rotated = gw.http.post(f"{exports_url(tenant)}/{export['id']}/rotateSecret", headers=headers)
    assert rotated.status_code == 200
    new = rotated.get_json()["secret"]
    assert new != old and rotated.get_json()["secretHint"] == new[:10] + "…"
    assert rotated.get_json()["previousSecretExpiresDateTime"] and rotated.headers["ETag"] != export["etag"]
    receiver.secrets.append(new)
    push(gw, tenant, headers, [finding("f-1")])
    assert run(gw, export["id"])["delivered"] == 1
    during = receiver.accepted()[-1]
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert during.verified_by == [old, new], "both the old and the new secret verify it"

    push(gw, tenant, headers, [finding("f-2", cves=["CVE-2024-1002"])])
    overlap = gw.app.config["EXPORT_SECRET_OVERLAP_SECONDS"]
    assert run(gw, export["id"], clock=lambda: utcnow() + timedelta(seconds=overlap + 1))["delivered"] == 1
    after = receiver.accepted()[-1]
    assert len(after.headers["webhook-signature"].split(" ")) == 1 and after.verified_by == [new]


# -- delivery semantics ---------------------------------------------------------------------------------


def test_an_outage_then_recovery_delivers_everything_in_order_with_duplicates_only_under_one_id(
    gw, receivers
):
    """Refused connections, then 500s, then 429 with Retry-After, then up: every event arrives, in
    order per subject; the destination is failing (with the last error) meanwhile, then active."""
    gw.app.config["EXPORT_FAILING_AFTER_SECONDS"] = 30
    gw.app.config["EXPORT_PIPELINE_DEPTH"] = 1  # the receiver's scripted answers come one at a time
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    export = create(gw, tenant, headers, url, eventTypes=["finding.*", "alert.*"], batchSize=3)
    hosts = [f"h-{n}.example.com" for n in range(3)]
    push(gw, tenant, headers, [finding(f"{h}/x", host=h) for h in hosts])
    push(
        gw,
        tenant,
        headers,
        [finding(f"{h}/x", host=h, status="fixed", ts="2024-05-01T00:00:00Z") for h in hosts[:2]],
    )
    push(gw, tenant, headers, [finding(f"{h}/x", host=h, ts="2024-06-01T00:00:00Z") for h in hosts[:1]])
    clock = [utcnow()]

    def tick(seconds: float):
        clock[0] += timedelta(seconds=seconds)

    def attempt():
        return run(gw, export["id"], clock=lambda: clock[0])

    # 1. nothing listens: connection refused; the backoff grows; after 30 s it is failing
    outcomes = []
    for _ in range(4):
        outcomes.append(attempt()["status"])
        row = state(gw, export["id"])
        assert row.next_attempt_at > clock[0]
        assert attempt()["status"] == "busy"  # not due before its backoff
        tick((row.next_attempt_at - clock[0]).total_seconds() + 0.001)
    assert outcomes == ["failed"] * 4
    row = state(gw, export["id"])
    assert row.attempts == 4 and "refused" in row.last_error and row.state == "active"
    tick(30)
    attempt()
    shown = gw.http.get(f"{exports_url(tenant)}/{export['id']}", headers=headers).get_json()
    assert shown["state"] == "failing" and "connection" in shown["status"]["lastError"]
    assert shown["status"]["consecutiveFailures"] == 5 and shown["status"]["pendingEvents"] > 0

    # 2. 500s, then 429 with Retry-After, then 200
    answers = [(500, {}), (500, {}), (429, {"Retry-After": "120"})]

    def respond(delivery_):
        return answers.pop(0) if answers else (200, {})

    receiver = receivers(port=port, respond=respond)
    receiver.secrets.append(export["secret"])
    tick(3600)
    assert attempt()["status"] == "failed" and state(gw, export["id"]).last_status_code == 500
    tick(3600)
    attempt()
    tick(3600)
    assert attempt()["status"] == "failed"
    row = state(gw, export["id"])
    assert row.last_status_code == 429 and row.next_attempt_at >= clock[0] + timedelta(seconds=120)
    tick(60)
    assert attempt()["status"] == "busy", "Retry-After is honoured"
    tick(61)
    result = attempt()
    assert result["status"] == "idle" and result["delivered"] == len(stored_finding_events(gw, tenant))
    shown = gw.http.get(f"{exports_url(tenant)}/{export['id']}", headers=headers).get_json()
    assert shown["state"] == "active" and shown["status"]["pendingEvents"] == 0
    assert shown["status"]["consecutiveFailures"] == 0 and shown["status"]["lastStatusCode"] == 200

    # every event once among the accepted deliveries, in order per subject; a repeated event only
    # ever came under the webhook-id it first had
    expected = stored_finding_events(gw, tenant)
    received = receiver.events()
    assert [e["id"] for e in received] == [str(row.id) for row in expected]
    assert per_subject(received) == per_subject(
        [{"subjectType": r.subject_type, "subjectId": str(r.subject_id), "id": str(r.id)} for r in expected]
    )
    ids_of_event = defaultdict(set)
    for d in receiver.deliveries:
        for event in d.events:
            ids_of_event[event["id"]].add(d.webhook_id)
    assert all(len(ids) == 1 for ids in ids_of_event.values())
    assert len(receiver.deliveries) > len(receiver.accepted()), "the failed attempts were resent"
    log = gw.http.get(f"{exports_url(tenant)}/{export['id']}/deliveries", headers=headers).get_json()["value"]
    assert log[0]["outcome"] == "delivered"
    assert {d["statusCode"] for d in log} >= {500, 429, 200, None}
    assert any("refused" in (d["error"] or "") for d in log)


def test_deliveries_travel_side_by_side_in_lanes_keeping_each_subjects_order(gw, receivers):
    """Pipelining (``EXPORT_PIPELINE_DEPTH`` 4, one event per delivery): two deliveries are in flight at
    once (the receiver holds the first until a second arrives), connections are kept open, and when one
    subject's delivery fails its later events wait while the other lanes' are not sent twice."""
    gw.app.config["EXPORT_PIPELINE_DEPTH"] = 4
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers(respond=lambda delivery_: respond(delivery_))
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.*"])
    receiver.secrets.append(export["secret"])
    hosts = [f"lane-{n}.example.com" for n in range(8)]
    push(gw, tenant, headers, [finding(f"{h}/x", host=h) for h in hosts])
    push(
        gw,
        tenant,
        headers,
        [finding(f"{h}/x", host=h, status="fixed", ts="2024-05-01T00:00:00Z") for h in hosts],
    )
    push(gw, tenant, headers, [finding(f"{h}/x", host=h, ts="2024-06-01T00:00:00Z") for h in hosts])
    sequence(gw)
    expected = stored_finding_events(gw, tenant)
    assert len(expected) == 24
    refused_once = str(next(row.id for row in expected if row.event == "resolved"))
    side_by_side = threading.Barrier(2)
    arrived, overlapped, refused = [0], [], []
    lock = threading.Lock()

    def respond(delivery_):
        with lock:
            arrived[0] += 1
            first_two = arrived[0] <= 2
        if first_two:
            try:
                side_by_side.wait(timeout=30)
                overlapped.append(True)
            except threading.BrokenBarrierError:
                overlapped.append(False)
        if delivery_.events[0]["id"] == refused_once and not refused:
            refused.append(delivery_.webhook_id)
            return 500, {}
        return 200, {}

    clock = [utcnow()]
    first = run(gw, export["id"], clock=lambda: clock[0])
    assert first["status"] == "failed" and refused and overlapped == [True, True]
    row = state(gw, export["id"])
    # the refused one waits (with whatever other lanes had not sent when the run stopped, in event order)
    waiting = [str(event_id) for message in row.pending["messages"] for event_id in message]
    assert row.pending and refused_once in waiting, "the refused one waits"
    assert waiting == sorted(waiting, key=int), "the waiting messages keep their order"
    clock[0] = row.next_attempt_at + timedelta(seconds=1)
    second = run(gw, export["id"], clock=lambda: clock[0])
    assert second["status"] == "idle" and first["delivered"] + second["delivered"] == 24

    received = receiver.events()
    first_seen = list(dict.fromkeys(e["id"] for e in received))
    assert sorted(first_seen, key=int) == sorted((str(r.id) for r in expected), key=int), (
        "every event arrived"
    )
    assert len(received) == 24, "nothing delivered was sent again"
    assert per_subject([e for e in received]) == per_subject(
        [{"subjectType": r.subject_type, "subjectId": str(r.subject_id), "id": str(r.id)} for r in expected]
    ), "each subject's events arrived in their order"
    assert len({d.peer for d in receiver.deliveries}) <= 8 < len(receiver.deliveries), "connections reused"
    assert state(gw, export["id"]).cursor_seq == max(r.seq for r in stored_events(gw, tenant))


def stored_finding_events(gw, tenant: str) -> list:
    return [row for row in stored_events(gw, tenant) if row.subject_type == "finding"]


def test_a_send_not_recorded_is_resent_with_the_same_id(gw, receivers, monkeypatch):
    """The task dies after the receiver got the batch and before the cursor moved: the next task
    sends it again, under the same webhook-id (at least once)."""
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers()
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.created"], batchSize=10)
    receiver.secrets.append(export["secret"])
    push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{1000 + n}"]) for n in range(5)])

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed after sending")

    monkeypatch.setattr(delivery, "_record", die)
    with pytest.raises(KeyboardInterrupt):
        run(gw, export["id"])
    monkeypatch.undo()
    assert len(receiver.accepted()) == 1 and state(gw, export["id"]).pending
    assert run(gw, export["id"])["delivered"] == 5
    first, second = receiver.accepted()
    assert first.webhook_id == second.webhook_id and first.events == second.events
    assert run(gw, export["id"])["status"] == "idle" and len(receiver.accepted()) == 2


def test_410_pauses_and_resuming_catches_up(gw, receivers):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    gone = [True]
    receiver = receivers(respond=lambda d: (410, {}) if gone[0] else (200, {}))
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.*"])
    receiver.secrets.append(export["secret"])
    push(gw, tenant, headers, [finding("f-1")])
    assert run(gw, export["id"])["status"] == "paused"
    shown = gw.http.get(f"{exports_url(tenant)}/{export['id']}", headers=headers)
    assert shown.get_json()["state"] == "paused" and "410" in shown.get_json()["status"]["lastError"]
    assert run(gw, export["id"])["status"] == "busy"
    gone[0] = False
    resumed = gw.http.patch(
        f"{exports_url(tenant)}/{export['id']}",
        json={"state": "active"},
        headers=headers | {"If-Match": shown.headers["ETag"]},
    )
    assert resumed.status_code == 200 and resumed.get_json()["state"] == "active"
    assert run(gw, export["id"])["delivered"] == 1 and receiver.events()[0]["type"] == "finding.created"


# -- filters and tenants ------------------------------------------------------------------------------


def test_filters_select_types_and_subjects_and_another_tenants_events_never_arrive(gw, receivers):
    tenant, other = gw.tenant(), gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    other_headers = gw.partner("Qualys", [other], SCOPES)
    high, everything = receivers(), receivers()
    severe = create(
        gw,
        tenant,
        headers,
        high.url,
        eventTypes=["finding.*", "alert.*"],
        filter="severity ge 'high'",
        batchSize=50,
    )
    every = create(gw, tenant, headers, everything.url, batchSize=50)
    high.secrets.append(severe["secret"])
    everything.secrets.append(every["secret"])
    push(
        gw,
        tenant,
        headers,
        [
            finding(
                f"f-{n}", cves=[f"CVE-2024-{1000 + n}"], severity=("low", "medium", "high", "critical")[n % 4]
            )
            for n in range(12)
        ],
    )
    push(gw, other, other_headers, [finding("o-1", severity="critical")])
    for export in (severe, every):
        assert run(gw, export["id"])["status"] == "idle"
    got = high.events()
    assert len(got) == 6 and {e["data"]["severity"] for e in got} == {"high", "critical"}
    assert {e["type"] for e in got} == {"finding.created"}
    types = {e["type"] for e in everything.events()}
    assert {"finding.created", "recommendation.created", "batch.finished", "secureScore.changed"} <= types
    for receiver in (high, everything):
        assert {e["tenant"] for e in receiver.events()} == {tenant}
        mine = {str(r.id) for r in stored_events(gw, tenant)}
        assert {e["id"] for e in receiver.events()} <= mine

    # a finding that becomes severe later: its next event passes the filter, evaluated at delivery
    bad = gw.http.post(
        exports_url(tenant),
        json={"displayName": "x", "url": high.url, "eventTypes": ["batch.*"], "filter": "severity ge 'high'"},
        headers=headers,
    )
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalidFilter"
    bad = gw.http.post(
        exports_url(tenant),
        json={"displayName": "x", "url": high.url, "filter": "nothing eq 1"},
        headers=headers,
    )
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalidFilter"


# -- replay -------------------------------------------------------------------------------------------


def test_replay_from_an_event_id_and_from_a_time(gw, receivers):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers()
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.*"], batchSize=100)
    receiver.secrets.append(export["secret"])
    push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{1000 + n}"]) for n in range(6)])
    run(gw, export["id"])
    first_round = [e["id"] for e in receiver.events()]
    assert len(first_round) == 6
    url = f"{exports_url(tenant)}/{export['id']}/replay"
    replayed = gw.http.post(url, json={"since": first_round[3]}, headers=headers)
    assert replayed.status_code == 202 and replayed.get_json()["replay"]["fromEventId"] == first_round[3]
    run(gw, export["id"])
    assert [e["id"] for e in receiver.events()][6:] == first_round[3:]
    assert receiver.accepted()[-1].events[0]["id"] == first_round[3]

    gw.http.post(url, json={"since": "2000-01-01T00:00:00Z"}, headers=headers)
    run(gw, export["id"])
    assert [e["id"] for e in receiver.events()][9:] == first_round
    assert gw.http.post(url, json={"since": "999999999"}, headers=headers).status_code == 400
    assert gw.http.post(url, json={"since": "yesterday"}, headers=headers).status_code == 400
    assert gw.http.post(url, json={}, headers=headers).status_code == 400


# -- the API --------------------------------------------------------------------------------------------


def test_the_export_api_etags_secrets_and_ssrf(gw, receivers):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    reader = gw.partner("Qualys", [tenant], "security.read")
    receiver = receivers()
    export = create(gw, tenant, headers, receiver.url)
    one = f"{exports_url(tenant)}/{export['id']}"
    assert gw.http.get(exports_url(tenant), headers=reader).status_code == 403
    shown = gw.http.get(one, headers=headers)
    assert "secret" not in shown.get_json() and shown.get_json()["secretHint"] == export["secret"][:10] + "…"
    assert export["secret"] not in json.dumps(gw.http.get(exports_url(tenant), headers=headers).get_json())
    with gw.db.engine.connect() as conn:
        stored = conn.execute(select(DEST.c.secret).where(DEST.c.id == int(export["id"]))).scalar_one()
    assert export["secret"] not in stored and export["secret"][6:] not in stored  # encrypted at rest

    assert gw.http.patch(one, json={"displayName": "y"}, headers=headers).status_code == 428
    stale = gw.http.patch(one, json={"displayName": "y"}, headers=headers | {"If-Match": '"1.999"'})
    assert stale.status_code == 412 and stale.get_json()["error"]["code"] == "preconditionFailed"
    changed = gw.http.patch(
        one, json={"displayName": "y", "batchSize": 5}, headers=headers | {"If-Match": shown.headers["ETag"]}
    )
    assert changed.status_code == 200 and changed.get_json()["batchSize"] == 5
    assert changed.headers["ETag"] != shown.headers["ETag"]
    assert (
        gw.http.patch(
            one, json={"displayName": "z"}, headers=headers | {"If-Match": shown.headers["ETag"]}
        ).status_code
        == 412
    )
    assert gw.http.patch(one, json={"kind": "x"}, headers=headers | {"If-Match": "*"}).status_code == 400
    bad = gw.http.post(
        exports_url(tenant),
        headers=headers,
        json={"displayName": "x", "url": receiver.url, "options": {"index": "main"}},
    )
    assert bad.status_code == 400 and "options" in bad.get_json()["error"]["details"], "a webhook takes none"

    receiver.secrets.append(export["secret"])
    tested = gw.http.post(f"{one}/test", headers=headers)
    assert tested.status_code == 200
    answer = tested.get_json()
    assert (
        answer["delivered"] is True
        and answer["statusCode"] == 200
        and answer["messageId"].startswith("test_")
    )
    assert receiver.accepted()[-1].events[0]["type"] == "export.test"
    gw.http.patch(
        one,
        json={"url": f"http://127.0.0.1:{free_port()}/nothing"},
        headers=headers | {"If-Match": changed.headers["ETag"]},
    )
    down = gw.http.post(f"{one}/test", headers=headers).get_json()
    assert down["delivered"] is False and "refused" in down["error"]
    log = gw.http.get(f"{one}/deliveries", headers=headers).get_json()["value"]
    assert [d["outcome"] for d in log] == ["test", "test"] and log[1]["statusCode"] == 200

    gw.app.config["EXPORT_ALLOW_PRIVATE_TARGETS"] = False
    try:
        for url in (
            "http://127.0.0.1/x",
            "http://10.0.0.1/x",
            "http://[::1]/x",
            "http://localhost:8080/",
            "http://169.254.169.254/latest/meta-data",
            "ftp://example.com/x",
            "https://u:p@example.com/",
        ):
            refused = gw.http.post(
                exports_url(tenant), json={"displayName": "x", "url": url}, headers=headers
            )
            assert refused.status_code == 400 and "url" in refused.get_json()["error"]["details"], url
        assert (
            gw.http.post(
                exports_url(tenant),
                json={"displayName": "x", "url": "https://example.com/hook"},
                headers=headers,
            ).status_code
            == 201
        )
    finally:
        gw.app.config["EXPORT_ALLOW_PRIVATE_TARGETS"] = True

    current = gw.http.get(one, headers=headers)
    assert gw.http.delete(one, headers=headers).status_code == 428
    assert gw.http.delete(one, headers=headers | {"If-Match": '"0.0"'}).status_code == 412
    assert gw.http.delete(one, headers=headers | {"If-Match": current.headers["ETag"]}).status_code == 204
    assert gw.http.get(one, headers=headers).status_code == 404


def test_the_events_collection_pages_in_commit_order(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{1000 + n}"]) for n in range(5)])
    sequence(gw)
    url = f"/api/v1/tenants/{tenant}/security/events"
    created = gw.http.get(
        url, headers=headers, query_string={"$filter": "type eq 'finding.created'"}
    ).get_json()
    assert len(created["value"]) == 5 and all(e["subjectType"] == "finding" for e in created["value"])
    seen, last = [], 0
    while True:
        page = gw.http.get(
            url,
            headers=headers,
            query_string={"$filter": f"sequence gt {last}", "$orderby": "sequence", "$top": "4"},
        ).get_json()["value"]
        if not page:
            break
        seen += page
        last = page[-1]["sequence"]
    assert [e["id"] for e in seen] == [str(r.id) for r in stored_events(gw, tenant)]
    one = gw.http.get(f"{url}/{seen[0]['id']}", headers=headers).get_json()
    assert one == seen[0]


def test_export_cli_lists_and_replays(gw, receivers, monkeypatch):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers()
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.*"], displayName="cli-siem")
    receiver.secrets.append(export["secret"])
    push(gw, tenant, headers, [finding("f-1")])
    run(gw, export["id"])
    monkeypatch.setenv("GATEWAY_DATABASE_URL", gw.app.config["DATABASE_URL"])
    monkeypatch.setenv("GATEWAY_SECRET_KEY", SECRET)
    cli = CliRunner()
    listed = cli.invoke(main, ["export", "list", "--tenant", tenant])
    assert listed.exit_code == 0, listed.output
    assert "cli-siem" in listed.output and "active" in listed.output and receiver.url in listed.output
    first = receiver.events()[0]["id"]
    replayed = cli.invoke(
        main, ["export", "replay", "--tenant", tenant, "--id", export["id"], "--since", first]
    )
    assert replayed.exit_code == 0, replayed.output
    assert f"from event {first}" in replayed.output
    run(gw, export["id"])
    assert [e["id"] for e in receiver.events()] == [first, first]
    missing = cli.invoke(main, ["export", "replay", "--tenant", tenant, "--id", "999", "--since", first])
    assert missing.exit_code == 1 and "no export 999" in missing.output


def test_pruning_keeps_history_and_what_a_destination_still_needs(gw, receivers):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    receiver = receivers()
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.*"])
    receiver.secrets.append(export["secret"])
    push(gw, tenant, headers, [finding("f-1")])
    sequence(gw)
    later = utcnow() + timedelta(days=40)
    assert outbox.prune_events(gw.db, 30, now=later) == 0, "the destination has not passed them yet"
    run(gw, export["id"])
    assert outbox.prune_events(gw.db, 30, now=later) == 2  # batch.finished and secureScore.changed
    assert {row.subject_type for row in stored_events(gw, tenant)} == {"finding", "recommendation"}
    assert outbox.prune_events(gw.db, 30) == 0

    # a destination that stays behind past the hard cap: the export-only events go, and it shows the gap
    push(gw, tenant, headers, [finding("f-2", cves=["CVE-2024-7777"])])
    sequence(gw)
    much_later = utcnow() + timedelta(days=100)
    assert outbox.prune_events(gw.db, 30, now=much_later, max_days=0) == 0, "no cap: kept for it"
    export_only = [r for r in stored_events(gw, tenant) if r.subject_type in ("batch", "secureScore")]
    assert export_only, "the push's batch.finished"
    assert outbox.prune_events(gw.db, 30, now=much_later, max_days=90) == len(export_only)
    row = state(gw, export["id"])
    assert (
        row.last_error.startswith(f"gap: {len(export_only)} export-only events")
        and "EVENT_RETENTION_MAX_DAYS" in row.last_error
    )
    assert {row.subject_type for row in stored_events(gw, tenant)} == {"finding", "recommendation"}
    assert run(gw, export["id"])["delivered"] == 1, "the history events are all still delivered"


# -- real workers -----------------------------------------------------------------------------------------


class BeatWorker(Worker):
    """A real ``celery worker --beat`` process: the export beat task dispatches, the worker delivers."""

    def __init__(self, database_url: str, schedule_dir, extra_env: dict | None = None) -> None:
        import os
        import subprocess
        import sys

        env = dict(os.environ)
        env.update(
            {
                "GATEWAY_DATABASE_URL": database_url,
                "GATEWAY_BROKER_URL": REDIS_URL,
                "GATEWAY_TASK_QUEUE": QUEUE,
                "GATEWAY_SECRET_KEY": SECRET,
                "PYTHONPATH": str(ROOT),
                "GATEWAY_EXPORT_DISPATCH_INTERVAL": "0.5",
            }
        )
        env.update(extra_env or {})
        self.log = open(os.devnull, "w") if not os.environ.get("GATEWAY_TEST_WORKER_LOG") else None
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "worker",
                "--beat",
                "--loglevel=INFO",
                "--concurrency=2",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--schedule",
                str(schedule_dir / "beat-schedule"),
                "-n",
                f"beat-{uuid.uuid4().hex[:6]}@%h",
            ],
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log else None,
            start_new_session=True,
        )


def test_a_push_reaches_the_webhook_through_real_workers_and_survives_a_killed_delivery(
    pg_gw, redis_clean, receivers, tmp_path
):
    """Merge and delivery by real worker processes (beat included).  The first delivery's worker is
    killed while the receiver holds the request: nothing is lost, the batch comes again under the
    same webhook-id once the lease has expired."""
    gw = pg_gw
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    holding, release = threading.Event(), threading.Event()
    held: list[str] = []

    def respond(delivery_):
        if not holding.is_set():
            held.append(delivery_.webhook_id)
            holding.set()
            release.wait(30)
        return 200, {}

    receiver = receivers(respond=respond)
    export = create(gw, tenant, headers, receiver.url, eventTypes=["finding.*"], batchSize=4)
    receiver.secrets.append(export["secret"])
    env = {"GATEWAY_EXPORT_LEASE_SECONDS": "4"}
    worker = BeatWorker(gw.app.config["DATABASE_URL"], tmp_path, env)
    try:
        push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{1000 + n}"]) for n in range(10)])
        assert holding.wait(60), "the first delivery arrives"
        worker.kill()
    finally:
        release.set()
        worker.stop()
    killed_id = held[0]
    worker = BeatWorker(gw.app.config["DATABASE_URL"], tmp_path, env)
    try:
        wanted = {str(row.id) for row in stored_finding_events(gw, tenant)}

        def caught_up() -> bool:  # every event received, and the delivery recorded (other lanes may
            # have delivered theirs before the kill: receiving everything is not the end)
            if not wanted or not wanted <= {e["id"] for e in receiver.events()}:
                return False
            with gw.db.engine.connect() as conn:
                row = conn.execute(select(DEST).where(DEST.c.id == int(export["id"]))).first()
                latest = conn.execute(
                    text("SELECT max(seq) FROM lifecycle_events WHERE tenant_id = :t"), {"t": row.tenant_id}
                ).scalar()
            return row.cursor_seq == latest and row.pending is None

        wait_for(caught_up, timeout=90, interval=0.2)
    finally:
        worker.stop()
    received = receiver.events()
    assert {e["id"] for e in received} == wanted and len(wanted) == 10
    resent = [d for d in receiver.deliveries if d.verified and d.webhook_id == killed_id]
    assert len(resent) == 2 and resent[0].events == resent[1].events, (
        "the killed delivery came again, the same"
    )
    ids_of_event = defaultdict(set)
    for d in receiver.deliveries:
        for event in d.events:
            ids_of_event[event["id"]].add(d.webhook_id)
    assert all(len(ids) == 1 for ids in ids_of_event.values()), "a duplicate only under the same webhook-id"
    with gw.db.engine.connect() as conn:
        row = conn.execute(select(DEST).where(DEST.c.id == int(export["id"]))).first()
        latest = conn.execute(
            text("SELECT max(seq) FROM lifecycle_events WHERE tenant_id = :t"), {"t": row.tenant_id}
        ).scalar()
    assert row.state == "active" and row.cursor_seq == latest and row.pending is None
