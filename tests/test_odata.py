"""$filter semantics against a Python reference (hypothesis), and hostile query options, on both stores."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from gateway.models import Alert, LifecycleEvent, Tenant

SEVERITIES = ("unknown", "informational", "low", "medium", "high", "critical")
STATUSES = ("newAlert", "inProgress", "resolved")
FEEDBACK = ("truePositive", "falsePositive", "benignPositive")
TEXTS = ("Alpha", "alpha", "ALPHA_1", "a_b", "a%b", "50%", "Ünïcode", "übel", "", "zeta", "Alp", "b'q")
CATEGORIES = ("Malware", "malware", "CredentialAccess", None)
PEOPLE = ("sam", "Sam", "alex", None)
TAGS = ("p1", "P1", "pci", "prod", "x_y")
PROVIDERS = ("Qualys", "Tenable", "qualys")
BASE_TIME = datetime(2024, 4, 1, tzinfo=UTC)
TIMES = tuple(BASE_TIME + timedelta(hours=h) for h in (0, 1, 5, 48)) + (None,)


def seed_alerts(db, tenant_external_id: str, n: int, seed: int = 7, start: int = 0) -> list[int]:
    """``n`` varied alerts of the tenant, written straight to the store (the filter is under test here)."""
    rng = random.Random(seed)
    with db.session() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant_external_id))
    rows = []
    for i in range(start, start + n):
        rows.append({
            "tenant_id": tenant_id, "provider": rng.choice(PROVIDERS), "provider_id": f"a-{i}",
            "title": rng.choice(TEXTS), "description": rng.choice(TEXTS + (None,)),
            "severity": rng.choice(SEVERITIES), "category": rng.choice(CATEGORIES),
            "status": rng.choice(STATUSES), "feedback": rng.choice(FEEDBACK + (None,)),
            "assigned_to": rng.choice(PEOPLE), "created_date_time": rng.choice(TIMES),
            "last_modified_date_time": rng.choice(TIMES),
            "tags": rng.sample(TAGS, rng.randint(0, 3)), "recommended_actions": [], "comments": [],
            "provider_timestamp": BASE_TIME, "content_hash": f"{i:032x}",
        })
    with db.engine.begin() as conn:
        table = Alert.__table__
        inserted = conn.execute(table.insert().returning(table.c.id, sort_by_parameter_order=True), rows)
        return list(inserted.scalars())


def alerts_url(tenant: str) -> str:
    return f"/api/v1/tenants/{tenant}/security/alerts"


def fetch_all(gw, tenant: str, headers: dict, **query) -> list[dict]:
    rows, url, args = [], alerts_url(tenant), {"$top": "1000", **query}
    while url:
        response = gw.http.get(url, query_string=args, headers=headers)
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        rows += page["value"]
        url, args = page.get("@odata.nextLink"), None
        if url:
            url = url.split("localhost", 1)[1]
    return rows


# -- a small generator of filters, each with its Python meaning ------------------------------


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _time_text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(value):
    return None if value is None else datetime.fromisoformat(value)


OPS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b,
       "ge": lambda a, b: a >= b, "lt": lambda a, b: a < b, "le": lambda a, b: a <= b}

# field -> (its value in the API's JSON, literals to compare it with, how to write one, ordering key)
SCALARS = {
    "title": (lambda a: a["title"], TEXTS + ("Alpha ",), _quote, None),
    "description": (lambda a: a["description"], TEXTS, _quote, None),
    "category": (lambda a: a["category"], CATEGORIES[:-1], _quote, None),
    "assignedTo": (lambda a: a["assignedTo"], PEOPLE[:-1], _quote, None),
    "severity": (lambda a: a["severity"], SEVERITIES, _quote, SEVERITIES.index),
    "status": (lambda a: a["status"], STATUSES, _quote, None),
    "feedback": (lambda a: a["feedback"], FEEDBACK, _quote, None),
    "createdDateTime": (lambda a: _parse(a["createdDateTime"]),
                        TIMES[:-1] + (BASE_TIME + timedelta(hours=2),),
                        _time_text, None),
    "vendorInformation/provider": (lambda a: a["vendorInformation"]["provider"], PROVIDERS, _quote, None),
}
TEXT_FIELDS = ("title", "description", "category", "assignedTo")
NEEDLES = ("a", "A", "Al", "%", "_", "a_", "ü", "", "pha", "1", "'")


def _compare(field: str, op: str, literal):
    read, _, _, key = SCALARS[field]

    def predicate(alert: dict) -> bool:
        value = read(alert)
        if value is None:
            return op == "ne"  # OData: null ne 'x' is true, every other comparison with null is false
        if key is not None and op not in ("eq", "ne"):
            return OPS[op](key(value), key(literal))
        return OPS[op](value, literal)

    return predicate


@st.composite
def comparisons(draw):
    field = draw(st.sampled_from(sorted(SCALARS)))
    _, literals, render, _ = SCALARS[field]
    kind = draw(st.sampled_from(["op", "op", "in", "null"]))
    if kind == "null":
        op = draw(st.sampled_from(["eq", "ne"]))
        read = SCALARS[field][0]
        return f"{field} {op} null", (lambda a: (read(a) is None) == (op == "eq"))
    if kind == "in":
        values = draw(st.lists(st.sampled_from(literals), min_size=1, max_size=3))
        read = SCALARS[field][0]
        text = ", ".join(render(v) for v in values) + ("," if len(values) == 1 else "")
        return f"{field} in ({text})", (lambda a: read(a) is not None and read(a) in values)
    op = draw(st.sampled_from(sorted(OPS)))
    if field in ("status", "feedback", "vendorInformation/provider"):
        op = draw(st.sampled_from(["eq", "ne"]))
    literal = draw(st.sampled_from(literals))
    return f"{field} {op} {render(literal)}", _compare(field, op, literal)


@st.composite
def text_functions(draw):
    function = draw(st.sampled_from(["contains", "startswith", "endswith"]))
    field = draw(st.sampled_from(TEXT_FIELDS))
    needle = draw(st.sampled_from(NEEDLES))
    read = SCALARS[field][0]
    test = {"contains": lambda v: needle in v, "startswith": lambda v: v.startswith(needle),
            "endswith": lambda v: v.endswith(needle)}[function]
    return f"{function}({field}, {_quote(needle)})", (lambda a: read(a) is not None and test(read(a)))


@st.composite
def tag_lambdas(draw):
    kind = draw(st.sampled_from(["eq", "starts", "empty", "all"]))
    tag = draw(st.sampled_from(TAGS + ("none",)))
    if kind == "eq":
        return f"tags/any(t: t eq {_quote(tag)})", (lambda a: tag in a["tags"])
    if kind == "starts":
        return (f"tags/any(t: startswith(t, {_quote(tag[:1])}))",
                lambda a: any(t.startswith(tag[:1]) for t in a["tags"]))
    if kind == "all":
        return f"tags/all(t: t ne {_quote(tag)})", (lambda a: tag not in a["tags"])
    return "tags/any()", (lambda a: bool(a["tags"]))


atoms = st.one_of(comparisons(), text_functions(), tag_lambdas())


def _combine(children):
    @st.composite
    def combined(draw):
        kind = draw(st.sampled_from(["and", "or", "not"]))
        left = draw(children)
        if kind == "not":
            return f"not ({left[0]})", (lambda a: not left[1](a))
        right = draw(children)
        if kind == "and":
            return f"({left[0]}) and ({right[0]})", (lambda a: left[1](a) and right[1](a))
        return f"({left[0]}) or ({right[0]})", (lambda a: left[1](a) or right[1](a))

    return combined()


filters = st.recursive(atoms, _combine, max_leaves=4)


def test_filters_match_the_python_reference(gw):
    tenant, other = gw.tenant(), gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    seed_alerts(gw.db, tenant, 120)
    seed_alerts(gw.db, other, 40, seed=8)  # another tenant's rows, which no filter may reach
    everything = fetch_all(gw, tenant, headers)
    assert len(everything) == 120

    @seed(20240401)
    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(filters)
    def check(case):
        text, predicate = case
        expected = sorted(int(a["id"]) for a in everything if predicate(a))
        response = gw.http.get(alerts_url(tenant), query_string={"$filter": text, "$top": "1000",
                                                                 "$select": "id", "$count": "true"},
                               headers=headers)
        assert response.status_code == 200, (text, response.get_json())
        body = response.get_json()
        assert sorted(int(a["id"]) for a in body["value"]) == expected, text
        assert body["@odata.count"] == len(expected), text

    check()


def test_any_over_sources_and_cves_and_nested_paths(gw):
    from tests.factories import document, finding

    tenant = gw.tenant()
    qualys, tenable = gw.partner("Qualys", [tenant]), gw.partner("Tenable", [tenant])
    for headers, items in ((qualys, [finding("q-1", cves=["CVE-2024-3094"]), finding("q-2", cves=[],
                                                                                      vendorId="38739")]),
                           (tenable, [finding("t-1", cves=["CVE-2024-3094"], severity="critical"),
                                      finding("t-2", host="web-1.example.com", cves=["CVE-2023-4863"])])):
        response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical", data=document(items),
                                headers=headers | {"Content-Type": "application/json"})
        assert response.status_code == 202

    def keys(odata_filter: str) -> list[str]:
        response = gw.http.get(f"/api/v1/tenants/{tenant}/security/findings",
                               query_string={"$filter": odata_filter}, headers=qualys)
        assert response.status_code == 200, response.get_json()
        return sorted(row["correlationKey"] for row in response.get_json()["value"])

    assert keys("cves/any(c: c eq 'CVE-2024-3094')") == ["CVE-2024-3094"]
    assert keys("cves/any(c: c in ('CVE-2024-3094', 'CVE-2023-4863'))") == ["CVE-2023-4863", "CVE-2024-3094"]
    assert keys("not cves/any()") == ["Qualys/38739"]
    assert keys("sources/any(s: s/provider eq 'Tenable')") == ["CVE-2023-4863", "CVE-2024-3094"]
    assert keys("sources/any(s: s/provider eq 'Qualys' and s/severity eq 'high') and "
                "sources/any(s: s/provider eq 'Tenable' and s/severity ge 'critical')") == ["CVE-2024-3094"]
    assert keys("sources/all(s: s/provider eq 'Qualys')") == ["Qualys/38739"]
    assert keys("severity eq 'critical' and lastSeen ge 2024-04-01T00:00:00Z") == ["CVE-2024-3094"]
    response = gw.http.get(f"/api/v1/tenants/{tenant}/security/resources",
                           query_string={"$filter":
                                         "identifiers/fqdn/any(f: endswith(f, 'web-1.example.com'))"},
                           headers=qualys)
    assert [r["name"] for r in response.get_json()["value"]] == ["web-1.example.com"]


def _fingerprint(gw) -> tuple:
    with gw.db.engine.connect() as conn:
        return (conn.execute(select(func.count()).select_from(Alert)).scalar(),
                conn.execute(select(func.count()).select_from(LifecycleEvent)).scalar(),
                conn.execute(select(func.count()).select_from(Tenant)).scalar(),
                {row.id: tuple(row) for row in conn.execute(
                    select(Alert.id, Alert.tenant_id, Alert.status, Alert.assigned_to, Alert.title))})


HOSTILE = {
    "$filter": ["title eq 'x'; DROP TABLE alerts; --", "title eq 'x' or 1 eq 1", "1 eq 1", "tenant_id eq 1",
                "title eq x' or '1'='1", "title eq 'x') or (title ne 'x'", "tenantId ne 0",
                "id eq 1 union select 1", "title eq \"x\"", "contains(title, title)", "exists(alerts)",
                "sources/any(s: s/provider eq 'x')", "tags/any(t: t/tenant_id eq 1)", "title eq 'x' --",
                "title eq 'x' /* c */", "length(title) gt 1", "(((", "not", "x" * 5000,
                "createdDateTime gt 2024-13-45T00:00:00Z", "title eq null or tenant_id eq 2", "title in ()"],
    "$orderby": ["id; DROP TABLE alerts", "id desc, (select 1)", "severity desc nulls first", "tenant_id",
                 "id desc desc", "1", "id,id", "title"],
    "$select": ["id,(select 1)", "*", "tenant_id", "title;drop", "", "title,,id", "id desc"],
    "$skiptoken": ["forged", "eyJ0IjoxfQ.x", "' or 1=1 --", ""],
    "$top": ["1;drop", "-1", "0", "1e3", "0x10", "1001", "٣", " 5", "5 "],
    "$skip": ["-1", "10001", "1 or 1", "²", "1.5"],
    "$count": ["1", "yes", "true;", "TRUE "],
    "$format": ["xml", "csv;drop", "json'"],
    "unknown": ["1"],
}


def test_injection_attempts_are_refused_and_change_nothing(gw):
    tenant, other = gw.tenant(), gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    seed_ids = seed_alerts(gw.db, tenant, 10)
    seed_alerts(gw.db, other, 10, seed=9, start=100)
    before = _fingerprint(gw)
    for option, values in HOSTILE.items():
        for value in values:
            response = gw.http.get(alerts_url(tenant), query_string={option: value}, headers=headers)
            assert response.status_code == 400, (option, value, response.status_code)
            error = response.get_json()["error"]
            assert set(error) == {"code", "message"} and error["code"].startswith("invalid"), (option, value,
                                                                                               error)
            assert "Traceback" not in error["message"] and "SELECT" not in error["message"]
            bulk = gw.http.patch(alerts_url(tenant), query_string={option: value},
                                 json={"assignedTo": "mallory"},
                                 headers=headers)
            assert bulk.status_code == 400, (option, value)
    # A quote inside a string literal is data: it matches nothing and widens nothing.
    for literal in ("x' or '1'='1", "x'; DROP TABLE alerts; --"):
        quoted = "'" + literal.replace("'", "''") + "'"
        response = gw.http.get(alerts_url(tenant), query_string={"$filter": f"title eq {quoted}"},
                               headers=headers)
        assert response.status_code == 200 and response.get_json()["value"] == []
        bulk = gw.http.patch(alerts_url(tenant), query_string={"$filter": f"title ne {quoted}"},
                             json={"assignedTo": "sam"}, headers=headers)
        assert bulk.get_json() == {"updated": 10}  # every alert of this tenant, none of the other's
    after = _fingerprint(gw)
    assert after[:3] == (before[0], before[1] + 20, before[2])
    mine = set(seed_ids)
    for alert_id, row in after[3].items():
        old = before[3][alert_id]
        if alert_id in mine:
            assert row == old[:3] + ("sam",) + old[4:]
        else:
            assert row == old, "another tenant's alert changed"


def test_the_skiptoken_is_bound_to_tenant_collection_order_filter_and_selection(gw):
    tenant, other = gw.tenant(), gw.tenant()
    headers = gw.partner("Qualys", [tenant, other])
    seed_alerts(gw.db, tenant, 12)
    seed_alerts(gw.db, other, 12, seed=3)
    query = {"$top": "5", "$filter": "severity ne 'unknown' or severity eq 'unknown'", "$select": "title"}
    page = gw.http.get(alerts_url(tenant), query_string=query, headers=headers).get_json()
    token = page["@odata.nextLink"].split("$skiptoken=")[1]
    assert gw.http.get(alerts_url(tenant), query_string=query | {"$skiptoken": token},
                       headers=headers).status_code == 200
    elsewhere = [(alerts_url(tenant), query | {"$filter": "severity ne 'low'"}),
                 (alerts_url(tenant), query | {"$select": "severity"}),
                 (alerts_url(tenant), query | {"$orderby": "id desc"}),
                 (alerts_url(tenant), {"$top": "5", "$select": "title"}),
                 (alerts_url(other), query),
                 (f"/api/v1/tenants/{tenant}/security/findings", {"$top": "5"})]
    for url, args in elsewhere:
        response = gw.http.get(url, query_string=args | {"$skiptoken": token}, headers=headers)
        assert response.status_code == 400, args
        assert response.get_json()["error"]["code"] == "invalidSkipToken", args
