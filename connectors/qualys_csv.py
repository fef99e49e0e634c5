"""Qualys VM scan report CSV and VMDR "Asset Vuln Datalist" CSV -> FindingRecord, Observation.

Both exports start with a free-form preamble (report name, company, user: rows of any
width, quoted cells may span lines; VMDR exports sometimes have none), then the real
header row: the first row with a "QID" column and a host column ("IP", "Asset IPV4",
"Asset Id", "DNS", ...), at most 100 rows down.  Rows are streamed with the csv module;
columns are mapped by header name (case-insensitive), so the scan-report layout
("IP","DNS","NetBIOS",...,"QID","Title","Vuln Status","Type","Severity",...), the PCI
layout (IP,HOSTNAME,LAST SCAN,QID,VULN TITLE,...,SEVERITY,Q_SEVERITY,...) and both VMDR
layouts (QID-first, and CVE-first with one row per CVE of a detection) all work.

Resource: IP / Asset IPV4 (several addresses allowed: "10.0.0.20,10.0.0.21") -> ipv4,
Asset IPV6 -> ipv6, DNS / HOSTNAME -> fqdn when it has a dot else hostname, NetBIOS ->
netbios, Asset Id -> agent_id "qualys-asset:<id>" (as in qualys_hld), Asset Name -> name
(and hostname/fqdn when it is a host name), OS / Operating System -> os, Network ->
network ("Global Default Network" and "0" -> None: the tenant's default scope), Host ID
-> host_key (else Asset Id, else the first IP, else DNS/NetBIOS name); then the identity
facts of the host's information gathered rows (6/45039 DNS names -> fqdn/hostname, 82044
-> netbios, 45017 -> os, 43007 -> mac: the lowest, sorted; the row's own columns win).
The rows of one host (consecutive rows with the same asset id / IP / DNS) are gathered
(one host's worth of memory) and come out together, so that a fact row after a finding
still reaches it.
Scan: the preamble's scan reference ("scan/1714557600.12345"), else the value under its
"Scan Title" (or "Report Title") label; None when the preamble has neither (VMDR).
Finding: QID -> vendor_id; Title / VULN TITLE -> title ("QID <qid>" when absent);
Severity 1-5 (Q_SEVERITY first when present; a word such as "Medium" otherwise) ->
informational/low/medium/high/critical, Type "Ig"/"Info" always informational;
Vuln Status / Status New/Active/Re-Opened/Fixed -> open/fixed (missing: open);
CVE ID / CVE / CVEID -> cves; Threat (else CVE-Description) -> description, Solution ->
remediation (HTML to text); Results / RESULT -> evidence; CVSS3 Base, else CVSSv3.1 Base
(nvd), CVSS3, CVSS Base, CVSSv2 Base (nvd) -> cvss_score/cvss_vector ("8.1 (AV:N/..)");
First Detected -> first_seen; Last Detected / LAST SCAN -> last_seen; provider_timestamp
is the latest of Last Detected, Date Last Fixed and Last Reopened.
Observation: a row of Type "Ig" / "Info" / "Information Gathered" (information gathered:
never a finding): QID -> vendor_id, Title -> name ("QID <qid>" without one), Results ->
evidence, Port/Protocol -> port/protocol, category by QID else by title
(``_qualys.info_category``), value: the identity facts, else "443/tcp" for ports and
services, else the result when it is one short line; first/last seen as for findings,
provider_timestamp = Last Detected; same provider_id, resource and scan as a finding.
Dates: ISO 8601, "05/13/2021 07:08:28" (month first; day first when the first number
exceeds 12, as in "22/09/2022 13:01"), "Feb 03, 2026 07:00 AM".  They carry no zone:
a "GMT-0500" in the preamble (VMDR report date) is applied, otherwise UTC is assumed.
provider_id = "<Asset Id or IP or DNS>|<QID>|<Port>/<Protocol>" ("|<FQDN>" appended when
the row has one); the CVE rows of one VMDR detection share it and differ by CVE.
A row without a host (IP, DNS, NetBIOS or asset id) or without a QID, or with a bad
severity, status or date, gives Rejected(position="line N"); blank rows and the Qualys
"CONFIDENTIAL AND PROPRIETARY" footer are skipped.  A body without a header row is a
FormatError.  Bytes that are not UTF-8 are replaced (U+FFFD); cells are limited to the csv
module's field size (128 KiB): a larger cell is a FormatError.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import BinaryIO

from connectors._qualys import (
    QUALYS_SCALE,
    HostFacts,
    asset_agent_id,
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
    network_name,
    port_number,
    provider_key,
    qualys_severity,
    qualys_status,
    split_ips,
    time_field,
    value_or_none,
)
from connectors.base import ParseOptions, find_cves, severity_from_word
from connectors.model import FindingRecord, FormatError, Observation, Rejected

FORMAT = "qualys_csv"
TITLE = "Qualys VM scan report / VMDR CSV"
PRODUCT = "Qualys VMDR"
CONTENT_TYPES = ("text/csv", "application/csv")
RECORD_KIND = "findings"

MAX_PREAMBLE_ROWS = 100
WORD_SCALE = "qualys severity word"

# canonical field -> header names (lower-case), first present wins
COLUMNS: dict[str, tuple[str, ...]] = {
    "ip": ("ip", "ip address", "asset ipv4", "ipv4"),
    "ipv6": ("asset ipv6", "ipv6"),
    "dns": ("dns", "dns name", "hostname", "host name"),
    "netbios": ("netbios", "netbios name"),
    "asset_id": ("asset id",),
    "host_id": ("host id", "qualys host id"),
    "network": ("network", "network id"),
    "qg_host_id": ("qg host id", "qg hostid"),
    "asset_name": ("asset name",),
    "os": ("os", "operating system"),
    "tracking_method": ("tracking method",),
    "qid": ("qid",),
    "title": ("title", "vuln title"),
    "status": ("vuln status", "status"),
    "type": ("type", "type detected"),
    "q_severity": ("q_severity",),
    "severity": ("severity",),
    "port": ("port",),
    "protocol": ("protocol",),
    "fqdn": ("fqdn",),
    "ssl": ("ssl",),
    "first_seen": ("first detected", "first found"),
    "last_seen": ("last detected", "last found", "last scan"),
    "last_fixed": ("date last fixed", "last fixed"),
    "last_reopened": ("last reopened",),
    "cves": ("cve id", "cve", "cveid", "cve ids"),
    "threat": ("threat",),
    "cve_description": ("cve-description",),
    "solution": ("solution",),
    "results": ("results", "result"),
    "category": ("category",),
    "cvss3": ("cvss3 base", "cvssv3.1 base (nvd)", "cvssv3 base (nvd)", "cvss3.1 base", "cvss3"),
    "cvss2": ("cvss base", "cvss_base", "cvssv2 base (nvd)", "cvss"),
}
_HOST_COLUMNS = frozenset(COLUMNS["ip"] + COLUMNS["ipv6"] + COLUMNS["asset_id"] + COLUMNS["dns"])
_GMT = re.compile(r"GMT\s*([+-])(\d{2}):?(\d{2})")
_FOOTER = "CONFIDENTIAL AND PROPRIETARY"
_SCAN_REF = re.compile(r"\Ascan/\d+(?:\.\d+)?\Z")
_TIME_FORMATS = (
    "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M", "%m/%d/%Y", "%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M", "%d/%m/%Y",
    "%b %d, %Y %I:%M %p", "%b %d, %Y %I:%M:%S %p", "%b %d, %Y", "%d %b %Y %I:%M%p", "%Y-%m-%d %H:%M:%S",
)


def _is_header(row: list[str]) -> bool:
    cells = {cell.strip().lower() for cell in row}
    return "qid" in cells and bool(cells & _HOST_COLUMNS)


def sniff(head: bytes) -> bool:
    """A CSV body with a header row naming a QID column and a host column (IP, Asset IPV4...)."""
    text = head.decode("utf-8", "replace").lstrip("\ufeff")
    if not text.strip() or text.lstrip()[:1] in ("<", "{", "["):
        return False
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for index, row in enumerate(reader):
            if index >= MAX_PREAMBLE_ROWS:
                return False
            if _is_header(row):
                return True
    except csv.Error:
        return False
    return False


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Observation | Rejected]:
    """Stream the rows of a Qualys CSV export after its preamble.

    The rows of one host (consecutive rows with the same host) are gathered, then come out
    with the identity facts of its information gathered rows in every record's resource.
    """
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline="")
    reader = csv.reader(text)
    pending: list[FindingRecord | Observation | Rejected] = []
    facts = HostFacts()
    host: str | None = None
    try:
        columns, zone, scan = _read_header(reader)
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len([cell for cell in row if cell.strip()]) == 1 and _FOOTER in row[0].upper():
                continue
            cells = {name: row[index] if index < len(row) else "" for name, index in columns.items()}
            row_host = _host_of(cells)
            if row_host != host:
                yield from _flush(pending, facts)
                pending, facts, host = [], HostFacts(), row_host
            if is_information(cells.get("type")):
                facts.add(value_or_none(cells.get("qid")), value_or_none(cells.get("results")))
            pending.append(_record(cells, f"line {start}", zone, scan))
        yield from _flush(pending, facts)
    except csv.Error as exc:
        raise FormatError(f"malformed CSV at line {reader.line_num}: {exc}") from None
    finally:
        text.detach()


def _flush(
    pending: list[FindingRecord | Observation | Rejected], facts: HostFacts
) -> Iterator[FindingRecord | Observation | Rejected]:
    for record in pending:
        if not isinstance(record, Rejected):
            facts.apply(record.resource)
        yield record


def _host_of(cells: dict[str, str]) -> str | None:
    """The host part of a row's provider id: asset id, else the first IP, else DNS, NetBIOS name."""
    ipv4, ipv6 = split_ips(cells.get("ip"), cells.get("ipv6"))
    return (value_or_none(cells.get("asset_id")) or (ipv4 + ipv6 or [None])[0]
            or value_or_none(cells.get("dns")) or value_or_none(cells.get("netbios")))


