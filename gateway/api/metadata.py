"""``GET /api/v1/$metadata``: the OData CSDL (EDMX 4.0) of the security collections.

The list answers name it in ``@odata.context`` (``.../api/v1/$metadata#security/<collection>``).
It is generated from the collections themselves (``gateway.api.collections.COLLECTIONS``): the
``Field``/``ListField`` definitions ``$filter`` uses give each filterable property its Edm type,
and the output schema (marshmallow) adds the properties that are shown but not filterable.  So
the document cannot drift from what ``$filter`` accepts; ``tests/test_docs.py`` checks it.
Like Microsoft Graph's ``$metadata`` it takes a token (any client with ``security.read``).
"""

from __future__ import annotations

from functools import cache
from xml.etree import ElementTree as ET

from flask import Blueprint, current_app
from marshmallow import fields as mfields
from sqlalchemy import Integer

from gateway.api.collections import COLLECTIONS
from gateway.auth import require_scope
from gateway.odata import Field, FilterContext, ListField
from gateway.query import Collection

blueprint = Blueprint("metadata", __name__)

NAMESPACE = "gateway.security"
EDMX = "http://docs.oasis-open.org/odata/ns/edmx"
EDM = "http://docs.oasis-open.org/odata/ns/edm"
ENTITY_NAMES = {"alerts": "alert", "recommendations": "recommendation", "findings": "finding",
                "resources": "resource", "observations": "observation", "alerts_v2": "alertV2",
                "policies": "policy", "exemptions": "exemption",
                "alertSuppressionRules": "alertSuppressionRule", "secureScores": "secureScore",
                "secureScoreControls": "secureScoreControl",
                "secureScoreControlProfiles": "secureScoreControlProfile", "governanceRules": "governanceRule",
                "governanceAssignments": "governanceAssignment"}
_CONTEXT = FilterContext(tenant_id=0, dialect="sqlite")  # only to name the tables of list fields


def entity_name(collection: str) -> str:
    return ENTITY_NAMES.get(collection) or collection.rstrip("s")


def edm_type(field: Field) -> str:
    """The Edm type of a filterable scalar."""
    if field.type == "datetime":
        return "Edm.DateTimeOffset"
    if field.type == "number":
        column_type = getattr(field.expression, "type", None)
        return "Edm.Int64" if isinstance(column_type, Integer) else "Edm.Double"
    if field.type in ("boolean", "bool"):
        return "Edm.Boolean"
    return "Edm.String"  # string, enum (its values are in the spec), id (decimal strings)


def _marshmallow_type(field: mfields.Field) -> str | None:
    if isinstance(field, mfields.Boolean):
        return "Edm.Boolean"
    if isinstance(field, mfields.Integer):
        return "Edm.Int64"
    if isinstance(field, mfields.Float | mfields.Decimal):
        return "Edm.Double"
    if isinstance(field, mfields.DateTime):
        return "Edm.DateTimeOffset"
    if isinstance(field, mfields.String):
        return "Edm.String"
    return None


def list_element(field: ListField) -> tuple[object, dict[str, Field] | Field]:
    """(table, members or element Field) of a collection-valued filter field."""
    table = field.rows(_CONTEXT)[0] if field.rows is not None else None
    if field.members is not None:
        return table, field.members(table)
    return table, field.element(table)


