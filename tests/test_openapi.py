"""openapi/openapi.yaml describes exactly what the app serves.

Structural checks compare the document with the code (the url_map, the scopes each view
requires, the registered connectors, the collections' filters and orderings, the marshmallow
schemas, the error codes); live checks call the app on a migrated SQLite store and validate
each answer against the operation's documented response (status, body schema, headers).
"""

from __future__ import annotations

import ast
import base64
import copy
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft202012Validator
from marshmallow import RAISE, fields, validate
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from sqlalchemy import select

import connectors
import gateway
from connectors.model import Observation as ObservationRecord
from connectors.model import ResourceRef
from gateway import schemas
from gateway.api.collections import COLLECTIONS
from gateway.auth import SCOPES, hash_secret
from gateway.errors import APIError
from gateway.migrate import upgrade
from gateway.models import ClientTenant, OAuthClient, Tenant
from gateway.odata import ListField
from gateway.query import LIST_OPTIONS

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = ROOT / "openapi" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
SPEC_URI = "urn:gateway:openapi"
SCHEMAS = "#/components/schemas/"

OUT_SCHEMAS = ["FindingOut", "RecommendationOut", "ResourceOut", "AlertOut", "BatchOut", "SourceOut",
               "EventOut", "ResourceSourceOut", "ObservationOut", "MergedOut", "AlertV2Out", "PolicyOut",
               "ExemptionOut", "AlertSuppressionRuleOut", "SecureScoreOut", "ControlScoreOut",
               "SecureScoreControlOut", "SecureScoreControlProfileOut", "ControlStateUpdateOut",
               "GovernanceRuleOut", "GovernanceAssignmentOut", "ItemTicketOut",
               "StoreEventOut", "ExportOut", "ExportStatusOut", "ExportDeliveryOut", "IndicatorOut"]
PATCH_SCHEMAS = ["FindingPatch", "AlertPatch", "AlertV2Patch"]
OUT_FOR_COLLECTION = {"findings": "FindingOut", "recommendations": "RecommendationOut",
                      "resources": "ResourceOut", "alerts": "AlertOut", "observations": "ObservationOut",
                      "alerts_v2": "AlertV2Out", "policies": "PolicyOut", "exemptions": "ExemptionOut",
                      "alertSuppressionRules": "AlertSuppressionRuleOut",
                      "secureScores": "SecureScoreOut", "secureScoreControls": "SecureScoreControlOut",
                      "secureScoreControlProfiles": "SecureScoreControlProfileOut",
                      "governanceRules": "GovernanceRuleOut",
                      "governanceAssignments": "GovernanceAssignmentOut",
                      "events": "StoreEventOut", "indicators": "IndicatorOut"}
# Answers that are not the gateway's Error body: authlib's RFC 6749 errors and the readiness probe.
NON_ERROR_BODIES = {
    ("/oauth/token", "400"): "OAuthError",
    ("/oauth/token", "401"): "OAuthError",
    ("/oauth/revoke", "400"): "OAuthError",
    ("/oauth/revoke", "401"): "OAuthError",
    ("/oauth/introspect", "400"): "OAuthError",
    ("/oauth/introspect", "401"): "OAuthError",
    ("/oauth/token", "429"): "OAuthError",
    ("/oauth/revoke", "429"): "OAuthError",
    ("/oauth/introspect", "429"): "OAuthError",
    ("/readyz", "503"): "Readiness",
}


# -- the document ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec() -> dict:
    with SPEC_PATH.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="module")
def registry(spec) -> Registry:
    return Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(spec))


def resolve(spec: dict, ref: str) -> Any:
    """The node a local reference ("#/components/...") points at."""
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node: Any = spec
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(spec: dict, node: Any) -> Any:
    """Follow Reference Objects (a ``$ref`` with at most a summary/description beside it)."""
    while isinstance(node, dict) and "$ref" in node and set(node) <= {"$ref", "summary", "description"}:
        node = resolve(spec, node["$ref"])
    return node


def operations(spec: dict):
    for path, item in spec["paths"].items():
        for method in HTTP_METHODS:
            if method in item:
                yield path, method.upper(), item[method]


def operation(spec: dict, path: str, method: str) -> dict:
    return spec["paths"][path][method.lower()]


def parameters(spec: dict, path: str, method: str) -> dict[tuple[str, str], dict]:
    """The operation's parameters (path-level ones included) by (name, location)."""
    merged: dict[tuple[str, str], dict] = {}
    declared = spec["paths"][path].get("parameters", []) + operation(spec, path, method).get("parameters", [])
    for raw in declared:
        param = deref(spec, raw)
        merged[(param["name"], param["in"])] = param
    return merged


def query_parameters(spec: dict, path: str, method: str) -> dict[str, dict]:
    return {name: p for (name, where), p in parameters(spec, path, method).items() if where == "query"}


def schema_types(spec: dict, schema: dict) -> set[str]:
    """The JSON types a (dereferenced) schema allows, besides null."""
    schema = deref(spec, schema)
    declared = schema.get("type")
    if declared is None and "const" in schema:
        declared = {bool: "boolean", str: "string", int: "integer"}[type(schema["const"])]
    types = {declared} if isinstance(declared, str) else set(declared or ())
    return types - {"null"}


def nullable(spec: dict, schema: dict) -> bool:
    schema = deref(spec, schema)
    declared = schema.get("type")
    return declared == "null" or (isinstance(declared, list) and "null" in declared) or any(
        nullable(spec, alternative) for alternative in schema.get("anyOf", ()))


def _absolute_refs(node: Any) -> Any:
    """A copy of an inline schema whose local references point into the registered document."""
    if isinstance(node, dict):
        return {key: (SPEC_URI + value if key == "$ref" and value.startswith("#") else _absolute_refs(value))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_absolute_refs(value) for value in node]
    return node


def schema_errors(registry: Registry, schema: dict, instance: Any) -> list[str]:
    validator = Draft202012Validator(_absolute_refs(copy.deepcopy(schema)), registry=registry,
                                     format_checker=Draft202012Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in validator.iter_errors(instance)]


# -- the app -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('openapi') / 'gateway.sqlite3'}"
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def app(store_url):
    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):  # the spec documents the default settings
            if key.startswith("GATEWAY_"):
                patch.delenv(key)
        flask_app = gateway.create_app(
            {"DATABASE_URL": store_url, "BROKER_URL": "memory://", "SECRET_KEY": "x"})
    yield flask_app
    flask_app.extensions["gateway.db"].dispose()


def flask_to_openapi(rule: str) -> str:
    """/tenants/<tenant>/security/alerts/<item_id> -> /tenants/{tenant}/security/alerts/{item_id}"""
    return re.sub(r"<(?:[^<>:]+:)?([^<>:]+)>", r"{\1}", rule)


def is_console(rule) -> bool:
    """The web console's pages (gateway/console/, under /console): HTML for people, not the API the
    document describes, so the spec leaves them out on purpose."""
    return rule.rule == "/console" or rule.rule.startswith("/console/")


def served(app) -> dict[tuple[str, str], str]:
    """(OpenAPI path, method) -> endpoint, for every API rule (not ``static``, not the console),
    without HEAD/OPTIONS."""
    routes: dict[tuple[str, str], str] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or is_console(rule):
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            key = (flask_to_openapi(rule.rule), method)
            assert key not in routes, f"{key} is served by two rules"
            routes[key] = rule.endpoint
    return routes


# -- structure ---------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(spec):
    assert str(spec["openapi"]).startswith("3.1.")
    validate_openapi(spec)


def test_the_paths_and_methods_are_exactly_those_served(app, spec):
    in_spec = {(path, method) for path, method, _ in operations(spec)}
    routes = set(served(app))
    assert in_spec - routes == set(), "documented but not served"
    assert routes - in_spec == set(), "served but not documented"


def is_documented(spec: dict, path: str, method: str) -> bool:
    return method.lower() in spec["paths"].get(path, {})


