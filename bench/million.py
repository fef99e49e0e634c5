"""One push of a million findings, and a sequence of pushes into one tenant, end to end on PostgreSQL.

    .venv/bin/python bench/million.py --findings 1000000 --hosts 100000 [--repush 100000]
    .venv/bin/python bench/million.py --sequence 10x100000 [--hosts 10000]
    .venv/bin/python bench/million.py --findings 1000000 --hosts 100000 --also 10x100000 --queries 100

Creates a scratch PostgreSQL database (migrated; autovacuum left as the server has it), starts
the API under gunicorn (one worker process, as the README runs it) and ``--workers`` celery
worker processes on Redis, each in a process of its own, and pushes canonical findings over
HTTP with a ``findings.write`` token:

* ``--findings N --hosts H``: one push of N findings over H hosts (N/H CVEs on each host), timed
  from the request to the batch's final status: findings/s, the 202's delay, the peak RSS of
  the API and of each worker process, and the most locks held meanwhile (``pg_locks`` polled
  every 0.2 s: all locks of the database's sessions, the most one session held, advisory locks)
  against the server's lock table (``max_locks_per_transaction`` x connections).  With
  ``--repush M`` the push's first M findings are pushed again unchanged, and the rows that
  push read from ``finding_sources`` are printed (``pg_stat_user_tables``, after a pause for
  the statistics to be flushed).
* ``--sequence KxM``: K pushes of M new findings each into one tenant, on the same ``--hosts``
  hosts: each push's time and its ratio to the first (the tenant grows to K x M findings).
  ``--also KxM`` runs it after the one push, into a tenant of its own.
* ``--seed N``: before the one push (or the sequence), the pushed tenant is given N findings
  of its own on N/50 hosts, generated inside PostgreSQL (bench/store_seed.py: the hosts the pushes
  name, 20% of a push's findings meeting stored ones), then ``VACUUM ANALYZE``: the push's rate
  into a store that already holds N findings, against ``--seed 0`` (an empty store).  Seeding
  millions takes minutes that are not measured: ``--seed N --seed-only --template NAME`` makes
  (and keeps) database NAME whose tenant ``seeded`` holds them; ``--template NAME`` then pushes
  into a fresh copy of it (``CREATE DATABASE ... TEMPLATE``, dropped after), so every run starts
  from the same store; a copy of a template seeded before a migration is migrated first (not
  timed), so one template serves the code before and after it.  ``--database NAME --tenant T``
  pushes into an existing database itself.
* ``--host-offset K``: the one push names hosts K to K + H - 1 (a store seeded with N findings holds
  hosts 0 to N/50 - 1: ``--host-offset 100000`` into the 5M store pushes new findings on new
  hosts, the store's size alone).  ``--described``: the pushed findings carry the seeded findings'
  title, description and remediation, so a pushed row is the size of a stored one (387 bytes;
  without it 178): PostgreSQL puts a new row into any page whose free space fits it (its free
  space map), and rows half the stored ones' size fit the space the seed left at the end of a
  third of its pages (``million.py --database NAME --host-offset 100000`` into a copy of the 5M
  store: all 100,200 new findings went into 100,200 distinct old heap pages, 331,730 blocks read
  from outside ``shared_buffers``, 1.1 GB of WAL, mostly full-page images).
* ``--own-server DIR``: the whole run on a PostgreSQL cluster of the bench's own, sized for a
  store of millions (``shared_buffers`` 4GB, ``max_wal_size`` 8GB, ``wal_buffers`` 64MB;
  ``--own-setting NAME=VALUE`` for others), ``initdb``'d in DIR when DIR holds none, on port
  ``--own-port`` (5499), stopped at the end; DIR is removed unless ``--keep-server`` (or
  ``--seed-only``: its templates live there), and its ``server.log`` is what ``--statements``
  reads.  The machine's own server is left as it is.
* ``--diagnose``: the WAL written and checkpoints run while the push was timed, then per table
  the blocks the push read from outside ``shared_buffers`` and hit in it, its scans and the index
  sizes (``pg_statio_user_tables``, after a pause for the statistics to be flushed; a VACUUM or
  ANALYZE the worker starts after the batch counts too).  ``--explain-slow MS`` logs the plans of
  the scratch database's statements slower than MS to the server's log (auto_explain; it slows
  what it measures), ``--set NAME=VALUE`` sets a setting for the scratch database's sessions.
  ``--statements [N]`` logs every statement of the scratch database (``log_min_duration_statement``
  0, parameters not logged) and prints the N (25) groups of statements, by their text with the
  numbers blanked, that took the most time while the push was timed (calls, total, mean; parse,
  bind and execute apart), read from the server's log (``--server-log``, readable by the bench):
  what grows with the store, statement by statement.  Logging costs the push little (~3,000
  lines for 100,000 findings).
* ``--queries N``: then, once the worker's statistics round (VACUUM/ANALYZE, in a thread of its
  own) is over, N timed GETs of the pushed tenant's findings each: ``$count`` without a filter
  and with ``sources/any(s: s/provider eq ...)`` (every finding matches: the largest count),
  a page of 100 with that filter, and the filter with a second condition: p50, p99.

A warm-up push of 200 findings runs first, so that worker start-up is not timed.  Figures, not
assertions.  The scratch database and the Redis queue are removed at the end, also on error.

Figures (issue 14 item 5, 2026-12-03, 2 cores, one worker, each under the bench lock, load average
before in brackets; ``T`` = ``--template growth_seed_1m`` / ``growth_seed_5m``, seeded with
``--seed 1000000 --seed-only --template growth_seed_1m`` (35 s) and ``--seed 5000000 ...`` (182 s,
8.3 GB); "0035a" is a trial migration adding ``INCLUDE (recommendation_type_id, state, severity)``
to ``uq_findings_subject`` (an index-only recommendations aggregate), run back to back with main's
code; it was not kept: within the runs' spread end to end, a larger index, more index blocks read):

    --findings 10000 --hosts 1000                     6,013/s [1.9]
    --findings 100000 --hosts 10000                   main 7,239/s [1.1], 0035a 6,997/s [1.2]
    --findings 1000000 --hosts 100000 (one push)      6,414/s [1.7] (-9% to -11%; worker peak 950 MiB)
    --findings 100000 --hosts 10000 T=1m              main 5,394/s [2.8], 0035a 5,769/s [2.2]
    --findings 100000 --hosts 10000 T=5m --diagnose   main 5,289/s [1.1], 0035a 5,295/s [1.0]
    --findings 100000 --hosts 10000 T=5m --statements main 4,756/s [2.6], 0035a 4,921/s [3.2]
    --findings 100000 --hosts 10000 T=5m (0035a first) 0035a 5,126/s [2.1], main 5,018/s [1.5]
    --own-server DIR (4GB): empty 6,455/s [1.6], T=1m 5,579/s [1.4] (-14%), T=5m 4,641/s [1.2] (-28%)

Into a store the push also meets 20% stored findings (updated, not HOT) and recounts 60 findings
a host instead of 10: statements 6.9 s (empty) -> 9.5 s (1M) -> 11.1 s (5M), the rest of the push
8.2 -> 9.2 -> 9.2 s; at 5M the findings insert 2.0 -> 3.8 s, sources 1.9 -> 2.4 s, the met findings'
update 0 -> 1.45 s, the recommendations' aggregate 0.07 -> 0.59 s (main's code 0.72 s).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bench.ingest_bench as ingest  # noqa: E402
from bench.ingest_bench import REDIS, create_database, drop_database  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from tests.conftest import Gateway  # noqa: E402

SEVERITIES = ("low", "medium", "high", "critical")


def write_body(
    path: Path, tag: str, count: int, hosts: int, cve_base: int = 10000, host_offset: int = 0,
    described: bool = False,
) -> int:
    """A canonical document of ``count`` findings ``{tag}-{n}``; finding n is on host
    ``host_offset + n mod hosts`` and names CVE number ``cve_base + n // hosts`` (distinct on each
    host).  ``described``: each finding has the title, description and remediation the seeded
    store's findings have (bench/store_seed.py), so its row is the size of theirs.  Its size."""
    with open(path, "w") as out:
        out.write('{"findings":[')
        for n in range(count):
            host = host_offset + n % hosts
            cve = f"CVE-2024-{cve_base + n // hosts}"
            if described:
                text = (f'"title":"Vulnerability {cve}","description":"A synthetic finding about {cve} '
                        f'on host h{host}; it carries a description of a realistic length for a scanner '
                        f'plug-in.",'
                        f'"remediation":"Upgrade the affected package to the fixed version.",')
            else:
                text = f'"title":"Vulnerability {n % 5000}",'
            out.write(
                f'{"," if n else ""}{{"id":"{tag}-{n}","resource":{{"fqdn":"h{host}.bench.example.com",'
                f'"ipv4":["10.{host >> 16 & 255}.{host >> 8 & 255}.{host & 255}"]}},'
                f'{text}"severity":"{SEVERITIES[n % 4]}",'
                f'"cves":["{cve}"],"status":"open",'
                f'"lastSeen":"2024-04-01T00:00:00Z","providerTimestamp":"2024-04-01T00:00:00Z"}}'
            )
        out.write("]}")
    return path.stat().st_size


