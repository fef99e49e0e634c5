"""The command line as an operator meets it: one-line errors, migrate, check, and `gateway run` stopping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from click.testing import CliRunner

from gateway import cli
from tests.conftest import REDIS_URL, ROOT, SECRET


def invoke(env: dict, *args: str):
    return CliRunner().invoke(cli.main, list(args), env=env)


def test_a_duplicate_tenant_is_one_line(pg_url):
    env = {"GATEWAY_DATABASE_URL": pg_url, "GATEWAY_SECRET_KEY": SECRET}
    first = invoke(env, "tenant", "create", "Contoso", "--id", "dup-tenant")
    if first.exit_code != 0:  # left from an earlier run on this session's database
        assert "already exists" in first.output
    again = invoke(env, "tenant", "create", "Contoso", "--id", "dup-tenant")
    assert again.exit_code == 1
    assert again.output == "Error: a tenant with id dup-tenant already exists\n"


def test_an_unmigrated_store_says_run_gateway_migrate(tmp_path):
    env = {"GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'new.sqlite3'}", "GATEWAY_SECRET_KEY": SECRET}
    result = invoke(env, "tenant", "list")
    assert result.exit_code == 1
    assert result.output == "Error: the store has no schema (or an old one): run gateway migrate\n"


def test_migrate_says_what_it_applied(tmp_path):
    from gateway.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'gw.sqlite3'}"
    env = {"GATEWAY_DATABASE_URL": url, "GATEWAY_SECRET_KEY": SECRET}
    upgrade(url, "0004")
    result = invoke(env, "migrate")
    assert result.exit_code == 0, result.output
    first, last = result.output.splitlines()
    from alembic.script import ScriptDirectory

    from gateway.migrate import alembic_config

    later = [r.revision for r in ScriptDirectory.from_config(alembic_config(url)).walk_revisions("0004", "heads")
             if r.revision != "0004"]
    assert first.startswith(f"applied {len(later)} migration(s) to SQLite {tmp_path / 'gw.sqlite3'} (from 0004")
    assert all(revision in first for revision in later)
    assert "0005" in first and "0006" in first
    assert last.startswith(f"database is up to date (revision {later[0]}")  # walk_revisions: head first
    again = invoke(env, "migrate")
    assert again.output.splitlines() == [last]


def test_check_prints_the_settings_masked_and_tests_each_connection(pg_url):
    env = {"GATEWAY_DATABASE_URL": pg_url, "GATEWAY_BROKER_URL": REDIS_URL, "GATEWAY_SECRET_KEY": SECRET,
           "GATEWAY_ISSUER": "https://gw.example.com", "GATEWAY_METRICS_TOKEN": "m-token"}
    result = invoke(env, "check")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "SECRET_KEY=***" in lines and "METRICS_TOKEN=***" in lines and "MAX_ATTEMPTS=5" in lines
    assert SECRET not in result.output and "m-token" not in result.output
    checks = [line for line in lines if line.startswith(("store:", "broker:"))]
    assert [line.split(":")[0] for line in checks] == ["store", "broker"]
    assert all(": ok (" in line for line in checks)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env["GATEWAY_BROKER_URL"] = f"redis://:pw@127.0.0.1:{port}/0"
    env.pop("GATEWAY_ISSUER")
    down = invoke(env, "check")
    assert down.exit_code == 1
    assert f"broker: FAILED (redis://:***@127.0.0.1:{port}/0)" in down.output
    assert "settings: FAILED: production (a PostgreSQL store) needs GATEWAY_ISSUER" in down.output


def test_a_bad_setting_is_one_line(tmp_path):
    result = invoke({"GATEWAY_HOME": str(tmp_path), "GATEWAY_MAX_ATTEMPTS": "abc"}, "tenant", "list")
    assert result.exit_code == 1
    assert result.output == "Error: configuration: GATEWAY_MAX_ATTEMPTS must be an integer, got 'abc'\n"


def _descendants(pid: int) -> set[int]:
    found, pending = set(), [pid]
    while pending:
        parent = pending.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_gateway_run_stops_its_worker_and_beat_on_sigterm(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    env.update(GATEWAY_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    log = open(tmp_path / "run.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--port", str(port)], env=env,
                               cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "gateway run did not start"
                time.sleep(0.2)
        # the worker, and its pool child, are up
        deadline = time.monotonic() + 60
        while len(_descendants(process.pid)) < 2:
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1)
        children = _descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0, (tmp_path / "run.log").read_text()[-3000:]
        deadline = time.monotonic() + 10
        while [pid for pid in children if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in children if _alive(pid)] == []
        assert "gateway stopped" in (tmp_path / "run.log").read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in _descendants(process.pid) if process.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
        log.close()
