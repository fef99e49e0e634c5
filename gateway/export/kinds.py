"""Destination kinds: a registry, so that a new kind of destination is one module.

The core (gateway/export/delivery.py) owns everything kind-independent: the outbox cursor, the
filter, the batch of events to send (frozen until delivered, so a retry resends exactly it, with
the same message id), rendering the events, retries with backoff, the failing state, the
deliveries log and the lease that lets one worker deliver a destination at a time.  A kind only
checks its URL and options when a destination is created or changed, and sends one batch of
already-rendered events, answering an :class:`Outcome`.  ``webhook`` (gateway/export/webhook.py)
is the first; Splunk HEC (``splunk_hec``), syslog CEF (``syslog``) and NATS JetStream (``nats``)
register the same way.

Outbound targets.  A destination's URL must use one of its kind's schemes.  Unless
``GATEWAY_EXPORT_ALLOW_PRIVATE_TARGETS`` is true, a URL naming a loopback, private, link-local,
multicast or otherwise reserved address is refused when the destination is saved, and every
delivery resolves the host name first and refuses to connect when any of its addresses is one
(server-side request forgery: a tenant must not make the gateway call its own network).  The
check is made again at each delivery because a name can change what it resolves to; a name that
changes between the check and the connection (DNS rebinding within a second) is not covered.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit


@dataclass
class Outcome:
    """What one delivery attempt gave."""

    ok: bool
    status_code: int | None = None
    error: str | None = None
    retry_after: float | None = None  # seconds the receiver asked us to wait (Retry-After)
    pause: bool = False  # the receiver said the endpoint is gone (410): stop until resumed
    duration_ms: int = 0
    response_excerpt: str | None = None


@dataclass
class Target:
    """What a kind needs to send to one destination."""

    destination_id: int
    url: str
    options: dict
    secrets: list[str] = field(default_factory=list)  # the current secret first, then the previous one
    batched: bool = False  # the destination sends several events per delivery
    timeout: float = 10.0
    allow_private: bool = False
    session: object | None = None  # the HTTP session of the delivering lane (kept for a whole task)
    client_key: str | None = None  # the private key of option ``clientCertificate`` (mTLS), decrypted


class DestinationKind(Protocol):
    name: str
    schemes: tuple[str, ...]
    uses_secret: bool  # a signing secret (generated when none is given)

    def check(self, url: str, options: dict) -> None:
        """Raise ``ValueError`` (its message names the problem) when the URL or options are unusable."""

    def new_secret(self) -> str | None: ...

    def valid_secret(self, value: str) -> bool:
        """Whether a secret given by the client fits the kind."""

    secret_hint: str  # what a valid secret looks like, for error messages
    # optional attributes: ``pipelined`` (True: HTTP kinds whose deliveries may travel side by side in
    # lanes, each lane with its own ``Target.session``), ``secret_required`` (the client must give the
    # secret: a HEC token), ``echoes_secret`` (False: a secret the client gave is not repeated in the answer)

    def deliver(self, target: Target, message_id: str, events: list[dict]) -> Outcome:
        """Send ``events`` (rendered, in order) as one delivery; never raise for the receiver's faults."""


KINDS: dict[str, DestinationKind] = {}


def message_id(event_ids: list[int], batched: bool) -> str:
    """A delivery's message id, derived from its events (a retry of the same batch has the same):
    ``evt_<event id>`` for one event, ``evts_<first id>_<last id>_<digest of all ids>`` for a batch."""
    if not batched and len(event_ids) == 1:
        return f"evt_{event_ids[0]}"
    digest = hashlib.sha256(",".join(map(str, event_ids)).encode()).hexdigest()[:12]
    return f"evts_{event_ids[0]}_{event_ids[-1]}_{digest}"


def register(kind: DestinationKind) -> DestinationKind:
    KINDS[kind.name] = kind
    return kind


def get(name: str) -> DestinationKind:
    return KINDS[name]


# -- outbound targets ------------------------------------------------------------------------------


class TargetRefused(ValueError):
    """The URL names an address the gateway does not call (see the module's docstring)."""


def _forbidden(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


def check_url(url: str, schemes: tuple[str, ...], allow_private: bool) -> None:
    """The URL's form (scheme, host, no credentials) and, when it names an address, that address."""
    if not isinstance(url, str) or len(url) > 2048 or any(ord(c) < 33 for c in url):
        raise ValueError("must be an absolute URL of at most 2048 characters, without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"must use {' or '.join(schemes)}, not '{parts.scheme[:20]}'")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (use the destination's secret)")
    if parts.fragment:
        raise ValueError("must not have a fragment")
    if port == 0:
        raise ValueError("names port 0")
    if not allow_private:
        try:
            address = ipaddress.ip_address(parts.hostname)
        except ValueError:
            if parts.hostname.lower().rstrip(".") in ("localhost",) or parts.hostname.lower().endswith(
                ".localhost"
            ):
                raise TargetRefused(
                    "names a loopback host, which GATEWAY_EXPORT_ALLOW_PRIVATE_TARGETS does not allow"
                ) from None
            return
        if _forbidden(address):
            raise TargetRefused(
                f"names a non-public address ({address}), which "
                "GATEWAY_EXPORT_ALLOW_PRIVATE_TARGETS does not allow"
            )


def check_resolved(url: str, allow_private: bool) -> None:
    """Before connecting: every address the host resolves to must be public (unless allowed)."""
    if allow_private:
        return
    parts = urlsplit(url)
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TargetRefused(f"cannot resolve {parts.hostname}: {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if _forbidden(address):
            raise TargetRefused(
                f"{parts.hostname} resolves to a non-public address ({address}), which "
                "GATEWAY_EXPORT_ALLOW_PRIVATE_TARGETS does not allow"
            )


def _load_builtin_kinds() -> None:
    from gateway.export import (  # noqa: F401  (SIEM and stream kinds)
        hec,
        nats,
        syslog,
        webhook,  # noqa: F401  (registers itself)
    )


_load_builtin_kinds()