def _read_header(reader: Iterator[list[str]]) -> tuple[dict[str, int], timezone, str | None]:
    zone = UTC
    scan_ref = scan_title = None
    labels: list[str] = []
    for index, row in enumerate(reader):
        if index >= MAX_PREAMBLE_ROWS:
            break
        if _is_header(row):
            names = [cell.strip().lower() for cell in row]
            columns: dict[str, int] = {}
            for field, aliases in COLUMNS.items():
                for alias in aliases:
                    if alias in names:
                        columns[field] = names.index(alias)
                        break
            return columns, zone, clip(scan_ref or scan_title)
        for position, cell in enumerate(row):
            cell = cell.strip()
            if scan_ref is None and _SCAN_REF.match(cell):
                scan_ref = cell  # "scan/1714557600.12345": the scan's reference
            label = labels[position] if position < len(labels) else ""
            if scan_title is None and label in ("scan title", "report title", "title") and cell:
                scan_title = " ".join(cell.split())
        labels = [cell.strip().lower() for cell in row]
        for cell in row:
            match = _GMT.search(cell)
            if match:
                sign = -1 if match.group(1) == "-" else 1
                zone = timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))
                break
    raise FormatError(
        f"not a {TITLE}: no header row with a QID column and a host column (IP, Asset IPV4, DNS...) "
        f"in the first {MAX_PREAMBLE_ROWS} rows"
    )


