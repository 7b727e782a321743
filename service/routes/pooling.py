"""vLLM-compatible ``POST /classify`` and ``POST /pooling``, SGLang-style ``POST /v1/embeddings``:
drop-ins for clients written against those servers (veRL's reward-model workers among them).
What the values mean is in ``service.pooling``; our ``/score`` is not vLLM's (that one scores
text pairs with a cross-encoder)."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import EngineDep, ManagerDep, SettingsDep, served_model
from service.errors import SCORING_ERRORS, error_responses
from service.pooling import (
    check_pooling_task,
    classify_response,
    embeddings_response,
    pooling_response,
    score_inputs,
)
from service.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    PoolingRequest,
    PoolingResponse,
)

router = APIRouter(tags=["vLLM / SGLang compatible"], responses=error_responses(*SCORING_ERRORS))


@router.post("/classify", response_model=ClassifyResponse)
async def classify(body: ClassifyRequest, engine: EngineDep, manager: ManagerDep,
                   settings: SettingsDep) -> ClassifyResponse:
    model = served_model(manager, body.model)
    rewards, tokens = await score_inputs(engine, model, body, settings)
    return classify_response(model, rewards, tokens, body.activated)


@router.post("/pooling", response_model=PoolingResponse)
async def pooling(body: PoolingRequest, engine: EngineDep, manager: ManagerDep,
                  settings: SettingsDep) -> PoolingResponse:
    check_pooling_task(body)
    model = served_model(manager, body.model)
    rewards, tokens = await score_inputs(engine, model, body, settings)
    return pooling_response(model, rewards, tokens, body.activated)


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
async def embeddings(body: EmbeddingsRequest, engine: EngineDep, manager: ManagerDep,
                     settings: SettingsDep) -> EmbeddingsResponse:
    model = served_model(manager, body.model)
    rewards, tokens = await score_inputs(engine, model, body, settings)
    return embeddings_response(model, rewards, tokens)
