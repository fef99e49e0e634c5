"""provider_findings and provider_finding_counts: the findings each provider reports, counted as they change

Revision ID: 0026
Revises: 0012
Create Date: 2026-12-21

``$count`` with ``$filter=sources/any(s: s/provider eq 'P')`` on findings counts the distinct
findings among the provider's sources: 400,000 of a 1M-finding tenant took 250-570 ms under
load even as an index-only scan (issue 17 asks for a p99 under 200 ms).  Now the count is kept
(gateway/provider_counts.py):

* ``provider_findings`` holds one row per (tenant, provider, finding) with how many of the
  finding's sources the provider has;
* ``provider_finding_counts`` holds signed changes of the number of such rows per (tenant,
  provider): the count is their sum (a handful of rows; compacted after large merges).

On PostgreSQL, statement-level triggers on ``finding_sources`` keep both, whatever the path
that writes sources (a merge, a resource merge or split, a KB re-keying, a finding or tenant
deleted): the rows a statement inserted, deleted or moved to another finding (its transition
tables, aggregated) are added to or taken from ``provider_findings`` by an upsert on its primary key, whose
row lock makes two transactions that change the same finding's sources of a provider take
turns, so the count stays exact under concurrency; a row that appears or reaches zero sources
is one change of the count.  The change rows are only ever inserted: concurrent merges never
wait for each other on a shared counter row.  SQLite has no such triggers: its stores are small
and count as before.
"""

import sqlalchemy as sa
from alembic import op

revision = "0026"
down_revision = "0023"
branch_labels = None
depends_on = None

# One statement per source statement: ``changes`` (the sources added (+) and removed (-) per
# (tenant, provider, finding)) are added to ``provider_findings`` (in key order); a row whose
# sources went from none to some, or from some to none, is one change of the count.  A row left
# at zero sources stays (the next source of that finding reuses it) until its finding is gone.
APPLY = """
    WITH changes AS ({changes}),
    added AS (
        INSERT INTO provider_findings AS pf (tenant_id, provider, finding_id, sources)
        SELECT tenant_id, provider, finding_id, sources FROM changes WHERE sources > 0 ORDER BY 1, 2, 3
        ON CONFLICT (tenant_id, provider, finding_id) DO UPDATE SET sources = pf.sources + excluded.sources
        RETURNING pf.tenant_id, pf.provider, pf.finding_id, pf.sources
    ),
    removed AS (
        UPDATE provider_findings AS pf SET sources = greatest(pf.sources + c.sources, 0)
        FROM changes AS c
        WHERE c.sources < 0 AND pf.tenant_id = c.tenant_id AND pf.provider = c.provider
              AND pf.finding_id = c.finding_id
        RETURNING pf.tenant_id, pf.provider, pf.sources
    ),
    deltas AS (
        SELECT a.tenant_id, a.provider, 1 AS delta FROM added AS a JOIN changes AS c
            ON c.tenant_id = a.tenant_id AND c.provider = a.provider AND c.finding_id = a.finding_id
            WHERE a.sources = c.sources
        UNION ALL
        SELECT tenant_id, provider, -1 FROM removed WHERE sources = 0
    )
    INSERT INTO provider_finding_counts (tenant_id, provider, findings)
    SELECT tenant_id, provider, sum(delta) FROM deltas GROUP BY 1, 2 HAVING sum(delta) <> 0;
"""
INSERTED = "SELECT tenant_id, provider, finding_id, count(*) AS sources FROM new_rows GROUP BY 1, 2, 3"
DELETED = "SELECT tenant_id, provider, finding_id, -count(*) AS sources FROM old_rows GROUP BY 1, 2, 3"
# An UPDATE that set a source's finding (or provider): each row's new key gains one source and
# its old key loses one; rows that kept their key cancel out.  Aggregates, no join: transition
# tables have no statistics and no index, and a join of the two was planned as a nested loop.
MOVED = """
    SELECT tenant_id, provider, finding_id, sum(sources) AS sources FROM (
        SELECT tenant_id, provider, finding_id, 1 AS sources FROM new_rows
        UNION ALL
        SELECT tenant_id, provider, finding_id, -1 FROM old_rows
    ) AS both_sides GROUP BY 1, 2, 3 HAVING sum(sources) <> 0
"""
UPKEEP = f"""
CREATE FUNCTION provider_findings_upkeep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {APPLY.format(changes=INSERTED)}
    ELSIF TG_OP = 'DELETE' THEN
        {APPLY.format(changes=DELETED)}
    ELSE
        {APPLY.format(changes=MOVED)}
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER finding_sources_counted_insert AFTER INSERT ON finding_sources
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION provider_findings_upkeep();
CREATE TRIGGER finding_sources_counted_delete AFTER DELETE ON finding_sources
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION provider_findings_upkeep();
CREATE TRIGGER finding_sources_counted_update AFTER UPDATE ON finding_sources
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION provider_findings_upkeep();
"""

BACKFILL = """
INSERT INTO provider_findings (tenant_id, provider, finding_id, sources)
    SELECT tenant_id, provider, finding_id, count(*) FROM finding_sources GROUP BY 1, 2, 3;
INSERT INTO provider_finding_counts (tenant_id, provider, findings)
    SELECT tenant_id, provider, count(*) FROM provider_findings GROUP BY 1, 2;
"""


def upgrade() -> None:
    op.create_table(
        "provider_findings",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("finding_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sources", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "provider", "finding_id"),
    )
    op.create_table(
        "provider_finding_counts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("findings", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_provider_finding_counts_provider", "provider_finding_counts",
                    ["tenant_id", "provider"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(UPKEEP)
        op.execute(BACKFILL)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for name in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER finding_sources_counted_{name} ON finding_sources")
        op.execute("DROP FUNCTION provider_findings_upkeep()")
    op.drop_index("ix_provider_finding_counts_provider", table_name="provider_finding_counts")
    op.drop_table("provider_finding_counts")
    op.drop_table("provider_findings")
