"""POST /adapt — a new domain's prompts → a job that adapts a policy to it (OOD-PL meta-test,
plus MetaRM rounds with ``params.metarm``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.deps import JobsDep, ManagerDep
from service.errors import JOB_ERRORS, error_responses
from service.jobs import submit_job
from service.schemas import AdaptRequest

router = APIRouter(responses=error_responses(*JOB_ERRORS))


@router.post("/adapt", status_code=202)
async def adapt(body: AdaptRequest, request: Request, jobs: JobsDep,
                manager: ManagerDep) -> JSONResponse:
    spec = body.model_dump(exclude_none=True)
    if "reward_model" not in spec:
        # adapt against the RM this server answers with, pinned to its version
        current = manager.current
        if current is not None and current.model.from_registry:
            spec["reward_model"] = current.label
        else:
            spec["reward_model"] = manager.reference
    return await submit_job(request, jobs, "adapt", spec)
