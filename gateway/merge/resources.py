"""Resource identity: which stored resource a scanner's record is about.

Matching rules (also in the README's concepts section):

* Identifiers are normalized first: FQDNs, hostnames, NetBIOS names, agent ids and
  Azure resource ids lower-cased (a trailing dot dropped), MACs as aa:bb:cc:dd:ee:ff,
  IP addresses in their canonical text form.  A hostname with a dot is an FQDN.
* **Strong** identifiers (cloud resource id, agent/asset UUID, FQDN) identify a
  resource on their own: a record matches the resource holding any of its strong
  identifiers (the oldest, if several do).
* **Medium** identifiers (short hostname, NetBIOS name, MAC) are used only when the
  record has no strong identifier.  A record with a strong identifier that no
  resource holds yet becomes a new resource even if its hostname is known: two
  hosts called ``web`` in two domains stay two resources.
* **Weak** identifiers (IPv4/IPv6) never merge a record into a resource that was
  identified otherwise: a private IP alone is ambiguous (10.0.0.5 exists in every
  network).  A record that carries nothing but IP addresses matches only a resource
  that was itself created from an IP-only record with the same address.
* A match adds the record's other strong and medium identifiers to the resource,
  unless another resource holds them already; resources are never merged into one
  another automatically.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

import msgspec
from sqlalchemy import and_, select, text, update
from sqlalchemy.engine import Connection

from connectors.model import MEDIUM_IDENTIFIERS, STRONG_IDENTIFIERS, ResourceRef
from gateway.merge.sql import in_values, insert_rows, is_postgres
from gateway.models import Resource, ResourceIdentifier, utcnow

resources = Resource.__table__
identifiers = ResourceIdentifier.__table__

IP_ONLY = "ip_only"


def _ip(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip().split("%")[0]))
    except ValueError:
        return None


def _mac(value: str) -> str | None:
    digits = "".join(ch for ch in value.lower() if ch in "0123456789abcdef")
    if len(digits) != 12:
        return None
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def normalize(ref: ResourceRef) -> dict[str, list[str]]:
    """The record's identifiers by kind, normalized."""
    ids: dict[str, list[str]] = defaultdict(list)
    if ref.cloud_id:
        value = ref.cloud_id.strip()
        ids["cloud_id"].append(value.lower() if value.startswith("/") else value)
    if ref.agent_id:
        ids["agent_id"].append(ref.agent_id.strip().lower())
    for name in (ref.fqdn, ref.hostname):
        if name:
            value = name.strip().rstrip(".").lower()
            if not value:
                continue
            if "." in value and _ip(value) is None:
                if value not in ids["fqdn"]:
                    ids["fqdn"].append(value)
            elif _ip(value) is None:
                ids["hostname"].append(value)
    if ref.netbios:
        ids["netbios"].append(ref.netbios.strip().lower())
    if ref.mac:
        mac = _mac(ref.mac)
        if mac:
            ids["mac"].append(mac)
    for kind, values in (("ipv4", ref.ipv4), ("ipv6", ref.ipv6)):
        for value in values:
            ip = _ip(value)
            if ip and ip not in ids[kind]:
                ids[kind].append(ip)
    if not any(ids.get(kind) for kind in STRONG_IDENTIFIERS + MEDIUM_IDENTIFIERS):
        ips = ids.get("ipv4", []) + ids.get("ipv6", [])
        if ips:
            ids[IP_ONLY].append(ips[0])
    return dict(ids)


def _display_name(ref: ResourceRef, ids: dict[str, list[str]]) -> str | None:
    if ref.name:
        return ref.name[:500]
    for kind in ("fqdn", "hostname", "netbios", "cloud_id", "agent_id", IP_ONLY):
        if ids.get(kind):
            return ids[kind][0][:500]
    return None


def resolve_committed(
    conn: Connection,
    tenant_id: int,
    refs: Sequence[ResourceRef],
    seen: Sequence[datetime | None],
) -> list[int]:
    """``resolve`` in a short transaction of its own, committed before the batch's merge goes on.

    On PostgreSQL the resolution runs on a second connection under the tenant's lock and
    commits at once, so that concurrent batches of one tenant wait for each other only
    while they resolve resources, not for the length of a whole merge.  Resources and
    identifiers are identity, not findings: a merge that fails later leaves them behind
    and its retry finds them again.  SQLite has one writer at a time anyway, so there the
    resolution is part of the batch's transaction.
    """
    if not is_postgres(conn):
        return resolve(conn, tenant_id, refs, seen)
    with conn.engine.connect() as side, side.begin():
        return resolve(side, tenant_id, refs, seen)


