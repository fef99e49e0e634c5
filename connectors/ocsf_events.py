"""OCSF host activity events: Authentication (3002), Process Activity (1007), Network Activity (4001).

The body is a JSON array of events, ``{"events": [...]}`` or one event.  The host the event is
about is ``device`` (hostname, name, ip, mac, uid as the agent id, instance_uid); ``time`` is
epoch milliseconds (or ``time_dt``).  OCSF findings (2002-2004) are the ``ocsf`` format.

| class | kind                                                     | fields read                           |
|-------|----------------------------------------------------------|---------------------------------------|
| 3002  | logon_success / logon_failure (activity 1 Logon, by      | user.name, src_endpoint.ip            |
|       | status_id 1/2 or status), logoff (activity 2), else other|                                       |
| 1007  | process_start (activity 1 Launch), else other            | process.file.path (or process.name),  |
|       |                                                          | process.file.hashes (SHA-256),        |
|       |                                                          | actor.user.name                       |
| 4001  | network_connection                                       | src_endpoint.ip, dst_endpoint.ip,     |
|       |                                                          | dst_endpoint.hostname / domain        |
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from connectors._events import EVENT_CLASSES, at, first_class_uid, integer, ip, ips, text, when
from connectors._json import iter_json_documents, json_head, rejected
from connectors.base import ParseOptions
from connectors.model import Rejected, ResourceRef, SecurityEventRecord

FORMAT = "ocsf_events"
TITLE = "OCSF Authentication / Process Activity / Network Activity events JSON"
PRODUCT = "OCSF"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "events"

SHA256 = 3  # OCSF fingerprint algorithm_id


def sniff(head: bytes) -> bool:
    """JSON whose first ``class_uid`` is 3002, 1007 or 4001 (and no finding_info)."""
    body = json_head(head)
    if body[:1] not in (b"[", b"{") or b'"finding_info"' in body:
        return False
    return first_class_uid(body) in EVENT_CLASSES


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[SecurityEventRecord | Rejected]:
    for position, item, document in iter_json_documents(stream, ("events",)):
        try:
            record = to_record(item)
        except (TypeError, ValueError, KeyError) as exc:
            yield rejected(position, exc, item, "")
            continue
        if document is not None:  # stored as sent, not encoded again
            record.raw, record.raw_json = None, document
        yield record


def _resource(device) -> ResourceRef | None:
    if not isinstance(device, dict):
        return None
    names = [name for name in (text(device.get("hostname")), text(device.get("name"))) if name]
    fqdn = next((name for name in names if "." in name), None)
    hostname = next((name for name in names if "." not in name), None)
    v4, v6 = ips(device.get("ip"))
    agent = text(device.get("uid"))
    if not (fqdn or hostname or v4 or v6 or agent or text(device.get("mac"))):
        return None
    return ResourceRef(
        fqdn=fqdn,
        hostname=hostname,
        ipv4=v4,
        ipv6=v6,
        agent_id=agent,
        mac=text(device.get("mac")),
        instance_id=text(device.get("instance_uid")),
        os=text(at(device, "os", "name")),
        kind="host",
    )


def _sha256(process) -> str | None:
    for entry in at(process, "file", "hashes") or []:
        if isinstance(entry, dict) and (
            integer(entry.get("algorithm_id")) == SHA256
            or str(entry.get("algorithm", "")).upper().replace("-", "") == "SHA256"
        ):
            return text(entry.get("value"), 128)
    return None


def to_record(item: dict) -> SecurityEventRecord:
    if not isinstance(item, dict):
        raise ValueError("an event must be a JSON object")
    class_uid = integer(item.get("class_uid"))
    if class_uid not in EVENT_CLASSES:
        raise ValueError(f"'class_uid' must be one of {sorted(EVENT_CLASSES)}, got {item.get('class_uid')!r}")
    occurred = when(item.get("time")) or when(item.get("time_dt"))
    if occurred is None:
        raise ValueError("'time' is required")
    activity = integer(item.get("activity_id"))
    status_id = integer(item.get("status_id"))
    status = (text(item.get("status")) or "").lower()
    outcome = (
        "success"
        if status_id == 1 or status == "success"
        else "failure"
        if status_id == 2 or status == "failure"
        else None
    )
    fields: dict = {}
    if class_uid == 3002:
        kind = {
            1: {"success": "logon_success", "failure": "logon_failure"}.get(outcome or "", "other"),
            2: "logoff",
        }.get(activity or 0, "other")
        fields = {
            "user": text(at(item, "user", "name"), 300),
            "source_ip": ip(at(item, "src_endpoint", "ip")),
        }
    elif class_uid == 1007:
        kind = "process_start" if activity == 1 else "other"
        process = item.get("process") if isinstance(item.get("process"), dict) else {}
        fields = {
            "user": text(at(item, "actor", "user", "name"), 300),
            "process": text(at(process, "file", "path"), 1000) or text(process.get("name"), 1000),
            "hash": (_sha256(process) or "").lower() or None,
        }
    else:
        kind = "network_connection"
        fields = {
            "source_ip": ip(at(item, "src_endpoint", "ip")),
            "remote_ip": ip(at(item, "dst_endpoint", "ip")),
            "domain": text(at(item, "dst_endpoint", "hostname")) or text(at(item, "dst_endpoint", "domain")),
        }
    return SecurityEventRecord(
        occurred_at=occurred,
        kind=kind,
        event_id=class_uid,
        outcome=outcome,
        resource=_resource(item.get("device")),
        raw=item,
        **fields,
    )
