"""STIX 2.1 ``indicator`` objects (a bundle, an array or one object) -> IndicatorRecord.

Each indicator is validated with ``stix2`` (required properties, types, and its pattern with
``stix2-patterns``); objects of other types in a bundle (identities, marking definitions,
relationships, malware, ...) are skipped.  The gateway evaluates simple patterns only: one or
more comparisons ``<object>:<path> = '<value>'`` joined by OR (inside one observation or as
observations joined by OR), on

    ipv4-addr:value -> ipv4, ipv6-addr:value -> ipv6, domain-name:value -> domain,
    url:value -> url, email-addr:value -> email,
    file:hashes.'MD5' / 'SHA-1' / 'SHA-256' / 'SHA-512' -> md5 / sha1 / sha256 / sha512;

one record per comparison.  Anything else (AND, FOLLOWEDBY, WITHIN/REPEATS/START qualifiers,
operators other than =, other objects or paths, pattern types other than ``stix``) is rejected for
that indicator with the reason.

    id -> external_id; name + description -> description; indicator_types[0] -> threat_type
    (all of them in extra.indicatorTypes); confidence; labels -> tags; a TLP 2.0 marking in
    object_marking_refs -> tlp_level; valid_from; valid_until -> expires_at; modified ->
    provider_timestamp; kill_chain_phases, created_by_ref, external_references -> extra
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, BinaryIO

import stix2
from stix2.exceptions import STIXError
from stix2patterns.exceptions import ParseException
from stix2patterns.v21.grammars.STIXPatternListener import STIXPatternListener
from stix2patterns.v21.pattern import Pattern

from connectors._indicators import normalize
from connectors._json import clip, iter_json_records, json_head, rejected, strings
from connectors.base import ParseOptions
from connectors.model import IndicatorRecord, Rejected

FORMAT = "stix21"
TITLE = "STIX 2.1 indicators (bundle or objects)"
PRODUCT = "STIX 2.1"
CONTENT_TYPES = ("application/json",)
RECORD_KIND = "indicators"

ENVELOPE_KEYS = ("objects",)
PATHS = {
    ("ipv4-addr", ("value",)): "ipv4",
    ("ipv6-addr", ("value",)): "ipv6",
    ("domain-name", ("value",)): "domain",
    ("url", ("value",)): "url",
    ("email-addr", ("value",)): "email",
    ("file", ("hashes", "md5")): "md5",
    ("file", ("hashes", "sha-1")): "sha1",
    ("file", ("hashes", "sha1")): "sha1",
    ("file", ("hashes", "sha-256")): "sha256",
    ("file", ("hashes", "sha256")): "sha256",
    ("file", ("hashes", "sha-512")): "sha512",
    ("file", ("hashes", "sha512")): "sha512",
}
TLP = {
    stix2.TLP_WHITE.id: "white",
    stix2.TLP_GREEN.id: "green",
    stix2.TLP_AMBER.id: "amber",
    stix2.TLP_RED.id: "red",
}


def sniff(head: bytes) -> bool:
    text = json_head(head)
    return (
        text[:1] in (b"[", b"{")
        and b'"spec_version"' in text
        and (b'"bundle"' in text or b'"indicator"' in text)
    )


def parse(stream: BinaryIO, options: ParseOptions) -> Iterator[IndicatorRecord | Rejected]:
    """Stream the indicators of a bundle: one record per comparison of each simple pattern."""
    for position, item in iter_json_records(stream, ENVELOPE_KEYS):
        if isinstance(item, dict) and item.get("type") != "indicator":
            continue  # SDOs, SROs and markings other than indicators: nothing to match
        try:
            yield from to_records(item)
        except (TypeError, ValueError, KeyError, STIXError) as exc:
            yield rejected(position, exc, item, "id")


class _SimplePattern(STIXPatternListener):
    """Why a pattern is not simple (the first reason), or None; its comparisons come from the
    package's own inspector."""

    def __init__(self) -> None:
        self.problem: str | None = None

    def _refuse(self, reason: str) -> None:
        self.problem = self.problem or reason

    def exitObservationExpressions(self, ctx) -> None:
        if ctx.FOLLOWEDBY():
            self._refuse("FOLLOWEDBY is not evaluated")

    def exitObservationExpressionAnd(self, ctx) -> None:
        if ctx.AND():
            self._refuse("AND between observations is not evaluated")

    def exitComparisonExpressionAnd(self, ctx) -> None:
        if ctx.AND():
            self._refuse("AND between comparisons is not evaluated")

    def enterStartStopQualifier(self, ctx) -> None:
        self._refuse("the START/STOP qualifier is not evaluated")

    def enterWithinQualifier(self, ctx) -> None:
        self._refuse("the WITHIN qualifier is not evaluated")

    def enterRepeatedQualifier(self, ctx) -> None:
        self._refuse("the REPEATS qualifier is not evaluated")

    def enterPropTestOrder(self, ctx) -> None:
        self._refuse("only '=' comparisons are evaluated")

    def enterPropTestSet(self, ctx) -> None:
        self._refuse("only '=' comparisons are evaluated")

    def enterPropTestLike(self, ctx) -> None:
        self._refuse("only '=' comparisons are evaluated")

    def enterPropTestRegex(self, ctx) -> None:
        self._refuse("only '=' comparisons are evaluated")

    def enterPropTestIsSubset(self, ctx) -> None:
        self._refuse("only '=' comparisons are evaluated")

    def enterPropTestIsSuperset(self, ctx) -> None:
        self._refuse("only '=' comparisons are evaluated")

    def enterPropTestExists(self, ctx) -> None:
        self._refuse("EXISTS is not evaluated")

    def exitPropTestEqual(self, ctx) -> None:
        if ctx.NEQ() or ctx.NOT():
            self._refuse("only '=' comparisons are evaluated")


