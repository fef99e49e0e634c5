"""OAuth 2.0 client credentials, token checks and tenant isolation (PostgreSQL)."""

from __future__ import annotations

import base64
from datetime import timedelta

from sqlalchemy import select, update

from gateway.models import OAuthClient, OAuthToken, utcnow
from tests.factories import document, finding


def _basic(client_id, secret):
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def test_metadata_lists_endpoints_and_scopes(pg_gw):
    body = pg_gw.http.get("/.well-known/oauth-authorization-server").get_json()
    assert body["grant_types_supported"] == ["client_credentials"]
    assert body["token_endpoint"].endswith("/oauth/token")
    assert set(body["scopes_supported"]) == {"findings.write", "alerts.write", "security.read",
                                             "alerts.manage", "admin"}


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
