"""What the API (and the CLI, and tests) call to submit, read, list and cancel jobs.

Torch-free to import. Every method raises :class:`JobStoreUnavailable` (a subclass of
``redis.exceptions.ConnectionError``) when Redis cannot be reached: the API answers 503.
``submit`` raises :class:`SpecError` (a ``ValueError``) for a spec that cannot run: 422.

Record shape (JSON-ready)::

    {"id", "kind", "queue", "spec", "status": "queued|running|succeeded|failed|cancelled",
     "attempt", "max_attempts", "heartbeat", "worker", "progress": {"step", "total", ...},
     "metrics", "artifacts", "error": null | {"type", "message"}, "attempts": [...],
     "cancel_requested", "created_at", "updated_at",
     "finished_at"}    # times: ISO-8601 UTC; finished_at is null until a final status
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any
from urllib.parse import urlsplit

import redis
from kombu.exceptions import OperationalError

from worker.celery_app import QUEUES
from worker.kinds import available_kinds, get_kind, queue_for
from worker.reaper import reap_stale
from worker.settings import WorkerSettings
from worker.specs import SpecError, ValidationContext, job_processes
from worker.store import STATUSES, JobGauges, JobStore, new_job_id

__all__ = ["JobClient", "JobStoreUnavailable", "SpecError"]


class JobStoreUnavailable(redis.exceptions.ConnectionError):
    """Redis (job store and broker) cannot be reached; try again when it is back."""


def _where(url: str) -> str:
    parts = urlsplit(url)  # never echo a password
    return f"{parts.hostname}:{parts.port or 6379}"


def _unavailable_as_503(method):
    @functools.wraps(method)
    def wrapper(self: JobClient, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except JobStoreUnavailable:
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                OperationalError) as exc:
            raise JobStoreUnavailable(
                f"job store unavailable: cannot reach Redis at {_where(self.settings.redis_url)} "
                f"({exc}); jobs resume being accepted when it is back"
            ) from exc
    return wrapper


class JobClient:
    """Jobs in Redis, for the API. Thread-safe (redis-py pools its connections)."""

    def __init__(self, settings: WorkerSettings | None = None) -> None:
        self.settings = settings or WorkerSettings()
        self.store = JobStore.from_url(self.settings.redis_url, self.settings.job_retention_seconds)
        self._celery = None

    @property
    def celery(self):
        if self._celery is None:
            from worker.celery_app import make_celery

            self._celery = make_celery(self.settings)
        return self._celery

    def kinds(self) -> dict[str, str]:
        """``{kind: description}`` of the kinds this deployment accepts."""
        return {k.name: k.description
                for k in available_kinds(self.settings.enable_diagnostic_jobs).values()}

    def validate(self, kind: str, spec: Any) -> dict[str, Any]:
        """The spec with defaults filled in, or :class:`SpecError` saying what to fix."""
        try:
            job_kind = get_kind(kind, self.settings.enable_diagnostic_jobs)
        except KeyError as exc:
            raise SpecError(exc.args[0]) from None
        return job_kind.validate(spec, ValidationContext(self.settings))

    def deprecations(self, kind: str, spec: Any) -> list[str]:
        """What of ``spec`` still uses a renamed key (it works; the client should move)."""
        return get_kind(kind, diagnostics=True).deprecations(spec)

    @_unavailable_as_503
    def submit(self, kind: str, spec: Any) -> dict[str, Any]:
        """Validate, record (status ``queued``) and enqueue a job; returns its record."""
        normalized = self.validate(kind, spec)
        queue = queue_for(get_kind(kind, diagnostics=True), normalized)
        job_id = new_job_id()
        record = self.store.create(job_id, kind, queue, normalized, self.settings.job_max_attempts,
                                   processes=job_processes(normalized))
        try:
            from worker.dispatch import enqueue

            enqueue(self.celery, job_id, kind, queue)
        except Exception:
            # not accepted after all: no record of a job that no worker will ever see
            self.store.delete(job_id)
            raise
        self._wait_until_durable()
        return record

    def _wait_until_durable(self) -> None:
        """On Redis >= 7.2 with the append-only file on, wait (≤ 1 s) until the record and the
        message are fsynced, so that a 202 survives a crash of Redis right after it. Older
        Redis (or AOF off): the README says what persistence then guarantees."""
        # a ResponseError: an unknown command (Redis < 7.2), or appendonly disabled
        with contextlib.suppress(redis.exceptions.ResponseError):
            self.store.redis.execute_command("WAITAOF", 1, 0, 1000)

    @_unavailable_as_503
    def get(self, job_id: str) -> dict[str, Any] | None:
        """The record, or None for an id never submitted (the API answers 404)."""
        return self.store.get(job_id)

    @_unavailable_as_503
    def list(self, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        """Newest first, at most ``limit``; ``status`` filters (ValueError when not a status)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, not {status!r}")
        return self.store.list(limit=limit, status=status)

    @_unavailable_as_503
    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel: a queued job is ``cancelled`` at once; a running one gets
        ``cancel_requested: true`` and turns ``cancelled`` when its trainer stops at the next
        step (checkpoint kept, nothing published) — or, when the cancel comes after it published
        its results, stays ``succeeded`` with a ``cancel_outcome`` saying so; a job that had
        already ended is returned unchanged, with ``cancel_outcome`` saying it came too late.
        None for an unknown id."""
        outcome = self.store.cancel(job_id)
        if outcome == "missing":
            return None
        record = self.store.get(job_id)
        if record is not None and outcome.startswith("ended:"):
            ended = outcome.removeprefix("ended:")
            record["cancel_outcome"] = f"too late: the job had already ended ({ended}); nothing changed"
        return record

    @_unavailable_as_503
    def reap_stale(self) -> list[dict[str, Any]]:
        """Re-queue (or fail, past the attempt cap) running jobs whose worker stopped
        heart-beating; returns ``[{"id", "action"}]``. Workers do this by themselves too."""
        from worker.dispatch import enqueue

        return reap_stale(self.store, self.settings,
                          lambda job_id, kind, queue: enqueue(self.celery, job_id, kind, queue))

    @_unavailable_as_503
    def counts(self) -> dict[str, int]:
        """Jobs per status."""
        return self.store.counts()

    @_unavailable_as_503
    def gauges(self) -> JobGauges:
        """Jobs per status and the processes running jobs, for ``/metrics`` (one hash read)."""
        return self.store.gauges()

    @_unavailable_as_503
    def queue_depths(self) -> dict[str, int]:
        """Messages waiting per Celery queue, for ``/metrics``."""
        return {queue: int(self.store.redis.llen(queue)) for queue in QUEUES}

    @_unavailable_as_503
    def ping(self) -> bool:
        return self.store.ping()

    def close(self) -> None:
        self.store.redis.close()
