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

from training.registry import ModelNotFoundError, RegistryError, check_name, resolve_model
from worker.specs import (
    JobContext,
    JobOutcome,
    SpecError,
    ValidationContext,
    check_preference_jsonl,
    data_fingerprint,
    reject_unknown_keys,
    require_mapping,
    resolve_data_path,
)

KIND = "train_rm"
ALGORITHM = "bradley_terry"
SPEC_KEYS = ("train_file", "eval_file", "model", "name", "params")
SET_BY_SPEC = ("train_file", "eval_file", "model", "output_dir")  # not allowed inside params
DEFAULTS = {"model": "minilm", "name": "rm", "params": {}, "eval_file": None}
DATA_PARAMS = ("strength_file",)  # params that name files: they must stay in the data dir too


def _check_model_reference(reference: Any, settings) -> None:
    if not isinstance(reference, str) or not reference:
        raise SpecError("model: give a short name (minilm), a local directory, a hub id or a "
                        "registry reference (name@v3, name:production)")
    try:
        resolved = resolve_model(reference, settings.artifacts_dir)
    except ModelNotFoundError as exc:
        raise SpecError(f"model: {exc}") from exc
    looks_local = reference.startswith(("/", ".", "~"))
    if looks_local and not Path(resolved.path).expanduser().is_dir():
        raise SpecError(f"model: {reference!r} is not a directory on the worker's filesystem")


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
    spec = {**DEFAULTS, **require_mapping(spec, KIND)}
    reject_unknown_keys(spec, SPEC_KEYS, KIND)
    data_dir = ctx.settings.resolved_data_dir
    if "train_file" not in spec:
        raise SpecError(f"train_file: required, a JSONL of preference pairs under {data_dir}")
    train = resolve_data_path(spec["train_file"], "train_file", data_dir)
    check_preference_jsonl(train, "train_file")
    held_out = None
    if spec["eval_file"] is not None:
        held_out = resolve_data_path(spec["eval_file"], "eval_file", data_dir)
        check_preference_jsonl(held_out, "eval_file")
    _check_model_reference(spec["model"], ctx.settings)
    try:
        check_name(spec["name"], "name")
    except (RegistryError, TypeError) as exc:
        raise SpecError(f"name: {exc}") from exc
    if not isinstance(spec["params"], dict):
        raise SpecError("params: must be an object of RMTrainConfig fields")
    inside = sorted(set(spec["params"]) & set(SET_BY_SPEC))
    if inside:
        raise SpecError(f"params: {inside} are set by the spec itself (train_file, eval_file, "
                        "model at the top level; output_dir is the job's directory)")
    from training.rm_trainer import RMTrainConfig  # the trainer's own validation, by field name

    try:
        RMTrainConfig.from_dict(_config_values(
            spec, data_dir, ctx.settings.artifacts_dir / "jobs" / "_validation",
            {"model": spec["model"], "train_file": train, "eval_file": held_out},
        ))
    except ValueError as exc:
        raise SpecError(f"params: {exc}") from exc
    return spec


def _outcome(version, run_dir: Path) -> JobOutcome:
    return JobOutcome(
        metrics=dict(version.metadata.get("metrics", {})),
        artifacts={"model": version.reference, "model_path": str(version.path),
                   "run_dir": str(run_dir)},
    )


def run(ctx: JobContext) -> JobOutcome:
    spec = ctx.spec
    name = spec["name"]
    # exactly-once: a job that died between publishing and recording success must not train
    # and publish again when it is re-run
    already = ctx.registry.version_for_job(name, ctx.job_id)
    if already is not None:
        return _outcome(already, ctx.run_dir)

    from training.rm_trainer import RMTrainConfig, RMTrainer

    data_dir = ctx.settings.resolved_data_dir
    train = resolve_data_path(spec["train_file"], "train_file", data_dir)
    held_out = (resolve_data_path(spec["eval_file"], "eval_file", data_dir)
                if spec.get("eval_file") else None)
    base = resolve_model(spec["model"], ctx.settings.artifacts_dir)
    values = _config_values(spec, data_dir, ctx.run_dir,
                            {"model": base.path, "train_file": train, "eval_file": held_out})
    values.setdefault("device", ctx.settings.device)
    config = RMTrainConfig.from_dict(values)
    result = RMTrainer(config, callback=ctx.callback).train()

    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)}
    metadata = {
        "kind": "reward_model",
        "base_model": spec["model"],
        "parent_version": base.label if base.version is not None else None,
        "algorithm": ALGORITHM,
        "data_fingerprint": data_fingerprint([p for p in (train, held_out) if p]),
        "train_file": spec["train_file"],
        "eval_file": spec.get("eval_file"),
        "metrics": metrics,
        "params": spec["params"],
        "job_id": ctx.job_id,
        "steps": result.steps,
    }
    if "reward_mean" in metrics and "reward_std" in metrics:
        metadata["reward_stats"] = {"mean": metrics["reward_mean"], "std": metrics["reward_std"]}
    ctx.ensure_owner()
    version = ctx.registry.publish(name, result.model_dir, metadata)
    return _outcome(version, ctx.run_dir)
