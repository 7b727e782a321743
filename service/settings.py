"""The API's settings (env prefix ``GENERALRM_``): the worker's, plus what serving needs.

Validated at start-up; ``python -m service`` and ``python -m worker`` read the same
variables, so one environment configures the whole stack.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from worker.settings import WorkerSettings

DEFAULT_MODEL = "minilm"


class ServiceSettings(WorkerSettings):
    """Serving and HTTP settings on top of the worker's."""

    model: str = Field(
        DEFAULT_MODEL,
        description="Served RM: a short name (minilm), a hub id, a local directory, or "
        "name[@version|:alias] from the registry.",
    )
    api_key: str | None = Field(None, description="When set, every route but /health needs it.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_tokens: int = Field(16384, ge=16, description="Padded tokens per forward pass.")
    max_batch_size: int = Field(64, ge=1, description="Items per forward pass.")
    max_queue: int = Field(256, ge=1, description="Requests waiting before 429.")
    max_input_tokens: int = Field(512, ge=8, description="Tokens per scored item.")
    max_input_chars: int | None = Field(
        None, ge=64, description="Characters an item may carry before it is tokenized; longer "
        "items are refused (422) without being tokenized. Default: 64 x MAX_INPUT_TOKENS.")
    max_items: int = Field(256, ge=1, description="Items per request.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Request body limit.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 where the hardware has bf16 units (GPUs: bf16 weights; "
        "CPUs with AMX/avx512_bf16: fp32 weights under bf16 autocast), fp32 elsewhere")
    allow_untrained_head: bool = Field(
        False, description="Serve a model whose reward head would be newly initialised (a causal "
        "LM, a bare encoder). Off: such a model is refused with a clear error. The packaged demo "
        "short names (minilm) are always allowed.")
    reward_label: str | None = Field(
        None, description="For a classifier with several labels: the index or name of the label "
        "whose logit is the reward.")
    trust_remote_code: bool = Field(
        False, description="Load models that ship their own modeling code.")
    public_docs: bool = Field(
        False, description="Serve /docs, /redoc and /openapi.json without the API key.")
    model_poll_seconds: float = Field(
        2.0, gt=0, description="How often the API checks the registry for a moved alias."
    )
    get_reward_rerender: bool = Field(
        False, description="/get_reward: split each query at the end of its prompt (when the "
        "request carries prompts) and score {prompt, response} with the RM's own template.")
    stack_redis_port: int = Field(
        6390, ge=1, le=65535, description="Port of the redis-server that `generalrm up` / `make "
        "run` start (not 6379, so that a system Redis is left alone).")

    @property
    def item_char_limit(self) -> int:
        return self.max_input_chars or 64 * self.max_input_tokens

    @model_validator(mode="after")
    def _check_budget(self) -> Self:
        if self.max_batch_tokens < self.max_input_tokens:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_input_tokens "
                f"({self.max_input_tokens}) or a maximal item could never be scored"
            )
        return self
