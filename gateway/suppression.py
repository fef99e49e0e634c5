"""Alert suppression rules (DESIGN.md: *suppression rule*), after ASC's ``alertsSuppressionRules``.

A rule belongs to one tenant and says: alerts of this **type** (or ``*``, every type) that
match **all** these conditions are not worth anyone's time, for this **reason**.  While a rule
is ``Enabled`` and not past its ``expirationDateUtc``, every alert a push *creates* that
matches it is stored already resolved: ``status = resolved``, ``closedDateTime`` = the merge's
time, ``suppressed_by`` = the rule's id (``suppressedBy`` in both alert shapes), and a
``suppressed`` lifecycle event (cause ``suppression rule <id> (<name>)``, details: rule id, name
and reason) beside its ``new`` event.  Suppressed alerts are kept and stay queryable
(``$filter=suppressedBy ne null``).

What is and is not suppressed:

* Only alerts **created** by a push.  A push that *updates* a stored alert never re-suppresses
  it (nor un-suppresses it): ``status`` is the customer's field once the alert exists, and a
  push writes provider fields only (README, "Merging").  To apply a rule to alerts already
  stored, ask for it: ``POST .../alertSuppressionRules?applyToExisting=true`` when creating it,
  or ``POST .../alertSuppressionRules/{id}/apply`` later; both have a dry run (``dryRun=true``)
  that changes nothing and answers how many alerts would be suppressed.  Applying touches the
  tenant's *open* alerts (status neither ``resolved`` nor ``dismissed``): they are read in keyset
  batches of ``APPLY_BATCH``, matched here in Python and updated with one UPDATE and one INSERT
  of events per batch; their ``lastModifiedDateTime`` becomes now and the event's actor is the
  client that asked.
* A merge loads the tenant's active rules once (when its first new alert needs them): a rule
  created while a batch merges applies from the next batch on.
* When several rules match, the oldest (smallest id) names the suppression.
* A rule that matches nothing is fine (an apply count of 0).  Deleting or disabling a rule
  leaves the alerts it suppressed as they are (``suppressedBy`` keeps the id).

**Alert type.**  Partners have no common "alert type" key: Graph legacy alerts carry a
``category`` (``Malware``), Graph v2 alerts a ``category`` (a MITRE tactic) and a ``detectorId``
(the detection rule, closest to ASC's alert type), OCSF Detection findings their
``finding_info.types[0]`` as category (``CryptoCurrency:EC2/BitcoinTool.B!DNS``), and every alert
a title.  So ``alertType`` matches, case-insensitively and exactly, the alert's ``category``,
its v2 ``detectorId`` or its ``title``.  ``*`` matches every alert; a ``*`` rule needs at least
one condition (a rule that silences everything is refused).

**Conditions** (``suppressionAlertsScope.allOf``, ASC's shape): ``{"field": F, "equals": "v"}``,
``{"field": F, "in": ["v", ...]}`` or ``{"field": F, "contains": "v"}``; all must hold.  Every
comparison ignores case; an IP address compares in its canonical form (``equals``/``in`` values
of ``entities.ip.address`` must be addresses); an alert with no value for a field fails a
condition on it.  Fields (``FIELDS``):

    alert.title, alert.category, alert.severity, alert.provider (the pushing client's provider),
    alert.productName (v2 productName, else legacy vendorInformation.provider, else the provider),
    alert.detectionSource, alert.serviceSource (v2)
    entities.host.hostname   short host names: hostnames, NetBIOS names, first labels of FQDNs
    entities.host.fqdn       fully qualified host names
    entities.ip.address      IP addresses (host addresses, connection endpoints, logon IPs)
    entities.account.name    account names, user principal names and DOMAIN\\account
    entities.process.name, entities.process.commandline
    entities.file.name, entities.file.path, entities.file.hash (any of MD5/SHA-1/SHA-256)
    entities.dns.domainname  domains a connection went to
    entities.url.url
    entities.cloudresource.id  cloud resource ids (Azure resource ids, AWS ARNs, GCP names)

Where entity values come from (``alert_entities``): a legacy Graph alert's ``hostStates``,
``userStates``, ``processes``, ``fileStates`` and ``networkConnections`` (kept in ``extra`` by the
connector since this feature: alerts stored before it have their first host, in the resource,
and their user principal names only); a Graph v2 alert's typed ``evidence`` (device, ip, user,
process, file, url, network connection, mailbox, cloud resource evidence); an OCSF detection's
``evidences`` (process, actor, user, file, device, endpoints, url, resources); and, for every
alert, the identifiers of its resource (host names, FQDNs, addresses without their network
scope, cloud and instance ids), which may grow as other scanners report the same machine.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal, or_, select, update
from sqlalchemy.engine import Connection

from gateway.merge.sql import in_values
from gateway.models import Alert, AlertSuppressionRule, LifecycleEvent, ResourceIdentifier, utcnow

A, RULES = Alert.__table__, AlertSuppressionRule.__table__
EV, RI = LifecycleEvent.__table__, ResourceIdentifier.__table__

ANY_TYPE = "*"
OPERATORS = ("equals", "in", "contains")
# ASC's reasons for dismissing alerts (its portal's list), and Other
REASONS = ("FalsePositive", "BenignPositive", "ValidActivity", "RiskAccepted", "Other")
STATES = ("Enabled", "Disabled")  # stored; an Enabled rule past its expiry is shown "Expired"
SHOWN_STATES = ("Enabled", "Disabled", "Expired")
CLOSED_STATUSES = ("resolved", "dismissed")
IP_FIELD = "entities.ip.address"
FIELDS = {
    "alert.title": "the alert's title",
    "alert.category": "the alert's category",
    "alert.severity": "the alert's severity",
    "alert.provider": "the provider that pushed the alert",
    "alert.productName": "the product that raised the alert",
    "alert.detectionSource": "the detection source (Graph v2)",
    "alert.serviceSource": "the service source (Graph v2)",
    "entities.host.hostname": "short host names",
    "entities.host.fqdn": "fully qualified host names",
    IP_FIELD: "IP addresses",
    "entities.account.name": "account names, user principal names, DOMAIN\\account",
    "entities.process.name": "process names",
    "entities.process.commandline": "process command lines",
    "entities.file.name": "file names",
    "entities.file.path": "file paths",
    "entities.file.hash": "file hashes (MD5, SHA-1, SHA-256)",
    "entities.dns.domainname": "domains a connection went to",
    "entities.url.url": "URLs",
    "entities.cloudresource.id": "cloud resource ids",
}
MAX_CONDITIONS = 20
MAX_IN_VALUES = 100
MAX_VALUE_LENGTH = 1000
MAX_NAME_LENGTH = 260
MAX_ALERT_TYPE_LENGTH = 500
MAX_COMMENT_LENGTH = 4000
APPLY_BATCH = 1000
RULE_KEYS = ("name", "alertType", "reason", "comment", "state", "expirationDateUtc", "suppressionAlertsScope")


def clock() -> datetime:
    """Now, for rule expiry (tests replace it: no sleeping)."""
    return utcnow()


# -- rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    field: str
    operator: str  # equals | in | contains
    values: frozenset[str]  # normalized; one value for equals and contains


@dataclass(frozen=True)
class Rule:
    id: int
    name: str
    alert_type: str  # normalized, or "*"
    reason: str
    conditions: tuple[Condition, ...]

    @classmethod
    def from_row(cls, row: Any) -> Rule:
        data = row._mapping if hasattr(row, "_mapping") else row
        conditions = []
        for condition in data["conditions"] or ():
            field, operator, value = condition["field"], condition["operator"], condition["value"]
            raw = value if isinstance(value, list) else [value]
            normalize = _normalize if operator != "contains" else _lower
            conditions.append(Condition(field, operator, frozenset(normalize(field, v) for v in raw)))
        alert_type = data["alert_type"]
        return cls(id=data["id"], name=data["name"], reason=data["reason"], conditions=tuple(conditions),
                   alert_type=alert_type if alert_type == ANY_TYPE else alert_type.strip().lower())


def _lower(field: str, value: str) -> str:
    return value.strip().lower()


def _normalize(field: str, value: str) -> str:
    text = value.strip().lower()
    if field == IP_FIELD:
        try:
            return ipaddress.ip_address(text.partition("%")[0]).compressed
        except ValueError:
            return text
    if field.startswith("entities.host."):
        return text.rstrip(".")
    return text


# -- what an alert holds --------------------------------------------------------------------------


class _Entities:
    def __init__(self) -> None:
        self.values: dict[str, set[str]] = defaultdict(set)

    def add(self, field: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and value.strip():
            self.values[field].add(_normalize(field, value))

    def host(self, value: Any) -> None:
        """A host name: an FQDN also gives its first label; an address goes to the addresses."""
        if not isinstance(value, str) or not value.strip():
            return
        name = value.strip().rstrip(".")
        try:
            ipaddress.ip_address(name.partition("%")[0])
        except ValueError:
            pass
        else:
            self.add(IP_FIELD, name)
            return
        if "." in name:
            self.add("entities.host.fqdn", name)
            name = name.split(".", 1)[0]
        self.add("entities.host.hostname", name)

    def account(self, name: Any, domain: Any = None, upn: Any = None) -> None:
        self.add("entities.account.name", name)
        self.add("entities.account.name", upn)
        if isinstance(name, str) and name and isinstance(domain, str) and domain:
            self.add("entities.account.name", f"{domain}\\{name}")

    def file(self, name: Any = None, path: Any = None, hashes: Iterable = ()) -> None:
        self.add("entities.file.name", name)
        self.add("entities.file.path", path)
        for digest in hashes:
            self.add("entities.file.hash", digest)


def _dicts(value: Any) -> list[dict]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _graph_legacy(extra: dict, out: _Entities) -> None:
    for host in _dicts(extra.get("hostStates")):
        out.host(host.get("fqdn"))
        out.host(host.get("netBiosName"))
        out.add(IP_FIELD, host.get("privateIpAddress"))
        out.add(IP_FIELD, host.get("publicIpAddress"))
    for name in extra.get("otherHosts") or ():
        out.host(name)
    for user in _dicts(extra.get("userStates")):
        out.account(user.get("accountName"), user.get("domainName"), user.get("userPrincipalName"))
        out.add(IP_FIELD, user.get("logonIp"))
    for upn in extra.get("users") or ():
        out.account(upn)
    for process in _dicts(extra.get("processes")):
        out.add("entities.process.name", process.get("name"))
        out.add("entities.process.commandline", process.get("commandLine"))
        out.account(process.get("accountName"))
        out.file(path=process.get("path"), hashes=[_dict(process.get("fileHash")).get("hashValue")])
    for state in _dicts(extra.get("fileStates")):
        out.file(state.get("name"), state.get("path"), [_dict(state.get("fileHash")).get("hashValue")])
    for connection in _dicts(extra.get("networkConnections")):
        for key in ("sourceAddress", "destinationAddress", "natSourceAddress", "natDestinationAddress"):
            out.add(IP_FIELD, connection.get(key))
        out.add("entities.dns.domainname", connection.get("destinationDomain"))
        out.add("entities.url.url", connection.get("destinationUrl"))


def _file_details(details: dict, out: _Entities, process: bool = False) -> None:
    hashes = [details.get(k) for k in ("sha256", "sha1", "md5")]
    if process:
        out.add("entities.process.name", details.get("fileName"))
        out.file(path=details.get("filePath"), hashes=hashes)
    else:
        out.file(details.get("fileName"), details.get("filePath"), hashes)


def _graph_evidence(evidence: list, out: _Entities) -> None:
    """Graph v2 typed evidence (microsoft.graph.security.*Evidence)."""
    for item in _dicts(evidence):
        out.host(item.get("deviceDnsName"))
        out.host(item.get("hostName"))
        for address in item.get("ipInterfaces") or ():
            out.add(IP_FIELD, address)
        for key in ("ipAddress", "senderIp"):
            out.add(IP_FIELD, item.get(key))
        for key in ("sourceAddress", "destinationAddress"):
            out.add(IP_FIELD, _dict(item.get(key)).get("ipAddress"))
        for user in [_dict(item.get("userAccount"))] + _dicts(item.get("loggedOnUsers")):
            out.account(user.get("accountName"), user.get("domainName"), user.get("userPrincipalName"))
        out.add("entities.account.name", item.get("primaryAddress"))  # mailboxEvidence
        out.add("entities.process.commandline", item.get("processCommandLine"))
        _file_details(_dict(item.get("imageFile")), out, process=True)
        _file_details(_dict(item.get("fileDetails")), out)
        out.add("entities.url.url", item.get("url"))
        for key in ("resourceId", "amazonResourceId", "fullResourceName"):
            out.add("entities.cloudresource.id", item.get(key))
        out.add("entities.cloudresource.id", _dict(item.get("vmMetadata")).get("resourceId"))


def _ocsf_process(process: dict, out: _Entities) -> None:
    out.add("entities.process.name", process.get("name"))
    out.add("entities.process.commandline", process.get("cmd_line"))
    image = _dict(process.get("file"))
    out.file(path=image.get("path"), hashes=[h.get("value") for h in _dicts(image.get("hashes"))])
    _ocsf_user(_dict(process.get("user")), out)


def _ocsf_user(user: dict, out: _Entities) -> None:
    out.account(user.get("name"), user.get("domain"), user.get("email_addr"))


def _ocsf_evidences(evidences: list, out: _Entities) -> None:
    """OCSF evidence artifacts (Detection Finding ``evidences``)."""
    for item in _dicts(evidences):
        _ocsf_process(_dict(item.get("process")), out)
        actor = _dict(item.get("actor"))
        _ocsf_process(_dict(actor.get("process")), out)
        _ocsf_user(_dict(actor.get("user")), out)
        _ocsf_user(_dict(item.get("user")), out)
        file = _dict(item.get("file"))
        out.file(file.get("name"), file.get("path"), [h.get("value") for h in _dicts(file.get("hashes"))])
        device = _dict(item.get("device"))
        out.host(device.get("hostname"))
        out.host(device.get("name"))
        out.add(IP_FIELD, device.get("ip"))
        for key in ("src_endpoint", "dst_endpoint"):
            endpoint = _dict(item.get(key))
            out.add(IP_FIELD, endpoint.get("ip"))
            out.add("entities.dns.domainname", endpoint.get("hostname") or endpoint.get("domain"))
        out.add("entities.url.url", _dict(item.get("url")).get("url_string"))
        for resource in _dicts(item.get("resources")):
            out.add("entities.cloudresource.id", resource.get("uid"))


def _resource(identifiers: Iterable, out: _Entities) -> None:
    for kind, value in identifiers:
        if kind == "fqdn":
            out.host(value)
        elif kind in ("hostname", "netbios", "name", "cloud_name"):
            out.add("entities.host.hostname", value)
        elif kind in ("ipv4", "ipv6"):
            out.add(IP_FIELD, value.partition("%")[0])
        elif kind in ("cloud_id", "instance_id"):
            out.add("entities.cloudresource.id", value)


def alert_entities(row: Mapping) -> dict[str, set[str]]:
    """Every value of every ``FIELDS`` field an alert holds, normalized (lower case, canonical IPs).

    ``row`` holds the alert's columns (``title``, ``category``, ``severity``, ``provider``,
    ``extra``, ``evidence``, ``detection_source``, ``service_source``) and, optionally,
    ``resource_identifiers``: the (kind, stored value) pairs of its resource.
    """
    out = _Entities()
    extra = _dict(row.get("extra"))
    for field, key in (("alert.title", "title"), ("alert.category", "category"),
                       ("alert.severity", "severity"), ("alert.provider", "provider"),
                       ("alert.detectionSource", "detection_source"),
                       ("alert.serviceSource", "service_source")):
        out.add(field, row.get(key))
    out.add("alert.productName", extra.get("productName") or _dict(extra.get("vendorInformation")).get(
        "provider") or row.get("provider"))
    _graph_legacy(extra, out)
    _graph_evidence(row.get("evidence") or [], out)
    _ocsf_evidences(extra.get("evidences") or [], out)
    _resource(row.get("resource_identifiers") or (), out)
    return dict(out.values)


def alert_types(row: Mapping) -> set[str]:
    """What ``alertType`` is compared with: the category, the v2 detectorId, the title."""
    detector = _dict(row.get("extra")).get("detectorId")
    return {value.strip().lower() for value in (row.get("category"), detector, row.get("title"))
            if isinstance(value, str) and value.strip()}


def matches(rule: Rule, row: Mapping, entities: dict[str, set[str]] | None = None) -> bool:
    """Whether the alert ``row`` is of the rule's type and meets all its conditions."""
    if rule.alert_type != ANY_TYPE and rule.alert_type not in alert_types(row):
        return False
    if entities is None:
        entities = alert_entities(row)
    for condition in rule.conditions:
        values = entities.get(condition.field)
        if not values:
            return False
        if condition.operator == "contains":
            (needle,) = condition.values
            if not any(needle in value for value in values):
                return False
        elif values.isdisjoint(condition.values):
            return False
    return True


