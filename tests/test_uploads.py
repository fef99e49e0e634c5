"""Multipart uploads: parts in any order, retried, checksummed; completion is one batch whose merge
reads exactly as a single push of the same bytes; an expired upload is gone."""

from __future__ import annotations

import base64
import gzip
import hashlib
from datetime import timedelta

from sqlalchemy import func, select

from gateway import uploads
from gateway.models import Batch, Upload, UploadPart, UploadPiece, utcnow
from tests.bigfiles import nessus_hosts

MIB = 1 << 20


def _local(url: str) -> str:
    return url.replace("http://localhost", "")


def _create(gw, tenant, headers, key=None, **body):
    extra = {"Idempotency-Key": key} if key else {}
    return gw.http.post(
        f"/api/v1/tenants/{tenant}/uploads", json={"format": "nessus", **body}, headers=headers | extra
    )


def _put(gw, tenant, headers, upload_id, number, data, sha256=None, md5=None):
    checks = {}
    if sha256 is not None:
        checks["x-checksum-sha256"] = sha256
    if md5 is not None:
        checks["Content-MD5"] = md5
    return gw.http.put(
        f"/api/v1/tenants/{tenant}/uploads/{upload_id}/parts/{number}",
        data=data,
        headers=headers | checks | {"Content-Type": "application/octet-stream"},
    )


def _complete(gw, tenant, headers, upload_id, parts=None):
    return gw.http.post(
        f"/api/v1/tenants/{tenant}/uploads/{upload_id}/complete",
        json={"parts": parts} if parts is not None else None,
        headers=headers,
    )


def _read_all(gw, tenant, headers, collection) -> list[dict]:
    rows, url = [], f"/api/v1/tenants/{tenant}/security/{collection}?$top=1000"
    while url:
        page = gw.http.get(url, headers=headers).get_json()
        assert "value" in page, page
        rows += page["value"]
        url = _local(page.get("@odata.nextLink", "")) or None
    return rows


def _comparable(value):
    """A read-API answer without what two tenants and two batches never share (ids, times, links)."""
    if isinstance(value, dict):
        return {
            k: _comparable(v)
            for k, v in value.items()
            if not (
                k == "id"
                or k.endswith(("Id", "Ids", "DateTime", "Url", "At", "Evaluated"))
                or k in ("tenant",)
            )
        }
    if isinstance(value, list):
        return sorted((_comparable(v) for v in value), key=repr)
    return value