def seed(url: str, tenant: str, findings: int) -> None:
    """``findings`` findings in the tenant on ``findings / 50`` hosts (bench/store_seed.py, in PostgreSQL)."""
    from bench.store_seed import seed_store

    steps = seed_store(url, tenant, findings)
    with psycopg.connect(url, autocommit=True) as conn:
        sizes = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('findings')), "
                             "pg_size_pretty(pg_total_relation_size('finding_sources')), "
                             "pg_size_pretty(pg_database_size(current_database()))").fetchone()
    print(f"seeded the tenant with {findings:,} findings in {sum(steps.values()):.0f}s ("
          + ", ".join(f"{label} {seconds:.0f}s" for label, seconds in steps.items())
          + f"); findings {sizes[0]}, finding_sources {sizes[1]} with indexes, database {sizes[2]}",
          flush=True)


class OwnServer:
    """A PostgreSQL cluster of the bench's own (``--own-server DIR``): ``initdb`` into DIR when it
    holds none, started on ``port`` with ``shared_buffers`` and ``max_wal_size`` sized for a store of
    millions, trust authentication for ``postgres`` on 127.0.0.1 and a socket in DIR.  ``stop``
    shuts it down and, unless ``keep``, removes DIR (a cluster kept holds the templates seeded into
    it for the next run).  Run as root, the server's commands run as the ``postgres`` user."""

    def __init__(self, directory: str, port: int, settings: dict[str, str]) -> None:
        self.directory, self.port = Path(directory).resolve(), port
        self.log = self.directory / "server.log"
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                       key=lambda path: int(path.parts[-3]))
        self.bin = found[-1].parent if found else Path(subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        started = time.perf_counter()
        if not (self.directory / "PG_VERSION").exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.as_user:
                shutil.chown(self.directory, "postgres", "postgres")
            subprocess.run(self.as_user + [str(self.bin / "initdb"), "-D", str(self.directory),
                                           "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                           "--locale=C.UTF-8"],
                           check=True, stdout=subprocess.DEVNULL)
        options = {"port": str(port), "listen_addresses": "'127.0.0.1'",
                   "unix_socket_directories": f"'{self.directory}'",
                   "log_line_prefix": "'%m [%p] %q%u@%d '"} | settings
        with open(self.directory / "postgresql.auto.conf", "w") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in options.items())
        if self.as_user:
            shutil.chown(self.directory / "postgresql.auto.conf", "postgres", "postgres")
            self.log.touch()
            shutil.chown(self.log, "postgres", "postgres")
        subprocess.run(self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.directory),
                                       "-l", str(self.log), "-w", "-t", "120", "start"],
                       check=True, stdout=subprocess.DEVNULL)
        self.admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            shown = conn.execute("SELECT string_agg(name || ' ' || current_setting(name), ', ') FROM "
                                 "unnest(%s::text[]) AS name", (sorted(settings),)).fetchone()[0]
        print(f"own PostgreSQL server in {self.directory} on port {port} ({shown}), up after "
              f"{time.perf_counter() - started:.0f}s", flush=True)

    def stop(self, keep: bool) -> None:
        subprocess.run(self.as_user + [str(self.bin / "pg_ctl"), "-D", str(self.directory), "-m", "fast",
                                       "-w", "-t", "300", "stop"], check=False, stdout=subprocess.DEVNULL)
        if keep:
            print(f"own server stopped; its cluster is kept in {self.directory}", flush=True)
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
            print(f"own server stopped and {self.directory} removed", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as f:
                pending.extend(int(child) for child in f.read().split())
        except OSError:
            continue
    return found


def _peak_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class LockWatch:
    """Polls ``pg_locks`` for the database's other sessions and keeps the maxima."""

    def __init__(self, url: str, interval: float = 0.2) -> None:
        self.url, self.interval = url, interval
        self.most = {"total": 0, "one session": 0, "advisory": 0}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stopped.wait(self.interval):
                total, advisory, one = conn.execute("""
                    SELECT sum(n), sum(advisory), max(n) FROM (
                        SELECT count(*) AS n, count(*) FILTER (WHERE l.locktype = 'advisory') AS advisory
                        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                        WHERE a.datname = current_database() AND l.pid <> pg_backend_pid()
                        GROUP BY l.pid) per_session""").fetchone()
                for key, value in (("total", total), ("advisory", advisory), ("one session", one)):
                    self.most[key] = max(self.most[key], int(value or 0))

    def reset(self) -> None:
        self.most = dict.fromkeys(self.most, 0)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


class Stack:
    """The API (gunicorn) and the workers (celery), each a process of its own, on one database."""

    def __init__(self, url: str, workers: int, **settings: str) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.queue = f"million-{uuid.uuid4().hex[:6]}"
        self.env = dict(
            os.environ,
            GATEWAY_DATABASE_URL=url,
            GATEWAY_BROKER_URL=REDIS,
            GATEWAY_SECRET_KEY="bench",
            GATEWAY_ISSUER=self.base,
            GATEWAY_TASK_QUEUE=self.queue,
            GATEWAY_RATELIMIT_ENABLED="false",
            GATEWAY_MAX_BODY_BYTES=str(2**30),
            GATEWAY_LOG_LEVEL="WARNING",
            PYTHONPATH=str(ROOT),
        )
        self.env.update(settings)  # GATEWAY_* overrides (bench/upload_bench.py)
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-w",
                "1",
                "--timeout",
                "3600",
                "-b",
                f"127.0.0.1:{self.port}",
                "--limit-request-line",
                "0",
                "gateway:create_app()",
            ],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workers.app",
                    "worker",
                    "--concurrency=1",
                    "--loglevel=WARNING",
                    "--without-gossip",
                    "--without-mingle",
                    "-n",
                    f"million{n}@%h",
                ],
                env=self.env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for n in range(workers)
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.base}/healthz", timeout=10)
                return
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.3)
        raise SystemExit("the API did not start")

    def peaks(self) -> str:
        api = max((_peak_rss_mib(pid) for pid in _tree(self.api.pid)[1:]), default=0.0)
        workers = [max(_peak_rss_mib(pid) for pid in _tree(worker.pid)) for worker in self.workers]
        return f"peak RSS: API (gunicorn worker) {api:,.0f} MiB, celery worker(s) " + ", ".join(
            f"{mib:,.0f} MiB" for mib in workers
        )

    def stop(self) -> None:
        for process in [self.api, *self.workers]:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in [self.api, *self.workers]:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        redis.Redis.from_url(REDIS).delete(self.queue)


