"""AWS Security Finding Format (ASFF) -> FindingRecord.

Accepted envelopes (streamed with ijson): ``{"Findings": [...]}`` (AWS CLI
``get-findings``), ``{"findings": [...]}``, a bare JSON array of findings, or one finding
object.  Mapping of one finding:

    Id -> provider_id; Title -> title; Description -> description
    Severity.Label (else Severity.Normalized 0-100, else FindingProviderFields.Severity.Label)
        -> severity; the original value -> severity_original
    Resources[0]: Id (ARN) -> resource.cloud_id, Type -> resource.kind (vm,
        container_image, cloud_resource; the ASFF type -> extra.resourceType),
        Tags.Name (ECR: repository[:tag]) -> name,
        Details.AwsEc2Instance.IpV4Addresses/IpV6Addresses -> ipv4/ipv6, the instance id
        -> extra.instanceId; the ids of further Resources -> extra.otherResources
    Vulnerabilities[].Id CVEs (and CVE ids in Title) -> cves; the first non-CVE id
        (e.g. GHSA-...) -> vendor_id; the highest-version Cvss -> cvss_score/vector;
        VulnerablePackages -> evidence (and their Remediation lines -> remediation);
        ReferenceUrls, Vendor.Url -> references
    Remediation.Recommendation.Text/Url -> remediation/references (Inspector's
        placeholder text "None Provided" is dropped)
    FirstObservedAt (else CreatedAt) -> first_seen; LastObservedAt -> last_seen;
        UpdatedAt -> provider_timestamp.  A time more than a day after the push was
        received is dropped (kept in extra.ignoredTimes): ASFF samples carry year 2200.
    status: RecordState ARCHIVED or Workflow.Status RESOLVED/SUPPRESSED -> fixed;
        else Compliance.Status PASSED -> fixed (NOT_AVAILABLE -> fixed with
        extra.notAvailable), FAILED/WARNING -> open; else open
    kind: "compliance" when Compliance is present and there are no Vulnerabilities (its
        vendor_id is Compliance.SecurityControlId, else ProductFields.ControlId, else
        GeneratorId), else "vulnerability".  GuardDuty threat findings are kept as
        vulnerability findings whose vendor_id is the finding type (Types[0]).

This module also hosts :func:`iter_json_records`, the envelope-aware JSON record
streamer the other JSON connectors (checkpoint, ocsf, asc_assessment, graph_alert) use.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, BinaryIO

import ijson

from connectors.base import ParseOptions, better_cvss, find_cves, parse_time, severity_from_word
from connectors.model import FindingRecord, FormatError, Rejected, ResourceRef

FORMAT = "asff"
TITLE = "AWS Security Finding Format (Security Hub) JSON"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "findings"

ENVELOPE_KEYS = ("Findings", "findings")
MAX_TEXT = 65536
MAX_REFERENCES = 50
HEAD_SIZE = 65536
_BOM = b"\xef\xbb\xbf"
_SCHEMA = re.compile(rb'"SchemaVersion"\s*:\s*"2018-10-08"')
_FUTURE_SLACK = timedelta(days=1)
_THREAT_TYPE_PREFIXES = ("TTPs", "Effects", "Unusual Behaviors", "Sensitive Data Identifications")
_RESOURCE_KINDS = {
    "AwsEc2Instance": "vm",
    "AwsEcrContainerImage": "container_image",
}


# -- shared JSON streaming ---------------------------------------------------------------


class _HeadReader(io.RawIOBase):
    """A readable stream that replays an already-read head (without a UTF-8 BOM) first."""

    def __init__(self, stream: BinaryIO, size: int = HEAD_SIZE) -> None:
        parts: list[bytes] = []
        total = 0
        while total < size:
            chunk = stream.read(size - total)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
        head = b"".join(parts)
        if head.startswith(_BOM):
            head = head[len(_BOM):]
        self.head = head
        self._view = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:  # type: ignore[override]
        if self._view:
            n = min(len(target), len(self._view))
            target[:n] = self._view[:n]
            self._view = self._view[n:]
            return n
        data = self._stream.read(len(target))
        n = len(data)
        target[:n] = data
        return n


_STARTS = ("start_map", "start_array")
_ENDS = ("end_map", "end_array")


def _build(event: str, value: Any, events: Iterator[tuple[str, str, Any]]) -> Any:
    """The JSON value that starts with (event, value), consuming its events."""
    if event not in _STARTS:
        return value
    builder = ijson.ObjectBuilder()
    builder.event(event, value)
    depth = 1
    for _prefix, ev, val in events:
        builder.event(ev, val)
        if ev in _STARTS:
            depth += 1
        elif ev in _ENDS:
            depth -= 1
            if depth == 0:
                break
    return builder.value


def _envelope_in_head(head: bytes, keys: tuple[str, ...]) -> str | None:
    """The envelope key whose array starts at the top level within the head, if any."""
    if not keys:
        return None
    events = ijson.parse(io.BytesIO(head))
    key = None
    try:
        for prefix, event, value in events:
            if prefix == "" and event == "map_key":
                key = value
            elif key is not None and prefix == key:
                if key in keys and event == "start_array":
                    return key
                key = None
    except ijson.JSONError:
        pass  # the head ends mid-document
    return None


def _scan_object(reader: io.RawIOBase, keys: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """One pass over a top-level object: stream an envelope array, else yield the object."""
    events = ijson.parse(reader, use_float=True)
    next(events, None)  # the top-level start_map
    top: dict[str, Any] = {}
    envelope = None
    for _prefix, event, key in events:
        if event != "map_key":  # the top-level end_map
            break
        step = next(events, None)
        if step is None:
            break
        _p, event, value = step
        if envelope is None and key in keys and event == "start_array":
            envelope = key
            index = 0
            for _p2, ev, val in events:
                if ev == "end_array":
                    break
                yield f"{key}[{index}]", _build(ev, val, events)
                index += 1
        else:
            top[key] = _build(event, value, events)
    for _ in events:  # reach the end: a truncated or trailing-garbage body fails here
        pass
    if envelope is None:
        yield "$", top


def iter_json_records(stream: BinaryIO, envelope_keys: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """Yield (position, value) for each record of a JSON array, envelope object or single object.

    A top-level array yields its items ("[3]"); an object with one of ``envelope_keys``
    holding an array yields that array's items ("Findings[3]"); any other object is one
    record ("$").  Raises FormatError on an empty body or JSON that is not well-formed.
    """
    reader = _HeadReader(stream)
    start = reader.head.lstrip()[:1]
    if not start:
        raise FormatError("the body is empty: expected a JSON array or object")
    if start not in (b"[", b"{"):
        raise FormatError(f"not JSON: expected a JSON array or object, found {reader.head.lstrip()[:20]!r}")
    position = "the start of the body"
    try:
        if start == b"[":
            for index, item in enumerate(ijson.items(reader, "item", use_float=True)):
                position = f"[{index}]"
                yield position, item
            return
        key = _envelope_in_head(reader.head, envelope_keys)
        if key is not None:
            for index, item in enumerate(ijson.items(reader, f"{key}.item", use_float=True)):
                position = f"{key}[{index}]"
                yield position, item
            return
        for position, item in _scan_object(reader, envelope_keys):
            yield position, item
    except ijson.JSONError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"not well-formed JSON after {position}: {detail}") from None


def json_head(head: bytes) -> bytes:
    """The first bytes of a JSON body without BOM and leading whitespace."""
    text = head[:HEAD_SIZE]
    if text.startswith(_BOM):
        text = text[len(_BOM):]
    return text.lstrip()


def clip(value: Any, limit: int = MAX_TEXT) -> str | None:
    """A non-empty string value, clipped to ``limit`` characters, else None."""
    if isinstance(value, str) and value.strip():
        return value[:limit]
    return None


def required_text(item: dict, key: str) -> str:
    """A required non-empty string field, else ValueError naming it."""
    value = item.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' is required (a non-empty string)")
    return value[:MAX_TEXT]


def time_field(item: dict, key: str) -> datetime | None:
    """An optional ISO 8601 (or epoch seconds) time field, else ValueError naming it."""
    value = item.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"'{key}' must be an ISO 8601 date-time")
    try:
        return parse_time(value)
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"'{key}' is not an ISO 8601 date-time: {str(value)[:64]!r}") from None


def strings(value: Any) -> list[str]:
    """The non-empty strings of a list (anything else is ignored)."""
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str) and v.strip()]


def dict_at(item: Any, *path: str) -> dict:
    """The object at a key path, or an empty dict."""
    for key in path:
        if not isinstance(item, dict):
            return {}
        item = item.get(key)
    return item if isinstance(item, dict) else {}


def rejected(position: str, exc: Exception, item: Any, id_key: str) -> Rejected:
    """A Rejected record for an item, with its provider id when it has a string one."""
    provider_id = item.get(id_key) if isinstance(item, dict) else None
    return Rejected(
        position=position,
        reason=str(exc) or type(exc).__name__,
        provider_id=provider_id[:512] if isinstance(provider_id, str) else None,
    )


# -- ASFF ------------------------------------------------------------------------------


def sniff(head: bytes) -> bool:
    """JSON that names the ASFF schema version 2018-10-08 (or ProductArn and GeneratorId)."""
    text = json_head(head)
    if text[:1] not in (b"[", b"{"):
        return False
    return _SCHEMA.search(text) is not None or (b'"ProductArn"' in text and b'"GeneratorId"' in text)


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream the findings of an ASFF document in any of its envelopes."""
    for position, item in iter_json_records(stream, ENVELOPE_KEYS):
        try:
            yield to_record(item, options)
        except (TypeError, ValueError, KeyError) as exc:
            yield rejected(position, exc, item, "Id")


