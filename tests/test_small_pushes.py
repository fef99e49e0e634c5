"""Many small pushes at once (issue 14 item 4): every one accepted over a real socket and merged
by a real worker, and the small batches a worker merges in one task (gateway/smallbatches.py)
each keep their own status, counts and events, a poison one failing alone."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select, text

from gateway.models import Batch, Finding, FindingSource, LifecycleEvent, utcnow
from tests.conftest import QUEUE, REDIS_URL, ROOT, SECRET, Gateway, Worker, make_app, wait_for, wipe
from tests.factories import document, finding

PUSH = "/api/v1/tenants/{tenant}/batches?format=canonical"
FINAL = ("succeeded", "partiallySucceeded", "failed")


@pytest.fixture
def lazy_gw(store_url, redis_clean):
    """An app on each store whose pushes are queued in Redis for a worker the test starts."""
    app = make_app(store_url, eager=False)
    wipe(app.extensions["gateway.db"])
    yield Gateway(app)
    app.extensions["gateway.db"].dispose()


def _batches(gw: Gateway) -> dict[int, Batch]:
    with gw.db.read_sessions() as session:
        return {batch.id: batch for batch in session.scalars(select(Batch))}


def _all_final(gw: Gateway, count: int) -> dict[int, Batch]:
    rows = _batches(gw)
    return rows if len(rows) == count and all(b.status in FINAL for b in rows.values()) else {}


def _small(batch: int, size: int = 10, **fields) -> bytes:
    """A push of ``size`` findings, one host and ``size`` CVEs of its own."""
    return document([finding(f"b{batch}-f{j}", host=f"h{batch}.example.com",
                             cves=[f"CVE-2024-{100000 + batch * 100 + j}"], **fields) for j in range(size)])


def _coalesced(output: str) -> list[str]:
    return [line for line in output.splitlines() if "merged in the task of batch" in line]


def _documented_api_command(port: int) -> list[str]:
    """The README's production command for the API, bound to a loopback port."""
    lines = (ROOT / "README.md").read_text().splitlines()
    line = next(line for line in lines if line.startswith("gunicorn "))
    args = shlex.split(line.split("#", 1)[0])
    assert "gthread" in args and int(args[args.index("--threads") + 1]) > 1  # threaded, as documented
    args[args.index("-b") + 1] = f"127.0.0.1:{port}"
    return [sys.executable, "-m", *args]


class DocumentedApi:
    """The API under the README's gunicorn command (threaded workers) on a loopback port."""

    def __init__(self, database_url: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, GATEWAY_DATABASE_URL=database_url, GATEWAY_BROKER_URL=REDIS_URL,
                   GATEWAY_TASK_QUEUE=QUEUE, GATEWAY_SECRET_KEY=SECRET, GATEWAY_ISSUER=self.url,
                   PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(_documented_api_command(port), env=env, cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)

        def up() -> bool:
            try:
                return requests.get(f"{self.url}/healthz", timeout=30).status_code == 200
            except (requests.ConnectionError, requests.Timeout):
                assert self.process.poll() is None, "gunicorn stopped"
                return False

        try:
            wait_for(up, timeout=120, interval=0.2)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def test_many_small_concurrent_pushes_to_the_documented_api_are_all_accepted_and_merged(lazy_gw):
    gw = lazy_gw
    tenant = gw.tenant()
    clients = [gw.partner(f"Scanner {n}", [tenant]) for n in range(5)]
    pushes = 100
    api = DocumentedApi(gw.app.config["DATABASE_URL"])
    worker = Worker(gw.app.config["DATABASE_URL"], concurrency=2)
    try:
        def client(index: int) -> list[requests.Response]:
            session = requests.Session()  # keep-alive, as a scanner's client would
            headers = clients[index % len(clients)] | {"Content-Type": "application/json"}
            return [session.post(f"{api.url}{PUSH.format(tenant=tenant)}", data=_small(number),
                                 headers=headers, timeout=60) for number in range(index, pushes, 20)]

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = [answer for answers in pool.map(client, range(20)) for answer in answers]
        refused = [a.text for a in answers if a.status_code != 202]
        assert [a.status_code for a in answers] == [202] * pushes, refused
        ids = {int(a.json()["id"]) for a in answers}
        assert len(ids) == pushes
        batches = wait_for(lambda: _all_final(gw, pushes), timeout=300, interval=0.5)
    finally:
        worker.stop()
        api.stop()
    assert set(batches) == ids
    for batch in batches.values():
        assert batch.status == "succeeded", (batch.id, batch.error)
        assert batch.counts["received"] == 10 and batch.counts["created"] == 10, batch.counts
        assert batch.counts["rejected"] == 0 and batch.attempts == 1
    with gw.db.read_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Finding)) == pushes * 10
        sources = dict(session.execute(select(FindingSource.batch_id, func.count())
                                       .group_by(FindingSource.batch_id)).all())
    assert sources == dict.fromkeys(ids, 10)  # each batch's ten, none doubled


