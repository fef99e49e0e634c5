"""Defender for Cloud (Azure Security Center) recommendations CSV export -> FindingRecord.

The portal's "Download CSV report" of recommendations: UTF-8 with a BOM, one row per
(resource, recommendation), header

    exportedTimestamp, subscriptionId, subscriptionName, resourceGroup, resourceType,
    resourceName, resourceId, recommendationId, recommendationName,
    recommendationDisplayName, description, remediationSteps, severity, state,
    notApplicableReason, firstEvaluationDate, statusChangeDate, controls,
    azurePortalRecommendationLink, nativeCloudAccountId

Mapping (kind "compliance", rows streamed with the csv module):

    provider_id = "<resourceId, lower-case>|<recommendationName, lower-case>" (the same
        key as the asc_assessment connector, so both feeds of one provider agree)
    recommendationName (the assessment key) -> recommendation and vendor_id;
        recommendationId (the assessment's full id) -> extra.assessmentId
    recommendationDisplayName -> title; description; remediationSteps -> remediation
    severity Low/Medium/High -> severity
    state Unhealthy -> open, Healthy -> fixed, NotApplicable -> fixed with
        extra.notApplicable and notApplicableReason
    resourceId -> resource.cloud_id; resourceName -> name; resourceType -> kind
        (virtualmachines -> vm, sites -> web_app, else cloud_resource)
    firstEvaluationDate -> first_seen; exportedTimestamp -> last_seen;
        statusChangeDate -> provider_timestamp
    azurePortalRecommendationLink -> references; subscriptionId/Name, resourceGroup,
        resourceType, nativeCloudAccountId, controls (JSON object) -> extra

A row that cannot be mapped is rejected as "line N" (its first physical line); CSV that
is not well-formed (an unterminated quoted field, as in a truncated upload) fails the
batch with FormatError.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO

from connectors._json import MAX_TEXT, clip
from connectors.base import ParseOptions, parse_time, severity_from_word
from connectors.model import FindingRecord, FormatError, Rejected, ResourceRef

FORMAT = "asc_csv"
TITLE = "Defender for Cloud (Azure Security Center) recommendations CSV export"
PRODUCT = "Microsoft Defender for Cloud"
CONTENT_TYPES = ("text/csv",)
RECORD_KIND = "findings"

REQUIRED_COLUMNS = ("resourceId", "recommendationName", "recommendationDisplayName", "severity", "state")
_STATES = {"unhealthy": "open", "healthy": "fixed", "notapplicable": "fixed"}
_RESOURCE_KINDS = {"virtualmachines": "vm", "sites": "web_app"}


def sniff(head: bytes) -> bool:
    """A CSV whose header row names resourceId, recommendationName and recommendationDisplayName."""
    text = head[:65536].decode("utf-8-sig", "replace")
    first_line = text.split("\n", 1)[0]
    try:
        header = next(csv.reader([first_line]), [])
    except csv.Error:
        return False
    names = {cell.strip() for cell in header}
    return {"resourceId", "recommendationName", "recommendationDisplayName"} <= names


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[FindingRecord | Rejected]:
    """Stream the rows of a recommendations CSV export."""
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    try:
        reader = csv.reader(text, strict=True)  # a quoted field cut off by truncation fails
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise FormatError(f"not a readable CSV header: {exc}") from None
        except UnicodeDecodeError as exc:
            raise FormatError(f"the CSV is not UTF-8 text: {exc}") from None
        if header is None:
            raise FormatError("the body is empty: expected the recommendations CSV header row")
        header = [cell.strip() for cell in header]
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            raise FormatError("not a Defender for Cloud recommendations CSV: the header lacks "
                              + ", ".join(missing))
        previous_end = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise FormatError(f"not well-formed CSV at line {previous_end + 1}: {exc}") from None
            except UnicodeDecodeError as exc:
                raise FormatError(f"the CSV is not UTF-8 text after line {previous_end}: {exc}") from None
            line = previous_end + 1
            previous_end = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            fields = dict(zip(header, row, strict=False))
            try:
                if len(row) != len(header):
                    raise ValueError(f"the row has {len(row)} fields, the header {len(header)}")
                yield to_record(fields)
            except ValueError as exc:
                resource_id = fields.get("resourceId", "").strip()
                name = fields.get("recommendationName", "").strip()
                provider_id = f"/{resource_id.lstrip('/').lower()}|{name.lower()}"[:512]
                yield Rejected(position=f"line {line}", reason=str(exc),
                               provider_id=provider_id if resource_id and name else None)
    finally:
        text.detach()


def _required(row: dict[str, str], key: str) -> str:
    value = row.get(key, "").strip()
    if not value:
        raise ValueError(f"'{key}' is required")
    return value


def _time(row: dict[str, str], key: str) -> datetime | None:
    value = row.get(key, "").strip()
    if not value:
        return None
    try:
        return parse_time(value)
    except (ValueError, OverflowError, OSError):
        raise ValueError(f"'{key}' is not an ISO 8601 date-time: {value[:64]!r}") from None


def to_record(row: dict[str, str]) -> FindingRecord:
    """Map one CSV row (header name -> cell) to a FindingRecord (ValueError when it cannot be)."""
    resource_id = _required(row, "resourceId")
    name = _required(row, "recommendationName")
    title = _required(row, "recommendationDisplayName")
    raw_severity = _required(row, "severity")
    severity = severity_from_word(raw_severity)
    if severity is None:
        raise ValueError(f"'severity' {raw_severity[:40]!r} is not Low, Medium or High")
    state = _required(row, "state")
    status = _STATES.get(state.lower())
    if status is None:
        raise ValueError(f"'state' {state[:40]!r} is not Healthy, Unhealthy or NotApplicable")
    resource_id = "/" + resource_id.lstrip("/")
    extra: dict[str, Any] = {"state": state}
    if state.lower() == "notapplicable":
        extra["notApplicable"] = True
    for key, target in (("notApplicableReason", "notApplicableReason"), ("recommendationId", "assessmentId"),
                        ("subscriptionId", "subscriptionId"), ("subscriptionName", "subscriptionName"),
                        ("resourceGroup", "resourceGroup"), ("resourceType", "resourceType"),
                        ("nativeCloudAccountId", "nativeCloudAccountId")):
        value = row.get(key, "").strip()
        if value:
            extra[target] = value[:2048]
    controls = row.get("controls", "").strip()
    if controls:
        try:
            extra["controls"] = json.loads(controls)
        except ValueError:
            extra["controls"] = controls[:4000]
    resource_type = row.get("resourceType", "").strip().lower()
    link = row.get("azurePortalRecommendationLink", "").strip()
    return FindingRecord(
        provider_id=f"{resource_id.lower()}|{name.lower()}"[:512],
        resource=ResourceRef(
            cloud_id=resource_id[:2048],
            kind=_RESOURCE_KINDS.get(resource_type, "cloud_resource"),
            name=clip(row.get("resourceName", "").strip(), 300),
        ),
        title=title[:MAX_TEXT],
        severity=severity,
        severity_original=raw_severity,
        severity_scale="asc",
        vendor_id=name,
        status=status,
        kind="compliance",
        description=clip(row.get("description", "").strip()),
        remediation=clip(row.get("remediationSteps", "").strip()),
        recommendation=name,
        first_seen=_time(row, "firstEvaluationDate"),
        last_seen=_time(row, "exportedTimestamp"),
        provider_timestamp=_time(row, "statusChangeDate"),
        references=[link[:2048]] if link else [],
        extra=extra,
    )
