"""The console in a real browser: Debian's Chromium driven by Playwright, the app on PostgreSQL
behind a real HTTP server (tests/browser_support.py).  A screenshot of each page is saved under
the test's tmp folder (``screenshots/``)."""

from __future__ import annotations

import json

from tests.browser_support import *  # noqa: F403 - the fixtures: console_app, console_live, chromium, page, screenshot
from tests.browser_support import sign_in
from tests.conftest import Gateway
from tests.console_support import PASSWORD, make_user
from tests.factories import document, finding
from tests.test_merge import push


def _seed(app) -> str:
    """Tenant acme with three vulnerable hosts, one fixed later (two score changes), and an alert."""
    gw = Gateway(app)
    tenant = gw.tenant("acme")
    headers = gw.partner("Qualys", [tenant])
    hosts = ["a.acme.test", "b.acme.test", "c.acme.test"]
    push(gw, tenant, headers, document([finding(f"v-{h}", h, resource={"fqdn": h}) for h in hosts]))
    push(
        gw,
        tenant,
        headers,
        document(
            [
                finding(
                    "v-a.acme.test",
                    hosts[0],
                    resource={"fqdn": hosts[0]},
                    status="fixed",
                    ts="2024-04-02T00:00:00Z",
                )
            ]
        ),
    )
    alerts = gw.partner("Sentinel", [tenant], scopes="alerts.write")
    body = {
        "value": [
            {
                "id": "a1",
                "title": "Suspicious sign-in",
                "severity": "high",
                "status": "newAlert",
                "createdDateTime": "2024-04-01T10:00:00Z",
                "lastModifiedDateTime": "2024-04-01T11:00:00Z",
                "hostStates": [{"fqdn": "a.acme.test"}],
                "vendorInformation": {"provider": "Sentinel", "vendor": "Contoso"},
            }
        ]
    }
    response = gw.http.post(
        f"/api/v1/tenants/{tenant}/batches?format=graph_alert",
        data=json.dumps(body),
        headers=alerts | {"Content-Type": "application/json"},
    )
    assert response.status_code == 202
    return tenant


def test_reader_signs_in_sees_the_score_chart_cannot_reach_admin_and_signs_out(
    console_live, page, screenshot
):
    tenant = _seed(console_live.app)
    make_user(console_live.app, "reader@acme.test", role="reader", tenants=[tenant])
    base = console_live.url

    page.goto(f"{base}/console/")
    assert page.url.startswith(f"{base}/console/login")
    screenshot("login")
    sign_in(page, base, "reader@acme.test", PASSWORD)
    assert page.url == f"{base}/console/t/{tenant}/overview"
    assert page.locator("[data-testid=secure-score] .current").inner_text() == "2.00"
    assert page.locator("[data-testid=secure-score] .max").inner_text() == "6"
    chart = page.locator("[data-testid=score-history] svg")
    assert chart.is_visible()
    assert chart.locator("circle.point").count() == 2
    box = chart.locator("polyline.series").bounding_box()
    assert box and box["width"] > 100, "the line is drawn across the chart"
    assert [chart.locator("circle.point").nth(i).get_attribute("data-value") for i in range(2)] == [
        "0.0",
        "2.0",
    ]
    # dates shown in the browser's time zone (Europe/Paris), the UTC instant kept in the title
    last_push = page.locator("[data-testid=ingestion-24-hours] time").first
    assert "UTC" not in last_push.inner_text() and last_push.get_attribute("title")
    # severity as colour and text
    high = page.locator("[data-testid=alert-counts] .sev-high")
    assert high.inner_text() == "High"
    assert high.evaluate("node => getComputedStyle(node).backgroundColor") != "rgba(0, 0, 0, 0)"
    # keyboard: the first Tab lands on the skip link, with a visible focus ring
    page.keyboard.press("Tab")
    focused = page.evaluate(
        "() => [document.activeElement.className, getComputedStyle(document.activeElement).outlineStyle]"
    )
    assert focused == ["skip", "solid"]
    screenshot("overview")

    # no admin links for a reader; the page itself answers 403
    assert page.locator("nav [data-nav=admin]").count() == 0
    response = page.goto(f"{base}/console/t/{tenant}/admin/users")
    assert response.status == 403
    screenshot("admin-refused")
    # a forged request from the page, with a valid CSRF token, is refused by the server; without one too
    page.goto(f"{base}/console/t/{tenant}/overview")
    statuses = page.evaluate(
        """async (url) => {
        const form = new URLSearchParams({email: "evil@acme.test", role: "admin", password: "x".repeat(12)});
        const withToken = await window.consoleFetch(url, {method: "POST", body: form});
        const without = await fetch(url, {method: "POST", body: form, credentials: "same-origin"});
        return [withToken.status, without.status];
    }""",
        f"{base}/console/t/{tenant}/admin/users",
    )
    assert statuses == [403, 400]

    # phone width: nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    screenshot("overview-phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    page.click("form.signout button")
    page.wait_for_url(f"{base}/console/login")
    page.goto(f"{base}/console/t/{tenant}/overview")
    assert page.url.startswith(f"{base}/console/login"), "signed out: the session is gone"


def test_admin_adds_a_user_on_the_users_page(console_live, page, screenshot):
    tenant = _seed(console_live.app)
    make_user(console_live.app, "admin@acme.test", role="admin", tenants=[tenant])
    base = console_live.url
    sign_in(page, base, "admin@acme.test", PASSWORD)
    page.click("nav [data-nav=users]")
    page.wait_for_url(f"{base}/console/t/{tenant}/admin/users")
    page.fill("#new-email", "newcomer@acme.test")
    page.select_option("#new-role", "analyst")
    page.fill("#new-password", "a long password")
    page.click("text=Add user")
    page.wait_for_url(f"{base}/console/t/{tenant}/admin/users?created=*")
    row = page.locator("tr[data-email='newcomer@acme.test']")
    assert row.locator("td").first.inner_text() == "analyst"
    screenshot("admin-users")
    page.click("form.signout button")
    sign_in(page, base, "newcomer@acme.test", "a long password")
    assert page.url == f"{base}/console/t/{tenant}/overview"
    screenshot("overview-analyst")
