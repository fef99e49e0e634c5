"""Parallel merge: a staged chunk's bucket and the chunk before it in that bucket's chain

Revision ID: 0032a
Revises: 0031
Create Date: 2026-12-03

A big batch is now staged in buckets of resources (gateway/merge/parallel.py): the chunks of one
bucket form a chain merged one after the other (``after_seq``: the chunk that must be done
first), the chunks of different buckets merge in parallel.  A ``spill`` row holds a piece of the
tail written while parsing.  The rows live only while their batch is merged.
"""

import sqlalchemy as sa
from alembic import op

revision = "0032a"
down_revision = "0031"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batch_merge_chunks", sa.Column("bucket", sa.Integer))
    op.add_column("batch_merge_chunks", sa.Column("after_seq", sa.Integer))


def downgrade() -> None:
    op.drop_column("batch_merge_chunks", "after_seq")
    op.drop_column("batch_merge_chunks", "bucket")