def test_path_parameters_are_the_rule_arguments(app, spec):
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or is_console(rule):
            continue
        path = flask_to_openapi(rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if not is_documented(spec, path, method):
                continue  # reported by test_the_paths_and_methods_are_exactly_those_served
            in_path = {name for name, where in parameters(spec, path, method) if where == "path"}
            assert in_path == set(rule.arguments), (path, method)


def test_operation_ids_are_unique(spec):
    ids = [op["operationId"] for _, _, op in operations(spec)]
    assert len(ids) == len(set(ids))


def test_each_operation_requires_the_scopes_its_view_requires(app, spec):
    scheme = spec["components"]["securitySchemes"]["oauth2"]
    for (path, method), endpoint in served(app).items():
        if not is_documented(spec, path, method):
            continue  # reported by test_the_paths_and_methods_are_exactly_those_served
        op = operation(spec, path, method)
        assert "security" in op, f"{method} {path} must state its security (use [] for none)"
        required = getattr(app.view_functions[endpoint], "required_scopes", None)
        if required is None:
            assert op["security"] == [], f"{method} {path} takes no token"
            continue
        # require_scope accepts any one of its scopes: one alternative requirement per scope.
        alternatives = []
        for requirement in op["security"]:
            assert list(requirement) == ["oauth2"], (method, path, requirement)
            assert len(requirement["oauth2"]) == 1, f"{method} {path}: one scope per alternative"
            alternatives.append(requirement["oauth2"][0])
        assert sorted(alternatives) == sorted(required), (method, path)
        assert set(alternatives) <= set(scheme["flows"]["clientCredentials"]["scopes"])


def test_the_oauth2_scheme_lists_every_scope(app, spec):
    scheme = spec["components"]["securitySchemes"]["oauth2"]
    assert scheme["type"] == "oauth2"
    flow = scheme["flows"]["clientCredentials"]
    assert flow["scopes"] == SCOPES
    with app.test_request_context():
        from flask import url_for

        assert flow["tokenUrl"] == url_for("issue_token")
    metadata = spec["components"]["schemas"]["AuthorizationServerMetadata"]["properties"]
    assert metadata["scopes_supported"]["items"]["enum"] == sorted(SCOPES)


def test_the_format_enum_is_the_registered_connectors(spec):
    param = query_parameters(spec, "/api/v1/tenants/{tenant}/batches", "POST")["format"]
    assert param["required"] is True
    assert param["schema"]["enum"] == connectors.formats() + ["auto"]


def test_the_format_details_and_media_types_follow_the_connectors(spec):
    from gateway.api.batches import _SCOPE_FOR_KIND

    path = "/api/v1/tenants/{tenant}/batches"
    param = query_parameters(spec, path, "POST")["format"]
    expected = []
    for name in connectors.formats():
        module = connectors.get(name)
        scope = _SCOPE_FOR_KIND[module.RECORD_KIND]
        expected.append({"name": name, "title": module.TITLE, "recordKind": module.RECORD_KIND,
                         "scope": scope, "contentTypes": list(module.CONTENT_TYPES)})
        row = f"| `{name}` | {module.TITLE} | {module.RECORD_KIND} | `{scope}` |"
        assert row in param["description"], f"the format table lacks: {row}"
    assert param["x-formats"] == expected

    content = deref(spec, operation(spec, path, "POST")["requestBody"])["content"]
    by_type: dict[str, list[str]] = {}
    for name in connectors.formats():
        for media_type in connectors.get(name).CONTENT_TYPES:
            by_type.setdefault(media_type, []).append(name)
    assert set(content) == set(by_type)
    for media_type, names in by_type.items():
        assert content[media_type]["x-formats"] == names, media_type


def test_the_push_parameters(spec):
    found = set(parameters(spec, "/api/v1/tenants/{tenant}/batches", "POST"))
    assert found == {("tenant", "path"), ("format", "query"), ("scanType", "query"),
                     ("Idempotency-Key", "header"), ("Content-Encoding", "header")}
    scan_type = query_parameters(spec, "/api/v1/tenants/{tenant}/batches", "POST")["scanType"]
    assert scan_type["schema"]["enum"] == ["unspecified", "full", "incremental"]


COLLECTION_PATH = "/api/v1/tenants/{tenant}/security/"
ITEM_FOR_COLLECTION = {name: out[:-3] for name, out in OUT_FOR_COLLECTION.items()}


@pytest.mark.parametrize("name", sorted(COLLECTIONS))
def test_collection_list_parameters(app, spec, name):
    _check_list_parameters(app, spec, COLLECTIONS[name], COLLECTION_PATH + name, ITEM_FOR_COLLECTION[name],
                           OUT_FOR_COLLECTION[name])


# the ITSM collections (gateway/api/itsm.py), under /api/v1/tenants/{tenant}/itsm/
ITSM_OUT = {"connections": ("ConnectionOut", "ItsmConnectionOut"), "rules": ("RuleOut", "ItsmRuleOut"),
            "tickets": ("TicketOut", "ItsmTicketOut")}


@pytest.mark.parametrize("name", sorted(ITSM_OUT))
def test_itsm_collection_list_parameters(app, spec, name):
    from gateway.api.itsm import COLLECTIONS as ITSM_COLLECTIONS

    out = ITSM_OUT[name][1]
    _check_list_parameters(app, spec, ITSM_COLLECTIONS[name], "/api/v1/tenants/{tenant}/itsm/" + name,
                           out[:-3], out)


@pytest.mark.parametrize("pair", sorted(ITSM_OUT.values()) + [("TicketItemOut", "TicketItemOut")])
def test_itsm_out_schemas_match_the_marshmallow_schemas(spec, pair):
    from gateway.itsm import schemas as itsm_schemas

    name, documented_name = pair
    declared = getattr(itsm_schemas, name)().fields
    documented = spec["components"]["schemas"][documented_name]
    assert set(documented["properties"]) == set(declared)
    assert set(documented["required"]) == set(declared), "every field is always dumped"
    assert documented.get("additionalProperties") is False
    for field_name, field in declared.items():
        _check_type(spec, field, documented["properties"][field_name], f"{name}.{field_name}")


@pytest.mark.parametrize("name", ["ConnectionIn", "ConnectionPatch", "RuleIn", "RulePatch", "TicketIn"])
def test_itsm_input_schemas_match_the_marshmallow_schemas(spec, name):
    from gateway.itsm import schemas as itsm_schemas

    _check_input_schema(spec, getattr(itsm_schemas, name), name)


def _check_list_parameters(app, spec, collection, path: str, item: str, out: str) -> None:
    params = query_parameters(spec, path, "GET")
    assert set(params) == set(LIST_OPTIONS)

    described = params["$filter"]["description"]
    scalars = re.search(r"Filterable fields: (.*?)\.\n", described, re.S)
    lists = re.search(r"Collection fields \(with `any\(\)` / `all\(\)`\): (.*?)\.\n", described, re.S)
    assert scalars and re.findall(r"`([^`]+)`", scalars.group(1)) == [
        f for f, spec_ in collection.fields.items() if not isinstance(spec_, ListField)]
    assert lists and re.findall(r"`([^`]+)`", lists.group(1)) == [
        f for f, spec_ in collection.fields.items() if isinstance(spec_, ListField)]
    assert params["$filter"]["schema"]["$ref"] == SCHEMAS + "Filter"

    select = params["$select"]
    assert select["style"] == "form" and select["explode"] is False
    assert select["schema"]["items"]["$ref"] == SCHEMAS + item + "Field"
    assert spec["components"]["schemas"][item + "Field"]["enum"] == list(collection.selectable)
    selection = spec["components"]["schemas"][item + "Selection"]
    assert selection["propertyNames"]["$ref"] == SCHEMAS + item + "Field" and selection["required"] == ["id"]

    order = params["$orderby"]
    assert order["style"] == "form" and order["explode"] is False
    fields_ = list(collection.order_fields)
    assert order["schema"]["items"]["enum"] == [term for field in fields_
                                                for term in (field, f"{field} asc", f"{field} desc")]
    listed = re.search(r"Orderable fields: (.*?)\.", order["description"], re.S)
    assert listed and re.findall(r"`([^`]+)`", listed.group(1)) == fields_
    default = ", ".join(f + (" desc" if desc else "") for f, desc in collection.default_order)
    assert f"Default `{default}`" in order["description"]

    top = params["$top"]["schema"]
    assert (top["minimum"], top["maximum"], top["default"]) == (
        1, app.config["PAGE_SIZE_MAX"], app.config["PAGE_SIZE_DEFAULT"])

    listing = operation(spec, path, "GET")["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing["$ref"] == SCHEMAS + item + "List"
    envelope = deref(spec, listing)
    alternatives = [SCHEMAS + out, SCHEMAS + item + "Selection"]
    assert [a["$ref"] for a in envelope["properties"]["value"]["items"]["anyOf"]] == alternatives
    one = operation(spec, path + "/{item_id}", "GET")["responses"]["200"]["content"]["application/json"]
    assert [a["$ref"] for a in one["schema"]["anyOf"]] == alternatives
    assert set(query_parameters(spec, path + "/{item_id}", "GET")) == {"$select"}


@pytest.mark.parametrize("item", sorted(ITEM_FOR_COLLECTION.values()) + sorted(
    out[:-3] for _, out in ITSM_OUT.values()))
def test_the_list_envelope(spec, item):
    """Each list answer has its own typed model (one object, no ``$ref`` with siblings, so that
    client generators keep it)."""
    envelope = spec["components"]["schemas"][item + "List"]
    assert "$ref" not in envelope and envelope["type"] == "object"
    assert set(envelope["properties"]) == {"@odata.context", "@odata.count", "value", "@odata.nextLink"}
    assert set(envelope["required"]) == {"@odata.context", "value"}
    assert envelope["additionalProperties"] is False


def _check_type(spec: dict, field: fields.Field, prop: dict, where: str) -> None:
    """The JSON type of a marshmallow field matches the spec property."""
    prop = deref(spec, prop)
    if isinstance(field, fields.Function):
        return  # computed: its type is documented, not declared
    types = schema_types(spec, prop)
    if isinstance(field, fields.DateTime):
        assert types == {"string"} and prop.get("format") == "date-time", where
    elif isinstance(field, fields.Integer):
        assert types == {"integer"}, where
    elif isinstance(field, fields.Boolean):
        assert types == {"boolean"}, where
    elif isinstance(field, fields.Float):
        assert types == {"number"}, where
    elif isinstance(field, fields.String):
        assert types == {"string"}, where
    elif isinstance(field, fields.Dict):
        assert types == {"object"}, where
    elif isinstance(field, fields.Nested):
        nested = field.nested if isinstance(field.nested, type) else type(field.nested)
        assert prop.get("$ref") == SCHEMAS + nested.__name__, where
        return
    elif isinstance(field, fields.List):
        assert types == {"array"}, where
        items = prop["items"]
        inner = field.inner
        if isinstance(inner, fields.Nested):
            nested = inner.nested if isinstance(inner.nested, type) else type(inner.nested)
            assert items.get("$ref") == SCHEMAS + nested.__name__, where
        else:
            _check_type(spec, inner, items, where + "[]")
        return
    else:
        raise AssertionError(f"{where}: no JSON type known for {type(field).__name__}")
    assert nullable(spec, prop) == field.allow_none, f"{where}: nullable"


@pytest.mark.parametrize("name", OUT_SCHEMAS)
def test_out_schemas_match_the_marshmallow_schemas(spec, name):
    declared = getattr(schemas, name)().fields
    documented = spec["components"]["schemas"][name]
    assert set(documented["properties"]) == set(declared)
    assert set(documented["required"]) == set(declared), "every field is always dumped"
    assert documented.get("additionalProperties") is False
    for field_name, field in declared.items():
        _check_type(spec, field, documented["properties"][field_name], f"{name}.{field_name}")


def _check_input(spec: dict, field: fields.Field, prop: dict, where: str) -> None:
    """A marshmallow input field's type, nullability and validators match the spec property."""
    raw, prop = prop, deref(spec, prop)
    assert nullable(spec, prop) == field.allow_none, f"{where}: nullable"
    for validator in field.validators:
        if isinstance(validator, validate.OneOf):
            assert [v for v in prop.get("enum", []) if v is not None] == list(validator.choices), where
        elif isinstance(validator, validate.Regexp):
            assert prop.get("pattern") == validator.regex.pattern, where
        elif isinstance(validator, validate.Length):
            is_list = isinstance(field, fields.List)
            low, high = ("minItems", "maxItems") if is_list else ("minLength", "maxLength")
            assert prop.get(low) == validator.min and prop.get(high) == validator.max, where
        elif isinstance(validator, validate.Range):
            assert validator.min_inclusive and validator.max_inclusive, where
            assert (prop.get("minimum"), prop.get("maximum")) == (validator.min, validator.max), where
        else:
            raise AssertionError(f"{where}: validator {validator!r} is not compared")
    if isinstance(field, fields.List):
        assert schema_types(spec, prop) == {"array"}, where
        inner = field.inner
        if isinstance(inner, fields.Nested):
            nested = inner.nested if isinstance(inner.nested, type) else type(inner.nested)
            items = prop["items"]
            assert items.get("$ref") == SCHEMAS + nested.__name__, where
            _check_input_schema(spec, nested, nested.__name__)
        else:
            _check_input(spec, inner, prop["items"], where + "[]")
    elif isinstance(field, fields.DateTime):
        assert schema_types(spec, prop) == {"string"} and prop.get("format") == "date-time", where
    elif isinstance(field, fields.String):
        assert schema_types(spec, prop) == {"string"}, where
    elif isinstance(field, fields.Boolean):
        assert schema_types(spec, prop) == {"boolean"}, where
    elif isinstance(field, fields.Float):
        assert schema_types(spec, prop) == {"number"}, where
    elif isinstance(field, fields.Integer):
        assert schema_types(spec, prop) == {"integer"}, where
    elif isinstance(field, fields.Nested):  # an object: its schema by reference (or that or null)
        nested = field.nested if isinstance(field.nested, type) else type(field.nested)
        refs = [raw.get("$ref")] + [alternative.get("$ref") for alternative in prop.get("anyOf", ())]
        assert SCHEMAS + nested.__name__ in refs, where
        _check_input_schema(spec, nested, nested.__name__)
    elif type(field).__name__ == "TextOrTexts":  # a governance condition's value: a string or strings
        kinds = {alternative.get("type") for alternative in prop["anyOf"]}
        items = prop["anyOf"][1]["items"]
        assert kinds == {"string", "array"} and items.get("type") == "string", where
    elif isinstance(field, fields.Dict):  # keys and values checked like fields
        assert schema_types(spec, prop) == {"object"}, where
        if field.key_field is not None and "propertyNames" in prop:
            _check_input(spec, field.key_field, {"type": "string", **prop["propertyNames"]}, where + "{key}")
        if field.value_field is not None and isinstance(prop.get("additionalProperties"), dict):
            _check_input(spec, field.value_field, prop["additionalProperties"], where + "{value}")
    else:
        raise AssertionError(f"{where}: {type(field).__name__} is not compared")


def _check_input_schema(spec: dict, schema_class: type, name: str) -> None:
    instance = schema_class()
    documented = spec["components"]["schemas"][name]
    assert set(documented["properties"]) == set(instance.fields), name
    assert set(documented.get("required", [])) == {n for n, f in instance.fields.items() if f.required}, name
    if instance.unknown == RAISE:
        assert documented.get("additionalProperties") is False, f"{name} refuses unknown fields"
    for field_name, field in instance.fields.items():
        _check_input(spec, field, documented["properties"][field_name], f"{name}.{field_name}")


@pytest.mark.parametrize("name", PATCH_SCHEMAS)
def test_patch_schemas_match_the_marshmallow_schemas(spec, name):
    _check_input_schema(spec, getattr(schemas, name), name)


@pytest.mark.parametrize("name", ["PolicyIn", "PolicyPatch", "ExemptionIn", "ExemptionPatch"])
def test_posture_input_schemas_match_the_marshmallow_schemas(spec, name):
    from gateway.api import posture

    _check_input_schema(spec, getattr(posture, name), name)


@pytest.mark.parametrize("name", ["ControlProfileIn", "ControlProfilePatch", "ControlStateUpdateIn"])
def test_score_input_schemas_match_the_marshmallow_schemas(spec, name):
    from gateway.api import score

    _check_input_schema(spec, getattr(score, name), name)


@pytest.mark.parametrize("name", ["GovernanceRuleIn", "GovernanceRulePatch", "GovernanceApplyIn",
                                  "GovernanceAssignmentIn", "GovernanceAssignmentPatch"])
def test_governance_input_schemas_match_the_marshmallow_schemas(spec, name):
    from gateway.api import governance

    _check_input_schema(spec, getattr(governance, name), name)


@pytest.mark.parametrize("name", ["ExportIn", "ExportPatch", "ExportReplayIn", "ExportRotateIn"])
def test_export_input_schemas_match_the_marshmallow_schemas(spec, name):
    from gateway.api import exports

    _check_input_schema(spec, getattr(exports, name), name)


def test_patch_operations_take_their_patch_schema_and_prefer(spec):
    for name, collection in COLLECTIONS.items():
        if collection.workflow is None:
            assert "patch" not in spec["paths"][COLLECTION_PATH + name]
            continue
        patch_schema = collection.workflow.patch_schema
        bulk = operation(spec, COLLECTION_PATH + name, "PATCH")
        assert deref(spec, bulk["requestBody"])["content"]["application/json"]["schema"]["$ref"] == (
            SCHEMAS + patch_schema.__name__)
        assert query_parameters(spec, COLLECTION_PATH + name, "PATCH")["$filter"]["required"] is True
        answer = bulk["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer["$ref"] == SCHEMAS + "BulkUpdated"
        path = f"{COLLECTION_PATH}{name}/{{item_id}}"
        op = operation(spec, path, "PATCH")
        body = deref(spec, op["requestBody"])
        assert body["required"] is True
        assert list(body["content"]) == ["application/json"]
        assert body["content"]["application/json"]["schema"]["$ref"] == SCHEMAS + patch_schema.__name__
        assert ("Prefer", "header") in parameters(spec, path, "PATCH")
        responses = op["responses"]
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"] == (
            SCHEMAS + OUT_FOR_COLLECTION[name])
        assert "content" not in responses["204"]


def test_the_batch_schemas_follow_the_pipeline(spec):
    from connectors.model import SEVERITIES
    from gateway.api.collections import IDENTIFIER_FIELDS
    from gateway.pipeline import COUNT_KEYS, OPEN_STATUSES, TERMINAL

    documented = spec["components"]["schemas"]
    from gateway.streaming import RECEIVING

    assert documented["BatchStatus"]["enum"] == [RECEIVING, *OPEN_STATUSES, *TERMINAL]
    assert list(documented["BatchOut"]["properties"]["counts"]["properties"]) == list(COUNT_KEYS)
    assert documented["Severity"]["enum"] == list(SEVERITIES)
    identifiers = deref(spec, documented["ResourceOut"]["properties"]["identifiers"])["properties"]
    assert list(identifiers) == list(IDENTIFIER_FIELDS)
    assert documented["ResourceSourceOut"]["properties"]["identifiers"] == {"$ref": SCHEMAS + "Identifiers"}


def test_every_error_answer_is_documented_with_its_body(app, spec):
    for path, method, op in operations(spec):
        responses = op["responses"]
        assert "500" in responses, f"{method} {path}: unhandled errors answer 500"
        assert "400" in responses, f"{method} {path}: a NUL character anywhere in a request answers 400"
        assert "503" in responses, f"{method} {path}: the store being down answers 503"
        if op["security"]:
            assert {"401", "403"} <= set(responses), f"{method} {path}"
            unauthorized = deref(spec, responses["401"])
            assert unauthorized["headers"]["WWW-Authenticate"]["$ref"].endswith("/WWWAuthenticateBearer")
        if "{tenant}" in path:
            assert "404" in responses, f"{method} {path}: an unknown tenant answers 404"
        for status, response in responses.items():
            if not status.startswith(("4", "5")):
                continue
            content = deref(spec, response)["content"]
            assert list(content) == ["application/json"], (method, path, status)
            expected = NON_ERROR_BODIES.get((path, status), "Error")
            assert content["application/json"]["schema"]["$ref"] == SCHEMAS + expected, (method, path, status)


def _error_classes() -> list[type]:
    found, pending = [], [APIError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def gateway_error_codes() -> set[str]:
    """Every ``error.code`` the gateway's own views and handlers can answer."""
    from gateway.errors import _HTTP_CODES

    classes = _error_classes()
    codes = {cls.code for cls in classes} | set(_HTTP_CODES.values())
    names = {cls.__name__ for cls in classes}
    for source in sorted(Path(gateway.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = getattr(func, "id", None) or getattr(func, "attr", "")
            if called in names:
                codes.update(k.value.value for k in node.keywords
                             if k.arg == "code" and isinstance(k.value, ast.Constant))
            elif called == "error_body" and node.args and isinstance(node.args[0], ast.Constant):
                codes.add(node.args[0].value)
            elif (called == "get" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                  and func.value.id == "_HTTP_CODES" and len(node.args) == 2
                  and isinstance(node.args[1], ast.Constant)):
                codes.add(node.args[1].value)
    return codes


def test_the_error_codes_are_those_the_gateway_answers(spec):
    code = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert sorted(code["examples"]) == sorted(gateway_error_codes())


# -- live checks -------------------------------------------------------------------------------


def check(spec: dict, registry: Registry, response, path: str, method: str) -> Any:
    """The answer's status is documented for the operation, and its body and headers validate."""
    op = operation(spec, path, method)
    status = str(response.status_code)
    assert status in op["responses"], (
        f"{method} {path} answered {status}, not documented: {response.get_data(as_text=True)[:300]}")
    documented = deref(spec, op["responses"][status])
    content = documented.get("content")
    body = None
    if content is None:
        assert response.get_data() == b"", f"{method} {path} {status} has no documented body"
    else:
        assert response.mimetype in content, (method, path, status, response.mimetype)
        body = response.get_json() if response.is_json else response.get_data(as_text=True)
        errors = schema_errors(registry, content[response.mimetype]["schema"], body)
        assert not errors, f"{method} {path} {status}: {errors} in {body}"
    for name, header in documented.get("headers", {}).items():
        header = deref(spec, header)
        value = response.headers.get(name)
        if header.get("required"):
            assert value is not None, f"{method} {path} {status}: no {name} header"
        if value is not None:
            assert not schema_errors(registry, header["schema"], value), (method, path, status, name, value)
    return body


def test_an_unauthenticated_collection_read_answers_the_documented_401(app, spec, registry):
    response = app.test_client().get("/api/v1/tenants/anyone/security/findings")
    assert response.status_code == 401
    body = check(spec, registry, response, "/api/v1/tenants/{tenant}/security/findings", "GET")
    assert not schema_errors(registry, {"$ref": SCHEMAS + "Error"}, body)
    assert body["error"]["code"] == "unauthenticated"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'


def test_the_server_metadata_matches_its_schema(app, spec, registry):
    response = app.test_client().get("/.well-known/oauth-authorization-server")
    assert response.status_code == 200
    body = check(spec, registry, response, "/.well-known/oauth-authorization-server", "GET")
    documented = {(path, method) for path, method, _ in operations(spec)}
    for key in ("token_endpoint", "revocation_endpoint", "introspection_endpoint"):
        assert (urlsplit(body[key]).path, "POST") in documented, key


def test_the_probes_answer_as_documented(app, spec, registry):
    http = app.test_client()
    check(spec, registry, http.get("/healthz"), "/healthz", "GET")
    check(spec, registry, http.get("/readyz"), "/readyz", "GET")


T = "/api/v1/tenants/{tenant}"
ACME = "/api/v1/tenants/acme"
CANONICAL = {
    "scan": {"type": "full"},
    "findings": [
        {"id": "r-1", "resource": {"hostname": "web-1", "ipv4": ["10.0.0.5"]}, "title": "xz backdoor",
         "severity": "critical", "cves": ["CVE-2024-3094"], "cvssScore": 10.0,
         "firstSeen": "2024-03-29T10:00:00Z", "lastSeen": "2024-04-01T10:00:00Z"},
        {"id": "r-2", "resource": {"hostname": "web-1"}, "title": "weak TLS", "severity": "low",
         "kind": "compliance"},
        {"id": "r-3", "resource": {"hostname": "web-1"}, "title": "no severity"},
    ],
}
GRAPH_ALERTS = {"value": [{
    "id": "alert-1", "title": "Suspicious sign-in", "severity": "high", "status": "newAlert",
    "category": "CredentialAccess", "createdDateTime": "2024-04-01T10:00:00Z",
    "lastModifiedDateTime": "2024-04-01T11:00:00Z", "recommendedActions": ["Reset the password"],
    "hostStates": [{"fqdn": "web-1.contoso.com"}],
    "vendorInformation": {"provider": "Contoso", "vendor": "Contoso"},
}]}


SUPPRESSION_RULE = {"name": "lab-scans", "alertType": "CredentialAccess", "reason": "BenignPositive",
                    "comment": "the red team's lab", "expirationDateUtc": "2099-01-01T00:00:00Z",
                    "suppressionAlertsScope": {"allOf": [
                        {"field": "entities.host.fqdn", "in": ["lab-1.contoso.com", "lab-2.contoso.com"]},
                        {"field": "alert.title", "contains": "scan"}]}}


class World:
    """A tenant, three clients, their tokens, and a test client that checks every answer."""

    def __init__(self, app, spec, registry) -> None:
        self.app = app
        self.spec = spec
        self.registry = registry
        self.http = app.test_client()
        self.db = app.extensions["gateway.db"]
        with self.db.session() as session:
            session.add(Tenant(external_id="acme", name="Acme"))
        self.writer = self.client("contoso", "findings.write alerts.write security.read alerts.manage "
                                                "posture.manage exports.manage admin indicators.write")
        self.reader = self.client("reader", "security.read")
        self.auth = {"Authorization": "Bearer " + self.token(self.writer)}
        self.read_only = {"Authorization": "Bearer " + self.token(self.reader)}
        self.posture = {"Authorization": "Bearer " + self.token(self.client("poster", "posture.manage"))}

    def client(self, provider: str, scopes: str) -> tuple[str, str]:
        client_id, secret = f"{provider}-client", f"{provider}-secret-value"
        with self.db.session() as session:
            row = OAuthClient(client_id=client_id, secret_hash=hash_secret(secret), name=provider,
                              provider=provider, scope=scopes)
            session.add(row)
            session.flush()
            tenant = session.query(Tenant).filter_by(external_id="acme").one()
            session.add(ClientTenant(client_pk=row.id, tenant_id=tenant.id))
        return client_id, secret

    @staticmethod
    def basic(credentials: tuple[str, str]) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(":".join(credentials).encode()).decode()}

    def token(self, credentials: tuple[str, str]) -> str:
        body, _ = self.call("POST", "/oauth/token", "/oauth/token", 200,
                            data={"grant_type": "client_credentials"}, headers=self.basic(credentials))
        return body["access_token"]

    def call(self, method: str, path: str, url: str, status: int, **kwargs) -> tuple[Any, Any]:
        """Call ``url``; its answer must have ``status`` and match the spec of ``method path``."""
        response = self.http.open(url, method=method, **kwargs)
        assert response.status_code == status, (method, url, response.status_code,
                                                response.get_data(as_text=True)[:500])
        return check(self.spec, self.registry, response, path, method), response

    def push(self, query: str, status: int, body: bytes, content_type: str = "application/json",
             headers: dict | None = None) -> Any:
        headers = self.auth if headers is None else headers
        return self.call("POST", T + "/batches", f"{ACME}/batches?{query}", status, data=body,
                         content_type=content_type, headers=headers)[0]


@pytest.fixture(scope="module")
def world(app, spec, registry) -> World:
    celery = app.extensions["celery"]  # enqueue on this app's in-memory broker, not another test's
    celery.set_current()
    celery.set_default()
    return World(app, spec, registry)


@pytest.fixture(scope="module")
def merged(world) -> dict:
    """A canonical batch (and a Graph alert batch, when that connector is registered), merged."""
    from gateway.pipeline import process_batch

    accepted = world.push("format=canonical", 202, json.dumps(CANONICAL).encode())
    process_batch(world.db, int(accepted["id"]))
    observe(world.db, "acme", "contoso", [
        ObservationRecord(provider_id="11936", resource=ResourceRef(hostname="web-1", host_key="web-1"),
                          name="OS Identification", category="os", value="Linux Kernel 5.15",
                          vendor_id="11936"),
        ObservationRecord(provider_id="10107", resource=ResourceRef(hostname="web-1", host_key="web-1"),
                          name="HTTP Server Type and Version", category="port", port=443, protocol="tcp")])
    if "graph_alert" in connectors.formats():
        alerts = world.push("format=graph_alert", 202, json.dumps(GRAPH_ALERTS).encode())
        process_batch(world.db, int(alerts["id"]))
    # threat-intelligence indicators (gateway/intel/), so that their collection has items
    indicators = world.push("format=graph_tiindicator", 202, json.dumps([{
        "externalId": "ti-1", "targetProduct": "Azure Sentinel", "threatType": "C2", "tlpLevel": "green",
        "confidence": 60, "expirationDateTime": "2099-01-01T00:00:00Z", "networkIPv4": "203.0.113.5",
        "tags": ["apt"]}]).encode())
    process_batch(world.db, int(indicators["id"]))
    # a policy entry and an exemption, so that their collections have items
    world.call("POST", T + "/security/policies", f"{ACME}/security/policies", 201, headers=world.auth,
               json={"scope": "provider", "target": "nobody", "enabled": False})
    world.call("POST", T + "/security/exemptions", f"{ACME}/security/exemptions", 201, headers=world.auth,
               json={"displayName": "web-1", "category": "waiver", "resourceFilter": "name eq 'web-1'"})
    world.call("POST", T + "/security/alertSuppressionRules", f"{ACME}/security/alertSuppressionRules", 201,
               json=SUPPRESSION_RULE, headers=world.posture)
    # a governance rule and an assignment, so that theirs have items
    world.call("POST", T + "/security/governanceRules", f"{ACME}/security/governanceRules", 201,
               headers=world.auth,
               json={"displayName": "everything", "rulePriority": 100, "conditionSets": [],
                     "ownerSource": {"type": "Manually", "value": "sam@contoso.com"},
                     "remediationTimeframe": "7.00:00:00"})
    unhealthy = world.call("GET", T + "/security/recommendations", f"{ACME}/security/recommendations", 200,
                           headers=world.auth,
                           query_string={"$filter": "actualStatus eq 'Unhealthy'"})[0]["value"]
    world.call("POST", T + "/security/governanceAssignments", f"{ACME}/security/governanceAssignments", 201,
               headers=world.auth, json={"recommendationId": unhealthy[0]["id"], "owner": "sam@contoso.com",
                                         "remediationDueDate": "2001-01-01T00:00:00Z"})
    return accepted


def test_the_posture_endpoints_answer_as_documented(world, merged):
    call, auth = world.call, world.auth
    policies, exemptions = f"{ACME}/security/policies", f"{ACME}/security/exemptions"
    entry = call("POST", T + "/security/policies", policies, 201, headers=auth,
                 json={"scope": "recommendationType", "target": "x-type", "severity": "low"})[0]
    call("POST", T + "/security/policies", policies, 409, headers=auth,
         json={"scope": "recommendationType", "target": "x-type", "enabled": True})
    call("POST", T + "/security/policies", policies, 400, headers=auth, json={"scope": "x", "target": "y"})
    call("POST", T + "/security/policies", policies, 403, headers=world.read_only,
         json={"scope": "provider", "target": "y", "enabled": True})
    one = T + "/security/policies/{item_id}"
    call("PATCH", one, f"{policies}/{entry['id']}", 200, headers=auth, json={"enabled": False})
    call("PATCH", one, f"{policies}/{entry['id']}", 400, headers=auth, json={"scope": "control"})
    call("PATCH", one, f"{policies}/999999", 404, headers=auth, json={"enabled": False})
    call("DELETE", one, f"{policies}/{entry['id']}", 204, headers=auth)
    call("DELETE", one, f"{policies}/{entry['id']}", 404, headers=auth)
    made = call("POST", T + "/security/exemptions", exemptions, 201, headers=auth,
                json={"displayName": "none", "category": "mitigated", "resourceFilter": "name eq 'zzz'",
                      "expiresOn": "2099-01-01T00:00:00Z"})[0]
    assert made["matchedRecommendationCount"] == 0
    call("POST", T + "/security/exemptions", exemptions, 400, headers=auth, json={"displayName": "x"})
    one = T + "/security/exemptions/{item_id}"
    call("PATCH", one, f"{exemptions}/{made['id']}", 200, headers=auth, json={"description": "checked"})
    call("PATCH", one, f"{exemptions}/{made['id']}", 200, headers=auth,
         json={"expiresOn": "2001-01-01T00:00:00Z"})
    call("PATCH", one, f"{exemptions}/{made['id']}", 409, headers=auth, json={"description": "again"})
    call("DELETE", one, f"{exemptions}/{made['id']}", 204, headers=auth)
    call("DELETE", one, f"{exemptions}/{made['id']}", 404, headers=auth)


def test_the_score_endpoints_answer_as_documented(world, merged):
    call, auth, reader = world.call, world.auth, world.read_only
    listing = T + "/security/secureScoreControlProfiles"
    one = listing + "/{item_id}"
    profiles = f"{ACME}/security/secureScoreControlProfiles"
    made, response = call("POST", listing, profiles, 201, headers=auth,
                          json={"title": "Own control", "maxScore": 3, "controlCategory": "Apps"})
    assert made["id"] == "own-control" and response.headers["Location"].endswith(f"{profiles}/own-control")
    call("POST", listing, profiles, 409, headers=auth, json={"title": "Own control", "maxScore": 1})
    call("POST", listing, profiles, 409, headers=auth, json={"id": "enable-mfa", "title": "x", "maxScore": 1})
    call("POST", listing, profiles, 400, headers=auth, json={"title": "", "maxScore": 1})
    call("POST", listing, profiles, 400, headers=auth, json={"title": "x", "maxScore": "many"})
    call("POST", listing, profiles, 403, headers=reader, json={"title": "x", "maxScore": 1})
    call("POST", listing, profiles, 401, json={"title": "x", "maxScore": 1})
    call("POST", listing, "/api/v1/tenants/nobody/security/secureScoreControlProfiles", 404, headers=auth,
         json={"title": "x", "maxScore": 1})
    own = f"{profiles}/own-control"
    changed = call("PATCH", one, own, 200, headers=auth, json={
        "maxScore": 4,
        "controlStateUpdates": [{"state": "Reviewed", "comment": "checked", "assignedTo": "sam"}]})[0]
    assert changed["maxScore"] == 4.0 and changed["state"] == "Reviewed"
    for state in ("Ignored", "ThirdParty", "Default"):
        call("PATCH", one, f"{profiles}/enable-mfa", 200, headers=auth,
             json={"controlStateUpdates": [{"state": state}]})
    call("PATCH", one, f"{profiles}/enable-mfa", 400, headers=auth, json={"title": "mine now"})
    call("PATCH", one, f"{profiles}/enable-mfa", 400, headers=auth, json={"controlStateUpdates": [{}]})
    call("PATCH", one, f"{profiles}/nothing", 404, headers=auth, json={"maxScore": 1})
    call("PATCH", one, own, 403, headers=reader, json={"maxScore": 1})
    entry = call("POST", T + "/security/policies", f"{ACME}/security/policies", 201, headers=auth,
                 json={"scope": "recommendationType", "target": "own-type", "control": "own-control"})[0]
    call("DELETE", one, own, 409, headers=auth)
    call("DELETE", one, f"{profiles}/enable-mfa", 409, headers=auth)
    call("DELETE", one, own, 403, headers=reader)
    call("DELETE", T + "/security/policies/{item_id}", f"{ACME}/security/policies/{entry['id']}", 204,
         headers=auth)
    call("DELETE", one, own, 204, headers=auth)
    call("DELETE", one, own, 404, headers=auth)

    scoped, url = T + "/security/secureScores/scoped", f"{ACME}/security/secureScores/scoped"
    body = call("GET", scoped, url, 200, headers=reader, query_string={"resourceFilter": "id ne '0'"})[0]
    assert body["resourceCount"] >= 1
    nothing = call("GET", scoped, url, 200, headers=reader,
                   query_string={"resourceFilter": "name eq 'zzz'"})[0]
    assert (nothing["resourceCount"], nothing["maxScore"], nothing["controlScores"]) == (0, 0.0, [])
    for bad in ({"resourceFilter": "nothing eq 1"}, {}, {"resourceFilter": "name eq"},
                {"resourceFilter": "id ne '0'", "$top": "1"}):
        call("GET", scoped, url, 400, headers=reader, query_string=bad)
    call("GET", scoped, url, 401, query_string={"resourceFilter": "id ne '0'"})
    call("GET", scoped, "/api/v1/tenants/nobody/security/secureScores/scoped", 404, headers=reader,
         query_string={"resourceFilter": "id ne '0'"})


def test_the_governance_endpoints_answer_as_documented(world, merged):
    call, auth = world.call, world.auth
    rules, assignments = f"{ACME}/security/governanceRules", f"{ACME}/security/governanceAssignments"
    body = {"displayName": "high", "rulePriority": 7, "isGracePeriod": True,
            "conditionSets": [{"conditions": [{"property": "severity", "operator": "In", "value": ["high"]},
                                              {"property": "resourceFilter", "operator": "Matches",
                                               "value": "name eq 'nothing'"}]}],
            "ownerSource": {"type": "ByTag", "value": "owner"}, "remediationTimeframe": "1.12:00:00",
            "governanceEmailNotification": {"disableManagerEmailNotification": True}}
    rule = call("POST", T + "/security/governanceRules", rules, 201, headers=auth, json=body)[0]
    assert rule["matchedRecommendationCount"] == 0
    call("POST", T + "/security/governanceRules", rules, 409, headers=auth, json=body)
    call("POST", T + "/security/governanceRules", rules, 400, headers=auth, json={**body, "rulePriority": -1})
    call("POST", T + "/security/governanceRules", rules, 403, headers=world.read_only, json=body)
    one = T + "/security/governanceRules/{item_id}"
    call("PATCH", one, f"{rules}/{rule['id']}", 200, headers=auth, json={"description": "checked"})
    call("PATCH", one, f"{rules}/{rule['id']}", 400, headers=auth, json={"remediationTimeframe": "soon"})
    call("PATCH", one, f"{rules}/{rule['id']}", 409, headers=auth, json={"rulePriority": 100})
    call("PATCH", one, f"{rules}/999999", 404, headers=auth, json={"description": "x"})
    apply = T + "/security/governanceRules/{item_id}/apply"
    counted = call("POST", apply, f"{rules}/{rule['id']}/apply", 200, headers=auth, json={"dryRun": True})[0]
    assert counted == {"id": rule["id"], "dryRun": True, "assignedCount": 0}
    call("POST", apply, f"{rules}/{rule['id']}/apply", 200, headers=auth)
    call("POST", apply, f"{rules}/{rule['id']}/apply", 400, headers=auth, json={"dryRun": "maybe"})
    call("POST", apply, f"{rules}/999999/apply", 404, headers=auth)
    call("PATCH", one, f"{rules}/{rule['id']}", 200, headers=auth, json={"isDisabled": True})
    call("POST", apply, f"{rules}/{rule['id']}/apply", 409, headers=auth)
    call("DELETE", one, f"{rules}/{rule['id']}", 204, headers=auth)
    call("DELETE", one, f"{rules}/{rule['id']}", 404, headers=auth)

    # the fixture's assignment is past due, but its recommendation is exempt (NotApplicable): not overdue
    recommendations = call("GET", T + "/security/recommendations", f"{ACME}/security/recommendations", 200,
                           headers=auth,
                           query_string={"$filter": "governance/assignmentId ne null"})[0]["value"]
    assert len(recommendations) == 1 and recommendations[0]["governance"]["isOverdue"] is False
    assert call("GET", T + "/security/recommendations", f"{ACME}/security/recommendations", 200, headers=auth,
                query_string={"$filter": "governance/isOverdue eq true"})[0]["value"] == []
    existing = recommendations[0]["governance"]["assignmentId"]
    call("POST", T + "/security/governanceAssignments", assignments, 409, headers=auth,
         json={"recommendationId": recommendations[0]["id"], "owner": "kim@contoso.com",
               "remediationDueDate": "2030-01-01T00:00:00Z"})
    call("POST", T + "/security/governanceAssignments", assignments, 400, headers=auth, json={"owner": "kim"})
    one = T + "/security/governanceAssignments/{item_id}"
    changed = call("PATCH", one, f"{assignments}/{existing}", 200, headers=auth, json={
        "remediationEta": {"eta": "2030-01-01T00:00:00Z", "justification": "window"},
        "additionalData": {"ticketNumber": 12, "ticketLink": "https://itsm.contoso.com/12"}})[0]
    assert changed["remediationEta"]["justification"] == "window"
    call("PATCH", one, f"{assignments}/{existing}", 400, headers=auth, json={"owner": ""})
    call("PATCH", one, f"{assignments}/999999", 404, headers=auth, json={"owner": "x"})
    findings = call("GET", T + "/security/findings", f"{ACME}/security/findings", 200,
                    headers=world.read_only,
                    query_string={"$filter": "governance/owner eq 'sam@contoso.com'"})[0]["value"]
    assert findings and {f["governance"]["assignmentId"] for f in findings} == {existing}


def test_the_export_endpoints_answer_as_documented(world, merged):
    from gateway.export import events as outbox
    from tests.receiver import Receiver

    call, auth = world.call, world.auth
    exports, one = f"{ACME}/exports", T + "/exports/{export_id}"
    call("POST", T + "/exports", exports, 400, headers=auth,  # loopback, and the setting is off by default
         json={"displayName": "local", "url": "http://127.0.0.1:9/hook"})
    receiver = Receiver()
    world.app.config["EXPORT_ALLOW_PRIVATE_TARGETS"] = True
    try:
        made, response = call("POST", T + "/exports", exports, 201, headers=auth, json={
            "displayName": "SIEM", "url": receiver.url, "eventTypes": ["finding.*", "alert.*"],
            "filter": "severity ge 'medium'", "batchSize": 10})
        receiver.secrets.append(made["secret"])
        url = f"{exports}/{made['id']}"
        assert response.headers["Location"].endswith(url)
        call("POST", T + "/exports", exports, 400, headers=auth, json={"displayName": "x"})
        call("POST", T + "/exports", exports, 400, headers=auth,
             json={"displayName": "x", "url": receiver.url, "filter": "nothing eq 1"})
        call("POST", T + "/exports", exports, 400, headers=auth,
             json={"displayName": "x", "url": receiver.url, "secret": "not-a-secret"})
        call("POST", T + "/exports", exports, 403, headers=world.read_only,
             json={"displayName": "x", "url": receiver.url})
        call("POST", T + "/exports", "/api/v1/tenants/nobody/exports", 404, headers=auth,
             json={"displayName": "x", "url": receiver.url})
        listed = call("GET", T + "/exports", exports, 200, headers=auth)[0]
        assert [item["id"] for item in listed["value"]] == [made["id"]]
        call("GET", T + "/exports", exports, 400, headers=auth, query_string={"x": "1"})
        shown, response = call("GET", one, url, 200, headers=auth)
        assert "secret" not in shown and response.headers["ETag"] == shown["etag"]
        call("GET", one, f"{exports}/999999", 404, headers=auth)
        call("GET", one, f"{exports}/x", 404, headers=auth)
        call("PATCH", one, url, 428, headers=auth, json={"batchSize": 2})
        call("PATCH", one, url, 412, headers=auth | {"If-Match": '"0.0"'}, json={"batchSize": 2})
        changed, response = call("PATCH", one, url, 200, headers=auth | {"If-Match": shown["etag"]},
                                 json={"batchSize": 2, "state": "paused"})
        assert changed["state"] == "paused" and response.headers["ETag"] != shown["etag"]
        call("PATCH", one, url, 400, headers=auth | {"If-Match": "*"}, json={"batchSize": 0})
        call("PATCH", one, url, 400, headers=auth | {"If-Match": "*"}, json={})
        tested = call("POST", one + "/test", url + "/test", 200, headers=auth)[0]
        assert tested["delivered"] is True and tested["statusCode"] == 200
        rotated = call("POST", one + "/rotateSecret", url + "/rotateSecret", 200, headers=auth)[0]
        assert rotated["secret"] != made["secret"] and rotated["previousSecretExpiresDateTime"]
        call("POST", one + "/rotateSecret", url + "/rotateSecret", 400, headers=auth, json={"secret": "x"})
        outbox.sequence_events(world.db)
        with world.db.engine.connect() as conn:
            first = conn.execute(select(outbox.EV.c.id).order_by(outbox.EV.c.id).limit(1)).scalar_one()
        replay = (one + "/replay", url + "/replay")
        replayed = call("POST", *replay, 202, headers=auth, json={"since": str(first)})[0]
        assert replayed["replay"]["fromEventId"] == str(first)
        call("POST", *replay, 202, headers=auth, json={"since": "2024-01-01T00:00:00Z"})
        call("POST", one + "/replay", url + "/replay", 400, headers=auth, json={"since": "whenever"})
        log = call("GET", one + "/deliveries", url + "/deliveries", 200, headers=auth)[0]
        assert [item["outcome"] for item in log["value"]] == ["test"]
        call("GET", one + "/deliveries", f"{exports}/999999/deliveries", 404, headers=auth)
        events = call("GET", T + "/security/events", f"{ACME}/security/events", 200, headers=world.read_only,
                      query_string={"$filter": "sequence gt 0", "$orderby": "sequence"})[0]
        assert events["value"] and events["value"][0]["id"] == str(first)
        world.app.config["EXPORT_ALLOW_PRIVATE_TARGETS"] = False
        call("PATCH", one, url, 400, headers=auth | {"If-Match": "*"}, json={"url": "http://10.1.2.3/"})
        current = call("GET", one, url, 200, headers=auth)[0]
        call("DELETE", one, url, 428, headers=auth)
        call("DELETE", one, url, 412, headers=auth | {"If-Match": shown["etag"]})
        call("DELETE", one, url, 204, headers=auth | {"If-Match": current["etag"]})
        call("DELETE", one, url, 404, headers=auth | {"If-Match": current["etag"]})
    finally:
        world.app.config["EXPORT_ALLOW_PRIVATE_TARGETS"] = False
        receiver.stop()


def observe(db, tenant: str, provider: str, observations: list) -> None:
    """Observations merged as a batch's merge does (the connectors that emit them may come later)."""
    from gateway.merge.findings import FindingMerger
    from gateway.models import utcnow

    with db.engine.begin() as conn:
        tenant_id = conn.execute(select(Tenant.id).where(Tenant.external_id == tenant)).scalar_one()
        merger = FindingMerger(conn, tenant_id, provider, None, utcnow(), "test", product="Nessus",
                               format="nessus")
        merger.merge_chunk([], observations)


def test_the_oauth_endpoints_answer_as_documented(world):
    call, grant = world.call, {"grant_type": "client_credentials"}
    reader_id, reader_secret = world.reader
    post = grant | {"client_id": reader_id, "client_secret": reader_secret}
    call("POST", "/oauth/token", "/oauth/token", 200, data=post)
    call("POST", "/oauth/token", "/oauth/token", 401, data=post | {"client_secret": "wrong"})
    call("POST", "/oauth/token", "/oauth/token", 400, data=post | {"scope": "nonsense"})
    call("POST", "/oauth/token", "/oauth/token", 400, data=post | {"scope": "admin"})
    call("POST", "/oauth/token", "/oauth/token", 400, data=post | {"grant_type": "password"})

    writer = world.basic(world.writer)
    token = world.auth["Authorization"].split()[1]
    introspect = "/oauth/introspect"
    seen, _ = call("POST", introspect, introspect, 200, data={"token": token}, headers=writer)
    assert seen["active"] is True and seen["client_id"] == world.writer[0]
    seen, _ = call("POST", "/oauth/introspect", "/oauth/introspect", 200, data={"token": token},
                   headers=world.basic(world.reader))
    assert seen == {"active": False}, "a client without admin sees only its own tokens"
    call("POST", "/oauth/introspect", "/oauth/introspect", 400, data={}, headers=writer)
    call("POST", "/oauth/introspect", "/oauth/introspect", 401, data={"token": token})

    spare = world.token(world.writer)
    other = world.basic(world.reader)
    call("POST", "/oauth/revoke", "/oauth/revoke", 400, data={"token": spare}, headers=other)
    call("POST", "/oauth/revoke", "/oauth/revoke", 401, data={"token": spare})
    call("POST", "/oauth/revoke", "/oauth/revoke", 200, data={"token": spare}, headers=writer)
    call("POST", "/oauth/revoke", "/oauth/revoke", 200, data={"token": "unknown"}, headers=writer)
    revoked = {"Authorization": f"Bearer {spare}"}
    _, response = call("GET", T + "/security/findings", f"{ACME}/security/findings", 401, headers=revoked)
    assert "invalid_token" in response.headers["WWW-Authenticate"]


def test_the_ingest_endpoints_answer_as_documented(world, merged):
    document = json.dumps(CANONICAL).encode()
    first = world.push("format=canonical", 202, document, headers=world.auth | {"Idempotency-Key": "k-1"})
    again, response = world.call("POST", T + "/batches", f"{ACME}/batches?format=canonical", 202,
                                 data=document, content_type="application/json",
                                 headers=world.auth | {"Idempotency-Key": "k-1"})
    assert again["id"] == first["id"] and response.headers["Idempotent-Replayed"] == "true"
    assert response.headers["Location"] == again["statusUrl"]
    world.push("format=canonical", 409, document + b" ", headers=world.auth | {"Idempotency-Key": "k-1"})
    gzipped = world.call("POST", T + "/batches", f"{ACME}/batches?format=canonical&scanType=incremental", 202,
                         data=gzip.compress(document), content_type="application/json",
                         headers=world.auth | {"Content-Encoding": "gzip"})[0]
    assert gzipped["format"] == "canonical" and gzipped["scanType"] == "incremental"
    detected = world.push("format=auto", 202, document, headers=world.auth | {"Idempotency-Key": "k-auto"})
    assert detected["format"] == "canonical" and detected["scanType"] == "full"

    world.push("", 400, document)  # no format
    world.push("format=nonsense", 400, document)
    world.push("format=canonical&scanType=sometimes", 400, document)
    world.push("format=canonical", 400, b"[]")
    world.push("format=canonical", 400, b"")
    world.push("format=canonical", 415, document, content_type="text/plain")
    world.push("format=canonical", 415, document, headers=world.auth | {"Content-Encoding": "br"})
    world.push("format=canonical", 403, document, headers=world.read_only)
    world.push("format=canonical", 401, document, headers={})
    world.call("POST", T + "/batches", "/api/v1/tenants/nobody/batches?format=canonical", 404, data=document,
               content_type="application/json", headers=world.auth)
    limit = world.app.config["MAX_BODY_BYTES"]
    world.app.config["MAX_BODY_BYTES"] = 16
    try:
        world.push("format=canonical", 413, document)
    finally:
        world.app.config["MAX_BODY_BYTES"] = limit

    batch = T + "/batches/{batch_id}"
    world.call("GET", batch, f"{ACME}/batches/{first['id']}", 200, headers=world.read_only)
    done = world.call("GET", batch, f"{ACME}/batches/{merged['id']}", 200, headers=world.auth)[0]
    assert done["status"] == "partiallySucceeded" and done["rejections"], done
    world.call("GET", batch, f"{ACME}/batches/999999", 404, headers=world.auth)
    world.call("GET", batch, f"{ACME}/batches/not-an-id", 404, headers=world.auth)
    world.call("GET", batch, f"{ACME}/batches/{merged['id']}", 401)
    listed = world.call("GET", T + "/batches", f"{ACME}/batches?$top=1", 200, headers=world.auth)[0]
    assert listed["value"] and "@odata.nextLink" in listed
    world.call("GET", T + "/batches", f"{ACME}/batches?status=nope", 400, headers=world.auth)
    world.call("GET", T + "/batches", "/api/v1/tenants/nobody/batches", 404, headers=world.auth)
    rejections = T + "/batches/{batch_id}/rejections"
    page = world.call("GET", rejections, f"{ACME}/batches/{merged['id']}/rejections", 200,
                      headers=world.auth)[0]
    assert page["@odata.count"] == done["counts"]["rejected"] == len(page["value"])
    world.call("GET", rejections, f"{ACME}/batches/{merged['id']}/rejections?$top=0", 400, headers=world.auth)
    world.call("GET", rejections, f"{ACME}/batches/999999/rejections", 404, headers=world.auth)


@pytest.mark.parametrize("name", sorted(COLLECTIONS))
def test_the_collections_answer_as_documented(world, merged, name):
    path, url = f"{T}/security/{name}", f"{ACME}/security/{name}"
    listing = world.call("GET", path, url, 200, headers=world.read_only)[0]
    if name not in ("alerts", "alerts_v2") or "graph_alert" in connectors.formats():
        assert listing["value"], f"the merged batch gave no {name}"
    for item in listing["value"]:
        world.call("GET", path + "/{item_id}", f"{url}/{item['id']}", 200, headers=world.read_only)
        world.call("GET", path + "/{item_id}", f"{url}/{item['id']}", 200, headers=world.read_only,
                   query_string={"$select": "id"})
    world.call("GET", path + "/{item_id}", f"{url}/999999", 404, headers=world.read_only)
    world.call("GET", path + "/{item_id}", f"{url}/x", 404, headers=world.read_only)
    world.call("GET", path + "/{item_id}", f"{url}/1", 400, headers=world.read_only,
               query_string={"$select": "x"})
    for bad in ({"$orderby": "nothing"}, {"$top": "0"}, {"unknown": "1"}, {"$skiptoken": "forged"},
                {"$filter": "nothing eq 1"}, {"$filter": "id eq"}, {"$select": "nothing"}, {"$skip": "10001"},
                {"$count": "yes"}, {"$format": "xml"}, {"$format": "csv", "$top": "1"}):
        world.call("GET", path, url, 400, headers=world.read_only, query_string=bad)
    world.call("GET", path, f"/api/v1/tenants/nobody/security/{name}", 404, headers=world.read_only)

    collection = COLLECTIONS[name]
    order = ",".join(f"{field} desc" for field in collection.order_fields)
    query = {"$top": "1", "$orderby": order, "$count": "true", "$filter": "id ne '0'", "$skip": "0",
             "$select": ",".join(collection.selectable[1:3])}
    page = world.call("GET", path, url, 200, headers=world.read_only, query_string=query)[0]
    assert page["@odata.count"] == len(listing["value"])
    while "@odata.nextLink" in page:
        page = world.call("GET", path, page["@odata.nextLink"], 200, headers=world.read_only)[0]
    exported, response = world.call("GET", path, url, 200, headers=world.read_only,
                                    query_string={"$format": "csv", "$orderby": order})
    assert response.mimetype == "text/csv" and exported.startswith(",".join(collection.selectable))
    world.call("GET", path, url, 200, headers=world.read_only | {"Accept": "text/csv"})


def test_the_workflow_endpoints_answer_as_documented(world, merged):
    bodies = {"FindingPatch": {"statusOverride": "riskAccepted", "assignedTo": "sam",
                               "comments": [{"text": "accepted until the next release"}], "tags": ["prod"]},
              "AlertPatch": {"status": "resolved", "feedback": "truePositive", "assignedTo": "sam",
                             "comments": [{"text": "contained"}], "tags": ["p1"]}}
    for name, collection in COLLECTIONS.items():
        if collection.workflow is None:
            continue
        path, url = f"{T}/security/{name}/{{item_id}}", f"{ACME}/security/{name}"
        items = world.call("GET", f"{T}/security/{name}", url, 200, headers=world.read_only)[0]["value"]
        body = bodies[collection.workflow.patch_schema.__name__]
        for item in items[:1]:
            item_url = f"{url}/{item['id']}"
            edited = world.call("PATCH", path, item_url, 200, json=body,
                                headers=world.auth | {"Prefer": "return=representation"})[0]
            assert edited["assignedTo"] == "sam"
            world.call("PATCH", path, item_url, 204, json={"assignedTo": None}, headers=world.auth)
            world.call("PATCH", path, item_url, 400, json={"unknown": 1}, headers=world.auth)
            world.call("PATCH", path, item_url, 400, json={}, headers=world.auth)
            world.call("PATCH", path, item_url, 403, json=body, headers=world.read_only)
            world.call("PATCH", path, item_url, 401, json=body)
            history, _ = world.call("GET", path + "/history", item_url + "/history", 200,
                                    headers=world.read_only)
            assert history["value"][-1]["event"] == "edited"
        world.call("PATCH", path, f"{url}/999999", 404, json=body, headers=world.auth)
        world.call("GET", path + "/history", f"{url}/999999/history", 404, headers=world.read_only)

        bulk = f"{T}/security/{name}"
        everything = {"$filter": "id ne '0'"}
        done = world.call("PATCH", bulk, url, 200, json={"assignedTo": "sam"}, headers=world.auth,
                          query_string=everything)[0]
        assert done["updated"] == len(items)
        world.call("PATCH", bulk, url, 400, json={"assignedTo": "sam"}, headers=world.auth)
        world.call("PATCH", bulk, url, 400, json={"assignedTo": "sam"}, headers=world.auth,
                   query_string={"$filter": "nothing eq 1"})
        world.call("PATCH", bulk, url, 400, json={"unknown": 1}, headers=world.auth, query_string=everything)
        world.call("PATCH", bulk, url, 403, json=body, headers=world.read_only, query_string=everything)
        world.call("PATCH", bulk, url, 401, json=body, query_string=everything)
        world.call("PATCH", bulk, f"/api/v1/tenants/nobody/security/{name}", 404, json=body,
                   headers=world.auth,
                   query_string=everything)
    alert = f"{T}/security/alerts/{{item_id}}"
    world.call("PATCH", alert, f"{ACME}/security/alerts/1", 400,
               json={"closedDateTime": "2024-01-01T00:00:00"},
               headers=world.auth)


def test_the_suppression_rule_endpoints_answer_as_documented(world, merged):
    from gateway.pipeline import process_batch

    collection, one = T + "/security/alertSuppressionRules", T + "/security/alertSuppressionRules/{item_id}"
    apply, url = one + "/apply", f"{ACME}/security/alertSuppressionRules"
    pushed = {"value": [GRAPH_ALERTS["value"][0] | {"id": "alert-suppress-1", "title": "Nightly port sweep",
                                                    "hostStates": [{"fqdn": "scanner-9.contoso.com"}]}]}
    process_batch(world.db, int(world.push("format=graph_alert", 202, json.dumps(pushed).encode())["id"]))
    body = {"name": "port-sweeps", "alertType": "*", "reason": "ValidActivity",
            "suppressionAlertsScope": {"allOf": [{"field": "entities.host.hostname", "equals": "scanner-9"}]}}
    posture, reader = world.posture, world.read_only
    dry = world.call("POST", collection, url + "?dryRun=true", 200, json=body, headers=posture)[0]
    assert dry == {"ruleId": None, "dryRun": True, "appliedAlertCount": 1}
    created, response = world.call("POST", collection, url, 201, json=body, headers=posture)
    assert created["appliedAlertCount"] == 0 and created["state"] == "Enabled"
    assert response.headers["Location"].endswith(f"{url}/{created['id']}")
    world.call("POST", collection, url, 409, json=body, headers=posture)
    world.call("POST", collection, url, 400, json=body | {"name": "x", "reason": "Because"}, headers=posture)
    world.call("POST", collection, url, 400, json={"name": "y"}, headers=posture)
    world.call("POST", collection, url + "?applyToExisting=maybe", 400, json=body, headers=posture)
    world.call("POST", collection, url, 403, json=body, headers=reader)
    world.call("POST", collection, url, 401, json=body)
    world.call("POST", collection, "/api/v1/tenants/nobody/security/alertSuppressionRules", 404, json=body,
               headers=posture)
    item = f"{url}/{created['id']}"
    assert world.call("GET", one, item, 200, headers=reader)[0]["name"] == "port-sweeps"
    world.call("POST", apply, item + "/apply?dryRun=true", 200, headers=posture)
    applied = world.call("POST", apply, item + "/apply", 200, headers=posture)[0]
    assert applied == {"ruleId": created["id"], "dryRun": False, "appliedAlertCount": 1}
    alerts = world.call("GET", T + "/security/alerts_v2", f"{ACME}/security/alerts_v2", 200, headers=reader,
                        query_string={"$filter": f"suppressedBy eq '{created['id']}'"})[0]["value"]
    assert [(a["providerAlertId"], a["status"]) for a in alerts] == [("alert-suppress-1", "resolved")]
    changed = world.call("PATCH", one, item, 200, json={"state": "Disabled", "comment": None},
                         headers=posture)[0]
    assert changed["state"] == "Disabled"
    world.call("POST", apply, item + "/apply", 409, headers=posture)
    world.call("POST", apply, item + "/apply", 403, headers=reader)
    world.call("POST", apply, f"{url}/999999/apply", 404, headers=posture)
    world.call("PATCH", one, item, 400, json={"suppressionAlertsScope": {"allOf": [{"field": "nope"}]}},
               headers=posture)
    world.call("PATCH", one, item, 400, json={}, headers=posture)
    world.call("PATCH", one, item, 409, json={"name": "lab-scans"}, headers=posture)
    world.call("PATCH", one, item, 403, json={"state": "Enabled"}, headers=reader)
    world.call("PATCH", one, f"{url}/999999", 404, json={"state": "Enabled"}, headers=posture)
    world.call("DELETE", one, item, 403, headers=reader)
    world.call("DELETE", one, item + "?x=1", 400, headers=posture)
    world.call("DELETE", one, item, 204, headers=posture)
    world.call("DELETE", one, item, 404, headers=posture)
    world.call("GET", one, item, 404, headers=reader)
    legacy = world.call("GET", T + "/security/alerts", f"{ACME}/security/alerts", 200, headers=reader,
                        query_string={"$filter": "suppressedBy ne null"})[0]["value"]
    assert [a["suppressedBy"] for a in legacy] == [created["id"]]  # kept after the rule is deleted


def test_the_assessment_endpoint_answers_as_documented(world):
    path = T + "/assessments/{name}"
    name = "8bb8be0a-6010-4789-812f-e4d661c4ed0e"
    vm = "/subscriptions/s-1/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-01"
    url = f"{ACME}/assessments/{name}?resourceId={vm}"
    body = {"properties": {"resourceDetails": {"source": "Azure"},
                           "status": {"code": "Unhealthy", "statusChangeDate": "2024-03-05T08:30:00Z"},
                           "metadata": {"displayName": "Install the agent", "severity": "High"}}}
    put = {"content_type": "application/json", "headers": world.auth}
    created = world.call("PUT", path, url, 201, data=json.dumps(body), **put)[0]
    assert created["properties"]["status"]["code"] == "Unhealthy"
    body["properties"]["status"] = {"code": "Healthy", "statusChangeDate": "2024-03-06T08:30:00Z"}
    updated = world.call("PUT", path, url, 200, data=json.dumps(body), **put)[0]
    assert updated["properties"]["status"]["code"] == "Healthy"
    world.call("PUT", path, url, 400, data=b"{", **put)
    world.call("PUT", path, f"{ACME}/assessments/{name}", 400, data=json.dumps(body), **put)
    world.call("PUT", path, url, 415, data=json.dumps(body), content_type="text/plain", headers=world.auth)
    world.call("PUT", path, url, 403, data=json.dumps(body), content_type="application/json",
               headers=world.read_only)
    world.call("PUT", path, url, 401, data=json.dumps(body), content_type="application/json")
    world.call("PUT", path, f"/api/v1/tenants/nobody/assessments/{name}?resourceId={vm}", 404,
               data=json.dumps(body), **put)


def test_the_resource_endpoints_answer_as_documented(world, merged):
    from gateway.pipeline import process_batch

    document = {"findings": [
        {"id": "m-1", "resource": {"fqdn": "one.example.com"}, "title": "t", "severity": "low",
         "cves": ["CVE-2024-0001"]},
        {"id": "m-2", "resource": {"fqdn": "two.example.com"}, "title": "t", "severity": "low",
         "cves": ["CVE-2024-0002"]}]}
    accepted = world.push("format=canonical", 202, json.dumps(document).encode())
    process_batch(world.db, int(accepted["id"]))
    resources = world.call("GET", f"{T}/security/resources", f"{ACME}/security/resources", 200,
                           headers=world.read_only)[0]["value"]
    ids = {r["name"]: r["id"] for r in resources}
    one, two = ids["one.example.com"], ids["two.example.com"]
    item = T + "/security/resources/{item_id}"
    base = f"{ACME}/security/resources"
    admin, reader = world.auth, world.read_only

    merge = item + "/merge"
    world.call("POST", merge, f"{base}/{one}/merge", 403, json={"resourceIds": [two]}, headers=reader)
    world.call("POST", merge, f"{base}/{one}/merge", 401, json={"resourceIds": [two]})
    world.call("POST", merge, f"{base}/{one}/merge", 400, json={"resourceIds": [one]}, headers=admin)
    world.call("POST", merge, f"{base}/{one}/merge", 400, json={"nothing": 1}, headers=admin)
    world.call("POST", merge, f"{base}/{one}/merge", 404, json={"resourceIds": ["999999"]}, headers=admin)
    world.call("POST", merge, f"/api/v1/tenants/nobody/security/resources/{one}/merge", 404,
               json={"resourceIds": [two]}, headers=admin)
    survivor = world.call("POST", merge, f"{base}/{one}/merge", 200, json={"resourceIds": [two]},
                          headers=admin)[0]
    assert survivor["id"] == one and len(survivor["sources"]) == 2
    world.call("POST", merge, f"{base}/{one}/merge", 409, json={"resourceIds": [two]}, headers=admin)

    moved, response = world.call("GET", item, f"{base}/{two}", 301, headers=reader)
    assert moved == {"id": two, "mergedInto": one} and response.headers["Location"].endswith(f"{base}/{one}")
    world.call("GET", item + "/observations", f"{base}/{two}/observations", 301, headers=reader)
    history = world.call("GET", item + "/history", f"{base}/{one}/history", 200, headers=reader)[0]
    assert [e["event"] for e in history["value"]] == ["merged"]
    world.call("GET", item + "/history", f"{base}/{two}/history", 200, headers=reader)
    world.call("GET", item + "/history", f"{base}/999999/history", 404, headers=reader)
    world.call("GET", item + "/observations", f"{base}/{one}/observations", 200, headers=reader,
               query_string={"$filter": "category eq 'port'", "$count": "true"})
    world.call("GET", item + "/observations", f"{base}/{one}/observations", 200, headers=reader,
               query_string={"$format": "csv"})
    world.call("GET", item + "/observations", f"{base}/{one}/observations", 400, headers=reader,
               query_string={"$filter": "port eq 'x'"})
    world.call("GET", item + "/observations", f"{base}/999999/observations", 404, headers=reader)

    split = item + "/split"
    record = next(s["id"] for s in survivor["sources"] if s["identifiers"].get("fqdn") == ["two.example.com"])
    world.call("POST", split, f"{base}/{one}/split", 403, json={"sourceIds": [record]}, headers=reader)
    world.call("POST", split, f"{base}/{one}/split", 401, json={"sourceIds": [record]})
    everything = [s["id"] for s in survivor["sources"]]
    world.call("POST", split, f"{base}/{one}/split", 400, json={"sourceIds": everything}, headers=admin)
    world.call("POST", split, f"{base}/{two}/split", 409, json={"sourceIds": [record]}, headers=admin)
    world.call("POST", split, f"{base}/999999/split", 404, json={"sourceIds": [record]}, headers=admin)
    created, response = world.call("POST", split, f"{base}/{one}/split", 201, json={"sourceIds": [record]},
                                   headers=admin)
    assert response.headers["Location"].endswith(f"{base}/{created['id']}")
    assert [s["id"] for s in created["sources"]] == [record]


def test_the_itsm_endpoints_answer_as_documented(world, merged):
    from cryptography.fernet import Fernet

    from tests.itsm_sim import JiraSim, ServiceNowSim

    world.app.config["SECRETS_KEYS"] = Fernet.generate_key().decode()
    sn, jira = ServiceNowSim(), JiraSim()
    call = world.call
    admin = {"Authorization": "Bearer " + world.token(world.client("itsm", "itsm.manage security.read"))}
    reader = world.read_only
    try:
        base, path = f"{ACME}/itsm", T + "/itsm"
        body = {"name": "snow", "kind": "servicenow", "baseUrl": sn.url, "auth": "basic",
                "username": "gateway",
                "secret": "sn-password-0123456789", "assignmentGroup": "secops"}
        made = call("POST", path + "/connections", base + "/connections", 201, json=body, headers=admin)[0]
        call("POST", path + "/connections", base + "/connections", 409, json=body, headers=admin)
        call("POST", path + "/connections", base + "/connections", 400, json={"name": "x"}, headers=admin)
        call("POST", path + "/connections", base + "/connections", 403, json=body, headers=reader)
        call("POST", path + "/connections", base + "/connections", 401, json=body)
        issues = call("POST", path + "/connections", base + "/connections", 201, headers=admin, json={
            "name": "jira", "kind": "jira", "baseUrl": jira.url, "auth": "basic",
            "username": "bot@example.com",
            "secret": "jira-api-token-0123456789", "projectKey": "SEC", "labels": ["security"],
            "priorityMap": {"critical": "Highest"}})[0]
        one = path + "/connections/{item_id}"
        call("PATCH", one, f"{base}/connections/{made['id']}", 200, json={"category": "security"},
             headers=admin)
        call("PATCH", one, f"{base}/connections/{made['id']}", 400, json={"kind": "jira"}, headers=admin)
        call("PATCH", one, f"{base}/connections/999999", 404, json={"enabled": False}, headers=admin)
        test = path + "/connections/{item_id}/test"
        tested = call("POST", test, f"{base}/connections/{made['id']}/test", 200, headers=admin)[0]
        assert tested["ok"] is True
        call("POST", test, f"{base}/connections/999999/test", 404, headers=admin)

        rules = path + "/rules"
        rule = call("POST", rules, base + "/rules", 201, headers=admin, json={
            "name": "high", "connectionId": made["id"], "collection": "findings",
            "filter": "severity ge 'high'"})[0]
        call("POST", rules, base + "/rules", 400, headers=admin, json={
            "name": "bad", "connectionId": made["id"], "collection": "findings", "filter": "nothing eq 1"})
        call("PATCH", rules + "/{item_id}", f"{base}/rules/{rule['id']}", 200, json={"mode": "manual"},
             headers=admin)
        call("PATCH", rules + "/{item_id}", f"{base}/rules/{rule['id']}", 400, json={"collection": "alerts"},
             headers=admin)

        finding_id = world.call("GET", T + "/security/findings", f"{ACME}/security/findings", 200,
                                headers=reader)[0]["value"][0]["id"]
        manual = T + "/security/findings/{item_id}/tickets"
        url = f"{ACME}/security/findings/{finding_id}/tickets"
        ticket = call("POST", manual, url, 201, json={"connectionId": made["id"]}, headers=admin)[0]
        again = call("POST", manual, url, 200, json={"connectionId": made["id"]}, headers=admin)[0]
        assert again["id"] == ticket["id"]
        call("POST", manual, url, 400, json={"connectionId": "999999"}, headers=admin)
        call("POST", manual, f"{ACME}/security/findings/999999/tickets", 404,
             json={"connectionId": made["id"]}, headers=admin)
        call("POST", manual, url, 403, json={"connectionId": made["id"]}, headers=reader)
        resync = path + "/tickets/{item_id}/resync"
        call("POST", resync, f"{base}/tickets/{ticket['id']}/resync", 202, headers=admin)
        call("POST", resync, f"{base}/tickets/999999/resync", 404, headers=admin)

        for name, headers in (("connections", admin), ("rules", admin), ("tickets", reader)):
            listing = call("GET", f"{path}/{name}", f"{base}/{name}", 200, headers=headers)[0]
            assert listing["value"], name
            for item in listing["value"]:
                call("GET", f"{path}/{name}/{{item_id}}", f"{base}/{name}/{item['id']}", 200, headers=headers)
                call("GET", f"{path}/{name}/{{item_id}}", f"{base}/{name}/{item['id']}", 200, headers=headers,
                     query_string={"$select": "id"})
            call("GET", f"{path}/{name}/{{item_id}}", f"{base}/{name}/999999", 404, headers=headers)
            bads = ({"$orderby": "nothing"}, {"$top": "0"}, {"$filter": "nothing eq 1"}, {"$skiptoken": "x"})
            for bad in bads:
                call("GET", f"{path}/{name}", f"{base}/{name}", 400, headers=headers, query_string=bad)
            call("GET", f"{path}/{name}", f"/api/v1/tenants/nobody/itsm/{name}", 404, headers=headers)
            call("GET", f"{path}/{name}", f"{base}/{name}", 401)
            page = call("GET", f"{path}/{name}", f"{base}/{name}", 200, headers=headers,
                        query_string={"$top": "1", "$count": "true"})[0]
            while "@odata.nextLink" in page:
                page = call("GET", f"{path}/{name}", page["@odata.nextLink"], 200, headers=headers)[0]
            call("GET", f"{path}/{name}", f"{base}/{name}", 200, headers=headers,
                 query_string={"$format": "csv"})
        call("GET", f"{path}/connections", f"{base}/connections", 403, headers=reader)

        # inbound: the webhook secret, answered once, and the receiver (no token; signed body)
        import hashlib
        import hmac
        import json as jsonlib

        rotate = path + "/connections/{item_id}/rotateWebhookSecret"
        secret = call("POST", rotate, f"{base}/connections/{made['id']}/rotateWebhookSecret", 200,
                      headers=admin)[0]["webhookSecret"]
        call("POST", rotate, f"{base}/connections/999999/rotateWebhookSecret", 404, headers=admin)
        call("POST", rotate, f"{base}/connections/{made['id']}/rotateWebhookSecret", 403, headers=reader)
        call("POST", rotate, f"{base}/connections/{made['id']}/rotateWebhookSecret", 401)
        hook = "/api/v1/itsm/webhooks/{connection}"
        raw = jsonlib.dumps({"record": {"sys_id": "0" * 32, "state": "2",
                                        "sys_updated_on": "2026-01-01 00:00:00"}})
        digest = hmac.new(secret.encode(), raw.encode(), hashlib.sha256).hexdigest()
        signed = {"X-Gateway-Signature": "sha256=" + digest}
        receipt = call("POST", hook, f"/api/v1/itsm/webhooks/{made['id']}", 200, data=raw, headers=signed,
                       content_type="application/json")[0]
        assert receipt == {"accepted": True, "duplicate": False, "edits": 0}
        call("POST", hook, f"/api/v1/itsm/webhooks/{made['id']}", 200, data=raw, headers=signed,
             content_type="application/json")
        call("POST", hook, f"/api/v1/itsm/webhooks/{made['id']}", 401, data=raw,
             headers={"X-Gateway-Signature": "sha256=00"}, content_type="application/json")
        call("POST", hook, "/api/v1/itsm/webhooks/999999", 401, data=raw, headers=signed,
             content_type="application/json")
        call("POST", hook, f"/api/v1/itsm/webhooks/{made['id']}", 400, data=raw, headers=signed,
             content_type="application/json", query_string={"x": "1"})
        call("POST", hook, f"/api/v1/itsm/webhooks/{made['id']}", 400, data="[1]",
             headers={"X-Gateway-Token": secret}, content_type="application/json")

        call("DELETE", rules + "/{item_id}", f"{base}/rules/{rule['id']}", 204, headers=admin)
        call("DELETE", rules + "/{item_id}", f"{base}/rules/{rule['id']}", 404, headers=admin)
        call("DELETE", one, f"{base}/connections/{issues['id']}", 204, headers=admin)
        call("DELETE", one, f"{base}/connections/{issues['id']}", 404, headers=admin)
    finally:
        sn.stop()
        jira.stop()


# -- workflow automation and export snapshots (issue 13 items 3-4) -------------------------------------


@pytest.mark.parametrize("name", ["AutomationIn", "AutomationPatch", "AutomationTestIn"])
def test_automation_input_schemas_match_the_marshmallow_schemas(spec, name):
    from gateway.automation import schemas as automation_schemas

    _check_input_schema(spec, getattr(automation_schemas, name), name)


@pytest.mark.parametrize("name", ["AutomationOut", "ExportSnapshotOut"])
def test_automation_out_schemas_match_the_marshmallow_schemas(spec, name):
    from gateway.automation import schemas as automation_schemas

    declared = getattr(automation_schemas, name)().fields
    documented = spec["components"]["schemas"][name]
    assert set(documented["properties"]) == set(declared)
    assert set(documented["required"]) == set(declared), "every field is always dumped"
    assert documented.get("additionalProperties") is False
    for field_name, field in declared.items():
        _check_type(spec, field, documented["properties"][field_name], f"{name}.{field_name}")


def test_the_automation_and_snapshot_endpoints_answer_as_documented(world, merged):
    from gateway.export import snapshot
    from tests.receiver import Receiver

    call, auth = world.call, world.auth
    rules, one = f"{ACME}/automations", T + "/automations/{rule_id}"
    receiver = Receiver()
    world.app.config["EXPORT_ALLOW_PRIVATE_TARGETS"] = True
    try:
        body = {"displayName": "triage", "eventTypes": ["finding.*"], "filter": "severity ge 'medium'",
                "actions": [{"type": "webhook", "url": receiver.url},
                            {"type": "setFields", "fields": {"assignedTo": "soc"}}]}
        made, response = call("POST", T + "/automations", rules, 201, headers=auth, json=body)
        url = f"{rules}/{made['id']}"
        assert response.headers["Location"].endswith(url)
        call("POST", T + "/automations", rules, 400, headers=auth, json={"displayName": "x"})
        call("POST", T + "/automations", rules, 403, headers=world.read_only, json=body)
        call("POST", T + "/automations", "/api/v1/tenants/nobody/automations", 404, headers=auth, json=body)
        listed = call("GET", T + "/automations", rules, 200, headers=auth,
                      query_string={"$count": "true", "$filter": "enabled eq true"})[0]
        assert listed["@odata.count"] == 1
        call("GET", T + "/automations", rules, 400, headers=auth, query_string={"$filter": "x eq 1"})
        shown, response = call("GET", one, url, 200, headers=auth)
        assert "secret" not in shown
        call("GET", one, f"{rules}/999999", 404, headers=auth)
        call("PATCH", one, url, 428, headers=auth, json={"enabled": False})
        call("PATCH", one, url, 412, headers=auth | {"If-Match": '"0.0"'}, json={"enabled": False})
        changed = call("PATCH", one, url, 200, headers=auth | {"If-Match": shown["etag"]}, json={"enabled": False})[0]
        call("PATCH", one, url, 400, headers=auth | {"If-Match": "*"}, json={})
        dry = call("POST", one + "/test", url + "/test", 200, headers=auth)[0]
        assert dry["event"]["type"].startswith("finding.")
        call("POST", one + "/test", url + "/test", 400, headers=auth, json={"eventId": "x"})
        call("DELETE", one, url, 428, headers=auth)
        call("DELETE", one, url, 204, headers=auth | {"If-Match": changed["etag"]})

        exports = f"{ACME}/exports"
        export = call("POST", T + "/exports", exports, 201, headers=auth, json={
            "displayName": "SIEM", "url": receiver.url, "eventTypes": ["finding.*"]})[0]
        receiver.secrets.append(export["secret"])
        start = (T + "/exports/{export_id}/snapshot", f"{exports}/{export['id']}/snapshot")
        job, response = call("POST", *start, 202, headers=auth)
        assert job["state"] == "queued"
        call("POST", *start, 409, headers=auth)
        call("POST", T + "/exports/{export_id}/snapshot", f"{exports}/999999/snapshot", 404, headers=auth)
        snapshot.run(world.db, world.app.config, int(job["id"]))
        job_path = T + "/exports/{export_id}/snapshots/{snapshot_id}"
        done = call("GET", job_path, response.headers["Location"].split("localhost", 1)[1], 200, headers=auth)[0]
        assert done["state"] == "succeeded" and done["delivered"] == done["total"] > 0
        call("GET", job_path, f"{exports}/{export['id']}/snapshots/999999", 404, headers=auth)
    finally:
        world.app.config["EXPORT_ALLOW_PRIVATE_TARGETS"] = False
        receiver.stop()


def test_the_detection_endpoints_answer_as_documented(world, merged):
    """Security events pushed and listed, detection rules listed, tuned, created, the rows behind a
    raised alert, the KEV catalogue (gateway/detection/; issue 16)."""
    from datetime import UTC, datetime, timedelta

    from gateway.detection import engine
    from gateway.models import Tenant
    from gateway.pipeline import process_batch

    agent = {"Authorization": "Bearer " + world.token(world.client("Winlogbeat",
                                                                   "events.write rules.manage"))}
    admin = {"Authorization": "Bearer " + world.token(world.client("Operator", "admin"))}
    at = datetime.now(UTC) - timedelta(minutes=30)
    events = [{"@timestamp": (at + timedelta(minutes=n)).isoformat(),
               "winlog": {"event_id": 4625 if n < 5 else 4624, "computer_name": "web-1.contoso.com",
                          "event_data": {"TargetUserName": "alice", "IpAddress": "203.0.113.7"}}}
              for n in range(6)]
    pushed = world.push("format=windows_events", 202, json.dumps(events).encode(), headers=agent)
    process_batch(world.db, int(pushed["id"]))
    listing, url = T + "/securityEvents", f"{ACME}/securityEvents"
    page = world.call("GET", listing, url, 200, headers=world.read_only,
                      query_string={"$top": 2, "$count": "true"})[0]
    assert page["@odata.count"] == 6 and "@odata.nextLink" in page
    world.call("GET", listing, url, 200, headers=world.read_only, query_string={"$select": "kind,sourceIp"})
    world.call("GET", listing, url, 400, headers=world.read_only, query_string={"startDateTime": "soon"})
    world.call("GET", listing, url, 400, headers=world.read_only, query_string={"$filter": "password eq 'x'"})
    world.call("GET", listing, url, 403, headers=agent)
    world.call("GET", listing, url, 401)

    rules, rules_url = T + "/detectionRules", f"{ACME}/detectionRules"
    one, one_url = rules + "/{rule_id}", rules_url + "/failed-logons-then-success"
    assert len(world.call("GET", rules, rules_url, 200, headers=world.read_only)[0]["value"]) >= 5
    world.call("GET", rules, rules_url, 400, headers=world.read_only, query_string={"x": "1"})
    world.call("GET", one, one_url, 200, headers=agent)
    world.call("GET", one, rules_url + "/nope", 404, headers=agent)
    world.call("PATCH", one, one_url, 200, json={"threshold": 5, "enabled": True}, headers=agent)
    world.call("PATCH", one, one_url, 400, json={"colour": "red"}, headers=agent)
    world.call("PATCH", one, one_url, 403, json={"enabled": False}, headers=world.read_only)
    custom = {"id": "many-processes", "title": "Many processes", "severity": "low", "windowMinutes": 5,
              "threshold": 50, "groupBy": "resource_id",
              "where": [{"field": "kind", "value": "process_start"}]}
    created, response = world.call("POST", rules, rules_url, 201, json=custom, headers=agent)
    assert created["builtIn"] is False and response.headers["Location"].endswith("/many-processes")
    world.call("POST", rules, rules_url, 409, json=custom, headers=agent)
    world.call("POST", rules, rules_url, 400, json=custom | {"id": "other-one", "severity": "dire"},
               headers=agent)

    with world.db.engine.connect() as conn:
        tenant_id = conn.execute(select(Tenant.id).where(Tenant.external_id == "acme")).scalar_one()
    assert engine.evaluate_tenant(world.db.engine, tenant_id)["failed-logons-then-success"] == 1
    alerts = world.call("GET", T + "/security/alerts", f"{ACME}/security/alerts", 200,
                        headers=world.read_only,
                        query_string={"$filter": "detectionRule eq 'failed-logons-then-success'"})[0]["value"]
    assert len(alerts) == 1 and alerts[0]["mitreTechniques"][0] == "T1110"
    rows = T + "/security/alerts/{alert_id}/detectionRows"
    linked = world.call("GET", rows, f"{ACME}/security/alerts/{alerts[0]['id']}/detectionRows", 200,
                        headers=world.read_only)[0]
    assert len(linked["value"]) == 6
    world.call("GET", rows, f"{ACME}/security/alerts/99999999/detectionRows", 404, headers=world.read_only)

    kev = "/api/v1/knownExploitedVulnerabilities"
    catalog = {"catalogVersion": "2026.12.01",
               "vulnerabilities": [{"cveID": "CVE-2024-3094", "product": "xz"}]}
    assert world.call("PUT", kev, kev, 200, json=catalog, headers=admin)[0]["count"] == 1
    world.call("PUT", kev, kev, 400, json={"vulnerabilities": [{"cveID": "nope"}]}, headers=admin)
    world.call("PUT", kev, kev, 403, json=catalog, headers=world.read_only)
    assert world.call("GET", kev, kev, 200, headers=world.read_only)[0]["catalogVersion"] == "2026.12.01"
