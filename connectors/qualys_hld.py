"""Qualys VM Host List Detection XML (root ``HOST_LIST_VM_DETECTION_OUTPUT``) -> FindingRecord.

The output of ``/api/2.0/fo/asset/host/vm/detection/`` (and its v3/v4/v5 successors) is
streamed with ``xmlsafe.iterparse``: each ``DETECTION`` becomes one record and is freed at
once, and each finished ``HOST`` is freed too, so memory stays flat however large the
output is.

Resource, from the ``HOST`` element (the fields before its ``DETECTION_LIST``):
    ID -> host_key (provenance) and extra["host_id"]: never an identifier (an IP-tracked
    host gets a new ID when its IP changes)
    ASSET_ID -> agent_id as "qualys-asset:<id>" (numeric, so namespaced; the same value as
    the "Asset Id" of the VMDR CSV exports), else QG_HOSTID -> agent_id (the Cloud Agent
    UUID); both also in extra
    DNS, else DNS_DATA/FQDN, else DNS_DATA/HOSTNAME -> fqdn when it has a dot, else hostname
    NETBIOS -> netbios, IP -> ipv4 (ipv6 when it is one), IPV6 -> ipv6, OS -> os,
    NETWORK_ID -> network ("0", the Global Default Network, -> None),
    EC2_INSTANCE_ID, else CLOUD_RESOURCE_ID -> instance_id (never cloud_id: the cloud
    resource id of other sources is an ARN / full id); kind "host"; name = DNS, NetBIOS
    name or IP.
Finding, per ``DETECTION``:
    QID -> vendor_id (a string, the key of the knowledge base, see ``qualys_kb``);
    title = "QID <qid>": the output has no titles and no CVEs, the gateway fills them in
    from the tenant's Qualys knowledge base (``qualys_kb`` pushes), cves empty;
    SEVERITY 1-5 -> informational/low/medium/high/critical (severity_original, scale
    "qualys 1-5"); a TYPE of "Info" (information gathered) is always informational;
    STATUS New/Active/Re-Opened -> open, Fixed -> fixed (missing: open; the original in
    extra["qualys_status"]); RESULTS -> evidence;
    FIRST_FOUND_DATETIME -> first_seen, LAST_FOUND_DATETIME -> last_seen,
    LAST_UPDATE_DATETIME (else LAST_PROCESSED_DATETIME, else LAST_FIXED_DATETIME) ->
    provider_timestamp; TYPE, SSL, FQDN, INSTANCE, QDS, UNIQUE_VULN_ID -> extra.
Observation, per DETECTION of TYPE "Info" (information gathered: never a finding):
    the same provider_id, resource and times; name "QID <qid>"; RESULTS -> evidence (and
    value when it is one short line); PORT/PROTOCOL -> port/protocol; category by QID
    (6 DNS Host Name, 43007 MAC: identity; 45017: os; 82023/82004: port; 45006: network),
    else "other".  No scan name: the output has none (scan None).
    provider_id = UNIQUE_VULN_ID when present, else "<host ID>|<QID>|<PORT>/<PROTOCOL>"
    (with "|<FQDN>" and "|<INSTANCE>" appended when the detection has them, so the
    virtual-host and database-instance variants of one QID stay distinct).
A DETECTION without a QID, with a severity outside 1-5, an unknown status or a bad date,
or on a host without any identifier, gives a Rejected record ("HOST[2]/DETECTION[5]");
the other detections still come out.  A document with another root element is a
FormatError naming it; a Qualys API error (``SIMPLE_RETURN``) is a FormatError quoting it.

The helpers it shares with the other Qualys connectors (root sniffing, severity and
status mapping, HTML to text, CVSS, resource building, provider ids) are in ``_qualys``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from lxml import etree

from connectors._qualys import (
    QUALYS_SCALE,
    asset_agent_id,
    child_text,
    compact,
    evidence_text,
    info_category,
    info_value,
    is_information,
    make_resource,
    open_document,
    port_number,
    provider_key,
    qualys_network,
    qualys_severity,
    qualys_status,
    root_element,
    split_ips,
    stream_host_items,
    time_field,
)
from connectors.base import ParseOptions
from connectors.model import FindingRecord, Observation, Rejected, ResourceRef

FORMAT = "qualys_hld"
TITLE = "Qualys VM Host List Detection XML"
PRODUCT = "Qualys VMDR"
CONTENT_TYPES = ("application/xml", "text/xml")
RECORD_KIND = "findings"

ROOT = "HOST_LIST_VM_DETECTION_OUTPUT"

# -- the HLD connector -------------------------------------------------------------------


def sniff(head: bytes) -> bool:
    """An XML document whose root element is HOST_LIST_VM_DETECTION_OUTPUT."""
    return root_element(head) == ROOT


class _Host:
    """What a HOST element says of its resource, read once per host."""

    __slots__ = ("host_id", "resource", "error", "extra")

    def __init__(self, element: etree._Element | None) -> None:
        self.resource: ResourceRef | None = None
        self.error: str | None = None
        self.host_id: str | None = None
        self.extra: dict = {}
        if element is None:
            self.error = "DETECTION outside a HOST element"
            return
        self.host_id = child_text(element, "ID")
        asset_id = child_text(element, "ASSET_ID")
        qg_host_id = child_text(element, "QG_HOSTID")
        self.extra = {"host_id": self.host_id, "asset_id": asset_id, "qg_host_id": qg_host_id,
                      "tracking_method": child_text(element, "TRACKING_METHOD"),
                      "cloud_resource_id": child_text(element, "CLOUD_RESOURCE_ID")}
        try:
            self.resource = make_resource(
                ips=split_ips(child_text(element, "IP"), child_text(element, "IPV6")),
                dns=child_text(element, "DNS"),
                fqdn=child_text(element, "DNS_DATA/FQDN"),
                hostname=child_text(element, "DNS_DATA/HOSTNAME"),
                netbios=child_text(element, "NETBIOS"),
                agent_id=asset_agent_id(asset_id) or qg_host_id,
                instance_id=(child_text(element, "EC2_INSTANCE_ID")
                             or child_text(element, "CLOUD_RESOURCE_ID")),
                os=child_text(element, "OS"),
                network=qualys_network(child_text(element, "NETWORK_ID")),
                host_key=self.host_id,
            )
        except ValueError as exc:
            self.error = str(exc)


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream the detections of a Host List Detection document."""
    _, safe = open_document(stream, (ROOT,), TITLE)
    host: _Host | None = None
    current = -1
    for host_index, detection_index, element in stream_host_items(safe, "HOST", ("DETECTION",)):
        if host_index != current:  # the first detection of this HOST: read the host once
            current = host_index
            host = _Host(next(element.iterancestors("HOST"), None))
        position = f"HOST[{host_index}]/DETECTION[{detection_index}]"
        yield _detection(element, host, position)


