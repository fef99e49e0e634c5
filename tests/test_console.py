"""The console's sign-in, sessions, CSRF, roles, tenant isolation, Overview and Users page.

On both stores (the sessions live in the store), through the real sign-in form and the app's
routes; the browser tests are in tests/test_console_browser.py, OIDC in test_console_oidc.py.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from gateway import cli
from gateway.console.auth import ROLE_SCOPES
from gateway.models import ConsoleSession, ConsoleUser, ConsoleUserTenant, Tenant, utcnow
from tests.conftest import REDIS_URL, SECRET, Gateway, make_app, wipe
from tests.console_support import PASSWORD, csrf_token, login, make_user, session_cookie
from tests.factories import document, finding
from tests.test_merge import push

FAILED = "Sign-in failed: wrong email or password, or the account is locked."


@pytest.fixture
def two_tenants(gw):
    """Tenants A and B, a reader of A, an analyst of A, an admin of A and B, and an admin of A only."""
    a, b = gw.tenant("acme"), gw.tenant("globex")
    make_user(gw.app, "reader@acme.test", role="reader", tenants=[a])
    make_user(gw.app, "analyst@acme.test", role="analyst", tenants=[a])
    make_user(gw.app, "boss@acme.test", role="admin", tenants=[a, b])
    make_user(gw.app, "admin@acme.test", role="admin", tenants=[a])
    return gw, a, b


def _set_cookie_headers(response) -> list[str]:
    return [value for key, value in response.headers.items() if key.lower() == "set-cookie"]


def test_sign_in_rotates_the_session_id_and_the_cookie_is_secure_httponly_lax(two_tenants):
    gw, a, _ = two_tenants
    http = gw.app.test_client()
    token = csrf_token(http)
    before = session_cookie(http)
    assert before, "the sign-in page keeps its CSRF secret in a session"
    response = http.post(
        "/console/login", data={"email": "reader@acme.test", "password": PASSWORD, "csrf_token": token}
    )
    assert response.status_code == 302 and response.location == "/console/"
    after = session_cookie(http)
    assert after and after != before
    cookie = next(c for c in _set_cookie_headers(response) if c.startswith("gateway_console="))
    flags = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"secure", "httponly"} <= flags
    assert "SameSite=Lax" in cookie and "Path=/console" in cookie
    # the store keeps a hash, never the id itself
    with gw.db.sessions() as session:
        stored = list(session.scalars(select(ConsoleSession.id_hash)))
    assert after not in stored and before not in stored and len(stored) == 1
    assert http.get(f"/console/t/{a}/overview").status_code == 200
    # a fixated (pre-sign-in) id signs nobody in
    attacker = gw.app.test_client()
    attacker.set_cookie("gateway_console", before, path="/console")
    response = attacker.get(f"/console/t/{a}/overview")
    assert response.status_code == 302 and response.location.startswith("/console/login")


def test_the_api_sets_no_console_cookie(two_tenants):
    gw, a, _ = two_tenants
    headers = gw.partner("Qualys", [a])
    response = gw.http.get(f"/api/v1/tenants/{a}/security/findings", headers=headers)
    assert response.status_code == 200
    assert not _set_cookie_headers(response)


def test_state_changing_requests_without_the_csrf_token_are_refused(two_tenants):
    gw, a, _ = two_tenants
    http = login(gw.app.test_client(), "admin@acme.test")
    for data in ({}, {"csrf_token": "forged"}):
        response = http.post("/console/logout", data=data)
        assert response.status_code == 400
        assert "CSRF" in response.get_data(as_text=True)
        assert http.get(f"/console/t/{a}/overview").status_code == 200  # still signed in
        response = http.post(
            f"/console/t/{a}/admin/users",
            data={**data, "email": "new@acme.test", "role": "reader", "password": "x" * 12},
        )
        assert response.status_code == 400
    with gw.db.sessions() as session:
        assert session.scalar(select(ConsoleUser).where(ConsoleUser.email == "new@acme.test")) is None
    # the token of another session does not do either
    other = login(gw.app.test_client(), "reader@acme.test")
    assert http.post("/console/logout", data={"csrf_token": other.csrf()}).status_code == 400
    # the header (fetch) and the form field both work
    token = http.csrf()
    response = http.post(
        f"/console/t/{a}/admin/users",
        headers={"X-CSRFToken": token},
        data={"email": "new@acme.test", "role": "reader", "password": "x" * 12},
    )
    assert response.status_code == 303
    response = http.post("/console/logout", data={"csrf_token": token})
    assert response.status_code == 302
    assert http.get(f"/console/t/{a}/overview").status_code == 302  # signed out
    with gw.db.sessions() as session:
        admin = session.scalar(select(ConsoleUser.id).where(ConsoleUser.email == "admin@acme.test"))
        assert session.scalar(select(ConsoleSession).where(ConsoleSession.user_id == admin)) is None


def test_the_sign_in_form_itself_needs_its_csrf_token(two_tenants):
    gw, a, _ = two_tenants
    http = gw.app.test_client()
    response = http.post("/console/login", data={"email": "reader@acme.test", "password": PASSWORD})
    assert response.status_code == 400
    assert http.get(f"/console/t/{a}/overview").status_code == 302


def test_lockout_after_repeated_failures(two_tenants):
    gw, a, _ = two_tenants
    gw.app.config.update(CONSOLE_LOCKOUT_FAILURES=3, CONSOLE_LOCKOUT_SECONDS=600)
    http = gw.app.test_client()
    for _ in range(3):
        login(http, "reader@acme.test", "wrong password!", expect=401)
    response = http.post(
        "/console/login",
        data={"email": "reader@acme.test", "password": PASSWORD, "csrf_token": csrf_token(http)},
    )
    assert response.status_code == 401, "locked: even the right password is refused"
    assert FAILED in response.get_data(as_text=True)
    # the same answer for an unknown email: nothing tells which
    unknown = http.post(
        "/console/login",
        data={"email": "nobody@acme.test", "password": PASSWORD, "csrf_token": csrf_token(http)},
    )
    assert unknown.status_code == 401 and FAILED in unknown.get_data(as_text=True)
    assert http.get(f"/console/t/{a}/overview").status_code == 302
    with gw.db.session() as session:  # the lock runs out
        session.execute(
            update(ConsoleUser)
            .where(ConsoleUser.email == "reader@acme.test")
            .values(locked_until=utcnow() - timedelta(seconds=1))
        )
    login(http, "reader@acme.test")
    assert http.get(f"/console/t/{a}/overview").status_code == 200


def test_sign_in_attempts_are_limited_per_address_with_a_readable_page(pg_url):
    """RATELIMIT_CONSOLE_LOGIN counts the form's posts per remote address (in Redis, as every limit):
    past it, 429 with Retry-After and a page that says so, even for the right password; another
    address still signs in, and the per-user lockout still counts on its own."""
    app = make_app(pg_url, eager=True, RATELIMIT_ENABLED=True, RATELIMIT_STORAGE_URL=REDIS_URL,
                   RATELIMIT_KEY_PREFIX=f"gw-test-{uuid.uuid4().hex[:8]}", RATELIMIT_CONSOLE_LOGIN="3/hour",
                   CONSOLE_LOCKOUT_FAILURES=5)
    try:
        wipe(app.extensions["gateway.db"])
        gw = Gateway(app)
        a = gw.tenant("acme")
        make_user(app, "reader@acme.test", role="reader", tenants=[a])
        make_user(app, "other@acme.test", role="reader", tenants=[a])
        here = app.test_client()
        for _ in range(3):
            login(here, "reader@acme.test", "wrong password!", expect=401)
        refused = here.post(
            "/console/login",
            data={"email": "other@acme.test", "password": PASSWORD, "csrf_token": csrf_token(here)},
        )
        assert refused.status_code == 429 and 0 < int(refused.headers["Retry-After"]) <= 3600
        text = refused.get_data(as_text=True)
        assert "Too many sign-in attempts from your network address" in text and "<form" in text
        assert here.get(f"/console/t/{a}/overview").status_code == 302  # not signed in
        elsewhere = app.test_client()
        elsewhere.environ_base["REMOTE_ADDR"] = "192.0.2.7"
        login(elsewhere, "other@acme.test")
        assert elsewhere.get(f"/console/t/{a}/overview").status_code == 200
        # the per-user lockout is separate: reader's 3 failures count, 2 more from a third address lock them
        third = app.test_client()
        third.environ_base["REMOTE_ADDR"] = "192.0.2.8"
        for _ in range(2):
            login(third, "reader@acme.test", "wrong password!", expect=401)
        with gw.db.sessions() as session:
            locked = session.scalar(
                select(ConsoleUser.locked_until).where(ConsoleUser.email == "reader@acme.test")
            )
        assert locked is not None
    finally:
        app.extensions["gateway.db"].dispose()


def test_failures_below_the_limit_are_forgotten_at_a_good_sign_in(two_tenants):
    gw, _, _ = two_tenants
    gw.app.config.update(CONSOLE_LOCKOUT_FAILURES=3)
    http = gw.app.test_client()
    for _ in range(2):
        login(http, "reader@acme.test", "wrong password!", expect=401)
    login(http, "reader@acme.test")
    for _ in range(2):
        login(gw.app.test_client(), "reader@acme.test", "wrong password!", expect=401)
    login(gw.app.test_client(), "reader@acme.test")  # 2 + 2 failures, never 3 in a row


def _tenant_urls(app, tenant: str) -> list[str]:
    """Every console GET URL of a tenant (the pages of gateway/console/pages/ included)."""
    urls = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/console/t/<tenant>") or "GET" not in rule.methods:
            continue
        values = {name: ("1" if name != "tenant" else tenant) for name in rule.arguments}
        urls.append(_build(rule, values))
    return urls


def _build(rule, values: dict) -> str:
    return re.sub(r"<(?:[^<>:]+:)?([^<>:]+)>", lambda m: str(values[m.group(1)]), rule.rule)


def test_a_user_of_one_tenant_gets_404_on_every_page_of_another(two_tenants):
    gw, a, b = two_tenants
    http = login(gw.app.test_client(), "admin@acme.test")
    urls_b = _tenant_urls(gw.app, b)
    assert f"/console/t/{b}/overview" in urls_b and f"/console/t/{b}/admin/users" in urls_b
    for url in urls_b + _tenant_urls(gw.app, "no-such-tenant"):
        response = http.get(url)
        assert response.status_code == 404, url
    # the answer for an existing tenant and a missing one is the same
    assert (
        http.get(f"/console/t/{b}/overview").get_data()
        == http.get("/console/t/no-such-tenant/overview").get_data()
    )
    # and a forged POST to B's pages is refused the same way
    response = http.post(
        f"/console/t/{b}/admin/users",
        data={"csrf_token": http.csrf(), "email": "x@globex.test", "role": "admin", "password": "x" * 12},
    )
    assert response.status_code == 404
    assert http.get(f"/console/t/{a}/overview").status_code == 200


def test_the_start_page_and_the_switcher_keep_to_granted_tenants(two_tenants):
    gw, a, b = two_tenants
    http = login(gw.app.test_client(), "boss@acme.test")
    first = http.get("/console/")
    assert first.status_code == 302 and first.location in (
        f"/console/t/{a}/overview",
        f"/console/t/{b}/overview",
    )
    page = http.get(f"/console/t/{a}/overview").get_data(as_text=True)
    assert 'id="tenant-switch"' in page and f'value="{b}"' in page
    response = http.get("/console/switch", query_string={"tenant": b, "page": f"/console/t/{a}/findings"})
    assert response.location == f"/console/t/{b}/findings"
    reader = login(gw.app.test_client(), "reader@acme.test")
    response = reader.get("/console/switch", query_string={"tenant": b, "page": f"/console/t/{a}/overview"})
    assert response.location == "/console/"


def test_sign_in_goes_back_to_the_page_asked_for_but_never_off_site(two_tenants):
    gw, a, _ = two_tenants
    http = gw.app.test_client()
    response = http.get(f"/console/t/{a}/overview")
    assert response.status_code == 302 and "next=" in response.location
    for target, expected in (
        (f"/console/t/{a}/overview", f"/console/t/{a}/overview"),
        ("//evil.example/console/", "/console/"),
        ("https://evil.example/", "/console/"),
    ):
        http = gw.app.test_client()
        token = csrf_token(http)
        response = http.post(
            "/console/login",
            data={"email": "reader@acme.test", "password": PASSWORD, "csrf_token": token, "next": target},
        )
        assert response.location == expected


def test_roles_reader_cannot_open_admin_pages_nor_forge_an_admin_post(two_tenants):
    gw, a, _ = two_tenants
    for email in ("reader@acme.test", "analyst@acme.test"):
        http = login(gw.app.test_client(), email)
        assert http.get(f"/console/t/{a}/admin/users").status_code == 403
        page = http.get(f"/console/t/{a}/overview").get_data(as_text=True)
        assert 'data-nav="admin"' not in page and 'data-nav="users"' not in page
        response = http.post(
            f"/console/t/{a}/admin/users",
            data={
                "csrf_token": http.csrf(),
                "email": "evil@acme.test",
                "role": "admin",
                "password": "x" * 12,
            },
        )
        assert response.status_code == 403
    with gw.db.sessions() as session:
        assert session.scalar(select(ConsoleUser).where(ConsoleUser.email == "evil@acme.test")) is None
    assert ROLE_SCOPES["reader"] == {"security.read"}
    assert ROLE_SCOPES["analyst"] == {"security.read", "alerts.manage", "posture.manage"}
    assert {"admin", "itsm.manage", "exports.manage"} <= ROLE_SCOPES["admin"]


def test_the_admin_users_page_creates_changes_and_disables_users(two_tenants):
    gw, a, b = two_tenants
    admin = login(gw.app.test_client(), "admin@acme.test")
    page = admin.get(f"/console/t/{a}/admin/users").get_data(as_text=True)
    assert "reader@acme.test" in page and "boss@acme.test" in page
    response = admin.post(
        f"/console/t/{a}/admin/users",
        data={"csrf_token": admin.csrf(), "email": "New@Acme.test", "role": "analyst", "password": "short"},
    )
    assert response.status_code == 400 and "at least 12 characters" in response.get_data(as_text=True)
    response = admin.post(
        f"/console/t/{a}/admin/users",
        data={
            "csrf_token": admin.csrf(),
            "email": "New@Acme.test",
            "role": "analyst",
            "password": "a long password",
        },
    )
    assert response.status_code == 303
    newcomer = login(gw.app.test_client(), "new@acme.test", "a long password")
    assert newcomer.get(f"/console/t/{a}/overview").status_code == 200
    assert newcomer.get(f"/console/t/{b}/overview").status_code == 404
    with gw.db.sessions() as session:
        ids = dict(session.execute(select(ConsoleUser.email, ConsoleUser.id)).all())
    token = admin.csrf()
    assert (
        admin.post(
            f"/console/t/{a}/admin/users/{ids['new@acme.test']}",
            data={"csrf_token": token, "action": "role", "role": "reader"},
        ).status_code
        == 303
    )
    # boss also has tenant B, which this admin does not manage: only "remove from this tenant"
    assert (
        admin.post(
            f"/console/t/{a}/admin/users/{ids['boss@acme.test']}",
            data={"csrf_token": token, "action": "disable"},
        ).status_code
        == 403
    )
    # nobody disables themself
    assert (
        admin.post(
            f"/console/t/{a}/admin/users/{ids['admin@acme.test']}",
            data={"csrf_token": token, "action": "disable"},
        ).status_code
        == 403
    )
    assert (
        admin.post(
            f"/console/t/{a}/admin/users/{ids['new@acme.test']}",
            data={"csrf_token": token, "action": "disable"},
        ).status_code
        == 303
    )
    # disabling ends the user's sessions at once
    assert newcomer.get(f"/console/t/{a}/overview").status_code == 302
    login(gw.app.test_client(), "new@acme.test", "a long password", expect=401)
    assert (
        admin.post(
            f"/console/t/{a}/admin/users/{ids['boss@acme.test']}",
            data={"csrf_token": token, "action": "revoke"},
        ).status_code
        == 303
    )
    with gw.db.sessions() as session:
        role = session.scalar(select(ConsoleUser.role).where(ConsoleUser.email == "new@acme.test"))
        boss_tenants = set(
            session.scalars(
                select(Tenant.external_id)
                .join(ConsoleUserTenant, ConsoleUserTenant.tenant_id == Tenant.id)
                .where(ConsoleUserTenant.user_id == ids["boss@acme.test"])
            )
        )
    assert role == "reader" and boss_tenants == {b}


def _alert(pid: str, severity: str, status: str = "newAlert") -> dict:
    return {
        "id": pid,
        "title": f"alert {pid}",
        "severity": severity,
        "status": status,
        "category": "CredentialAccess",
        "createdDateTime": "2024-04-01T10:00:00Z",
        "lastModifiedDateTime": "2024-04-01T11:00:00Z",
        "hostStates": [{"fqdn": "web-1.acme.test"}],
        "vendorInformation": {"provider": "Sentinel", "vendor": "Contoso"},
    }


def test_the_overview_shows_score_history_controls_counts_and_ingestion(two_tenants):
    gw, a, b = two_tenants
    headers = gw.partner("Qualys", [a, b])
    hosts = ["a.acme.test", "b.acme.test", "c.acme.test"]
    push(gw, a, headers, document([finding(f"v-{h}", h, resource={"fqdn": h}) for h in hosts]))
    fixed = finding(
        "v-a.acme.test", hosts[0], resource={"fqdn": hosts[0]}, status="fixed", ts="2024-04-02T00:00:00Z"
    )
    push(gw, a, headers, document([fixed]))
    push(gw, b, headers, document([finding("v-x", "x.globex.test", resource={"fqdn": "x.globex.test"})]))
    alerts = gw.partner("Sentinel", [a], scopes="alerts.write security.read")
    body = {
        "value": [
            _alert("a1", "high"),
            _alert("a2", "high", "inProgress"),
            _alert("a3", "low"),
            _alert("a4", "medium", "resolved"),
        ]
    }
    response = gw.http.post(
        f"/api/v1/tenants/{a}/batches?format=graph_alert",
        data=json.dumps(body),
        headers=alerts | {"Content-Type": "application/json"},
    )
    assert response.status_code == 202, response.get_json()
    manager = gw.partner("Triage", [a], scopes="alerts.manage security.read")
    listed = gw.http.get(f"/api/v1/tenants/{a}/security/alerts", headers=manager).get_json()["value"]
    ids = {alert["title"]: alert["id"] for alert in listed}
    for title, status in (("alert a2", "inProgress"), ("alert a4", "resolved")):
        response = gw.http.patch(
            f"/api/v1/tenants/{a}/security/alerts/{ids[title]}", json={"status": status}, headers=manager
        )
        assert response.status_code in (200, 204), response.get_json()

    http = login(gw.app.test_client(), "reader@acme.test")
    page = http.get(f"/console/t/{a}/overview").get_data(as_text=True)
    score = re.search(
        r'data-testid="secure-score">\s*<span class="current">([\d.]+)</span> of\s*'
        r'<span class="max">([\d.]+)</span>',
        page,
    )
    assert score and score.groups() == ("2.00", "6"), "1 of 3 resources healthy in a control worth 6"
    chart = re.search(r'<figure data-testid="score-history">(.*?)</figure>', page, re.S).group(1)
    assert 'data-points="2"' in chart and chart.count("<circle") == 2  # two changes: 0, then 2
    assert re.findall(r'<circle class="point"[^>]*data-value="([\d.]+)"', chart) == ["0.0", "2.0"]
    controls = re.search(r'data-testid="controls">(.*?)</table>', page, re.S).group(1)
    assert re.search(
        r"remediate-vulnerabilities</th><td class=\"num\">2.00</td>\s*<td class=\"num\">6</td>"
        r"<td class=\"num\">2</td>",
        controls,
    )
    recommendations = re.search(r'data-testid="recommendation-counts">(.*?)</table>', page, re.S).group(1)
    counted = dict(
        re.findall(r'sev-(\w+)">\w+</span></td>\s*<td class="num"><a [^>]*>(\d+)</a>', recommendations)
    )
    assert sum(int(n) for n in counted.values()) == 2  # the two unhealthy hosts' recommendations
    open_alerts = re.search(r'data-testid="alert-counts">(.*?)</table>', page, re.S).group(1)
    assert "newAlert" in open_alerts and "inProgress" in open_alerts and "resolved" not in open_alerts
    high = re.search(r'sev-high">High</span></td>(.*?)</tr>', open_alerts, re.S).group(1)
    assert re.findall(r">(\d+)</a>", high) == ["1", "1"]
    ingestion = re.search(r'data-testid="ingestion-24-hours">(.*?)</table>', page, re.S).group(1)
    qualys = re.search(r"Qualys</th>(.*?)</tr>", ingestion, re.S).group(1)
    assert re.findall(r'class="num">([\d,]+)</td>', qualys) == ["2", "4", "0"]  # B's push is not counted
    assert "Sentinel" in ingestion
    assert "<time datetime=" in ingestion  # shown in the user's time zone by console.js


def test_gateway_user_commands(store_url, gw):
    tenant = gw.tenant("acme")
    env = {"GATEWAY_DATABASE_URL": store_url, "GATEWAY_SECRET_KEY": SECRET}

    def run(*args: str, stdin: str | None = None, code: int = 0) -> str:
        result = CliRunner().invoke(cli.main, ["user", *args], env=env, input=stdin, catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    run(
        "create",
        "--email",
        "ops@acme.test",
        "--role",
        "analyst",
        "--tenant",
        tenant,
        "--password-stdin",
        stdin="a long password\n",
    )
    assert "already exists" in run(
        "create",
        "--email",
        "ops@acme.test",
        "--role",
        "reader",
        "--tenant",
        tenant,
        "--password-stdin",
        stdin="a long password\n",
        code=1,
    )
    assert "unknown tenant" in run(
        "create",
        "--email",
        "x@acme.test",
        "--role",
        "reader",
        "--tenant",
        "nope",
        "--password-stdin",
        stdin="a long password\n",
        code=1,
    )
    assert "at least 12" in run(
        "create",
        "--email",
        "y@acme.test",
        "--role",
        "reader",
        "--tenant",
        tenant,
        "--password-stdin",
        stdin="short\n",
        code=1,
    )
    other = gw.tenant("globex")
    run("grant", "--email", "ops@acme.test", "--tenant", other)
    assert run("list").splitlines() == [f"ops@acme.test\tanalyst\tlocal\t{tenant},{other}"]
    with gw.db.sessions() as session:
        stored = session.scalar(select(ConsoleUser.password_hash))
    assert stored.startswith("$argon2id$") and "a long password" not in stored
    http = login(gw.app.test_client(), "ops@acme.test", "a long password")
    assert http.get(f"/console/t/{other}/overview").status_code == 200
    run("disable", "--email", "ops@acme.test")
    assert http.get(f"/console/t/{other}/overview").status_code == 302  # its sessions ended
    assert run("list").splitlines() == [f"ops@acme.test\tanalyst\tdisabled\t{tenant},{other}"]
    run("enable", "--email", "ops@acme.test")
    assert "unknown time zone" in run("time-zone", "--email", "ops@acme.test", "--zone", "Mars/Base", code=1)
    run("time-zone", "--email", "ops@acme.test", "--zone", "Asia/Tokyo")
    http = login(gw.app.test_client(), "ops@acme.test", "a long password")
    assert 'data-time-zone="Asia/Tokyo"' in http.get(f"/console/t/{tenant}/overview").get_data(as_text=True)
    run("grant", "--email", "ops@acme.test", "--tenant", other, "--revoke")
    http = login(gw.app.test_client(), "ops@acme.test", "a long password")
    assert http.get(f"/console/t/{other}/overview").status_code == 404
