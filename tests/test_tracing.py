"""Optional OpenTelemetry tracing: a push's server span, its task's spans and the merge span, one trace."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from gateway import logs, tracing
from tests.conftest import ROOT, Gateway, Worker, make_app, wait_for, wipe

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

DOCUMENT = {"findings": [
    {"id": "f-1", "resource": {"hostname": "web-1"}, "title": "xz", "severity": "critical",
     "cves": ["CVE-2024-3094"]},
    {"id": "f-2", "resource": {}, "title": "no resource"},
]}
ROUTE = "/api/v1/tenants/<tenant>/batches"


def push(gw, tenant, headers, request_id):
    return gw.http.post(f"/api/v1/tenants/{tenant}/batches?format=canonical", data=json.dumps(DOCUMENT),
                        content_type="application/json", headers=headers | {"X-Request-Id": request_id})


@pytest.fixture
def exporter():
    exporter = InMemorySpanExporter()
    yield exporter
    tracing.configure({})  # tracing off again for the tests after this one


@pytest.fixture
def traced_gw(pg_url, exporter):
    app = make_app(pg_url, eager=True, OTEL_ENABLED=True, OTEL_SPAN_EXPORTER=exporter)
    wipe(app.extensions["gateway.db"])
    yield Gateway(app)
    app.extensions["gateway.db"].dispose()


def test_an_eager_push_traces_the_request_and_the_merge_in_one_trace(traced_gw, exporter, caplog):
    tenant = traced_gw.tenant()
    headers = traced_gw.partner("Contoso", [tenant])
    exporter.clear()
    with caplog.at_level(logging.INFO):
        response = push(traced_gw, tenant, headers, "trace-me-1")
    assert response.status_code == 202, response.get_json()
    batch_id = int(response.get_json()["id"])
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(server) == 1 and server[0].name == f"POST {ROUTE}", [s.name for s in spans]
    server = server[0]
    assert server.attributes["gateway.request_id"] == "trace-me-1"
    assert server.attributes["gateway.tenant"] == tenant
    merge = [s for s in spans if s.name == "gateway.merge"]
    assert len(merge) == 1
    merge = merge[0]
    trace_id = server.context.trace_id
    assert merge.context.trace_id == trace_id
    # Eager: the task runs inside the request; its consumer span is the server span's child,
    # and the merge span is the consumer span's child.
    consumer = [s for s in spans if s.kind == SpanKind.CONSUMER]
    assert len(consumer) == 1 and consumer[0].context.trace_id == trace_id
    assert consumer[0].parent.span_id == server.context.span_id
    assert merge.parent.span_id == consumer[0].context.span_id
    attrs = merge.attributes
    assert attrs["gateway.batch_id"] == batch_id and attrs["gateway.request_id"] == "trace-me-1"
    assert attrs["gateway.format"] == "canonical" and attrs["gateway.status"] == "partiallySucceeded"
    assert isinstance(attrs["gateway.tenant_id"], int)
    assert any(key.startswith("gateway.counts.") for key in attrs), attrs
    # The log lines of the merge carry its trace and span ids.
    merged = [r for r in caplog.records if "merged" in r.getMessage() and r.name == "workers.tasks"]
    assert merged and merged[0].trace_id == f"{trace_id:032x}"
    assert merged[0].span_id == f"{merge.context.span_id:016x}"
    assert "trace=" in logs.formatter("text").format(merged[0])


def test_a_real_worker_continues_the_api_request_trace(pg_url, redis_clean, exporter, tmp_path):
    """The task's headers carry the W3C context: the worker's spans are in the request's trace."""
    app = make_app(pg_url, eager=False, OTEL_ENABLED=True, OTEL_SPAN_EXPORTER=exporter)
    wipe(app.extensions["gateway.db"])
    gw = Gateway(app)
    spans_file = tmp_path / "spans.jsonl"
    worker = Worker(pg_url, extra_env={"GATEWAY_OTEL_EXPORTER": "console",
                                       "GATEWAY_OTEL_CONSOLE_FILE": str(spans_file)})
    try:
        tenant = gw.tenant()
        headers = gw.partner("Contoso", [tenant])
        exporter.clear()
        response = push(gw, tenant, headers, "trace-me-2")
        assert response.status_code == 202, response.get_json()
        batch_id = int(response.get_json()["id"])
        spans = exporter.get_finished_spans()
        server = next(s for s in spans if s.kind == SpanKind.SERVER)
        producer = next(s for s in spans if s.kind == SpanKind.PRODUCER)
        assert producer.parent.span_id == server.context.span_id
        trace_id = f"0x{server.context.trace_id:032x}"

        def worker_spans():
            if not spans_file.exists():
                return None
            found = [json.loads(line) for line in spans_file.read_text().splitlines() if line.strip()]
            # the task's consumer span ends (and is written) after the merge span inside it
            done = any(s["name"] == "gateway.merge" for s in found) and any(
                s["kind"] == "SpanKind.CONSUMER" for s in found)
            return found if done else None

        found = wait_for(worker_spans, timeout=60)
        consumer = next(s for s in found if s["kind"] == "SpanKind.CONSUMER")
        merge = next(s for s in found if s["name"] == "gateway.merge")
        assert consumer["context"]["trace_id"] == trace_id
        assert consumer["parent_id"] == f"0x{producer.context.span_id:016x}"
        assert merge["context"]["trace_id"] == trace_id
        assert merge["parent_id"] == consumer["context"]["span_id"]
        assert merge["attributes"]["gateway.batch_id"] == batch_id
        assert merge["attributes"]["gateway.request_id"] == "trace-me-2"
    finally:
        worker.stop()
        app.extensions["gateway.db"].dispose()


