"""Rate limits and quotas: 429 with Retry-After and RateLimit-* fields, counters shared by API
processes through Redis, push bytes per minute, the token endpoint's lockout."""

from __future__ import annotations

import base64
import time
import uuid

import pytest

from gateway.config import Settings
from tests.conftest import REDIS_URL, Gateway, make_app, wipe
from tests.factories import document, finding

BODY = document([finding("f-1")])
SIZE = len(BODY)


@pytest.fixture
def limited(pg_url):
    """Build apps on PostgreSQL with rate limits on, counting in Redis under a fresh prefix."""
    prefix = f"gw-test-{uuid.uuid4().hex[:8]}"
    apps = []

    def build(**overrides):
        config = {"RATELIMIT_ENABLED": True, "RATELIMIT_STORAGE_URL": REDIS_URL,
                  "RATELIMIT_KEY_PREFIX": prefix}
        config.update(overrides)
        app = make_app(pg_url, eager=True, **config)
        if not apps:
            wipe(app.extensions["gateway.db"])
        apps.append(app)
        return Gateway(app)

    yield build
    for app in apps:
        app.extensions["gateway.db"].dispose()


def push(gw: Gateway, tenant: str, headers: dict, body: bytes = BODY):
    return gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical", data=body,
                        headers={**headers, "Content-Type": "application/json"})


def read(gw: Gateway, tenant: str, headers: dict):
    return gw.http.get(f"/api/v1/tenants/{tenant}/batches", headers=headers)


def assert_limited(response, code="tooManyRequests"):
    assert response.status_code == 429, response.get_json()
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["RateLimit-Remaining"] == "0"
    assert int(response.headers["RateLimit-Reset"]) >= 1
    assert response.get_json()["error"]["code"] == code


def test_limits_are_on_by_default_in_production_and_off_in_tests(gw):
    assert Settings.model_fields["ratelimit_enabled"].default is True
    assert gw.app.config["RATELIMIT_ENABLED"] is False
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    for _ in range(5):
        assert "RateLimit-Limit" not in read(gw, tenant, headers).headers


