"""Qualys VM Host List Detection XML (root ``HOST_LIST_VM_DETECTION_OUTPUT``) -> FindingRecord.

The output of ``/api/2.0/fo/asset/host/vm/detection/`` (and its v3/v4/v5 successors) is
streamed with ``xmlsafe.iterparse``: each ``DETECTION`` becomes one record and is freed at
once, and each finished ``HOST`` is freed too, so memory stays flat however large the
output is.

Resource, from the ``HOST`` element (the fields before its ``DETECTION_LIST``):
    ID -> extra["host_id"] (a subscription-local number: never used as an identifier)
    ASSET_ID -> agent_id as "qualys-asset:<id>" (numeric, so namespaced; the same value as
    the "Asset Id" of the VMDR CSV exports), else QG_HOSTID -> agent_id (the agent UUID)
    DNS, else DNS_DATA/FQDN, else DNS_DATA/HOSTNAME -> fqdn when it has a dot, else hostname
    NETBIOS -> netbios, IP -> ipv4 (ipv6 when it is one), IPV6 -> ipv6, OS -> os,
    CLOUD_RESOURCE_ID, else EC2_INSTANCE_ID -> cloud_id; kind "host"; name = DNS, NetBIOS
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
    provider_id = UNIQUE_VULN_ID when present, else "<host ID>|<QID>|<PORT>/<PROTOCOL>"
    (with "|<FQDN>" and "|<INSTANCE>" appended when the detection has them, so the
    virtual-host and database-instance variants of one QID stay distinct).
A DETECTION without a QID, with a severity outside 1-5, an unknown status or a bad date,
or on a host without any identifier, gives a Rejected record ("HOST[2]/DETECTION[5]");
the other detections still come out.  A document with another root element is a
FormatError naming it; a Qualys API error (``SIMPLE_RETURN``) is a FormatError quoting it.

The helpers below (root sniffing, severity and status mapping, HTML to text, CVSS,
resource building, provider ids) are shared by the other Qualys connectors
(``qualys_kb``, ``qualys_scan_xml``, ``qualys_csv``).
"""

from __future__ import annotations

import html
import ipaddress
import re
from collections.abc import Iterator
from datetime import datetime
from typing import BinaryIO

from lxml import etree

from connectors import xmlsafe
from connectors.base import ParseOptions, parse_time
from connectors.model import FindingRecord, FormatError, Rejected, ResourceRef

FORMAT = "qualys_hld"
TITLE = "Qualys VM Host List Detection XML"
CONTENT_TYPES = ("application/xml", "text/xml")
RECORD_KIND = "findings"

ROOT = "HOST_LIST_VM_DETECTION_OUTPUT"
QUALYS_SCALE = "qualys 1-5"
MAX_TEXT = 65536

# -- shared Qualys helpers ---------------------------------------------------------------

_ROOT_NAME = re.compile(
    rb"\A(?:\xef\xbb\xbf)?(?:\s+|<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*(?:\[.*?\])?\s*>)*"
    rb"<([A-Za-z_][\w.\-]*)[\s/>]",
    re.DOTALL,
)
_SEVERITIES = {"1": "informational", "2": "low", "3": "medium", "4": "high", "5": "critical"}
_INFO_TYPES = frozenset({"info", "ig", "information", "information gathered", "infos", "service", "services"})
_STATUSES = {
    "new": "open",
    "active": "open",
    "re-opened": "open",
    "reopened": "open",
    "re-open": "open",
    "fixed": "fixed",
}
_NO_VALUE = frozenset({"", "-", "'-", "n/a", "na", "none", "null"})
_BLOCK_TAG = re.compile(r"<\s*/?\s*(?:br|p|li|div|tr|h[1-6]|dt|dd|ul|ol|pre|table)\b[^<>]*>", re.IGNORECASE)
_LINK = re.compile(r"<a\b[^<>]*?href\s*=\s*[\"']?([^\"'\s<>]+)[\"']?[^<>]*>(.*?)</a\s*>",
                   re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^<>]*>", re.DOTALL)
_SPACES = re.compile(r"[^\S\n]+")
_NEWLINES = re.compile(r" ?\n[\s]*")
_SCORE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:\((.*?)\))?\s*\Z")
_HOSTNAME = re.compile(r"\A[A-Za-z0-9_](?:[A-Za-z0-9_\-.]*[A-Za-z0-9_])?\.?\Z")


