"""Tenable.io vulnerability export JSON -> FindingRecord, Observation (and Tenable.sc analysis pages).

A Tenable.io export chunk (``GET /vulns/export/{uuid}/chunks/{n}``) is a JSON array of
vulnerability objects; it is streamed item by item with ijson.

    asset.uuid (else asset.agent_uuid) -> agent_id (lower-case dashed UUID)
    asset.uuid -> host_key (provenance: Tenable's key of the asset record)
    asset.fqdn -> fqdn, asset.hostname -> hostname, asset.netbios_name -> netbios,
    asset.ipv4/ipv6 -> ipv4/ipv6, asset.mac_address -> mac (the lowest valid one, sorted),
    asset.operating_system (a list) -> os, its items joined with " / " (plain text);
    values that are not valid addresses (such as "[REDACTED]") are dropped
    asset.network_id -> network (the default network 00000000-0000-0000-0000-000000000000
    -> None: the tenant's default scope)
    asset.aws_ec2_instance_id (else azure_vm_id, gcp_instance_id) -> instance_id,
    asset.aws_ec2_name -> cloud_name (when the export carries them)
    scan.uuid (else scan.schedule_uuid) -> scan
    plugin.id -> vendor_id, plugin.name -> title, plugin.description (else synopsis) ->
    description, plugin.solution -> remediation, plugin.cve -> cves, plugin.see_also ->
    references, output -> evidence,
    plugin.cvss3_base_score/cvss3_vector.raw, else cvss_base_score/cvss_vector.raw ->
    cvss_score/cvss_vector (a bare v3 vector gets "CVSS:3.0/", a prefixed one is kept; a
    score of 0 without a vector means "none")
    severity_id 0-4 (else the severity word) -> severity, scale "nessus 0-4"
    state OPEN/NEW/ACTIVE/REOPENED/RESURFACED -> open, FIXED -> fixed
    first_found/last_found -> first_seen/last_seen; provider_timestamp = indexed, else
    last_fixed, else last_found (a date field that is there but no date: Rejected)
    provider_id = "<asset uuid>|<plugin id>|<port>/<protocol>"
Severity info (severity_id 0) items are Observations, never findings: plugin.name ->
name, plugin.id -> vendor_id, output -> evidence ("[REDACTED]" dropped), port.port (0:
None)/protocol/service -> port/protocol/service, category and value as in ``nessus``
(``_tenable.observation_category``/``observation_value``: port scanners "4599/tcp",
services "80/tcp www", OS, identity facts, installed software...).

A Tenable.sc ``POST /rest/analysis`` page (``{"response": {"results": [...]}}``, tool
vulndetails) is read too: pluginID, severity.id, ip/dnsName/netbiosName/macAddress/uuid,
port/protocol, firstSeen/lastSeen (epoch seconds), cve (comma separated), pluginText's
<plugin_output>; its records are all open (the cumulative view); product "Tenable.sc"
on every record (findings and observations); severity 0 items are Observations.
Consecutive findings (or observations) with the same provider_id are merged into one
record (``_tenable.merge_repeats``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO

import ijson

from connectors._tenable import (
    TENABLE_STATES,
    clip,
    first_mac,
    host_fields,
    host_key,
    make_provider_id,
    merge_repeats,
    normalize_uuid,
    os_text,
    pick_cvss,
    remediation,
    severity_fields,
    split_references,
    strict_time,
    tenable_observation,
)
from connectors.base import ParseOptions, find_cves
from connectors.model import FindingRecord, FormatError, Observation, Rejected, ResourceRef

FORMAT = "tenable_io"
TITLE = "Tenable.io vulnerability export JSON"
PRODUCT = "Tenable.io"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "findings"

_IO_ARRAY = re.compile(rb"\A\[\s*\{")
_IO_KEYS = (b'"plugin"', b'"first_found"', b'"last_found"', b'"agent_uuid"', b'"severity_id"')
_BOM = b"\xef\xbb\xbf"
SC_PRODUCT = "Tenable.sc"  # FindingRecord/Observation.product of the Tenable.sc analysis pages
DEFAULT_NETWORK = "00000000-0000-0000-0000-000000000000"  # Tenable's default network: no scope
_INSTANCE_KEYS = ("aws_ec2_instance_id", "azure_vm_id", "gcp_instance_id")
_PLUGIN_OUTPUT = re.compile(r"<plugin_output>(.*?)</plugin_output>", re.DOTALL)


def sniff(head: bytes) -> bool:
    """A JSON array of objects with Tenable.io's asset and plugin keys, or a Tenable.sc analysis page."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:65536]
    if _IO_ARRAY.match(text):
        return b'"asset"' in text and any(key in text for key in _IO_KEYS)
    if text.startswith(b"{"):
        return b'"response"' in text and b'"results"' in text and b'"pluginID"' in text
    return False


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream the records of a Tenable.io export chunk or a Tenable.sc analysis page."""
    first, stream = _first_byte(stream)
    if first == b"[":
        yield from merge_repeats(_io_records(stream))
    elif first == b"{":
        yield from merge_repeats(_sc_records(stream))
    elif not first:
        raise FormatError("empty body: a Tenable.io export chunk is a JSON array")
    else:
        raise FormatError(
            "not JSON: expected a Tenable.io export chunk (a JSON array of vulnerabilities) "
            "or a Tenable.sc analysis response object"
        )


def _io_records(stream: BinaryIO) -> Iterator[FindingRecord | Rejected]:
    index = -1
    try:
        for index, item in enumerate(ijson.items(stream, "item", use_float=True)):
            yield _io_record(item, f"[{index}]")
    except (ijson.JSONError, UnicodeDecodeError) as exc:
        raise FormatError(f"not well-formed JSON after item [{index}]: {_short(exc)}") from None


def _io_record(item: Any, position: str) -> FindingRecord | Rejected:
    if not isinstance(item, dict):
        return Rejected(position=position, reason="a vulnerability must be a JSON object")
    asset, plugin = item.get("asset"), item.get("plugin")
    if not isinstance(plugin, dict) or _text(plugin.get("id")) is None:
        return Rejected(position=position, reason="'plugin.id' is required")
    if not isinstance(asset, dict):
        return Rejected(position=position, reason="'asset' is required")
    plugin_id = _text(plugin.get("id"))
    fields = host_fields(
        agent_id=_text(asset.get("uuid")) or _text(asset.get("agent_uuid")),
        names=(_first(asset.get("fqdn")), _first(asset.get("hostname"))),
        netbios=_first(asset.get("netbios_name")),
        mac=sorted(m for m in (first_mac(v) for v in _strings(asset.get("mac_address"))) if m),
        ips=(_strings(asset.get("ipv4")), _strings(asset.get("ipv6"))),
        os_name=os_text(asset.get("operating_system")),
        name=_first(asset.get("hostname")) or _first(asset.get("fqdn")),
    )
    key = host_key(fields)
    _asset_evidence(asset, fields)
    port_info = item.get("port") if isinstance(item.get("port"), dict) else {}
    port, protocol = _text(port_info.get("port")) or "0", (_text(port_info.get("protocol")) or "tcp").lower()
    provider_id = make_provider_id(key, plugin_id, port, protocol)
    if key is None:
        return Rejected(position=position, reason="'asset' has no identifier (uuid, fqdn, hostname, ip...)")
    state = (_text(item.get("state")) or "open").lower()
    if state not in TENABLE_STATES:
        return Rejected(position=position, reason=f"unknown 'state' {state[:32]!r}", provider_id=provider_id)
    score, vector = pick_cvss(
        (plugin.get("cvss3_base_score"), _raw_vector(plugin.get("cvss3_vector")), "3.0"),
        (plugin.get("cvss_base_score"), _raw_vector(plugin.get("cvss_vector")), "2.0"),
    )
    severity = severity_fields(item.get("severity_id"), _text(item.get("severity")), score)
    if severity is None:
        return Rejected(position=position, reason="no usable 'severity'", provider_id=provider_id)
    try:
        first_seen = strict_time("'first_found'", _text(item.get("first_found")))
        last_seen = strict_time("'last_found'", _text(item.get("last_found")))
        provider_timestamp = (strict_time("'indexed'", _text(item.get("indexed")))
                              or strict_time("'last_fixed'", _text(item.get("last_fixed"))) or last_seen)
    except ValueError as exc:
        return Rejected(position=position, reason=str(exc), provider_id=provider_id)
    scan_info = item.get("scan") if isinstance(item.get("scan"), dict) else {}
    scan = _text(scan_info.get("uuid")) or _text(scan_info.get("schedule_uuid"))
    if severity["severity"] == "informational":
        return _observation(
            provider_id, fields, plugin_id, _text(plugin.get("name")), _text(plugin.get("family")),
            _text(item.get("output")), port, protocol, _text(port_info.get("service")),
            first_seen, last_seen, provider_timestamp, scan, None,
        )
    extra = {
        "port": port,
        "protocol": protocol,
        "service": _text(port_info.get("service")),
        "plugin_family": _text(plugin.get("family")),
        "agent_uuid": _text(asset.get("agent_uuid")),
    }
    vpr = plugin.get("vpr")
    if isinstance(vpr, dict) and vpr.get("score") is not None:
        extra["vpr_score"] = vpr["score"]
    modification = _text(item.get("severity_modification_type"))
    if modification and modification.upper() != "NONE":
        extra["severity_modification"] = modification
    return FindingRecord(
        provider_id=provider_id,
        resource=ResourceRef(**fields),
        title=clip(_text(plugin.get("name"))) or f"Nessus plugin {plugin_id}",
        cves=find_cves(*_strings(plugin.get("cve"))),
        vendor_id=plugin_id,
        status=TENABLE_STATES[state],
        description=clip(_text(plugin.get("description")) or _text(plugin.get("synopsis"))),
        remediation=remediation(_text(plugin.get("solution"))),
        first_seen=first_seen,
        last_seen=last_seen,
        provider_timestamp=provider_timestamp,
        cvss_score=score,
        cvss_vector=vector,
        evidence=clip(_text(item.get("output"))),
        references=split_references(_strings(plugin.get("see_also"))),
        extra={k: v for k, v in extra.items() if v is not None},
        scan=scan,
        **severity,
    )


def _asset_evidence(asset: dict, fields: dict[str, Any]) -> None:
    """Network scope, host record key and cloud instance of a Tenable.io asset, into fields."""
    network = _text(asset.get("network_id"))
    if network and network != DEFAULT_NETWORK:
        fields["network"] = network
    uuid = _text(asset.get("uuid"))
    if uuid:
        fields["host_key"] = normalize_uuid(uuid)
    for key in _INSTANCE_KEYS:
        instance = _first(asset.get(key))
        if instance:
            fields["instance_id"] = instance
            break
    for key in ("aws_ec2_name", "cloud_name"):
        name = _first(asset.get(key))
        if name:
            fields["cloud_name"] = name
            break


def _sc_records(stream: BinaryIO) -> Iterator[FindingRecord | Rejected]:
    envelope: dict[str, Any] = {}

    def watch(events: Iterator[tuple[str, str, Any]]) -> Iterator[tuple[str, str, Any]]:
        for prefix, event, value in events:
            if prefix == "response.results" and event == "start_array":
                envelope["results"] = True
            elif prefix in ("error_code", "error_msg") and event in ("number", "string"):
                envelope[prefix] = value
            yield prefix, event, value

    index = -1
    try:
        events = watch(ijson.parse(stream, use_float=True))
        for index, item in enumerate(ijson.items(events, "response.results.item")):
            yield _sc_record(item, f"response.results[{index}]")
    except (ijson.JSONError, UnicodeDecodeError) as exc:
        raise FormatError(f"not well-formed JSON after response.results[{index}]: {_short(exc)}") from None
    if envelope.get("error_code") not in (None, 0, "0"):
        raise FormatError(f"Tenable.sc answered an error: {str(envelope.get('error_msg'))[:200]}")
    if not envelope.get("results"):
        raise FormatError(
            "a JSON object but not a Tenable.sc analysis response (no response.results array); "
            "a Tenable.io export chunk is a JSON array"
        )


def _sc_record(item: Any, position: str) -> FindingRecord | Rejected:
    if not isinstance(item, dict):
        return Rejected(position=position, reason="a result must be a JSON object")
    plugin_id = _text(item.get("pluginID"))
    if plugin_id is None:
        return Rejected(position=position, reason="'pluginID' is required")
    fields = host_fields(
        agent_id=_text(item.get("hostUUID")) or _text(item.get("uuid")),
        names=(_text(item.get("dnsName")),),
        netbios=_text(item.get("netbiosName")),
        mac=_text(item.get("macAddress")),
        ips=(_text(item.get("ip")),),
        name=_text(item.get("dnsName")) or _text(item.get("ip")),
    )
    key = host_key(fields)
    port, protocol = _text(item.get("port")) or "0", (_text(item.get("protocol")) or "tcp").lower()
    provider_id = make_provider_id(key, plugin_id, port, protocol)
    if key is None:
        return Rejected(position=position, reason="no host identifier (ip, dnsName, uuid...)")
    score, vector = pick_cvss(
        (item.get("cvssV3BaseScore"), _text(item.get("cvssV3Vector")), "3.0"),
        (item.get("baseScore"), _text(item.get("cvssVector")), "2.0"),
    )
    sc_severity = item.get("severity") if isinstance(item.get("severity"), dict) else {}
    word = _text(sc_severity.get("name")) or _text(item.get("riskFactor"))
    severity = severity_fields(sc_severity.get("id"), word, score)
    if severity is None:
        return Rejected(position=position, reason="no usable 'severity'", provider_id=provider_id)
    text = _text(item.get("pluginText")) or ""
    output = _PLUGIN_OUTPUT.search(text)
    family = item.get("family") if isinstance(item.get("family"), dict) else {}
    repository = item.get("repository") if isinstance(item.get("repository"), dict) else {}
    try:
        first_seen = strict_time("'firstSeen'", _text(item.get("firstSeen")))
        last_seen = strict_time("'lastSeen'", _text(item.get("lastSeen")))
    except ValueError as exc:
        return Rejected(position=position, reason=str(exc), provider_id=provider_id)
    if severity["severity"] == "informational":
        return _observation(
            provider_id, fields, plugin_id, _text(item.get("pluginName")), _text(family.get("name")),
            output.group(1) if output else text or None, port, protocol, None,
            first_seen, last_seen, last_seen, None, SC_PRODUCT,
        )
    extra = {
        "port": port,
        "protocol": protocol,
        "plugin_family": _text(family.get("name")),
        "repository": _text(repository.get("name")),
    }
    return FindingRecord(
        provider_id=provider_id,
        resource=ResourceRef(**fields),
        title=clip(_text(item.get("pluginName"))) or f"Nessus plugin {plugin_id}",
        cves=find_cves(_text(item.get("cve"))),
        vendor_id=plugin_id,
        description=clip(_text(item.get("description")) or _text(item.get("synopsis"))),
        remediation=remediation(_text(item.get("solution"))),
        first_seen=first_seen,
        last_seen=last_seen,
        provider_timestamp=last_seen,
        cvss_score=score,
        cvss_vector=vector,
        evidence=clip(output.group(1) if output else text or None),
        references=split_references([_text(item.get("seeAlso"))]),
        extra={k: v for k, v in extra.items() if v is not None},
        product=SC_PRODUCT,
        **severity,
    )


def _observation(
    provider_id: str, fields: dict[str, Any], plugin_id: str, name: str | None, family: str | None,
    output: str | None, port: str, protocol: str, service: str | None, first_seen: datetime | None,
    last_seen: datetime | None, timestamp: datetime | None, scan: str | None, product: str | None,
) -> Observation:
    """An informational item (severity info / 0): a fact about the asset, never a finding."""
    number = int(port) if port.isdigit() and port != "0" else None
    title = clip(name) or f"Nessus plugin {plugin_id}"
    evidence = clip(output)
    if evidence == "[REDACTED]":
        evidence = None
    return tenable_observation(
        provider_id=provider_id, resource=ResourceRef(**fields), title=title, plugin_id=plugin_id,
        family=family,
        output=evidence, port=number, protocol=protocol, service=service, first_seen=first_seen,
        last_seen=last_seen, provider_timestamp=timestamp, scan=scan, product=product,
    )


def _text(value: Any) -> str | None:
    """A non-empty string from a JSON string or number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _strings(value: Any) -> list[str]:
    """The strings of a JSON string or list."""
    if isinstance(value, list):
        return [text for text in (_text(v) for v in value) if text]
    text = _text(value)
    return [text] if text else []


def _first(value: Any) -> str | None:
    strings = _strings(value)
    return strings[0] if strings else None


def _raw_vector(value: Any) -> str | None:
    """Tenable.io gives vectors as {"raw": "AV:N/..."}; older exports as plain strings."""
    if isinstance(value, dict):
        return _text(value.get("raw"))
    return _text(value)


def _first_byte(stream: BinaryIO) -> tuple[bytes, BinaryIO]:
    """The first non-blank byte (after a UTF-8 BOM) and a stream that starts with it."""
    head = b""
    while True:
        chunk = stream.read(256)
        head = (head + chunk).lstrip(b" \t\r\n")
        if head.startswith(_BOM):
            head = head[3:].lstrip(b" \t\r\n")
        if not chunk or (head and not _BOM.startswith(head)):
            return head[:1], _Rejoined(head, stream)


class _Rejoined:
    """A binary reader that returns ``head`` and then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if self._head:
            if size is None or size < 0:
                data, self._head = self._head + self._stream.read(), b""
                return data
            data, self._head = self._head[:size], self._head[size:]
            return data
        return self._stream.read(size)


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]
