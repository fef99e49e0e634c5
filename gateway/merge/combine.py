"""Merging two resources proven to be one machine, and splitting one an admin says is two.

A merge moves everything the resource merged away (the *loser*) holds to the surviving one,
in the caller's transaction:

* identifiers, host records (``resource_sources``), observations and alerts move as they are;
* a finding of the loser whose correlation key the survivor has no finding of moves with its
  sources; one whose key the survivor has becomes one finding with it: its sources join the
  survivor's finding, its history (``lifecycle_events``) is re-pointed to it, its comments
  and tags are appended and its assignee kept where the survivor's finding has none, and it
  is deleted (a ``merged`` event on the surviving finding names it); the surviving finding's
  state is recomputed from all its sources (DESIGN rule 4);
* recommendations likewise: one of a type the survivor lacks moves, one of a type it has is
  folded into the survivor's (history and customer fields as for findings);
* the loser's row stays with ``merged_into`` (and every resource merged into it before
  follows), so that its id answers with the surviving id; a ``merged`` event on the
  survivor and a ``mergedInto`` event on the loser record it.

A split takes host records (``resource_sources``) of a resource and makes them a new
resource: the identifiers only they contributed, their findings' sources (matched by
provider and host record key) and observations move with them; the two resources are
recorded as separate (``resource_separations``), which the resolver respects.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import func, or_, select, text, update

from gateway.merge.sql import in_values, insert_rows
from gateway.models import (
    Alert,
    Exemption,
    Finding,
    FindingSource,
    LifecycleEvent,
    Observation,
    Recommendation,
    Resource,
    ResourceIdentifier,
    ResourceSeparation,
    ResourceSource,
    utcnow,
)

resources_t = Resource.__table__
findings_t = Finding.__table__
sources_t = FindingSource.__table__
events_t = LifecycleEvent.__table__
recs_t = Recommendation.__table__
exemptions_t = Exemption.__table__
idents_t = ResourceIdentifier.__table__
rsources_t = ResourceSource.__table__
observations_t = Observation.__table__
alerts_t = Alert.__table__
separations_t = ResourceSeparation.__table__


def merge_resources(merger, loser: int, survivor: int, evidence: str, actor: str | None = None) -> None:
    """Move everything of resource ``loser`` to ``survivor`` (see the module docstring)."""
    conn, tenant, now = merger.conn, merger.tenant_id, utcnow()
    if loser == survivor:
        return
    cause = merger.cause
    # identifiers: the survivor's set grows by the loser's
    conn.execute(
        text(
            "INSERT INTO resource_identifiers (tenant_id, kind, value, resource_id) "
            "SELECT tenant_id, kind, value, :survivor FROM resource_identifiers l "
            "WHERE l.tenant_id = :tenant AND l.resource_id = :loser AND NOT EXISTS ("
            " SELECT 1 FROM resource_identifiers s WHERE s.tenant_id = l.tenant_id AND s.kind = l.kind "
            " AND s.value = l.value AND s.resource_id = :survivor)"
        ),
        {"tenant": tenant, "loser": loser, "survivor": survivor},
    )
    conn.execute(idents_t.delete().where(idents_t.c.tenant_id == tenant, idents_t.c.resource_id == loser))
    for table in (rsources_t, observations_t, alerts_t):
        conn.execute(
            update(table)
            .where(table.c.tenant_id == tenant, table.c.resource_id == loser)
            .values(resource_id=survivor)
        )

    # findings
    theirs = {
        key: fid
        for fid, key in conn.execute(
            select(findings_t.c.id, findings_t.c.correlation_key).where(
                findings_t.c.tenant_id == tenant, findings_t.c.resource_id == survivor
            )
        )
    }
    mine = conn.execute(
        select(findings_t.c.id, findings_t.c.correlation_key, findings_t.c.recommendation_type_id)
        .where(findings_t.c.tenant_id == tenant, findings_t.c.resource_id == loser)
        .order_by(findings_t.c.id)
    ).all()
    moving = [fid for fid, key, _ in mine if key not in theirs]
    joining = [(fid, theirs[key]) for fid, key, _ in mine if key in theirs]
    if moving:
        conn.execute(
            update(findings_t)
            .where(findings_t.c.tenant_id == tenant, in_values(conn, findings_t.c.id, moving))
            .values(resource_id=survivor, updated_at=now)
        )
        conn.execute(
            update(sources_t)
            .where(sources_t.c.tenant_id == tenant, in_values(conn, sources_t.c.finding_id, moving))
            .values(resource_id=survivor)
        )
    refresh: set[int] = set()
    events = []
    for gone, kept in joining:
        conn.execute(
            update(sources_t)
            .where(sources_t.c.tenant_id == tenant, sources_t.c.finding_id == gone)
            .values(finding_id=kept, resource_id=survivor)
        )
        fold_into(conn, findings_t, "finding", tenant, gone, kept)
        events.append(
            {
                "tenant_id": tenant,
                "subject_type": "finding",
                "subject_id": kept,
                "event": "merged",
                "at": now,
                "cause": cause,
                "batch_id": merger.batch_id,
                "actor": actor or merger.provider,
                "details": {"mergedFinding": gone, "fromResource": loser},
            }
        )
        refresh.add(kept)

    # exemptions scoped to the loser now name the survivor (the recommendations move below)
    conn.execute(
        update(exemptions_t)
        .where(exemptions_t.c.tenant_id == tenant, exemptions_t.c.resource_id == loser)
        .values(resource_id=survivor)
    )
    # recommendations
    rec_theirs = {
        type_id: rid
        for rid, type_id in conn.execute(
            select(recs_t.c.id, recs_t.c.type_id).where(
                recs_t.c.tenant_id == tenant, recs_t.c.resource_id == survivor
            )
        )
    }
    for rid, type_id in conn.execute(
        select(recs_t.c.id, recs_t.c.type_id)
        .where(recs_t.c.tenant_id == tenant, recs_t.c.resource_id == loser)
        .order_by(recs_t.c.id)
    ).all():
        if type_id in rec_theirs:
            kept = rec_theirs[type_id]
            fold_into(conn, recs_t, "recommendation", tenant, rid, kept)
        else:
            conn.execute(
                update(recs_t)
                .where(recs_t.c.tenant_id == tenant, recs_t.c.id == rid)
                .values(resource_id=survivor)
            )
    _cover_survivor(merger, survivor, now)
    for (type_id,) in conn.execute(
        select(findings_t.c.recommendation_type_id)
        .where(findings_t.c.tenant_id == tenant, findings_t.c.resource_id == survivor)
        .distinct()
    ):
        merger.touched_recommendations.add((survivor, type_id))
    if refresh:
        merger._refresh_findings(refresh, {}, set(), now, cause=f"resources merged ({cause})")

    # the resource rows
    loser_row = conn.execute(
        select(resources_t).where(resources_t.c.tenant_id == tenant, resources_t.c.id == loser)
    ).one()
    survivor_row = conn.execute(
        select(resources_t).where(resources_t.c.tenant_id == tenant, resources_t.c.id == survivor)
    ).one()
    values = {"updated_at": now}
    if loser_row.first_seen and (
        survivor_row.first_seen is None or loser_row.first_seen < survivor_row.first_seen
    ):
        values["first_seen"] = loser_row.first_seen
    if loser_row.last_seen and (
        survivor_row.last_seen is None or loser_row.last_seen > survivor_row.last_seen
    ):
        values["last_seen"] = loser_row.last_seen
    if survivor_row.os is None and loser_row.os:
        values["os"] = loser_row.os
    if not survivor_row.kind and loser_row.kind:
        values["kind"] = loser_row.kind
    if loser_row.tags:
        values["tags"] = list(survivor_row.tags or []) + [
            t for t in loser_row.tags if t not in (survivor_row.tags or [])
        ]
    conn.execute(
        update(resources_t)
        .where(resources_t.c.tenant_id == tenant, resources_t.c.id == survivor)
        .values(**values)
    )
    conn.execute(
        update(resources_t)
        .where(
            resources_t.c.tenant_id == tenant,
            (resources_t.c.id == loser) | (resources_t.c.merged_into == loser),
        )
        .values(merged_into=survivor, updated_at=now)
    )
    # separations of the loser now hold for the survivor
    for a, b in conn.execute(
        select(separations_t.c.resource_a, separations_t.c.resource_b).where(
            separations_t.c.tenant_id == tenant,
            (separations_t.c.resource_a == loser) | (separations_t.c.resource_b == loser),
        )
    ).all():
        other = b if a == loser else a
        conn.execute(
            separations_t.delete().where(
                separations_t.c.tenant_id == tenant,
                separations_t.c.resource_a == a,
                separations_t.c.resource_b == b,
            )
        )
        if other != survivor:
            insert_rows(
                conn,
                separations_t,
                [
                    {
                        "tenant_id": tenant,
                        "resource_a": min(other, survivor),
                        "resource_b": max(other, survivor),
                        "created_at": now,
                        "actor": None,
                    }
                ],
                conflict=("tenant_id", "resource_a", "resource_b"),
            )
    events.append(
        {
            "tenant_id": tenant,
            "subject_type": "resource",
            "subject_id": survivor,
            "event": "merged",
            "at": now,
            "cause": cause,
            "batch_id": merger.batch_id,
            "actor": actor or merger.provider,
            "details": {"mergedFrom": loser, "evidence": evidence},
        }
    )
    events.append(
        {
            "tenant_id": tenant,
            "subject_type": "resource",
            "subject_id": loser,
            "event": "mergedInto",
            "at": now,
            "cause": cause,
            "batch_id": merger.batch_id,
            "actor": actor or merger.provider,
            "details": {"into": survivor, "evidence": evidence},
        }
    )
    insert_rows(conn, events_t, events)
    merger.counts["resourcesMerged"] += 1


def _cover_survivor(merger, survivor: int, now) -> None:
    """The exemptions of the surviving resource (its own, and the loser's, which now name it) hold
    every recommendation on it: those no exemption covers yet (the survivor's own, or the loser's
    that moved or were folded into them) are covered now, and each names the oldest exemption
    holding it, as a new recommendation on it would; the batch's ``update_recommendations``
    re-derives their status."""
    from gateway.posture import exemptions as posture_exemptions

    conn, tenant = merger.conn, merger.tenant_id
    for exemption in posture_exemptions.active(conn, tenant, now):
        if exemption.resource_id != survivor:
            continue
        query = select(recs_t.c.id, recs_t.c.type_id).where(
            recs_t.c.tenant_id == tenant, recs_t.c.resource_id == survivor,
            or_(recs_t.c.exemption_id.is_(None), recs_t.c.exemption_id > exemption.id),
        )
        if exemption.type_id is not None:
            query = query.where(recs_t.c.type_id == exemption.type_id)
        found = conn.execute(query).all()
        if not found:
            continue
        conn.execute(
            update(recs_t)
            .where(recs_t.c.tenant_id == tenant, in_values(conn, recs_t.c.id, [rid for rid, _ in found]))
            .values(exemption_id=exemption.id)
        )
        merger.touched_recommendations.update((survivor, type_id) for _, type_id in found)


def fold_into(conn, table, subject_type: str, tenant: int, gone: int, kept: int) -> None:
    """Row ``gone`` (a finding or recommendation) became ``kept``: its history is re-pointed to
    ``kept``, its customer fields are carried over, and it is deleted."""
    conn.execute(
        update(events_t)
        .where(events_t.c.tenant_id == tenant, events_t.c.subject_type == subject_type,
               events_t.c.subject_id == gone)
        .values(subject_id=kept)
    )
    _fold_customer_fields(conn, table, tenant, gone, kept)
    if table is recs_t:  # its governance assignments move too (gateway/posture/governance.py)
        from gateway.posture import governance

        governance.fold(conn, tenant, gone, kept)
    conn.execute(table.delete().where(table.c.tenant_id == tenant, table.c.id == gone))


def _fold_customer_fields(conn, table, tenant: int, gone: int, kept: int) -> None:
    rows = {
        row.id: row
        for row in conn.execute(
            select(table.c.id, table.c.assigned_to, table.c.comments, table.c.tags).where(
                table.c.tenant_id == tenant, table.c.id.in_((gone, kept))
            )
        )
    }
    old, new = rows.get(gone), rows.get(kept)
    if old is None or new is None:
        return
    values = {}
    if old.comments:
        values["comments"] = list(new.comments or []) + list(old.comments)
    if old.tags:
        values["tags"] = list(new.tags or []) + [t for t in old.tags if t not in (new.tags or [])]
    if old.assigned_to and not new.assigned_to:
        values["assigned_to"] = old.assigned_to
    if values:
        conn.execute(update(table).where(table.c.id == kept).values(**values))


def split_resource(merger, resource_id: int, record_ids: list[int], actor: str | None,
                   reevaluate: bool = True) -> int:
    """Make the host records ``record_ids`` of ``resource_id`` a new resource; return its id.

    ``reevaluate``: re-evaluate the recommendations now (an admin's split); a batch does it at its end.
    """
    conn, tenant, now = merger.conn, merger.tenant_id, utcnow()
    records = conn.execute(
        select(rsources_t).where(rsources_t.c.tenant_id == tenant, rsources_t.c.resource_id == resource_id)
    ).all()
    moving = [r for r in records if r.id in set(record_ids)]
    staying = [r for r in records if r.id not in set(record_ids)]
    if not moving or not staying:
        raise ValueError("a split needs at least one host record on each side")
    original = conn.execute(
        select(resources_t).where(resources_t.c.tenant_id == tenant, resources_t.c.id == resource_id)
    ).one()
    from gateway.merge.resources import best_name

    moved_ids: dict[str, set[str]] = defaultdict(set)
    for r in moving:
        for kind, values in (r.identifiers or {}).items():
            moved_ids[kind].update(values)
    new_id = conn.execute(
        resources_t.insert().returning(resources_t.c.id),
        [
            {
                "tenant_id": tenant,
                "kind": original.kind,
                "name": best_name(moved_ids) or original.name,
                "os": original.os,
                "first_seen": min((r.first_seen for r in moving if r.first_seen), default=None),
                "last_seen": max((r.last_seen for r in moving if r.last_seen), default=None),
                "created_at": now,
                "updated_at": now,
                "tags": [],
            }
        ],
    ).scalar_one()
    from gateway.merge.resources import NAME, _name

    def kinds(rows) -> dict[str, set[str]]:
        found: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            for kind, values in (row.identifiers or {}).items():
                found[kind].update(values)
                if kind in ("fqdn", "hostname", "netbios", "cloud_name"):
                    found[NAME].update(n for n in (_name(v) for v in values) if n)
        return found

    moved, kept = kinds(moving), kinds(staying)
    rows = [
        {"tenant_id": tenant, "kind": kind, "value": value, "resource_id": new_id}
        for kind, values in sorted(moved.items())
        for value in sorted(values)
    ]
    insert_rows(conn, idents_t, rows, conflict=())
    for kind, values in moved.items():
        only_theirs = sorted(values - kept.get(kind, set()))
        if only_theirs:
            conn.execute(
                idents_t.delete().where(
                    idents_t.c.tenant_id == tenant,
                    idents_t.c.resource_id == resource_id,
                    idents_t.c.kind == kind,
                    in_values(conn, idents_t.c.value, only_theirs),
                )
            )
    conn.execute(
        update(rsources_t)
        .where(rsources_t.c.tenant_id == tenant, in_values(conn, rsources_t.c.id, [r.id for r in moving]))
        .values(resource_id=new_id, updated_at=now)
    )
    # findings' sources and observations of those host records move; findings follow their sources
    by_provider: dict[str, list[str]] = defaultdict(list)
    for r in moving:
        if r.host_key:
            by_provider[r.provider].append(r.host_key)
    moved_findings: set[int] = set()
    for provider, host_keys in by_provider.items():
        for table in (observations_t,):
            conn.execute(
                update(table)
                .where(
                    table.c.tenant_id == tenant,
                    table.c.resource_id == resource_id,
                    table.c.provider == provider,
                    in_values(conn, table.c.host_key, host_keys),
                )
                .values(resource_id=new_id)
            )
        sources = conn.execute(
            select(sources_t.c.id, sources_t.c.finding_id, sources_t.c.correlation_key).where(
                sources_t.c.tenant_id == tenant,
                sources_t.c.resource_id == resource_id,
                sources_t.c.provider == provider,
                in_values(conn, sources_t.c.host_key, host_keys),
            )
        ).all()
        for source_id, finding_id, key in sources:
            moved_findings.add(finding_id)
            target = _finding_on(merger, new_id, finding_id, key, now)
            conn.execute(
                update(sources_t)
                .where(sources_t.c.id == source_id)
                .values(finding_id=target, resource_id=new_id)
            )
    # findings left without sources went entirely to the new resource
    empty = [
        fid
        for fid in moved_findings
        if not conn.execute(
            select(func.count())
            .select_from(sources_t)
            .where(sources_t.c.tenant_id == tenant, sources_t.c.finding_id == fid)
        ).scalar()
    ]
    if empty:
        conn.execute(
            findings_t.delete().where(
                findings_t.c.tenant_id == tenant, in_values(conn, findings_t.c.id, empty)
            )
        )
    left = sorted(moved_findings - set(empty))
    targets = {
        fid
        for (fid,) in conn.execute(
            select(findings_t.c.id).where(
                findings_t.c.tenant_id == tenant, findings_t.c.resource_id == new_id
            )
        )
    }
    merger._refresh_findings(set(left) | targets, {}, set(), now, cause=f"resource split by {actor}")
    for (type_id,) in conn.execute(
        select(findings_t.c.recommendation_type_id)
        .where(findings_t.c.tenant_id == tenant, findings_t.c.resource_id.in_((resource_id, new_id)))
        .distinct()
    ):
        merger.touched_recommendations.add((resource_id, type_id))
        merger.touched_recommendations.add((new_id, type_id))
    insert_rows(
        conn,
        separations_t,
        [
            {
                "tenant_id": tenant,
                "resource_a": min(resource_id, new_id),
                "resource_b": max(resource_id, new_id),
                "created_at": now,
                "actor": actor,
            }
        ],
    )
    insert_rows(
        conn,
        events_t,
        [
            {
                "tenant_id": tenant,
                "subject_type": "resource",
                "subject_id": resource_id,
                "event": "split",
                "at": now,
                "cause": f"split by {actor}",
                "batch_id": None,
                "actor": actor,
                "details": {"into": new_id},
            },
            {
                "tenant_id": tenant,
                "subject_type": "resource",
                "subject_id": new_id,
                "event": "new",
                "at": now,
                "cause": f"split by {actor}",
                "batch_id": None,
                "actor": actor,
                "details": {"splitFrom": resource_id},
            },
        ],
    )
    # the resource that stays was seen when the host records that stay saw it
    first = min((r.first_seen for r in staying if r.first_seen), default=None)
    last = max((r.last_seen for r in staying if r.last_seen), default=None)
    if first or last:
        conn.execute(
            update(resources_t)
            .where(resources_t.c.tenant_id == tenant, resources_t.c.id == resource_id)
            .values(first_seen=first, last_seen=last, updated_at=now)
        )
    if reevaluate:
        merger.update_recommendations()
    return new_id


def _finding_on(merger, resource_id: int, finding_id: int, key: str, now) -> int:
    """The finding of ``key`` on ``resource_id``, made as a copy of ``finding_id`` when missing."""
    conn, tenant = merger.conn, merger.tenant_id
    found = conn.execute(
        select(findings_t.c.id).where(
            findings_t.c.tenant_id == tenant,
            findings_t.c.resource_id == resource_id,
            findings_t.c.correlation_key == key,
        )
    ).scalar()
    if found is not None:
        return found
    row = (
        conn.execute(
            select(findings_t).where(findings_t.c.tenant_id == tenant, findings_t.c.id == finding_id)
        )
        .one()
        ._asdict()
    )
    row.pop("id")
    row.update(
        resource_id=resource_id,
        created_at=now,
        updated_at=now,
        state_changed_at=now,
        comments=[],
        tags=[],
        assigned_to=None,
        status_override=None,
    )
    new_id = conn.execute(findings_t.insert().returning(findings_t.c.id), [row]).scalar_one()
    insert_rows(
        conn,
        events_t,
        [
            {
                "tenant_id": tenant,
                "subject_type": "finding",
                "subject_id": new_id,
                "event": "new",
                "at": now,
                "cause": "resource split",
                "batch_id": None,
                "actor": None,
                "details": {"splitFrom": finding_id},
            }
        ],
    )
    return new_id
