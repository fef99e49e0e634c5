"""Resource identity: which stored resource a scanner's host record is about.

A host record (the ``ResourceRef`` of a finding, observation or alert) is resolved from
**evidence**: every stored resource that shares any normalized identifier with it is a
candidate, and the rules below decide, in this order, which candidates it is.  They are
the rules a security engineer applies by hand when two scanners disagree on names.

Normalization: FQDNs, hostnames, NetBIOS names, cloud ids (Azure ids) and agent ids are
lower-cased with a trailing dot dropped; a "hostname" with a dot is an FQDN; MACs become
``aa:bb:cc:dd:ee:ff``; IPs their canonical text.  An EC2 ARN also yields its instance id.
Agent ids carry their vendor (``tenable:<uuid>``, ``qualys:<id>``): the provider that
reported them.  The **short names** of a record are its hostname, the first label of each
FQDN, its NetBIOS name and its cloud ``Name`` tag when that looks like a host name
(``web-01``, not ``Web server #1``); placeholder names (``localhost``, ``unknown``...) and
placeholder MACs (all zero, broadcast) are no evidence.  An IP is evidence only **in its
scope**: the record's network (Tenable network, Qualys network, cloud VPC) for private
addresses, the tenant's default scope when the record names none; public addresses are
tenant-wide.  Stored, a scoped IP reads ``10.0.0.5%vpc-0abc`` (the notation of IPv6 zones).

| # | evidence shared with a candidate                                   | decision      |
|---|--------------------------------------------------------------------|---------------|
| 1 | a cloud resource id, a cloud instance id, an agent/asset id of the  | same resource |
|   | same vendor, or an FQDN                                            |               |
| 2 | a short name, and a MAC                                            | same resource |
| 3 | a short name, and an IP (in any scope: scanners' network ids cannot | same resource |
|   | be compared across vendors, and name + address together is strong) |               |
| 4 | a MAC, and an IP in the same scope                                 | same resource |
| 5 | a *current* IP in the same scope, when the record or the candidate  | same resource |
|   | carries nothing but addresses, and no other resource holds that IP  |               |
|   | there currently                                                    |               |
| 6 | the candidate already holds this provider's host record (same host  | same resource |
|   | key) and nothing conflicts                                         |               |
| - | a short name alone, a MAC alone, an IP held by several resources,   | nothing       |
|   | or in another scope, or left behind                                |               |

An address is **left behind** (no evidence for rule 5) when a host record of the same
machine (sharing a MAC or a short name) seen more than ``STALE_AFTER`` later reports other
addresses and not this one, and no recent host record still reports it: the DHCP case,
where yesterday's address of one machine is today's address of another.  A record's own
addresses are left behind likewise when the machine its other evidence names was seen
later elsewhere (an older scan pushed after a newer one).

**Conflicts forbid a merge** whatever else agrees: the record and the candidate both have
identifiers of one of these kinds and none in common: cloud resource id, cloud instance
id, FQDN, agent id of one vendor (two Tenable assets with different UUIDs are two machines
even with one FQDN).  Identifiers of different kinds never conflict (an ARN and an FQDN
describe one machine together).  A pair an admin split apart never merges again
automatically (``resource_separations``).

**Later evidence joins resources.**  When a record matches several resources and none of
them conflicts with the record or with the others, they are one machine: the oldest
survives and the others are merged into it (``FindingMerger.merge_resources``: findings,
sources, recommendations, observations, identifiers move in the batch's transaction; the
old id keeps its row with ``merged_into``).  When candidates conflict with each other, the
record goes to the best match (lowest rule number, then the resource that already holds
this provider's host record, then the oldest) and the others stay apart.

**Order.**  Within a chunk the host records that say most are decided first (strong
identifiers, then names, then MACs, then bare addresses), so an IP-only record meets the
chunk's named hosts whatever the file's order.  A resource's display name, OS and kind are
computed from everything known of it (``best_name``, ``better_os``, ``better_kind``), its
first and last seen span every sighting: the store reads the same whichever push came first.
An IP-only record decided before the named record that shows its address was left behind
(an earlier chunk or batch) may have joined the machine that left it: when the named record
arrives, such address-only host records are split off again (``Resolution.detach``, a
``split`` event by "identity resolution", and a separation so the address does not join
them again).

Everything is set-based per chunk: one lookup of the chunk's identifiers, one read of the
candidates' identifiers and host records, then in-memory decisions over the chunk's distinct
host records (a push names the same few hosts thousands of times), then bulk inserts.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import msgspec
from sqlalchemy import and_, bindparam, or_, select, text, update
from sqlalchemy.engine import Connection

from connectors.model import ResourceRef
from gateway.merge.sql import in_values, insert_rows, is_postgres, keyed, update_rows
from gateway.models import Resource, ResourceIdentifier, ResourceSeparation, ResourceSource, utcnow

resources = Resource.__table__
identifiers = ResourceIdentifier.__table__
separations = ResourceSeparation.__table__
resource_sources = ResourceSource.__table__

STRONG = ("cloud_id", "instance_id", "agent_id", "fqdn")  # rule 1, and the kinds that conflict
NAME, MAC = "name", "mac"
IPS = ("ipv4", "ipv6")
KINDS = STRONG + ("hostname", "netbios", "cloud_name", NAME, MAC) + IPS
MATCH_KINDS = STRONG + (NAME, MAC) + IPS  # the kinds looked up to find candidates
PLACEHOLDER_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "localdomain",
        "unknown",
        "none",
        "null",
        "n/a",
        "na",
        "-",
        "default",
        "host",
        "computer",
        "ubuntu",
        "debian",
        "amnesiac",
    }
)
PLACEHOLDER_MACS = frozenset({"00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"})
TEMP_BASE = 1 << 60  # in-memory ids of resources this chunk creates: above every stored id
_EC2_ARN = re.compile(r"^arn:aws[a-z-]*:ec2:[^:]*:[^:]*:instance/(i-[0-9a-f]+)$", re.IGNORECASE)
_HOST_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})$")
RESOLVER_LOCK = 7_000_000_000
IDENTITY_CACHE = 100_000  # normalized host records a batch keeps (about 1 KiB each)


_NOT_AN_ADDRESS = re.compile(r"[^0-9a-fA-F:.%\s]")


@lru_cache(maxsize=65536)
def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if _NOT_AN_ADDRESS.search(value):  # a name: no need to ask ipaddress
        return None
    try:
        return ipaddress.ip_address(value.strip().split("%")[0])
    except ValueError:
        return None


def _mac(value: str) -> str | None:
    digits = "".join(ch for ch in value.lower() if ch in "0123456789abcdef")
    if len(digits) != 12:
        return None
    mac = ":".join(digits[i : i + 2] for i in range(0, 12, 2))
    return None if mac in PLACEHOLDER_MACS else mac


def _scoped(ip, network: str | None) -> str:
    """The stored form of an IP: public ones tenant-wide, private ones in their network's scope."""
    text_ = str(ip)
    if network and not ip.is_global:
        return f"{text_}%{network.strip().lower()[:120]}"
    return text_


