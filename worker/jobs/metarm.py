"""Job kind ``metarm``: the MetaRM reward-model update alone (DESIGN §7, arXiv 2405.00438),
published as a new registry RM version with its diagnostics.

Spec::

    {"model": "minilm",                        # RM to start from (short name, local dir, hub
                                               # id, or a registry reference: rm:production)
     "pairs_file": "source.pairs.jsonl",       # source preferences X_t   } relative to the
     "samples_file": "shifted.samples.jsonl",  # shifted samples X_s:     } data directory
                                               # {"prompt", "responses": [>= 2 strings]} rows
                                               # (optional only with params.meta_lr = 0)
     "name": "rm",                             # registry model to publish to
     "params": {"meta_lr": 1e-3, ...}}         # any MetaRMConfig field but model, pairs_path,
                                               # samples_path, output_dir

The version's metadata holds the diagnostics before and after training: on the shifted
samples the mean |Δr| and the variance of Δr among responses to the same prompt, on the
source pairs the accuracy, and the reward statistics for ``/score``'s ``normalize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.registry import resolve_model
from worker.jobs.common import (
    check_model_reference,
    check_params,
    check_registry_name,
    check_samples_jsonl,
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
    SpecError,
    ValidationContext,
    resolve_data_path,
    spec_with_defaults,
)

KIND = "metarm"
ALGORITHM = "metarm"
SPEC_KEYS = ("model", "pairs_file", "samples_file", "name", "params")
SET_BY_SPEC = ("model", "pairs_path", "samples_path", "output_dir")
DEFAULTS = {"model": "minilm", "name": "rm", "params": {}, "samples_file": None}
DIAGNOSTICS = ("shifted_diff_mean", "shifted_diff_var", "shifted_objective", "source_accuracy",
               "source_margin", "reward_mean", "reward_std")


def _samples_path(spec: dict[str, Any], data_dir: Path) -> Path | None:
    if spec.get("samples_file") is None:
        return None
    return resolve_data_path(spec["samples_file"], "samples_file", data_dir)


def _config_values(spec: dict[str, Any], model: str, pairs: Path, samples: Path | None,
                   output_dir: Path) -> dict[str, Any]:
    return {**spec["params"], "model": model, "pairs_path": str(pairs),
            "samples_path": str(samples) if samples else None, "output_dir": str(output_dir)}


def validate(spec: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = spec_with_defaults(spec, KIND, DEFAULTS, SPEC_KEYS)
    data_dir = ctx.settings.resolved_data_dir
    params = check_params(spec, SET_BY_SPEC, "MetaRMConfig")
    pairs = required_preference_file(spec, "pairs_file", data_dir, "source preference pairs")
    samples = _samples_path(spec, data_dir)
    if samples is not None:
        rows = check_samples_jsonl(samples, "samples_file")
        if not any(len(row["responses"]) >= 2 for row in rows):
            raise SpecError("samples_file: no prompt has >= 2 responses; the difference "
                            "objective compares responses to the same prompt")
    elif params.get("meta_lr", 1.0) != 0:
        raise SpecError("samples_file: required (the shifted-distribution samples: "
                        '{"prompt", "responses"} rows under the data directory), unless '
                        "params.meta_lr is 0 (vanilla Bradley-Terry)")
    check_model_reference("model", spec["model"], ctx.settings, resolve_short_names=False)
    check_registry_name("name", spec["name"], ctx.settings, "reward_model")
    from training.metarm import MetaRMConfig

    with config_errors_as_spec_errors():
        MetaRMConfig.from_dict(_config_values(
            spec, spec["model"], pairs, samples, validation_output_dir(ctx.settings)))
    return spec


def diagnostics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"before": {...}, "after": {...}}`` of the MetaRM diagnostics in a flat metrics dict."""
    return {when: {k: metrics[f"{k}_{when}"] for k in DIAGNOSTICS if f"{k}_{when}" in metrics}
            for when in ("before", "after")}


def _train(ctx: JobContext) -> tuple[Path, dict[str, Any]]:
    from training.metarm import MetaRMConfig, MetaRMTrainer

    spec = ctx.spec
    data_dir = ctx.settings.resolved_data_dir
    pairs = resolve_data_path(spec["pairs_file"], "pairs_file", data_dir)
    samples = _samples_path(spec, data_dir)
    base = resolve_model(spec["model"], ctx.settings.artifacts_dir)
    values = _config_values(spec, base.path, pairs, samples, ctx.run_dir)
    values.setdefault("device", ctx.settings.device)
    result = MetaRMTrainer(MetaRMConfig.from_dict(values), callback=ctx.callback).train()
    metadata = reward_model_metadata(
        algorithm=ALGORITHM, base_model=spec["model"], base=base, data_files=[pairs, samples],
        metrics=scalar_metrics(result.metrics), params=spec["params"], job_id=ctx.job_id,
        pairs_file=spec["pairs_file"], samples_file=spec.get("samples_file"),
        diagnostics=diagnostics(result.metrics), steps=result.steps,
    )
    return result.model_dir, metadata


def run(ctx: JobContext) -> JobOutcome:
    return train_and_publish_once(ctx, ctx.spec["name"], lambda: _train(ctx))
