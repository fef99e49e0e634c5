"""Secrets at rest, for every part of the gateway: one ``MultiFernet`` (Fernet: AES-128-CBC + HMAC-SHA256).

What it keeps: the ITSM connections' credentials and webhook secrets (gateway/itsm/), the export
destinations' signing secrets (gateway/export/).  Which keys:

* ``GATEWAY_SECRETS_KEYS``: comma-separated Fernet keys (``gateway secrets new-key``).  The first
  one encrypts; every one decrypts.
* The key derived from ``GATEWAY_SECRET_KEY`` (SHA-256 of a fixed label and the setting): it
  encrypts when ``GATEWAY_SECRETS_KEYS`` is unset (the API and every worker share that setting), and
  always decrypts, so secrets sealed before the keys were configured stay readable.
* ``GATEWAY_HOME/secrets_keys``, where an earlier embedded gateway generated a key for ITSM
  secrets: it decrypts when the file exists; nothing generates it any more.

**Rotation.**  ``gateway secrets new-key`` prints a key; put it first in ``GATEWAY_SECRETS_KEYS``
(keep the old ones after it) on the API and every worker, run ``gateway secrets rotate`` (every
stored secret re-encrypted with the first key), then drop the old keys.  The same moves a store off
the ``SECRET_KEY``-derived key before ``GATEWAY_SECRET_KEY`` changes.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

LABEL = b"gateway.export-secrets.v1\x00"  # the derivation destination secrets were first sealed with


class SecretsUnavailable(RuntimeError):
    """No key to encrypt with, a malformed key, or a stored secret that none of the keys opens."""


def derived_key(secret_key: str) -> bytes:
    """The Fernet key derived from ``SECRET_KEY``."""
    return base64.urlsafe_b64encode(hashlib.sha256(LABEL + secret_key.encode()).digest())


def configured_keys(config: Mapping[str, Any]) -> list[str]:
    text = config.get("SECRETS_KEYS") or ""
    return [key.strip() for key in text.split(",") if key.strip()]


def _legacy_key() -> bytes | None:
    from gateway.config import instance_dir

    try:
        path = instance_dir() / "secrets_keys"
        return path.read_text().strip().encode() if path.exists() else None
    except OSError:
        return None


def keys(config: Mapping[str, Any]) -> list[bytes]:
    """Every key, the encrypting one first."""
    found = [key.encode() for key in configured_keys(config)]
    if config.get("SECRET_KEY"):
        found.append(derived_key(str(config["SECRET_KEY"])))
    legacy = _legacy_key()
    if legacy:
        found.append(legacy)
    if not found:
        raise SecretsUnavailable("neither GATEWAY_SECRETS_KEYS nor GATEWAY_SECRET_KEY is set")
    return list(dict.fromkeys(found))


def _fernet(config: Mapping[str, Any]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key) for key in keys(config)])
    except ValueError:
        raise SecretsUnavailable(
            "GATEWAY_SECRETS_KEYS must be Fernet keys (32 url-safe base64 bytes), comma-separated"
        ) from None


def encrypt(config: Mapping[str, Any], secret: str | None) -> str | None:
    if secret is None:
        return None
    return _fernet(config).encrypt(secret.encode()).decode()


def decrypt(config: Mapping[str, Any], token: str | None) -> str | None:
    if token is None:
        return None
    try:
        return _fernet(config).decrypt(token.encode()).decode()
    except InvalidToken:
        raise SecretsUnavailable(
            "a stored secret cannot be decrypted with GATEWAY_SECRETS_KEYS or GATEWAY_SECRET_KEY "
            "(was its key removed before `gateway secrets rotate`?)"
        ) from None


def rotate(config: Mapping[str, Any], token: str | None) -> str | None:
    """The token re-encrypted with the first key."""
    if token is None:
        return None
    try:
        return _fernet(config).rotate(token.encode()).decode()
    except InvalidToken:
        raise SecretsUnavailable(
            "a stored secret cannot be decrypted with GATEWAY_SECRETS_KEYS or GATEWAY_SECRET_KEY"
        ) from None


def new_key() -> str:
    return Fernet.generate_key().decode()
