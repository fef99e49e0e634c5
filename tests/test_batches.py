"""Batches: the list, live progress, every rejected record paged, why stale, refusing malformed bodies."""

from __future__ import annotations

import threading
import time

from gateway.models import Batch
from gateway.pipeline import process_batch
from tests.factories import document, finding

FIXTURE_NESSUS = "tests/fixtures/nessus_v2_xml/nessus_with_cvssv3.nessus"


def _push(gw, tenant, headers, body, query="format=canonical", content_type="application/json"):
    return gw.http.post(f"/api/v1/tenants/{tenant}/batches?{query}", data=body,
                        headers=headers | {"Content-Type": content_type})


def _get(gw, url, headers):
    response = gw.http.get(url.replace("http://localhost", ""), headers=headers)
    return response.status_code, response.get_json()


def test_list_filters_pages_and_scopes_by_client(gw):
    tenant = gw.tenant()
    reader = gw.partner("Qualys", [tenant], scopes="security.read")
    pusher = gw.partner("Qualys", [tenant], scopes="findings.write")
    other = gw.partner("Tenable", [tenant], scopes="findings.write")
    ids = [_push(gw, tenant, pusher, document([finding(f"q-{i}")])).get_json()["id"] for i in range(5)]
    theirs = _push(gw, tenant, other, document([finding("t-1")])).get_json()["id"]
    base = f"/api/v1/tenants/{tenant}/batches"

    status, body = _get(gw, base, reader)
    assert status == 200 and [b["id"] for b in body["value"]] == [theirs, *reversed(ids)]
    status, body = _get(gw, base, pusher)  # a provider client sees only its own pushes
    assert [b["id"] for b in body["value"]] == list(reversed(ids))

    seen, url = [], base + "?$top=2"
    while url:
        status, body = _get(gw, url, reader)
        assert status == 200 and len(body["value"]) <= 2
        seen += [b["id"] for b in body["value"]]
        url = body.get("@odata.nextLink")
    assert seen == [theirs, *reversed(ids)]

    status, body = _get(gw, base + "?status=succeeded&format=canonical", reader)
    assert len(body["value"]) == 6
    assert _get(gw, base + "?status=failed", reader)[1]["value"] == []
    first = body["value"][-1]["receivedAt"]
    status, body = _get(gw, base + "?receivedAfter=" + first.replace("+", "%2B"), reader)
    assert len(body["value"]) == 5
    assert _get(gw, base + "?receivedBefore=2000-01-01T00:00:00Z", reader)[1]["value"] == []
    for bad in ("?status=nope", "?receivedAfter=yesterday", "?$top=0", "?$skiptoken=forged", "?format=nope"):
        status, body = _get(gw, base + bad, reader)
        assert status == 400 and body["error"]["message"], bad
    # a token of one query does not serve another
    token_url = _get(gw, base + "?$top=1", reader)[1]["@odata.nextLink"]
    status, body = _get(gw, token_url.replace("$top=1", "$top=1&status=failed"), reader)
    assert status == 400 and body["error"]["code"] == "invalidSkipToken"

    stranger = gw.partner("Qualys", [gw.tenant()], scopes="security.read")
    assert _get(gw, base, stranger)[0] in (403, 404)
    assert _get(gw, f"{base}/{theirs}", pusher)[0] == 404  # another client's batch


