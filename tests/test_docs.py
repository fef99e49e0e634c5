"""The API describes itself: the index, the spec (JSON and YAML), Swagger UI, the OData
``$metadata``, and a client generated from the spec (openapi-python-client) driving a live gateway."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml
from lxml import etree

from gateway.api.collections import COLLECTIONS
from gateway.api.metadata import EDM, EDMX, NAMESPACE, edm_type, entity_name, list_element
from gateway.odata import ListField
from tests.conftest import Gateway, make_app

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "openapi" / "openapi.yaml"
NS = {"edmx": EDMX, "edm": EDM}


@pytest.fixture
def app(sqlite_url):
    app = make_app(sqlite_url, eager=True)
    yield app
    app.extensions["gateway.db"].dispose()


def test_the_packaged_spec_is_the_source_spec():
    assert (ROOT / "gateway" / "openapi.yaml").read_bytes() == SPEC.read_bytes(), (
        "gateway/openapi.yaml is package data: cp openapi/openapi.yaml gateway/openapi.yaml")


def test_the_spec_is_served_without_a_token(app):
    http = app.test_client()
    served = http.get("/openapi.json")
    assert served.status_code == 200 and served.mimetype == "application/json"
    assert served.get_json() == yaml.safe_load(SPEC.read_bytes())
    assert served.get_json()["servers"] == [{"url": "/"}], "nothing is taken from the request"
    again = http.get("/openapi.json", headers={"If-None-Match": served.headers["ETag"]})
    assert again.status_code == 304
    raw = http.get("/openapi.yaml")
    assert raw.status_code == 200 and raw.mimetype == "application/yaml" and raw.data == SPEC.read_bytes()
    for response in (served, raw):
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_the_index_links_everything(app):
    body = app.test_client().get("/").get_json()
    assert body["name"] == "partner-gateway" and body["version"]
    links = body["links"]
    assert links["openapi"] == "/openapi.json" and links["docs"] == "/docs"
    assert links["token"] == "/oauth/token"
    assert links["health"] == "/healthz" and links["readiness"] == "/readyz"
    assert links["api"] == "/api/v1/tenants/{tenant}" and links["metadata"] == "/api/v1/$metadata"


def test_the_docs_page_is_served_from_the_package_under_a_strict_csp(app):
    http = app.test_client()
    page = http.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "http://" not in html and "https://" not in html, "no CDN"
    assert "<script>" not in html, "no inline script"
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    for asset in ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                  "swagger-initializer.js"):
        assert f"/docs/{asset}" in html or asset == "swagger-initializer.js"
        response = http.get(f"/docs/{asset}")
        assert response.status_code == 200 and response.data, asset
    assert b"/openapi.json" in http.get("/docs/swagger-initializer.js").data
    for other in ("index.j2", "index.html", "../openapi.yaml", "..%2Fopenapi.yaml", "oauth2-redirect.html"):
        missing = http.get(f"/docs/{other}")
        assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "notFound", other


def _csdl(app) -> etree._Element:
    gw = Gateway(app)
    tenant = gw.tenant()
    response = app.test_client().get("/api/v1/$metadata", headers=gw.partner("p", [tenant], "security.read"))
    assert response.status_code == 200 and response.mimetype == "application/xml"
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.fromstring(response.data, parser)


def test_metadata_takes_a_token(app):
    response = app.test_client().get("/api/v1/$metadata")
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "unauthenticated"


def _properties(root, type_name: str) -> dict[str, tuple[str, bool]]:
    short = type_name.removeprefix(NAMESPACE + ".")
    node = root.find(f".//edm:Schema/*[@Name='{short}']", NS)
    assert node is not None, type_name
    return {p.get("Name"): (p.get("Type"), p.tag.endswith("NavigationProperty"))
            for p in node if p.tag.endswith("Property")}


def _check_fields(root, type_name: str, fields: dict) -> None:
    props = _properties(root, type_name)
    for path, field in fields.items():
        head, _, rest = path.partition("/")
        assert head in props, f"{type_name}.{head}"
        declared, navigation = props[head]
        if rest:
            _check_fields(root, declared, {rest: field})
        elif isinstance(field, ListField):
            assert declared.startswith("Collection("), f"{type_name}.{head}"
            inner = declared[len("Collection("):-1]
            if navigation:
                assert inner == f"{NAMESPACE}.{entity_name(head)}"
                continue
            _, element = list_element(field)
            if isinstance(element, dict):
                _check_fields(root, inner, element)
            else:
                assert inner == edm_type(element), f"{type_name}.{head}"
        else:
            assert declared == edm_type(field), f"{type_name}.{head}: {declared}"


def test_metadata_declares_every_filterable_field_with_its_type(app):
    root = _csdl(app)
    assert root.tag == f"{{{EDMX}}}Edmx" and root.get("Version") == "4.0"
    sets = {s.get("Name"): s.get("EntityType")
            for s in root.iterfind(".//edm:EntityContainer/edm:EntitySet", NS)}
    assert set(sets) == set(COLLECTIONS)
    for name, collection in COLLECTIONS.items():
        entity = root.find(f".//edm:EntityType[@Name='{entity_name(name)}']", NS)
        assert entity.find("edm:Key/edm:PropertyRef", NS).get("Name") == "id"
        _check_fields(root, sets[name], collection.fields)
        for shown in collection.selectable:
            assert shown in _properties(root, sets[name]), f"{name}.{shown}"
    types = {p.get("Type") for p in root.iter(f"{{{EDM}}}Property")}
    assert {"Edm.String", "Edm.Int64", "Edm.DateTimeOffset", "Edm.Double"} <= types


# -- a generated client against a live gateway -------------------------------------------------


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The client openapi-python-client generates from the spec, importable as ``gatewayclient``."""
    out = tmp_path_factory.mktemp("client")
    started = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).with_name("openapi-python-client")), "generate",
                           "--path", str(SPEC), "--meta", "none",
                           "--output-path", str(out / "gatewayclient")],
                          cwd=out, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 60
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("gatewayclient")
    finally:
        sys.path.remove(str(out))
        for module in [m for m in sys.modules if m == "gatewayclient" or m.startswith("gatewayclient.")]:
            del sys.modules[module]


