"""Clients of the ITSM systems the gateway opens tickets in: ServiceNow's Table API and Jira Cloud's
REST API v3.  Every call goes through one ``requests.Session`` with a connect and a read timeout, and
is made once: retrying is the caller's decision (gateway/itsm/deliver.py), because only it knows
whether a call is safe to repeat (a create is repeated only after looking the record up).

A failed call raises :class:`RemoteError`, which says whether a retry may succeed (a timeout, a lost
connection, 429, 5xx: ``retryable``, with the server's ``Retry-After``), whether the whole connection
is at fault (401: bad credentials, ``connection_level``), or neither (a 4xx about this record: a bad
field, a missing project, a data policy), and carries the system's own error message.  No message
ever holds a credential.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import requests

SEVERITY_RANK = {"informational": 0, "low": 1, "medium": 2, "high": 3, "critical": 4}
# ServiceNow's priority matrix: (urgency, impact) per severity -> priority 1 (critical) to 5 (planning)
SN_URGENCY_IMPACT = {
    "critical": ("1", "1"),
    "high": ("1", "2"),
    "medium": ("2", "2"),
    "low": ("3", "2"),
    "informational": ("3", "3"),
}
SN_STATES = {"1": "New", "2": "In Progress", "3": "On Hold", "6": "Resolved", "7": "Closed", "8": "Canceled"}
SN_DONE = {"6", "7", "8"}
JIRA_PRIORITIES = {
    "critical": "Highest",
    "high": "High",
    "medium": "Medium",
    "low": "Low",
    "informational": "Lowest",
}


class RemoteError(Exception):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        connection_level: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.connection_level = connection_level

    def __str__(self) -> str:
        return self.message


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _error_text(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300].strip() or response.reason or ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # ServiceNow
            return "; ".join(str(error.get(k)) for k in ("message", "detail") if error.get(k))[:500]
        parts = list(body.get("errorMessages") or [])  # Jira
        parts += [f"{k}: {v}" for k, v in (body.get("errors") or {}).items()]
        if parts:
            return "; ".join(map(str, parts))[:500]
    return json.dumps(body)[:300]


@dataclass
class Connection:
    """What a client needs of a connection row (the secret decrypted)."""

    id: int
    kind: str
    base_url: str
    auth: str
    username: str | None
    secret: str | None
    settings: dict


class Client:
    def __init__(self, connection: Connection, timeout: float = 20.0) -> None:
        self.connection = connection
        self.base = connection.base_url.rstrip("/")
        self.settings = connection.settings or {}
        self.timeout = (min(5.0, timeout), timeout)
        self.session = requests.Session()
        self.session.headers.update({"Accept": "application/json", "User-Agent": "partner-gateway-itsm/1"})
        if connection.auth == "basic":
            self.session.auth = (connection.username or "", connection.secret or "")
        elif connection.auth == "bearer":
            self.session.headers["Authorization"] = f"Bearer {connection.secret or ''}"

    def close(self) -> None:
        self.session.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        body: Any = None,
        data: dict | None = None,
    ) -> Any:
        url = path if path.startswith("http") else self.base + path
        try:
            response = self.session.request(
                method, url, params=params, json=body, data=data, timeout=self.timeout, allow_redirects=False
            )
        except requests.Timeout:
            raise RemoteError(
                f"{method} {path}: no answer within {self.timeout[1]:g}s", retryable=True
            ) from None
        except requests.ConnectionError as exc:
            reason = type(exc.__context__ or exc).__name__
            raise RemoteError(f"{method} {path}: connection failed ({reason})", retryable=True) from None
        status = response.status_code
        if status < 300:
            if status == 204 or not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                raise RemoteError(
                    f"{method} {path}: answered {status} with a body that is not JSON",
                    status=status,
                    retryable=True,
                ) from None
        text = _error_text(response)
        message = f"{method} {path}: {status} {text}".strip()
        if status == 429 or status >= 500:
            raise RemoteError(
                message,
                status=status,
                retryable=True,
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        if status == 401 or (300 <= status < 400):
            raise RemoteError(message, status=status, retryable=True, connection_level=True)
        raise RemoteError(message, status=status)


class ServiceNow(Client):
    """The Table API (``/api/now/table/{table}``) on an incident-like table."""

    def __init__(self, connection: Connection, timeout: float = 20.0) -> None:
        super().__init__(connection, timeout)
        self.table = self.settings.get("table") or "incident"
        self._token: str | None = None
        if connection.auth == "oauth":
            self.session.auth = None

    def request(self, method, path, **kwargs):
        if self.connection.auth == "oauth" and self._token is None:
            token = super().request(
                "POST",
                "/oauth_token.do",
                data={
                    "grant_type": "client_credentials",
                    "client_id": self.connection.username or "",
                    "client_secret": self.connection.secret or "",
                },
            )
            if not isinstance(token, dict) or not token.get("access_token"):
                raise RemoteError(
                    "POST /oauth_token.do: no access token in the answer",
                    connection_level=True,
                    retryable=True,
                )
            self._token = token["access_token"]
            self.session.headers["Authorization"] = f"Bearer {self._token}"
        return super().request(method, path, **kwargs)

    def _path(self, sys_id: str | None = None) -> str:
        return f"/api/now/table/{quote(self.table)}" + (f"/{quote(sys_id)}" if sys_id else "")

    def test(self) -> None:
        self.request("GET", self._path(), params={"sysparm_limit": "1", "sysparm_fields": "sys_id"})

    def url(self, record: dict) -> str:
        return f"{self.base}/nav_to.do?uri={self.table}.do?sys_id={record.get('sys_id')}"

    @staticmethod
    def state_name(record: dict) -> str:
        state = str(record.get("state", ""))
        return SN_STATES.get(state, state)

    @staticmethod
    def is_done(record: dict) -> bool:
        return str(record.get("state", "")) in SN_DONE

    def find(self, marker: str) -> dict | None:
        answer = self.request(
            "GET",
            self._path(),
            params={
                "sysparm_query": f"correlation_id={marker}",
                "sysparm_fields": "sys_id,number,state,correlation_id",
                "sysparm_limit": "1",
            },
        )
        found = (answer or {}).get("result") or []
        return found[0] if found else None

    def get(self, sys_id: str) -> dict:
        return (self.request("GET", self._path(sys_id)) or {}).get("result") or {}

    def create(self, marker: str, ticket: dict) -> dict:
        settings = self.settings
        urgency, impact = SN_URGENCY_IMPACT.get(ticket["severity"], ("2", "2"))
        fields = {
            settings.get("shortDescriptionField") or "short_description": ticket["title"][:160],
            settings.get("descriptionField") or "description": ticket["description"],
            "urgency": urgency,
            "impact": impact,
            "correlation_id": marker,
            "correlation_display": "Partner Gateway",
        }
        for name in ("assignment_group", "category"):
            key = "assignmentGroup" if name == "assignment_group" else "category"
            if settings.get(key):
                fields[name] = settings[key]
        fields.update(settings.get("extraFields") or {})
        answer = self.request("POST", self._path(), body=fields)
        return (answer or {}).get("result") or {}

    def update(self, sys_id: str, fields: dict) -> dict:
        return (self.request("PATCH", self._path(sys_id), body=fields) or {}).get("result") or {}

    def resolve(self, sys_id: str, notes: str, exempt: bool = False) -> dict:
        """Resolved with the connection's ``closeCode`` (``closeCodeExempt`` when every item of the
        ticket is exempt) and the close notes; a record already done is left as it is."""
        record = self.get(sys_id)
        if self.is_done(record):
            return record
        code = (exempt and self.settings.get("closeCodeExempt")) or self.settings.get("closeCode")
        return self.update(
            sys_id,
            {
                "state": str(self.settings.get("resolvedState") or "6"),
                "close_code": code or "Solved (Permanently)",
                "close_notes": notes,
            },
        )

    def reopen(self, sys_id: str, note: str) -> dict:
        record = self.get(sys_id)
        if not self.is_done(record):
            return record
        return self.update(
            sys_id, {"state": str(self.settings.get("reopenState") or "2"), "work_notes": note}
        )

    def set_severity(self, sys_id: str, severity: str) -> dict:
        urgency, impact = SN_URGENCY_IMPACT.get(severity, ("2", "2"))
        return self.update(sys_id, {"urgency": urgency, "impact": impact})

    def has_note(self, sys_id: str, marker: str) -> bool:
        answer = self.request(
            "GET",
            "/api/now/table/sys_journal_field",
            params={
                "sysparm_query": f"element_id={sys_id}^valueLIKE{marker}",
                "sysparm_fields": "sys_id",
                "sysparm_limit": "1",
            },
        )
        return bool((answer or {}).get("result"))

    def note(self, sys_id: str, text: str) -> dict:
        return self.update(sys_id, {"work_notes": text})


class Jira(Client):
    """Jira Cloud REST API v3: issues, transitions, comments, issue properties, JQL search."""

    PROPERTY = "partner-gateway"

    def test(self) -> None:
        self.request("GET", "/rest/api/3/myself")
        project = self.settings.get("projectKey") or ""
        self.request("GET", f"/rest/api/3/project/{quote(project)}")

    def url(self, record: dict) -> str:
        return f"{self.base}/browse/{record.get('key')}"

    @staticmethod
    def state_name(record: dict) -> str:
        return ((record.get("fields") or {}).get("status") or {}).get("name") or ""

    @staticmethod
    def category(record: dict) -> str:
        status = (record.get("fields") or {}).get("status") or {}
        return (status.get("statusCategory") or {}).get("key") or ""

    def find(self, marker: str) -> dict | None:
        answer = self.request(
            "POST",
            "/rest/api/3/search/jql",
            body={"jql": f'labels = "{marker}"', "fields": ["status"], "maxResults": 2},
        )
        issues = (answer or {}).get("issues") or []
        return issues[0] if issues else None

    def get(self, key: str) -> dict:
        return (
            self.request("GET", f"/rest/api/3/issue/{quote(key)}", params={"fields": "status,priority"}) or {}
        )

    def create(self, marker: str, ticket: dict, item_ref: dict) -> dict:
        settings = self.settings
        fields = {
            "project": {"key": settings.get("projectKey")},
            "issuetype": {"name": settings.get("issueType") or "Task"},
            "summary": ticket["title"][:255],
            "description": adf(ticket["description"]),
            "labels": sorted({marker, *(settings.get("labels") or [])}),
        }
        priority = (settings.get("priorityMap") or JIRA_PRIORITIES).get(ticket["severity"])
        if priority and settings.get("setPriority", True):
            fields["priority"] = {"name": priority}
        answer = self.request(
            "POST",
            "/rest/api/3/issue",
            body={"fields": fields, "properties": [{"key": self.PROPERTY, "value": item_ref}]},
        )
        return answer or {}

    def _transition(self, key: str, want_done: bool) -> bool:
        answer = self.request("GET", f"/rest/api/3/issue/{quote(key)}/transitions") or {}
        candidates = [
            t
            for t in answer.get("transitions") or []
            if (((t.get("to") or {}).get("statusCategory") or {}).get("key") == "done") == want_done
        ]
        if not want_done:  # back to work: prefer "To Do" (new) over "In Progress" (indeterminate)
            candidates.sort(
                key=lambda t: ((t.get("to") or {}).get("statusCategory") or {}).get("key") != "new"
            )
        elif self.settings.get("doneStatus"):  # the connection's preferred done status, else any done one
            wanted = str(self.settings["doneStatus"]).casefold()
            candidates.sort(
                key=lambda t: wanted not in {str((t.get("to") or {}).get("name") or "").casefold(),
                                             str(t.get("name") or "").casefold()}
            )
        if not candidates:
            raise RemoteError(
                f"issue {key} offers no transition into a {'done' if want_done else 'not done'} status"
            )
        self.request(
            "POST",
            f"/rest/api/3/issue/{quote(key)}/transitions",
            body={"transition": {"id": candidates[0]["id"]}},
        )
        return True

    def resolve(self, key: str, notes: str, exempt: bool = False) -> dict:
        if self.category(self.get(key)) != "done":
            self._transition(key, True)
            self.comment(key, notes)
        return self.get(key)

    def reopen(self, key: str, note: str) -> dict:
        if self.category(self.get(key)) == "done":
            self._transition(key, False)
            self.comment(key, note)
        return self.get(key)

    def set_severity(self, key: str, severity: str) -> dict:
        priority = (self.settings.get("priorityMap") or JIRA_PRIORITIES).get(severity)
        if priority and self.settings.get("setPriority", True):
            self.request(
                "PUT", f"/rest/api/3/issue/{quote(key)}", body={"fields": {"priority": {"name": priority}}}
            )
        return {}

    def has_note(self, key: str, marker: str) -> bool:
        answer = (
            self.request("GET", f"/rest/api/3/issue/{quote(key)}/comment", params={"maxResults": "100"}) or {}
        )
        return any(marker in adf_text(c.get("body")) for c in answer.get("comments") or [])

    def note(self, key: str, text: str) -> dict:
        return self.comment(key, text)

    def comment(self, key: str, text: str) -> dict:
        return self.request("POST", f"/rest/api/3/issue/{quote(key)}/comment", body={"body": adf(text)}) or {}


def adf(text: str) -> dict:
    """Plain text as an Atlassian Document Format document (one paragraph per line)."""
    return {
        "type": "doc",
        "version": 1,
        "content": [
            {"type": "paragraph", "content": [{"type": "text", "text": line}] if line else []}
            for line in text.split("\n")
        ],
    }


def adf_text(document: Any) -> str:
    """The text of an ADF document (or a plain string)."""
    if isinstance(document, str):
        return document
    if not isinstance(document, dict):
        return ""
    if document.get("type") == "text":
        return str(document.get("text", ""))
    parts = [adf_text(child) for child in document.get("content") or []]
    return ("\n" if document.get("type") == "doc" else "").join(parts)


def client_for(connection: Connection, timeout: float = 20.0) -> ServiceNow | Jira:
    return ServiceNow(connection, timeout) if connection.kind == "servicenow" else Jira(connection, timeout)