def _start_worker_and_wait(gw: Gateway, count: int, capfd, monkeypatch) -> tuple[dict[int, Batch], str]:
    """One worker process (one at a time) takes the queued tasks; its log is returned."""
    monkeypatch.setenv("GATEWAY_TEST_WORKER_LOG", "1")  # the worker's log goes to this test's stderr
    capfd.readouterr()
    worker = Worker(gw.app.config["DATABASE_URL"], concurrency=1,
                    extra_env={"GATEWAY_LOG_FORMAT": "text", "GATEWAY_SMALL_BATCHES_PER_TASK": "20"})
    output = ""
    try:
        batches = wait_for(lambda: _all_final(gw, count), timeout=180, interval=0.3)
        # A batch merged in another batch's task is final (committed) a moment before that task
        # logs it: let the log catch up with the statuses before the worker is stopped (the log
        # is what the tests count; the statuses are already final).
        deadline = time.monotonic() + 30
        while len(_coalesced(output)) < count - 1 and time.monotonic() < deadline:
            captured = capfd.readouterr()
            output += captured.out + captured.err
            time.sleep(0.2)
    finally:
        worker.stop()
    captured = capfd.readouterr()
    return batches, output + captured.out + captured.err


def test_coalesced_small_batches_keep_their_own_status_counts_and_events(lazy_gw, capfd, monkeypatch):
    gw = lazy_gw
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant]) | {"Content-Type": "application/json"}
    bad = finding("b2-bad", host="h2.example.com", severity="dreadful")
    bodies = [
        _small(0),  # created 10
        _small(0, severity="low", ts="2024-05-01T00:00:00Z"),  # the same 10, newer: updated 10
        document([*json.loads(_small(2, size=9))["findings"], bad]),  # 9 created, 1 rejected
        _small(0, severity="critical", ts="2024-01-01T00:00:00Z"),  # older than what is stored: stale 10
        _small(0, status="fixed", ts="2024-06-01T00:00:00Z"),  # resolved 10
        _small(5, size=3),  # created 3
    ]
    ids = []
    for body in bodies:  # queued before any worker runs: the first task finds the rest waiting
        answer = gw.http.post(PUSH.format(tenant=tenant), data=body, headers=headers)
        assert answer.status_code == 202, answer.get_json()
        ids.append(int(answer.get_json()["id"]))
    batches, output = _start_worker_and_wait(gw, len(bodies), capfd, monkeypatch)

    merged_here = _coalesced(output)
    assert len(merged_here) == len(bodies) - 1, output[-3000:]  # all but the first, in the first's task
    assert all(f"in the task of batch {ids[0]}" in line for line in merged_here)
    expected = [
        ("succeeded", {"received": 10, "created": 10}),
        ("succeeded", {"received": 10, "updated": 10}),
        ("partiallySucceeded", {"received": 10, "created": 9, "rejected": 1}),
        ("succeeded", {"received": 10, "stale": 10}),
        ("succeeded", {"received": 10, "updated": 10, "resolved": 10}),
        ("succeeded", {"received": 3, "created": 3}),
    ]
    for batch_id, (status, counts) in zip(ids, expected, strict=True):
        batch = batches[batch_id]
        assert batch.status == status, (batch_id, batch.error)
        named = {key: batch.counts.get(key, 0) for key in counts}
        others = {key: value for key, value in batch.counts.items() if key not in counts and value}
        assert named == counts and not others, batch.counts
        assert batch.attempts == 1 and batch.lease_owner is None and batch.finished_at is not None
    assert batches[ids[2]].rejections[0]["providerId"] == "b2-bad"
    with gw.db.read_sessions() as session:
        assert session.scalar(select(func.count()).select_from(Finding)) == 10 + 9 + 3
        finished = session.execute(select(LifecycleEvent.subject_id, func.count())
                                   .where(LifecycleEvent.subject_type == "batch",
                                          LifecycleEvent.event == "finished")
                                   .group_by(LifecycleEvent.subject_id)).all()
        created = dict(session.execute(select(LifecycleEvent.batch_id, func.count())
                                       .where(LifecycleEvent.subject_type == "finding",
                                              LifecycleEvent.event == "new")
                                       .group_by(LifecycleEvent.batch_id)).all())
        resolved = dict(session.execute(select(LifecycleEvent.batch_id, func.count())
                                        .where(LifecycleEvent.subject_type == "finding",
                                               LifecycleEvent.event == "resolved")
                                        .group_by(LifecycleEvent.batch_id)).all())
    assert sorted(finished) == sorted((i, 1) for i in ids)  # each batch's own batch.finished, once
    assert created == {ids[0]: 10, ids[2]: 9, ids[5]: 3}  # each finding's "new" event names its batch
    assert resolved == {ids[4]: 10}