def first_match(rules: Sequence[Rule], row: Mapping) -> Rule | None:
    """The oldest of ``rules`` (ordered by id) that ``row`` matches, or None."""
    entities = None
    for rule in rules:
        if rule.alert_type != ANY_TYPE and rule.alert_type not in alert_types(row):
            continue
        if entities is None:
            entities = alert_entities(row)
        if matches(rule, row, entities):
            return rule
    return None


# -- validation -----------------------------------------------------------------------------------


class RuleError(ValueError):
    """A rule body that does not validate: ``errors`` maps each field path to its message."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors.items()))
        self.errors = errors


def _text(payload: dict, key: str, limit: int, errors: dict, *, nullable: bool = False) -> Any:
    value = payload[key]
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not value.strip():
        errors[key] = "a non-empty string" + (" or null" if nullable else "")
    elif len(value) > limit:
        errors[key] = f"at most {limit} characters"
    return value


def _word(payload: dict, key: str, allowed: tuple[str, ...], errors: dict) -> Any:
    value = payload[key]
    if value not in allowed:
        errors[key] = f"one of {', '.join(allowed)}"
    return value


def _condition(element: Any, path: str, errors: dict) -> dict | None:
    if not isinstance(element, dict):
        errors[path] = 'a condition object: {"field": F, and one of "equals", "in", "contains"}'
        return None
    field = element.get("field")
    if not isinstance(field, str) or field not in FIELDS:
        shown = repr(field)[:80]
        errors[f"{path}.field"] = f"unknown field {shown}; one of {', '.join(FIELDS)}"
        return None
    operators = [key for key in element if key != "field"]
    unknown = [key for key in operators if key not in OPERATORS]
    if unknown:
        errors[path] = (f"unknown operator {unknown[0][:40]!r}; a condition takes exactly one of "
                        f"{', '.join(OPERATORS)}")
        return None
    if len(operators) != 1:
        errors[path] = f"a condition takes exactly one of {', '.join(OPERATORS)}"
        return None
    operator = operators[0]
    value = element[operator]
    where = f"{path}.{operator}"
    values = value if operator == "in" else [value]
    if operator == "in" and (not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES):
        errors[where] = f"a list of 1 to {MAX_IN_VALUES} strings"
        return None
    for index, item in enumerate(values):
        at = f"{where}[{index}]" if operator == "in" else where
        if not isinstance(item, str) or not item.strip():
            errors[at] = "a non-empty string"
            return None
        if len(item) > MAX_VALUE_LENGTH:
            errors[at] = f"at most {MAX_VALUE_LENGTH} characters"
            return None
        if field == IP_FIELD and operator != "contains":
            try:
                ipaddress.ip_address(item.strip())
            except ValueError:
                errors[at] = f"{item[:60]!r} is not an IP address (use contains for a part of one)"
                return None
    stored = [item.strip() for item in values] if operator == "in" else value.strip()
    return {"field": field, "operator": operator, "value": stored}


def _scope(payload: dict, errors: dict) -> list[dict] | None:
    scope = payload["suppressionAlertsScope"]
    if scope is None:
        return []
    if not isinstance(scope, dict) or set(scope) - {"allOf"}:
        errors["suppressionAlertsScope"] = 'an object {"allOf": [conditions]} or null'
        return None
    conditions = scope.get("allOf", [])
    if not isinstance(conditions, list) or len(conditions) > MAX_CONDITIONS:
        errors["suppressionAlertsScope.allOf"] = f"a list of at most {MAX_CONDITIONS} conditions"
        return None
    out = [_condition(element, f"suppressionAlertsScope.allOf[{index}]", errors)
           for index, element in enumerate(conditions)]
    return None if any(c is None for c in out) else out


def _expiry(payload: dict, now: datetime, errors: dict) -> datetime | None:
    value = payload["expirationDateUtc"]
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        errors["expirationDateUtc"] = "a date-time with a UTC offset (e.g. 2030-01-01T00:00:00Z), or null"
        return None
    if when <= now:
        errors["expirationDateUtc"] = "must be in the future"
    return when


def validate_rule(payload: Any, *, now: datetime, current: Mapping | None = None) -> dict:
    """The stored column values of a rule body (a new rule, or with ``current``: the changes to
    the stored rule ``current``, a PATCH); ``RuleError`` naming every bad field."""
    if not isinstance(payload, dict) or (current is not None and not payload):
        raise RuleError({"body": "a JSON object" + (" with the fields to change" if current else "")})
    errors: dict[str, str] = {}
    unknown = [key for key in payload if key not in RULE_KEYS]
    for key in unknown:
        errors[str(key)[:60]] = f"unknown field; the fields are {', '.join(RULE_KEYS)}"
    if current is None:
        for key in ("name", "alertType", "reason"):
            if key not in payload:
                errors[key] = "required"
    values: dict[str, Any] = {}
    if "name" in payload:
        name = _text(payload, "name", MAX_NAME_LENGTH, errors)
        if isinstance(name, str) and name.strip() and not all(
                c.isascii() and (c.isalnum() or c in "-_.") for c in name):
            errors["name"] = "ASCII letters, digits, '-', '_' and '.' only"
        values["name"] = name
    if "alertType" in payload:
        alert_type = _text(payload, "alertType", MAX_ALERT_TYPE_LENGTH, errors)
        values["alert_type"] = alert_type.strip() if isinstance(alert_type, str) else alert_type
    if "reason" in payload:
        values["reason"] = _word(payload, "reason", REASONS, errors)
    if "comment" in payload:
        values["comment"] = _text(payload, "comment", MAX_COMMENT_LENGTH, errors, nullable=True)
    if "state" in payload:
        values["state"] = _word(payload, "state", STATES, errors)
    elif current is None:
        values["state"] = "Enabled"
    if "expirationDateUtc" in payload:
        values["expiration_date_utc"] = _expiry(payload, now, errors)
    if "suppressionAlertsScope" in payload:
        values["conditions"] = _scope(payload, errors)
    elif current is None:
        values["conditions"] = []
    if not errors:
        alert_type = values.get("alert_type", current["alert_type"] if current else None)
        conditions = values.get("conditions", current["conditions"] if current else [])
        if alert_type == ANY_TYPE and not conditions:
            errors["suppressionAlertsScope.allOf"] = ("a rule for every alert type ('*') needs at least "
                                                      "one condition")
    if errors:
        raise RuleError(errors)
    return values


# -- the store ------------------------------------------------------------------------------------


def active_rules(conn: Connection, tenant_id: int, now: datetime) -> list[Rule]:
    """The tenant's Enabled, unexpired rules, oldest first."""
    rows = conn.execute(select(RULES).where(
        RULES.c.tenant_id == tenant_id, RULES.c.state == "Enabled",
        or_(RULES.c.expiration_date_utc.is_(None), RULES.c.expiration_date_utc > now)).order_by(RULES.c.id))
    return [Rule.from_row(row) for row in rows]


