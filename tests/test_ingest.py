"""The push endpoint's checks: durable 202, idempotency, size, type, encoding, format."""

from __future__ import annotations

import gzip

from sqlalchemy import func, select

from gateway.models import Batch, BatchBlob
from tests.conftest import QUEUE
from tests.factories import document, finding


def _post(gw, tenant, headers, body, content_type="application/json", extra=None, query="format=canonical"):
    return gw.http.post(f"/api/v1/tenants/{tenant}/batches?{query}", data=body,
                        headers=headers | {"Content-Type": content_type} | (extra or {}))


def _batches(gw) -> int:
    with gw.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(Batch))


def test_202_after_bytes_are_committed(pg_gw, redis_clean):
    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Qualys", [tenant])
    body = document([finding(f"q-{i}", description="x" * 3000) for i in range(600)])  # > 1 MiB: two pieces
    response = _post(pg_gw, tenant, headers, body)
    assert response.status_code == 202
    data = response.get_json()
    assert data["status"] == "accepted" and response.headers["Location"] == data["statusUrl"]
    # the task is sent after the answer, by the process's publisher thread, which then records when
    assert pg_gw.app.extensions["gateway.publisher"].flush(timeout=60)
    with pg_gw.db.sessions() as session:
        batch = session.get(Batch, int(data["id"]))
        pieces = session.scalars(select(BatchBlob.data).where(BatchBlob.batch_id == batch.id)
                                 .order_by(BatchBlob.seq)).all()
    assert batch.status == "accepted" and batch.enqueued_at is not None
    assert len(pieces) == 2 and b"".join(pieces) == body
    assert redis_clean.llen(QUEUE) == 1  # enqueued only after the commit


def test_idempotency_key_replays_and_conflicts(pg_gw, redis_clean):
    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Qualys", [tenant])
    body = document([finding("q-1")])
    first = _post(pg_gw, tenant, headers, body, extra={"Idempotency-Key": "push-1"})
    again = _post(pg_gw, tenant, headers, body, extra={"Idempotency-Key": "push-1"})
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert redis_clean.llen(QUEUE) == 1  # no second merge
    other = _post(pg_gw, tenant, headers, document([finding("q-2")]), extra={"Idempotency-Key": "push-1"})
    assert other.status_code == 409 and other.get_json()["error"]["code"] == "idempotencyKeyReused"
    full = _post(pg_gw, tenant, headers, body, extra={"Idempotency-Key": "push-1"},
                 query="format=canonical&scanType=full")  # same bytes, another meaning
    assert full.status_code == 409 and "scanType" in full.get_json()["error"]["message"]
    assert _batches(pg_gw) == 1


def test_oversize_wrong_type_malformed_and_gzip(pg_gw, redis_clean):
    pg_gw.app.config["MAX_BODY_BYTES"] = 4096
    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Qualys", [tenant])
    big = document([finding(f"q-{i}") for i in range(40)])
    too_big = _post(pg_gw, tenant, headers, big)
    assert too_big.status_code == 413 and too_big.get_json()["error"]["code"] == "payloadTooLarge"
    bomb = gzip.compress(b'{"findings": [' + b" " * 3_000_000 + b"]}", 9)
    assert len(bomb) < 4096
    refused = _post(pg_gw, tenant, headers, bomb, extra={"Content-Encoding": "gzip"})
    assert refused.status_code == 413
    wrong_type = _post(pg_gw, tenant, headers, document([finding("q-1")]), content_type="text/plain")
    assert wrong_type.status_code == 415 and "application/json" in wrong_type.get_json()["error"]["message"]
    malformed = _post(pg_gw, tenant, headers, b'{"findings": [{"id": "q-1",')
    assert malformed.status_code == 400 and malformed.get_json()["error"]["code"] == "malformedBody"
    not_canonical = _post(pg_gw, tenant, headers, b'{"findings": {"id": 1}}')
    assert not_canonical.status_code == 400 and not_canonical.get_json()["error"]["code"] == "invalidDocument"
    bad_gzip = _post(pg_gw, tenant, headers, b"not gzip at all", extra={"Content-Encoding": "gzip"})
    assert bad_gzip.status_code == 400 and bad_gzip.get_json()["error"]["code"] == "invalidEncoding"
    unknown = _post(pg_gw, tenant, headers, document([finding("q-1")]), query="format=nope")
    assert unknown.status_code == 400 and unknown.get_json()["error"]["code"] == "unknownFormat"
    missing = _post(pg_gw, tenant, headers, document([finding("q-1")]), query="")
    assert missing.status_code == 400 and missing.get_json()["error"]["code"] == "missingFormat"
    assert _batches(pg_gw) == 0 and redis_clean.llen(QUEUE) == 0
    small = document([finding("q-1")])
    zipped = _post(pg_gw, tenant, headers, gzip.compress(small), extra={"Content-Encoding": "gzip"})
    assert zipped.status_code == 202
    with pg_gw.db.sessions() as session:
        assert b"".join(session.scalars(select(BatchBlob.data)).all()) == small


