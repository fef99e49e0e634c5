"""``gateway policy`` and ``gateway exemption`` (issue 11, item 9): the API's edits from the command
line, on both stores; the same pushes and edits through the CLI and through the API leave the same
recommendations, Secure Score and events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from gateway.cli import main
from gateway.models import LifecycleEvent, Recommendation, RecommendationType, Resource, Tenant
from tests.factories import document
from tests.test_merge import push
from tests.test_score import compliance, rows_of, vuln

SEC = "/api/v1/tenants/{}/security/"
MANAGE = "findings.write security.read posture.manage"


@pytest.fixture
def cli(gw, monkeypatch):
    monkeypatch.setenv("GATEWAY_DATABASE_URL", gw.db.engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("LOGNAME", "alice")
    runner = CliRunner()

    def run(*args, status=0):
        result = runner.invoke(main, list(args))
        assert result.exit_code == status, (args, result.output, result.exception)
        return result.output

    return run


def _pushed(gw):
    tenant = gw.tenant()
    headers = gw.partner("CheckPoint", [tenant], scopes=MANAGE)
    push(
        gw,
        tenant,
        headers,
        document(
            [
                vuln("v-a", "a.example.com"),
                vuln("v-b", "b.example.com"),
                compliance("m-a", "a.example.com", "mfa", "MFA should be enabled"),
                compliance("t-b", "b.example.com", "tls", "TLS 1.2 should be required"),
            ]
        ),
    )
    return tenant, headers


def _recs(gw, tenant) -> dict[tuple[str, str], tuple]:
    """(type key, resource name) -> (status, cause, severity, exempt) of the tenant's recommendations."""
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        rows = session.execute(
            select(
                RecommendationType.key,
                Resource.name,
                Recommendation.status,
                Recommendation.status_cause,
                Recommendation.severity,
                Recommendation.exemption_id,
            )
            .join(RecommendationType, RecommendationType.id == Recommendation.type_id)
            .join(Resource, Resource.id == Recommendation.resource_id)
            .where(Recommendation.tenant_id == tenant_id)
        ).all()
    return {
        (key, name): (status, cause, severity, exemption is not None)
        for key, name, status, cause, severity, exemption in rows
    }


def _score(gw, tenant) -> dict[str, tuple]:
    return {
        c: (r.healthy, r.unhealthy, r.not_applicable, r.current, r.max)
        for c, r in rows_of(gw, tenant).items()
    }


def _events(gw, tenant) -> list[tuple]:
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        return session.execute(
            select(LifecycleEvent.subject_type, LifecycleEvent.event, LifecycleEvent.actor)
            .where(
                LifecycleEvent.tenant_id == tenant_id,
                LifecycleEvent.subject_type.in_(["policy", "exemption"]),
            )
            .order_by(LifecycleEvent.id)
        ).all()


def _resource_id(gw, tenant, name) -> int:
    with gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        return session.scalar(
            select(Resource.id).where(Resource.tenant_id == tenant_id, Resource.name == name)
        )


