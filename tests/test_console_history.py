"""The Overview's "findings by severity over time" (issue 15): the beat's snapshot into the kept
daily series ``finding_severity_days`` (gateway/console/history.py) and the chart drawn from it.

On both stores, with findings merged through the API (real pushes), the snapshot run through its
Celery task (eager: the same task code the beat sends), and the page read signed in."""

from __future__ import annotations

import re
from collections import Counter
from datetime import date, timedelta

import pytest
from sqlalchemy import select

from gateway.console.history import snapshot
from gateway.models import Finding, FindingSeverityDay, Tenant, utcnow
from tests.conftest import make_app
from tests.console_support import login, make_user
from tests.factories import document, finding
from tests.test_workflow import push

DAY = date(2026, 11, 20)
READER = "reader@history.test"


@pytest.fixture
def tenants(gw):
    """Tenant A: 3 critical (one fixed), 2 medium, 1 low (fixed); tenant B: 4 high, open."""
    a, b = gw.tenant("hist-a"), gw.tenant("hist-b")
    headers_a, headers_b = gw.partner("Tenable", [a]), gw.partner("Tenable", [b])
    records = [finding(f"c-{i}", host=f"c{i}.a.test", severity="critical",
                       status="fixed" if i == 0 else "open") for i in range(3)]
    records += [finding(f"m-{i}", host=f"m{i}.a.test", severity="medium") for i in range(2)]
    records.append(finding("l-0", host="l0.a.test", severity="low", status="fixed"))
    push(gw, a, headers_a, document(records), "canonical")
    push(gw, b, headers_b, document([finding(f"h-{i}", host=f"h{i}.b.test") for i in range(4)]), "canonical")
    make_user(gw.app, READER, role="reader", tenants=[a])
    with gw.db.session() as session:
        ids = dict(session.execute(select(Tenant.external_id, Tenant.id)).all())
    gw.a, gw.b, gw.headers_a, gw.ids = a, b, headers_a, ids
    return gw


def stored(gw, day: date | None = None) -> dict[tuple[str, date, str], int]:
    """Every kept row as {(tenant external id, day, severity): open findings}."""
    query = select(Tenant.external_id, FindingSeverityDay.day, FindingSeverityDay.severity,
                   FindingSeverityDay.open_findings).join(Tenant, Tenant.id == FindingSeverityDay.tenant_id)
    if day:
        query = query.where(FindingSeverityDay.day == day)
    with gw.db.engine.connect() as conn:
        return {(t, d, s): n for t, d, s, n in conn.execute(query)}


def open_in_store(gw, tenant: str) -> Counter:
    """The tenant's findings counted one by one (not by the snapshot's grouped statement)."""
    with gw.db.session() as session:
        rows = session.execute(select(Finding.severity, Finding.state)
                               .where(Finding.tenant_id == gw.ids[tenant])).all()
    return Counter(severity for severity, state in rows if state != "resolved")


def run_task(gw, day: date) -> int:
    from workers.tasks import snapshot_finding_history

    with gw.app.app_context():
        return snapshot_finding_history.delay(day.isoformat()).get()


def test_the_snapshot_counts_open_findings_per_tenant_and_severity(tenants):
    gw = tenants
    written = run_task(gw, DAY)
    rows = stored(gw)
    assert written == len(rows) == 10  # two tenants x five severities, zeros included
    for tenant in (gw.a, gw.b):
        expected = open_in_store(gw, tenant)
        got = {s: n for (t, _, s), n in rows.items() if t == tenant and n}
        assert got == dict(expected), tenant
    # resolved findings are not counted; B's findings are not in A's rows
    assert rows[(gw.a, DAY, "critical")] == 2 and rows[(gw.a, DAY, "medium")] == 2
    assert rows[(gw.a, DAY, "low")] == 0 and rows[(gw.a, DAY, "high")] == 0
    assert rows[(gw.b, DAY, "high")] == 4 and rows[(gw.b, DAY, "critical")] == 0


