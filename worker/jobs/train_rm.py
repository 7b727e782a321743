"""Job kind ``train_rm``: Bradley–Terry RM training, published as a new registry version.

Spec::

    {"train_file": "prefs.train.jsonl",      # relative to the data directory (required)
     "eval_file": "prefs.test.jsonl",        # held-out pairs: eval_accuracy (optional)
     "model": "minilm",                      # backbone or RM to start from: short name, local
                                             # dir, hub id, or a registry reference (rm:production)
     "name": "rm",                           # registry model to publish to
     "params": {"max_steps": 200, ...}}      # any RMTrainConfig field but the four above
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.registry import resolve_model
from worker.jobs.common import (
    check_model_reference,
    check_params,
    check_registry_name,
    config_errors_as_spec_errors,
    required_preference_file,
    reward_model_metadata,
    scalar_metrics,
    train_and_publish_once,
    validation_output_dir,
)
from worker.specs import (
    JobContext,
    JobOutcome,
    ValidationContext,
    check_preference_jsonl,
    resolve_data_path,
    spec_with_defaults,
)

KIND = "train_rm"
ALGORITHM = "bradley_terry"
SPEC_KEYS = ("train_file", "eval_file", "model", "name", "params")
SET_BY_SPEC = ("train_file", "eval_file", "model", "output_dir")  # not allowed inside params
DEFAULTS = {"model": "minilm", "name": "rm", "params": {}, "eval_file": None}
DATA_PARAMS = ("strength_file",)  # params that name files: they must stay in the data dir too


def _config_values(spec: dict[str, Any], data_dir: Path, output_dir: Path, resolved: dict) -> dict:
    params = dict(spec["params"])
    for key in DATA_PARAMS:
        if params.get(key) is not None:
            params[key] = str(resolve_data_path(params[key], f"params.{key}", data_dir))
    return {
        **params,
        "model": resolved["model"],
        "train_file": str(resolved["train_file"]),
        "eval_file": str(resolved["eval_file"]) if resolved["eval_file"] else None,
        "output_dir": str(output_dir),
    }


def validate(spec: Any, ctx: ValidationContext) -> dict[str, Any]:
    """Check everything a ``train_rm`` job needs before it is queued; returns the spec with
    defaults filled in."""
    spec = spec_with_defaults(spec, KIND, DEFAULTS, SPEC_KEYS)
    data_dir = ctx.settings.resolved_data_dir
    train = required_preference_file(spec, "train_file", data_dir)
    held_out = None
    if spec["eval_file"] is not None:
        held_out = resolve_data_path(spec["eval_file"], "eval_file", data_dir)
        check_preference_jsonl(held_out, "eval_file")
    check_model_reference("model", spec["model"], ctx.settings)
    check_registry_name("name", spec["name"], ctx.settings)
    check_params(spec, SET_BY_SPEC, "RMTrainConfig")
    from training.rm_trainer import RMTrainConfig  # the trainer's own validation, by field name

    with config_errors_as_spec_errors():
        RMTrainConfig.from_dict(_config_values(
            spec, data_dir, validation_output_dir(ctx.settings),
            {"model": spec["model"], "train_file": train, "eval_file": held_out},
        ))
    return spec


def _train(ctx: JobContext) -> tuple[Path, dict[str, Any]]:
    from training.rm_trainer import RMTrainConfig, RMTrainer

    spec = ctx.spec
    data_dir = ctx.settings.resolved_data_dir
    train = resolve_data_path(spec["train_file"], "train_file", data_dir)
    held_out = (resolve_data_path(spec["eval_file"], "eval_file", data_dir)
                if spec.get("eval_file") else None)
    base = resolve_model(spec["model"], ctx.settings.artifacts_dir)
    values = _config_values(spec, data_dir, ctx.run_dir,
                            {"model": base.path, "train_file": train, "eval_file": held_out})
    values.setdefault("device", ctx.settings.device)
    result = RMTrainer(RMTrainConfig.from_dict(values), callback=ctx.callback).train()
    metadata = reward_model_metadata(
        algorithm=ALGORITHM, base_model=spec["model"], base=base, data_files=[train, held_out],
        metrics=scalar_metrics(result.metrics), params=spec["params"], job_id=ctx.job_id,
        train_file=spec["train_file"], eval_file=spec.get("eval_file"), steps=result.steps,
    )
    return result.model_dir, metadata


def run(ctx: JobContext) -> JobOutcome:
    return train_and_publish_once(ctx, ctx.spec["name"], lambda: _train(ctx))
