"""Parallel merge of big batches: the staged chunks of a batch merged by several workers

Revision ID: 0028
Revises: 0026
Create Date: 2026-12-03

A batch above ``PARALLEL_MERGE_MIN_BYTES`` is parsed into chunks staged here, merged by several
workers at once, then finished by one step (gateway/merge/parallel.py).  The rows live only
while their batch is merged.
"""

import sqlalchemy as sa
from alembic import op

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "batch_merge_chunks",
        sa.Column("batch_id", BigId, sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("tenant_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("records", sa.LargeBinary, nullable=False),
        sa.Column("record_count", sa.Integer, nullable=False),
        sa.Column("received", sa.Integer, nullable=False),
        sa.Column("rejected", sa.Integer, nullable=False),
        sa.Column("result", sa.LargeBinary),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("lease_owner", sa.String(100)),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("batch_merge_chunks")
