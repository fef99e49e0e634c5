"""The known-exploited-vulnerabilities catalogue (CISA KEV JSON), global to every tenant.

A push is the whole catalogue (``catalogVersion``, ``vulnerabilities[{cveID, vendorProject,
product, vulnerabilityName, dateAdded, dueDate, knownRansomwareCampaignUse}]``): its entries are
upserted and the entries it no longer lists are removed, in one transaction.  A bad entry makes
the push a 400 naming it (a partial catalogue would silently un-flag findings).
"""

from __future__ import annotations

import re

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine

from gateway.errors import BadRequest
from gateway.merge.sql import insert_for
from gateway.models import KnownExploitedVulnerability, utcnow

KEV = KnownExploitedVulnerability.__table__
CVE = re.compile(r"\ACVE-\d{4}-\d{4,}\Z")
MAX_ENTRIES = 100_000


def _field(entry: dict, name: str, limit: int) -> str | None:
    value = entry.get(name)
    return value[:limit] if isinstance(value, str) and value else None


def parse_catalog(document) -> tuple[str | None, list[dict]]:
    """(catalog version, rows) of a KEV document; BadRequest names the first problem."""
    if not isinstance(document, dict) or not isinstance(document.get("vulnerabilities"), list):
        raise BadRequest(
            "the body must be a KEV catalogue: an object with a 'vulnerabilities' array",
            code="invalidDocument",
        )
    entries = document["vulnerabilities"]
    if len(entries) > MAX_ENTRIES:
        raise BadRequest(f"the catalogue has more than {MAX_ENTRIES} entries", code="invalidDocument")
    version = document.get("catalogVersion")
    version = str(version)[:40] if version is not None else None
    rows: dict[str, dict] = {}
    for index, entry in enumerate(entries):
        cve = entry.get("cveID") if isinstance(entry, dict) else None
        if not isinstance(cve, str) or not CVE.match(cve.strip().upper()):
            raise BadRequest(
                f"vulnerabilities[{index}].cveID must be a CVE id such as CVE-2024-3094",
                code="invalidDocument",
            )
        rows[cve.strip().upper()] = {
            "cve_id": cve.strip().upper(),
            "vendor_project": _field(entry, "vendorProject", 300),
            "product": _field(entry, "product", 300),
            "vulnerability_name": _field(entry, "vulnerabilityName", 4000),
            "date_added": _field(entry, "dateAdded", 10),
            "due_date": _field(entry, "dueDate", 10),
            "known_ransomware_use": _field(entry, "knownRansomwareCampaignUse", 20),
            "catalog_version": version,
        }
    return version, list(rows.values())


def replace_catalog(engine: Engine, document) -> dict:
    """Store a pushed catalogue in place of the previous one; a summary."""
    version, rows = parse_catalog(document)
    now = utcnow()
    with engine.begin() as conn:
        before = conn.execute(select(func.count()).select_from(KEV)).scalar()
        if rows:
            statement = insert_for(conn, KEV)
            statement = statement.on_conflict_do_update(
                index_elements=["cve_id"],
                set_={
                    name: statement.excluded[name]
                    for name in (
                        "vendor_project",
                        "product",
                        "vulnerability_name",
                        "date_added",
                        "due_date",
                        "known_ransomware_use",
                        "catalog_version",
                        "updated_at",
                    )
                },
            )
            for start in range(0, len(rows), 5000):
                conn.execute(statement, [row | {"updated_at": now} for row in rows[start : start + 5000]])
        # the entries this catalogue no longer lists: every row it wrote carries ``now``
        removed = conn.execute(delete(KEV).where(KEV.c.updated_at < now)).rowcount
        after = conn.execute(select(func.count()).select_from(KEV)).scalar()
    return {
        "catalogVersion": version,
        "count": after,
        "added": max(0, after - before + removed),
        "removed": removed,
    }


def summary(engine: Engine) -> dict:
    with engine.connect() as conn:
        row = conn.execute(
            select(func.count(), func.max(KEV.c.catalog_version), func.max(KEV.c.updated_at))
        ).first()
    return {"catalogVersion": row[1], "count": int(row[0]), "updatedDateTime": row[2]}