def _count(gw, model) -> int:
    with gw.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_parts_out_of_order_and_retried_complete_into_the_batch_a_single_push_makes(gw):
    body = b"".join(nessus_hosts(size=int(1.2 * MIB)))
    cuts = [0, 300_000, 1_000_000, len(body)]
    pieces = [body[cuts[i] : cuts[i + 1]] for i in range(3)]
    single, multi = gw.tenant(), gw.tenant()
    single_headers, headers = gw.partner("Tenable", [single]), gw.partner("Tenable", [multi])

    pushed = gw.http.post(
        f"/api/v1/tenants/{single}/batches?format=nessus&scanType=full",
        data=body,
        headers=single_headers | {"Content-Type": "application/xml"},
    )
    assert pushed.status_code == 202

    created = _create(gw, multi, headers, key="up-1", scanType="full")
    assert created.status_code == 201, created.get_json()
    upload = created.get_json()
    assert upload["status"] == "open" and upload["parts"] == [] and upload["contentType"] == "application/xml"
    again = _create(gw, multi, headers, key="up-1", scanType="full")  # a retried create: the same upload
    assert again.status_code == 200 and again.get_json()["id"] == upload["id"]
    assert _create(gw, multi, headers, key="up-1").status_code == 409  # the key with another scan type
    uid = upload["id"]

    third = _put(gw, multi, headers, uid, 3, pieces[2], sha256=hashlib.sha256(pieces[2]).hexdigest())
    assert third.status_code == 201 and third.get_json()["size"] == len(pieces[2])
    md5 = base64.b64encode(hashlib.md5(pieces[0]).digest()).decode()
    assert _put(gw, multi, headers, uid, 1, pieces[0], md5=md5).status_code == 201
    # part 2 first sent with a corrupt byte: refused, naming the header; nothing of it kept
    damaged = pieces[1][:-1] + b"X"
    wrong = _put(gw, multi, headers, uid, 2, damaged, sha256=hashlib.sha256(pieces[1]).hexdigest())
    assert wrong.status_code == 400 and wrong.get_json()["error"]["code"] == "checksumMismatch"
    assert "x-checksum-sha256" in wrong.get_json()["error"]["message"]
    wrong_md5 = _put(gw, multi, headers, uid, 2, damaged, md5=md5)
    assert wrong_md5.status_code == 400 and "Content-MD5" in wrong_md5.get_json()["error"]["message"]
    missing = _put(gw, multi, headers, uid, 2, pieces[1])
    assert missing.status_code == 400 and missing.get_json()["error"]["code"] == "missingChecksum"
    early = _complete(gw, multi, headers, uid)
    assert early.status_code == 400 and "part 2 is missing" in early.get_json()["error"]["message"]
    # a part sent wrongly then again (same number): the last one counts, and a retry of it is a no-op
    sha2 = base64.b64encode(hashlib.sha256(pieces[1]).digest()).decode()
    assert (
        _put(
            gw, multi, headers, uid, 2, damaged[:1000], sha256=hashlib.sha256(damaged[:1000]).hexdigest()
        ).status_code
        == 201
    )
    assert _put(gw, multi, headers, uid, 2, pieces[1], sha256=sha2).status_code == 200
    assert _put(gw, multi, headers, uid, 2, pieces[1], sha256=sha2).status_code == 200
    listed = gw.http.get(f"/api/v1/tenants/{multi}/uploads/{uid}", headers=headers).get_json()
    assert [(p["partNumber"], p["size"], p["sha256"]) for p in listed["parts"]] == [
        (n + 1, len(p), hashlib.sha256(p).hexdigest()) for n, p in enumerate(pieces)
    ]
    with gw.db.sessions() as session:  # only the current attempt of each part is stored
        stored = session.scalar(select(func.sum(func.length(UploadPiece.data))))
    assert stored == len(body)

    wrong_list = _complete(gw, multi, headers, uid, [{"partNumber": 1, "sha256": "0" * 64}])
    assert wrong_list.status_code == 400 and wrong_list.get_json()["error"]["code"] == "uploadIncomplete"
    done = _complete(
        gw,
        multi,
        headers,
        uid,
        [{"partNumber": p["partNumber"], "sha256": p["sha256"]} for p in listed["parts"]],
    )
    assert done.status_code == 202, done.get_json()
    batch = gw.http.get(_local(done.headers["Location"]), headers=headers).get_json()
    reference = gw.http.get(_local(pushed.headers["Location"]), headers=single_headers).get_json()
    assert batch["bodySha256"] == reference["bodySha256"] == hashlib.sha256(body).hexdigest()
    assert batch["status"] == reference["status"] == "succeeded" and batch["scanType"] == "full"
    assert batch["counts"] == reference["counts"] and batch["counts"]["created"] > 0
    for collection in ("findings", "resources", "recommendations"):
        mine, theirs = (
            _read_all(gw, multi, headers, collection),
            _read_all(gw, single, single_headers, collection),
        )
        assert mine and _comparable(mine) == _comparable(theirs), collection
    # completing again answers the same batch; the parts can no longer change; the bytes are gone
    replay = _complete(gw, multi, headers, uid)
    assert replay.status_code == 202 and replay.get_json()["id"] == batch["id"]
    assert replay.headers["Idempotent-Replayed"] == "true"
    late = _put(gw, multi, headers, uid, 4, b"<x/>", sha256=hashlib.sha256(b"<x/>").hexdigest())
    assert late.status_code == 409 and late.get_json()["error"]["code"] == "uploadCompleted"
    shown = gw.http.get(f"/api/v1/tenants/{multi}/uploads/{uid}", headers=headers).get_json()
    assert shown["status"] == "completed" and shown["batchId"] == batch["id"]
    assert _count(gw, UploadPiece) == 0
    # the upload's Idempotency-Key is the batch's: a push of other bytes under it is refused
    other = gw.http.post(
        f"/api/v1/tenants/{multi}/batches?format=nessus",
        data=pieces[0] + b"</Report>",
        headers=headers | {"Content-Type": "application/xml", "Idempotency-Key": "up-1"},
    )
    assert other.status_code == 409


