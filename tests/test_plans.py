"""Plans on a store PostgreSQL never analyzed (issue 17), and the ANALYZE after a large merge.

A tenant created since the last ANALYZE, or a store whose autovacuum is off, has no statistics:
the planner guesses that ``tenant_id = :t AND provider = :p`` picks a handful of rows, and the
merge's former lookups (``provider_id = ANY(:ids)`` beside them) read all the tenant's sources
for every chunk.  Here a scratch store is filled through the merge itself, never analyzed
(autovacuum off on every table), and the statements a second round of merges issues are
captured and explained: each lookup by key runs through the index of its key.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, text

from connectors.model import AlertRecord, FindingRecord, Observation, ResourceRef
from gateway import create_app, statistics
from gateway.db import Database
from gateway.merge.alerts import AlertMerger
from gateway.merge.findings import FindingMerger
from gateway.merge.observations import remove_unreported
from gateway.migrate import upgrade
from gateway.models import Base, Tenant
from gateway.pipeline import ANALYZED_TABLES, analyze_if_due
from tests.conftest import Gateway, scratch_postgres
from tests.factories import document, finding

SEEN = datetime(2024, 4, 1, tzinfo=UTC)
LATER = datetime(2024, 5, 1, tzinfo=UTC)
HOSTS = 2000
RECORDS = 4000  # Qualys: two CVEs on each host
TENABLE = 1000  # Tenable: the first CVE of the first 1,000 hosts
FULL_SCAN = 999  # the batch id of the full scan (observations keep it; no batch row is needed)
BIG_TABLES = {
    "finding_sources",
    "findings",
    "resources",
    "resource_identifiers",
    "resource_sources",
    "recommendations",
    "lifecycle_events",
}


def _partitioned(conn, table: str) -> bool:
    return conn.execute(text("SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}).scalar()


def _record(prefix: str, n: int, host: int, cve: int, title: str, seen: datetime) -> FindingRecord:
    return FindingRecord(
        provider_id=f"{prefix}-{n}",
        title=title,
        severity="high",
        cves=[f"CVE-2024-{cve:04d}"],
        last_seen=seen,
        provider_timestamp=seen,
        resource=ResourceRef(fqdn=f"host-{host}.example.com", ipv4=[f"10.1.{host >> 8 & 255}.{host & 255}"]),
    )


def _observation(prefix: str, n: int, host: int, seen: datetime) -> Observation:
    return Observation(provider_id=f"{prefix}-o{n}", name="Open port", category="port", value=f"{n}/tcp",
                       last_seen=seen, provider_timestamp=seen,
                       resource=ResourceRef(fqdn=f"host-{host}.example.com"))


def _alert(prefix: str, n: int, host: int, seen: datetime) -> AlertRecord:
    return AlertRecord(provider_id=f"{prefix}-a{n}", title=f"Alert {n}", severity="high", created=seen,
                       last_modified=seen, resource=ResourceRef(fqdn=f"host-{host}.example.com"))


def _merge(db: Database, tenant_id: int, provider: str, records: list[FindingRecord],
           observations: list[Observation] = (), alerts: list[AlertRecord] = (), full_scan: bool = False,
           batch_id: int | None = None) -> None:
    with db.engine.begin() as conn:
        merger = FindingMerger(conn, tenant_id, provider, batch_id, SEEN, "test")
        for start in range(0, len(records), 1000):
            merger.merge_chunk(records[start : start + 1000], observations[start : start + 1000])
        if alerts:
            AlertMerger(conn, tenant_id, provider, None, "test").merge_chunk(alerts)
        if full_scan:
            merger.resolve_unreported()
            remove_unreported(merger)
        merger.update_recommendations()


def _pad(db: Database, rows: int = 100_000) -> None:
    """Another tenant's alerts and observations, written by SQL: on tables of a few thousand rows
    every index of the tenant looks like one page, and the plans of a real store's lookups
    (where ``tenant_id = :t`` alone is 0.5% of the table) would be a tie."""
    with db.engine.begin() as conn:
        other = conn.execute(text("INSERT INTO tenants (external_id, name, created_at) "
                                  "VALUES ('other', 'other', now()) RETURNING id")).scalar_one()
        resource = conn.execute(text("INSERT INTO resources (tenant_id, created_at, updated_at, tags) "
                                     "VALUES (:t, now(), now(), '[]') RETURNING id"),
                                {"t": other}).scalar_one()
        conn.execute(text(
            "INSERT INTO observations (tenant_id, resource_id, provider, provider_id, category, name, "
            "provider_timestamp, created_at, updated_at) "
            "SELECT :t, :r, 'Qualys', 'o-' || n, 'port', 'Open port', now(), now(), now() "
            "FROM generate_series(1, :rows) AS n"), {"t": other, "r": resource, "rows": rows})
        conn.execute(text(
            "INSERT INTO alerts (tenant_id, provider, provider_id, title, severity, provider_timestamp, "
            "content_hash, created_at, updated_at, recommended_actions, comments, tags, status) "
            "SELECT :t, 'Qualys', 'a-' || n, 'Alert', 'high', now(), 'x', now(), now(), '[]', '[]', '[]', "
            "'newAlert' FROM generate_series(1, :rows) AS n"), {"t": other, "rows": rows})


@pytest.fixture(scope="module")
def store():
    """A migrated scratch store holding one tenant's merged findings, never analyzed, and the
    statements of a second round of merges: Qualys again (half of its records changed) and
    Tenable on the same hosts and CVEs (new sources of existing findings, new host records)."""
    with scratch_postgres("gw_plans") as url:
        upgrade(url)
        db = Database(url)
        try:
            with db.engine.begin() as conn:
                for table in Base.metadata.sorted_tables:
                    if _partitioned(conn, table.name):  # a partitioned parent has no storage options
                        continue
                    conn.execute(text(f"ALTER TABLE {table.name} SET (autovacuum_enabled = false)"))
            with db.session() as session:
                tenant = Tenant(external_id="plans", name="plans")
                session.add(tenant)
                session.flush()
                tenant_id = tenant.id
            _pad(db)
            _merge(
                db,
                tenant_id,
                "Qualys",
                [_record("q", n, n % HOSTS, n // HOSTS, "Vulnerability", SEEN) for n in range(RECORDS)],
                [_observation("q", n, n % HOSTS, SEEN) for n in range(RECORDS)],
                [_alert("q", n, n % HOSTS, SEEN) for n in range(HOSTS)],
            )
            captured: list[tuple[str, object]] = []

            def capture(conn, cursor, statement, parameters, context, executemany) -> None:
                if not executemany:
                    captured.append((statement, parameters))

            event.listen(db.engine, "before_cursor_execute", capture)
            try:
                _merge(
                    db,
                    tenant_id,
                    "Qualys",
                    [
                        _record("q", n, n % HOSTS, n // HOSTS, f"Changed {n % 2}", LATER)
                        for n in range(0, RECORDS, 4)
                    ],
                    [_observation("q", n, n % HOSTS, LATER) for n in range(0, RECORDS, 4)],
                    [_alert("q", n, n % HOSTS, LATER) for n in range(0, HOSTS, 2)],
                )
                _merge(
                    db,
                    tenant_id,
                    "Tenable",
                    [_record("t", n, n, 0, "Tenable's title", LATER) for n in range(TENABLE)],
                )
                # a full scan of the hosts 0 mod 4 reporting only their first CVE and observation:
                # their other sources are resolved and their other observations removed
                _merge(
                    db,
                    tenant_id,
                    "Qualys",
                    [_record("q", n, n, 0, "Vulnerability", LATER) for n in range(0, HOSTS, 4)],
                    [_observation("q", n, n, LATER) for n in range(0, HOSTS, 4)],
                    full_scan=True,
                    batch_id=FULL_SCAN,
                )
            finally:
                event.remove(db.engine, "before_cursor_execute", capture)
            yield url, db, tenant_id, captured
        finally:
            db.dispose()


def _plan(db: Database, statement: str, parameters) -> dict:
    with db.engine.connect() as conn:
        (document_,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).one()
    return (json.loads(document_) if isinstance(document_, str) else document_)[0]["Plan"]


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _lookups(captured, table: str, *keys: str) -> list[tuple[str, object]]:
    """The captured key-by-key lookups of ``table`` on these key columns."""
    return [
        (statement, parameters)
        for statement, parameters in captured
        if "JOIN LATERAL" in statement
        and statement.lstrip().startswith("SELECT")
        and f"FROM {table} \n" in statement
        and all(f"{table}.{key} = wanted.k{index}" in statement for index, key in enumerate(keys))
    ]


def test_the_store_is_never_analyzed(store):
    _, db, _, _ = store
    with db.engine.connect() as conn:
        assert (
            conn.execute(
                text("SELECT count(*) FROM pg_stats WHERE tablename = ANY(:t)"), {"t": sorted(BIG_TABLES)}
            ).scalar_one()
            == 0
        )
        assert (
            conn.execute(
                text("SELECT max(reltuples) FROM pg_class WHERE relname = ANY(:t)"), {"t": sorted(BIG_TABLES)}
            ).scalar_one()
            < 0
        )  # not even vacuumed


def test_the_source_lookup_runs_through_the_unique_index_on_an_unanalyzed_store(store):
    _, db, tenant_id, captured = store
    lookups = _lookups(captured, "finding_sources", "provider_id", "correlation_key")
    assert lookups, "the merges looked their sources up by (provider id, correlation key)"
    for statement, parameters in lookups:
        plan = _plan(db, statement, parameters)
        scans = [node for node in _nodes(plan) if node.get("Relation Name") == "finding_sources"]
        assert [node["Node Type"] for node in scans] == ["Index Scan"], scans
        assert scans[0]["Index Name"] == "uq_finding_sources_record"
        condition = scans[0]["Index Cond"]
        assert "provider_id" in condition and "correlation_key" in condition, condition
        assert plan["Node Type"] == "Nested Loop"  # one index lookup per key, in key order
    # the lock of the sources found, in id order: by primary key
    locks = _lookups(captured, "finding_sources", "id")
    assert locks
    for statement, parameters in locks:
        scans = [
            node
            for node in _nodes(_plan(db, statement, parameters))
            if node.get("Relation Name") == "finding_sources"
        ]
        assert [(node["Node Type"], node["Index Name"]) for node in scans] == [
            ("Index Scan", "finding_sources_pkey")
        ]
    # The shape it replaced, on this same store, reads every source of the provider for a chunk:
    # (tenant_id, provider) is the index condition and the ids are a filter.
    old = _plan(
        db,
        "SELECT id FROM finding_sources WHERE tenant_id = %(t)s AND provider = %(p)s "
        "AND provider_id = ANY(%(ids)s::varchar[])",
        {"t": tenant_id, "p": "Qualys", "ids": [f"q-{n}" for n in range(0, RECORDS, 4)]},
    )
    assert "provider_id" not in old.get("Index Cond", ""), old


def test_every_lookup_of_the_merges_reads_by_key(store):
    """No key-by-key lookup of the merges falls back to a sequential scan, or to an index whose
    condition leaves the key out (which would read the tenant's range for every key)."""
    _, db, _, captured = store
    lookups = [(s, p) for s, p in captured if "JOIN LATERAL" in s and s.lstrip().startswith("SELECT")]
    tables = set()
    for statement, parameters in lookups:
        plan = _plan(db, statement, parameters)
        assert plan["Node Type"] == "Nested Loop", statement
        for node in _nodes(plan):
            table = node.get("Relation Name")
            if table is None:
                continue
            tables.add(table)
            assert node["Node Type"] != "Seq Scan", (statement, node)
            # the key is in the index condition (a Bitmap Heap Scan rechecks its bitmap's), or the
            # id of the row looked up by key that this one joins (a finding's sources)
            condition = node.get("Index Cond", "") + node.get("Recheck Cond", "")
            assert "wanted." in condition or re.search(r"= \w+\.id\)", condition), json.dumps(plan)
    # the sources, the findings (another provider's finding of the same CVE; a resource's
    # findings by type for its recommendations, and its open sources in a full scan),
    # recommendations, alerts, observations, and the resources' identifiers, host records and rows
    assert {
        "alerts",
        "finding_sources",
        "findings",
        "observations",
        "recommendations",
        "resources",
        "resource_identifiers",
        "resource_sources",
    } <= tables, tables


def _scans(db: Database, statement: str, parameters) -> list[tuple[str, str, str | None]]:
    """(table, node type, index) of every scan of a table in the statement's plan."""
    return [(node["Relation Name"], node["Node Type"], node.get("Index Name"))
            for node in _nodes(_plan(db, statement, parameters)) if node.get("Relation Name")]


def test_the_recommendations_aggregate_reads_each_resource_by_key(store):
    _, db, _, captured = store
    aggregates = [(st, p) for st, p in _lookups(captured, "findings", "resource_id") if "GROUP BY" in st]
    assert aggregates, "update_recommendations counted the findings of the touched resources"
    for statement, parameters in aggregates:
        assert _scans(db, statement, parameters) == [("findings", "Index Scan", "uq_findings_subject")]


def test_the_resources_seen_times_are_updated_by_primary_key(store):
    """_move_seen's UPDATE of a chunk's resources reads them by their ids (or the tenant's range, when
    the planner finds it smaller), not the whole table: in
    a store of 100,000 resources, analyzed, it was planned as a hash join over a sequential scan
    of ``resources`` for every chunk (a cost that grew with the store: issue 14).  The other
    tenant's resources and the statistics are made in a transaction rolled back after."""
    _, db, _, captured = store
    updates = [(st, p) for st, p in captured if st.lstrip().startswith("UPDATE resources AS t SET")
               and "AS k(id, seen)" in st]  # _move_seen's (update_rows writes resources too)
    assert updates, "the merges moved the resources' first and last seen times"
    with db.engine.connect() as conn:
        transaction = conn.begin()
        try:
            other = conn.execute(text("INSERT INTO tenants (external_id, name, created_at) "
                                      "VALUES ('padded', 'padded', now()) RETURNING id")).scalar_one()
            conn.execute(text("INSERT INTO resources (tenant_id, created_at, updated_at, tags) "
                              "SELECT :t, now(), now(), '[]' FROM generate_series(1, 100000)"), {"t": other})
            conn.execute(text("ANALYZE resources"))
            for statement, parameters in updates:
                (document_,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).one()
                plan = (json.loads(document_) if isinstance(document_, str) else document_)[0]["Plan"]
                scans = [node for node in _nodes(plan)
                         if node.get("Relation Name") and node["Node Type"] != "ModifyTable"]
                assert scans and all(node["Node Type"] != "Seq Scan" for node in scans), json.dumps(scans)
                for scan in scans:  # by the ids, or the tenant's range when it is the smaller read
                    condition = scan.get("Index Cond", "") + scan.get("Recheck Cond", "")
                    assert re.search(r"\bid = ANY|tenant_id = ", condition), json.dumps(scan)
        finally:
            transaction.rollback()


def test_a_full_scan_finds_the_open_sources_and_observations_by_resource(store):
    """resolve_unreported reads a resource's findings by key and their sources by finding;
    remove_unreported deletes the observations it finds by resource, by primary key."""
    _, db, tenant_id, captured = store
    findings_of = [(st, p) for st, p in _lookups(captured, "findings", "resource_id") if "GROUP BY" not in st]
    assert findings_of, "the full scan looked its resources' findings up"
    for statement, parameters in findings_of:
        assert _scans(db, statement, parameters) == [("findings", "Index Scan", "uq_findings_subject")]
    sources_of = _lookups(captured, "finding_sources", "finding_id")
    assert sources_of, "the full scan looked the findings' sources up"
    for statement, parameters in sources_of:
        nodes = list(_nodes(_plan(db, statement, parameters)))
        # an Index Scan, or a Bitmap Index Scan and its heap scan: by the finding
        indexes = [(node["Index Name"], node["Index Cond"]) for node in nodes if "Index Name" in node]
        assert len(indexes) == 1 and indexes[0][0] in (
            "ix_finding_sources_tenant_provider", "ix_finding_sources_finding"), indexes
        assert "finding_id = wanted.k0" in indexes[0][1], indexes
        assert all(node["Node Type"] != "Seq Scan" for node in nodes), nodes
    ((delete, parameters),) = [(st, p) for st, p in captured
                               if st.lstrip().startswith("DELETE FROM observations")]
    scans = _scans(db, delete, parameters)
    assert ("observations", "Index Scan", "ix_observations_resource") in scans, scans
    assert all(kind != "Seq Scan" for _, kind, _ in scans), scans
    with db.engine.connect() as conn:
        # the hosts 0 mod 4 keep the one CVE and observation the full scan reported
        assert conn.execute(text("SELECT count(*) FROM finding_sources WHERE tenant_id = :t AND provider = "
                                 "'Qualys' AND state = 'fixed'"), {"t": tenant_id}).scalar_one() == HOSTS // 4
        assert conn.execute(text("SELECT count(*) FROM observations WHERE tenant_id = :t"),
                            {"t": tenant_id}).scalar_one() == RECORDS - HOSTS // 4


def test_alerts_and_observations_are_found_by_record_key(store):
    _, db, _, captured = store
    for table, index in (("alerts", "uq_alerts_record"), ("observations", "uq_observations_record")):
        lookups = _lookups(captured, table, "provider_id")
        assert lookups, table
        for statement, parameters in lookups:
            assert _scans(db, statement, parameters) == [(table, "Index Scan", index)], statement
        # and locked by primary key, in id order
        locks = [(st, p) for st, p in _lookups(captured, table, "id") if "FOR UPDATE" in st]
        assert locks, table
        for statement, parameters in locks:
            assert _scans(db, statement, parameters) == [(table, "Index Scan", f"{table}_pkey")]


def test_a_count_of_sources_any_uses_the_provider_index_on_an_unanalyzed_store(store):
    url, _, _, _ = store
    app = create_app(
        {"DATABASE_URL": url, "BROKER_URL": "memory://", "SECRET_KEY": "plans", "RATELIMIT_ENABLED": False}
    )
    engine = app.extensions["gateway.db"].engine
    captured: list[tuple[str, object]] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, parameters, context, many: captured.append((statement, parameters)),
    )
    try:
        gw = Gateway(app)
        headers = gw.partner("Reader", ["plans"], scopes="security.read")
        url_ = "/api/v1/tenants/plans/security/findings"
        body = gw.http.get(
            url_,
            query_string={
                "$filter": "sources/any(s: s/provider eq 'Tenable')",
                "$count": "true",
                "$top": "1",
            },
            headers=headers,
        ).get_json()
        assert body["@odata.count"] == TENABLE
        # exactly that shape: the kept count (tests/test_provider_counts.py), no source is read
        assert [s for s, _ in captured if "provider_finding_counts" in s]
        assert not [s for s, _ in captured if "count(" in s and "finding_sources" in s]
        # another lambda on the sources alone: the distinct findings of the provider index's range
        captured.clear()
        body = gw.http.get(
            url_,
            query_string={
                "$filter": "sources/any(s: s/provider eq 'Tenable' and s/state eq 'open')",
                "$count": "true",
                "$top": "1",
            },
            headers=headers,
        ).get_json()
        assert body["@odata.count"] == TENABLE
        ((statement, parameters),) = [(s, p) for s, p in captured if "count(" in s and "finding_sources" in s]
        with engine.connect() as conn:
            (plan,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).one()
        nodes = list(_nodes(plan[0]["Plan"]))
        scans = [node for node in nodes if node.get("Relation Name")]
        assert [(node["Relation Name"], node["Index Name"]) for node in scans] == [
            ("finding_sources", "ix_finding_sources_tenant_provider")
        ], scans
        assert scans[0]["Node Type"] in ("Index Only Scan", "Index Scan")
        assert "provider" in scans[0]["Index Cond"]
        # the same count through the findings (another condition beside the any())
        both = gw.http.get(
            url_,
            query_string={
                "$filter": "sources/any(s: s/provider eq 'Tenable') and severity eq 'high'",
                "$count": "true",
                "$top": "1",
            },
            headers=headers,
        ).get_json()
        assert both["@odata.count"] == TENABLE
    finally:
        app.extensions["gateway.db"].dispose()


