"""The observables an alert's evidence names (IPs, domains, URLs, file hashes, sender addresses),
normalized like indicators (connectors/_indicators.py) and kept in ``alert_observables`` so that
matching is a join.

Read from Graph alerts_v2 typed evidence (ipEvidence, urlEvidence, fileEvidence, processEvidence,
analyzedMessageEvidence, deviceEvidence's ipInterfaces, ...) and from a legacy alert's entity states
kept in ``extra`` (networkConnections, fileStates, processes, hostStates, userStates).  A URL also
names its host (a domain or an address).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from sqlalchemy import delete
from sqlalchemy.engine import Connection

from connectors._indicators import ip_type, try_normalize
from gateway.merge.sql import in_values, insert_rows
from gateway.models import AlertObservable

AO = AlertObservable.__table__
HASH_NAMES = {"md5": "md5", "sha1": "sha1", "sha-1": "sha1", "sha256": "sha256", "sha-256": "sha256"}
_IP_KEYS = (
    "ipAddress",
    "senderIp",
    "sourceAddress",
    "destinationAddress",
    "natSourceAddress",
    "natDestinationAddress",
    "publicIpAddress",
    "privateIpAddress",
    "logonIp",
    "clientIp",
)
_URL_KEYS = ("url", "detectedUrl", "destinationUrl")
_DOMAIN_KEYS = ("domainName", "destinationDomain", "hostName")
_FILE_KEYS = ("fileDetails", "imageFile", "parentProcessImageFile")


def _add_ip(found: set, raw) -> None:
    kind = ip_type(raw)
    if kind:
        value = try_normalize(kind, raw.strip().split("%")[0])
        if value:
            found.add((kind, value))


def _add_url(found: set, raw) -> None:
    value = try_normalize("url", raw)
    if value is None:
        return
    found.add(("url", value))
    host = urlsplit(value).hostname
    if host:
        if ip_type(host):
            _add_ip(found, host)
        else:
            domain = try_normalize("domain", host)
            if domain:
                found.add(("domain", domain))


def _add_hashes(found: set, holder) -> None:
    if not isinstance(holder, dict):
        return
    for key, kind in HASH_NAMES.items():
        value = try_normalize(kind, holder.get(key))
        if value:
            found.add((kind, value))


def _walk_entry(found: set, entry: dict) -> None:
    for key in _IP_KEYS:
        _add_ip(found, entry.get(key))
    for key in _URL_KEYS:
        _add_url(found, entry.get(key))
    for key in _DOMAIN_KEYS:
        domain = (
            try_normalize("domain", entry.get(key))
            if isinstance(entry.get(key), str) and "." in entry[key]
            else None
        )
        if domain:
            found.add(("domain", domain))
    for address in entry.get("ipInterfaces") or []:
        _add_ip(found, address)
    for url in entry.get("urls") or []:
        _add_url(found, url)
    _add_hashes(found, entry)
    for key in _FILE_KEYS:
        _add_hashes(found, entry.get(key))
    file_hash = entry.get("fileHash")  # legacy: {hashType, hashValue}
    if isinstance(file_hash, dict) and isinstance(file_hash.get("hashType"), str):
        kind = HASH_NAMES.get(file_hash["hashType"].lower())
        value = try_normalize(kind, file_hash.get("hashValue")) if kind else None
        if value:
            found.add((kind, value))
    for key in ("p1Sender", "p2Sender", "senderFromAddress"):
        sender = entry.get(key)
        address = sender.get("emailAddress") if isinstance(sender, dict) else sender
        value = try_normalize("email", address) if isinstance(address, str) else None
        if value:
            found.add(("email", value))


def of_alert(evidence: Sequence[dict] | None, extra: dict | None) -> set[tuple[str, str]]:
    """The (type, value) observables of one alert."""
    found: set[tuple[str, str]] = set()
    for entry in evidence or ():
        if isinstance(entry, dict):
            _walk_entry(found, entry)
    for key in ("networkConnections", "fileStates", "processes", "hostStates", "userStates"):
        for entry in (extra or {}).get(key) or ():
            if isinstance(entry, dict):
                _walk_entry(found, entry)
    return found


def store(
    conn: Connection, tenant_id: int, alerts: Iterable[tuple[int, Sequence[dict] | None, dict | None]]
) -> list[int]:
    """Replace the stored observables of the alerts (id, evidence, extra); the ids of those with any."""
    rows, ids, observed = [], [], []
    for alert_id, evidence, extra in alerts:
        ids.append(alert_id)
        found = of_alert(evidence, extra)
        if found:
            observed.append(alert_id)
        rows += [
            {"alert_id": alert_id, "observable_type": kind, "value": value} for kind, value in sorted(found)
        ]
    if ids:
        conn.execute(delete(AO).where(AO.c.tenant_id == tenant_id, in_values(conn, AO.c.alert_id, ids)))
    insert_rows(conn, AO, rows, constants={"tenant_id": tenant_id})
    return observed
