"""CSV and JSON Lines exports (gateway/bulk_export.py): equal to the paged JSON on both stores, and on
PostgreSQL the COPY path byte for byte equal to the Python path."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, insert, select, update

from gateway import bulk_export, query
from gateway.api.collections import COLLECTIONS
from gateway.models import (
    Finding,
    GovernanceAssignment,
    ItsmConnection,
    ItsmTicket,
    ItsmTicketItem,
    Recommendation,
    Tenant,
)
from gateway.odata import FilterContext
from tests.conftest import Gateway, make_app, wipe
from tests.factories import document, finding

FINDINGS = COLLECTIONS["findings"]
# titles that test escaping: a formula, CSV quoting, JSON escapes, COPY's escapes, non-ASCII
TITLES = ("=HYPERLINK(\"http://x\")", "-2+3", "@SUM(1)", "+cmd|' /C calc'!A0", "\tlead tab", "\rlead cr",
          'quote " and, comma', "line\nbreak\r\nand tab\t", "back\\slash \\n", "ctl \x01\x1f\x7f",
          "Ünïcode ✓ 雪 \u2028", "", "plain")
QUERIES = [
    {},
    {"$orderby": "severity desc,lastSeen"},
    {"$filter": "severity eq 'high' or contains(title, ',')", "$orderby": "cvssScore desc",
     "$select": "title,severity,cvssScore,sources"},
    {"$filter": "sources/any(s: s/provider eq 'Tenable')", "$orderby": "updatedAt desc", "$select": "title"},
    {"$select": "governance,comments,tags,assignedTo", "$orderby": "firstSeen"},
]


def _url(tenant: str) -> str:
    return f"/api/v1/tenants/{tenant}/security/findings"


def _seed(gw, tenant: str, n: int = 30, extras: bool = True) -> dict:
    """``n`` varied findings of ``tenant`` from two providers; with ``extras``, customer edits, a
    governance assignment, an exemption and tickets."""
    qualys = gw.partner("Qualys", [tenant])
    tenable = gw.partner("Tenable", [tenant])
    scores = (9.8, 10.0, 0.0, 5.5, 0.1, None, 7.25)
    records = [finding(f"q-{i}", host=f"h{i % 4}.example.com",
                       cves=() if i % 5 == 0 else (f"CVE-2024-{1000 + i}",),
                       vendorId=f"QID-{i}", title=TITLES[i % len(TITLES)],
                       severity=("low", "high", "critical", "medium")[i % 4],
                       ts=f"2024-04-01T00:00:{i % 60:02d}Z", **({} if scores[i % 7] is None else
                                                              {"cvssScore": scores[i % 7]}))
               for i in range(n)]
    for headers, batch in ((qualys, records), (tenable, records[::3])):
        response = gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical", data=document(batch),
                                headers=headers | {"Content-Type": "application/json"})
        assert response.status_code == 202, response.get_json()
    with gw.db.engine.begin() as conn:
        tenant_id = conn.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
        ids = conn.scalars(select(Finding.id).where(Finding.tenant_id == tenant_id)
                           .order_by(Finding.id)).all()
        assert len(ids) >= n
        if not extras:
            return qualys
        conn.execute(update(Finding).where(Finding.id == ids[0]).values(
            assigned_to='sam "the, admin"', tags=["=1+1", "prod", "é"],
            comments=[{"text": "looked, at: it\n\"twice\"", "by": "sam", "at": "2024-05-01T00:00:00+00:00"}]))
        conn.execute(update(Finding).where(Finding.id == ids[1]).values(
            resolved_at=datetime(2024, 5, 2, 3, 4, 5, 123456, tzinfo=UTC), cvss_score=1e16))
        recommendation = conn.execute(select(Recommendation.id).where(
            Recommendation.tenant_id == tenant_id)).first()
        if recommendation is not None:
            # the export reads the exemption and the assignment through joins, the paged JSON
            # through subqueries
            conn.execute(update(Recommendation).where(Recommendation.id == recommendation.id).values(
                exemption_id=4242))
            conn.execute(insert(GovernanceAssignment).values(
                tenant_id=tenant_id, recommendation_id=recommendation.id, owner="owner@example.com",
                due_date=datetime.now(UTC) - timedelta(days=30), is_grace_period=False, latest=True,
                additional_data={}))
        # tickets: the finding's tickets[] (gateway/itsm/items.py), rendered by both paths alike
        for key, state, synced in (("INC0010002", "Resolved", datetime(2024, 5, 3, 1, 2, 3, 456, tzinfo=UTC)),
                                   ("INC0010001", 'New "one", | \\', None)):
            connection = conn.execute(insert(ItsmConnection).values(
                tenant_id=tenant_id, name=key, kind="servicenow", base_url="https://sn.example.com",
                auth="basic", settings={}).returning(ItsmConnection.id)).scalar()
            ticket = conn.execute(insert(ItsmTicket).values(
                tenant_id=tenant_id, connection_id=connection, subject_type="finding", subject_id=ids[0],
                collection="findings", sync_state="synced", remote_id=key.lower(), remote_key=key,
                remote_url=f"https://sn.example.com/{key}", remote_state=state, last_synced_at=synced,
            ).returning(ItsmTicket.id)).scalar()
            conn.execute(insert(ItsmTicketItem).values(
                ticket_id=ticket, subject_type="finding", subject_id=ids[0], tenant_id=tenant_id,
                connection_id=connection))
    return qualys


def _paged(gw, tenant: str, headers: dict, wanted: dict) -> list[dict]:
    rows, url, args = [], _url(tenant), {"$top": "7", **wanted}
    while url:
        response = gw.http.get(url, query_string=args, headers=headers)
        assert response.status_code == 200, response.get_json()
        rows += response.get_json()["value"]
        url, args = response.get_json().get("@odata.nextLink"), None
        if url:
            url = url.split("localhost", 1)[1]
    return rows


def _list_request(db, tenant: str, wanted: dict, fmt: str) -> tuple[int, query.ListRequest]:
    with db.session() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == tenant))
    context = FilterContext(tenant_id=tenant_id, dialect=db.engine.dialect.name)
    args = _Args(wanted | {"$format": fmt})
    return tenant_id, query.parse_list_args(FINDINGS, args, context, 100, 1000)


class _Args(dict):
    def getlist(self, name: str) -> list:
        return [self[name]] if name in self else []


def test_csv_and_jsonl_equal_the_paged_json(gw, monkeypatch):
    monkeypatch.setattr(query, "CSV_BATCH", 4)
    monkeypatch.setattr(bulk_export, "COPY_SLICE", 5)
    tenant = gw.tenant()
    headers = _seed(gw, tenant)
    for wanted in QUERIES:
        expected = _paged(gw, tenant, headers, wanted)
        assert expected, wanted
        columns = list(expected[0])
        jsonl = gw.http.get(_url(tenant), query_string=wanted | {"$format": "jsonl"}, headers=headers)
        assert jsonl.status_code == 200 and jsonl.mimetype == "application/x-ndjson"
        assert jsonl.headers["Content-Disposition"] == 'attachment; filename="findings.jsonl"'
        text = jsonl.get_data(as_text=True)
        lines = text.split("\n")  # (not splitlines(), which also splits at U+2028 inside a string)
        assert lines.pop() == "" and [json.loads(line) for line in lines] == expected, wanted
        assert all(list(json.loads(line)) == columns for line in lines), "fields in $select order"
        exported = gw.http.get(_url(tenant), query_string=wanted | {"$format": "csv"}, headers=headers)
        assert exported.status_code == 200 and exported.mimetype == "text/csv"
        header, *rows = list(csv.reader(io.StringIO(exported.get_data(as_text=True), newline="")))
        assert header == columns
        assert rows == [[query.csv_cell(item[name]) for name in columns] for item in expected], wanted


@pytest.fixture
def pg_gw(pg_url):
    """A gateway on PostgreSQL that merges pushes inline (the store's output is under test here)."""
    app = make_app(pg_url, eager=True)
    wipe(app.extensions["gateway.db"])
    yield Gateway(app)
    app.extensions["gateway.db"].dispose()


def test_the_copy_path_is_byte_identical_to_the_python_path(pg_gw, monkeypatch):
    monkeypatch.setattr(query, "CSV_BATCH", 4)
    monkeypatch.setattr(bulk_export, "COPY_SLICE", 6)
    tenant = pg_gw.tenant()
    _seed(pg_gw, tenant)
    engine = pg_gw.db.engine
    for wanted in QUERIES:
        for fmt in ("csv", "jsonl"):
            tenant_id, request = _list_request(pg_gw.db, tenant, wanted, fmt)
            assert bulk_export.copy_rendering(engine, FINDINGS, request) is not None
            fast = b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, fmt))
            slow = b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, fmt, fast=False))
            assert fast == slow, (wanted, fmt)
            if "$filter" not in wanted:  # every finding, across several slices
                assert fast.count(b"\n") >= 30 + (fmt == "csv")
            if not wanted and fmt == "jsonl":  # the joined and the looked-up parts are there
                assert b'"exemptionId":"4242"' in fast and b'"governance":{"assignmentId":' in fast
                assert b'"tickets":[{"id":' in fast
    # a tenant without tickets, assignments or exemptions (the tickets' lookup is skipped then)
    bare = pg_gw.tenant()
    _seed(pg_gw, bare, n=9, extras=False)
    for fmt in ("csv", "jsonl"):
        tenant_id, request = _list_request(pg_gw.db, bare, {}, fmt)
        fast = b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, fmt))
        assert fast == b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, fmt, fast=False))
        assert fast.count(b"\n") >= 9 + (fmt == "csv") and b'"exemptionId":"4242"' not in fast
    # one COPY slice larger than the output block: rows cut across blocks come out whole
    monkeypatch.setattr(bulk_export, "COPY_SLICE", 50_000)
    monkeypatch.setattr(bulk_export, "_BLOCK", 100)
    tenant_id, request = _list_request(pg_gw.db, tenant, {}, "jsonl")
    fast = b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, "jsonl"))
    assert fast == b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, "jsonl", fast=False))