def test_policy_set_list_delete(gw, cli):
    tenant, _ = _pushed(gw)
    assert _score(gw, tenant)["remediate-vulnerabilities"][:3] == (0, 2, 0)

    out = cli("policy", "set", "--tenant", tenant, "--type", "vulnerability-assessment", "--disable")
    assert "created policy entry" in out and "1 recommendation type(s) changed" in out
    assert "Secure Score: 0 of 14 (0.00%)" in out  # MFA 10 + TLS 4: the disabled type leaves its control
    recs = _recs(gw, tenant)
    assert recs[("vulnerability-assessment", "a.example.com")][:2] == ("NotApplicable", "DisabledByPolicy")
    assert _score(gw, tenant)["remediate-vulnerabilities"][:3] == (0, 0, 2)

    # the same target again: the entry is updated, not duplicated
    out = cli(
        "policy",
        "set",
        "--tenant",
        tenant,
        "--type",
        "vulnerability-assessment",
        "--enable",
        "--severity",
        "critical",
    )
    assert "updated policy entry" in out
    assert _recs(gw, tenant)[("vulnerability-assessment", "a.example.com")] == (
        "Unhealthy",
        None,
        "critical",
        False,
    )
    cli("policy", "set", "--tenant", tenant, "--type", "vulnerability-assessment", "--severity", "default")
    assert _recs(gw, tenant)[("vulnerability-assessment", "a.example.com")][2] == "high"

    cli("policy", "set", "--tenant", tenant, "--control", "enable-mfa", "--disable")
    cli("policy", "set", "--tenant", tenant, "--provider", "CheckPoint", "--disable")
    recs = _recs(gw, tenant)
    assert recs[("mfa", "a.example.com")][:2] == ("NotApplicable", "DisabledByPolicy")
    assert recs[("tls", "b.example.com")][:2] == ("NotApplicable", "DisabledByPolicy")
    # the type's own entry wins: vulnerability-assessment stays enabled
    assert recs[("vulnerability-assessment", "b.example.com")][0] == "Unhealthy"

    # re-map a type to another control
    cli("policy", "set", "--tenant", tenant, "--type", "tls", "--enable", "--control-map", "enable-mfa")
    score = _score(gw, tenant)
    assert score["enable-mfa"][:3] == (0, 1, 1) and score["encrypt-data-in-transit"][:3] == (0, 0, 0)

    listed = cli("policy", "list", "--tenant", tenant).splitlines()
    assert len(listed) == 4
    assert any("\trecommendationType\ttls\tenabled\t-\tenable-mfa\tcli:alice\t" in line for line in listed)
    assert any("\tprovider\tCheckPoint\tdisabled\t" in line for line in listed)

    # delete by target and by id
    out = cli("policy", "delete", "--tenant", tenant, "--provider", "CheckPoint")
    assert "deleted policy entry" in out
    entry = next(
        line.split("\t")[0]
        for line in cli("policy", "list", "--tenant", tenant).splitlines()
        if "\ttls\t" in line
    )
    cli("policy", "delete", "--tenant", tenant, entry)
    cli("policy", "delete", "--tenant", tenant, "--control", "enable-mfa")
    cli("policy", "delete", "--tenant", tenant, "--type", "vulnerability-assessment")
    assert cli("policy", "list", "--tenant", tenant) == ""
    assert {status for status, *_ in _recs(gw, tenant).values()} == {"Unhealthy"}
    assert _score(gw, tenant)["encrypt-data-in-transit"][:3] == (0, 1, 0)

    events = _events(gw, tenant)
    assert ("policy", "created", "cli:alice") in events and ("policy", "deleted", "cli:alice") in events
    assert {actor for *_, actor in events} == {"cli:alice"}


def test_policy_errors_end_with_one_line(gw, cli):
    tenant, _ = _pushed(gw)
    out = cli("policy", "set", "--tenant", "nope", "--type", "x", "--disable", status=1)
    assert "no tenant nope" in out
    out = cli("policy", "set", "--tenant", tenant, "--type", "mfa", "--control-map", "nope", status=1)
    assert "control" in out and "Traceback" not in out
    out = cli("policy", "set", "--tenant", tenant, "--control", "no-such-control", "--disable", status=1)
    assert "no-such-control" in out
    out = cli("policy", "set", "--tenant", tenant, "--provider", "CheckPoint", "--severity", "low", status=1)
    assert "severity" in out
    cli(
        "policy", "set", "--tenant", tenant, "--type", "mfa", "--control", "enable-mfa", "--disable", status=2
    )
    cli("policy", "set", "--tenant", tenant, "--type", "mfa", status=2)  # nothing to set
    out = cli("policy", "delete", "--tenant", tenant, "--type", "mfa", status=1)
    assert "no entry" in out
    out = cli("policy", "delete", "--tenant", tenant, "12345", status=1)
    assert "not found" in out
    assert cli("policy", "list", "--tenant", tenant) == ""
    assert _events(gw, tenant) == []


