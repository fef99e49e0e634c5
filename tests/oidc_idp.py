"""A loopback OpenID Connect identity provider for the console's sign-in tests.

It speaks what the console uses, over a real socket: discovery
(``/.well-known/openid-configuration``), the authorization endpoint (authorization code, PKCE
S256 required), the token endpoint (client_secret_basic or _post; the code verifier checked
against the challenge), and the JWKS the RS256-signed ID token is checked with.  The ID token is
signed with joserfc (the JOSE library authlib itself now uses; ``authlib.jose`` is deprecated).
The person who "signs in" at the authorization endpoint is ``next_claims``; ``audience`` lets a
test issue a token for another client.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from urllib.parse import urlencode

from flask import Flask, jsonify, redirect, request
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from werkzeug.serving import make_server


class IdentityProvider:
    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self.key = RSAKey.generate_key(2048, parameters={"kid": "test-key-1", "use": "sig", "alg": "RS256"})
        self.next_claims: dict = {}
        self.audience: str | None = None  # None: the client id
        self.codes: dict[str, dict] = {}
        self.authorize_requests: list[dict] = []
        self.token_requests: list[dict] = []
        self.app = self._build()
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()

    def _build(self) -> Flask:
        app = Flask("test-idp")

        @app.get("/.well-known/openid-configuration")
        def discovery():
            return jsonify(
                {
                    "issuer": self.url,
                    "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token",
                    "jwks_uri": f"{self.url}/jwks",
                    "response_types_supported": ["code"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                    "code_challenge_methods_supported": ["S256"],
                    "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                    "scopes_supported": ["openid", "email", "profile"],
                }
            )

        @app.get("/jwks")
        def jwks():
            return jsonify(KeySet([self.key]).as_dict(private=False))

        @app.get("/authorize")
        def authorize():
            args = request.args.to_dict()
            self.authorize_requests.append(args)
            if (
                args.get("client_id") != self.client_id
                or args.get("response_type") != "code"
                or "openid" not in args.get("scope", "").split()
                or args.get("code_challenge_method") != "S256"
                or not args.get("code_challenge")
            ):
                return jsonify({"error": "invalid_request"}), 400
            code = secrets.token_urlsafe(16)
            self.codes[code] = {
                "challenge": args["code_challenge"],
                "redirect_uri": args["redirect_uri"],
                "nonce": args.get("nonce"),
                "claims": dict(self.next_claims),
            }
            return redirect(
                f"{args['redirect_uri']}?{urlencode({'code': code, 'state': args.get('state', '')})}"
            )

        @app.post("/token")
        def token():
            form = request.form.to_dict()
            self.token_requests.append(form)
            auth = request.authorization
            client = (
                (auth.username, auth.password) if auth else (form.get("client_id"), form.get("client_secret"))
            )
            if client != (self.client_id, self.client_secret):
                return jsonify({"error": "invalid_client"}), 401
            grant = self.codes.pop(form.get("code", ""), None)
            if (
                grant is None
                or form.get("grant_type") != "authorization_code"
                or form.get("redirect_uri") != grant["redirect_uri"]
            ):
                return jsonify({"error": "invalid_grant"}), 400
            verifier = form.get("code_verifier", "")
            challenge = (
                base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            )
            if challenge != grant["challenge"]:
                return jsonify(
                    {"error": "invalid_grant", "error_description": "PKCE verification failed"}
                ), 400
            now = int(time.time())
            claims = {
                "iss": self.url,
                "aud": self.audience or self.client_id,
                "iat": now,
                "exp": now + 300,
                "nonce": grant["nonce"],
                **grant["claims"],
            }
            id_token = jwt.encode({"alg": "RS256", "kid": "test-key-1"}, claims, self.key)
            return jsonify(
                {
                    "access_token": secrets.token_urlsafe(16),
                    "token_type": "Bearer",
                    "expires_in": 300,
                    "id_token": id_token,
                }
            )

        return app
