"""Streaming XML that refuses hostile input cheaply.

No entity expansion, no external entities, no DTD loading, no network: a document whose
DOCTYPE has an internal subset (where billion laughs and XXE declare their entities) is
refused before parsing, and lxml is told not to resolve or fetch anything in any case.

The prolog is read the way an XML parser reads it (comments, processing instructions and
the DOCTYPE's quoted literals are skipped whole), so a ``]`` or a ``<root`` inside one of
them cannot end it early.  Any internal subset that is not empty is refused, whatever it
declares: no scanner export has one.  The check reads bytes as ASCII, so the encodings it
cannot read that way are refused too: UTF-16, UTF-32 and EBCDIC (told by their first
bytes, as libxml2 tells them), and any declared encoding outside the ASCII-compatible ones
(UTF-7, for one, writes ``<`` as ``+ADw-``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

from lxml import etree

from connectors._stream import Prefixed
from connectors.model import FormatError

_PROLOG_LIMIT = 1 << 20
_READ_SIZE = 65536
_UTF8_BOM = b"\xef\xbb\xbf"
_SPACE = b" \t\r\n"
_NOT_ASCII = "XML in UTF-16, UTF-32 or EBCDIC is not supported: send it as UTF-8"
# Encodings in which every byte below 0x80 is the ASCII character (multi-byte characters use
# only bytes from 0x80 up), so that reading the prolog's bytes as ASCII reads its markup.
_ASCII_COMPATIBLE = re.compile(
    r"(?:utf-?8|(?:us-)?ascii|iso[-_]?8859-(?:[1-9]|1[0-6])|latin-?[1-9]|(?:windows|cp)-?125[0-8])\Z",
    re.IGNORECASE)
_ENCODING_DECL = re.compile(rb"""\s(?:[^?]|\?(?!>))*?encoding\s*=\s*(["'])([^"']*)\1""")
_ROOT_NAME = re.compile(rb"<[^\s/>]*[\s/>]")
_MORE = -1  # the prolog goes on past the bytes read so far


def read_prolog(stream: BinaryIO) -> tuple[bytes, BinaryIO]:
    """Read up to the root element's start; refuse an internal DTD subset or an unreadable encoding.

    Returns the bytes read and a stream that yields the whole document again.
    """
    head = b""
    while True:
        chunk = stream.read(_READ_SIZE)
        head += chunk
        end = _prolog_end(head)
        if end != _MORE or not chunk or len(head) > _PROLOG_LIMIT:
            break
    if (end == _MORE and len(head) > _PROLOG_LIMIT) or (end is not None and end > _PROLOG_LIMIT):
        raise FormatError("XML prolog is larger than 1 MiB")
    return head, Prefixed(head, stream)


def _prolog_end(data: bytes) -> int | None:
    """Offset of the root element's '<'; ``_MORE`` when ``data`` ends inside the prolog, None
    when the prolog holds something else (not XML, or not well-formed: the parser says which).

    Raises FormatError on an internal DTD subset that is not empty or an encoding it cannot read.
    """
    if data[:2] in (b"\xfe\xff", b"\xff\xfe") or b"\x00" in data[:4] or data[:4] == b"\x4c\x6f\xa7\x94":
        raise FormatError(_NOT_ASCII)
    pos = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    if data.startswith(b"<?xml", pos):
        pos = _xml_declaration_end(data, pos)
        if pos == _MORE:
            return _MORE
    while True:
        while pos < len(data) and data[pos] in _SPACE:
            pos += 1
        rest = data[pos:pos + 9]
        if not rest or any(len(rest) < len(m) and m.startswith(rest) for m in (b"<!DOCTYPE", b"<!--", b"<?")):
            return _MORE
        if rest.startswith(b"<?"):
            pos = _find_end(data, pos + 2, b"?>")
        elif rest.startswith(b"<!--"):
            pos = _find_end(data, pos + 4, b"-->")
        elif rest.startswith(b"<!DOCTYPE"):  # a second one is not well-formed, but checked all the same
            pos = _doctype_end(data, pos + 9)
        elif rest[:1] == b"<" and rest[1:2] not in (b"!", b"?", b"/"):
            return pos if _ROOT_NAME.match(data, pos) else _MORE  # the whole name, for root_tag
        else:
            return None
        if pos == _MORE:
            return _MORE


def _xml_declaration_end(data: bytes, pos: int) -> int:
    """After ``<?xml ... ?>`` at ``pos``; FormatError when it declares an encoding not ASCII-compatible."""
    end = _find_end(data, pos + 5, b"?>")
    if end == _MORE:
        return _MORE
    declared = _ENCODING_DECL.match(data, pos + 5, end - 2)
    if declared:
        name = declared.group(2).decode("ascii", "replace")
        if not _ASCII_COMPATIBLE.match(name):
            raise FormatError(f"XML encoding '{name[:40]}' is not supported: send it as UTF-8")
    return end


def _find_end(data: bytes, pos: int, terminator: bytes) -> int:
    found = data.find(terminator, pos)
    return _MORE if found < 0 else found + len(terminator)


def _doctype_end(data: bytes, pos: int) -> int:
    """After the DOCTYPE whose name starts at ``pos``; FormatError on a non-empty internal subset."""
    while pos < len(data):
        byte = data[pos:pos + 1]
        if byte in (b'"', b"'"):  # a system or public literal may hold '[', ']' and '>'
            pos = _find_end(data, pos + 1, byte)
            if pos == _MORE:
                return _MORE
        elif byte == b"[":
            pos += 1
            while pos < len(data) and data[pos] in _SPACE:
                pos += 1
            if pos == len(data):
                return _MORE
            if data[pos:pos + 1] != b"]":
                raise FormatError("XML with an internal DTD subset is refused "
                                  "(no DTD declarations: no entity, element or attribute list declarations)")
            pos += 1
        elif byte == b">":
            return pos + 1
        else:
            pos += 1
    return _MORE


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
    match = re.match(rb"<([A-Za-z_][\w.\-:]*)", head[end:]) if end not in (None, _MORE) else None
    if match is None:
        raise FormatError("not an XML document: no root element found")
    return match.group(1).decode("ascii", "replace"), safe_stream
