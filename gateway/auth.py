"""OAuth 2.0 authorization server (authlib, client credentials only) and token checks.

Tokens are opaque random strings; the store keeps only their SHA-256, as it keeps
only a hash of each client secret (both are high-entropy random values, so a fast
hash is the right tool; a password hash would only slow the token endpoint).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc6749.errors import (
    InsecureTransportError,
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask, current_app, g, jsonify, request, url_for
from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from gateway import logs, ratelimit
from gateway.errors import Forbidden, NotFound, TooManyRequests, Unauthorized
from gateway.models import ClientTenant, OAuthClient, OAuthToken, Tenant

log = logging.getLogger(__name__)

SCOPES = {
    "findings.write": "Push findings, recommendations and knowledge-base batches",
    "alerts.write": "Push partner alerts",
    "security.read": "Read alerts, recommendations, findings, resources and batches",
    "alerts.manage": "Change workflow fields (status, assignee, feedback, comments, tags)",
    "posture.manage": "Change security policies, exemptions, governance and alert suppression rules",
    "itsm.manage": "Manage ITSM connections (ServiceNow, Jira), sync rules and tickets",
    "exports.manage": "Manage continuous export: destinations, test deliveries, replay, secret rotation",
    "indicators.write": "Push threat-intelligence indicators (Graph tiIndicator, STIX 2.1)",
    "events.write": "Push host security events (Windows Security events, OCSF activity events)",
    "rules.manage": "Enable, disable and tune detection rules and create custom ones",
    "admin": "Administer tenants, clients, policies and exports; push the known-exploited-vulnerabilities list",
}


def hash_secret(secret: str) -> str:
    """The stored form of a client secret or access token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_client_secret() -> str:
    return secrets.token_urlsafe(32)


class TokenCache:
    """This process's recent successful token checks, each reused for ``TOKEN_CACHE_SECONDS``.

    A push's 202 otherwise waits on a query for its token (and tenant) every time.  What the
    cache keeps is what :func:`authenticate` found: the caller, the token's expiry (checked on
    every use) and the tenant read with it.  A token revoked here (``/oauth/revoke``, a client's
    tokens revoked with its secret) is forgotten at once; a change made elsewhere (another API
    process, the CLI disabling a client or withdrawing a tenant) is seen within the TTL.
    Failed checks are never kept."""

    MAX_ENTRIES = 10_000

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.entries: dict[tuple, tuple[float, Any]] = {}
        self.lock = threading.Lock()

    def get(self, key: tuple) -> Any | None:
        entry = self.entries.get(key)
        return entry[1] if entry is not None and time.monotonic() < entry[0] else None

    def put(self, key: tuple, value: Any) -> None:
        with self.lock:
            if len(self.entries) >= self.MAX_ENTRIES:
                self.entries.clear()
            self.entries[key] = (time.monotonic() + self.seconds, value)

    def forget(self, token_hash: str | None = None, client_pk: int | None = None) -> None:
        with self.lock:
            for key in [key for key, (_, value) in self.entries.items()
                        if key[0] == token_hash or value[0].client_pk == client_pk]:
                del self.entries[key]


def _token_cache() -> TokenCache | None:
    return current_app.extensions.get("gateway.token_cache")