def _string(literal: str) -> str:
    """The text of a STIX string literal (``'it\\'s'`` -> ``it's``); ValueError for another literal."""
    if len(literal) < 2 or literal[0] != "'" or literal[-1] != "'":
        raise ValueError(f"pattern not evaluated: {literal[:40]} is not a string value")
    return literal[1:-1].replace("\\'", "'").replace("\\\\", "\\")


def observables(pattern: str) -> list[tuple[str, str]]:
    """The (type, normalized value) pairs of a simple pattern; ValueError naming why it is not one."""
    try:
        compiled = Pattern(pattern)
    except ParseException as exc:
        raise ValueError(f"invalid pattern: {str(exc)[:200]}") from None
    listener = _SimplePattern()
    compiled.walk(listener)
    if listener.problem:
        raise ValueError(f"pattern not evaluated: {listener.problem}")
    found = []
    comparisons = [
        (object_type, tuple(str(step).lower() for step in path), literal)
        for object_type, tests in compiled.inspect().comparisons.items()
        for path, _, literal in tests
    ]
    for object_type, steps, literal in comparisons:
        value = _string(literal)
        kind = PATHS.get((object_type, steps))
        if kind is None:
            raise ValueError(
                f"pattern not evaluated: {object_type}:{'.'.join(steps)} is not a matched "
                "observable (ipv4-addr, ipv6-addr, domain-name, url, email-addr values, "
                "file hashes)"
            )
        found.append((kind, normalize(kind, value)))
    return list(dict.fromkeys(found))


def _time(value: Any) -> datetime | None:
    """A plain datetime (stix2 gives its own subclass, which msgspec does not encode)."""
    return datetime.fromisoformat(value.isoformat()) if isinstance(value, datetime) else None


def to_records(item: Any) -> list[IndicatorRecord]:
    """Validate one STIX 2.1 indicator and map it to its records (ValueError/STIXError when it cannot be)."""
    if not isinstance(item, dict):
        raise ValueError("a STIX object must be a JSON object")
    if item.get("spec_version") != "2.1":
        raise ValueError("'spec_version' must be '2.1'")
    indicator = stix2.parse(item, allow_custom=True, version="2.1")
    if indicator.get("pattern_type") != "stix":
        raise ValueError(
            f"pattern_type {str(indicator.get('pattern_type'))[:40]!r} is not evaluated; only 'stix'"
        )
    pairs = observables(indicator.pattern)
    types = [t for t in indicator.get("indicator_types") or [] if isinstance(t, str)]
    markings = [TLP[ref] for ref in indicator.get("object_marking_refs") or [] if ref in TLP]
    description = "\n\n".join(
        filter(None, (clip(indicator.get("name"), 300), clip(indicator.get("description"), 4000)))
    )
    extra = {"indicatorTypes": types} if types else {}
    for key, name in (
        ("kill_chain_phases", "killChainPhases"),
        ("created_by_ref", "createdByRef"),
        ("external_references", "externalReferences"),
    ):
        if indicator.get(key):
            extra[name] = item[key]
    common = dict(
        external_id=indicator.id,
        description=description or None,
        threat_type=types[0][:50] if types else None,
        tlp_level=markings[0] if markings else None,
        confidence=indicator.get("confidence"),
        action=None,
        target_product=None,
        pattern=indicator.pattern[:10000],
        tags=[label[:100] for label in strings(item.get("labels"))][:50],
        extra=extra or None,
        valid_from=_time(indicator.get("valid_from")),
        expires_at=_time(indicator.get("valid_until")),
        provider_timestamp=_time(indicator.get("modified")),
    )
    return [IndicatorRecord(observable_type=kind, value=value, **common) for kind, value in pairs]
