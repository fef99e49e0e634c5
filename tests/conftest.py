"""Shared fixtures: real PostgreSQL and SQLite stores, real Redis, real Celery workers."""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import text
from werkzeug.serving import make_server

from gateway import create_app
from gateway.auth import hash_secret
from gateway.db import Database
from gateway.migrate import upgrade
from gateway.models import Base, ClientTenant, OAuthClient, Tenant

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("GATEWAY_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS", "redis://127.0.0.1:6379/11")
SECRET = "test-secret-key"
# Rate limits are opt-in per test (tests/test_limits.py): off for the apps and servers tests start.
os.environ.setdefault("GATEWAY_RATELIMIT_ENABLED", "false")
# Export destinations in tests are loopback receivers (tests/receiver.py): the SSRF guard lets them through.
os.environ.setdefault("GATEWAY_EXPORT_ALLOW_PRIVATE_TARGETS", "true")
# One queue per test session, so that concurrent runs on one Redis never take each other's tasks.
QUEUE = f"gateway-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def scratch_postgres(prefix: str = "gw_scratch"):
    """A fresh, empty PostgreSQL database for one test (no migrations applied), dropped afterwards."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database with the migrations applied, dropped at the end."""
    name = f"gw_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory):
    path = tmp_path_factory.mktemp("sqlite") / "gateway.sqlite3"
    url = f"sqlite:///{path}"
    upgrade(url)
    return url


def wipe(db: Database) -> None:
    """Empty every table (tests share one migrated database per backend)."""
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with db.engine.begin() as conn:
        if db.is_postgres:
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for name in tables:
                conn.execute(text(f"DELETE FROM {name}"))


@pytest.fixture(params=["postgresql", "sqlite"])
def store_url(request):
    """Each store test runs on PostgreSQL and on the embedded SQLite default."""
    return request.getfixturevalue("pg_url" if request.param == "postgresql" else "sqlite_url")


def make_app(database_url: str, eager: bool, **overrides):
    config = {"DATABASE_URL": database_url, "BROKER_URL": REDIS_URL, "SECRET_KEY": SECRET,
              "TASK_QUEUE": QUEUE,
              "TASK_ALWAYS_EAGER": eager, "MERGE_CHUNK_SIZE": 50,
              "RATELIMIT_ENABLED": False}  # rate limits are opt-in per test (tests/test_limits.py)
    config.update(overrides)
    return create_app(config)


@pytest.fixture
def eager_app(store_url):
    """An app on each store that merges a push inline (same code path as the worker's task)."""
    app = make_app(store_url, eager=True)
    wipe(app.extensions["gateway.db"])
    yield app
    app.extensions["gateway.db"].dispose()


@pytest.fixture
def pg_app(pg_url):
    """An app on PostgreSQL whose pushes go to Redis for a real worker."""
    app = make_app(pg_url, eager=False)
    wipe(app.extensions["gateway.db"])
    yield app
    app.extensions["gateway.db"].dispose()


class Gateway:
    """Test helpers around one app: tenants, clients, tokens, and calls."""

    def __init__(self, app) -> None:
        self.app = app
        self.db: Database = app.extensions["gateway.db"]
        self.http = app.test_client()

    def tenant(self, external_id: str | None = None) -> str:
        external_id = external_id or f"t-{uuid.uuid4().hex[:8]}"
        with self.db.session() as session:
            session.add(Tenant(external_id=external_id, name=external_id))
        return external_id

    def client(self, provider: str, scopes: str, tenants: list[str]) -> tuple[str, str]:
        client_id, secret = uuid.uuid4().hex, uuid.uuid4().hex + uuid.uuid4().hex
        with self.db.session() as session:
            row = OAuthClient(client_id=client_id, secret_hash=hash_secret(secret), name=provider,
                              provider=provider, scope=scopes)
            session.add(row)
            session.flush()
            for external_id in tenants:
                tenant = session.query(Tenant).filter_by(external_id=external_id).one()
                session.add(ClientTenant(client_pk=row.id, tenant_id=tenant.id))
        return client_id, secret

    def token(self, client_id: str, secret: str, scope: str | None = None) -> str:
        data = {"grant_type": "client_credentials"}
        if scope:
            data["scope"] = scope
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        response = self.http.post("/oauth/token", data=data, headers={"Authorization": f"Basic {basic}"})
        assert response.status_code == 200, response.get_json()
        return response.get_json()["access_token"]

    def partner(self, provider: str, tenants: list[str],
                scopes: str = "findings.write alerts.write security.read alerts.manage") -> dict:
        client_id, secret = self.client(provider, scopes, tenants)
        return {"Authorization": f"Bearer {self.token(client_id, secret)}"}


@pytest.fixture
def gw(eager_app) -> Gateway:
    return Gateway(eager_app)


@pytest.fixture
def pg_gw(pg_app) -> Gateway:
    return Gateway(pg_app)


class LiveServer:
    """The app served over a real socket on loopback, in a thread."""

    def __init__(self, app) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def live_server(pg_app):
    server = LiveServer(pg_app)
    yield server
    server.stop()


class Worker:
    """A real ``celery worker`` process on Redis, against the test database."""

    def __init__(self, database_url: str, concurrency: int = 1, extra_env: dict | None = None) -> None:
        env = dict(os.environ)
        env.update({"GATEWAY_DATABASE_URL": database_url, "GATEWAY_BROKER_URL": REDIS_URL,
                    "GATEWAY_TASK_QUEUE": QUEUE,
                    "GATEWAY_SECRET_KEY": SECRET, "GATEWAY_MERGE_CHUNK_SIZE": "50",
                    "PYTHONPATH": str(ROOT)})
        env.update(extra_env or {})
        self.log = open(os.devnull, "w") if not os.environ.get("GATEWAY_TEST_WORKER_LOG") else None
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--loglevel=INFO",
             f"--concurrency={concurrency}", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"test-{uuid.uuid4().hex[:6]}@%h"],
            env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT if self.log else None,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and its pool children)."""
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        if self.log:
            self.log.close()
            self.log = None

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.log:
            self.log.close()


@pytest.fixture
def redis_clean():
    """Redis with this session's queue empty (other sessions' queues are left alone)."""
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(QUEUE)
    yield client
    client.delete(QUEUE)


@pytest.fixture
def worker(pg_app, redis_clean):
    process = Worker(pg_app.config["DATABASE_URL"])
    yield process
    process.stop()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):
    """Poll until ``predicate()`` returns a truthy value; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