def test_the_python_path_serves_sqlite_and_collections_without_a_rendering(gw):
    tenant = gw.tenant()
    tenant_id, request = _list_request(gw.db, tenant, {}, "jsonl")
    rendering = bulk_export.copy_rendering(gw.db.engine, FINDINGS, request)
    assert (rendering is not None) == (gw.db.engine.dialect.name == "postgresql")
    assert bulk_export.copy_rendering(gw.db.engine, COLLECTIONS["alerts"], request) is None


def test_formula_escaping_in_both_paths(gw):
    tenant = gw.tenant()
    headers = _seed(gw, tenant, n=13)
    exported = gw.http.get(_url(tenant), query_string={"$format": "csv", "$select": "title,tags",
                                                       "$orderby": "id"}, headers=headers)
    header, *rows = list(csv.reader(io.StringIO(exported.get_data(as_text=True), newline="")))
    titles = [row[1] for row in rows]
    for risky in ("=HYPERLINK(\"http://x\")", "-2+3", "@SUM(1)", "+cmd|' /C calc'!A0", "\tlead tab",
                  "\rlead cr"):
        assert "'" + risky in titles and risky not in titles
    assert 'quote " and, comma' in titles and "line\nbreak\r\nand tab\t" in titles
    assert rows[0][2] == '["=1+1","prod","é"]', "a list is JSON text; it starts with [, not a formula"


