"""Accepting a push: cheap checks, durable storage of the raw bytes, then enqueueing."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import msgspec
from lxml import etree
from sqlalchemy import ARRAY, Integer, LargeBinary, bindparam, func, insert, select, true
from sqlalchemy.exc import IntegrityError

import connectors
from connectors import xmlsafe
from connectors.model import FormatError
from gateway.db import Database
from gateway.errors import BadRequest, Conflict, Forbidden, PayloadTooLarge, UnsupportedMediaType
from gateway.models import Batch, BatchBlob, utcnow

BLOB_SIZE = 1 << 20
READ_SIZE = 1 << 16


@dataclass(frozen=True)
class Push:
    """A push as the view received it."""

    tenant_id: int
    client_pk: int
    provider: str
    format: str
    content_type: str
    content_encoding: str
    declared_length: int | None
    scan_type: str
    idempotency_key: str | None


class _Envelope(msgspec.Struct):
    provider: str | None = None
    scan: dict | None = None
    findings: list[msgspec.Raw] = []


def read_body(stream: BinaryIO, encoding: str, declared_length: int | None, limit: int) -> bytes:
    """The request body, gunzipped if need be, refusing more than ``limit`` bytes cheaply."""
    if encoding not in ("", "identity", "gzip"):
        raise UnsupportedMediaType(f"Content-Encoding '{encoding}' is not supported (use gzip or none)",
                                   code="unsupportedEncoding")
    if declared_length is not None and declared_length > limit and encoding != "gzip":
        raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
    parts: list[bytes] = []
    total = 0
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    raw_total = 0
    while True:
        chunk = stream.read(READ_SIZE)
        if not chunk:
            break
        raw_total += len(chunk)
        if raw_total > limit:
            raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
        if inflater is not None:
            try:
                chunk = inflater.decompress(chunk, limit + 1 - total)
            except zlib.error:
                raise BadRequest("the body is not valid gzip", code="invalidEncoding") from None
            if inflater.unconsumed_tail:
                raise PayloadTooLarge(f"the decompressed body is larger than the limit of {limit} bytes")
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
        parts.append(chunk)
    if inflater is not None and not inflater.eof:
        raise BadRequest("the gzip body is truncated", code="invalidEncoding")
    return b"".join(parts)


LENIENT_JSON_BYTES = 16 * 1024 * 1024
# Bodies up to this size go through a whole well-formedness pass before the 202 (the
# app setting WELLFORMED_CHECK_MAX_BYTES overrides it); larger ones skip it, and the batch
# says so (``bodyCheck: skipped``): their errors show when the worker parses them.
WELLFORMED_CHECK_MAX_BYTES = 256 * 1024 * 1024
_FEED_SIZE = 1 << 20


def _json_error(error: msgspec.DecodeError, body: bytes) -> str:
    """msgspec's message, with the byte offset named even for a truncated document."""
    message = str(error)
    if "truncated" in message:
        return f"the body is not well-formed JSON: it ends early, at byte offset {len(body)} (truncated)"
    match = re.search(r"\(byte (\d+)\)", message)
    if match:
        return (f"the body is not well-formed JSON at byte offset {match.group(1)}: "
                f"{message[: match.start()].strip()}")
    return f"the body is not well-formed JSON: {message}"


def check_xml(body: bytes) -> None:
    """Stream the whole body through lxml (nothing resolved, loaded or fetched; memory flat).

    The prolog is checked first by :mod:`connectors.xmlsafe` (no internal DTD subset, an
    ASCII-compatible encoding); a syntax error is a 400 naming its line and column.
    """
    parser = etree.XMLPullParser(events=("end",), resolve_entities=False, no_network=True, load_dtd=False,
                                 dtd_validation=False, huge_tree=False, remove_comments=True, remove_pis=True)
    view = memoryview(body)
    try:
        for start in range(0, len(body), _FEED_SIZE):
            parser.feed(bytes(view[start : start + _FEED_SIZE]))
            for _, element in parser.read_events():
                xmlsafe.release(element)
        parser.close()
    except etree.XMLSyntaxError as exc:
        line, column = getattr(exc, "position", None) or (exc.lineno, 0)
        reason = re.sub(r",? line \d+, column \d+$", "", str(exc.msg or exc))
        raise BadRequest(f"the body is not well-formed XML at line {line}, column {column}: {reason}",
                         code="malformedBody") from None


