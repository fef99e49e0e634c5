"""Windows Security events as JSON, as Winlogbeat-style shippers forward them.

Each record is one event: ``winlog.event_id`` (or a top-level ``EventID``/``event_id``),
``winlog.event_data`` (or ``EventData``) with the event's named fields, ``winlog.computer_name``
(or ``Computer``) naming the host, ``@timestamp`` (or ``TimeCreated``) its time; ECS fields a
shipper adds (``host``, ``agent``, ``source``, ``destination``, ``process``, ``dns``) are read too.
The body is a JSON array, ``{"events": [...]}`` or a single event object.

| event id               | kind               | user                    | target                |
|------------------------|--------------------|-------------------------|-----------------------|
| 4624                   | logon_success      | TargetUserName          |                       |
| 4625                   | logon_failure      | TargetUserName          |                       |
| 4634, 4647             | logoff             | TargetUserName          |                       |
| 4688                   | process_start      | SubjectUserName         |                       |
| 4720                   | account_created    | SubjectUserName         | TargetUserName        |
| 4728, 4732, 4756       | group_member_added | MemberName or MemberSid | TargetUserName (group)|
| 5156                   | network_connection |                         |                       |
| other                  | other              | TargetUserName          |                       |

``source_ip`` is ``IpAddress`` (where a logon came from) or ``SourceAddress``; ``remote_ip`` is
``DestAddress`` or ECS ``destination.ip``; ``process`` is ``NewProcessName``/``ProcessName``/
``Application`` or ECS ``process.executable``; ``hash`` is ECS ``process.hash.sha256`` or the
``SHA256=`` part of a Sysmon ``Hashes`` field.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from connectors._events import at, integer, ip, ips, text, when
from connectors._json import iter_json_documents, json_head, rejected
from connectors.base import ParseOptions
from connectors.model import Rejected, ResourceRef, SecurityEventRecord

FORMAT = "windows_events"
TITLE = "Windows Security events JSON (Winlogbeat-style: winlog.event_id, winlog.event_data)"
PRODUCT = "Windows"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "events"

KINDS = {
    4624: "logon_success",
    4625: "logon_failure",
    4634: "logoff",
    4647: "logoff",
    4688: "process_start",
    4720: "account_created",
    4728: "group_member_added",
    4732: "group_member_added",
    4756: "group_member_added",
    5156: "network_connection",
}


def sniff(head: bytes) -> bool:
    """JSON with a ``winlog`` object, or Windows event fields (``EventID`` with ``EventData``)."""
    body = json_head(head)
    if body[:1] not in (b"[", b"{"):
        return False
    return b'"winlog"' in body or (b'"EventID"' in body and b'"EventData"' in body)


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[SecurityEventRecord | Rejected]:
    """Stream the events of an array, an ``events`` envelope or a single event object."""
    for position, item, document in iter_json_documents(stream, ("events", "Events")):
        try:
            record = to_record(item)
        except (TypeError, ValueError, KeyError) as exc:
            yield rejected(position, exc, item, "")
            continue
        if document is not None:  # stored as sent, not encoded again
            record.raw, record.raw_json = None, document
        yield record


_EMPTY: dict = {}  # an absent object (only read)


def _obj(value) -> dict:
    return value if isinstance(value, dict) else _EMPTY


def _hash(item: dict, process: dict, data: dict) -> str | None:
    value = text(at(process, "hash", "sha256"), 128) or text(at(item, "file", "hash", "sha256"), 128)
    if value:
        return value.lower()
    for part in (text(data.get("Hashes"), 2000) or "").split(","):
        name, _, digest = part.partition("=")
        if name.strip().upper() == "SHA256" and digest.strip():
            return digest.strip().lower()[:128]
    return None


def _resource(item: dict, winlog: dict) -> ResourceRef | None:
    computer = text(winlog.get("computer_name")) or text(item.get("Computer"))
    host = _obj(item.get("host"))
    names = [name for name in (computer, text(host.get("hostname")), text(host.get("name"))) if name]
    fqdn = next((name for name in names if "." in name), None)
    hostname = next((name for name in names if "." not in name), None)
    v4, v6 = ips(host.get("ip"))
    agent = text(_obj(item.get("agent")).get("id")) or text(host.get("id"))
    mac = text(host.get("mac"))
    if not (fqdn or hostname or v4 or v6 or agent or mac):
        return None
    return ResourceRef(
        fqdn=fqdn,
        hostname=hostname,
        ipv4=v4,
        ipv6=v6,
        agent_id=agent,
        mac=mac,
        os=text(_obj(host.get("os")).get("name")),
        kind="host",
    )


def to_record(item: dict) -> SecurityEventRecord:
    """One Windows event as a security event; ValueError names what is missing."""
    if not isinstance(item, dict):
        raise ValueError("an event must be a JSON object")
    # the ECS objects read below, each looked up once (a parse is some 20 lookups an event)
    winlog, event, user_ecs = _obj(item.get("winlog")), _obj(item.get("event")), _obj(item.get("user"))
    event_id = (
        integer(winlog.get("event_id"))
        or integer(item.get("EventID"))
        or integer(item.get("event_id"))
        or integer(event.get("code"))
    )
    if event_id is None:
        raise ValueError("'winlog.event_id' (or 'EventID') is required and must be a number")
    occurred = (
        when(item.get("@timestamp"))
        or when(winlog.get("time_created"))
        or when(item.get("TimeCreated"))
        or when(event.get("created"))
    )
    if occurred is None:
        raise ValueError("'@timestamp' (or 'TimeCreated') is required")
    data = winlog.get("event_data") if isinstance(winlog.get("event_data"), dict) else item.get("EventData")
    data = data if isinstance(data, dict) else {}
    kind = KINDS.get(event_id, "other")
    user = text(data.get("TargetUserName"), 300)
    target = None
    if kind == "group_member_added":
        user = text(data.get("MemberName"), 300) or text(data.get("MemberSid"), 300)
        target = text(data.get("TargetUserName"), 300) or text(data.get("TargetSid"), 300)
    elif kind == "account_created":
        target, user = user, text(data.get("SubjectUserName"), 300)
    elif kind == "process_start":
        user = text(data.get("SubjectUserName"), 300) or text(user_ecs.get("name"), 300)
    outcome = {"logon_success": "success", "logon_failure": "failure"}.get(kind) or text(
        event.get("outcome"), 20
    )
    process = _obj(item.get("process"))
    return SecurityEventRecord(
        occurred_at=occurred,
        kind=kind,
        event_id=event_id,
        resource=_resource(item, winlog),
        outcome=outcome,
        user=user or text(user_ecs.get("name"), 300),
        target=target,
        source_ip=(
            ip(data.get("IpAddress"))
            or ip(data.get("SourceAddress"))
            or ip(_obj(item.get("source")).get("ip"))
        ),
        remote_ip=ip(data.get("DestAddress")) or ip(at(item, "destination", "ip")),
        domain=text(at(item, "dns", "question", "name")) or text(at(item, "destination", "domain")),
        process=(
            text(data.get("NewProcessName"), 1000)
            or text(data.get("ProcessName"), 1000)
            or text(data.get("Application"), 1000)
            or text(process.get("executable"), 1000)
        ),
        hash=_hash(item, process, data),
        raw=item,
    )