def test_an_export_holds_only_the_tenants_rows(gw):
    mine, theirs = gw.tenant(), gw.tenant()
    headers = _seed(gw, mine, n=8)
    other = _seed(gw, theirs, n=5)
    for fmt in ("csv", "jsonl"):
        own = gw.http.get(_url(mine), query_string={"$format": fmt, "$select": "id"}, headers=headers)
        lines = own.get_data(as_text=True).split("\n")[:-1]
        assert len(lines) >= 8 + (fmt == "csv")
        with gw.db.engine.connect() as conn:
            theirs_ids = {str(i) for i in conn.scalars(select(Finding.id).join(
                Tenant, Tenant.id == Finding.tenant_id).where(Tenant.external_id == theirs))}
        shown = {line.strip().strip('"') for line in lines[1:]} if fmt == "csv" else {
            json.loads(line)["id"] for line in lines}
        assert len(shown) == len(lines) - (fmt == "csv") and not shown & theirs_ids
        assert gw.http.get(_url(mine), query_string={"$format": fmt}, headers=other).status_code == 404


@pytest.mark.parametrize("accept, mimetype", [("application/x-ndjson", "application/x-ndjson"),
                                              ("application/jsonl", "application/x-ndjson"),
                                              ("text/csv", "text/csv"),
                                              ("application/json, text/csv;q=0.5", "application/json"),
                                              ("*/*", "application/json")])