def push(stack: Stack, tenant: str, headers: dict, path: Path) -> tuple[dict, float, float]:
    """(the batch at its end, seconds to the 202, seconds to the end).  The end is when the 0.5 s
    poll saw it; ``batch["pushedAt"]`` (added here) is the request's start, for a figure to the
    batch's own ``finishedAt`` (``_to_finish``) without the poll's half-second."""
    started = time.perf_counter()
    pushed_at = datetime.now(UTC)
    with open(path, "rb") as body:
        response = requests.post(
            f"{stack.base}/api/v1/tenants/{tenant}/batches?format=canonical",
            data=body,
            headers=headers | {"Content-Type": "application/json"},
            timeout=3600,
        )
    accepted = time.perf_counter() - started
    if response.status_code != 202:
        raise SystemExit(f"push answered {response.status_code}: {response.text[:300]}")
    batch_id = response.json()["id"]
    while True:
        time.sleep(0.5)
        batch = requests.get(
            f"{stack.base}/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers, timeout=60
        ).json()
        if batch["status"] not in ("accepted", "processing"):
            return batch | {"pushedAt": pushed_at}, accepted, time.perf_counter() - started


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _to_finish(batch: dict) -> float:
    """Seconds from the request's start to the batch's ``finishedAt`` (one machine, one clock)."""
    return (_when(batch["finishedAt"]) - batch["pushedAt"]).total_seconds()


