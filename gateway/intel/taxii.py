"""The scheduled pull of TAXII 2.1 collections (``taxii2-client``), one watermark per feed.

A run asks the collection for the objects added after the feed's watermark (``added_after``),
page by page (``limit`` and the server's ``next``), and merges each page's STIX indicators as the
source ``taxii:<feed name>`` (connectors/stix_indicators.py validates and maps them; rejected ones
are counted with their reason).  Each page is merged and committed on its own; the watermark moves to
the last ``X-TAXII-Date-Added-Last`` the server named only when the run has read its last page, so a
run that fails midway is repeated from the same watermark (the merge is idempotent) and the next run
fetches only what was added since.  The password is stored encrypted (gateway/vault.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update
from taxii2client.v21 import Collection

from connectors import stix_indicators
from gateway import vault
from gateway.intel.merge import IndicatorMerger
from gateway.models import IndicatorFeed, utcnow

log = logging.getLogger(__name__)
FEEDS = IndicatorFeed.__table__
MAX_PAGES = 10_000  # a server that keeps answering "more" is stopped there
TIMEOUT_SECONDS = 60
MAX_REJECTIONS_KEPT = 20


def _date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _later(first: str | None, second: str | None) -> str | None:
    if _date(second) is None:
        return first
    if _date(first) is None:
        return second
    return second if _date(second) > _date(first) else first


def open_collection(feed, config: Mapping[str, Any]) -> tuple[Collection, dict]:
    """The feed's collection, and the dict the headers of its last answer land in."""
    password = vault.decrypt(config, feed.secret) if feed.secret else None
    collection = Collection(feed.collection_url, user=feed.username, password=password)
    headers: dict = {}
    session = collection._conn.session  # taxii2-client returns bodies only; the dates are headers
    session.hooks["response"].append(
        lambda response, *args, **kwargs: headers.update(
            {
                "last": response.headers.get("X-TAXII-Date-Added-Last")
                or response.headers.get("X-TAXII-Date-Added-First")
            }
        )
    )
    original = session.request
    session.request = lambda *args, **kwargs: original(*args, **{"timeout": TIMEOUT_SECONDS} | kwargs)
    return collection, headers


def pull(db, feed_id: int, config: Mapping[str, Any]) -> dict:
    """Pull one feed from its watermark to the end; its counts (pages, received, created, ...)."""
    with db.engine.connect() as conn:
        feed = conn.execute(select(FEEDS).where(FEEDS.c.id == feed_id)).first()
    if feed is None:
        raise LookupError(f"no feed {feed_id}")
    source, cause = f"taxii:{feed.name}"[:100], f"TAXII feed {feed.name}"
    counts: Counter = Counter()
    rejections: list[dict] = []
    newest = feed.added_after
    collection, headers = open_collection(feed, config)
    filters = {"added_after": feed.added_after} if feed.added_after else {}
    next_token = None
    try:
        for _ in range(MAX_PAGES):
            headers.clear()
            page = collection.get_objects(
                limit=feed.page_size, **filters, **({"next": next_token} if next_token else {})
            )
            counts["pages"] += 1
            records = []
            for position, item in enumerate(page.get("objects") or []):
                if not isinstance(item, dict) or item.get("type") != "indicator":
                    continue
                counts["received"] += 1
                try:
                    records += stix_indicators.to_records(item)
                except (TypeError, ValueError, KeyError, stix_indicators.STIXError) as exc:
                    counts["rejected"] += 1
                    if len(rejections) < MAX_REJECTIONS_KEPT:
                        rejections.append(
                            {
                                "position": f"page {counts['pages']} object {position}",
                                "id": str(item.get("id"))[:200],
                                "reason": str(exc)[:500],
                            }
                        )
            if records:
                with db.engine.begin() as conn:
                    merger = IndicatorMerger(conn, feed.tenant_id, source, "stix21", None, cause)
                    merger.merge_chunk(records)
                counts.update(merger.counts)
            newest = _later(newest, headers.get("last"))
            next_token = page.get("next") if page.get("more") else None
            if not next_token:
                break
    except Exception as exc:
        log.warning("TAXII feed %s (tenant %s) failed: %s", feed.name, feed.tenant_id, exc)
        with db.engine.begin() as conn:
            conn.execute(
                update(FEEDS)
                .where(FEEDS.c.id == feed_id)
                .values(
                    last_pulled_at=utcnow(),
                    last_error=f"{type(exc).__name__}: {str(exc)[:1000]}",
                    last_counts=dict(counts),
                )
            )
        raise
    summary = dict(counts) | ({"rejections": rejections} if rejections else {})
    with db.engine.begin() as conn:  # the watermark moves only after the last page
        conn.execute(
            update(FEEDS)
            .where(FEEDS.c.id == feed_id)
            .values(added_after=newest, last_pulled_at=utcnow(), last_error=None, last_counts=summary)
        )
    log.info("TAXII feed %s (tenant %s): %s", feed.name, feed.tenant_id, dict(counts))
    return summary


def due_feeds(db, now: datetime | None = None) -> list[int]:
    """The enabled feeds whose interval has passed since their last pull."""
    now = now or utcnow()
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(FEEDS.c.id, FEEDS.c.last_pulled_at, FEEDS.c.interval_seconds)
            .where(
                FEEDS.c.enabled.is_(True), or_(FEEDS.c.last_pulled_at.is_(None), FEEDS.c.last_pulled_at < now)
            )
            .order_by(FEEDS.c.id)
        ).all()
    return [
        row.id
        for row in rows
        if row.last_pulled_at is None or (now - row.last_pulled_at).total_seconds() >= row.interval_seconds
    ]


def add_feed(
    db,
    config: Mapping[str, Any],
    tenant_id: int,
    name: str,
    collection_url: str,
    username: str | None = None,
    password: str | None = None,
    page_size: int = 500,
    interval_seconds: int = 3600,
) -> int:
    """Configure a feed for a tenant (the password encrypted); its id."""
    if not collection_url.startswith(("https://", "http://")):
        raise ValueError("the collection URL must be http(s)://.../collections/<id>/")
    if not 1 <= page_size <= 10_000 or interval_seconds < 60:
        raise ValueError("the page size is 1 to 10000 and the interval at least 60 seconds")
    with db.engine.begin() as conn:
        return conn.execute(
            FEEDS.insert()
            .values(
                tenant_id=tenant_id,
                name=name,
                collection_url=collection_url.rstrip("/") + "/",
                username=username,
                secret=vault.encrypt(config, password) if password else None,
                page_size=page_size,
                interval_seconds=interval_seconds,
                enabled=True,
                created_at=utcnow(),
            )
            .returning(FEEDS.c.id)
        ).scalar()
