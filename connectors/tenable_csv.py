"""Tenable CSV exports (Nessus, Tenable.io, Tenable.sc) -> FindingRecord, row by row.

The header row is the first of the first lines that names a plugin id column ("Plugin
ID" or "Plugin") and a host column; columns are found by header name, case-insensitively,
so the Nessus default and "all columns" sets, Tenable.io's and Tenable.sc's all work:

    Plugin ID | Plugin -> vendor_id             Name | Plugin Name -> title
    Host (an IP, else a name) | IP Address | DNS Name | FQDN | NetBIOS Name | NetBios |
    MAC Address | OS | Asset UUID | Host ID | Agent ID -> the resource
    Port, Protocol -> provider_id "<host key>|<plugin>|<port>/<protocol>" (host key: UUID,
    FQDN, host name, then IP, as in the nessus connector: nessus.host_key)
    Severity 0-4 (Tenable.io) -> severity, scale "nessus 0-4"; else the severity word
    (Tenable.sc "Severity", Nessus "Risk", "Risk Factor"); else the CVSS score
    CVE (one per row, or comma separated) -> cves
    CVSS v3.0 Base Score | CVSS V3 Base Score | CVSS3 Base Score (+ vector), else the v2
    columns (CVSS, CVSS v2.0 Base Score, CVSS V2 Base Score...) -> cvss_score/cvss_vector
    Description (else Synopsis) -> description, Solution | Steps to Remediate ->
    remediation, Plugin Output | Plugin Text -> evidence, See Also -> references
    Vulnerability State (Active/New/Resurfaced -> open, Fixed -> fixed)
    First Found | First Discovered -> first_seen; Last Found | Last Observed | Host End ->
    last_seen ("Jan 5, 2021 10:24:08 MST" and ISO 8601 both read)

Nessus CSVs repeat a row per CVE: consecutive rows with the same host, plugin and port
become one record with all their CVEs (only consecutive ones, to keep streaming).
Blank rows are skipped; a row without a plugin id or a host is Rejected ("line N").
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from connectors._tenable import (
    TENABLE_STATES,
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
    to_score,
)
from connectors.base import ParseOptions, find_cves
from connectors.model import FindingRecord, FormatError, Rejected, ResourceRef

FORMAT = "tenable_csv"
TITLE = "Tenable CSV export (Nessus, Tenable.io, Tenable.sc)"
PRODUCT = "Tenable"
CONTENT_TYPES = ("text/csv", "application/csv")
RECORD_KIND = "findings"

HEADER_SEARCH_LINES = 20
FIELD_LIMIT = 16 * 1024 * 1024

# canonical column -> header names it may have (lower-case), in order of preference
COLUMNS: dict[str, tuple[str, ...]] = {
    "plugin": ("plugin id", "plugin", "pluginid", "plugin_id"),
    "title": ("name", "plugin name"),
    "host": ("host",),
    "ip": ("ip address", "ip", "ipv4", "ipv4 address", "ipv6", "ipv6 address"),
    "fqdn": ("fqdn", "dns name", "dns"),
    "netbios": ("netbios name", "netbios"),
    "mac": ("mac address", "mac"),
    "os": ("os", "operating system"),
    "uuid": ("asset uuid", "host id", "agent id", "agent uuid"),
    "port": ("port",),
    "protocol": ("protocol",),
    "severity": ("severity",),
    "risk": ("risk", "risk factor"),
    "cve": ("cve", "cves"),
    "cvss3": ("cvss v3.0 base score", "cvss v3.1 base score", "cvss v3 base score", "cvss3 base score"),
    "cvss3_vector": ("cvss v3.0 vector", "cvss v3 vector", "cvss3 vector"),
    "cvss4": ("cvss v4.0 base score", "cvss v4 base score", "cvss4 base score"),
    "cvss4_vector": ("cvss v4.0 vector", "cvss v4 vector", "cvss4 vector"),
    "cvss2": ("cvss v2.0 base score", "cvss v2 base score", "cvss base score", "cvss"),
    "cvss2_vector": ("cvss v2.0 vector", "cvss v2 vector", "cvss vector"),
    "synopsis": ("synopsis",),
    "description": ("description",),
    "solution": ("solution", "steps to remediate"),
    "see_also": ("see also",),
    "output": ("plugin output", "plugin text"),
    "state": ("vulnerability state", "state"),
    "first_seen": ("first found", "first discovered", "first seen"),
    "last_seen": ("last found", "last observed", "last seen"),
    "host_end": ("host end",),
    "last_fixed": ("last fixed",),
    "indexed": ("indexed at",),
    "family": ("plugin family", "family"),
    "repository": ("repository",),
}
_HOST_COLUMNS = ("host", "ip", "fqdn", "netbios", "uuid")
_OUTPUT_PREFIX = re.compile(r"\A\s*Plugin Output:\s*", re.IGNORECASE)


def sniff(head: bytes) -> bool:
    """A CSV whose header row (in the first lines) has a plugin id column and a host column."""
    lines = head[:65536].decode("utf-8-sig", "replace").splitlines()[:HEADER_SEARCH_LINES]
    try:
        return any(_header_map(cells) is not None for cells in csv.reader(lines))
    except csv.Error:  # NUL bytes: not a CSV
        return False


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream the records of a Tenable CSV export."""
    if csv.field_size_limit() < FIELD_LIMIT:
        csv.field_size_limit(FIELD_LIMIT)  # plugin outputs can exceed csv's 128 KiB default
    yield from merge_repeats(_records(_text_stream(stream)))