def test_exemption_create_list_expire_delete(gw, cli):
    from workers.tasks import expire_due_exemptions

    tenant, _ = _pushed(gw)
    soon = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    out = cli(
        "exemption",
        "create",
        "--tenant",
        tenant,
        "--name",
        "Patch window",
        "--category",
        "waiver",
        "--type",
        "vulnerability-assessment",
        "--expires",
        soon.isoformat(),
        "--description",
        "until Friday",
    )
    assert "its scope holds 2 recommendation(s)" in out
    assert _score(gw, tenant)["remediate-vulnerabilities"][:3] == (0, 0, 2)
    recs = _recs(gw, tenant)
    assert recs[("vulnerability-assessment", "b.example.com")][:2] == ("NotApplicable", "Exempt")

    b = _resource_id(gw, tenant, "b.example.com")
    out = cli(
        "exemption",
        "create",
        "--tenant",
        tenant,
        "--name",
        "Decommissioning",
        "--category",
        "mitigated",
        "--resource",
        str(b),
    )
    assert "its scope holds 2 recommendation(s)" in out  # b's vulnerability (still the first's) and tls
    assert _recs(gw, tenant)[("tls", "b.example.com")][:2] == ("NotApplicable", "Exempt")
    out = cli(
        "exemption",
        "create",
        "--tenant",
        tenant,
        "--name",
        "None yet",
        "--category",
        "waiver",
        "--filter",
        "name eq 'zzz.example.com'",
    )
    assert "holds 0 recommendation(s)" in out and "warning" in out

    listed = [line.split("\t") for line in cli("exemption", "list", "--tenant", tenant).splitlines()]
    assert [(row[1], row[2], row[3], row[5]) for row in listed] == [
        ("active", "waiver", "type=vulnerability-assessment", "Patch window"),
        ("active", "mitigated", f"resource={b}", "Decommissioning"),
        ("active", "waiver", "filter=name eq 'zzz.example.com'", "None yet"),
    ]
    assert listed[0][4].startswith(soon.strftime("%Y-%m-%dT%H:%M:%S")) and listed[1][4] == "never"

    # expiry (clock injected): a's vulnerability returns, b's passes to the resource exemption
    assert expire_due_exemptions(gw.db, datetime.now(UTC) + timedelta(days=2)) == 1
    recs = _recs(gw, tenant)
    assert recs[("vulnerability-assessment", "a.example.com")][0] == "Unhealthy"
    assert recs[("vulnerability-assessment", "b.example.com")][:2] == ("NotApplicable", "Exempt")
    assert cli("exemption", "list", "--tenant", tenant, "--state", "expired").split("\t")[0] == listed[0][0]
    assert len(cli("exemption", "list", "--tenant", tenant, "--state", "active").splitlines()) == 2

    out = cli("exemption", "delete", "--tenant", tenant, listed[1][0])
    assert "2 recommendation(s) released" in out
    assert {status for status, *_ in _recs(gw, tenant).values()} == {"Unhealthy"}
    assert _score(gw, tenant)["remediate-vulnerabilities"][:3] == (0, 2, 0)

    # what the API refuses, the command refuses, naming the field
    for args, words in (
        (("--type", "unknown"), "recommendationType"),
        (("--resource", "999999"), "resourceId"),
        (("--filter", "nope eq 1"), "resourceFilter"),
        (("--resource", str(b), "--filter", "name eq 'x'"), "resourceFilter"),
        (("--type", "mfa", "--expires", "2000-01-01T00:00:00Z"), "expiresOn"),
        ((), "recommendationType"),
    ):
        out = cli(
            "exemption", "create", "--tenant", tenant, "--name", "x", "--category", "waiver", *args, status=1
        )
        assert words in out, (args, out)
    cli(
        "exemption",
        "create",
        "--tenant",
        tenant,
        "--name",
        "x",
        "--category",
        "forever",
        "--type",
        "mfa",
        status=2,
    )
    cli(
        "exemption",
        "create",
        "--tenant",
        tenant,
        "--name",
        "x",
        "--category",
        "waiver",
        "--expires",
        "soon",
        status=2,
    )
    assert "not found" in cli("exemption", "delete", "--tenant", tenant, "424242", status=1)
    events = [e for e in _events(gw, tenant) if e[0] == "exemption"]
    assert [(e[1], e[2]) for e in events] == [
        ("created", "cli:alice"),
        ("created", "cli:alice"),
        ("created", "cli:alice"),
        ("expired", None),
        ("deleted", "cli:alice"),
    ]


