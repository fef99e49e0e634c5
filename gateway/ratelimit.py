"""Rate limits and quotas, counted in a storage every API process shares (Redis in production).

Built on the ``limits`` package (the counting core of Flask-Limiter) with fixed windows: the
keys here are known only inside a view (the authenticated client, the tenant once the client
is checked to be enabled for it, a push's byte count once its body is read, an OAuth client's
failed authentications), which Flask-Limiter's per-route decorators do not express, and the
answers carry the IETF ``RateLimit-*`` fields with a reset in seconds.

* pushes: requests and bytes per minute per client, and per tenant;
* every other authenticated API call (reads, workflow changes): requests per minute per client;
* the OAuth endpoints: requests per minute per client id and per remote address, and a lockout
  of a client id after repeated failed authentications;
* the console's sign-in form: attempts per minute per remote address (gateway/console/views.py
  answers a readable page; the per-user lockout of gateway/console/users.py stays as well).

A storage that cannot be reached lets the request through (logged): limits protect the
service, they never stop it.

On Redis, one call's checks are one round trip: a Lua script (:data:`CHECK_AND_COUNT`) tests
every counter, then counts them all or none, and answers each counter's value and time to live
for the ``RateLimit-*`` fields.  ``limits``' own fixed window takes a ``GET``, an ``INCRBY``
script, a ``GET`` and a ``TTL`` per counter, so a push (its client's and tenant's requests, then
their bytes) made 18 round trips, some 40% of its time in the API process.  A push of a body up
to ``STREAM_THRESHOLD`` with a declared length (``POST .../batches``) is one call: its client's
and its tenant's requests and its declared bytes, counted together before the body is read
(they were three calls: the client's request before the view, the tenant's, the bytes read).  The script keeps
``limits``' keys and expiry rule (the first count sets the window's expiry), so both can read
the same counters; other storages (``memory://``, a Redis cluster, whose keys may live on
different nodes) go through ``limits`` one call at a time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from flask import Flask, current_app, g, request
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond, parse
from limits.storage import RedisSentinelStorage, RedisStorage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from gateway.errors import PayloadTooLarge, TooManyRequests

log = logging.getLogger(__name__)

PUSH_ENDPOINTS = {"batches.push_batch", "assessments.put_assessment"}
# multipart uploads (gateway/api/uploads.py): creating, sending a part and completing count as pushes
PUSH_ENDPOINTS |= {"uploads.create_upload", "uploads.put_part", "uploads.complete_upload"}
# A push whose client's request is counted in the same call to the storage as its tenant's (and
# its declared bytes), before the body is read (:func:`before_push_body`): one round trip a push
# fewer.  A push answered before that (a 400 for its parameters, a 404 for its tenant) counts it
# when it ends (:func:`init_app`), as it did before the view.
DEFERRED_PUSH_ENDPOINTS = {"batches.push_batch"}


# KEYS: the counters.  ARGV: for each counter its limit, window in seconds, cost, and "1" to count
# it or "0" only to test that the cost still fits.  Answers {0, value, ttl, ...} for the counted
# ones, or {i, value, ttl} for the first counter (1-based) the cost does not fit, nothing counted.
CHECK_AND_COUNT = """
for i = 1, #KEYS do
  local limit, cost = tonumber(ARGV[4 * i - 3]), tonumber(ARGV[4 * i - 1])
  local current = tonumber(redis.call('GET', KEYS[i]) or '0')
  if current + cost > limit then
    return {i, current, redis.call('TTL', KEYS[i])}
  end
