"""Job kind ``evaluate``: accuracy of a reward model on a preference file, stored with the
model version when the model comes from the registry.

Spec (``worker.specs.EvaluateSpec``)::

    {"eval_file": "rewardbench.jsonl",   # relative to the data directory (required); rows
                                         # {prompt, chosen, rejected, subset?, id?} or TRL's
     "model": "rm:production",           # registry reference, short name, local dir, hub id
     "params": {"batch_size": 64}}       # any EvalConfig field but the three set here

Outcome: the metrics of ``training.evaluate.accuracy_report`` (accuracy overall and per
subset; RewardBench's sections and score when the subsets are its own); artifacts
``metrics_file`` and ``scores_file`` (both rewards of every pair) in the job's directory.
A registry model gets the metrics appended to its version's ``evaluations`` (one entry per
job, however often the job runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.eval_config import EvalConfig
from training.registry import resolve_verified
from worker.jobs.checks import (
    check_model_reference,
    check_params,
    preference_file,
    trainer_config,
    validation_output_dir,
)
from worker.jobs.publish import data_fingerprint
from worker.specs import EvaluateSpec, JobContext, JobOutcome, ValidationContext

KIND = EvaluateSpec.kind
SET_BY_SPEC = ("eval_file", "model", "output_dir")


def _config(spec: EvaluateSpec, data_dir: Path, output_dir: Path, model: str) -> EvalConfig:
    params = check_params(spec.params, SET_BY_SPEC)
    eval_file = preference_file(spec.eval_file, "eval_file", data_dir)  # every row parses
    return trainer_config(EvalConfig, {**params, "model": model, "eval_file": str(eval_file),
                                       "output_dir": str(output_dir)})


def validate(raw: Any, ctx: ValidationContext) -> dict[str, Any]:
    """The spec's shape, params, model reference, and every row of the file (a bad row is a
    422 naming its line, not a failed job later)."""
    spec = EvaluateSpec.parse(raw)
    _config(spec, ctx.settings.resolved_data_dir, validation_output_dir(ctx.settings), spec.model)
    check_model_reference("model", spec.model, ctx.settings)
    return spec.model_dump()


def run(ctx: JobContext) -> JobOutcome:
    # deferred: the evaluator imports torch, which only the job's own process may load
    from training.evaluate import Evaluator

    spec = EvaluateSpec.parse(ctx.spec)
    model = resolve_verified(spec.model, ctx.settings.artifacts_dir)
    config = _config(spec, ctx.settings.resolved_data_dir, ctx.run_dir, model.path)
    if "device" not in spec.params:
        config.device = ctx.settings.device
    result = Evaluator(config, callback=ctx.callback).train()
    artifacts = {"model": model.label, "run_dir": str(ctx.run_dir),
                 "metrics_file": str(result.output_dir / "metrics.json"),
                 "scores_file": str(result.output_dir / "scores.jsonl")}
    if model.from_registry:
        ctx.ensure_owner()
        ctx.registry.add_evaluation(model.name, model.version, {
            "job_id": ctx.job_id, "eval_file": spec.eval_file,
            "data_fingerprint": data_fingerprint([Path(config.eval_file)]), **result.metrics,
        })
        artifacts["evaluation_stored_with"] = model.label
    return JobOutcome(metrics=result.metrics, artifacts=artifacts)
