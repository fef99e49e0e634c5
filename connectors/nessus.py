"""Tenable Nessus v2 XML (``.nessus``, root ``NessusClientData_v2``) -> FindingRecord, Observation.

The file is streamed with ``xmlsafe.iterparse``: each ``ReportHost`` is gathered whole
(its HostProperties and ReportItems: one host's element, however many hosts there are),
its records come out, and it is freed, so memory stays flat with the file size (it follows
the largest host).  Gathering the host first lets identity facts that plugins report late
in the host (12053, 86420...) reach the ResourceRef of every record of that host.

Resource, from the ``ReportHost``'s ``HostProperties`` tags:
    tenable-uuid, host-uuid -> agent_id (first present; UUIDs in lower-case dashed form)
    host-fqdn -> fqdn (a name without a dot goes to hostname; a URL, as in Tenable WAS
    exports, gives its host name, the URL becomes the display name, kind "web_app")
    hostname -> hostname, netbios-name -> netbios, host-ip -> ipv4/ipv6,
    operating-system -> os (plain text: the first line; a list rendered as text,
    ``["Linux Kernel 5.15"]``, gives its items joined with " / ")
    the ReportHost ``name`` attribute -> host_key (provenance), and is the fallback
    identifier: an IP address goes to ipv4/ipv6, a name to fqdn when it has a dot, else
    to hostname.
  then from the host's identity plugins, wherever they are in the host (a tag wins):
    12053 "Host Fully Qualified Domain Name (FQDN) Resolution" ("x resolves as
    host.example.com.") -> fqdn (hostname without a dot); 11936 "OS Identification"
    ("Remote operating system : ...") -> os; 10150 NetBIOS ("NAME = Computer name") ->
    netbios; 55472 "Device Hostname" ("Hostname : NAME") -> hostname;
    mac: every MAC of the mac-address tag and of plugins 86420 "Ethernet MAC Addresses",
    10150 and 35716, lower-case colon form; ResourceRef.mac holds one: the lowest of
    them, sorted, so the choice does not depend on the order the scanner lists them in.
Finding, per ReportItem of severity 1-4:
    pluginID -> vendor_id; pluginName (or plugin_name) -> title; description (or
    synopsis) -> description; solution -> remediation ("n/a" dropped); plugin_output ->
    evidence; cve -> cves; see_also lines -> references;
    cvss3_base_score/cvss3_vector, else cvss4_*, else cvss_base_score/cvss_vector (WAS:
    cvssv3, cvss) -> cvss_score/cvss_vector (v3 vectors keep or get their "CVSS:3.x/"
    prefix, v2 bare);
    severity attribute 0-4 -> informational/low/medium/high/critical (scale "nessus 0-4"),
    else risk_factor, else the CVSS score;
    vulnerability_state (Tenable.io exports: Active/New/Resurfaced -> open, Fixed ->
    fixed; any other state is Rejected), first_found/last_found -> first_seen/last_seen
    (a value that is no date is Rejected);
    without them last_seen is the host's end: HOST_END_TIMESTAMP (epoch), else HOST_END
    (a date like "Thu Jun 22 11:33:59 2017", taken as UTC though Nessus writes the
    scanner's local time there); provider_timestamp is that host end, else last_found.
    provider_id = "<host key>|<pluginID>|<port>/<protocol>", the host key being the
    first of agent id, fqdn, hostname, IP, netbios, mac (a web app: its URL) from the
    ReportHost name and HostProperties only (never from plugin facts), so the same host,
    plugin and port give the same id in every push.
    ``<Report name=...>`` -> scan (None without a name).
Observation, per ReportItem of severity 0 (informational: never a finding):
    provider_id, vendor_id, name (the plugin name), times and scan as for a finding;
    plugin_output -> evidence; port (0: None)/protocol/svc_name ("general" dropped) ->
    port/protocol/service; category: identity (12053, 86420, 10150, 55472, 35716), os
    (11936, 54615), port (family "Port scanners"), service (family "Service detection",
    22964, 11011, 10107, 10736), software (20811, 22869, 45590, installed software
    enumerations...), network (traceroute 10287, interfaces, netstat), else other;
    value: the identity facts (names, then the MACs sorted), the OS, "22/tcp" (port),
    "443/tcp www" (service), else the output when it is one short line.
A ReportItem without a pluginID, or a host without any identifier, gives a Rejected
record ("ReportHost[2]/ReportItem[5]"); the others still come out.  Nessus reports a
plugin twice on one port when it finds two installs: consecutive findings (or
observations) with the same provider_id are merged into one record (evidence, CVEs and
references of both).

A large scan reports one plugin on thousands of hosts: the fields a plugin's own texts give
(CVSS, severity, title, description, solution, CVEs, references, CWE, VPR) are computed once
per distinct plugin text in a parse (``_Plugin``, at most 4,096 held) and each record gets its
own copies of the lists; the parse is byte-for-byte what it was, about a fifth faster.

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
    FACT_PLUGINS,
    TENABLE_STATES,
    add_ips,
    add_names,
    all_macs,
    clip,
    host_fields,
    host_key,
    identity_facts,
    ip_version,
    make_provider_id,
    merge_repeats,
    os_text,
    parse_any_time,
    pick_cvss,
    remediation,
    severity_fields,
    split_references,
    strict_time,
    tenable_observation,
)
from connectors.base import ParseOptions, find_cves
from connectors.model import FindingRecord, FormatError, Observation, Rejected, ResourceRef

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


def _records(stream: BinaryIO) -> Iterator[FindingRecord | Observation | Rejected]:
    """Each ReportHost is gathered whole (its HostProperties and ReportItems), then its records
    come out: identity facts of items late in the host reach every record of the host."""
    host_index = 0
    scan: str | None = None
    plugins: dict[tuple, _Plugin] = {}  # what a plugin's own texts give, computed once a parse
    events = xmlsafe.iterparse(
        stream, tags=("Report", "ReportHost", "ReportItem", "Policy"), events=("start", "end")
    )
    for event, element in events:
        tag = element.tag
        if tag == "Report":
            if event == "start":
                scan = clip(element.get("name"))
            continue
        if event == "start":
            continue
        if tag == "ReportItem":
            parent = element.getparent()
            if parent is not None and parent.tag == "ReportHost":
                continue  # read with its host, at the host's end
            yield Rejected(position=f"ReportHost[{host_index}]/ReportItem",
                           reason="ReportItem outside a ReportHost")
        elif tag == "ReportHost":
            host_index += 1
            yield from _host_records(element, host_index, scan, plugins)
        xmlsafe.release(element)


def _host_records(
    element: Any, host_index: int, scan: str | None, plugins: dict[tuple, _Plugin]
) -> Iterator[FindingRecord | Observation | Rejected]:
    host = _Host(element.get("name"))
    properties = element.find("HostProperties")
    if properties is not None:
        host.add_properties(properties)
    items = element.findall("ReportItem")
    host.add_facts(items)
    for item_index, item in enumerate(items, start=1):
        yield _item_record(item, host, f"ReportHost[{host_index}]/ReportItem[{item_index}]", scan, plugins)


class _Host:
    """What a ReportHost says of its host: HostProperties tags and identity plugins' facts."""

    def __init__(self, name: str | None) -> None:
        self.name = (name or "").strip()
        self.tags: dict[str, str] = {}
        self.facts: dict[str, Any] = {}
        self._resource: ResourceRef | None = None
        self.key: str | None = None
        self._times: dict[str, datetime | None] = {}  # parsed once a host, not once an item

    def add_properties(self, element: Any) -> None:
        for tag in element.iterfind("tag"):
            name = tag.get("name")
            if name and tag.text and tag.text.strip():
                self.tags.setdefault(name, tag.text.strip())
        self._resource = None
        self._times.clear()

    def add_facts(self, items: list[Any]) -> None:
        """Identity facts of the host's identity plugins (12053, 86420, 10150, 11936...)."""
        for item in items:
            plugin_id = (item.get("pluginID") or "").strip()
            if plugin_id in FACT_PLUGINS:
                for kind, value in identity_facts(plugin_id, item.findtext("plugin_output") or ""):
                    if kind == "mac":
                        self.facts.setdefault("mac", []).append(value)
                    else:
                        self.facts.setdefault(kind, value)
        self._resource = None

    def resource(self) -> ResourceRef | None:
        """The host's ResourceRef (computed once), None when the host has no identifier.

        The provider-id key comes from the ReportHost name and HostProperties only (as it
        always has), so a fact a plugin adds never changes the ids of earlier pushes.
        """
        if self._resource is None:
            fields = _host_resource(self.name, self.tags)
            self.key = host_key(fields)
            if self.key is None:
                return None
            if self.facts.get("fqdn") and "fqdn" not in fields and "hostname" not in fields:
                add_names(fields, self.facts["fqdn"])
            for kind in ("hostname", "netbios", "os"):
                if self.facts.get(kind) and kind not in fields:
                    fields[kind] = self.facts[kind]
            macs = sorted({m for m in (*all_macs(self.tags.get("mac-address")), *self.facts.get("mac", ()))})
            if macs:
                fields["mac"] = macs[0]  # several adapters: the lowest, so that the choice is stable
            fields["host_key"] = self.name or None
            self._resource = ResourceRef(**fields)
        return self._resource

    def time(self, name: str) -> datetime | None:
        if name not in self._times:
            stamp = self.tags.get(f"{name}_TIMESTAMP")
            self._times[name] = parse_any_time(stamp) or parse_any_time(self.tags.get(name))
        return self._times[name]


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
    os_name = os_text(tags.get("operating-system") or tags.get("os"))
    if os_name:
        fields["os"] = os_name
    if "name" not in fields and name:
        fields["name"] = name
    return fields


