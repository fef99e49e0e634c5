"""Optional OpenTelemetry tracing: API request -> task publish -> worker task -> merge.

Off by default.  ``GATEWAY_OTEL_ENABLED=true`` (or ``GATEWAY_OTEL_EXPORTER=console|otlp``)
turns it on; the OTLP HTTP exporter reads the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME`` and friends.  The ``opentelemetry`` packages (the ``tracing`` extra) are
imported only when tracing is on, so the gateway runs without them.

What is traced: a server span per request (opentelemetry-instrumentation-flask, the route as
its name), a producer span when a task is sent and a consumer span when a worker runs it
(opentelemetry-instrumentation-celery; the W3C trace context travels in the task's headers),
and a ``gateway.merge`` span around the merge of a batch.  Log lines carry ``trace_id`` and
``span_id``.

One tracer provider serves the whole process (the Celery instrumentation is process-wide);
each app built with tracing on points its span processor at its own exporter, so that tests
can build apps with an in-memory exporter (``OTEL_SPAN_EXPORTER`` in the app's config).
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)

_state: dict[str, Any] = {"enabled": False, "provider": None, "switch": None, "celery": None}


def enabled(config: dict[str, Any]) -> bool:
    """Whether ``config`` turns tracing on (``OTEL_ENABLED``, else an exporter that exports)."""
    if config.get("OTEL_ENABLED") is not None:
        return bool(config["OTEL_ENABLED"])
    return config.get("OTEL_EXPORTER") in ("console", "otlp")


def is_on() -> bool:
    return _state["enabled"]


def configure(config: dict[str, Any], role: str = "api") -> bool:
    """Set up (or switch off) this process's tracing for ``config``; True when on."""
    if not enabled(config):
        _state["enabled"] = False
        if _state["switch"] is not None:
            _state["switch"].delegate = None  # a provider made earlier in this process drops its spans
            from gateway import logs

            logs.set_trace_ids(None)
        return False
    try:
        provider, switch = _provider(role)
    except ImportError as exc:
        from gateway.config import ConfigError

        raise ConfigError(f"GATEWAY_OTEL_ENABLED needs the tracing extra (pip install "
                          f"'partner-gateway[tracing]'): {exc}") from None
    switch.delegate = _processor(config)
    _state["enabled"] = True
    _instrument_celery(provider)
    from gateway import logs

    logs.set_trace_ids(current_ids)
    log.info("tracing on: exporter %s", "a test's" if config.get("OTEL_SPAN_EXPORTER") is not None
             else config.get("OTEL_EXPORTER") or "otlp")
    return True


def _provider(role: str):
    if _state["provider"] is None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        attributes = ({} if os.environ.get("OTEL_SERVICE_NAME")
                      else {"service.name": f"partner-gateway-{role}"})
        provider = TracerProvider(resource=Resource.create(attributes))
        switch = _switchable_processor()
        provider.add_span_processor(switch)
        trace.set_tracer_provider(provider)  # once per process (OpenTelemetry refuses a second)
        _state["provider"], _state["switch"] = provider, switch
    return _state["provider"], _state["switch"]


def _switchable_processor():
    from opentelemetry.sdk.trace import SpanProcessor

    class Switchable(SpanProcessor):
        """Forwards to the current app's processor (none: spans are dropped)."""

        delegate = None

        def on_start(self, span, parent_context=None):
            if self.delegate is not None:
                self.delegate.on_start(span, parent_context=parent_context)

        def on_end(self, span):
            if self.delegate is not None:
                self.delegate.on_end(span)

        def shutdown(self):
            if self.delegate is not None:
                self.delegate.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.delegate.force_flush(timeout_millis) if self.delegate is not None else True

    return Switchable()


def _processor(config: dict[str, Any]):
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    exporter = config.get("OTEL_SPAN_EXPORTER")  # a test hook: an exporter object
    if exporter is not None:
        return SimpleSpanProcessor(exporter)
    kind = config.get("OTEL_EXPORTER") or "otlp"
    if kind == "none":
        return None  # spans are made (the context travels to the worker) but not exported
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        path = config.get("OTEL_CONSOLE_FILE")
        out = open(path, "a", buffering=1) if path else sys.stdout  # noqa: SIM115 - lives with the process
        # One JSON object a line, written as each span ends.
        return SimpleSpanProcessor(ConsoleSpanExporter(
            out=out, formatter=lambda span: span.to_json(indent=None) + "\n"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter())


def _instrument_celery(provider) -> None:
    if _state["celery"] is None:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        instrumentor = CeleryInstrumentor()
        instrumentor.instrument(tracer_provider=provider)
        _state["celery"] = instrumentor


def init_app(app) -> None:
    """Server spans for ``app``'s requests (only when tracing is on for it)."""
    if not app.config.get("OTEL_ON"):
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    FlaskInstrumentor.instrument_app(app, tracer_provider=_state["provider"])


def set_attributes(**attributes) -> None:
    """Attributes on the current span (nothing when tracing is off)."""
    if not _state["enabled"]:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"gateway.{key}": value for key, value in attributes.items()
                             if value is not None})


def span(name: str, **attributes):
    """A context manager: an internal span ``name`` (a no-op when tracing is off)."""
    if not _state["enabled"]:
        return nullcontext(None)
    return _span(name, attributes)


@contextmanager
def _span(name: str, attributes: dict[str, Any]):
    tracer = _state["provider"].get_tracer("gateway")
    with tracer.start_as_current_span(name) as current:
        current.set_attributes({f"gateway.{key}": value for key, value in attributes.items()
                                if value is not None})
        yield current


def current_ids() -> tuple[str | None, str | None]:
    """The current trace and span ids in hex (for the log lines), or Nones."""
    if not _state["enabled"]:
        return None, None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def merge_attributes(status: str, tenant_id: int, format_name: str, counts: dict | None) -> dict[str, Any]:
    """The ``gateway.merge`` span's attributes once the merge is done (counts flattened)."""
    attributes: dict[str, Any] = {"gateway.status": status, "gateway.tenant_id": int(tenant_id),
                                  "gateway.format": format_name}
    for key, value in (counts or {}).items():
        if isinstance(value, int | float | str | bool):
            attributes[f"gateway.counts.{key}"] = value
    return attributes
