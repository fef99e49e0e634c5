"""The stored Secure Score against a plain-Python reference (issue 11), on both stores.

Hypothesis draws a random sequence of operations on a fresh tenant (pushes of vulnerabilities
and compliance results of several types and controls by two providers, open or fixed; policy
entries for a type, a control or a provider, created, changed and deleted; exemptions by type,
resource, resource filter or a type with one of those, with and without expiry, created and
deleted; the clock moving on with the expiry task run at it) through the real pipeline (``gw``:
the API and the worker's merge), and after every operation compares every recommendation's
effective status, severity and exemption, every control row and the newest score history row
with tests/posture_reference.py, which computes them from the raw rows.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gateway.models import Exemption, PolicySetting, RecommendationType, Resource
from tests.factories import document
from tests.posture_reference import assert_matches, assert_recount_agrees, tenant_pk
from tests.test_merge import push
from tests.test_score import compliance, vuln

SEC = "/api/v1/tenants/{}/security/"
MANAGE = "findings.write security.read posture.manage"
PROVIDERS = ("RefA", "RefB")
HOSTS = 4
# (provider index, type key, title): a vulnerability (any provider) or a provider's compliance type
KINDS = [
    (None, "vulnerability-assessment", ""),
    (0, "mfa", "MFA should be enabled on accounts"),
    (0, "tls", "TLS 1.2 should be required"),
    (1, "nsg", "Network security groups should restrict inbound traffic"),
    (1, "rdp", "Management ports (RDP) should be closed"),
]
TYPE_KEYS = [key for _, key, _ in KINDS]
CONTROLS = [
    "enable-mfa",
    "secure-management-ports",
    "remediate-vulnerabilities",
]  # of mfa, rdp, vulnerabilities
FILTERS = {
    "startswith(name, 'h1')": lambda r: (r.name or "").startswith("h1"),
    "name eq 'h2.example.com'": lambda r: r.name == "h2.example.com",
    "endswith(name, '3.example.com')": lambda r: (r.name or "").endswith("3.example.com"),
    "contains(name, 'zzz')": lambda r: "zzz" in (r.name or ""),
}

records = st.lists(
    st.tuples(st.integers(0, HOSTS - 1), st.integers(0, 2), st.booleans()), min_size=1, max_size=5
)
push_op = st.tuples(st.just("push"), st.integers(0, 1), records)
policy_op = st.tuples(
    st.just("policy"),
    st.sampled_from(["recommendationType", "control", "provider"]),
    st.integers(0, 4),
    st.sampled_from([True, False, False, None]),
    st.sampled_from([None, None, "critical", "low"]),
    st.sampled_from([None, None, "enable-mfa", "manage-access-and-permissions"]),
)
exempt_op = st.tuples(
    st.just("exempt"),
    st.one_of(st.none(), st.integers(0, 9)),
    st.one_of(st.none(), st.integers(0, 9)),
    st.one_of(st.none(), st.sampled_from(sorted(FILTERS))),
    st.one_of(st.none(), st.integers(1, 4)),
    st.sampled_from(["waiver", "mitigated"]),
)
operations = st.one_of(  # pushes, exemptions and policy changes more often than the rest
    push_op,
    push_op,
    push_op,
    exempt_op,
    exempt_op,
    policy_op,
    policy_op,
    policy_op,
    st.tuples(st.just("unpolicy"), st.integers(0, 9)),
    st.tuples(st.just("unexempt"), st.integers(0, 9)),
    st.tuples(st.just("tick"), st.integers(1, 3)),
)


class Run:
    """One example: a fresh tenant, its two providers' tokens, the injected clock."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.tenant = gw.tenant()
        self.headers = [gw.partner(name, [self.tenant], scopes=MANAGE) for name in PROVIDERS]
        self.clock = datetime.now(UTC).replace(microsecond=0)
        self.pushes = 0
        with gw.db.engine.connect() as conn:
            self.tenant_id = tenant_pk(conn, self.tenant)

    def url(self, path: str) -> str:
        return SEC.format(self.tenant) + path

    def rows(self, table, *where):
        with self.gw.db.engine.connect() as conn:
            return conn.execute(
                select(table).where(table.c.tenant_id == self.tenant_id, *where).order_by(table.c.id)
            ).all()

    def push(self, provider: int, items) -> None:
        self.pushes += 1
        ts = (datetime(2024, 4, 1, tzinfo=UTC) + timedelta(hours=self.pushes)).isoformat()
        body = []
        own = [kind for kind in KINDS if kind[0] in (None, provider)]  # the vulnerabilities, its two types
        for host, pick, is_open in items:
            _, key, title = own[pick]
            name, status = f"h{host}.example.com", "open" if is_open else "fixed"
            if key == "vulnerability-assessment":
                body.append(vuln(f"v{provider}-{host}", name, status=status, ts=ts))
            else:
                body.append(compliance(f"{key}-{host}", name, key, title, status=status, ts=ts))
        assert push(self.gw, self.tenant, self.headers[provider], document(body))["status"] == "succeeded"

    def policy(self, scope, index, enabled, severity, control) -> None:
        target = {"recommendationType": TYPE_KEYS, "control": CONTROLS, "provider": PROVIDERS}[scope][
            index % {"recommendationType": 5, "control": 3, "provider": 2}[scope]
        ]
        body = {"enabled": enabled}
        if scope == "recommendationType":
            body.update(severity=severity, control=control)
        existing = self.rows(
            PolicySetting.__table__,
            PolicySetting.__table__.c.scope == scope,
            PolicySetting.__table__.c.target == target,
        )
        if existing:
            response = self.gw.http.patch(
                self.url(f"policies/{existing[0].id}"), json=body, headers=self.headers[0]
            )
            assert response.status_code == 200, response.get_json()
        else:
            response = self.gw.http.post(
                self.url("policies"), json={"scope": scope, "target": target, **body}, headers=self.headers[0]
            )
            says = any(value is not None for value in body.values())
            assert response.status_code == (201 if says else 400), response.get_json()

    def unpolicy(self, index: int) -> None:
        entries = self.rows(PolicySetting.__table__)
        if entries:
            entry = entries[index % len(entries)]
            assert (
                self.gw.http.delete(self.url(f"policies/{entry.id}"), headers=self.headers[0]).status_code
                == 204
            )

    def exempt(self, kind, host, resource_filter, days, category) -> None:
        """An exemption of the ``kind``-th type and the ``host``-th resource that exist (modulo), else
        of the filter; its scope may hold nothing yet (later recommendations fall in it)."""
        body = {"displayName": "x", "category": category}
        types = self.rows(RecommendationType.__table__)
        if kind is not None and types:
            body["recommendationType"] = types[kind % len(types)].key
        resources = self.rows(Resource.__table__)
        if host is not None and resources:
            body["resourceId"] = str(resources[host % len(resources)].id)
        elif resource_filter is not None:
            body["resourceFilter"] = resource_filter
        if len(body) == 2:
            body["resourceFilter"] = "startswith(name, 'h1')"
        if days is not None:
            body["expiresOn"] = (self.clock + timedelta(days=days)).isoformat()
        response = self.gw.http.post(self.url("exemptions"), json=body, headers=self.headers[0])
        assert response.status_code == 201, response.get_json()

    def unexempt(self, index: int) -> None:
        exemptions = self.rows(Exemption.__table__)
        if exemptions:
            gone = exemptions[index % len(exemptions)]
            assert (
                self.gw.http.delete(self.url(f"exemptions/{gone.id}"), headers=self.headers[0]).status_code
                == 204
            )

    def tick(self, days: int) -> None:
        from workers.tasks import expire_due_exemptions

        self.clock += timedelta(days=days)
        expire_due_exemptions(self.gw.db, self.clock)

    def check(self, step) -> None:
        with self.gw.db.engine.connect() as conn:
            assert_matches(conn, self.tenant_id, self.clock, FILTERS, context=step)
            conn.rollback()
            assert_recount_agrees(conn, self.tenant_id, context=step)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.tuples(push_op, st.lists(operations, min_size=1, max_size=10)))
