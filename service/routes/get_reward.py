"""POST /get_reward — OpenRLHF's remote reward-model protocol (``--remote_rm_url``).

OpenRLHF sends the decoded prompt+response as ``query`` (special tokens kept, left padding
included), optionally ``prompts`` and ``labels``; it reads ``rewards`` (and, in newer
versions, ``scores`` and ``extra_logs``).
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import EngineDep, ManagerDep, SettingsDep, served_model
from service.schemas import GetRewardRequest, GetRewardResponse
from service.scoring import check_item_count, encode_and_score

router = APIRouter()


@router.post("/get_reward", response_model=GetRewardResponse)
async def get_reward(
    body: GetRewardRequest,
    engine: EngineDep,
    manager: ManagerDep,
    settings: SettingsDep,
    response: Response,
) -> GetRewardResponse:
    if not body.query:
        return GetRewardResponse(rewards=[], scores=[], extra_logs={})
    check_item_count(len(body.query), settings.max_items)
    model = served_model(manager, None)
    rewards, _ = await encode_and_score(
        engine, model, body.query, lambda queries: [model.rm.encode_text(q) for q in queries],
        settings.item_char_limit,
    )
    # The body keeps OpenRLHF's exact shape (its trainer tensorizes extra_logs), so the
    # version that answered is named in a header instead.
    response.headers["X-Generalrm-Model"] = model.label
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs={})