OFF_SCRIPT = """
import json, sys
if sys.argv[1] == "blocked":  # as if the tracing extra were not installed
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "opentelemetry":
                raise ImportError(f"blocked: {name}")
    sys.meta_path.insert(0, Block())
from gateway import create_app
import workers.tasks
app = create_app({"DATABASE_URL": sys.argv[2], "BROKER_URL": "redis://127.0.0.1:6379/11",
                  "SECRET_KEY": "x", "TASK_ALWAYS_EAGER": True, "RATELIMIT_ENABLED": False})
assert app.config["OTEL_ON"] is False
assert app.test_client().get("/healthz").status_code == 200
with workers.tasks.tracing.span("gateway.merge", batch_id=1) as span:
    assert span is None
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "opentelemetry")))
"""
# What the gateway's tracing would import (redis-py itself imports opentelemetry's metrics API when
# it is installed: that is not ours).
TRACING_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.instrumentation", "opentelemetry.exporter",
                   "opentelemetry.propagate")


@pytest.mark.parametrize("packages", ["blocked", "installed"])
def test_tracing_off_imports_no_opentelemetry_and_makes_no_spans(sqlite_url, packages):
    result = subprocess.run([sys.executable, "-c", OFF_SCRIPT, packages, sqlite_url], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    if packages == "blocked":
        assert loaded == []
    else:
        assert not [name for name in loaded if name.startswith(TRACING_MODULES)], loaded


def test_tracing_on_without_the_extra_stops_with_one_line(sqlite_url):
    script = OFF_SCRIPT.replace('"RATELIMIT_ENABLED": False',
                                '"RATELIMIT_ENABLED": False, "OTEL_ENABLED": True')
    result = subprocess.run([sys.executable, "-c", script, "blocked", sqlite_url], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "needs the tracing extra" in result.stderr


def test_tracing_settings_are_typed():
    from gateway.config import ConfigError, load_config

    assert tracing.enabled(load_config({})) is False
    assert tracing.enabled(load_config({"OTEL_EXPORTER": "console"})) is True
    assert tracing.enabled(load_config({"OTEL_ENABLED": False, "OTEL_EXPORTER": "console"})) is False
    assert tracing.enabled(load_config({"OTEL_EXPORTER": "none"})) is False
    with pytest.raises(ConfigError, match="OTEL_EXPORTER must be"):
        load_config({"OTEL_EXPORTER": "jaeger"})
