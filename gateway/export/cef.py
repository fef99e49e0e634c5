"""An event as an ArcSight Common Event Format (CEF) record, for the ``syslog`` kind.

``CEF:0|Vendor|Product|Version|Signature ID|Name|Severity|Extension``, per the "Implementing
ArcSight CEF" guide (revision 25):

* header fields escape ``\\`` as ``\\\\`` and ``|`` as ``\\|``; a newline is not allowed there, so it
  becomes a space;
* extension values escape ``\\`` as ``\\\\`` and ``=`` as ``\\=``, and carry newlines as ``\\n``
  (``\\r`` for a carriage return); a ``|`` needs no escaping there;
* the severity is 0-10: critical 10, high 8, medium 5, low 3, informational 1, unknown 0.

The signature id is the event type (``finding.resolved``); the name is the subject's title (or
display name) when it has one, else the type.  Extension keys are from CEF's dictionary: ``rt``
(the event's time, epoch milliseconds), ``externalId`` (the event id: a receiver drops a
duplicate by it), ``cat`` (the event type), ``act`` (what happened: ``resolved``), ``msg`` (the
cause), ``cn1`` (the position in the tenant's outbox) and labelled custom strings: ``cs1`` tenant,
``cs2`` subject type, ``cs3`` subject id, ``cs4`` CVEs, ``cs5`` the subject's status, ``cs6`` its
resource id.
"""

from __future__ import annotations

from datetime import datetime

VENDOR = "PartnerGateway"
PRODUCT = "Partner Integration Gateway"
VERSION = "1"
SEVERITY = {"critical": 10, "high": 8, "medium": 5, "low": 3, "informational": 1, "unknown": 0}


def escape_header(value: object) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def escape_value(value: object) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\\\").replace("=", "\\=")
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")


def severity(data: dict | None) -> int:
    value = (data or {}).get("severity")
    return SEVERITY.get(str(value).lower(), 0) if value is not None else 0


def _millis(timestamp: str) -> int | None:
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp() * 1000)
    except (AttributeError, ValueError):
        return None


def extension(event: dict) -> list[tuple[str, object]]:
    """The (key, value) pairs of an event's extension, in order, without empty values."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    cves = data.get("cves")
    pairs: list[tuple[str, object]] = [
        ("rt", _millis(event.get("timestamp") or "")),
        ("externalId", event.get("id")),
        ("cat", event.get("type")),
        ("act", event.get("event")),
        ("msg", event.get("cause")),
        ("cn1Label", "sequence"),
        ("cn1", event.get("sequence")),
        ("cs1Label", "tenant"),
        ("cs1", event.get("tenant")),
        ("cs2Label", "subjectType"),
        ("cs2", event.get("subjectType")),
        ("cs3Label", "subjectId"),
        ("cs3", event.get("subjectId")),
        ("cs4Label", "cves"),
        ("cs4", ",".join(map(str, cves)) if isinstance(cves, list) and cves else None),
        ("cs5Label", "status"),
        ("cs5", data.get("status")),
        ("cs6Label", "resourceId"),
        ("cs6", data.get("resourceId")),
    ]
    present = {key for key, value in pairs if value is not None and value != ""}
    # a label goes only with its value
    return [
        (key, value)
        for key, value in pairs
        if key in present and (not key.endswith("Label") or key[: -len("Label")] in present)
    ]


def format_event(event: dict, vendor: str = VENDOR, product: str = PRODUCT) -> str:
    """One event as a CEF record (one line: every newline is escaped)."""
    data = event.get("data") if isinstance(event.get("data"), dict) else {}
    name = data.get("title") or data.get("displayName") or event.get("type")
    header = "|".join(
        escape_header(part) for part in (vendor, product, VERSION, event.get("type"), name, severity(data))
    )
    ext = " ".join(f"{key}={escape_value(value)}" for key, value in extension(event))
    return f"CEF:0|{header}|{ext}"
