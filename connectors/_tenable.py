"""Helpers shared by the Tenable connectors (nessus, tenable_io, tenable_csv).

Severity on the Nessus 0-4 scale (else a risk word, else a CVSS score), Tenable states,
the dates Nessus and Tenable.sc write, host identifiers (UUIDs, names, IPs, NetBIOS
names, MACs) and the provider id "<host key>|<plugin>|<port>/<protocol>" that all three
connectors give the same host, plugin and port.  No connector lives here.
"""

from __future__ import annotations

import ast
import ipaddress
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from connectors.base import parse_time, severity_from_cvss, severity_from_word
from connectors.model import SEVERITIES, SEVERITY_RANK, FindingRecord, Observation, Record, ResourceRef

MAX_TEXT = 65536
NESSUS_SCALE = "nessus 0-4"
RISK_SCALE = "tenable risk factor"

TENABLE_STATES = {
    "active": "open",
    "new": "open",
    "open": "open",
    "reopened": "open",
    "resurfaced": "open",
    "fixed": "fixed",
}
# identity plugins whose output feeds the ResourceRef of every record of the host
_MAC_PLUGINS = frozenset({"86420", "10150", "35716"})  # Ethernet MAC Addresses, NetBIOS, Ethernet Card
FACT_PLUGINS = frozenset({"12053", "11936", "10150", "55472"}) | _MAC_PLUGINS
_MAC = re.compile(r"(?<![0-9A-Fa-f:-])([0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5})(?![0-9A-Fa-f:-])")
_RESOLVES = re.compile(r"resolves as\s+(\S+)", re.IGNORECASE)
REMOTE_OS = re.compile(r"Remote operating system\s*:\s*(.+)", re.IGNORECASE)
_COMPUTER_NAME = re.compile(r"^\s*(\S+)\s*=\s*Computer name\s*$", re.IGNORECASE | re.MULTILINE)
_DEVICE_HOSTNAME = re.compile(r"Hostname\s*:\s*(\S+)", re.IGNORECASE)
# Observation category of severity 0 items (else by plugin family, else by title)
_CATEGORY_PLUGINS = {
    "12053": "identity", "86420": "identity", "10150": "identity", "55472": "identity", "35716": "identity",
    "11936": "os", "54615": "os",
    "11219": "port", "14272": "port", "34220": "port", "34277": "port", "10335": "port",
    "22964": "service", "11011": "service", "10107": "service", "10736": "service",
    "20811": "software", "22869": "software", "45590": "software", "58452": "software",
    "83991": "software", "97993": "software", "178102": "software",
    "10287": "network", "24272": "network", "25202": "network", "25203": "network",
    "58651": "network", "103871": "network",
}
_SOFTWARE_TITLE = re.compile(r"installed software|software enumeration|software inventory|\binstalled\b",
                             re.IGNORECASE)
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


def merge_repeats(records: Iterable[Record]) -> Iterator[Record]:
    """Merge consecutive FindingRecords (or Observations) with the same provider_id into one (streaming).

    Nessus reports a plugin twice on one port when it finds two installs, and CSV exports
    repeat a row per CVE or service: one record each, with the CVEs, references and
    evidence of all.  Repeats that are not next to each other keep their (equal) provider_id
    and are folded by the merge.
    """
    pending: FindingRecord | Observation | None = None
    for record in records:
        if isinstance(record, (FindingRecord, Observation)):
            if (pending is not None and type(pending) is type(record)
                    and pending.provider_id == record.provider_id):
                pending = (merge_records(pending, record) if isinstance(pending, FindingRecord)
                           else merge_observations(pending, record))
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


def merge_observations(first: Observation, second: Observation) -> Observation:
    """One observation holding what two reports of the same provider id say (both outputs)."""
    if second.evidence and (not first.evidence or second.evidence not in first.evidence):
        first.evidence = clip("\n\n".join(filter(None, (first.evidence, second.evidence))))
    if first.value != second.value:
        first.value = first.value or second.value
    first.first_seen = _earliest(first.first_seen, second.first_seen)
    first.last_seen = _latest(first.last_seen, second.last_seen)
    first.provider_timestamp = _latest(first.provider_timestamp, second.provider_timestamp)
    return first


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
        try:
            return datetime.fromtimestamp(value, tz=UTC) if value > 0 else None
        except (ValueError, OverflowError, OSError):
            return None
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


