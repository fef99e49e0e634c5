"""Secure Score reads under ``/api/v1/tenants/<tenant>/security``: ``secureScores`` (the history,
newest first, Graph's secureScore shape), ``secureScoreControls`` (the tenant's stored per-control
rows) and ``secureScoreControlProfiles`` (the control definitions).  ``$top`` and
``@odata.nextLink`` paging; every query names the tenant."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request, url_for
from sqlalchemy import select

from gateway.auth import require_scope, tenant_for_caller
from gateway.errors import BadRequest
from gateway.models import SecureScore, SecureScoreControl
from gateway.score.controls import BY_ID, CONTROLS

PREFIX = "/api/v1/tenants/<tenant>/security"
blueprint = Blueprint("score", __name__, url_prefix=PREFIX)
SS, SSC = SecureScore.__table__, SecureScoreControl.__table__
ALLOWED = ("$top", "$skiptoken")


def _db():
    return current_app.extensions["gateway.db"]


def _tenant_id(tenant: str) -> int:
    with _db().sessions() as session:
        return tenant_for_caller(session, tenant).id


def _paging() -> tuple[int, int | None]:
    unknown = sorted(set(request.args) - set(ALLOWED))
    if unknown:
        raise BadRequest(f"unknown query parameter '{unknown[0][:40]}'; allowed: {', '.join(ALLOWED)}",
                         code="invalidParameter")
    config = current_app.config
    top_text = request.args.get("$top")
    top = config["PAGE_SIZE_DEFAULT"]
    if top_text is not None:
        highest = config["PAGE_SIZE_MAX"]
        if not (top_text.isascii() and top_text.isdigit()) or not 1 <= int(top_text) <= highest:
            raise BadRequest(f"$top must be a whole number from 1 to {config['PAGE_SIZE_MAX']}",
                             code="invalidParameter")
        top = int(top_text)
    token = request.args.get("$skiptoken")
    if token is not None and not (token.isascii() and token.isdigit() and len(token) <= 18):
        raise BadRequest("invalid $skiptoken: follow @odata.nextLink as it is", code="invalidSkipToken")
    return top, None if token is None else int(token)


def _page(tenant: str, endpoint: str, name: str, values: list[dict], next_token: int | None):
    body = {"@odata.context": f"{request.url_root}api/v1/$metadata#security/{name}", "value": values}
    if next_token is not None:
        args = request.args.to_dict()
        args["$skiptoken"] = str(next_token)
        body["@odata.nextLink"] = url_for(endpoint, tenant=tenant, _external=True, **args)
    return jsonify(body)


def _time(value) -> str:
    return value.isoformat().replace("+00:00", "Z")


@require_scope("security.read")
def list_secure_scores(tenant: str):
    """The tenant's Secure Score each time it changed, newest first."""
    top, token = _paging()
    tenant_id = _tenant_id(tenant)
    query = select(SS).where(SS.c.tenant_id == tenant_id)
    if token is not None:
        query = query.where(SS.c.id < token)
    with _db().engine.connect() as conn:
        rows = conn.execute(query.order_by(SS.c.id.desc()).limit(top + 1)).all()
    more = len(rows) > top
    rows = rows[:top]
    values = [{"id": str(row.id), "currentScore": row.current, "maxScore": row.max,
               "percentage": row.percentage, "controlScores": row.control_scores or [],
               "createdDateTime": _time(row.created_at)} for row in rows]
    return _page(tenant, "score.list_secure_scores", "secureScores", values, rows[-1].id if more else None)


def _offset_page(tenant: str, endpoint: str, name: str, values: list[dict]):
    top, token = _paging()
    start = token or 0
    more = len(values) > start + top
    return _page(tenant, endpoint, name, values[start : start + top], start + top if more else None)


@require_scope("security.read")
def list_secure_score_controls(tenant: str):
    """The tenant's current score of each control (stored rows)."""
    tenant_id = _tenant_id(tenant)
    with _db().engine.connect() as conn:
        rows = conn.execute(select(SSC).where(SSC.c.tenant_id == tenant_id).order_by(SSC.c.control)).all()
    total_max = sum(row.max for row in rows if row.healthy + row.unhealthy) or 0.0
    values = []
    for row in rows:
        control = BY_ID.get(row.control)
        applies = bool(row.healthy + row.unhealthy)
        values.append({
            "id": row.control, "displayName": control.title if control else row.control,
            "currentScore": row.current, "maxScore": row.max,
            "percentage": round(row.current / row.max, 4) if row.max and applies else 0.0,
            "healthyResourceCount": row.healthy, "unhealthyResourceCount": row.unhealthy,
            "notApplicableResourceCount": row.not_applicable,
            "weight": round(row.max / total_max, 4) if total_max and applies else 0.0,
            "updatedDateTime": _time(row.updated_at),
        })
    return _offset_page(tenant, "score.list_secure_score_controls", "secureScoreControls", values)


@require_scope("security.read")
def list_secure_score_control_profiles(tenant: str):
    """The Secure Score control definitions."""
    _tenant_id(tenant)
    values = [{"id": c.id, "title": c.title, "maxScore": c.max_score, "description": c.description,
               "controlCategory": c.category} for c in CONTROLS]
    return _offset_page(tenant, "score.list_secure_score_control_profiles", "secureScoreControlProfiles",
                        values)


blueprint.add_url_rule("/secureScores", "list_secure_scores", list_secure_scores, methods=["GET"])
blueprint.add_url_rule("/secureScoreControls", "list_secure_score_controls", list_secure_score_controls,
                       methods=["GET"])
blueprint.add_url_rule("/secureScoreControlProfiles", "list_secure_score_control_profiles",
                       list_secure_score_control_profiles, methods=["GET"])
