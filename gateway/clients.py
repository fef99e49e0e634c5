"""Partner clients: create one for a tenant, disable or enable it, rotate its secret.

The secret is returned once, at creation or rotation, and only its hash is stored; disabling a
client or rotating its secret revokes every token it holds in the same transaction.  The one
implementation: the console's admin page (one tenant, ``tenant_id`` given: another tenant's client
is 404) and the ``gateway client`` commands (an operator: several tenants at creation,
``tenant_id=None`` for any client) both call these functions.
"""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.auth import SCOPES, hash_secret, new_client_secret, revoke_client_tokens
from gateway.errors import BadRequest, NotFound
from gateway.models import ClientTenant, OAuthClient, utcnow


def create(
    session: Session, tenant_id: int | list[int], name: str, provider: str, scopes: list[str]
) -> tuple[str, str]:
    """A new client of the tenant(s) pushing as ``provider``; returns (client id, secret: shown once)."""
    tenant_ids = [tenant_id] if isinstance(tenant_id, int) else list(dict.fromkeys(tenant_id))
    if not tenant_ids:
        raise BadRequest("a client acts on at least one tenant", code="invalidBody")
    name, provider = name.strip(), provider.strip()
    if not 1 <= len(name) <= 200:
        raise BadRequest("'name' is 1 to 200 characters", code="invalidBody")
    if not 1 <= len(provider) <= 100:
        raise BadRequest("'provider' is 1 to 100 characters", code="invalidBody")
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise BadRequest(f"'scope' is one or more of {', '.join(sorted(SCOPES))}", code="invalidBody")
    client_id, secret = secrets.token_hex(16), new_client_secret()
    row = OAuthClient(
        client_id=client_id,
        secret_hash=hash_secret(secret),
        name=name,
        provider=provider,
        scope=" ".join(sorted(set(scopes))),
    )
    session.add(row)
    session.flush()
    session.add_all(ClientTenant(client_pk=row.id, tenant_id=one) for one in tenant_ids)
    return client_id, secret


def of_tenant(session: Session, tenant_id: int | None, client_id: str) -> OAuthClient:
    """The tenant's client (any client for ``None``), locked until the transaction ends (the token
    endpoint locks it too); 404 for another tenant's."""
    query = select(OAuthClient).where(OAuthClient.client_id == client_id).with_for_update(of=OAuthClient)
    if tenant_id is not None:
        query = query.join(ClientTenant, ClientTenant.client_pk == OAuthClient.id).where(
            ClientTenant.tenant_id == tenant_id
        )
    row = session.scalar(query)
    if row is None:
        raise NotFound(f"client '{client_id[:40]}' not found")
    return row


def set_disabled(session: Session, tenant_id: int | None, client_id: str, disabled: bool) -> int:
    """Disable (revoking its tokens; how many) or enable the tenant's client."""
    row = of_tenant(session, tenant_id, client_id)
    row.disabled = disabled
    return revoke_client_tokens(session, row.id) if disabled else 0


def rotate_secret(session: Session, tenant_id: int | None, client_id: str) -> tuple[str, int]:
    """A new secret for the tenant's client (returned once) and how many tokens were revoked: its
    old secret and tokens stop working."""
    row = of_tenant(session, tenant_id, client_id)
    secret = new_client_secret()
    row.secret_hash = hash_secret(secret)
    row.secret_rotated_at = utcnow()
    return secret, revoke_client_tokens(session, row.id)
