"""POST /adapt — a new domain's prompts → a job that adapts a policy to it (OOD-PL meta-test,
plus MetaRM rounds with ``params.metarm``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from starlette.concurrency import run_in_threadpool

from service.deps import JobsDep
from service.routes.jobs import accepted

NonEmpty = Annotated[str, StringConstraints(min_length=1)]
MAX_PROMPTS = 10_000


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    domain: NonEmpty = Field(description="Name of the new domain (recorded in the lineage)")
    prompts: list[NonEmpty] | None = Field(
        None, min_length=1, max_length=MAX_PROMPTS, description="The domain's prompts, inline"
    )
    dataset: NonEmpty | None = Field(
        None, description="Or a JSONL of {prompt[, responses]} rows, relative to the data directory"
    )
    pairs: NonEmpty | None = Field(
        None, description="Optional JSONL of the domain's preference pairs (PL accuracy)"
    )
    policy: NonEmpty | None = Field(None, description="Reference policy (default smollm2-135m)")
    reward_model: NonEmpty | None = Field(None, description="Frozen RM (default: the served one)")
    name: NonEmpty | None = Field(
        None, description="Registry name of the adapted policy (default policy-<domain>)"
    )
    rm_name: NonEmpty | None = Field(
        None, description="Registry name of the domain-adapted RM, with params.metarm (default rm-<domain>)"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="AdaptConfig knobs; 'metarm' for MetaRM rounds")

    @model_validator(mode="after")
    def _one_source(self) -> AdaptRequest:
        if (self.prompts is None) == (self.dataset is None):
            raise ValueError("give the domain's prompts either inline ('prompts') or as 'dataset', not both or neither")
        return self


router = APIRouter()


@router.post("/adapt", status_code=202)
async def adapt(body: AdaptRequest, request: Request, jobs: JobsDep) -> JSONResponse:
    spec = body.model_dump(exclude_none=True)
    if "reward_model" not in spec:
        # adapt against the RM this server answers with, pinned to its version
        current = request.app.state.models.current
        if current is not None and current.version not in ("pretrained", "hub"):
            spec["reward_model"] = current.label
        else:
            spec["reward_model"] = request.app.state.models.reference
    record = await run_in_threadpool(jobs.submit, "adapt", spec)
    return accepted(request, record)
