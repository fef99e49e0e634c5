"""The tenant's security policy: which recommendation types count, at which severity, in which
control.

A policy is a set of entries (``policy_settings``), each for one target:

* ``recommendationType`` (a type key): ``enabled``, a ``severity`` override, and the ``control``
  the type counts in (a built-in or custom control: re-mapping);
* ``control`` (a control id): ``enabled`` for every type counting in it;
* ``provider`` (a provider name): ``enabled`` for every type the provider created.

A type's settings resolve once per change, most specific first: its own entry's ``enabled``, else
its control's, else its provider's, else enabled.  The result is kept on the type
(``recommendation_types.enabled``, ``severity_override``, ``control``); ``settle`` brings the
types up to date and re-derives the effective status of their recommendations
(gateway/posture/status.py) in the same transaction, so the score moves with the change.  A
disabled type's findings are still merged and kept: enabling it again restores its
recommendations and the score without a push.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.engine import Connection

from gateway.merge.sql import in_values, update_rows
from gateway.models import PolicySetting, Recommendation, RecommendationType, utcnow
from gateway.posture import status as posture_status
from gateway.score import controls as score_controls

PS, RT, R = PolicySetting.__table__, RecommendationType.__table__, Recommendation.__table__
SCOPES = ("recommendationType", "control", "provider")


def _settings(conn: Connection, tenant_id: int) -> dict[tuple[str, str], object]:
    return {
        (row.scope, row.target): row for row in conn.execute(select(PS).where(PS.c.tenant_id == tenant_id))
    }


def resolve_type(row, settings: dict) -> tuple[bool, str | None, str]:
    """(enabled, severity override, control) of one type under the policy ``settings``."""
    own = settings.get(("recommendationType", row.key))
    auto = score_controls.resolve(
        {
            "key": row.key,
            "title": row.title,
            "kind": row.kind,
            "categories": row.categories,
            "provider": row.provider,
            "control": None,
        }
    )
    control = own.control if own is not None and own.control else auto
    enabled = None if own is None else own.enabled
    if enabled is None:
        by_control = settings.get(("control", control))
        enabled = None if by_control is None else by_control.enabled
    if enabled is None:
        by_provider = settings.get(("provider", row.provider or ""))
        enabled = None if by_provider is None else by_provider.enabled
    return (True if enabled is None else bool(enabled)), (own.severity if own is not None else None), control


def settle(
    conn: Connection,
    tenant_id: int,
    type_ids: Iterable[int] | None = None,
    *,
    cause: str,
    actor: str | None,
    now: datetime | None = None,
    refresh: bool = True,
) -> list[int]:
    """Bring the policy columns of the tenant's types (those of ``type_ids``, all when None) up
    to date; with ``refresh``, re-derive their recommendations and recount the controls they
    left and joined.  Returns the ids of the types that changed."""
    now = now or utcnow()
    settings = _settings(conn, tenant_id)
    query = select(
        RT.c.id,
        RT.c.key,
        RT.c.title,
        RT.c.kind,
        RT.c.categories,
        RT.c.provider,
        RT.c.control,
        RT.c.enabled,
        RT.c.severity_override,
    ).where(RT.c.tenant_id == tenant_id)
    if type_ids is not None:
        ids = sorted(set(type_ids))
        if not ids:
            return []
        query = query.where(in_values(conn, RT.c.id, ids))
    changes, controls = [], set()
    for row in conn.execute(query):
        enabled, override, control = resolve_type(row, settings)
        if (enabled, override, control) != (row.enabled, row.severity_override, row.control):
            changes.append(
                {"id": row.id, "enabled": enabled, "severity_override": override, "control": control}
            )
            if control != row.control:
                controls.update(c for c in (row.control, control) if c)
    if not changes:
        return []
    update_rows(conn, RT, changes)
    changed = [change["id"] for change in changes]
    if refresh:
        posture_status.refresh(
            conn,
            tenant_id,
            in_values(conn, R.c.type_id, changed),
            cause=cause,
            actor=actor,
            now=now,
            controls=controls,
        )
    return changed


def has_settings(conn: Connection, tenant_id: int) -> bool:
    return conn.execute(select(PS.c.id).where(PS.c.tenant_id == tenant_id).limit(1)).first() is not None


__all__ = ["SCOPES", "has_settings", "resolve_type", "settle"]
