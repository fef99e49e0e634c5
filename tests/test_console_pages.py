"""The console's working pages (gateway/console/pages/) through the Flask client, signed in as
local users (tests/console_support.py): roles, tenant isolation, CSRF on every POST, filters kept
in the URL, keyset paging, CSV, and edits that go through the API's service layer (an exemption
moves the score; an alert edit is an ``edited`` event whose actor is the user)."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
from sqlalchemy import event, select

from tests.console_support import login, make_user
from tests.factories import document, finding
from tests.test_workflow import graph_alerts, push

PAGES = ("recommendations", "findings", "resources", "alerts", "ingestion")
ANALYST, READER, ADMIN = "ana@example.com", "rita@example.com", "adam@example.com"
PASSWORD = "correct horse battery staple"


def token_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def page_text(client, url: str, status: int = 200) -> str:
    response = client.get(url)
    assert response.status_code == status, response.get_data(as_text=True)[:2000]
    return response.get_data(as_text=True)


def rows_of(html: str, attribute: str) -> list[str]:
    return re.findall(rf'{attribute}="([^"]+)"', html)


@pytest.fixture
def console(gw):
    """Tenant A with findings on three hosts and three alerts, tenant B with one finding, and an
    analyst, a reader and an admin of A."""
    a, b = gw.tenant("tenant-a"), gw.tenant("tenant-b")
    headers_a, headers_b = gw.partner("Tenable", [a]), gw.partner("Tenable", [b])
    records = [
        finding(
            f"rec-{i}",
            host=f"host-{i % 3}.example.com",
            cves=(f"CVE-2024-{1000 + i}",),
            severity="critical" if i % 4 == 0 else "medium",
        )
        for i in range(9)
    ]
    records.append(
        finding("rec-fixed", host="clean.example.com", status="fixed", severity="low")
    )  # a healthy resource
    push(gw, a, headers_a, document(records), "canonical")
    push(gw, a, headers_a, graph_alerts(), "graph_alert")
    push(gw, b, headers_b, document([finding("b-1", host="b.example.com")]), "canonical")
    for email, role in ((ANALYST, "analyst"), (READER, "reader"), (ADMIN, "admin")):
        make_user(gw.app, email, PASSWORD, role, [a])
    gw.a, gw.b, gw.headers_a, gw.headers_b = a, b, headers_a, headers_b
    return gw


def signed_in(gw, email: str):
    return login(gw.app.test_client(), email, PASSWORD)


def test_every_page_needs_a_signed_in_user_with_the_tenant(console):
    anonymous = console.app.test_client()
    for page in PAGES:
        response = anonymous.get(f"/console/t/{console.a}/{page}")
        assert response.status_code in (302, 303) and "/console/login" in response.headers["Location"]
    reader = signed_in(console, READER)
    for page in PAGES:
        page_text(reader, f"/console/t/{console.a}/{page}")
        # another tenant's pages, or a tenant that does not exist: the same 404
        page_text(reader, f"/console/t/{console.b}/{page}", 404)
        page_text(reader, f"/console/t/no-such-tenant/{page}", 404)
    # B's rows are not reachable by id through A's URL either
    with console.db.engine.connect() as conn:
        from gateway.models import Batch, Finding, Tenant

        b_id = conn.execute(select(Tenant.id).where(Tenant.external_id == console.b)).scalar_one()
        b_finding = conn.execute(select(Finding.id).where(Finding.tenant_id == b_id)).scalar_one()
        b_batch = conn.execute(select(Batch.id).where(Batch.tenant_id == b_id)).scalar_one()
    page_text(reader, f"/console/t/{console.a}/findings/{b_finding}", 404)
    page_text(reader, f"/console/t/{console.a}/ingestion/batches/{b_batch}", 404)
    assert reader.get(f"/console/t/{console.a}/ingestion/batches/{b_batch}/progress.json").status_code == 404


def test_roles_decide_who_sees_admin_and_who_edits(console):
    reader, analyst, admin = (signed_in(console, who) for who in (READER, ANALYST, ADMIN))
    page_text(reader, f"/console/t/{console.a}/admin", 403)
    page_text(analyst, f"/console/t/{console.a}/admin", 403)
    assert "Create a client" in page_text(admin, f"/console/t/{console.a}/admin")
    # the reader sees no edit forms, and a forged edit (with a valid CSRF token) is refused
    html = page_text(reader, f"/console/t/{console.a}/alerts")
    assert "Edit the selected alerts" not in html
    alert_id = rows_of(html, "data-alert")[0]
    forged = reader.post(
        f"/console/t/{console.a}/alerts/edit",
        data={"csrf_token": token_of(html), "alert_id": alert_id, "status": "resolved"},
    )
    assert forged.status_code == 403
    alert = console.http.get(
        f"/api/v1/tenants/{console.a}/security/alerts/{alert_id}", headers=console.headers_a
    ).get_json()
    assert alert["status"] == "newAlert"


def test_every_post_without_the_csrf_token_is_refused(console):
    analyst, admin = signed_in(console, ANALYST), signed_in(console, ADMIN)
    html = page_text(analyst, f"/console/t/{console.a}/alerts")
    alert_id = rows_of(html, "data-alert")[0]
    groups = page_text(analyst, f"/console/t/{console.a}/recommendations")
    type_url = re.search(r'href="(/console/t/[^"]+/recommendations/types/\d+)"', groups).group(1)
    posts = [
        (analyst, f"/console/t/{console.a}/alerts/edit", {"alert_id": alert_id, "status": "resolved"}),
        (analyst, f"{type_url}/exempt", {"category": "waiver", "reason": "accepted"}),
        (
            analyst,
            f"{type_url}/assign",
            {"recommendation_id": "1", "owner": "o@example.com", "due": "2099-01-01"},
        ),
        (
            admin,
            f"/console/t/{console.a}/admin/clients",
            {"name": "x", "provider": "X", "scope": "security.read"},
        ),
    ]
    for client, url, data in posts:
        assert client.post(url, data=data).status_code == 400, url
        assert client.post(url, data=data | {"csrf_token": "forged"}).status_code == 400, url
    alert = console.http.get(
        f"/api/v1/tenants/{console.a}/security/alerts/{alert_id}", headers=console.headers_a
    ).get_json()
    assert alert["status"] == "newAlert"
    for collection in ("exemptions", "governanceAssignments"):
        assert (
            console.http.get(
                f"/api/v1/tenants/{console.a}/security/{collection}", headers=console.headers_a
            ).get_json()["value"]
            == []
        )
    with console.db.engine.connect() as conn:
        from gateway.models import OAuthClient

        assert "x" not in set(conn.execute(select(OAuthClient.name)).scalars())


def test_findings_filter_by_cve_and_page_forward_by_keyset(console):
    headers = console.headers_a
    push(
        console,
        console.a,
        headers,
        document(
            [
                finding(
                    f"bulk-{i}",
                    host="bulk.example.com",
                    cves=(f"CVE-2023-{2000 + i}",),
                    severity="high",
                    tags=None,
                )
                for i in range(70)
            ]
        ),
        "canonical",
    )
    reader = signed_in(console, READER)
    url = f"/console/t/{console.a}/findings"

    one = page_text(reader, url + "?cve=CVE-2023-2042")
    assert re.findall(r'<td class="cve">([^<]*)</td>', one) == ["CVE-2023-2042"]

    statements: list[str] = []
    offsets: list = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)
        if "OFFSET" in statement.upper():  # SQLite writes LIMIT ? OFFSET ? even with no offset: it must be 0
            offsets.append(parameters[-1] if isinstance(parameters, (tuple, list)) else parameters)

    event.listen(console.db.engine, "before_cursor_execute", seen)
    try:
        first = page_text(reader, url + "?severity=high")
        next_url = re.search(r'href="([^"]+)" rel="next"', first).group(1).replace("&amp;", "&")
        assert "severity=high" in next_url and "cursor=" in next_url  # the filter stays in the URL
        second = page_text(reader, next_url)
    finally:
        event.remove(console.db.engine, "before_cursor_execute", seen)
    first_ids = re.findall(r'findings/(\d+)">\d+</a>', first)
    second_ids = re.findall(r'findings/(\d+)">\d+</a>', second)
    assert len(first_ids) == 50 and len(second_ids) == 20 and not set(first_ids) & set(second_ids)
    assert 'rel="next"' not in second
    assert set(offsets) <= {0}  # keyset, never OFFSET
    # each page reads one page of findings (and one more row to know a next page exists)
    assert all(
        re.search(r"LIMIT", s)
        for s in statements
        if "FROM findings" in s
        and "count(" not in s.lower()
        and "finding_sources" not in s.split("FROM", 1)[1][:40]
    )

    # the CSV is exactly the filtered table, in its order, every page of it
    csv_url = re.search(r'href="([^"]+)" class="csv"', first).group(1).replace("&amp;", "&")
    assert "severity=high" in csv_url
    response = reader.get(csv_url)
    assert response.status_code == 200 and response.mimetype == "text/csv"
    table = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert [row["id"] for row in table] == first_ids + second_ids
    assert {row["severity"] for row in table} == {"high"}


def test_a_bad_filter_is_a_clear_400(console):
    reader = signed_in(console, READER)
    assert "severity" in page_text(reader, f"/console/t/{console.a}/findings?severity=huge", 400)
    assert "sort" in page_text(reader, f"/console/t/{console.a}/findings?sort=nonsense", 400)
    assert "paging token" in page_text(reader, f"/console/t/{console.a}/findings?cursor=forged", 400)


def score_on(html: str) -> float:
    return float(re.search(r'data-current="([0-9.]+)"', html).group(1))


def test_an_exemption_from_the_console_changes_the_score_and_names_the_user(console):
    analyst = signed_in(console, ANALYST)
    groups = page_text(analyst, f"/console/t/{console.a}/recommendations")
    before = score_on(groups)
    assert re.search(r'<td class="unhealthy">3</td>', groups)  # three hosts, one type (and one healthy)
    assert 0 < before
    type_url = re.search(r'href="(/console/t/[^"]+/recommendations/types/\d+)"', groups).group(1)
    type_page = page_text(analyst, type_url)
    resource_id = re.search(r'resources/(\d+)">', type_page).group(1)
    response = analyst.post(
        f"{type_url}/exempt",
        data={
            "csrf_token": token_of(type_page),
            "category": "waiver",
            "reason": "isolated lab host",
            "resource_id": resource_id,
            "expires": "2099-12-31",
        },
    )
    assert response.status_code == 303
    after_page = page_text(analyst, response.headers["Location"])
    assert "(Exempt)" in after_page
    after = score_on(after_page)
    assert after > before  # one of three unhealthy resources left the control
    exemptions = console.http.get(
        f"/api/v1/tenants/{console.a}/security/exemptions", headers=console.headers_a
    ).get_json()["value"]
    assert [(e["category"], e["description"], e["resourceId"]) for e in exemptions] == [
        ("waiver", "isolated lab host", resource_id)
    ]
    assert exemptions[0]["createdBy"] == f"user:{ANALYST}"
    # the score the API serves is the one the page shows
    scores = console.http.get(
        f"/api/v1/tenants/{console.a}/security/secureScores?$top=1&$orderby=createdDateTime desc",
        headers=console.headers_a,
    ).get_json()["value"]
    assert scores[0]["currentScore"] == pytest.approx(after, abs=0.01)


def test_an_exemption_without_a_reason_or_with_a_past_expiry_is_refused(console):
    analyst = signed_in(console, ANALYST)
    groups = page_text(analyst, f"/console/t/{console.a}/recommendations")
    type_url = re.search(r'href="(/console/t/[^"]+/recommendations/types/\d+)"', groups).group(1)
    token = token_of(page_text(analyst, type_url))
    no_reason = analyst.post(
        f"{type_url}/exempt", data={"csrf_token": token, "category": "waiver", "reason": ""}
    )
    assert no_reason.status_code == 400 and "reason" in no_reason.get_data(as_text=True)
    past = analyst.post(
        f"{type_url}/exempt",
        data={"csrf_token": token, "category": "waiver", "reason": "x", "expires": "2001-01-01"},
    )
    assert past.status_code == 400 and "expiresOn" in past.get_data(as_text=True)
    assert score_on(page_text(analyst, f"/console/t/{console.a}/recommendations")) == score_on(groups)


def test_assigning_an_owner_and_due_date_is_the_apis_assignment(console):
    analyst = signed_in(console, ANALYST)
    groups = page_text(analyst, f"/console/t/{console.a}/recommendations")
    type_url = re.search(r'href="(/console/t/[^"]+/recommendations/types/\d+)"', groups).group(1)
    type_page = page_text(analyst, type_url)
    recommendation_id = rows_of(type_page, "data-recommendation")[0]
    response = analyst.post(
        f"{type_url}/assign",
        data={
            "csrf_token": token_of(type_page),
            "recommendation_id": recommendation_id,
            "owner": "owner@example.com",
            "due": "2099-06-30",
        },
    )
    assert response.status_code == 303
    assert "owner@example.com" in page_text(analyst, response.headers["Location"])
    assignments = console.http.get(
        f"/api/v1/tenants/{console.a}/security/governanceAssignments", headers=console.headers_a
    ).get_json()["value"]
    assert [(a["recommendationId"], a["owner"], a["remediationDueDate"][:10]) for a in assignments] == [
        (recommendation_id, "owner@example.com", "2099-06-30")
    ]
    again = analyst.post(
        f"{type_url}/assign",
        data={
            "csrf_token": token_of(type_page),
            "recommendation_id": recommendation_id,
            "owner": "x@example.com",
            "due": "2099-06-30",
        },
    )
    assert again.status_code == 409  # one open assignment at a time, as the API says


def test_assign_and_resolve_an_alert_writes_history_with_the_user_as_actor(console):
    analyst = signed_in(console, ANALYST)
    queue = page_text(analyst, f"/console/t/{console.a}/alerts")
    alert_id = rows_of(queue, "data-alert")[0]
    alert_url = f"/console/t/{console.a}/alerts/{alert_id}"
    token = token_of(page_text(analyst, alert_url))
    for form in (
        {"assignedTo": "ana"},
        {"status": "resolved", "feedback": "truePositive", "comment": "contained"},
    ):
        response = analyst.post(
            f"/console/t/{console.a}/alerts/edit",
            data={"csrf_token": token, "alert_id": alert_id, "back": "alert", **form},
        )
        assert response.status_code == 303 and response.headers["Location"].startswith(alert_url)
    page = page_text(analyst, alert_url)
    assert '<dd class="status">resolved</dd>' in page and f"user:{ANALYST}" in page
    api = f"/api/v1/tenants/{console.a}/security/alerts/{alert_id}"
    alert = console.http.get(api, headers=console.headers_a).get_json()
    assert (alert["status"], alert["assignedTo"], alert["feedback"]) == ("resolved", "ana", "truePositive")
    assert alert["closedDateTime"] and alert["comments"][0]["by"] == f"user:{ANALYST}"
    edits = [
        e
        for e in console.http.get(api + "/history", headers=console.headers_a).get_json()["value"]
        if e["event"] == "edited"
    ]
    assert [(e["actor"], e["details"]) for e in edits] == [
        (f"user:{ANALYST}", {"assignedTo": "ana"}),
        (
            f"user:{ANALYST}",
            {"status": "resolved", "feedback": "truePositive", "comments": edits[1]["details"]["comments"]},
        ),
    ]


def test_bulk_edit_and_tags_keep_each_alerts_own_tags(console):
    analyst = signed_in(console, ANALYST)
    queue = page_text(analyst, f"/console/t/{console.a}/alerts")
    ids = rows_of(queue, "data-alert")
    api = f"/api/v1/tenants/{console.a}/security/alerts"
    assert (
        console.http.patch(f"{api}/{ids[0]}", json={"tags": ["vip"]}, headers=console.headers_a).status_code
        == 204
    )
    response = analyst.post(
        f"/console/t/{console.a}/alerts/edit",
        data={
            "csrf_token": token_of(queue),
            "alert_id": ids[:2],
            "status": "inProgress",
            "addTags": "triage, p1",
        },
    )
    assert response.status_code == 303
    alerts = {a["id"]: a for a in console.http.get(api, headers=console.headers_a).get_json()["value"]}
    assert alerts[ids[0]]["tags"] == ["vip", "triage", "p1"] and alerts[ids[1]]["tags"] == ["triage", "p1"]
    assert [alerts[i]["status"] for i in ids] == ["inProgress", "inProgress", "newAlert"]
    nothing = analyst.post(
        f"/console/t/{console.a}/alerts/edit", data={"csrf_token": token_of(queue), "alert_id": ids[:1]}
    )
    assert nothing.status_code == 400 and "nothing to change" in nothing.get_data(as_text=True)
    bad = analyst.post(
        f"/console/t/{console.a}/alerts/edit",
        data={"csrf_token": token_of(queue), "alert_id": ids[:1], "status": "closed"},
    )
    assert bad.status_code == 400 and "status" in bad.get_data(as_text=True)


def test_ingestion_shows_batches_counts_and_rejections(console):
    body = json.dumps({"findings": [finding("ok-1", host="ok.example.com"), {"id": "broken", "title": ""}]})
    response = console.http.post(
        f"/api/v1/tenants/{console.a}/batches?format=canonical",
        data=body,
        headers=console.headers_a | {"Content-Type": "application/json"},
    )
    assert response.status_code == 202
    reader = signed_in(console, READER)
    listing = page_text(reader, f"/console/t/{console.a}/ingestion")
    batch_ids = re.findall(r'ingestion/batches/(\d+)">', listing)
    assert len(batch_ids) == 3  # tenant A's three pushes, newest first
    assert batch_ids == sorted(batch_ids, key=int, reverse=True)
    newest = page_text(reader, f"/console/t/{console.a}/ingestion/batches/{batch_ids[0]}")
    assert "partiallySucceeded" in newest and "<td>1</td>" in newest
    progress = reader.get(f"/console/t/{console.a}/ingestion/batches/{batch_ids[0]}/progress.json").get_json()
    assert progress["status"] == "partiallySucceeded" and progress["counts"]["rejected"] == 1
    # the rejected records' table offers its CSV too, all of it, for this tenant's batch only
    csv_url = re.search(r'href="([^"]+rejections\.csv[^"]*)"', newest).group(1).replace("&amp;", "&")
    rejected_csv = reader.get(csv_url)
    assert rejected_csv.status_code == 200 and rejected_csv.mimetype == "text/csv"
    lines = rejected_csv.get_data(as_text=True).splitlines()
    assert lines[0] == "seq,position,reason,providerId" and len(lines) == 2, lines
    assert lines[1].startswith("0,findings[1],") and lines[1].endswith(",broken"), lines
    with console.db.engine.connect() as conn:
        from gateway.models import Batch, Tenant

        b_id = conn.execute(select(Tenant.id).where(Tenant.external_id == console.b)).scalar_one()
        b_batch = conn.execute(select(Batch.id).where(Batch.tenant_id == b_id)).scalar_one()
    assert reader.get(f"/console/t/{console.a}/ingestion/batches/{b_batch}/rejections.csv").status_code == 404
    assert (
        page_text(reader, f"/console/t/{console.a}/ingestion?status=failed").count("ingestion/batches/") == 0
    )


def test_admin_creates_rotates_and_disables_a_client(console):
    admin = signed_in(console, ADMIN)
    page = page_text(admin, f"/console/t/{console.a}/admin")
    created = admin.post(
        f"/console/t/{console.a}/admin/clients",
        data={
            "csrf_token": token_of(page),
            "name": "scanner",
            "provider": "Qualys",
            "scope": ["findings.write"],
        },
    )
    assert created.status_code == 200 and created.headers["Cache-Control"] == "no-store"
    html = created.get_data(as_text=True)
    client_id = re.search(r'id="client-id">([^<]+)<', html).group(1)
    secret = re.search(r'id="client-secret">([^<]+)<', html).group(1)
    token = console.token(client_id, secret)
    listing = page_text(admin, f"/console/t/{console.a}/admin")
    assert client_id in listing and secret not in listing and "Qualys" in listing

    rotated = admin.post(
        f"/console/t/{console.a}/admin/clients/{client_id}/rotate", data={"csrf_token": token_of(listing)}
    )
    new_secret = re.search(r'id="client-secret">([^<]+)<', rotated.get_data(as_text=True)).group(1)
    assert new_secret != secret
    import base64

    def status_with(password: str) -> int:
        basic = base64.b64encode(f"{client_id}:{password}".encode()).decode()
        return console.http.post(
            "/oauth/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": f"Basic {basic}"},
        ).status_code

    assert status_with(secret) == 401 and status_with(new_secret) == 200
    pushed = console.http.get(
        f"/api/v1/tenants/{console.a}/batches", headers={"Authorization": f"Bearer {token}"}
    )
    assert pushed.status_code == 401  # the rotation revoked the old token

    disabled = admin.post(
        f"/console/t/{console.a}/admin/clients/{client_id}/disable", data={"csrf_token": token_of(listing)}
    )
    assert disabled.status_code == 303
    assert status_with(new_secret) == 401
    # another tenant's client is not the admin's to touch
    other_id = console.client("Other", "findings.write", [console.b])[0]
    refused = admin.post(
        f"/console/t/{console.a}/admin/clients/{other_id}/disable", data={"csrf_token": token_of(listing)}
    )
    assert refused.status_code == 404


def test_score_impact_is_what_fixing_the_type_adds_to_the_score(gw):
    """Two types in one control (a policy entry moves ``tls`` into ``enable-mfa``): a type's impact
    counts only the resources where it is the control's only Unhealthy type, and fixing it raises
    the score by exactly that."""
    from tests.test_score import compliance

    tenant = gw.tenant()
    headers = gw.partner("CheckPoint", [tenant], scopes="findings.write security.read posture.manage")
    state = {
        "a": ("open", "open"),
        "b": ("open", "fixed"),
        "c": ("fixed", "open"),
        "d": ("fixed", "fixed"),
        "e": ("open", None),
    }
    records = []
    for host, (mfa, tls) in state.items():
        records.append(compliance(f"m-{host}", f"{host}.example.com", "mfa", "MFA should be enabled", mfa))
        if tls:
            records.append(
                compliance(f"t-{host}", f"{host}.example.com", "tls", "TLS 1.2 should be required", tls)
            )
    push(gw, tenant, headers, document(records), "canonical")
    moved = gw.http.post(
        f"/api/v1/tenants/{tenant}/security/policies",
        headers=headers,
        json={"scope": "recommendationType", "target": "tls", "control": "enable-mfa"},
    )
    assert moved.status_code == 201, moved.get_json()
    make_user(gw.app, ANALYST, PASSWORD, "analyst", [tenant])
    analyst = signed_in(gw, ANALYST)
    control = gw.http.get(
        f"/api/v1/tenants/{tenant}/security/secureScoreControls", headers=headers
    ).get_json()
    (row,) = [c for c in control["value"] if c["id"] == "enable-mfa"]
    assert (row["healthyResourceCount"], row["unhealthyResourceCount"]) == (1, 4)
    max_score = row["maxScore"]

    html = page_text(analyst, f"/console/t/{tenant}/recommendations")
    shown = re.findall(
        r"<small>(\w+)</small>.*?<td class=\"unhealthy\">(\d+)</td>\s*<td class=\"impact\">\+([0-9.]+)",
        html,
        re.S,
    )
    # mfa: Unhealthy on a, b, e; alone on b and e.  tls: Unhealthy on a, c; alone on c (4 + 1 resources count)
    assert shown == [("mfa", "3", f"{max_score * 2 / 5:.2f}"), ("tls", "2", f"{max_score * 1 / 5:.2f}")]
    before = score_on(html)
    push(
        gw,
        tenant,
        headers,
        document(
            [
                compliance(
                    f"m-{host}",
                    f"{host}.example.com",
                    "mfa",
                    "MFA should be enabled",
                    "fixed",
                    ts="2024-05-01T00:00:00Z",
                )
                for host in "abe"
            ]
        ),
        "canonical",
    )
    after = score_on(page_text(analyst, f"/console/t/{tenant}/recommendations"))
    assert after - before == pytest.approx(max_score * 2 / 5, abs=0.01)


def test_edits_never_reach_another_tenants_rows(console):
    push(console, console.b, console.headers_b, graph_alerts(count=1), "graph_alert")
    b_alert = console.http.get(
        f"/api/v1/tenants/{console.b}/security/alerts", headers=console.headers_b
    ).get_json()
    b_alert_id = b_alert["value"][0]["id"]
    b_resource = console.http.get(
        f"/api/v1/tenants/{console.b}/security/resources", headers=console.headers_b
    ).get_json()["value"][0]["id"]
    analyst = signed_in(console, ANALYST)
    queue = page_text(analyst, f"/console/t/{console.a}/alerts")
    edit = analyst.post(
        f"/console/t/{console.a}/alerts/edit",
        data={"csrf_token": token_of(queue), "alert_id": b_alert_id, "status": "resolved"},
    )
    assert edit.status_code == 404
    groups = page_text(analyst, f"/console/t/{console.a}/recommendations")
    type_url = re.search(r'href="(/console/t/[^"]+/recommendations/types/\d+)"', groups).group(1)
    exempt = analyst.post(
        f"{type_url}/exempt",
        data={"csrf_token": token_of(queue), "category": "waiver", "reason": "x", "resource_id": b_resource},
    )
    assert exempt.status_code == 400 and "resourceId" in exempt.get_data(as_text=True)
    after = console.http.get(
        f"/api/v1/tenants/{console.b}/security/alerts/{b_alert_id}", headers=console.headers_b
    ).get_json()
    assert after["status"] == "newAlert"
    assert (
        console.http.get(
            f"/api/v1/tenants/{console.a}/security/exemptions", headers=console.headers_a
        ).get_json()["value"]
        == []
    )
