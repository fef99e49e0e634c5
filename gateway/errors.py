"""One error module: domain errors carry a status and a code; nothing internal leaks."""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, jsonify, request
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered as ``{"error": {"code", "message", ...}}`` with ``status``."""

    status = 400
    code = "badRequest"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.details = details
        self.headers = headers or {}


class BadRequest(APIError):
    status, code = 400, "badRequest"


class Unauthorized(APIError):
    status, code = 401, "unauthenticated"


class Forbidden(APIError):
    status, code = 403, "forbidden"


class NotFound(APIError):
    status, code = 404, "notFound"


class Conflict(APIError):
    status, code = 409, "conflict"


class PayloadTooLarge(APIError):
    status, code = 413, "payloadTooLarge"


class UnsupportedMediaType(APIError):
    status, code = 415, "unsupportedMediaType"


class TooManyRequests(APIError):
    """A rate limit or quota is spent (gateway.ratelimit); answered with Retry-After."""

    status, code = 429, "tooManyRequests"


_HTTP_CODES = {
    400: "badRequest",
    401: "unauthenticated",
    403: "forbidden",
    404: "notFound",
    405: "methodNotAllowed",
    406: "notAcceptable",
    409: "conflict",
    411: "lengthRequired",
    413: "payloadTooLarge",
    415: "unsupportedMediaType",
    429: "tooManyRequests",
    503: "serviceUnavailable",
}

# What a PostgreSQL text cannot hold: NUL, and a UTF-16 surrogate not part of a pair.
UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# Endpoints that read their body as a stream (a partner's file, perhaps gzipped) and check it
# themselves: the merge rejects a batch's bad records one by one, the assessment PUT answers 400.
RAW_BODY_ENDPOINTS = {"batches.push_batch", "assessments.put_assessment"}
RAW_BODY_ENDPOINTS |= {"uploads.put_part"}  # a part is raw bytes, never parsed (gateway/api/uploads.py)
RETRY_AFTER_UNAVAILABLE = "5"
RETRY_AFTER_BUSY = "2"


def unstorable_path(value: Any, path: str = "$") -> str | None:
    """The JSON path of the first text (or key) in ``value`` the store cannot hold, or None."""
    pending = [(value, path)]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            if UNSTORABLE.search(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and UNSTORABLE.search(key):
                    return f"{where} (a key)"
                pending.append((child, f"{where}.{key}"))
        elif isinstance(item, list):
            pending.extend((child, f"{where}[{index}]") for index, child in enumerate(item))
    return None


def check_request_text():
    """Refuse, before any view runs, request text the store could not hold (NUL, lone surrogates).

    Path, query parameters, header values, form fields and JSON bodies are checked; a
    partner's file pushed as a batch is not (its bad records are rejected one by one).
    """
    where = None
    if UNSTORABLE.search(request.path):
        where = "the URL path"
    if where is None:
        for key, value in request.args.items(multi=True):
            if UNSTORABLE.search(key) or UNSTORABLE.search(value):
                where = f"query parameter '{UNSTORABLE.sub('?', key)[:60]}'"
                break
    if where is None:
        for key, value in request.headers.items():
            if "\x00" in value:
                where = f"header '{key[:60]}'"
                break
    if where is None and request.mimetype == "application/x-www-form-urlencoded":
        for key, value in request.form.items(multi=True):
            if UNSTORABLE.search(key) or UNSTORABLE.search(value):
                where = f"form field '{UNSTORABLE.sub('?', key)[:60]}'"
                break
    if where is None and request.is_json and request.endpoint not in RAW_BODY_ENDPOINTS:
        try:
            body = request.get_json(silent=True)
        except RecursionError:
            raise BadRequest("the JSON body is nested too deeply", code="invalidBody") from None
        path = unstorable_path(body) if body is not None else None
        if path:
            where = f"the JSON body at {path[:120]}"
    if where is not None:
        message = (f"{where} contains a character that is not allowed (NUL, U+0000, or an unpaired "
                   "UTF-16 surrogate)")
        if request.path.startswith("/oauth/"):  # the OAuth endpoints answer in RFC 6749's error shape
            response = jsonify({"error": "invalid_request", "error_description": message})
            response.status_code = 400
            response.headers["Cache-Control"] = "no-store"
            response.headers["Pragma"] = "no-cache"
            return response
        raise BadRequest(message, code="invalidCharacter")
    return None


def is_unavailable(exc: BaseException) -> bool:
    """A store that cannot be reached (down, restarting, pool exhausted), not a bad statement."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    orig = exc.orig
    if type(orig).__module__.startswith("sqlite3"):
        return False
    sqlstate = getattr(orig, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")


def is_busy(exc: BaseException) -> bool:
    """SQLite's write lock held by another writer (a merge) for longer than a request waits."""
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


def init_app(app: Flask) -> None:
    """Register the JSON error handlers."""

    app.before_request(check_request_text)

    @app.errorhandler(APIError)
    def _api_error(exc: APIError):
        response = jsonify(error_body(exc.code, exc.message, exc.details))
        response.status_code = exc.status
        response.headers.update(exc.headers)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        response = jsonify(error_body(_HTTP_CODES.get(status, "error"), exc.description or exc.name))
        response.status_code = status
        if status == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(IntegrityError)
    def _integrity_error(exc: IntegrityError):
        log.info("integrity error answered 409: %s", exc.orig)
        response = jsonify(error_body("conflict", "the request conflicts with a stored record"))
        response.status_code = 409
        return response

    @app.errorhandler(RecursionError)
    def _too_deep(exc: RecursionError):
        response = jsonify(error_body("invalidBody", "the request is nested too deeply"))
        response.status_code = 400
        return response

    @app.errorhandler(DataError)
    def _data_error(exc: DataError):
        if is_unavailable(exc):
            return _unavailable(exc)
        log.info("data error answered 400: %s", exc.orig)
        response = jsonify(error_body("invalidValue", "a value in the request cannot be stored "
                                                      "(too large, out of range or malformed)"))
        response.status_code = 400
        return response

    @app.errorhandler(PoolTimeout)
    @app.errorhandler(OperationalError)
    def _unavailable(exc: Exception):
        if is_busy(exc):
            log.warning("store busy, answered 503: %s", exc)
            response = jsonify(error_body("serviceUnavailable", "the store is busy; retry shortly"))
            response.status_code = 503
            response.headers["Retry-After"] = RETRY_AFTER_BUSY
            return response
        if not is_unavailable(exc):
            return _unexpected(exc)
        log.warning("store unavailable, answered 503: %s", exc)
        response = jsonify(error_body("serviceUnavailable", "the store is unavailable; retry later"))
        response.status_code = 503
        response.headers["Retry-After"] = RETRY_AFTER_UNAVAILABLE
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, DBAPIError) and is_unavailable(exc):
            return _unavailable(exc)
        log.exception("unhandled error")
        response = jsonify(error_body("internalError", "an internal error occurred"))
        response.status_code = 500
        return response
