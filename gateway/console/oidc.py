"""OpenID Connect sign-in (authlib's Flask client: authorization code with PKCE S256).

The identity provider is ``OIDC_ISSUER`` (its discovery document names the endpoints and JWKS);
authlib checks the ID token's signature, issuer, audience (our client id), expiry and nonce.  The
role comes from ``OIDC_ROLE_CLAIM`` mapped by ``OIDC_ROLE_MAP``; a person whose claim maps to no
role is refused.  A first sign-in provisions the user, with the tenants of ``OIDC_TENANT_CLAIM``
(kept in step at each sign-in) or else ``OIDC_DEFAULT_TENANTS``.  The page asked for before
sign-in (``/console/oidc/login?next=``) is where the callback lands, if it is a console path of
this site (:func:`gateway.console.auth.safe_next`: never another host).
"""

from __future__ import annotations

import logging

from authlib.common.errors import AuthlibBaseError
from authlib.integrations.flask_client import OAuth
from flask import Blueprint, Flask, abort, current_app, redirect, render_template, request, session, url_for
from joserfc.errors import JoseError  # authlib checks ID tokens with joserfc (authlib.jose is deprecated)
from sqlalchemy import delete, select

from gateway.console import sessions
from gateway.console.auth import ROLES, safe_next
from gateway.console.users import UserError, create_user
from gateway.models import ConsoleUser, ConsoleUserTenant, Tenant, utcnow

log = logging.getLogger(__name__)
blueprint = Blueprint("console_oidc", __name__, url_prefix="/console/oidc")
NEXT_KEY = "oidc_next"  # the page asked for before sign-in, kept in the (pre-sign-in) session


def enabled(app: Flask | None = None) -> bool:
    config = (app or current_app).config
    return bool(config.get("OIDC_ISSUER") and config.get("OIDC_CLIENT_ID"))


def init_app(app: Flask) -> None:
    app.register_blueprint(blueprint)
    if not enabled(app):
        return
    oauth = OAuth(app)  # one registry per app (tests build several apps, each with its own provider)
    app.extensions["console.oauth"] = oauth
    issuer = app.config["OIDC_ISSUER"].rstrip("/")
    oauth.register(
        "idp",
        client_id=app.config["OIDC_CLIENT_ID"],
        client_secret=app.config.get("OIDC_CLIENT_SECRET"),
        server_metadata_url=f"{issuer}/.well-known/openid-configuration",
        client_kwargs={
            "scope": app.config.get("OIDC_SCOPE") or "openid email profile",
            "code_challenge_method": "S256",
            "timeout": 10,
        },
        overwrite=True,
    )


def _client():
    return current_app.extensions["console.oauth"].idp


def role_map(text: str) -> dict[str, str]:
    """ "admins=admin, sec-team=analyst" -> {"admins": "admin", "sec-team": "analyst"}."""
    mapping = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        value, _, role = item.rpartition("=")
        if value and role.strip() in ROLES:
            mapping[value.strip()] = role.strip()
    return mapping


def role_from_claims(claims: dict, claim: str, mapping: dict[str, str]) -> str | None:
    """The highest role any of the claim's values maps to."""
    values = claims.get(claim)
    values = [values] if isinstance(values, str) else list(values or [])
    roles = [mapping[value] for value in values if isinstance(value, str) and value in mapping]
    return max(roles, key=ROLES.index) if roles else None


@blueprint.get("/login")
def login():
    """To the provider; ``?next=`` (a console path of this site only) is where the callback lands."""
    if not enabled():
        abort(404)
    next_url = safe_next(request.args.get("next"))
    if next_url:
        session[NEXT_KEY] = next_url
    else:
        session.pop(NEXT_KEY, None)
    return _client().authorize_redirect(url_for("console_oidc.callback", _external=True))


@blueprint.get("/callback")
def callback():
    if not enabled():
        abort(404)
    next_url = safe_next(session.pop(NEXT_KEY, None))  # checked again: the session is ours, but cheap
    try:
        token = _client().authorize_access_token()
    except (AuthlibBaseError, JoseError, ValueError) as exc:
        log.info("OIDC sign-in refused: %s", exc)
        return render_template(
            "console/login.html", error="The identity provider's answer was not accepted.", oidc=True
        ), 401
    claims = dict(token.get("userinfo") or {})
    config = current_app.config
    role = role_from_claims(
        claims, config.get("OIDC_ROLE_CLAIM") or "groups", role_map(config.get("OIDC_ROLE_MAP"))
    )
    email = claims.get("email")
    if role is None or not email or not claims.get("sub"):
        log.info("OIDC sign-in of %s refused: no console role or email in the claims", claims.get("sub"))
        return render_template(
            "console/login.html", error="Your account has no console role.", oidc=True
        ), 403
    try:
        user_id = provision(claims, role)
    except UserError as exc:
        log.info("OIDC sign-in refused: %s", exc)
        return render_template(
            "console/login.html", error="This account cannot sign in here.", oidc=True
        ), 403
    if user_id is None:
        return render_template("console/login.html", error="This account is disabled.", oidc=True), 403
    sessions.rotate(session)
    for key in [key for key in session if key.startswith("_state_")]:
        session.pop(key)
    session["user_id"] = user_id
    session["via"] = "oidc"
    return redirect(next_url or url_for("console.index"))


def provision(claims: dict, role: str) -> int | None:
    """The user's id, created at first sign-in; role and (claimed) tenants kept in step."""
    config = current_app.config
    subject = f"{config['OIDC_ISSUER'].rstrip('/')}|{claims['sub']}"
    tenant_claim = config.get("OIDC_TENANT_CLAIM")
    claimed = claims.get(tenant_claim) if tenant_claim else None
    if isinstance(claimed, str):
        claimed = [claimed]
    db = current_app.extensions["gateway.db"]
    with db.session() as db_session:
        user = db_session.scalar(select(ConsoleUser).where(ConsoleUser.oidc_subject == subject))
        if user is None:
            by_email = db_session.scalar(
                select(ConsoleUser).where(ConsoleUser.email == claims["email"].lower())
            )
            if by_email is not None:
                # link an existing user only on a verified email and only one not tied to another subject
                if claims.get("email_verified") is not True or by_email.oidc_subject:
                    raise UserError(f"the email {claims['email']} belongs to another console user")
                by_email.oidc_subject = subject
                user = by_email
            else:
                names = (
                    claimed
                    if claimed is not None
                    else [
                        name.strip()
                        for name in (config.get("OIDC_DEFAULT_TENANTS") or "").split(",")
                        if name.strip()
                    ]
                )
                known = list(
                    db_session.scalars(select(Tenant.external_id).where(Tenant.external_id.in_(names)))
                )
                user = create_user(db_session, claims["email"], role, known, oidc_subject=subject)
        if user.disabled:
            return None
        user.role = role
        user.last_login_at = utcnow()
        if claimed is not None:  # the identity provider is the authority on this user's tenants
            wanted = set(db_session.scalars(select(Tenant.id).where(Tenant.external_id.in_(list(claimed)))))
            have = set(
                db_session.scalars(
                    select(ConsoleUserTenant.tenant_id).where(ConsoleUserTenant.user_id == user.id)
                )
            )
            if have - wanted:
                db_session.execute(
                    delete(ConsoleUserTenant).where(
                        ConsoleUserTenant.user_id == user.id, ConsoleUserTenant.tenant_id.in_(have - wanted)
                    )
                )
            for tenant_id in wanted - have:
                db_session.add(ConsoleUserTenant(user_id=user.id, tenant_id=tenant_id))
        return user.id