@pytest.fixture
def poison_trigger(lazy_gw):
    """A store-side refusal no record check foresees: inserting a finding titled 'poison' raises."""
    db = lazy_gw.db
    with db.engine.begin() as conn:
        if db.is_postgres:
            conn.execute(text("CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS "
                              "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"))
            conn.execute(text("CREATE TRIGGER refuse_poison BEFORE INSERT ON findings FOR EACH ROW "
                              "WHEN (NEW.title = 'poison') EXECUTE FUNCTION refuse_poison()"))
        else:
            conn.execute(text("CREATE TRIGGER refuse_poison BEFORE INSERT ON findings "
                              "WHEN NEW.title = 'poison' "
                              "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"))
    yield
    with db.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_poison" + (" ON findings" if db.is_postgres else "")))
        if db.is_postgres:
            conn.execute(text("DROP FUNCTION refuse_poison()"))


def test_a_poison_batch_in_a_coalesced_group_fails_alone(lazy_gw, poison_trigger, capfd, monkeypatch):
    gw = lazy_gw
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant]) | {"Content-Type": "application/json"}
    bodies = [_small(0), _small(1), _small(2, title="poison"), _small(3), _small(4)]
    ids = [int(gw.http.post(PUSH.format(tenant=tenant), data=body, headers=headers).get_json()["id"])
           for body in bodies]
    batches, output = _start_worker_and_wait(gw, len(bodies), capfd, monkeypatch)

    assert len(_coalesced(output)) == len(bodies) - 1, output[-3000:]
    poison = batches[ids[2]]
    assert poison.status == "failed" and "reference" in poison.error
    assert "refused by the test" not in poison.error  # nothing internal
    assert poison.attempts == 1 and poison.lease_owner is None
    for batch_id in ids[:2] + ids[3:]:
        batch = batches[batch_id]
        assert batch.status == "succeeded" and batch.counts["created"] == 10, (batch_id, batch.error)
    with gw.db.read_sessions() as session:
        sources = session.execute(select(FindingSource.batch_id, func.count())
                                  .group_by(FindingSource.batch_id)).all()
    assert dict(sources) == {batch_id: 10 for batch_id in ids if batch_id != ids[2]}  # nothing of the poison


