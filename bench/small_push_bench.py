"""Many small pushes at once (issue 14 item 4): 1,000 pushes of 10 findings from 50 concurrent clients.

    .venv/bin/python bench/small_push_bench.py                 # before and after, 1,000 x 10, 50 clients
    .venv/bin/python bench/small_push_bench.py --modes after --pushes 2000

Each mode gets a scratch PostgreSQL database, the API under gunicorn and ``celery worker
--concurrency=2`` on Redis, as the README's production section runs them:

* ``before``: the earlier documented command (``gunicorn -w 4``, synchronous workers: one
  request per process at a time) and one task per batch (``GATEWAY_SMALL_BATCHES_PER_TASK=1``);
* ``threads``: the documented command now (``gunicorn -w 4 -k gthread --threads 8``), one task per batch;
* ``after``: the documented command with one process per core (``-w 2`` here: proposed for the
  README, which still says ``-w 4``) and ``--reuse-port`` (each gunicorn process listens
  on a socket of its own and the kernel spreads the connections) and its default, a small
  batch's task merging the tenant's other queued small batches (gateway/smallbatches.py; with
  Redis as the broker, a push sends no task while one of its tenant's is on its way), the
  worker at ``nice -n 10`` as the README runs it (``--worker-nice`` sets another value, 0 the
  old command), and token checks reused for 5 s (``GATEWAY_TOKEN_CACHE_SECONDS``, the README's
  production value).

Before the timed pushes every client pushes twice at once and all of that is merged, so each
API process and thread has made its first requests (its pool's connections) untimed.

``--clients`` threads, each an OAuth client of its own with a keep-alive connection
(the request's head and body in one write), push
``--pushes`` canonical documents of ``--findings`` findings (one host, CVEs of their own) to
one tenant, rate limits on (raised so that the run is not refused; ``--pause-worker`` stops
the worker while the timed pushes run, to separate the API's own cost from the merges').  Printed: the time to
each 202 (p50, p90, p99, max), pushes/s accepted, the time from the first push until every
batch is merged, how many batches were merged in another batch's task, and whether every
batch succeeded with its own counts, and how many ``process_batch`` tasks the worker ran.
Figures, not assertions.

Measured on the 2-core machine under ``/work/bin/quiet`` (``--modes after``; load average before
the run in brackets), back to back: the code before the pending mark and the one-call rate
limits (main at a9b0530) p50 345 / p90 544 / p99 724 / max 1,128 ms, 123 pushes/s, 8.40 ms of
API CPU a push, all merged 130.3 s, one task a batch [1.97]; after them (8b86c8b) p50 254 / p90 445 /
p99 577 / max 774 ms, 159 pushes/s, 6.41 ms a push, all merged 112.8 s, 61 tasks [2.86]; again
later p50 301 / p99 664 ms, 144 pushes/s, 7.37 ms a push, all merged 123.3 s, 62 tasks [1.87];
with the worker stopped during the pushes (``--pause-worker``) p50 265 / p99 543 ms, 160
pushes/s, 7.97 ms a push [2.95].  The 300 ms p99 is still missed: even with no merge running,
the API's CPU a push times 160 pushes/s is more than one core, and the bench's own 50 client
threads, PostgreSQL and Redis share the other.

On a faster VM (3 Dec 2026), main at 7397c57 exported to /tmp/smallpush-main and run with this
script's client (``--code``), back to back with the branch, each pair under one ``/work/bin/quiet``::

    BENCH_REDIS=redis://127.0.0.1:6379/4 .venv/bin/python bench/small_push_bench.py --modes after \\
        --code /tmp/smallpush-main --api '-w 4 -k gthread --threads 8 --reuse-port'
    BENCH_REDIS=redis://127.0.0.1:6379/4 .venv/bin/python bench/small_push_bench.py --modes after

main (its README command, ``-w 4``): p50 112 / p90 187 / p99 261 / max 306 ms, 409 pushes/s,
2.25 ms of API CPU and 4.83 ms of the machine's a push, 104 PostgreSQL connections opened during
the pushes, all merged 40.6 s [1.83]; again p99 287 ms, 373/s, 116 connections, 42.7 s [1.78].
The branch (a pool that keeps its connections and pings only one idle over a second, ``-w 2``):
p50 67 / p90 138 / p99 162 / max 187 ms, 531 pushes/s, 1.59 ms of API CPU and 3.70 ms of the
machine's a push, no connection opened, all merged 36.5 s [2.38]; again p99 233 ms (p90 125),
513/s, 37.3 s [1.11].  The connections main opened and closed cost more outside the API than in
it: a PostgreSQL backend started for each, and a kernel thread freeing memory
(``kvfree_rcu_reclaim``) at 2.7-2.8 ms a push in the CPU-by-program line of main's runs only.
With ``--skip-merge`` (the same pushes, the merges not waited for) [1.33-3.83]: main -w 4 p99
256, main -w 2 226, branch -w 4 293 (a writeback kernel thread busy), branch -w 2 146 ms.
gunicorn layouts on the branch (``--skip-merge --api ...``) [1.0-3.0]: ``-w 4 --threads 8`` p99
244-255, ``-w 3`` 171-194, ``-w 2 --threads 8`` 179, ``-w 2 --threads 12`` 171-200,
``-w 1 --threads 12`` 167 ms.  The cores were 97-100% busy during the pushes in every run.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import create_database, drop_database  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from tests.conftest import Gateway  # noqa: E402
from tests.factories import document, finding  # noqa: E402

REDIS = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/12")
API = {
    "before": ["-w", "4"],
    "threads": ["-w", "4", "-k", "gthread", "--threads", "8"],
    # one process per core (this machine has 2): -w 4 spread the same CPU over more processes and
    # context switches, 0.2-0.3 ms more of it a push, and a p99 of 244-293 ms where -w 2 had 146-179
    "after": ["-w", "2", "-k", "gthread", "--threads", "8", "--reuse-port"],
}
PER_TASK = {"before": "1", "threads": "1", "after": "20"}
NICE = {"before": 0, "threads": 0, "after": 10}  # the README runs workers at a lower CPU priority
TOKEN_CACHE = {"before": "0", "threads": "0", "after": "5"}  # the README's production setting


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Stack:
    """gunicorn and one celery worker process (two pool processes) on one scratch database."""

    def __init__(self, url: str, mode: str, log_dir: Path, nice: int, api: list[str],
                 code: Path = ROOT) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.queue = f"smallpush-{uuid.uuid4().hex[:6]}"
        self.worker_log = log_dir / f"worker-{mode}.log"
        env = dict(os.environ, GATEWAY_DATABASE_URL=url, GATEWAY_BROKER_URL=REDIS, GATEWAY_SECRET_KEY="bench",
                   GATEWAY_ISSUER=self.base, GATEWAY_TASK_QUEUE=self.queue, GATEWAY_LOG_FORMAT="text",
                   GATEWAY_RATELIMIT_PUSH="100000/minute", GATEWAY_RATELIMIT_TENANT_PUSH="1000000/minute",
                   GATEWAY_RATELIMIT_READ="100000/minute",
                   # on, as in production: importing tests.conftest turned them off in this environment
                   GATEWAY_RATELIMIT_ENABLED="true",
                   GATEWAY_SMALL_BATCHES_PER_TASK=PER_TASK[mode], PYTHONPATH=str(code),
                   GATEWAY_TOKEN_CACHE_SECONDS=TOKEN_CACHE[mode])
        self.api = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *api, "-b", f"127.0.0.1:{self.port}",
             "--limit-request-line", "0", "gateway:create_app()"],
            env=env | {"GATEWAY_LOG_LEVEL": "WARNING"}, cwd=code, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        with open(self.worker_log, "w") as log:
            self.worker = subprocess.Popen(
                ["nice", "-n", str(nice), sys.executable, "-m", "celery", "-A", "workers.app", "worker",
                 "--concurrency=2", "--loglevel=INFO", "--without-gossip", "--without-mingle",
                 "-n", f"smallpush-{mode}@%h"],
                env=env, cwd=code, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.base}/healthz", timeout=10)
                return
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.3)
        raise SystemExit("the API did not start")

    def api_pids(self) -> list[int]:
        """The gunicorn worker processes (children of the arbiter)."""
        children = Path(f"/proc/{self.api.pid}/task/{self.api.pid}/children").read_text()
        return [int(pid) for pid in children.split()]

    def api_cpu(self) -> list[float]:
        """CPU seconds used so far by each gunicorn worker process."""
        seconds = []
        for child in self.api_pids():
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            seconds.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return seconds

    def coalesced(self) -> int:
        return self.worker_log.read_text(errors="replace").count("merged in the task of batch")

    def tasks(self) -> int:
        """process_batch tasks the worker ran (celery logs each one it finished)."""
        return sum(1 for line in self.worker_log.read_text(errors="replace").splitlines()
                   if "Task workers.tasks.process_batch[" in line and " succeeded in " in line)

    def stop(self) -> None:
        for process in (self.api, self.worker):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in (self.api, self.worker):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        redis.Redis.from_url(REDIS).delete(self.queue)


def _machine_cpu() -> tuple[float, float]:
    """(busy, all) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), sum(fields[:8]) / os.sysconf("SC_CLK_TCK")


