"""Operating the gateway: metrics, readiness, JSON logs with ids, settings checked at start."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway import create_app, logs
from gateway.config import ConfigError, load_config
from tests.conftest import QUEUE, REDIS_URL, SECRET, make_app, wait_for

DOCUMENT = {"findings": [
    {"id": "f-1", "resource": {"hostname": "web-1"}, "title": "xz", "severity": "critical",
     "cves": ["CVE-2024-3094"]},
    {"id": "f-2", "resource": {"hostname": "web-2"}, "title": "tls", "severity": "low",
     "cves": ["CVE-2024-0001"]},
    {"id": "f-3", "resource": {}, "title": "no resource"},
]}


def scrape(http, **kwargs) -> dict[tuple[str, tuple], float]:
    response = http.get("/metrics", **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    values = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(values, name, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def push(gw, tenant, headers, request_id=None):
    extra = {"X-Request-Id": request_id} if request_id else {}
    return gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical", data=json.dumps(DOCUMENT),
                        content_type="application/json", headers=headers | extra)


# ---- metrics ---------------------------------------------------------------------------------


def test_the_metrics_move_after_a_push(gw):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant])
    before = scrape(gw.http)
    response = push(gw, tenant, headers)
    assert response.status_code == 202
    after = scrape(gw.http)
    route = "/api/v1/tenants/<tenant>/batches"
    requests = dict(method="POST", route=route, status="202")
    assert value(after, "gateway_http_requests_total", **requests) == \
        value(before, "gateway_http_requests_total", **requests) + 1
    assert value(after, "gateway_http_request_duration_seconds_count", **requests) == \
        value(before, "gateway_http_request_duration_seconds_count", **requests) + 1
    assert value(after, "gateway_batches", status="partiallySucceeded", format="canonical") + \
        value(after, "gateway_batches", status="succeeded", format="canonical") == 1
    assert value(after, "gateway_records_merged_total", format="canonical") == \
        value(before, "gateway_records_merged_total", format="canonical") + 2
    assert value(after, "gateway_records_rejected_total", format="canonical") == \
        value(before, "gateway_records_rejected_total", format="canonical") + 1
    assert value(after, "gateway_merge_duration_seconds_count", format="canonical") == \
        value(before, "gateway_merge_duration_seconds_count", format="canonical") + 1
    assert value(after, "gateway_oldest_open_batch_age_seconds") == 0
    assert ("gateway_queue_depth", (("queue", QUEUE),)) in after
    # the route is the URL rule, never the raw path (no tenant ids in label values)
    assert not [key for key in after if tenant in str(key)]


def test_the_oldest_open_batch_ages(pg_gw, redis_clean):
    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Contoso", [tenant])
    assert push(pg_gw, tenant, headers).status_code == 202  # not eager: it waits in the queue
    time.sleep(1.1)
    values = scrape(pg_gw.http)
    assert value(values, "gateway_batches", status="accepted", format="canonical") == 1
    assert value(values, "gateway_oldest_open_batch_age_seconds") >= 1
    assert value(values, "gateway_queue_depth", queue=QUEUE) == 1


def test_the_metrics_are_for_loopback_or_the_configured_token(sqlite_url):
    app = make_app(sqlite_url, eager=True)
    http = app.test_client()
    assert http.get("/metrics").status_code == 200
    far = http.get("/metrics", environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert far.status_code == 403 and "GATEWAY_METRICS_TOKEN" in far.get_json()["error"]["message"]
    assert http.get("/metrics", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    app.extensions["gateway.db"].dispose()

    app = make_app(sqlite_url, eager=True, METRICS_TOKEN="s3cret-metrics")
    http = app.test_client()
    assert http.get("/metrics").status_code == 401  # a token is configured: loopback is not enough
    assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    far = {"REMOTE_ADDR": "10.1.2.3"}
    ok = http.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics"}, environ_base=far)
    assert ok.status_code == 200 and b"gateway_http_requests_total" in ok.data
    app.extensions["gateway.db"].dispose()


# ---- readiness -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_readyz_names_the_broker_when_it_is_down(pg_url):
    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        broker = f"redis://127.0.0.1:{port}/0"
        wait_for(lambda: _pings(broker), timeout=10)
        app = make_app(pg_url, eager=False, BROKER_URL=broker)
        http = app.test_client()
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.get_json()
        assert ready.get_json() == {"status": "ready", "checks": {"database": "up", "migrations": "current",
                                                                  "broker": "up"}}
        assert http.get("/healthz").status_code == 200
        server.terminate()
        server.wait(timeout=10)
        started = time.monotonic()
        down = http.get("/readyz")
        assert time.monotonic() - started < 5
        assert down.status_code == 503
        assert down.get_json() == {"status": "unavailable", "failed": ["broker"],
                                   "checks": {"database": "up", "migrations": "current", "broker": "down"}}
        assert http.get("/healthz").status_code == 200  # liveness is not readiness
        app.extensions["gateway.db"].dispose()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _pings(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.RedisError:
        return False


def test_readyz_names_a_store_behind_its_migrations(tmp_path):
    from gateway.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    upgrade(url, "0001")
    app = make_app(url, eager=True)
    body = app.test_client().get("/readyz")
    assert body.status_code == 503
    assert body.get_json()["failed"] == ["migrations"]
    assert body.get_json()["checks"]["migrations"].startswith("behind (0001")
    app.extensions["gateway.db"].dispose()


# ---- logs ------------------------------------------------------------------------------------


def test_every_line_of_a_push_and_its_merge_carries_the_request_and_batch_ids(gw, caplog):
    tenant = gw.tenant()
    headers = gw.partner("Contoso", [tenant])
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    response = push(gw, tenant, headers, request_id="push-42.abc")
    assert response.status_code == 202
    assert response.headers["X-Request-Id"] == "push-42.abc"
    batch_id = response.get_json()["id"]
    records = [r for r in caplog.records if r.name.startswith(("gateway", "workers", "celery"))]
    assert any(r.name.startswith("workers") for r in records)  # the (eager) worker's lines are in
    for record in records:
        assert record.request_id == "push-42.abc", record.getMessage()
        assert record.batch_id == batch_id, record.getMessage()
        assert record.tenant == tenant
    merged = [r for r in records if "merged" in r.getMessage()]
    assert merged and merged[0].client_id is not None
    # outside the request, no ids are left behind
    after = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert logs.get("request_id") is None and logs.get("batch_id") is None and after


def test_a_bad_request_id_is_replaced_and_a_missing_one_generated(gw):
    for sent in (None, "has space", "x" * 129, "caf\u00e9"):
        headers = {"X-Request-Id": sent} if sent else {}
        answer = gw.http.get("/healthz", headers=headers).headers["X-Request-Id"]
        assert answer != sent and len(answer) == 32 and logs.valid_request_id(answer)


def test_the_json_format_puts_the_ids_on_each_line():
    factory = logging.getLogRecordFactory()
    with logs.context(request_id="r-1", batch_id=7):
        record = factory("gateway.x", logging.INFO, __file__, 1, "merged %s", ("b",), None)
    line = json.loads(logs.formatter("json").format(record))
    assert line["message"] == "merged b" and line["request_id"] == "r-1" and line["batch_id"] == "7"
    assert line["level"] == "INFO" and line["logger"] == "gateway.x" and "tenant" not in line
    assert "[r-1 7]" in logs.formatter("text").format(record)


# ---- settings --------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    import os

    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_HOME", str(tmp_path / "home"))
    return monkeypatch


def test_a_bad_integer_is_named(clean_env):
    clean_env.setenv("GATEWAY_MAX_ATTEMPTS", "abc")
    with pytest.raises(ConfigError) as raised:
        load_config()
    assert str(raised.value) == "GATEWAY_MAX_ATTEMPTS must be an integer, got 'abc'"
    clean_env.delenv("GATEWAY_MAX_ATTEMPTS")
    with pytest.raises(ConfigError) as raised:
        load_config({"MERGE_CHUNK_SIZE": "many"})
    assert str(raised.value) == "MERGE_CHUNK_SIZE must be an integer, got 'many'"
    clean_env.setenv("GATEWAY_MAX_ATTEMPTS", "7")
    clean_env.setenv("GATEWAY_TASK_ALWAYS_EAGER", "yes")
    clean_env.setenv("GATEWAY_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError) as raised:
        load_config()
    assert str(raised.value) == "GATEWAY_LOG_FORMAT must be 'json' or 'text', got 'xml'"
    clean_env.setenv("GATEWAY_LOG_FORMAT", "json")
    config = load_config()
    assert config["MAX_ATTEMPTS"] == 7 and config["TASK_ALWAYS_EAGER"] is True


def test_unknown_names_are_warned_one_line_each(clean_env, caplog, sqlite_url):
    clean_env.setenv("GATEWAY_MAX_ATEMPTS", "3")
    clean_env.setenv("GATEWAY_BROKER", "redis://x")
    caplog.set_level(logging.WARNING, logger="gateway")
    create_app({"DATABASE_URL": sqlite_url, "BROKER_URL": REDIS_URL, "SECRET_KEY": SECRET})
    warned = [r.getMessage() for r in caplog.records if "unknown setting" in r.getMessage()]
    assert warned == ["unknown setting GATEWAY_BROKER ignored (see the README's settings table)",
                      "unknown setting GATEWAY_MAX_ATEMPTS ignored (see the README's settings table)"]


def test_production_needs_a_secret_key_and_an_issuer(clean_env, pg_url):
    clean_env.setenv("GATEWAY_DATABASE_URL", pg_url)
    clean_env.setenv("GATEWAY_BROKER_URL", REDIS_URL)
    with pytest.raises(ConfigError) as raised:
        create_app()
    assert str(raised.value) == "production (a PostgreSQL store) needs GATEWAY_SECRET_KEY and GATEWAY_ISSUER"
    clean_env.setenv("GATEWAY_SECRET_KEY", SECRET)
    with pytest.raises(ConfigError) as raised:
        create_app()
    assert str(raised.value) == "production (a PostgreSQL store) needs GATEWAY_ISSUER"
    create_app(role="worker").extensions["gateway.db"].dispose()  # a worker issues no tokens
    clean_env.setenv("GATEWAY_ISSUER", "https://gw.example.com")
    app = create_app()
    assert app.config["LOG_FORMAT"] == "json"  # the production default
    app.extensions["gateway.db"].dispose()


def test_a_worker_refuses_a_private_embedded_store(clean_env):
    clean_env.setenv("GATEWAY_BROKER_URL", REDIS_URL)
    with pytest.raises(ConfigError) as raised:
        create_app(role="worker")
    assert "would merge into a private SQLite store" in str(raised.value)
    assert "set GATEWAY_DATABASE_URL" in str(raised.value)
    clean_env.delenv("GATEWAY_BROKER_URL")  # the embedded broker: API and worker share the home
    create_app(role="worker").extensions["gateway.db"].dispose()


def test_api_and_worker_say_what_they_use_with_secrets_masked(clean_env, pg_url, caplog):
    clean_env.setenv("GATEWAY_DATABASE_URL", pg_url)
    clean_env.setenv("GATEWAY_BROKER_URL", "redis://:hunter2@127.0.0.1:6379/5")
    clean_env.setenv("GATEWAY_SECRET_KEY", SECRET)
    clean_env.setenv("GATEWAY_ISSUER", "https://gw.example.com")
    caplog.set_level(logging.INFO, logger="gateway")
    for role in ("api", "worker"):
        create_app(role=role).extensions["gateway.db"].dispose()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("gateway ")]
    host = "PostgreSQL 127.0.0.1:5432/" + pg_url.rsplit("/", 1)[1]
    assert lines == [f"gateway {role}: store {host}, broker redis://:***@127.0.0.1:6379/5, queue gateway, "
                     "logs json" for role in ("api", "worker")]
    assert not [r for r in caplog.records if "hunter2" in r.getMessage()]


def test_a_real_worker_logs_json_lines_with_the_pushs_request_id(pg_gw, redis_clean, tmp_path):
    from gateway.models import Batch
    from tests.test_pipeline import _logged_worker, _stop

    process, log = _logged_worker(pg_gw.app.config["DATABASE_URL"], tmp_path / "worker.log", concurrency=1)
    try:
        tenant = pg_gw.tenant()
        headers = pg_gw.partner("Contoso", [tenant])
        response = push(pg_gw, tenant, headers, request_id="real-worker-1")
        batch_id = response.get_json()["id"]

        def finished():
            with pg_gw.db.sessions() as session:
                return session.get(Batch, int(batch_id)).status not in ("accepted", "processing")

        wait_for(finished, timeout=60)
        wait_for(lambda: "merged" in (tmp_path / "worker.log").read_text(), timeout=10)
    finally:
        _stop(process, log)
    lines = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()
             if line.startswith("{")]
    assert lines, (tmp_path / "worker.log").read_text()[-2000:]
    assert lines[0]["message"].startswith("gateway worker: store PostgreSQL")
    of_batch = [line for line in lines if line.get("batch_id") == batch_id]
    assert [line["message"] for line in of_batch if line["logger"] == "workers.tasks"] == \
        [f"batch {batch_id} merged: partiallySucceeded"]
    assert all(line["request_id"] == "real-worker-1" for line in of_batch)


def test_the_celery_worker_refuses_a_private_store_with_one_line(tmp_path):
    import os
    import sys

    from tests.conftest import ROOT

    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    env.update(GATEWAY_HOME=str(tmp_path), GATEWAY_BROKER_URL=REDIS_URL, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app", "worker"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"gateway worker: this worker takes tasks from {REDIS_URL} but would merge into a "
        "private SQLite store")
    assert "Traceback" not in result.stderr