def test_a_gzip_upload_small_enough_to_read_whole_and_a_bad_document(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    document = b"".join(nessus_hosts(findings=30))
    zipped = gzip.compress(document)
    uid = _create(gw, tenant, headers, contentEncoding="gzip").get_json()["id"]
    half = len(zipped) // 2
    for number, data in ((2, zipped[half:]), (1, zipped[:half])):
        assert (
            _put(gw, tenant, headers, uid, number, data, sha256=hashlib.sha256(data).hexdigest()).status_code
            == 201
        )
    done = _complete(gw, tenant, headers, uid)
    assert done.status_code == 202
    batch = gw.http.get(_local(done.headers["Location"]), headers=headers).get_json()
    assert batch["bodySha256"] == hashlib.sha256(document).hexdigest() and batch["counts"]["received"] == 30
    # a document that fails the push checks leaves the upload open, to be fixed and completed again
    bad = _create(gw, tenant, headers).get_json()["id"]
    broken = document[:-40]
    assert (
        _put(gw, tenant, headers, bad, 1, broken, sha256=hashlib.sha256(broken).hexdigest()).status_code
        == 201
    )
    refused = _complete(gw, tenant, headers, bad)
    assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "malformedBody"
    assert (
        gw.http.get(f"/api/v1/tenants/{tenant}/uploads/{bad}", headers=headers).get_json()["status"] == "open"
    )
    assert gw.http.delete(f"/api/v1/tenants/{tenant}/uploads/{bad}", headers=headers).status_code == 204
    assert gw.http.get(f"/api/v1/tenants/{tenant}/uploads/{bad}", headers=headers).status_code == 404
    # another client of the same tenant never sees the upload
    stranger = gw.partner("Tenable", [tenant])
    assert gw.http.get(f"/api/v1/tenants/{tenant}/uploads/{uid}", headers=stranger).status_code == 404
    with gw.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Batch)) == 1


def test_an_expired_upload_is_gone(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    part = b"".join(nessus_hosts(findings=5))
    uid = _create(gw, tenant, headers, key="old").get_json()["id"]
    assert _put(gw, tenant, headers, uid, 1, part, sha256=hashlib.sha256(part).hexdigest()).status_code == 201
    form = gw.http.put(f"/api/v1/tenants/{tenant}/uploads/{uid}/parts/2", data=part,
                       headers=headers | {"Content-Type": "application/x-www-form-urlencoded",
                                          "x-checksum-sha256": hashlib.sha256(part).hexdigest()})
    assert form.status_code == 415 and "application/octet-stream" in form.get_json()["error"]["message"]
    assert uploads.delete_expired(gw.db) == 0  # UPLOAD_EXPIRY_SECONDS (24 h) not reached
    with gw.db.session() as session:  # a day later
        session.get(Upload, uid).expires_at = utcnow() - timedelta(seconds=1)
    for response in (
        gw.http.get(f"/api/v1/tenants/{tenant}/uploads/{uid}", headers=headers),
        _put(gw, tenant, headers, uid, 2, part, sha256=hashlib.sha256(part).hexdigest()),
        _complete(gw, tenant, headers, uid),
    ):
        assert response.status_code == 404 and "expire" in response.get_json()["error"]["message"]
    assert uploads.delete_expired(gw.db) == 1  # the beat task's work
    assert _count(gw, Upload) == _count(gw, UploadPart) == _count(gw, UploadPiece) == 0
    fresh = _create(gw, tenant, headers, key="old")  # its key is free again
    assert fresh.status_code == 201 and fresh.get_json()["id"] != uid
