"""Check Point CloudGuard (Dome9) compliance findings JSON -> FindingRecord.

Accepted shapes: the findings search response (``POST /v2/Compliance/Finding/search``:
``{"findings": [...], "searchAfter": ..., "totalFindingsCount": ...}``), a bare JSON
array of findings, or one finding object (``GET /v2/Compliance/Finding/{id}``).  Each
finding is a rule evaluated on one entity (kind "compliance"):

    findingKey (else id) -> provider_id; id -> extra.findingId
    ruleName -> title; description -> description; remediation -> remediation
    ruleId (else ruleLogic) -> vendor_id; recommendation = "checkpoint:<ruleId or ruleName>"
    severity (Informational/Low/Medium/High/Critical) -> severity
    status: a finding is a failed rule -> "open"; a status of Passed/Pass/Healthy/
        Resolved/Fixed/Closed/Archived, or isExcluded true -> "fixed" (the original
        status and statusReason are kept in extra)
    entity -> resource: a full cloud id (entityObject.arn, an Azure "/subscriptions/..."
        or GCP "//..." id in entityObject.id or entityExternalId) is preferred, else
        entityExternalId, else entityDome9Id -> cloud_id; entityName -> name;
        entityType -> kind (vm, web_app, cloud_resource; the original in extra.entityType)
    cloudAccountId/cloudAccountExternalId/cloudAccountType, region, bundleId/bundleName,
        entityDome9Id, entityExternalId, entityNetwork, alertType, action, origin,
        organizationalUnitPath, labels, acknowledged -> extra
    createdTime -> first_seen; lastSeenTime -> last_seen; updatedTime -> provider_timestamp

Webhook and remediation-bot deliveries (CloudGuard "continuous compliance" notifications)
carry the rule and entity as objects and no top-level severity:
    rule.name -> title, rule.severity -> severity (when the rule gives none: "Medium",
        severity_scale "cloudguard default"), rule.id / rule.ruleId -> vendor_id
    entity.id (an ARN or full id preferred, from entity.arn) -> cloud_id, entity.name ->
        name, entity.type -> kind, entity.vpc (an id or {"id": ...}) -> network,
        entity.tags Name -> cloud_name; account.id/vendor/name -> extra
    status "failed" -> open; findingKey -> provider_id.
Every finding: the cloud id -> host_key; an EC2 instance ARN (or an "i-..." external id)
-> instance_id; entityNetwork (the VPC of the search API) -> network.

A CloudGuard ruleset/bundle definition (rules with ``logic`` but no entity) is not a
findings document: its items are rejected with that reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from connectors._json import (
    MAX_TEXT,
    clip,
    dict_at,
    instance_from_arn,
    iter_json_records,
    json_head,
    rejected,
    required_text,
    strings,
    time_field,
)
from connectors.base import ParseOptions, severity_from_word
from connectors.model import FindingRecord, Rejected, ResourceRef

FORMAT = "checkpoint"
TITLE = "Check Point CloudGuard (Dome9) compliance findings JSON"
PRODUCT = "CloudGuard"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "findings"

DEFAULT_SEVERITY = "Medium"  # a webhook/bot finding whose rule names no severity (documented above)
ENVELOPE_KEYS = ("findings",)
_MARKERS = (b'"ruleName"', b'"rule"', b'"entity"', b'"bundleId"', b'"entityDome9Id"', b'"entityExternalId"',
            b'"findingKey"', b'"ruleLogic"', b'"entityTypeByEnvironmentType"', b'"cloudAccountExternalId"')
_FIXED_STATUSES = frozenset({"passed", "pass", "healthy", "resolved", "fixed", "closed", "archived"})
_RESOURCE_KINDS = {
    "instance": "vm",
    "virtualmachine": "vm",
    "vm": "vm",
    "vminstance": "vm",
    "webapp": "web_app",
    "appservice": "web_app",
    "functionapp": "web_app",
}
_EXTRA_KEYS = ("cloudAccountId", "cloudAccountExternalId", "cloudAccountType", "region", "bundleId",
               "bundleName", "entityDome9Id", "entityExternalId", "entityType", "entityTypeByEnvironmentType",
               "entityNetwork", "alertType", "action", "origin", "category", "organizationalUnitId",
               "organizationalUnitPath", "statusReason", "tag", "scanId")


def sniff(head: bytes) -> bool:
    """JSON naming at least two CloudGuard finding keys (ruleName, bundleId, entityDome9Id...)."""
    text = json_head(head)
    if text[:1] not in (b"[", b"{"):
        return False
    return sum(marker in text for marker in _MARKERS) >= 2


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream the findings of a CloudGuard findings search response, list or single finding."""
    for position, item in iter_json_records(stream, ENVELOPE_KEYS):
        try:
            yield to_record(item)
        except (TypeError, ValueError, KeyError) as exc:
            key = "findingKey" if isinstance(item, dict) and isinstance(item.get("findingKey"), str) else "id"
            yield rejected(position, exc, item, key)


def _is_full_cloud_id(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("arn:", "/subscriptions/", "//"))


