"""The built-in Secure Score controls, as data, and the rule that puts a recommendation type in one.

The controls and their max scores are those Azure Security Center (Defender for Cloud) shows.
A type's control is resolved once, when the type is created (``recommendation_types.control``;
migration 0009 resolved the types that existed before), by the first rule that matches, in this
order: the type's key (exact), its kind when it is a scanner's vulnerability (always
"Remediate vulnerabilities"), words of its key or title, its categories, its kind, its provider.
A type no rule matches lands in the fallback control, ``implement-security-best-practices``, whose
max score is 0 as in ASC: such recommendations are shown per control but never move the score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

FALLBACK = "implement-security-best-practices"


@dataclass(frozen=True)
class Control:
    id: str
    title: str
    max_score: int
    description: str
    category: str  # Graph's controlCategory
    keys: tuple[str, ...] = ()  # recommendation type keys (exact)
    words: tuple[str, ...] = ()  # regular expressions searched in the lowercased key and title
    categories: tuple[str, ...] = ()  # recommendation type categories (ASC: Compute, Data, ...)
    kinds: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    order: int = field(default=0, compare=False)


CONTROLS: tuple[Control, ...] = (
    Control("enable-mfa", "Enable MFA", 10, "Require multi-factor authentication for accounts with "
            "permissions on the subscription.", "Identity",
            words=(r"\bmfa\b", r"multi[- ]?factor", r"\b2fa\b")),
    Control("secure-management-ports", "Secure management ports", 8, "Close or protect management "
            "ports (RDP, SSH, WinRM) with just-in-time access or network rules.", "Network",
            words=(r"management port", r"\brdp\b", r"\bssh\b", r"just[- ]in[- ]time", r"\bwinrm\b")),
    Control("apply-system-updates", "Apply system updates", 6, "Install missing system and "
            "security updates on machines.", "Compute",
            words=(r"system updates?", r"missing (security )?updates?", r"missing patch", r"\bpatch(es)?\b",
                   r"\bkb\d{5,}")),
    Control("remediate-vulnerabilities", "Remediate vulnerabilities", 6, "Remediate the vulnerabilities "
            "vulnerability assessment solutions found.", "Compute",
            keys=("vulnerability-assessment",), words=(r"\bcve-\d{4}-\d+", r"vulnerabilit"),
            kinds=("vulnerability",)),
    Control("enable-encryption-at-rest", "Enable encryption at rest", 4, "Encrypt disks, databases "
            "and storage at rest.", "Data",
            words=(r"encrypt\w* at rest", r"disk encryption", r"transparent data encryption", r"\btde\b",
                   r"unencrypted (disk|volume|bucket|storage)")),
    Control("encrypt-data-in-transit", "Encrypt data in transit", 4, "Only allow encrypted "
            "connections (HTTPS, TLS 1.2+).", "Data",
            words=(r"\btls\b", r"\bssl\b", r"https", r"in transit", r"secure transfer", r"cipher")),
    Control("manage-access-and-permissions", "Manage access and permissions", 4, "Remove external, "
            "deprecated and excess privileged accounts; use least privilege.", "Identity",
            words=(r"permission", r"privilege", r"\biam\b", r"\brbac\b", r"owner", r"access key",
                   r"password", r"account")),
    Control("remediate-security-configurations", "Remediate security configurations", 4, "Fix "
            "security misconfigurations of operating systems, containers and services.", "Compute",
            words=(r"configuration", r"baseline", r"misconfig", r"hardening", r"\bcis\b"),
            kinds=("compliance",)),
    Control("restrict-unauthorized-network-access", "Restrict unauthorized network access", 4,
            "Restrict inbound traffic with network security groups and firewalls.", "Network",
            words=(r"network security group", r"\bnsg\b", r"firewall", r"inbound", r"internet[- ]facing",
                   r"public (ip|access|network)", r"open port", r"security group")),
    Control("apply-adaptive-application-control", "Apply adaptive application control", 3, "Allow "
            "only known applications to run on machines.", "Compute",
            words=(r"adaptive application", r"allow ?list", r"whitelist")),
    Control("enable-endpoint-protection", "Enable endpoint protection", 2, "Install and keep healthy "
            "an endpoint protection (antimalware) solution.", "Compute",
            words=(r"endpoint protection", r"anti-?malware", r"anti-?virus", r"\bedr\b")),
    Control("protect-applications-against-ddos", "Protect applications against DDoS attacks", 2,
            "Enable DDoS protection and web application firewalls.", "Network",
            words=(r"ddos", r"web application firewall", r"\bwaf\b")),
    Control("enable-auditing-and-logging", "Enable auditing and logging", 1, "Enable diagnostic and "
            "audit logs of services.", "Data",
            words=(r"audit", r"logging", r"diagnostic log", r"\blogs? (should|must)")),
    Control(FALLBACK, "Implement security best practices", 0, "Recommendations that fit no other "
            "control. As in ASC, this control's max score is 0: it is shown but does not change the "
            "score.", "Other"),
)
BY_ID: dict[str, Control] = {control.id: control for control in CONTROLS}
_PATTERNS = {control.id: [re.compile(word) for word in control.words] for control in CONTROLS}


def resolve(spec: dict) -> str:
    """The control id of a recommendation type (a mapping with key, title, kind, categories, provider)."""
    if spec.get("control") in BY_ID:
        return spec["control"]
    key = (spec.get("key") or "").lower()
    for control in CONTROLS:
        if key in control.keys:
            return control.id
    if spec.get("kind") == "vulnerability":  # a scanner's vulnerability, whatever its words
        return "remediate-vulnerabilities"
    text = f"{key} {(spec.get('title') or '').lower()}"
    for control in CONTROLS:
        if any(pattern.search(text) for pattern in _PATTERNS[control.id]):
            return control.id
    categories = {str(c).lower() for c in spec.get("categories") or ()}
    for control in CONTROLS:
        if categories & {c.lower() for c in control.categories}:
            return control.id
    for control in CONTROLS:
        if spec.get("kind") in control.kinds:
            return control.id
    for control in CONTROLS:
        if spec.get("provider") in control.providers:
            return control.id
    return FALLBACK
