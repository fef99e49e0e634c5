"""The ``nats`` destination kind: NATS JetStream, with the ``nats-py`` client.

URL: ``nats://nats.example.com:4222`` (or ``tls://...``).  Every event is one JetStream message
on the subject ``<subjectPrefix>.<tenant>.<event type>`` (for example
``gateway.contoso.finding.resolved``: one subject per tenant and event type, so consumers filter
with wildcards such as ``gateway.contoso.finding.>``), its body the event as JSON (the webhook's
single-event body), with the header ``Nats-Msg-Id`` = the event id: a stream de-duplicates a
message it already holds within its duplicate window (two minutes by default; set the stream's
``duplicate_window`` to cover the longest outage you want no duplicates after).  A tenant id's
characters that a subject token cannot hold (``.``, ``*``, ``>``, spaces, ...) become ``_``.

The stream itself is the tenant's: create one whose subjects cover the prefix (for example
``gateway.contoso.>``) before events flow; a publish that no stream takes fails (and is retried,
the error naming the subject).  A batch (``batchSize`` > 1) is published as that many messages,
in order, on one connection, then every acknowledgement awaited; it is delivered when the stream
acknowledged them all (a duplicate's acknowledgement counts: the stream holds it).

Options: ``subjectPrefix`` (``gateway``), ``stream`` (the stream the messages must land in: the
server refuses them otherwise), and with ``tls://`` the TLS options of gateway/export/tls.py.
Secret (optional, never shown): a token, or ``user:password``.

Each worker thread keeps its connections (one per server and credentials) and its own event loop,
so deliveries do not reconnect each time; a connection that dropped is opened again at the next
delivery (the client's own reconnection is off: a delivery either reaches the server or fails).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from urllib.parse import urlsplit

import nats as nats_client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js.errors import APIError, NoStreamResponseError

from gateway.export import kinds, secrets, tls
from gateway.export.kinds import Outcome, Target, TargetRefused

OPTIONS = {"subjectPrefix": str, "stream": str} | tls.TLS_OPTIONS
PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}$")
STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def subject(prefix: str, event: dict) -> str:
    """``<prefix>.<tenant>.<event type>`` (the type is two tokens), each token made subject-safe."""
    kind, _, name = (event.get("type") or "-.-").partition(".")
    tokens = [event.get("tenant") or "-", kind, name or "-"]
    return ".".join([prefix] + [_UNSAFE.sub("_", str(token)) or "_" for token in tokens])


def payload(event: dict) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


class _Thread(threading.local):
    """This thread's event loop and open connections."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None  # made at the first delivery, not at import
        # (server, credentials, options) -> (connection, its JetStream context: one reply inbox each)
        self.connections: dict[tuple, tuple] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop


_local = _Thread()


def _credentials(secrets: list[str]) -> dict:
    if not secrets:
        return {}
    secret = secrets[0]
    user, colon, password = secret.partition(":")
    return {"user": user, "password": password} if colon else {"token": secret}


async def _connection(target: Target):
    parts = urlsplit(target.url)
    key = (
        target.url,
        tuple(target.secrets[:1]),
        json.dumps(target.options, sort_keys=True),
        target.client_key,
    )
    found = _local.connections.get(key)
    if found is not None and found[0].is_connected:
        return found[1]
    if found is not None:
        _local.connections.pop(key, None)
        try:
            await found[0].close()
        except Exception:  # noqa: BLE001 - it is gone anyway
            pass
    server = f"{'tls' if parts.scheme.lower() == 'tls' else 'nats'}://{parts.hostname}:{parts.port or 4222}"
    extra: dict = _credentials(target.secrets)
    if parts.scheme.lower() == "tls":
        extra["tls"] = tls.context(target.options, target.client_key)
        extra["tls_hostname"] = target.options.get("serverName") or parts.hostname

    async def quiet(exc: Exception) -> None:  # the client's default prints every error
        pass

    connection = await nats_client.connect(
        servers=[server],
        connect_timeout=max(1, int(target.timeout)),
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=quiet,
        name="partner-gateway-export",
        **extra,
    )
    context = connection.jetstream(timeout=target.timeout)
    _local.connections[key] = (connection, context)
    return context