def test_the_accept_header_chooses_the_format(gw, accept, mimetype):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    response = gw.http.get(_url(tenant), headers=headers | {"Accept": accept})
    assert response.status_code == 200 and response.mimetype == mimetype


def test_bad_formats_and_paging_options_are_refused(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    for bad, named in (({"$format": "xml"}, "$format"), ({"$format": "ndjson"}, "$format"),
                       ({"$format": "jsonl", "$top": "5"}, "$top"), ({"$format": "jsonl", "$count": "true"},
                                                                     "$count")):
        response = gw.http.get(_url(tenant), query_string=bad, headers=headers)
        assert response.status_code == 400
        error = response.get_json()["error"]
        assert error["code"] == "invalidParameter" and named in error["message"]
    itsm = gw.partner("Qualys", [tenant], scopes="security.read itsm.manage")
    response = gw.http.get(f"/api/v1/tenants/{tenant}/itsm/tickets", query_string={"$format": "jsonl"},
                           headers=itsm)
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    assert response.get_data() == b"", "no tickets: no lines"


@pytest.fixture
def pg_index_gw(pg_url):
    """``pg_gw`` whose planner reads ordered rows from an index whenever one serves the order
    (``enable_sort=off``): a few dozen rows would be sorted in memory, and only an indexed order
    takes the several-connection path."""
    app = make_app(f"{pg_url}?options=-c%20enable_sort%3Doff", eager=True)
    wipe(app.extensions["gateway.db"])
    yield Gateway(app)
    app.extensions["gateway.db"].dispose()


def test_several_connections_give_the_same_bytes_in_one_snapshot(pg_index_gw):
    tenant = pg_index_gw.tenant()
    _seed(pg_index_gw, tenant)
    engine = pg_index_gw.db.engine
    indexed = [{}, {"$orderby": "lastSeen desc", "$select": "title,lastSeen,sources"},
               {"$filter": "severity eq 'high' or contains(title, ',')", "$orderby": "updatedAt"}]
    for wanted in indexed:
        for fmt in ("csv", "jsonl"):
            tenant_id, request = _list_request(pg_index_gw.db, tenant, wanted, fmt)
            assert bulk_export.reads_in_order(engine, FINDINGS, tenant_id, request), wanted
            slow = b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, fmt, fast=False))
            for connections, slice_rows in ((2, 4), (3, 1), (2, 1000)):
                parallel = b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, fmt,
                                                       connections=connections, slice_rows=slice_rows))
                assert parallel == slow, (wanted, fmt, connections, slice_rows)
    # a multi-key order that PostgreSQL has to sort stays on one connection (its large slices)
    tenant_id, request = _list_request(pg_index_gw.db, tenant, {"$orderby": "severity desc,lastSeen"}, "csv")
    assert not bulk_export.reads_in_order(engine, FINDINGS, tenant_id, request)
    assert b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, "csv", connections=2)) == \
        b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, "csv", fast=False))

    # what is written while the export runs is not in it: every connection reads the export's snapshot
    tenant_id, request = _list_request(pg_index_gw.db, tenant, {"$select": "id,title"}, "jsonl")
    before = b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, "jsonl", fast=False))
    chunks = bulk_export.stream(engine, FINDINGS, tenant_id, request, "jsonl", connections=2, slice_rows=3)
    first = next(chunks)
    with engine.begin() as conn:
        conn.execute(update(Finding).where(Finding.tenant_id == tenant_id).values(title="changed"))
    assert first + b"".join(chunks) == before
    assert b"changed" in b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, "jsonl",
                                                     connections=2, slice_rows=3))


