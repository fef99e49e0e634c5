"""The ``gateway`` command line against the real stores: client credentials and their tokens.

``client rotate-secret`` and ``client disable`` revoke the client's tokens in the store, in
the transaction that changes the client, so that a token never outlives the credentials it
was issued for, and ``client enable`` does not bring old tokens back.  Tokens are checked
over the real token, revocation and introspection endpoints and a protected API call.
"""

from __future__ import annotations

import base64

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from gateway import auth, cli
from gateway.models import OAuthToken
from tests.conftest import SECRET, make_app


def _basic(client_id: str, secret: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


class Cli:
    """``gateway ...`` run in-process on the test store (as ``GATEWAY_DATABASE_URL`` names it)."""

    def __init__(self, database_url: str) -> None:
        self.env = {"GATEWAY_DATABASE_URL": database_url, "GATEWAY_SECRET_KEY": SECRET}

    def __call__(self, *args: str) -> str:
        result = CliRunner().invoke(cli.main, list(args), env=self.env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    def create_client(self, tenant: str, *scopes: str) -> tuple[str, str]:
        options = [part for scope in scopes for part in ("--scope", scope)]
        output = self("client", "create", "--name", "scanner", "--provider", "Qualys", "--tenant", tenant,
                      *options)
        values = dict(line.split("=", 1) for line in output.splitlines())
        return values["client_id"], values["client_secret"]


@pytest.fixture
def gateway_cli(gw) -> Cli:
    return Cli(gw.app.config["DATABASE_URL"])


def _read(gw, tenant: str, token: str):
    return gw.http.get(f"/api/v1/tenants/{tenant}/security/findings",
                       headers={"Authorization": f"Bearer {token}"})


def _token_response(gw, client_id: str, secret: str):
    return gw.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                        headers=_basic(client_id, secret))


def _introspect(gw, token: str, client_id: str, secret: str) -> dict:
    response = gw.http.post("/oauth/introspect", data={"token": token}, headers=_basic(client_id, secret))
    return response.get_json()


def test_rotate_secret_revokes_the_clients_tokens(gw, gateway_cli):
    tenant = gateway_cli("tenant", "create", "Contoso").strip()
    client_id, secret = gateway_cli.create_client(tenant, "security.read")
    other_id, other_secret = gateway_cli.create_client(tenant, "security.read")
    old_tokens = [gw.token(client_id, secret), gw.token(client_id, secret, scope="security.read")]
    other_token = gw.token(other_id, other_secret)
    assert all(_read(gw, tenant, token).status_code == 200 for token in old_tokens)

    output = gateway_cli("client", "rotate-secret", client_id).splitlines()
    assert output[1] == "revoked 2 access token(s)"
    new_secret = output[0].removeprefix("client_secret=")
    assert new_secret != secret

    for token in old_tokens:
        refused = _read(gw, tenant, token)
        assert refused.status_code == 401 and "revoked" in refused.get_json()["error"]["message"]
        assert _introspect(gw, token, client_id, new_secret) == {"active": False}
    assert _token_response(gw, client_id, secret).status_code == 401  # the old secret
    new_token = gw.token(client_id, new_secret)
    assert _read(gw, tenant, new_token).status_code == 200
    assert _read(gw, tenant, other_token).status_code == 200  # another client's tokens are untouched
    with gw.db.sessions() as session:
        revoked = session.scalars(select(OAuthToken.revoked_at).order_by(OAuthToken.id)).all()
    assert [value is not None for value in revoked] == [True, True, False, False]


def test_disable_revokes_the_tokens_and_enable_does_not_revive_them(gw, gateway_cli):
    tenant = gateway_cli("tenant", "create", "Contoso").strip()
    client_id, secret = gateway_cli.create_client(tenant, "security.read")
    token = gw.token(client_id, secret)
    assert _read(gw, tenant, token).status_code == 200

    assert gateway_cli("client", "disable", client_id).splitlines() == [f"disabled {client_id}",
                                                                         "revoked 1 access token(s)"]
    assert _read(gw, tenant, token).status_code == 401
    assert _token_response(gw, client_id, secret).status_code == 401
    assert "disabled" in gateway_cli("client", "list")

    gateway_cli("client", "enable", client_id)
    refused = _read(gw, tenant, token)
    assert refused.status_code == 401 and "revoked" in refused.get_json()["error"]["message"]
    assert _introspect(gw, token, client_id, secret) == {"active": False}
    fresh = gw.token(client_id, secret)
    assert _read(gw, tenant, fresh).status_code == 200


def test_a_token_authenticated_with_a_secret_rotated_meanwhile_is_not_issued(gw, gateway_cli, monkeypatch):
    """The rotation commits between the secret check and the token's insert: no token."""
    tenant = gateway_cli("tenant", "create", "Contoso").strip()
    client_id, secret = gateway_cli.create_client(tenant, "security.read")
    check = auth.ClientAdapter.check_client_secret

    def rotated_meanwhile(adapter, client_secret):
        matched = check(adapter, client_secret)
        gateway_cli("client", "rotate-secret", client_id)
        return matched

    monkeypatch.setattr(auth.ClientAdapter, "check_client_secret", rotated_meanwhile)
    response = _token_response(gw, client_id, secret)
    assert response.status_code == 401 and response.get_json()["error"] == "invalid_client"
    assert response.headers["WWW-Authenticate"].startswith("Basic ")
    with gw.db.sessions() as session:
        assert session.scalars(select(OAuthToken)).all() == []


def test_disable_of_an_unknown_client_is_a_usage_error(gateway_cli):
    result = CliRunner().invoke(cli.main, ["client", "disable", "nobody"], env=gateway_cli.env)
    assert result.exit_code == 2 and "unknown client: nobody" in result.output


# ---- the issuer of `gateway run` (the embedded default) -------------------------------------


@pytest.mark.parametrize(("host", "port", "issuer"), [
    ("127.0.0.1", 8080, "http://127.0.0.1:8080"),
    ("localhost", 9000, "http://localhost:9000"),
    ("::1", 8080, "http://[::1]:8080"),
])
def test_gateway_run_names_its_own_address_as_the_issuer(host, port, issuer):
    assert cli.embedded_overrides(host, port, configured_issuer=None) == {"ISSUER": issuer}
    assert cli.embedded_overrides(host, port, configured_issuer="https://gw.example.com") == {}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_gateway_run_on_every_interface_takes_the_issuer_from_the_request(host, pg_url):
    overrides = cli.embedded_overrides(host, 8080, configured_issuer=None)
    assert overrides == {"ISSUER_FROM_REQUEST": True}
    app = make_app(pg_url, eager=True, **overrides)
    try:
        body = app.test_client().get("/.well-known/oauth-authorization-server",
                                     headers={"Host": "gateway.lan:8080"}).get_json()
    finally:
        app.extensions["gateway.db"].dispose()
    assert body["issuer"] == "http://gateway.lan:8080"
    assert body["token_endpoint"] == "http://gateway.lan:8080/oauth/token"
