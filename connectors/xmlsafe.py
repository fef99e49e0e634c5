"""Streaming XML that refuses hostile input cheaply.

No entity expansion, no external entities, no DTD loading, no network: a document
whose prolog declares entities (billion laughs, XXE) is refused before parsing,
and lxml is told not to resolve or fetch anything in any case.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import BinaryIO

from lxml import etree

from connectors.model import FormatError

_PROLOG_LIMIT = 1 << 20
_ENTITY_DECL = re.compile(rb"<!ENTITY", re.IGNORECASE)
_ROOT_START = re.compile(rb"<(?![?!])")


class _Prefixed(io.RawIOBase):
    """A stream that first returns ``head`` and then the rest of ``stream``."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self._head + self._stream.read()
        if self._head:
            chunk, self._head = self._head[:size], self._head[size:]
            return chunk
        return self._stream.read(size)


def read_prolog(stream: BinaryIO) -> tuple[bytes, BinaryIO]:
    """Read up to the root element's start; refuse entity declarations.

    Returns the bytes read and a stream that yields the whole document again.
    """
    head = b""
    while True:
        chunk = stream.read(65536)
        head += chunk
        prolog_end = _prolog_end(head)
        if prolog_end is not None or not chunk or len(head) > _PROLOG_LIMIT:
            break
    prolog = head[: prolog_end if prolog_end is not None else len(head)]
    if _ENTITY_DECL.search(prolog):
        raise FormatError("XML entity declarations are refused (no DTD entities allowed)")
    if prolog_end is None and len(head) > _PROLOG_LIMIT:
        raise FormatError("XML prolog is larger than 1 MiB")
    return head, _Prefixed(head, stream)


def _prolog_end(data: bytes) -> int | None:
    """Offset of the root element's '<' when it is in ``data`` outside the DOCTYPE."""
    pos = 0
    while True:
        match = _ROOT_START.search(data, pos)
        if match is None:
            return None
        start = match.start()
        doctype = data.rfind(b"<!DOCTYPE", 0, start)
        if doctype != -1 and b"[" in data[doctype:start] and b"]" not in data[doctype:start]:
            pos = start + 1  # inside the DOCTYPE's internal subset
            continue
        return start


def iterparse(
    stream: BinaryIO, tags: tuple[str, ...] | None = None, events: tuple[str, ...] = ("end",)
) -> Iterator[tuple[str, etree._Element]]:
    """lxml iterparse with every dangerous feature off; FormatError on bad XML.

    The caller clears elements it has finished with (``element.clear()``, and
    removing earlier siblings) so memory stays flat.
    """
    _, safe_stream = read_prolog(stream)
    parser = etree.iterparse(
        safe_stream,
        events=events,
        tag=tags,
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    try:
        yield from parser
    except etree.XMLSyntaxError as exc:
        raise FormatError(f"not well-formed XML: {exc}") from None


def release(element: etree._Element) -> None:
    """Free a finished element and the siblings parsed before it."""
    element.clear(keep_tail=True)
    parent = element.getparent()
    if parent is not None:
        while element.getprevious() is not None:
            del parent[0]


def root_tag(stream: BinaryIO) -> tuple[str, BinaryIO]:
    """The document's root tag name, and a stream that yields the whole document."""
    head, safe_stream = read_prolog(stream)
    end = _prolog_end(head)
    if end is None:
        raise FormatError("not an XML document: no root element found")
    match = re.match(rb"<([A-Za-z_][\w.\-:]*)", head[end:])
    if match is None:
        raise FormatError("not an XML document: no root element found")
    return match.group(1).decode("ascii", "replace"), safe_stream