def test_the_cli_and_the_api_leave_the_same_store(gw, cli):
    """The same pushes and the same edits, once by the command line and once by the API."""
    by_cli, _ = _pushed(gw)
    by_api, headers = _pushed(gw)
    expires = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0).isoformat()

    def api(method, path, body=None, status=None):
        response = getattr(gw.http, method)(SEC.format(by_api) + path, json=body, headers=headers)
        assert response.status_code == status, response.get_json()
        return response.get_json()

    cli("policy", "set", "--tenant", by_cli, "--control", "enable-mfa", "--disable")
    api("post", "policies", {"scope": "control", "target": "enable-mfa", "enabled": False}, 201)
    cli(
        "policy",
        "set",
        "--tenant",
        by_cli,
        "--type",
        "tls",
        "--severity",
        "low",
        "--control-map",
        "manage-access-and-permissions",
    )
    api(
        "post",
        "policies",
        {
            "scope": "recommendationType",
            "target": "tls",
            "severity": "low",
            "control": "manage-access-and-permissions",
        },
        201,
    )
    cli(
        "exemption",
        "create",
        "--tenant",
        by_cli,
        "--name",
        "a",
        "--category",
        "waiver",
        "--type",
        "vulnerability-assessment",
        "--filter",
        "startswith(name, 'a')",
        "--expires",
        expires,
    )
    api(
        "post",
        "exemptions",
        {
            "displayName": "a",
            "category": "waiver",
            "recommendationType": "vulnerability-assessment",
            "resourceFilter": "startswith(name, 'a')",
            "expiresOn": expires,
        },
        201,
    )
    assert _recs(gw, by_cli) == _recs(gw, by_api)
    assert _score(gw, by_cli) == _score(gw, by_api)

    cli("policy", "set", "--tenant", by_cli, "--control", "enable-mfa", "--enable")
    entry = api("get", "policies?$filter=scope eq 'control'", status=200)["value"][0]["id"]
    api("patch", f"policies/{entry}", {"enabled": True}, 200)
    cli("policy", "delete", "--tenant", by_cli, "--type", "tls")
    entry = api("get", "policies?$filter=target eq 'tls'", status=200)["value"][0]["id"]
    api("delete", f"policies/{entry}", status=204)
    assert _recs(gw, by_cli) == _recs(gw, by_api)
    assert _score(gw, by_cli) == _score(gw, by_api)

    exemption = cli("exemption", "list", "--tenant", by_cli).split("\t")[0]
    cli("exemption", "delete", "--tenant", by_cli, exemption)
    exemption = api("get", "exemptions", status=200)["value"][0]["id"]
    api("delete", f"exemptions/{exemption}", status=204)
    assert _recs(gw, by_cli) == _recs(gw, by_api)
    assert _score(gw, by_cli) == _score(gw, by_api)
    assert [e[:2] for e in _events(gw, by_cli)] == [e[:2] for e in _events(gw, by_api)]
    assert {e[2] for e in _events(gw, by_cli)} == {"cli:alice"}