class _Schema:
    """The CSDL Schema being built: entity and complex types by name, in order."""

    def __init__(self) -> None:
        self.types: dict[str, tuple[str, list[tuple]]] = {}  # name -> (kind, properties)

    def complex(self, name: str, props: list[tuple], open_type: bool = False) -> str:
        self.types.setdefault(name, ("OpenComplexType" if open_type else "ComplexType", props))
        return f"{NAMESPACE}.{name}"

    def properties(self, prefix: str, filterable: dict, shown: dict | None) -> list[tuple]:
        """Properties (name, type, nullable, navigation) of a type from its filter fields and the
        output fields shown (a marshmallow schema's fields, or None)."""
        props: dict[str, tuple] = {}
        nested: dict[str, dict] = {}
        for path, field in filterable.items():
            head, _, rest = path.partition("/")
            if rest:
                nested.setdefault(head, {})[rest] = field
            elif isinstance(field, ListField):
                if head in COLLECTIONS:  # a resource's observations: the observation entities
                    props[head] = (head, f"Collection({NAMESPACE}.{entity_name(head)})", False, True)
                    continue
                _, element = list_element(field)
                if isinstance(element, dict):
                    inner = _shown_nested(shown, head)
                    member = self.complex(prefix + head[:1].upper() + head[1:].rstrip("s"),
                                          self.properties(prefix + head.title(), element, inner))
                    props[head] = (head, f"Collection({member})", False, False)
                else:
                    props[head] = (head, f"Collection({edm_type(element)})", False, False)
            else:
                props[head] = (head, edm_type(field), field.nullable, False)
        for head, members in nested.items():
            type_name = self.complex(prefix + head[:1].upper() + head[1:], self.properties(
                prefix + head.title(), members, _shown_nested(shown, head)), open_type=_is_dict(shown, head))
            props[head] = (head, type_name, False, False)
        ordered: list[tuple] = []
        for name, field in (shown or {}).items():
            if name in props:
                ordered.append(props.pop(name))
                continue
            ordered.append(self._shown_property(prefix, name, field))
        return ordered + list(props.values())

    def _shown_property(self, prefix: str, name: str, field: mfields.Field) -> tuple:
        if isinstance(field, mfields.List):
            inner = field.inner
            if isinstance(inner, mfields.Nested):
                nested = inner.nested if isinstance(inner.nested, type) else type(inner.nested)
                member = self.complex(prefix + name[:1].upper() + name[1:].rstrip("s"),
                                      self.properties(prefix + name.title(), {}, nested().fields))
                return (name, f"Collection({member})", False, False)
            element = _marshmallow_type(inner)
            if element is None:  # free-form objects, e.g. comments
                element = self.complex(name.rstrip("s"), [], open_type=True)
            return (name, f"Collection({element})", False, False)
        scalar = _marshmallow_type(field)
        if scalar is None:
            scalar = self.complex("object", [], open_type=True)
        return (name, scalar, field.allow_none, False)


def _shown_nested(shown: dict | None, name: str) -> dict | None:
    field = (shown or {}).get(name)
    if isinstance(field, mfields.List) and isinstance(field.inner, mfields.Nested):
        nested = field.inner.nested
        return (nested if isinstance(nested, type) else type(nested))().fields
    return None


def _is_dict(shown: dict | None, name: str) -> bool:
    return isinstance((shown or {}).get(name), mfields.Dict)


def _serializer_fields(collection: Collection) -> dict:
    """The output fields of a collection, from the marshmallow schema of its items."""
    from gateway import schemas

    entity = entity_name(collection.name)
    out = getattr(schemas, entity[0].upper() + entity[1:] + "Out")
    return {name: field for name, field in out().fields.items() if name in collection.selectable}


def build_csdl() -> bytes:
    schema = _Schema()
    entities = []
    for name, collection in COLLECTIONS.items():
        entity = entity_name(name)
        props = schema.properties(entity, collection.fields, _serializer_fields(collection))
        entities.append((name, entity, props))

    ET.register_namespace("edmx", EDMX)
    ET.register_namespace("", EDM)
    root = ET.Element(f"{{{EDMX}}}Edmx", {"Version": "4.0"})
    services = ET.SubElement(root, f"{{{EDMX}}}DataServices")
    node = ET.SubElement(services, f"{{{EDM}}}Schema", {"Namespace": NAMESPACE})

    def add_properties(parent, props):
        for prop_name, prop_type, nullable_, navigation in props:
            if navigation:
                ET.SubElement(parent, f"{{{EDM}}}NavigationProperty", {"Name": prop_name, "Type": prop_type})
                continue
            attributes = {"Name": prop_name, "Type": prop_type}
            if not nullable_:
                attributes["Nullable"] = "false"
            ET.SubElement(parent, f"{{{EDM}}}Property", attributes)

    for _, entity, props in entities:
        element = ET.SubElement(node, f"{{{EDM}}}EntityType", {"Name": entity})
        ET.SubElement(ET.SubElement(element, f"{{{EDM}}}Key"), f"{{{EDM}}}PropertyRef", {"Name": "id"})
        add_properties(element, props)
    for type_name, (kind, props) in schema.types.items():
        attributes = {"Name": type_name}
        if kind == "OpenComplexType":
            attributes["OpenType"] = "true"
        add_properties(ET.SubElement(node, f"{{{EDM}}}ComplexType", attributes), props)
    container = ET.SubElement(node, f"{{{EDM}}}EntityContainer", {"Name": "security"})
    for name, entity, _ in entities:
        ET.SubElement(container, f"{{{EDM}}}EntitySet", {"Name": name, "EntityType": f"{NAMESPACE}.{entity}"})
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


@cache
def csdl() -> bytes:
    return build_csdl()


@blueprint.get("/api/v1/$metadata")
@require_scope("security.read")
def csdl_view():
    """The CSDL of the security collections (EDMX 4.0, XML)."""
    response = current_app.response_class(csdl(), mimetype="application/xml")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
