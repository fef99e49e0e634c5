"""Configuration: defaults, then GATEWAY_* environment variables, then a test mapping."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any


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


INT_SETTINGS = {
    "MAX_BODY_BYTES",
    "TOKEN_TTL_SECONDS",
    "MERGE_CHUNK_SIZE",
    "SWEEP_AFTER_SECONDS",
    "MAX_ATTEMPTS",
    "LEASE_SECONDS",
    "MAX_REJECTION_DETAILS",
    "PAGE_SIZE_DEFAULT",
    "PAGE_SIZE_MAX",
}


def load_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the configuration mapping."""
    home = instance_dir() if not (overrides or {}).get("DATABASE_URL") and not os.environ.get(
        "GATEWAY_DATABASE_URL"
    ) else None
    config: dict[str, Any] = {
        "DATABASE_URL": f"sqlite:///{home / 'gateway.sqlite3'}" if home else None,
        "BROKER_URL": f"sqla+sqlite:///{home / 'broker.sqlite3'}" if home else "redis://127.0.0.1:6379/0",
        "SECRET_KEY": None,
        "MAX_BODY_BYTES": 256 * 1024 * 1024,
        "TOKEN_TTL_SECONDS": 3600,
        "MERGE_CHUNK_SIZE": 5000,
        "SWEEP_AFTER_SECONDS": 300,
        "MAX_ATTEMPTS": 5,
        "LEASE_SECONDS": 60,
        "MAX_REJECTION_DETAILS": 1000,
        "PAGE_SIZE_DEFAULT": 100,
        "PAGE_SIZE_MAX": 1000,
        "ISSUER": None,
        "TASK_ALWAYS_EAGER": False,
        "TASK_QUEUE": "gateway",
    }
    for key in list(config):
        value = os.environ.get(f"GATEWAY_{key}")
        if value is not None:
            config[key] = int(value) if key in INT_SETTINGS else value
    if isinstance(config["TASK_ALWAYS_EAGER"], str):
        config["TASK_ALWAYS_EAGER"] = config["TASK_ALWAYS_EAGER"].lower() in ("1", "true", "yes")
    config.update(overrides or {})
    if not config["DATABASE_URL"]:
        config["DATABASE_URL"] = f"sqlite:///{instance_dir() / 'gateway.sqlite3'}"
    if not config["SECRET_KEY"]:
        config["SECRET_KEY"] = _instance_secret(instance_dir())
    return config