def _resource(item: dict) -> ResourceRef:
    entity = dict_at(item, "entityObject") or dict_at(item, "entity")
    external = clip(item.get("entityExternalId"), 1024) or clip(entity.get("id"), 1024)
    dome9 = clip(item.get("entityDome9Id"), 1024) or clip(entity.get("dome9Id"), 1024)
    candidates = [entity.get("arn"), entity.get("id"), external]
    cloud_id = next((c for c in candidates if _is_full_cloud_id(c)), None) or external or dome9
    if not cloud_id:
        raise ValueError("'entityExternalId', 'entityDome9Id' or 'entity.id' is required: "
                         "the entity the rule ran on")
    entity_type = item.get("entityType") if isinstance(item.get("entityType"), str) else ""
    entity_type = entity_type or (entity.get("type") if isinstance(entity.get("type"), str) else "")
    name = clip(item.get("entityName"), 300) or clip(entity.get("name"), 300)
    tags = entity.get("tags")
    cloud_name = None
    if isinstance(tags, list):  # [{"key": "Name", "value": "web-1"}]
        cloud_name = next((clip(t.get("value"), 300) for t in tags if isinstance(t, dict)
                           and str(t.get("key")) == "Name"), None)
    elif isinstance(tags, dict):
        cloud_name = clip(tags.get("Name"), 300)
    vpc = entity.get("vpc")
    network = clip(vpc.get("id"), 200) if isinstance(vpc, dict) else clip(vpc, 200)
    instance = instance_from_arn(cloud_id) or (
        external if isinstance(external, str) and external.startswith("i-") else None)
    return ResourceRef(
        cloud_id=cloud_id[:1024],
        kind=_RESOURCE_KINDS.get(entity_type.replace(" ", "").lower(), "cloud_resource"),
        name=name,
        cloud_name=cloud_name,
        network=network or clip(item.get("entityNetwork"), 200),
        instance_id=instance,
        host_key=cloud_id[:1024],
    )


def _status(item: dict) -> str:
    if item.get("isExcluded") is True:
        return "fixed"
    status = item.get("status")
    if isinstance(status, str) and status.strip().lower() in _FIXED_STATUSES:
        return "fixed"
    return "open"


def to_record(item: Any) -> FindingRecord:
    """Map one CloudGuard finding object to a FindingRecord (ValueError when it cannot be)."""
    if not isinstance(item, dict):
        raise ValueError("a finding must be a JSON object")
    if "ruleName" not in item and "logic" in item and not any(
            key in item for key in ("entityExternalId", "entityDome9Id", "entityName")):
        raise ValueError("a CloudGuard rule definition (ruleset/bundle), not a finding: it names no entity")
    provider_id = required_text(item, "findingKey") if item.get("findingKey") else required_text(item, "id")
    if len(provider_id) > 512:
        raise ValueError("'findingKey' is longer than 512 characters")
    rule = dict_at(item, "rule")
    if item.get("ruleName") or not rule:
        title = required_text(item, "ruleName")
    else:
        title = required_text(rule, "name")
    raw_severity = item.get("severity") if item.get("severity") is not None else rule.get("severity")
    scale = "cloudguard"
    if raw_severity is None and rule:  # webhook / remediation bot findings: no severity at all
        raw_severity, scale = DEFAULT_SEVERITY, "cloudguard default"
    severity = severity_from_word(raw_severity) if isinstance(raw_severity, str) else None
    if severity is None:
        raise ValueError(f"'severity' {str(raw_severity)[:40]!r} is not a CloudGuard severity "
                         "(Informational, Low, Medium, High, Critical)")
    rule_id = item.get("ruleId")
    if rule_id is None:
        rule_id = rule.get("id", rule.get("ruleId"))
    if isinstance(rule_id, int) and not isinstance(rule_id, bool):
        rule_id = str(rule_id)
    rule_id = clip(rule_id, 300)
    rule_logic = clip(item.get("ruleLogic"), MAX_TEXT)

    extra: dict[str, Any] = {}
    account = dict_at(item, "account")
    for key, name in (("id", "cloudAccountExternalId"), ("vendor", "cloudAccountType"),
                      ("name", "cloudAccountName")):
        if isinstance(account.get(key), str) and account[key] and name not in item:
            extra[name] = account[key]
    for key in _EXTRA_KEYS:
        value = item.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != "":
            extra[key] = value
    if item.get("id") is not None and item.get("findingKey"):
        extra["findingId"] = item["id"]
    if isinstance(item.get("status"), str) and item["status"]:
        extra["status"] = item["status"]
    for key in ("acknowledged", "isExcluded"):
        if isinstance(item.get(key), bool):
            extra[key] = item[key]
    labels = strings(item.get("labels"))
    if labels:
        extra["labels"] = labels
    if rule_logic:
        extra["ruleLogic"] = rule_logic[:2000]

    return FindingRecord(
        provider_id=provider_id,
        resource=_resource(item),
        title=title,
        severity=severity,
        severity_original=raw_severity,
        severity_scale=scale,
        vendor_id=rule_id or (rule_logic[:300] if rule_logic else None),
        status=_status(item),
        kind="compliance",
        description=clip(item.get("description")),
        remediation=clip(item.get("remediation")),
        recommendation=f"checkpoint:{rule_id or title}"[:300],
        first_seen=time_field(item, "createdTime"),
        last_seen=time_field(item, "lastSeenTime"),
        provider_timestamp=time_field(item, "updatedTime"),
        extra=extra or None,
    )
