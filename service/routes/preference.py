"""POST /preference — pairwise P(a ≻ b) under Bradley–Terry."""

from __future__ import annotations

from fastapi import APIRouter

from service.deps import EngineDep, ManagerDep, SettingsDep, served_model
from service.errors import SCORING_ERRORS, error_responses
from service.schemas import (
    ConversationPair,
    PreferenceRequest,
    PreferenceResponse,
    PreferenceResult,
    PromptPair,
    Usage,
)
from service.scoring import check_item_count, encode_and_score, sigmoid


def _sides(item: PromptPair | ConversationPair) -> tuple[dict, dict]:
    if isinstance(item, PromptPair):
        return {"prompt": item.prompt, "response": item.a}, {"prompt": item.prompt, "response": item.b}
    return (
        {"messages": [m.model_dump() for m in item.messages_a]},
        {"messages": [m.model_dump() for m in item.messages_b]},
    )


router = APIRouter(responses=error_responses(*SCORING_ERRORS))


@router.post("/preference", response_model=PreferenceResponse)
async def preference(
    body: PreferenceRequest, engine: EngineDep, manager: ManagerDep, settings: SettingsDep
) -> PreferenceResponse:
    check_item_count(2 * len(body.items), settings.max_items)
    model = served_model(manager, body.model)
    sides = [side for item in body.items for side in _sides(item)]
    rewards, tokens = await encode_and_score(
        engine, model, sides, lambda batch: model.rm.encode_many(batch, truncate=body.truncate),
        settings.item_char_limit,
    )
    results = [
        PreferenceResult(reward_a=a, reward_b=b, p_a_over_b=sigmoid(a - b))
        for a, b in zip(rewards[0::2], rewards[1::2], strict=True)
    ]
    return PreferenceResponse(model=model.label, results=results, usage=Usage(tokens=tokens))
