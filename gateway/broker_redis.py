"""The broker's Redis, for the small state the API and the workers share beside the task queue
(a tenant's pending small-batch mark, gateway/smallbatches.py; the live merge slots,
gateway/merge/parallel.py)."""

from __future__ import annotations

import functools

SCHEMES = ("redis://", "rediss://", "redis+unix://")


def url_of(broker: str | None) -> str | None:
    """The broker URL when the broker is Redis, else None."""
    broker = str(broker or "")
    return broker if broker.startswith(SCHEMES) else None


@functools.cache
def client(url: str, timeout: float):
    """One client per URL and process (redis-py's pool opens its connections again in a forked
    child: gunicorn, celery's pool); kombu's ``redis+unix://`` is redis-py's ``unix://``."""
    import redis

    return redis.Redis.from_url(url.replace("redis+unix://", "unix://", 1), socket_timeout=timeout,
                                socket_connect_timeout=timeout)