def test_a_worker_killed_mid_group_loses_and_doubles_nothing(pg_url, redis_clean, capfd, monkeypatch):
    """PostgreSQL: the worker dies while merging the third batch of a group; the two before it
    stay merged once, the one it held is merged again once its lease expires, the rest by
    the sweep's tasks (pushed while the first one's pending mark was set, they sent none)."""
    from workers.tasks import requeue

    app = make_app(pg_url, eager=False)
    gw = Gateway(app)
    wipe(gw.db)
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant]) | {"Content-Type": "application/json"}
    with gw.db.engine.begin() as conn:  # the third batch's merge stalls inside the store
        conn.execute(text("CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS "
                          "$$ BEGIN PERFORM pg_sleep(120); RETURN NEW; END $$"))
        conn.execute(text("CREATE TRIGGER stall BEFORE INSERT ON findings FOR EACH ROW "
                          "WHEN (NEW.title = 'stall') EXECUTE FUNCTION stall()"))
    first = None
    try:
        bodies = [_small(0), _small(1), _small(2, title="stall"), _small(3), _small(4)]
        ids = [int(gw.http.post(PUSH.format(tenant=tenant), data=body, headers=headers).get_json()["id"])
               for body in bodies]
        first = Worker(pg_url, concurrency=1, extra_env={"GATEWAY_LEASE_SECONDS": "3"})
        wait_for(lambda: _batches(gw)[ids[2]].status == "processing", timeout=120, interval=0.1)
        before = _batches(gw)
        expected = ["succeeded", "succeeded", "processing", "accepted", "accepted"]
        assert [before[i].status for i in ids] == expected
        first.kill()
        # the dead worker's stalled statement ends with it: its backend (which holds the findings
        # table's lock until it notices) is ended first, else DROP TRIGGER waits behind it
        def stalled_gone() -> bool:
            with gw.db.engine.begin() as conn:
                return not conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND query LIKE 'INSERT INTO findings%' AND state = 'active'"
                )).all()

        wait_for(stalled_gone, timeout=30, interval=0.2)
        with gw.db.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER stall ON findings"))
            conn.execute(text("DROP FUNCTION stall()"))
        wait_for(lambda: _batches(gw)[ids[2]].lease_expires_at < utcnow(), timeout=30, interval=0.2)
        with app.app_context():
            requeue(gw.db, older_than_seconds=0)  # the sweep, as beat runs it
        second = Worker(pg_url, concurrency=1)
        try:
            batches = wait_for(lambda: _all_final(gw, len(ids)), timeout=180, interval=0.3)
        finally:
            second.stop()
    finally:
        if first is not None:
            first.kill()
        with gw.db.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS stall ON findings"))
            conn.execute(text("DROP FUNCTION IF EXISTS stall()"))
        app.extensions["gateway.db"].dispose()
    for batch_id in ids:
        batch = batches[batch_id]
        assert batch.status == "succeeded" and batch.counts["created"] == 10, (batch_id, batch.counts)
        assert batch.attempts == (2 if batch_id == ids[2] else 1)
    assert before[ids[0]].counts == batches[ids[0]].counts and before[ids[1]].counts == batches[ids[1]].counts
    with gw.db.read_sessions() as session:
        sources = dict(session.execute(select(FindingSource.batch_id, func.count())
                                       .group_by(FindingSource.batch_id)).all())
        finished = session.scalar(select(func.count()).select_from(LifecycleEvent)
                                  .where(LifecycleEvent.subject_type == "batch"))
    gw.db.dispose()
    assert sources == dict.fromkeys(ids, 10) and finished == len(ids)


def test_pushes_while_a_task_of_the_tenant_is_on_its_way_send_none_and_are_all_merged(lazy_gw, redis_clean):
    """One task for many small pushes (gateway/smallbatches.py, pending mark): the first push of a
    tenant sends a task, those after it while it waits send none; the task claims them all, and a
    group cut at SMALL_BATCHES_PER_TASK sends one more task for the rest (whose own batch is then
    merged already: it still claims)."""
    gw = lazy_gw
    for key in redis_clean.scan_iter(match=f"gateway:small-batches-pending:{QUEUE}:*"):
        redis_clean.delete(key)  # an earlier test's (its task never ran)
    tenant = gw.tenant()
    other = gw.tenant("other")
    headers = gw.partner("Qualys", [tenant, other]) | {"Content-Type": "application/json"}
    ids = [int(gw.http.post(PUSH.format(tenant=tenant), data=_small(n), headers=headers).get_json()["id"])
           for n in range(8)]
    ids.append(int(gw.http.post(PUSH.format(tenant=other), data=_small(8), headers=headers).get_json()["id"]))
    publisher = gw.app.extensions.get("gateway.publisher")
    assert publisher is not None and publisher.flush(30)
    assert redis_clean.llen(QUEUE) == 2  # one task for the first tenant's eight pushes, one for the other's
    marks = list(redis_clean.scan_iter(match=f"gateway:small-batches-pending:{QUEUE}:*"))
    assert len(marks) == 2
    worker = Worker(gw.app.config["DATABASE_URL"], concurrency=1,
                    extra_env={"GATEWAY_SMALL_BATCHES_PER_TASK": "3"})
    try:
        batches = wait_for(lambda: _all_final(gw, len(ids)), timeout=180, interval=0.3)
        # The task that merged the last batches sends one more after its last commit (it claimed
        # some); that one finds nothing and releases the tenant's mark.  So every mark is gone
        # once the worker is idle (no mark, no task queued, twice half a second apart), not at
        # the moment the last batch is final, and well before the marks' 60 s expiry.
        def idle() -> bool:
            return (not list(redis_clean.scan_iter(match=f"gateway:small-batches-pending:{QUEUE}:*"))
                    and redis_clean.llen(QUEUE) == 0)

        assert wait_for(lambda: idle() and (time.sleep(0.5) or idle()), timeout=30, interval=0.2)
    finally:
        worker.stop()
    for batch_id in ids:
        batch = batches[batch_id]
        assert batch.status == "succeeded" and batch.counts["created"] == 10, (batch_id, batch.error)
        assert batch.attempts == 1 and batch.lease_owner is None
    with gw.db.read_sessions() as session:
        sources = dict(session.execute(select(FindingSource.batch_id, func.count())
                                       .group_by(FindingSource.batch_id)).all())
    assert sources == dict.fromkeys(ids, 10)