def _severity(item: dict) -> tuple[str, str, str]:
    severity = dict_at(item, "Severity")
    label = severity.get("Label")
    if isinstance(label, str) and label.strip():
        word = severity_from_word(label)
        if word is None:
            raise ValueError(f"'Severity.Label' {label[:40]!r} is not an ASFF severity label")
        return word, label, "asff label"
    normalized = severity.get("Normalized")
    if isinstance(normalized, (int, float)) and not isinstance(normalized, bool):
        if not 0 <= normalized <= 100:
            raise ValueError("'Severity.Normalized' must be from 0 to 100")
        if normalized == 0:
            word = "informational"
        elif normalized < 40:
            word = "low"
        elif normalized < 70:
            word = "medium"
        elif normalized < 90:
            word = "high"
        else:
            word = "critical"
        return word, f"{normalized:g}", "asff normalized 0-100"
    provider_label = dict_at(item, "FindingProviderFields", "Severity").get("Label")
    word = severity_from_word(provider_label) if isinstance(provider_label, str) else None
    if word:
        return word, provider_label, "asff label"
    raise ValueError("'Severity.Label' or 'Severity.Normalized' is required")


def _resource(raw: Any, item: dict, extra: dict) -> ResourceRef:
    if not isinstance(raw, dict):
        raise ValueError("'Resources[0]' must be an object")
    cloud_id = required_text(raw, "Id") if raw.get("Id") is not None else None
    if cloud_id is None:
        raise ValueError("'Resources[0].Id' is required")
    rtype = raw.get("Type") if isinstance(raw.get("Type"), str) else None
    details = dict_at(raw, "Details")
    ec2 = dict_at(details, "AwsEc2Instance")
    ecr = dict_at(details, "AwsEcrContainerImage")
    tags = raw.get("Tags") if isinstance(raw.get("Tags"), dict) else {}
    name = clip(tags.get("Name"), 300)
    if name is None and ecr:
        repository = clip(ecr.get("RepositoryName"), 250)
        image_tags = strings(ecr.get("ImageTags"))
        if repository:
            name = f"{repository}:{image_tags[0]}" if image_tags else repository
    if rtype == "AwsEc2Instance":
        instance = re.search(r"(i-[0-9A-Za-z]+)$", cloud_id)
        if instance:
            extra["instanceId"] = instance.group(1)
    platform = dict_at(item, "ProductFields").get(
        "aws/inspector/resources/1/resourceDetails/awsEc2InstanceDetails/platform")
    if rtype:
        extra["resourceType"] = rtype
    region = raw.get("Region") or item.get("Region")
    if isinstance(region, str) and region:
        extra["region"] = region
    return ResourceRef(
        cloud_id=cloud_id,
        ipv4=strings(ec2.get("IpV4Addresses")),
        ipv6=strings(ec2.get("IpV6Addresses")),
        kind=_RESOURCE_KINDS.get(rtype or "", "cloud_resource"),
        name=name,
        os=clip(platform, 200),
    )


