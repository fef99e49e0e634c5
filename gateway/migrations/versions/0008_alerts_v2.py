"""alerts in Graph's alerts_v2 shape

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05

Additive: the state the Graph security ``alert`` (v2) resource has and the store lacked.

* provider-owned (a v2 push fills them; a legacy push leaves them NULL): ``incident_id``,
  ``service_source``, ``detection_source``, ``mitre_techniques``, ``first_activity_date_time``,
  ``last_activity_date_time``, ``evidence`` (the partner's typed evidence objects, as pushed).
* customer-owned (set by ``PATCH .../alerts_v2/{id}``; a v2 push gives their first value when it
  creates the alert): ``classification``, ``determination``.  ``classification`` of existing rows is
  derived from the legacy ``feedback`` (benignPositive -> informationalExpectedActivity).
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _json():
    return sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")


COLUMNS = (
    ("incident_id", lambda: sa.String(200)),
    ("service_source", lambda: sa.String(100)),
    ("detection_source", lambda: sa.String(100)),
    ("mitre_techniques", _json),
    ("first_activity_date_time", lambda: sa.DateTime(timezone=True)),
    ("last_activity_date_time", lambda: sa.DateTime(timezone=True)),
    ("evidence", _json),
    ("classification", lambda: sa.String(40)),
    ("determination", lambda: sa.String(40)),
)


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind(), nullable=True))
    op.execute(
        "UPDATE alerts SET classification = CASE feedback "
        "WHEN 'truePositive' THEN 'truePositive' WHEN 'falsePositive' THEN 'falsePositive' "
        "WHEN 'benignPositive' THEN 'informationalExpectedActivity' END "
        "WHERE feedback IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
