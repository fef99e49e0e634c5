"""Table statistics kept fresh after large merges, without making the next merge wait.

``gateway.pipeline.analyze_if_due`` decides which tables a merge changed enough and runs
``ANALYZE`` (``VACUUM (ANALYZE)`` on the tables counts read by index alone) on them.  On a
1M-finding tenant that takes seconds, and run in line it held the worker process: the next
push queued behind it (the 10 x 100k sequence reached 1.22x the first push end to end, its
merges alone stayed within 0.93-1.19x).  So the worker hands it to a thread of its own, on a
connection of its own, and takes the next batch at once.  Neither statement blocks a merge:
both take SHARE UPDATE EXCLUSIVE, which conflicts with no INSERT, UPDATE or DELETE, and
``SKIP_LOCKED`` skips a table another session is vacuuming or analyzing.

The round also folds the change rows of the kept per-provider finding counts
(gateway/provider_counts.py ``compact``).  A merge after which no table is due starts no thread.

One thread per process at most: a merge that lands while it runs asks for one more round,
run when the current one ends (with the newest settings), so rounds never pile up.  The
thread is a daemon: a worker that stops mid-ANALYZE loses nothing (statistics are advisory,
and the next merge, or autovacuum, catches up).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_running: threading.Thread | None = None
_again: tuple | None = None


def analyze_in_background(db: Any, after_rows: int, after_growth: float,
                          batch_id: int | None = None) -> threading.Thread | None:
    """Run ``analyze_if_due`` in this process's statistics thread; the thread (None: nothing to do)."""
    global _running, _again
    from gateway import pipeline  # looked up at run time: pipeline imports this module

    # a thread only when a table is due (one quick read): most merges start none
    if not pipeline.analysis_due(db, after_rows, after_growth):
        return None
    arguments = (db, after_rows, after_growth, batch_id)
    with _lock:
        if _running is not None:
            _again = arguments  # the running round ends, then one more with these
            return _running
        _running = threading.Thread(target=_rounds, args=(arguments,), name="gateway-analyze", daemon=True)
        _running.start()
        return _running


def wait_for_analysis(timeout: float = 60.0) -> bool:
    """Wait until the statistics thread (if any) is done; False if it is still running."""
    with _lock:
        thread = _running
    if thread is None:
        return True
    thread.join(timeout)
    return not thread.is_alive()


def _rounds(arguments: tuple) -> None:
    global _running, _again
    from gateway import pipeline  # looked up at run time: pipeline imports this module

    while True:
        try:
            pipeline.analyze_if_due(*arguments)
            _compact_counts(arguments[0])
        except Exception:  # noqa: BLE001 - never let the thread die with a round asked for
            log.warning("statistics round after batch %s failed", arguments[3], exc_info=True)
        with _lock:
            if _again is None:
                _running = None
                return
            arguments, _again = _again, None


def _compact_counts(db: Any) -> None:
    """Fold the kept per-provider finding counts' change rows (gateway/provider_counts.py)."""
    from gateway.provider_counts import compact

    with db.engine.begin() as conn:
        compact(conn)