# A ReportItem's texts that change from host to host; every other text is the plugin's own
# (its description, CVSS, CVEs...), the same on each of the thousands of hosts a plugin is
# reported on in a large scan.
_ITEM_TEXTS = frozenset(("plugin_output", "first_found", "last_found", "vulnerability_state"))
_PLUGINS_HELD = 4096  # distinct plugin texts whose fields a parse keeps (a scan has a few thousand)


class _Plugin:
    """The fields a ReportItem's plugin texts give, computed once per distinct plugin text.

    A record gets its own copies of the lists (``cves``, ``references``, ``extra``), so that
    nothing downstream that changes one record changes another.
    """

    __slots__ = ("title", "severity", "score", "vector", "cves", "description", "remediation",
                 "references", "cwe", "vpr")

    def __init__(self, item: Any, plugin_id: str, texts: dict[str, str], cves: list[str],
                 see_also: list[str], cwes: list[str]) -> None:
        self.score, self.vector = pick_cvss(
            (texts.get("cvss3_base_score") or texts.get("cvssv3"), texts.get("cvss3_vector"), "3.0"),
            (texts.get("cvss4_base_score"), texts.get("cvss4_vector"), "4.0"),
            (texts.get("cvss_base_score") or texts.get("cvss"), texts.get("cvss_vector"), "2.0"),
        )
        self.severity = severity_fields(item.get("severity"), texts.get("risk_factor"), self.score)
        title = item.get("pluginName") or texts.get("plugin_name") or f"Nessus plugin {plugin_id}"
        self.title = clip(title.strip()) or f"Nessus plugin {plugin_id}"
        self.cves = find_cves(*cves)
        self.description = clip(texts.get("description") or texts.get("synopsis"))
        self.remediation = remediation(texts.get("solution"))
        self.references = split_references(see_also)
        self.cwe = list(dict.fromkeys(cwes)) if cwes else None
        self.vpr = texts["vpr_score"].strip() if texts.get("vpr_score") else None