def test_broker_down_still_accepts_and_sweep_enqueues(pg_url, redis_clean):
    from tests.conftest import Gateway, make_app, wipe
    from workers.tasks import requeue

    app = make_app(pg_url, eager=False, BROKER_URL="redis://127.0.0.1:1/0")
    wipe(app.extensions["gateway.db"])
    gw = Gateway(app)
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    response = _post(gw, tenant, headers, document([finding("q-1")]))
    assert response.status_code == 202  # durable in the store although the broker is down
    assert app.extensions["gateway.publisher"].flush(timeout=60)  # the send was tried and failed
    with gw.db.sessions() as session:
        assert session.scalar(select(Batch.enqueued_at)) is None
    working = make_app(pg_url, eager=False)
    with working.app_context():
        assert requeue(working.extensions["gateway.db"], older_than_seconds=0) == 1
    assert redis_clean.llen(QUEUE) == 1
    app.extensions["gateway.db"].dispose()
    working.extensions["gateway.db"].dispose()


def test_a_small_push_is_one_call_to_the_rate_limit_storage_and_an_early_answer_still_counts(pg_url):
    """Rate limits on Redis: a small push's client and tenant requests and its declared bytes are
    counted by one script call (gateway/ratelimit.py), the same counters as before; a push
    answered before its body (unknown tenant) still counts its client's request."""
    import uuid

    from tests.conftest import REDIS_URL, Gateway, make_app, wipe

    app = make_app(pg_url, eager=True, RATELIMIT_ENABLED=True, RATELIMIT_STORAGE_URL=REDIS_URL,
                   RATELIMIT_KEY_PREFIX=f"gw-test-{uuid.uuid4().hex[:8]}", RATELIMIT_PUSH="3/hour",
                   RATELIMIT_TENANT_PUSH="10/hour", RATELIMIT_PUSH_BYTES_PER_MINUTE=100_000,
                   RATELIMIT_TENANT_PUSH_BYTES_PER_MINUTE=100_000)
    try:
        wipe(app.extensions["gateway.db"])
        gw = Gateway(app)
        tenant = gw.tenant()
        headers = gw.partner("Qualys", [tenant])
        limits = app.extensions["gateway.limits"]
        calls = []
        script = limits.script

        def counting(*args, **kwargs):
            calls.append(kwargs.get("keys"))
            return script(*args, **kwargs)

        limits.script = counting
        body = document([finding("f-1")])
        response = _post(gw, tenant, headers, body)
        assert response.status_code == 202, response.get_json()
        assert len(calls) == 1 and len(calls[0]) == 4  # client, tenant, client bytes, tenant bytes
        assert response.headers["RateLimit-Limit"] == "3" and response.headers["RateLimit-Remaining"] == "2"
        client_bytes, tenant_bytes = (int(limits.storage.get_connection().get(key)) for key in calls[0][2:])
        assert client_bytes == tenant_bytes == len(body)
        assert _post(gw, "no-such-tenant", headers, body).status_code == 404  # counted at its end
        response = _post(gw, tenant, headers, body)
        assert response.status_code == 202 and response.headers["RateLimit-Remaining"] == "0"
        refused = _post(gw, tenant, headers, body)
        assert refused.status_code == 429 and "this client" in refused.get_json()["error"]["message"]
    finally:
        app.extensions["gateway.db"].dispose()