def test_reads_answer_429_after_the_limit_with_retry_after(limited):
    gw = limited(RATELIMIT_READ="3/hour")
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    remaining = []
    for _ in range(3):
        response = read(gw, tenant, headers)
        assert response.status_code == 200
        assert response.headers["RateLimit-Limit"] == "3"
        assert 3000 < int(response.headers["RateLimit-Reset"]) <= 3600
        remaining.append(response.headers["RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    response = read(gw, tenant, headers)
    assert_limited(response)
    assert 3000 < int(response.headers["Retry-After"]) <= 3600
    assert "try again in" in response.get_json()["error"]["message"]
    # Another client is counted apart.
    assert read(gw, tenant, gw.partner("Tenable", [tenant])).status_code == 200


def test_reads_and_pushes_are_limited_separately(limited):
    gw = limited(RATELIMIT_READ="2/hour", RATELIMIT_PUSH="3/hour")
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    for _ in range(2):
        assert read(gw, tenant, headers).status_code == 200
    assert_limited(read(gw, tenant, headers))
    for expected in ("2", "1", "0"):
        response = push(gw, tenant, headers)
        assert response.status_code == 202, response.get_json()
        assert response.headers["RateLimit-Limit"] == "3"
        assert response.headers["RateLimit-Remaining"] == expected
    assert_limited(push(gw, tenant, headers))
    assert_limited(read(gw, tenant, headers))


def test_the_tenant_push_limit_counts_every_client(limited):
    gw = limited(RATELIMIT_TENANT_PUSH="2/hour")
    tenant, other = gw.tenant(), gw.tenant()
    first, second = gw.partner("Qualys", [tenant, other]), gw.partner("Tenable", [tenant])
    assert push(gw, tenant, first).status_code == 202
    assert push(gw, tenant, second).status_code == 202
    response = push(gw, tenant, first)
    assert_limited(response)
    assert "this tenant" in response.get_json()["error"]["message"]
    assert push(gw, other, first).status_code == 202


def test_two_api_processes_share_the_counters_in_redis(limited):
    one = limited(RATELIMIT_READ="4/hour")
    two = limited(RATELIMIT_READ="4/hour")
    assert one.app is not two.app
    tenant = one.tenant()
    headers = one.partner("Qualys", [tenant])
    for _ in range(3):
        assert read(one, tenant, headers).status_code == 200
    response = read(two, tenant, headers)
    assert response.status_code == 200
    assert response.headers["RateLimit-Remaining"] == "0"
    assert_limited(read(one, tenant, headers))
    assert_limited(read(two, tenant, headers))


def test_push_bytes_per_minute_per_client(limited):
    gw = limited(RATELIMIT_PUSH_BYTES_PER_MINUTE=2 * SIZE + SIZE // 2)
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    assert push(gw, tenant, headers).status_code == 202
    assert push(gw, tenant, headers).status_code == 202
    response = push(gw, tenant, headers)  # 3 x SIZE > 2.5 x SIZE: refused before the body is read
    assert_limited(response)
    assert "bytes pushed" in response.get_json()["error"]["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    # One body larger than the whole quota can never fit: 413, not 429.
    assert push(gw, tenant, headers, BODY + b" " * (3 * SIZE)).status_code == 413
    # Another client of the same tenant has its own quota.
    assert push(gw, tenant, gw.partner("Tenable", [tenant])).status_code == 202


def test_push_bytes_per_minute_per_tenant(limited):
    gw = limited(RATELIMIT_TENANT_PUSH_BYTES_PER_MINUTE=2 * SIZE + 1)
    tenant, other = gw.tenant(), gw.tenant()
    assert push(gw, tenant, gw.partner("Qualys", [tenant])).status_code == 202
    assert push(gw, tenant, gw.partner("Tenable", [tenant])).status_code == 202
    response = push(gw, tenant, gw.partner("Rapid7", [tenant, other]))
    assert_limited(response)
    assert "this tenant" in response.get_json()["error"]["message"]
    assert push(gw, other, gw.partner("Rapid7", [other])).status_code == 202


def token_request(gw: Gateway, client_id: str, secret: str, address: str = "127.0.0.1"):
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return gw.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                        headers={"Authorization": f"Basic {basic}"}, environ_base={"REMOTE_ADDR": address})


def test_the_token_endpoint_is_limited_per_client_id_and_per_address(limited):
    gw = limited(RATELIMIT_TOKEN="2/hour")
    tenant = gw.tenant()
    client_id, secret = gw.client("Qualys", "security.read", [tenant])
    for address in ("127.0.0.2", "127.0.0.3"):
        response = token_request(gw, client_id, secret, address)
        assert response.status_code == 200
        assert response.headers["RateLimit-Limit"] == "2"
    response = token_request(gw, client_id, secret, "127.0.0.4")  # the client id is spent
    assert response.status_code == 429
    assert response.get_json()["error"] == "invalid_request"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["Cache-Control"] == "no-store"
    other_id, other_secret = gw.client("Tenable", "security.read", [tenant])
    assert token_request(gw, other_id, other_secret, "127.0.0.2").status_code == 200
    response = token_request(gw, other_id, other_secret, "127.0.0.2")  # the address is spent
    assert response.status_code == 429
    assert "this address" in response.get_json()["error_description"]


def test_the_token_endpoint_locks_a_client_out_after_failures_and_lets_it_in_again(limited):
    gw = limited(TOKEN_LOCKOUT_FAILURES=3, TOKEN_LOCKOUT_WINDOW_SECONDS=60, TOKEN_LOCKOUT_SECONDS=2)
    tenant = gw.tenant()
    client_id, secret = gw.client("Qualys", "security.read", [tenant])
    for _ in range(3):
        response = token_request(gw, client_id, "wrong")
        assert response.status_code == 401
        assert response.get_json()["error"] == "invalid_client"
    response = token_request(gw, client_id, secret)  # locked: even the right secret
    assert response.status_code == 429
    body = response.get_json()
    assert body["error"] == "invalid_client"
    assert body["error_description"].startswith("too many failed attempts; try again in ")
    assert 1 <= int(response.headers["Retry-After"]) <= 2
    other_id, other_secret = gw.client("Tenable", "security.read", [tenant])
    assert token_request(gw, other_id, other_secret).status_code == 200  # another client is not locked
    time.sleep(2.2)
    assert token_request(gw, client_id, secret).status_code == 200  # the lockout expired
    # The failures were reset with the lockout: the count starts again.
    for _ in range(2):
        assert token_request(gw, client_id, "wrong").status_code == 401
    assert token_request(gw, client_id, secret).status_code == 200


def test_a_limit_setting_is_checked_at_start():
    from gateway.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="RATELIMIT_PUSH"):
        load_settings({"RATELIMIT_PUSH": "fast"})
    assert load_settings({"RATELIMIT_PUSH": "0"})["RATELIMIT_PUSH"] == ""


def test_every_limited_operation_documents_its_429():
    import yaml

    from tests.conftest import ROOT

    spec = yaml.safe_load((ROOT / "openapi" / "openapi.yaml").read_text())
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or not (op.get("security") or path.startswith("/oauth/")):
                continue
            wanted = "/TooManyRequests" if path.startswith("/api/") else "/OAuthTooManyRequests"
            assert op["responses"]["429"]["$ref"].endswith(wanted), (method, path)
    for name in ("TooManyRequests", "OAuthTooManyRequests"):
        headers = spec["components"]["responses"][name]["headers"]
        assert {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(headers)


def test_two_gunicorn_servers_share_the_counters(pg_gw, pg_url):
    """Two API processes (two gunicorn servers, as the README runs the API) count one client together."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from tests.conftest import QUEUE, ROOT, SECRET
    from tests.test_cli import _documented_gunicorn_command, _free_port

    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Qualys", [tenant])  # a fresh client: its counters start at zero
    servers, ports = [], []
    try:
        for _ in range(2):
            words = _documented_gunicorn_command()
            port = _free_port()
            for option, value in (("-b", f"127.0.0.1:{port}"), ("-w", "1")):
                words[words.index(option) + 1] = value
            env = dict(os.environ, GATEWAY_DATABASE_URL=pg_url, GATEWAY_BROKER_URL=REDIS_URL,
                       GATEWAY_SECRET_KEY=SECRET, GATEWAY_TASK_QUEUE=QUEUE, GATEWAY_ISSUER="http://127.0.0.1",
                       GATEWAY_RATELIMIT_ENABLED="true", GATEWAY_RATELIMIT_STORAGE_URL=REDIS_URL,
                       GATEWAY_RATELIMIT_READ="4/hour", PYTHONPATH=str(ROOT))
            servers.append(subprocess.Popen([sys.executable, "-m", *words], cwd=ROOT, env=env,
                                            start_new_session=True, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
            ports.append(port)
        for server, port in zip(servers, ports, strict=True):
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                        break
                except OSError:
                    assert server.poll() is None, "gunicorn exited"
                    assert time.monotonic() < deadline, "gunicorn did not start"
                    time.sleep(0.2)

        def get(port: int) -> tuple[int, dict]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/tenants/{tenant}/batches",
                                             headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, dict(response.headers)
            except urllib.error.HTTPError as error:
                return error.code, dict(error.headers)

        first, second = ports
        assert [get(first)[0] for _ in range(3)] == [200, 200, 200]
        status, seen = get(second)  # the other process knows the first one's three
        assert status == 200 and seen["RateLimit-Remaining"] == "0"
        for port in ports:
            status, seen = get(port)
            assert status == 429 and int(seen["Retry-After"]) >= 1
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@pytest.mark.parametrize("storage", [REDIS_URL, "memory://"])
def test_a_refused_check_counts_nothing_and_the_storages_agree(storage):
    """One call's checks are tested, then all counted or none: on Redis in one script (one round
    trip), elsewhere through ``limits`` one counter at a time; both give the same windows."""
    from limits import parse

    from gateway.config import load_config
    from gateway.errors import TooManyRequests
    from gateway.ratelimit import Check, Limits

    config = load_config({})
    config.update(RATELIMIT_ENABLED=True, RATELIMIT_STORAGE_URL=storage,
                  RATELIMIT_KEY_PREFIX=f"gw-test-{uuid.uuid4().hex[:8]}", RATELIMIT_PUSH="5/minute",
                  RATELIMIT_TENANT_PUSH="5/minute", RATELIMIT_READ="5/minute", RATELIMIT_TOKEN="5/minute",
                  RATELIMIT_PUSH_BYTES_PER_MINUTE=100, RATELIMIT_TENANT_PUSH_BYTES_PER_MINUTE=100,
                  TOKEN_LOCKOUT_FAILURES=0, TOKEN_LOCKOUT_WINDOW_SECONDS=60, TOKEN_LOCKOUT_SECONDS=60)
    limits = Limits(config)
    assert (limits.script is not None) == storage.startswith("redis")
    requests, size = parse("3/minute"), parse("100/minute")
    counted = Check(requests, limits._ids("push.client", "c"))
    window = limits.apply([counted, Check(size, limits._ids("bytes", "c"), 60, count=False, unit="bytes")])
    assert (window.limit, window.remaining) == (3, 2) and 1 <= window.reset <= 60
    limits.apply([Check(size, limits._ids("bytes", "c"), 70)])
    with pytest.raises(TooManyRequests) as refused:
        limits.apply([counted, Check(size, limits._ids("bytes", "c"), 40, count=False, unit="bytes")])
    assert "bytes pushed" in refused.value.message and refused.value.headers["RateLimit-Remaining"] == "0"
    window = limits.apply([counted])  # the refused call counted no request
    assert (window.limit, window.remaining) == (3, 1)
    limits.apply([counted])
    with pytest.raises(TooManyRequests):
        limits.apply([counted])
