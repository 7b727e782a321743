"""Job kind ``metarm``: the MetaRM reward-model update alone (DESIGN §7, arXiv 2405.00438),
published as a new registry RM version with its diagnostics.

Spec (``worker.specs.MetaRMSpec``)::

    {"model": "minilm",                        # RM to start from (short name, local dir, hub
                                               # id, or a registry reference: rm:production)
     "pairs_file": "source.pairs.jsonl",       # source preferences X_t   } relative to the
     "samples_file": "shifted.samples.jsonl",  # shifted samples X_s:     } data directory
                                               # {"prompt", "responses": [>= 2 strings]} rows
                                               # (optional only with params.meta_lr = 0)
     "name": "rm",                             # registry model to publish to
     "params": {"meta_lr": 1e-3, ...}}         # any MetaRMConfig field but model, pairs_file,
                                               # samples_file, output_dir

The version's metadata holds the diagnostics before and after training: on the shifted
samples the mean |Δr| and the variance of Δr among responses to the same prompt, on the
source pairs the accuracy, and the reward statistics for ``/score``'s ``normalize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.metarm.config import MetaRMConfig
from training.registry import resolve_verified
from worker.jobs.checks import (
    check_model_reference,
    check_params,
    check_registry_name,
    check_samples_jsonl,
    preference_file,
    resolve_data_path,
    trainer_config,
    validation_output_dir,
)
from worker.jobs.publish import reward_model_metadata, scalar_metrics, train_and_publish_once
from worker.specs import JobContext, JobOutcome, MetaRMSpec, SpecError, ValidationContext

KIND = MetaRMSpec.kind
ALGORITHM = "metarm"
# the config fields the spec sets, under their current and their deprecated names
SET_BY_SPEC = ("model", "pairs_file", "samples_file", "output_dir", "pairs_path", "samples_path")
DIAGNOSTICS = ("shifted_diff_mean", "shifted_diff_var", "shifted_objective", "source_accuracy",
               "source_margin", "reward_mean", "reward_std")


def _config(spec: MetaRMSpec, data_dir: Path, output_dir: Path, model: str) -> MetaRMConfig:
    params = check_params(spec.params, SET_BY_SPEC)
    pairs = preference_file(spec.pairs_file, "pairs_file", data_dir)
    samples = None
    if spec.samples_file is not None:
        samples = resolve_data_path(spec.samples_file, "samples_file", data_dir)
        rows = check_samples_jsonl(samples, "samples_file")
        if not any(len(row["responses"]) >= 2 for row in rows):
            raise SpecError("samples_file: no prompt has >= 2 responses; the difference "
                            "objective compares responses to the same prompt")
    config = trainer_config(MetaRMConfig, {**params, "model": model, "pairs_file": str(pairs),
                                           "samples_file": str(samples) if samples else None,
                                           "output_dir": str(output_dir)})
    if samples is None and config.meta_lr != 0:
        raise SpecError("samples_file: required (the shifted-distribution samples: "
                        '{"prompt", "responses"} rows under the data directory), unless '
                        "params.meta_lr is 0 (vanilla Bradley-Terry)")
    return config


def validate(raw: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = MetaRMSpec.parse(raw)
    _config(spec, ctx.settings.resolved_data_dir, validation_output_dir(ctx.settings), spec.model)
    check_model_reference("model", spec.model, ctx.settings, resolve_short_names=False)
    check_registry_name("name", spec.name, ctx.settings, "reward_model")
    return spec.model_dump()


def diagnostics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"before": {...}, "after": {...}}`` of the MetaRM diagnostics in a flat metrics dict."""
    return {when: {k: metrics[f"{k}_{when}"] for k in DIAGNOSTICS if f"{k}_{when}" in metrics}
            for when in ("before", "after")}


def _train(ctx: JobContext) -> tuple[Path, dict[str, Any]]:
    # deferred: the trainer imports torch, which only the job's own process may load
    from training.metarm.trainer import MetaRMTrainer

    spec = MetaRMSpec.parse(ctx.spec)
    base = resolve_verified(spec.model, ctx.settings.artifacts_dir)
    config = _config(spec, ctx.settings.resolved_data_dir, ctx.run_dir, base.path)
    if "device" not in spec.params:
        config.device = ctx.settings.device
    result = MetaRMTrainer(config, callback=ctx.callback).train()
    files = [Path(config.pairs_file), Path(config.samples_file) if config.samples_file else None]
    metadata = reward_model_metadata(
        algorithm=ALGORITHM, base_model=spec.model, base=base, data_files=files,
        metrics=scalar_metrics(result.metrics), params=spec.params, job_id=ctx.job_id,
        pairs_file=spec.pairs_file, samples_file=spec.samples_file,
        diagnostics=diagnostics(result.metrics), steps=result.steps,
    )
    return result.model_dir, metadata


def run(ctx: JobContext) -> JobOutcome:
    return train_and_publish_once(ctx, ctx.spec["name"], lambda: _train(ctx))
