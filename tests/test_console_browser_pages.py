"""The console's working pages in Debian's Chromium (Playwright), against the app on PostgreSQL
behind a real HTTP server: filter findings by CVE and page forward, exempt a recommendation and
see the score change, assign and resolve an alert and see the history entry; a screenshot of
each page is saved under the test's output folder (``screenshots/``)."""

from __future__ import annotations

import re

import pytest

from tests import browser_support
from tests.browser_support import sign_in
from tests.conftest import Gateway
from tests.console_support import make_user
from tests.factories import document, finding
from tests.test_workflow import graph_alerts, push

PASSWORD = "correct horse battery staple"
# the browser fixtures, taken into this module (pytest finds fixtures among a module's names)
chromium, console_app, page, screenshot = (
    browser_support.chromium,
    browser_support.console_app,
    browser_support.page,
    browser_support.screenshot,
)
console_live = browser_support.console_live


@pytest.fixture
def seeded(console_live):
    """Tenant ``contoso``: 62 findings on four hosts (one healthy), three alerts; an analyst and an admin."""
    gw = Gateway(console_live.app)
    tenant = gw.tenant("contoso")
    headers = gw.partner("Tenable", [tenant])
    records = [
        finding(
            f"rec-{i}",
            host=f"host-{i % 3}.example.com",
            cves=(f"CVE-2024-{1000 + i}",),
            severity=("critical", "high", "medium", "low")[i % 4],
        )
        for i in range(61)
    ]
    records.append(finding("rec-fixed", host="clean.example.com", status="fixed", severity="low"))
    push(gw, tenant, headers, document(records), "canonical")
    push(gw, tenant, headers, graph_alerts(), "graph_alert")
    make_user(console_live.app, "ana@example.com", PASSWORD, "analyst", [tenant])
    make_user(console_live.app, "adam@example.com", PASSWORD, "admin", [tenant])
    console_live.tenant, console_live.gw, console_live.headers = tenant, gw, headers
    return console_live


def test_filter_findings_by_cve_and_page_forward(seeded, page, screenshot):
    sign_in(page, seeded.url, "ana@example.com", PASSWORD)
    page.goto(f"{seeded.url}/console/t/{seeded.tenant}/findings")
    first_ids = page.locator("table.findings tbody tr td:first-child a").all_inner_texts()
    assert len(first_ids) == 50
    screenshot("findings")

    page.get_by_role("link", name="Next page").click()
    page.wait_for_load_state()
    second_ids = page.locator("table.findings tbody tr td:first-child a").all_inner_texts()
    assert len(second_ids) == 12 and not set(first_ids) & set(second_ids)
    assert page.get_by_role("link", name="Next page").count() == 0

    page.goto(f"{seeded.url}/console/t/{seeded.tenant}/findings")
    page.get_by_label("CVE").fill("CVE-2024-1042")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_load_state()
    assert "cve=CVE-2024-1042" in page.url  # the filter is in the URL: the view can be shared
    assert page.locator("td.cve").all_inner_texts() == ["CVE-2024-1042"]
    # severity is shown as text, with its colour class
    badge = page.locator("table.findings tbody .sev").first
    assert badge.inner_text() in ("critical", "high", "medium", "low")
    assert f"sev-{badge.inner_text()}" in badge.get_attribute("class")
    screenshot("findings-by-cve")

    page.locator("table.findings tbody tr td:first-child a").first.click()
    page.wait_for_load_state()
    assert page.locator("table.sources tbody tr").count() == 1
    screenshot("finding")
    page.locator("dd a").first.click()  # its resource
    page.wait_for_load_state()
    assert "host-0.example.com" in page.locator("table.identifiers").inner_text()
    screenshot("resource")
    page.goto(f"{seeded.url}/console/t/{seeded.tenant}/resources")
    assert page.locator("table.resources tbody tr").count() == 5  # four scanned hosts and the alerts' host
    screenshot("resources")


def test_exempt_a_recommendation_and_see_the_score_change(seeded, page, screenshot):
    sign_in(page, seeded.url, "ana@example.com", PASSWORD)
    page.goto(f"{seeded.url}/console/t/{seeded.tenant}/recommendations")
    before = float(page.locator(".score-current").get_attribute("data-current"))
    assert page.locator("td.unhealthy").all_inner_texts() == ["3"]
    screenshot("recommendations")

    page.locator("table.recommendation-groups a").first.click()
    page.wait_for_load_state()
    row = page.locator("tr[data-recommendation]").filter(has_text="Unhealthy").first
    row.locator("summary", has_text="Exempt").click()
    form = row.locator("form.exempt")
    form.get_by_label("Category").select_option("waiver")
    form.get_by_label("Reason").fill("isolated lab host")
    form.get_by_label("Expires").fill("2099-12-31")
    form.get_by_role("button").click()
    page.wait_for_load_state()
    assert "Exemption created" in page.locator(".notice").inner_text()
    after = float(page.locator(".score-current").get_attribute("data-current"))
    assert after > before
    assert page.locator("td.status", has_text="(Exempt)").count() == 1
    screenshot("recommendation-type-after-exempt")


def test_assign_and_resolve_an_alert_and_see_the_history_entry(seeded, page, screenshot):
    sign_in(page, seeded.url, "ana@example.com", PASSWORD)
    page.goto(f"{seeded.url}/console/t/{seeded.tenant}/alerts")
    screenshot("alerts")
    page.locator("table.alerts tbody tr td a").first.click()
    page.wait_for_load_state()
    form = page.locator("form.alert-edit")
    form.get_by_label("Assign to").fill("ana")
    form.get_by_label("Status").select_option("resolved")
    form.get_by_label("Comment").fill("contained on the host")
    form.get_by_role("button", name="Save").click()
    page.wait_for_load_state()
    assert page.locator("dd.status").inner_text() == "resolved"
    assert page.locator("dd.assigned").inner_text() == "ana"
    history = page.locator("table.history tbody tr").filter(has_text="edited")
    assert history.count() == 1
    assert history.locator("td.actor").inner_text() == "user:ana@example.com"
    assert "resolved" in history.inner_text()
    # the time is shown in the browser's time zone (Europe/Paris), not as stored UTC text
    shown = history.locator("time").inner_text()
    assert shown and not re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", shown)
    screenshot("alert-after-edit")


def test_a_screenshot_of_every_page(seeded, page, screenshot):
    sign_in(page, seeded.url, "adam@example.com", PASSWORD)
    base = f"{seeded.url}/console/t/{seeded.tenant}"
    for name in ("ingestion", "admin"):
        page.goto(f"{base}/{name}")
        assert page.locator("h1").inner_text() == name.title()
        screenshot(name)
    page.goto(f"{base}/ingestion")
    page.locator("table.batches tbody tr td a").first.click()
    page.wait_for_load_state()
    assert page.locator("#batch-status").inner_text() == "succeeded"
    screenshot("batch")
    # creating a client shows its secret once
    page.goto(f"{base}/admin")
    page.locator("summary", has_text="Create a client").click()
    page.get_by_label("Name").fill("scanner")
    page.get_by_label("Provider").fill("Qualys")
    page.get_by_label("findings.write").check()
    page.get_by_role("button", name="Create").click()
    page.wait_for_load_state()
    secret = page.locator("#client-secret").inner_text()
    assert len(secret) > 20
    screenshot("client-created")
    page.goto(f"{base}/admin")
    assert secret not in page.content() and "scanner" in page.content()
    # phone width: the findings table scrolls inside the page rather than widening it
    page.set_viewport_size({"width": 390, "height": 800})
    page.goto(f"{base}/findings")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    screenshot("findings-phone")
