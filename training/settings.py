"""The one settings class of generalrm (env prefix ``GENERALRM_``).

It lives in ``training/`` because the service, the worker and the training CLI all read it,
and by the dependency rule nothing may import ``service/`` (DESIGN §2). It depends on
pydantic-settings only, so ``training/`` stays free of FastAPI, Celery and Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "minilm"


class Settings(BaseSettings):
    """Service and worker configuration, validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="GENERALRM_", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="Served RM: a short name (minilm), a hub id, a local directory, or "
        "name[@version|:alias] from the registry.",
    )
    api_key: str | None = Field(None, description="When set, every route but /health needs it.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    redis_url: str = "redis://127.0.0.1:6379/0"
    artifacts_dir: Path = Path("artifacts")
    data_dir: Path | None = Field(
        None, description="Root that job dataset paths must stay inside (default: artifacts/data)."
    )
    max_batch_tokens: int = Field(16384, ge=16, description="Padded tokens per forward pass.")
    max_batch_size: int = Field(64, ge=1, description="Items per forward pass.")
    max_queue: int = Field(256, ge=1, description="Requests waiting before 429.")
    max_input_tokens: int = Field(512, ge=8, description="Tokens per scored item.")
    max_items: int = Field(256, ge=1, description="Items per request.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Request body limit.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    model_poll_seconds: float = Field(
        2.0, gt=0, description="How often the API checks the registry for a moved alias."
    )
    job_max_attempts: int = Field(3, ge=1)
    job_heartbeat_seconds: float = Field(10.0, gt=0)
    job_stale_seconds: float = Field(120.0, gt=0)
    enable_diagnostic_jobs: bool = Field(
        False, description="Accept the job kind sleep_steps (tests of the job machinery)."
    )
    visibility_timeout_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="Broker visibility timeout; above the longest job."
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "mps") or value == "cuda" or value.startswith("cuda:"):
            return value
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, not {value!r}")

    @model_validator(mode="after")
    def _check_budget(self) -> Settings:
        if self.max_batch_tokens < self.max_input_tokens:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_input_tokens "
                f"({self.max_input_tokens}) or a maximal item could never be scored"
            )
        return self

    @property
    def resolved_data_dir(self) -> Path:
        return (self.data_dir or self.artifacts_dir / "data").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
