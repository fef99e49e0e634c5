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

The helpers it shares with the other Tenable connectors (severity, dates, identifiers,
CVSS, provider id) are in ``_tenable``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from connectors import xmlsafe
from connectors._tenable import (
    TENABLE_STATES,
    add_ips,
    add_names,
    clip,
    host_fields,
    host_key,
    ip_version,
    make_provider_id,
    merge_repeats,
    parse_any_time,
    pick_cvss,
    remediation,
    severity_fields,
    split_references,
)
from connectors.base import ParseOptions, find_cves
from connectors.model import FindingRecord, FormatError, Rejected, ResourceRef

FORMAT = "nessus"
TITLE = "Tenable Nessus v2 XML"
PRODUCT = "Nessus"
CONTENT_TYPES = ("application/xml", "text/xml", "application/x-nessus+xml")
RECORD_KIND = "findings"

_ROOT = re.compile(
    rb"\A(?:\xef\xbb\xbf)?(?:\s+|<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*(?:\[.*?\])?\s*>)*"
    rb"<NessusClientData_v2[\s/>]",
    re.DOTALL,
)
_UUID_TAGS = ("tenable-uuid", "host-uuid")


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
    fqdn = tags.get("host-fqdn")
    url = None
    if fqdn and "://" in fqdn:
        url, fqdn = fqdn, urlsplit(fqdn).hostname
    elif "://" in name:
        url = name
        fqdn = fqdn or urlsplit(name).hostname
    fields = host_fields(
        agent_id=next((tags[t] for t in _UUID_TAGS if tags.get(t)), None),
        names=(fqdn, tags.get("hostname")),
        netbios=tags.get("netbios-name"),
        mac=tags.get("mac-address"),
        ips=(tags.get("host-ip"), tags.get("host-ips")),
    )
    if url or tags.get("system-type") == "web_application":
        fields["kind"] = "web_app"
        fields["name"] = url or name or None
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