def split_scope(value: str) -> tuple[str, str | None]:
    """``10.0.0.5%vpc-1`` -> (``10.0.0.5``, ``vpc-1``); an unscoped IP -> (ip, None)."""
    ip, _, scope = value.partition("%")
    return ip, scope or None


def _name(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip().rstrip(".").lower()
    if not value or value in PLACEHOLDER_NAMES or _ip(value) is not None:
        return None
    label = value.split(".", 1)[0]
    if not _HOST_LABEL.match(label) or label in PLACEHOLDER_NAMES:
        return None
    return label


def normalize(ref: ResourceRef, provider: str = "") -> dict[str, list[str]]:
    """The record's identifiers by kind, normalized (see the module docstring)."""
    ids: dict[str, list[str]] = defaultdict(list)

    def add(kind: str, value: str | None) -> None:
        if value and value not in ids[kind]:
            ids[kind].append(value[:500])

    if ref.cloud_id and ref.cloud_id.strip():
        value = ref.cloud_id.strip()
        add("cloud_id", value.lower() if value.startswith("/") else value)
        arn = _EC2_ARN.match(value)
        if arn:
            add("instance_id", arn.group(1).lower())
    if ref.instance_id and ref.instance_id.strip():
        add("instance_id", ref.instance_id.strip().lower())
    if ref.agent_id and ref.agent_id.strip():
        vendor = (provider or "").strip().lower()
        add(
            "agent_id", f"{vendor}:{ref.agent_id.strip().lower()}" if vendor else ref.agent_id.strip().lower()
        )
    for value in (ref.fqdn, ref.hostname):
        if not value:
            continue
        value = value.strip().rstrip(".").lower()
        if not value or value in PLACEHOLDER_NAMES or _ip(value) is not None:
            continue
        add("fqdn" if "." in value else "hostname", value)
    if ref.netbios and ref.netbios.strip():
        add("netbios", ref.netbios.strip().lower())
    if ref.cloud_name and ref.cloud_name.strip():
        add("cloud_name", ref.cloud_name.strip()[:500])
    for kind in ("fqdn", "hostname", "netbios"):
        for value in ids.get(kind, []):
            add(NAME, _name(value))
    for value in ids.get("cloud_name", []):
        add(NAME, _name(value) if "." not in value else None)
    if ref.mac:
        add(MAC, _mac(ref.mac))
    for kind, values in (("ipv4", ref.ipv4), ("ipv6", ref.ipv6)):
        for value in values or ():
            ip = _ip(value) if isinstance(value, str) else None
            if ip is not None and not ip.is_unspecified and not ip.is_loopback:
                add(kind, _scoped(ip, ref.network))
    return {kind: values for kind, values in ids.items() if values}


def record_key(ref: ResourceRef, ids: dict[str, list[str]]) -> str:
    """The provider's key of the host record: its own, else a digest of what identifies it."""
    if ref.host_key and ref.host_key.strip():
        return ref.host_key.strip()[:500]
    payload = msgspec.json.encode({kind: sorted(values) for kind, values in sorted(ids.items())})
    return "ids:" + hashlib.blake2b(payload, digest_size=16).hexdigest()


NAME_ORDER = (
    "fqdn",
    "hostname",
    "netbios",
    "cloud_name",
    "instance_id",
    "cloud_id",
    "agent_id",
    "ipv4",
    "ipv6",
)


def best_name(ids) -> str | None:
    """A resource's display name from all its identifiers: the same whichever scanner came first.

    The first kind present in NAME_ORDER, and of its values the smallest (an FQDN before a
    short name before a NetBIOS name, ..., an address last).
    """
    for kind in NAME_ORDER:
        values = ids.get(kind)
        if values:
            value = min(values)
            if kind in IPS:
                value = split_scope(value)[0]
            elif kind == "agent_id":
                value = value.split(":", 1)[-1]
            return value[:500]
    return None


KIND_ORDER = ("vm", "container_image", "web_app", "cloud_resource", "host")  # the most specific first


def better_kind(current: str | None, new: str | None) -> str | None:
    """The resource kind to keep: the most specific one any scanner named (an EC2 instance is a
    ``vm`` to the cloud and a ``host`` to its agent: it is a vm)."""
    if not new:
        return current
    if not current:
        return new[:50]
    rank = {kind: index for index, kind in enumerate(KIND_ORDER)}
    return new[:50] if rank.get(new, len(rank)) < rank.get(current, len(rank)) else current


def better_os(current: str | None, new: str | None) -> str | None:
    """The OS text to keep: the most detailed one reported (the longest, then the smallest).

    Scanners name one OS differently ("UBUNTU_22.04", "Ubuntu 22.04", "Linux Kernel 5.15 on
    Ubuntu 22.04"); keeping the most detailed makes the result independent of push order.
    """
    new = _os(new)
    if new is None or (current is not None and (len(current), current) >= (len(new), new)):
        return current
    return new


@dataclass
class Resolution:
    """Which resource each record is about, and the stored resources proven to be one."""

    ids: list[int]
    merges: list[tuple[int, int]] = field(default_factory=list)  # (merged away, surviving), in order
    # (resource, host record id): address-only host records that joined a machine by an address
    # it has since left; the caller splits them off (gateway/merge/combine.py split_resource)
    detach: list[tuple[int, int]] = field(default_factory=list)


class _Evidence:
    """What is known of the candidate resources and the chunk's records, in memory."""

    def __init__(self) -> None:
        self.holders: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.of: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.apart: set[tuple[int, int]] = set()
        self.records: dict[tuple[str, str], int] = {}  # (provider, record key) -> resource
        self.parent: dict[int, int] = {}
        # host records of each resource: (identifiers by kind, last seen), for the age of its IPs
        self.hosts: dict[int, list[tuple[dict, datetime | None]]] = defaultdict(list)
        self.described: dict[int, tuple] = {}  # stored (name, os, kind)
        self.stored: set[tuple[str, str, int]] = set()  # (kind, value, resource) as read from the store
        # stored host records of the candidates: (row id, (provider, record key), ids, last seen)
        self.stored_hosts: dict[int, list[tuple]] = defaultdict(list)
        self._stale: dict[int, frozenset] = {}

    def find(self, rid: int) -> int:
        while rid in self.parent:
            rid = self.parent[rid]
        return rid

    def add(self, rid: int, ids: dict[str, list[str]] | dict[str, set[str]]) -> None:
        for kind, values in ids.items():
            for value in values:
                self.of[rid][kind].add(value)
                self.holders[(kind, value)].add(rid)

    def stale(self, rid: int) -> frozenset:
        """The resource's addresses that a later host record of the same machine no longer reports.

        DHCP: the same NIC (MAC) or the same name was seen later at other addresses, so an
        address only an older host record reported is no evidence any more (rule 5).
        """
        cached = self._stale.get(rid)
        if cached is None:
            cached = self._stale[rid] = _stale_addresses(self.hosts.get(rid, ()))
        return cached

    def host(self, rid: int, ids: dict, seen: datetime | None) -> None:
        self.hosts[rid].append(({kind: set(values) for kind, values in ids.items()}, seen))
        self._stale.pop(rid, None)

    def absorb(self, loser: int, survivor: int) -> None:
        self.parent[loser] = survivor
        self.hosts[survivor].extend(self.hosts.pop(loser, []))
        self._stale.pop(survivor, None)
        for kind, values in self.of.pop(loser, {}).items():
            for value in values:
                self.of[survivor][kind].add(value)
                holders = self.holders[(kind, value)]
                holders.discard(loser)
                holders.add(survivor)
        self.apart = {(survivor if a == loser else a, survivor if b == loser else b) for a, b in self.apart}

    def separated(self, a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in self.apart


def conflicts(first: dict, second: dict) -> bool:
    """True when two bodies of evidence name different machines (see the module docstring)."""
    for kind in ("cloud_id", "instance_id", "fqdn"):
        mine, theirs = first.get(kind), second.get(kind)
        if mine and theirs and not set(mine) & set(theirs):
            return True
    mine, theirs = first.get("agent_id"), second.get("agent_id")
    if mine and theirs:
        by_vendor: dict[str, set[str]] = defaultdict(set)
        for value in theirs:
            by_vendor[value.split(":", 1)[0] if ":" in value else ""].add(value)
        mine_by_vendor: dict[str, set[str]] = defaultdict(set)
        for value in mine:
            mine_by_vendor[value.split(":", 1)[0] if ":" in value else ""].add(value)
        for vendor, values in mine_by_vendor.items():
            if vendor in by_vendor and not values & by_vendor[vendor]:
                return True
    return False


def _ip_match(mine: dict, theirs: dict, loose: bool, stale: frozenset = frozenset()) -> list[str]:
    """The record's IPs the candidate holds in the same scope (``loose``: in any scope), not stale."""
    held = {value for kind in IPS for value in theirs.get(kind, ())} - stale
    if not loose:
        return [value for kind in IPS for value in mine.get(kind, ()) if value in held]
    bare = {split_scope(value)[0] for value in held}
    return [value for kind in IPS for value in mine.get(kind, ()) if split_scope(value)[0] in bare]


STALE_AFTER = timedelta(hours=12)  # scanners of one machine within this window saw the same addresses


def _stale_addresses(hosts) -> frozenset:
    stale: set[str] = set()
    for ids, seen in hosts:
        addresses = {v for kind in IPS for v in ids.get(kind, ())}
        if not addresses or seen is None:
            continue
        tie = set(ids.get(MAC, ())) | set(ids.get(NAME, ()))
        for other, later in hosts:
            if later is None or later - seen <= STALE_AFTER:
                continue
            others = {v for kind in IPS for v in other.get(kind, ())}
            if (
                others
                and not others & addresses
                and tie & (set(other.get(MAC, ())) | set(other.get(NAME, ())))
            ):
                stale |= addresses
                break
    # an address a recent host record still reports is current whatever an older one says
    return frozenset(stale - _current(hosts, stale))


def _current(hosts, stale: set[str]) -> set[str]:
    if not stale:
        return set()
    latest = max((seen for _, seen in hosts if seen is not None), default=None)
    if latest is None:
        return set()
    return {
        v
        for ids, seen in hosts
        if seen is not None and latest - seen <= STALE_AFTER
        for kind in IPS
        for v in ids.get(kind, ())
    }


def _strength(evidence: dict) -> int:
    if any(evidence.get(kind) for kind in STRONG):
        return 0
    return 1 if evidence.get(NAME) else 2 if evidence.get(MAC) else 3


def _only_addresses(evidence: dict) -> bool:
    return not any(evidence.get(kind) for kind in STRONG + (NAME,))


def _rule(record: dict, candidate: dict, unique_ip, stale: frozenset, record_stale: frozenset) -> int | None:
    """The rule number by which ``candidate`` is the record's resource, or None."""
    if any(set(record.get(kind, ())) & set(candidate.get(kind, ())) for kind in STRONG):
        return 1
    shares_name = bool(set(record.get(NAME, ())) & set(candidate.get(NAME, ())))
    shares_mac = bool(set(record.get(MAC, ())) & set(candidate.get(MAC, ())))
    if shares_name and shares_mac:
        return 2
    # a short name and the same address: strong enough in any scope (scanners' network ids
    # cannot be compared across vendors: Qualys's DMZ and Tenable's DMZ are two ids)
    if shares_name and _ip_match(record, candidate, loose=True):
        return 3
    exact = _ip_match(record, candidate, loose=False)
    if shares_mac and exact:
        return 4
    # an address alone: only a current one (not left behind by a DHCP change), held by no one else
    fresh = [
        value for value in _ip_match(record, candidate, loose=False, stale=stale) if value not in record_stale
    ]
    if fresh and (_only_addresses(record) or _only_addresses(candidate)) and any(unique_ip(v) for v in fresh):
        return 5
    return None


def resolve_committed(
    conn: Connection,
    tenant_id: int,
    refs: Sequence[ResourceRef],
    seen: Sequence[datetime | None],
    *,
    provider: str = "",
    product: str | None = None,
    batch_id: int | None = None,
    allow_merge: bool = True,
    on_main: bool = False,
    cache: dict | None = None,
) -> Resolution:
    """``resolve`` in a short transaction of its own, committed before the batch's merge goes on.

    On PostgreSQL the resolution runs on a second connection under the tenant's lock and
    commits at once, so that concurrent batches of one tenant wait for each other only
    while they resolve resources, not for the length of a whole merge.  Resources and
    identifiers are identity, not findings: a merge that fails later leaves them behind
    and its retry finds them again.  When the resolution proves two stored resources to be
    one, it is rolled back and done again on the batch's own connection (``on_main``),
    which then holds the tenant's resolver lock until the batch commits: the resources'
    findings move in the batch's transaction, and no other batch resolves to the resource
    being merged away meanwhile.  SQLite has one writer at a time anyway, so there the
    resolution is part of the batch's transaction.
    """
    options = {
        "provider": provider,
        "product": product,
        "batch_id": batch_id,
        "allow_merge": allow_merge,
        "cache": cache,
    }
    if on_main or not is_postgres(conn):
        return resolve(conn, tenant_id, refs, seen, **options)
    with conn.engine.connect() as side:
        transaction = side.begin()
        try:
            result = resolve(side, tenant_id, refs, seen, **options)
            if result.merges or result.detach:
                transaction.rollback()
                return resolve(conn, tenant_id, refs, seen, **options)
            transaction.commit()
            return result
        finally:
            if transaction.is_active:
                transaction.rollback()


def resolve(
    conn: Connection,
    tenant_id: int,
    refs: Sequence[ResourceRef],
    seen: Sequence[datetime | None],
    *,
    provider: str = "",
    product: str | None = None,
    batch_id: int | None = None,
    allow_merge: bool = True,
    cache: dict | None = None,
) -> Resolution:
    """The resource of each ref, creating resources, identifiers and host records as needed.

    Stored resources that a record proves to be one are returned as ``merges``; the caller
    moves what they hold (``FindingMerger.merge_resources``) before using the ids.
    """
    if is_postgres(conn):
        # One resolver per tenant at a time, so concurrent batches create one resource.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RESOLVER_LOCK + tenant_id})
    distinct: dict[bytes, int] = {}
    order: list[int] = []
    unique_refs: list[ResourceRef] = []
    for ref in refs:  # a push names the same few hosts thousands of times
        key = msgspec.msgpack.encode(ref)
        index = distinct.get(key)
        if index is None:
            index = distinct[key] = len(unique_refs)
            unique_refs.append(ref)
        order.append(index)
    if cache is None:
        evidence = [normalize(ref, provider) for ref in unique_refs]
    else:  # a batch names a host in many chunks: normalize it once per batch
        evidence = []
        for ref, encoded in zip(unique_refs, distinct, strict=True):
            ids = cache.get(encoded)
            if ids is None:
                ids = normalize(ref, provider)
                if len(cache) < IDENTITY_CACHE:
                    cache[encoded] = ids
            evidence.append(ids)
    keys = [record_key(ref, ids) for ref, ids in zip(unique_refs, evidence, strict=True)]
    last_seen: list[datetime | None] = [None] * len(unique_refs)
    for index, when in zip(order, seen, strict=True):
        if when is not None and (last_seen[index] is None or when > last_seen[index]):
            last_seen[index] = when

    # A host record this provider pushed before, that brings nothing new, stays where it is: the
    # rules are symmetric, so what could join it would have been decided when it first came.
    # Only the other records are looked up (most records of a re-push are such known ones).
    stored_hosts = _stored_host_records(conn, tenant_id, provider, sorted(set(keys)))
    fast: dict[int, int] = {}
    for index, ids in enumerate(evidence):
        row = stored_hosts.get(keys[index])
        if row is not None and _within(ids, row.identifiers):
            fast[index] = row.resource_id
    slow = [index for index in range(len(evidence)) if index not in fast]

    memory = _Evidence()
    _load(
        conn,
        tenant_id,
        provider,
        [evidence[i] for i in slow],
        {keys[i]: stored_hosts[keys[i]].resource_id for i in slow if keys[i] in stored_hosts},
        memory,
    )

    chosen: list[int] = [0] * len(evidence)
    for index, rid in fast.items():
        chosen[index] = rid
    merges: list[tuple[int, int]] = []
    new_resources: list[int] = []  # record indexes that start a resource
    # The records that say most first: by the time an IP-only record is decided, the chunk's
    # named hosts have claimed (or made stale) their addresses, whatever the file's order.
    for index in sorted(slow, key=lambda i: (_strength(evidence[i]), i)):
        ids = evidence[index]
        rid = _decide(memory, ids, provider, keys[index], allow_merge, merges, last_seen[index])
        if rid is None:
            rid = TEMP_BASE + len(new_resources)
            new_resources.append(index)
        memory.add(rid, ids)
        memory.host(rid, ids, last_seen[index])
        memory.records[(provider, keys[index])] = rid
        chosen[index] = rid

    now = utcnow()
    real: dict[int, int] = {}
    roots = [TEMP_BASE + n for n in range(len(new_resources)) if memory.find(TEMP_BASE + n) == TEMP_BASE + n]
    if roots:
        rows = []
        members_of: dict[int, list[int]] = defaultdict(list)
        for i, rid in enumerate(chosen):
            members_of[memory.find(rid)].append(i)
        for temp in roots:
            first = new_resources[temp - TEMP_BASE]
            members = members_of[temp]
            when = max((last_seen[i] for i in members if last_seen[i] is not None), default=None)
            earliest = min((last_seen[i] for i in members if last_seen[i] is not None), default=None)
            kind = None
            for index in members:
                kind = better_kind(kind, unique_refs[index].kind)
            rows.append(
                {
                    "tenant_id": tenant_id,
                    "kind": kind,
                    "name": best_name(memory.of.get(temp, evidence[first])),
                    "os": _best_os(unique_refs, members),
                    "first_seen": earliest,
                    "last_seen": when,
                    "created_at": now,
                    "updated_at": now,
                    "tags": [],
                }
            )
        new_ids = (
            conn.execute(resources.insert().returning(resources.c.id, sort_by_parameter_order=True), rows)
            .scalars()
            .all()
        )
        real = dict(zip(roots, new_ids, strict=True))

    def final(rid: int) -> int:
        root = memory.find(rid)
        return real.get(root, root)

    merges = [(loser, final(survivor)) for loser, survivor in merges]
    result = [final(chosen[index]) for index in order]
    by_record = [final(rid) for rid in chosen]
    _add_identifiers(
        conn,
        tenant_id,
        [{} if i in fast else ids for i, ids in enumerate(evidence)],
        by_record,
        memory.stored,
    )
    _record_sources(
        conn,
        tenant_id,
        provider,
        product,
        batch_id,
        unique_refs,
        evidence,
        keys,
        by_record,
        last_seen,
        now,
        stored_hosts,
    )
    _touch(conn, tenant_id, by_record, last_seen, unique_refs, now)
    _describe(conn, tenant_id, memory, unique_refs, chosen, real, final, set(fast.values()))
    here = {(provider, key) for key in keys}
    detach = _left_behind(memory, {memory.find(rid) for rid in chosen}, here) if allow_merge else []
    return Resolution(
        ids=result, merges=merges, detach=[(final(rid), source_id) for rid, source_id in detach]
    )


def _left_behind(memory: _Evidence, touched: set[int], here: set[tuple[str, str]]) -> list[tuple[int, int]]:
    """Address-only host records that joined a machine by an address the machine has left.

    A stored host record with nothing but addresses, all of which the resource's named host
    records (a name, a MAC or a strong identifier) no longer report as current, while a
    named record at least as recent shows the machine elsewhere: it is another machine that
    took the address over (DHCP), joined before the move was known.  Records of this chunk
    are left alone (they were decided with what is known now).
    """
    found = []
    for rid in sorted(touched):
        if rid >= TEMP_BASE:
            continue
        named = [
            (ids, seen) for ids, seen in memory.hosts.get(rid, ()) if not _only_addresses(ids) or ids.get(MAC)
        ]
        named_seen = [seen for _, seen in named if seen is not None]
        if not named_seen:
            continue
        latest = max(named_seen)
        current = {
            v
            for ids, seen in named
            if seen is not None and latest - seen <= STALE_AFTER
            for kind in IPS
            for v in ids.get(kind, ())
        }
        ever = {v for ids, _ in named for kind in IPS for v in ids.get(kind, ())}
        for source_id, record, ids, seen in memory.stored_hosts.get(rid, ()):
            if record in here or not _only_addresses(ids) or ids.get(MAC) or seen is None:
                continue
            addresses = {v for kind in IPS for v in ids.get(kind, ())}
            if addresses and addresses & ever and not addresses & current and latest >= seen - STALE_AFTER:
                found.append((rid, source_id))
    return found


def _decide(
    memory: _Evidence,
    ids: dict,
    provider: str,
    key: str,
    allow_merge: bool,
    merges: list[tuple[int, int]],
    seen: datetime | None = None,
) -> int | None:
    known = memory.records.get((provider, key))
    known = memory.find(known) if known is not None else None
    candidates = {
        memory.find(rid)
        for kind in MATCH_KINDS
        for value in ids.get(kind, ())
        for rid in memory.holders.get((kind, value), ())
    }
    if known is not None:
        candidates.add(known)
    if not candidates:
        return None

    def unique_ip(value: str) -> bool:
        kind = "ipv6" if ":" in split_scope(value)[0] else "ipv4"
        holders = {memory.find(rid) for rid in memory.holders.get((kind, value), ())}
        return len([rid for rid in holders if value not in memory.stale(rid)]) == 1

    # the record's own addresses are stale when a machine it names by other evidence was seen
    # later at other addresses (an older scan of a host that has moved on)
    record_stale: frozenset = frozenset()
    addresses = {v for kind in IPS for v in ids.get(kind, ())}
    if addresses and seen is not None:
        tie = set(ids.get(MAC, ())) | set(ids.get(NAME, ()))
        for rid in candidates:
            if any(
                set(ids.get(kind, ())) & memory.of.get(rid, {}).get(kind, set())
                for kind in STRONG + (NAME, MAC)
            ):
                for other, later in memory.hosts.get(rid, ()):
                    others = {v for kind in IPS for v in other.get(kind, ())}
                    if (
                        later is not None
                        and later - seen > STALE_AFTER
                        and others
                        and not others & addresses
                        and tie & (set(other.get(MAC, ())) | set(other.get(NAME, ())))
                    ):
                        record_stale = frozenset(addresses)
                        break
    ranked = []
    for rid in candidates:
        theirs = memory.of.get(rid, {})
        if conflicts(ids, theirs):
            continue
        rule = _rule(ids, theirs, unique_ip, memory.stale(rid), record_stale)
        if rule is None and rid == known:
            rule = 6  # this provider's own host record, already resolved here: the same machine
        if rule is not None:
            ranked.append((rule, rid != known, rid))
    if not ranked:
        return None
    ranked.sort()
    group = [ranked[0][2]]
    if allow_merge:
        combined: dict[str, set[str]] = defaultdict(set)
        for kind, values in ids.items():
            combined[kind].update(values)
        for kind, values in memory.of.get(group[0], {}).items():
            combined[kind].update(values)
        for _, _, rid in ranked[1:]:
            theirs = memory.of.get(rid, {})
            if conflicts(combined, theirs) or any(memory.separated(rid, other) for other in group):
                continue
            group.append(rid)
            for kind, values in theirs.items():
                combined[kind].update(values)
    survivor = min(group)
    for loser in sorted(group):
        if loser != survivor:
            if loser < TEMP_BASE:
                merges.append((loser, survivor))
            memory.absorb(loser, survivor)
    return survivor


def _load(
    conn: Connection,
    tenant_id: int,
    provider: str,
    evidence: list[dict],
    known: dict[str, int],
    memory: _Evidence,
) -> None:
    """The candidates of the chunk's records, with all their identifiers, separations and host records."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for ids in evidence:
        for kind in MATCH_KINDS:
            wanted[kind].update(ids.get(kind, ()))
    candidates: set[int] = set()
    for kind, values in sorted(wanted.items()):
        if not values:
            continue
        rows = conn.execute(
            keyed(
                conn,
                select(identifiers.c.resource_id).where(
                    identifiers.c.tenant_id == tenant_id, identifiers.c.kind == kind
                ),
                (identifiers.c.value,),
                sorted(values),
            )
        )
        candidates.update(rid for (rid,) in rows)
    candidates.update(known.values())
    if not candidates:
        return
    ordered = sorted(candidates)
    for start in range(0, len(ordered), 5000):
        part = ordered[start : start + 5000]
        # By resource id alone (the candidates are the tenant's: found through its identifiers and
        # host records): beside ``tenant_id = :t`` the primary key (tenant, kind, value, resource)
        # looks cheaper to the planner without statistics, and it reads all the tenant's
        # identifiers for each id.
        for kind, value, rid in conn.execute(
            keyed(
                conn,
                select(identifiers.c.kind, identifiers.c.value, identifiers.c.resource_id),
                (identifiers.c.resource_id,),
                part,
            )
        ):
            memory.stored.add((kind, value, rid))
            if kind in KINDS:
                memory.of[rid][kind].add(value)
                memory.holders[(kind, value)].add(rid)
        for rid, name, os_, kind in conn.execute(
            keyed(
                conn,
                select(resources.c.id, resources.c.name, resources.c.os, resources.c.kind).where(
                    resources.c.tenant_id == tenant_id
                ),
                (resources.c.id,),
                part,
                unique=True,
            )
        ):
            memory.described[rid] = (name, os_, kind)
        for rid, idents, seen, source_id, key, source_provider in conn.execute(
            keyed(
                conn,
                select(
                    resource_sources.c.resource_id,
                    resource_sources.c.identifiers,
                    resource_sources.c.last_seen,
                    resource_sources.c.id,
                    resource_sources.c.record_key,
                    resource_sources.c.provider,
                ).where(resource_sources.c.tenant_id == tenant_id),
                (resource_sources.c.resource_id,),
                part,
            )
        ):
            ids = _host_ids(idents)
            memory.hosts[rid].append((ids, _aware(seen)))
            memory.stored_hosts[rid].append((source_id, (source_provider, key), ids, _aware(seen)))
        for a, b in conn.execute(
            select(separations.c.resource_a, separations.c.resource_b).where(
                separations.c.tenant_id == tenant_id,
                or_(
                    in_values(conn, separations.c.resource_a, part),
                    in_values(conn, separations.c.resource_b, part),
                ),
            )
        ):
            memory.apart.add((min(a, b), max(a, b)))
    # Holders outside the candidates matter for "the only resource holding that IP": counted above,
    # since every resource holding one of the chunk's IPs is a candidate.
    for record, rid in known.items():
        memory.records[(provider, record)] = rid


def _stored_host_records(conn: Connection, tenant_id: int, provider: str, keys: list[str]) -> dict:
    """The provider's stored host records of these keys: record key -> row."""
    stored = {}
    for start in range(0, len(keys), 5000):
        for row in conn.execute(
            keyed(
                conn,
                select(
                    resource_sources.c.id,
                    resource_sources.c.record_key,
                    resource_sources.c.resource_id,
                    resource_sources.c.identifiers,
                    resource_sources.c.first_seen,
                    resource_sources.c.last_seen,
                    resource_sources.c.product,
                ).where(resource_sources.c.tenant_id == tenant_id, resource_sources.c.provider == provider),
                (resource_sources.c.record_key,),
                keys[start : start + 5000],
                unique=True,
            )
        ):
            stored[row.record_key] = row
    return stored


def _within(ids: dict, stored: dict | None) -> bool:
    """True when a record's identifiers are all among those its stored host record contributed."""
    stored = stored or {}
    for kind, values in ids.items():
        if kind == NAME:
            continue
        have = stored.get(kind)
        if not have or not set(values) <= set(have):
            return False
    return True


def _host_ids(stored: dict | None) -> dict[str, set[str]]:
    """A stored host record's identifiers, with the short names its names give."""
    ids = {kind: set(values) for kind, values in (stored or {}).items() if isinstance(values, list)}
    names = {n for kind in ("fqdn", "hostname", "netbios") for n in map(_name, ids.get(kind, ())) if n}
    names |= {n for n in map(_name, ids.get("cloud_name", ())) if n}
    if names:
        ids[NAME] = names | ids.get(NAME, set())
    return ids


def _os(value: str | None) -> str | None:
    return value.strip()[:200] if value and value.strip() else None


def _add_identifiers(
    conn: Connection,
    tenant_id: int,
    evidence: list[dict],
    by_record: list[int],
    stored: set[tuple[str, str, int]],
) -> None:
    rows: dict[tuple[str, str, int], dict] = {}
    for ids, rid in zip(evidence, by_record, strict=True):
        for kind, values in ids.items():
            for value in values:
                rows.setdefault(
                    (kind, value, rid),
                    {"tenant_id": tenant_id, "kind": kind, "value": value, "resource_id": rid},
                )
    if not rows:
        return
    missing = [row for key, row in sorted(rows.items()) if key not in stored]
    if missing:  # ON CONFLICT DO NOTHING: a row a resource merge moved here meanwhile
        insert_rows(conn, identifiers, missing, conflict=())


def _record_sources(
    conn, tenant_id, provider, product, batch_id, refs, evidence, keys, by_record, last_seen, now, stored
) -> None:
    """Upsert the provider's host records (provenance): which resource each went into, with what."""
    rows: dict[str, dict] = {}
    for ref, ids, key, rid, when in zip(refs, evidence, keys, by_record, last_seen, strict=True):
        row = rows.get(key)
        if row is None:
            rows[key] = {
                "tenant_id": tenant_id,
                "provider": provider,
                "product": product,
                "record_key": key,
                "host_key": (ref.host_key or "").strip()[:500] or None,
                "resource_id": rid,
                "identifiers": {kind: sorted(values) for kind, values in ids.items() if kind != NAME},
                "first_seen": when,
                "last_seen": when,
                "batch_id": batch_id,
                "created_at": now,
                "updated_at": now,
            }
        else:  # one host record with several refs in the chunk (evidence gathered on the way)
            for kind, values in ids.items():
                if kind != NAME:
                    row["identifiers"][kind] = sorted(set(row["identifiers"].get(kind, [])) | set(values))
            if when is not None and (row["last_seen"] is None or when > row["last_seen"]):
                row["last_seen"] = when
            row["resource_id"] = rid
    keys_sorted = sorted(rows)
    inserts, changes, seen_only = [], [], []
    for key in keys_sorted:
        row = rows[key]
        old = stored.get(key)
        if old is None:
            inserts.append(row)
            continue
        merged = {
            kind: sorted(set(values) | set(row["identifiers"].get(kind, [])))
            for kind, values in (old.identifiers or {}).items()
        }
        for kind, values in row["identifiers"].items():
            merged.setdefault(kind, sorted(values))
        later = row["last_seen"] is not None and (
            old.last_seen is None or row["last_seen"] > _aware(old.last_seen)
        )
        if (
            old.resource_id == row["resource_id"]
            and merged == (old.identifiers or {})
            and not (product and old.product != product)
        ):
            if later:  # the common case of a re-push: only the sighting moves
                seen_only.append(
                    {"id": old.id, "last_seen": row["last_seen"], "batch_id": batch_id, "updated_at": now}
                )
        else:
            changes.append(
                {
                    "id": old.id,
                    "resource_id": row["resource_id"],
                    "identifiers": merged,
                    "last_seen": row["last_seen"] if later else old.last_seen,
                    "product": product or old.product,
                    "batch_id": batch_id,
                    "updated_at": now,
                }
            )
    if inserts:
        insert_rows(conn, resource_sources, inserts, conflict=("tenant_id", "provider", "record_key"))
    if changes:  # one statement (unnest on PostgreSQL), not one per host record
        update_rows(conn, resource_sources, sorted(changes, key=lambda c: c["id"]))
    if seen_only:
        update_rows(conn, resource_sources, sorted(seen_only, key=lambda c: c["id"]))


def _aware(value):
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _best_os(refs, members) -> str | None:
    current = None
    for index in members:
        current = better_os(current, refs[index].os)
    return current


def _describe(conn, tenant_id, memory: _Evidence, refs, chosen, real, final, known_only: set[int]) -> None:
    """Name, OS and kind of the stored resources this chunk touched, from all they are now known by.

    ``known_only``: resources only known host records reached (nothing new: the name stays);
    their OS and kind may still improve.
    """
    missing = sorted(rid for rid in known_only if memory.find(rid) not in memory.described)
    for start in range(0, len(missing), 5000):
        for rid, name, os_, kind in conn.execute(
            keyed(
                conn,
                select(resources.c.id, resources.c.name, resources.c.os, resources.c.kind).where(
                    resources.c.tenant_id == tenant_id
                ),
                (resources.c.id,),
                missing[start : start + 5000],
                unique=True,
            )
        ):
            memory.described[rid] = (name, os_, kind)
    changes = []
    touched: dict[int, list[int]] = defaultdict(list)
    for index, rid in enumerate(chosen):
        touched[memory.find(rid)].append(index)
    for root, members in sorted(touched.items()):
        if root >= TEMP_BASE:
            continue  # inserted with them
        name, os_, kind = memory.described.get(root, (None, None, None))
        new_name = (best_name(memory.of[root]) if root in memory.of else None) or name
        new_os, new_kind = os_, kind
        for index in members:
            new_os = better_os(new_os, refs[index].os)
            new_kind = better_kind(new_kind, refs[index].kind)
        if (new_name, new_os, new_kind) != (name, os_, kind):
            changes.append({"rid": final(root), "new_name": new_name, "new_os": new_os, "new_kind": new_kind})
            memory.described[root] = (new_name, new_os, new_kind)
    if changes:  # the ids are the tenant's: they came from its identifiers
        update_rows(
            conn,
            resources,
            [
                {"id": c["rid"], "name": c["new_name"], "os": c["new_os"], "kind": c["new_kind"]}
                for c in sorted(changes, key=lambda c: c["rid"])
            ],
        )


def _touch(conn, tenant_id, by_record, last_seen, refs, now) -> None:
    """Seen times: a resource was first seen at the earliest sighting of it, whatever the push order."""
    latest: dict[int, datetime] = {}
    earliest: dict[int, datetime] = {}
    for rid, when in zip(by_record, last_seen, strict=True):
        if when is not None and (rid not in latest or when > latest[rid]):
            latest[rid] = when
        if when is not None and (rid not in earliest or when < earliest[rid]):
            earliest[rid] = when
    _move_seen(conn, tenant_id, "first_seen", earliest, earlier=True)
    _move_seen(conn, tenant_id, "last_seen", latest, earlier=False, now=now)


def _move_seen(
    conn, tenant_id: int, column: str, values: dict[int, datetime], earlier: bool, now=None
) -> None:
    """Move each resource's ``column`` to its value when that is earlier (first seen) or later (last seen)."""
    if not values:
        return
    ordered = sorted(values.items())
    op = ">" if earlier else "<"
    if is_postgres(conn):
        touch = ", updated_at = %s" if now is not None else ""
        # The tenant's resources among the ids are read by primary key, whatever the statistics:
        # ``t.id = ANY(:ids)`` (the chunk's ids as one array, which the planner counts) makes the
        # index on ``id`` the way to them (or the tenant's range of ``ix_resources_tenant_id``
        # when the tenant holds fewer resources than that), and the values join them by hash.  Joined to the
        # values alone (``t.id = k.id``, or a keyed LATERAL subquery of ids), ``resources`` was
        # planned as a hash join over a sequential scan of the whole table for every chunk:
        # 100,000 resources read twice per chunk in a store of 5,000,000 findings (issue 14:
        # 3.2 s of a 100,000-finding push, against 0.9 s into an empty store).  An array the
        # planner cannot count (``ANY(ARRAY(SELECT ...))``) looks like a few rows, and on a
        # tenant without statistics it joined them to the values by a nested loop: 5,000 x 5,000
        # comparisons, 0.3 s a chunk.  ``tenant_id`` is checked on each row found, and a row
        # another transaction updated meanwhile is checked again in its new version.
        ids = [rid for rid, _ in ordered]
        conn.exec_driver_sql(
            f"UPDATE resources AS t SET {column} = k.seen{touch} "
            "FROM unnest(%b::bigint[], %b::timestamptz[]) AS k(id, seen) "
            "WHERE t.id = k.id AND t.id = ANY(%b::bigint[]) AND t.tenant_id = %s "
            f"AND (t.{column} IS NULL OR t.{column} {op} k.seen)",
            ((now,) if now is not None else ()) + (ids, [when for _, when in ordered], ids, tenant_id),
        )
        return
    current = resources.c[column]
    moved = current > bindparam("seen") if earlier else current < bindparam("seen")
    statement = (
        update(resources)
        .where(
            and_(
                resources.c.id == bindparam("rid"),
                resources.c.tenant_id == tenant_id,
                current.is_(None) | moved,
            )
        )
        .values({column: bindparam("seen"), **({"updated_at": now} if now is not None else {})})
    )
    conn.execute(statement, [{"rid": rid, "seen": when} for rid, when in ordered])


def insert_separation(conn: Connection, tenant_id: int, a: int, b: int, actor: str | None) -> None:
    insert_rows(
        conn,
        separations,
        [
            {
                "tenant_id": tenant_id,
                "resource_a": min(a, b),
                "resource_b": max(a, b),
                "created_at": utcnow(),
                "actor": actor,
            }
        ],
        conflict=("tenant_id", "resource_a", "resource_b"),
    )
