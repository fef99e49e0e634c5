"""A byte stream whose first bytes were read already (to sniff a format, a delimiter or an XML
prolog) and must be read again: the connectors' one replaying reader."""

from __future__ import annotations

import io
from typing import Any, BinaryIO


def read_head(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes from the start of ``stream`` (fewer only at its end)."""
    parts: list[bytes] = []
    total = 0
    while total < size:
        chunk = stream.read(size - total)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


class Prefixed(io.RawIOBase):
    """``head`` first, then the rest of ``stream``: a raw stream for ``io.BufferedReader``, ijson
    or ``csv``.  Closing it leaves ``stream`` open."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head = head
        self._view = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:  # type: ignore[override]
        if self._view:
            n = min(len(target), len(self._view))
            target[:n] = self._view[:n]
            self._view = self._view[n:]
            return n
        data = self._stream.read(len(target))
        target[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            rest = bytes(self._view) + self._stream.read()
            self._view = memoryview(b"")
            return rest
        if self._view:
            chunk = bytes(self._view[:size])
            self._view = self._view[size:]
            return chunk
        return self._stream.read(size)
