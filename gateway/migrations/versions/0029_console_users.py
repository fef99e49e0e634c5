"""console_users, console_user_tenants and console_sessions: people who sign in to the console

Revision ID: 0029
Revises: 0026
Create Date: 2026-12-03

The console (issue 15, gateway/console/) signs people in separately from partner clients: local
users (argon2id password hash, lockout after repeated failures) or users provisioned at OIDC
sign-in; each sees only the tenants granted to them.  Sessions are kept server-side: the cookie
holds a random id and the store only its SHA-256, so a copy of the table signs nobody in.
Two partial indexes (recommendations, alerts) serve the Overview's counts.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0029"
down_revision = "0028"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", sa.String(320), nullable=False, unique=True),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("password_hash", sa.String(200), nullable=True),
        sa.Column("oidc_subject", sa.String(400), nullable=True, unique=True),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("failed_logins", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("time_zone", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "console_user_tenants",
        sa.Column(
            "user_id", sa.Integer, sa.ForeignKey("console_users.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("tenant_id", sa.Integer, sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    )
    op.create_table(
        "console_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column(
            "user_id", sa.Integer, sa.ForeignKey("console_users.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("data", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_console_sessions_expires", "console_sessions", ["expires_at"])
    op.create_index("ix_console_sessions_user", "console_sessions", ["user_id"])
    # The Overview's count of unhealthy recommendations by severity reads this index alone (no heap
    # fetch per recommendation; bench/console_bench.py).  Partial: a lookup by (tenant, resource,
    # type) has no status condition, so it can never take this index instead of its unique key.
    op.create_index(
        "ix_recommendations_tenant_unhealthy_severity",
        "recommendations",
        ["tenant_id", "severity"],
        postgresql_where=sa.text("status = 'Unhealthy'"),
        sqlite_where=sa.text("status = 'Unhealthy'"),
    )
    # and its count of open alerts by severity and status reads only the open ones' entries
    op.create_index(
        "ix_alerts_tenant_open",
        "alerts",
        ["tenant_id", "severity", "status"],
        postgresql_where=sa.text("status NOT IN ('resolved', 'dismissed')"),
        sqlite_where=sa.text("status NOT IN ('resolved', 'dismissed')"),
    )


def downgrade() -> None:
    op.drop_index("ix_alerts_tenant_open", table_name="alerts")
    op.drop_index("ix_recommendations_tenant_unhealthy_severity", table_name="recommendations")
    op.drop_table("console_sessions")
    op.drop_table("console_user_tenants")
    op.drop_table("console_users")
