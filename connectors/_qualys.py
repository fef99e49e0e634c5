"""Helpers shared by the Qualys connectors (qualys_hld, qualys_kb, qualys_scan_xml, qualys_csv).

Root sniffing and API-error detection, the streaming of host elements and their items,
severity 1-5 and status mapping, HTML to text, CVSS cells, dates, host resources and
provider ids.  No connector lives here.
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
from connectors.base import parse_time
from connectors.model import FormatError, ResourceRef

QUALYS_SCALE = "qualys 1-5"
MAX_TEXT = 65536

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


def stream_host_items(
    stream: BinaryIO, host_tag: str, item_tags: tuple[str, ...], other_tags: tuple[str, ...] = ()
) -> Iterator[tuple[int, int, etree._Element]]:
    """Stream the items of a document's host elements, each freed once the consumer moves on.

    Yields ``(host_index, item_index, element)`` at the end of each element of
    ``item_tags``: the 1-based number of the enclosing host element (0 before the first)
    and of the item within it.  Elements of ``other_tags`` are yielded with item_index 0.
    Host elements are freed at their end, so memory stays flat however many there are.
    """
    host_index = item_index = 0
    tags = (host_tag, *item_tags, *other_tags)
    for event, element in xmlsafe.iterparse(stream, tags=tags, events=("start", "end")):
        if element.tag == host_tag:
            if event == "start":
                host_index += 1
                item_index = 0
            else:
                xmlsafe.release(element)
            continue
        if event == "start":
            continue
        if element.tag in item_tags:
            item_index += 1
            yield host_index, item_index, element
        else:
            yield host_index, 0, element
        xmlsafe.release(element)


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
    except (ValueError, OverflowError, OSError):  # a huge epoch number overflows
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
    instance_id: str | None = None,
    network: str | None = None,
    host_key: str | None = None,
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
        instance_id=value_or_none(instance_id),
        network=value_or_none(network),
        host_key=value_or_none(host_key),
    )
    if not (resource.cloud_id or resource.agent_id or resource.fqdn or resource.hostname
            or resource.netbios or resource.ipv4 or resource.ipv6 or resource.instance_id):
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


# -- observations (information gathered) ----------------------------------------------

# QIDs whose category is known without a title (the HLD output names no titles)
INFO_QIDS = {
    "6": "identity",  # DNS Host Name
    "43007": "identity",  # Network Adapter MAC Address
    "45039": "identity",  # Host Names Found
    "82044": "identity",  # NetBIOS Host Name
    "45017": "os",  # Operating System Detected
    "82023": "port",  # Open TCP Services List
    "82004": "port",  # Open UDP Services List
    "45006": "network",  # Traceroute
}
_INFO_TITLES = (
    (re.compile(r"operating system", re.IGNORECASE), "os"),
    (re.compile(r"open (?:tcp|udp) services|open ports?", re.IGNORECASE), "port"),
    (re.compile(r"host ?names?|netbios|mac address|fully qualified|fqdn", re.IGNORECASE), "identity"),
    (re.compile(r"traceroute|network adapter|routing|ip addresses", re.IGNORECASE), "network"),
    (re.compile(r"installed (?:software|applications|packages)|software", re.IGNORECASE), "software"),
    (re.compile(r"service|server (?:type|version)|banner", re.IGNORECASE), "service"),
)


def info_category(qid: str | None, title: str | None = None, default: str = "other") -> str:
    """The Observation category of an information-gathered QID: by QID, else by its title."""
    if qid in INFO_QIDS:
        return INFO_QIDS[qid]
    for pattern, category in _INFO_TITLES:
        if title and pattern.search(title):
            return category
    return default


def info_value(category: str, result: str | None, port: str | None, protocol: str | None) -> str | None:
    """The fact, short: "443/tcp" for a port, else the result when it is one short line."""
    if category in ("port", "service") and port and port.isdigit() and port != "0":
        return f"{port}/{(protocol or 'tcp').lower()}"
    lines = [line.strip() for line in (result or "").splitlines() if line.strip()]
    if len(lines) == 1 and len(lines[0]) <= 200:
        return lines[0]
    return None


def port_number(port: str | None) -> int | None:
    """A port number, None for none or 0."""
    return int(port) if port and port.isdigit() and port != "0" else None


def qualys_network(value: str | None) -> str | None:
    """A Qualys network id as a network scope; "0" (the Global Default Network) is no scope."""
    value = value_or_none(value)
    return None if value in (None, "0") else value


# identity facts of information-gathered QIDs: they feed the ResourceRef of every record
# of the host (its own elements/columns win)
IDENTITY_QIDS = frozenset({"6", "43007", "45017", "45039", "82044"})
_MAC = re.compile(r"(?<![0-9A-Fa-f:-])([0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5})(?![0-9A-Fa-f:-])")
_TABLE_HEADS = ("ip address", "host name", "operating system", "#table", "method")


def _table_rows(result: str) -> list[list[str]]:
    """The data rows of a Qualys tab-separated RESULT table (header rows dropped)."""
    rows = []
    for line in result.splitlines():
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split("\t")]
        if cells[0].lower().startswith(_TABLE_HEADS):
            continue
        rows.append(cells)
    return rows


def _mac(value: str) -> str:
    digits = re.sub(r"[^0-9a-fA-F]", "", value)
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2)).lower()


def identity_facts(qid: str | None, result: str | None) -> list[tuple[str, str]]:
    """(kind, value) facts of an identity QID's RESULT: dns, netbios, os, mac.

    6 "DNS Host Name" (IP, host name table) and 45039 "Host Names Found" (host name,
    source table) -> dns; 82044 "NetBIOS Host Name" -> netbios; 45017 "Operating System
    Detected" (first row of its table) -> os; 43007 "Network Adapter MAC Address" -> mac
    (every MAC in it, lower-case colon form).
    """
    if qid not in IDENTITY_QIDS or not result or not result.strip():
        return []
    facts: list[tuple[str, str]] = []
    if qid == "43007":
        return [("mac", _mac(mac)) for mac in _MAC.findall(result)]
    rows = _table_rows(result)
    if qid == "6":
        for cells in rows:
            name = cells[-1]
            if len(cells) >= 2 and _HOSTNAME.match(name) and _ip(name) is None:
                facts.append(("dns", name.rstrip(".").lower()))
    elif qid == "45039":
        for cells in rows:
            if _HOSTNAME.match(cells[0]) and _ip(cells[0]) is None:
                facts.append(("dns", cells[0].rstrip(".").lower()))
    elif qid == "82044":
        if rows and len(rows[0]) == 1 and _HOSTNAME.match(rows[0][0]):
            facts.append(("netbios", rows[0][0]))
    elif qid == "45017" and rows and rows[0][0]:
        facts.append(("os", rows[0][0][:500]))
    return facts


class HostFacts:
    """The identity facts gathered from a host's information-gathered items."""

    __slots__ = ("facts", "macs")

    def __init__(self) -> None:
        self.facts: dict[str, str] = {}
        self.macs: set[str] = set()

    def add(self, qid: str | None, result: str | None) -> list[tuple[str, str]]:
        facts = identity_facts(qid, result)
        for kind, value in facts:
            if kind == "mac":
                self.macs.add(value)
            else:
                self.facts.setdefault(kind, value)
        return facts

    def apply(self, resource: ResourceRef | None) -> None:
        """Fill what the host's own fields left empty (they win); the lowest MAC, sorted."""
        if resource is None:
            return
        dns = self.facts.get("dns")
        if dns and not resource.fqdn and not resource.hostname:
            if "." in dns:
                resource.fqdn = dns
            else:
                resource.hostname = dns
        if self.facts.get("netbios") and not resource.netbios:
            resource.netbios = self.facts["netbios"]
        if self.facts.get("os") and not resource.os:
            resource.os = self.facts["os"]
        if self.macs and not resource.mac:
            resource.mac = sorted(self.macs)[0]
        if resource.name is None or resource.name in resource.ipv4 + resource.ipv6:
            resource.name = resource.fqdn or resource.hostname or resource.netbios or resource.name


def fact_value(facts: list[tuple[str, str]]) -> str | None:
    """An identity observation's value: its facts, names first, then the MACs sorted."""
    names = [value for kind, value in facts if kind != "mac"]
    macs = sorted({value for kind, value in facts if kind == "mac"})
    return ", ".join(dict.fromkeys(names + macs))[:500] or None


def network_name(value: str | None) -> str | None:
    """A Qualys network (id or name) as a network scope; the Global Default Network is none."""
    value = value_or_none(value)
    if value is None or value == "0" or value.lower() == "global default network":
        return None
    return value
