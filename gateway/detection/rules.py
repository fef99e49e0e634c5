"""Detection rules as data: built-ins in ``rules/*.yaml``, a tenant's overrides and custom rules.

A rule: ``id``, ``title``, ``description``, ``severity``, ``category`` (the raised alert's type),
MITRE ATT&CK ``tactics`` and ``techniques``, ``source`` (the rows it reads: events, findings,
resources, alerts), ``logic`` (how: gateway/detection/engine.py), ``windowMinutes``,
``threshold``, ``groupBy`` (comma-separated columns) and, for the ``threshold`` logic,
``where`` (conditions ANDed: ``{field, op, value}``, op ``eq``, ``ne``, ``in`` or ``contains``;
free text (user, target, domain, process, hash, provider) compares without case).  A tenant may
enable, disable or re-threshold any rule and create custom ``threshold`` rules over events,
findings, resources or alerts (``detection_rules`` rows): their conditions and groupings name only
the whitelisted columns of ``FIELDS`` (values bound as parameters, never SQL from the user).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml
from sqlalchemy import select
from sqlalchemy.engine import Connection

from gateway.models import DetectionRule

SEVERITIES = ("informational", "low", "medium", "high", "critical")
SOURCES = ("events", "findings", "resources", "alerts")
LOGICS = {
    "threshold": "events",
    "failed_then_success": "events",
    "kev_exposure": "findings",
    "correlated_alerts": "alerts",
    "baseline_rise": "findings",
}
# the typed columns of security_events a condition or a grouping may name
EVENT_FIELDS = (
    "kind",
    "event_id",
    "outcome",
    "user_name",
    "target",
    "source_ip",
    "remote_ip",
    "domain",
    "process",
    "hash",
    "resource_id",
    "provider",
)
# what a custom threshold rule may count, and the columns its conditions and grouping may name
FIELDS = {
    "events": EVENT_FIELDS,
    "findings": ("kind", "severity", "state", "cve", "title", "resource_id"),
    "resources": ("kind", "name", "os"),
    "alerts": (
        "provider", "category", "severity", "status", "title", "detection_source", "service_source",
        "resource_id",
    ),
}
INT_FIELDS = ("event_id", "resource_id")
OPS = ("eq", "ne", "in", "contains")
RULE_ID = re.compile(r"\A[a-z0-9][a-z0-9-]{2,63}\Z")
TECHNIQUE = re.compile(r"\AT\d{4}(\.\d{3})?\Z")
MAX_WINDOW_MINUTES = 7 * 24 * 60


class RuleError(ValueError):
    """A rule definition that is not valid; the message names the field."""


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    severity: str
    source: str
    logic: str
    window_minutes: int
    threshold: int
    group_by: tuple[str, ...]
    description: str = ""
    category: str = ""
    tactics: tuple[str, ...] = ()
    techniques: tuple[str, ...] = ()
    where: tuple[dict, ...] = ()
    builtin: bool = True
    enabled: bool = True
    default_threshold: int = 0

    def document(self) -> dict:
        """The rule as the API shows it."""
        return {
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "severity": self.severity,
            "category": self.category,
            "tactics": list(self.tactics),
            "techniques": list(self.techniques),
            "source": self.source,
            "logic": self.logic,
            "windowMinutes": self.window_minutes,
            "threshold": self.threshold,
            "defaultThreshold": self.default_threshold,
            "groupBy": ",".join(self.group_by),
            "where": [dict(c) for c in self.where],
            "builtIn": self.builtin,
            "enabled": self.enabled,
        }


def _text(data: dict, name: str, limit: int, required: bool = True) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise RuleError(f"'{name}' must be a non-empty string of at most {limit} characters")
    return value.strip()


def _int(data: dict, name: str, low: int, high: int) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RuleError(f"'{name}' must be a whole number from {low} to {high}")
    return value


def _strings(data: dict, name: str, pattern: re.Pattern | None = None) -> tuple[str, ...]:
    value = data.get(name, [])
    if (
        not isinstance(value, list)
        or len(value) > 50
        or not all(isinstance(v, str) and 0 < len(v) <= 100 for v in value)
    ):
        raise RuleError(f"'{name}' must be a list of strings")
    if pattern is not None:
        bad = [v for v in value if not pattern.match(v)]
        if bad:
            raise RuleError(
                f"'{name}' has '{bad[0]}', not a MITRE ATT&CK technique id such as T1110 or T1110.001"
            )
    return tuple(value)


def _conditions(data: dict, fields: tuple[str, ...] = EVENT_FIELDS) -> tuple[dict, ...]:
    where = data.get("where", [])
    if not isinstance(where, list) or len(where) > 10:
        raise RuleError("'where' must be a list of at most 10 conditions")
    found = []
    for index, condition in enumerate(where):
        if not isinstance(condition, dict) or set(condition) - {"field", "op", "value"}:
            raise RuleError(f"'where[{index}]' must be an object with 'field', 'op' and 'value'")
        name, op, value = condition.get("field"), condition.get("op", "eq"), condition.get("value")
        if name not in fields:
            raise RuleError(f"'where[{index}].field' must be one of: {', '.join(fields)}")
        if op not in OPS:
            raise RuleError(f"'where[{index}].op' must be one of: {', '.join(OPS)}")
        values = value if op == "in" else [value]
        if op == "in" and (not isinstance(value, list) or not 0 < len(value) <= 100):
            raise RuleError(f"'where[{index}].value' must be a list of 1 to 100 values for 'in'")
        kind = int if name in INT_FIELDS else str
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
            raise RuleError(f"'where[{index}].value' must be {'whole numbers' if kind is int else 'strings'}")
        found.append({"field": name, "op": op, "value": value})
    return tuple(found)


def parse(data: dict, builtin: bool) -> Rule:
    """A rule from its definition (a built-in's YAML, a custom rule's JSON); RuleError names the problem."""
    if not isinstance(data, dict):
        raise RuleError("a rule must be an object")
    rule_id = _text(data, "id", 64)
    if not RULE_ID.match(rule_id):
        raise RuleError("'id' must be 3-64 lower-case letters, digits and dashes")
    severity = _text(data, "severity", 20)
    if severity not in SEVERITIES:
        raise RuleError(f"'severity' must be one of: {', '.join(SEVERITIES)}")
    logic = data.get("logic", "threshold")
    if logic not in LOGICS or (not builtin and logic != "threshold"):
        allowed = sorted(LOGICS) if builtin else ["threshold"]
        raise RuleError(f"'logic' must be one of: {', '.join(allowed)}")
    source = data.get("source", LOGICS[logic])
    if logic == "threshold" and not builtin:  # a custom rule counts any source's rows
        if source not in SOURCES:
            raise RuleError(f"'source' must be one of: {', '.join(SOURCES)}")
    elif source != LOGICS[logic]:
        raise RuleError(f"'source' of a '{logic}' rule must be '{LOGICS[logic]}'")
    fields = FIELDS[source]
    group_by = tuple(part.strip() for part in str(data.get("groupBy", "")).split(",") if part.strip())
    if logic == "threshold" and (not group_by or len(group_by) > 3 or set(group_by) - set(fields)):
        raise RuleError(f"'groupBy' must name 1 to 3 of: {', '.join(fields)}, comma-separated")
    threshold = _int(data, "threshold", 1, 1_000_000)
    return Rule(
        id=rule_id,
        title=_text(data, "title", 300),
        description=_text(data, "description", 4000, False),
        severity=severity,
        category=_text(data, "category", 100, False) or rule_id,
        source=source,
        logic=logic,
        window_minutes=_int(data, "windowMinutes", 0 if builtin else 1, MAX_WINDOW_MINUTES),
        threshold=threshold,
        default_threshold=threshold,
        group_by=group_by,
        tactics=_strings(data, "tactics"),
        techniques=_strings(data, "techniques", TECHNIQUE),
        where=_conditions(data, fields),
        builtin=builtin,
    )


@lru_cache(maxsize=1)
def builtins() -> dict[str, Rule]:
    """The built-in rules of ``gateway/detection/rules/*.yaml``, by id (a duplicate id raises)."""
    found: dict[str, Rule] = {}
    folder = resources.files("gateway.detection") / "rules"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        rule = parse(yaml.safe_load(entry.read_text()), builtin=True)
        if rule.id in found:
            raise ValueError(f"detection rule '{rule.id}' is defined twice")
        found[rule.id] = rule
    return found


def for_tenant(conn: Connection, tenant_id: int) -> dict[str, Rule]:
    """Every rule of a tenant (built-ins with its overrides, then its custom rules), by id."""
    table = DetectionRule.__table__
    rules = dict(builtins())
    rows = conn.execute(select(table).where(table.c.tenant_id == tenant_id).order_by(table.c.rule_id)).all()
    for row in rows:
        base = rules.get(row.rule_id)
        if row.definition is not None:
            base = parse(row.definition, builtin=False)
        if base is None:
            continue
        changes: dict = {}
        if row.enabled is not None:
            changes["enabled"] = row.enabled
        if row.threshold is not None:
            changes["threshold"] = row.threshold
        rules[row.rule_id] = dataclasses.replace(base, **changes)
    return rules


__all__ = ["Rule", "RuleError", "builtins", "for_tenant", "parse"]
