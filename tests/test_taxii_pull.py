"""The scheduled TAXII 2.1 pull (gateway/intel/taxii.py) against a loopback TAXII server: medallion
with its memory backend, served over a real socket; paging with ``limit``/``next`` and the watermark."""

from __future__ import annotations

import threading
import uuid

import pytest
import requests
from sqlalchemy import select
from taxii2client.v21 import Collection
from werkzeug.serving import make_server

from gateway.intel import taxii
from gateway.models import IndicatorFeed, Tenant
from tests.test_indicators import feed, indicators, stix_indicator

USER, PASSWORD = "feeder", "s3cret-pass"
COLLECTION_ID = "91a7b528-80eb-42ed-a74d-c6fbd5a26116"


@pytest.fixture
def taxii_server():
    """medallion (the OASIS TAXII 2.1 reference server) on loopback, one empty collection."""
    import medallion
    from medallion.backends.memory_backend import MemoryBackend

    app = medallion.application_instance
    backend = MemoryBackend()
    app.users_backend = {USER: PASSWORD}
    app.taxii_config = {"max_page_size": 100}
    app.medallion_backend = backend
    if "objects" not in app.blueprints:
        medallion.register_blueprints(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    base = f"http://127.0.0.1:{server.server_port}"
    backend.data = {
        "/discovery": {"title": "test", "default": f"{base}/api1/", "api_roots": [f"{base}/api1/"]},
        "api1": {
            "information": {
                "title": "api1",
                "versions": ["application/taxii+json;version=2.1"],
                "max_content_length": 10_000_000,
            },
            "status": [],
            "collections": [
                {
                    "id": COLLECTION_ID,
                    "title": "indicators",
                    "can_read": True,
                    "can_write": True,
                    "media_types": ["application/stix+json;version=2.1"],
                    "objects": [],
                    "manifest": [],
                }
            ],
        },
    }
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"{base}/api1/collections/{COLLECTION_ID}/"
    server.shutdown()


def publish(url: str, *objects) -> None:
    Collection(url, user=USER, password=PASSWORD).add_objects({"objects": list(objects)})


def test_pull_pages_through_the_collection_and_a_second_pull_takes_only_new_objects(gw, taxii_server):
    tenant, headers = feed(gw)
    with gw.db.engine.connect() as conn:
        tenant_pk = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant)).scalar()
    publish(
        taxii_server,
        *[stix_indicator(f"[ipv4-addr:value = '192.0.2.{i}']") for i in range(1, 6)],
        stix_indicator("[ipv4-addr:value = '192.0.2.9'] FOLLOWEDBY [domain-name:value = 'x.example']"),
        {
            "type": "identity",
            "spec_version": "2.1",
            "id": f"identity--{uuid.uuid4()}",
            "name": "CERT",
            "created": "2026-11-01T00:00:00Z",
            "modified": "2026-11-01T00:00:00Z",
        },
    )
    feed_id = taxii.add_feed(
        gw.db, gw.app.config, tenant_pk, "cert", taxii_server, username=USER, password=PASSWORD, page_size=2
    )
    with gw.db.engine.connect() as conn:
        stored = conn.execute(select(IndicatorFeed.secret)).scalar()
    assert stored and PASSWORD not in stored  # encrypted at rest

    first = taxii.pull(gw.db, feed_id, gw.app.config)
    assert first["pages"] == 4, first  # 7 objects, 2 a page
    assert (first["received"], first["created"], first["rejected"]) == (6, 5, 1)
    assert "FOLLOWEDBY" in first["rejections"][0]["reason"]
    values = sorted(i["value"] for i in indicators(gw, tenant, headers))
    assert values == [f"192.0.2.{i}" for i in range(1, 6)]
    assert {i["source"] for i in indicators(gw, tenant, headers)} == {"taxii:cert"}
    with gw.db.engine.connect() as conn:
        watermark = conn.execute(select(IndicatorFeed.added_after)).scalar()
    assert watermark

    publish(
        taxii_server,
        stix_indicator("[domain-name:value = 'new.example']"),
        stix_indicator("[url:value = 'https://new.example/payload']"),
    )
    second = taxii.pull(gw.db, feed_id, gw.app.config)
    assert (second["pages"], second["received"], second["created"]) == (1, 2, 2), second
    with gw.db.engine.connect() as conn:
        assert conn.execute(select(IndicatorFeed.added_after)).scalar() > watermark
    third = taxii.pull(gw.db, feed_id, gw.app.config)
    assert third.get("received", 0) == 0 and len(indicators(gw, tenant, headers)) == 7


def test_a_failed_pull_keeps_the_watermark_and_records_the_error(gw, taxii_server):
    tenant, _ = feed(gw)
    with gw.db.engine.connect() as conn:
        tenant_pk = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant)).scalar()
    feed_id = taxii.add_feed(
        gw.db, gw.app.config, tenant_pk, "cert", taxii_server, username=USER, password="wrong"
    )
    with pytest.raises(requests.HTTPError):  # the server's 401, as taxii2-client raises it
        taxii.pull(gw.db, feed_id, gw.app.config)
    with gw.db.engine.connect() as conn:
        row = conn.execute(select(IndicatorFeed.__table__)).one()
    assert row.added_after is None and "401" in row.last_error
    assert taxii.due_feeds(gw.db) == []  # tried just now: due again after its interval
