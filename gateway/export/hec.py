"""The ``splunk_hec`` destination kind: Splunk's HTTP Event Collector.

URL: the collector's base (``https://splunk.example.com:8088``) or its event endpoint
(``.../services/collector/event``).  Each delivery is one ``POST .../services/collector/event`` with
``Authorization: Splunk <token>`` (the destination's secret: the HEC token, given by the client,
stored encrypted, never shown) and the delivery's events as HEC event objects, concatenated (the
collector's batch format)::

    {"time": 1717171717.123, "host": "...", "source": "...", "sourcetype": "...", "index": "...",
     "fields": {"tenant": "...", "eventType": "...", "eventId": "..."}, "event": {<the event>}}

Options: ``index``, ``sourcetype`` (``partner:gateway:event``), ``source`` (``partner-gateway``),
``host`` (this machine's name), ``ack``, ``channel``, ``ackTimeoutSeconds`` (30),
``ackPollSeconds`` (1), and the TLS options of gateway/export/tls.py.

Indexer acknowledgement (``ack: true``, when the token has it on): every request carries
``X-Splunk-Request-Channel`` (the ``channel`` option, or a UUID derived from the destination), the
answer's ``ackId`` is polled with ``POST .../services/collector/ack?channel=...`` until the
collector says the events are indexed; only then is the batch delivered.  Not acknowledged
within ``ackTimeoutSeconds`` is a failure, and the batch is sent again (at least once: Splunk
may then hold it twice; ``fields.eventId`` tells the copies apart).  An answer without an
``ackId`` means the token has acknowledgement off: its ``200`` is the receipt.

A ``2xx`` answer with ``code`` 0 is delivered; ``503`` (server busy) and ``429`` are retried
honouring ``Retry-After``; anything else (``401``/``403`` token, ``400`` format) is retried with
backoff and shown as the destination's error with the collector's ``text``.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

import requests

from gateway.export import kinds, secrets, tls
from gateway.export.kinds import Outcome, Target, TargetRefused
from gateway.export.webhook import USER_AGENT, _reason, _session, retry_after

EVENT_PATH, ACK_PATH = "/services/collector/event", "/services/collector/ack"
OPTIONS = {
    "index": str,
    "sourcetype": str,
    "source": str,
    "host": str,
    "ack": bool,
    "channel": str,
    "ackTimeoutSeconds": float,
    "ackPollSeconds": float,
} | tls.TLS_OPTIONS


def endpoints(url: str) -> tuple[str, str]:
    """(the event endpoint, the ack endpoint) of a destination URL."""
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    for suffix in (EVENT_PATH, "/services/collector"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    base = (parts.scheme, parts.netloc)
    return urlunsplit(base + (path + EVENT_PATH, "", "")), urlunsplit(base + (path + ACK_PATH, "", ""))


def channel(target: Target) -> str:
    return target.options.get("channel") or str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"partner-gateway/export/{target.destination_id}")
    )


def _epoch(timestamp: str | None) -> float:
    try:
        return round(datetime.fromisoformat((timestamp or "").replace("Z", "+00:00")).timestamp(), 3)
    except ValueError:
        return round(time.time(), 3)


def body(events: list[dict], options: dict) -> bytes:
    """The events as HEC event objects, concatenated (one per line)."""
    common = {
        "host": options.get("host") or socket.gethostname(),
        "source": options.get("source", "partner-gateway"),
        "sourcetype": options.get("sourcetype", "partner:gateway:event"),
    }
    if options.get("index"):
        common["index"] = options["index"]
    lines = []
    for event in events:
        item = {"time": _epoch(event.get("timestamp"))} | common
        item["fields"] = {
            "tenant": event.get("tenant"),
            "eventType": event.get("type"),
            "eventId": event.get("id"),
        }
        item["event"] = event
        lines.append(json.dumps(item, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines).encode()


def _answer(response: requests.Response) -> dict:
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class SplunkHecKind:
    name = "splunk_hec"
    schemes = ("https", "http")
    uses_secret = True
    pipelined = True
    secret_required = True  # the client gives the token; nothing is generated
    echoes_secret = False
    secret_hint = "the HEC token (1 to 200 characters, no spaces)"

    def check(self, url: str, options: dict) -> None:
        tls.check_options(options, OPTIONS, self.name)
        parts = urlsplit(url)
        if parts.query:
            raise ValueError("a HEC URL takes no query")
        tls.check_tls(options, parts.scheme.lower() == "https")
        if "channel" in options:
            try:
                uuid.UUID(options["channel"])
            except ValueError:
                raise ValueError("option 'channel' must be a GUID") from None
        for name, low, high in (("ackTimeoutSeconds", 0.1, 600), ("ackPollSeconds", 0.01, 60)):
            if name in options and not low <= options[name] <= high:
                raise ValueError(f"option '{name}' must be between {low:g} and {high:g}")

    def new_secret(self) -> None:
        return None

    def valid_secret(self, value: str) -> bool:
        return secrets.valid_token(value)

    def deliver(self, target: Target, message_id: str, events: list[dict]) -> Outcome:
        started = time.monotonic()
        event_url, ack_url = endpoints(target.url)
        headers = {
            "Authorization": f"Splunk {target.secrets[0] if target.secrets else ''}",
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
        }
        ack = bool(target.options.get("ack"))
        if ack:
            headers["X-Splunk-Request-Channel"] = channel(target)
        verify = tls.requests_verify(target.options)
        try:
            kinds.check_resolved(target.url, target.allow_private)
            response = _session_for(target).post(
                event_url,
                data=body(events, target.options),
                headers=headers,
                timeout=target.timeout,
                verify=verify,
                allow_redirects=False,
            )
            outcome = self._judge(response, started)
            ack_id = _answer(response).get("ackId")
            if outcome.ok and ack and ack_id is not None:
                outcome = self._await_ack(target, ack_url, headers, verify, ack_id, started, outcome)
            return outcome
        except TargetRefused as exc:
            return Outcome(False, error=f"refused: {exc}", duration_ms=_ms(started))
        except requests.exceptions.Timeout:
            return Outcome(False, error=f"no answer within {target.timeout:g}s", duration_ms=_ms(started))
        except requests.exceptions.RequestException as exc:
            return Outcome(False, error=f"HEC request failed: {_reason(exc)}", duration_ms=_ms(started))

    def _judge(self, response: requests.Response, started: float) -> Outcome:
        answer = _answer(response)
        excerpt = response.text[:500] if response.content else None
        status = response.status_code
        if 200 <= status < 300 and answer.get("code", 0) == 0:
            return Outcome(True, status_code=status, duration_ms=_ms(started), response_excerpt=excerpt)
        text = answer.get("text") or response.reason or ""
        return Outcome(
            False,
            status_code=status,
            retry_after=retry_after(response.headers.get("Retry-After")),
            error=f"the collector answered {status}: {text} (code {answer.get('code')})"[:500],
            duration_ms=_ms(started),
            response_excerpt=excerpt,
        )

    def _await_ack(
        self, target: Target, ack_url: str, headers: dict, verify, ack_id, started: float, sent: Outcome
    ) -> Outcome:
        deadline = time.monotonic() + float(target.options.get("ackTimeoutSeconds", 30))
        interval = float(target.options.get("ackPollSeconds", 1))
        while True:
            response = _session_for(target).post(
                ack_url,
                params={"channel": headers["X-Splunk-Request-Channel"]},
                data=json.dumps({"acks": [ack_id]}),
                headers=headers,
                timeout=target.timeout,
                verify=verify,
                allow_redirects=False,
            )
            if not 200 <= response.status_code < 300:
                failed = self._judge(response, started)
                failed.error = f"acknowledgement poll failed: {failed.error}"
                return failed
            acks = _answer(response).get("acks") or {}
            if acks.get(str(ack_id)) is True:
                sent.duration_ms = _ms(started)
                sent.response_excerpt = f"{sent.response_excerpt or ''} acknowledged (ackId {ack_id})".strip()
                return sent
            if time.monotonic() + interval > deadline:
                return Outcome(
                    False,
                    status_code=sent.status_code,
                    error=f"the collector did not acknowledge ackId {ack_id} within "
                    f"{target.options.get('ackTimeoutSeconds', 30):g}s: the batch is sent again",
                    duration_ms=_ms(started),
                )
            time.sleep(interval)


def _session_for(target: Target):
    return tls.with_client_certificate(
        target.session or _session(), target.options, target.client_key, target.destination_id
    )


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


kinds.register(SplunkHecKind())
