"""A merge holds a bounded number of locks whatever its size (PostgreSQL's lock table is shared).

The lock table holds ``max_locks_per_transaction`` x ``max_connections`` entries for the whole
server; a merge that took one advisory lock per host of the batch failed a 100,000-host push
with "out of shared memory".  Recommendations are now recomputed under one lock per bucket of
resources (``RECOMMENDATION_BUCKETS``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select, text

from connectors.model import FindingRecord, ResourceRef
from gateway.merge.findings import RECOMMENDATION_BUCKETS, FindingMerger
from gateway.models import Recommendation, Tenant

SEEN = datetime(2024, 4, 1, tzinfo=UTC)


def _records(hosts: int, offset: int = 0) -> list[FindingRecord]:
    return [FindingRecord(provider_id=f"r-{offset + n}", title="Vulnerability", severity="high",
                          cves=["CVE-2024-3094"], last_seen=SEEN, provider_timestamp=SEEN,
                          resource=ResourceRef(fqdn=f"host-{offset + n}.example.com",
                                               ipv4=[f"10.{(offset + n) >> 8 & 255}.{(offset + n) & 255}.9"]))
            for n in range(hosts)]


def _advisory_locks(conn) -> int:
    return conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                             "AND pid = pg_backend_pid()")).scalar_one()


def test_a_merge_holds_a_bounded_number_of_locks_whatever_the_number_of_hosts(pg_gw):
    external = pg_gw.tenant()
    with pg_gw.db.sessions() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.external_id == external))
    held = {}
    for hosts, offset in ((200, 0), (2000, 10_000)):
        with pg_gw.db.engine.connect() as conn, conn.begin():
            merger = FindingMerger(conn, tenant_id, "Tenable", None, SEEN, "test")
            records = _records(hosts, offset)
            for start in range(0, hosts, 500):
                merger.merge_chunk(records[start : start + 500])
            merger.update_recommendations()
            held[hosts] = _advisory_locks(conn)  # still held: the transaction is open
    # the resolver's tenant lock (main connection only when merging resources) and the buckets
    assert held[2000] <= RECOMMENDATION_BUCKETS + 1, held
    assert held[200] <= RECOMMENDATION_BUCKETS + 1, held
    assert held[2000] >= RECOMMENDATION_BUCKETS  # 2,000 hosts fill every bucket: the locks are taken
    with pg_gw.db.sessions() as session:
        assert len(session.scalars(select(Recommendation).where(Recommendation.tenant_id == tenant_id)).all()) \
            == 2200