def test_a_second_snapshot_the_same_day_updates_and_earlier_days_are_kept(tenants):
    gw = tenants
    earlier = DAY - timedelta(days=1)
    run_task(gw, earlier)
    run_task(gw, DAY)
    before = stored(gw, DAY)
    # both open mediums and one critical are fixed, then the day is counted again
    fixed = [finding(f"m-{i}", host=f"m{i}.a.test", severity="medium", status="fixed",
                     ts="2024-04-02T00:00:00Z") for i in range(2)]
    fixed.append(finding("c-1", host="c1.a.test", severity="critical", status="fixed",
                         ts="2024-04-02T00:00:00Z"))
    push(gw, gw.a, gw.headers_a, document(fixed), "canonical")
    run_task(gw, DAY)
    after = stored(gw, DAY)
    assert set(after) == set(before)  # updated in place, no second row per (tenant, day, severity)
    assert after[(gw.a, DAY, "critical")] == 1 and after[(gw.a, DAY, "medium")] == 0
    assert {s: n for (t, _, s), n in after.items() if t == gw.a and n} == dict(open_in_store(gw, gw.a))
    assert after[(gw.b, DAY, "high")] == before[(gw.b, DAY, "high")] == 4
    kept = stored(gw, earlier)
    assert kept[(gw.a, earlier, "medium")] == 2 and kept[(gw.a, earlier, "critical")] == 2
    assert len(stored(gw)) == 20  # two days x two tenants x five severities


def test_a_snapshot_of_one_tenant_writes_only_its_rows(tenants):
    gw = tenants
    with gw.db.engine.begin() as conn:
        snapshot(conn, tenant_id=gw.ids[gw.b], today=DAY)
    assert {t for t, _, _ in stored(gw)} == {gw.b}


def test_the_beat_runs_the_snapshot_at_the_configured_interval(store_url):
    app = make_app(store_url, eager=True, FINDING_HISTORY_SECONDS=600)
    try:
        entry = app.extensions["celery"].conf.beat_schedule["snapshot-finding-history"]
        assert entry["task"] == "workers.tasks.snapshot_finding_history" and entry["schedule"] == 600.0
    finally:
        app.extensions["gateway.db"].dispose()


def test_the_overview_draws_a_line_per_severity_from_the_kept_days(tenants):
    gw = tenants
    http = login(gw.app.test_client(), READER)
    page = http.get(f"/console/t/{gw.a}/overview").get_data(as_text=True)
    assert 'data-testid="findings-history-empty"' in page and "No history yet" in page
    assert 'data-testid="findings-history"' not in page

    today = utcnow().date()
    days = [today - timedelta(days=n) for n in (40, 2, 1)]  # the first is outside the 30 days shown
    for day in days:
        with gw.db.engine.begin() as conn:
            snapshot(conn, today=day)
    fixed = [finding(f"m-{i}", host=f"m{i}.a.test", severity="medium", status="fixed",
                     ts="2024-04-02T00:00:00Z") for i in range(1)]
    push(gw, gw.a, gw.headers_a, document(fixed), "canonical")
    with gw.db.engine.begin() as conn:
        snapshot(conn, today=today)

    page = http.get(f"/console/t/{gw.a}/overview").get_data(as_text=True)
    chart = re.search(r'<figure data-testid="findings-history">(.*?)</figure>', page, re.S).group(1)
    assert 'data-points="3"' in chart and 'data-series="2"' in chart  # 3 days shown; critical, medium
    points = re.findall(r'<circle class="point sev-(\w+)"[^>]*data-series="(\w+)" data-day="([\d-]+)"'
                        r' data-value="(\d+)"><title>([^<]+)</title>', chart)
    by_series = {}
    for cls, name, day, value, title in points:
        assert cls == name and title == f"{day} · {name.capitalize()}: {value}"
        by_series.setdefault(name, []).append((day, int(value)))
    shown = [d.isoformat() for d in days[1:]] + [today.isoformat()]
    assert by_series == {"critical": [(d, 2) for d in shown],
                         "medium": [(shown[0], 2), (shown[1], 2), (shown[2], 1)]}
    # named in words at the line's end and in the legend, not by colour alone; B's high findings absent
    assert ">Critical 2</text>" in chart and ">Medium 1</text>" in chart and "High" not in chart
    latest = re.search(r'data-testid="findings-history-latest">(.*?)</table>', page, re.S).group(1)
    assert re.findall(r'sev-(\w+)">\w+</span></td>\s*<td class="num">(\d+)</td>', latest) == [
        ("critical", "2"), ("medium", "1")]