def strict_time(name: str, value: str | int | float | None) -> datetime | None:
    """A record's date (as ``parse_any_time`` reads it), None when empty; ValueError naming
    the field when it is there but unreadable: the record is Rejected, not silently undated."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    if text in ("", "-1", "0", "N/A", "-"):
        return None
    parsed = parse_any_time(value if isinstance(value, (int, float)) else text)
    if parsed is None:
        raise ValueError(f"{name} is not a date Tenable writes: {text[:64]!r}")
    return parsed


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


def host_fields(
    *,
    agent_id: str | None = None,
    names: Iterable[str | None] = (),
    netbios: str | None = None,
    mac: str | Iterable[str] | None = None,
    ips: Iterable[str | Iterable[str] | None] = (),
    os_name: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """ResourceRef keyword arguments of a host, from what a Tenable record says of it.

    agent_id is normalized as a UUID, names go to fqdn/hostname (``add_names``), the
    NetBIOS name loses its domain, the first valid MAC and the valid IPs are kept.
    """
    fields: dict[str, Any] = {"kind": "host"}
    agent = normalize_uuid(agent_id)
    if agent:
        fields["agent_id"] = agent
    add_names(fields, *names)
    netbios = netbios_name(netbios)
    if netbios:
        fields["netbios"] = netbios
    mac = first_mac(mac)
    if mac:
        fields["mac"] = mac
    add_ips(fields, *ips)
    if os_name:
        fields["os"] = os_name
    if name:
        fields["name"] = name
    return fields


def os_text(value: Any) -> str | None:
    """An operating system as plain text, never a list rendered as text.

    A list (Tenable.io ``asset.operating_system``, or a Nessus tag holding one rendered
    as JSON or Python text, ``["Linux Kernel 5.15"]``) is joined with " / ": Tenable lists
    the candidates when unsure.  A multi-line text (Nessus writes one candidate a line)
    gives its first line.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                value = json.loads(text)
            except ValueError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    value = text.strip("[]")
        else:
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return lines[0][:500] if lines else None
    if isinstance(value, (list, tuple)):
        names = list(dict.fromkeys(str(v).strip() for v in value if isinstance(v, str) and v.strip()))
        return " / ".join(names)[:500] or None
    if isinstance(value, str):
        return os_text(value)
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


# -- observations (informational items) ------------------------------------------------


def all_macs(text: str | None) -> list[str]:
    """Every MAC address in a text, lower-case colon form."""
    return [normalize_mac(m) for m in _MAC.findall(text or "")]


def normalize_mac(value: str) -> str:
    """A MAC address in lower-case colon form."""
    digits = re.sub(r"[^0-9a-fA-F]", "", value)
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2)).lower()


def identity_facts(plugin_id: str, output: str) -> Iterator[tuple[str, str]]:
    """(kind, value) identity facts in an identity plugin's output."""
    if plugin_id == "12053":
        match = _RESOLVES.search(output)
        if match:
            yield "fqdn", match.group(1).rstrip(".").lower()
    elif plugin_id == "11936":
        match = REMOTE_OS.search(output)
        if match:
            yield "os", match.group(1).strip()
    elif plugin_id == "10150":
        match = _COMPUTER_NAME.search(output)
        if match:
            yield "netbios", match.group(1)
    elif plugin_id == "55472":
        match = _DEVICE_HOSTNAME.search(output)
        if match and not ip_version(match.group(1)):
            yield "hostname", match.group(1)
    if plugin_id in _MAC_PLUGINS:
        for mac in all_macs(output):
            yield "mac", mac


def observation_category(plugin_id: str, family: str, title: str) -> str:
    if plugin_id in _CATEGORY_PLUGINS:
        return _CATEGORY_PLUGINS[plugin_id]
    family = family.strip().lower()
    if family == "port scanners":
        return "port"
    if family == "service detection":
        return "service"
    if _SOFTWARE_TITLE.search(title):
        return "software"
    return "other"


def observation_value(
    category: str, plugin_id: str, output: str | None, port: int | None, protocol: str, service: str | None
) -> str | None:
    """The fact, short: the OS, the FQDN/MACs/NetBIOS name, "443/tcp", "443/tcp www"..."""
    if category == "identity":
        facts = list(identity_facts(plugin_id, output or ""))
        macs = sorted({value for kind, value in facts if kind == "mac"})
        names = [value for kind, value in facts if kind != "mac"]
        value = ", ".join(names + macs)
        return value[:500] or None
    if category == "os":
        match = REMOTE_OS.search(output or "")
        if match:
            return match.group(1).strip()[:500]
    if category == "port" and port is not None:
        return f"{port}/{protocol}"
    if category == "service" and port is not None:
        return f"{port}/{protocol} {service}" if service else f"{port}/{protocol}"
    lines = [line.strip() for line in (output or "").splitlines() if line.strip()]
    if len(lines) == 1 and len(lines[0]) <= 200:
        return lines[0]
    return None


def tenable_observation(
    *, provider_id: str, resource: ResourceRef, title: str, plugin_id: str, family: str | None,
    output: str | None, port: int | None, protocol: str | None, service: str | None,
    first_seen: datetime | None, last_seen: datetime | None, provider_timestamp: datetime | None,
    scan: str | None = None, product: str | None = None,
) -> Observation:
    """A Tenable informational item (severity 0 / info) as an Observation: category and value
    from the plugin (``observation_category``, ``observation_value``), the output as evidence."""
    category = observation_category(plugin_id, family or "", title)
    return Observation(
        provider_id=provider_id, resource=resource, name=title, category=category,
        value=observation_value(category, plugin_id, output, port, protocol, service),
        vendor_id=plugin_id, port=port, protocol=protocol if port is not None else None, service=service,
        evidence=output, first_seen=first_seen, last_seen=last_seen, provider_timestamp=provider_timestamp,
        scan=scan, product=product,
    )
