"""The ``syslog`` destination kind: events as CEF (gateway/export/cef.py) in RFC 5424 syslog
messages over TCP, framed by octet counting (RFC 6587 3.4.1), optionally in TLS (RFC 5425), for
ArcSight, QRadar and any collector that takes syslog over TCP.

URL: ``tcp://collector.example.com:514`` or ``tls://collector.example.com:6514`` (those are the
default ports).  Each event is one message::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME - MSGID - CEF:0|...

with ``PRI`` = facility × 8 + severity (critical → 2 crit, high → 3 err, medium → 4 warning,
low → 5 notice, anything else → 6 info), ``TIMESTAMP`` the event's time, ``MSGID`` the event type
(up to 32 characters) and the CEF record as the message.  On the wire each message is
``<octet count> <message>``, so a message may hold any byte (CEF escapes newlines anyway).

Options: ``facility`` (a number 0-23 or a name: ``local0`` by default), ``hostname`` (what the
messages say they come from: this machine's name by default), ``appName`` (``partner-gateway``),
``deviceVendor``/``deviceProduct`` (CEF header), and with ``tls://`` the TLS options of
gateway/export/tls.py.  No secret (use TLS, and a collector that admits the gateway's address).

A delivery opens a connection, writes the frames of its events in order and closes it; it counts
as delivered when every byte was written.  Syslog over TCP has no acknowledgement: batches
(``batchSize`` > 1) send several events on one connection.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

from gateway.export import cef, kinds, tls
from gateway.export.kinds import Outcome, Target, TargetRefused

DEFAULT_PORTS = {"tcp": 514, "tls": 6514}
FACILITIES = {
    name: number
    for number, name in enumerate(
        "kern user mail daemon auth syslog lpr news uucp cron authpriv ftp ntp audit alert clock".split()
        + [f"local{n}" for n in range(8)]
    )
}
SYSLOG_SEVERITY = {10: 2, 8: 3, 5: 4, 3: 5}  # CEF severity -> syslog severity (else 6, info)
OPTIONS = {
    "facility": object,
    "hostname": str,
    "appName": str,
    "deviceVendor": str,
    "deviceProduct": str,
} | tls.TLS_OPTIONS


def _printable(text: str, limit: int) -> str:
    """RFC 5424 header fields are PRINTUSASCII (33-126), with a length limit; empty is ``-``."""
    cleaned = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def facility(options: dict) -> int:
    value = options.get("facility", "local0")
    if isinstance(value, str):
        return FACILITIES[value]
    return int(value)


def message(event: dict, options: dict, hostname: str) -> bytes:
    """One RFC 5424 message carrying the event as CEF."""
    record = cef.format_event(
        event, options.get("deviceVendor", cef.VENDOR), options.get("deviceProduct", cef.PRODUCT)
    )
    pri = facility(options) * 8 + SYSLOG_SEVERITY.get(cef.severity(event.get("data")), 6)
    header = " ".join(
        (
            f"<{pri}>1",
            _printable(event.get("timestamp") or "", 64),
            _printable(options.get("hostname") or hostname, 255),
            _printable(options.get("appName", "partner-gateway"), 48),
            "-",
            _printable(event.get("type") or "", 32),
            "-",
        )
    )
    return f"{header} {record}".encode()


def frame(msg: bytes) -> bytes:
    """RFC 6587 octet counting: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(msg)).encode() + b" " + msg


class SyslogKind:
    name = "syslog"
    schemes = ("tcp", "tls")
    uses_secret = False
    secret_hint = "a syslog destination takes no secret"

    def check(self, url: str, options: dict) -> None:
        tls.check_options(options, OPTIONS, self.name)
        parts = urlsplit(url)
        if parts.path not in ("", "/") or parts.query:
            raise ValueError("a syslog URL is tcp://host:port or tls://host:port, without a path or query")
        tls.check_tls(options, parts.scheme.lower() == "tls")
        value = options.get("facility")
        if value is not None and not (
            (isinstance(value, str) and value in FACILITIES)
            or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 23)
        ):
            raise ValueError("option 'facility' must be 0-23 or a name such as 'local0' or 'authpriv'")

    def new_secret(self) -> None:
        return None

    def valid_secret(self, value: str) -> bool:
        return False

    def deliver(self, target: Target, message_id: str, events: list[dict]) -> Outcome:
        started = time.monotonic()
        parts = urlsplit(target.url)
        scheme = parts.scheme.lower()
        port = parts.port or DEFAULT_PORTS[scheme]
        data = b"".join(frame(message(event, target.options, _hostname())) for event in events)
        try:
            kinds.check_resolved(target.url, target.allow_private)
            with socket.create_connection((parts.hostname, port), timeout=target.timeout) as raw:
                if scheme == "tls":
                    server_name = target.options.get("serverName") or parts.hostname
                    with tls.context(target.options).wrap_socket(raw, server_hostname=server_name) as sock:
                        sock.sendall(data)
                else:
                    raw.sendall(data)
        except TargetRefused as exc:
            return Outcome(False, error=f"refused: {exc}", duration_ms=_ms(started))
        except TimeoutError:
            return Outcome(False, error=f"no connection within {target.timeout:g}s", duration_ms=_ms(started))
        except OSError as exc:  # refused, reset, a TLS failure (ssl.SSLError is an OSError)
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
            return Outcome(False, error=f"syslog connection failed: {reason}"[:500], duration_ms=_ms(started))
        return Outcome(True, duration_ms=_ms(started), response_excerpt=f"{len(events)} messages sent")


def _hostname() -> str:
    return socket.gethostname()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


kinds.register(SyslogKind())
