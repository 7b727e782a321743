"""The request and response models of the HTTP API, shared by the routes (which import this
module and ``service.deps``, never each other)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    TypeAdapter,
    create_model,
    field_validator,
    model_validator,
)

from worker.specs import PUBLIC_SPECS, JobSpec

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


# ---------------------------------------------------------------------- errors
class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. invalid_input, overloaded")
    message: str = Field(description="what went wrong and what to do about it")


class ErrorBody(BaseModel):
    """The body of every error response (``service.errors`` builds it)."""

    error: ErrorDetail


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
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [
            {"prompt": "What is 2+2?", "response": "4"},
            {"messages": [{"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": "Hello, how can I help?"}]},
        ],
    }]})
    items: list[PromptResponse | Conversation] = Field(
        min_length=1, description="{prompt, response} or {messages} objects"
    )
    model: str | None = Field(None, description="name[@version|:alias]; default: the served RM")
    normalize: StrictBool = Field(False, description="(r - mean) / std with the reward statistics "
                            "stored with the model version at training time")
    truncate: StrictBool = Field(True, description="drop the prompt's beginning of an over-long item; "
                           "false refuses it with 422")


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
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [{"prompt": "Say something kind.", "a": "You did great today.", "b": "Whatever."}],
    }]})
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

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "query": ["Question: 2+2? Answer: 4"], "prompts": ["Question: 2+2?"], "labels": [None],
    }]})
    query: list[str] = Field(description="Full texts (prompt + response) to score")
    prompts: list[str] | None = Field(None, description="the prompt each query starts with; "
                                      "used when GENERALRM_GET_REWARD_RERENDER=true")
    labels: list[Any] | None = Field(None, description="accepted and ignored")


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any]


# ---------------------------------------------------------------------- vLLM-style pooling
class PoolingUsage(BaseModel):
    """vLLM's ``UsageInfo`` (all five keys, as vLLM emits them)."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class PoolingRequestBase(RequestBody):
    """What ``/classify`` and ``/pooling`` share with vLLM's pooling requests. Fields vLLM has
    and this service does not use (``user``, ``priority``, ``request_id``, ``padding``,
    ``truncation_side``, ``add_special_tokens``, ``cache_salt``, ...) are accepted and ignored,
    as vLLM itself ignores unknown fields."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="optional; must name the served model")
    input: str | list[str] | None = Field(
        None, description="formatted text(s) to score as they are (e.g. already rendered with "
        "the RM's chat template)")
    messages: list[Message] | None = Field(
        None, min_length=1, description="or one conversation, rendered with the RM's own chat "
        "template")
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="k > 0 keeps the last k tokens, -1 the last max_input_tokens; "
        "unset refuses an over-long input with 422 (as vLLM does)")
    use_activation: StrictBool | None = Field(
        None, description="true (default): probs = [sigmoid(reward)]; false: probs = [reward]")
    activation: StrictBool | None = Field(None, description="old name of use_activation (veRL sends it)")
    softmax: StrictBool | None = Field(None, description="older name of use_activation")

    @field_validator("input", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(
                isinstance(v, int) or (isinstance(v, list) and all(isinstance(t, int) for t in v))
                for v in value):
            raise ValueError("token-id input is not supported here; send the text")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _no_zero(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (the model's limit) or a positive number of tokens")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> PoolingRequestBase:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give either 'input' (text or list of texts) or 'messages'")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("'input' is an empty list")
        return self

    @property
    def activated(self) -> bool:
        """Whether probs hold sigmoid(reward); the newest spelling given wins."""
        for flag in (self.use_activation, self.activation, self.softmax):
            if flag is not None:
                return flag
        return True


class ClassifyRequest(PoolingRequestBase):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"input": "<|user|>What is 2+2?<|assistant|>4", "use_activation": False},
        {"messages": [{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "4"}]},
    ]})


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: PoolingUsage


class PoolingRequest(PoolingRequestBase):
    model_config = ConfigDict(json_schema_extra={"examples": [{"input": ["text one", "text two"]}]})
    task: str | None = Field(None, description="null or classify (the only task a scalar RM has)")
    encoding_format: Literal["float"] = Field("float", description="float only")
    dimensions: None = Field(None, description="not supported (an RM has no embedding)")


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float]


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: PoolingUsage


class EmbeddingsRequest(RequestBody):
    """SGLang's ``/v1/embeddings`` for a reward model (veRL's sglang reward path)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"model": "rm", "input": "<|user|>What is 2+2?<|assistant|>4"}]})
    model: str | None = None
    input: str | list[str] = Field(description="formatted text(s) to score as they are")
    encoding_format: Literal["float"] = "float"

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("'input' is an empty list")
        return value


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] = Field(description="[reward]: the raw scalar head output")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingsUsage


class Limits(BaseModel):
    """What one request may hold: clients split larger batches themselves."""

    max_items: int = Field(description="items per request (a /preference pair counts 2)")
    max_input_tokens: int = Field(description="tokens per item for the served model")
    max_body_bytes: int
    max_queue: int = Field(description="requests waiting before 429")


# ---------------------------------------------------------------------- jobs
def _job_model(spec_cls: type[JobSpec]) -> type[BaseModel]:
    name = spec_cls.__name__.removesuffix("Spec") + "Job"
    return create_model(name, __doc__=spec_cls.__doc__, kind=(Literal[spec_cls.kind], ...),
                        spec=(spec_cls, ...))


JOB_SUBMISSIONS = tuple(_job_model(spec_cls) for spec_cls in PUBLIC_SPECS)
JobSubmission = Annotated[Union[JOB_SUBMISSIONS], Field(discriminator="kind")]  # noqa: UP007


class JobRequest(RequestBody):
    """``{"kind", "spec"}``. Documented as the union of the typed specs per kind
    (:data:`JobSubmission`); parsed loosely here because the kind's own validator
    (``worker.kinds``) checks the spec and names every problem in its 422."""

    kind: str = Field(description="train_rm | strength | meta_train | metarm | adapt | evaluate")
    spec: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(TypeAdapter(JobSubmission).core_schema)
        schema["examples"] = [
            {"kind": "train_rm", "spec": {"train_file": "examples/prefs.train.jsonl",
                                          "eval_file": "examples/prefs.test.jsonl",
                                          "model": "minilm", "name": "rm",
                                          "params": {"epochs": 2, "max_length": 128}}},
            {"kind": "evaluate", "spec": {"eval_file": "examples/rewardbench-sample.jsonl",
                                          "model": "rm:production"}},
        ]
        return schema


class AdaptRequest(RequestBody):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "domain": "cooking", "prompts": ["How do I keep basil fresh?"],
        "params": {"steps": 50, "responses_per_prompt": 4},
    }]})

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
    model_config = ConfigDict(json_schema_extra={"examples": [{"version": "v2"}]})
    version: str | int