def _cvss(vulnerabilities: list[dict]) -> tuple[float | None, str | None]:
    best: tuple[float, float, str | None] | None = None
    for vulnerability in vulnerabilities:
        for cvss in vulnerability.get("Cvss") or []:
            best = better_cvss(best, cvss, ("BaseScore",), "Version", "BaseVector")
    return (best[1], best[2]) if best else (None, None)


def _packages(vulnerabilities: list[dict]) -> tuple[str | None, list[str]]:
    lines: list[str] = []
    fixes: list[str] = []
    for vulnerability in vulnerabilities:
        for package in vulnerability.get("VulnerablePackages") or []:
            if not isinstance(package, dict):
                continue
            text = " ".join(str(package[k]) for k in ("Name", "Version") if package.get(k))
            if package.get("FixedInVersion"):
                text += f" (fixed in {package['FixedInVersion']})"
            if package.get("FilePath"):
                text += f" at {package['FilePath']}"
            if text:
                lines.append(text)
            fix = package.get("Remediation")
            if isinstance(fix, str) and fix.strip() and fix not in fixes:
                fixes.append(fix)
    evidence = "\n".join(lines)[:MAX_TEXT] if lines else None
    return evidence, fixes


def _time(item: dict, key: str, options: ParseOptions, ignored: dict) -> datetime | None:
    value = time_field(item, key)
    if value is not None and value > options.received_at + _FUTURE_SLACK:
        ignored[key] = item[key]
        return None
    return value


