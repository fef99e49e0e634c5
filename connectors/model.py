"""The canonical records every connector yields and the merge consumes.

Connectors turn bytes into these structs; they know nothing of Flask or SQL.
Times are timezone-aware UTC ``datetime`` objects (or None).
"""

from __future__ import annotations

from datetime import datetime

import msgspec

SEVERITIES = ("informational", "low", "medium", "high", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}

# Identifier kinds a resource can carry, from strongest to weakest; the rules that use
# them are in gateway/merge/resources.py (its docstring has the table).
STRONG_IDENTIFIERS = ("cloud_id", "instance_id", "agent_id", "fqdn")
MEDIUM_IDENTIFIERS = ("hostname", "netbios", "cloud_name", "mac")
WEAK_IDENTIFIERS = ("ipv4", "ipv6")
IDENTIFIER_KINDS = STRONG_IDENTIFIERS + MEDIUM_IDENTIFIERS + WEAK_IDENTIFIERS


class ResourceRef(msgspec.Struct, kw_only=True):
    """What a scanner knows of the asset a finding is on."""

    cloud_id: str | None = None
    agent_id: str | None = None
    fqdn: str | None = None
    hostname: str | None = None
    netbios: str | None = None
    mac: str | None = None
    ipv4: list[str] = msgspec.field(default_factory=list)
    ipv6: list[str] = msgspec.field(default_factory=list)
    kind: str | None = None  # vm, host, container_image, cloud_resource, web_app
    name: str | None = None  # display name
    os: str | None = None  # plain text ("Microsoft Windows Server 2019"), never a list rendered as text
    # Identity evidence beyond the classic identifiers (gateway/merge/resources.py decides):
    instance_id: str | None = None  # a cloud instance id apart from the resource id (EC2 i-..., Azure vmId)
    cloud_name: str | None = None  # the cloud resource's `Name` tag: evidence like a hostname
    network: str | None = None  # the scope its IPs are meaningful in: Tenable network_id, Qualys
    #                             network id, cloud VPC id; None = the tenant's default scope
    # Provenance (never identity): the provider's own key of the host record this came from:
    # Nessus ReportHost name, Tenable asset UUID, Qualys host id, ASFF/CloudGuard resource id.
    host_key: str | None = None


class FindingRecord(msgspec.Struct, kw_only=True):
    """One provider record: a vulnerability or a failed/passed check on one resource.

    ``provider_id`` is the provider's own id of the record: (tenant, provider,
    provider_id) identifies it across pushes (DESIGN rule 2).
    """

    provider_id: str
    resource: ResourceRef
    title: str
    severity: str  # one of SEVERITIES
    severity_original: str | None = None  # the provider's own value, e.g. "4" or "High"
    severity_scale: str | None = None  # e.g. "qualys 1-5", "nessus 0-4"
    cves: list[str] = msgspec.field(default_factory=list)
    vendor_id: str | None = None  # QID, plugin id, rule id: the id when no CVE applies
    status: str = "open"  # open | fixed  (compliance: open = failed, fixed = passed)
    kind: str = "vulnerability"  # vulnerability | compliance
    description: str | None = None
    remediation: str | None = None
    recommendation: str | None = None  # recommendation type key; default by kind
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    provider_timestamp: datetime | None = None
    cvss_score: float | None = None
    cvss_vector: str | None = None
    evidence: str | None = None
    references: list[str] = msgspec.field(default_factory=list)
    extra: dict | None = None  # provider-specific fields worth keeping
    scan: str | None = None  # provenance: the scan / report / export name the record came from
    product: str | None = None  # provenance: the tool inside the provider when the format spans
    #                             several ("Tenable.sc" in a tenable_io push); else the connector's PRODUCT


class Observation(msgspec.Struct, kw_only=True):
    """An informational fact a scanner reports about a resource: never a finding.

    OS detection, installed software, open ports and services, FQDN/MAC/hostname facts,
    traceroute...  (Nessus severity 0, Qualys "Information Gathered" / type Info, Tenable.io
    ``info``).  Identity facts it carries belong in ``resource`` too (e.g. the FQDN of Nessus
    plugin 12053 "Host Fully Qualified Domain Name (FQDN) Resolution"), so that they feed
    the resource's identifiers.  (tenant, provider, provider_id) identifies it across pushes.
    """

    provider_id: str
    resource: ResourceRef
    name: str  # the check's title, e.g. "OS Identification"
    category: str = "other"  # os | software | port | service | identity | network | other
    value: str | None = None  # the fact itself, short: "Linux Kernel 5.15", "443/tcp https"
    vendor_id: str | None = None  # plugin id, QID
    port: int | None = None
    protocol: str | None = None  # tcp | udp | icmp
    service: str | None = None  # www, ssh, ...
    evidence: str | None = None  # the scanner's output, e.g. plugin_output
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    provider_timestamp: datetime | None = None
    scan: str | None = None
    product: str | None = None