@pytest.mark.parametrize("lambda_", ["s/provider eq 'Tenable'",
                                     "s/provider eq 'Qualys' and s/state eq 'fixed'"])
def test_a_page_of_sources_any_is_read_by_index_in_id_order_on_an_unanalyzed_store(store, lambda_):
    """A page of findings with a sources/any() filter walks the findings in id order by index and
    stops at the page's end (each finding's sources looked up by finding), or reads the matching
    sources from the provider index in finding order: never a scan or sort of all the tenant's rows."""
    url, _, _, _ = store
    app = create_app(
        {"DATABASE_URL": url, "BROKER_URL": "memory://", "SECRET_KEY": "plans", "RATELIMIT_ENABLED": False}
    )
    engine = app.extensions["gateway.db"].engine
    captured: list[tuple[str, object]] = []
    event.listen(
        engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, parameters, context, many: captured.append((statement, parameters)),
    )
    try:
        gw = Gateway(app)
        headers = gw.partner("Reader", ["plans"], scopes="security.read")
        url_ = "/api/v1/tenants/plans/security/findings"
        pages, token = [], None
        while len(pages) < 3:
            query = {"$filter": f"sources/any(s: {lambda_})", "$top": "50", "$select": "id"}
            if token:
                query["$skiptoken"] = token
            body = gw.http.get(url_, query_string=query, headers=headers).get_json()
            pages.append([item["id"] for item in body["value"]])
            token = body["@odata.nextLink"].split("$skiptoken=")[1] if "@odata.nextLink" in body else None
            assert token
        ids = [int(i) for page in pages for i in page]
        assert len(ids) == 150 and ids == sorted(ids)
        statements = [(st, p) for st, p in captured if "finding_sources" in st and "LIMIT" in st]
        assert len(statements) == 3
        for number, (statement, parameters) in enumerate(statements):
            with engine.connect() as conn:
                (plan,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).one()
            nodes = list(_nodes(plan[0]["Plan"]))
            assert not {node["Node Type"] for node in nodes} & {"Seq Scan", "Hash Join"}, json.dumps(nodes)
            # whatever is sorted or hashed is one page: a Limit lies below it
            for node in nodes:
                if node["Node Type"] in ("Sort", "Incremental Sort", "Hash", "Aggregate"):
                    assert any(below["Node Type"] == "Limit" for below in _nodes(node)), json.dumps(nodes)
            (sources,) = [node for node in nodes if node.get("Relation Name") == "finding_sources"]
            assert sources["Node Type"] in ("Index Only Scan", "Index Scan"), json.dumps(nodes)
            assert sources["Index Name"] == "ix_finding_sources_tenant_provider"
            if number:  # the next pages start at the cursor in the index
                assert "finding_id >" in sources["Index Cond"], sources
            (findings,) = [node for node in nodes if node.get("Relation Name") == "findings"]
            assert findings["Node Type"] == "Index Scan" and "id =" in findings["Index Cond"], findings
    finally:
        app.extensions["gateway.db"].dispose()


