"""JSON helpers shared by the JSON connectors (asff, ocsf, checkpoint, asc_assessment, graph_alert).

:func:`iter_json_records` streams the records of a JSON array, of an envelope object
(``{"Findings": [...]}``, ``{"value": [...]}``) or of a single object with ijson; the
small field readers below name the field in the ValueError a bad value raises, which
becomes the reason of a Rejected record.  No connector lives here.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO

import ijson
import msgspec

from connectors._stream import Prefixed, read_head
from connectors.base import parse_time
from connectors.model import FormatError, Rejected

MAX_TEXT = 65536
MAX_REFERENCES = 50
HEAD_SIZE = 65536
_BOM = b"\xef\xbb\xbf"


def _head_reader(stream: BinaryIO, size: int = HEAD_SIZE) -> Prefixed:
    """The stream with its head read (a UTF-8 BOM dropped) and replayed first."""
    head = read_head(stream, size)
    return Prefixed(head[len(_BOM):] if head.startswith(_BOM) else head, stream)


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
    reader = _head_reader(stream)
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


WHOLE_BODY_BYTES = 64 * 1024 * 1024  # bodies up to this size are decoded at once by iter_json_documents
# JSON text PostgreSQL's jsonb refuses although it is well-formed JSON: an escaped NUL, a surrogate
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")
_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
_MEMBERS = msgspec.json.Decoder(dict[str, msgspec.Raw])


def _document(raw: msgspec.Raw) -> str | None:
    """A record's JSON text as sent, if the store can keep it verbatim (jsonb), else None."""
    return None if _UNSTORABLE_ESCAPE.search(raw) else bytes(raw).decode()


def iter_json_documents(
    stream: BinaryIO, envelope_keys: tuple[str, ...], whole_limit: int = WHOLE_BODY_BYTES
) -> Iterator[tuple[str, Any, str | None]]:
    """:func:`iter_json_records` with each record's JSON text: (position, value, text or None).

    A body of at most ``whole_limit`` bytes is read whole and split into its records' JSON
    texts by msgspec (one C pass, no objects built), then each record is decoded on its own:
    a caller that keeps the record as sent (security events' ``raw``) stores that text instead
    of encoding the value again.  The text is None where the store could not hold it verbatim
    (an escaped NUL or surrogate: the caller keeps the value).  A bigger body streams through
    :func:`iter_json_records` (texts None), and so does a body msgspec finds malformed, so that
    the error names the record after which the JSON breaks, as for every JSON format.
    """
    parts: list[bytes] = []
    total = 0
    while total <= whole_limit:
        chunk = stream.read(whole_limit + 1 - total)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    data = b"".join(parts)
    if total > whole_limit:  # too big to hold: stream the head read so far, then the rest
        for position, item in iter_json_records(Prefixed(data, stream), envelope_keys):
            yield position, item, None
        return
    body = data[len(_BOM):] if data.startswith(_BOM) else data
    start = body.lstrip()[:1]
    raws: list[tuple[str, msgspec.Raw]] | None = None
    try:
        if start == b"[":
            raws = [(f"[{index}]", raw) for index, raw in enumerate(_RAWS.decode(body))]
        elif start == b"{":
            members = _MEMBERS.decode(body)
            arrays = (key for key, raw in members.items() if memoryview(raw)[:1].tobytes() == b"[")
            key = next((key for key in arrays if key in envelope_keys), None)
            if key is None:
                raws = [("$", msgspec.Raw(body))]
            else:
                raws = [(f"{key}[{index}]", raw) for index, raw in enumerate(_RAWS.decode(members[key]))]
    except msgspec.DecodeError:
        raws = None
    if raws is None:  # empty, not JSON, or malformed: the streaming reader says where
        for position, item in iter_json_records(io.BytesIO(data), envelope_keys):
            yield position, item, None
        return
    for position, raw in raws:
        yield position, msgspec.json.decode(raw), _document(raw)


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


_INSTANCE_ARN = re.compile(r"\Aarn:aws[\w-]*:ec2:[^:]*:[^:]*:instance/(i-[0-9A-Za-z]+)\Z")


def instance_from_arn(value: Any) -> str | None:
    """The EC2 instance id of an instance ARN ("arn:aws:ec2:region:acct:instance/i-..."), else None."""
    if isinstance(value, str):
        match = _INSTANCE_ARN.match(value.strip())
        if match:
            return match.group(1)
    return None
