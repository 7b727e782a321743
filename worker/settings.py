"""The worker's settings (env prefix ``GENERALRM_``): Redis, jobs, artifacts, data, device.

The API's settings (``service.settings.ServiceSettings``) extend these: the API submits and
reads jobs through the same Redis, validates specs against the same data directory and
registry, and so must agree with the workers on all of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class WorkerSettings(BaseSettings):
    """Job store, broker, artifacts and data, validated at start-up."""

    model_config = SettingsConfigDict(env_prefix="GENERALRM_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Job store and Celery broker.")
    artifacts_dir: Path = Field(Path("artifacts"), description="Registry, job outputs, caches.")
    data_dir: Path | None = Field(
        None, description="Root that job dataset paths must stay inside (default: artifacts/data)."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    job_max_attempts: int = Field(3, ge=1, description="Worker crashes before a job is failed.")
    job_heartbeat_seconds: float = Field(10.0, gt=0, description="Lease renewal interval.")
    job_stale_seconds: float = Field(
        120.0, gt=0, description="A running job without a heartbeat this long is re-queued."
    )
    enable_diagnostic_jobs: bool = Field(
        False, description="Accept the job kind sleep_steps (tests of the job machinery)."
    )
    visibility_timeout_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="Broker visibility timeout; above the longest job."
    )
    job_resend_seconds: float = Field(
        30.0, gt=0, description="A queued job whose message is in no broker queue this long after "
        "its last change is sent again (a message lost in a Redis crash).")
    job_retention_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="Finished job records expire this long after they end.")
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Directories (besides the artifacts and data "
        "directories) that jobs may load local models from; comma-separated in the environment.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "mps") or value == "cuda" or value.startswith("cuda:"):
            return value
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, not {value!r}")

    @field_validator("model_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        return value

    @property
    def resolved_data_dir(self) -> Path:
        return (self.data_dir or self.artifacts_dir / "data").resolve()

    @property
    def allowed_model_roots(self) -> list[Path]:
        """Where jobs may load local model directories from."""
        return [self.artifacts_dir.resolve(), self.resolved_data_dir,
                *(root.resolve() for root in self.model_roots)]
