"""Qualys VM scan report XML -> FindingRecord, Observation, in its two shapes.

``ASSET_DATA_REPORT`` (scan/host-based report, asset_data_report.dtd)
    HOST_LIST/HOST holds detections that only name their QID (VULN_INFO); the titles,
    severities, CVEs and texts are in GLOSSARY/VULN_DETAILS_LIST at the *end* of the file.
    The document is streamed and never held whole: each HOST and VULN_INFO is read into a
    small tuple and freed at once; the tuples are buffered (in memory up to 8 MiB, then in
    a temporary file) until the glossary has been read, and the records come out after it.
    Limitation: no record is emitted before the whole document has been read, and the
    glossary itself (per distinct QID: title, severity, CVEs, texts) is kept in memory;
    memory is therefore proportional to the number of distinct QIDs (plus hosts), not to
    the XML size.  A QID missing from the glossary gives a Rejected record.

    Resource (HOST): IP -> ipv4/ipv6, DNS -> fqdn when it has a dot else hostname,
    NETBIOS -> netbios, OPERATING_SYSTEM -> os, ASSET_ID -> agent_id "qualys-asset:<id>"
    (else QG_HOSTID); HOST_ID -> host_key (else the IP) and extra; then the identity facts
    of the host's information gathered items (see "Both" below).  The header's TITLE (or
    REPORT_TITLE) -> scan; the sample headers have none (COMPANY, TEMPLATE...): scan None.
    Finding (VULN_INFO + VULN_DETAILS of its QID): QID -> vendor_id; TITLE -> title;
    SEVERITY 1-5 -> informational/low/medium/high/critical (scale "qualys 1-5"; TYPE "Ig",
    information gathered, is always informational); VULN_STATUS New/Active/Re-Opened ->
    open, Fixed -> fixed (missing: open); CVE_ID_LIST/CVE_ID/ID ->
    cves; THREAT -> description, SOLUTION -> remediation (HTML to text); RESULT ->
    evidence; CVSS3_SCORE/CVSS3_BASE, else CVSS_SCORE/CVSS_BASE ("9.0 (AV:..)"), else the
    detection's CVSS3_FINAL/CVSS_FINAL -> cvss_score/cvss_vector; VENDOR_REFERENCE URLs ->
    references; FIRST_FOUND -> first_seen, LAST_FOUND -> last_seen; provider_timestamp is
    the latest of LAST_FOUND, LAST_FIXED and LAST_REOPENED, else the report's
    GENERATION_DATETIME.

``SCAN`` (legacy scan results, scan-1.dtd)
    IP elements (attribute value = address, name = DNS name, "No registered hostname"
    ignored; OS and NETBIOS_HOSTNAME children) hold VULNS, PRACTICES, INFOS and SERVICES,
    grouped in CAT elements, with the titles inline; the records of one IP are gathered
    (one host's worth of memory) and come out at its end.  The SCAN's ``value`` (the scan
    ref, "scan/1222134912.63524"), else the HEADER's TITLE key -> scan; the IP -> host_key.
    VULN/PRACTICE: number -> vendor_id, severity -> severity, TITLE -> title, cveid and
    CVE_ID_LIST -> cves, DIAGNOSIS -> description, SOLUTION -> remediation, RESULT ->
    evidence, CVSS3_BASE else CVSS_BASE -> cvss_score, port/protocol attributes of the item
    or its CAT; no status (open) and no per-detection dates: the HEADER's DATE key is
    last_seen and provider_timestamp.

Both: information gathered (VULN_INFO of TYPE "Ig", legacy INFO and SERVICE items) ->
Observation, never a finding: QID -> vendor_id, the glossary/inline TITLE -> name ("QID
<n>" when the glossary lacks it), RESULT -> evidence, PORT/PROTOCOL -> port/protocol,
category by QID (``_qualys.INFO_QIDS``), else by title (``info_category``); value: the
identity facts, else "443/tcp" for ports and services, else the result when it is one
short line; first/last seen as for findings (legacy: the DATE); scan as for findings.
Identity facts of a host's information gathered items go into the ResourceRef of every
record of that host (its own IP/DNS/NETBIOS/OS elements win): 6 "DNS Host Name" and
45039 "Host Names Found" -> fqdn (hostname without a dot), 82044 "NetBIOS Host Name" ->
netbios, 45017 "Operating System Detected" -> os, 43007 "Network Adapter MAC Address" ->
mac (the lowest of its MACs, sorted).
provider_id = "<IP or DNS>|<QID>|<port>/<protocol>" (with "|<FQDN>"/"|<INSTANCE>"
appended when a detection has them); a detection without a QID, with a bad severity,
status or date, or on a host without identifiers is Rejected ("HOST[2]/VULN_INFO[5]",
"IP[1]/VULN[3]"); the others still come out.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO, NamedTuple

import msgspec
from lxml import etree

from connectors._qualys import (
    QUALYS_SCALE,
    HostFacts,
    asset_agent_id,
    child_text,
    clip,
    compact,
    cvss,
    evidence_text,
    fact_value,
    html_to_text,
    identity_facts,
    info_category,
    info_value,
    is_information,
    make_resource,
    open_document,
    port_number,
    provider_key,
    qualys_severity,
    qualys_status,
    root_element,
    split_ips,
    stream_host_items,
    time_field,
    value_or_none,
)
from connectors.base import ParseOptions, find_cves
from connectors.model import FindingRecord, Observation, Rejected, ResourceRef

FORMAT = "qualys_scan_xml"
TITLE = "Qualys VM scan report XML"
PRODUCT = "Qualys VMDR"
CONTENT_TYPES = ("application/xml", "text/xml")
RECORD_KIND = "findings"

ASSET_DATA_REPORT = "ASSET_DATA_REPORT"
SCAN = "SCAN"
ROOTS = (ASSET_DATA_REPORT, SCAN)
SPOOL_MEMORY = 8 << 20
_LEGACY_ITEMS = ("VULN", "PRACTICE", "INFO", "SERVICE")
_LEGACY_INFO = frozenset({"INFO", "SERVICE"})
_NO_HOSTNAME = "no registered hostname"


def sniff(head: bytes) -> bool:
    """An XML document whose root element is ASSET_DATA_REPORT or SCAN."""
    return root_element(head) in ROOTS


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Observation | Rejected]:
    """Stream the detections of a scan report, in either shape."""
    root, safe = open_document(stream, ROOTS, TITLE)
    if root == SCAN:
        yield from _parse_scan(safe)
    else:
        yield from _parse_asset_data_report(safe)


# -- shared ------------------------------------------------------------------------------


class _Host(NamedTuple):
    key: str | None  # IP or DNS name: the host part of provider ids
    resource: ResourceRef | None
    error: str | None
    extra: dict


def _host(
    ip: str | None, dns: str | None, netbios: str | None, os: str | None,
    agent_id: str | None = None, extra: dict | None = None, host_id: str | None = None,
) -> _Host:
    try:
        resource = make_resource(ips=split_ips(ip), dns=dns, netbios=netbios, agent_id=agent_id, os=os)
    except ValueError as exc:
        return _Host(None, None, str(exc), extra or {})
    ips = resource.ipv4 + resource.ipv6
    key = (ips[0] if ips else None) or resource.fqdn or resource.hostname or resource.netbios
    resource.host_key = host_id or key
    return _Host(key, resource, None, extra or {})


def _observation(
    *, provider_id: str, resource: ResourceRef, qid: str, title: str | None, result: str | None,
    port: str | None, protocol: str | None, scan: str | None, first_seen: datetime | None = None,
    last_seen: datetime | None = None, provider_timestamp: datetime | None = None,
) -> Observation:
    """An information-gathered item: a fact about the host, never a finding."""
    evidence = evidence_text(result)
    category = info_category(qid, title)
    facts = identity_facts(qid, result)
    value = fact_value(facts) if facts else info_value(category, evidence, port, protocol)
    number = port_number(port)
    return Observation(
        provider_id=provider_id,
        resource=resource,
        name=title or f"QID {qid}",
        category=category,
        value=value,
        vendor_id=qid,
        port=number,
        protocol=protocol.lower() if protocol and number else None,
        evidence=evidence,
        first_seen=first_seen,
        last_seen=last_seen,
        provider_timestamp=provider_timestamp,
        scan=scan,
    )


def _references(element: etree._Element) -> list[str]:
    urls: list[str] = []
    for url in element.iterfind("VENDOR_REFERENCE_LIST/VENDOR_REFERENCE/URL"):
        value = (url.text or "").strip()
        if value and value not in urls:
            urls.append(value)
    return urls


# -- ASSET_DATA_REPORT -------------------------------------------------------------------


class _Details(NamedTuple):
    """What the glossary says of one QID."""

    title: str | None
    level: str | None
    cves: list[str]
    description: str | None
    remediation: str | None
    cvss_score: float | None
    cvss_vector: str | None
    references: list[str]
    category: str | None


def _details(element: etree._Element) -> _Details:
    score = vector = None
    for path in ("CVSS3_SCORE/CVSS3_BASE", "CVSS_SCORE/CVSS_BASE", "CVSS3_BASE", "CVSS_BASE"):
        score, vector = cvss(child_text(element, path))
        if score is not None:
            break
    return _Details(
        title=clip(child_text(element, "TITLE")),
        level=child_text(element, "SEVERITY"),
        cves=find_cves(*(cve.text for cve in element.iterfind("CVE_ID_LIST/CVE_ID/ID"))),
        description=html_to_text(element.findtext("THREAT")),
        remediation=html_to_text(element.findtext("SOLUTION")),
        cvss_score=score,
        cvss_vector=vector,
        references=_references(element),
        category=child_text(element, "CATEGORY"),
    )


# the compact tuple buffered per VULN_INFO, in this field order
_DETECTION_FIELDS = (
    "host", "position", "qid", "type", "port", "protocol", "fqdn", "instance", "ssl", "status",
    "first_found", "last_found", "last_fixed", "last_reopened", "result", "cvss3_final", "cvss_final",
)
_DETECTION_PATHS = (
    "TYPE", "PORT", "PROTOCOL", "FQDN", "INSTANCE", "SSL", "VULN_STATUS", "FIRST_FOUND", "LAST_FOUND",
    "LAST_FIXED", "LAST_REOPENED", "RESULT", "CVSS3_FINAL", "CVSS_FINAL",
)


class _Spool:
    """An append-only sequence of small tuples, in memory up to a limit, then on disk."""

    def __init__(self, memory_limit: int = SPOOL_MEMORY) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=memory_limit)
        self._encoder = msgspec.msgpack.Encoder()
        self.count = 0

    def append(self, item: tuple) -> None:
        data = self._encoder.encode(item)
        self._file.write(struct.pack(">I", len(data)))
        self._file.write(data)
        self.count += 1

    def __iter__(self) -> Iterator[list[Any]]:
        self._file.seek(0)
        decoder = msgspec.msgpack.Decoder()
        for _ in range(self.count):
            (size,) = struct.unpack(">I", self._file.read(4))
            yield decoder.decode(self._file.read(size))

    def close(self) -> None:
        self._file.close()


def _parse_asset_data_report(safe: BinaryIO) -> Iterator[FindingRecord | Observation | Rejected]:
    hosts: list[_Host] = []
    facts: list[HostFacts] = []
    glossary: dict[str, _Details] = {}
    generated: str | None = None
    scan: str | None = None
    spool = _Spool()
    current = -1
    host_slot = 0
    try:
        for host_index, item_index, element in stream_host_items(
            safe, "HOST", ("VULN_INFO",), ("GENERATION_DATETIME", "VULN_DETAILS", "HEADER")
        ):
            tag = element.tag
            if tag == "VULN_INFO":
                if host_index != current:  # the first VULN_INFO of this HOST: read the host once
                    current = host_index
                    hosts.append(_report_host(next(element.iterancestors("HOST"), None)))
                    facts.append(HostFacts())
                    host_slot = len(hosts) - 1
                values = (child_text(element, "QID"),
                          *(child_text(element, path) for path in _DETECTION_PATHS))
                if is_information(values[1]):
                    facts[host_slot].add(values[0], values[12])  # QID, RESULT
                spool.append((host_slot, f"HOST[{host_index}]/VULN_INFO[{item_index}]", *values))
            elif tag == "VULN_DETAILS":
                qid = child_text(element, "QID")
                if qid:
                    glossary[qid] = _details(element)
            elif tag == "GENERATION_DATETIME":
                generated = generated or (element.text or "").strip() or None
                scan = scan or _header_title(element.getparent())  # before its earlier siblings go
            elif tag == "HEADER":
                scan = scan or _header_title(element)
        for host, host_facts in zip(hosts, facts, strict=True):  # the whole host is known: its facts
            host_facts.apply(host.resource)
        try:
            report_time = time_field("GENERATION_DATETIME", generated)
        except ValueError:
            report_time = None
        for values in spool:
            detection = dict(zip(_DETECTION_FIELDS, values, strict=True))
            yield _report_record(detection, hosts[detection["host"]], glossary, report_time, scan)
    finally:
        spool.close()


def _header_title(header: etree._Element | None) -> str | None:
    if header is None or header.tag != "HEADER":
        return None
    return clip(child_text(header, "TITLE") or child_text(header, "REPORT_TITLE"))


def _report_host(element: etree._Element | None) -> _Host:
    if element is None:
        return _Host(None, None, "VULN_INFO outside a HOST element", {})
    asset_id = child_text(element, "ASSET_ID")
    qg_host_id = child_text(element, "QG_HOSTID")
    host_id = child_text(element, "HOST_ID")
    extra = compact({"host_id": host_id, "asset_id": asset_id,
                     "qg_host_id": qg_host_id, "tracking_method": child_text(element, "TRACKING_METHOD")})
    return _host(child_text(element, "IP"), child_text(element, "DNS"), child_text(element, "NETBIOS"),
                 child_text(element, "OPERATING_SYSTEM"), asset_agent_id(asset_id) or qg_host_id, extra,
                 host_id=host_id)


def _report_record(
    detection: dict, host: _Host, glossary: dict[str, _Details], report_time: datetime | None,
    scan: str | None = None,
) -> FindingRecord | Observation | Rejected:
    qid = detection["qid"]
    port, protocol = value_or_none(detection["port"]), value_or_none(detection["protocol"])
    provider_id = None
    if qid and host.key:
        provider_id = provider_key(host.key, qid, port, protocol, detection["fqdn"], detection["instance"])
    try:
        if not qid:
            raise ValueError("VULN_INFO has no QID")
        if host.resource is None:
            raise ValueError(host.error or "the host has no identifier")
        details = glossary.get(qid)
        first_seen = time_field("FIRST_FOUND", detection["first_found"])
        last_seen = time_field("LAST_FOUND", detection["last_found"])
        if is_information(detection["type"]):
            return _observation(
                provider_id=provider_id, resource=host.resource, qid=qid,
                title=details.title if details else None, result=detection["result"],
                port=port, protocol=protocol, scan=scan, first_seen=first_seen, last_seen=last_seen,
                provider_timestamp=last_seen or report_time,
            )
        if details is None:
            raise ValueError(f"QID {qid} is not described in the report's GLOSSARY (no title, no severity)")
        severity = qualys_severity(details.level, detection["type"])
        if severity is None:
            raise ValueError(f"GLOSSARY SEVERITY of QID {qid} must be 1-5, not {details.level!r}")
        status = qualys_status(detection["status"])
        if status is None:
            raise ValueError(f"unknown VULN_STATUS {detection['status']!r} (New, Active, Re-Opened or Fixed)")
        changes = [last_seen, time_field("LAST_FIXED", detection["last_fixed"]),
                   time_field("LAST_REOPENED", detection["last_reopened"])]
        provider_timestamp = max((t for t in changes if t is not None), default=report_time)
        score, vector = details.cvss_score, details.cvss_vector
        if score is None:
            score, vector = cvss(detection["cvss3_final"])
            if score is None:
                score, vector = cvss(detection["cvss_final"])
        return FindingRecord(
            provider_id=provider_id,
            resource=host.resource,
            title=details.title or f"QID {qid}",
            severity=severity,
            severity_original=details.level,
            severity_scale=QUALYS_SCALE,
            cves=details.cves,
            vendor_id=qid,
            status=status,
            description=details.description,
            remediation=details.remediation,
            first_seen=first_seen,
            last_seen=last_seen,
            provider_timestamp=provider_timestamp,
            cvss_score=score,
            cvss_vector=vector,
            evidence=evidence_text(detection["result"]),
            references=details.references,
            scan=scan,
            extra=compact({
                **host.extra,
                "qualys_status": detection["status"],
                "qualys_type": detection["type"],
                "port": port,
                "protocol": protocol,
                "ssl": {"true": True, "false": False}.get((detection["ssl"] or "").lower()),
                "fqdn": detection["fqdn"],
                "instance": detection["instance"],
                "category": details.category,
            }),
        )
    except ValueError as exc:
        return Rejected(position=detection["position"], reason=str(exc), provider_id=provider_id)


# -- legacy SCAN -------------------------------------------------------------------------


def _parse_scan(safe: BinaryIO) -> Iterator[FindingRecord | Observation | Rejected]:
    """Each IP's records are gathered (one host's worth), then its identity facts reach them all."""
    scan_date: str | None = None
    title: str | None = None
    scan_ref: str | None = None
    host: _Host | None = None
    facts = HostFacts()
    pending: list[FindingRecord | Observation | Rejected] = []
    current = -1
    for ip_index, item_index, element in stream_host_items(safe, "IP", _LEGACY_ITEMS, ("KEY",)):
        if element.tag == "KEY":
            if element.get("value") == "DATE" and scan_date is None:
                scan_date = (element.text or "").strip() or None
            elif element.get("value") == "TITLE" and title is None:
                title = clip((element.text or "").strip() or None)
            continue
        if ip_index != current:  # the first item of this IP: the previous host is complete
            if host is not None:
                facts.apply(host.resource)
            yield from pending
            pending, facts, current = [], HostFacts(), ip_index
            ip_element = next(element.iterancestors("IP"), None)
            host = _scan_host(ip_element)
            if scan_ref is None and ip_element is not None:
                root = ip_element.getroottree().getroot()
                scan_ref = clip(value_or_none(root.get("value"))) or title or ""
        if element.tag in _LEGACY_INFO:
            facts.add(value_or_none(element.get("number")), child_text(element, "RESULT"))
        pending.append(_scan_record(element, host, f"IP[{ip_index}]/{element.tag}[{item_index}]", scan_date,
                                    scan_ref or None))
    if host is not None:
        facts.apply(host.resource)
    yield from pending


def _header_time(value: str | None) -> datetime | None:
    try:
        return time_field("DATE", value)
    except ValueError:
        return None


def _scan_host(element: etree._Element | None) -> _Host:
    if element is None:
        return _Host(None, None, "scan item outside an IP element", {})
    name = (element.get("name") or "").strip()
    if name.lower() == _NO_HOSTNAME:
        name = ""
    netbios = child_text(element, "NETBIOS_HOSTNAME") or child_text(element, "NETBIOS")
    return _host(element.get("value"), name, netbios, child_text(element, "OS"))


def _scan_record(
    element: etree._Element, host: _Host, position: str, scan_date: str | None, scan: str | None = None
) -> FindingRecord | Observation | Rejected:
    qid = value_or_none(element.get("number"))
    category = element.getparent()
    cat = category if category is not None and category.tag == "CAT" else None
    port = value_or_none(element.get("port") or (cat.get("port") if cat is not None else None))
    protocol = value_or_none(element.get("protocol") or (cat.get("protocol") if cat is not None else None))
    fqdn = value_or_none(element.get("fqdn") or (cat.get("fqdn") if cat is not None else None))
    provider_id = provider_key(host.key, qid, port, protocol, fqdn) if qid and host.key else None
    try:
        if not qid:
            raise ValueError(f"{element.tag} has no number (QID)")
        if host.resource is None:
            raise ValueError(host.error or "the host has no identifier")
        scanned = _header_time(scan_date)  # a bad header DATE is no date, not a bad record
        if element.tag in _LEGACY_INFO:
            return _observation(
                provider_id=provider_id, resource=host.resource, qid=qid,
                title=clip(child_text(element, "TITLE")), result=child_text(element, "RESULT"),
                port=port, protocol=protocol, scan=scan, last_seen=scanned, provider_timestamp=scanned,
            )
        level = value_or_none(element.get("severity"))
        severity = qualys_severity(level)
        if severity is None or level not in ("1", "2", "3", "4", "5"):
            raise ValueError(f"severity must be 1-5, not {level!r}")
        score, vector = cvss(child_text(element, "CVSS3_BASE"))
        if score is None:
            score, vector = cvss(child_text(element, "CVSS_BASE"))
        return FindingRecord(
            provider_id=provider_id,
            resource=host.resource,
            title=clip(child_text(element, "TITLE")) or f"QID {qid}",
            severity=severity,
            severity_original=level,
            severity_scale=QUALYS_SCALE,
            cves=find_cves(element.get("cveid"),
                           *(cve.text for cve in element.iterfind("CVE_ID_LIST/CVE_ID/ID"))),
            vendor_id=qid,
            status="open",
            description=html_to_text(element.findtext("DIAGNOSIS")),
            remediation=html_to_text(element.findtext("SOLUTION")),
            last_seen=scanned,
            provider_timestamp=scanned,
            cvss_score=score,
            cvss_vector=vector,
            evidence=evidence_text(child_text(element, "RESULT")),
            references=_references(element),
            scan=scan,
            extra=compact({
                "qualys_type": element.tag,
                "category": cat.get("value") if cat is not None else None,
                "port": port,
                "protocol": protocol,
                "fqdn": fqdn,
            }),
        )
    except ValueError as exc:
        return Rejected(position=position, reason=str(exc), provider_id=provider_id)
