"""A webhook receiver on a real loopback socket, verifying every delivery with ``standardwebhooks``."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Delivery:
    """One request as the receiver saw it, and what the verification said."""

    headers: dict
    body: bytes
    verified: bool
    error: str | None
    status: int
    payload: object = None
    verified_by: list[str] = field(default_factory=list)  # which of the known secrets verify it
    peer: tuple | None = None  # the sender's (address, port): one per TCP connection

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def events(self) -> list[dict]:
        if isinstance(self.payload, dict) and self.payload.get("type") == "batch":
            return self.payload["data"]
        return [self.payload] if isinstance(self.payload, dict) else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Receiver:
    """Answers each verified delivery with ``respond(delivery) -> (status, headers)`` (200 by default);
    a delivery that does not verify is answered 400 and not counted as received."""

    def __init__(
        self,
        secrets: list[str] | None = None,
        port: int | None = None,
        respond: Callable[[Delivery], tuple[int, dict]] | None = None,
    ) -> None:
        self.secrets = list(secrets or [])
        self.respond = respond or (lambda delivery: (200, {}))
        self.deliveries: list[Delivery] = []
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps connections open, as real receivers do
            disable_nagle_algorithm = True  # else each answer's body waits for the headers' ACK (40 ms)

            def do_POST(self):  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                receiver._handle(self, body)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def verify(self, body: bytes, headers: dict) -> tuple[bool, str | None, object, list[str]]:
        payload, error, verified_by = None, "no secret to verify with", []
        for secret in self.secrets:
            try:
                payload = Webhook(secret).verify(body, headers)
                verified_by.append(secret)
            except WebhookVerificationError as exc:
                error = str(exc)
        return bool(verified_by), (None if verified_by else error), payload, verified_by

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        verified, error, payload, verified_by = self.verify(body, headers)
        delivery = Delivery(headers, body, verified, error, 400, payload, verified_by, handler.client_address)
        status, extra = self.respond(delivery) if verified else (400, {})
        delivery.status = status
        with self.arrived:
            self.deliveries.append(delivery)
            self.arrived.notify_all()
        answer = json.dumps({"received": verified, "error": error}).encode()
        try:
            handler.send_response(status)
            for name, value in extra.items():
                handler.send_header(name, value)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(answer)))
            handler.end_headers()
            handler.wfile.write(answer)
        except OSError:  # the sender is gone (a killed worker): it never learns the answer
            delivery.status = 599

    def accepted(self) -> list[Delivery]:
        """The deliveries that verified and were answered 2xx."""
        with self.lock:
            return [d for d in self.deliveries if d.verified and 200 <= d.status < 300]

    def events(self) -> list[dict]:
        return [event for delivery in self.accepted() for event in delivery.events]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
