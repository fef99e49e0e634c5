"""OIDC sign-in to the console against a loopback identity provider over a real socket.

Discovery, the authorization endpoint (code + PKCE S256), the token endpoint and the JWKS are
the provider's (tests/oidc_idp.py); the console fetches them with authlib's Flask client.  A
token for another audience, a person without a mapped role, and a replayed callback are refused.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from sqlalchemy import select

from gateway.models import ConsoleUser, ConsoleUserTenant, Tenant
from tests.conftest import make_app, wipe
from tests.console_support import session_cookie
from tests.oidc_idp import IdentityProvider

CLIENT_ID, CLIENT_SECRET = "gateway-console", "s3cret-of-the-console"


@pytest.fixture
def idp():
    provider = IdentityProvider(CLIENT_ID, CLIENT_SECRET)
    yield provider
    provider.stop()


@pytest.fixture
def oidc_app(store_url, idp):
    app = make_app(
        store_url,
        eager=True,
        OIDC_ISSUER=idp.url,
        OIDC_CLIENT_ID=CLIENT_ID,
        OIDC_CLIENT_SECRET=CLIENT_SECRET,
        OIDC_ROLE_CLAIM="groups",
        OIDC_ROLE_MAP="sec-admins=admin, sec-analysts=analyst, staff=reader",
        OIDC_DEFAULT_TENANTS="acme",
    )
    db = app.extensions["gateway.db"]
    wipe(db)
    with db.session() as session:
        session.add_all(
            [Tenant(external_id="acme", name="Acme"), Tenant(external_id="globex", name="Globex")]
        )
    yield app
    db.dispose()


def sign_in(app, idp, claims: dict, start_path: str = "/console/oidc/login"):
    """Walk the redirects: console -> provider (over its socket) -> console callback."""
    http = app.test_client()
    idp.next_claims = claims
    start = http.get(start_path)
    assert start.status_code == 302 and start.location.startswith(f"{idp.url}/authorize?")
    before = session_cookie(http)
    answer = requests.get(start.location, allow_redirects=False, timeout=10)
    assert answer.status_code == 302, answer.text
    callback = urlsplit(answer.headers["Location"])
    assert callback.path == "/console/oidc/callback"
    response = http.get(f"{callback.path}?{callback.query}")
    return http, response, before, f"{callback.path}?{callback.query}"


def test_oidc_sign_in_provisions_the_user_with_role_and_default_tenants(oidc_app, idp):
    claims = {
        "sub": "u-1",
        "email": "Ana@Acme.test",
        "email_verified": True,
        "groups": ["staff", "sec-analysts"],
    }
    http, response, before, _ = sign_in(oidc_app, idp, claims)
    assert response.status_code == 302 and response.location == "/console/", response.get_data(as_text=True)
    assert session_cookie(http) != before  # a new session id at sign-in
    authorize = idp.authorize_requests[-1]
    assert authorize["code_challenge_method"] == "S256" and authorize["nonce"] and authorize["state"]
    assert idp.token_requests[-1]["code_verifier"]  # PKCE: the provider checked it against the challenge
    assert http.get("/console/t/acme/overview").status_code == 200
    assert http.get("/console/t/globex/overview").status_code == 404
    with oidc_app.extensions["gateway.db"].sessions() as session:
        user = session.scalar(select(ConsoleUser))
    assert (user.email, user.role, user.password_hash) == ("ana@acme.test", "analyst", None)
    assert user.oidc_subject == f"{idp.url}|u-1"
    # the next sign-in takes the role from the claim again (an IdP group change shows at once)
    claims["groups"] = ["sec-admins"]
    http, response, _, _ = sign_in(oidc_app, idp, claims)
    assert response.status_code == 302
    with oidc_app.extensions["gateway.db"].sessions() as session:
        assert session.scalar(select(ConsoleUser.role)) == "admin"
        assert session.scalar(select(ConsoleUser.id).where(ConsoleUser.id != user.id)) is None


def test_a_token_for_another_audience_is_refused(oidc_app, idp):
    idp.audience = "some-other-client"
    http, response, _, _ = sign_in(
        oidc_app, idp, {"sub": "u-2", "email": "eve@acme.test", "groups": ["sec-admins"]}
    )
    assert response.status_code == 401
    assert "not accepted" in response.get_data(as_text=True)
    assert http.get("/console/t/acme/overview").status_code == 302  # not signed in
    with oidc_app.extensions["gateway.db"].sessions() as session:
        assert session.scalar(select(ConsoleUser)) is None


def test_a_person_without_a_mapped_role_is_refused(oidc_app, idp):
    http, response, _, _ = sign_in(
        oidc_app, idp, {"sub": "u-3", "email": "bob@acme.test", "groups": ["sales"]}
    )
    assert response.status_code == 403 and "no console role" in response.get_data(as_text=True)
    assert http.get("/console/t/acme/overview").status_code == 302


def test_a_replayed_or_forged_callback_signs_nobody_in(oidc_app, idp):
    http, response, _, callback = sign_in(
        oidc_app, idp, {"sub": "u-4", "email": "cy@acme.test", "groups": ["staff"]}
    )
    assert response.status_code == 302
    # the same callback in another browser (no state in its session) is refused
    other = oidc_app.test_client()
    assert other.get(callback).status_code == 401
    assert other.get("/console/t/acme/overview").status_code == 302
    # a state that was never issued
    state = parse_qs(urlsplit(callback).query)["state"][0]
    assert other.get(callback.replace(state, "forged-state")).status_code == 401


def test_oidc_sign_in_lands_on_the_page_asked_for_and_never_off_site(oidc_app, idp):
    claims = {"sub": "u-5", "email": "di@acme.test", "email_verified": True, "groups": ["staff"]}
    # the way a person comes: a console page, the sign-in page, its "organisation" link
    http = oidc_app.test_client()
    asked = "/console/t/acme/findings?severity=high&cve=CVE-2024-1"
    to_login = http.get(asked)
    assert to_login.status_code == 302
    login_page = http.get(to_login.location).get_data(as_text=True)
    link = re.search(r'href="(/console/oidc/login\?next=[^"]+)"', login_page).group(1).replace("&amp;", "&")
    _, response, _, _ = sign_in(oidc_app, idp, claims, link)
    assert response.status_code == 302 and response.location == asked
    for target in (
        "//evil.example/console/",
        "https://evil.example/console/",
        "/console/\\evil.example",
        "/\\evil.example/console/",
        "/console//evil.example",
        "/console/\r\nLocation: https://evil.example",
        "/elsewhere",
    ):
        start = "/console/oidc/login?" + urlencode({"next": target})
        _, response, _, _ = sign_in(oidc_app, idp, claims, start)
        assert response.status_code == 302 and response.location == "/console/", (target, response.location)


def test_a_tenant_claim_is_the_authority_on_tenants(store_url, idp):
    app = make_app(
        store_url,
        eager=True,
        OIDC_ISSUER=idp.url,
        OIDC_CLIENT_ID=CLIENT_ID,
        OIDC_CLIENT_SECRET=CLIENT_SECRET,
        OIDC_ROLE_MAP="staff=reader",
        OIDC_TENANT_CLAIM="tenants",
    )
    db = app.extensions["gateway.db"]
    wipe(db)
    with db.session() as session:
        session.add_all(
            [Tenant(external_id="acme", name="Acme"), Tenant(external_id="globex", name="Globex")]
        )
    try:
        claims = {
            "sub": "u-5",
            "email": "dee@acme.test",
            "groups": "staff",
            "tenants": ["acme", "globex", "nope"],
        }
        http, response, _, _ = sign_in(app, idp, claims)
        assert response.status_code == 302
        assert http.get("/console/t/globex/overview").status_code == 200
        claims["tenants"] = ["acme"]
        http, response, _, _ = sign_in(app, idp, claims)
        assert http.get("/console/t/globex/overview").status_code == 404
        with db.sessions() as session:
            granted = set(
                session.scalars(
                    select(Tenant.external_id).join(
                        ConsoleUserTenant, ConsoleUserTenant.tenant_id == Tenant.id
                    )
                )
            )
        assert granted == {"acme"}
    finally:
        db.dispose()


def test_without_oidc_configured_its_urls_are_not_found(gw):
    assert gw.http.get("/console/oidc/login").status_code == 404
    assert "organisation" not in gw.http.get("/console/login").get_data(as_text=True)
