"""The database going away and coming back, on a private PostgreSQL cluster this test starts.

While it is down every request answers 503 with Retry-After (the token endpoint included),
and every batch accepted before the outage finishes within seconds of the restart, through
the tasks' own retries: the periodic sweep never runs here.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
import requests
from sqlalchemy import func, select

from gateway.migrate import upgrade
from gateway.models import Batch, FindingSource
from tests.conftest import Gateway, LiveServer, Worker, make_app, wait_for
from tests.factories import document, finding

BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A throw-away PostgreSQL cluster on a loopback port of its own (pg_ctl on a temp dir)."""

    def __init__(self) -> None:
        self.bin = Path(BINARIES[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/gateway"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60", "start",
                  "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster():
    if not BINARIES or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("needs PostgreSQL's server binaries (pg_ctl, initdb)")
    cluster = Cluster()
    cluster.start()
    with psycopg.connect(cluster.url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE gateway")
    upgrade(cluster.url)
    yield cluster
    cluster.remove()


def test_a_database_outage_answers_503_and_accepted_batches_finish_after_the_restart(cluster, redis_clean):
    app = make_app(cluster.url, eager=False)
    gw = Gateway(app)
    server = LiveServer(app)
    worker = Worker(cluster.url)
    try:
        tenant = gw.tenant()
        client_id, secret = gw.client("Qualys", "findings.write security.read", [tenant])
        headers = {"Authorization": f"Bearer {gw.token(client_id, secret)}"}
        push = f"{server.url}/api/v1/tenants/{tenant}/batches?format=canonical"
        sizes = [6000, 3000, 3000, 3000]
        batch_ids = []
        for n, size in enumerate(sizes):
            body = document([finding(f"b{n}-{i}", host=f"h{i % 40}.example.com", cves=[f"CVE-2024-{10000 + i}"])
                             for i in range(size)])
            response = requests.post(push, data=body, headers=headers | {"Content-Type": "application/json"},
                                     timeout=60)
            assert response.status_code == 202
            batch_ids.append(int(response.json()["id"]))

        def statuses():
            with gw.db.sessions() as session:
                return dict(session.execute(select(Batch.id, Batch.status)).all())

        wait_for(lambda: "processing" in statuses().values(), timeout=60, interval=0.05)
        cluster.stop("immediate")  # mid-merge

        down = [
            requests.post(push, data=document([finding("during")]),
                          headers=headers | {"Content-Type": "application/json"}, timeout=30),
            requests.get(f"{server.url}/api/v1/tenants/{tenant}/security/findings", headers=headers, timeout=30),
            requests.get(f"{server.url}/api/v1/tenants/{tenant}/batches/{batch_ids[0]}", headers=headers,
                         timeout=30),
            requests.post(f"{server.url}/oauth/token", data={"grant_type": "client_credentials"},
                          auth=(client_id, secret), timeout=30),
        ]
        for response in down:
            assert response.status_code == 503, (response.request.url, response.status_code, response.text)
            assert response.headers["Retry-After"].isdigit()
            assert response.json()["error"]["code"] == "serviceUnavailable"
        assert requests.get(f"{server.url}/readyz", timeout=30).status_code == 503

        time.sleep(3)
        cluster.start()
        restarted = time.monotonic()
        # No sweep runs in this test: only the tasks' own retries bring the batches home.
        wait_for(lambda: set(statuses().values()) == {"succeeded"}, timeout=60, interval=0.2)
        recovered = time.monotonic() - restarted
        assert sorted(statuses()) == batch_ids  # the push refused during the outage stored nothing
        with gw.db.sessions() as session:
            assert session.scalar(select(func.count()).select_from(FindingSource)) == sum(sizes)
            counts = [session.get(Batch, batch_id).counts for batch_id in batch_ids]
        assert [c["created"] for c in counts] == sizes
        print(f"all batches final {recovered:.1f}s after the restart")
        assert requests.post(f"{server.url}/oauth/token", data={"grant_type": "client_credentials"},
                             auth=(client_id, secret), timeout=30).status_code == 200
    finally:
        worker.stop()
        server.stop()
        app.extensions["gateway.db"].dispose()
