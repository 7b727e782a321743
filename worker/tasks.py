"""The one Celery task, thin: run a job by id (the job store says what and whether).

Also starts the reaper in the worker's parent process once the worker is ready. Nothing
here imports torch: job kinds import it inside their runners, in the child process.
"""

from __future__ import annotations

import logging

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from redis.exceptions import RedisError

from worker.celery_app import RUN_JOB_TASK, app
from worker.dispatch import enqueue
from worker.reaper import ReaperThread, reap_interval
from worker.settings import WorkerSettings
from worker.store import JobStore

log = logging.getLogger(__name__)
_reaper: ReaperThread | None = None


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str, kind: str | None = None) -> str:
    from worker.execution import execute_job

    try:
        return execute_job(
            job_id, WorkerSettings(), worker_name=self.request.hostname,
            requeue=lambda job, kind_name, queue: enqueue(self.app, job, kind_name, queue),
        )
    except RedisError as exc:
        # Redis blinked: before the claim the job is still queued and only this message
        # would ever start it, so send it again; after the claim the lease and the reaper
        # take over and a duplicate message is refused by the claim
        raise self.retry(exc=exc, countdown=5, max_retries=None) from exc


@worker_ready.connect
def _start_reaper(sender=None, **kwargs) -> None:
    global _reaper
    settings = WorkerSettings()
    celery_app = sender.app if sender is not None else app
    store = JobStore.from_url(settings.redis_url, settings.job_retention_seconds)
    if sender is not None:
        store.set_draining(sender.hostname, False)  # a restart under the same name runs jobs
    _reaper = ReaperThread(
        store, settings,
        lambda job_id, kind, queue: enqueue(celery_app, job_id, kind, queue),
    )
    _reaper.start()
    log.info("reaper started (every %.1fs)", reap_interval(settings))


@worker_shutting_down.connect
def _drain_running_job(sender=None, sig=None, how=None, exitcode=None, **kwargs) -> None:
    """SIGTERM (docker stop, Ctrl-C): the running job checkpoints at its next step and goes
    back to the queue, within the stop grace period, instead of being killed mid-step."""
    if sender is None:
        return
    try:
        JobStore.from_url(WorkerSettings().redis_url).set_draining(str(sender), True)
        log.info("shutting down (%s): the running job will checkpoint and be re-queued", sig)
    except Exception as exc:  # Redis down: Celery's own shutdown still proceeds
        log.warning("could not ask the running job to checkpoint: %s", exc)


@worker_shutdown.connect
def _stop_reaper(**kwargs) -> None:
    if _reaper is not None:
        _reaper.stop()