def _source_reads(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(
            conn.execute("""
            SELECT t.seq_tup_read + coalesce(sum(i.idx_tup_read), 0)
            FROM pg_stat_user_tables t LEFT JOIN pg_stat_user_indexes i ON i.relid = t.relid
            WHERE t.relname = 'finding_sources' GROUP BY t.seq_tup_read""").fetchone()[0]
        )


def sequence(stack: Stack, tenant: str, headers: dict, spec: str, hosts: int, scratch: Path,
             watch: LockWatch) -> None:
    """``spec`` = KxM: K pushes of M new findings into ``tenant``; each push's time against the first."""
    count, size = (int(part) for part in spec.lower().split("x"))
    ratios: list[tuple[float, float]] = []
    for n in range(count):
        path = scratch / "push.json"
        mib = write_body(path, f"s{n}", size, hosts, cve_base=10000 + n * (size // hosts + 1)) / 2**20
        watch.reset()
        batch, accepted, seconds = push(stack, tenant, headers, path)
        if batch["status"] != "succeeded":
            raise SystemExit(f"batch {batch['id']}: {batch.get('error')}")
        # the worker's merge alone (from its claim to its commit), without the upload
        merge = (_when(batch["finishedAt"]) - _when(batch["startedAt"])).total_seconds()
        ratios.append((seconds, merge))
        print(
            f"push {n + 1:>2}/{count}: {size:,} new findings ({mib:.0f} MiB) on {hosts:,} hosts "
            f"into a tenant of {n * size:,}: {seconds:.1f}s end to end = {size / seconds:,.0f} "
            f"findings/s, {seconds / ratios[0][0]:.2f}x the first; merge {merge:.1f}s, "
            f"{merge / ratios[0][1]:.2f}x the first; locks at most {watch.most['total']} "
            f"(one session {watch.most['one session']}, advisory {watch.most['advisory']})",
            flush=True,
        )
    for label, index in (("end to end", 0), ("merge", 1)):
        spread = [pair[index] / ratios[0][index] for pair in ratios]
        print(f"{label}: each push {min(spread):.2f}x to {max(spread):.2f}x the first", flush=True)


DIAGNOSED = ("findings", "finding_sources", "resources", "resource_identifiers", "resource_sources",
             "provider_findings", "recommendations", "lifecycle_events")


def table_figures(url: str) -> dict[str, tuple]:
    """Per table: blocks read from outside shared_buffers and hit in it (heap, indexes), scans."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute("""
            SELECT s.relname, coalesce(io.heap_blks_read, 0), coalesce(io.heap_blks_hit, 0),
                   coalesce(io.idx_blks_read, 0), coalesce(io.idx_blks_hit, 0), s.seq_scan, s.seq_tup_read,
                   coalesce(s.idx_scan, 0), s.n_tup_ins, s.n_tup_upd
            FROM pg_stat_user_tables s JOIN pg_statio_user_tables io ON io.relid = s.relid
            WHERE s.relname = ANY(%s)""", (list(DIAGNOSED),)).fetchall()
    return {row[0]: row[1:] for row in rows}


def server_figures(url: str) -> tuple[int, ...]:
    """The WAL position (bytes) and the checkpointer's and sessions' writes so far."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, checkpoints_req, "
                            "checkpoints_timed, buffers_checkpoint, buffers_backend FROM pg_stat_bgwriter"
                            ).fetchone()


def diagnose(url: str, before: dict[str, tuple], after: dict[str, tuple]) -> None:
    """What the push read per table, and whether the indexes fit ``shared_buffers``."""
    with psycopg.connect(url, autocommit=True) as conn:
        buffers = conn.execute("SELECT pg_size_pretty(setting::bigint * 8192) FROM pg_settings "
                               "WHERE name = 'shared_buffers'").fetchone()[0]
        sizes = dict((name, (heap, indexes)) for name, heap, indexes in conn.execute(
            "SELECT relname, pg_size_pretty(pg_table_size(relid)), pg_size_pretty(pg_indexes_size(relid)) "
            "FROM pg_stat_user_tables WHERE relname = ANY(%s)", (list(DIAGNOSED),)).fetchall())
    print(f"the push per table (shared_buffers {buffers}; 8 KiB blocks read from outside it / hit in it):",
          flush=True)
    for table in DIAGNOSED:
        if table not in after:
            continue
        d = [a - b for a, b in zip(after[table], before.get(table, (0,) * 9), strict=True)]
        print(f"  {table:<21} heap {sizes[table][0]:>8}, indexes {sizes[table][1]:>8}: heap read {d[0]:>8,} "
              f"hit {d[1]:>9,}; index read {d[2]:>8,} hit {d[3]:>10,}; seq scans {d[4]:,} "
              f"({d[5]:,} rows), index scans {d[6]:,}; inserted {d[7]:,}, updated {d[8]:,}", flush=True)


_LOGGED = re.compile(r"^\S+ \S+ \S+ \[(\d+)\] \S*@(\S+) LOG:  duration: ([\d.]+) ms  (\w+)[^:]*: ?(.*)$")


def statements(log: str, start: int, database: str, top: int, seconds: float) -> None:
    """The statements of ``database`` the server logged from byte ``start`` of its log on, grouped by
    their text (numbers replaced): per group the calls, the total and the mean time; the ``top``
    groups with the most time.  Parse, bind and execute are logged (and counted) apart."""
    groups: dict[str, list[float]] = {}
    current: list[str] | None = None
    entries: list[tuple[str, float, list[str]]] = []
    with open(log, errors="replace") as f:
        f.seek(start)
        for line in f:
            match = _LOGGED.match(line.rstrip("\n"))
            if match:
                if match.group(2) != database:
                    current = None
                    continue
                current = [match.group(5)]
                entries.append((match.group(4), float(match.group(3)), current))
            elif line.startswith("\t") and current is not None:
                current.append(line.strip())
            else:
                current = None
    for phase, ms, text in entries:
        shape = re.sub(r"\b\d+\b", "N", re.sub(r"\s+", " ", " ".join(text)))[:150]
        groups.setdefault(f"{phase:<7} {shape}", []).append(ms)
    total = sum(ms for _, ms, _ in entries)
    print(f"statements logged: {len(entries):,}, {total / 1000:,.1f}s in all of the push's {seconds:.1f}s; "
          f"the {top} groups with the most time (calls, total s, mean ms):", flush=True)
    for key, times in sorted(groups.items(), key=lambda item: -sum(item[1]))[:top]:
        spent = sum(times)
        print(f"  {len(times):>6,} {spent / 1000:7.2f}s {spent / len(times):9.1f}  {key}", flush=True)


def _statistics_settled(url: str, timeout: float = 600) -> float:
    """Wait until no VACUUM or ANALYZE of the worker's statistics thread runs; the seconds waited."""
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        while time.perf_counter() - started < timeout:
            busy = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND (query ILIKE 'VACUUM%%' OR query ILIKE 'ANALYZE%%') AND state = 'active'"
                                ).fetchone()[0]
            if not busy:
                break
            time.sleep(0.5)
    return time.perf_counter() - started


def _quantile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def queries(stack: Stack, url: str, gw: Gateway, tenant: str, provider: str, repeat: int) -> None:
    """Time ``repeat`` GETs of each query on the pushed tenant over HTTP (after one warm-up): p50, p99."""
    waited = _statistics_settled(url)
    print(f"queries: waited {waited:.1f}s for the statistics round after the last push", flush=True)
    headers = gw.partner("BenchReader", [tenant], scopes="security.read")
    any_ = f"sources/any(s: s/provider eq '{provider}')"
    shapes = {
        "$count, no filter": {"$count": "true", "$top": "1"},
        "$count, sources/any()": {"$count": "true", "$top": "1", "$filter": any_},
        "page of 100, sources/any()": {"$top": "100", "$filter": any_},
        "$count, any() and severity": {"$count": "true", "$top": "1",
                                       "$filter": f"{any_} and severity eq 'high'"},
    }
    for label, query in shapes.items():
        ms, answer = [], None
        for n in range(repeat + 1):
            started = time.perf_counter()
            response = requests.get(f"{stack.base}/api/v1/tenants/{tenant}/security/findings", params=query,
                                    headers=headers, timeout=600)
            if n:  # the first is the warm-up
                ms.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"{label}: {response.status_code} {response.text[:300]}")
            answer = response.json()
        count = answer.get("@odata.count", len(answer["value"]))
        print(f"GET findings {label:<28} ({count:,}): p50 {_quantile(ms, 0.5):7.1f} ms  "
              f"p99 {_quantile(ms, 0.99):7.1f} ms  ({repeat} runs)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--findings", type=int, default=1_000_000)
    parser.add_argument("--hosts", type=int, default=100_000)
    parser.add_argument(
        "--sequence", help="KxM: K pushes of M new findings into one tenant (instead of one push)"
    )
    parser.add_argument(
        "--repush", type=int, default=0, help="then push the first M findings again, unchanged"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--described", action="store_true",
                        help="the one push's findings have the seeded findings' title, description and "
                             "remediation (rows of their size; without it a pushed row is about half theirs)")
    parser.add_argument("--host-offset", type=int, default=0,
                        help="the one push names hosts from this number on (a seeded store holds hosts "
                             "0 to seed/50 - 1: an offset at least that pushes onto hosts it does not hold)")
    parser.add_argument("--seed", type=int, default=0,
                        help="first load N findings set-based into the pushed tenant (the store's size)")
    parser.add_argument("--seed-only", action="store_true",
                        help="only make a database whose tenant 'seeded' holds --seed findings; keep it")
    parser.add_argument("--database", help="use this database (made by --seed-only) and keep it")
    parser.add_argument("--template", help="with --seed-only: the name of the database to make and keep; "
                        "otherwise push into a fresh copy of it (CREATE DATABASE ... TEMPLATE), tenant "
                        "'seeded'")
    parser.add_argument("--explain-slow", type=int, metavar="MS",
                        help="log the plan (auto_explain, ANALYZE BUFFERS) of every statement of the scratch "
                        "database slower than MS to the server's log (slows what it measures)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the scratch database's sessions (ALTER DATABASE ... SET), "
                        "e.g. wal_compression=lz4")
    parser.add_argument("--statements", type=int, nargs="?", const=25, metavar="N",
                        help="log every statement of the scratch database (log_min_duration_statement 0, "
                        "parameters not logged) and print the N (25) that took the most time in all while "
                        "the push was timed, grouped by their text (from the server's log, --server-log)")
    parser.add_argument("--server-log", default="/var/log/postgresql/postgresql-15-main.log",
                        help="the PostgreSQL server's log file (read by --statements)")
    parser.add_argument("--diagnose", action="store_true",
                        help="print the push's block reads and scans per table and the index sizes")
    parser.add_argument("--tenant", help="push into this existing tenant (with --database)")
    parser.add_argument("--also", help="KxM: after the one push, the K x M sequence into another tenant")
    parser.add_argument("--queries", type=int, default=0,
                        help="then time N counts and pages of the pushed tenant with a sources/any() filter")
    parser.add_argument("--own-server", metavar="DIR",
                        help="run on a PostgreSQL cluster of the bench's own in DIR (initdb'd when DIR holds "
                        "none), started for the run and stopped after it; DIR is removed after the run "
                        "unless --keep-server (or --seed-only, whose template lives there)")
    parser.add_argument("--own-port", type=int, default=5499)
    parser.add_argument("--own-setting", action="append", default=[], metavar="NAME=VALUE",
                        help="a server setting of the own server, over its defaults here: "
                        "shared_buffers=4GB, max_wal_size=8GB, wal_buffers=64MB")
    parser.add_argument("--keep-server", action="store_true",
                        help="with --own-server: keep DIR (the cluster, stopped) for the next run")
    args = parser.parse_args()

    own = None
    if args.own_server:
        settings = {"shared_buffers": "4GB", "max_wal_size": "8GB", "wal_buffers": "64MB"}
        settings |= dict(setting.split("=", 1) for setting in args.own_setting)
        own = OwnServer(args.own_server, args.own_port, settings)
        ingest.ADMIN = own.admin
        args.server_log = str(own.log)
    try:
        run(args)
    finally:
        if own is not None:
            own.stop(keep=args.keep_server or args.seed_only)