def _time(name: str, value: str | None, zone: timezone) -> datetime | None:
    try:
        return time_field(name, value)  # ISO 8601, or None for an empty cell
    except ValueError:
        value = value_or_none(value)
    for pattern in _TIME_FORMATS:
        try:
            parsed = datetime.strptime(value, pattern)
        except ValueError:
            continue
        return parsed.replace(tzinfo=zone).astimezone(UTC)
    raise ValueError(f"'{name}' is not a date-time Qualys writes: {value[:64]!r}")


def _severity(cells: dict[str, str]) -> tuple[str | None, str | None, str]:
    qualys_type = cells.get("type")
    for field in ("q_severity", "severity"):
        level = value_or_none(cells.get(field))
        if level is None:
            continue
        severity = qualys_severity(level, qualys_type)
        if severity is not None:
            return severity, level, QUALYS_SCALE
        word = severity_from_word(level)
        if word is not None:
            return ("informational" if is_information(qualys_type) else word), level, WORD_SCALE
        return None, level, QUALYS_SCALE
    return None, None, QUALYS_SCALE


def _record(
    cells: dict[str, str], position: str, zone: timezone, scan: str | None = None
) -> FindingRecord | Observation | Rejected:
    qid = value_or_none(cells.get("qid"))
    ipv4, ipv6 = split_ips(cells.get("ip"), cells.get("ipv6"))
    dns = value_or_none(cells.get("dns"))
    netbios = value_or_none(cells.get("netbios"))
    asset_id = value_or_none(cells.get("asset_id"))
    port, protocol = value_or_none(cells.get("port")), value_or_none(cells.get("protocol"))
    if port == "0" and protocol is None:
        port = None
    fqdn = value_or_none(cells.get("fqdn"))
    host = asset_id or (ipv4 + ipv6 or [None])[0] or dns or netbios
    provider_id = provider_key(host, qid, port, protocol, fqdn) if host and qid else None
    try:
        if not qid:
            raise ValueError("the row has no QID")
        if not host:
            raise ValueError("the row has no host (IP, DNS, NetBIOS name or asset id)")
        asset_name = value_or_none(cells.get("asset_name"))
        resource = make_resource(
            ips=(ipv4, ipv6),
            dns=dns or asset_name,
            netbios=netbios,
            agent_id=asset_agent_id(asset_id) or value_or_none(cells.get("qg_host_id")),
            os=cells.get("os"),
            name=asset_name,
            network=network_name(cells.get("network")),
            host_key=value_or_none(cells.get("host_id")) or asset_id or (ipv4 + ipv6 or [None])[0] or host,
        )
        first_seen = _time("First Detected", cells.get("first_seen"), zone)
        last_seen = _time("Last Detected", cells.get("last_seen"), zone)
        if is_information(cells.get("type")):
            result = evidence_text(value_or_none(cells.get("results")))
            title = clip(value_or_none(cells.get("title")))
            category = info_category(qid, title)
            facts = identity_facts(qid, value_or_none(cells.get("results")))
            number = port_number(port)
            return Observation(
                provider_id=provider_id,
                resource=resource,
                name=title or f"QID {qid}",
                category=category,
                value=fact_value(facts) if facts else info_value(category, result, port, protocol),
                vendor_id=qid,
                port=number,
                protocol=protocol.lower() if protocol and number else None,
                evidence=result,
                first_seen=first_seen,
                last_seen=last_seen,
                provider_timestamp=last_seen,
                scan=scan,
            )
        severity, level, scale = _severity(cells)
        if severity is None:
            raise ValueError(f"Severity must be 1-5 or a severity word, not {level!r}")
        original_status = value_or_none(cells.get("status"))
        status = qualys_status(original_status)
        if status is None:
            raise ValueError(f"unknown status {original_status!r} (New, Active, Re-Opened or Fixed)")
        changes = [last_seen, _time("Last Fixed", cells.get("last_fixed"), zone),
                   _time("Last Reopened", cells.get("last_reopened"), zone)]
        score, vector = cvss(cells.get("cvss3"))
        if score is None:
            score, vector = cvss(cells.get("cvss2"))
        return FindingRecord(
            provider_id=provider_id,
            resource=resource,
            title=clip(value_or_none(cells.get("title"))) or f"QID {qid}",
            severity=severity,
            severity_original=level,
            severity_scale=scale,
            cves=find_cves(cells.get("cves")),
            vendor_id=qid,
            status=status,
            description=html_to_text(value_or_none(cells.get("threat")) or cells.get("cve_description")),
            remediation=html_to_text(value_or_none(cells.get("solution"))),
            first_seen=first_seen,
            last_seen=last_seen,
            provider_timestamp=max((t for t in changes if t is not None), default=None),
            cvss_score=score,
            cvss_vector=vector,
            evidence=evidence_text(value_or_none(cells.get("results"))),
            scan=scan,
            extra=compact({
                "qualys_status": original_status,
                "qualys_type": value_or_none(cells.get("type")),
                "asset_id": asset_id,
                "tracking_method": value_or_none(cells.get("tracking_method")),
                "port": port,
                "protocol": protocol,
                "fqdn": fqdn,
                "category": value_or_none(cells.get("category")),
            }),
        )
    except ValueError as exc:
        return Rejected(position=position, reason=str(exc), provider_id=provider_id)
