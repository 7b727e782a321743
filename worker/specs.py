"""The job-spec vocabulary: what a client may send for each job kind, and what a kind gets
when it runs.

A spec's *shape* (its keys, their types, their defaults) is a pydantic model here, one per
kind; what needs the filesystem or the registry (a data file exists and parses, a model
reference resolves) is checked by ``worker.jobs.checks``; a kind's module glues the two in
its ``validate``. Torch-free: the API validates specs at submission.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from training.callbacks import TrainerCallback, TrainingCancelled
from training.registry import Registry
from worker.settings import WorkerSettings


class SpecError(ValueError):
    """A job spec that cannot run; the message says what to fix (the API answers 422)."""


# ---------------------------------------------------------------------- field types
def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a path or reference cannot contain a NUL character")
    return value


DataPath = Annotated[str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_no_nul)]
"""A dataset path relative to the data directory (``GENERALRM_DATA_DIR``)."""
ModelRef = Annotated[str, StringConstraints(min_length=1, max_length=4096), AfterValidator(_no_nul)]
"""A model reference: short name, registry ``name[@version|:alias]``, local directory, hub id."""
RegistryName = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class JobSpec(BaseModel):
    """Base of every kind's spec: strict types, unknown keys refused by name, finite floats."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    kind: ClassVar[str] = ""
    params: dict[str, Any] = Field(default_factory=dict, description="the trainer's config keys")

    @classmethod
    def parse(cls, spec: Any) -> Self:
        """The spec with its defaults, or :class:`SpecError` naming every problem."""
        if not isinstance(spec, Mapping):
            raise SpecError(f"the spec of a {cls.kind} job must be a JSON object, "
                            f"got {type(spec).__name__}")
        try:
            return cls.model_validate(dict(spec))
        except ValidationError as exc:
            raise SpecError(_describe(cls, exc)) from None


def _describe(cls: type[JobSpec], exc: ValidationError) -> str:
    unknown = sorted(str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"
                     and len(e["loc"]) == 1)
    parts = []
    if unknown:
        parts.append(f"unknown spec key(s) {unknown} for a {cls.kind} job; allowed keys: "
                     f"{sorted(cls.model_fields)}")
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            continue
        if error["type"] == "missing":
            parts.append(f"{where}: required")
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            parts.append(f"{where}: {message} (got {error.get('input')!r})")
    return "; ".join(parts)


MAX_JOB_PROCESSES = 1024  # the spec's own bound; a deployment's is GENERALRM_JOB_MAX_PROCESSES


