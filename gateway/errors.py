"""One error module: domain errors carry a status and a code; nothing internal leaks."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from sqlalchemy.exc import IntegrityError
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
}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return {"error": body}


def init_app(app: Flask) -> None:
    """Register the JSON error handlers."""

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

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        response = jsonify(error_body("internalError", "an internal error occurred"))
        response.status_code = 500
        return response
