"""Configuration: defaults, then GATEWAY_* environment variables, then a mapping (tests, ``gateway run``).

The settings are typed (pydantic-settings) and checked when a process starts, so that a
misconfiguration stops it with one clear line (:class:`ConfigError`) instead of a traceback
later: a value of the wrong type names its variable, an unknown ``GATEWAY_*`` name is warned
about, production (a PostgreSQL store named by the environment) needs a secret key and an
issuer, and a worker does not merge into a private embedded store its API never reads.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting that stops the process from starting; its message is one line."""


def instance_dir() -> Path:
    """Where the embedded default keeps its SQLite files and generated secret."""
    path = Path(os.environ.get("GATEWAY_HOME", Path.cwd() / "instance")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _instance_secret(home: Path) -> str:
    path = home / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


class Settings(BaseSettings):
    """Every ``GATEWAY_*`` setting, with its type and default (README, "Operate")."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", case_sensitive=False, extra="ignore")

    database_url: str | None = None
    broker_url: str | None = None
    secret_key: str | None = None
    issuer: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024 * 1024  # bodies over 1 MiB are streamed (gateway/streaming.py)
    token_ttl_seconds: int = 3600
    # an API process reuses a successful token check this long (gateway/auth.py TokenCache); 0: off
    token_cache_seconds: float = 0
    merge_chunk_size: int = 5000
    sweep_after_seconds: int = 300
    max_attempts: int = 5
    lease_seconds: int = 60
    max_rejection_details: int = 1000
    # Many small pushes (gateway/smallbatches.py): the task of a batch of at most this many bytes
    # also merges the tenant's other queued batches that small, up to this many in all (1: off).
    # a push's task is sent by the API process's publisher thread after the 202 (workers/tasks.py
    # Publisher); off: the 202 waits for the send
    enqueue_in_background: bool = True
    small_batch_max_bytes: int = 64 * 1024
    small_batches_per_task: int = 20
    # One big batch, many workers (gateway/merge/parallel.py; PostgreSQL): a batch of at least this
    # many bytes is staged in chunks of about this many records, merged by every free worker. 0: off.
    parallel_merge_min_bytes: int = 32 * 1024 * 1024
    parallel_merge_chunk_records: int = 10_000
    # ... and its records routed to this many buckets by resource: a bucket's chunks merge one after
    # the other, different buckets' at once (at least the worker processes that merge them).
    parallel_merge_buckets: int = 16
    # ... and only while at least this many merge slots (worker processes on the queue, announced
    # in the broker's Redis every TTL / 3 seconds) are live: one slot merges a batch faster whole.
    # 0 or 1: stage whatever the slots (and whenever the broker is not Redis).
    parallel_merge_min_slots: int = 2
    merge_slots_ttl_seconds: int = 15
    # ANALYZE after a merge (PostgreSQL; gateway/pipeline.py analyze_if_due): a table the merges
    # changed by this many rows, or this share of its rows, since its last ANALYZE. 0 turns it off.
    analyze_after_rows: int = 50_000
    analyze_after_growth: float = 0.1
    wellformed_check_max_bytes: int = 256 * 1024 * 1024  # larger bodies skip the check before 202
    page_size_default: int = 100
    page_size_max: int = 1000
    # CSV/JSON Lines exports (gateway/bulk_export.py): PostgreSQL connections that read one export's
    # slices at once (each a backend, i.e. a core); 1 reads them one after the other.
    export_connections: int = 2
    # a slice reader that sends nothing this long ends its export with an error (a stuck reader,
    # e.g. waiting on a lock, must not hold a request and its connections forever)
    export_reader_timeout_seconds: float = 120
    task_always_eager: bool = False
    task_queue: str = "gateway"
    log_format: Literal["json", "text"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    metrics_token: str | None = None
    # Rate limits and quotas (gateway.ratelimit; README, "Limits"). A limit is "<count>/<period>"
    # ("120/minute", "10/second", "1000/hour"); an empty value or 0 turns that one limit off.
    ratelimit_enabled: bool = True
    ratelimit_storage_url: str | None = None  # default: the broker's Redis, else this process's memory
    ratelimit_push: str = "120/minute"  # pushes per client
    ratelimit_push_bytes_per_minute: int = 1024 * 1024 * 1024  # pushed bytes per client
    ratelimit_tenant_push: str = "600/minute"  # pushes per tenant, all clients together
    ratelimit_tenant_push_bytes_per_minute: int = 4 * 1024 * 1024 * 1024
    ratelimit_read: str = "600/minute"  # every other authenticated API call, per client
    ratelimit_token: str = "30/minute"  # OAuth endpoint calls per client id, and per remote address
    ratelimit_console_login: str = "20/minute"  # console sign-in form posts per remote address
    token_lockout_failures: int = 10  # failed client authentications in the window lock the client id
    token_lockout_window_seconds: int = 600
    token_lockout_seconds: int = 900
    # Tracing (gateway.tracing; README, "Tracing"): off unless enabled, or an exporter that exports is named.
    # The OTLP exporter reads the standard OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...
    otel_enabled: bool | None = None
    otel_exporter: Literal["otlp", "console", "none"] | None = None  # default when enabled: otlp
    otel_console_file: str | None = None  # the console exporter's file (one JSON span a line); else stdout
    # ITSM ticket sync (gateway/itsm/; README, "ITSM ticket sync"). SECRETS_KEYS: comma-separated Fernet
    # keys; the first encrypts, all decrypt (rotation). Unset: generated in GATEWAY_HOME (embedded only).
    secrets_keys: str | None = None
    itsm_timeout_seconds: float = 20.0  # every call to ServiceNow / Jira (connect and read)
    itsm_retry_base_seconds: float = 1.0  # first backoff of a failed call, doubled per attempt, with jitter
    itsm_delivery_lanes: int = 4  # operations a connection's delivery sends at a time (by ticket id)
    # Continuous export (gateway/export/; README, "Continuous export")
    export_dispatch_interval: float = 2.0  # seconds between runs of the export beat task
    export_timeout_seconds: float = 10.0  # one delivery's connect + answer timeout
    export_test_timeout_seconds: float = 5.0  # the test-delivery endpoint's (it answers in the request)
    export_retry_base_seconds: float = 1.0  # backoff after the first failure, doubling up to the max
    export_retry_max_seconds: float = 300.0
    export_failing_after_seconds: int = 600  # failing that long marks a destination ``failing``
    export_lease_seconds: int = 60  # a delivering worker's hold on a destination
    export_pipeline_depth: int = 4  # HTTP deliveries in flight per destination (lanes by subject)
    export_secret_overlap_seconds: int = 86400  # after a rotation the old secret signs too, this long
    export_allow_private_targets: bool = False  # loopback/private/link-local URLs (SSRF guard off)
    export_max_batch_size: int = 100
    export_delivery_log_size: int = 100  # deliveries kept per destination
    export_max_destinations: int = 50  # per tenant
    event_retention_days: int = 30  # export-only events (batch.finished, secureScore.changed); 0: keep
    event_retention_max_days: int = 90  # pruned even if a destination is behind (a gap it shows); 0: no cap
    event_prune_interval: float = 3600.0
    # Export snapshots and workflow automation (gateway/export/snapshot.py, gateway/automation/)
    snapshot_slice_size: int = 500  # subjects read (and rendered) per keyset slice of a snapshot
    automation_max_rules: int = 50  # per tenant
    automation_failing_after_seconds: int = 600  # a rule failing that long shows ``failing``
    automation_max_chain: int = 3  # an edit made by this many rules in a row triggers no further rule
    # Streamed pushes and multipart uploads (gateway/streaming.py, gateway/uploads.py)
    gzip_max_ratio: float = 100.0  # a gzip body expanding more than this many times is a bomb: 413
    receiving_timeout_seconds: int = 600  # a push whose bytes stop arriving this long is marked failed
    upload_expiry_seconds: int = 86400  # an unfinished multipart upload is deleted this long after creation
    # The console (gateway/console/; README, "Console"): people sign in with local users or OIDC.
    console_cookie_secure: bool = True  # false only for plain-http development (`gateway run` on loopback)
    console_session_hours: float = 12.0  # a session unused this long is gone
    console_lockout_failures: int = 5  # failed sign-ins in a row lock a local user ...
    console_lockout_seconds: int = 900  # ... this long
    finding_history_seconds: float = 900.0  # the beat's count of open findings by severity (Overview chart)
    oidc_issuer: str | None = None  # the identity provider (its /.well-known/openid-configuration)
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_scope: str = "openid email profile"
    oidc_role_claim: str = "groups"  # the ID token claim (a string or a list) that names the role
    oidc_role_map: str = ""  # "claim value=role,...", role reader|analyst|admin; no match: refused
    oidc_tenant_claim: str | None = None  # a claim listing tenant ids to grant; else the default below
    oidc_default_tenants: str = ""  # comma-separated tenant ids granted to a user provisioned by OIDC
    # Security events and detection rules (gateway/detection/; issue 16)
    security_event_retention_days: int = 31  # event days kept (PostgreSQL: whole day partitions dropped)
    detection_interval: float = 60.0  # seconds between the beat's rule evaluations
    security_events_default_hours: int = 24  # the time range of a securityEvents list that names none

    @field_validator(
        "ratelimit_push", "ratelimit_tenant_push", "ratelimit_read", "ratelimit_token",
        "ratelimit_console_login",
    )
    @classmethod
    def _a_limit(cls, value: str) -> str:
        from limits import parse

        if value and value.strip() and value.strip() != "0":
            try:
                parse(value)
            except ValueError:
                raise ValueError('must be a limit such as "120/minute" (or empty for none)') from None
        return "" if value.strip() == "0" else value


# Read elsewhere (directly from the environment) or by the tests and tools: known, not warned about.
OTHER_NAMES = {"HOME", "VISIBILITY_TIMEOUT", "SWEEP_INTERVAL", "TEST_PG_ADMIN", "TEST_REDIS",
               "TEST_WORKER_LOG", "FUZZ_EXAMPLES", "FUZZ_OUTPUT", "FUZZ_SECONDS", "SAMPLES", "TIMEOUT"}
OTHER_NAMES |= {"ITSM_INTERVAL"}  # the ITSM beat interval (workers/celery_app.py)
# threat intelligence beat intervals and the sweep's window (workers/celery_app.py, workers/intel_tasks.py)
OTHER_NAMES |= {"INTEL_PULL_INTERVAL", "INTEL_SWEEP_INTERVAL", "INTEL_PRUNE_INTERVAL", "INTEL_SWEEP_WINDOW"}
FIELDS = {name.upper() for name in Settings.model_fields}
INT_SETTINGS = {name.upper() for name, field in Settings.model_fields.items() if field.annotation is int}
SECRET_SETTINGS = {"SECRET_KEY", "METRICS_TOKEN", "SECRETS_KEYS", "OIDC_CLIENT_SECRET"}
_TYPE_WORDS = {"int_parsing": "an integer", "int_from_float": "an integer", "bool_parsing": "true or false",
               "literal_error": None}


def unknown_environment_names(environ: dict[str, str] | None = None) -> list[str]:
    """``GATEWAY_*`` variables that no part of the gateway reads (a typo, or an old name)."""
    environ = os.environ if environ is None else environ
    return sorted(name for name in environ if name.startswith("GATEWAY_")
                  and name[len("GATEWAY_"):] not in FIELDS | OTHER_NAMES)


def _message(error: dict, overrides: dict[str, Any]) -> str:
    field = str(error["loc"][0]).upper()
    name = field if field in overrides else f"GATEWAY_{field}"
    kind = _TYPE_WORDS.get(error["type"], "")
    if kind:
        return f"{name} must be {kind}, got {error['input']!r}"
    if error["type"] == "literal_error":
        return f"{name} must be {error['ctx']['expected']}, got {error['input']!r}"
    return f"{name}: {error['msg']}, got {error['input']!r}"


def load_settings(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The typed settings as an upper-case mapping: defaults < environment < ``overrides``."""
    overrides = dict(overrides or {})
    known = {key.lower(): value for key, value in overrides.items() if key in FIELDS}
    try:
        settings = Settings(**known)
    except ValidationError as exc:
        raise ConfigError("; ".join(_message(error, overrides) for error in exc.errors())) from None
    config = {key.upper(): value for key, value in settings.model_dump().items()}
    config.update({key: value for key, value in overrides.items() if key not in FIELDS})
    return config


def load_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the configuration mapping (types checked; see :func:`check_startup` for the rest)."""
    overrides = overrides or {}
    config = load_settings(overrides)
    home = instance_dir() if not config["DATABASE_URL"] else None
    if not config["DATABASE_URL"]:
        config["DATABASE_URL"] = f"sqlite:///{home / 'gateway.sqlite3'}"
    if not config["BROKER_URL"]:
        config["BROKER_URL"] = (f"sqla+sqlite:///{home / 'broker.sqlite3'}" if home
                                else "redis://127.0.0.1:6379/0")
    # Where the store came from: the production checks apply to what the environment names.
    config["STORE_FROM_ENVIRONMENT"] = ("DATABASE_URL" not in overrides
                                        and bool(os.environ.get("GATEWAY_DATABASE_URL")))
    if not config["SECRET_KEY"]:
        if config["STORE_FROM_ENVIRONMENT"] and is_production(config):
            config["SECRET_KEY"] = None  # check_startup refuses: no generated key in production
        else:
            config["SECRET_KEY"] = _instance_secret(instance_dir())
    if not config["RATELIMIT_STORAGE_URL"]:
        from gateway.ratelimit import storage_url

        config["RATELIMIT_STORAGE_URL"] = storage_url(config)
    if config["LOG_FORMAT"] is None:
        config["LOG_FORMAT"] = "json" if is_production(config) else "text"
    return config


def is_production(config: dict[str, Any]) -> bool:
    return str(config.get("DATABASE_URL") or "").startswith("postgresql")


def check_startup(config: dict[str, Any], role: str) -> None:
    """Refuse to start a misconfigured ``role`` ("api" or "worker") with one line."""
    if config.get("STORE_FROM_ENVIRONMENT") and is_production(config):
        missing = [name for name in ("SECRET_KEY", "ISSUER") if not config.get(name)
                   and (name != "ISSUER" or (role == "api" and not config.get("ISSUER_FROM_REQUEST")))]
        if missing:
            raise ConfigError("production (a PostgreSQL store) needs "
                              + " and ".join(f"GATEWAY_{name}" for name in missing))
    if (role == "worker" and not os.environ.get("GATEWAY_DATABASE_URL")
            and str(config["DATABASE_URL"]).startswith("sqlite")
            and not str(config["BROKER_URL"]).startswith("sqla+")):
        raise ConfigError(
            f"this worker takes tasks from {mask_url(config['BROKER_URL'])} but would merge into a private "
            f"SQLite store ({config['DATABASE_URL']}): set GATEWAY_DATABASE_URL to the API's store")


def mask_url(url: str | None) -> str:
    """The URL with its password (if any) replaced by ``***``."""
    if not url:
        return str(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = f"{parts.username}:***" if parts.username else ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc[-1]}"))


def describe_store(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.startswith("sqlite"):
        return f"SQLite {url.split(':///', 1)[1] if ':///' in url else url}"
    return f"PostgreSQL {parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"


def startup_line(config: dict[str, Any], role: str) -> str:
    """What a process uses, in one line, secrets masked."""
    return (f"gateway {role}: store {describe_store(config['DATABASE_URL'])}, broker "
            f"{mask_url(config['BROKER_URL'])}, queue {config['TASK_QUEUE']}, logs {config['LOG_FORMAT']}")


def effective(config: dict[str, Any]) -> dict[str, str]:
    """The settings for display: every typed setting, secrets and URL passwords masked."""
    shown = {}
    for name in sorted(FIELDS):
        value = config.get(name)
        if name in SECRET_SETTINGS and value:
            value = "***"
        elif name.endswith("_URL"):
            value = mask_url(value)
        shown[name] = "" if value is None else str(value)
    return shown
