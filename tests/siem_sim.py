"""Loopback SIEM simulators for the export tests: a Splunk HTTP Event Collector and a syslog
collector (TCP or TLS), each checking what it receives the way the real ones do.

* :class:`HecCollector` serves ``POST /services/collector/event``: it checks
  ``Authorization: Splunk <token>`` (401 code 4 ``Invalid token`` / code 2 ``Token is required``),
  parses the body as concatenated HEC event objects (400 code 6 ``Invalid data format``, code 12
  ``Event field is required``), and with ``ack=True`` requires ``X-Splunk-Request-Channel`` (400
  code 10) and answers an ``ackId`` which ``POST /services/collector/ack?channel=`` reports
  indexed after ``ack_after`` polls.  ``respond`` may answer a request otherwise (503, 429...).
* :class:`SyslogCollector` accepts TCP (or TLS) connections, splits the stream into RFC 6587
  octet-counted frames, parses each RFC 5424 header and the CEF record in it
  (:func:`parse_cef`, an independent reading of the CEF escaping rules).
* :func:`make_certificates` makes a CA and a server certificate for ``127.0.0.1`` (cryptography).
* :func:`with_jetstream` runs a coroutine on a JetStream context of a real NATS server.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# -- Splunk HEC ------------------------------------------------------------------------------------------


@dataclass
class HecRequest:
    path: str
    headers: dict
    body: bytes
    status: int = 0
    items: list = field(default_factory=list)  # the HEC event objects, when the body parsed


def parse_hec_batch(body: bytes) -> list[dict]:
    """Concatenated JSON objects (whitespace between them allowed), as the collector reads them."""
    text, decoder, items, at = body.decode(), json.JSONDecoder(), [], 0
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at == len(text):
            return items
        item, at = decoder.raw_decode(text, at)
        if not isinstance(item, dict):
            raise ValueError("not an object")
        items.append(item)


class HecCollector:
    def __init__(
        self,
        token: str,
        ack: bool = False,
        ack_after: int = 0,
        port: int | None = None,
        respond: Callable[[HecRequest], tuple[int, dict, dict] | None] | None = None,
        certificate: tuple[str, str] | None = None,
        client_ca: str | None = None,
    ) -> None:
        self.token, self.ack, self.ack_after = token, ack, ack_after
        self.respond = respond or (lambda request: None)
        self.requests: list[HecRequest] = []
        self.indexed: list[dict] = []  # the items of acknowledged (or, without ack, accepted) requests
        self.polls: dict[int, int] = {}
        self.pending: dict[int, list[dict]] = {}
        self.next_ack = 0
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps connections open, as Splunk does
            disable_nagle_algorithm = True  # else each answer's body waits for the headers' ACK (40 ms)

            def do_POST(self):  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length") or 0)
                collector._handle(self, self.rfile.read(length))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if certificate:  # HTTPS; with ``client_ca``, only for a client certificate that CA signed
            context = server_context(certificate, client_ca)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _answer(self, handler, status: int, body: dict, headers: dict | None = None) -> int:
        data = json.dumps(body).encode()
        try:
            handler.send_response(status)
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass
        return status

    def _handle(self, handler, body: bytes) -> None:
        parts = urlsplit(handler.path)
        request = HecRequest(parts.path, {k.lower(): v for k, v in handler.headers.items()}, body)
        with self.lock:
            self.requests.append(request)
        request.status = self._serve(handler, request, parse_qs(parts.query))

    def _serve(self, handler, request: HecRequest, query: dict) -> int:
        auth = request.headers.get("authorization", "")
        if not auth:
            return self._answer(handler, 401, {"text": "Token is required", "code": 2})
        if auth != f"Splunk {self.token}":
            return self._answer(
                handler, 401 if auth.startswith("Splunk ") else 401, {"text": "Invalid token", "code": 4}
            )
        special = self.respond(request)
        if special is not None:
            status, answer, headers = special
            return self._answer(handler, status, answer, headers)
        channel = request.headers.get("x-splunk-request-channel")
        if request.path == "/services/collector/ack":
            if not self.ack:
                return self._answer(handler, 400, {"text": "ACK is disabled", "code": 14})
            if not channel or query.get("channel", [channel])[0] != channel:
                return self._answer(handler, 400, {"text": "Data channel is missing", "code": 10})
            acks = {}
            for ack_id in json.loads(request.body or b"{}").get("acks", []):
                with self.lock:
                    self.polls[ack_id] = self.polls.get(ack_id, 0) + 1
                    done = ack_id not in self.pending or self.polls[ack_id] > self.ack_after
                    if done and ack_id in self.pending:
                        self.indexed.extend(self.pending.pop(ack_id))
                acks[str(ack_id)] = done
            return self._answer(handler, 200, {"acks": acks})
        if request.path != "/services/collector/event":
            return self._answer(handler, 404, {"text": "The requested URL was not found", "code": 404})
        if self.ack and not channel:
            return self._answer(handler, 400, {"text": "Data channel is missing", "code": 10})
        try:
            items = parse_hec_batch(request.body)
        except ValueError:
            return self._answer(handler, 400, {"text": "Invalid data format", "code": 6})
        if not items:
            return self._answer(handler, 400, {"text": "No data", "code": 5})
        for index, item in enumerate(items):
            if "event" not in item:
                return self._answer(
                    handler,
                    400,
                    {"text": "Event field is required", "code": 12, "invalid-event-number": index},
                )
            if item["event"] in ("", None):
                return self._answer(
                    handler,
                    400,
                    {"text": "Event field cannot be blank", "code": 13, "invalid-event-number": index},
                )
        request.items = items
        with self.lock:
            if self.ack:
                ack_id, self.next_ack = self.next_ack, self.next_ack + 1
                self.pending[ack_id] = items
                return self._answer(handler, 200, {"text": "Success", "code": 0, "ackId": ack_id})
            self.indexed.extend(items)
        return self._answer(handler, 200, {"text": "Success", "code": 0})

    def events(self) -> list[dict]:
        """The gateway events inside what was indexed, in order."""
        with self.lock:
            return [item["event"] for item in self.indexed]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- syslog + CEF ---------------------------------------------------------------------------------------

HEADER = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) (?P<procid>\S+) "
    r"(?P<msgid>\S+) (?P<sd>-|\[.*?\]) (?P<msg>.*)$",
    re.DOTALL,
)
EXT_KEY = re.compile(r"[A-Za-z0-9_.\[\]-]+")


@dataclass
class SyslogMessage:
    raw: bytes
    pri: int
    timestamp: str
    hostname: str
    app: str
    msgid: str
    msg: str
    cef: dict | None


def _unescape(text: str, header: bool) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            n = text[i + 1]
            if header and n in "\\|":
                out.append(n)
            elif not header and n in "\\=":
                out.append(n)
            elif not header and n == "n":
                out.append("\n")
            elif not header and n == "r":
                out.append("\r")
            else:
                raise ValueError(f"bad escape \\{n}")
            i += 2
            continue
        if header and c == "|":
            raise ValueError("an unescaped | inside a header field")
        if not header and c == "=":
            raise ValueError("an unescaped = inside an extension value")
        out.append(c)
        i += 1
    return "".join(out)


def parse_cef(text: str) -> dict:
    """``{"version", "vendor", "product", "deviceVersion", "signature", "name", "severity", "ext": {}}``;
    ``ValueError`` when the record is not well-formed CEF (an unescaped ``=`` in a value, a bad escape)."""
    if not text.startswith("CEF:"):
        raise ValueError("not CEF")
    fields, current, i = [], [], 0
    while len(fields) < 7:  # the seven header fields end at unescaped pipes
        if i >= len(text):
            raise ValueError("too few header fields")
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if c == "|":
            fields.append(_unescape("".join(current), header=True))
            current = []
        else:
            current.append(c)
        i += 1
    rest = text[i:]
    if "\n" in rest or "\r" in rest:
        raise ValueError("a raw newline in the extension")
    ext: dict[str, str] = {}
    # every unescaped '=' ends a key (values escape theirs); the key is the word before it
    separators = [i for i, c in enumerate(rest) if c == "=" and not _escaped(rest, i)]
    keys = [(rest.rfind(" ", 0, i) + 1, i) for i in separators]
    for index, (start, at) in enumerate(keys):
        key = rest[start:at]
        if not EXT_KEY.fullmatch(key):
            raise ValueError(f"bad extension key {key!r}")
        end = keys[index + 1][0] - 1 if index + 1 < len(keys) else len(rest)
        ext[key] = _unescape(rest[at + 1 : end], header=False)
    version = fields[0][len("CEF:") :]
    return {
        "version": version,
        "vendor": fields[1],
        "product": fields[2],
        "deviceVersion": fields[3],
        "signature": fields[4],
        "name": fields[5],
        "severity": int(fields[6]),
        "ext": ext,
    }


def _escaped(text: str, at: int) -> bool:
    """Whether the character at ``at`` is preceded by an odd number of backslashes."""
    count, i = 0, at - 1
    while i >= 0 and text[i] == "\\":
        count += 1
        i -= 1
    return count % 2 == 1


def split_frames(buffer: bytearray) -> list[bytes]:
    """Take the complete octet-counted frames off the front of ``buffer``."""
    frames = []
    while True:
        space = buffer.find(b" ")
        if space < 0:
            return frames
        length_text = bytes(buffer[:space])
        if not length_text.isdigit() or length_text.startswith(b"0"):
            raise ValueError(f"bad frame length {length_text[:20]!r}")
        length = int(length_text)
        if len(buffer) < space + 1 + length:
            return frames
        frames.append(bytes(buffer[space + 1 : space + 1 + length]))
        del buffer[: space + 1 + length]


def parse_syslog(raw: bytes) -> SyslogMessage:
    match = HEADER.match(raw.decode())
    if not match:
        raise ValueError(f"not an RFC 5424 message: {raw[:80]!r}")
    msg = match.group("msg")
    return SyslogMessage(
        raw,
        int(match.group("pri")),
        match.group("timestamp"),
        match.group("hostname"),
        match.group("app"),
        match.group("msgid"),
        msg,
        parse_cef(msg) if msg.startswith("CEF:") else None,
    )


class SyslogCollector:
    """A syslog collector on loopback TCP (or TLS with ``certificate=(cert_file, key_file)``)."""

    def __init__(
        self,
        port: int | None = None,
        certificate: tuple[str, str] | None = None,
        client_ca: str | None = None,
    ) -> None:
        self.messages: list[SyslogMessage] = []
        # (connection number, arrival) of each message: connections are read by threads of their own, so
        # messages are listed in the order the sender sent them (connection by connection), not as read
        self._order: list[tuple[int, int]] = []
        self.errors: list[str] = []
        self.connections = 0
        self.live: set[socket.socket] = set()  # open connections, closed by stop() as a real collector's
        self.lock = threading.Condition()
        self.context = None
        self.peers: list[dict] = []  # the client certificates presented (mutual TLS)
        if certificate:
            self.context = server_context(certificate, client_ca)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port or 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"{'tls' if certificate else 'tcp'}://127.0.0.1:{self.port}"
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        accepted = 0
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            accepted += 1
            with self.lock:
                self.live.add(conn)
            threading.Thread(target=self._read, args=(conn, accepted), daemon=True).start()

    def _read(self, conn: socket.socket, number: int = 0) -> None:
        buffer = bytearray()
        try:
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            with self.lock:
                self.connections += 1
                if self.context is not None and conn.getpeercert():
                    self.peers.append(conn.getpeercert())
            conn.settimeout(30)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                buffer.extend(data)
                for frame in split_frames(buffer):
                    message = parse_syslog(frame)
                    with self.lock:
                        self.messages.append(message)
                        self._order.append((number, len(self._order)))
                        self.lock.notify_all()
            if buffer:
                raise ValueError(f"{len(buffer)} bytes left after the last frame")
        except (OSError, ValueError) as exc:
            with self.lock:
                if self.running:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    def events(self) -> list[SyslogMessage]:
        with self.lock:
            return [self.messages[index] for _, index in sorted(self._order)]

    def drop_connections(self) -> None:
        """Close the open connections (what a restart does to its senders)."""
        with self.lock:
            live, self.live = list(self.live), set()
        for conn in live:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.running = False
        self.sock.close()
        self.drop_connections()


def make_certificates(directory) -> dict:
    """A CA, and a server certificate it signs for 127.0.0.1 / localhost: PEM files and the CA's PEM."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, server_key = key(), key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test SIEM CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siem.test")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("siem.test"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(server.public_bytes(pem))
    key_file.write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    client_key = key()  # a client certificate (mutual TLS) the same CA signs
    client = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "partner-gateway")]))
        .issuer_name(ca_name)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "cert": str(cert_file),
        "key": str(key_file),
        "ca_pem": ca.public_bytes(pem).decode(),
        "client_cert_pem": client.public_bytes(pem).decode(),
        "client_key_pem": client_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
    }


def server_context(certificate: tuple[str, str], client_ca: str | None = None) -> ssl.SSLContext:
    """A server TLS context; with ``client_ca`` (PEM) it requires a client certificate that CA signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    if client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=client_ca)
    return context


async def with_jetstream(url: str, action):
    """``await action(jetstream)`` on a fresh connection to the NATS server at ``url``, then close it."""
    import nats

    connection = await nats.connect(url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0)
    try:
        return await action(connection.jetstream())
    finally:
        await connection.close()