class AlertRecord(msgspec.Struct, kw_only=True):
    """A threat detection in (a subset of) the Graph security alert schema."""

    provider_id: str
    title: str
    severity: str
    category: str | None = None
    description: str | None = None
    status: str = "newAlert"
    created: datetime | None = None
    last_modified: datetime | None = None
    provider_timestamp: datetime | None = None
    resource: ResourceRef | None = None
    recommended_actions: list[str] = msgspec.field(default_factory=list)
    extra: dict | None = None
    # Graph alerts_v2 state (None when the format has none of it)
    incident_id: str | None = None
    service_source: str | None = None
    detection_source: str | None = None
    mitre_techniques: list[str] | None = None
    first_activity: datetime | None = None
    last_activity: datetime | None = None
    evidence: list[dict] | None = None  # typed evidence objects, each with its "@odata.type"
    classification: str | None = None  # the provider's first word on these customer-owned fields
    determination: str | None = None


class Rejected(msgspec.Struct, kw_only=True):
    """A record the connector could not turn into a canonical record."""

    position: str  # e.g. "findings[17]", "ReportHost[2]/ReportItem[5]", "line 40"
    reason: str
    provider_id: str | None = None


class FormatError(Exception):
    """The input is not of the named format, or not well-formed: the batch fails."""



class VulnerabilityInfo(msgspec.Struct, kw_only=True):
    """Knowledge-base metadata of a provider's vulnerability id (e.g. a Qualys QID).

    Stored per (tenant, provider, vendor_id); findings that carry the vendor id are
    enriched from it, including those that arrived before it.
    """

    vendor_id: str
    title: str | None = None
    severity: str | None = None
    severity_original: str | None = None
    cves: list[str] = msgspec.field(default_factory=list)
    description: str | None = None
    remediation: str | None = None
    cvss_score: float | None = None
    cvss_vector: str | None = None
    provider_timestamp: datetime | None = None


class IndicatorRecord(msgspec.Struct, kw_only=True):
    """One threat-intelligence observable (gateway/intel/): an indicator naming several observables
    (a Graph tiIndicator with an IP and a domain, a STIX pattern with OR) is one record each."""

    external_id: str | None = None  # the Graph id / externalId, the STIX id
    observable_type: str  # ipv4 ipv6 domain url email md5 sha1 sha256 sha512 (connectors/_indicators.py)
    value: str  # normalized
    description: str | None = None
    threat_type: str | None = None
    tlp_level: str | None = None
    confidence: int | None = None  # 0-100
    action: str | None = None
    target_product: str | None = None
    pattern: str | None = None  # the STIX pattern, as pushed
    tags: list[str] = msgspec.field(default_factory=list)
    extra: dict | None = None
    valid_from: datetime | None = None
    expires_at: datetime | None = None
    provider_timestamp: datetime | None = None


class SecurityEventRecord(msgspec.Struct, kw_only=True):
    """One host security event (a logon, a process start, a connection, a group change), normalized.

    ``kind`` is one of ``EVENT_KINDS``; the typed fields are what detection rules query
    (gateway/detection/); ``raw`` (or ``raw_json``, its text) keeps the event as it was sent.
    """

    occurred_at: datetime
    kind: str
    resource: ResourceRef | None = None
    event_id: int | None = None  # the Windows event id (4625), or the OCSF class_uid (3002)
    outcome: str | None = None  # success | failure
    user: str | None = None  # the account the event is about (logon account, new member)
    target: str | None = None  # the group a member was added to, the account created
    source_ip: str | None = None  # where a logon came from; a connection's source
    remote_ip: str | None = None  # a connection's destination
    domain: str | None = None  # a queried or contacted domain name
    process: str | None = None  # the process image path
    hash: str | None = None  # the process image hash (sha256 preferred)
    raw: dict | None = None
    # the event's JSON text as sent, when the parser kept it (then ``raw`` is None): stored as it is,
    # not encoded again (connectors._json.iter_json_documents)
    raw_json: str | None = None


EVENT_KINDS = ("logon_success", "logon_failure", "logoff", "process_start", "network_connection",
               "account_created", "group_member_added", "other")


Record = FindingRecord | Observation | AlertRecord | VulnerabilityInfo | IndicatorRecord | SecurityEventRecord | Rejected
