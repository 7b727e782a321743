"""Job kind ``train_rm``: Bradley–Terry RM training, published as a new registry version.

Spec (``worker.specs.TrainRMSpec``)::

    {"train_file": "prefs.train.jsonl",      # relative to the data directory (required)
     "eval_file": "prefs.test.jsonl",        # held-out pairs: eval_accuracy (optional)
     "model": "minilm",                      # backbone or RM to start from: short name, local
                                             # dir, hub id, or a registry reference (rm:production)
     "name": "rm",                           # registry model to publish to
     "resources": {"processes": 2,           # optional: ranks on the worker that claims it
                   "strategy": "ddp"},       # (one per GPU; ddp or fsdp, fsdp on GPUs only)
     "params": {"max_steps": 200, ...}}      # any RMTrainConfig field but the four above

With ``resources.processes`` > 1 the trainer runs over that many processes with the same
global batch (``params.batch_size`` pairs per micro-batch, shared among them); rank 0 writes
the checkpoints and the model, published once as with one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.bt.config import SIMCSE_NEEDS_ONE_PROCESS, RMTrainConfig
from training.registry import resolve_verified
from worker.jobs.checks import (
    check_model_reference,
    check_params,
    check_registry_name,
    check_resources,
    preference_file,
    resolve_data_path,
    trainer_config,
    validation_output_dir,
)
from worker.jobs.processes import run_trainer
from worker.jobs.publish import reward_model_metadata, scalar_metrics, train_and_publish_once
from worker.specs import JobContext, JobOutcome, TrainRMSpec, ValidationContext

KIND = TrainRMSpec.kind
ALGORITHM = "bradley_terry"
SET_BY_SPEC = ("train_file", "eval_file", "model", "output_dir")  # not allowed inside params
DATA_PARAMS = ("strength_file",)  # params that name files: they must stay in the data dir too


def _config(spec: TrainRMSpec, data_dir: Path, output_dir: Path, model: str) -> RMTrainConfig:
    """The trainer's config: params plus the spec's files (absolute, inside the data dir)."""
    params = dict(check_params(spec.params, SET_BY_SPEC))
    for key in DATA_PARAMS:
        if params.get(key) is not None:
            params[key] = str(resolve_data_path(params[key], f"params.{key}", data_dir))
    train = preference_file(spec.train_file, "train_file", data_dir)
    held_out = preference_file(spec.eval_file, "eval_file", data_dir) if spec.eval_file else None
    return trainer_config(RMTrainConfig, {
        **params, "model": model, "train_file": str(train),
        "eval_file": str(held_out) if held_out else None, "output_dir": str(output_dir),
    })


def validate(raw: Any, ctx: ValidationContext) -> dict[str, Any]:
    """Check everything a ``train_rm`` job needs before it is queued; returns the spec with
    defaults filled in."""
    spec = TrainRMSpec.parse(raw)
    config = _config(spec, ctx.settings.resolved_data_dir, validation_output_dir(ctx.settings),
                     spec.model)
    check_resources(spec.resources, ctx.settings,
                    device=spec.params.get("device", ctx.settings.device),
                    batches={"batch_size": config.batch_size}, finetune=config.finetune,
                    single_process_reason=SIMCSE_NEEDS_ONE_PROCESS if config.simcse_weight else None)
    check_model_reference("model", spec.model, ctx.settings)
    check_registry_name("name", spec.name, ctx.settings)
    return spec.model_dump()


def _train(ctx: JobContext) -> tuple[Path, dict[str, Any]]:
    spec = TrainRMSpec.parse(ctx.spec)
    base = resolve_verified(spec.model, ctx.settings.artifacts_dir)
    config = _config(spec, ctx.settings.resolved_data_dir, ctx.run_dir, base.path)
    if "device" not in spec.params:
        config.device = ctx.settings.device
    result = run_trainer("train-rm", config, spec.resources, ctx)
    files = [Path(config.train_file), Path(config.eval_file) if config.eval_file else None]
    metadata = reward_model_metadata(
        algorithm=ALGORITHM, base_model=spec.model, base=base, data_files=files,
        metrics=scalar_metrics(result.metrics), params=spec.params, job_id=ctx.job_id,
        train_file=spec.train_file, eval_file=spec.eval_file, steps=result.steps,
        resources=spec.resources.model_dump(),
    )
    return result.model_dir, metadata


def run(ctx: JobContext) -> JobOutcome:
    return train_and_publish_once(ctx, ctx.spec["name"], lambda: _train(ctx))
