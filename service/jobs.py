"""Submitting a job from a route: validate and enqueue off the event loop, answer 202."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.schemas import JobAccepted
from worker.client import JobClient


async def submit_job(request: Request, jobs: JobClient, kind: str, spec: Any) -> JSONResponse:
    """202 with the job's id and status URL (and a ``Location`` header)."""
    record = await run_in_threadpool(jobs.submit, kind, spec)
    status_url = str(request.url_for("get_job", job_id=record["id"]))
    body = JobAccepted(job_id=record["id"], status_url=status_url, status=record["status"],
                       warnings=jobs.deprecations(kind, spec))
    return JSONResponse(body.model_dump(exclude_defaults=True),
                        status_code=202, headers={"Location": status_url})