end
local answer = {0}
for i = 1, #KEYS do
  if ARGV[4 * i] == '1' then
    local cost = tonumber(ARGV[4 * i - 1])
    local current = redis.call('INCRBY', KEYS[i], cost)
    if current == cost then
      redis.call('EXPIRE', KEYS[i], ARGV[4 * i - 2])
    end
    answer[#answer + 1] = current
    answer[#answer + 1] = redis.call('TTL', KEYS[i])
  end
end
return answer
"""


@dataclass(frozen=True)
class Check:
    """One counter of a call: ``cost`` counted against ``item`` (or, ``count`` False, only tested)."""

    item: RateLimitItem
    ids: tuple[str, ...]
    cost: int = 1
    count: bool = True
    unit: str = "requests"


@dataclass(frozen=True)
class Window:
    """One limit's state after a request: what the ``RateLimit-*`` fields say."""

    limit: int
    remaining: int
    reset: int  # seconds until the window ends

    def headers(self) -> dict[str, str]:
        return {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(self.remaining),
                "RateLimit-Reset": str(self.reset)}


def parse_limit(value: str | None) -> RateLimitItem | None:
    """"120/minute" (any ``limits`` notation) as an item; None for an empty value (no limit)."""
    if not value or not value.strip():
        return None
    return parse(value)


def storage_url(config: dict[str, Any]) -> str:
    """The counters' storage: the setting, else the broker's Redis, else this process's memory."""
    if config.get("RATELIMIT_STORAGE_URL"):
        return config["RATELIMIT_STORAGE_URL"]
    broker = str(config.get("BROKER_URL") or "")
    return broker if broker.startswith(("redis://", "rediss://", "redis+unix://")) else "memory://"


class Limits:
    """The configured limits of one app and the storage of their counters."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.enabled = bool(config["RATELIMIT_ENABLED"])
        self.prefix = str(config.get("RATELIMIT_KEY_PREFIX") or "gateway")
        self.storage = storage_from_string(storage_url(config))
        self.limiter = FixedWindowRateLimiter(self.storage)
        self.push = parse_limit(config["RATELIMIT_PUSH"])
        self.tenant_push = parse_limit(config["RATELIMIT_TENANT_PUSH"])
        self.read = parse_limit(config["RATELIMIT_READ"])
        self.token = parse_limit(config["RATELIMIT_TOKEN"])
        self.console_login = parse_limit(config.get("RATELIMIT_CONSOLE_LOGIN"))
        push_bytes = config["RATELIMIT_PUSH_BYTES_PER_MINUTE"]
        tenant_bytes = config["RATELIMIT_TENANT_PUSH_BYTES_PER_MINUTE"]
        self.push_bytes = RateLimitItemPerMinute(push_bytes) if push_bytes > 0 else None
        self.tenant_push_bytes = RateLimitItemPerMinute(tenant_bytes) if tenant_bytes > 0 else None
        failures = config["TOKEN_LOCKOUT_FAILURES"]
        self.failures = (RateLimitItemPerSecond(failures, config["TOKEN_LOCKOUT_WINDOW_SECONDS"])
                         if failures > 0 else None)
        self.lockout = RateLimitItemPerSecond(1, max(1, config["TOKEN_LOCKOUT_SECONDS"]))
        self.script = None
        if type(self.storage) in (RedisStorage, RedisSentinelStorage):
            self.script = self.storage.get_connection().register_script(CHECK_AND_COUNT)

    # -- counting ------------------------------------------------------------------------

    def _ids(self, kind: str, key: str) -> tuple[str, ...]:
        return (self.prefix, kind, key)

    def _window(self, item: RateLimitItem, ids: tuple[str, ...]) -> Window:
        stats = self.limiter.get_window_stats(item, *ids)
        reset = max(1, math.ceil(stats.reset_time - time.time())) if stats.reset_time else item.get_expiry()
        return Window(item.amount, stats.remaining, reset)

    def consume(self, checks: list[tuple[RateLimitItem | None, str, str]], cost: int = 1,
                unit: str = "requests") -> Window | None:
        """Count ``cost`` against each ``(item, kind, key)``; 429 (nothing counted) when one is spent.

        Returns the state of the limit nearest exhaustion, for the ``RateLimit-*`` fields.
        """
        return self.apply([Check(item, self._ids(kind, key), cost, True, unit)
                           for item, kind, key in checks if item is not None])

    def apply(self, checks: list[Check]) -> Window | None:
        """Test every check, then count the counted ones, in one round trip where the storage
        allows it; 429 (nothing counted) when one does not fit.  The state of the counted limit
        nearest exhaustion, or None (limits off, nothing counted, the storage unavailable)."""
        if not self.enabled or not checks:
            return None
        try:
            windows = self._apply_script(checks) if self.script is not None else self._apply_each(checks)
        except TooManyRequests:
            raise
        except Exception as exc:  # the storage is down: let the request through
            log.warning("rate limit storage unavailable, request not limited: %s", type(exc).__name__)
            return None
        return min(windows, key=lambda w: w.remaining / w.limit) if windows else None

    def _apply_script(self, checks: list[Check]) -> list[Window]:
        keys = [self.storage.prefixed_key(check.item.key_for(*check.ids)) for check in checks]
        args: list[int | str] = []
        for check in checks:
            args += [check.item.amount, check.item.get_expiry(), check.cost, "1" if check.count else "0"]
        answer = [int(value) for value in self.script(keys=keys, args=args)]
        if answer[0]:
            check = checks[answer[0] - 1]
            self._refuse(check.item, check.ids, check.unit, Window(check.item.amount, 0, max(1, answer[2])))
        counted = [check for check in checks if check.count]
        return [Window(check.item.amount, max(0, check.item.amount - value), max(1, ttl))
                for check, value, ttl in zip(counted, answer[1::2], answer[2::2], strict=True)]

    def _apply_each(self, checks: list[Check]) -> list[Window]:
        for check in checks:
            if not self.limiter.test(check.item, *check.ids, cost=check.cost):
                self._refuse(check.item, check.ids, check.unit)
        windows = []
        for check in checks:
            if check.count:
                if not self.limiter.hit(check.item, *check.ids, cost=check.cost):
                    self._refuse(check.item, check.ids, check.unit)
                windows.append(self._window(check.item, check.ids))
        return windows

    def _refuse(self, item: RateLimitItem, ids: tuple[str, ...], unit: str,
                window: Window | None = None) -> None:
        if window is None:
            window = self._window(item, ids)
            window = Window(window.limit, 0, window.reset)
        what = "bytes pushed" if unit == "bytes" else "requests"
        scope = {"client": "this client", "tenant": "this tenant", "address": "this address",
                 "token": "this client"}.get(ids[1].split(".")[-1], "this caller")
        raise TooManyRequests(
            f"too many {what} for {scope} (limit {item.amount} per {_per(item)}); "
            f"try again in {window.reset} seconds",
            headers={"Retry-After": str(window.reset), **window.headers()})

    # -- the token endpoint's lockout ----------------------------------------------------

    def locked_for(self, client_id: str) -> int:
        """Seconds the client id stays locked out after too many failed authentications; 0 if not."""
        if not self.enabled or self.failures is None or not client_id:
            return 0
        try:
            ids = self._ids("lockout", client_id)
            if self.limiter.test(self.lockout, *ids):
                return 0
            return self._window(self.lockout, ids).reset
        except Exception as exc:
            log.warning("rate limit storage unavailable, lockout not checked: %s", type(exc).__name__)
            return 0

    def failed(self, client_id: str) -> None:
        """Count one failed authentication; lock the client id out at the configured number."""
        if not self.enabled or self.failures is None or not client_id:
            return
        try:
            ids = self._ids("auth-failures", client_id)
            self.limiter.hit(self.failures, *ids)
            if not self.limiter.test(self.failures, *ids):
                self.limiter.hit(self.lockout, *self._ids("lockout", client_id))
                self.limiter.clear(self.failures, *ids)
                log.warning("client %s locked out for %s seconds after %s failed authentications",
                            client_id[:80], self.lockout.get_expiry(), self.failures.amount)
        except Exception as exc:
            log.warning("rate limit storage unavailable, failure not counted: %s", type(exc).__name__)


def _per(item: RateLimitItem) -> str:
    seconds = item.get_expiry()
    for size, name in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if seconds % size == 0:
            count = seconds // size
            return name if count == 1 else f"{count} {name}s"
    return f"{seconds} seconds"


def current() -> Limits:
    return current_app.extensions["gateway.limits"]


def _remember(window: Window | None) -> None:
    if window is not None:
        g.ratelimit_window = window


def check_call(client_id: str) -> None:
    """An authenticated API call: a push counts against the push limit, any other call the read limit.

    Counters are keyed by the public ids (OAuth client id, tenant external id), never by row ids:
    two stores that share one Redis (staging and production, or test runs) never count together.
    """
    limits = current()
    if request.endpoint in DEFERRED_PUSH_ENDPOINTS and limits.enabled and limits.push is not None:
        g.ratelimit_push_client = client_id  # counted with the tenant's, in one call (before_push_body)
    elif request.endpoint in PUSH_ENDPOINTS:
        _remember(limits.consume([(limits.push, "push.client", client_id)]))
    else:
        _remember(limits.consume([(limits.read, "read.client", client_id)]))


def _remember_lowest(window: Window | None) -> None:
    """Keep for the ``RateLimit-*`` fields whichever limit is nearer exhaustion."""
    if window is not None and ("ratelimit_window" not in g
                               or window.remaining / window.limit < g.ratelimit_window.remaining
                               / g.ratelimit_window.limit):
        g.ratelimit_window = window


def check_tenant_push(tenant: str) -> None:
    """A push to a tenant the client is enabled for: the tenant's request limit."""
    limits = current()
    _remember_lowest(limits.consume([(limits.tenant_push, "push.tenant", tenant)]))


def _bytes_checks(limits: Limits, client_id: str, tenant: str, size: int, count: bool) -> list[Check]:
    """The client's and the tenant's bytes-per-minute checks of ``size`` bytes; 413 when ``size``
    is over a whole quota (it can never fit)."""
    items = [(limits.push_bytes, "push-bytes.client", client_id),
             (limits.tenant_push_bytes, "push-bytes.tenant", tenant)]
    for item, _, _ in items:
        if item is not None and size > item.amount:
            raise PayloadTooLarge(f"the body ({size} bytes) is larger than the push quota of "
                                  f"{item.amount} bytes per minute")
    if size <= 0:
        return []
    return [Check(item, limits._ids(kind, key), size, count, "bytes")
            for item, kind, key in items if item is not None]


def check_push_bytes(client_id: str, tenant: str, size: int, declared: bool = False) -> None:
    """A push's bytes against the client's and the tenant's bytes per minute.

    ``declared``: only check that ``size`` (the Content-Length) still fits, before the body is read;
    otherwise count it.
    """
    limits = current()
    if limits.enabled:
        limits.apply(_bytes_checks(limits, client_id, tenant, size, count=not declared))


def before_push_body(tenant: str, count_up_to: int = 0) -> bool:
    """A push to a tenant its client is enabled for, before its body is read: the tenant's
    request limit, and whether a declared (uncompressed) Content-Length still fits the quotas,
    in one call to the storage.

    ``count_up_to``: a declared (uncompressed) Content-Length of at most this many bytes is
    counted here already, and the answer is True: the caller then skips :func:`after_push_body`
    (one round trip to the storage fewer for a small push; the body read is the declared one,
    or the request fails, its bytes counted all the same)."""
    limits = current()
    if not limits.enabled:
        return False
    client = g.pop("ratelimit_push_client", None)  # deferred by check_call
    checks = [Check(limits.push, limits._ids("push.client", client))] if client is not None else []
    if limits.tenant_push is not None:
        checks.append(Check(limits.tenant_push, limits._ids("push.tenant", tenant)))
    too_large = None
    counted = False
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if request.content_length and encoding in ("", "identity"):
        counted = request.content_length <= count_up_to
        try:
            checks += _bytes_checks(limits, g.caller.client_id, tenant, request.content_length, count=counted)
        except PayloadTooLarge as exc:  # after the tenant's request is counted, as before the body
            too_large = exc
    _remember_lowest(limits.apply(checks))
    if too_large is not None:
        raise too_large
    return counted


def after_push_body(tenant: str, size: int) -> None:
    """Count the push's bytes (as stored, after gunzip) against the client's and tenant's quotas."""
    check_push_bytes(g.caller.client_id, tenant, size)


def init_app(app: Flask) -> None:
    app.extensions["gateway.limits"] = Limits(app.config)

    @app.after_request
    def _ratelimit_headers(response):
        client = g.pop("ratelimit_push_client", None)
        if client is not None:  # a push answered before its body: its client's request still counts
            limits = current()
            try:
                _remember_lowest(limits.consume([(limits.push, "push.client", client)]))
            except TooManyRequests:  # already over: the answer stands, nothing counted
                pass
        window = g.pop("ratelimit_window", None)
        if window is not None and response.status_code != 429:
            response.headers.update(window.headers())
        return response


def count_arriving_bytes(tenant: str, size: int, total: int) -> None:
    """A streamed push (gateway/streaming.py): count ``size`` more bytes as they arrive, ``total`` so far.

    A body that grows past a whole quota is 413 (it can never fit), as a declared one is.
    """
    limits = current()
    if not limits.enabled:
        return
    for item in (limits.push_bytes, limits.tenant_push_bytes):
        if item is not None and total > item.amount:
            raise PayloadTooLarge(f"the body (over {item.amount} bytes) is larger than the push quota of "
                                  f"{item.amount} bytes per minute")
    limits.consume([(limits.push_bytes, "push-bytes.client", g.caller.client_id),
                    (limits.tenant_push_bytes, "push-bytes.tenant", tenant)], cost=size, unit="bytes")
