"""Secure Score: control of every recommendation type, per-control rows, score history

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-12

* ``recommendation_types.control`` of the existing types is resolved by the rules of
  ``gateway/score/controls.py`` (as they are at this revision): one UPDATE per control.
* ``secure_score_controls``: a tenant's current score of each control, brought up to date by
  every merge that changes recommendations of the control.  Existing tenants get their rows at
  their next merge or with ``gateway score show --tenant T --recount``.
* ``secure_scores``: the tenant's score each time it changed, with the control scores.
* ``ix_recommendations_tenant_type``: serves the recount of a control.
"""

from collections import defaultdict

import sqlalchemy as sa
from alembic import op

from gateway.score.controls import resolve

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


types_t = sa.table("recommendation_types", sa.column("id", sa.Integer), sa.column("key", sa.String),
                   sa.column("title", sa.String), sa.column("kind", sa.String),
                   sa.column("provider", sa.String), sa.column("categories", sa.JSON),
                   sa.column("control", sa.String))


def upgrade() -> None:
    op.create_table(
        "secure_score_controls",
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), primary_key=True),
        sa.Column("control", sa.String(100), primary_key=True),
        sa.Column("healthy", sa.Integer, nullable=False),
        sa.Column("unhealthy", sa.Integer, nullable=False),
        sa.Column("not_applicable", sa.Integer, nullable=False),
        sa.Column("current", sa.Float, nullable=False),
        sa.Column("max", sa.Float, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "secure_scores",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("current", sa.Float, nullable=False),
        sa.Column("max", sa.Float, nullable=False),
        sa.Column("percentage", sa.Float, nullable=False),
        sa.Column("control_scores", _json(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_secure_scores_tenant_id", "secure_scores", ["tenant_id", "id"])
    op.create_index("ix_recommendations_tenant_type", "recommendations",
                    ["tenant_id", "type_id", "resource_id", "status"])
    bind = op.get_bind()
    by_control = defaultdict(list)
    for row in bind.execute(sa.select(types_t).where(types_t.c.control.is_(None))):
        by_control[resolve(row._asdict())].append(row.id)
    for control, ids in sorted(by_control.items()):
        for start in range(0, len(ids), 5000):
            bind.execute(sa.update(types_t).where(types_t.c.id.in_(ids[start : start + 5000]))
                         .values(control=control))


def downgrade() -> None:
    op.drop_index("ix_recommendations_tenant_type", table_name="recommendations")
    op.drop_index("ix_secure_scores_tenant_id", table_name="secure_scores")
    op.drop_table("secure_scores")
    op.drop_table("secure_score_controls")