def _text_stream(stream: BinaryIO) -> io.TextIOWrapper:
    """The text of a UTF-8 byte stream (a BOM dropped, bad bytes replaced), newlines kept."""
    return io.TextIOWrapper(
        io.BufferedReader(_Readable(stream), 65536), encoding="utf-8-sig", errors="replace", newline=""
    )


def _records(lines: io.TextIOWrapper) -> Iterator[FindingRecord | Rejected]:
    reader = csv.reader(lines)
    columns: dict[str, int] | None = None
    line = 1
    try:
        for cells in reader:
            start, line = line, reader.line_num + 1
            if columns is None:
                columns = _header_map(cells)
                if columns is None and start >= HEADER_SEARCH_LINES:
                    break
                continue
            if not any(cell.strip() for cell in cells):
                continue
            yield _row_record(cells, columns, f"line {start}")
    except csv.Error as exc:
        raise FormatError(f"not a well-formed CSV at line {line}: {exc}") from None
    if columns is None:
        raise FormatError(
            "not a Tenable CSV export: no header row with a plugin id column ('Plugin ID' or "
            "'Plugin') and a host column ('Host', 'IP Address', 'DNS Name'...) "
            f"in the first {HEADER_SEARCH_LINES} lines"
        )


def _header_map(cells: list[str]) -> dict[str, int] | None:
    """Column indexes by canonical name, when the row is a Tenable header row."""
    names: dict[str, int] = {}
    for index, cell in enumerate(cells):
        names.setdefault(" ".join(cell.strip().lower().split()), index)
    columns: dict[str, int] = {}
    for column, aliases in COLUMNS.items():
        for alias in aliases:
            if alias in names:
                columns[column] = names[alias]
                break
    if "plugin" not in columns or not any(c in columns for c in _HOST_COLUMNS):
        return None
    return columns


def _row_record(cells: list[str], columns: dict[str, int], position: str) -> FindingRecord | Rejected:
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
        names=(get("fqdn"), None if host_is_ip else host),
        netbios=get("netbios"),
        mac=get("mac"),
        ips=(host if host_is_ip else None, get("ip")),
        os_name=os_name.splitlines()[0].strip() if os_name else None,
        name=host or get("fqdn") or get("ip"),
    )
    key = host_key(fields)
    if key is None:
        return Rejected(position=position, reason="the row has no host (Host, IP Address, DNS Name...)")
    port, protocol = get("port") or "0", (get("protocol") or "tcp").lower()
    provider_id = make_provider_id(key, plugin_id, port, protocol)
    state = (get("state") or "open").lower()
    if state not in TENABLE_STATES:
        return Rejected(position=position, reason=f"unknown vulnerability state {state[:32]!r}",
                        provider_id=provider_id)
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
        return Rejected(position=position, reason="the row has no usable severity, risk or CVSS score",
                        provider_id=provider_id)
    last_seen = parse_any_time(get("last_seen")) or parse_any_time(get("host_end"))
    output = get("output")
    extra = {"port": port, "protocol": protocol, "plugin_family": get("family"),
             "repository": get("repository")}
    return FindingRecord(
        provider_id=provider_id,
        resource=ResourceRef(**fields),
        title=clip(get("title")) or f"Nessus plugin {plugin_id}",
        cves=find_cves(get("cve")),
        vendor_id=plugin_id,
        status=TENABLE_STATES[state],
        description=clip(get("description") or get("synopsis")),
        remediation=remediation(get("solution")),
        first_seen=parse_any_time(get("first_seen")),
        last_seen=last_seen,
        provider_timestamp=parse_any_time(get("indexed")) or parse_any_time(get("last_fixed")) or last_seen,
        cvss_score=score,
        cvss_vector=vector,
        evidence=clip(_OUTPUT_PREFIX.sub("", output)) if output else None,
        references=split_references([get("see_also")]),
        extra={k: v for k, v in extra.items() if v is not None},
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


class _Readable(io.RawIOBase):
    """A raw reader over any object with read(); closing it leaves that object open."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