class Resources(BaseModel):
    """What a job runs on: ``processes`` on the worker that claims it (one per GPU, or CPU
    processes over gloo), synchronised by ``strategy`` (``ddp``: a replica per process; ``fsdp``:
    the model sharded over the processes, GPUs only)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    processes: int = Field(1, ge=1, le=MAX_JOB_PROCESSES,
                           description="processes of the job (1: in the job's own process)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp or fsdp (GPUs only)")


def job_processes(spec: Mapping[str, Any]) -> int:
    """How many processes a validated spec runs on (1 for kinds without ``resources``)."""
    resources = spec.get("resources") or {}
    return int(resources.get("processes", 1))


class TrainRMSpec(JobSpec):
    """``train_rm``: Bradley–Terry RM training, published as a new registry version."""

    kind: ClassVar[str] = "train_rm"
    train_file: DataPath = Field(description="preference pairs JSONL")
    eval_file: DataPath | None = Field(None, description="held-out pairs JSONL")
    model: ModelRef = Field("minilm", description="backbone or RM to start from")
    name: RegistryName = Field("rm", description="registry model to publish to")
    resources: Resources = Field(default_factory=Resources, description="processes and strategy")


class StrengthSpec(JobSpec):
    """``strength``: preference strength of every training pair from an RM ensemble."""

    kind: ClassVar[str] = "strength"
    train_file: DataPath = Field(description="preference pairs JSONL")
    output_file: DataPath | None = Field(None, description="where to write the strength JSONL "
                                         "(a new file in the data directory)")
    model: ModelRef = Field("minilm", description="ensemble backbone")
    resources: Resources = Field(default_factory=Resources, description="processes and strategy "
                                 "(ddp: each member trains over all of them)")


class MetaTrainSpec(JobSpec):
    """``meta_train``: OOD-PL bilevel meta-training of an RM, published as a new version."""

    kind: ClassVar[str] = "meta_train"
    reward_model: ModelRef = Field("minilm", description="φ to start from")
    policy: ModelRef = Field("smollm2-135m", description="π_θ of the inner loop")
    samples_file: DataPath | None = Field(None, description="D_xy rows with a domain")
    pairs_file: DataPath | None = Field(None, description="D_PL pairs with a domain")
    task: str | None = Field(None, description="or the bundled benchmark task (csg, ka)")
    name: RegistryName = Field("rm", description="registry model to publish to")
    resources: Resources = Field(default_factory=Resources, description="processes (ddp: the "
                                 "RM and the policy replicated, each inner batch's prompts "
                                 "shared among them)")


class MetaRMSpec(JobSpec):
    """``metarm``: the MetaRM update of an RM on shifted samples, published as a new version."""

    kind: ClassVar[str] = "metarm"
    model: ModelRef = Field("minilm", description="RM to start from")
    pairs_file: DataPath = Field(description="source preference pairs JSONL (X_t)")
    samples_file: DataPath | None = Field(None, description="shifted samples JSONL (X_s); "
                                          "optional only with params.meta_lr = 0")
    name: RegistryName = Field("rm", description="registry model to publish to")


class AdaptSpec(JobSpec):
    """``adapt``: OOD-PL meta-test adaptation of a policy to a new domain (+ MetaRM rounds)."""

    kind: ClassVar[str] = "adapt"
    domain: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="the new domain")
    prompts: list[str] | None = Field(None, description="the domain's prompts, inline")
    dataset: DataPath | None = Field(None, description="or a JSONL of {prompt[, responses]} rows")
    pairs: DataPath | None = Field(None, description="the domain's pairs (PL accuracy)")
    policy: ModelRef = Field("smollm2-135m", description="reference policy")
    reward_model: ModelRef = Field("minilm", description="the frozen RM")
    name: RegistryName | None = Field(None, description="registry name of the adapted policy "
                                      "(default policy-<domain>)")
    rm_name: RegistryName | None = Field(None, description="registry name of the domain-adapted "
                                         "RM, with params.metarm (default rm-<domain>)")


class EvaluateSpec(JobSpec):
    """``evaluate``: accuracy of an RM on a preference file (TRL or RewardBench format), per
    subset and overall, with RewardBench's section weighting when the subsets are its own;
    stored with the model version when the model is a registry version."""

    kind: ClassVar[str] = "evaluate"
    eval_file: DataPath = Field(description="preference pairs JSONL {prompt, chosen, rejected, "
                                "subset?, id?}")
    model: ModelRef = Field(description="the RM: registry reference, short name, local "
                            "directory or hub id")


class SleepStepsSpec(JobSpec):
    """``sleep_steps`` (diagnostic): counts steps, optionally crashing its worker."""

    kind: ClassVar[str] = "sleep_steps"
    steps: int = Field(10, ge=1, le=100_000)
    step_seconds: float = Field(0.1, ge=0, le=60)
    crash_at_step: int | None = Field(None, ge=1)


PUBLIC_SPECS: tuple[type[JobSpec], ...] = (
    TrainRMSpec, StrengthSpec, MetaTrainSpec, MetaRMSpec, AdaptSpec, EvaluateSpec)
"""The spec of every job kind a client may submit (the diagnostic one is not among them)."""


# ---------------------------------------------------------------------- contexts
@dataclass(frozen=True)
class ValidationContext:
    """What a spec validator may look at: settings (data dir, artifacts) and the registry."""

    settings: WorkerSettings

    @property
    def registry(self) -> Registry:
        return Registry.from_artifacts(self.settings.artifacts_dir)


@dataclass
class JobOutcome:
    """What a finished job reports: metrics and artifact references for its record."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobContext:
    """What a kind's runner gets on the worker."""

    job_id: str
    spec: dict[str, Any]
    run_dir: Path  # artifacts/jobs/{id}/: outputs and checkpoints; survives restarts
    settings: WorkerSettings
    callback: TrainerCallback  # progress + cooperative cancel (and loss of the lease)
    attempt: int
    registry: Registry
    check_owner: Any = None  # () -> None; raises LeaseLost when another worker took the job
    stop_requested: Any = None  # () -> bool, read from the store now (not a cached value)
    record_ranks: Any = None  # ([{"rank", "host", "pid", ...}]) -> None: into this attempt

    def ensure_owner(self) -> None:
        """Call before anything visible outside the run dir (publishing a version)."""
        if self.check_owner is not None:
            self.check_owner()

    def before_publish(self) -> None:
        """The last moment a job may still stop: it still owns the job, and no cancel (or
        shutdown) has been asked since its last step. After this it publishes, and a cancel
        is answered as too late (``cancel_outcome`` in the record)."""
        self.ensure_owner()
        asked = self.stop_requested() if self.stop_requested else self.callback.should_stop()
        if asked:
            raise TrainingCancelled(latest_checkpoint_step(self.run_dir),
                                    str(self.run_dir / "checkpoints"))


def latest_checkpoint_step(run_dir: Path) -> int:
    """Step of the newest complete checkpoint under ``run_dir/checkpoints`` (0 if none).

    Reads the manifests of ``training.checkpoint``'s layout without importing torch (the
    worker's parent process and the API stay torch-free).
    """
    root = run_dir / "checkpoints"
    steps = []
    if root.is_dir():
        for path in root.iterdir():
            manifest = path / "MANIFEST.json"
            if path.is_dir() and not path.name.endswith(".tmp") and manifest.is_file():
                try:
                    steps.append(int(json.loads(manifest.read_text())["step"]))
                except (ValueError, KeyError, OSError):
                    continue
    return max(steps, default=0)
