"""The API describes itself: an index at ``/``, the OpenAPI document at ``/openapi.json`` and
``/openapi.yaml``, and Swagger UI at ``/docs`` from the package's own files (no CDN).

The spec shipped is ``gateway/openapi.yaml``, a byte-for-byte copy of ``openapi/openapi.yaml``
(the one source, edited there; ``tests/test_docs.py`` fails when the copies differ).  It is
package data, so an installed gateway serves it without the source tree.  Its ``servers`` is the
relative ``/``: nothing about the host is taken from the request.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata
from pathlib import Path

import yaml
from flask import Blueprint, current_app, jsonify, request, url_for

from gateway.errors import NotFound

blueprint = Blueprint("discovery", __name__)

PACKAGE = Path(__file__).resolve().parents[1]
SPEC_FILE = PACKAGE / "openapi.yaml"
DOCS_DIR = PACKAGE / "docs"
# The Swagger UI files /docs serves from the swagger-ui-bundle package (and nothing else of it:
# its own index.html and initializer point at the petstore).
BUNDLE_FILES = ("swagger-ui.css", "index.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js",
                "favicon-32x32.png", "favicon-16x16.png")
OWN_FILES = ("swagger-initializer.js",)
# Swagger UI runs from same-origin scripts only; its React components set style attributes
# (hence 'unsafe-inline' for styles alone) and its CSS embeds SVG icons as data: URLs.
DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
SPEC_MAX_AGE = 300
MEDIA_TYPES = {"css": "text/css", "js": "text/javascript", "png": "image/png"}


@cache
def spec_bytes() -> bytes:
    return SPEC_FILE.read_bytes()


@cache
def spec_json() -> bytes:
    return json.dumps(yaml.safe_load(spec_bytes()), ensure_ascii=False).encode()


def _version() -> str:
    try:
        return metadata.version("partner-gateway")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return str(yaml.safe_load(spec_bytes())["info"]["version"])


def _hardened(response, csp: str = "default-src 'none'; frame-ancestors 'none'"):
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _spec_response(body: bytes, mimetype: str):
    response = current_app.response_class(body, mimetype=mimetype)
    response.headers["Cache-Control"] = f"public, max-age={SPEC_MAX_AGE}"
    response.add_etag()
    return _hardened(response.make_conditional(request))


@blueprint.get("/")
def index():
    """Where things are: the spec, the docs, the token endpoint, the probes and the API base."""
    return _hardened(jsonify({
        "name": "partner-gateway",
        "version": _version(),
        "links": {
            "openapi": url_for("discovery.openapi_json"),
            "openapiYaml": url_for("discovery.openapi_yaml"),
            "docs": url_for("discovery.docs"),
            "token": url_for("issue_token"),
            "authorizationServerMetadata": "/.well-known/oauth-authorization-server",
            "health": url_for("health.healthz"),
            "readiness": url_for("health.readyz"),
            "api": "/api/v1/tenants/{tenant}",
            "metadata": url_for("metadata.csdl_view"),
        },
    }))


@blueprint.get("/openapi.json")
def openapi_json():
    """The OpenAPI document, as JSON."""
    return _spec_response(spec_json(), "application/json")


@blueprint.get("/openapi.yaml")
def openapi_yaml():
    """The OpenAPI document, as written."""
    return _spec_response(spec_bytes(), "application/yaml")


@blueprint.get("/docs")
def docs():
    """Swagger UI on /openapi.json."""
    return _hardened(_file(DOCS_DIR / "index.html", "text/html", SPEC_MAX_AGE), DOCS_CSP)


@blueprint.get("/docs/<path:filename>")
def docs_asset(filename: str):
    """A file of the Swagger UI page (an allow-list: the bundle's assets and the initializer)."""
    if filename in OWN_FILES:
        folder = DOCS_DIR
    elif filename in BUNDLE_FILES:
        from swagger_ui_bundle import swagger_ui_path

        folder = Path(swagger_ui_path)
    else:
        raise NotFound(f"no documentation file '{filename[:80]}'")
    return _hardened(_file(folder / filename, MEDIA_TYPES[filename.rsplit(".", 1)[1]], 86400), DOCS_CSP)


def _file(path: Path, mimetype: str, max_age: int):
    """A small static file (names from the allow-lists above only), read whole."""
    response = current_app.response_class(path.read_bytes(), mimetype=mimetype)
    response.headers["Cache-Control"] = f"public, max-age={max_age}"
    return response