def revoke_client_tokens(session: Session, client_pk: int) -> int:
    """Revoke every unrevoked token of a client, in the caller's transaction; how many.

    Called where the client's secret changes or it is disabled, in the same transaction, so a
    token never outlives the credentials it was issued for (enabling the client again does not
    bring them back).
    """
    cache = _token_cache() if current_app else None
    if cache is not None:
        cache.forget(client_pk=client_pk)
    result = session.execute(
        update(OAuthToken)
        .where(OAuthToken.client_pk == client_pk, OAuthToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount


class ClientAdapter(ClientMixin):
    """authlib's view of an OAuthClient row."""

    def __init__(self, row: OAuthClient) -> None:
        self.row = row

    def get_client_id(self) -> str:
        return self.row.client_id

    def get_default_redirect_uri(self) -> str | None:
        return None

    def get_allowed_scope(self, scope: str | None) -> str:
        allowed = self.row.scope.split()
        if not scope:
            return " ".join(allowed)
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(self.row.secret_hash, hash_secret(client_secret))

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return False

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials"


class ClientCredentialsGrant(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def validate_requested_scope(self) -> None:
        scope = self.request.payload.scope
        if scope:
            requested = set(scope.split())
            unknown = requested - set(SCOPES)
            if unknown:
                raise InvalidScopeError(description=f"unknown scope: {' '.join(sorted(unknown))}")
            missing = requested - set(self.request.client.row.scope.split())
            if missing:
                raise InvalidScopeError(
                    description=f"scope not granted to this client: {' '.join(sorted(missing))}"
                )


def _db():
    return current_app.extensions["gateway.db"]


def query_client(client_id: str) -> ClientAdapter | None:
    with _db().sessions() as session:
        row = session.scalar(select(OAuthClient).where(OAuthClient.client_id == client_id))
    if row is None or row.disabled:
        return None
    return ClientAdapter(row)


def save_token(token: dict[str, Any], oauth_request) -> None:
    """Store the token's hash, if the client is still as it was when it authenticated.

    The client row is locked first (as ``gateway client rotate-secret`` and ``disable`` lock it),
    so a rotation or a disable that commits after the secret was checked is seen here, and one
    that commits later revokes this token.
    """
    client = oauth_request.client.row
    ttl = int(token.get("expires_in", current_app.config["TOKEN_TTL_SECONDS"]))
    now = datetime.now(UTC)
    with _db().session() as session:
        current = session.scalar(select(OAuthClient).where(OAuthClient.id == client.id).with_for_update())
        if current is None or current.disabled or current.secret_hash != client.secret_hash:
            raise InvalidClientError(description="the client's credentials changed: authenticate again")
        session.add(OAuthToken(
            token_hash=hash_secret(token["access_token"]),
            client_pk=client.id,
            scope=token.get("scope") or client.scope,
            issued_at=now,
            expires_at=now + timedelta(seconds=ttl),
        ))


class StoredToken:
    """authlib's view of an OAuthToken row and its client."""

    def __init__(self, row: OAuthToken, client: OAuthClient) -> None:
        self.row = row
        self.id = row.id
        self.client_pk = row.client_pk
        self.client_row = client
        self.scope = row.scope
        self.expires_at = row.expires_at
        self.issued_at = row.issued_at
        self.revoked_at = row.revoked_at

    def check_client(self, client: ClientAdapter) -> bool:
        return self.client_pk == client.row.id

    def get_scope(self) -> str:
        return self.scope

    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self) -> bool:
        return _aware(self.expires_at) <= datetime.now(UTC)


class _TokenLookup:
    def query_token(self, token_string: str, token_type_hint: str | None):
        with _db().sessions() as session:
            row = session.scalar(select(OAuthToken).where(OAuthToken.token_hash == hash_secret(token_string)))
            if row is None:
                return None
            client = session.get(OAuthClient, row.client_pk)
        return StoredToken(row, client)


class Revocation(_TokenLookup, RevocationEndpoint):
    CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def check_permission(self, token, client, request) -> bool:
        return token.client_pk == client.row.id

    def revoke_token(self, token, request) -> None:
        with _db().session() as session:
            row = session.get(OAuthToken, token.id)
            if row is not None and row.client_pk == request.client.row.id and row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
                cache = _token_cache()
                if cache is not None:
                    cache.forget(token_hash=row.token_hash)


class Introspection(_TokenLookup, IntrospectionEndpoint):
    CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def check_permission(self, token, client, request) -> bool:
        return token.client_pk == client.row.id or "admin" in client.row.scope.split()

    def introspect_token(self, token) -> dict[str, Any]:
        now = datetime.now(UTC)
        expires_at = _aware(token.expires_at)
        active = token.revoked_at is None and expires_at > now and not token.client_row.disabled
        if not active:
            return {"active": False}
        return {
            "active": True,
            "client_id": token.client_row.client_id,
            "scope": token.scope,
            "token_type": "Bearer",
            "exp": int(expires_at.timestamp()),
            "iat": int(_aware(token.issued_at).timestamp()),
            "iss": issuer(),
        }


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


DEFAULT_ISSUER = "http://127.0.0.1:8080"  # the embedded default's address (`gateway run`)


def issuer() -> str:
    """The issuer: ``ISSUER``; else the request's host under ``gateway run`` on every interface;
    else the fixed default.  Never the caller's Host header in production (it would let a caller
    or a shared cache name another server as the token endpoint)."""
    configured = current_app.config.get("ISSUER")
    if configured:
        return configured
    if current_app.config.get("ISSUER_FROM_REQUEST"):
        return request.host_url.rstrip("/")
    if not current_app.extensions.get("gateway.default_issuer_used"):
        current_app.extensions["gateway.default_issuer_used"] = True
        log.warning("GATEWAY_ISSUER is not set: the OAuth metadata names %s as the issuer; set it to "
                    "the URL clients reach this API at", DEFAULT_ISSUER)
    return DEFAULT_ISSUER


def checked_issuer(value: str | None) -> str | None:
    """``GATEWAY_ISSUER`` as the metadata uses it (no trailing '/'); ValueError when it is no
    http(s) URL of a host, or has a query, a fragment or credentials (RFC 8414 section 2)."""
    if not value:
        return None
    parts = urlsplit(value)
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment
            or "?" in value or "#" in value or parts.username is not None):
        raise ValueError(f"GATEWAY_ISSUER must be the http(s) URL clients reach this API at, with no "
                         f"query, fragment or credentials (e.g. https://gateway.example.com), not {value!r}")
    return value.rstrip("/")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the authenticated client and the scopes of its token."""

    client_pk: int
    client_id: str
    provider: str
    scopes: frozenset[str]


def _bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    kind, _, value = header.partition(" ")
    if kind.lower() != "bearer" or not value.strip():
        raise Unauthorized(
            "a bearer access token is required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": 'Bearer realm="gateway"'},
        )
    return value.strip()


def authenticate(tenant_external_id: str | None = None) -> Caller:
    """Check the request's bearer token: known, not expired, not revoked, client enabled.

    With ``tenant_external_id`` (the tenant in the path) the same query also reads that tenant
    if the client is enabled for it, kept for :func:`caller_tenant` (a push then waits on one
    query fewer before its 202)."""
    token_hash = hash_secret(_bearer_token())
    cache = _token_cache()
    cached = cache.get((token_hash, tenant_external_id)) if cache is not None else None
    if cached is not None and cached[1] > datetime.now(UTC):
        caller, _, tenant = cached
        if tenant_external_id is not None:
            g.caller_tenant = (caller.client_pk, tenant_external_id, tenant)
        return caller
    statement = (select(OAuthToken, OAuthClient)
                 .join(OAuthClient, OAuthClient.id == OAuthToken.client_pk)
                 .where(OAuthToken.token_hash == token_hash))
    if tenant_external_id is not None:
        named = select(Tenant.id).where(Tenant.external_id == tenant_external_id).scalar_subquery()
        statement = (statement.add_columns(Tenant)
                     .outerjoin(ClientTenant, and_(ClientTenant.client_pk == OAuthToken.client_pk,
                                                   ClientTenant.tenant_id == named))
                     .outerjoin(Tenant, Tenant.id == ClientTenant.tenant_id))
    with _db().sessions() as session:
        row = session.execute(statement).first()
    invalid = {"WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token"'}
    if row is None:
        raise Unauthorized("the access token is not valid", code="invalidToken", headers=invalid)
    stored, client = row[0], row[1]
    if tenant_external_id is not None:
        g.caller_tenant = (client.id, tenant_external_id, row[2])
    if stored.revoked_at is not None:
        raise Unauthorized("the access token was revoked", code="invalidToken", headers=invalid)
    if _aware(stored.expires_at) <= datetime.now(UTC):
        raise Unauthorized("the access token has expired", code="invalidToken", headers=invalid)
    if client.disabled:
        raise Unauthorized("the client is disabled", code="invalidToken", headers=invalid)
    caller = Caller(client.id, client.client_id, client.provider, frozenset(stored.scope.split()))
    if cache is not None:
        cache.put((token_hash, tenant_external_id),
                  (caller, _aware(stored.expires_at), row[2] if tenant_external_id is not None else None))
    return caller


def require_scope(*scopes: str) -> Callable:
    """Decorator: the caller's token must carry one of ``scopes``; sets ``g.caller``."""

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(*args, **kwargs):
            caller = authenticate(kwargs.get("tenant"))
            logs.bind(client_id=caller.client_id)  # reset with the request's ids at teardown
            if not caller.scopes.intersection(scopes):
                raise Forbidden(
                    f"the access token lacks the required scope ({' or '.join(scopes)})",
                    code="insufficientScope",
                    headers={"WWW-Authenticate":
                             f'Bearer error="insufficient_scope", scope="{" ".join(scopes)}"'},
                )
            g.caller = caller
            ratelimit.check_call(caller.client_id)
            return view(*args, **kwargs)

        wrapper.required_scopes = scopes  # read by the spec test
        return wrapper

    return decorator


def tenant_for_caller(session, tenant_external_id: str) -> Tenant:
    """The tenant named in the path, if the calling client is enabled for it; else 404."""
    tenant = session.scalar(
        select(Tenant)
        .join(ClientTenant, ClientTenant.tenant_id == Tenant.id)
        .where(Tenant.external_id == tenant_external_id, ClientTenant.client_pk == g.caller.client_pk)
    )
    if tenant is None:
        raise NotFound(f"tenant '{tenant_external_id}' not found")
    return tenant


def caller_tenant(tenant_external_id: str) -> Tenant:
    """:func:`tenant_for_caller` in a session of its own, answered from the token's query when it
    read that tenant (``require_scope`` on a route with a tenant)."""
    found = g.get("caller_tenant")
    if found is not None and found[:2] == (g.caller.client_pk, tenant_external_id):
        if found[2] is None:
            raise NotFound(f"tenant '{tenant_external_id}' not found")
        return found[2]
    with _db().sessions() as session:
        return tenant_for_caller(session, tenant_external_id)


BASIC_CHALLENGE = 'Basic realm="gateway"'


class Authorization(AuthorizationServer):
    """authlib's server with RFC 6749's rules on client authentication errors."""

    def handle_error_response(self, request, error):
        """``invalid_client`` is always 401 with a Basic challenge (RFC 6749 section 5.2): authlib
        answers 400 when an unknown client authenticates in the body."""
        status, body, headers = error(self.get_error_uri(request, error))
        if error.error == "invalid_client":
            status = 401
            headers = [(k, v) for k, v in headers if k.lower() != "www-authenticate"]
            headers.append(("WWW-Authenticate", BASIC_CHALLENGE))
        return self.handle_response(status, body, headers)


def request_problem() -> str | None:
    """What makes a token, revocation or introspection request invalid_request, if anything:
    a repeated parameter (RFC 6749 section 3.2, also across the URL and the body), the client
    secret in the URL (section 2.3.1), or two client authentication methods (section 2.3)."""
    for name in sorted(set(request.args) | set(request.form)):
        if len(request.args.getlist(name)) + len(request.form.getlist(name)) > 1:
            return f"the parameter '{name[:40]}' is repeated"
    if "client_secret" in request.args:
        return "the client_secret goes in the request body (or HTTP Basic), never in the URL"
    if "Authorization" in request.headers:
        if "client_secret" in request.form:
            return ("more than one client authentication method: the Authorization header and "
                    "client_secret in the body")
        basic = request.authorization
        body_id = request.form.get("client_id")
        if body_id is not None and (basic is None or basic.type != "basic" or basic.username != body_id):
            return "the client_id in the body does not match the Authorization header"
    return None


def presented_client_id() -> str:
    """The client id an OAuth request authenticates as (HTTP Basic or the form), if any."""
    basic = request.authorization
    if basic is not None and basic.type == "basic" and basic.username:
        return basic.username[:200]
    value = request.form.get("client_id") if request.mimetype == "application/x-www-form-urlencoded" else None
    return (value or "")[:200]


def _too_many(error: str, description: str, headers: dict[str, str]):
    """A 429 in RFC 6749's error shape (RFC 6585 section 4), with Retry-After."""
    response = jsonify({"error": error, "error_description": description})
    response.status_code = 429
    response.headers.update(headers)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return response


def init_app(app: Flask) -> None:
    """Mount the token, revocation, introspection and metadata endpoints."""
    app.config.setdefault("OAUTH2_TOKEN_EXPIRES_IN", {"client_credentials": app.config["TOKEN_TTL_SECONDS"]})
    app.config.setdefault("OAUTH2_ERROR_URIS", None)
    app.config["ISSUER"] = checked_issuer(app.config.get("ISSUER"))
    if app.config.get("TOKEN_CACHE_SECONDS", 0) > 0:
        app.extensions["gateway.token_cache"] = TokenCache(app.config["TOKEN_CACHE_SECONDS"])
    authorization = Authorization(app, query_client=query_client, save_token=save_token)
    authorization.register_grant(ClientCredentialsGrant)
    authorization.register_endpoint(Revocation)
    authorization.register_endpoint(Introspection)

    def respond(create: Callable[[], Any]):
        limits = ratelimit.current()
        client_id = presented_client_id()
        locked = limits.locked_for(client_id)
        if locked:
            return _too_many("invalid_client", f"too many failed attempts; try again in {locked} seconds",
                             {"Retry-After": str(locked)})
        try:
            checks = [(limits.token, "token.address", request.remote_addr or "-")]
            if client_id:
                checks.append((limits.token, "token.client", client_id))
            window = limits.consume(checks)
        except TooManyRequests as exc:
            return _too_many("invalid_request", exc.message, exc.headers)
        response = _respond(create)
        if response.status_code == 401 and client_id:
            limits.failed(client_id)
        if window is not None:
            g.ratelimit_window = window
        return response

    def _respond(create: Callable[[], Any]):
        problem = request_problem()
        if problem is not None:
            # RFC 6749 5.2: error_description holds %x20-21 / %x23-5B / %x5D-7E only, and a
            # parameter name quoted from the request may hold anything else.
            safe = "".join(ch if " " <= ch <= "~" and ch not in '"\\' else "?" for ch in problem)
            return authorization.handle_error_response(None, InvalidRequestError(description=safe))
        try:
            return create()
        except InsecureTransportError as error:  # raised before authlib's own error handling: not a 500
            error.status_code = 400
            error.description = "OAuth 2.0 needs https (plain http only on loopback addresses)"
            return authorization.handle_error_response(None, error)

    @app.post("/oauth/token")
    def issue_token():
        return respond(authorization.create_token_response)

    @app.post("/oauth/revoke")
    def revoke_token():
        return respond(lambda: authorization.create_endpoint_response(Revocation.ENDPOINT_NAME))

    @app.post("/oauth/introspect")
    def introspect_token():
        return respond(lambda: authorization.create_endpoint_response(Introspection.ENDPOINT_NAME))

    @app.get("/.well-known/oauth-authorization-server")
    def server_metadata():
        base = issuer()
        return jsonify({
            "issuer": base,
            "token_endpoint": base + url_for("issue_token"),
            "revocation_endpoint": base + url_for("revoke_token"),
            "introspection_endpoint": base + url_for("introspect_token"),
            "grant_types_supported": ["client_credentials"],
            "response_types_supported": [],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": sorted(SCOPES),
        })
