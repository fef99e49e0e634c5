"""batches: live progress, every rejected record, stale details, well-formedness check; fallback timestamps

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09

* ``batches.progress`` (JSON): records parsed and merged so far and chunks done, written
  once per chunk in a short transaction of its own on PostgreSQL (the merge's own
  transaction is not visible until it commits); on SQLite written with the final status.
* ``batches.stale_details`` (JSON): a few records counted stale and what they lost to.
* ``batches.body_check``: ``passed`` (the whole body went through a well-formedness pass
  before the 202), ``skipped`` (larger than the budget), ``notNeeded`` (CSV formats); null
  for batches accepted before this revision.
* ``batch_rejections``: every rejected record of a batch (no cap), written per chunk in the
  merge's transaction.  Existing batches keep their embedded (capped) list only.
* ``finding_sources.provider_timestamp_is_fallback``: the stored provider timestamp is the
  batch's receive time (the record had no time of its own); any real provider time beats
  it.  Existing rows are marked false (their origin is unknown; the rule stays as it was).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("progress", _json(), nullable=True))
        batch.add_column(sa.Column("stale_details", _json(), nullable=True))
        batch.add_column(sa.Column("body_check", sa.String(20), nullable=True))
    with op.batch_alter_table("finding_sources") as batch:
        batch.add_column(sa.Column("provider_timestamp_is_fallback", sa.Boolean(), nullable=False,
                                   server_default=sa.text("false")))
    op.create_table(
        "batch_rejections",
        sa.Column("batch_id", BigId, sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("provider_id", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("batch_rejections")
    with op.batch_alter_table("finding_sources") as batch:
        batch.drop_column("provider_timestamp_is_fallback")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("body_check")
        batch.drop_column("stale_details")
        batch.drop_column("progress")
