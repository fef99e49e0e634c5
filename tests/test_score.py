"""Secure Score (issue 11): controls as data, the stored score kept fresh by the merge, its API."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gateway.merge.findings import VULNERABILITY_TYPE
from gateway.models import (
    Recommendation,
    RecommendationType,
    SecureScore,
    SecureScoreControl,
    Tenant,
)
from gateway.score import controls
from gateway.score.upkeep import control_score
from tests.factories import document, finding
from tests.test_merge import push

SEC = "/api/v1/tenants/{}/security/"


def vuln(pid: str, host: str, status: str = "open", ts: str = "2024-04-01T00:00:00Z") -> dict:
    return finding(pid, host, status=status, ts=ts, resource={"fqdn": host})


def compliance(pid: str, host: str, key: str, title: str, status: str = "open",
               ts: str = "2024-04-01T00:00:00Z") -> dict:
    return finding(pid, host, cves=[], status=status, ts=ts, resource={"fqdn": host}, kind="compliance",
                   recommendation=key, title=title, vendorId=pid)


def rows_of(gw, tenant: str) -> dict[str, SecureScoreControl]:
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        return {row.control: row for row in session.scalars(
            select(SecureScoreControl).where(SecureScoreControl.tenant_id == tenant_id))}


def history(gw, tenant: str) -> list[SecureScore]:
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        return list(session.scalars(select(SecureScore).where(SecureScore.tenant_id == tenant_id)
                                    .order_by(SecureScore.id)))


def test_vulnerabilities_then_a_fix_raise_the_score(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    hosts = ["a.example.com", "b.example.com", "c.example.com"]
    push(gw, tenant, headers, document([vuln(f"v-{h}", h) for h in hosts]))
    row = rows_of(gw, tenant)["remediate-vulnerabilities"]
    assert (row.unhealthy, row.healthy, row.current, row.max) == (3, 0, 0.0, 6.0)
    assert len(history(gw, tenant)) == 1
    batch = push(gw, tenant, headers, document([vuln("v-a.example.com", hosts[0], status="fixed",
                                                     ts="2024-04-02T00:00:00Z")]))
    assert batch["status"] == "succeeded"
    row = rows_of(gw, tenant)["remediate-vulnerabilities"]
    assert (row.unhealthy, row.healthy, row.current) == (2, 1, 2.0)
    scores = history(gw, tenant)
    assert len(scores) == 2 and scores[-1].current == 2.0 and scores[-1].percentage == round(2 / 6, 4)

    api = gw.http.get(SEC.format(tenant) + "secureScores", headers=headers)
    assert api.status_code == 200, api.get_json()
    newest = api.get_json()["value"][0]
    assert newest["currentScore"] == 2.0 and newest["maxScore"] == 6.0
    assert newest["controlScores"] == [{"controlName": "remediate-vulnerabilities", "score": 2.0,
                                        "maxScore": 6.0, "healthyResourceCount": 1,
                                        "unhealthyResourceCount": 2}]
    page = gw.http.get(SEC.format(tenant) + "secureScores?$top=1", headers=headers).get_json()
    assert len(page["value"]) == 1 and "@odata.nextLink" in page
    nxt = gw.http.get(page["@odata.nextLink"], headers=headers).get_json()
    assert [v["currentScore"] for v in nxt["value"]] == [0.0] and "@odata.nextLink" not in nxt
    ctl = gw.http.get(SEC.format(tenant) + "secureScoreControls", headers=headers).get_json()["value"]
    assert ctl == [{"id": "remediate-vulnerabilities", "displayName": "Remediate vulnerabilities",
                    "currentScore": 2.0, "maxScore": 6.0, "percentage": round(2 / 6, 4),
                    "healthyResourceCount": 1, "unhealthyResourceCount": 2, "notApplicableResourceCount": 0,
                    "weight": 1.0, "updatedDateTime": ctl[0]["updatedDateTime"]}]
    profiles = gw.http.get(SEC.format(tenant) + "secureScoreControlProfiles", headers=headers).get_json()
    assert {p["id"] for p in profiles["value"]} == set(controls.BY_ID)
    assert gw.http.get(SEC.format(tenant) + "secureScores?$filter=x", headers=headers).status_code == 400

    other = gw.tenant()
    other_headers = gw.partner("Tenable", [other])
    assert gw.http.get(SEC.format(other) + "secureScores", headers=other_headers).get_json()["value"] == []
    assert gw.http.get(SEC.format(other) + "secureScoreControls",
                       headers=other_headers).get_json()["value"] == []
    assert gw.http.get(SEC.format(tenant) + "secureScores", headers=other_headers).status_code in (403, 404)


def test_every_type_lands_in_a_control(gw):
    assert controls.resolve(VULNERABILITY_TYPE) == "remediate-vulnerabilities"
    assert controls.resolve({"key": "x", "title": "Something odd", "kind": "compliance"}) == \
        "remediate-security-configurations"
    assert controls.resolve({"key": "x", "title": "zzz", "kind": "other"}) == controls.FALLBACK
    mfa = {"key": "mfa-owners", "title": "MFA should be enabled", "kind": "compliance"}
    assert controls.resolve(mfa) == "enable-mfa"
    assert sum(1 for c in controls.CONTROLS if c.max_score) >= 12
    tenant = gw.tenant()
    headers = gw.partner("CheckPoint", [tenant])
    push(gw, tenant, headers, document([
        vuln("v1", "a.example.com"),
        compliance("c1", "a.example.com", "mfa", "MFA should be enabled on accounts with owner permissions"),
        compliance("c2", "a.example.com", "tls", "Web apps should only be accessible over HTTPS"),
        compliance("c3", "a.example.com", "odd", "Strange thing"),
    ]))
    with gw.db.sessions() as session:
        types = {t.key: t.control for t in session.scalars(select(RecommendationType))}
    assert types == {"vulnerability-assessment": "remediate-vulnerabilities", "mfa": "enable-mfa",
                     "tls": "encrypt-data-in-transit", "odd": "remediate-security-configurations"}
    assert set(rows_of(gw, tenant)) == set(types.values())


def _reference(gw, tenant: str) -> dict[str, tuple[int, int, int, float]]:
    """The per-control counts from the recommendations table, in plain Python."""
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        pairs = session.execute(select(RecommendationType.control, Recommendation.resource_id,
                                       Recommendation.status)
                                .join(RecommendationType, RecommendationType.id == Recommendation.type_id)
                                .where(Recommendation.tenant_id == tenant_id)).all()
    statuses: dict[str, dict[int, set]] = defaultdict(lambda: defaultdict(set))
    for control, resource, status in pairs:
        statuses[control][resource].add(status)
    out = {}
    for control, by_resource in statuses.items():
        bad = sum(1 for s in by_resource.values() if "Unhealthy" in s)
        good = sum(1 for s in by_resource.values() if "Unhealthy" not in s and "Healthy" in s)
        na = len(by_resource) - bad - good
        out[control] = (good, bad, na, control_score(controls.BY_ID[control].max_score, good, bad))
    return out


KEYS = [("mfa", "MFA should be enabled"), ("tls", "TLS 1.2 should be required"),
        ("nsg", "Network security groups should restrict inbound traffic"), ("vulnerability-assessment", "")]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()), min_size=1,
                         max_size=6), min_size=1, max_size=3))
def test_stored_rows_equal_a_reference_computation(gw, pushes):
    tenant = gw.tenant()
    headers = gw.partner("Ref", [tenant])
    for number, records in enumerate(pushes):
        ts = f"2024-04-{number + 1:02d}T00:00:00Z"
        items = []
        for host, key_index, is_open in records:
            key, title = KEYS[key_index]
            name = f"h{host}.example.com"
            status = "open" if is_open else "fixed"
            if key == "vulnerability-assessment":
                items.append(vuln(f"v-{host}", name, status=status, ts=ts))
            else:
                items.append(compliance(f"{key}-{host}", name, key, title, status=status, ts=ts))
        push(gw, tenant, headers, document(items))
        stored = {c: (r.healthy, r.unhealthy, r.not_applicable, r.current)
                  for c, r in rows_of(gw, tenant).items()}
        assert stored == _reference(gw, tenant)
        total = sum(r[3] for r in stored.values())
        assert history(gw, tenant)[-1].current == round(total, 4)


def test_cli_score_show(gw, monkeypatch):
    from click.testing import CliRunner

    from gateway.cli import main

    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    push(gw, tenant, headers, document([vuln("v1", "a.example.com"),
                                        vuln("v2", "b.example.com", status="fixed")]))
    monkeypatch.setenv("GATEWAY_DATABASE_URL", gw.db.engine.url.render_as_string(hide_password=False))
    result = CliRunner().invoke(main, ["score", "show", "--tenant", tenant, "--recount"])
    assert result.exit_code == 0, result.output
    assert "Secure Score: 3 of 6 (50.00%)" in result.output
    assert "Remediate vulnerabilities" in result.output
