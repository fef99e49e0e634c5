"""Tenable Nessus v2 XML (``.nessus``, root ``NessusClientData_v2``) -> FindingRecord.

The file is streamed with ``xmlsafe.iterparse``: each ``ReportItem`` becomes one record
and is freed at once, so memory stays flat however many hosts and items there are.

Resource, from the ``ReportHost``'s ``HostProperties`` tags:
    tenable-uuid, host-uuid -> agent_id (first present; UUIDs in lower-case dashed form)
    host-fqdn -> fqdn (a name without a dot goes to hostname; a URL, as in Tenable WAS
    exports, gives its host name, the URL becomes the display name, kind "web_app")
    hostname -> hostname, netbios-name -> netbios, mac-address -> mac (first valid),
    host-ip -> ipv4/ipv6, operating-system -> os (first line)
    the ReportHost ``name`` attribute is the fallback: an IP address goes to ipv4/ipv6,
    a name to fqdn when it has a dot, else to hostname.
Finding, per ReportItem:
    pluginID -> vendor_id; pluginName (or plugin_name) -> title; description (or
    synopsis) -> description; solution -> remediation ("n/a" dropped); plugin_output ->
    evidence; cve -> cves; see_also lines -> references;
    cvss3_base_score/cvss3_vector, else cvss4_*, else cvss_base_score/cvss_vector (WAS:
    cvssv3, cvss) -> cvss_score/cvss_vector (v3 vectors prefixed "CVSS:3.0/", v2 bare);
    severity attribute 0-4 -> informational/low/medium/high/critical (scale "nessus 0-4"),
    else risk_factor, else the CVSS score;
    vulnerability_state (Tenable.io exports: Active/New/Resurfaced -> open, Fixed ->
    fixed; any other state is Rejected), first_found/last_found -> first_seen/last_seen;
    without them last_seen is the host's end: HOST_END_TIMESTAMP (epoch), else HOST_END
    (a date like "Thu Jun 22 11:33:59 2017", taken as UTC though Nessus writes the
    scanner's local time there); provider_timestamp is that host end, else last_found.
    provider_id = "<host key>|<pluginID>|<port>/<protocol>", the host key being the
    first of agent id, fqdn, hostname, IP, netbios, mac (a web app: its URL), so the same
    host, plugin and port give the same id in every push.
A ReportItem without a pluginID, or a host without any identifier, gives a Rejected
record ("ReportHost[2]/ReportItem[5]"); the others still come out.  Nessus reports a
plugin twice on one port when it finds two installs: consecutive items with the same
provider_id are merged into one record (evidence, CVEs and references of both).

The helpers below (severity, dates, identifiers, CVSS, provider id) are shared by the
other Tenable connectors (tenable_io, tenable_csv).
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from connectors import xmlsafe
from connectors.base import ParseOptions, find_cves, parse_time, severity_from_cvss, severity_from_word
from connectors.model import (
    SEVERITIES,
    SEVERITY_RANK,
    FindingRecord,
    FormatError,
    Record,
    Rejected,
    ResourceRef,
)

FORMAT = "nessus"
TITLE = "Tenable Nessus v2 XML"
CONTENT_TYPES = ("application/xml", "text/xml", "application/x-nessus+xml")
RECORD_KIND = "findings"

MAX_TEXT = 65536
NESSUS_SCALE = "nessus 0-4"
RISK_SCALE = "tenable risk factor"

_ROOT = re.compile(
    rb"\A(?:\xef\xbb\xbf)?(?:\s+|<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*(?:\[.*?\])?\s*>)*"
    rb"<NessusClientData_v2[\s/>]",
    re.DOTALL,
)
_UUID_TAGS = ("tenable-uuid", "host-uuid")
TENABLE_STATES = {
    "active": "open",
    "new": "open",
    "open": "open",
    "reopened": "open",
    "resurfaced": "open",
    "fixed": "fixed",
}
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1
    )
}
# "Thu Jun 22 11:33:59 2017" (ctime style, the weekday optional)
_CTIME = re.compile(
    r"^(?:[A-Za-z]{3},?\s+)?([A-Za-z]{3})\s+(\d{1,2})\s+(\d{1,2}):(\d{2}):(\d{2})\s+(\d{4})$"
)
# "Feb 9, 2024 10:48:42 UTC" (Tenable.sc CSV exports)
_SC_TIME = re.compile(
    r"^([A-Za-z]{3})\s+(\d{1,2}),\s*(\d{4})\s+(\d{1,2}):(\d{2})(?::(\d{2}))?(?:\s+([A-Za-z]{1,5}|[+-]\d{2}:?\d{2}))?$"
)
_ZONES = {
    "UTC": 0, "GMT": 0, "Z": 0, "WET": 0, "BST": 1, "CET": 1, "CEST": 2, "EET": 2, "EEST": 3,
    "IST": 5.5, "JST": 9, "AEST": 10, "AEDT": 11,
    "EST": -5, "EDT": -4, "CST": -6, "CDT": -5, "MST": -7, "MDT": -6, "PST": -8, "PDT": -7,
    "AKST": -9, "AKDT": -8, "HST": -10,
}


def sniff(head: bytes) -> bool:
    """True when the document's root element is NessusClientData_v2."""
    return _ROOT.match(head[:65536]) is not None


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream one record per ReportItem of a Nessus v2 file."""
    root, stream = xmlsafe.root_tag(stream)
    if root == "NessusClientData":
        raise FormatError(
            "Nessus v1 format (root <NessusClientData>) is not supported: "
            "export the scan as Nessus v2 (.nessus, root <NessusClientData_v2>)"
        )
    if root != "NessusClientData_v2":
        raise FormatError(
            f"not a Nessus v2 file: the root element is <{root}>, expected <NessusClientData_v2>"
        )
    yield from merge_repeats(_records(stream))


def _records(stream: BinaryIO) -> Iterator[FindingRecord | Rejected]:
    host_index = 0
    item_index = 0
    host: _Host | None = None
    events = xmlsafe.iterparse(
        stream, tags=("ReportHost", "HostProperties", "ReportItem", "Policy"), events=("start", "end")
    )
    for event, element in events:
        tag = element.tag
        if event == "start":
            if tag == "ReportHost":
                host_index += 1
                item_index = 0
                host = _Host(element.get("name"))
            continue
        if tag == "ReportItem":
            item_index += 1
            position = f"ReportHost[{host_index}]/ReportItem[{item_index}]"
            if host is None:
                yield Rejected(position=position, reason="ReportItem outside a ReportHost")
            else:
                yield _item_record(element, host, position)
        elif tag == "HostProperties" and host is not None:
            host.add_properties(element)
        elif tag == "ReportHost":
            host = None
        xmlsafe.release(element)


class _Host:
    """What a ReportHost says of its host, gathered before its ReportItems."""

    def __init__(self, name: str | None) -> None:
        self.name = (name or "").strip()
        self.tags: dict[str, str] = {}
        self._resource: dict[str, Any] | None = None
        self.key: str | None = None

    def add_properties(self, element: Any) -> None:
        for tag in element.iterfind("tag"):
            name = tag.get("name")
            if name and tag.text and tag.text.strip():
                self.tags.setdefault(name, tag.text.strip())
        self._resource = None

    def resource_fields(self) -> dict[str, Any]:
        """Keyword arguments of the host's ResourceRef (computed once)."""
        if self._resource is None:
            self._resource = _host_resource(self.name, self.tags)
            self.key = host_key(self._resource)
        return self._resource

    def time(self, name: str) -> datetime | None:
        stamp = self.tags.get(f"{name}_TIMESTAMP")
        return parse_any_time(stamp) or parse_any_time(self.tags.get(name))