def _item_record(
    item: Any, host: _Host, position: str, scan: str | None, plugins: dict[tuple, _Plugin]
) -> FindingRecord | Observation | Rejected:
    plugin_id = (item.get("pluginID") or "").strip()
    if not plugin_id:
        return Rejected(position=position, reason="ReportItem has no pluginID attribute")
    resource = host.resource()
    if resource is None:
        return Rejected(position=position, reason="ReportHost has no name and no host identifier tags")
    own: dict[str, str] = {}  # this item's texts (output, state, dates)
    static: list[Any] = [plugin_id, item.get("severity"), item.get("pluginName")]
    for child in item:
        tag, text = child.tag, child.text
        if not text or not isinstance(tag, str):
            continue
        if tag in _ITEM_TEXTS:
            own.setdefault(tag, text)
        else:
            static.append(tag)
            static.append(text)
    key = tuple(static)
    plugin = plugins.get(key)
    if plugin is None:
        texts: dict[str, str] = {}
        cves: list[str] = []
        see_also: list[str] = []
        cwes: list[str] = []
        for tag, text in zip(key[3::2], key[4::2]):
            if tag == "cve":
                cves.append(text)
            elif tag == "see_also":
                see_also.append(text)
            elif tag == "cwe" or (tag == "xref" and text.upper().startswith("CWE:")):
                cwes.append(re.sub(r"(?i)^(?:cwe[:-]\s*)+", "", text.strip()))
            else:
                texts.setdefault(tag, text)
        plugin = _Plugin(item, plugin_id, texts, cves, see_also, cwes)
        if len(plugins) >= _PLUGINS_HELD:
            plugins.clear()
        plugins[key] = plugin
    port = (item.get("port") or "0").strip()
    protocol = (item.get("protocol") or "tcp").strip().lower()
    severity = plugin.severity
    if severity is None:
        return Rejected(
            position=position,
            reason="ReportItem has no usable severity (severity 0-4, risk_factor or CVSS score)",
            provider_id=make_provider_id(host.key, plugin_id, port, protocol),
        )
    state = (own.get("vulnerability_state") or "open").strip().lower()
    if state not in TENABLE_STATES:
        return Rejected(
            position=position,
            reason=f"unknown vulnerability_state {state[:32]!r}",
            provider_id=make_provider_id(host.key, plugin_id, port, protocol),
        )
    host_end = host.time("HOST_END")
    try:
        first_seen = strict_time("first_found", own.get("first_found"))
        last_seen = strict_time("last_found", own.get("last_found")) or host_end
    except ValueError as exc:
        return Rejected(position=position, reason=str(exc),
                        provider_id=make_provider_id(host.key, plugin_id, port, protocol))
    if severity["severity"] == "informational":
        return _observation(item, plugin_id, plugin.title, own, resource,
                            make_provider_id(host.key, plugin_id, port, protocol),
                            first_seen, last_seen, host_end or last_seen, scan)
    extra = {
        "port": port,
        "protocol": protocol,
        "service": item.get("svc_name"),
        "plugin_family": item.get("pluginFamily"),
    }
    if plugin.cwe:
        extra["cwe"] = list(plugin.cwe)
    if plugin.vpr:
        extra["vpr_score"] = plugin.vpr
    return FindingRecord(
        provider_id=make_provider_id(host.key, plugin_id, port, protocol),
        resource=resource,
        title=plugin.title,
        cves=list(plugin.cves),
        vendor_id=plugin_id,
        status=TENABLE_STATES[state],
        description=plugin.description,
        remediation=plugin.remediation,
        first_seen=first_seen,
        last_seen=last_seen,
        provider_timestamp=host_end or last_seen,
        cvss_score=plugin.score,
        cvss_vector=plugin.vector,
        evidence=clip(own.get("plugin_output")),
        references=list(plugin.references),
        extra={k: v for k, v in extra.items() if v},
        scan=scan,
        **severity,
    )


def _observation(
    item: Any, plugin_id: str, title: str, texts: dict[str, str], resource: ResourceRef, provider_id: str,
    first_seen: datetime | None, last_seen: datetime | None, timestamp: datetime | None, scan: str | None,
) -> Observation:
    """A severity 0 (informational) ReportItem: a fact about the host, never a finding."""
    port_text = (item.get("port") or "0").strip()
    protocol = (item.get("protocol") or "tcp").strip().lower()
    port = int(port_text) if port_text.isdigit() and port_text != "0" else None
    service = (item.get("svc_name") or "").strip() or None
    if service in ("general", "unknown"):
        service = None
    output = texts.get("plugin_output")
    return tenable_observation(
        provider_id=provider_id, resource=resource, title=title, plugin_id=plugin_id,
        family=item.get("pluginFamily"), output=clip(output), port=port, protocol=protocol, service=service,
        first_seen=first_seen, last_seen=last_seen, provider_timestamp=timestamp, scan=scan,
    )