def _lenient_envelope(body: bytes, error: msgspec.DecodeError, message: str | None = None) -> _Envelope:
    """Read a document msgspec refused only for an escaped UTF-16 surrogate without its pair.

    Such a document is well-formed JSON; the records holding the lone surrogate are
    rejected one by one by the merge, and the rest of the push lands.  Anything else msgspec
    refused is a 400.
    """
    if ("escape" in str(error) or "surrogate" in str(error)) and len(body) <= LENIENT_JSON_BYTES:
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            pass
        else:
            if isinstance(document, dict):
                try:
                    return msgspec.convert({k: document.get(k) for k in ("provider", "scan")
                                            if document.get(k) is not None}, _Envelope)
                except msgspec.ValidationError as exc:
                    raise BadRequest(f"the body is not a canonical findings document: {exc}",
                                     code="invalidDocument") from None
            return _Envelope()
    raise BadRequest(message or f"the body is not well-formed JSON: {error}", code="malformedBody") from None


def check_body(push: Push, body: bytes, check_limit: int = WELLFORMED_CHECK_MAX_BYTES) -> tuple[str, str]:
    """Checks that the body is this format and well-formed; return (scan type, body check).

    The body check is ``passed`` (a JSON or XML body went through a whole well-formedness
    pass), ``skipped`` (larger than ``check_limit``) or ``notNeeded`` (CSV).
    """
    if not body.strip():
        raise BadRequest("the body is empty", code="emptyBody")
    connector = connectors.get(push.format)
    scan_type = push.scan_type
    within = len(body) <= check_limit
    body_check = "notNeeded"
    if "json" in connector.CONTENT_TYPES[0]:
        body_check = "passed"
        if push.format == "canonical":
            try:
                envelope = msgspec.json.decode(body, type=_Envelope)
            except msgspec.ValidationError as exc:
                raise BadRequest(f"the body is not a canonical findings document: {exc}",
                                 code="invalidDocument") from None
            except msgspec.DecodeError as exc:
                envelope = _lenient_envelope(body, exc, _json_error(exc, body))
            if envelope.provider is not None and envelope.provider != push.provider:
                raise Forbidden(
                    f"this client pushes as provider '{push.provider}', not '{envelope.provider}'",
                    code="wrongProvider",
                )
            declared = (envelope.scan or {}).get("type")
            if declared not in (None, "full", "incremental"):
                raise BadRequest("'scan.type' must be 'full' or 'incremental'", code="invalidDocument")
            if declared and push.scan_type == "unspecified":
                scan_type = declared
        elif within:
            try:  # validated whole, nothing built (msgspec.Raw)
                msgspec.json.decode(body, type=msgspec.Raw)
            except msgspec.DecodeError as exc:
                _lenient_envelope(body, exc, _json_error(exc, body))
        else:
            body_check = "skipped"
    elif "xml" in connector.CONTENT_TYPES[0]:
        import io

        try:
            xmlsafe.read_prolog(io.BytesIO(body[: 1 << 20]))
        except FormatError as exc:
            raise BadRequest(str(exc), code="malformedBody") from None
        if not body.lstrip()[:1] == b"<" and not body.startswith(b"\xef\xbb\xbf<"):
            raise BadRequest("the body is not XML", code="malformedBody")
        if within:
            check_xml(body)
            body_check = "passed"
        else:
            body_check = "skipped"
    if not connector.sniff(body[:65536]):
        raise BadRequest(f"the body does not look like format '{push.format}' ({connector.TITLE})",
                         code="wrongFormat")
    return ("incremental" if scan_type == "unspecified" else scan_type), body_check


def store_batch(db: Database, push: Push, body: bytes,
                check_limit: int = WELLFORMED_CHECK_MAX_BYTES) -> tuple[Batch, bool]:
    """Commit the batch and its bytes; return (batch, replayed) for Idempotency-Key replays."""
    digest = hashlib.sha256(body).hexdigest()
    if push.idempotency_key:
        existing = _existing(db, push)
        if existing is not None:
            return _replay(existing, digest, push), True
    scan_type, body_check = check_body(push, body, check_limit)
    now = utcnow()
    try:
        if db.is_postgres:
            return _insert_batch(db, push, body, digest, scan_type, body_check, now), False
        with db.session() as session:
            batch = Batch(
                tenant_id=push.tenant_id, client_pk=push.client_pk, provider=push.provider,
                format=push.format, content_type=push.content_type, scan_type=scan_type,
                body_sha256=digest, body_size=len(body), idempotency_key=push.idempotency_key,
                status="accepted", counts={}, rejections=[], received_at=now, body_check=body_check,
                # its task is sent right after this commit: recorded here, not in a transaction of
                # its own after the send (``enqueue(recorded=True)`` clears it if the send fails)
                enqueued_at=now,
            )
            session.add(batch)
            session.flush()
            view = memoryview(body)
            session.bulk_insert_mappings(BatchBlob, [
                {"batch_id": batch.id, "seq": seq, "data": bytes(view[start : start + BLOB_SIZE])}
                for seq, start in enumerate(range(0, len(body), BLOB_SIZE))
            ])
    except IntegrityError:
        if not push.idempotency_key:
            raise
        existing = _existing(db, push)  # a concurrent request with the same key won
        if existing is None:
            raise
        return _replay(existing, digest, push), True
    return batch, False


