"""Loopback ServiceNow and Jira Cloud servers for the ITSM tests and benchmark (real HTTP, threads).

They speak the documented REST APIs on the calls the gateway makes, closely enough that a real client
would not notice: ServiceNow's Table API (``/api/now/table/{table}`` with ``sysparm_query``,
``sysparm_fields``, ``sysparm_limit``, ``sysparm_offset``; ``{"result": ...}`` answers; incident
states 1/2/3/6/7/8 and the data policy that Resolved needs a close code and close notes;
``{"error": {...}, "status": "failure"}`` bodies; work notes in ``sys_journal_field``; OAuth at
``/oauth_token.do``) and Jira Cloud's REST API v3 (issues, ADF descriptions, ``statusCategory``,
transitions with configurable ids, comments, issue properties, ``/search/jql`` with
``nextPageToken``; ``{"errorMessages", "errors"}`` bodies).

Faults on command, for every API call (``fault(...)`` queues some for the next calls, ``rates``
draws them at random with a seeded generator): ``429`` (with ``Retry-After``), ``500``, ``timeout``
(the answer comes after ``slow_seconds``: the client has given up, the change is made) and ``drop``
(the change is committed, then the connection is closed before any answer).  ``down = True``
answers every call 503.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

FAULTS = ("429", "500", "timeout", "drop")


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


class _Drop(Exception):
    """Close the connection without an answer (after the change was committed)."""


class Sim:
    """Common machinery: the server thread, faults, the call log."""

    def __init__(self, seed: int = 1) -> None:
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self.queued: list[tuple[str, str | None]] = []  # (fault, retry-after)
        self.rates: dict[str, float] = {}
        self.retry_after = "1"
        self.slow_seconds = 2.0
        self.down = False
        self.calls: list[tuple[str, str, int | str]] = []
        self.sent_webhooks: list[tuple[bytes, dict]] = []
        self.created: dict[str, float] = {}  # marker -> when its record was created (time.time())
        self.faults_served: dict[str, int] = {}
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # an answer is two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args):  # quiet
                pass

            def _serve(self):
                sim._handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -- webhooks: what the product sends when a person changes a record ------------------------

    def webhooks_to(self, send, secret: str | None, token: str | None = None) -> None:
        """Send webhooks with ``send(body_bytes, headers)`` (the gateway's receiver), signed with
        ``secret`` (HMAC-SHA256 of the body) or carrying a shared ``token``."""
        self.send, self.webhook_secret, self.webhook_token = send, secret, token

    def _webhook(self, payload: dict, headers: dict | None = None):
        send = getattr(self, "send", None)
        if send is None:
            return None
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        if self.webhook_secret:
            digest = hmac.new(self.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers[self.SIGNATURE_HEADER] = "sha256=" + digest
        if self.webhook_token:
            headers["X-Gateway-Token"] = self.webhook_token
        self.sent_webhooks.append((body, headers))
        return send(body, headers)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fault(self, kind: str, count: int = 1, retry_after: str | None = None) -> None:
        assert kind in FAULTS
        with self.lock:
            self.queued.extend([(kind, retry_after)] * count)

    def _draw(self) -> tuple[str | None, str | None]:
        with self.lock:
            if self.queued:
                return self.queued.pop(0)
            roll, edge = self.rng.random(), 0.0
            for kind, rate in self.rates.items():
                edge += rate
                if roll < edge:
                    return kind, None
        return None, None

    # -- HTTP plumbing ---------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if parts.path.startswith("/_sim/"):
            return self._control(h, parts.path, raw)
        api = self.is_api(parts.path)
        fault, retry_after = self._draw() if api else (None, None)
        if fault:
            with self.lock:
                self.faults_served[fault] = self.faults_served.get(fault, 0) + 1
        if api and self.down:
            return self._send(h, 503, {"error": {"message": "Service Unavailable"}, "status": "failure"})
        if fault == "429":
            return self._send(
                h,
                429,
                self.error_body(429, "Too many requests"),
                {"Retry-After": retry_after or self.retry_after},
            )
        if fault == "500":
            return self._send(h, 500, self.error_body(500, "Internal server error"))
        if fault == "timeout":
            time.sleep(self.slow_seconds)
        try:
            if api:
                user = self.authenticate(h.headers.get("Authorization", ""))
                if user is None:
                    return self._send(h, 401, self.error_body(401, "User Not Authenticated"))
            else:
                user = None
            with self.lock:
                status, body, headers = self.route(h.command, parts.path, query, raw, user)
                self.calls.append((h.command, parts.path, status))
        except _Drop:
            return self._drop(h)
        if fault == "drop":
            return self._drop(h)
        self._send(h, status, body, headers)

    def stats(self) -> dict:
        with self.lock:
            return {
                "calls": len(self.calls),
                "records": len(self.created),
                "created": dict(self.created),
                "faults": dict(self.faults_served),
                "status": {
                    str(code): sum(1 for *_, status in self.calls if status == code)
                    for code in sorted({status for *_, status in self.calls}, key=str)
                },
            }

    def _control(self, h, path: str, raw: bytes) -> None:
        """The simulator's own endpoints (``python -m tests.itsm_sim``): ``GET /_sim/stats``;
        ``POST /_sim/faults`` with ``{"rates": {...}, "retryAfter": "0", "down": false}``."""
        if path == "/_sim/stats":
            return self._send(h, 200, self.stats())
        if path == "/_sim/faults" and h.command == "POST":
            body = json.loads(raw or b"{}")
            with self.lock:
                self.rates = {k: float(v) for k, v in (body.get("rates") or {}).items() if k in FAULTS}
                self.retry_after = str(body.get("retryAfter", self.retry_after))
                self.down = bool(body.get("down", False))
            return self._send(h, 200, {"rates": self.rates, "retryAfter": self.retry_after})
        return self._send(h, 404, {"error": "no such control"})

    @staticmethod
    def _drop(h) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def _send(h, status: int, body, headers: dict | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json;charset=UTF-8")
            h.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                h.send_header(name, value)
            h.end_headers()
            if data:
                h.wfile.write(data)
        except OSError:
            pass

    @staticmethod
    def basic(header: str) -> tuple[str, str] | None:
        kind, _, value = header.partition(" ")
        if kind.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return None
        return user, password

    # overridden
    def is_api(self, path: str) -> bool: ...
    def error_body(self, status: int, message: str): ...
    def authenticate(self, header: str) -> str | None: ...
    def route(self, method, path, query, raw, user): ...


# -- ServiceNow ------------------------------------------------------------------------------------


class ServiceNowSim(Sim):
    STATES = {"1", "2", "3", "6", "7", "8"}

    def __init__(self, user: str = "gateway", password: str = "sn-password-0123456789", **kwargs) -> None:
        super().__init__(**kwargs)
        self.users = {user: password}
        self.oauth_clients: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        self.tables: dict[str, dict[str, dict]] = {
            "incident": {},
            "sn_si_incident": {},
            "sys_journal_field": {},
            "sys_user": {},
        }
        self.counter = 10000

    def is_api(self, path: str) -> bool:
        return path.startswith("/api/")

    def error_body(self, status: int, message: str):
        return {"error": {"message": message, "detail": None}, "status": "failure"}

    def authenticate(self, header: str) -> str | None:
        pair = self.basic(header)
        if pair and self.users.get(pair[0]) == pair[1]:
            return pair[0]
        kind, _, token = header.partition(" ")
        if kind.lower() == "bearer":
            return self.tokens.get(token.strip())
        return None

    @property
    def incidents(self) -> dict[str, dict]:
        return self.tables["incident"]

    SIGNATURE_HEADER = "X-Gateway-Signature"
    WEBHOOK_FIELDS = ("sys_id", "number", "state", "close_code", "assigned_to", "sys_updated_on")

    def human(self, sys_id: str, user: str = "alice", table: str = "incident", **fields):
        """A person changes the record in the UI (``work_notes``/``comments`` add journal entries);
        the table's business rule then sends its outbound REST message, the record and the new
        journal entries."""
        with self.lock:
            record = self.tables[table][sys_id]
            before = set(self.tables["sys_journal_field"])
            error = self._apply(table, record, dict(fields), user)
            assert error is None, error
            new = [e for k, e in self.tables["sys_journal_field"].items() if k not in before]
            payload = {
                # the business rule sends each field's value and display value (a reference's name)
                "record": self._display_all({k: record.get(k, "") for k in self.WEBHOOK_FIELDS}),
                "journal": [
                    {k: e[k] for k in ("sys_id", "element", "value", "sys_created_by", "sys_created_on")}
                    for e in new
                ],
            }
        return self._webhook(payload)

    def journal(self, sys_id: str, element: str | None = None) -> list[dict]:
        with self.lock:
            return [
                e
                for e in self.tables["sys_journal_field"].values()
                if e["element_id"] == sys_id and (element is None or e["element"] == element)
            ]

    def route(self, method, path, query, raw, user):
        if path == "/oauth_token.do" and method == "POST":
            form = {k: v[-1] for k, v in parse_qs(raw.decode()).items()}
            if form.get("grant_type") != "client_credentials" or self.oauth_clients.get(
                form.get("client_id", "")
            ) != form.get("client_secret"):
                return 401, {"error_description": "access_denied", "error": "server_error"}, {}
            token = uuid.uuid4().hex
            self.tokens[token] = form["client_id"]
            return (
                200,
                {"access_token": token, "token_type": "Bearer", "expires_in": 1799, "scope": "useraccount"},
                {},
            )
        match = re.fullmatch(r"/api/now/table/([A-Za-z0-9_]+)(?:/([0-9a-f]{32}))?", path)
        if not match:
            return 400, self.error_body(400, "Requested URI does not represent any resource"), {}
        table, sys_id = match.groups()
        if table not in self.tables:
            return 400, self.error_body(400, f"Invalid table {table}"), {}
        rows = self.tables[table]
        fields = [f for f in (query.get("sysparm_fields") or "").split(",") if f]
        if method == "GET" and sys_id is None:
            found = [r for r in rows.values() if self._matches(r, query.get("sysparm_query", ""))]
            order = re.findall(r"ORDERBY(DESC)?([a-z_]+)", query.get("sysparm_query", ""))
            for desc, field in reversed(order):
                found.sort(key=lambda r: r.get(field, ""), reverse=bool(desc))
            offset = int(query.get("sysparm_offset") or 0)
            limit = int(query.get("sysparm_limit") or 10000)
            page = found[offset : offset + limit]
            shown = [self._fields(r, fields) for r in page]
            if query.get("sysparm_display_value") == "all":
                shown = [self._display_all(r) for r in shown]
            return (
                200,
                {"result": shown},
                {"X-Total-Count": str(len(found))},
            )
        if sys_id is not None and sys_id not in rows:
            return (
                404,
                {
                    "error": {
                        "message": "No Record found",
                        "detail": "Record doesn't exist or ACL restricts the record retrieval",
                    },
                    "status": "failure",
                },
                {},
            )
        if method == "GET":
            return 200, {"result": self._fields(rows[sys_id], fields)}, {}
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return 400, self.error_body(400, "Exception while reading request"), {}
        if not isinstance(body, dict):
            return 400, self.error_body(400, "Exception while reading request"), {}
        if method == "POST" and sys_id is None:
            record = {
                "sys_id": uuid.uuid4().hex,
                "sys_created_on": stamp(),
                "sys_created_by": user or "",
                "state": "1",
                "active": "true",
                "assigned_to": "",
                "close_code": "",
                "close_notes": "",
                "correlation_id": "",
                "correlation_display": "",
            }
            if table in ("incident", "sn_si_incident"):
                self.counter += 1
                record["number"] = ("INC" if table == "incident" else "SIR") + f"{self.counter:07d}"
            error = self._apply(table, record, body, user)
            if error:
                return error
            rows[record["sys_id"]] = record
            if record.get("correlation_id"):
                self.created[record["correlation_id"]] = time.time()
            return (
                201,
                {"result": self._fields(record, fields)},
                {"Location": f"{self.url}/api/now/table/{table}/{record['sys_id']}"},
            )
        if method in ("PATCH", "PUT"):
            record = rows[sys_id]  # changed in place, and only when the change is valid
            error = self._apply(table, record, body, user)
            if error:
                return error
            return 200, {"result": self._fields(record, fields)}, {}
        return 405, self.error_body(405, "Method not Supported"), {}

    def _apply(self, table, record, body, user):
        notes = {k: body.pop(k) for k in ("work_notes", "comments") if k in body}
        changes = {k: "" if v is None else str(v) for k, v in body.items() if not k.startswith("sys_")}
        merged = {**record, **changes}
        if "state" in changes and changes["state"] not in self.STATES:
            return 400, self.error_body(400, f"Invalid state {changes['state']}"), {}
        if (
            merged.get("state") == "6"
            and record.get("state") != "6"
            and not (merged.get("close_code") and merged.get("close_notes"))
        ):
            return (
                403,
                {
                    "error": {
                        "message": "Operation Failed",
                        "detail": "Data Policy Exception: \n\tThe "
                        "following fields are mandatory: Resolution code, Resolution notes",
                    },
                    "status": "failure",
                },
                {},
            )
        if merged.get("state") in ("6", "7") and record.get("state") not in ("6", "7"):
            merged["resolved_at"] = stamp()
        if merged.get("state") not in ("6", "7", "8"):
            merged["active"] = "true"
        else:
            merged["active"] = "false"
        merged["sys_updated_on"] = stamp()
        merged["sys_updated_by"] = user or ""
        merged["sys_mod_count"] = str(int(record.get("sys_mod_count") or -1) + 1)
        record.clear()
        record.update(merged)
        for element, value in notes.items():
            if value:
                entry = {
                    "sys_id": uuid.uuid4().hex,
                    "element": element,
                    "element_id": record["sys_id"],
                    "name": table,
                    "value": str(value),
                    "sys_created_on": stamp(),
                    "sys_created_by": user or "",
                }
                self.tables["sys_journal_field"][entry["sys_id"]] = entry
        return None

    def _display_all(self, record: dict) -> dict:
        """``sysparm_display_value=all``: each field as its value and its display value (a reference
        to ``sys_user`` shows the user's name, a state its label)."""
        out = {}
        for name, value in record.items():
            shown = value
            if name in ("assigned_to", "caller_id") and value in self.tables["sys_user"]:
                shown = self.tables["sys_user"][value].get("name", value)
            elif name == "state":
                shown = {
                    "1": "New",
                    "2": "In Progress",
                    "3": "On Hold",
                    "6": "Resolved",
                    "7": "Closed",
                    "8": "Canceled",
                }.get(value, value)
            out[name] = {"display_value": shown, "value": value}
        return out

    def user(self, name: str, user_name: str | None = None) -> str:
        """A ``sys_user`` record (a person to assign): its sys_id."""
        sys_id = uuid.uuid4().hex
        self.tables["sys_user"][sys_id] = {"sys_id": sys_id, "name": name, "user_name": user_name or name}
        return sys_id

    @staticmethod
    def _fields(record: dict, fields: list[str]) -> dict:
        return {k: record.get(k, "") for k in fields} if fields else dict(record)

    @staticmethod
    def _matches(record: dict, query: str) -> bool:
        for term in query.split("^"):
            if not term or term.startswith("ORDERBY"):
                continue
            for op in (">=", "<=", "!=", "STARTSWITH", "LIKE", "IN", ">", "<", "="):
                field, sep, value = term.partition(op)
                if sep and re.fullmatch(r"[a-z_.]+", field):
                    break
            else:
                return False
            have = str(record.get(field, ""))
            ok = {
                ">=": have >= value,
                "<=": have <= value,
                "!=": have != value,
                ">": have > value,
                "<": have < value,
                "=": have == value,
                "LIKE": value in have,
                "STARTSWITH": have.startswith(value),
                "IN": have in value.split(","),
            }[op]
            if not ok:
                return False
        return True


# -- Jira Cloud ------------------------------------------------------------------------------------

DEFAULT_WORKFLOW = {
    "statuses": {"10000": ("To Do", "new"), "3": ("In Progress", "indeterminate"), "10001": ("Done", "done")},
    "transitions": [("11", "To Do", "10000"), ("21", "In Progress", "3"), ("31", "Done", "10001")],
}


class JiraSim(Sim):
    def __init__(
        self,
        email: str = "bot@example.com",
        token: str = "jira-api-token-0123456789",
        projects=("SEC",),
        workflow: dict | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.accounts = {email: token}
        self.bearer: set[str] = set()
        self.projects = {
            key: {"id": str(10000 + i), "key": key, "name": key} for i, key in enumerate(projects)
        }
        self.workflow = workflow or DEFAULT_WORKFLOW
        self.issues: dict[str, dict] = {}
        self.by_id: dict[str, str] = {}
        self.comments: dict[str, list[dict]] = {}
        self.properties: dict[str, dict] = {}
        self.counter = 10000
        self.priorities = ["Highest", "High", "Medium", "Low", "Lowest"]

    def is_api(self, path: str) -> bool:
        return path.startswith("/rest/")

    def error_body(self, status: int, message: str):
        return {"errorMessages": [message], "errors": {}}

    def authenticate(self, header: str) -> str | None:
        pair = self.basic(header)
        if pair and self.accounts.get(pair[0]) == pair[1]:
            return pair[0]
        kind, _, token = header.partition(" ")
        if kind.lower() == "bearer" and token.strip() in self.bearer:
            return "bearer"
        return None

    SIGNATURE_HEADER = "X-Hub-Signature"

    def _event(self, key: str, event: str, user: str, comment: dict | None = None, changelog=None):
        issue = self.issues[key]
        payload = {
            "timestamp": int(time.time() * 1000),
            "webhookEvent": event,
            "issue_event_type_name": "issue_generic" if event == "jira:issue_updated" else "issue_commented",
            "user": {"emailAddress": user, "displayName": user},
            "issue": {
                "id": issue["id"],
                "key": key,
                "self": f"{self.url}/rest/api/3/issue/{issue['id']}",
                "fields": json.loads(json.dumps(issue["fields"])),
            },
        }
        if comment is not None:
            payload["comment"] = comment
        if changelog:
            payload["changelog"] = {"id": str(uuid.uuid4().int % 10**6), "items": changelog}
        return self._webhook(payload, {"X-Atlassian-Webhook-Identifier": uuid.uuid4().hex})

    def assign(self, key: str, email: str | None, user: str = "alice@example.com"):
        with self.lock:
            issue = self.issues[key]
            issue["fields"]["assignee"] = (
                {
                    "accountId": uuid.uuid5(uuid.NAMESPACE_DNS, email).hex[:24],
                    "emailAddress": email,
                    "displayName": email.split("@")[0].title(),
                }
                if email
                else None
            )
            self._touch(issue)
        return self._event(key, "jira:issue_updated", user, changelog=[{"field": "assignee"}])

    def move(self, key: str, status_id: str, resolution: str | None = None, user: str = "alice@example.com"):
        with self.lock:
            issue = self.issues[key]
            issue["fields"]["status"] = self.status(status_id)
            done = self.status(status_id)["statusCategory"]["key"] == "done"
            issue["fields"]["resolution"] = {"name": resolution or "Done"} if done else None
            self._touch(issue)
        return self._event(key, "jira:issue_updated", user, changelog=[{"field": "status"}])

    def add_comment(self, key: str, text: str, user: str = "alice@example.com"):
        from gateway.itsm.clients import adf

        with self.lock:
            comment = {
                "id": str(len(self.comments.get(key, [])) + 10000),
                "body": adf(text),
                "author": {"emailAddress": user, "displayName": user},
                "created": datetime.now(UTC).isoformat(),
            }
            self.comments.setdefault(key, []).append(comment)
            self._touch(self.issues[key])
        return self._event(key, "comment_created", user, comment=comment)

    def status(self, status_id: str) -> dict:
        name, category = self.workflow["statuses"][status_id]
        return {"id": status_id, "name": name, "statusCategory": {"key": category, "name": category}}

    def category(self, key: str) -> str:
        return self.issues[key]["fields"]["status"]["statusCategory"]["key"]

    def _issue(self, ref: str) -> dict | None:
        key = self.by_id.get(ref, ref)
        return self.issues.get(key)

    def _touch(self, issue: dict) -> None:
        issue["fields"]["updated"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"

    def route(self, method, path, query, raw, user):
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return 400, self.error_body(400, "Unexpected character in the JSON body"), {}
        if path == "/rest/api/3/myself" and method == "GET":
            return 200, {"accountId": "5b10ac8d82e05b22cc7d4ef5", "emailAddress": user, "active": True}, {}
        m = re.fullmatch(r"/rest/api/3/project/([^/]+)", path)
        if m and method == "GET":
            project = self.projects.get(m.group(1))
            if project is None:
                return 404, self.error_body(404, f"No project could be found with key '{m.group(1)}'."), {}
            return 200, project, {}
        if path == "/rest/api/3/issue" and method == "POST":
            return self._create(body, user)
        if path == "/rest/api/3/search/jql" and method == "POST":
            return self._search(body)
        m = re.fullmatch(r"/rest/api/3/issue/([^/]+)(/transitions|/comment|/properties/[^/]+)?", path)
        if not m:
            return 404, self.error_body(404, "Not found"), {}
        issue = self._issue(m.group(1))
        if issue is None:
            return (
                404,
                self.error_body(404, "Issue does not exist or you do not have permission to see it."),
                {},
            )
        key, sub = issue["key"], m.group(2) or ""
        if sub == "" and method == "GET":
            wanted = [f for f in (query.get("fields") or "").split(",") if f]
            fields = {k: v for k, v in issue["fields"].items() if not wanted or k in wanted}
            return (
                200,
                {
                    "id": issue["id"],
                    "key": key,
                    "self": f"{self.url}/rest/api/3/issue/{issue['id']}",
                    "fields": fields,
                },
                {},
            )
        if sub == "" and method == "PUT":
            fields = body.get("fields") or {}
            priority = (fields.get("priority") or {}).get("name")
            if "priority" in fields and priority not in self.priorities:
                return 400, {"errorMessages": [], "errors": {"priority": "Specify a valid priority."}}, {}
            issue["fields"].update(fields)
            self._touch(issue)
            return 204, None, {}
        if sub == "/transitions" and method == "GET":
            current = issue["fields"]["status"]["id"]
            return (
                200,
                {
                    "transitions": [
                        {
                            "id": tid,
                            "name": name,
                            "to": self.status(to),
                            "hasScreen": False,
                            "isAvailable": True,
                        }
                        for tid, name, to in self.workflow["transitions"]
                        if to != current
                    ]
                },
                {},
            )
        if sub == "/transitions" and method == "POST":
            tid = str((body.get("transition") or {}).get("id"))
            target = next((to for t, _, to in self.workflow["transitions"] if t == tid), None)
            if target is None or target == issue["fields"]["status"]["id"]:
                return (
                    400,
                    {"errorMessages": [f"Transition id '{tid}' is not valid for this issue."], "errors": {}},
                    {},
                )
            issue["fields"]["status"] = self.status(target)
            issue["fields"]["resolution"] = (
                {"name": "Done"} if self.status(target)["statusCategory"]["key"] == "done" else None
            )
            self._touch(issue)
            return 204, None, {}
        if sub == "/comment" and method == "GET":
            comments = self.comments.get(key, [])
            return (
                200,
                {"startAt": 0, "maxResults": len(comments), "total": len(comments), "comments": comments},
                {},
            )
        if sub == "/comment" and method == "POST":
            comment = {
                "id": str(len(self.comments.get(key, [])) + 10000),
                "body": body.get("body"),
                "author": {"emailAddress": user, "displayName": user},
                "created": datetime.now(UTC).isoformat(),
            }
            self.comments.setdefault(key, []).append(comment)
            self._touch(issue)
            return 201, comment, {}
        if sub.startswith("/properties/"):
            name = sub.split("/", 2)[2]
            if method == "GET":
                value = self.properties.get(key, {}).get(name)
                if value is None:
                    return 404, self.error_body(404, "The property was not found."), {}
                return 200, {"key": name, "value": value}, {}
            if method == "PUT":
                self.properties.setdefault(key, {})[name] = body
                return 200, None, {}
        return 405, self.error_body(405, "Method not allowed"), {}

    def _create(self, body, user):
        fields = dict(body.get("fields") or {})
        errors = {}
        project = self.projects.get((fields.get("project") or {}).get("key"))
        if project is None:
            errors["project"] = "Specify a valid project ID or key"
        if not fields.get("summary"):
            errors["summary"] = "You must specify a summary of the issue."
        if "priority" in fields and (fields["priority"] or {}).get("name") not in self.priorities:
            errors["priority"] = "Specify a valid priority."
        description = fields.get("description")
        if description is not None and not (
            isinstance(description, dict) and description.get("type") == "doc"
        ):
            errors["description"] = "Operation value must be an Atlassian Document."
        if errors:
            return 400, {"errorMessages": [], "errors": errors}, {}
        self.counter += 1
        key = f"{project['key']}-{self.counter - 10000}"
        first = next(sid for sid, (_, cat) in self.workflow["statuses"].items() if cat == "new")
        fields.update(
            status=self.status(first),
            created=datetime.now(UTC).isoformat(),
            assignee=None,
            reporter={"emailAddress": user},
            resolution=None,
        )
        issue = {"id": str(self.counter), "key": key, "fields": fields}
        self._touch(issue)
        self.issues[key] = issue
        for label in fields.get("labels") or []:
            if str(label).startswith("gw-"):
                self.created[label] = time.time()
        self.by_id[issue["id"]] = key
        for prop in body.get("properties") or []:
            self.properties.setdefault(key, {})[prop["key"]] = prop["value"]
        return 201, {"id": issue["id"], "key": key, "self": f"{self.url}/rest/api/3/issue/{issue['id']}"}, {}

    def _search(self, body):
        jql = str(body.get("jql") or "")
        order = re.search(r"\s+ORDER BY\s+(\w+)\s*(ASC|DESC)?\s*$", jql, re.I)
        if order:
            jql = jql[: order.start()]
        terms = [t.strip() for t in re.split(r"\s+AND\s+", jql, flags=re.I) if t.strip()]
        found = list(self.issues.values())
        for term in terms:
            m = re.fullmatch(r'(\w+)\s*(>=|<=|=|>|<|!=)\s*"?([^"]*)"?', term)
            if not m:
                return 400, {"errorMessages": [f"Error in the JQL Query: '{term}'"], "errors": {}}, {}
            field, op, value = m.groups()
            found = [i for i in found if self._jql(i, field, op, value)]
        if order:
            found.sort(
                key=lambda i: str(i["fields"].get(order.group(1).lower(), "")),
                reverse=(order.group(2) or "").upper() == "DESC",
            )
        start = int(body.get("nextPageToken") or 0)
        size = int(body.get("maxResults") or 50)
        page = found[start : start + size]
        wanted = body.get("fields") or []
        out = {
            "issues": [
                {
                    "id": i["id"],
                    "key": i["key"],
                    "fields": {k: v for k, v in i["fields"].items() if k in wanted},
                }
                for i in page
            ],
            "isLast": start + size >= len(found),
        }
        if not out["isLast"]:
            out["nextPageToken"] = str(start + size)
        return 200, out, {}

    @staticmethod
    def _jql(issue: dict, field: str, op: str, value: str) -> bool:
        fields = issue["fields"]
        if field == "labels":
            return (value in (fields.get("labels") or [])) == (op == "=")
        if field == "project":
            return issue["key"].split("-")[0] == value
        if field in ("updated", "created"):
            have = fields.get(field, "")[:16].replace("T", " ")
            return {
                ">=": have >= value,
                ">": have > value,
                "<=": have <= value,
                "<": have < value,
                "=": have == value,
                "!=": have != value,
            }[op]
        return False


def main() -> None:
    """Serve one simulator in this process until killed; print its URL as the first line."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="A loopback ServiceNow or Jira (tests/itsm_sim.py).")
    parser.add_argument("kind", choices=("servicenow", "jira"))
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sim = ServiceNowSim(seed=args.seed) if args.kind == "servicenow" else JiraSim(seed=args.seed)
    print(sim.url, flush=True)
    try:
        sim.thread.join()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