# and, every run, the cases random draws reach only now and then:
@example(
    sequence=(
        ("push", 0, [(0, 1, True), (1, 2, True), (2, 0, True)]),
        [  # type > control > provider
            ("policy", "control", 0, False, None, None),
            ("policy", "provider", 0, True, None, None),
            ("policy", "recommendationType", 2, False, "low", "enable-mfa"),
            ("policy", "provider", 0, False, None, None),
            ("unpolicy", 0),
            ("policy", "recommendationType", 1, None, "critical", None),
            ("unpolicy", 1),
        ],
    )
)
@example(
    sequence=(
        ("push", 0, [(0, 0, True)]),
        [  # an exemption before its finding, expiry, hand-over
            ("exempt", 0, None, None, 2, "waiver"),
            ("push", 1, [(1, 0, True), (2, 1, False)]),
            ("exempt", None, None, "startswith(name, 'h1')", None, "mitigated"),
            ("tick", 3),
            ("push", 0, [(1, 1, True), (3, 0, True)]),
            ("exempt", None, 1, None, 1, "waiver"),
            ("unexempt", 0),
            ("tick", 1),
            ("unexempt", 0),
        ],
    )
)
def test_stored_score_equals_the_reference_after_every_operation(gw, sequence):
    first, rest = sequence
    run = Run(gw)
    for step, (name, *args) in enumerate([first, *rest]):
        getattr(run, name)(*args)
        run.check((step, name, args))
