"""Destination secrets: generated, encrypted at rest, never shown again.

A webhook secret is Standard Webhooks' ``whsec_`` followed by the base64 of 32 random bytes
(the HMAC-SHA256 key).  It is shown once, in the answer that creates or rotates it, and stored
encrypted by the gateway's one vault (gateway/vault.py: the first of ``GATEWAY_SECRETS_KEYS``, or
the key derived from ``GATEWAY_SECRET_KEY``; rotation with ``gateway secrets rotate``).  What is
shown later is a *hint*: the prefix and the first four characters, enough to tell two secrets
apart.
"""

from __future__ import annotations

import base64
import re
import secrets as random
from collections.abc import Mapping
from typing import Any

from gateway import vault

PREFIX = "whsec_"
_WHSEC = re.compile(r"^whsec_[A-Za-z0-9+/]{32,88}={0,2}$")


SecretUnreadable = vault.SecretsUnavailable  # the stored secret cannot be decrypted with this process's keys


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


def seal(config: Mapping[str, Any], value: str) -> str:
    return vault.encrypt(config, value)


def unseal(config: Mapping[str, Any], sealed: str) -> str:
    return vault.decrypt(config, sealed)
