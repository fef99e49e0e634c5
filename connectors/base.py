"""The connector protocol and the small helpers connectors share."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO, Protocol

from connectors.model import SEVERITIES, Record


@dataclass(frozen=True)
class ParseOptions:
    """What a connector may know of the push besides its bytes."""

    provider: str = "unknown"
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class Connector(Protocol):
    """A module in ``connectors/`` that turns one format's bytes into records."""

    FORMAT: str  # the name a push uses: ?format=<FORMAT>
    TITLE: str  # human name, e.g. "Tenable Nessus v2 XML"
    PRODUCT: str  # the tool that writes the format, e.g. "Nessus", "Tenable.io", "Qualys VMDR"
    CONTENT_TYPES: tuple[str, ...]  # media types a push of this format may carry
    RECORD_KIND: str  # "findings", "alerts" or "knowledge_base"

    def sniff(self, head: bytes) -> bool:
        """True when the first bytes of a body look like this format."""

    def parse(self, stream: BinaryIO, options: ParseOptions) -> Iterator[Record]:
        """Yield canonical records (and Rejected ones) while reading ``stream``.

        Raises ``FormatError`` when the input is not this format or not well-formed.
        Must stream: memory stays flat as the input grows.
        """


_CVE = re.compile(r"CVE-\d{4}-\d{4,}", re.IGNORECASE)


def find_cves(*texts: str | None) -> list[str]:
    """All CVE ids in the texts, upper-cased, in first-seen order, without repeats."""
    seen: dict[str, None] = {}
    for text in texts:
        if text:
            for match in _CVE.findall(text):
                seen.setdefault(match.upper(), None)
    return list(seen)


def better_cvss(
    best: tuple[float, float, str | None] | None,
    cvss: object,
    score_keys: tuple[str, ...],
    version_key: str,
    vector_key: str,
) -> tuple[float, float, str | None] | None:
    """Keep the (version, score, vector) of the highest CVSS version seen: ``best`` or ``cvss``."""
    if not isinstance(cvss, dict):
        return best
    score = next((cvss[key] for key in score_keys if key in cvss), None)
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not 0 <= score <= 10:
        return best
    try:
        version = float(str(cvss.get(version_key, "0")))
    except ValueError:
        version = 0.0
    vector = cvss.get(vector_key) if isinstance(cvss.get(vector_key), str) else None
    if best is None or version > best[0]:
        return (version, float(score), vector)
    return best


def severity_from_cvss(score: float | None) -> str | None:
    """CVSS v3 qualitative rating of a base score."""
    if score is None:
        return None
    if score >= 9.0:
        return "critical"
    if score >= 7.0:
        return "high"
    if score >= 4.0:
        return "medium"
    if score > 0.0:
        return "low"
    return "informational"


_SEVERITY_WORDS = {
    "info": "informational",
    "informational": "informational",
    "information": "informational",
    "none": "informational",
    "low": "low",
    "medium": "medium",
    "moderate": "medium",
    "high": "high",
    "important": "high",
    "critical": "critical",
}


def severity_from_word(word: str | None) -> str | None:
    """Normalize a provider's severity word (High, MODERATE, Info...) or None."""
    if not word:
        return None
    return _SEVERITY_WORDS.get(word.strip().lower())


def parse_time(value: str | int | float | None) -> datetime | None:
    """Parse an ISO 8601 string or epoch seconds into an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=UTC)
    text = value.strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text), tz=UTC)
    if text.endswith("Z") or text.endswith("z"):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


assert set(_SEVERITY_WORDS.values()) <= set(SEVERITIES)
