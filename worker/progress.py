"""The running job's side of the job store: heartbeat/lease thread and trainer callback."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from redis.exceptions import RedisError

from worker.store import JobStore

log = logging.getLogger(__name__)

PROGRESS_WRITE_SECONDS = 0.25  # tiny models step thousands of times a second
CANCEL_CHECK_SECONDS = 0.2


class LeaseLost(RuntimeError):
    """Another worker now owns this job (ours was presumed dead): stop without writing."""


class Heartbeat:
    """Renews the job's lease and heartbeat every ``interval`` seconds in a daemon thread.

    The lease is lost when another token holds it, or when Redis could not be reached for
    most of the stale window (the reaper may already have handed the job to another worker).
    """

    def __init__(self, store: JobStore, job_id: str, token: str, interval: float, stale: float):
        self.store, self.job_id, self.token = store, job_id, token
        self.interval, self.stale = interval, stale
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                if self.store.renew(self.job_id, self.token, self.stale):
                    last_ok = time.monotonic()
                    continue
                log.error("job %s: lease taken by another worker; stopping", self.job_id)
                self.lost.set()
                return
            except RedisError as exc:
                if time.monotonic() - last_ok > 0.8 * self.stale:
                    log.error("job %s: Redis unreachable too long (%s); stopping", self.job_id, exc)
                    self.lost.set()
                    return
                log.warning("job %s: heartbeat failed (%s); retrying", self.job_id, exc)


class JobCallback:
    """``training.callbacks.TrainerCallback`` writing progress to the job record and reading
    the cancel key. ``should_stop`` is also true when the lease is lost and when the worker
    is shutting down (``drain_seen``: the job goes back to the queue, not to cancelled)."""

    def __init__(self, store: JobStore, job_id: str, token: str, heartbeat: Heartbeat,
                 worker: str, base_progress: dict[str, Any] | None = None) -> None:
        self.store, self.job_id, self.token, self.heartbeat = store, job_id, token, heartbeat
        self.worker = worker
        self.base_progress = dict(base_progress or {})  # kept in every write (resumed_from_step)
        self.cancel_seen = False
        self.drain_seen = False
        self._last_write = 0.0
        self._last_cancel_check = 0.0

    @property
    def lease_lost(self) -> bool:
        return self.heartbeat.lost.is_set()

    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if step < total and now - self._last_write < PROGRESS_WRITE_SECONDS:
            return
        self._last_write = now
        shown = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)}
        progress = {**self.base_progress, "step": step, "total": total, **shown}
        try:
            if not self.store.update_if_owner(self.job_id, self.token, progress=progress):
                self.heartbeat.lost.set()
        except RedisError as exc:  # progress is best effort; the heartbeat judges the lease
            log.warning("job %s: progress not recorded (%s)", self.job_id, exc)

    def should_stop(self, *, fresh: bool = False) -> bool:
        """``fresh``: read the store now, not a value up to CANCEL_CHECK_SECONDS old (before a
        job makes its results visible)."""
        if self.lease_lost or self.cancel_seen or self.drain_seen:
            return True
        now = time.monotonic()
        if fresh or now - self._last_cancel_check >= CANCEL_CHECK_SECONDS:
            self._last_cancel_check = now
            try:
                self.cancel_seen, self.drain_seen = self.store.stop_requests(self.job_id, self.worker)
            except RedisError as exc:
                log.warning("job %s: cancel key unreadable (%s)", self.job_id, exc)
        return self.cancel_seen or self.drain_seen
