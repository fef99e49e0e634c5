"""SIEM and stream destinations (issue 13): Splunk HEC, syslog CEF over TCP/TLS, NATS JetStream.

The receivers are real: loopback simulators that check what the real collectors check
(tests/siem_sim.py: HEC token, batch format, indexer acknowledgement; octet-counted RFC 5424
frames and CEF escaping) and the real ``nats-server`` with JetStream on 127.0.0.1:4222 (started by
``.ci/run``; the JetStream tests fail rather than skip under CI when it is not there).  Delivery
steps are the task functions called directly, with a clock where backoff matters; one test runs
the whole path through real Celery workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import timedelta

import pytest

from gateway.export import cef, hec, syslog
from gateway.export import nats as nats_kind
from gateway.models import ExportDestination, utcnow
from tests.conftest import wait_for
from tests.factories import finding
from tests.siem_sim import (
    HecCollector,
    SyslogCollector,
    make_certificates,
    parse_cef,
    parse_syslog,
    split_frames,
    with_jetstream,
)
from tests.test_export import SCOPES, exports_url, push, run, state, stored_events

DEST = ExportDestination.__table__
NATS_URL = os.environ.get("GATEWAY_TEST_NATS", "nats://127.0.0.1:4222")
TOKEN = "11111111-2222-3333-4444-555555555555"


def add(gw, tenant: str, headers: dict, kind: str, url: str, **fields) -> dict:
    body = {"displayName": kind, "kind": kind, "url": url} | fields
    response = gw.http.post(exports_url(tenant), json=body, headers=headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def finding_ids(gw, tenant: str, types=("finding",)) -> list[str]:
    return [str(row.id) for row in stored_events(gw, tenant) if row.subject_type in types]


@pytest.fixture
def started():
    """Simulators started by a test, stopped after it."""
    running = []

    def start(sim):
        running.append(sim)
        return sim

    yield start
    syslog.close_connections()  # the connections this thread kept to them
    for sim in running:
        sim.stop()


# -- CEF and framing ----------------------------------------------------------------------------------


def test_cef_escapes_pipes_equals_backslashes_and_newlines():
    event = {
        "id": "42",
        "sequence": 7,
        "type": "finding.created",
        "timestamp": "2024-05-01T00:00:00.250Z",
        "tenant": "t|1",
        "subjectType": "finding",
        "subjectId": "9",
        "event": "created",
        "cause": "path=C:\\temp|x\r\nnext",
        "data": {
            "title": "a|b\\c=d\ne",
            "severity": "critical",
            "cves": ["CVE-1", "CVE-2"],
            "status": "active",
        },
    }
    record = cef.format_event(event)
    assert record.startswith("CEF:0|PartnerGateway|Partner Integration Gateway|1|finding.created|")
    assert "|a\\|b\\\\c=d e|10|" in record, "header: | and \\ escaped, = kept, newline a space"
    assert "msg=path\\=C:\\\\temp|x\\nnext" in record, "extension: = and \\ escaped, | kept, newline \\n"
    assert "\n" not in record and "\r" not in record
    parsed = parse_cef(record)
    assert parsed["name"] == "a|b\\c=d e" and parsed["severity"] == 10
    assert parsed["ext"]["msg"] == "path=C:\\temp|x\nnext"
    assert parsed["ext"]["cs1"] == "t|1" and parsed["ext"]["cs1Label"] == "tenant"
    assert parsed["ext"]["externalId"] == "42" and parsed["ext"]["rt"] == "1714521600250"
    assert parsed["ext"]["cs4"] == "CVE-1,CVE-2" and parsed["ext"]["cn1"] == "7"
    with pytest.raises(ValueError):
        parse_cef("CEF:0|v|p|1|s|n|3|msg=a=b")  # an unescaped = in a value is not CEF


def test_syslog_messages_are_rfc5424_in_octet_counted_frames():
    event = {
        "id": "1",
        "type": "alert.created",
        "timestamp": "2024-05-01T00:00:00Z",
        "event": "created",
        "tenant": "t",
        "subjectType": "alert",
        "subjectId": "3",
        "data": {"severity": "high", "title": "é"},
    }
    msg = syslog.message(event, {"facility": "authpriv", "appName": "gw", "hostname": "gw 1"}, "ignored")
    buffer = bytearray(syslog.frame(msg) + syslog.frame(msg)[:10])
    frames = split_frames(buffer)
    assert frames == [msg] and len(buffer) == 10, "the count is of octets (é is two), the tail waits"
    parsed = parse_syslog(frames[0])
    assert parsed.pri == 10 * 8 + 3 and parsed.hostname == "gw1" and parsed.app == "gw"
    assert parsed.msgid == "alert.created" and parsed.timestamp == "2024-05-01T00:00:00Z"
    assert parsed.cef["name"] == "é" and parsed.cef["severity"] == 8


# -- Splunk HEC -------------------------------------------------------------------------------------------


def test_hec_batches_carry_the_token_and_wait_for_indexer_acknowledgement(gw, started):
    gw.app.config["EXPORT_PIPELINE_DEPTH"] = 1  # one request at a time: the batches are [4, 4, 2] in order
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    collector = started(HecCollector(TOKEN, ack=True, ack_after=2))
    missing = gw.http.post(
        exports_url(tenant),
        json={"displayName": "x", "kind": "splunk_hec", "url": collector.url},
        headers=headers,
    )
    assert missing.status_code == 400 and "secret" in missing.get_json()["error"]["message"]
    export = add(
        gw,
        tenant,
        headers,
        "splunk_hec",
        collector.url + "/services/collector/event",
        secret=TOKEN,
        eventTypes=["finding.*"],
        batchSize=4,
        options={"ack": True, "ackPollSeconds": 0.01, "index": "security", "sourcetype": "gw:event"},
    )
    assert "secret" not in export and export["secretHint"] and TOKEN not in json.dumps(export)
    push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{1000 + n}"]) for n in range(10)])
    result = run(gw, export["id"])
    assert result == {"status": "idle", "delivered": 10}
    wanted = finding_ids(gw, tenant)
    assert [e["id"] for e in collector.events()] == wanted
    posts = [r for r in collector.requests if r.path == "/services/collector/event"]
    assert [len(r.items) for r in posts] == [4, 4, 2]
    assert all(r.headers["authorization"] == f"Splunk {TOKEN}" for r in collector.requests)
    assert {r.headers["x-splunk-request-channel"] for r in collector.requests} == {
        hec.channel(hec.Target(destination_id=int(export["id"]), url="", options={}))
    }
    assert all(collector.polls[ack_id] == 3 for ack_id in range(3)), "polled until indexed"
    item = posts[0].items[0]
    assert (
        item["index"] == "security"
        and item["sourcetype"] == "gw:event"
        and item["source"] == "partner-gateway"
    )
    assert item["fields"] == {"tenant": tenant, "eventType": "finding.created", "eventId": wanted[0]}
    assert item["event"]["data"]["cves"] == ["CVE-2024-1000"] and isinstance(item["time"], float)
    shown = gw.http.get(f"{exports_url(tenant)}/{export['id']}", headers=headers)
    assert TOKEN not in shown.get_data(as_text=True) and shown.get_json()["status"]["pendingEvents"] == 0
    log = gw.http.get(f"{exports_url(tenant)}/{export['id']}/deliveries", headers=headers).get_json()["value"]
    assert [d["outcome"] for d in log] == ["delivered"] * 3

    # a wrong token: the collector's 401 is the destination's error; rotating the token fixes it
    bad = add(
        gw,
        tenant,
        headers,
        "splunk_hec",
        collector.url,
        secret="not-the-token",
        eventTypes=["finding.*"],
        options={"ack": True, "ackPollSeconds": 0.01},
    )
    push(
        gw,
        tenant,
        headers,
        [finding("f-0", cves=["CVE-2024-1000"], status="fixed", ts="2024-05-01T00:00:00Z")],
    )
    assert run(gw, bad["id"])["status"] == "failed"
    row = state(gw, bad["id"])
    assert row.last_status_code == 401 and "Invalid token" in row.last_error
    etag = gw.http.get(f"{exports_url(tenant)}/{bad['id']}", headers=headers).headers["ETag"]
    rotated = gw.http.post(
        f"{exports_url(tenant)}/{bad['id']}/rotateSecret", json={}, headers=headers | {"If-Match": etag}
    )
    assert rotated.status_code == 400, "a HEC token is never generated: it must be given"
    rotated = gw.http.post(
        f"{exports_url(tenant)}/{bad['id']}/rotateSecret", json={"secret": TOKEN}, headers=headers
    )
    assert rotated.status_code == 200 and "secret" not in rotated.get_json()
    gw.http.patch(
        f"{exports_url(tenant)}/{bad['id']}",
        json={"state": "active"},
        headers=headers | {"If-Match": rotated.headers["ETag"]},
    )
    result = run(gw, bad["id"], clock=lambda: utcnow() + timedelta(hours=1))
    assert result["status"] == "idle" and result["delivered"] >= 1
    assert collector.events()[-1]["id"] == finding_ids(gw, tenant)[-1]
    assert collector.events()[-1]["type"] == "finding.resolved"


def test_hec_down_then_up_catches_up_in_order_and_an_unacknowledged_batch_is_sent_again(gw, started):
    from tests.receiver import free_port

    gw.app.config["EXPORT_FAILING_AFTER_SECONDS"] = 5
    gw.app.config["EXPORT_PIPELINE_DEPTH"] = 1  # the collector's scripted answers come one at a time
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    port = free_port()
    export = add(
        gw,
        tenant,
        headers,
        "splunk_hec",
        f"http://127.0.0.1:{port}",
        secret=TOKEN,
        eventTypes=["finding.*"],
        batchSize=3,
        options={"ack": True, "ackPollSeconds": 0.01, "ackTimeoutSeconds": 0.2},
    )
    hosts = [f"h-{n}.example.com" for n in range(4)]
    push(gw, tenant, headers, [finding(f"{h}/x", host=h) for h in hosts])
    push(
        gw,
        tenant,
        headers,
        [finding(f"{h}/x", host=h, status="fixed", ts="2024-05-01T00:00:00Z") for h in hosts[:2]],
    )
    clock = [utcnow()]

    def later(seconds: float = 3600) -> dict:
        clock[0] += timedelta(seconds=seconds)
        return run(gw, export["id"], clock=lambda: clock[0])

    # 1. nothing listens
    assert later(0)["status"] == "failed" and "refused" in state(gw, export["id"]).last_error
    assert later()["status"] == "failed"
    assert state(gw, export["id"]).state == "failing"
    # 2. up but busy (503 + Retry-After), then never acknowledging, then well
    busy = [True]

    def respond(request):
        if busy[0] and request.path.endswith("/event"):
            busy[0] = False
            return 503, {"text": "Server is busy", "code": 9}, {"Retry-After": "120"}
        return None

    collector = started(HecCollector(TOKEN, ack=True, ack_after=10**6, port=port, respond=respond))
    assert later()["status"] == "failed"
    row = state(gw, export["id"])
    assert row.last_status_code == 503 and "Server is busy" in row.last_error
    assert row.next_attempt_at >= clock[0] + timedelta(seconds=120), "Retry-After is honoured"
    assert later()["status"] == "failed" and "did not acknowledge" in state(gw, export["id"]).last_error
    collector.ack_after = 0
    result = later()
    assert result["status"] == "idle" and result["delivered"] == 6
    received = [e["id"] for e in collector.events()]
    assert received == finding_ids(gw, tenant), "every event once, in order, after the outage"
    resent = [r for r in collector.requests if r.path.endswith("/event") and r.items]
    assert [e["event"]["id"] for e in resent[0].items] == [e["event"]["id"] for e in resent[1].items], (
        "the unacknowledged batch came again, the same"
    )
    assert state(gw, export["id"]).state == "active"


def test_a_hec_filter_gets_no_low_severity_and_no_other_tenants_events(gw, started):
    tenant, other = gw.tenant(), gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    other_headers = gw.partner("Qualys", [other], SCOPES)
    collector = started(HecCollector(TOKEN))
    export = add(
        gw,
        tenant,
        headers,
        "splunk_hec",
        collector.url,
        secret=TOKEN,
        eventTypes=["finding.*"],
        filter="severity ge 'high'",
        batchSize=10,
    )
    push(
        gw,
        tenant,
        headers,
        [
            finding("hi", cves=["CVE-2024-3001"], severity="critical"),
            finding("lo", cves=["CVE-2024-3002"], severity="low"),
            finding("mid", cves=["CVE-2024-3003"], severity="medium"),
            finding("hi2", cves=["CVE-2024-3004"], severity="high"),
        ],
    )
    push(gw, other, other_headers, [finding("x", cves=["CVE-2024-3005"], severity="critical")])
    assert run(gw, export["id"])["delivered"] == 2
    got = collector.events()
    assert sorted(e["data"]["severity"] for e in got) == ["critical", "high"]
    assert {e["tenant"] for e in got} == {tenant}


# -- syslog -----------------------------------------------------------------------------------------------


def test_syslog_over_tls_carries_cef_with_escaping_and_checks_the_certificate(gw, started, tmp_path):
    certs = make_certificates(tmp_path)
    collector = started(SyslogCollector(certificate=(certs["cert"], certs["key"])))
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    untrusted = add(gw, tenant, headers, "syslog", collector.url, eventTypes=["finding.*"])
    export = add(
        gw,
        tenant,
        headers,
        "syslog",
        collector.url,
        eventTypes=["finding.*"],
        batchSize=5,
        options={"caCertificate": certs["ca_pem"], "facility": "local4", "appName": "gw-export"},
    )
    assert "secret" not in export and export["secretHint"] is None
    title = "Pipe | equals = backslash \\ and\na newline"
    push(
        gw,
        tenant,
        headers,
        [
            finding("f-1", title=title, severity="critical"),
            finding("f-2", cves=["CVE-2024-3002"], severity="low"),
        ],
    )
    assert run(gw, export["id"])["delivered"] == 2
    wait_for(lambda: len(collector.events()) == 2, timeout=10)  # the collector's thread reads on its own
    messages = [m for m in collector.events() if m.app == "gw-export"]
    assert [m.cef["ext"]["externalId"] for m in messages] == finding_ids(gw, tenant)
    severe = next(m for m in messages if m.cef["severity"] == 10)
    low = next(m for m in messages if m.cef["severity"] == 3)
    assert severe.cef["name"] == title.replace("\n", " "), "| = \\ escaped and read back; newline a space"
    assert severe.pri == 20 * 8 + 2 and severe.msgid == "finding.created"
    assert severe.cef["ext"]["cs1"] == tenant and severe.cef["ext"]["cat"] == "finding.created"
    assert low.cef["name"] == "Vulnerability f-2" and low.pri == 20 * 8 + 5
    assert not collector.errors, collector.errors
    # without the CA the collector's certificate is not trusted: a failure that names it
    assert run(gw, untrusted["id"])["status"] == "failed"
    assert "CERTIFICATE_VERIFY_FAILED" in state(gw, untrusted["id"]).last_error.upper()
    bad = gw.http.post(
        exports_url(tenant),
        json={
            "displayName": "x",
            "kind": "syslog",
            "url": "tcp://127.0.0.1:1",
            "options": {"caCertificate": certs["ca_pem"]},
        },
        headers=headers,
    )
    assert bad.status_code == 400 and "TLS" in bad.get_json()["error"]["message"]
    bad = gw.http.post(
        exports_url(tenant),
        json={"displayName": "x", "kind": "syslog", "url": "tcp://127.0.0.1:1", "secret": "s3cret"},
        headers=headers,
    )
    assert bad.status_code == 400


def test_syslog_down_then_up_delivers_everything_in_order(gw, started):
    from tests.receiver import free_port

    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    port = free_port()
    export = add(gw, tenant, headers, "syslog", f"tcp://127.0.0.1:{port}", eventTypes=["finding.*"])
    push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{2000 + n}"]) for n in range(3)])
    push(
        gw,
        tenant,
        headers,
        [finding("f-0", cves=["CVE-2024-2000"], status="fixed", ts="2024-05-01T00:00:00Z")],
    )
    clock = [utcnow()]
    assert run(gw, export["id"], clock=lambda: clock[0])["status"] == "failed"
    assert "refused" in state(gw, export["id"]).last_error
    collector = started(SyslogCollector(port=port))
    clock[0] += timedelta(hours=1)
    assert run(gw, export["id"], clock=lambda: clock[0])["delivered"] == 4
    wait_for(lambda: len(collector.events()) == 4, timeout=10)
    got = [m.cef["ext"]["externalId"] for m in collector.events()]
    assert got == finding_ids(gw, tenant)
    assert [m.cef["ext"]["cat"] for m in collector.events()] == ["finding.created"] * 3 + ["finding.resolved"]


def test_syslog_keeps_one_connection_and_reconnects_when_the_collector_restarts(gw, started):
    """Deliveries to a syslog destination share one kept connection; a collector that restarts (closing
    it) gets the next delivery on a new connection, and nothing is lost."""
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    collector = started(SyslogCollector())
    export = add(gw, tenant, headers, "syslog", collector.url, eventTypes=["finding.*"])
    for n in range(3):  # three tasks, three deliveries each
        push(
            gw,
            tenant,
            headers,
            [finding(f"k-{n}-{m}", cves=[f"CVE-2024-{3000 + 3 * n + m}"]) for m in range(3)],
        )
        assert run(gw, export["id"])["delivered"] == 3
    wait_for(lambda: len(collector.events()) == 9, timeout=10)
    assert collector.connections == 1, "one connection for every delivery"
    collector.drop_connections()  # as a restarting collector does
    push(gw, tenant, headers, [finding("k-after", cves=["CVE-2024-3999"])])
    assert run(gw, export["id"])["delivered"] == 1
    wait_for(lambda: len(collector.events()) == 10, timeout=10)
    assert collector.connections == 2, "a new connection after the collector closed the kept one"
    ids = [m.cef["ext"]["externalId"] for m in collector.events()]
    assert ids == finding_ids(gw, tenant), "every event once, in order"


def test_mutual_tls_presents_the_client_certificate_and_keeps_its_key_encrypted(gw, started, tmp_path):
    """HEC over HTTPS and syslog over TLS to collectors that require a client certificate: a destination
    with ``clientCertificate`` and ``clientKey`` gets through, one without is refused by the collector;
    the key is stored encrypted and never shown; the pair is checked when saved."""
    certs = make_certificates(tmp_path)
    server = (certs["cert"], certs["key"])
    hec_collector = started(HecCollector(TOKEN, certificate=server, client_ca=certs["ca_pem"]))
    syslog_collector = started(SyslogCollector(certificate=server, client_ca=certs["ca_pem"]))
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    mtls = {"caCertificate": certs["ca_pem"], "clientCertificate": certs["client_cert_pem"]}
    key = certs["client_key_pem"]
    hec_export = add(
        gw,
        tenant,
        headers,
        "splunk_hec",
        hec_collector.url,
        secret=TOKEN,
        eventTypes=["finding.*"],
        options=mtls,
        clientKey=key,
    )
    syslog_export = add(
        gw,
        tenant,
        headers,
        "syslog",
        syslog_collector.url,
        eventTypes=["finding.*"],
        options=mtls,
        clientKey=key,
    )
    without = add(
        gw,
        tenant,
        headers,
        "splunk_hec",
        hec_collector.url,
        secret=TOKEN,
        eventTypes=["finding.*"],
        options={"caCertificate": certs["ca_pem"]},
    )
    for shown in (hec_export, syslog_export):
        assert "PRIVATE KEY" not in json.dumps(shown) and "clientKey" not in shown
        assert shown["options"]["clientCertificate"] == certs["client_cert_pem"], "the certificate is public"
    stored = state(gw, hec_export["id"]).client_key
    assert stored and "PRIVATE KEY" not in stored, "the key is stored encrypted"
    push(gw, tenant, headers, [finding(f"m-{n}", cves=[f"CVE-2024-{4000 + n}"]) for n in range(3)])

    assert run(gw, hec_export["id"])["delivered"] == 3
    assert sorted(e["id"] for e in hec_collector.events()) == sorted(finding_ids(gw, tenant))
    assert run(gw, syslog_export["id"])["delivered"] == 3
    wait_for(lambda: len(syslog_collector.events()) == 3, timeout=10)
    assert dict(x[0] for x in syslog_collector.peers[0]["subject"])["commonName"] == "partner-gateway"
    assert run(gw, without["id"])["status"] == "failed", "the collector wants a client certificate"
    assert len(hec_collector.events()) == 3

    # a PATCH of other options keeps the stored key; the same options with another key are checked
    url = f"{exports_url(tenant)}/{hec_export['id']}"
    etag = gw.http.get(url, headers=headers).headers["ETag"]
    patched = gw.http.patch(
        url, json={"options": mtls | {"index": "sec"}}, headers=headers | {"If-Match": etag}
    )
    assert patched.status_code == 200, patched.get_json()
    assert state(gw, hec_export["id"]).client_key, "the key is kept"
    push(gw, tenant, headers, [finding("m-late", cves=["CVE-2024-4999"])])
    assert run(gw, hec_export["id"])["delivered"] == 1
    (tmp_path / "other").mkdir()
    other_key = make_certificates(tmp_path / "other")  # another CA's client certificate and key
    for body, field in (
        ({"options": mtls}, "options"),  # a certificate without its key
        ({"options": {"caCertificate": certs["ca_pem"]}, "clientKey": key}, "clientKey"),  # a key alone
        ({"options": mtls, "clientKey": other_key["client_key_pem"]}, "options"),  # not the certificate's key
    ):
        answer = gw.http.post(
            exports_url(tenant),
            json={"displayName": "x", "kind": "syslog", "url": syslog_collector.url} | body,
            headers=headers,
        )
        assert answer.status_code == 400 and field in answer.get_json()["error"]["details"], answer.get_json()
        assert "PRIVATE KEY" not in answer.get_data(as_text=True)
    plain = gw.http.post(
        exports_url(tenant),
        json={
            "displayName": "x",
            "kind": "syslog",
            "url": "tcp://127.0.0.1:1",
            "options": mtls,
            "clientKey": key,
        },
        headers=headers,
    )
    assert plain.status_code == 400 and "TLS" in plain.get_json()["error"]["message"]


# -- NATS JetStream ----------------------------------------------------------------------------------------


async def _jetstream(action):
    return await with_jetstream(NATS_URL, action)


@pytest.fixture
def jetstream():
    """A stream of its own on the real server (deleted after); under CI a missing server fails."""
    prefix = f"gwtest{uuid.uuid4().hex[:10]}"
    name = prefix.upper()

    async def create(js):
        from nats.js.api import StreamConfig

        await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"], duplicate_window=120))

    try:
        asyncio.run(_jetstream(create))
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            pytest.fail(f"NATS JetStream is not reachable at {NATS_URL} ({exc!r}); .ci/run starts it")
        pytest.skip(f"NATS JetStream is not reachable at {NATS_URL}: {exc!r}")
    yield {"prefix": prefix, "stream": name}

    async def delete(js):
        await js.delete_stream(name)

    nats_kind.close_connections()
    asyncio.run(_jetstream(delete))


def consume(stream: str, durable: str, batch: int = 500) -> list:
    """Every message a durable pull consumer has not yet acknowledged, acknowledged now."""

    async def pull(js):
        subscription = await js.pull_subscribe("", durable=durable, stream=stream)
        got = []
        while True:
            try:
                messages = await subscription.fetch(batch, timeout=0.5)
            except TimeoutError:
                await subscription.unsubscribe()
                return got
            for message in messages:
                await message.ack_sync()
                got.append((message.subject, dict(message.headers or {}), json.loads(message.data)))

    return asyncio.run(_jetstream(pull))


def stream_messages(stream: str) -> int:
    async def info(js):
        return (await js.stream_info(stream)).state.messages

    return asyncio.run(_jetstream(info))


def test_jetstream_subjects_per_tenant_and_type_and_no_duplicates_after_a_forced_republish(gw, jetstream):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    export = add(
        gw,
        tenant,
        headers,
        "nats",
        NATS_URL,
        eventTypes=["finding.*", "batch.*"],
        batchSize=5,
        options={"subjectPrefix": jetstream["prefix"], "stream": jetstream["stream"]},
    )
    push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{2000 + n}"]) for n in range(6)])
    push(
        gw,
        tenant,
        headers,
        [finding("f-0", cves=["CVE-2024-2000"], status="fixed", ts="2024-05-01T00:00:00Z")],
    )
    assert run(gw, export["id"])["delivered"] == 9
    wanted = finding_ids(gw, tenant, ("finding", "batch"))  # in sequence order, now that it is sequenced
    assert len(wanted) == 9
    durable = f"gw-{uuid.uuid4().hex[:8]}"
    got = consume(jetstream["stream"], durable)
    assert [data["id"] for _, _, data in got] == wanted
    assert all(h["Nats-Msg-Id"] == data["id"] for _, h, data in got)
    prefix = f"{jetstream['prefix']}.{tenant}"
    assert {s for s, _, _ in got} == {
        f"{prefix}.finding.created",
        f"{prefix}.finding.resolved",
        f"{prefix}.batch.finished",
    }

    # forced re-publish: replay from the first event; the stream drops every duplicate
    first = wanted[0]
    replayed = gw.http.post(
        f"{exports_url(tenant)}/{export['id']}/replay", json={"since": first}, headers=headers
    )
    assert replayed.status_code == 202
    assert run(gw, export["id"])["delivered"] == 9
    log = gw.http.get(f"{exports_url(tenant)}/{export['id']}/deliveries", headers=headers).get_json()["value"]
    assert log[0]["outcome"] == "delivered"
    assert stream_messages(jetstream["stream"]) == 9
    assert consume(jetstream["stream"], durable) == [], "the durable consumer sees no duplicate"

    # a subject no stream takes fails and names it
    lost = add(
        gw,
        tenant,
        headers,
        "nats",
        NATS_URL,
        eventTypes=["finding.*"],
        options={"subjectPrefix": "nostream" + uuid.uuid4().hex[:6]},
    )
    push(gw, tenant, headers, [finding("f-9", cves=["CVE-2024-3009"])])
    assert run(gw, lost["id"])["status"] == "failed"
    assert "no JetStream stream takes the subject" in state(gw, lost["id"]).last_error


def test_destination_checks_refuse_bad_urls_and_options(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    cases = [
        ("nats", "http://127.0.0.1:4222", {}, "url"),
        ("nats", NATS_URL, {"subjectPrefix": "a..b"}, "options"),
        ("nats", NATS_URL, {"unknown": 1}, "options"),
        ("syslog", "tcp://127.0.0.1:514/path", {}, "options"),
        ("syslog", "tcp://127.0.0.1:514", {"facility": "nope"}, "options"),
        ("splunk_hec", "ftp://127.0.0.1", {}, "url"),
        ("splunk_hec", "https://127.0.0.1:8088", {"ack": "yes"}, "options"),
        ("splunk_hec", "https://127.0.0.1:8088", {"channel": "not-a-guid"}, "options"),
        ("splunk_hec", "https://127.0.0.1:8088", {"caCertificate": "nope"}, "options"),
    ]
    for kind, url, options, field in cases:
        body = {"displayName": "x", "kind": kind, "url": url, "options": options, "secret": TOKEN}
        if kind == "syslog":
            body.pop("secret")
        answer = gw.http.post(exports_url(tenant), json=body, headers=headers)
        assert answer.status_code == 400, (kind, url, options, answer.get_json())
        assert field in answer.get_json()["error"]["message"], answer.get_json()


# -- metrics ---------------------------------------------------------------------------------------------


def scrape(gw) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = gw.http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def test_metrics_count_deliveries_failures_and_lag_per_destination(gw, started):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    collector = started(HecCollector(TOKEN))
    export = add(
        gw, tenant, headers, "splunk_hec", collector.url, secret=TOKEN, eventTypes=["finding.*"], batchSize=10
    )
    failing = add(gw, tenant, headers, "splunk_hec", collector.url, secret="wrong", eventTypes=["finding.*"])
    push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{2000 + n}"]) for n in range(3)])
    before = scrape(gw)  # the counters are the process's: compare with what they were
    assert run(gw, export["id"])["delivered"] == 3
    assert run(gw, failing["id"])["status"] == "failed"
    after = scrape(gw)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in after, (key, sorted(k for k in after if k[0].startswith("gateway_export")))
        return after[key] - before.get(key, 0.0)

    assert grew("gateway_export_events_delivered_total", kind="splunk_hec", destination=export["id"]) == 3
    refused = [r for r in collector.requests if r.headers.get("authorization") == "Splunk wrong"]
    assert refused, "the wrong token was sent and refused"
    assert grew(
        "gateway_export_delivery_failures_total", kind="splunk_hec", destination=failing["id"]
    ) == len(refused)
    assert grew("gateway_export_delivery_lag_seconds_count", kind="splunk_hec") == 3
    mine = {"tenant": tenant, "kind": "splunk_hec", "state": "active"}
    assert (
        after[
            ("gateway_export_pending_events", tuple(sorted((mine | {"destination": failing["id"]}).items())))
        ]
        >= 3
    )
    assert (
        after[("gateway_export_lag_seconds", tuple(sorted((mine | {"destination": failing["id"]}).items())))]
        > 0
    )
    assert (
        after[
            ("gateway_export_pending_events", tuple(sorted((mine | {"destination": export["id"]}).items())))
        ]
        == 0
    )


# -- real workers ----------------------------------------------------------------------------------------


def test_a_push_reaches_hec_syslog_and_jetstream_through_real_workers(
    pg_gw, redis_clean, jetstream, started, tmp_path
):
    """Merge, dispatch (beat) and delivery by a real Celery worker process, to all three kinds."""
    from tests.test_export import BeatWorker

    gw = pg_gw
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant], SCOPES)
    collector = started(HecCollector(TOKEN, ack=True, ack_after=1))
    listener = started(SyslogCollector())
    add(
        gw,
        tenant,
        headers,
        "splunk_hec",
        collector.url,
        secret=TOKEN,
        eventTypes=["finding.*"],
        batchSize=7,
        options={"ack": True, "ackPollSeconds": 0.05},
    )
    add(gw, tenant, headers, "syslog", listener.url, eventTypes=["finding.*"], batchSize=3)
    add(
        gw,
        tenant,
        headers,
        "nats",
        NATS_URL,
        eventTypes=["finding.*"],
        batchSize=20,
        options={"subjectPrefix": jetstream["prefix"], "stream": jetstream["stream"]},
    )
    worker = BeatWorker(gw.app.config["DATABASE_URL"], tmp_path)
    try:
        push(gw, tenant, headers, [finding(f"f-{n}", cves=[f"CVE-2024-{2000 + n}"]) for n in range(12)])
        wait_for(
            lambda: len(collector.events()) >= 12 and len(listener.events()) >= 12, timeout=120, interval=0.2
        )
        durable, got = f"gw-{uuid.uuid4().hex[:8]}", []
        wait_for(lambda: got.extend(consume(jetstream["stream"], durable)) or len(got) >= 12, timeout=60)
    finally:
        worker.stop()
    wanted = finding_ids(gw, tenant)
    assert len(wanted) == 12
    # HEC deliveries travel in lanes (one subject each here: any order across them); syslog and the
    # stream keep one connection, in order
    assert sorted(e["id"] for e in collector.events()) == sorted(wanted)
    assert [m.cef["ext"]["externalId"] for m in listener.events()] == wanted
    assert [data["id"] for _, _, data in got] == wanted
