"""Structured logs: JSON (python-json-logger) or text, every line carrying the ids in context.

The ids live in context variables: ``request_id`` (the ``X-Request-Id`` a caller sent, if
it is short and printable, or a new one), ``tenant`` and ``client_id`` on API lines, and
``batch_id`` while a batch is pushed or merged.  A log record factory copies them onto
every record, whichever logger or handler (Flask, Celery, SQLAlchemy, pytest's caplog).
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pythonjsonlogger.json import JsonFormatter

CONTEXT_FIELDS = ("request_id", "batch_id", "tenant", "client_id")
_context: dict[str, contextvars.ContextVar] = {
    name: contextvars.ContextVar(f"gateway_{name}", default=None) for name in CONTEXT_FIELDS
}
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces, at most 128 characters
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(batch_id)s]: %(message)s"
TRACE_FORMAT = " trace=%(trace_id)s span=%(span_id)s"  # after the text lines' ids, when tracing is on
JSON_FIELDS = ["asctime", "levelname", "name", "message"]
TRACE_FIELDS = ("trace_id", "span_id")
_trace_ids = None  # gateway.tracing.current_ids, once tracing is on in this process


def valid_request_id(value: str | None) -> str | None:
    return value if value and REQUEST_ID.fullmatch(value) else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def get(name: str):
    return _context[name].get()


def bind(**values) -> dict[str, contextvars.Token]:
    """Set context ids; returns the tokens to :func:`unbind` them."""
    return {name: _context[name].set(None if value is None else str(value)) for name, value in values.items()}


def unbind(tokens: dict[str, contextvars.Token]) -> None:
    for name, token in tokens.items():
        try:
            _context[name].reset(token)
        except ValueError:  # set in another context (a generator finished elsewhere)
            _context[name].set(None)


@contextmanager
def context(**values) -> Iterator[None]:
    tokens = bind(**values)
    try:
        yield
    finally:
        unbind(tokens)


_base_factory = logging.getLogRecordFactory()


def _record_factory(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    for name, var in _context.items():
        if not hasattr(record, name):
            setattr(record, name, var.get())
    trace_id, span_id = _trace_ids() if _trace_ids is not None else (None, None)
    record.trace_id, record.span_id = trace_id, span_id
    return record


def set_trace_ids(getter) -> None:
    """Let tracing put the current ``trace_id``/``span_id`` on every record (``getter`` returns them)."""
    global _trace_ids
    _trace_ids = getter


class GatewayJsonFormatter(JsonFormatter):
    """One JSON object a line; ids left out when not set."""

    def add_fields(self, log_record, record, message_dict) -> None:
        super().add_fields(log_record, record, message_dict)
        for name in CONTEXT_FIELDS + TRACE_FIELDS:
            if log_record.get(name) is None:
                log_record.pop(name, None)


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return GatewayJsonFormatter(JSON_FIELDS + list(CONTEXT_FIELDS + TRACE_FIELDS),
                                    rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
    if _trace_ids is not None:
        return logging.Formatter(TEXT_FORMAT.replace("]: ", "]" + TRACE_FORMAT + ": "))
    return logging.Formatter(TEXT_FORMAT)


_HANDLER_MARK = "_gateway_handler"


def configure(kind: str = "text", level: str = "INFO") -> None:
    """Install the record factory and one root handler on stderr in ``kind`` (json or text)."""
    if logging.getLogRecordFactory() is not _record_factory:
        logging.setLogRecordFactory(_record_factory)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(formatter(kind))
    root.addHandler(handler)
    root.setLevel(level)