def test_a_count_of_an_any_filter_is_the_number_of_rows_it_lists(gw):
    """The count of a lone sources/any() (distinct findings of the matching sources) is what the
    list holds, on both stores; a lambda naming a finding field is counted through the findings."""
    tenant = gw.tenant()
    qualys, tenable = gw.partner("Qualys", [tenant]), gw.partner("Tenable", [tenant])
    push = "/api/v1/tenants/{}/batches?format=canonical"
    # Tenable: two records on one finding (two ports), and one finding Qualys does not report
    assert (
        gw.http.post(
            push.format(tenant),
            data=document(
                [
                    finding(f"q-{n}", host=f"h{n}.example.com", severity=("high", "low")[n % 2])
                    for n in range(6)
                ]
            ),
            headers=qualys | {"Content-Type": "application/json"},
        ).status_code
        == 202
    )
    assert (
        gw.http.post(
            push.format(tenant),
            data=document(
                [
                    finding("t-1", host="h1.example.com"),
                    finding("t-1b", host="h1.example.com"),
                    finding("t-2", host="h2.example.com", severity="low"),
                    finding("t-9", host="h9.example.com"),
                ]
            ),
            headers=tenable | {"Content-Type": "application/json"},
        ).status_code
        == 202
    )
    url = f"/api/v1/tenants/{tenant}/security/findings"
    for text_ in (
        "sources/any(s: s/provider eq 'Tenable')",
        "sources/any(s: s/provider eq 'Qualys')",
        "sources/any(s: s/severity eq 'low')",
        "sources/any()",
        "sources/any(s: s/provider eq 'None')",
        "sources/any(s: s/provider eq 'Tenable' and severity eq 'low')",
        "sources/any(s: s/provider eq 'Tenable') and severity eq 'low'",
    ):
        listed = gw.http.get(url, query_string={"$filter": text_, "$top": "1000"}, headers=qualys).get_json()
        counted = gw.http.get(
            url, query_string={"$filter": text_, "$count": "true", "$top": "1"}, headers=qualys
        ).get_json()
        assert counted["@odata.count"] == len(listed["value"]), text_
    assert (
        gw.http.get(
            url,
            query_string={"$filter": "sources/any(s: s/provider eq 'Tenable')", "$count": "true"},
            headers=qualys,
        ).get_json()["@odata.count"]
        == 3
    )


