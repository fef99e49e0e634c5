"""Paging, $skip, $count, $select and CSV over the collections, on both stores."""

from __future__ import annotations

import csv
import io
import threading
import time

import pytest

from gateway import query
from gateway.schemas import ResourceOut
from tests.test_odata import alerts_url, fetch_all, seed_alerts


@pytest.mark.parametrize("order", ["id", "severity desc,createdDateTime", "lastModifiedDateTime desc"])
def test_paging_returns_every_row_once_while_rows_are_inserted(gw, order):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    original = seed_alerts(gw.db, tenant, 150)
    stop = threading.Event()
    inserted: list[int] = []

    def insert() -> None:  # a bounded stream of new alerts, some sorting before the cursor and some after
        for start in range(1000, 1060, 3):
            if stop.is_set():
                return
            inserted.extend(seed_alerts(gw.db, tenant, 3, seed=start, start=start))
            time.sleep(0.002)

    writer = threading.Thread(target=insert)
    writer.start()
    try:
        seen = [int(row["id"]) for row in fetch_all(gw, tenant, headers, **{"$top": "7", "$orderby": order,
                                                                            "$select": "id"})]
    finally:
        stop.set()
        writer.join()
    assert inserted, "the writer ran during the paging"
    assert len(seen) == len(set(seen)), "no row twice"
    assert set(original) <= set(seen), "every row present when paging began"
    assert set(seen) <= set(original) | set(inserted)


def test_skip_count_select_and_the_odata_shape(gw):
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    ids = seed_alerts(gw.db, tenant, 30)
    url = alerts_url(tenant)
    page = gw.http.get(url, query_string={"$top": "5", "$skip": "10", "$count": "true",
                                          "$select": "title,severity"}, headers=headers).get_json()
    assert page["@odata.context"].endswith("/api/v1/$metadata#security/alerts(id,title,severity)")
    assert page["@odata.count"] == 30
    assert [int(row["id"]) for row in page["value"]] == ids[10:15]
    assert all(set(row) == {"id", "title", "severity"} for row in page["value"])
    assert "$skip=" not in page["@odata.nextLink"]
    following = gw.http.get(page["@odata.nextLink"].split("localhost", 1)[1], headers=headers).get_json()
    assert [int(row["id"]) for row in following["value"]] == ids[15:20] and following["@odata.count"] == 30
    filtered = gw.http.get(url, query_string={"$filter": "status eq 'resolved'", "$count": "true",
                                              "$top": "1"},
                           headers=headers).get_json()
    assert filtered["@odata.count"] == len(fetch_all(gw, tenant, headers,
                                                     **{"$filter": "status eq 'resolved'"}))
    assert gw.http.get(url, query_string={"$skip": str(query.MAX_SKIP + 1)},
                       headers=headers).status_code == 400
    assert gw.http.get(url, query_string={"$skip": str(query.MAX_SKIP)},
                       headers=headers).get_json()["value"] == []
    one = gw.http.get(f"{url}/{ids[0]}", query_string={"$select": "status"}, headers=headers).get_json()
    assert set(one) == {"id", "status"}
    assert gw.http.get(f"{url}/{ids[0]}", query_string={"$top": "1"}, headers=headers).status_code == 400
    assert "@odata.count" not in gw.http.get(url, headers=headers).get_json()


def _csv(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(response.get_data(as_text=True))))


def test_csv_streams_the_whole_filtered_collection_in_keyset_batches(gw, monkeypatch):
    monkeypatch.setattr(query, "CSV_BATCH", 7)
    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    seed_alerts(gw.db, tenant, 40)
    url = alerts_url(tenant)
    wanted = {"$filter": "severity ne 'unknown'", "$orderby": "severity desc",
              "$select": "title,severity,tags"}
    expected = fetch_all(gw, tenant, headers, **wanted)
    by_format = gw.http.get(url, query_string=wanted | {"$format": "csv"}, headers=headers)
    by_accept = gw.http.get(url, query_string=wanted, headers=headers | {"Accept": "text/csv"})
    for response in (by_format, by_accept):
        assert response.status_code == 200 and response.mimetype == "text/csv"
        assert response.headers["Content-Disposition"] == 'attachment; filename="alerts.csv"'
        header, *rows = _csv(response)
        assert header == ["id", "title", "severity", "tags"]
        assert [row[0] for row in rows] == [item["id"] for item in expected]
        assert len(rows) == len(expected) > query.CSV_BATCH
    assert gw.http.get(url, query_string={"$format": "csv", "$top": "5"}, headers=headers).status_code == 400
    assert gw.http.get(url, headers=headers | {"Accept": "application/json"}).mimetype == "application/json"


def test_csv_cells_cannot_become_formulas(gw):
    from sqlalchemy import update

    from gateway.models import Alert

    tenant = gw.tenant()
    headers = gw.partner("Qualys", [tenant])
    [first, second] = seed_alerts(gw.db, tenant, 2)
    with gw.db.engine.begin() as conn:
        conn.execute(update(Alert).where(Alert.id == first).values(title="=HYPERLINK(\"http://x\")",
                                                                   tags=["@SUM(1)"]))
        conn.execute(update(Alert).where(Alert.id == second).values(title="-2+3",
                                                                    description="+cmd|' /C calc'!A0"))
    response = gw.http.get(alerts_url(tenant), query_string={"$format": "csv",
                                                             "$select": "title,description"},
                           headers=headers)
    header, one, two = _csv(response)
    assert one[1] == "'=HYPERLINK(\"http://x\")"
    assert two[1:] == ["'-2+3", "'+cmd|' /C calc'!A0"]
    resources = gw.http.get(f"/api/v1/tenants/{tenant}/security/resources", query_string={"$format": "csv"},
                            headers=headers)
    assert _csv(resources) == [list(ResourceOut().fields)]  # no resources: the header alone