CANONICAL = {"scan": {"type": "full"}, "findings": [
    {"id": f"g-{n}", "resource": {"hostname": f"gen-{n}"}, "title": f"finding {n}", "severity": "high",
     "cves": [f"CVE-2024-{1000 + n}"]} for n in range(5)]}
GRAPH_ALERTS = {"value": [{
    "id": "gen-alert-1", "title": "Suspicious sign-in", "severity": "high", "status": "newAlert",
    "createdDateTime": "2024-04-01T10:00:00Z", "lastModifiedDateTime": "2024-04-01T11:00:00Z",
    "vendorInformation": {"provider": "Contoso", "vendor": "Contoso"}}]}


def test_a_generated_client_drives_a_live_gateway(generated, pg_app, live_server, worker):
    from importlib import import_module

    models = import_module("gatewayclient.models")
    push_batch = import_module("gatewayclient.api.ingest.push_batch")
    get_batch = import_module("gatewayclient.api.ingest.get_batch")
    list_findings = import_module("gatewayclient.api.findings.list_findings")
    list_alerts = import_module("gatewayclient.api.alerts.list_alerts")
    update_alert = import_module("gatewayclient.api.alerts.update_alert")

    gw = Gateway(pg_app)
    tenant = gw.tenant()
    client_id, secret = gw.client("Contoso", "findings.write alerts.write security.read alerts.manage",
                                  [tenant])
    token = requests.post(f"{live_server.url}/oauth/token", data={"grant_type": "client_credentials"},
                          auth=(client_id, secret), timeout=10).json()["access_token"]
    client = generated.AuthenticatedClient(base_url=live_server.url, token=token)

    def push(fmt, body):
        accepted = push_batch.sync(tenant, client=client, body=body, format_=fmt)
        assert isinstance(accepted, models.BatchAccepted), accepted
        deadline = time.monotonic() + 60
        while True:
            batch = get_batch.sync(tenant, accepted.id, client=client)
            assert isinstance(batch, models.BatchOut), batch
            if batch.status.value in ("succeeded", "partiallySucceeded", "failed"):
                return batch
            assert time.monotonic() < deadline, batch.status
            time.sleep(0.2)

    batch = push(models.PushBatchFormat.CANONICAL, models.CanonicalFindingsDocument.from_dict(CANONICAL))
    assert batch.status.value == "succeeded", batch

    seen, skiptoken = [], None
    while True:
        kwargs = {"skiptoken": skiptoken} if skiptoken else {}
        page = list_findings.sync(tenant, client=client, top=2, **kwargs)
        assert isinstance(page, models.FindingList), page
        assert all(isinstance(item, models.FindingOut) for item in page.value)
        seen += [item.title for item in page.value]
        if not isinstance(page.odata_next_link, str):
            break
        skiptoken = parse_qs(urlsplit(page.odata_next_link).query)["$skiptoken"][0]
    assert sorted(seen) == sorted(f["title"] for f in CANONICAL["findings"])

    batch = push(models.PushBatchFormat.GRAPH_ALERT, models.VendorJsonDocumentType0.from_dict(GRAPH_ALERTS))
    assert batch.status.value == "succeeded", batch
    alerts = list_alerts.sync(tenant, client=client)
    assert isinstance(alerts, models.AlertList) and len(alerts.value) == 1
    alert = alerts.value[0]
    edited = update_alert.sync(tenant, alert.id, client=client, prefer="return=representation",
                               body=models.AlertPatch.from_dict({"status": "resolved", "assignedTo": "sam"}))
    assert isinstance(edited, models.AlertOut), edited
    assert edited.assigned_to == "sam" and edited.status.value == "resolved"
    assert json.loads(json.dumps(edited.to_dict()))["closedDateTime"]
