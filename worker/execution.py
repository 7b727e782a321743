"""One job's life on a worker: claim → run the kind with heartbeat → final status.

Runs inside the Celery child process (one job per process). Whatever the broker delivers —
the first message, a duplicate, a message redelivered after its visibility timeout, or a
re-enqueue by the reaper — the atomic claim in the job store decides: only a job that is
not finished and not held by a live worker runs, and it resumes from its checkpoints.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

from training.callbacks import TrainingCancelled
from training.registry import Registry
from worker.kinds import get_kind
from worker.progress import Heartbeat, JobCallback, LeaseLost
from worker.settings import WorkerSettings
from worker.specs import JobContext, latest_checkpoint_step
from worker.store import JobStore, record_time

log = logging.getLogger(__name__)


def job_dir(settings: WorkerSettings, job_id: str) -> Path:
    return Path(settings.artifacts_dir) / "jobs" / job_id


def execute_job(
    job_id: str,
    settings: WorkerSettings | None = None,
    worker_name: str | None = None,
    requeue: Callable[[str, str, str], None] | None = None,
) -> str:
    """Run job ``job_id`` if this worker may; returns what happened (for logs and tests):
    succeeded, failed, cancelled, released (worker shutting down: checkpointed and handed
    back to the queue through ``requeue(job_id, kind, queue)``), owned (a live worker has
    it), finished (already final), exhausted (attempt cap), missing or lease_lost."""
    settings = settings or WorkerSettings()
    worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}"
    store = JobStore.from_url(settings.redis_url, settings.job_retention_seconds)
    record = store.get(job_id)
    if record is None:
        log.warning("job %s: no record in the job store; dropping the message", job_id)
        return "missing"
    token = f"{worker_name}:{uuid.uuid4().hex}"
    max_attempts = int(record.get("max_attempts") or settings.job_max_attempts)
    claim = store.claim(job_id, token, settings.job_stale_seconds, max_attempts, worker_name)
    if claim.outcome != "claimed":
        log.info("job %s: not run (%s)", job_id, claim.outcome)
        return claim.outcome

    run_dir = job_dir(settings, job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = latest_checkpoint_step(run_dir)
    started = {"attempt": claim.attempt, "worker": worker_name, "started_at": record_time(),
               "resumed_from_step": resumed_from}
    store.update_if_owner(job_id, token, attempts=[*record.get("attempts", []), started],
                          progress={**record.get("progress", {}), "resumed_from_step": resumed_from})
    log.info("job %s (%s): attempt %d, resuming from step %d", job_id, record["kind"],
             claim.attempt, resumed_from)

    with Heartbeat(store, job_id, token, settings.job_heartbeat_seconds,
                   settings.job_stale_seconds) as heartbeat:
        callback = JobCallback(store, job_id, token, heartbeat, worker_name,
                               base_progress={"resumed_from_step": resumed_from})

        def check_owner() -> None:
            if heartbeat.lost.is_set() or store.lease_holder(job_id) != token:
                raise LeaseLost(f"job {job_id} is now owned by another worker")

        try:
            kind = get_kind(record["kind"], diagnostics=True)  # gated at submission
            outcome = kind.run(JobContext(
                job_id=job_id, spec=record["spec"], run_dir=run_dir, settings=settings,
                callback=callback, attempt=claim.attempt,
                registry=Registry.from_artifacts(settings.artifacts_dir), check_owner=check_owner,
                stop_requested=lambda: callback.should_stop(fresh=True),
            ))
        except TrainingCancelled as exc:
            if callback.lease_lost:
                return "lease_lost"
            if callback.drain_seen and not callback.cancel_seen and requeue is not None:
                # a shutdown, not a cancel: the checkpoint is written, another worker resumes
                if store.release_if_owner(job_id, token):
                    requeue(job_id, record["kind"], record.get("queue") or "train")
                log.info("job %s: worker shutting down; released at step %d", job_id, exc.step)
                return "released"
            store.finish_if_owner(job_id, token, "cancelled", artifacts={
                "run_dir": str(run_dir), "checkpoint": exc.checkpoint, "cancelled_at_step": exc.step})
            log.info("job %s: cancelled at step %d", job_id, exc.step)
            return "cancelled"
        except LeaseLost:
            return "lease_lost"
        except Exception as exc:
            log.exception("job %s failed", job_id)
            if callback.lease_lost:
                return "lease_lost"
            store.finish_if_owner(job_id, token, "failed",
                                  error={"type": type(exc).__name__, "message": str(exc)})
            return "failed"
        if not store.finish_if_owner(job_id, token, "succeeded",
                                     metrics=outcome.metrics, artifacts=outcome.artifacts):
            return "lease_lost"
    log.info("job %s: succeeded %s", job_id, outcome.artifacts)
    return "succeeded"