def _status(item: dict, compliance: dict, extra: dict) -> str:
    record_state = item.get("RecordState")
    workflow = dict_at(item, "Workflow").get("Status") or item.get("WorkflowState")
    if isinstance(record_state, str):
        extra["recordState"] = record_state
    if isinstance(workflow, str):
        extra["workflowStatus"] = workflow
    compliance_status = compliance.get("Status")
    if isinstance(compliance_status, str):
        extra["complianceStatus"] = compliance_status
    if str(record_state).upper() == "ARCHIVED" or str(workflow).upper() in ("RESOLVED", "SUPPRESSED"):
        return "fixed"
    if isinstance(compliance_status, str):
        code = compliance_status.upper()
        if code == "PASSED":
            return "fixed"
        if code == "NOT_AVAILABLE":
            extra["notAvailable"] = True
            return "fixed"
        if code not in ("FAILED", "WARNING"):
            raise ValueError(f"'Compliance.Status' {compliance_status[:40]!r} is not PASSED, WARNING, "
                             "FAILED or NOT_AVAILABLE")
    return "open"


def to_record(item: Any, options: ParseOptions) -> FindingRecord:
    """Map one ASFF finding object to a FindingRecord (ValueError when it cannot be)."""
    if not isinstance(item, dict):
        raise ValueError("a finding must be a JSON object")
    provider_id = required_text(item, "Id")
    if len(provider_id) > 512:
        raise ValueError("'Id' is longer than 512 characters")
    title = required_text(item, "Title")
    severity, severity_original, scale = _severity(item)
    resources = item.get("Resources")
    if not isinstance(resources, list) or not resources:
        raise ValueError("'Resources' must be a non-empty list")
    extra: dict[str, Any] = {}
    resource = _resource(resources[0], item, extra)
    others = [r.get("Id") for r in resources[1:] if isinstance(r, dict) and isinstance(r.get("Id"), str)]
    if others:
        extra["otherResources"] = others

    vulnerabilities = [v for v in item.get("Vulnerabilities") or [] if isinstance(v, dict)]
    compliance = dict_at(item, "Compliance")
    kind = "compliance" if "Compliance" in item and compliance and not vulnerabilities else "vulnerability"
    vuln_ids = [v["Id"] for v in vulnerabilities if isinstance(v.get("Id"), str)]
    cves = find_cves(*vuln_ids, title)
    non_cve = [vid for vid in vuln_ids if not find_cves(vid)]
    types = strings(item.get("Types"))
    product_fields = dict_at(item, "ProductFields")
    if kind == "compliance":
        vendor_id = clip(compliance.get("SecurityControlId"), 300) or clip(
            product_fields.get("ControlId"), 300) or clip(item.get("GeneratorId"), 300)
    elif non_cve:
        vendor_id = non_cve[0][:300]
    elif not vulnerabilities and types and types[0].startswith(_THREAT_TYPE_PREFIXES):
        vendor_id = types[0][:300]
    else:
        vendor_id = None

    status = _status(item, compliance, extra)
    cvss_score, cvss_vector = _cvss(vulnerabilities)
    evidence, package_fixes = _packages(vulnerabilities)
    recommendation = dict_at(item, "Remediation", "Recommendation")
    text = clip(recommendation.get("Text"))
    remediation_lines = [text] if text and text.strip().lower() != "none provided" else []
    remediation_lines += package_fixes
    references: list[str] = []
    urls = [recommendation.get("Url")]
    for vulnerability in vulnerabilities:
        urls += strings(vulnerability.get("ReferenceUrls")) + [dict_at(vulnerability, "Vendor").get("Url")]
    for url in urls:
        if isinstance(url, str) and url.strip() and url not in references:
            references.append(url[:2048])
    ignored: dict[str, Any] = {}
    first_seen = _time(item, "FirstObservedAt", options, ignored) or _time(
        item, "CreatedAt", options, ignored)
    last_seen = _time(item, "LastObservedAt", options, ignored)
    provider_timestamp = _time(item, "UpdatedAt", options, ignored)

    for key, name in (("AwsAccountId", "awsAccountId"), ("ProductArn", "productArn"),
                      ("ProductName", "productName"), ("GeneratorId", "generatorId"),
                      ("EpssScore", "epssScore")):
        value = item.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != "":
            extra[name] = value
    if types:
        extra["types"] = types
    control = compliance.get("SecurityControlId") or product_fields.get("ControlId")
    if isinstance(control, str):
        extra["controlId"] = control
    for key in ("FixAvailable", "ExploitAvailable"):
        values = sorted({v[key] for v in vulnerabilities if isinstance(v.get(key), str)})
        if values:
            extra[key[0].lower() + key[1:]] = values[0] if len(values) == 1 else values
    if ignored:
        extra["ignoredTimes"] = ignored

    return FindingRecord(
        provider_id=provider_id,
        resource=resource,
        title=title,
        severity=severity,
        severity_original=severity_original,
        severity_scale=scale,
        cves=cves,
        vendor_id=vendor_id,
        status=status,
        kind=kind,
        description=clip(item.get("Description")),
        remediation="\n".join(remediation_lines)[:MAX_TEXT] if remediation_lines else None,
        first_seen=first_seen,
        last_seen=last_seen,
        provider_timestamp=provider_timestamp,
        cvss_score=cvss_score,
        cvss_vector=cvss_vector,
        evidence=evidence,
        references=references[:MAX_REFERENCES],
        extra=extra or None,
    )