def _insert_batch(db: Database, push: Push, body: bytes, digest: str, scan_type: str,
                  body_check: str | None, now) -> Batch:
    """PostgreSQL: the batch and its bytes in one statement (``WITH batch AS (INSERT ... RETURNING
    id) INSERT INTO batch_blobs SELECT ... unnest(...)``), committed by itself: one round trip
    besides the pool's ping, no unit of work (a small push's 202 waited mostly on the four round
    trips and the ORM flush of the two-statement transaction).  Returns the batch (detached; the
    values the answer reads)."""
    values = dict(
        tenant_id=push.tenant_id, client_pk=push.client_pk, provider=push.provider, format=push.format,
        content_type=push.content_type, scan_type=scan_type, body_sha256=digest, body_size=len(body),
        idempotency_key=push.idempotency_key, status="accepted", counts={}, rejections=[], attempts=0,
        received_at=now, body_check=body_check, enqueued_at=now,  # see store_batch
    )
    view = memoryview(body)
    pieces = [bytes(view[start : start + BLOB_SIZE]) for start in range(0, len(body), BLOB_SIZE)]
    params = dict(values, seqs=list(range(len(pieces))), pieces=pieces) if pieces else values
    # one statement is atomic by itself: run without BEGIN and COMMIT, which would be two more
    # round trips to the server (the statement's own commit still waits for the WAL's flush)
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        batch_id = conn.execute(_insert_statement(bool(pieces)), params).scalars().first()
    return Batch(id=batch_id, **values)


@functools.cache
def _insert_statement(with_pieces: bool):
    """:func:`_insert_batch`'s statement, built once with a parameter for each value: built per push
    (the values inlined), its construction and cache key were a tenth of a small push's CPU time in
    the API process."""
    batches, blobs = Batch.__table__, BatchBlob.__table__
    names = ("tenant_id", "client_pk", "provider", "format", "content_type", "scan_type", "body_sha256",
             "body_size", "idempotency_key", "status", "counts", "rejections", "attempts", "received_at",
             "body_check", "enqueued_at")
    batch = insert(batches).values({name: bindparam(name, type_=batches.c[name].type) for name in names})
    if not with_pieces:  # an empty body: no piece
        return batch.returning(batches.c.id)
    stored = batch.returning(batches.c.id).cte("stored_batch")
    piece = func.unnest(bindparam("seqs", type_=ARRAY(Integer)), bindparam("pieces", type_=ARRAY(LargeBinary))
                        ).table_valued("seq", "data").render_derived(name="piece")
    rows = select(stored.c.id, piece.c.seq, piece.c.data).select_from(stored.join(piece, true()))
    return insert(blobs).from_select(["batch_id", "seq", "data"], rows).returning(blobs.c.batch_id)


def _existing(db: Database, push: Push) -> Batch | None:
    with db.sessions() as session:
        return session.scalar(select(Batch).where(
            Batch.tenant_id == push.tenant_id, Batch.client_pk == push.client_pk,
            Batch.idempotency_key == push.idempotency_key))


def _replay(existing: Batch, digest: str, push: Push) -> Batch:
    """The batch a repeated Idempotency-Key names, if the request is the same one."""
    if existing.body_sha256 != digest:
        raise Conflict("this Idempotency-Key was used with a different body", code="idempotencyKeyReused")
    if existing.format != push.format:
        raise Conflict(f"this Idempotency-Key was used with format '{existing.format}'",
                       code="idempotencyKeyReused")
    if push.scan_type != "unspecified" and existing.scan_type != push.scan_type:
        raise Conflict(f"this Idempotency-Key was used with scanType '{existing.scan_type}'",
                       code="idempotencyKeyReused")
    return existing