def test_a_failed_send_releases_the_pending_mark(lazy_gw, redis_clean, monkeypatch):
    """The broker refuses the task: the batch is left to the sweep (``enqueued_at`` cleared) and
    the tenant's mark is released, so the next push sends a task again."""
    from workers import tasks

    gw = lazy_gw
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant]) | {"Content-Type": "application/json"}
    marks = f"gateway:small-batches-pending:{QUEUE}:*"

    def refuse(*args, **kwargs):
        raise ConnectionError("the broker is down (the test)")

    for key in redis_clean.scan_iter(match=marks):  # an earlier test's (its task never ran)
        redis_clean.delete(key)
    monkeypatch.setattr(gw.app.extensions["celery"].tasks[tasks.PROCESS_BATCH], "apply_async", refuse)
    first = int(gw.http.post(PUSH.format(tenant=tenant), data=_small(0), headers=headers).get_json()["id"])
    assert gw.app.extensions["gateway.publisher"].flush(30)
    assert _batches(gw)[first].enqueued_at is None  # the sweep's
    assert not list(redis_clean.scan_iter(match=marks)) and redis_clean.llen(QUEUE) == 0
    monkeypatch.undo()
    second = int(gw.http.post(PUSH.format(tenant=tenant), data=_small(1), headers=headers).get_json()["id"])
    assert gw.app.extensions["gateway.publisher"].flush(30)
    left = list(redis_clean.scan_iter(match=marks))
    for key in left:
        redis_clean.delete(key)
    assert redis_clean.llen(QUEUE) == 1 and len(left) == 1
    assert _batches(gw)[second].enqueued_at is not None


def test_the_pool_keeps_the_connections_a_peak_opened(pg_app):
    """Eight request threads' connections at once are all kept when returned (gateway/db.py): the
    next peak opens none (with 5 plus 10 overflow, three were closed and opened again each time)."""
    from sqlalchemy import event

    engine = pg_app.extensions["gateway.db"].engine
    engine.dispose()
    opened = []

    def count(*_):
        opened.append(1)

    event.listen(engine, "connect", count)
    try:
        for _ in range(2):
            held = [engine.connect() for _ in range(8)]
            for conn in held:
                assert conn.execute(text("SELECT 1")).scalar() == 1
                conn.close()
        assert len(opened) == 8 and engine.pool.checkedin() == 8
    finally:
        event.remove(engine, "connect", count)
        engine.dispose()


def test_a_connection_is_pinged_only_after_it_sat_idle(pg_app, monkeypatch):
    """No round trip before a transaction on a connection returned a moment ago (the pre-ping was
    12% of a small push's time); one idle longer than PING_AFTER_IDLE_SECONDS is pinged."""
    from gateway import db as db_module

    engine = pg_app.extensions["gateway.db"].engine
    pings = []
    real_ping = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda conn: pings.append(1) or real_ping(conn))
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_SECONDS", 0.3, raising=False)
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    assert pings == []  # opened by the first, then used a moment ago each time
    time.sleep(0.5)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert pings == [1]


def test_a_backend_ended_while_idle_does_not_fail_the_next_push(pg_app, pg_url):
    """A connection whose backend was ended (pg_terminate_backend: a restarted server, an idle
    timeout, a dropped link) while it sat in the pool is found dead by the ping on checkout and
    replaced: the next push is accepted and stored."""
    import psycopg

    gw = Gateway(pg_app)
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant]) | {"Content-Type": "application/json"}
    first = gw.http.post(PUSH.format(tenant=tenant), data=_small(0), headers=headers)
    assert first.status_code == 202, first.get_json()
    assert pg_app.extensions["gateway.publisher"].flush(30)
    from gateway import db as db_module

    time.sleep(getattr(db_module, "PING_AFTER_IDLE_SECONDS", 1.0) + 0.3)
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'idle'"
        ).fetchone()[0]
    assert ended >= 1  # the pool's connection(s)
    second = gw.http.post(PUSH.format(tenant=tenant), data=_small(1), headers=headers)
    assert second.status_code == 202, second.get_json()
    assert int(second.get_json()["id"]) in _batches(gw)
