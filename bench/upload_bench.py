"""A large Nessus file pushed end to end: streamed in one request, or as a multipart upload.

    .venv/bin/python bench/upload_bench.py --size 1GB [--workers 1] [--parts 64MB] [--gzip]

Creates a scratch PostgreSQL database, starts the API under gunicorn (one worker process, as the
README runs it) and ``--workers`` celery worker processes on Redis (bench/million.py ``Stack``),
writes a synthetic Nessus v2 file of about ``--size`` bytes (tests/bigfiles.py, 100 findings a
host), and pushes it over HTTP:

* one streamed request (``Content-Length``, or gzip when ``--gzip``): seconds to the 202, the
  rate the API stored the body at, the peak RSS of the API's gunicorn worker process;
* with ``--parts SIZE``, the same bytes again as a multipart upload in parts of SIZE (each with
  its SHA-256): seconds for the parts, seconds for the completion's 202;
* with ``--workers N`` (N > 0), each batch is then waited for: merge seconds, findings/s end to
  end (from the request to the batch's final status), the workers' peak RSS.

A warm-up push runs first.  Figures, not assertions.  The scratch database, file and Redis queue
are removed at the end, also on error.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest_bench import create_database, drop_database  # noqa: E402
from bench.million import Stack, _peak_rss_mib, _tree  # noqa: E402
from gateway import create_app  # noqa: E402
from gateway.migrate import upgrade  # noqa: E402
from tests.bigfiles import nessus_file, nessus_hosts  # noqa: E402
from tests.conftest import Gateway  # noqa: E402

UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def size_arg(text: str) -> int:
    """ "1GB", "200MiB", "5000000" as bytes."""
    upper = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * UNITS[unit])
    return int(upper)


def api_peak(stack: Stack) -> float:
    return max((_peak_rss_mib(pid) for pid in _tree(stack.api.pid)[1:]), default=0.0)


def wait(stack: Stack, tenant: str, headers: dict, batch_id: str) -> dict:
    while True:
        batch = requests.get(
            f"{stack.base}/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers, timeout=60
        ).json()
        if batch["status"] not in ("receiving", "accepted", "processing"):
            return batch
        time.sleep(0.5)


def push_file(
    stack: Stack, tenant: str, headers: dict, path: Path, encoding: str | None
) -> tuple[str, float]:
    """One streamed request of the file; (batch id, seconds to the 202)."""
    extra = {"Content-Encoding": encoding} if encoding else {}
    started = time.perf_counter()
    with path.open("rb") as body:
        response = requests.post(
            f"{stack.base}/api/v1/tenants/{tenant}/batches?format=nessus",
            data=body,
            headers=headers | extra | {"Content-Type": "application/xml"},
            timeout=7200,
        )
    seconds = time.perf_counter() - started
    if response.status_code != 202:
        raise SystemExit(f"push answered {response.status_code}: {response.text[:300]}")
    return response.json()["id"], seconds


def upload_file(
    stack: Stack, tenant: str, headers: dict, path: Path, part_size: int, encoding: str | None
) -> tuple[str, float, float]:
    """The file as a multipart upload; (batch id, seconds for the parts, seconds for the completion)."""
    base = f"{stack.base}/api/v1/tenants/{tenant}/uploads"
    created = requests.post(
        base,
        json={"format": "nessus", "contentEncoding": encoding or "identity"},
        headers=headers,
        timeout=60,
    )
    created.raise_for_status()
    upload_id = created.json()["id"]
    started = time.perf_counter()
    with path.open("rb") as source:
        number = 1
        while part := source.read(part_size):
            response = requests.put(
                f"{base}/{upload_id}/parts/{number}",
                data=part,
                timeout=3600,
                headers=headers | {"x-checksum-sha256": hashlib.sha256(part).hexdigest()},
            )
            if response.status_code not in (200, 201):
                raise SystemExit(f"part {number} answered {response.status_code}: {response.text[:300]}")
            number += 1
    parts = time.perf_counter() - started
    started = time.perf_counter()
    response = requests.post(f"{base}/{upload_id}/complete", headers=headers, timeout=7200)
    if response.status_code != 202:
        raise SystemExit(f"completion answered {response.status_code}: {response.text[:300]}")
    return response.json()["id"], parts, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=size_arg, default=10**9, help="the Nessus file's size (1GB)")
    parser.add_argument("--workers", type=int, default=1, help="celery workers; 0: time the ingest only")
    parser.add_argument("--parts", type=size_arg, default=0, help="also send it as a multipart upload")
    parser.add_argument("--gzip", action="store_true", help="send the file gzip-compressed")
    args = parser.parse_args()

    name, url = create_database("gw_upload")
    scratch = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    stack = None
    try:
        upgrade(url)
        app = create_app(
            {
                "DATABASE_URL": url,
                "BROKER_URL": "memory://",
                "SECRET_KEY": "bench",
                "RATELIMIT_ENABLED": False,
            }
        )
        gw = Gateway(app)
        path = scratch / "scan.nessus"
        size = nessus_file(path, size=args.size)
        findings = sum(chunk.count(b"<ReportItem ") for chunk in nessus_hosts(size=args.size))
        encoding = None
        if args.gzip:
            with path.open("rb") as raw, gzip.open(scratch / "scan.nessus.gz", "wb", compresslevel=6) as out:
                shutil.copyfileobj(raw, out, 1 << 20)
            path.unlink()
            path, encoding = scratch / "scan.nessus.gz", "gzip"
        sent = path.stat().st_size
        print(
            f"Nessus file: {size / 1e6:,.0f} MB, {findings:,} findings"
            + (f", {sent / 1e6:,.0f} MB gzip" if encoding else ""),
            flush=True,
        )
        stack = Stack(url, args.workers, GATEWAY_MAX_BODY_BYTES=str(max(8 << 30, 2 * size)))
        warm = gw.tenant()
        warm_headers = gw.partner("Tenable", [warm], scopes="findings.write")
        small = scratch / "warm.nessus"
        nessus_file(small, size=3 << 20)
        push_file(stack, warm, warm_headers, small, None)
        before = api_peak(stack)
        tenant = gw.tenant()
        headers = gw.partner("Tenable", [tenant], scopes="findings.write")
        started = time.perf_counter()
        batch_id, accepted = push_file(stack, tenant, headers, path, encoding)
        print(
            f"streamed push: 202 after {accepted:,.1f} s ({sent / 1e6 / accepted:,.0f} MB/s sent); "
            f"API gunicorn worker peak RSS {api_peak(stack):,.0f} MiB (before the push {before:,.0f} MiB)",
            flush=True,
        )
        if args.workers:
            batch = wait(stack, tenant, headers, batch_id)
            total = time.perf_counter() - started
            print(
                f"  merged: {batch['status']}, {batch['counts'].get('received', 0):,} received, "
                f"merge {total - accepted:,.1f} s; end to end {total:,.1f} s, "
                f"{findings / total:,.0f} findings/s",
                flush=True,
            )
        if args.parts:
            other = gw.tenant()
            other_headers = gw.partner("Tenable", [other], scopes="findings.write")
            started = time.perf_counter()
            batch_id, parts, completion = upload_file(stack, other, other_headers, path, args.parts, encoding)
            print(
                f"multipart upload ({args.parts / 1e6:,.0f} MB parts): parts {parts:,.1f} s, "
                f"completion's 202 after {completion:,.1f} s; API peak RSS {api_peak(stack):,.0f} MiB",
                flush=True,
            )
            if args.workers:
                batch = wait(stack, other, other_headers, batch_id)
                total = time.perf_counter() - started
                print(
                    f"  merged: {batch['status']}, end to end {total:,.1f} s, "
                    f"{findings / total:,.0f} findings/s",
                    flush=True,
                )
        print(stack.peaks(), flush=True)
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        drop_database(name)


if __name__ == "__main__":
    main()
