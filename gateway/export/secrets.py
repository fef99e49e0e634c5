"""Destination secrets: generated, encrypted at rest, never shown again.

A webhook secret is Standard Webhooks' ``whsec_`` followed by the base64 of 32 random bytes
(the HMAC-SHA256 key).  It is shown once, in the answer that creates or rotates it, and stored
encrypted with Fernet (AES-128-CBC + HMAC-SHA256) under a key derived from ``GATEWAY_SECRET_KEY``
(so the API and every worker, which share that setting, can read it; changing the setting makes
the stored secrets unreadable: rotate them afterwards).  What is shown later is a *hint*: the
prefix and the first four characters, enough to tell two secrets apart.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets as random

from cryptography.fernet import Fernet, InvalidToken

PREFIX = "whsec_"
_WHSEC = re.compile(r"^whsec_[A-Za-z0-9+/]{32,88}={0,2}$")


class SecretUnreadable(Exception):
    """The stored secret cannot be decrypted with this process's ``SECRET_KEY``."""


def _fernet(secret_key: str) -> Fernet:
    digest = hashlib.sha256(b"gateway.export-secrets.v1\x00" + secret_key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def new_webhook_secret() -> str:
    return PREFIX + base64.b64encode(random.token_bytes(32)).decode()


def valid_webhook_secret(value: str) -> bool:
    """A ``whsec_`` secret whose key decodes to 24 to 64 bytes."""
    if not isinstance(value, str) or not _WHSEC.match(value):
        return False
    try:
        key = base64.b64decode(value[len(PREFIX) :] + "==")
    except ValueError:
        return False
    return 24 <= len(key) <= 64


def hint(value: str) -> str:
    """``whsec_AbCd…``: the prefix and the first four characters of the key."""
    head = value[len(PREFIX) :] if value.startswith(PREFIX) else value
    return (PREFIX if value.startswith(PREFIX) else "") + head[:4] + "…"


def seal(secret_key: str, value: str) -> str:
    return _fernet(secret_key).encrypt(value.encode()).decode()


def unseal(secret_key: str, sealed: str) -> str:
    try:
        return _fernet(secret_key).decrypt(sealed.encode()).decode()
    except InvalidToken:
        raise SecretUnreadable(
            "the destination's secret cannot be decrypted with this GATEWAY_SECRET_KEY "
            "(was it changed? rotate the secret)"
        ) from None


def valid_token(value: str) -> bool:
    """A credential the client gives (a HEC token, a NATS token): 1 to 200 printable ASCII characters."""
    return isinstance(value, str) and 0 < len(value) <= 200 and all(33 <= ord(c) <= 126 for c in value)