def test_every_rejected_record_is_stored_and_paged(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    records = [finding(f"bad-{i}", severity="bogus") for i in range(1200)] + [finding("good-1")]
    batch_id = _push(gw, tenant, headers, document(records)).get_json()["id"]
    status, batch = _get(gw, f"/api/v1/tenants/{tenant}/batches/{batch_id}", headers)
    assert batch["status"] == "partiallySucceeded" and batch["counts"]["rejected"] == 1200
    assert len(batch["rejections"]) == 1000 and batch["rejectionsTruncated"] is True
    assert batch["progress"]["done"] is True and batch["progress"]["recordsParsed"] == 1201
    url, seen = batch["rejectionsUrl"] + "?$top=500", []
    while url:
        status, page = _get(gw, url, headers)
        assert status == 200 and page["@odata.count"] == 1200
        seen += page["value"]
        url = page.get("@odata.nextLink")
    assert [r["seq"] for r in seen] == list(range(1200))
    assert {r["providerId"] for r in seen} == {f"bad-{i}" for i in range(1200)}
    assert all(r["reason"] for r in seen)


def test_stale_details_and_a_fallback_timestamp_loses_to_a_real_one(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    base = f"/api/v1/tenants/{tenant}/batches"
    untimed = finding("q-1", title="first")
    del untimed["providerTimestamp"], untimed["lastSeen"]
    first = _push(gw, tenant, headers, document([untimed])).get_json()["id"]
    assert _get(gw, f"{base}/{first}", headers)[1]["counts"]["created"] == 1
    # an older real scan time still wins over the receive time the first push fell back to
    second = _push(gw, tenant, headers, document([finding("q-1", title="second", ts="2020-01-01T00:00:00Z")]))
    counts = _get(gw, f"{base}/{second.get_json()['id']}", headers)[1]["counts"]
    assert counts["updated"] == 1 and counts["stale"] == 0
    # a record older than the stored real time is stale, and the batch says why
    third = _push(gw, tenant, headers, document([finding("q-1", title="third", ts="2019-01-01T00:00:00Z")]))
    batch = _get(gw, f"{base}/{third.get_json()['id']}", headers)[1]
    assert batch["counts"]["stale"] == 1
    [detail] = batch["staleDetails"]
    assert detail["providerId"] == "q-1" and detail["providerTimestamp"].startswith("2019-01-01")
    assert detail["storedProviderTimestamp"].startswith("2020-01-01")
    assert detail["storedFromBatch"] == second.get_json()["id"]


def test_malformed_bodies_are_refused_before_202(gw):
    tenant = gw.tenant()
    headers = gw.partner("Tenable", [tenant])
    with open(FIXTURE_NESSUS, "rb") as handle:
        nessus = handle.read()
    good = _push(gw, tenant, headers, nessus, "format=nessus", "application/xml")
    assert good.status_code == 202
    with gw.db.sessions() as session:
        assert session.get(Batch, int(good.get_json()["id"])).body_check == "passed"
    cut = nessus[: len(nessus) * 2 // 3]
    truncated = _push(gw, tenant, headers, cut, "format=nessus", "application/xml")
    assert truncated.status_code == 400
    message = truncated.get_json()["error"]["message"]
    assert "line" in message and "column" in message, message

    body = document([finding("q-1"), finding("q-2")])
    response = _push(gw, tenant, headers, body[:-7], "format=canonical")
    assert response.status_code == 400 and "byte offset" in response.get_json()["error"]["message"]
    tio = b'[{"asset": {"uuid": "x"}, "plugin": {"id": 1}},, ]'
    response = _push(gw, tenant, headers, tio, "format=tenable_io")
    assert response.status_code == 400 and "byte offset" in response.get_json()["error"]["message"]

    gw.app.config["WELLFORMED_CHECK_MAX_BYTES"] = 1024
    try:
        skipped = _push(gw, tenant, headers, nessus, "format=nessus", "application/xml")
        assert skipped.status_code == 202
        status, batch = _get(gw, skipped.get_json()["statusUrl"], headers)
        assert batch["bodyCheck"] == "skipped"
    finally:
        del gw.app.config["WELLFORMED_CHECK_MAX_BYTES"]


def test_progress_is_visible_while_a_merge_runs_on_postgresql(pg_gw, redis_clean):
    tenant = pg_gw.tenant()
    headers = pg_gw.partner("Qualys", [tenant])
    total = 3000
    body = document([finding(f"q-{i}", host=f"h-{i % 300}.example.com") for i in range(total)])
    batch_id = _push(pg_gw, tenant, headers, body).get_json()["id"]  # queued; no worker runs
    url = f"/api/v1/tenants/{tenant}/batches/{batch_id}"
    merge = threading.Thread(target=process_batch, args=(pg_gw.db, int(batch_id)), kwargs={"chunk_size": 100})
    merge.start()
    seen = []
    try:
        deadline = time.monotonic() + 120
        while merge.is_alive() and time.monotonic() < deadline:
            batch = _get(pg_gw, url, headers)[1]
            if batch["status"] == "processing" and batch["progress"]:
                seen.append(batch["progress"]["recordsParsed"])
            time.sleep(0.05)
    finally:
        merge.join(timeout=120)
    assert any(0 < parsed < total for parsed in seen), seen
    assert seen == sorted(seen)
    final = _get(pg_gw, url, headers)[1]
    assert final["status"] == "succeeded" and final["progress"]["recordsMerged"] == total
    assert final["progress"]["chunks"] == total // 100