def root_element(head: bytes) -> str | None:
    """The root element name of an XML document's first bytes, or None."""
    match = _ROOT_NAME.match(head)
    return match.group(1).decode("ascii", "replace") if match else None


def open_document(stream: BinaryIO, roots: tuple[str, ...], title: str) -> tuple[str, BinaryIO]:
    """Check a document's root element; return it and a stream of the whole document.

    Raises FormatError naming the root found, quoting a Qualys API error response.
    """
    tag, safe = xmlsafe.root_tag(stream)
    if tag == "SIMPLE_RETURN":
        raise FormatError(f"Qualys API error response instead of {title}: {_api_error(safe)}")
    if tag not in roots:
        expected = " or ".join(f"<{root}>" for root in roots)
        raise FormatError(f"not a {title} document: root element is <{tag}>, expected {expected}")
    return tag, safe


def _api_error(stream: BinaryIO) -> str:
    code = text = None
    for _, element in xmlsafe.iterparse(stream, tags=("CODE", "TEXT")):
        if element.tag == "CODE" and code is None:
            code = (element.text or "").strip()
        elif element.tag == "TEXT" and text is None:
            text = (element.text or "").strip()
    message = (text or "no error text")[:500]
    return f"code {code}: {message}" if code else message


def child_text(element: etree._Element, path: str) -> str | None:
    """The stripped text of a child element, None when absent or empty."""
    value = element.findtext(path)
    if value is None:
        return None
    value = value.strip()
    return value or None


def value_or_none(value: str | None) -> str | None:
    """A cell/element value, None for Qualys's empty markers ("", "-", "'-", "N/A")."""
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in _NO_VALUE else value


def clip(value: str | None) -> str | None:
    """A text cut to the longest a record keeps."""
    if value is None:
        return None
    return value[:MAX_TEXT]


def is_information(qualys_type: str | None) -> bool:
    """True for Qualys "information gathered" types (Info, Ig), which are not vulnerabilities."""
    return bool(qualys_type) and qualys_type.strip().lower() in _INFO_TYPES


def qualys_severity(level: str | None, qualys_type: str | None = None) -> str | None:
    """A Qualys severity level 1-5 as a canonical severity (information gathered: informational)."""
    severity = _SEVERITIES.get((level or "").strip())
    if severity is not None and is_information(qualys_type):
        return "informational"
    return severity


def qualys_status(value: str | None) -> str | None:
    """New/Active/Re-Opened -> open, Fixed -> fixed, missing -> open, anything else None."""
    if value is None or not value.strip():
        return "open"
    return _STATUSES.get(value.strip().lower())


def _link_text(match: re.Match) -> str:
    url, label = match.group(1), match.group(2).strip()
    if not label or label == url:
        return url
    return label if url in label else f"{label} ({url})"


def html_to_text(value: str | None) -> str | None:
    """Qualys HTML-ish text as plain text: tags removed, entities unescaped, spaces collapsed."""
    if not value:
        return None
    text = _LINK.sub(_link_text, value)
    text = _BLOCK_TAG.sub("\n", text)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = _SPACES.sub(" ", text)
    text = _NEWLINES.sub("\n", text).strip()
    return clip(text) or None


def evidence_text(value: str | None) -> str | None:
    """A Qualys RESULTS text: entities such as &apos; unescaped (tags kept: they may be output)."""
    if not value:
        return None
    return clip(html.unescape(value).strip()) or None


def cvss(value: str | None) -> tuple[float | None, str | None]:
    """A Qualys CVSS cell ("9.0 (AV:N/AC:H/...)", "5", "-") as (score, vector)."""
    value = value_or_none(value)
    if value is None:
        return None, None
    match = _SCORE.match(value)
    if match is None:
        return None, None
    score = float(match.group(1))
    if not 0.0 <= score <= 10.0:
        return None, None
    return score, (match.group(2) or None)


def time_field(name: str, value: str | None) -> datetime | None:
    """Parse a Qualys ISO 8601 date-time; ValueError naming the field when it is not one."""
    value = value_or_none(value)
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError:
        raise ValueError(f"{name} is not an ISO 8601 date-time: {value[:64]!r}") from None


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip().split("%")[0])
    except ValueError:
        return None


def split_ips(*values: str | None) -> tuple[list[str], list[str]]:
    """IPv4 and IPv6 addresses in cells/elements that may hold several ("a,b" or "a b")."""
    ipv4: list[str] = []
    ipv6: list[str] = []
    for value in values:
        for part in re.split(r"[,;\s]+", value or ""):
            address = _ip(part) if part else None
            if address is None:
                continue
            target = ipv4 if address.version == 4 else ipv6
            if str(address) not in target:
                target.append(str(address))
    return ipv4, ipv6


