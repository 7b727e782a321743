"""POST /score — scalar rewards for RLHF trainers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from service.deps import EngineDep, ManagerDep, SettingsDep, served_model
from service.scoring import check_item_count, encode_and_score, normalize


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Annotated[str, StringConstraints(min_length=1)]
    content: str


class PromptResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    response: str


class Conversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)


class ScoreRequest(BaseModel):
    items: list[PromptResponse | Conversation] = Field(
        min_length=1, description="{prompt, response} or {messages} objects"
    )
    model: str | None = Field(None, description="name[@version|:alias]; default: the served RM")
    normalize: bool = False
    truncate: bool = True


class Usage(BaseModel):
    tokens: int


class ScoreResponse(BaseModel):
    model: str
    rewards: list[float]
    usage: Usage


router = APIRouter()


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
    )
    if body.normalize:
        rewards = normalize(rewards, model)
    return ScoreResponse(model=model.label, rewards=rewards, usage=Usage(tokens=tokens))