def _host_resource(name: str, tags: dict[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = {"kind": "host"}
    agent_id = next((normalize_uuid(tags[t]) for t in _UUID_TAGS if tags.get(t)), None)
    if agent_id:
        fields["agent_id"] = agent_id
    fqdn = tags.get("host-fqdn")
    url = None
    if fqdn and "://" in fqdn:
        url, fqdn = fqdn, urlsplit(fqdn).hostname
    elif "://" in name:
        url = name
        fqdn = fqdn or urlsplit(name).hostname
    if url or tags.get("system-type") == "web_application":
        fields["kind"] = "web_app"
        fields["name"] = url or name or None
    add_names(fields, fqdn, tags.get("hostname"))
    netbios = netbios_name(tags.get("netbios-name"))
    if netbios:
        fields["netbios"] = netbios
    mac = first_mac(tags.get("mac-address"))
    if mac:
        fields["mac"] = mac
    add_ips(fields, tags.get("host-ip"), tags.get("host-ips"))
    if name and not url:
        if ip_version(name):
            add_ips(fields, name)
        elif "fqdn" not in fields and "hostname" not in fields:
            add_names(fields, name)
    os_name = tags.get("operating-system") or tags.get("os")
    if os_name:
        fields["os"] = os_name.splitlines()[0].strip()
    if "name" not in fields and name:
        fields["name"] = name
    return fields


def _item_record(item: Any, host: _Host, position: str) -> FindingRecord | Rejected:
    plugin_id = (item.get("pluginID") or "").strip()
    if not plugin_id:
        return Rejected(position=position, reason="ReportItem has no pluginID attribute")
    fields = host.resource_fields()
    if host.key is None:
        return Rejected(position=position, reason="ReportHost has no name and no host identifier tags")
    texts: dict[str, str] = {}
    cves: list[str] = []
    see_also: list[str] = []
    cwes: list[str] = []
    for child in item:
        tag, text = child.tag, child.text
        if not text or not isinstance(tag, str):
            continue
        if tag == "cve":
            cves.append(text)
        elif tag == "see_also":
            see_also.append(text)
        elif tag == "cwe" or (tag == "xref" and text.upper().startswith("CWE:")):
            cwes.append(re.sub(r"(?i)^(?:cwe[:-]\s*)+", "", text.strip()))
        else:
            texts.setdefault(tag, text)
    port = (item.get("port") or "0").strip()
    protocol = (item.get("protocol") or "tcp").strip().lower()
    score, vector = pick_cvss(
        (texts.get("cvss3_base_score") or texts.get("cvssv3"), texts.get("cvss3_vector"), "3.0"),
        (texts.get("cvss4_base_score"), texts.get("cvss4_vector"), "4.0"),
        (texts.get("cvss_base_score") or texts.get("cvss"), texts.get("cvss_vector"), "2.0"),
    )
    severity = severity_fields(item.get("severity"), texts.get("risk_factor"), score)
    if severity is None:
        return Rejected(
            position=position,
            reason="ReportItem has no usable severity (severity 0-4, risk_factor or CVSS score)",
            provider_id=make_provider_id(host.key, plugin_id, port, protocol),
        )
    state = (texts.get("vulnerability_state") or "open").strip().lower()
    if state not in TENABLE_STATES:
        return Rejected(
            position=position,
            reason=f"unknown vulnerability_state {state[:32]!r}",
            provider_id=make_provider_id(host.key, plugin_id, port, protocol),
        )
    host_end = host.time("HOST_END")
    first_seen = parse_any_time(texts.get("first_found"))
    last_seen = parse_any_time(texts.get("last_found")) or host_end
    extra = {
        "port": port,
        "protocol": protocol,
        "service": item.get("svc_name"),
        "plugin_family": item.get("pluginFamily"),
    }
    if cwes:
        extra["cwe"] = list(dict.fromkeys(cwes))
    if texts.get("vpr_score"):
        extra["vpr_score"] = texts["vpr_score"].strip()
    title = item.get("pluginName") or texts.get("plugin_name") or f"Nessus plugin {plugin_id}"
    return FindingRecord(
        provider_id=make_provider_id(host.key, plugin_id, port, protocol),
        resource=ResourceRef(**{k: list(v) if isinstance(v, list) else v for k, v in fields.items()}),
        title=clip(title.strip()) or f"Nessus plugin {plugin_id}",
        cves=find_cves(*cves),
        vendor_id=plugin_id,
        status=TENABLE_STATES[state],
        description=clip(texts.get("description") or texts.get("synopsis")),
        remediation=remediation(texts.get("solution")),
        first_seen=first_seen,
        last_seen=last_seen,
        provider_timestamp=host_end or last_seen,
        cvss_score=score,
        cvss_vector=vector,
        evidence=clip(texts.get("plugin_output")),
        references=split_references(see_also),
        extra={k: v for k, v in extra.items() if v},
        **severity,
    )


# ---- helpers shared by the Tenable connectors ----------------------------------------


def merge_repeats(records: Iterable[Record]) -> Iterator[Record]:
    """Merge consecutive FindingRecords with the same provider_id into one (streaming).

    Nessus reports a plugin twice on one port when it finds two installs, and CSV exports
    repeat a row per CVE: one record each, with the CVEs, references and evidence of all.
    """
    pending: FindingRecord | None = None
    for record in records:
        if isinstance(record, FindingRecord):
            if pending is not None and pending.provider_id == record.provider_id:
                pending = merge_records(pending, record)
                continue
            if pending is not None:
                yield pending
            pending = record
            continue
        if pending is not None:
            yield pending
            pending = None
        yield record
    if pending is not None:
        yield pending


def merge_records(first: FindingRecord, second: FindingRecord) -> FindingRecord:
    """One record holding what two reports of the same provider id say."""
    first.cves = list(dict.fromkeys(first.cves + second.cves))
    first.references = list(dict.fromkeys(first.references + second.references))
    if second.evidence and (not first.evidence or second.evidence not in first.evidence):
        first.evidence = clip("\n\n".join(filter(None, (first.evidence, second.evidence))))
    if SEVERITY_RANK[second.severity] > SEVERITY_RANK[first.severity]:
        first.severity = second.severity
        first.severity_original = second.severity_original
        first.severity_scale = second.severity_scale
    if second.cvss_score is not None and (first.cvss_score is None or second.cvss_score > first.cvss_score):
        first.cvss_score, first.cvss_vector = second.cvss_score, second.cvss_vector
    for name in ("description", "remediation"):
        if getattr(first, name) is None:
            setattr(first, name, getattr(second, name))
    first.first_seen = _earliest(first.first_seen, second.first_seen)
    first.last_seen = _latest(first.last_seen, second.last_seen)
    first.provider_timestamp = _latest(first.provider_timestamp, second.provider_timestamp)
    if second.status == "open":
        first.status = "open"
    return first


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return min(a, b) if a and b else a or b


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return max(a, b) if a and b else a or b


def nessus_severity(value: str | int | None) -> str | None:
    """The canonical severity of a Nessus 0-4 severity value, or None."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return SEVERITIES[number] if 0 <= number < len(SEVERITIES) else None


def severity_fields(
    number: str | int | None, word: str | None, score: float | None
) -> dict[str, str] | None:
    """severity/severity_original/severity_scale from a 0-4 value, a risk word or a CVSS score."""
    severity = nessus_severity(number)
    if severity:
        original = str(number).strip()
        return {"severity": severity, "severity_original": original, "severity_scale": NESSUS_SCALE}
    severity = severity_from_word(word)
    if severity and word:
        return {"severity": severity, "severity_original": word.strip(), "severity_scale": RISK_SCALE}
    severity = severity_from_cvss(score)
    if severity:
        return {"severity": severity, "severity_original": str(score), "severity_scale": "cvss"}
    return None


def parse_any_time(value: str | int | float | None) -> datetime | None:
    """A UTC datetime from ISO 8601, epoch seconds, a Nessus date or a Tenable.sc date; else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=UTC) if value > 0 else None
    text = " ".join(value.split())
    if not text or text in ("-1", "0", "N/A"):
        return None
    match = _CTIME.match(text)
    if match:
        month, day, hour, minute, second, year = match.groups()
        return _datetime(year, month, day, hour, minute, second, 0)
    match = _SC_TIME.match(text)
    if match:
        month, day, year, hour, minute, second, zone = match.groups()
        offset = _zone_offset(zone)
        if offset is None:
            return None
        return _datetime(year, month, day, hour, minute, second or "0", offset)
    try:
        return parse_time(text)
    except (ValueError, OverflowError, OSError):
        return None


def _zone_offset(zone: str | None) -> float | None:
    if not zone:
        return 0
    if zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        hours = int(digits[:2]) + int(digits[2:]) / 60
        return hours if zone[0] == "+" else -hours
    return _ZONES.get(zone.upper())


def _datetime(
    year: str, month: str, day: str, hour: str, minute: str, second: str, offset: float
) -> datetime | None:
    number = _MONTHS.get(month.lower())
    if number is None:
        return None
    try:
        local = datetime(int(year), number, int(day), int(hour), int(minute), int(second), tzinfo=UTC)
    except ValueError:
        return None
    return local - timedelta(hours=offset)


def normalize_uuid(value: str | None) -> str | None:
    """A UUID in lower-case dashed form (Tenable writes some without dashes); other ids as they are."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return text.lower()


def ip_version(value: str | None) -> int | None:
    """4 or 6 when the text is an IP address, else None."""
    if not value:
        return None
    try:
        return ipaddress.ip_address(value.strip().split("%")[0]).version
    except ValueError:
        return None


def add_ips(fields: dict[str, Any], *values: str | Iterable[str] | None) -> None:
    """Add the valid IP addresses among values (strings, lists, comma/space separated) to fields."""
    for value in values:
        if not value:
            continue
        parts = re.split(r"[\s,;]+", value) if isinstance(value, str) else value
        for part in parts:
            if not isinstance(part, str):
                continue
            version = ip_version(part)
            if version:
                kind = f"ipv{version}"
                address = part.strip()
                if address not in fields.setdefault(kind, []):
                    fields[kind].append(address)


def add_names(fields: dict[str, Any], *names: str | None) -> None:
    """Put host names in fields: one with a dot is an fqdn, one without a hostname."""
    for name in names:
        if not name or not name.strip() or ip_version(name):
            continue
        text = name.strip().rstrip(".")
        kind = "fqdn" if "." in text else "hostname"
        fields.setdefault(kind, text)


def netbios_name(value: str | None) -> str | None:
    """A NetBIOS name without its workgroup or domain ("WORKGROUP\\HOST" -> "HOST")."""
    if not value:
        return None
    return value.strip().split("\\")[-1].strip() or None


def first_mac(value: str | Iterable[str] | None) -> str | None:
    """The first valid MAC address in a (newline/comma separated) text or list."""
    if not value:
        return None
    parts = re.split(r"[\s,;]+", value) if isinstance(value, str) else value
    for part in parts:
        if isinstance(part, str):
            digits = re.sub(r"[^0-9a-fA-F]", "", part)
            if len(digits) == 12 and len(part.strip()) <= 17:
                return ":".join(digits[i : i + 2] for i in range(0, 12, 2)).lower()
    return None


def host_key(fields: dict[str, Any] | ResourceRef) -> str | None:
    """The identifier that tells a Tenable host from the others, lower-cased, for provider ids.

    A web app's URL; else an agent/asset UUID, an FQDN, a host name, then the IP address
    (what Nessus and Tenable.sc key hosts on), and only then NetBIOS name or MAC: those two
    are shared by cloned machines (the Tenable.sc samples show one MAC on two IPs).
    """
    get = fields.get if isinstance(fields, dict) else lambda k: getattr(fields, k, None)
    if get("kind") == "web_app" and get("name"):
        return str(get("name")).lower()
    for kind in ("cloud_id", "agent_id", "fqdn", "hostname", "ipv4", "ipv6", "netbios", "mac"):
        value = get(kind)
        if isinstance(value, list):
            value = value[0] if value else None
        if value:
            return str(value).lower()
    return None


def make_provider_id(key: str | None, plugin_id: str, port: str | int | None, protocol: str | None) -> str:
    """The stable id of one plugin on one host and port: "<host>|<plugin>|<port>/<protocol>"."""
    return f"{key}|{plugin_id}|{port if port not in (None, '') else 0}/{(protocol or 'tcp').lower()}"


def cvss_vector(vector: str | None, version: str) -> str | None:
    """A CVSS vector in the usual text form: "CVSS:3.0/AV:N/..." for v3/v4, bare for v2."""
    if not vector or not vector.strip():
        return None
    text = vector.strip()
    if text.upper().startswith("CVSS2#"):
        text = text[6:]
    if version != "2.0" and not text.upper().startswith("CVSS:"):
        text = f"CVSS:{version}/{text}"
    return text


def pick_cvss(*candidates: tuple[Any, Any, str]) -> tuple[float | None, str | None]:
    """The first usable (score, vector) among (score, vector, version) candidates."""
    for raw_score, raw_vector, version in candidates:
        score = to_score(raw_score)
        vector = cvss_vector(raw_vector, version) if isinstance(raw_vector, str) else None
        if score is not None and (score > 0 or vector):
            return score, vector
    return None, None


def to_score(value: Any) -> float | None:
    """A CVSS score 0-10 from a number or text, else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        score = float(str(value).strip())
    except ValueError:
        return None
    return score if 0 <= score <= 10 else None


def split_references(values: Iterable[str | None]) -> list[str]:
    """The distinct non-empty lines of see-also texts."""
    refs: dict[str, None] = {}
    for value in values:
        for line in (value or "").splitlines():
            if line.strip():
                refs.setdefault(line.strip(), None)
    return list(refs)


def remediation(solution: str | None) -> str | None:
    """The solution text, without Nessus's "n/a" placeholder."""
    if not solution or solution.strip().lower() in ("n/a", "na", "none", ""):
        return None
    return clip(solution.strip())


def clip(text: str | None) -> str | None:
    """Text cut to MAX_TEXT characters, or None when empty."""
    if text is None:
        return None
    text = text.strip()
    return text[:MAX_TEXT] if text else None