def is_active(row: Any, now: datetime) -> bool:
    return row.state == "Enabled" and (row.expiration_date_utc is None or row.expiration_date_utc > now)


def resource_identifiers(conn: Connection, tenant_id: int, resource_ids: Iterable[int | None]
                         ) -> dict[int, list[tuple[str, str]]]:
    """(kind, value) pairs of each resource, one query."""
    wanted = sorted({rid for rid in resource_ids if rid is not None})
    found: dict[int, list[tuple[str, str]]] = defaultdict(list)
    if wanted:
        for row in conn.execute(select(RI.c.resource_id, RI.c.kind, RI.c.value).where(
                RI.c.tenant_id == tenant_id, in_values(conn, RI.c.resource_id, wanted))):
            found[row.resource_id].append((row.kind, row.value))
    return found


def event(tenant_id: int, alert_id: int, rule: Rule, now: datetime, *, actor: str | None,
          batch_id: int | None, existing: bool) -> dict:
    """The ``suppressed`` lifecycle event of an alert."""
    return {"tenant_id": tenant_id, "subject_type": "alert", "subject_id": alert_id, "event": "suppressed",
            "at": now, "cause": f"suppression rule {rule.id} ({rule.name})"[:200], "batch_id": batch_id,
            "actor": actor, "details": {"ruleId": str(rule.id), "ruleName": rule.name, "reason": rule.reason,
                                        "existingAlert": existing}}


