"""Multipart uploads: a large file sent in numbered parts over a flaky link, completed into one batch.

* ``create``: an upload names the format, media type, encoding and scan type its bytes will
  have as a push; with an ``Idempotency-Key`` a repeated create returns the same upload.
* ``put_part``: a part (1..10000, any order) is streamed into 1 MiB pieces under a fresh
  attempt id, its SHA-256 and MD5 computed on the way; a checksum the client sent
  (``x-checksum-sha256``, hex or base64, or ``Content-MD5``) that differs is a 400 naming the
  header and the attempt's pieces are dropped; else, in one transaction, the part row points at
  the new attempt and the pieces of the one it replaces are deleted.  A part sent again is
  therefore idempotent (same bytes, same part) and a retry after a failure is safe.
* ``complete``: the parts, in number order with none missing, are read back piece by piece
  through the same code as a push body (gateway/streaming.py: gunzip, limits, checks, 1 MiB
  batch pieces), so the batch is the batch a single push of the concatenated bytes would have
  made, Idempotency-Key rules included.  The upload's pieces are dropped once it completed;
  completing again answers the same batch.
* an upload expires ``UPLOAD_EXPIRY_SECONDS`` after it was created: it answers 404 from then
  on, and the beat task (:func:`delete_expired`) deletes it with its bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

import connectors
from gateway.db import Database
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.ingest import BLOB_SIZE, WELLFORMED_CHECK_MAX_BYTES, Push, store_batch
from gateway.models import Batch, Upload, UploadPart, UploadPiece, utcnow
from gateway.streaming import STREAM_THRESHOLD, Inflow, read_head, store_streamed

uploads_t = Upload.__table__
parts_t = UploadPart.__table__
pieces_t = UploadPiece.__table__

MAX_PART_NUMBER = 10_000


@dataclass(frozen=True)
class Checksums:
    """What the client says a part's bytes hash to (either may be absent, not both)."""

    sha256: str | None  # hex
    md5: str | None  # hex

    @classmethod
    def from_headers(cls, sha256_header: str | None, md5_header: str | None) -> Checksums:
        sha256 = _digest(sha256_header, 32, "x-checksum-sha256") if sha256_header else None
        md5 = _digest(md5_header, 16, "Content-MD5") if md5_header else None
        if sha256 is None and md5 is None:
            raise BadRequest(
                "a part needs a checksum: the x-checksum-sha256 header (hex or base64 SHA-256 of "
                "the part) or Content-MD5 (base64 MD5)",
                code="missingChecksum",
            )
        return cls(sha256, md5)


def _digest(value: str, size: int, header: str) -> str:
    """A digest header (hex, or base64 as S3 and RFC 1864 write it) as lower-case hex."""
    value = value.strip()
    if len(value) == 2 * size:
        try:
            return bytes.fromhex(value).hex()
        except ValueError:
            pass
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise BadRequest(
            f"the {header} header must be a {size}-byte digest in hex or base64", code="invalidParameter"
        )
    return raw.hex()


def _live(session, tenant_id: int, client_pk: int, upload_id: str) -> Upload:
    upload = session.scalar(
        select(Upload).where(
            Upload.id == upload_id, Upload.tenant_id == tenant_id, Upload.client_pk == client_pk
        )
    )
    if upload is None or upload.expires_at <= utcnow():
        raise NotFound(f"upload '{upload_id}' not found (an unfinished upload expires)")
    return upload


def find(db: Database, tenant_id: int, client_pk: int, upload_id: str) -> Upload:
    """The client's live upload in the tenant, else 404 (also once it expired)."""
    with db.sessions() as session:
        return _live(session, tenant_id, client_pk, upload_id)


