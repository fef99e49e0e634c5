"""Builders of canonical findings documents for tests and benchmarks."""

from __future__ import annotations

import gzip
import json


def finding(provider_id: str, host: str = "db-1.example.com", cves=("CVE-2024-3094",), *,
            severity: str = "high", status: str = "open", title: str | None = None,
            ts: str = "2024-04-01T00:00:00Z", last_seen: str | None = None, **extra) -> dict:
    item = {
        "id": provider_id,
        "resource": {"fqdn": host, "ipv4": ["10.0.0.5"]},
        "title": title or f"Vulnerability {provider_id}",
        "severity": severity,
        "cves": list(cves),
        "status": status,
        "firstSeen": "2024-03-01T00:00:00Z",
        "lastSeen": last_seen or ts,
        "providerTimestamp": ts,
        "description": "A description.",
        "remediation": "Upgrade the package.",
    }
    item.update(extra)
    return item


def document(findings, scan: str | None = None, provider: str | None = None) -> bytes:
    body: dict = {"findings": list(findings)}
    if scan:
        body["scan"] = {"type": scan}
    if provider:
        body["provider"] = provider
    return json.dumps(body).encode()


def gz(data: bytes) -> bytes:
    return gzip.compress(data)
