"""ti_indicators, alert_observables, ti_matches, ti_feeds: threat-intelligence indicators and matching

Revision ID: 0030
Revises: 0026
Create Date: 2026-12-03

Issue 16 part A (gateway/intel/): indicators pushed as Graph tiIndicator JSON or STIX 2.1 bundles
or pulled from TAXII 2.1 feeds, one row per (tenant, source, observable); the observables of
alerts' evidence, so that matching is a join; one match row per (indicator, subject).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0030"
down_revision = "0029"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ti_indicators",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("source", sa.String(100), nullable=False),
        sa.Column("observable_type", sa.String(20), nullable=False),
        sa.Column("value", sa.String(2048), nullable=False),
        sa.Column("external_id", sa.String(300)),
        sa.Column("format", sa.String(30), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("threat_type", sa.String(50)),
        sa.Column("tlp_level", sa.String(20)),
        sa.Column("confidence", sa.Integer()),
        sa.Column("action", sa.String(20)),
        sa.Column("target_product", sa.String(100)),
        sa.Column("pattern", sa.Text()),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("extra", JSON),
        sa.Column("valid_from", TS),
        sa.Column("expires_at", TS),
        sa.Column("provider_timestamp", TS, nullable=False),
        sa.Column("batch_id", BigId),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint(
            "tenant_id", "source", "observable_type", "value", name="uq_ti_indicators_observable"
        ),
    )
    op.create_index("ix_ti_indicators_match", "ti_indicators", ["tenant_id", "observable_type", "value"])
    op.create_index("ix_ti_indicators_tenant_id", "ti_indicators", ["tenant_id", "id"])
    op.create_index("ix_ti_indicators_expires", "ti_indicators", ["expires_at"])
    op.create_table(
        "alert_observables",
        sa.Column("alert_id", BigId, sa.ForeignKey("alerts.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("observable_type", sa.String(20), primary_key=True),
        sa.Column("value", sa.String(2048), primary_key=True),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
    )
    op.create_index(
        "ix_alert_observables_match", "alert_observables", ["tenant_id", "observable_type", "value"]
    )
    op.create_table(
        "ti_matches",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column(
            "indicator_id", BigId, sa.ForeignKey("ti_indicators.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("subject_type", sa.String(20), nullable=False),
        sa.Column("subject_id", BigId, nullable=False),
        sa.Column("observable_type", sa.String(20), nullable=False),
        sa.Column("value", sa.String(2048), nullable=False),
        sa.Column("alert_id", BigId),
        sa.Column("matched_at", TS, nullable=False),
        sa.UniqueConstraint("indicator_id", "subject_type", "subject_id", name="uq_ti_matches_subject"),
    )
    op.create_index("ix_ti_matches_tenant", "ti_matches", ["tenant_id", "id"])
    op.create_table(
        "ti_feeds",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("tenant_id", sa.Integer(), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("collection_url", sa.Text(), nullable=False),
        sa.Column("username", sa.String(300)),
        sa.Column("secret", sa.Text()),
        sa.Column("page_size", sa.Integer(), nullable=False),
        sa.Column("interval_seconds", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("added_after", sa.String(40)),
        sa.Column("last_pulled_at", TS),
        sa.Column("last_counts", JSON),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("tenant_id", "name", name="uq_ti_feeds_name"),
    )


def downgrade() -> None:
    op.drop_table("ti_feeds")
    op.drop_table("ti_matches")
    op.drop_table("alert_observables")
    op.drop_table("ti_indicators")
