"""SQLAlchemy models of the store.  Every tenant-owned row carries ``tenant_id``.

Provider-owned fields (what scanners observe) and customer-owned fields (workflow)
live in separate columns; merges write only the former, the API only the latter.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    JSON as JSONType,
)
from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.types import TypeDecorator

BigId = BigInteger().with_variant(Integer, "sqlite")
JSON = JSONType().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite returns naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value



class Epoch(ColumnElement):
    """1970-01-01T00:00:00Z written into the SQL as a constant, not a parameter, so that an
    expression using it can be served by an index on the same expression (migration 0003)."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(Epoch, "postgresql")
def _epoch_postgresql(element, compiler, **kw) -> str:
    return "'1970-01-01 00:00:00+00'::timestamptz"


@compiles(Epoch)
def _epoch_default(element, compiler, **kw) -> str:
    return "'1970-01-01 00:00:00.000000'"  # SQLAlchemy's text form of datetimes on SQLite


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime()}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class OAuthClient(Base):
    __tablename__ = "oauth_clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(500))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    secret_rotated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ClientTenant(Base):
    __tablename__ = "client_tenants"

    client_pk: Mapped[int] = mapped_column(ForeignKey("oauth_clients.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)


class OAuthToken(Base):
    __tablename__ = "oauth_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    client_pk: Mapped[int] = mapped_column(ForeignKey("oauth_clients.id", ondelete="CASCADE"), index=True)
    scope: Mapped[str] = mapped_column(String(500))
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("tenant_id", "client_pk", "idempotency_key", name="uq_batches_idempotency"),
        Index("ix_batches_status_received", "status", "received_at"),
        Index("ix_batches_tenant_received", "tenant_id", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    client_pk: Mapped[int] = mapped_column(ForeignKey("oauth_clients.id"))
    provider: Mapped[str] = mapped_column(String(100))
    format: Mapped[str] = mapped_column(String(50))
    content_type: Mapped[str] = mapped_column(String(100))
    scan_type: Mapped[str] = mapped_column(String(20), default="incremental")
    body_sha256: Mapped[str] = mapped_column(String(64))
    body_size: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(30), default="accepted")
    counts: Mapped[dict] = mapped_column(JSON, default=dict)
    rejections: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The lease of the worker merging the batch: renewed while the merge lives, so the sweep
    # and a second delivery of the task can tell a live merge from a lost one.
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # migration 0007: live progress of the merge, why records were stale, the body's check
    progress: Mapped[dict | None] = mapped_column(JSON)
    stale_details: Mapped[list | None] = mapped_column(JSON)
    body_check: Mapped[str | None] = mapped_column(String(20))
    # migration 0034a: the settings a parallel merge's staging cut the batch with (a resume uses them)
    merge_plan: Mapped[dict | None] = mapped_column(JSON)


class BatchRejection(Base):
    """One rejected record of a batch (all of them, no cap): written per chunk by the merge."""

    __tablename__ = "batch_rejections"

    batch_id: Mapped[int] = mapped_column(BigId, ForeignKey("batches.id", ondelete="CASCADE"),
                                          primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(Integer)
    position: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    provider_id: Mapped[str | None] = mapped_column(Text)


class BatchBlob(Base):
    """The raw bytes of a batch, in order, in pieces of at most 1 MiB (decompressed)."""

    __tablename__ = "batch_blobs"

    batch_id: Mapped[int] = mapped_column(BigId, ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class BatchChunk(Base):
    """A chunk of a batch that is merged: written in the merge's own transaction."""

    __tablename__ = "batch_chunks"

    batch_id: Mapped[int] = mapped_column(BigId, ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    chunk_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    counts: Mapped[dict] = mapped_column(JSON, default=dict)
    rejections: Mapped[list] = mapped_column(JSON, default=list)
    merged_at: Mapped[datetime] = mapped_column(default=utcnow)


class BatchMergeChunk(Base):
    """One staged chunk of a big batch merged by several workers (gateway/merge/parallel.py).

    Migrations 0028, 0032a.  ``records`` holds the chunk's parsed and checked records (msgpack);
    ``spill`` rows hold pieces of the tail as it is parsed, and the ``tail`` chunk (the last
    ``seq``) is written when staging ends: both are merged by the final step.  A chunk of a
    resource ``bucket`` is merged only after ``after_seq`` (the bucket's previous chunk) is done.
    A chunk's merge writes ``state = done`` and its ``result`` in its own transaction.  The rows
    are deleted when the batch is finished.
    """

    __tablename__ = "batch_merge_chunks"

    batch_id: Mapped[int] = mapped_column(BigId, ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(10), default="chunk")  # chunk | xml | spill | tail
    state: Mapped[str] = mapped_column(String(10), default="pending")  # pending | done
    records: Mapped[bytes] = mapped_column(LargeBinary)
    record_count: Mapped[int] = mapped_column(Integer, default=0)
    received: Mapped[int] = mapped_column(Integer, default=0)  # tail: records parsed in the batch
    rejected: Mapped[int] = mapped_column(Integer, default=0)  # tail: records rejected in the batch
    result: Mapped[bytes | None] = mapped_column(LargeBinary)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    bucket: Mapped[int | None] = mapped_column(Integer)  # the chain a chunk belongs to
    after_seq: Mapped[int | None] = mapped_column(Integer)  # the chunk merged before it in its chain


class Resource(Base):
    __tablename__ = "resources"
    __table_args__ = (Index("ix_resources_tenant_id", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[str | None] = mapped_column(String(50))
    name: Mapped[str | None] = mapped_column(String(500))
    os: Mapped[str | None] = mapped_column(String(200))
    first_seen: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    # Set when later evidence (or an admin) proved this resource to be another one: everything
    # it had moved there, and the id answers with the surviving id (migration 0006).
    merged_into: Mapped[int | None] = mapped_column(BigId)


class ResourceIdentifier(Base):
    """One identifier of a resource, normalized (gateway/merge/resources.py).

    No identifier is unique: two machines may share a short name, a MAC (clones), an FQDN
    (the rules decide, not the schema).  IP addresses carry their network scope after a
    ``%`` (``10.0.0.5%vpc-0abc``) unless they are public or in the tenant's default scope;
    agent ids carry their vendor (``tenable:<uuid>``); ``name`` rows are the short names
    the rules compare (hostname, first label of an FQDN, NetBIOS name, cloud Name tag).
    """

    __tablename__ = "resource_identifiers"
    __table_args__ = (
        Index("ix_resource_identifiers_resource", "resource_id"),
        Index("ix_resource_identifiers_value", "tenant_id", "kind", "value"),
    )

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), primary_key=True)
    value: Mapped[str] = mapped_column(String(500), primary_key=True)
    resource_id: Mapped[int] = mapped_column(BigId, ForeignKey("resources.id", ondelete="CASCADE"), primary_key=True)


class RecommendationType(Base):
    """A recommendation type, per tenant: its texts come from what the tenant's providers pushed
    (or, for the built-in types, from the gateway), and no other tenant ever reads them.

    Findings and recommendations refer to a type by (tenant_id, id), so the database itself
    keeps a row from pointing at another tenant's type (migration 0005).
    """

    __tablename__ = "recommendation_types"
    __table_args__ = (
        UniqueConstraint("tenant_id", "key", name="uq_recommendation_types_tenant_key"),
        UniqueConstraint("tenant_id", "id", name="uq_recommendation_types_tenant_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    key: Mapped[str] = mapped_column(String(300))
    provider: Mapped[str | None] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(30), default="vulnerability")
    title: Mapped[str] = mapped_column(String(500))
    description: Mapped[str | None] = mapped_column(Text)
    remediation: Mapped[str | None] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(20), default="medium")
    categories: Mapped[list] = mapped_column(JSON, default=list)
    control: Mapped[str | None] = mapped_column(String(100))  # gateway/score/controls.py
    # the tenant's security policy as it applies to this type (migration 0010, gateway/posture/policy.py):
    # a disabled type's recommendations are NotApplicable; a severity override replaces the computed one
    enabled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=text("true"))
    severity_override: Mapped[str | None] = mapped_column(String(20))


class SecureScoreControl(Base):
    """A tenant's current score of one control (migration 0009): kept up to date by every merge
    that changes recommendations of the control (gateway/score/upkeep.py)."""

    __tablename__ = "secure_score_controls"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    control: Mapped[str] = mapped_column(String(100), primary_key=True)
    healthy: Mapped[int] = mapped_column(Integer, default=0)
    unhealthy: Mapped[int] = mapped_column(Integer, default=0)
    not_applicable: Mapped[int] = mapped_column(Integer, default=0)
    current: Mapped[float] = mapped_column(Float, default=0.0)
    max: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SecureScore(Base):
    """The tenant's score each time it changed (migration 0009), with its control scores."""

    __tablename__ = "secure_scores"
    __table_args__ = (Index("ix_secure_scores_tenant_id", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    current: Mapped[float] = mapped_column(Float)
    max: Mapped[float] = mapped_column(Float)
    percentage: Mapped[float] = mapped_column(Float)
    control_scores: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PolicySetting(Base):
    """One entry of a tenant's security policy (migration 0010, gateway/posture/policy.py): for a
    recommendation type, a provider or a control, whether it is enabled; for a type, also a
    severity override and the control it counts in."""

    __tablename__ = "policy_settings"
    __table_args__ = (UniqueConstraint("tenant_id", "scope", "target", name="uq_policy_settings_target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    scope: Mapped[str] = mapped_column(String(30))  # recommendationType | provider | control
    target: Mapped[str] = mapped_column(String(300))
    enabled: Mapped[bool | None] = mapped_column(Boolean)  # None: this entry does not say
    severity: Mapped[str | None] = mapped_column(String(20))
    control: Mapped[str | None] = mapped_column(String(100))
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class ControlProfile(Base):
    """A Secure Score control as a tenant sees it (migration 0010): the built-in controls (rows made
    on first use) and the tenant's custom controls, with Graph's control state updates."""

    __tablename__ = "control_profiles"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    control: Mapped[str] = mapped_column(String(100), primary_key=True)
    builtin: Mapped[bool] = mapped_column(Boolean, default=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str | None] = mapped_column(String(50))
    max_score: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(20), default="Default")  # Default | Ignored | ThirdParty | Reviewed
    state_updates: Mapped[list] = mapped_column(JSON, default=list)  # Graph's controlStateUpdates
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Exemption(Base):
    """Accepted or mitigated risk (migration 0010, gateway/posture/exemptions.py): the
    recommendations in its scope are NotApplicable (cause Exempt) until it expires or is deleted."""

    __tablename__ = "exemptions"
    __table_args__ = (Index("ix_exemptions_tenant_expiry", "tenant_id", "expired_at", "expires_on"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    display_name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str] = mapped_column(String(20))  # mitigated | waiver
    type_id: Mapped[int | None] = mapped_column(Integer)  # a recommendation type of the tenant
    resource_id: Mapped[int | None] = mapped_column(BigId)
    resource_filter: Mapped[str | None] = mapped_column(Text)  # OData $filter on resources
    expires_on: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]  # set when it expired: it no longer applies
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class GovernanceRule(Base):
    """A governance rule (migration 0013, gateway/posture/governance.py): new Unhealthy
    recommendations matching its conditions get an owner and a due date, the first enabled rule in
    priority order (lowest number first) that matches."""

    __tablename__ = "governance_rules"
    __table_args__ = (UniqueConstraint("tenant_id", "rule_priority", name="uq_governance_rules_priority"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    display_name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    rule_priority: Mapped[int] = mapped_column(Integer)
    rule_type: Mapped[str] = mapped_column(String(20), default="Integrated")
    source_resource_type: Mapped[str] = mapped_column(String(30), default="Assessments")
    condition_sets: Mapped[list] = mapped_column(JSON, default=list)  # OR of sets, each an AND of conditions
    owner_source_type: Mapped[str] = mapped_column(String(20))  # Manually | ByTag
    owner_source_value: Mapped[str] = mapped_column(String(320))  # the owner, or the tag naming it
    remediation_seconds: Mapped[int] = mapped_column(Integer)  # remediationTimeframe
    is_grace_period: Mapped[bool] = mapped_column(Boolean, default=False)
    email_notification: Mapped[dict] = mapped_column(JSON, default=dict)  # governanceEmailNotification
    is_disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class GovernanceAssignment(Base):
    """An owner and a due date on a recommendation (migration 0013), by hand or by a rule.

    ``latest`` marks the recommendation's current assignment (what the recommendation shows): at
    most one per recommendation, and an open one (``completed_at`` NULL) is always the latest, so
    a recommendation has at most one open assignment.  Completed when the findings are fixed."""

    __tablename__ = "governance_assignments"
    __table_args__ = (
        Index("ux_governance_assignments_latest", "tenant_id", "recommendation_id", unique=True,
              postgresql_where=text("latest"), sqlite_where=text("latest = 1")),
        Index("ix_governance_assignments_tenant_id", "tenant_id", "id"),
        Index("ix_governance_assignments_recommendation", "recommendation_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    recommendation_id: Mapped[int] = mapped_column(BigId, ForeignKey("recommendations.id",
                                                                     ondelete="CASCADE"))
    rule_id: Mapped[int | None] = mapped_column(BigId)  # the rule that made it (None: by hand)
    owner: Mapped[str | None] = mapped_column(String(320))
    due_date: Mapped[datetime]  # remediationDueDate
    is_grace_period: Mapped[bool] = mapped_column(Boolean, default=False)
    remediation_eta: Mapped[datetime | None]
    eta_justification: Mapped[str | None] = mapped_column(Text)
    # ticketNumber, ticketLink, ticketStatus
    additional_data: Mapped[dict] = mapped_column(JSON, default=dict)
    latest: Mapped[bool] = mapped_column(Boolean, default=True)
    completed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class Recommendation(Base):
    __tablename__ = "recommendations"
    __table_args__ = (
        UniqueConstraint("tenant_id", "resource_id", "type_id", name="uq_recommendations_subject"),
        Index("ix_recommendations_tenant_status", "tenant_id", "status", "id"),
        # the console's Overview counts unhealthy recommendations by severity, index-only (migration
        # 0029); partial, so that no lookup by (tenant, resource, type) can take it (tests/test_plans.py)
        Index("ix_recommendations_tenant_unhealthy_severity", "tenant_id", "severity",
              postgresql_where=text("status = 'Unhealthy'"), sqlite_where=text("status = 'Unhealthy'")),
        # the Secure Score recount of a control (gateway/score/upkeep.py), index-only
        Index("ix_recommendations_tenant_type", "tenant_id", "type_id", "resource_id", "status"),
        # partial: only exempt rows, so a lookup by (tenant, resource, type) never ties with it when
        # the table has no statistics (tests/test_plans.py)
        Index("ix_recommendations_tenant_exemption", "tenant_id", "exemption_id",
              postgresql_where=text("exemption_id IS NOT NULL"), sqlite_where=text("exemption_id IS NOT NULL")),
        ForeignKeyConstraint(["tenant_id", "type_id"],
                             ["recommendation_types.tenant_id", "recommendation_types.id"],
                             name="fk_recommendations_tenant_type"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    resource_id: Mapped[int] = mapped_column(BigId, ForeignKey("resources.id"))
    type_id: Mapped[int] = mapped_column(Integer)  # the tenant's type: (tenant_id, type_id) is a foreign key
    # the effective status: NotApplicable (with status_cause) when the type is disabled by the
    # tenant's policy or an exemption covers the recommendation, else actual_status (migration 0010)
    status: Mapped[str] = mapped_column(String(20))  # Healthy | Unhealthy | NotApplicable
    severity: Mapped[str] = mapped_column(String(20))  # the policy's override, else actual_severity
    actual_status: Mapped[str] = mapped_column(String(20))  # what the findings say: Healthy | Unhealthy
    actual_severity: Mapped[str] = mapped_column(String(20))
    status_cause: Mapped[str | None] = mapped_column(String(40))  # DisabledByPolicy | Exempt
    exemption_id: Mapped[int | None] = mapped_column(BigId)
    first_evaluated: Mapped[datetime] = mapped_column(default=utcnow)
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # customer-owned
    status_override: Mapped[str | None] = mapped_column(String(30))
    assigned_to: Mapped[str | None] = mapped_column(String(200))
    comments: Mapped[list] = mapped_column(JSON, default=list)
    tags: Mapped[list] = mapped_column(JSON, default=list)


# Hot tables.
# The high-volume tables written by every merge (findings, finding_sources,
# lifecycle_events) carry ``tenant_id`` without a foreign key to ``tenants``, and a
# source's ``resource_id`` (a copy of its finding's) without one to ``resources``: on
# PostgreSQL each foreign key is a trigger and a row lock per inserted row, about 45%
# of the time of inserting new findings (measured with EXPLAIN ANALYZE, 10,000 rows).
# The merge is the only writer of these rows and takes both values from the batch's
# tenant and the resolved resource; the links that give the rows their meaning
# (finding -> resource, source -> finding, with cascades) keep their foreign keys.


class Finding(Base):
    __tablename__ = "findings"
    __table_args__ = (
        UniqueConstraint("tenant_id", "resource_id", "correlation_key", name="uq_findings_subject"),
        Index("ix_findings_tenant_id", "tenant_id", "id"),
        Index("ix_findings_tenant_severity_state", "tenant_id", "severity", "state", "id"),
        Index("ix_findings_tenant_cve", "tenant_id", "cve"),
        ForeignKeyConstraint(["tenant_id", "recommendation_type_id"],
                             ["recommendation_types.tenant_id", "recommendation_types.id"],
                             name="fk_findings_tenant_type"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)  # no FK: see 'Hot tables' above
    resource_id: Mapped[int] = mapped_column(BigId, ForeignKey("resources.id"))
    recommendation_type_id: Mapped[int] = mapped_column(Integer)  # (tenant_id, it) is a foreign key
    correlation_key: Mapped[str] = mapped_column(String(300))
    cve: Mapped[str | None] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(30))
    # provider-owned (derived from the sources)
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    remediation: Mapped[str | None] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(20))
    cvss_score: Mapped[float | None] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(20))  # new | active | resolved | reopened
    first_seen: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # customer-owned
    status_override: Mapped[str | None] = mapped_column(String(30))
    assigned_to: Mapped[str | None] = mapped_column(String(200))
    comments: Mapped[list] = mapped_column(JSON, default=list)
    tags: Mapped[list] = mapped_column(JSON, default=list)


class FindingSource(Base):
    """One provider record's view of one finding (DESIGN: a source)."""

    __tablename__ = "finding_sources"
    __table_args__ = (
        UniqueConstraint(
            "tenant_id", "provider", "provider_id", "correlation_key", name="uq_finding_sources_record"
        ),
        Index("ix_finding_sources_finding", "finding_id"),
        # any() over a finding's sources by provider, in finding order (migration 0012).  Its
        # predicate holds for every row: only the statements that name it (gateway/api/
        # collections.py ``_sources``) use the index, never a merge's lookup by record key, for
        # which it would look as cheap as the unique key without statistics and read all the
        # provider's sources for each key.
        Index("ix_finding_sources_tenant_provider", "tenant_id", "provider", "finding_id",
              postgresql_where=text("finding_id IS NOT NULL"), sqlite_where=text("finding_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)  # no FK: see 'Hot tables' above
    finding_id: Mapped[int] = mapped_column(BigId, ForeignKey("findings.id", ondelete="CASCADE"))
    resource_id: Mapped[int] = mapped_column(BigId)  # the finding's resource; no FK
    provider: Mapped[str] = mapped_column(String(100))
    provider_id: Mapped[str] = mapped_column(String(512))
    correlation_key: Mapped[str] = mapped_column(String(300))
    vendor_id: Mapped[str | None] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(10))  # open | fixed
    title: Mapped[str] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(20))
    severity_original: Mapped[str | None] = mapped_column(String(50))
    severity_scale: Mapped[str | None] = mapped_column(String(50))
    description: Mapped[str | None] = mapped_column(Text)
    remediation: Mapped[str | None] = mapped_column(Text)
    evidence: Mapped[str | None] = mapped_column(Text)
    cvss_score: Mapped[float | None] = mapped_column(Float)
    cvss_vector: Mapped[str | None] = mapped_column(String(200))
    references: Mapped[list] = mapped_column(JSON, default=list)
    extra: Mapped[dict | None] = mapped_column(JSON)
    first_seen: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    provider_timestamp: Mapped[datetime]
    # migration 0007: the provider timestamp is the batch's receive time (the record had none)
    provider_timestamp_is_fallback: Mapped[bool] = mapped_column(Boolean, default=False,
                                                                 server_default=text("false"))
    content_hash: Mapped[str] = mapped_column(String(32))
    batch_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # provenance (migration 0006): the tool, the format, the scan and the provider's host record
    product: Mapped[str | None] = mapped_column(String(100))
    format: Mapped[str | None] = mapped_column(String(50))
    scan: Mapped[str | None] = mapped_column(String(500))
    host_key: Mapped[str | None] = mapped_column(String(500))


class ResourceSource(Base):
    """A provider's host record merged into a resource (provenance), with what it contributed."""

    __tablename__ = "resource_sources"
    __table_args__ = (
        UniqueConstraint("tenant_id", "provider", "record_key", name="uq_resource_sources_record"),
        Index("ix_resource_sources_resource", "tenant_id", "resource_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    resource_id: Mapped[int] = mapped_column(BigId, ForeignKey("resources.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(100))
    product: Mapped[str | None] = mapped_column(String(100))
    # host_key when the provider gave one, else a digest of the record's identifiers
    record_key: Mapped[str] = mapped_column(String(500))
    host_key: Mapped[str | None] = mapped_column(String(500))
    identifiers: Mapped[dict] = mapped_column(JSON, default=dict)  # kind -> [values] it contributed
    first_seen: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    batch_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ResourceSeparation(Base):
    """Two resources an admin split apart: never merged again automatically."""

    __tablename__ = "resource_separations"

    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_a: Mapped[int] = mapped_column(BigId, primary_key=True)  # the smaller id
    resource_b: Mapped[int] = mapped_column(BigId, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str | None] = mapped_column(String(200))


class Observation(Base):
    """An informational fact a scanner reported about a resource (never a finding)."""

    __tablename__ = "observations"
    __table_args__ = (
        UniqueConstraint("tenant_id", "provider", "provider_id", name="uq_observations_record"),
        Index("ix_observations_resource", "tenant_id", "resource_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    resource_id: Mapped[int] = mapped_column(BigId, ForeignKey("resources.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(100))
    product: Mapped[str | None] = mapped_column(String(100))
    provider_id: Mapped[str] = mapped_column(String(512))
    vendor_id: Mapped[str | None] = mapped_column(String(100))
    category: Mapped[str] = mapped_column(String(30))
    name: Mapped[str] = mapped_column(Text)
    value: Mapped[str | None] = mapped_column(Text)
    port: Mapped[int | None] = mapped_column(Integer)
    protocol: Mapped[str | None] = mapped_column(String(20))
    service: Mapped[str | None] = mapped_column(String(100))
    evidence: Mapped[str | None] = mapped_column(Text)
    scan: Mapped[str | None] = mapped_column(String(500))
    host_key: Mapped[str | None] = mapped_column(String(500))
    first_seen: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    provider_timestamp: Mapped[datetime]
    batch_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class VulnerabilityKB(Base):
    """A provider's knowledge base entry (e.g. a Qualys QID), per tenant."""

    __tablename__ = "vulnerability_kb"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    provider: Mapped[str] = mapped_column(String(100), primary_key=True)
    vendor_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    title: Mapped[str | None] = mapped_column(Text)
    severity: Mapped[str | None] = mapped_column(String(20))
    cves: Mapped[list] = mapped_column(JSON, default=list)
    description: Mapped[str | None] = mapped_column(Text)
    remediation: Mapped[str | None] = mapped_column(Text)
    cvss_score: Mapped[float | None] = mapped_column(Float)
    provider_timestamp: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Alert(Base):
    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("tenant_id", "provider", "provider_id", name="uq_alerts_record"),
        Index("ix_alerts_tenant_id", "tenant_id", "id"),
        Index("ix_alerts_tenant_severity_status", "tenant_id", "severity", "status", "id"),
        # the console's Overview counts open alerts by severity and status, index-only (migration 0029)
        Index("ix_alerts_tenant_open", "tenant_id", "severity", "status",
              postgresql_where=text("status NOT IN ('resolved', 'dismissed')"),
              sqlite_where=text("status NOT IN ('resolved', 'dismissed')")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    provider: Mapped[str] = mapped_column(String(100))
    provider_id: Mapped[str] = mapped_column(String(512))
    resource_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("resources.id"))
    # provider-owned
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(20))
    category: Mapped[str | None] = mapped_column(String(200))
    provider_status: Mapped[str | None] = mapped_column(String(30))
    recommended_actions: Mapped[list] = mapped_column(JSON, default=list)
    extra: Mapped[dict | None] = mapped_column(JSON)
    created_date_time: Mapped[datetime | None]
    last_modified_date_time: Mapped[datetime | None]
    provider_timestamp: Mapped[datetime]
    content_hash: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # provider-owned, filled by a push in Graph's alerts_v2 shape (migration 0008)
    incident_id: Mapped[str | None] = mapped_column(String(200))
    service_source: Mapped[str | None] = mapped_column(String(100))
    detection_source: Mapped[str | None] = mapped_column(String(100))
    mitre_techniques: Mapped[list | None] = mapped_column(JSON)
    first_activity_date_time: Mapped[datetime | None]
    last_activity_date_time: Mapped[datetime | None]
    evidence: Mapped[list | None] = mapped_column(JSON)  # the partner's typed evidence objects
    # customer-owned (a v2 push gives their first value when it creates the alert)
    classification: Mapped[str | None] = mapped_column(String(40))
    determination: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="newAlert")
    assigned_to: Mapped[str | None] = mapped_column(String(200))
    feedback: Mapped[str | None] = mapped_column(String(30))
    comments: Mapped[list] = mapped_column(JSON, default=list)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    closed_date_time: Mapped[datetime | None]
    # the suppression rule that resolved the alert (migration 0011): no foreign key, so the id of a
    # deleted rule stays (its ``suppressed`` event names it too)
    suppressed_by: Mapped[int | None] = mapped_column(BigId)
    # the detection rule that raised the alert (migration 0031; gateway/detection/): None for a partner's
    detection_rule: Mapped[str | None] = mapped_column(String(100))


class AlertSuppressionRule(Base):
    """A tenant's alert suppression rule (migration 0011; gateway/suppression.py): alerts of its
    type matching all its conditions are stored already resolved."""

    __tablename__ = "alert_suppression_rules"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_alert_suppression_rules_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(260))
    alert_type: Mapped[str] = mapped_column(String(500))  # '*': every type
    conditions: Mapped[list] = mapped_column(JSON, default=list)  # [{field, operator, value}], all of them
    reason: Mapped[str] = mapped_column(String(40))
    comment: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), default="Enabled")  # Enabled | Disabled
    expiration_date_utc: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class LifecycleEvent(Base):
    """A stored transition or change, with time and cause: history is never rewritten.

    It is also the outbox of continuous export (gateway/export/): ``seq`` is the event's position
    in commit order, assigned after commit by the sequencer (NULL until then), which destinations'
    cursors and pulling clients follow (migration 0015).
    """

    __tablename__ = "lifecycle_events"
    __table_args__ = (
        Index("ix_lifecycle_events_subject", "tenant_id", "subject_type", "subject_id", "id"),
        # the sequencer's work list, and the tenant's events in commit order (migration 0015)
        Index("ix_lifecycle_events_unsequenced", "id", postgresql_where=text("seq IS NULL"),
              sqlite_where=text("seq IS NULL")),
        Index("ix_lifecycle_events_tenant_seq", "tenant_id", "seq", postgresql_where=text("seq IS NOT NULL"),
              sqlite_where=text("seq IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)  # no FK: see 'Hot tables' above
    subject_type: Mapped[str] = mapped_column(String(20))  # finding | recommendation | alert
    subject_id: Mapped[int] = mapped_column(BigId)
    event: Mapped[str] = mapped_column(String(30))  # new | updated | resolved | reopened | edited ...
    at: Mapped[datetime] = mapped_column(default=utcnow)
    cause: Mapped[str] = mapped_column(String(200))
    batch_id: Mapped[int | None] = mapped_column(BigId)
    actor: Mapped[str | None] = mapped_column(String(200))
    details: Mapped[dict | None] = mapped_column(JSON)
    seq: Mapped[int | None] = mapped_column(BigId)  # migration 0015: the position in commit order


# ITSM ticket sync (issue 12, migration 0016; gateway/itsm/).  A connection's secrets are stored
# encrypted (gateway/itsm/secrets.py), never returned by the API.  A ticket is a link between an
# item (or a group of items: ``itsm_ticket_items``) and one record of the ITSM system; the row is
# committed before the remote record is created, and an item belongs to at most one ticket per
# connection (the unique constraints), so a retry or a second worker never makes a second ticket.


class ItsmConnection(Base):
    __tablename__ = "itsm_connections"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_itsm_connections_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # servicenow | jira
    base_url: Mapped[str] = mapped_column(String(2000))
    auth: Mapped[str] = mapped_column(String(20))  # basic | oauth | bearer
    username: Mapped[str | None] = mapped_column(String(300))  # user, Jira email or OAuth client id
    secret: Mapped[str | None] = mapped_column(Text)  # Fernet token of the password, API token, client secret
    secret_hint: Mapped[str | None] = mapped_column(String(20))
    webhook_secret: Mapped[str | None] = mapped_column(Text)  # Fernet token
    settings: Mapped[dict] = mapped_column(JSON, default=dict)  # table, project, mappings, labels...
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    health: Mapped[str] = mapped_column(String(20), default="unknown")  # unknown | healthy | degraded
    last_error: Mapped[str | None] = mapped_column(Text)
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    last_success_at: Mapped[datetime | None]
    last_failure_at: Mapped[datetime | None]
    retry_at: Mapped[datetime | None]  # delivery waits until then (backoff, Retry-After)
    feed_state: Mapped[dict | None] = mapped_column(JSON)  # gateway/itsm/feed.py: watermark and gaps
    poll_state: Mapped[dict | None] = mapped_column(JSON)  # inbound polling watermark
    lease_owner: Mapped[str | None] = mapped_column(String(100))  # the worker delivering its queue
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_by: Mapped[str | None] = mapped_column(String(200))


class ItsmRule(Base):
    __tablename__ = "itsm_rules"
    __table_args__ = (Index("ix_itsm_rules_connection", "connection_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    connection_id: Mapped[int] = mapped_column(BigId, ForeignKey("itsm_connections.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    collection: Mapped[str] = mapped_column(String(30))  # findings | recommendations | alerts
    filter: Mapped[str | None] = mapped_column(Text)  # an OData $filter on the collection
    grouping: Mapped[str] = mapped_column(String(20))  # item | resource
    mode: Mapped[str] = mapped_column(String(20))  # automatic | manual
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_by: Mapped[str | None] = mapped_column(String(200))


class ItsmTicket(Base):
    __tablename__ = "itsm_tickets"
    __table_args__ = (
        UniqueConstraint("connection_id", "subject_type", "subject_id", name="uq_itsm_tickets_subject"),
        Index("ix_itsm_tickets_tenant_id", "tenant_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    connection_id: Mapped[int] = mapped_column(BigId, ForeignKey("itsm_connections.id", ondelete="CASCADE"))
    rule_id: Mapped[int | None] = mapped_column(BigId)  # the rule that made it; NULL: by hand
    # what the ticket is for: an item (finding, recommendation, alert) or a group (resource)
    subject_type: Mapped[str] = mapped_column(String(20))
    subject_id: Mapped[int] = mapped_column(BigId)
    collection: Mapped[str] = mapped_column(String(30))  # the collection of its items
    sync_state: Mapped[str] = mapped_column(String(20), default="pending")  # pending | synced | parked
    remote_id: Mapped[str | None] = mapped_column(String(100))  # sys_id | Jira issue id
    remote_key: Mapped[str | None] = mapped_column(String(100))  # INC0010001 | SEC-12
    remote_url: Mapped[str | None] = mapped_column(String(2000))
    remote_state: Mapped[str | None] = mapped_column(String(100))  # as the ITSM names it
    inbound: Mapped[dict | None] = mapped_column(JSON)  # gateway/itsm/inbound.py: what the ticket last said
    desired_state: Mapped[str] = mapped_column(String(20), default="open")  # open | resolved
    severity: Mapped[str | None] = mapped_column(String(20))  # the severity the ticket was last given
    create_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_synced_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))


class ItsmTicketItem(Base):
    """An item a ticket covers (one, or a resource's findings): at most one ticket per connection."""

    __tablename__ = "itsm_ticket_items"
    __table_args__ = (
        UniqueConstraint("connection_id", "subject_type", "subject_id", name="uq_itsm_ticket_items_subject"),
        Index("ix_itsm_ticket_items_subject", "tenant_id", "subject_type", "subject_id"),
    )

    ticket_id: Mapped[int] = mapped_column(BigId, ForeignKey("itsm_tickets.id", ondelete="CASCADE"),
                                           primary_key=True)
    subject_type: Mapped[str] = mapped_column(String(20), primary_key=True)
    subject_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    connection_id: Mapped[int] = mapped_column(BigId)
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


class ItsmInboundSeen(Base):
    """A remote comment or webhook delivery already taken in (gateway/itsm/inbound.py)."""

    __tablename__ = "itsm_inbound_seen"

    connection_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("itsm_connections.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class ItsmOp(Base):
    """One pending change of a remote record, delivered in id order per connection."""

    __tablename__ = "itsm_ops"
    __table_args__ = (
        UniqueConstraint("ticket_id", "dedupe_key", name="uq_itsm_ops_dedupe"),
        Index("ix_itsm_ops_queue", "connection_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    connection_id: Mapped[int] = mapped_column(BigId, ForeignKey("itsm_connections.id", ondelete="CASCADE"))
    ticket_id: Mapped[int] = mapped_column(BigId, ForeignKey("itsm_tickets.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))  # create | resolve | reopen | severity | comment
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    dedupe_key: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending | done | parked
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    done_at: Mapped[datetime | None]


class EventSequencer(Base):
    """The last position the sequencer gave an event (one row; gateway/export/events.py)."""

    __tablename__ = "event_sequencer"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)


class ExportDestination(Base):
    """Where a tenant's events go (migration 0015, gateway/export/): a kind (``webhook``, ...), its
    URL and options, a filter, a secret (encrypted), the delivery cursor and the delivery state."""

    __tablename__ = "export_destinations"
    __table_args__ = (Index("ix_export_destinations_tenant", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    display_name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(30))
    url: Mapped[str] = mapped_column(Text)
    event_types: Mapped[list] = mapped_column(JSON, default=list)
    filter: Mapped[str | None] = mapped_column(Text)
    batch_size: Mapped[int] = mapped_column(Integer, default=1)
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # kind-specific, never secret
    state: Mapped[str] = mapped_column(String(20), default="active")  # active | failing | paused
    secret: Mapped[str | None] = mapped_column(Text)  # encrypted (gateway/export/secrets.py)
    secret_hint: Mapped[str | None] = mapped_column(String(40))
    previous_secret: Mapped[str | None] = mapped_column(Text)  # encrypted; signs too until it expires
    previous_secret_expires_at: Mapped[datetime | None]
    secret_rotated_at: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(Integer, default=1)  # the ETag
    # delivery: the last position delivered, the batch being delivered (retried as it is), the state
    cursor_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    pending: Mapped[dict | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failing_since: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_delivered_at: Mapped[datetime | None]
    delivered_events: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))
    # migration 0027: the private key of option ``clientCertificate`` (mTLS), encrypted (gateway/vault.py)
    client_key: Mapped[str | None] = mapped_column(Text)


class ExportDelivery(Base):
    """One delivery attempt to a destination (the recent ones are kept: EXPORT_DELIVERY_LOG_SIZE)."""

    __tablename__ = "export_deliveries"
    __table_args__ = (Index("ix_export_deliveries_destination", "destination_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    destination_id: Mapped[int] = mapped_column(ForeignKey("export_destinations.id", ondelete="CASCADE"))
    tenant_id: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    message_id: Mapped[str] = mapped_column(String(100))
    outcome: Mapped[str] = mapped_column(String(20))  # delivered | failed | test
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    event_count: Mapped[int] = mapped_column(Integer, default=0)
    first_event_id: Mapped[int | None] = mapped_column(BigId)
    last_event_id: Mapped[int | None] = mapped_column(BigId)
    first_seq: Mapped[int | None] = mapped_column(BigInteger)
    last_seq: Mapped[int | None] = mapped_column(BigInteger)
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


# Export snapshots and workflow automation (issue 13 items 3-4, migration 0019).


class ExportSnapshot(Base):
    """A job delivering the current state of a destination's filtered collections as
    ``<subject>.snapshot`` events (gateway/export/snapshot.py), walked by id in keyset slices."""

    __tablename__ = "export_snapshots"
    __table_args__ = (Index("ix_export_snapshots_destination", "destination_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    destination_id: Mapped[int] = mapped_column(ForeignKey("export_destinations.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(20), default="queued")  # queued | running | succeeded
    subjects: Mapped[list] = mapped_column(JSON, default=list)  # subject types, walked in this order
    subject_index: Mapped[int] = mapped_column(Integer, default=0)
    after_id: Mapped[int] = mapped_column(BigId, default=0)  # the last id delivered of the current subject
    delivered: Mapped[int] = mapped_column(BigInteger, default=0)
    total: Mapped[int | None] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    next_attempt_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AutomationRule(Base):
    """A tenant's workflow automation rule (gateway/automation/): a trigger (event types and a
    ``$filter`` on the subject), ordered actions, a cursor over the outbox, the last error."""

    __tablename__ = "automation_rules"
    __table_args__ = (Index("ix_automation_rules_tenant", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    display_name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    event_types: Mapped[list] = mapped_column(JSON, default=list)
    filter: Mapped[str | None] = mapped_column(Text)
    actions: Mapped[list] = mapped_column(JSON, default=list)
    secret: Mapped[str | None] = mapped_column(Text)  # encrypted (gateway/export/secrets.py): signs webhooks
    secret_hint: Mapped[str | None] = mapped_column(String(40))
    version: Mapped[int] = mapped_column(Integer, default=1)  # the ETag
    cursor_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None]
    last_run_at: Mapped[datetime | None]
    fired_events: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))
    # migration 0027: active | failing (failing for AUTOMATION_FAILING_AFTER_SECONDS, lastError shown)
    state: Mapped[str] = mapped_column(String(20), default="active", server_default="active")
    failing_since: Mapped[datetime | None]


class AutomationActionDone(Base):
    """One action of a rule done for one event: each (rule, event, action) runs once."""

    __tablename__ = "automation_actions_done"

    rule_id: Mapped[int] = mapped_column(ForeignKey("automation_rules.id", ondelete="CASCADE"), primary_key=True)
    event_id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    action_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))  # done | skipped
    detail: Mapped[str | None] = mapped_column(Text)
    done_at: Mapped[datetime] = mapped_column(default=utcnow)
# -- multipart uploads (migration 0023; gateway/uploads.py) ---------------------------------------


class Upload(Base):
    """A multipart upload: numbered parts PUT in any order, completed into one batch, else expired."""

    __tablename__ = "uploads"
    __table_args__ = (
        UniqueConstraint("tenant_id", "client_pk", "idempotency_key", name="uq_uploads_idempotency"),
        Index("ix_uploads_expires", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random: not guessable, not counted
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    client_pk: Mapped[int] = mapped_column(ForeignKey("oauth_clients.id"))
    provider: Mapped[str] = mapped_column(String(100))
    format: Mapped[str] = mapped_column(String(50))
    content_type: Mapped[str] = mapped_column(String(100))
    content_encoding: Mapped[str] = mapped_column(String(20), default="")
    scan_type: Mapped[str] = mapped_column(String(20), default="unspecified")
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="open")  # open | completing | completed
    batch_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]


class UploadPart(Base):
    """One received part: its size and checksums, and which attempt's pieces hold its bytes."""

    __tablename__ = "upload_parts"

    upload_id: Mapped[str] = mapped_column(String(32), ForeignKey("uploads.id", ondelete="CASCADE"),
                                           primary_key=True)
    part_number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    attempt: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    md5: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class UploadPiece(Base):
    """A part's bytes in 1 MiB pieces, per attempt (a retried part writes beside the one it replaces)."""

    __tablename__ = "upload_pieces"

    upload_id: Mapped[str] = mapped_column(String(32), ForeignKey("uploads.id", ondelete="CASCADE"),
                                           primary_key=True)
    part_number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    attempt: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)
# -- issue 17: findings per provider, counted as sources change (migration 0026) ----------------


class ProviderFinding(Base):
    """A finding that a provider reports, with how many of its sources are that provider's.

    Kept by triggers on finding_sources (PostgreSQL; gateway/provider_counts.py); a row may stay
    at zero sources."""

    __tablename__ = "provider_findings"

    tenant_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider: Mapped[str] = mapped_column(String(100), primary_key=True)
    finding_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    sources: Mapped[int] = mapped_column(Integer)


class ProviderFindingCount(Base):
    """A change of the number of a tenant's findings that a provider reports: the count is the sum."""

    __tablename__ = "provider_finding_counts"
    __table_args__ = (Index("ix_provider_finding_counts_provider", "tenant_id", "provider"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(100))
    findings: Mapped[int] = mapped_column(BigInteger)


# -- issue 15: the console's people, their tenants and their sessions (migration 0029) -------------
# People sign in to the console (gateway/console/), separately from partner clients: local users
# with an argon2id password hash, or users provisioned by OIDC sign-in (``oidc_subject``).


class ConsoleUser(Base):
    """A person who signs in to the console; ``role`` is reader, analyst or admin."""

    __tablename__ = "console_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)  # None: OIDC only
    oidc_subject: Mapped[str | None] = mapped_column(String(400), unique=True, nullable=True)  # issuer|sub
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    time_zone: Mapped[str | None] = mapped_column(String(64), nullable=True)  # None: the browser's
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ConsoleUserTenant(Base):
    """A tenant granted to a console user: the user sees only these."""

    __tablename__ = "console_user_tenants"

    user_id: Mapped[int] = mapped_column(ForeignKey("console_users.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)


class ConsoleSession(Base):
    """A server-side console session; the cookie holds a random id, the store only its SHA-256."""

    __tablename__ = "console_sessions"
    __table_args__ = (Index("ix_console_sessions_expires", "expires_at"),
                      Index("ix_console_sessions_user", "user_id"))

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("console_users.id", ondelete="CASCADE"),
                                                nullable=True)
    data: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


# -- issue 16 part A: threat-intelligence indicators and their matches (migration 0030; gateway/intel/) --


class Indicator(Base):
    """One threat-intelligence observable of a source (a partner's push or a TAXII feed): unique per
    (tenant, source, observable type, value); stops matching at ``expires_at`` and is then pruned."""

    __tablename__ = "ti_indicators"
    __table_args__ = (
        UniqueConstraint("tenant_id", "source", "observable_type", "value", name="uq_ti_indicators_observable"),
        Index("ix_ti_indicators_match", "tenant_id", "observable_type", "value"),
        Index("ix_ti_indicators_tenant_id", "tenant_id", "id"),
        Index("ix_ti_indicators_expires", "expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    source: Mapped[str] = mapped_column(String(100))  # the pushing provider, or "taxii:<feed name>"
    observable_type: Mapped[str] = mapped_column(String(20))  # ipv4 ipv6 domain url email md5 sha1 sha256 ...
    value: Mapped[str] = mapped_column(String(2048))  # normalized (gateway/intel/observables.py)
    external_id: Mapped[str | None] = mapped_column(String(300))  # the Graph id or the STIX id
    format: Mapped[str] = mapped_column(String(30))  # graph_tiindicator | stix21
    description: Mapped[str | None] = mapped_column(Text)
    threat_type: Mapped[str | None] = mapped_column(String(50))
    tlp_level: Mapped[str | None] = mapped_column(String(20))
    confidence: Mapped[int | None] = mapped_column(Integer)
    action: Mapped[str | None] = mapped_column(String(20))
    target_product: Mapped[str | None] = mapped_column(String(100))
    pattern: Mapped[str | None] = mapped_column(Text)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    extra: Mapped[dict | None] = mapped_column(JSON)
    valid_from: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    provider_timestamp: Mapped[datetime]
    batch_id: Mapped[int | None] = mapped_column(BigId)  # the batch that last wrote it (None: a feed pull)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AlertObservable(Base):
    """An observable (IP, domain, URL, hash) named in an alert's evidence, kept by the alert merge so
    that indicators are matched against alerts with a join (gateway/intel/observables.py)."""

    __tablename__ = "alert_observables"
    __table_args__ = (Index("ix_alert_observables_match", "tenant_id", "observable_type", "value"),)

    alert_id: Mapped[int] = mapped_column(BigId, ForeignKey("alerts.id", ondelete="CASCADE"), primary_key=True)
    observable_type: Mapped[str] = mapped_column(String(20), primary_key=True)
    value: Mapped[str] = mapped_column(String(2048), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)


class IndicatorMatch(Base):
    """An indicator seen on a subject (an alert, a resource, an event): once per (indicator, subject);
    ``alert_id`` is the alert it raised or enriched."""

    __tablename__ = "ti_matches"
    __table_args__ = (
        UniqueConstraint("indicator_id", "subject_type", "subject_id", name="uq_ti_matches_subject"),
        Index("ix_ti_matches_tenant", "tenant_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    indicator_id: Mapped[int] = mapped_column(BigId, ForeignKey("ti_indicators.id", ondelete="CASCADE"))
    subject_type: Mapped[str] = mapped_column(String(20))  # alert | resource | event
    subject_id: Mapped[int] = mapped_column(BigId)
    observable_type: Mapped[str] = mapped_column(String(20))
    value: Mapped[str] = mapped_column(String(2048))
    alert_id: Mapped[int | None] = mapped_column(BigId)
    matched_at: Mapped[datetime] = mapped_column(default=utcnow)


class IndicatorFeed(Base):
    """A TAXII 2.1 collection a tenant pulls indicators from, with its watermark (gateway/intel/taxii.py)."""

    __tablename__ = "ti_feeds"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_ti_feeds_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(100))
    collection_url: Mapped[str] = mapped_column(Text)  # .../collections/<id>/
    username: Mapped[str | None] = mapped_column(String(300))
    secret: Mapped[str | None] = mapped_column(Text)  # the password, encrypted (gateway/export/secrets.py)
    page_size: Mapped[int] = mapped_column(Integer, default=500)
    interval_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    added_after: Mapped[str | None] = mapped_column(String(40))  # the watermark: the last date_added taken
    last_pulled_at: Mapped[datetime | None]
    last_counts: Mapped[dict | None] = mapped_column(JSON)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# -- issue 16: security events, the KEV catalogue, detection rules (migration 0031; gateway/detection/) ----


class SecurityEvent(Base):
    """One host security event (gateway/detection/events.py).  A hot table: no foreign keys.

    On PostgreSQL it is partitioned by range of ``occurred_at``, one partition a day
    (``security_events_pYYYYMMDD``), created ahead and dropped whole after the retention period;
    the primary key holds the partition key, as PostgreSQL requires.  On SQLite ``id`` alone is
    the (rowid) key of a plain table.
    """

    __tablename__ = "security_events"
    __table_args__ = (
        Index("ix_security_events_tenant_time", "tenant_id", "occurred_at", "id"),
        Index("ix_security_events_tenant_id", "tenant_id", "id"),
        Index("ix_security_events_tenant_kind", "tenant_id", "kind", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    occurred_at: Mapped[datetime] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    batch_id: Mapped[int | None] = mapped_column(BigId)
    provider: Mapped[str] = mapped_column(String(100))
    resource_id: Mapped[int | None] = mapped_column(BigId)
    kind: Mapped[str] = mapped_column(String(30))
    event_id: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str | None] = mapped_column(String(20))
    user_name: Mapped[str | None] = mapped_column(String(300))
    target: Mapped[str | None] = mapped_column(String(300))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    remote_ip: Mapped[str | None] = mapped_column(String(64))
    domain: Mapped[str | None] = mapped_column(String(500))
    process: Mapped[str | None] = mapped_column(String(1000))
    hash: Mapped[str | None] = mapped_column(String(128))
    raw: Mapped[dict | None] = mapped_column(JSON)
    ingested_at: Mapped[datetime] = mapped_column(default=utcnow)


class KnownExploitedVulnerability(Base):
    """One entry of the known-exploited-vulnerabilities catalogue (CISA KEV JSON): global, not per tenant."""

    __tablename__ = "known_exploited_vulnerabilities"

    cve_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    vendor_project: Mapped[str | None] = mapped_column(String(300))
    product: Mapped[str | None] = mapped_column(String(300))
    vulnerability_name: Mapped[str | None] = mapped_column(Text)
    date_added: Mapped[str | None] = mapped_column(String(10))
    due_date: Mapped[str | None] = mapped_column(String(10))
    known_ransomware_use: Mapped[str | None] = mapped_column(String(20))
    catalog_version: Mapped[str | None] = mapped_column(String(40))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class DetectionRule(Base):
    """A tenant's word on a detection rule: a built-in's enabled/threshold override, or a custom rule
    (``definition`` set)."""

    __tablename__ = "detection_rules"
    __table_args__ = (UniqueConstraint("tenant_id", "rule_id", name="uq_detection_rules_rule"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"))
    rule_id: Mapped[str] = mapped_column(String(100))
    definition: Mapped[dict | None] = mapped_column(JSON)
    enabled: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class DetectionWatermark(Base):
    """Where a rule's last evaluation of a tenant's rows stopped: the highest row id it read."""

    __tablename__ = "detection_watermarks"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    rule_id: Mapped[str] = mapped_column(String(100), primary_key=True)
    watermark: Mapped[int] = mapped_column(BigId, default=0)
    last_run_at: Mapped[datetime | None]


class DetectionLink(Base):
    """A row that made a detection rule raise an alert (an event, a finding, a resource, an alert)."""

    __tablename__ = "detection_links"
    __table_args__ = (Index("ix_detection_links_tenant_alert", "tenant_id", "alert_id"),)

    alert_id: Mapped[int] = mapped_column(BigId, ForeignKey("alerts.id", ondelete="CASCADE"),
                                          primary_key=True)
    row_kind: Mapped[str] = mapped_column(String(20), primary_key=True)  # event | finding | resource | alert
    row_id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    row_time: Mapped[datetime | None]


# -- issue 15: the console's "findings by severity over time" chart --------------------------------


class FindingSeverityDay(Base):
    """A tenant's open findings of one severity on one day (UTC), kept by the beat's snapshot
    (gateway/console/history.py): the newest snapshot of the day wins, earlier days stay."""

    __tablename__ = "finding_severity_days"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    severity: Mapped[str] = mapped_column(String(20), primary_key=True)
    open_findings: Mapped[int] = mapped_column(Integer)