def create(db: Database, push: Push, expiry_seconds: int) -> tuple[Upload, bool]:
    """A new upload, or (with an Idempotency-Key used before) the same one; (upload, replayed)."""
    now = utcnow()
    upload = Upload(
        id=uuid.uuid4().hex,
        tenant_id=push.tenant_id,
        client_pk=push.client_pk,
        provider=push.provider,
        format=push.format,
        content_type=push.content_type,
        content_encoding=push.content_encoding,
        scan_type=push.scan_type,
        idempotency_key=push.idempotency_key,
        status="open",
        created_at=now,
        expires_at=now + timedelta(seconds=expiry_seconds),
    )
    try:
        with db.session() as session:
            if push.idempotency_key:
                existing = _by_key(session, push)
                if existing is not None:
                    return _same_upload(existing, push), True
            session.add(upload)
    except IntegrityError:
        with db.sessions() as session:
            existing = _by_key(session, push) if push.idempotency_key else None
        if existing is None:
            raise
        return _same_upload(existing, push), True
    return upload, False


def _by_key(session, push: Push) -> Upload | None:
    existing = session.scalar(
        select(Upload).where(
            Upload.tenant_id == push.tenant_id,
            Upload.client_pk == push.client_pk,
            Upload.idempotency_key == push.idempotency_key,
        )
    )
    if existing is not None and existing.expires_at <= utcnow():
        session.delete(existing)  # an expired upload frees its key (the sweep may not have run yet)
        session.flush()
        return None
    return existing


def _same_upload(existing: Upload, push: Push) -> Upload:
    for name in ("format", "content_type", "content_encoding", "scan_type"):
        if getattr(existing, name) != getattr(push, name):
            raise Conflict(
                f"this Idempotency-Key was used for an upload with another {name.replace('_', ' ')}",
                code="idempotencyKeyReused",
            )
    return existing


def put_part(
    db: Database,
    upload: Upload,
    part_number: int,
    chunks: Iterator[bytes],
    checksums: Checksums,
    on_piece: Callable[[int], None] | None = None,
) -> tuple[dict, bool]:
    """Store one part (replacing the same number); return (its description, created)."""
    if not 1 <= part_number <= MAX_PART_NUMBER:
        raise BadRequest(f"the part number must be 1 to {MAX_PART_NUMBER}", code="invalidParameter")
    if upload.status != "open":
        raise Conflict("the upload is completed: its parts can no longer change", code="uploadCompleted")
    attempt = uuid.uuid4().hex
    sha256, md5, size, seq = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0, 0
    buffer = bytearray()

    def commit(piece: bytes) -> None:
        nonlocal seq
        if on_piece is not None:
            on_piece(len(piece))
        with db.engine.begin() as conn:
            conn.execute(
                insert(pieces_t),
                {
                    "upload_id": upload.id,
                    "part_number": part_number,
                    "attempt": attempt,
                    "seq": seq,
                    "data": piece,
                },
            )
        seq += 1

    try:
        for chunk in chunks:
            sha256.update(chunk)
            md5.update(chunk)
            size += len(chunk)
            buffer += chunk
            while len(buffer) >= BLOB_SIZE:
                commit(bytes(buffer[:BLOB_SIZE]))
                del buffer[:BLOB_SIZE]
        if buffer or not seq:
            commit(bytes(buffer))
        for header, sent, got in (
            ("x-checksum-sha256", checksums.sha256, sha256.hexdigest()),
            ("Content-MD5", checksums.md5, md5.hexdigest()),
        ):
            if sent is not None and sent != got:
                raise BadRequest(
                    f"the part's bytes do not match its {header} header (they hash to {got})",
                    code="checksumMismatch",
                )
        with db.engine.begin() as conn:
            target = select(uploads_t.c.status).where(uploads_t.c.id == upload.id)
            if db.is_postgres:
                target = target.with_for_update()
            if conn.execute(target).scalar() != "open":
                raise Conflict(
                    "the upload is completed: its parts can no longer change", code="uploadCompleted"
                )
            previous = conn.execute(
                select(parts_t.c.attempt).where(
                    parts_t.c.upload_id == upload.id, parts_t.c.part_number == part_number
                )
            ).scalar()
            if previous is not None:
                conn.execute(
                    delete(parts_t).where(
                        parts_t.c.upload_id == upload.id, parts_t.c.part_number == part_number
                    )
                )
                conn.execute(
                    delete(pieces_t).where(
                        pieces_t.c.upload_id == upload.id,
                        pieces_t.c.part_number == part_number,
                        pieces_t.c.attempt == previous,
                    )
                )
            received = utcnow()
            conn.execute(
                insert(parts_t),
                {
                    "upload_id": upload.id,
                    "part_number": part_number,
                    "attempt": attempt,
                    "size": size,
                    "sha256": sha256.hexdigest(),
                    "md5": md5.hexdigest(),
                    "received_at": received,
                },
            )
    except BaseException:
        with db.engine.begin() as conn:
            conn.execute(
                delete(pieces_t).where(pieces_t.c.upload_id == upload.id, pieces_t.c.attempt == attempt)
            )
        raise
    return describe_part(part_number, size, sha256.hexdigest(), md5.hexdigest(), received), previous is None


