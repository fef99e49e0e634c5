"""finding_sources (tenant_id, provider, finding_id): any() over a finding's sources by provider

Revision ID: 0012
Revises: 0017
Create Date: 2026-12-20

``$filter=sources/any(s: s/provider eq 'Tenable')`` on findings is an EXISTS over the finding's
sources.  Without this index PostgreSQL read the provider's sources through the unique key's
(tenant_id, provider) prefix, out of finding order, and joined them to the findings one by one
(41 s for a ``$count`` on a 1M-finding tenant, issue 17).  With it, the matching sources come
in finding order from the index alone: a page is a merge join that stops after the page's
rows, and a ``$count`` of that filter counts the distinct finding ids of the index range
(gateway/query.py ``count``).  Building it reads the table once (about 7 s for 1.5M sources).
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0017"
branch_labels = None
depends_on = None


# Every source has a finding (the column is NOT NULL): the predicate only keeps the index to the
# statements that name it.  A merge looks sources up by (tenant, provider, provider id,
# correlation key); with (tenant, provider) usable here too, PostgreSQL without statistics
# rates both indexes at one row, may pick this one, and reads the provider's sources per key.
PREDICATE = "finding_id IS NOT NULL"


def upgrade() -> None:
    op.create_index("ix_finding_sources_tenant_provider", "finding_sources",
                    ["tenant_id", "provider", "finding_id"], postgresql_where=sa.text(PREDICATE),
                    sqlite_where=sa.text(PREDICATE))


def downgrade() -> None:
    op.drop_index("ix_finding_sources_tenant_provider", table_name="finding_sources")
