"""Re-queue jobs whose worker died (the visibility-timeout trap of the Redis transport), and
re-send queued jobs whose message was lost.

With ``acks_late`` the message of a job whose worker was ``kill -9``'d stays unacknowledged
in Redis until the visibility timeout passes — days, since it must exceed the longest job.
So liveness is judged by the job's lease instead: a ``running`` job whose lease expired (no
heartbeat for ``job_stale_seconds``) is set back to ``queued`` and sent again, failed once it
used up its attempts, or cancelled if a cancel was asked meanwhile. When the original
message finally comes back, the claim sees the job finished or owned and drops it.
A job is recorded before its message is sent, so a Redis crash between the two (or an AOF
that lost its last second) leaves a ``queued`` record with no message, which no worker would
ever see: a queued job that has waited ``job_resend_seconds`` and has no message in any queue
(nor one a worker holds) is sent again. A duplicate message is harmless: the claim refuses it.

Runs at worker start-up, periodically in the worker's parent process, and on demand from
the API (``JobClient.reap_stale``). Several reapers at once are safe: each decision is one
atomic script, so only one of them re-queues a given job.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from worker.dispatch import jobs_in_broker
from worker.settings import WorkerSettings
from worker.store import JobStore

log = logging.getLogger(__name__)

ACTIONS = ("requeued", "failed", "cancelled")


def _age_seconds(timestamp: str | None) -> float:
    if not timestamp:
        return float("inf")
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.now(UTC) - then).total_seconds()


def reap_stale(
    store: JobStore, settings: WorkerSettings, enqueue: Callable[[str, str, str], None]
) -> list[dict[str, Any]]:
    """One pass over the active jobs; returns ``[{"id", "action"}]`` for what it changed:
    ``requeued``/``failed``/``cancelled`` for a running job whose worker is gone, ``resent``
    for a queued job whose message was lost."""
    done = []
    in_broker: set[str] | None = None  # read once per pass, and only when needed
    for job_id in store.active_ids():
        record = store.get(job_id)
        max_attempts = int((record or {}).get("max_attempts") or settings.job_max_attempts)
        action = store.reap(job_id, max_attempts, settings.job_stale_seconds)
        if action == "requeued":
            enqueue(job_id, record["kind"], record.get("queue") or "train")
        if action in ACTIONS:
            log.warning("job %s: worker lost (no heartbeat for %gs) -> %s",
                        job_id, settings.job_stale_seconds, action)
            done.append({"id": job_id, "action": action})
        elif action == "queued" and _age_seconds(record.get("updated_at")) > settings.job_resend_seconds:
            if in_broker is None:
                in_broker = jobs_in_broker(store.redis)
            if job_id not in in_broker and store.touch_if_queued(job_id):
                enqueue(job_id, record["kind"], record.get("queue") or "train")
                log.warning("job %s: queued with no message in the broker (lost in a Redis "
                            "crash?); sent again", job_id)
                done.append({"id": job_id, "action": "resent"})
    store.prune_index()
    return done


def reap_interval(settings: WorkerSettings) -> float:
    return max(0.2, min(settings.job_heartbeat_seconds, settings.job_stale_seconds / 2))


class ReaperThread(threading.Thread):
    """Calls :func:`reap_stale` every :func:`reap_interval` seconds until stopped."""

    def __init__(self, store: JobStore, settings: WorkerSettings, enqueue) -> None:
        super().__init__(name="generalrm-reaper", daemon=True)
        self.store, self.settings, self.enqueue = store, settings, enqueue
        self.stopped = threading.Event()

    def run(self) -> None:
        while True:
            try:
                reap_stale(self.store, self.settings, self.enqueue)
            except RedisError as exc:  # Redis restarting: try again next round
                log.warning("reaper: %s", exc)
            except Exception:
                log.exception("reaper pass failed")
            if self.stopped.wait(reap_interval(self.settings)):
                return

    def stop(self) -> None:
        self.stopped.set()