def asset_agent_id(asset_id: str | None) -> str | None:
    """A Qualys asset id as an agent_id, namespaced because it is a bare number."""
    asset_id = value_or_none(asset_id)
    return f"qualys-asset:{asset_id}" if asset_id else None


def make_resource(
    *,
    ips: tuple[list[str], list[str]] = ([], []),
    dns: str | None = None,
    fqdn: str | None = None,
    hostname: str | None = None,
    netbios: str | None = None,
    agent_id: str | None = None,
    cloud_id: str | None = None,
    os: str | None = None,
    name: str | None = None,
) -> ResourceRef:
    """A host ResourceRef; a DNS name goes to fqdn when it has a dot; ValueError without identifiers."""
    fqdn, hostname = value_or_none(fqdn), value_or_none(hostname)
    dns = value_or_none(dns)
    if dns and _HOSTNAME.match(dns) and _ip(dns) is None:
        if "." in dns.rstrip("."):
            fqdn = fqdn or dns
        else:
            hostname = hostname or dns
    if fqdn and (not _HOSTNAME.match(fqdn) or _ip(fqdn) is not None):
        fqdn = None
    if hostname and (not _HOSTNAME.match(hostname) or _ip(hostname) is not None):
        hostname = None
    if hostname and "." in hostname.rstrip("."):
        fqdn, hostname = fqdn or hostname, None
    ipv4, ipv6 = ips
    resource = ResourceRef(
        cloud_id=value_or_none(cloud_id),
        agent_id=value_or_none(agent_id),
        fqdn=fqdn,
        hostname=hostname,
        netbios=value_or_none(netbios),
        ipv4=list(ipv4),
        ipv6=list(ipv6),
        kind="host",
        os=value_or_none(os),
    )
    if not (resource.cloud_id or resource.agent_id or resource.fqdn or resource.hostname
            or resource.netbios or resource.ipv4 or resource.ipv6):
        raise ValueError("the host has no identifier (IP, DNS, NetBIOS name, asset or agent id)")
    resource.name = value_or_none(name) or fqdn or hostname or resource.netbios or (
        (ipv4 or ipv6 or [None])[0])
    return resource


def provider_key(host: str, qid: str, port: str | None, protocol: str | None, *qualifiers: str | None) -> str:
    """The stable "<host>|<qid>|<port>/<protocol>" id, qualified by fqdn/instance when present."""
    key = f"{host}|{qid}|{port or ''}/{(protocol or '').lower()}"
    for qualifier in qualifiers:
        if qualifier:
            key += f"|{qualifier}"
    return key


def compact(mapping: dict) -> dict | None:
    """A dict without its None values, or None when nothing is left."""
    result = {key: value for key, value in mapping.items() if value is not None}
    return result or None


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
                      "tracking_method": child_text(element, "TRACKING_METHOD")}
        try:
            self.resource = make_resource(
                ips=split_ips(child_text(element, "IP"), child_text(element, "IPV6")),
                dns=child_text(element, "DNS"),
                fqdn=child_text(element, "DNS_DATA/FQDN"),
                hostname=child_text(element, "DNS_DATA/HOSTNAME"),
                netbios=child_text(element, "NETBIOS"),
                agent_id=asset_agent_id(asset_id) or qg_host_id,
                cloud_id=child_text(element, "CLOUD_RESOURCE_ID") or child_text(element, "EC2_INSTANCE_ID"),
                os=child_text(element, "OS"),
            )
        except ValueError as exc:
            self.error = str(exc)


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream the detections of a Host List Detection document."""
    _, safe = open_document(stream, (ROOT,), TITLE)
    host_index = detection_index = 0
    host: _Host | None = None
    for event, element in xmlsafe.iterparse(safe, tags=("HOST", "DETECTION"), events=("start", "end")):
        if element.tag == "HOST":
            if event == "start":
                host_index += 1
                detection_index = 0
                host = None
            else:
                xmlsafe.release(element)
            continue
        if event == "start":
            continue
        detection_index += 1
        if host is None:
            host = _Host(next(element.iterancestors("HOST"), None))
        position = f"HOST[{host_index}]/DETECTION[{detection_index}]"
        yield _detection(element, host, position)
        xmlsafe.release(element)


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