def describe_part(number: int, size: int, sha256: str, md5: str, received: datetime) -> dict:
    return {
        "partNumber": number,
        "size": size,
        "sha256": sha256,
        "md5": base64.b64encode(bytes.fromhex(md5)).decode(),
        "receivedAt": received.isoformat(),
    }


def parts(db: Database, upload_id: str) -> list[dict]:
    """The upload's received parts in number order."""
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(parts_t).where(parts_t.c.upload_id == upload_id).order_by(parts_t.c.part_number)
        ).all()
    return [describe_part(r.part_number, r.size, r.sha256, r.md5, r.received_at) for r in rows]


class _PartsStream(io.RawIOBase):
    """The upload's parts, in number order, read back one piece at a time."""

    def __init__(self, db: Database, upload_id: str, attempts: list[tuple[int, str]]) -> None:
        self.db = db
        self.upload_id = upload_id
        self.pieces = self._pieces(attempts)
        self.buffer = memoryview(b"")

    def _pieces(self, attempts: list[tuple[int, str]]) -> Iterator[bytes]:
        for number, attempt in attempts:
            seq = 0
            while True:
                with self.db.engine.connect() as conn:
                    data = conn.execute(
                        select(pieces_t.c.data).where(
                            pieces_t.c.upload_id == self.upload_id,
                            pieces_t.c.part_number == number,
                            pieces_t.c.attempt == attempt,
                            pieces_t.c.seq == seq,
                        )
                    ).scalar()
                if data is None:
                    break
                yield bytes(data)
                seq += 1

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self.buffer:
            piece = next(self.pieces, None)
            if piece is None:
                return b""
            self.buffer = memoryview(piece)
        size = len(self.buffer) if size is None or size < 0 else size
        chunk = bytes(self.buffer[:size])
        self.buffer = self.buffer[size:]
        return chunk


def complete(
    db: Database, upload: Upload, config: dict, expected: list[dict] | None = None
) -> tuple[Batch, bool]:
    """Turn the upload's parts into one batch, as a push of their bytes; (batch, replayed)."""
    with db.engine.begin() as conn:
        taken = conn.execute(
            update(uploads_t)
            .where(uploads_t.c.id == upload.id, uploads_t.c.status == "open")
            .values(status="completing")
        ).rowcount
    if not taken:
        with db.sessions() as session:
            current = session.get(Upload, upload.id)
            if current.status == "completed" and current.batch_id is not None:
                return session.get(Batch, current.batch_id), True
        raise Conflict("the upload is being completed by another request", code="uploadCompleting")
    try:
        with db.engine.connect() as conn:
            rows = conn.execute(
                select(parts_t.c.part_number, parts_t.c.attempt, parts_t.c.sha256)
                .where(parts_t.c.upload_id == upload.id)
                .order_by(parts_t.c.part_number)
            ).all()
        _check_parts(rows, expected)
        batch, replayed = _store(db, upload, config, [(r.part_number, r.attempt) for r in rows])
        with db.engine.begin() as conn:
            conn.execute(
                update(uploads_t)
                .where(uploads_t.c.id == upload.id)
                .values(status="completed", batch_id=batch.id, completed_at=utcnow())
            )
            conn.execute(delete(pieces_t).where(pieces_t.c.upload_id == upload.id))
    except BaseException:
        with db.engine.begin() as conn:
            conn.execute(
                update(uploads_t)
                .where(uploads_t.c.id == upload.id, uploads_t.c.status == "completing")
                .values(status="open")
            )
        raise
    return batch, replayed


