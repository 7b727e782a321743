"""POST /score — scalar rewards for RLHF trainers."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import EngineDep, ManagerDep, SettingsDep, served_model
from service.errors import SCORING_ERRORS, error_responses
from service.schemas import ScoreRequest, ScoreResponse, Usage
from service.scoring import check_item_count, encode_and_score, normalize

router = APIRouter(responses=error_responses(*SCORING_ERRORS))


@router.post("/score", response_model=ScoreResponse)
async def score(
    body: ScoreRequest, engine: EngineDep, manager: ManagerDep, settings: SettingsDep
) -> ScoreResponse:
    check_item_count(len(body.items), settings.max_items)
    model = served_model(manager, body.model)
    rewards, tokens = await encode_and_score(
        engine,
        model,
        [item.model_dump() for item in body.items],
        lambda items: model.rm.encode_many(items, truncate=body.truncate),
        settings.item_char_limit,
    )
    if body.normalize:
        rewards = normalize(rewards, model)
    return ScoreResponse(model=model.label, rewards=rewards, usage=Usage(tokens=tokens))
