"""Jobs: POST /jobs, GET /jobs, GET /jobs/{id}, DELETE /jobs/{id}.

The job record in Redis is the source of truth (DESIGN §5); this router only validates,
enqueues and reads through ``worker.client.JobClient``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.deps import JobsDep
from service.errors import JOB_ERRORS, InvalidInput, NotFound, error_responses
from service.jobs import submit_job
from service.schemas import JobRequest

router = APIRouter(responses=error_responses(*JOB_ERRORS))


@router.post("/jobs", status_code=202)
async def submit(body: JobRequest, request: Request, jobs: JobsDep) -> JSONResponse:
    return await submit_job(request, jobs, body.kind, body.spec)


@router.get("/jobs")
async def list_jobs(
    jobs: JobsDep,
    limit: int = Query(50, ge=1, le=1000),
    status: str | None = Query(None, description="queued|running|succeeded|failed|cancelled"),
) -> dict[str, Any]:
    try:
        records = await run_in_threadpool(jobs.list, limit, status)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    return {"jobs": records}


@router.get("/jobs/{job_id}", name="get_job")
async def get_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    record = await run_in_threadpool(jobs.get, job_id)
    if record is None:
        raise NotFound(f"no job {job_id!r}; list jobs with GET /jobs")
    return record


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    record = await run_in_threadpool(jobs.cancel, job_id)
    if record is None:
        raise NotFound(f"no job {job_id!r}; list jobs with GET /jobs")
    return record
