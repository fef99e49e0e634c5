"""Streamed pushes: a body far larger than the API process's memory bound is stored piece by piece
through a real gunicorn process; gzip bombs are refused early; a push that fails half-way leaves
nothing; an abandoned one is swept; the merge of a streamed push is that of the same bytes."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway import streaming
from gateway.ingest import Push
from gateway.models import Batch, BatchBlob, utcnow
from tests.bigfiles import nessus_hosts, nessus_size
from tests.conftest import QUEUE, REDIS_URL, ROOT, SECRET
from tests.factories import document, finding
from tests.test_limits import limited  # noqa: F401 - the fixture

MIB = 1 << 20


def _post(gw, tenant, headers, body, content_type="application/json", extra=None, query="format=canonical"):
    return gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?{query}",
        data=body,
        headers=headers | {"Content-Type": content_type} | (extra or {}),
    )


def _count(gw, model) -> int:
    with gw.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def _big_document(count: int) -> bytes:
    noise = random.Random(14)  # descriptions that do not compress a hundredfold
    return document(
        [
            finding(
                f"s-{i}",
                host=f"h{i % 40}.example.com",
                cves=(f"CVE-2024-{1000 + i % 300}",),
                description=noise.randbytes(1250).hex(),
            )
            for i in range(count)
        ]
    )


def test_a_streamed_push_merges_as_the_same_bytes_read_whole(gw):
    """A 3 MiB canonical push is stored in 1 MiB pieces, checked (envelope), merged like any push."""
    body = _big_document(1100)
    assert len(body) > 2 * MIB
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    response = _post(gw, tenant, headers, body, extra={"Idempotency-Key": "big-1"})
    assert response.status_code == 202, response.get_json()
    batch = gw.http.get(
        response.headers["Location"].replace("http://localhost", ""), headers=headers
    ).get_json()
    assert (
        batch["status"] == "succeeded" and batch["bodySize"] == len(body) and batch["bodyCheck"] == "passed"
    )
    assert batch["counts"]["created"] == 1100 and batch["counts"]["received"] == 1100
    with gw.db.sessions() as session:
        pieces = session.scalars(
            select(BatchBlob.data).where(BatchBlob.batch_id == int(batch["id"])).order_by(BatchBlob.seq)
        ).all()
    assert [len(p) for p in pieces[:-1]] == [MIB] * (len(pieces) - 1) and b"".join(pieces) == body
    # The same key and bytes replay the batch (read through the hash only); other bytes are 409.
    again = _post(gw, tenant, headers, body, extra={"Idempotency-Key": "big-1"})
    assert again.status_code == 202 and again.get_json()["id"] == batch["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = _post(gw, tenant, headers, body.replace(b"s-1", b"s-X", 1), extra={"Idempotency-Key": "big-1"})
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "idempotencyKeyReused"
    # gzip on the way in gives the same stored bytes and the same merge (nothing new).
    zipped = _post(gw, tenant, headers, gzip.compress(body), extra={"Content-Encoding": "gzip"})
    assert zipped.status_code == 202
    second = gw.http.get(
        zipped.headers["Location"].replace("http://localhost", ""), headers=headers
    ).get_json()
    assert second["bodySha256"] == batch["bodySha256"] and second["counts"]["unchanged"] == 1100


def test_checks_on_the_way_refuse_and_leave_nothing(gw):
    """Entity declarations, a wrong provider, malformed XML after the first MiB: 400/403, no batch kept."""
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    hosts = b"".join(nessus_hosts(size=3 * MIB))
    entity = b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY a "aaaa">]>\n' + hosts[hosts.index(b"<Nessus") :]
    refused = _post(gw, tenant, headers, entity, "application/xml", query="format=nessus")
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "malformedBody"
    assert (
        "DOCTYPE" in refused.get_json()["error"]["message"]
        or "subset" in refused.get_json()["error"]["message"]
    )
    broken = hosts[: 2 * MIB] + b"<ReportHost><</ReportHost>" + hosts[2 * MIB :]
    malformed = _post(gw, tenant, headers, broken, "application/xml", query="format=nessus")
    assert malformed.status_code == 400 and "not well-formed XML" in malformed.get_json()["error"]["message"]
    wrong = _post(gw, tenant, headers, _big_document(900)[:-1] + b', "provider": "Qualys"}')
    assert wrong.status_code == 403 and wrong.get_json()["error"]["code"] == "wrongProvider"
    truncated = _post(gw, tenant, headers, _big_document(900)[:-3])
    assert truncated.status_code == 400 and truncated.get_json()["error"]["code"] == "malformedBody"
    assert _count(gw, Batch) == 0 and _count(gw, BatchBlob) == 0
    good = _post(gw, tenant, headers, hosts, "application/xml", query="format=auto")
    assert good.status_code == 202 and good.get_json()["format"] == "nessus"


def test_a_gzip_bomb_is_refused_after_reading_little(gw):
    """A body expanding past GZIP_MAX_RATIO is 413 once its output passes 1 MiB, not at the size limit."""
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = compressor.compress(document([finding("b-1")])[:-2] + b" " * (128 * MIB)) + compressor.compress(
        b"]}"
    )
    bomb += compressor.flush()
    assert len(bomb) < 200_000  # ratio about 1000: over the default 100
    response = _post(gw, tenant, headers, bomb, extra={"Content-Encoding": "gzip"})
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "gzipRatioExceeded"
    gw.app.config["GZIP_MAX_RATIO"] = 2000  # allowed by ratio: the size limit still holds
    gw.app.config["MAX_BODY_BYTES"] = 64 * MIB
    response = _post(gw, tenant, headers, bomb, extra={"Content-Encoding": "gzip"})
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "payloadTooLarge"
    assert _count(gw, Batch) == 0 and _count(gw, BatchBlob) == 0


def test_an_abandoned_receiving_batch_is_failed_by_the_sweep(gw):
    """A process killed mid-body leaves ``receiving``: the sweep fails it, drops its bytes, frees its key."""
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    with gw.db.sessions() as session:
        from gateway.models import OAuthClient, Tenant

        tenant_pk = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        client_pk = session.scalar(select(OAuthClient.id))
    push = Push(
        tenant_id=tenant_pk,
        client_pk=client_pk,
        provider="Qualys",
        format="canonical",
        content_type="application/json",
        content_encoding="",
        declared_length=None,
        scan_type="unspecified",
        idempotency_key="k-1",
    )
    body = _big_document(900)

    def dies_half_way():
        yield body[MIB : 2 * MIB]
        raise SystemExit("killed")  # what a killed process leaves: no cleanup ran below this point

    batch_id = streaming._begin(gw.db, push, 600)
    writer = streaming.PieceWriter(gw.db, batch_id, 600)
    writer.write(body[:MIB])
    assert _count(gw, BatchBlob) == 1
    listed = gw.http.get(f"/api/v1/tenants/{tenant}/batches?status=receiving", headers=headers).get_json()
    assert [b["id"] for b in listed["value"]] == [str(batch_id)]
    busy = _post(gw, tenant, headers, body, extra={"Idempotency-Key": "k-1"})
    assert busy.status_code == 409 and busy.get_json()["error"]["code"] == "idempotencyKeyInProgress"
    assert streaming.fail_abandoned(gw.db) == 0  # still within RECEIVING_TIMEOUT_SECONDS
    assert streaming.fail_abandoned(gw.db, utcnow() + timedelta(seconds=601)) == 1
    failed = gw.http.get(f"/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers).get_json()
    assert failed["status"] == "failed" and "stopped arriving" in failed["error"]
    assert _count(gw, BatchBlob) == 0
    retried = _post(gw, tenant, headers, body, extra={"Idempotency-Key": "k-1"})  # the key is free again
    assert retried.status_code == 202 and retried.get_json()["id"] != str(batch_id)
    with pytest.raises(SystemExit):  # a request that fails on the way discards its batch itself
        streaming.store_streamed(
            gw.db,
            push.__class__(**{**push.__dict__, "idempotency_key": None}),
            body[:MIB],
            dies_half_way(),
            check_limit=1 << 30,
            declared_length=None,
            timeout_seconds=600,
        )
    assert _count(gw, Batch) == 2


# -- memory, through the production server ---------------------------------------------------------


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _gunicorn_worker(master: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise AssertionError("gunicorn started no worker")


def test_the_api_process_memory_stays_flat_for_a_body_many_times_its_bound(gw, store_url):
    """160 MiB of Nessus XML through gunicorn (the README's command, one worker): the worker's peak
    RSS grows by less than 40 MiB, a quarter of the body, and the stored bytes are the body's."""
    from tests.test_cli import _documented_gunicorn_command, _free_port

    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    words = _documented_gunicorn_command()
    port = _free_port()
    for option, value in (("-b", f"127.0.0.1:{port}"), ("-w", "1")):
        words[words.index(option) + 1] = value
    env = dict(
        os.environ,
        GATEWAY_DATABASE_URL=store_url,
        GATEWAY_BROKER_URL=REDIS_URL,
        GATEWAY_SECRET_KEY=SECRET,
        GATEWAY_TASK_QUEUE=QUEUE,
        GATEWAY_ISSUER="http://127.0.0.1",
        PYTHONPATH=str(ROOT),
    )
    server = subprocess.Popen(
        [sys.executable, "-m", *words],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    size = 160 * MIB
    bound_kib = 40 * 1024
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
        worker = _gunicorn_worker(server.pid)

        def push(chunks, length):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            try:
                connection.request(
                    "POST",
                    f"/api/v1/tenants/{tenant}/batches?format=nessus",
                    body=chunks,
                    headers={**headers, "Content-Type": "application/xml", "Content-Length": str(length)},
                )
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        warm = 3 * MIB  # the first streamed push loads what every later one uses
        status, body = push(nessus_hosts(size=warm), nessus_size(size=warm))
        assert status == 202, body
        before = _peak_rss_kib(worker)
        status, body = push(nessus_hosts(size=size), nessus_size(size=size))
        assert status == 202, body
        grown = _peak_rss_kib(worker) - before
        assert grown < bound_kib and 4 * bound_kib * 1024 <= size, (grown, bound_kib)
        print(f"API worker peak RSS grew {grown} KiB for a {size // MIB} MiB body")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    with gw.db.sessions() as session:
        batch = session.get(Batch, int(body["id"]))
        pieces = session.scalar(
            select(func.count()).select_from(BatchBlob).where(BatchBlob.batch_id == batch.id)
        )
    assert batch.status == "accepted" and batch.body_size == nessus_size(size=size)
    assert batch.body_check == "passed" and pieces == -(-batch.body_size // MIB)


def test_push_bytes_are_counted_as_they_arrive(limited):  # noqa: F811 - the fixture
    """A streamed body counts against the bytes quota piece by piece: a gzip body (no declared
    size) that runs past what is left is 429 half-way and leaves nothing; past the whole quota, 413."""
    gw = limited(RATELIMIT_PUSH_BYTES_PER_MINUTE=3 * MIB + MIB // 2)
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    body = _big_document(800)  # about 2.4 MiB
    assert 2 * MIB < len(body) < 3 * MIB
    first = _post(gw, tenant, headers, gzip.compress(body), extra={"Content-Encoding": "gzip"})
    assert first.status_code == 202
    second = _post(gw, tenant, headers, gzip.compress(body), extra={"Content-Encoding": "gzip"})
    assert second.status_code == 429 and "bytes pushed" in second.get_json()["error"]["message"]
    assert _count(gw, Batch) == 1 and _count(gw, BatchBlob) == 3
    whole = limited(RATELIMIT_PUSH_BYTES_PER_MINUTE=2 * MIB)
    tenant = whole.tenant()
    headers = whole.partner("Qualys", [tenant])
    too_big = _post(whole, tenant, headers, gzip.compress(body), extra={"Content-Encoding": "gzip"})
    assert too_big.status_code == 413 and "push quota" in too_big.get_json()["error"]["message"]
