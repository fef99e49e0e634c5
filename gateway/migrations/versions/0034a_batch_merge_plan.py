"""Parallel merge: the staging settings a big batch was cut with, stored with the batch

Revision ID: 0034a
Revises: 0033
Create Date: 2026-12-03

A big batch's staging (gateway/merge/parallel.py) cuts it into chunks by settings (records per
chunk, buckets, records per sub-chunk); a staging stopped by a crash starts again from the
bytes and keeps the rows already committed, which is right only if the new cut is the old one.
``merge_plan`` holds the settings the first staging used; a resume cuts with them, whatever the
settings say by then.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0034a"
down_revision = "0033"
branch_labels = None
depends_on = None


def upgrade() -> None:
    plan = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    op.add_column("batches", sa.Column("merge_plan", plan))


def downgrade() -> None:
    op.drop_column("batches", "merge_plan")
