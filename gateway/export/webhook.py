"""The ``webhook`` destination kind: an HTTPS (or HTTP) POST signed per Standard Webhooks.

Each delivery is one ``POST`` of a JSON body with

* ``webhook-id``: the message id, the same on every retry of the delivery (``evt_<event id>``
  for one event; ``evts_<first id>_<last id>_<digest>`` for a batch), so a receiver can drop a
  duplicate;
* ``webhook-timestamp``: when this attempt was signed (Unix seconds), which a receiver checks
  against its clock (the ``standardwebhooks`` library allows five minutes) so that a captured
  delivery cannot be replayed later;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, one per valid
  secret, space-separated: during a rotation's overlap window the new and the old secret both
  sign, so a receiver that knows either accepts it.

The body is one event (``batchSize`` 1) or, with batching on, ``{"type": "batch", "timestamp",
"data": [events]}`` with up to ``batchSize`` events in order.  A ``2xx`` answer is delivered;
``410 Gone`` pauses the destination (the receiver says it is gone: resume it with ``PATCH``
``state: active``); anything else (another status, a refused connection, a timeout) is retried
with backoff, honouring ``Retry-After``.  Redirects are not followed (a ``3xx`` is a failure).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http.cookiejar import DefaultCookiePolicy

import requests
from standardwebhooks.webhooks import Webhook

from gateway.export import kinds, secrets, tls
from gateway.export.kinds import Outcome, Target, TargetRefused

USER_AGENT = "partner-gateway-export/1"
MAX_RETRY_AFTER = 3600.0  # a Retry-After longer than an hour is read as an hour


def body(events: list[dict], batched: bool, now: datetime) -> str:
    payload = (
        {"type": "batch", "timestamp": now.isoformat().replace("+00:00", "Z"), "data": events}
        if batched
        else events[0]
    )
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def sign(secrets_: list[str], msg_id: str, timestamp: int, data: str) -> str:
    at = datetime.fromtimestamp(timestamp, tz=UTC)
    return " ".join(Webhook(secret).sign(msg_id, at, data) for secret in secrets_)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, when.timestamp() - (now if now is not None else time.time())), MAX_RETRY_AFTER)


class WebhookKind:
    name = "webhook"
    schemes = ("https", "http")
    uses_secret = True
    pipelined = True
    secret_hint = "a Standard Webhooks secret: 'whsec_' and the base64 of 24 to 64 bytes"

    def check(self, url: str, options: dict) -> None:
        tls.check_options(options, tls.TLS_OPTIONS, self.name)  # a webhook's options are its TLS ones
        tls.check_tls(options, url.lower().startswith("https:"))

    def new_secret(self) -> str:
        return secrets.new_webhook_secret()

    def valid_secret(self, value: str) -> bool:
        return secrets.valid_webhook_secret(value)

    def deliver(self, target: Target, message_id_: str, events: list[dict]) -> Outcome:
        started = time.monotonic()
        now = int(_clock())
        data = body(events, target.batched, datetime.fromtimestamp(now, tz=UTC))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": message_id_,
            "webhook-timestamp": str(now),
            "webhook-signature": sign(target.secrets, message_id_, now, data),
        }
        try:
            kinds.check_resolved(target.url, target.allow_private)
            session = tls.with_client_certificate(
                target.session or _session(), target.options, target.client_key, target.destination_id
            )
            response = session.post(
                target.url,
                data=data.encode(),
                headers=headers,
                timeout=target.timeout,
                allow_redirects=False,
                verify=tls.requests_verify(target.options),
            )
        except TargetRefused as exc:
            return Outcome(False, error=f"refused: {exc}", duration_ms=_ms(started))
        except requests.exceptions.ConnectTimeout:
            return Outcome(
                False, error=f"connection timed out after {target.timeout:g}s", duration_ms=_ms(started)
            )
        except requests.exceptions.Timeout:
            return Outcome(False, error=f"no answer within {target.timeout:g}s", duration_ms=_ms(started))
        except requests.exceptions.ConnectionError as exc:
            return Outcome(False, error=f"connection failed: {_reason(exc)}", duration_ms=_ms(started))
        except requests.exceptions.RequestException as exc:
            return Outcome(False, error=f"request failed: {_reason(exc)}", duration_ms=_ms(started))
        excerpt = response.text[:500] if response.content else None
        status = response.status_code
        if 200 <= status < 300:
            return Outcome(True, status_code=status, duration_ms=_ms(started), response_excerpt=excerpt)
        if status == 410:
            return Outcome(
                False,
                status_code=status,
                pause=True,
                duration_ms=_ms(started),
                response_excerpt=excerpt,
                error="the receiver answered 410 Gone: the destination is paused",
            )
        return Outcome(
            False,
            status_code=status,
            retry_after=retry_after(response.headers.get("Retry-After")),
            error=f"the receiver answered {status} {response.reason or ''}".rstrip(),
            duration_ms=_ms(started),
            response_excerpt=excerpt,
        )


_local = threading.local()


def new_session() -> requests.Session:
    """An HTTP session that keeps connections alive between deliveries and keeps no cookies (a
    receiver's cookie must not follow the gateway to other deliveries)."""
    session = requests.Session()
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    return session


def _session() -> requests.Session:
    """This thread's HTTP session (deliveries outside a delivery task's lanes: the test delivery)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = new_session()
    return session


def _clock() -> float:
    """Now, in Unix seconds (the signature's timestamp)."""
    return time.time()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _reason(exc: Exception) -> str:
    text = str(exc)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "Connection reset",
        "Remote end closed",
    ):
        if marker in text:
            return marker.lower()
    return text[:300]


kinds.register(WebhookKind())