def _wait_for_statistics(db: Database, expected: dict[str, int]) -> None:
    """Until the sessions' table statistics (flushed when idle, at most every second) count the
    ``expected`` changed rows of each table."""
    deadline = time.monotonic() + 20
    while True:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            changed = dict(
                conn.execute(
                    text(
                        "SELECT relname, n_mod_since_analyze FROM pg_stat_user_tables WHERE relname = ANY(:t)"
                    ),
                    {"t": list(expected)},
                ).all()
            )
        if all(changed.get(table, 0) >= rows for table, rows in expected.items()):
            return
        assert time.monotonic() < deadline, (changed, expected)
        time.sleep(0.5)


def test_analyze_runs_on_the_tables_a_merge_grew_once_enough_rows_changed():
    with scratch_postgres("gw_analyze") as url:
        upgrade(url)
        db = Database(url)
        try:
            with db.engine.begin() as conn:
                for table in Base.metadata.sorted_tables:
                    if _partitioned(conn, table.name):  # a partitioned parent has no storage options
                        continue
                    conn.execute(text(f"ALTER TABLE {table.name} SET (autovacuum_enabled = false)"))
            with db.session() as session:
                tenant = Tenant(external_id="analyze", name="analyze")
                session.add(tenant)
                session.flush()
                tenant_id = tenant.id
            _merge(
                db, tenant_id, "Qualys", [_record("q", n, n % 300, n // 300, "V", SEEN) for n in range(600)]
            )
            # 600 sources and findings on 300 resources (an FQDN, an address and a name each)
            _wait_for_statistics(
                db, {"finding_sources": 600, "findings": 600, "resources": 300, "resource_identifiers": 900}
            )
            assert analyze_if_due(db, after_rows=50_000, after_growth=0.1) == []  # under 1,000 rows: not yet
            assert analyze_if_due(db, after_rows=0, after_growth=0.1) == []  # turned off
            analyzed = analyze_if_due(db, after_rows=500, after_growth=0.1)
            assert {"finding_sources", "findings", "lifecycle_events"} <= set(analyzed)
            assert "resources" not in analyzed  # 300 rows changed: under the 500
            assert set(analyzed) <= set(ANALYZED_TABLES)
            with db.engine.connect() as conn:
                conn.execute(text("SELECT pg_stat_clear_snapshot()"))
                stats = dict(
                    conn.execute(
                        text(
                            "SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables "
                            "WHERE relname = ANY(:t)"
                        ),
                        {"t": list(ANALYZED_TABLES)},
                    ).all()
                )
                assert stats["finding_sources"] and stats["findings"]
                assert (
                    conn.execute(
                        text("SELECT reltuples FROM pg_class WHERE relname = 'finding_sources'")
                    ).scalar_one()
                    == 600
                )
                assert (
                    conn.execute(
                        text(
                            "SELECT count(*) FROM pg_stats WHERE tablename = 'finding_sources' "
                            "AND attname = 'tenant_id'"
                        )
                    ).scalar_one()
                    == 1
                )
            # analyzed: nothing is due until the rows change again
            assert analyze_if_due(db, after_rows=500, after_growth=0.1) == []
        finally:
            db.dispose()


def test_a_worker_analyzes_with_its_settings_after_a_merge_that_landed(pg_url, monkeypatch):
    from gateway import pipeline
    from tests.conftest import make_app

    calls = []
    monkeypatch.setattr(
        pipeline,
        "analyze_if_due",
        lambda db, rows, growth, batch_id=None: calls.append((rows, growth, batch_id)) or [],
    )
    # due whatever the statistics views say (they count a session's changes a second later)
    monkeypatch.setattr(pipeline, "analysis_due",
                        lambda db, rows, growth: calls.append((rows, growth)) or True)
    app = make_app(pg_url, eager=True, ANALYZE_AFTER_ROWS=1234, ANALYZE_AFTER_GROWTH=0.25)
    try:
        gw = Gateway(app)
        tenant = gw.tenant()
        headers = gw.partner("Qualys", [tenant])
        response = gw.http.post(
            f"/api/v1/tenants/{tenant}/batches?format=canonical",
            data=document([finding("q-1")]),
            headers=headers | {"Content-Type": "application/json"},
        )
        assert response.status_code == 202
        batch_id = int(response.get_json()["id"])
        assert (
            gw.http.get(f"/api/v1/tenants/{tenant}/batches/{batch_id}", headers=headers).get_json()["status"]
            == "succeeded"
        )
        assert statistics.wait_for_analysis()
        assert calls == [(1234, 0.25), (1234, 0.25, batch_id)]
    finally:
        app.extensions["gateway.db"].dispose()


def test_the_next_batch_does_not_wait_for_the_statistics_of_the_last(pg_url, monkeypatch):
    """The statistics round after a merge runs in a thread: while it is stuck, the worker merges
    the next batches; the rounds asked for meanwhile fold into one more, run when it ends."""
    from gateway import pipeline
    from tests.conftest import make_app

    release, started, rounds = threading.Event(), threading.Event(), []

    def stuck_analyze(db, rows, growth, batch_id=None):
        rounds.append(batch_id)
        started.set()
        assert release.wait(60)
        return []

    monkeypatch.setattr(pipeline, "analyze_if_due", stuck_analyze)
    monkeypatch.setattr(pipeline, "analysis_due", lambda db, rows, growth: True)
    app = make_app(pg_url, eager=True, ANALYZE_AFTER_ROWS=1)
    try:
        gw = Gateway(app)
        tenant = gw.tenant()
        headers = gw.partner("Qualys", [tenant]) | {"Content-Type": "application/json"}
        url = f"/api/v1/tenants/{tenant}/batches"
        ids = []
        for n in range(3):
            response = gw.http.post(f"{url}?format=canonical", data=document([finding(f"q-{n}")]),
                                    headers=headers)
            assert response.status_code == 202
            ids.append(int(response.get_json()["id"]))
            # each batch landed while the first batch's round is still stuck
            assert gw.http.get(f"{url}/{ids[-1]}", headers=headers).get_json()["status"] == "succeeded"
            assert started.wait(30)
        assert rounds == [ids[0]]
        release.set()
        assert statistics.wait_for_analysis()
        assert rounds == [ids[0], ids[2]]  # one more round, with the last batch's settings
    finally:
        release.set()
        statistics.wait_for_analysis()
        app.extensions["gateway.db"].dispose()


def test_pages_of_a_sources_any_filter_hold_what_the_exists_filter_holds(gw):
    """Paged one by one, in both directions, a lone sources/any() (read from the sources' index)
    lists the findings that the same condition written as not(all()) (an EXISTS) lists."""
    tenant = gw.tenant()
    qualys, tenable = gw.partner("Qualys", [tenant]), gw.partner("Tenable", [tenant])
    push = f"/api/v1/tenants/{tenant}/batches?format=canonical"
    json_ = {"Content-Type": "application/json"}
    body = document([finding(f"q-{n}", host=f"h{n}.example.com", cves=(f"CVE-2024-{n:04d}",))
                     for n in range(8)])
    assert gw.http.post(push, data=body, headers=qualys | json_).status_code == 202
    # two sources on one finding (h1's CVE), and findings on h3, h6 and one Qualys does not have
    body = document([finding("t-1", host="h1.example.com", cves=("CVE-2024-0001",)),
                     finding("t-1b", host="h1.example.com", cves=("CVE-2024-0001",)),
                     finding("t-3", host="h3.example.com", cves=("CVE-2024-0003",)),
                     finding("t-6", host="h6.example.com", cves=("CVE-2024-0006",)),
                     finding("t-9", host="h9.example.com", cves=("CVE-2024-0009",))])
    assert gw.http.post(push, data=body, headers=tenable | json_).status_code == 202
    url = f"/api/v1/tenants/{tenant}/security/findings"

    def walk(filter_: str, order: str) -> list[str]:
        ids, query = [], {"$filter": filter_, "$top": "1", "$orderby": order, "$select": "id"}
        while True:
            page = gw.http.get(url, query_string=query, headers=qualys).get_json()
            ids += [item["id"] for item in page["value"]]
            if "@odata.nextLink" not in page:
                return ids
            query["$skiptoken"] = page["@odata.nextLink"].split("$skiptoken=")[1]

    for order in ("id asc", "id desc"):
        for provider, expected in (("Tenable", 4), ("Qualys", 8), ("None", 0)):
            lone = walk(f"sources/any(s: s/provider eq '{provider}')", order)
            exists = walk(f"not sources/all(s: s/provider ne '{provider}')", order)
            assert lone == exists and len(lone) == expected, (order, provider, lone, exists)
        assert walk("sources/any(s: s/provider eq 'Tenable')", "id asc") == list(
            reversed(walk("sources/any(s: s/provider eq 'Tenable')", "id desc")))
    # $skip on the same shape
    page = gw.http.get(url, query_string={"$filter": "sources/any(s: s/provider eq 'Qualys')", "$top": "2",
                                          "$skip": "3", "$select": "id"}, headers=qualys).get_json()
    qualys_ids = walk("sources/any(s: s/provider eq 'Qualys')", "id asc")
    assert [item["id"] for item in page["value"]] == qualys_ids[3:5]


def test_lookups_read_by_key_in_a_tenant_created_after_the_last_analyze():
    """Statistics taken before a tenant existed know none of its rows: ``tenant_id = :t`` looks
    like one row, and an index led by the tenant alone would look as cheap as the key's own (each
    key reading the whole tenant).  The lookups read the tenant as a value the planner does not
    know (gateway/merge/sql.py ``_unknown_values``): they stay on their keys."""
    with scratch_postgres("gw_plans_late") as url:
        upgrade(url)
        db = Database(url)
        try:
            with db.session() as session:
                first = Tenant(external_id="first", name="first")
                late = Tenant(external_id="late", name="late")
                session.add_all([first, late])
                session.flush()
                first_id, late_id = first.id, late.id
            _merge(db, first_id, "Qualys",
                   [_record("q", n, n % 500, n // 500, "V", SEEN) for n in range(1000)],
                   [_observation("q", n, n % 500, SEEN) for n in range(1000)],
                   [_alert("q", n, n % 500, SEEN) for n in range(500)])
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE")  # the late tenant has no row yet
            records = [_record("l", n, n % 500, n // 500, "V", SEEN) for n in range(1000)]
            _merge(db, late_id, "Qualys", records,
                   [_observation("l", n, n % 500, SEEN) for n in range(1000)],
                   [_alert("l", n, n % 500, SEEN) for n in range(500)])
            captured: list[tuple[str, object]] = []

            def capture(conn, cursor, statement, parameters, context, executemany) -> None:
                keyed_select = "JOIN LATERAL" in statement and statement.lstrip().startswith("SELECT")
                if not executemany and keyed_select:
                    captured.append((statement, parameters))

            event.listen(db.engine, "before_cursor_execute", capture)
            try:
                _merge(db, late_id, "Qualys",
                       [_record("l", n, n % 500, n // 500, "W", LATER) for n in range(1000)],
                       [_observation("l", n, n % 500, LATER) for n in range(0, 1000, 2)],
                       [_alert("l", n, n % 500, LATER) for n in range(500)],
                       full_scan=True, batch_id=FULL_SCAN)
            finally:
                event.remove(db.engine, "before_cursor_execute", capture)
            tables = set()
            for statement, parameters in captured:
                plan = _plan(db, statement, parameters)
                for node in _nodes(plan):
                    if node.get("Relation Name") is None:
                        continue
                    tables.add(node["Relation Name"])
                    assert node["Node Type"] != "Seq Scan", json.dumps(plan)
                    condition = node.get("Index Cond", "") + node.get("Recheck Cond", "")
                    assert "wanted." in condition or re.search(r"= \w+\.id\)", condition), json.dumps(plan)
            assert {"alerts", "finding_sources", "findings", "observations", "recommendations",
                    "resource_sources"} <= tables, tables
        finally:
            db.dispose()