def test_an_abandoned_export_gives_its_connections_back(pg_index_gw):
    tenant = pg_index_gw.tenant()
    _seed(pg_index_gw, tenant)
    engine = pg_index_gw.db.engine
    tenant_id, request = _list_request(pg_index_gw.db, tenant, {}, "csv")
    # the export's connections only: the test's thread and the slice readers (the background
    # statistics round may hold a pooled connection of its own meanwhile)
    held: set[int] = set()

    def checkout(dbapi_connection, record, proxy) -> None:
        thread = threading.current_thread()
        if thread is threading.main_thread() or thread.name == "export-slice-reader":
            held.add(id(record))

    def checkin(dbapi_connection, record) -> None:
        held.discard(id(record))

    event.listen(engine.pool, "checkout", checkout)
    event.listen(engine.pool, "checkin", checkin)
    try:
        chunks = bulk_export.stream(engine, FINDINGS, tenant_id, request, "csv", connections=3, slice_rows=2)
        try:
            next(chunks), next(chunks)
            deadline = time.monotonic() + 60  # the readers are threads: each checks out at start
            while len(held) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(held) == 4  # the export's own connection and its three readers
        finally:
            chunks.close()  # the client went away (also when the check above failed)
        assert not held
    finally:
        event.remove(engine.pool, "checkout", checkout)
        event.remove(engine.pool, "checkin", checkin)


def test_a_stuck_reader_ends_the_export_and_gives_its_connections_back(pg_index_gw):
    """A reader that sends nothing for ``reader_timeout`` ends the export (it does not hang the
    request), its statement is cancelled, and every connection of the export goes back."""
    tenant = pg_index_gw.tenant()
    _seed(pg_index_gw, tenant)
    engine = pg_index_gw.db.engine
    tenant_id, request = _list_request(pg_index_gw.db, tenant, {}, "csv")
    held: set[int] = set()  # as above: the connections of the test's thread and of the readers

    def checkout(dbapi_connection, record, proxy) -> None:
        thread = threading.current_thread()
        if thread is threading.main_thread() or thread.name == "export-slice-reader":
            held.add(id(record))

    def checkin(dbapi_connection, record) -> None:
        held.discard(id(record))

    waiting_sql = ("SELECT count(*) FROM pg_locks WHERE NOT granted"
                   " AND relation = 'finding_sources'::regclass AND database = "
                   "(SELECT oid FROM pg_database WHERE datname = current_database())")
    chunks = bulk_export.stream(engine, FINDINGS, tenant_id, request, "csv", connections=2, slice_rows=5,
                                reader_timeout=2)
    header = next(chunks)  # the CSV header: no connection yet
    assert header.startswith(b"id,")
    # Another transaction holds the findings' sources exclusively (a migration's ALTER TABLE, say):
    # each reader's COPY, which lists every finding's sources, waits for that lock, while the
    # export's own connection (the snapshot, the slice starts) reads the findings alone.
    with engine.connect() as blocker:
        blocker.exec_driver_sql("LOCK TABLE finding_sources IN ACCESS EXCLUSIVE MODE")
        event.listen(engine.pool, "checkout", checkout)
        event.listen(engine.pool, "checkin", checkin)
        try:
            with pytest.raises(bulk_export.ExportStalled, match="sent nothing for 2 s"):
                for _ in chunks:
                    pass
            # nothing of the export waits for the lock any more: the readers' statements were cancelled
            assert blocker.exec_driver_sql(waiting_sql).scalar() == 0
        finally:
            event.remove(engine.pool, "checkout", checkout)
            event.remove(engine.pool, "checkin", checkin)
        blocker.rollback()
    assert not held
    assert not [thread for thread in threading.enumerate()
                if thread.name == "export-slice-reader" and thread.is_alive()]
    # and the export runs whole once the lock is gone
    assert b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, "csv", connections=2,
                                       slice_rows=5, reader_timeout=2)) == \
        b"".join(bulk_export.stream(engine, FINDINGS, tenant_id, request, "csv", fast=False))
