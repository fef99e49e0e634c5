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

A destination keeps one connection (TCP, or TLS once the handshake is done) open between its
deliveries, per worker thread: a delivery writes the frames of its events in order on it and counts
as delivered when every byte was written (syslog over TCP has no acknowledgement; ``batchSize`` > 1
writes several events at once).  Before a kept connection is reused it is checked: a collector that
closed it (or sent anything, which a syslog collector never does: a TLS close_notify) makes the
delivery connect afresh, and so does a connection idle for ``IDLE_SECONDS``.  A write that fails on
a kept connection is retried once on a new one; a failure on a new connection is the delivery's
failure (retried with backoff), and the connection is dropped.  The address is checked against the
outbound-target rules (gateway/export/kinds.py) each time a connection is made.  As with any
syslog over TCP (RFC 6587 has no acknowledgement), frames written just as the collector goes away
can be lost without the sender learning it; a collector that must not lose any takes HEC or NATS.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import threading
import time
from urllib.parse import urlsplit

from gateway.export import cef, kinds, tls
from gateway.export.kinds import Outcome, Target, TargetRefused

DEFAULT_PORTS = {"tcp": 514, "tls": 6514}
IDLE_SECONDS = 60.0  # a kept connection unused this long is closed and made again
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
        data = b"".join(frame(message(event, target.options, _hostname())) for event in events)
        key = _key(target)
        kept = _take(key)
        try:
            if kept is not None:
                try:
                    kept.sendall(data)
                    _keep(key, kept)
                    return _sent(events, started, reused=True)
                except OSError:  # the collector dropped it meanwhile: once more on a new connection
                    _close(kept)
            kinds.check_resolved(target.url, target.allow_private)
            sock = _connect(target)
            try:
                sock.sendall(data)
            except BaseException:
                _close(sock)
                raise
            _keep(key, sock)
            return _sent(events, started, reused=False)
        except TargetRefused as exc:
            return Outcome(False, error=f"refused: {exc}", duration_ms=_ms(started))
        except TimeoutError:
            return Outcome(False, error=f"no connection within {target.timeout:g}s", duration_ms=_ms(started))
        except OSError as exc:  # refused, reset, a TLS failure (ssl.SSLError is an OSError)
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
            return Outcome(False, error=f"syslog connection failed: {reason}"[:500], duration_ms=_ms(started))


def _sent(events: list[dict], started: float, reused: bool) -> Outcome:
    how = "on the kept connection" if reused else "on a new connection"
    return Outcome(True, duration_ms=_ms(started), response_excerpt=f"{len(events)} messages sent {how}")


def _connect(target: Target) -> socket.socket:
    parts = urlsplit(target.url)
    scheme = parts.scheme.lower()
    port = parts.port or DEFAULT_PORTS[scheme]
    raw = socket.create_connection((parts.hostname, port), timeout=target.timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if scheme != "tls":
            return raw
        server_name = target.options.get("serverName") or parts.hostname
        return tls.context(target.options, target.client_key).wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


# -- kept connections (per thread: a delivery task's destination is worked by one thread) ----------------

_local = threading.local()


def _kept() -> dict:
    found = getattr(_local, "connections", None)
    if found is None:
        found = _local.connections = {}
    return found


def _key(target: Target) -> tuple:
    """A connection serves one destination with one setting (a changed URL or option connects anew)."""
    settings = json.dumps([target.url, target.options, target.client_key], sort_keys=True, default=str)
    return target.destination_id, hashlib.sha256(settings.encode()).hexdigest()


def _take(key: tuple) -> socket.socket | None:
    """The kept connection for ``key`` when it is still good (see the module's docstring)."""
    entry = _kept().pop(key, None)
    if entry is None:
        return None
    sock, used_at = entry
    if time.monotonic() - used_at > IDLE_SECONDS or not _open(sock):
        _close(sock)
        return None
    return sock


def _keep(key: tuple, sock: socket.socket) -> None:
    for other in [k for k in _kept() if k[0] == key[0] and k != key]:  # the destination's old setting
        _close(_kept().pop(other)[0])
    _kept()[key] = (sock, time.monotonic())


def _open(sock: socket.socket) -> bool:
    """Nothing to read on it: a syslog collector never writes, so readable means closed (or closing)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def close_connections() -> None:
    """Close this thread's kept connections (tests, and a worker shutting down)."""
    for sock, _ in _kept().values():
        _close(sock)
    _kept().clear()


def _hostname() -> str:
    return socket.gethostname()


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


kinds.register(SyslogKind())
