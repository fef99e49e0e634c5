"""OAuth 2.0 authorization server (authlib, client credentials only) and token checks.

Tokens are opaque random strings; the store keeps only their SHA-256, as it keeps
only a hash of each client secret (both are high-entropy random values, so a fast
hash is the right tool; a password hash would only slow the token endpoint).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import wraps
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidScopeError
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask, current_app, g, jsonify, request, url_for
from sqlalchemy import select

from gateway.errors import Forbidden, NotFound, Unauthorized
from gateway.models import ClientTenant, OAuthClient, OAuthToken, Tenant

SCOPES = {
    "findings.write": "Push findings, recommendations and knowledge-base batches",
    "alerts.write": "Push partner alerts",
    "security.read": "Read alerts, recommendations, findings, resources and batches",
    "alerts.manage": "Change workflow fields (status, assignee, feedback, comments, tags)",
    "admin": "Administer tenants, clients, policies and exports",
}


def hash_secret(secret: str) -> str:
    """The stored form of a client secret or access token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_client_secret() -> str:
    return secrets.token_urlsafe(32)


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
    client = oauth_request.client.row
    ttl = int(token.get("expires_in", current_app.config["TOKEN_TTL_SECONDS"]))
    now = datetime.now(UTC)
    with _db().session() as session:
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


def issuer() -> str:
    return current_app.config.get("ISSUER") or request.host_url.rstrip("/")


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


def authenticate() -> Caller:
    """Check the request's bearer token: known, not expired, not revoked, client enabled."""
    token = _bearer_token()
    with _db().sessions() as session:
        row = session.execute(
            select(OAuthToken, OAuthClient)
            .join(OAuthClient, OAuthClient.id == OAuthToken.client_pk)
            .where(OAuthToken.token_hash == hash_secret(token))
        ).first()
    invalid = {"WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token"'}
    if row is None:
        raise Unauthorized("the access token is not valid", code="invalidToken", headers=invalid)
    stored, client = row
    if stored.revoked_at is not None:
        raise Unauthorized("the access token was revoked", code="invalidToken", headers=invalid)
    if _aware(stored.expires_at) <= datetime.now(UTC):
        raise Unauthorized("the access token has expired", code="invalidToken", headers=invalid)
    if client.disabled:
        raise Unauthorized("the client is disabled", code="invalidToken", headers=invalid)
    return Caller(client.id, client.client_id, client.provider, frozenset(stored.scope.split()))


def require_scope(*scopes: str) -> Callable:
    """Decorator: the caller's token must carry one of ``scopes``; sets ``g.caller``."""

    def decorator(view: Callable) -> Callable:
        @wraps(view)
        def wrapper(*args, **kwargs):
            caller = authenticate()
            if not caller.scopes.intersection(scopes):
                raise Forbidden(
                    f"the access token lacks the required scope ({' or '.join(scopes)})",
                    code="insufficientScope",
                    headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{" ".join(scopes)}"'},
                )
            g.caller = caller
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


def init_app(app: Flask) -> None:
    """Mount the token, revocation, introspection and metadata endpoints."""
    app.config.setdefault("OAUTH2_TOKEN_EXPIRES_IN", {"client_credentials": app.config["TOKEN_TTL_SECONDS"]})
    app.config.setdefault("OAUTH2_ERROR_URIS", None)
    authorization = AuthorizationServer(app, query_client=query_client, save_token=save_token)
    authorization.register_grant(ClientCredentialsGrant)
    authorization.register_endpoint(Revocation)
    authorization.register_endpoint(Introspection)

    @app.post("/oauth/token")
    def issue_token():
        return authorization.create_token_response()

    @app.post("/oauth/revoke")
    def revoke_token():
        return authorization.create_endpoint_response(Revocation.ENDPOINT_NAME)

    @app.post("/oauth/introspect")
    def introspect_token():
        return authorization.create_endpoint_response(Introspection.ENDPOINT_NAME)

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