def _check_parts(rows, expected: list[dict] | None) -> None:
    if not rows:
        raise BadRequest("the upload has no parts", code="uploadIncomplete")
    for position, row in enumerate(rows, start=1):
        if row.part_number != position:
            raise BadRequest(
                f"part {position} is missing (parts are numbered from 1 with no gap)", code="uploadIncomplete"
            )
    if expected is not None:
        stored = [{"partNumber": r.part_number, "sha256": r.sha256} for r in rows]
        listed = [
            {"partNumber": p.get("partNumber"), "sha256": str(p.get("sha256", "")).lower()} for p in expected
        ]
        if listed != stored:
            raise BadRequest(
                "the parts listed do not match the parts received (see GET on the upload)",
                code="uploadIncomplete",
            )


def _store(db: Database, upload: Upload, config: dict, attempts: list[tuple[int, str]]) -> tuple[Batch, bool]:
    """The parts' bytes through the push path: read whole when small, else streamed."""
    inflow = Inflow(
        _PartsStream(db, upload.id, attempts),
        upload.content_encoding.strip().lower(),
        None,
        config["MAX_BODY_BYTES"],
        config["GZIP_MAX_RATIO"],
    )
    chunks = inflow.chunks()
    head = read_head(chunks, STREAM_THRESHOLD + 1)
    format_name = upload.format
    if format_name == "auto":
        format_name = connectors.detect(head[:65536]) or ""
        if not format_name:
            raise BadRequest(
                "the format could not be detected; name it when creating the upload", code="unknownFormat"
            )
    push = Push(
        tenant_id=upload.tenant_id,
        client_pk=upload.client_pk,
        provider=upload.provider,
        format=format_name,
        content_type=upload.content_type,
        content_encoding=upload.content_encoding,
        declared_length=None,
        scan_type=upload.scan_type,
        idempotency_key=upload.idempotency_key,
    )
    check_limit = config.get("WELLFORMED_CHECK_MAX_BYTES", WELLFORMED_CHECK_MAX_BYTES)
    if len(head) <= STREAM_THRESHOLD:
        return store_batch(db, push, head, check_limit)
    return store_streamed(
        db,
        push,
        head,
        chunks,
        check_limit=check_limit,
        declared_length=None,
        timeout_seconds=config["RECEIVING_TIMEOUT_SECONDS"],
    )


def abort(db: Database, upload: Upload) -> None:
    """Delete an upload that is not completed, with its bytes."""
    with db.engine.begin() as conn:
        gone = conn.execute(
            delete(uploads_t).where(uploads_t.c.id == upload.id, uploads_t.c.status == "open")
        ).rowcount
        if gone:
            conn.execute(delete(parts_t).where(parts_t.c.upload_id == upload.id))
            conn.execute(delete(pieces_t).where(pieces_t.c.upload_id == upload.id))
    if not gone:
        raise Conflict("the upload is completed or being completed", code="uploadCompleted")


def delete_expired(db: Database, now: datetime | None = None) -> int:
    """Delete the uploads past their expiry (finished or not; a finished one's batch stays)."""
    now = now or utcnow()
    with db.engine.begin() as conn:
        ids = (
            conn.execute(select(uploads_t.c.id).where(uploads_t.c.expires_at <= now).limit(1000))
            .scalars()
            .all()
        )
        if ids:
            conn.execute(delete(pieces_t).where(pieces_t.c.upload_id.in_(ids)))
            conn.execute(delete(parts_t).where(parts_t.c.upload_id.in_(ids)))
            conn.execute(delete(uploads_t).where(uploads_t.c.id.in_(ids)))
    return len(ids)
