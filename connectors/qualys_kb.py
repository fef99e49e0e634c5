"""Qualys KnowledgeBase XML (root ``KNOWLEDGE_BASE_VULN_LIST_OUTPUT``) -> VulnerabilityInfo.

The output of ``/api/2.0/fo/knowledge_base/vuln/``: per QID its title, severity, CVEs and
texts.  The gateway keeps it per tenant and fills in the titles, CVEs, descriptions,
solutions and CVSS scores of detections that lack them (``qualys_hld`` detections carry
only the QID), including detections pushed before the knowledge base.

Streamed with ``xmlsafe.iterparse``; each ``VULN`` is freed once read.  Per ``VULN``:
    QID -> vendor_id; TITLE -> title;
    SEVERITY_LEVEL 1-5 -> severity informational/low/medium/high/critical (the level in
    severity_original); a VULN_TYPE of "Information Gathered" is always informational;
    CVE_LIST/CVE/ID -> cves;
    DIAGNOSIS -> description, SOLUTION -> remediation: HTML tags removed (block tags become
    line breaks, links keep their URL), entities unescaped, whitespace collapsed;
    CVSS_V3/BASE (else CVSS/BASE) -> cvss_score, and the same block's VECTOR_STRING ->
    cvss_vector;
    LAST_SERVICE_MODIFICATION_DATETIME -> provider_timestamp (an older entry never replaces
    a newer stored one).
A VULN without a QID, with a SEVERITY_LEVEL outside 1-5 or with a bad date gives a
Rejected record ("VULN[7]"); a VULN without SEVERITY_LEVEL has severity None.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from lxml import etree

from connectors import xmlsafe
from connectors._qualys import (
    child_text,
    clip,
    cvss,
    html_to_text,
    open_document,
    qualys_severity,
    root_element,
    time_field,
)
from connectors.base import ParseOptions, find_cves
from connectors.model import Rejected, VulnerabilityInfo

FORMAT = "qualys_kb"
TITLE = "Qualys KnowledgeBase XML"
PRODUCT = "Qualys VMDR"
CONTENT_TYPES = ("application/xml", "text/xml")
RECORD_KIND = "knowledge_base"

ROOT = "KNOWLEDGE_BASE_VULN_LIST_OUTPUT"


def sniff(head: bytes) -> bool:
    """An XML document whose root element is KNOWLEDGE_BASE_VULN_LIST_OUTPUT."""
    return root_element(head) == ROOT


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[VulnerabilityInfo | Rejected]:
    """Stream the VULN entries of a KnowledgeBase document."""
    _, safe = open_document(stream, (ROOT,), TITLE)
    index = 0
    for _, element in xmlsafe.iterparse(safe, tags=("VULN",)):
        index += 1
        yield to_entry(element, f"VULN[{index}]")
        xmlsafe.release(element)


def to_entry(element: etree._Element, position: str) -> VulnerabilityInfo | Rejected:
    """One VULN element as a VulnerabilityInfo (or Rejected)."""
    qid = child_text(element, "QID")
    if not qid:
        return Rejected(position=position, reason="VULN has no QID")
    level = child_text(element, "SEVERITY_LEVEL")
    severity = qualys_severity(level, child_text(element, "VULN_TYPE"))
    if level is not None and severity is None:
        return Rejected(position=position, reason=f"SEVERITY_LEVEL must be 1-5, not {level[:32]!r}",
                        provider_id=qid)
    score = vector = None
    for block in ("CVSS_V3", "CVSS"):
        score, vector = cvss(child_text(element, f"{block}/BASE"))
        if score is not None:
            vector = child_text(element, f"{block}/VECTOR_STRING") or vector
            break
    try:
        provider_timestamp = time_field(
            "LAST_SERVICE_MODIFICATION_DATETIME", child_text(element, "LAST_SERVICE_MODIFICATION_DATETIME"))
    except ValueError as exc:
        return Rejected(position=position, reason=str(exc), provider_id=qid)
    return VulnerabilityInfo(
        vendor_id=qid,
        title=clip(child_text(element, "TITLE")),
        severity=severity,
        severity_original=level,
        cves=find_cves(*(cve.text for cve in element.iterfind("CVE_LIST/CVE/ID"))),
        description=html_to_text(element.findtext("DIAGNOSIS")),
        remediation=html_to_text(element.findtext("SOLUTION")),
        cvss_score=score,
        cvss_vector=vector,
        provider_timestamp=provider_timestamp,
    )
