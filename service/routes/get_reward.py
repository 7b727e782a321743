"""POST /get_reward — OpenRLHF's remote reward-model protocol (``--reward.remote_url``, before
v0.10.2 ``--remote_rm_url``).

OpenRLHF sends the decoded prompt+response as ``query`` (special tokens kept, left padding
included in old versions), optionally ``prompts`` and ``labels``; it reads ``rewards`` (and,
in newer versions, ``scores`` and ``extra_logs``). With ``GENERALRM_GET_REWARD_RERENDER=true``
a request carrying ``prompts`` is re-rendered with the RM's own template (``service.openrlhf``).
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import EngineDep, ManagerDep, SettingsDep, served_model
from service.errors import SCORING_ERRORS, error_responses
from service.openrlhf import split_queries
from service.schemas import GetRewardRequest, GetRewardResponse
from service.scoring import check_item_count, encode_and_score

router = APIRouter(responses=error_responses(*SCORING_ERRORS))


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
    if settings.get_reward_rerender and body.prompts is not None:
        tok = model.rm.tokenizer
        items = split_queries(body.query, body.prompts, [tok.eos_token, tok.pad_token])
        rewards, _ = await encode_and_score(engine, model, items, model.rm.encode_many,
                                            settings.item_char_limit)
        rendering = "rerendered"
    else:
        rewards, _ = await encode_and_score(
            engine, model, body.query, lambda queries: [model.rm.encode_text(q) for q in queries],
            settings.item_char_limit,
        )
        rendering = "as-sent"
    # The body keeps OpenRLHF's exact shape (its trainer tensorizes extra_logs), so the
    # version that answered, and how the queries were rendered, are named in headers instead.
    response.headers["X-Generalrm-Model"] = model.label
    response.headers["X-Generalrm-Rendering"] = rendering
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs={})