def run(args: argparse.Namespace) -> None:
    ADMIN = ingest.ADMIN

    if args.database:  # a database left by --seed-only: kept afterwards too
        name, url = args.database, ADMIN.rsplit("/", 1)[0] + "/" + args.database
    elif args.template and args.seed_only:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{args.template}"')
        name, url = args.template, ADMIN.rsplit("/", 1)[0] + "/" + args.template
    elif args.template:  # every run starts from the same seeded store: a file copy of it
        started = time.perf_counter()
        name = f"gw_million_{uuid.uuid4().hex[:6]}"
        # FILE_COPY: PostgreSQL 15's default (WAL_LOG) writes the gigabytes of the copy to the WAL,
        # and the checkpoints that follow would flush them while the push is timed; so do those
        # writes now, then let the kernel write back the copied files before the push
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{args.template}" STRATEGY = FILE_COPY')
            conn.execute("CHECKPOINT")
        os.sync()
        url = ADMIN.rsplit("/", 1)[0] + "/" + name
        print(f"copied {args.template} into {name} in {time.perf_counter() - started:.0f}s (file copy, "
              "checkpoint, sync)", flush=True)
        # a template seeded before a migration gets it now (not timed), then its writes are flushed too
        started = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            before = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            after = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
            if after != before:
                conn.execute("CHECKPOINT")
                os.sync()
                print(f"migrated the copy from {before} to {after} in {time.perf_counter() - started:.0f}s "
                      "(checkpoint, sync)", flush=True)
    else:
        name, url = create_database("gw_million")
    stack = watch = None
    scratch = Path(tempfile.mkdtemp(prefix="million-"))
    try:
        if not args.database and not (args.template and not args.seed_only):
            upgrade(url)
        if args.seed_only:  # seed a tenant in a database of its own and keep it (not timed)
            Gateway(create_app({"DATABASE_URL": url, "BROKER_URL": "memory://", "SECRET_KEY": "bench",
                                "RATELIMIT_ENABLED": False})).tenant("seeded")
            seed(url, "seeded", args.seed)
            print(f"kept database {name}: push into its tenant with --database {name} --tenant seeded",
                  flush=True)
            name = None
            return
        if args.explain_slow is not None and name is not None and not args.database:
            with psycopg.connect(url, autocommit=True) as conn:
                for setting, value in (("session_preload_libraries", "auto_explain"),
                                       ("auto_explain.log_min_duration", f"{args.explain_slow}ms"),
                                       ("auto_explain.log_analyze", "on"),
                                       ("auto_explain.log_buffers", "on")):
                    conn.execute(f'ALTER DATABASE "{name}" SET {setting} = \'{value}\'')
            print(f"plans of statements over {args.explain_slow} ms: the server's log, database {name}",
                  flush=True)
        if args.statements and name is not None and not args.database:
            args.set += ["log_min_duration_statement=0", "log_parameter_max_length=0"]
        if args.set and name is not None and not args.database:
            with psycopg.connect(url, autocommit=True) as conn:
                for setting in args.set:
                    key, value = setting.split("=", 1)
                    conn.execute(f'ALTER DATABASE "{name}" SET {key} = \'{value}\'')
            print(f"database settings: {', '.join(args.set)}", flush=True)
        with psycopg.connect(url, autocommit=True) as conn:
            settings = dict(
                conn.execute(
                    "SELECT name, setting FROM pg_settings WHERE name IN ('max_locks_per_transaction', "
                    "'max_connections', 'max_prepared_transactions', 'autovacuum')"
                ).fetchall()
            )
        table = int(settings["max_locks_per_transaction"]) * (
            int(settings["max_connections"]) + int(settings["max_prepared_transactions"])
        )
        print(
            f"PostgreSQL: max_locks_per_transaction {settings['max_locks_per_transaction']}, "
            f"max_connections {settings['max_connections']} (lock table {table:,} entries), "
            f"autovacuum {settings['autovacuum']}; {os.cpu_count()} CPUs",
            flush=True,
        )
        app = create_app(
            {
                "DATABASE_URL": url,
                "BROKER_URL": "memory://",
                "SECRET_KEY": "bench",
                "RATELIMIT_ENABLED": False,
            }
        )
        gw = Gateway(app)
        stack = Stack(url, args.workers)
        warm = gw.tenant()
        warm_headers = gw.partner("WarmUp", [warm], scopes="findings.write")
        write_body(scratch / "warm.json", "warm", 200, 50)
        push(stack, warm, warm_headers, scratch / "warm.json")
        tenant = args.tenant or ("seeded" if args.template else gw.tenant())
        headers = gw.partner("SequenceScanner" if args.sequence else "BenchScanner", [tenant],
                             scopes="findings.write")
        if args.seed and not args.database and not args.template:
            seed(url, tenant, args.seed)
        watch = LockWatch(url)
        if args.sequence:
            sequence(stack, tenant, headers, args.sequence, args.hosts, scratch, watch)
        else:
            path = scratch / "push.json"
            mib = write_body(path, "m", args.findings, args.hosts, host_offset=args.host_offset,
                             described=args.described) / 2**20
            if args.diagnose:
                time.sleep(11)  # every session's table statistics flushed
                before, wal = table_figures(url), server_figures(url)
            log_start = os.path.getsize(args.server_log) if args.statements else 0
            batch, accepted, seconds = push(stack, tenant, headers, path)
            if args.statements:
                statements(args.server_log, log_start, name, args.statements, seconds)
            if args.diagnose:  # the WAL written and the checkpoints run while the push was timed
                wal = [b - a for a, b in zip(wal, server_figures(url), strict=True)]
                print(f"while timed: {wal[0] / 2**20:,.0f} MiB of WAL, {wal[1]} checkpoint(s) asked for by "
                      f"WAL volume and {wal[2]} by time, {wal[3]:,} buffers written by checkpoints, "
                      f"{wal[4]:,} by the server's sessions themselves", flush=True)
            print(
                f"one push of {args.findings:,} findings ({mib:.0f} MiB) over {args.hosts:,} hosts, "
                f"{args.workers} worker(s): 202 after {accepted:.1f}s, {batch['status']} after "
                f"{seconds:.1f}s = {args.findings / seconds:,.0f} findings/s end to end (to its finishedAt "
                f"{_to_finish(batch):.2f}s = {args.findings / _to_finish(batch):,.0f} findings/s); "
                f"counts {batch['counts']}",
                flush=True,
            )
            print(
                f"locks held at most: {watch.most['total']} in all sessions of the database, "
                f"{watch.most['one session']} by one session, {watch.most['advisory']} advisory "
                f"(server lock table: {table:,})",
                flush=True,
            )
            if batch["status"] != "succeeded":
                raise SystemExit(f"batch {batch['id']}: {batch.get('error')}")
            if args.diagnose:
                time.sleep(11)
                diagnose(url, before, table_figures(url))
            if args.repush:
                again = scratch / "again.json"
                write_body(again, "m", args.repush, args.hosts)
                time.sleep(11)  # every session's table statistics flushed
                before = _source_reads(url)
                batch, accepted, seconds = push(stack, tenant, headers, again)
                time.sleep(11)
                print(
                    f"unchanged re-push of the first {args.repush:,}: {batch['status']} after "
                    f"{seconds:.1f}s = {args.repush / seconds:,.0f} findings/s; counts {batch['counts']}; "
                    f"finding_sources rows read (sequential + index entries) {_source_reads(url) - before:,}",
                    flush=True,
                )
        if args.also:  # the sequence too, into a tenant of its own, after the single push
            also = gw.tenant()
            also_headers = gw.partner("SequenceScanner", [also], scopes="findings.write")
            sequence(stack, also, also_headers, args.also, args.hosts, scratch, watch)
        print(stack.peaks(), flush=True)
        if args.queries:
            provider = "SequenceScanner" if args.sequence else "BenchScanner"
            queries(stack, url, gw, tenant, provider, args.queries)
        app.extensions["gateway.db"].dispose()
    finally:
        if watch is not None:
            watch.stop()
        if stack is not None:
            stack.stop()
        for item in scratch.iterdir():
            item.unlink()
        scratch.rmdir()
        if name is not None and not args.database:
            drop_database(name)


if __name__ == "__main__":
    main()
