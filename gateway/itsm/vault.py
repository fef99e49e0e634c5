"""The ITSM connections' secrets, encrypted at rest with Fernet (AES-128-CBC + HMAC-SHA256).

Keys come from ``GATEWAY_SECRETS_KEYS``: comma-separated Fernet keys (``gateway itsm new-key`` or
``Fernet.generate_key()``).  The first key encrypts; every key decrypts (``MultiFernet``), so a key
is rotated by putting a new one first, running ``gateway itsm rotate-secrets`` (re-encrypts every
stored secret with the first key), then dropping the old one.

Without the setting the embedded default (SQLite store, not production) generates a key in
``GATEWAY_HOME/secrets_keys`` (mode 0600) on first use, as it does the paging key.  A production
store (PostgreSQL named by the environment) never generates one: storing or reading a secret fails
with :class:`SecretsUnavailable` until ``GATEWAY_SECRETS_KEYS`` is set.  Secrets are never returned
by the API (only ``hasSecret`` and a hint of the last characters of a long token) and never logged.
"""

from __future__ import annotations

from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from gateway.config import instance_dir, is_production


class SecretsUnavailable(RuntimeError):
    """No key to encrypt or decrypt with (production without GATEWAY_SECRETS_KEYS), or a stored
    secret that none of the keys opens."""


def _generated_key() -> str:
    path = instance_dir() / "secrets_keys"
    if not path.exists():
        path.write_text(Fernet.generate_key().decode())
        path.chmod(0o600)
    return path.read_text().strip()


def keys(config: dict[str, Any]) -> list[str]:
    text = config.get("SECRETS_KEYS") or ""
    found = [key.strip() for key in text.split(",") if key.strip()]
    if found:
        return found
    if config.get("STORE_FROM_ENVIRONMENT") and is_production(config):
        raise SecretsUnavailable(
            "GATEWAY_SECRETS_KEYS is not set: a production store never keeps ITSM "
            "secrets under a generated key"
        )
    return [_generated_key()]


def _fernet(config: dict[str, Any]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key.encode()) for key in keys(config)])
    except ValueError:
        raise SecretsUnavailable(
            "GATEWAY_SECRETS_KEYS must be Fernet keys (32 url-safe base64 bytes), comma-separated"
        ) from None


def encrypt(config: dict[str, Any], secret: str | None) -> str | None:
    if secret is None:
        return None
    return _fernet(config).encrypt(secret.encode()).decode()


def decrypt(config: dict[str, Any], token: str | None) -> str | None:
    if token is None:
        return None
    try:
        return _fernet(config).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretsUnavailable(
            "a stored ITSM secret cannot be decrypted with GATEWAY_SECRETS_KEYS "
            "(was its key removed before `gateway itsm rotate-secrets`?)"
        ) from None


def rotate(config: dict[str, Any], token: str | None) -> str | None:
    """The token re-encrypted with the first key."""
    if token is None:
        return None
    try:
        return _fernet(config).rotate(token.encode()).decode()
    except InvalidToken:
        raise SecretsUnavailable(
            "a stored ITSM secret cannot be decrypted with GATEWAY_SECRETS_KEYS"
        ) from None


def hint(secret: str | None) -> str | None:
    """The last 4 characters of a token of at least 16 (nothing of a short password)."""
    if not secret or len(secret) < 16:
        return None
    return "…" + secret[-4:]
