"""Tenable CSV exports (Nessus, Tenable.io / Tenable VM, Tenable.sc) -> FindingRecord, Observation.

Streamed row by row.  The delimiter is sniffed on the first bytes: a comma, or a
semicolon (Tenable Vulnerability Management's newer export), whichever gives a Tenable
header row (the one the first line holds more of is tried first).  The header row is the
first of the first lines that names a plugin id column and a host column; columns are
found by header name, case-insensitively, so the Nessus default and "all columns" sets,
Tenable.io's, Tenable.sc's and Tenable VM's dotted names all work:

    Plugin ID | Plugin | definition.id -> vendor_id
    Name | Plugin Name | definition.name -> title (an Observation's name)
    Host | asset.name (an IP, else a name) | IP Address | asset.display_ipv4_address |
    asset.display_ipv6_address | DNS Name | FQDN | asset.display_fqdn | asset.host_name |
    NetBIOS Name | NetBios | asset.netbios_name | MAC Address | asset.display_mac_address |
    OS | asset.display_operating_system | Asset UUID | Host ID | Agent ID | asset.id ->
    the resource (agent_id: the UUID in lower-case dashed form)
    asset.network_id -> network (the default 00000000-0000-0000-0000-000000000000 -> None)
    host_key (provenance): the asset UUID when the export has one, else Host / IP Address
    Port, Protocol -> provider_id "<host key>|<plugin>|<port>/<protocol>" (host key: UUID,
    FQDN, host name, then IP, as in the nessus connector: _tenable.host_key), so rows of
    one host, plugin and port anywhere in the file share it (the merge folds them)
    Severity 0-4 (Tenable.io) -> severity, scale "nessus 0-4"; else the severity word
    (Tenable.sc "Severity", Tenable VM "severity" / "definition.severity", Nessus "Risk",
    "Risk Factor"); else the CVSS score
    CVE | definition.cve (one per row, or comma separated) -> cves
    CVSS v3.0 Base Score | CVSS V3 Base Score | CVSS3 Base Score | definition.cvss3.base_score
    (+ vector), else v4, else the v2 columns -> cvss_score/cvss_vector
    Description | definition.description (else Synopsis) -> description, Solution | Steps to
    Remediate | definition.solution -> remediation, Plugin Output | Plugin Text | output ->
    evidence, See Also -> references, VPR / definition.vpr.score -> extra["vpr_score"]
    Vulnerability State | state (Active/New/Resurfaced -> open, Fixed -> fixed; any case)
    First Found | First Discovered | first_observed -> first_seen; Last Found | Last Observed
    | last_seen | Host End -> last_seen ("Jan 5, 2021 10:24:08 MST" and ISO 8601 both read);
    provider_timestamp = Indexed At, else Last Fixed, else last_seen
    scan.uuid | scan.id | Scan Name -> scan (the samples have none: scan None)
Observation, per row of severity 0 / Risk "None" / Severity "Info" (never a finding):
    the same provider_id, resource, times, scan and product; name, vendor_id, evidence;
    port (0: None)/protocol; category and value as in ``nessus`` (_tenable.observation_*).
product, told by the column set (``_product``): dotted names, or Plugin ID with Asset
    UUID / Vulnerability State / First Found / Indexed At -> "Tenable.io"; Plugin + Plugin
    Name, Repository, First Discovered / Last Observed -> "Tenable.sc"; Plugin ID + Risk +
    Host -> "Nessus"; otherwise None (the connector's PRODUCT "Tenable" applies).

Nessus CSVs repeat a row per CVE (or service): consecutive rows with the same host,
plugin and port become one record with all their CVEs and outputs (only consecutive ones,
to keep streaming; the others keep the same provider_id).
Blank rows are skipped; a row without a plugin id or a host, with an unknown state, no
usable severity or an unreadable date is Rejected ("line N"); the other rows still come out.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import datetime
from typing import BinaryIO

from connectors._stream import Prefixed, read_head
from connectors._tenable import (
    TENABLE_STATES,
    clip,
    host_fields,
    host_key,
    ip_version,
    make_provider_id,
    merge_repeats,
    normalize_uuid,
    pick_cvss,
    remediation,
    severity_fields,
    split_references,
    strict_time,
    tenable_observation,
    to_score,
)
from connectors.base import ParseOptions, find_cves
from connectors.model import FindingRecord, FormatError, Observation, Rejected, ResourceRef

FORMAT = "tenable_csv"
TITLE = "Tenable CSV export (Nessus, Tenable.io, Tenable.sc)"
PRODUCT = "Tenable"
CONTENT_TYPES = ("text/csv", "application/csv")
RECORD_KIND = "findings"

HEADER_SEARCH_LINES = 20
HEAD_SIZE = 65536
FIELD_LIMIT = 16 * 1024 * 1024
DELIMITERS = (",", ";")
DEFAULT_NETWORK = "00000000-0000-0000-0000-000000000000"  # Tenable's default network: no scope
NESSUS, TENABLE_IO, TENABLE_SC = "Nessus", "Tenable.io", "Tenable.sc"

# canonical column -> header names it may have (lower-case), in order of preference
COLUMNS: dict[str, tuple[str, ...]] = {
    "plugin": ("plugin id", "plugin", "pluginid", "plugin_id", "definition.id"),
    "title": ("name", "plugin name", "definition.name"),
    "host": ("host", "asset.name"),
    "ip": ("ip address", "ip", "ipv4", "ipv4 address", "ipv6", "ipv6 address", "asset.display_ipv4_address"),
    "ip6": ("asset.display_ipv6_address",),
    "fqdn": ("fqdn", "dns name", "dns", "asset.display_fqdn"),
    "hostname": ("asset.host_name",),
    "netbios": ("netbios name", "netbios", "asset.netbios_name"),
    "mac": ("mac address", "mac", "asset.display_mac_address"),
    "os": ("os", "operating system", "asset.display_operating_system", "asset.operating_system"),
    "uuid": ("asset uuid", "host id", "agent id", "agent uuid", "asset.id", "asset.uuid"),
    "network": ("asset.network_id", "network id"),
    "port": ("port",),
    "protocol": ("protocol",),
    "severity": ("severity", "definition.severity"),
    "risk": ("risk", "risk factor"),
    "cve": ("cve", "cves", "definition.cve"),
    "cvss3": ("cvss v3.0 base score", "cvss v3.1 base score", "cvss v3 base score", "cvss3 base score",
              "definition.cvss3.base_score"),
    "cvss3_vector": ("cvss v3.0 vector", "cvss v3 vector", "cvss3 vector", "definition.cvss3.base_vector"),
    "cvss4": ("cvss v4.0 base score", "cvss v4 base score", "cvss4 base score",
              "definition.cvss4.base_score"),
    "cvss4_vector": ("cvss v4.0 vector", "cvss v4 vector", "cvss4 vector", "definition.cvss4.base_vector"),
    "cvss2": ("cvss v2.0 base score", "cvss v2 base score", "cvss base score", "cvss",
              "definition.cvss2.base_score"),
    "cvss2_vector": ("cvss v2.0 vector", "cvss v2 vector", "cvss vector", "definition.cvss2.base_vector"),
    "synopsis": ("synopsis", "definition.synopsis"),
    "description": ("description", "definition.description"),
    "solution": ("solution", "steps to remediate", "definition.solution"),
    "see_also": ("see also", "definition.see_also"),
    "output": ("plugin output", "plugin text", "output"),
    "state": ("vulnerability state", "state"),
    "first_seen": ("first found", "first discovered", "first seen", "first_observed", "first_found"),
    "last_seen": ("last found", "last observed", "last seen", "last_seen", "last_found"),
    "host_end": ("host end",),
    "last_fixed": ("last fixed", "last_fixed"),
    "indexed": ("indexed at", "indexed"),
    "family": ("plugin family", "family", "definition.family"),
    "repository": ("repository",),
    "vpr": ("vulnerability priority rating", "vulnerability priority rating (vpr)", "vpr score",
            "definition.vpr.score"),
    "scan": ("scan.uuid", "scan.id", "scan name"),
}
_HOST_COLUMNS = ("host", "ip", "fqdn", "netbios", "uuid")
_OUTPUT_PREFIX = re.compile(r"\A\s*Plugin Output:\s*", re.IGNORECASE)


def sniff(head: bytes) -> bool:
    """A CSV whose header row (in the first lines) has a plugin id column and a host column."""
    return _delimiter(head) is not None


def _delimiter(head: bytes) -> str | None:
    """The delimiter (comma, or semicolon as in Tenable VM exports) whose header row is a Tenable one."""
    lines = head[:HEAD_SIZE].decode("utf-8-sig", "replace").splitlines()[:HEADER_SEARCH_LINES]
    # the likelier first: the one the first non-empty line holds more of
    first = next((line for line in lines if line.strip()), "")
    order = sorted(DELIMITERS, key=lambda d: -first.count(d))
    for delimiter in order:
        try:
            if any(_header_map(cells) is not None for cells in csv.reader(lines, delimiter=delimiter)):
                return delimiter
        except csv.Error:  # NUL bytes: not a CSV
            return None
    return None


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Observation | Rejected]:
    """Stream the records of a Tenable CSV export."""
    if csv.field_size_limit() < FIELD_LIMIT:
        csv.field_size_limit(FIELD_LIMIT)  # plugin outputs can exceed csv's 128 KiB default
    readable = Prefixed(read_head(stream, HEAD_SIZE), stream)
    delimiter = _delimiter(readable.head) or ","
    yield from merge_repeats(_records(_text_stream(readable), delimiter))


def _text_stream(readable: io.RawIOBase) -> io.TextIOWrapper:
    """The text of a UTF-8 byte stream (a BOM dropped, bad bytes replaced), newlines kept."""
    return io.TextIOWrapper(
        io.BufferedReader(readable, 65536), encoding="utf-8-sig", errors="replace", newline=""
    )


def _records(
    lines: io.TextIOWrapper, delimiter: str = ","
) -> Iterator[FindingRecord | Observation | Rejected]:
    reader = csv.reader(lines, delimiter=delimiter)
    columns: dict[str, int] | None = None
    product: str | None = None
    line = 1
    try:
        for cells in reader:
            start, line = line, reader.line_num + 1
            if columns is None:
                columns = _header_map(cells)
                if columns is None and start >= HEADER_SEARCH_LINES:
                    break
                if columns is not None:
                    product = _product(cells)
                continue
            if not any(cell.strip() for cell in cells):
                continue
            yield _row_record(cells, columns, f"line {start}", product)
    except csv.Error as exc:
        raise FormatError(f"not a well-formed CSV at line {line}: {exc}") from None
    if columns is None:
        raise FormatError(
            "not a Tenable CSV export: no header row with a plugin id column ('Plugin ID', 'Plugin' "
            "or 'definition.id') and a host column ('Host', 'IP Address', 'DNS Name', 'asset.id'...) "
            f"in the first {HEADER_SEARCH_LINES} lines"
        )


def _names(cells: list[str]) -> dict[str, int]:
    names: dict[str, int] = {}
    for index, cell in enumerate(cells):
        names.setdefault(" ".join(cell.strip().lower().split()), index)
    return names


def _header_map(cells: list[str]) -> dict[str, int] | None:
    """Column indexes by canonical name, when the row is a Tenable header row."""
    names = _names(cells)
    columns: dict[str, int] = {}
    for column, aliases in COLUMNS.items():
        for alias in aliases:
            if alias in names:
                columns[column] = names[alias]
                break
    if "plugin" not in columns or not any(c in columns for c in _HOST_COLUMNS):
        return None
    return columns


def _product(cells: list[str]) -> str | None:
    """The tool that wrote the export, told by its column set; None when it cannot be told.

    Tenable VM (Tenable.io) writes dotted names (asset.id, definition.id) and, in its older
    CSV, Plugin ID with Asset UUID / Vulnerability State / First Found / Indexed At;
    Tenable.sc writes Plugin + Plugin Name, Repository, First Discovered / Last Observed;
    Nessus writes Plugin ID, Risk and Host and none of those.
    """
    names = set(_names(cells))
    if any(name.startswith(("asset.", "definition.")) for name in names):
        return TENABLE_IO
    if names & {"repository", "first discovered", "last observed", "plugin text"} or (
        "plugin" in names and "plugin name" in names and "plugin id" not in names
    ):
        return TENABLE_SC
    if "plugin id" in names and names & {"vulnerability state", "asset uuid", "indexed at", "first found",
                                         "last found", "host scan id"}:
        return TENABLE_IO
    if "plugin id" in names and "risk" in names and "host" in names:
        return NESSUS
    return None


def _time(name: str, value: str | None) -> datetime | None:
    """A date cell (Nessus, Tenable.sc or ISO 8601); ValueError naming the column when unreadable."""
    return strict_time(name, value)


def _row_record(
    cells: list[str], columns: dict[str, int], position: str, product: str | None = None
) -> FindingRecord | Observation | Rejected:
    def get(column: str) -> str | None:
        index = columns.get(column)
        if index is None or index >= len(cells):
            return None
        value = cells[index].strip()
        return value or None

    plugin_id = get("plugin")
    if plugin_id is None:
        return Rejected(position=position, reason="the row has no plugin id")
    host = get("host")
    host_is_ip = bool(host and ip_version(host))
    os_name = get("os")
    fields = host_fields(
        agent_id=get("uuid"),
        names=(get("fqdn"), None if host_is_ip else host, get("hostname")),
        netbios=get("netbios"),
        mac=get("mac"),
        ips=(host if host_is_ip else None, get("ip"), get("ip6")),
        os_name=os_name.splitlines()[0].strip() if os_name else None,
        name=host or get("fqdn") or get("ip"),
    )
    key = host_key(fields)
    if key is None:
        return Rejected(position=position, reason="the row has no host (Host, IP Address, DNS Name...)")
    network = normalize_uuid(get("network"))
    if network and network != DEFAULT_NETWORK:
        fields["network"] = network
    # provenance: Tenable's key of the asset record (its UUID), else the host as the export names it
    fields["host_key"] = fields.get("agent_id") or host or get("ip") or get("fqdn")
    port, protocol = get("port") or "0", (get("protocol") or "tcp").lower()
    provider_id = make_provider_id(key, plugin_id, port, protocol)
    try:
        state = (get("state") or "open").lower()
        if state not in TENABLE_STATES:
            raise ValueError(f"unknown vulnerability state {state[:32]!r}")
        score, vector = pick_cvss(
            (_csv_score(get("cvss3")), get("cvss3_vector"), "3.0"),
            (_csv_score(get("cvss4")), get("cvss4_vector"), "4.0"),
            (_csv_score(get("cvss2")), get("cvss2_vector"), "2.0"),
        )
        # "Severity" is 0-4 in Tenable.io exports and a word in Tenable.sc ones; Nessus has "Risk"
        severity = severity_fields(get("severity"), get("severity"), None) or severity_fields(
            None, get("risk"), score
        )
        if severity is None:
            raise ValueError("the row has no usable severity, risk or CVSS score")
        first_seen = _time("the first seen date", get("first_seen"))
        last_seen = _time("the last seen date", get("last_seen")) or _time("Host End", get("host_end"))
        provider_timestamp = (_time("Indexed At", get("indexed")) or _time("Last Fixed", get("last_fixed"))
                              or last_seen)
    except ValueError as exc:
        return Rejected(position=position, reason=str(exc), provider_id=provider_id)
    output = get("output")
    evidence = clip(_OUTPUT_PREFIX.sub("", output)) if output else None
    title = clip(get("title")) or f"Nessus plugin {plugin_id}"
    resource = ResourceRef(**fields)
    if severity["severity"] == "informational":
        number = int(port) if port.isdigit() and port != "0" else None
        return tenable_observation(
            provider_id=provider_id, resource=resource, title=title, plugin_id=plugin_id,
            family=get("family"), output=evidence, port=number, protocol=protocol, service=None,
            first_seen=first_seen, last_seen=last_seen, provider_timestamp=provider_timestamp,
            scan=clip(get("scan")), product=product,
        )
    extra = {"port": port, "protocol": protocol, "plugin_family": get("family"),
             "repository": get("repository"), "vpr_score": get("vpr")}
    return FindingRecord(
        provider_id=provider_id,
        resource=resource,
        title=title,
        cves=find_cves(get("cve")),
        vendor_id=plugin_id,
        status=TENABLE_STATES[state],
        description=clip(get("description") or get("synopsis")),
        remediation=remediation(get("solution")),
        first_seen=first_seen,
        last_seen=last_seen,
        provider_timestamp=provider_timestamp,
        cvss_score=score,
        cvss_vector=vector,
        evidence=evidence,
        references=split_references([get("see_also")]),
        extra={k: v for k, v in extra.items() if v is not None},
        scan=clip(get("scan")),
        product=product,
        **severity,
    )


def _csv_score(value: str | None) -> float | None:
    """A CVSS score; some exports drop the decimal point ("75" for 7.5), which is undone."""
    if value is None:
        return None
    score = to_score(value)
    if score is None and value.isdigit() and 10 < int(value) <= 100:
        return int(value) / 10
    return score
