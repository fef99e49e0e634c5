"""PUT .../assessments/{name}: ASC-style synchronous assessments, durable like a batch (PostgreSQL)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from gateway.models import Batch, Finding, FindingSource, Recommendation

SUB = "/subscriptions/20ff7fc3-e762-44dd-bd96-b71116dcdc23"
VM = f"{SUB}/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-01"
NAME = "8bb8be0a-6010-4789-812f-e4d661c4ed0e"
BODY = {
    "properties": {
        "resourceDetails": {"source": "Azure"},
        "status": {"code": "Unhealthy", "cause": "MissingAgent", "description": "The agent is missing",
                   "statusChangeDate": "2024-03-05T08:30:00Z", "firstEvaluationDate": "2024-03-01T10:00:00Z"},
        "additionalData": {"agentVersion": "none"},
        "metadata": {"displayName": "Install the Contoso agent on your machines", "severity": "High",
                     "description": "The Contoso agent protects the machine.",
                     "remediationDescription": "Install the agent.", "assessmentType": "CustomerManaged"},
    }
}


@pytest.fixture
def partner(pg_gw):
    tenant = pg_gw.tenant()
    return pg_gw, tenant, pg_gw.partner("Contoso", [tenant])


def put(gw, tenant, headers, body, name=NAME, resource=VM, content_type="application/json"):
    url = f"/api/v1/tenants/{tenant}/assessments/{name}"
    if resource is not None:
        url += f"?resourceId={resource}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return gw.http.put(url, data=data, headers=headers | {"Content-Type": content_type})


def count(gw, model) -> int:
    with gw.db.sessions() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_created_then_updated_with_the_stored_assessment_in_asc_shape(partner):
    gw, tenant, headers = partner
    created = put(gw, tenant, headers, BODY)
    assert created.status_code == 201, created.get_json()
    body = created.get_json()
    assert body["id"] == f"{VM}/providers/Microsoft.Security/assessments/{NAME}"
    assert body["name"] == NAME and body["type"] == "Microsoft.Security/assessments"
    properties = body["properties"]
    assert properties["resourceDetails"] == {"source": "Azure", "id": VM}
    assert properties["status"]["code"] == "Unhealthy"
    assert properties["status"]["cause"] == "MissingAgent"
    assert properties["status"]["statusChangeDate"].startswith("2024-03-05T08:30:00")
    assert properties["status"]["firstEvaluationDate"].startswith("2024-03-01T10:00:00")
    assert properties["metadata"]["displayName"] == "Install the Contoso agent on your machines"
    assert properties["metadata"]["severity"] == "High"
    assert properties["metadata"]["assessmentType"] == "CustomerManaged"
    assert properties["additionalData"] == {"agentVersion": "none"}
    # durable like a batch: the normalized body is a stored, merged batch of format asc_assessment
    with gw.db.sessions() as session:
        [batch] = session.scalars(select(Batch)).all()
        assert (batch.format, batch.status, batch.counts["created"]) == ("asc_assessment", "succeeded", 1)
        [rec] = session.scalars(select(Recommendation)).all()
        assert rec.status == "Unhealthy"

    healthy = json.loads(json.dumps(BODY))
    healthy["properties"]["status"] = {"code": "Healthy", "statusChangeDate": "2024-03-06T08:00:00Z"}
    updated = put(gw, tenant, headers, healthy)
    assert updated.status_code == 200, updated.get_json()
    assert updated.get_json()["properties"]["status"]["code"] == "Healthy"
    assert count(gw, Finding) == 1 and count(gw, FindingSource) == 1
    with gw.db.sessions() as session:
        assert session.scalar(select(Recommendation.status)) == "Healthy"
        assert session.scalar(select(Finding.state)) == "resolved"

    again = put(gw, tenant, headers, healthy)  # the same body again: unchanged, 200
    assert again.status_code == 200
    assert again.get_json() == updated.get_json()
    stale = put(gw, tenant, headers, BODY)  # older statusChangeDate: ignored, the stored one answered
    assert stale.status_code == 200
    assert stale.get_json()["properties"]["status"]["code"] == "Healthy"


def test_not_applicable_and_resource_from_the_body(partner):
    gw, tenant, headers = partner
    body = {"properties": {"resourceDetails": {"source": "Azure", "id": VM},
                           "status": {"code": "NotApplicable", "cause": "VmIsDeallocated"}}}
    response = put(gw, tenant, headers, body, resource=None)
    assert response.status_code == 201, response.get_json()
    stored = response.get_json()
    assert stored["properties"]["status"]["code"] == "NotApplicable"
    assert stored["properties"]["metadata"]["severity"] == "Medium"  # ASC's default when none is given
    assert stored["properties"]["metadata"]["displayName"] == f"Assessment {NAME}"


@pytest.mark.parametrize(("body", "resource", "status", "code", "words"), [
    (b"{not json", VM, 400, "malformedBody", "well-formed JSON"),
    ([1, 2], VM, 400, "invalidDocument", "JSON object"),
    ({"status": {"code": "Healthy"}}, VM, 400, "invalidDocument", "'properties' is required"),
    ({"properties": {"status": {"code": "Broken"}}}, VM, 400, "invalidDocument", "Healthy, Unhealthy"),
    ({"properties": {"status": {"code": "Healthy"}, "metadata": {"severity": "Urgent"}}}, VM, 400,
     "invalidDocument", "severity"),
    ({"properties": {"status": {"code": "Healthy"}}}, None, 400, "invalidParameter", "resourceId"),
    ({"properties": {"resourceDetails": {"id": f"{SUB}/other"}, "status": {"code": "Healthy"}}}, VM, 400,
     "invalidDocument", "different resources"),
])
def test_bad_bodies_are_refused_with_a_json_error_naming_the_problem(partner, body, resource, status, code,
                                                                      words):
    gw, tenant, headers = partner
    response = put(gw, tenant, headers, body, resource=resource)
    assert response.status_code == status
    error = response.get_json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert count(gw, Batch) == 0  # refused before anything is stored


def test_scope_tenant_and_media_type(partner):
    gw, tenant, headers = partner
    reader = gw.partner("Contoso", [tenant], scopes="security.read")
    assert put(gw, tenant, reader, BODY).status_code == 403
    assert put(gw, tenant, {}, BODY).status_code == 401
    assert put(gw, "someone-else", headers, BODY).status_code == 404
    assert put(gw, tenant, headers, BODY, content_type="text/plain").status_code == 415
    assert put(gw, tenant, headers, BODY, name="a b c" * 100).status_code == 400
    assert count(gw, Batch) == 0


def test_resource_id_up_to_its_documented_2048_characters(partner):
    """openapi: resourceId has maxLength 2048. The longest is stored; one more is a 400 naming it."""
    gw, tenant, headers = partner
    prefix = f"{SUB}/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/"
    longest = prefix + "v" * (2048 - len(prefix))
    created = put(gw, tenant, headers, BODY, resource=longest)
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["properties"]["resourceDetails"]["id"] == longest

    too_long = longest + "v"
    refused = put(gw, tenant, headers, BODY, resource=too_long)
    assert refused.status_code == 400
    error = refused.get_json()["error"]
    assert error["code"] == "invalidParameter"
    assert "'resourceId'" in error["message"] and "2048" in error["message"]
    in_body = {"properties": {**BODY["properties"], "resourceDetails": {"source": "Azure", "id": too_long}}}
    refused = put(gw, tenant, headers, in_body, resource=None)
    assert refused.status_code == 400
    error = refused.get_json()["error"]
    assert error["code"] == "invalidDocument" and "'properties.resourceDetails.id'" in error["message"]
    assert count(gw, Batch) == 1  # only the first