_APPLY_COLUMNS = (A.c.id, A.c.title, A.c.category, A.c.severity, A.c.provider, A.c.extra, A.c.evidence,
                  A.c.detection_source, A.c.service_source, A.c.resource_id)


def apply_rule(conn: Connection, tenant_id: int, rule: Rule, *, actor: str | None, now: datetime,
               dry_run: bool = False) -> int:
    """Suppress the tenant's open alerts that ``rule`` matches (with ``dry_run``: count them and
    change nothing).  Keyset batches by id; one UPDATE and one INSERT of events per batch."""
    total, after, batch = 0, 0, APPLY_BATCH
    while True:
        rows = conn.execute(select(*_APPLY_COLUMNS).where(
            A.c.tenant_id == tenant_id, A.c.status.not_in(CLOSED_STATUSES), A.c.id > after)
            .order_by(A.c.id).limit(batch)).all()
        if not rows:
            return total
        after = rows[-1].id
        identifiers = resource_identifiers(conn, tenant_id, (row.resource_id for row in rows))
        ids = [row.id for row in rows if matches(rule, dict(
            row._mapping, resource_identifiers=identifiers.get(row.resource_id, ())))]
        if ids and dry_run:
            total += len(ids)
        elif ids:
            closed = A.c.closed_date_time
            changed = conn.execute(update(A).where(
                A.c.tenant_id == tenant_id, in_values(conn, A.c.id, ids), A.c.status.not_in(CLOSED_STATUSES))
                .values(status="resolved", suppressed_by=rule.id, last_modified_date_time=now, updated_at=now,
                        closed_date_time=func.coalesce(closed, literal(now, closed.type)))
                .returning(A.c.id)).scalars().all()
            if changed:
                conn.execute(EV.insert(), [event(tenant_id, alert_id, rule, now, actor=actor, batch_id=None,
                                                 existing=True) for alert_id in sorted(changed)])
            total += len(changed)
        if len(rows) < batch:
            return total
