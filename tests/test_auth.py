"""OAuth 2.0 client credentials, token checks and tenant isolation (PostgreSQL)."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from gateway.models import OAuthClient, OAuthToken, utcnow
from tests.conftest import make_app
from tests.factories import document, finding


def _basic(client_id, secret):
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def test_metadata_lists_endpoints_and_scopes(pg_gw):
    body = pg_gw.http.get("/.well-known/oauth-authorization-server").get_json()
    assert body["grant_types_supported"] == ["client_credentials"]
    assert body["token_endpoint"].endswith("/oauth/token")
    assert set(body["scopes_supported"]) == {"findings.write", "alerts.write", "security.read",
                                             "alerts.manage", "posture.manage", "itsm.manage", "exports.manage",
                                             "indicators.write", "events.write", "rules.manage", "admin"}


def test_token_issued_and_secret_stored_hashed(pg_gw):
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write security.read", [tenant])
    response = pg_gw.http.post("/oauth/token", data={"grant_type": "client_credentials",
                                                     "scope": "security.read"},
                               headers=_basic(client_id, secret))
    assert response.status_code == 200
    token = response.get_json()
    assert token["token_type"].lower() == "bearer" and token["scope"] == "security.read"
    assert token["expires_in"] == 3600
    with pg_gw.db.sessions() as session:
        stored = session.scalar(select(OAuthClient).where(OAuthClient.client_id == client_id))
        tokens = session.scalars(select(OAuthToken.token_hash)).all()
    assert secret not in stored.secret_hash and len(stored.secret_hash) == 64
    assert token["access_token"] not in tokens and len(tokens) == 1


def test_bad_secret_and_unknown_or_ungranted_scope_refused(pg_gw):
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write", [tenant])
    bad = pg_gw.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                          headers=_basic(client_id, secret + "x"))
    assert bad.status_code == 401 and bad.get_json()["error"] == "invalid_client"
    for scope in ("admin", "everything"):
        refused = pg_gw.http.post("/oauth/token", data={"grant_type": "client_credentials", "scope": scope},
                                  headers=_basic(client_id, secret))
        assert refused.status_code == 400 and refused.get_json()["error"] == "invalid_scope"
    password = pg_gw.http.post("/oauth/token", data={"grant_type": "password", "username": "a", "password": "b"},
                               headers=_basic(client_id, secret))
    assert password.status_code == 400 and password.get_json()["error"] == "unsupported_grant_type"


def test_missing_wrong_scope_expired_revoked_and_disabled_tokens_refused(pg_gw):
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write security.read", [tenant])
    url = f"/api/v1/tenants/{tenant}/security/findings"

    missing = pg_gw.http.get(url)
    assert missing.status_code == 401
    assert missing.get_json()["error"]["code"] == "unauthenticated"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")

    write_only = pg_gw.token(client_id, secret, scope="findings.write")
    wrong_scope = pg_gw.http.get(url, headers={"Authorization": f"Bearer {write_only}"})
    assert wrong_scope.status_code == 403 and wrong_scope.get_json()["error"]["code"] == "insufficientScope"

    token = pg_gw.token(client_id, secret)
    assert pg_gw.http.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    with pg_gw.db.engine.begin() as conn:
        conn.execute(update(OAuthToken.__table__).values(expires_at=utcnow() - timedelta(seconds=1)))
    expired = pg_gw.http.get(url, headers={"Authorization": f"Bearer {token}"})
    assert expired.status_code == 401 and "expired" in expired.get_json()["error"]["message"]

    token = pg_gw.token(client_id, secret)
    revoke = pg_gw.http.post("/oauth/revoke", data={"token": token}, headers=_basic(client_id, secret))
    assert revoke.status_code == 200
    revoked = pg_gw.http.get(url, headers={"Authorization": f"Bearer {token}"})
    assert revoked.status_code == 401 and "revoked" in revoked.get_json()["error"]["message"]

    token = pg_gw.token(client_id, secret)
    introspect = pg_gw.http.post("/oauth/introspect", data={"token": token}, headers=_basic(client_id, secret))
    assert introspect.get_json()["active"] is True and introspect.get_json()["client_id"] == client_id
    with pg_gw.db.engine.begin() as conn:
        conn.execute(update(OAuthClient.__table__).values(disabled=True))
    disabled = pg_gw.http.get(url, headers={"Authorization": f"Bearer {token}"})
    assert disabled.status_code == 401 and "disabled" in disabled.get_json()["error"]["message"]
    again = pg_gw.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                            headers=_basic(client_id, secret))
    assert again.status_code == 401

    garbage = pg_gw.http.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert garbage.status_code == 401 and garbage.get_json()["error"]["code"] == "invalidToken"


def test_tenant_isolation_is_404_and_provider_is_the_clients(pg_gw):
    tenant_a, tenant_b = pg_gw.tenant(), pg_gw.tenant()
    headers_a = pg_gw.partner("Qualys", [tenant_a])
    headers_b = pg_gw.partner("Tenable", [tenant_b])
    pushed = pg_gw.http.post(f"/api/v1/tenants/{tenant_b}/batches?format=canonical",
                             data=document([finding("b-1")]),
                             headers=headers_b | {"Content-Type": "application/json"})
    assert pushed.status_code == 202
    batch_b = pushed.get_json()["id"]
    # A's client cannot read or write B
    for path in (f"/api/v1/tenants/{tenant_b}/security/findings",
                 f"/api/v1/tenants/{tenant_b}/batches/{batch_b}"):
        response = pg_gw.http.get(path, headers=headers_a)
        assert response.status_code == 404 and response.get_json()["error"]["code"] == "notFound"
    write = pg_gw.http.post(f"/api/v1/tenants/{tenant_b}/batches?format=canonical",
                            data=document([finding("a-1")]), headers=headers_a | {"Content-Type": "application/json"})
    assert write.status_code == 404
    # B's batch id under A's tenant is not found either
    assert pg_gw.http.get(f"/api/v1/tenants/{tenant_a}/batches/{batch_b}", headers=headers_a).status_code == 404
    # a client pushes only as its own provider
    spoof = pg_gw.http.post(f"/api/v1/tenants/{tenant_a}/batches?format=canonical",
                            data=document([finding("a-1")], provider="Tenable"),
                            headers=headers_a | {"Content-Type": "application/json"})
    assert spoof.status_code == 403 and spoof.get_json()["error"]["code"] == "wrongProvider"


# ---- RFC 6749: each parameter once, one client authentication method, invalid_client is 401 ----


TOKEN = {"grant_type": "client_credentials"}


def _form(pairs) -> dict:
    """A form body with repeated names (werkzeug's test client takes a MultiDict)."""
    from werkzeug.datastructures import MultiDict

    return MultiDict(pairs)


def _invalid_request(response, *words):
    body = response.get_json()
    assert response.status_code == 400 and body["error"] == "invalid_request", (response.status_code, body)
    assert all(word in body["error_description"] for word in words), body
    assert response.headers["Cache-Control"] == "no-store"


def test_a_repeated_parameter_is_invalid_request(pg_gw):
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write security.read", [tenant])
    basic = _basic(client_id, secret)
    http = pg_gw.http
    _invalid_request(http.post("/oauth/token", data=_form([("grant_type", "client_credentials")] * 2),
                               headers=basic), "grant_type")
    _invalid_request(http.post("/oauth/token", data=_form([("grant_type", "client_credentials"),
                                                           ("grant_type", "password")]), headers=basic),
                     "grant_type")
    _invalid_request(http.post("/oauth/token?grant_type=client_credentials", data=TOKEN, headers=basic),
                     "grant_type")
    _invalid_request(http.post("/oauth/token", data=_form([("grant_type", "client_credentials"),
                                                           ("scope", "security.read"),
                                                           ("scope", "findings.write")]), headers=basic),
                     "scope")
    token = pg_gw.token(client_id, secret)
    for endpoint in ("/oauth/revoke", "/oauth/introspect"):
        twice = _form([("token", token), ("token", "other")])
        _invalid_request(http.post(endpoint, data=twice, headers=basic), "token")
    assert pg_gw.http.post("/oauth/introspect", data={"token": token}, headers=basic).get_json()["active"]


def test_two_client_authentication_methods_are_invalid_request(pg_gw):
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write security.read", [tenant])
    other_id, other_secret = pg_gw.client("Tenable", "security.read", [tenant])
    http = pg_gw.http
    both = TOKEN | {"client_id": client_id, "client_secret": secret}
    basic = _basic(client_id, secret)
    _invalid_request(http.post("/oauth/token", data=both, headers=basic), "authentication")
    # a wrong Basic secret is not rescued by right form credentials, nor the other way round
    _invalid_request(http.post("/oauth/token", data=both, headers=_basic(client_id, "wrong")),
                     "authentication")
    other = TOKEN | {"client_id": other_id, "client_secret": other_secret}
    _invalid_request(http.post("/oauth/token", data=other, headers=basic), "authentication")
    _invalid_request(http.post("/oauth/token", data=TOKEN | {"client_id": other_id},
                               headers=_basic(client_id, secret)), "client_id")
    _invalid_request(http.post(f"/oauth/token?client_secret={secret}", data=TOKEN | {"client_id": client_id}),
                     "client_secret")
    token = pg_gw.token(client_id, secret)
    for endpoint in ("/oauth/revoke", "/oauth/introspect"):
        form = {"token": token, "client_id": client_id, "client_secret": secret}
        _invalid_request(http.post(endpoint, data=form, headers=basic), "authentication")
    # each method alone still works, and Basic with the same client_id in the body too
    assert http.post("/oauth/token", data=both).status_code == 200
    assert http.post("/oauth/token", data=TOKEN | {"client_id": client_id},
                     headers=_basic(client_id, secret)).status_code == 200
    with pg_gw.db.sessions() as session:
        assert session.scalar(select(OAuthToken.revoked_at).where(OAuthToken.id == 1)) is None  # not revoked


@pytest.mark.parametrize("endpoint", ["/oauth/token", "/oauth/revoke", "/oauth/introspect"])
def test_invalid_client_is_401_with_a_basic_challenge(pg_gw, endpoint):
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write", [tenant])
    data = TOKEN if endpoint == "/oauth/token" else {"token": "whatever"}
    attempts = {
        "no credentials": ({}, {}),
        "wrong Basic secret": ({}, _basic(client_id, secret + "x")),
        "unknown Basic client": ({}, _basic("nobody", secret)),
        "wrong form secret": ({"client_id": client_id, "client_secret": secret + "x"}, {}),
        "unknown form client": ({"client_id": "nobody", "client_secret": secret}, {}),
        "form client without a secret": ({"client_id": client_id}, {}),
        "a bearer token instead": ({}, {"Authorization": "Bearer " + secret}),
    }
    for name, (form, headers) in attempts.items():
        response = pg_gw.http.post(endpoint, data=data | form, headers=headers)
        assert response.status_code == 401, (name, response.status_code, response.get_json())
        assert response.get_json()["error"] == "invalid_client", name
        assert response.headers["WWW-Authenticate"] == 'Basic realm="gateway"', name


# ---- the issuer: never the request's Host header outside `gateway run` ----------------------


def test_the_metadata_does_not_reflect_the_host_header(pg_gw):
    """Without GATEWAY_ISSUER the issuer is the fixed default, whatever Host the caller sends."""
    body = pg_gw.http.get("/.well-known/oauth-authorization-server",
                          headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"}).get_json()
    assert body["issuer"] == "http://127.0.0.1:8080"
    assert body["token_endpoint"] == "http://127.0.0.1:8080/oauth/token"
    assert body["revocation_endpoint"] == "http://127.0.0.1:8080/oauth/revoke"
    assert body["introspection_endpoint"] == "http://127.0.0.1:8080/oauth/introspect"
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write", [tenant])
    token = pg_gw.token(client_id, secret)
    introspected = pg_gw.http.post("/oauth/introspect", data={"token": token},
                                   headers=_basic(client_id, secret), base_url="https://evil.example").get_json()
    assert introspected["iss"] == "http://127.0.0.1:8080"


@pytest.mark.parametrize("endpoint", ["/oauth/token", "/oauth/revoke", "/oauth/introspect"])
def test_plain_http_from_a_non_loopback_host_is_a_400_not_a_500(pg_gw, endpoint):
    tenant = pg_gw.tenant()
    client_id, secret = pg_gw.client("Qualys", "findings.write", [tenant])
    response = pg_gw.http.post(endpoint, data=TOKEN | {"token": "x"}, headers=_basic(client_id, secret),
                               base_url="http://gateway.example.com")
    assert response.status_code == 400 and response.get_json()["error"] == "insecure_transport"
    assert "https" in response.get_json()["error_description"]
    secure = pg_gw.http.post(endpoint, data=TOKEN | {"token": "x"}, headers=_basic(client_id, secret),
                             base_url="https://gateway.example.com")
    assert secure.status_code == 200


@pytest.mark.parametrize("configured", ["https://gw.example.com", "https://gw.example.com/",
                                        "https://gw.example.com/partner-gateway"])
def test_the_configured_issuer_names_every_endpoint(pg_url, configured):
    app = make_app(pg_url, eager=False, ISSUER=configured)
    try:
        body = app.test_client().get("/.well-known/oauth-authorization-server",
                                     headers={"Host": "evil.example"}).get_json()
    finally:
        app.extensions["gateway.db"].dispose()
    base = configured.rstrip("/")
    assert body["issuer"] == base and body["token_endpoint"] == base + "/oauth/token"


@pytest.mark.parametrize("configured", ["gw.example.com", "ftp://gw.example.com", "https://", "https://gw.example.com/?a=1",
                                        "https://gw.example.com/#x", "https://user@gw.example.com"])
def test_a_malformed_issuer_is_a_configuration_error_at_startup(pg_url, configured):
    with pytest.raises(ValueError, match="GATEWAY_ISSUER"):
        make_app(pg_url, eager=False, ISSUER=configured)


def test_a_push_reads_its_tenant_with_the_token(gw):
    """The push's tenant comes from the token's own query (one query fewer before the 202): only a
    tenant the client is enabled for is found, and another client's grant does not count."""
    mine, theirs = gw.tenant(), gw.tenant()
    headers = gw.partner("Qualys", [mine])
    gw.partner("Tenable", [theirs])  # enabled for another client only
    body = document([finding("q-1")])
    for tenant, expected in ((mine, 202), (theirs, 404), ("no-such-tenant", 404)):
        response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical", data=body,
                                headers=headers | {"Content-Type": "application/json"})
        assert response.status_code == expected, (tenant, response.get_json())
        if expected == 404:
            assert response.get_json()["error"]["message"] == f"tenant '{tenant}' not found"
    listed = gw.http.get(f"/api/v1/tenants/{mine}/batches", headers=headers).get_json()["value"]
    assert len(listed) == 1
    assert gw.http.get(f"/api/v1/tenants/{theirs}/batches", headers=headers).status_code == 404


@pytest.fixture
def cached_gw(pg_url):
    """A gateway whose API process reuses a successful token check for a minute."""
    from tests.conftest import Gateway, wipe

    app = make_app(pg_url, eager=True, TOKEN_CACHE_SECONDS=60)
    wipe(app.extensions["gateway.db"])
    yield Gateway(app)
    app.extensions["gateway.db"].dispose()


def test_cached_token_checks_skip_the_query_and_revocation_here_ends_them(cached_gw):
    from sqlalchemy import event

    tenant, other = cached_gw.tenant(), cached_gw.tenant()
    client_id, secret = cached_gw.client("Qualys", "findings.write security.read", [tenant])
    token = cached_gw.token(client_id, secret)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    lookups: list[str] = []

    def count(conn, cursor, statement, *args):
        if "oauth_tokens" in statement:
            lookups.append(statement)

    engine = cached_gw.db.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        push = f"/api/v1/tenants/{tenant}/batches?format=canonical"
        for n in range(3):
            response = cached_gw.http.post(push, data=document([finding(f"q-{n}")]), headers=headers)
            assert response.status_code == 202, response.get_json()
        assert len(lookups) == 1, "the first push checks the token (and its tenant), the others reuse it"
        refused = f"/api/v1/tenants/{other}/batches?format=canonical"
        for _ in range(2):  # a tenant the client is not enabled for stays 404, also from the cache
            response = cached_gw.http.post(refused, data=document([finding("x")]), headers=headers)
            assert response.status_code == 404
        assert len(lookups) == 2
        revoke = cached_gw.http.post("/oauth/revoke", data={"token": token},
                                     headers=_basic(client_id, secret))
        assert revoke.status_code == 200
        after = cached_gw.http.post(push, data=document([finding("q-9")]), headers=headers)
        assert after.status_code == 401 and "revoked" in after.get_json()["error"]["message"]
    finally:
        event.remove(engine, "before_cursor_execute", count)