def _detection(element: etree._Element, host: _Host, position: str) -> FindingRecord | Rejected:
    qid = child_text(element, "QID")
    unique_id = child_text(element, "UNIQUE_VULN_ID")
    port, protocol = child_text(element, "PORT"), child_text(element, "PROTOCOL")
    fqdn, instance = child_text(element, "FQDN"), child_text(element, "INSTANCE")
    provider_id = unique_id
    if provider_id is None and qid and host.host_id:
        provider_id = provider_key(host.host_id, qid, port, protocol, fqdn, instance)
    try:
        if not qid:
            raise ValueError("DETECTION has no QID")
        if host.resource is None:
            raise ValueError(host.error or "the host has no identifier")
        if provider_id is None:
            raise ValueError("the HOST has no ID and the DETECTION no UNIQUE_VULN_ID")
        qualys_type = child_text(element, "TYPE")
        level = child_text(element, "SEVERITY")
        severity = qualys_severity(level, qualys_type)
        if severity is None:
            raise ValueError(f"SEVERITY must be 1-5, not {level!r}")
        original_status = child_text(element, "STATUS")
        status = qualys_status(original_status)
        if status is None:
            raise ValueError(f"unknown STATUS {original_status!r} (New, Active, Re-Opened or Fixed)")
        provider_timestamp = None
        for name in ("LAST_UPDATE_DATETIME", "LAST_PROCESSED_DATETIME", "LAST_FIXED_DATETIME"):
            provider_timestamp = time_field(name, child_text(element, name))
            if provider_timestamp is not None:
                break
        if is_information(qualys_type):
            evidence = evidence_text(child_text(element, "RESULTS"))
            category = info_category(qid)
            return Observation(
                provider_id=provider_id,
                resource=host.resource,
                name=f"QID {qid}",
                category=category,
                value=info_value(category, evidence, port, protocol),
                vendor_id=qid,
                port=port_number(port),
                protocol=protocol.lower() if protocol and port_number(port) else None,
                evidence=evidence,
                first_seen=time_field("FIRST_FOUND_DATETIME", child_text(element, "FIRST_FOUND_DATETIME")),
                last_seen=time_field("LAST_FOUND_DATETIME", child_text(element, "LAST_FOUND_DATETIME")),
                provider_timestamp=provider_timestamp,
            )
        return FindingRecord(
            provider_id=provider_id,
            resource=host.resource,
            title=f"QID {qid}",
            severity=severity,
            severity_original=level,
            severity_scale=QUALYS_SCALE,
            vendor_id=qid,
            status=status,
            first_seen=time_field("FIRST_FOUND_DATETIME", child_text(element, "FIRST_FOUND_DATETIME")),
            last_seen=time_field("LAST_FOUND_DATETIME", child_text(element, "LAST_FOUND_DATETIME")),
            provider_timestamp=provider_timestamp,
            evidence=evidence_text(child_text(element, "RESULTS")),
            extra=compact({
                **host.extra,
                "qualys_status": original_status,
                "qualys_type": qualys_type,
                "unique_vuln_id": unique_id,
                "port": port,
                "protocol": protocol,
                "ssl": {"1": True, "0": False}.get(child_text(element, "SSL") or ""),
                "fqdn": fqdn,
                "instance": instance,
                "qds": child_text(element, "QDS"),
            }),
        )
    except ValueError as exc:
        return Rejected(position=position, reason=str(exc), provider_id=provider_id)
