"""AWS Security Finding Format (ASFF) -> FindingRecord.

Accepted envelopes (streamed with ijson): ``{"Findings": [...]}`` (AWS CLI
``get-findings``), ``{"findings": [...]}``, a bare JSON array of findings, or one finding
object.  Mapping of one finding:

    Id -> provider_id; Title -> title; Description -> description
    Severity.Label (else Severity.Normalized 0-100, else FindingProviderFields.Severity.Label)
        -> severity; the original value -> severity_original
    Resources[0]: Id (ARN) -> resource.cloud_id, Type -> resource.kind (vm,
        container_image, cloud_resource; the ASFF type -> extra.resourceType),
        Id -> host_key (provenance), Tags.Name (ECR: repository[:tag]) -> name,
        Tags.Name -> cloud_name, Details.AwsEc2Instance.IpV4Addresses/IpV6Addresses ->
        ipv4/ipv6 (the private addresses), Details.AwsEc2Instance.VpcId -> network,
        the instance id of an instance ARN ("arn:aws:ec2:region:acct:instance/i-...",
        else Details.AwsEc2Instance.InstanceId) -> instance_id (and extra.instanceId);
        the ids of further Resources -> extra.otherResources
    ProductName (else GeneratorId) -> scan
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

The envelope-aware record streamer and the field readers are in ``_json``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, BinaryIO

from connectors._json import (
    MAX_REFERENCES,
    MAX_TEXT,
    clip,
    dict_at,
    iter_json_records,
    json_head,
    rejected,
    required_text,
    strings,
    time_field,
)
from connectors.base import ParseOptions, better_cvss, find_cves, severity_from_word
from connectors.model import FindingRecord, Rejected, ResourceRef

FORMAT = "asff"
TITLE = "AWS Security Finding Format (Security Hub) JSON"
PRODUCT = "AWS Security Hub"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "findings"

ENVELOPE_KEYS = ("Findings", "findings")
_SCHEMA = re.compile(rb'"SchemaVersion"\s*:\s*"2018-10-08"')
_FUTURE_SLACK = timedelta(days=1)
_THREAT_TYPE_PREFIXES = ("TTPs", "Effects", "Unusual Behaviors", "Sensitive Data Identifications")
_RESOURCE_KINDS = {
    "AwsEc2Instance": "vm",
    "AwsEcrContainerImage": "container_image",
}


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
    instance_id = None
    if rtype == "AwsEc2Instance" or ec2:
        instance = re.search(r"(?:\A|[:/])(i-[0-9A-Za-z]+)\Z", cloud_id)
        instance_id = instance.group(1) if instance else clip(ec2.get("InstanceId"), 100)
        if instance_id:
            extra["instanceId"] = instance_id
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
        instance_id=instance_id,
        cloud_name=clip(tags.get("Name"), 300),
        network=clip(ec2.get("VpcId"), 100),
        host_key=cloud_id,
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
        scan=clip(item.get("ProductName"), 300) or clip(item.get("GeneratorId"), 300),
    )
