"""The ITSM connections' secrets: the gateway's one vault (gateway/vault.py), plus the hint the API shows.

Secrets are never returned by the API (only ``hasSecret`` and a hint of the last characters of a
long token) and never logged.
"""

from __future__ import annotations

from gateway.vault import SecretsUnavailable, decrypt, encrypt, rotate

__all__ = ["SecretsUnavailable", "decrypt", "encrypt", "hint", "rotate"]


def hint(secret: str | None) -> str | None:
    """The last 4 characters of a token of at least 16 (nothing of a short password)."""
    if not secret or len(secret) < 16:
        return None
    return "…" + secret[-4:]
