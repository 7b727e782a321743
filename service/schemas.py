"""The request and response models of the HTTP API, shared by the routes (which import this
module and ``service.deps``, never each other)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, model_validator

NonEmpty = Annotated[str, StringConstraints(min_length=1)]
MAX_ADAPT_PROMPTS = 10_000
# JSON can carry "\ud800" (half of a UTF-16 pair): Python keeps it in a str, and every encoder
# (tokenizers, the filesystem) then fails on it. It is not text: refuse it at the door.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value: Any, where: str = "body") -> str | None:
    """Where in a parsed JSON body a string holds a lone surrogate, or None."""
    if isinstance(value, str):
        return where if _LONE_SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate_at(key, where) or lone_surrogate_at(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate_at(item, f"{where}[{index}]")
            if found:
                return found
    return None


class RequestBody(BaseModel):
    """Base of the top-level request models: a body is valid Unicode text throughout."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            raise ValueError(f"{where.removeprefix('body.')} holds a lone UTF-16 surrogate (such as "
                             "\\ud800), which is not text; send valid Unicode")
        return data


# ---------------------------------------------------------------------- scoring
class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: NonEmpty
    content: str


class PromptResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    response: str


class Conversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)


class ScoreRequest(RequestBody):
    items: list[PromptResponse | Conversation] = Field(
        min_length=1, description="{prompt, response} or {messages} objects"
    )
    model: str | None = Field(None, description="name[@version|:alias]; default: the served RM")
    normalize: StrictBool = False
    truncate: StrictBool = True


class Usage(BaseModel):
    tokens: int


class ScoreResponse(BaseModel):
    model: str
    rewards: list[float]
    usage: Usage


class PromptPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    a: str
    b: str


class ConversationPair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages_a: list[Message] = Field(min_length=1)
    messages_b: list[Message] = Field(min_length=1)


class PreferenceRequest(RequestBody):
    items: list[PromptPair | ConversationPair] = Field(min_length=1)
    model: str | None = None
    truncate: StrictBool = True


class PreferenceResult(BaseModel):
    reward_a: float
    reward_b: float
    p_a_over_b: float


class PreferenceResponse(BaseModel):
    model: str
    results: list[PreferenceResult]
    usage: Usage


class GetRewardRequest(RequestBody):
    """OpenRLHF's remote reward-model request."""

    query: list[str] = Field(description="Full texts (prompt + response) to score")
    prompts: list[str] | None = None
    labels: list[Any] | None = None


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any]


# ---------------------------------------------------------------------- jobs
class JobRequest(RequestBody):
    kind: str = Field(description="train_rm | strength | meta_train | metarm | adapt")
    spec: dict[str, Any] = Field(default_factory=dict)


class AdaptRequest(RequestBody):
    model_config = ConfigDict(extra="forbid")

    domain: NonEmpty = Field(description="Name of the new domain (recorded in the lineage)")
    prompts: list[NonEmpty] | None = Field(
        None, min_length=1, max_length=MAX_ADAPT_PROMPTS, description="The domain's prompts, inline"
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


class JobAccepted(BaseModel):
    job_id: str
    status_url: str
    status: str
    warnings: list[str] = Field(default_factory=list, description="renamed keys the spec still "
                                "uses (accepted; move to the new names)")


# ---------------------------------------------------------------------- models
class AliasRequest(RequestBody):
    version: str | int