def _cpu_by_program() -> dict[str, float]:
    """CPU seconds so far of every process on the machine, added up by program name (postgres,
    redis-server, python...); a process that ended in between is missed."""
    seconds: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text.split(" (", 1)[1].rsplit(")", 1)
        fields = rest.split()
        used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        seconds[name] = seconds.get(name, 0.0) + used
    return seconds


def _sessions(url: str) -> int:
    """Connections opened to the database so far (PostgreSQL's statistics; they lag a little)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
                            ).fetchone()[0]


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def _open_batches(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM batches "
                            "WHERE status IN ('accepted', 'processing')").fetchone()[0]


def _outcome(url: str, findings: int) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT status, count(*), sum((counts->>'created')::int), "
                            "sum(attempts) FROM batches WHERE tenant_id = "
                            "(SELECT id FROM tenants WHERE external_id = 'bench') GROUP BY status").fetchall()
        stored = conn.execute("SELECT count(*) FROM findings").fetchone()[0]
    right = all(status == "succeeded" for status, *_ in rows)
    return (", ".join(f"{n} {status} ({created} created, {attempts} attempts)"
                      for status, n, created, attempts in rows)
            + f"; {stored} findings stored" + ("" if right else "  <-- NOT ALL SUCCEEDED"))


def run(mode: str, pushes: int, clients: int, size: int, log_dir: Path, worker_nice: int | None,
        api_args: list[str] | None = None, py_spy: str | None = None, skip_merge: bool = False,
        pause_worker: bool = False, py_spy_idle: bool = True, code: Path = ROOT) -> None:
    api = API[mode] if api_args is None else api_args
    name, url = create_database(f"smallpush_{mode}")
    try:
        upgrade(url)
        app = create_app({"DATABASE_URL": url, "BROKER_URL": REDIS, "SECRET_KEY": "bench",
                          "RATELIMIT_ENABLED": False, "LOG_LEVEL": "WARNING"})
        gw = Gateway(app)
        tenant = gw.tenant("bench")
        headers = [gw.partner(f"Scanner {n}", [tenant]) for n in range(clients)]
        app.extensions["gateway.db"].dispose()
        bodies = [document([finding(f"p{i}-f{j}", host=f"h{i}.example.com",
                                    cves=[f"CVE-2024-{100000 + (i * size + j) % 900000}"])
                            for j in range(size)]) for i in range(pushes)]
        nice = NICE[mode] if worker_nice is None else worker_nice
        stack = Stack(url, mode, log_dir, nice, api, code)
        try:
            def warm(index: int) -> None:  # every API process's and thread's first requests are not
                session = requests.Session()  # timed (the pool's connections, the first queries)
                for i in range(2):
                    session.post(f"{stack.base}/api/v1/tenants/{tenant}/batches?format=canonical",
                                 data=document([finding(f"warm-{index}-{i}", host=f"w{index}.example.com")]),
                                 headers=headers[index] | {"Content-Type": "application/json"}, timeout=60)

            with ThreadPoolExecutor(max_workers=clients) as pool:
                list(pool.map(warm, range(clients)))
            while _open_batches(url):
                time.sleep(0.2)
            latencies: list[float] = []
            refused: list[str] = []
            lock = threading.Lock()

            def client(index: int) -> None:
                # The request's head and body in one write on a keep-alive socket, read back with
                # http.client: requests (urllib3) writes the body apart, and with fifty client threads
                # sharing this process's GIL that second write could wait for it, and the API's request
                # thread with it (py-spy showed a quarter of the request threads' time spent so).
                sock = socket.create_connection(("127.0.0.1", stack.port), timeout=120)
                head = (f"POST /api/v1/tenants/{tenant}/batches?format=canonical HTTP/1.1\r\n"
                        f"Host: 127.0.0.1:{stack.port}\r\nContent-Type: application/json\r\n"
                        f"Authorization: {headers[index]['Authorization']}\r\n")
                for body in bodies[index::clients]:
                    started = time.perf_counter()
                    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    answer = http.client.HTTPResponse(sock)
                    answer.begin()
                    text = answer.read()
                    elapsed = time.perf_counter() - started
                    with lock:
                        latencies.append(elapsed)
                        if answer.status != 202:
                            refused.append(f"{answer.status} {text[:200]!r}")
                sock.close()

            print(f"{mode:8} pushing (API pid {stack.api.pid})", flush=True)
            cpu_before = stack.api_cpu()
            spies = [subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid),
                                       "-r", "100", "--idle" if py_spy_idle else "--gil", "--nonblocking",
                                       "-f", "raw",
                                       "-o", str(Path(py_spy) / f"api-{pid}.txt")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for pid in stack.api_pids()] if py_spy else []
            if pause_worker:  # the worker (and so its merges' statements) stopped while the pushes run
                os.killpg(stack.worker.pid, signal.SIGSTOP)
            sessions = _sessions(url)
            machine, programs = _machine_cpu(), _cpu_by_program()
            started, client_cpu = time.perf_counter(), time.process_time()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                list(pool.map(client, range(clients)))
            pushed, client_cpu = time.perf_counter() - started, time.process_time() - client_cpu
            busy = [after - before for before, after in zip(machine, _machine_cpu(), strict=True)]
            programs = {name: value - programs.get(name, 0.0) for name, value in _cpu_by_program().items()}
            if pause_worker:
                os.killpg(stack.worker.pid, signal.SIGCONT)
            for spy in spies:  # py-spy writes its profile when interrupted
                spy.send_signal(signal.SIGINT)
                spy.wait()
            time.sleep(1)  # the statistics of the sessions that ended reach pg_stat_database
            sessions = _sessions(url) - sessions - 1
            api_cpu = [after - before for before, after in zip(cpu_before, stack.api_cpu(), strict=False)]
            while _open_batches(url) and not skip_merge:
                time.sleep(0.05)
            merged = time.perf_counter() - started
            ms = [value * 1000 for value in latencies]
            print(f"{mode:8} API gunicorn {' '.join(api)}, SMALL_BATCHES_PER_TASK={PER_TASK[mode]}, "
                  f"workers at nice {nice}: "
                  f"{pushes} pushes x {size} findings, {clients} clients")
            print(f"         202 latency ms: p50 {_percentile(ms, 0.5):.0f}, p90 {_percentile(ms, 0.9):.0f}, "
                  f"p99 {_percentile(ms, 0.99):.0f}, max {max(ms):.0f}, mean {statistics.fmean(ms):.0f}; "
                  f"{pushes / pushed:.0f} pushes/s accepted ({pushed:.1f}s); refused: {len(refused)}"
                  + (f" e.g. {refused[0]}" if refused else ""))
            print("         CPU seconds of each API process during the pushes: "
                  + ", ".join(f"{value:.1f}" for value in api_cpu)
                  + f" ({sum(api_cpu) * 1000 / pushes:.2f} ms a push); the bench's client threads "
                  + f"{client_cpu * 1000 / pushes:.2f} ms a push; the machine's cores busy "
                  + f"{100 * busy[0] / busy[1]:.0f}% of the time ({busy[0] * 1000 / pushes:.2f} ms a push)"
                  + ("; the worker was paused during the pushes" if pause_worker else ""))
            print("         CPU ms a push by program: " + ", ".join(
                f"{name} {value * 1000 / pushes:.2f}"
                for name, value in sorted(programs.items(), key=lambda kv: -kv[1])
                if value * 1000 / pushes >= 0.05) + f"; PostgreSQL connections opened: {sessions}")
            print(f"         all merged {merged:.1f}s after the first push ({pushes / merged:.0f} batches/s, "
                  f"{pushes * size / merged:.0f} findings/s); merged in another batch's task: "
                  f"{stack.coalesced()}; process_batch tasks run (warm-up included): {stack.tasks()}")
            print(f"         {_outcome(url, pushes * size)}; load average after: "
                  + " ".join(f"{value:.1f}" for value in os.getloadavg()))
        finally:
            stack.stop()
    finally:
        drop_database(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=list(API), default=["before", "after"])
    parser.add_argument("--pushes", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--findings", type=int, default=10, help="findings per push")
    parser.add_argument("--worker-nice", type=int, help="the workers' nice value (default: the mode's)")
    parser.add_argument("--api", help="gunicorn's options instead of the mode's, e.g. "
                                      "'-w 4 -k gthread --threads 16'")
    parser.add_argument("--py-spy", metavar="DIR", help="record the API processes' wall time during the "
                                                        "pushes (py-spy, raw, one file per process) into DIR")
    parser.add_argument("--py-spy-cpu", action="store_true",
                        help="with --py-spy: only the samples of the thread holding the GIL "
                             "(Python CPU, not wall time)")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="run the API and the worker from this checkout (e.g. an exported main) "
                             "with this script's client: both sides measured by one command")
    parser.add_argument("--skip-merge", action="store_true", help="do not wait for the merges (profiling)")
    parser.add_argument("--pause-worker", action="store_true",
                        help="stop the worker (SIGSTOP) while the timed pushes run, then let it merge: "
                             "the API's latency without the merges competing for the cores")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a killed run still stops its servers
    with tempfile.TemporaryDirectory(prefix="smallpush-") as log_dir:
        for mode in args.modes:
            run(mode, args.pushes, args.clients, args.findings, Path(log_dir), args.worker_nice,
                args.api.split() if args.api else None, args.py_spy, args.skip_merge, args.pause_worker,
                not args.py_spy_cpu, args.code.resolve())


if __name__ == "__main__":
    main()