async def _publish(target: Target, message_id: str, events: list[dict]) -> list:
    stream = await _connection(target)
    prefix = target.options.get("subjectPrefix", "gateway")
    expected = target.options.get("stream")
    futures = []
    for event in events:
        msg_id = message_id if event.get("type") == "export.test" else str(event["id"])
        futures.append(
            await stream.publish_async(
                subject(prefix, event), payload(event), stream=expected, headers={"Nats-Msg-Id": msg_id}
            )
        )
    return await asyncio.wait_for(asyncio.gather(*futures), timeout=target.timeout)


class NatsKind:
    name = "nats"
    schemes = ("nats", "tls")
    uses_secret = True  # optional: a token or user:password, given by the client
    secret_required = False
    echoes_secret = False
    secret_hint = "a NATS token, or 'user:password' (1 to 200 characters, no spaces)"

    def check(self, url: str, options: dict) -> None:
        tls.check_options(options, OPTIONS, self.name)
        parts = urlsplit(url)
        if parts.path not in ("", "/") or parts.query:
            raise ValueError("a NATS URL is nats://host:port or tls://host:port, without a path or query")
        tls.check_tls(options, parts.scheme.lower() == "tls")
        if "subjectPrefix" in options and not PREFIX.match(options["subjectPrefix"]):
            raise ValueError(
                "option 'subjectPrefix' must be up to 8 dot-separated tokens of letters, digits, '_' or '-'"
            )
        if "stream" in options and not STREAM_NAME.match(options["stream"]):
            raise ValueError("option 'stream' must be a stream name (letters, digits, '_' or '-')")

    def new_secret(self) -> None:
        return None

    def valid_secret(self, value: str) -> bool:
        return secrets.valid_token(value)

    def deliver(self, target: Target, message_id: str, events: list[dict]) -> Outcome:
        started = time.monotonic()
        try:
            kinds.check_resolved(target.url, target.allow_private)
            acks = _local.loop.run_until_complete(
                asyncio.wait_for(_publish(target, message_id, events), timeout=2 * target.timeout + 1)
            )
        except TargetRefused as exc:
            return Outcome(False, error=f"refused: {exc}", duration_ms=_ms(started))
        except (NoStreamResponseError, NoRespondersError):
            where = subject(target.options.get("subjectPrefix", "gateway"), events[0])
            return Outcome(
                False,
                error=f"no JetStream stream takes the subject '{where}' (create one whose subjects cover it)",
                duration_ms=_ms(started),
            )
        except APIError as exc:
            return Outcome(
                False, error=f"JetStream refused the message: {exc}"[:500], duration_ms=_ms(started)
            )
        except TimeoutError:
            _drop_connections()
            return Outcome(
                False, error=f"no acknowledgement within {target.timeout:g}s", duration_ms=_ms(started)
            )
        except (NatsError, OSError) as exc:
            _drop_connections()
            return Outcome(
                False,
                error=f"NATS connection failed: {exc or type(exc).__name__}"[:500],
                duration_ms=_ms(started),
            )
        duplicates = sum(1 for ack in acks if getattr(ack, "duplicate", False))
        return Outcome(
            True,
            duration_ms=_ms(started),
            response_excerpt=f"stream {acks[-1].stream} seq {acks[-1].seq}"
            + (f", {duplicates} duplicate(s) dropped by the stream" if duplicates else ""),
        )


def _drop_connections() -> None:
    """After a failure, the next delivery connects afresh."""
    for connection, _ in list(_local.connections.values()):
        try:
            _local.loop.run_until_complete(asyncio.wait_for(connection.close(), timeout=2))
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
    _local.connections.clear()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


kinds.register(NatsKind())


def close_connections() -> None:
    """Close this thread's connections and its event loop (tests, and a worker shutting down)."""
    _drop_connections()
    if _local._loop is not None:
        _local._loop.close()
        _local._loop = None
