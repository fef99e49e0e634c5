"""OCSF findings JSON (Vulnerability 2002, Compliance 2003, Detection 2004) -> records.

Input: a JSON array of OCSF events, or one event object (Prowler's ``--output-formats
json-ocsf`` writes an array).  The class is decided by ``class_uid`` first, then by
``class_name`` (spaces and case ignored: Prowler 3 wrote "DetectionFinding"), then by
the presence of ``vulnerabilities`` (2002) or ``compliance`` (2003).  Any other
class_uid is rejected with its position.

FindingRecord (2002, 2003, and 2004 events that carry a check result):

    finding_info.uid (OCSF 1.0: finding.uid) -> provider_id
    finding_info.title -> title; finding_info.desc -> description
    status_detail (else message) -> evidence; risk_details -> extra.riskDetails
    severity word (Fatal -> critical), else severity_id 1-6 -> severity; severity_id 0
        (Unknown) and 99 (Other) are valid and give "informational" (severity_original
        keeps the id); any other value rejects the event, never the batch
    metadata.product.name -> product (the tool that wrote the event, e.g. "Prowler")
    status_code PASS -> fixed, FAIL -> open, MANUAL -> rejected (the check was not
        evaluated); else compliance.status as producers write it (Pass/PASSED -> fixed,
        Fail/FAILED/Warning -> open, any case), else compliance.status_id 1 -> fixed,
        2/3 -> open;
        a status of Suppressed/Resolved overrides to fixed (Prowler's muted findings)
    kind: 2002 -> vulnerability; 2003 and checks -> compliance
    metadata.event_code (the Prowler check id; else compliance.control) -> vendor_id
    resources[0] (or resource): uid -> cloud_id and host_key, an EC2 instance ARN's
        instance id (else device.instance_uid) -> instance_id, tags.Name -> cloud_name,
        device.vpc_uid -> network, name -> name, type -> kind
        (vm, container_image, cloud_resource; the original in extra.resourceType);
        device.hostname/ip/uid/instance_uid/os.name fill the identifiers of a host
    cloud.account.uid/name, cloud.provider, cloud.region -> extra
    compliance (requirements, standards, control) and unmapped.compliance -> extra.compliance
    remediation.desc (else the vulnerabilities[].remediation.desc) -> remediation;
        remediation.references and unmapped.related_url ->
        references (URLs only; CLI/IaC snippets -> extra.remediationSnippets)
    finding_info.first_seen_time (else created_time) -> first_seen;
    finding_info.last_seen_time (else time_dt/time/event_time) -> last_seen;
    finding_info.modified_time (else time_dt/time/event_time) -> provider_timestamp
        (*_dt strings preferred; numeric times are epoch milliseconds per OCSF, or
        seconds as Prowler writes them)
    vulnerabilities[].cve.uid (and CVE ids in the title) -> cves; the highest-version
        cve.cvss[] base_score/vector_string -> cvss_score/cvss_vector;
        vulnerabilities[].references -> references; affected_packages -> evidence

AlertRecord: a Detection Finding (2004) with no check result (no status_code
PASS/FAIL/MANUAL and no compliance) is a threat detection: severity, title, desc,
resource, finding_info.types[0] (else category_name) -> category, status New/In
Progress/Suppressed/Resolved -> newAlert/inProgress/resolved, remediation.desc ->
recommended_actions, attacks (MITRE) and evidences (at most 20; what suppression rules
match on) -> extra.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

from connectors._events import EVENT_CLASSES, first_class_uid
from connectors._json import (
    MAX_REFERENCES,
    MAX_TEXT,
    clip,
    dict_at,
    instance_from_arn,
    iter_json_records,
    json_head,
    rejected,
    strings,
)
from connectors.base import ParseOptions, better_cvss, find_cves, parse_time, severity_from_word
from connectors.model import AlertRecord, FindingRecord, Rejected, ResourceRef

FORMAT = "ocsf"
TITLE = "OCSF Vulnerability / Compliance / Detection Finding JSON (e.g. Prowler)"
PRODUCT = "OCSF"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "findings"

VULNERABILITY_FINDING = 2002
COMPLIANCE_FINDING = 2003
DETECTION_FINDING = 2004
_CLASS_NAMES = {
    "vulnerabilityfinding": VULNERABILITY_FINDING,
    "compliancefinding": COMPLIANCE_FINDING,
    "detectionfinding": DETECTION_FINDING,
}
# 0 Unknown and 99 Other are valid OCSF values that say nothing of the risk: "informational"
# (severity_original keeps "0"/"99"), never a reason to reject the event.
_SEVERITY_IDS = {0: "informational", 1: "informational", 2: "low", 3: "medium", 4: "high", 5: "critical",
                 6: "critical", 99: "informational"}
_COMPLIANCE_STATUSES = {"pass": "fixed", "passed": "fixed", "fail": "open", "failed": "open",
                        "warning": "open", "warn": "open"}
_CHECK_CODES = ("PASS", "FAIL", "MANUAL", "MUTED")
_FIXED_STATUSES = ("suppressed", "resolved")
_ALERT_STATUSES = {"new": "newAlert", "in progress": "inProgress", "inprogress": "inProgress",
                   "suppressed": "resolved", "resolved": "resolved"}
_RESOURCE_KINDS = {
    "awsec2instance": "vm",
    "instance": "vm",
    "virtualmachine": "vm",
    "microsoft.compute/virtualmachines": "vm",
    "compute.googleapis.com/instance": "vm",
    "awsecrcontainerimage": "container_image",
    "containerimage": "container_image",
}


def sniff(head: bytes) -> bool:
    """JSON with OCSF finding keys: finding_info, or class_uid together with category_uid."""
    text = json_head(head)
    if text[:1] not in (b"[", b"{"):
        return False
    if b'"finding_info"' in text:
        return True
    # OCSF activity events (3002, 1007, 4001) are the ocsf_events format
    return b'"class_uid"' in text and b'"category_uid"' in text and first_class_uid(text) not in EVENT_CLASSES


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | AlertRecord | Rejected]:
    """Stream the OCSF finding events of an array or a single event object."""
    for position, item in iter_json_records(stream, ()):
        try:
            yield to_record(item)
        except (TypeError, ValueError, KeyError) as exc:
            record = rejected(position, exc, item, "")
            uid = dict_at(item, "finding_info").get("uid") or dict_at(item, "finding").get("uid")
            if isinstance(uid, str):
                record.provider_id = uid[:512]
            yield record


def event_class(item: dict) -> int:
    """The OCSF class of an event: by class_uid, then class_name, then by its objects."""
    class_uid = item.get("class_uid")
    if isinstance(class_uid, str) and class_uid.strip().isdigit():
        class_uid = int(class_uid)
    if isinstance(class_uid, int) and not isinstance(class_uid, bool):
        if class_uid in (VULNERABILITY_FINDING, COMPLIANCE_FINDING, DETECTION_FINDING):
            return class_uid
        name = f" ({item['class_name']})" if isinstance(item.get("class_name"), str) else ""
        raise ValueError(f"unsupported OCSF class_uid {class_uid}{name}: expected 2002 Vulnerability "
                         "Finding, 2003 Compliance Finding or 2004 Detection Finding")
    class_name = item.get("class_name")
    if isinstance(class_name, str):
        key = class_name.replace(" ", "").replace("_", "").lower()
        if key in _CLASS_NAMES:
            return _CLASS_NAMES[key]
    if isinstance(item.get("vulnerabilities"), list):
        return VULNERABILITY_FINDING
    if isinstance(item.get("compliance"), dict):
        return COMPLIANCE_FINDING
    raise ValueError("not an OCSF finding: no class_uid, class_name, vulnerabilities or compliance")


def _time_value(value: Any, key: str) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = value / 1000 if value > 1e11 else value  # OCSF: ms; Prowler: s
            return datetime.fromtimestamp(seconds, tz=UTC)
        if isinstance(value, str):
            return parse_time(value)
    except (ValueError, OverflowError, OSError):
        pass
    raise ValueError(f"'{key}' is not a timestamp: {str(value)[:64]!r}")


def _first_time(*pairs: tuple[dict, str]) -> datetime | None:
    """The first present time among (object, key) pairs, trying key_dt before key."""
    for obj, key in pairs:
        for name in (f"{key}_dt", key):
            if obj.get(name) not in (None, ""):
                return _time_value(obj[name], name)
    return None


def _severity(item: dict) -> tuple[str, str]:
    word = item.get("severity")
    if isinstance(word, str):
        mapped = "critical" if word.strip().lower() == "fatal" else severity_from_word(word)
        if mapped:
            return mapped, word
    severity_id = item.get("severity_id")
    if isinstance(severity_id, str) and severity_id.strip().isdigit():
        severity_id = int(severity_id)
    if isinstance(severity_id, int) and severity_id in _SEVERITY_IDS:
        return _SEVERITY_IDS[severity_id], str(severity_id)
    for vulnerability in item.get("vulnerabilities") or []:
        vword = vulnerability.get("severity") if isinstance(vulnerability, dict) else None
        if isinstance(vword, str) and severity_from_word(vword):
            return severity_from_word(vword), vword  # type: ignore[return-value]
    raise ValueError(f"'severity'/'severity_id' {word or severity_id!r} is not an OCSF severity "
                     "(Informational, Low, Medium, High, Critical, Fatal)")


def _resource(item: dict, extra: dict) -> ResourceRef | None:
    resources = item.get("resources")
    raw = resources[0] if isinstance(resources, list) and resources else item.get("resource")
    raw = raw if isinstance(raw, dict) else {}
    device = dict_at(item, "device")
    fields: dict[str, Any] = {}
    uid = clip(raw.get("uid"), 1024) or clip(device.get("instance_uid"), 1024)
    if uid:
        fields["cloud_id"] = uid
        fields["host_key"] = uid
    instance = instance_from_arn(raw.get("uid")) or clip(device.get("instance_uid"), 200)
    if instance and instance != uid:
        fields["instance_id"] = instance
    labels = raw.get("tags") if isinstance(raw.get("tags"), dict) else {}
    if clip(labels.get("Name"), 300):
        fields["cloud_name"] = labels["Name"][:300]
    vpc = clip(device.get("vpc_uid"), 200)
    if vpc:
        fields["network"] = vpc
    rtype = clip(raw.get("type"), 200)
    if rtype:
        extra["resourceType"] = rtype
    name = clip(raw.get("name"), 300) or clip(device.get("name"), 300)
    if name:
        fields["name"] = name
    hostname = clip(device.get("hostname"), 255)
    if hostname:
        fields["fqdn" if "." in hostname else "hostname"] = hostname
    if clip(device.get("uid"), 200):
        fields["agent_id"] = device["uid"]
    if clip(device.get("mac"), 64):
        fields["mac"] = device["mac"]
    ip = device.get("ip")
    if isinstance(ip, str):
        try:
            fields["ipv6" if ipaddress.ip_address(ip).version == 6 else "ipv4"] = [ip]
        except ValueError:
            pass
    os_name = clip(dict_at(device, "os").get("name"), 200)
    if os_name:
        fields["os"] = os_name
    if not any(k in fields for k in ("cloud_id", "agent_id", "fqdn", "hostname", "mac", "ipv4", "ipv6")):
        return None
    kind = _RESOURCE_KINDS.get((rtype or "").replace(" ", "").lower())
    fields["kind"] = kind or ("host" if device and "cloud_id" not in fields else "cloud_resource")
    for key in ("region", "cloud_partition"):
        if clip(raw.get(key), 100):
            extra[key] = raw[key]
    return ResourceRef(**fields)


def _cloud_extra(item: dict, extra: dict) -> None:
    cloud = dict_at(item, "cloud")
    account = dict_at(cloud, "account")
    for key, name in ((account.get("uid"), "account"), (account.get("name"), "accountName"),
                      (cloud.get("provider"), "cloudProvider"), (cloud.get("region"), "cloudRegion")):
        if isinstance(key, str) and key:
            extra[name] = key
    product = dict_at(item, "metadata", "product")
    if isinstance(product.get("name"), str):
        extra["product"] = product["name"]
    version = dict_at(item, "metadata").get("version")
    if isinstance(version, str):
        extra["ocsfVersion"] = version


def _references(item: dict, extra: dict) -> list[str]:
    urls: list[str] = []
    snippets: list[str] = []
    candidates = strings(dict_at(item, "remediation").get("references"))
    related = dict_at(item, "unmapped").get("related_url")
    candidates += strings([related] if isinstance(related, str) else related)
    candidates += strings(dict_at(item, "unmapped").get("additional_urls"))
    for vulnerability in item.get("vulnerabilities") or []:
        if isinstance(vulnerability, dict):
            candidates += strings(vulnerability.get("references"))
    for value in candidates:
        target = urls if value.startswith(("http://", "https://")) else snippets
        if value not in target:
            target.append(value[:2048])
    if snippets:
        extra["remediationSnippets"] = snippets[:20]
    return urls[:MAX_REFERENCES]


def _check_status(item: dict, compliance: dict, is_check: bool) -> str:
    code = item.get("status_code")
    code = code.strip().upper() if isinstance(code, str) else ""
    if code == "MANUAL":
        raise ValueError("status_code MANUAL: the check needs a manual review and has no PASS/FAIL result")
    if code == "PASS":
        result = "fixed"
    elif code in ("FAIL", "MUTED"):
        result = "open"
    else:
        status_id = compliance.get("status_id")
        word = str(compliance.get("status") or "").strip().lower()
        if word in _COMPLIANCE_STATUSES:  # the word as producers write it: PASSED, FAILED, Warning...
            result = _COMPLIANCE_STATUSES[word]
        elif status_id == 1:
            result = "fixed"
        elif status_id in (2, 3):
            result = "open"
        elif is_check:
            raise ValueError(f"no check result: status_code {code or None!r}, compliance.status "
                             f"{compliance.get('status')!r}")
        else:
            result = "open"  # a vulnerability finding is open by existing
    status = item.get("status")
    if isinstance(status, str) and status.strip().lower() in _FIXED_STATUSES:
        result = "fixed"
    return result


def _is_check(item: dict) -> bool:
    code = item.get("status_code")
    return (isinstance(code, str) and code.strip().upper() in _CHECK_CODES) or isinstance(
        item.get("compliance"), dict) or bool(dict_at(item, "unmapped", "compliance"))


def _vulnerability_fields(vulnerabilities: list[dict]) -> dict[str, Any]:
    cves: list[str] = []
    others: list[str] = []
    best: tuple[float, float, str | None] | None = None
    packages: list[str] = []
    fixes: list[str] = []
    for vulnerability in vulnerabilities:
        fix = clip(dict_at(vulnerability, "remediation").get("desc"))
        if fix and fix not in fixes:
            fixes.append(fix)
        cve = dict_at(vulnerability, "cve")
        uid = cve.get("uid")
        if isinstance(uid, str) and uid:
            (cves if find_cves(uid) else others).append(uid)
        for cvss in cve.get("cvss") or []:
            best = better_cvss(best, cvss, ("base_score", "overall_score"), "version", "vector_string")
        for package in vulnerability.get("affected_packages") or vulnerability.get("packages") or []:
            if isinstance(package, dict) and package.get("name"):
                text = " ".join(str(package[k]) for k in ("name", "version") if package.get(k))
                if package.get("fixed_in_version"):
                    text += f" (fixed in {package['fixed_in_version']})"
                packages.append(text)
    return {
        "cves": cves,
        "vendor_id": others[0][:300] if others else None,
        "cvss_score": best[1] if best else None,
        "cvss_vector": best[2] if best else None,
        "evidence": "\n".join(packages)[:MAX_TEXT] if packages else None,
        "remediation": "\n".join(fixes)[:MAX_TEXT] if fixes else None,
    }


def _compliance_extra(item: dict) -> dict | None:
    compliance = dict_at(item, "compliance")
    result: dict[str, Any] = {}
    for key in ("control", "requirements", "standards", "status", "status_code", "status_detail"):
        if compliance.get(key) not in (None, "", []):
            result[key] = compliance[key]
    mapped = dict_at(item, "unmapped", "compliance")
    if mapped:
        result["frameworks"] = mapped
    return result or None


def to_record(item: Any) -> FindingRecord | AlertRecord:
    """Map one OCSF finding event to a FindingRecord or AlertRecord (ValueError when it cannot be)."""
    if not isinstance(item, dict):
        raise ValueError("an OCSF event must be a JSON object")
    class_uid = event_class(item)
    info = dict_at(item, "finding_info") or dict_at(item, "finding")
    provider_id = clip(info.get("uid"), 512)
    if provider_id is None:
        raise ValueError("'finding_info.uid' is required")
    title = clip(info.get("title")) or clip(item.get("message"))
    if title is None:
        raise ValueError("'finding_info.title' is required")
    severity, severity_original = _severity(item)
    extra: dict[str, Any] = {"classUid": class_uid}
    if isinstance(item.get("class_name"), str):
        extra["className"] = item["class_name"]
    resource = _resource(item, extra)
    _cloud_extra(item, extra)
    event_time = _first_time((item, "time")) or _time_value(item.get("event_time"), "event_time")
    if class_uid == DETECTION_FINDING and not _is_check(item):
        return _alert(item, info, provider_id, title, severity, resource, event_time, extra)

    if resource is None:
        raise ValueError("'resources[0].uid' (or a device identifier) is required")
    compliance = dict_at(item, "compliance")
    status = _check_status(item, compliance, class_uid != VULNERABILITY_FINDING)
    if isinstance(item.get("status"), str):
        extra["status"] = item["status"]
    if isinstance(item.get("status_code"), str):
        extra["statusCode"] = item["status_code"]
    compliance_extra = _compliance_extra(item)
    if compliance_extra:
        extra["compliance"] = compliance_extra
    if clip(item.get("risk_details")):
        extra["riskDetails"] = clip(item.get("risk_details"), 4000)
    vulnerabilities = [v for v in item.get("vulnerabilities") or [] if isinstance(v, dict)]
    vuln = _vulnerability_fields(vulnerabilities)
    kind = "vulnerability" if class_uid == VULNERABILITY_FINDING else "compliance"
    event_code = clip(dict_at(item, "metadata").get("event_code"), 300)
    vendor_id = vuln["vendor_id"] if kind == "vulnerability" else (
        event_code or clip(compliance.get("control"), 300))
    if kind == "vulnerability" and vendor_id is None and not vuln["cves"]:
        vendor_id = event_code
    remediation = clip(dict_at(item, "remediation").get("desc")) or vuln["remediation"]
    return FindingRecord(
        provider_id=provider_id,
        resource=resource,
        title=title,
        severity=severity,
        severity_original=severity_original,
        severity_scale="ocsf",
        cves=find_cves(*vuln["cves"], title),
        vendor_id=vendor_id,
        status=status,
        kind=kind,
        description=clip(info.get("desc")),
        remediation=remediation,
        evidence=vuln["evidence"] or clip(item.get("status_detail")) or clip(item.get("message")),
        first_seen=_first_time((info, "first_seen_time"), (info, "created_time")),
        last_seen=_first_time((info, "last_seen_time")) or event_time,
        provider_timestamp=_first_time((info, "modified_time")) or event_time,
        cvss_score=vuln["cvss_score"],
        cvss_vector=vuln["cvss_vector"],
        references=_references(item, extra),
        extra=extra,
        product=clip(dict_at(item, "metadata", "product").get("name"), 200),
    )


_MAX_EVIDENCES = 20
_MAX_EVIDENCE_BYTES = 16_384


def _kept_evidences(item: dict) -> list[dict]:
    """The detection's evidence artifacts (OCSF 1.1 ``evidences``: process, file, user, actor,
    endpoints, url...), at most _MAX_EVIDENCES of at most 16 KiB of JSON each."""
    kept = []
    for evidence in item.get("evidences") or []:
        if not isinstance(evidence, dict) or not evidence:
            continue
        if len(json.dumps(evidence, default=str)) <= _MAX_EVIDENCE_BYTES:
            kept.append(evidence)
        if len(kept) == _MAX_EVIDENCES:
            break
    return kept


def _alert(item: dict, info: dict, provider_id: str, title: str, severity: str,
           resource: ResourceRef | None, event_time: datetime | None, extra: dict) -> AlertRecord:
    status_word = str(item.get("status") or "").strip().lower()
    if isinstance(item.get("status"), str):
        extra["status"] = item["status"]
    attacks = item.get("attacks")
    if isinstance(attacks, list) and attacks:
        extra["attacks"] = attacks[:20]
    types = strings(info.get("types"))
    remediation = clip(dict_at(item, "remediation").get("desc"))
    evidences = _kept_evidences(item)
    if evidences:
        extra["evidences"] = evidences
    return AlertRecord(
        provider_id=provider_id,
        title=title,
        severity=severity,
        category=(types[0] if types else clip(item.get("category_name"), 200)),
        description=clip(info.get("desc")) or clip(item.get("message")),
        status=_ALERT_STATUSES.get(status_word, "newAlert" if not status_word else "unknown"),
        created=_first_time((info, "created_time"), (info, "first_seen_time")),
        last_modified=_first_time((info, "modified_time"), (info, "last_seen_time")) or event_time,
        provider_timestamp=event_time,
        resource=resource,
        recommended_actions=[remediation] if remediation else [],
        extra=extra,
    )
