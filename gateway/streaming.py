"""Streamed pushes: a body larger than ``STREAM_THRESHOLD`` is written to the store as it arrives.

A push's body is read in small reads, gunzipped on the fly (refused past ``MAX_BODY_BYTES`` or
past ``GZIP_MAX_RATIO`` times the compressed bytes read so far), and checked on the way: the
format sniff and the XML prolog check (no DOCTYPE internal subset, so no entity is ever
declared) on its first bytes, then well-formedness (XML through lxml's pull parser, JSON through
ijson's C backend) while the body is within ``WELLFORMED_CHECK_MAX_BYTES``; a canonical document's
envelope (``provider``, ``scan.type``) whatever its size.  Nothing holds the body whole:

* the batch row is committed first with status ``receiving`` (no worker touches it), then each
  1 MiB piece is committed in a transaction of its own, which also pushes the batch's
  ``lease_expires_at`` on by ``RECEIVING_TIMEOUT_SECONDS``;
* once the last piece and the checks passed, one UPDATE makes the batch ``accepted`` with its
  size and SHA-256 (the 202 follows, then the enqueue: DESIGN rule 1 as for a small push);
* a request that fails on the way (413, 400, 429, a client gone) deletes its batch at once; a
  process killed mid-body leaves a ``receiving`` batch whose lease lapses, and the beat task
  (:func:`fail_abandoned`) marks it ``failed``, drops its pieces and frees its Idempotency-Key
  (no 202 was ever given for it).

Idempotency-Key rules are those of a small push: the same key with the same bytes (SHA-256 of
the decompressed body) replays the batch, with other bytes 409; a key whose batch is still
being received answers 409 ``idempotencyKeyInProgress``.  The same code stores a completed
multipart upload (gateway/uploads.py), reading its parts instead of a request.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import BinaryIO

import ijson
from lxml import etree
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

import connectors
from connectors import xmlsafe
from connectors.model import FormatError
from gateway.db import Database
from gateway.errors import BadRequest, Conflict, Forbidden, PayloadTooLarge, UnsupportedMediaType
from gateway.ingest import BLOB_SIZE, READ_SIZE, Push, _existing, _replay
from gateway.models import Batch, BatchBlob, utcnow

log = logging.getLogger(__name__)

batches = Batch.__table__
blobs = BatchBlob.__table__

STREAM_THRESHOLD = BLOB_SIZE  # bodies up to this size are read whole (gateway/ingest.py)
_INFLATE_STEP = 1 << 18  # most bytes one decompress call may produce
_RATIO_FLOOR = 1 << 20  # the gzip ratio is judged once the output passes this many bytes
RECEIVING = "receiving"


class Inflow:
    """A request body as it arrives: decompressed on the fly, within the limit and the gzip ratio."""

    def __init__(
        self, stream: BinaryIO, encoding: str, declared_length: int | None, limit: int, max_ratio: float = 100
    ) -> None:
        if encoding not in ("", "identity", "gzip"):
            raise UnsupportedMediaType(
                f"Content-Encoding '{encoding}' is not supported (use gzip or none)",
                code="unsupportedEncoding",
            )
        if declared_length is not None and declared_length > limit and encoding != "gzip":
            raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
        self.stream = stream
        self.limit = limit
        self.max_ratio = max_ratio
        self.inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
        self.raw = 0  # bytes read off the wire
        self.consumed = 0  # compressed bytes the inflater has used up (the ratio's denominator)
        self.total = 0  # bytes produced (decompressed)

    def _produced(self, chunk: bytes) -> bytes:
        self.total += len(chunk)
        if self.total > self.limit:
            raise PayloadTooLarge(f"the body is larger than the limit of {self.limit} bytes")
        if (
            self.inflater is not None
            and self.total > _RATIO_FLOOR
            and self.total > self.max_ratio * self.consumed
        ):
            raise PayloadTooLarge(
                f"the gzip body expands more than {self.max_ratio:g} times "
                f"(GZIP_MAX_RATIO): refused as a decompression bomb",
                code="gzipRatioExceeded",
            )
        return chunk

    def chunks(self) -> Iterator[bytes]:
        """The decompressed body in pieces of at most 256 KiB."""
        while True:
            data = self.stream.read(READ_SIZE)
            if not data:
                break
            self.raw += len(data)
            if self.raw > self.limit:
                raise PayloadTooLarge(f"the body is larger than the limit of {self.limit} bytes")
            if self.inflater is None:
                yield self._produced(data)
                continue
            while data:
                try:
                    out = self.inflater.decompress(data, _INFLATE_STEP)
                except zlib.error:
                    raise BadRequest("the body is not valid gzip", code="invalidEncoding") from None
                self.consumed += len(data) - len(self.inflater.unconsumed_tail)
                data = self.inflater.unconsumed_tail
                if out:
                    yield self._produced(out)
        if self.inflater is not None and not self.inflater.eof:
            raise BadRequest("the gzip body is truncated", code="invalidEncoding")


def read_head(chunks: Iterator[bytes], size: int) -> bytes:
    """At least ``size`` bytes from ``chunks`` (fewer only at the end), whole chunks at a time."""
    parts, total = [], 0
    for chunk in chunks:
        parts.append(chunk)
        total += len(chunk)
        if total >= size:
            break
    return b"".join(parts)


class _NoTree:
    """An lxml parser target that keeps nothing: well-formedness at libxml2's speed (about 12x
    faster than a pull parser whose every element is created and released)."""

    def close(self) -> None:
        return None


class StreamCheck:
    """The push checks of gateway/ingest.py ``check_body``, fed piece by piece."""

    def __init__(self, push: Push, check_limit: int, declared_length: int | None) -> None:
        self.push = push
        self.connector = connectors.get(push.format)
        self.check_limit = check_limit
        self.size = 0
        kind = self.connector.CONTENT_TYPES[0]
        self.kind = "json" if "json" in kind else "xml" if "xml" in kind else "other"
        self.canonical = push.format == "canonical"
        within = declared_length is None or declared_length <= check_limit
        self.checking = self.kind != "other" and (within or self.canonical)
        self.skipped = self.kind != "other" and not self.checking
        self.events = ijson.sendable_list() if self.kind == "json" else None
        # prefixes (the canonical envelope) only where needed: basic events are about twice as fast
        parse = ijson.parse_coro if self.canonical else ijson.basic_parse_coro
        self.json = parse(self.events) if self.kind == "json" else None
        self.xml = (
            etree.XMLParser(  # a target with no callbacks: libxml2 checks, no tree is built
                target=_NoTree(),
                resolve_entities=False,
                no_network=True,
                load_dtd=False,
                dtd_validation=False,
                huge_tree=False,
            )
            if self.kind == "xml"
            else None
        )
        self.provider: str | None = None
        self.scan_type: object = None

    def head(self, head: bytes) -> None:
        """The cheap checks on the first bytes: XML prolog (no entities, a readable encoding), sniff."""
        if self.kind == "xml":
            import io

            try:
                xmlsafe.read_prolog(io.BytesIO(head[: 1 << 20]))
            except FormatError as exc:
                raise BadRequest(str(exc), code="malformedBody") from None
            if not head.lstrip()[:1] == b"<" and not head.startswith(b"\xef\xbb\xbf<"):
                raise BadRequest("the body is not XML", code="malformedBody")
        if not head.strip():
            raise BadRequest("the body is empty", code="emptyBody")
        if not self.connector.sniff(head[:65536]):
            raise BadRequest(
                f"the body does not look like format '{self.push.format}' ({self.connector.TITLE})",
                code="wrongFormat",
            )

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if not self.checking:
            return
        if self.size > self.check_limit and not self.canonical:
            self.checking, self.skipped = False, True  # past the limit: the worker's parse tells
            return
        if self.xml is not None:
            self._xml(lambda: self.xml.feed(chunk))
        else:
            self._json(lambda: self.json.send(chunk))

    def close(self) -> tuple[str, str]:
        """(scan type, body check) once the whole body passed."""
        if self.checking:
            if self.xml is not None:
                self._xml(self.xml.close)
            else:
                self._json(self.json.close)
        if self.canonical:
            if self.provider is not None and self.provider != self.push.provider:
                raise Forbidden(
                    f"this client pushes as provider '{self.push.provider}', not '{self.provider}'",
                    code="wrongProvider",
                )
            if self.scan_type not in (None, "full", "incremental"):
                raise BadRequest("'scan.type' must be 'full' or 'incremental'", code="invalidDocument")
        scan_type = self.push.scan_type
        if self.canonical and self.scan_type and scan_type == "unspecified":
            scan_type = str(self.scan_type)
        body_check = "notNeeded" if self.kind == "other" else "skipped" if self.skipped else "passed"
        return ("incremental" if scan_type == "unspecified" else scan_type), body_check

    def _xml(self, step: Callable[[], None]) -> None:
        try:
            step()
        except etree.XMLSyntaxError as exc:
            line, column = getattr(exc, "position", None) or (exc.lineno, 0)
            raise BadRequest(
                f"the body is not well-formed XML at line {line}, column {column}: {exc.msg or exc}",
                code="malformedBody",
            ) from None

    def _json(self, step: Callable[[], None]) -> None:
        try:
            step()
        except ijson.JSONError as exc:
            raise BadRequest(
                f"the body is not well-formed JSON near byte offset {self.size}: {exc}", code="malformedBody"
            ) from None
        if self.canonical:
            for prefix, event, value in self.events:
                if prefix == "provider":
                    if event not in ("string", "null"):
                        raise BadRequest(
                            "the body is not a canonical findings document: 'provider' must be a string",
                            code="invalidDocument",
                        )
                    self.provider = value
                elif prefix == "scan.type" and event != "map_key":
                    self.scan_type = value
                elif prefix == "findings" and event in ("start_map", "string", "number", "boolean"):
                    raise BadRequest(
                        "the body is not a canonical findings document: 'findings' must be an array",
                        code="invalidDocument",
                    )
        del self.events[:]


class PieceWriter:
    """Commits a batch's bytes in 1 MiB pieces, each with the batch's receiving heartbeat."""

    def __init__(
        self, db: Database, batch_id: int, timeout_seconds: int, on_piece: Callable[[int], None] | None = None
    ) -> None:
        self.db = db
        self.batch_id = batch_id
        self.timeout = timedelta(seconds=timeout_seconds)
        self.on_piece = on_piece
        self.buffer = bytearray()
        self.seq = 0

    def write(self, chunk: bytes) -> None:
        self.buffer += chunk
        while len(self.buffer) >= BLOB_SIZE:
            piece = bytes(self.buffer[:BLOB_SIZE])
            del self.buffer[:BLOB_SIZE]
            self._commit(piece)

    def close(self) -> None:
        if self.buffer:
            self._commit(bytes(self.buffer))
            self.buffer = bytearray()

    def _commit(self, piece: bytes) -> None:
        if self.on_piece is not None:
            self.on_piece(len(piece))
        with self.db.engine.begin() as conn:
            conn.execute(insert(blobs), {"batch_id": self.batch_id, "seq": self.seq, "data": piece})
            alive = conn.execute(
                update(batches)
                .where(batches.c.id == self.batch_id, batches.c.status == RECEIVING)
                .values(lease_expires_at=utcnow() + self.timeout)
            ).rowcount
            if not alive:  # the sweep gave the batch up (this process stalled past the timeout)
                raise Conflict(
                    "the upload took too long between pieces and was abandoned; push it again",
                    code="receivingTimedOut",
                )
        self.seq += 1


def store_streamed(
    db: Database,
    push: Push,
    head: bytes,
    rest: Iterator[bytes],
    *,
    check_limit: int,
    declared_length: int | None,
    timeout_seconds: int,
    on_piece: Callable[[int], None] | None = None,
) -> tuple[Batch, bool]:
    """Check and commit a large body piece by piece; return (batch, replayed) as ``store_batch`` does."""
    checker = StreamCheck(push, check_limit, declared_length)
    checker.head(head)
    if push.idempotency_key:
        existing = _existing(db, push)
        if existing is not None:
            return _replay_streamed(existing, push, head, rest, on_piece), True
    try:
        batch_id = _begin(db, push, timeout_seconds)
    except IntegrityError:
        existing = _existing(db, push) if push.idempotency_key else None
        if existing is None:
            raise
        return _replay_streamed(existing, push, head, rest, on_piece), True
    try:
        digest = hashlib.sha256()
        writer = PieceWriter(db, batch_id, timeout_seconds, on_piece)
        for chunk in _with_head(head, rest):
            digest.update(chunk)
            checker.feed(chunk)
            writer.write(chunk)
        scan_type, body_check = checker.close()
        writer.close()
        with db.engine.begin() as conn:
            done = conn.execute(
                update(batches)
                .where(batches.c.id == batch_id, batches.c.status == RECEIVING)
                .values(
                    status="accepted",
                    body_sha256=digest.hexdigest(),
                    body_size=checker.size,
                    scan_type=scan_type,
                    body_check=body_check,
                    received_at=utcnow(),
                    lease_expires_at=None,
                )
            ).rowcount
        if not done:
            raise Conflict(
                "the upload took too long between pieces and was abandoned; push it again",
                code="receivingTimedOut",
            )
    except BaseException:
        _discard(db, batch_id)
        raise
    with db.sessions() as session:
        return session.get(Batch, batch_id), False


def _with_head(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    yield from rest


def _replay_streamed(
    existing: Batch, push: Push, head: bytes, rest: Iterator[bytes], on_piece: Callable[[int], None] | None
) -> Batch:
    """Read the body through the hash only, then answer as ``_replay`` does."""
    if existing.status == RECEIVING:
        raise Conflict(
            "a request with this Idempotency-Key is still being received", code="idempotencyKeyInProgress"
        )
    digest, pending = hashlib.sha256(), 0
    for chunk in _with_head(head, rest):
        digest.update(chunk)
        pending += len(chunk)
        if on_piece is not None and pending >= BLOB_SIZE:
            on_piece(pending)
            pending = 0
    if on_piece is not None and pending:
        on_piece(pending)
    return _replay(existing, digest.hexdigest(), push)


def _begin(db: Database, push: Push, timeout_seconds: int) -> int:
    now = utcnow()
    with db.engine.begin() as conn:
        return conn.execute(
            insert(batches)
            .values(
                tenant_id=push.tenant_id,
                client_pk=push.client_pk,
                provider=push.provider,
                format=push.format,
                content_type=push.content_type,
                scan_type="incremental" if push.scan_type == "unspecified" else push.scan_type,
                body_sha256="",
                body_size=0,
                idempotency_key=push.idempotency_key,
                status=RECEIVING,
                counts={},
                rejections=[],
                attempts=0,
                received_at=now,
                lease_expires_at=now + timedelta(seconds=timeout_seconds),
            )
            .returning(batches.c.id)
        ).scalar_one()


def _discard(db: Database, batch_id: int) -> None:
    """Drop a batch whose body never completed (the request failed: no 202 names it)."""
    try:
        with db.engine.begin() as conn:
            conn.execute(delete(blobs).where(blobs.c.batch_id == batch_id))
            conn.execute(delete(batches).where(batches.c.id == batch_id, batches.c.status == RECEIVING))
    except Exception:  # noqa: BLE001 - the sweep ends it later
        log.warning(
            "could not discard the incomplete batch %s; the receiving sweep will", batch_id, exc_info=True
        )


def fail_abandoned(db: Database, now=None) -> int:
    """Mark ``failed`` the batches still ``receiving`` past their heartbeat; free their pieces and key."""
    now = now or utcnow()
    with db.engine.begin() as conn:
        query = select(batches.c.id).where(batches.c.status == RECEIVING, batches.c.lease_expires_at < now)
        if db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        ids = conn.execute(query.limit(1000)).scalars().all()
        if not ids:
            return 0
        conn.execute(delete(blobs).where(blobs.c.batch_id.in_(ids)))
        conn.execute(
            update(batches)
            .where(batches.c.id.in_(ids), batches.c.status == RECEIVING)
            .values(
                status="failed",
                error="the body stopped arriving before it was complete (no 202 was given)",
                idempotency_key=None,
                finished_at=now,
                lease_expires_at=None,
            )
        )
    log.warning("marked %d abandoned receiving batches failed: %s", len(ids), ids)
    return len(ids)
