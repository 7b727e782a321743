"""Sending a job's message to its queue (used by the client and the reaper)."""

from __future__ import annotations

from celery import Celery

from worker.celery_app import RUN_JOB_TASK


def enqueue(app: Celery, job_id: str, kind: str, queue: str) -> None:
    app.send_task(RUN_JOB_TASK, kwargs={"job_id": job_id, "kind": kind}, queue=queue)
