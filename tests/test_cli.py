"""The ``gateway`` command line against the real stores: client credentials and their tokens.

``client rotate-secret`` and ``client disable`` revoke the client's tokens in the store, in
the transaction that changes the client, so that a token never outlives the credentials it
was issued for, and ``client enable`` does not bring old tokens back.  Tokens are checked
over the real token, revocation and introspection endpoints and a protected API call.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from gateway import auth, cli
from gateway.models import ClientTenant, OAuthClient, OAuthToken, Tenant
from tests.conftest import QUEUE, REDIS_URL, ROOT, SECRET, make_app


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


def test_client_commands_share_the_consoles_rules(gw, gateway_cli):
    """``gateway client`` goes through gateway/clients.py, as the console's admin page does: the same
    refusal of a blank name, and a client of two tenants is created once, on both."""
    first = gateway_cli("tenant", "create", "Contoso").strip()
    second = gateway_cli("tenant", "create", "Fabrikam").strip()
    result = CliRunner().invoke(cli.main, ["client", "create", "--name", "  ", "--provider", "Qualys",
                                           "--tenant", first, "--scope", "findings.write"],
                                env=gateway_cli.env)
    assert result.exit_code == 2 and "'name' is 1 to 200 characters" in result.output
    output = gateway_cli("client", "create", "--name", "both", "--provider", "Qualys", "--tenant", first,
                         "--tenant", second, "--scope", "findings.write")
    client_id = dict(line.split("=", 1) for line in output.splitlines())["client_id"]
    with gw.db.sessions() as session:
        row = session.scalar(select(OAuthClient).where(OAuthClient.client_id == client_id))
        tenants = session.scalars(
            select(Tenant.external_id).join(ClientTenant, ClientTenant.tenant_id == Tenant.id)
            .where(ClientTenant.client_pk == row.id).order_by(Tenant.external_id)).all()
    assert (row.name, row.scope, sorted(tenants)) == ("both", "findings.write", sorted([first, second]))


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


# ---- the documented limits hold under the servers that run the API ---------------------------
#
# openapi: $filter is at most 4,000 characters and resourceId at most 2,048. Percent-encoded
# byte by byte, a 4,000-character filter of 4-byte UTF-8 characters is a request line of some
# 48,000 bytes: gunicorn's default limit (4,094 bytes) cut it with an HTML 400 before the app
# saw it. Under the documented production command (README) and under `gateway run`'s server,
# every request within the documented limits reaches the app, and one beyond them is the
# app's JSON 400 naming the parameter.


def _encoded(text: str) -> str:
    """Every byte percent-encoded: the longest form of ``text`` in a URL."""
    return "".join(f"%{byte:02X}" for byte in text.encode())


def _filter_of(length: int, character: str) -> str:
    prefix = "title eq '"
    return prefix + character * (length - len(prefix) - 1) + "'"


def _send(port: int, method: str, target: str, headers: dict, body: bytes | None = None):
    """One request over a real socket, its request line exactly as given; (status, type, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    kind = response.getheader("Content-Type", "")
    return response.status, kind, json.loads(data) if kind.startswith("application/json") else data


ASSESSMENT = json.dumps({"properties": {"status": {"code": "Unhealthy"}}}).encode()
VM_PREFIX = ("/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23/resourceGroups/prod/providers/"
             "Microsoft.Compute/virtualMachines/")


def _check_documented_limits(gw, port: int) -> None:
    """$filter and resourceId at their documented maxima, percent-encoded, reach the app; one
    character more is the app's JSON 400 naming the parameter."""
    tenant = gw.tenant()
    headers = {"Authorization": gw.partner("Contoso", [tenant])["Authorization"]}
    findings = f"/api/v1/tenants/{tenant}/security/findings"
    for character in ("a", "\U0001f600"):  # ASCII (3 bytes a character) and 4-byte UTF-8 (12 bytes)
        longest = _filter_of(4000, character)
        target = f"{findings}?%24filter={_encoded(longest)}"
        status, kind, body = _send(port, "GET", target, headers)
        assert status == 200 and body["value"] == [], (len(target), status, kind, str(body)[:300])
        status, kind, body = _send(port, "GET", f"{findings}?%24filter={_encoded(longest + ' ')}", headers)
        assert status == 400 and body["error"]["code"] == "invalidFilter", (status, kind, str(body)[:300])
        assert "$filter" in body["error"]["message"] and "4000" in body["error"]["message"]
    assert len(f"{findings}?%24filter={_encoded(_filter_of(4000, chr(0x1F600)))}") > 47_000

    resource = VM_PREFIX + "v" * (2048 - len(VM_PREFIX))
    put = f"/api/v1/tenants/{tenant}/assessments/8bb8be0a-6010-4789-812f-e4d661c4ed0e?resourceId="
    json_headers = headers | {"Content-Type": "application/json"}
    status, _, body = _send(port, "PUT", put + _encoded(resource), json_headers, ASSESSMENT)
    assert status == 201, (status, str(body)[:300])
    assert body["properties"]["resourceDetails"]["id"] == resource
    status, _, body = _send(port, "PUT", put + _encoded(resource + "v"), json_headers, ASSESSMENT)
    assert status == 400 and "'resourceId'" in body["error"]["message"], (status, str(body)[:300])


def _documented_gunicorn_command() -> list[str]:
    """The README's production command for the API, as words."""
    readme = (ROOT / "README.md").read_text()
    [line] = [line for line in readme.splitlines() if line.startswith("gunicorn ")]
    return shlex.split(line.split("#", 1)[0])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_documented_production_command_serves_every_documented_limit(pg_gw, pg_url):
    """gunicorn as the README runs it (one worker, on loopback): the maximal requests reach the app."""
    words = _documented_gunicorn_command()
    assert words[0] == "gunicorn" and "--limit-request-line" in words
    port = _free_port()
    for option, value in (("-b", f"127.0.0.1:{port}"), ("-w", "1")):
        words[words.index(option) + 1] = value
    env = dict(os.environ, GATEWAY_DATABASE_URL=pg_url, GATEWAY_BROKER_URL=REDIS_URL,
               GATEWAY_SECRET_KEY=SECRET, GATEWAY_TASK_QUEUE=QUEUE, GATEWAY_ISSUER="http://127.0.0.1",
               PYTHONPATH=str(ROOT))
    server = subprocess.Popen([sys.executable, "-m", *words], cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
        _check_documented_limits(pg_gw, port)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        server.stderr.close()


def test_the_embedded_servers_request_line_fits_every_documented_limit(pg_gw, live_server):
    """`gateway run` serves with werkzeug (as ``live_server`` does): request lines up to 64 KiB."""
    port = live_server.server.server_port
    _check_documented_limits(pg_gw, port)
    status, kind, _ = _send(port, "GET", "/healthz?x=" + "a" * 70_000, {})
    assert status == 414  # the server's own cap, far above any request within the documented limits


def test_batch_list_and_show(gw, gateway_cli):
    import json

    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    from tests.factories import document, finding

    pushed = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical",
                          data=document([finding("q-1")]),
                          headers=headers | {"Content-Type": "application/json"}).get_json()["id"]
    lines = gateway_cli("batch", "list", "--tenant", tenant, "--status", "succeeded",
                        "--limit", "5").splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{pushed}\t{tenant}\tQualys\tcanonical\tsucceeded")
    assert gateway_cli("batch", "list", "--tenant", tenant, "--status", "failed") == ""
    shown = json.loads(gateway_cli("batch", "show", pushed))
    assert shown["id"] == pushed and shown["tenant"] == tenant and shown["counts"]["created"] == 1
    for args, message in ((["batch", "show", "999999"], "unknown batch: 999999"),
                          (["batch", "show", "x"], "not a batch id: x"),
                          (["batch", "list", "--tenant", "nobody"], "unknown tenant: nobody")):
        result = CliRunner().invoke(cli.main, args, env=gateway_cli.env)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    broken = CliRunner().invoke(cli.main, ["batch", "list"],
                                env=gateway_cli.env | {"GATEWAY_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"})
    assert broken.exit_code == 1 and len(broken.output.strip().splitlines()) == 1, broken.output