def resolve(
    conn: Connection,
    tenant_id: int,
    refs: Sequence[ResourceRef],
    seen: Sequence[datetime | None],
) -> list[int]:
    """The resource id of each ref, creating resources and identifiers as needed."""
    if is_postgres(conn):
        # One resolver per tenant at a time, so concurrent batches create one resource.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": 7_000_000_000 + tenant_id})
    cache: dict[bytes, dict[str, list[str]]] = {}
    normalized = []
    for ref in refs:  # a push names the same few hosts thousands of times
        key = msgspec.msgpack.encode(ref)
        ids = cache.get(key)
        if ids is None:
            ids = cache[key] = normalize(ref)
        normalized.append(ids)
    wanted: dict[str, set[str]] = defaultdict(set)
    for ids in normalized:
        for kind, values in ids.items():
            if kind in STRONG_IDENTIFIERS or kind in MEDIUM_IDENTIFIERS or kind == IP_ONLY:
                wanted[kind].update(values)
    known: dict[tuple[str, str], int] = {}
    for kind, values in wanted.items():
        rows = conn.execute(
            select(identifiers.c.value, identifiers.c.resource_id).where(
                identifiers.c.tenant_id == tenant_id,
                identifiers.c.kind == kind,
                in_values(conn, identifiers.c.value, sorted(values)),
            )
        )
        for value, resource_id in rows:
            known[(kind, value)] = min(resource_id, known.get((kind, value), resource_id))

    result: list[int | None] = [None] * len(refs)
    pending: dict[tuple[str, str], int] = {}  # identifier -> index of a new resource
    new_groups: list[list[int]] = []
    for index, ids in enumerate(normalized):
        tiers = [STRONG_IDENTIFIERS] if any(ids.get(k) for k in STRONG_IDENTIFIERS) else (
            [MEDIUM_IDENTIFIERS] if any(ids.get(k) for k in MEDIUM_IDENTIFIERS) else [(IP_ONLY,)]
        )
        keys = [(kind, value) for tier in tiers for kind in tier for value in ids.get(kind, [])]
        matches = [known[key] for key in keys if key in known]
        if matches:
            result[index] = min(matches)
            continue
        group = next((pending[key] for key in keys if key in pending), None)
        if group is None:
            group = len(new_groups)
            new_groups.append([])
        new_groups[group].append(index)
        for key in keys:
            pending.setdefault(key, group)

    now = utcnow()
    if new_groups:
        rows = []
        for members in new_groups:
            first = members[0]
            last_seen = max((seen[i] for i in members if seen[i] is not None), default=None)
            rows.append({
                "tenant_id": tenant_id,
                "kind": refs[first].kind,
                "name": _display_name(refs[first], normalized[first]),
                "os": refs[first].os,
                "first_seen": last_seen,
                "last_seen": last_seen,
                "created_at": now,
                "updated_at": now,
                "tags": [],
            })
        new_ids = conn.execute(
            resources.insert().returning(resources.c.id, sort_by_parameter_order=True), rows
        ).scalars().all()
        for group, members in enumerate(new_groups):
            for index in members:
                result[index] = new_ids[group]

    _add_identifiers(conn, tenant_id, normalized, result, known)
    _touch_last_seen(conn, tenant_id, result, seen, now)
    return [int(r) for r in result]  # type: ignore[arg-type]


def _add_identifiers(conn, tenant_id, normalized, result, known) -> None:
    rows: dict[tuple[str, str, int], dict] = {}
    for ids, resource_id in zip(normalized, result):
        for kind, values in ids.items():
            for value in values:
                if kind in ("ipv4", "ipv6"):
                    key = (kind, value, resource_id)
                elif (kind, value) in known:
                    continue
                else:
                    key = (kind, value, 0)
                    known[(kind, value)] = resource_id
                rows.setdefault(key, {"tenant_id": tenant_id, "kind": kind, "value": value[:500],
                                      "resource_id": resource_id})
    if not rows:
        return
    ordered = sorted(rows.values(), key=lambda r: (r["kind"], r["value"], r["resource_id"]))
    insert_rows(conn, identifiers, ordered, conflict=())


def _touch_last_seen(conn, tenant_id, result, seen, now) -> None:
    latest: dict[int, datetime] = {}
    for resource_id, when in zip(result, seen):
        if when is not None and (resource_id not in latest or when > latest[resource_id]):
            latest[resource_id] = when
    if not latest:
        return
    if is_postgres(conn):
        ordered = sorted(latest.items())
        conn.exec_driver_sql(
            "UPDATE resources AS t SET last_seen = v.seen, updated_at = %s "
            "FROM unnest(%b::bigint[], %b::timestamptz[]) AS v(id, seen) "
            "WHERE t.id = v.id AND t.tenant_id = %s AND (t.last_seen IS NULL OR t.last_seen < v.seen)",
            (now, [rid for rid, _ in ordered], [when for _, when in ordered], tenant_id),
        )
        return
    statement = (
        update(resources)
        .where(
            and_(
                resources.c.id == _bind("rid"),
                resources.c.tenant_id == tenant_id,
                (resources.c.last_seen.is_(None)) | (resources.c.last_seen < _bind("seen")),
            )
        )
        .values(last_seen=_bind("seen"), updated_at=now)
    )
    conn.execute(statement, [{"rid": rid, "seen": when} for rid, when in sorted(latest.items())])


def _bind(name: str):
    from sqlalchemy import bindparam

    return bindparam(name)
