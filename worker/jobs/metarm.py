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
from worker.jobs.meta_train import (
    check_params,
    check_reference,
    check_registry_name,
    check_samples_jsonl,
    scalar_metrics,
)
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

KIND = "metarm"
ALGORITHM = "metarm"
SPEC_KEYS = ("model", "pairs_file", "samples_file", "name", "params")
SET_BY_SPEC = ("model", "pairs_path", "samples_path", "output_dir")
DEFAULTS = {"model": "minilm", "name": "rm", "params": {}, "samples_file": None}
DIAGNOSTICS = ("shifted_diff_mean", "shifted_diff_var", "shifted_objective", "source_accuracy",
               "source_margin", "reward_mean", "reward_std")


def _paths(spec: dict[str, Any], data_dir: Path) -> tuple[Path, Path | None]:
    if spec.get("pairs_file") is None:
        raise SpecError(f"pairs_file: required, a JSONL of source preference pairs under {data_dir}")
    pairs = resolve_data_path(spec["pairs_file"], "pairs_file", data_dir)
    samples = None
    if spec.get("samples_file") is not None:
        samples = resolve_data_path(spec["samples_file"], "samples_file", data_dir)
    return pairs, samples


def _config_values(spec: dict[str, Any], model: str, pairs: Path, samples: Path | None,
                   output_dir: Path) -> dict[str, Any]:
    return {**spec["params"], "model": model, "pairs_path": str(pairs),
            "samples_path": str(samples) if samples else None, "output_dir": str(output_dir)}


def validate(spec: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = {**DEFAULTS, **require_mapping(spec, KIND)}
    reject_unknown_keys(spec, SPEC_KEYS, KIND)
    data_dir = ctx.settings.resolved_data_dir
    params = check_params(spec, SET_BY_SPEC, "MetaRMConfig")
    pairs, samples = _paths(spec, data_dir)
    check_preference_jsonl(pairs, "pairs_file")
    if samples is not None:
        rows = check_samples_jsonl(samples, "samples_file")
        if not any(len(row["responses"]) >= 2 for row in rows):
            raise SpecError("samples_file: no prompt has >= 2 responses; the difference "
                            "objective compares responses to the same prompt")
    elif params.get("meta_lr", 1.0) != 0:
        raise SpecError("samples_file: required (the shifted-distribution samples: "
                        '{"prompt", "responses"} rows under the data directory), unless '
                        "params.meta_lr is 0 (vanilla Bradley-Terry)")
    check_reference("model", spec["model"], ctx.settings)
    check_registry_name("name", spec["name"], ctx.settings, "reward_model")
    from training.metarm import MetaRMConfig

    try:
        MetaRMConfig.from_dict(_config_values(
            spec, spec["model"], pairs, samples, ctx.settings.artifacts_dir / "jobs" / "_validation"))
    except ValueError as exc:
        raise SpecError(f"params: {exc}") from None
    return spec


def _outcome(version, run_dir: Path) -> JobOutcome:
    return JobOutcome(
        metrics=dict(version.metadata.get("metrics", {})),
        artifacts={"model": version.reference, "model_path": str(version.path),
                   "run_dir": str(run_dir)},
    )


def diagnostics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"before": {...}, "after": {...}}`` of the MetaRM diagnostics in a flat metrics dict."""
    return {when: {k: metrics[f"{k}_{when}"] for k in DIAGNOSTICS if f"{k}_{when}" in metrics}
            for when in ("before", "after")}


def run(ctx: JobContext) -> JobOutcome:
    spec = ctx.spec
    name = spec["name"]
    already = ctx.registry.version_for_job(name, ctx.job_id)  # exactly-once publication
    if already is not None:
        return _outcome(already, ctx.run_dir)

    from training.metarm import MetaRMConfig, MetaRMTrainer

    pairs, samples = _paths(spec, ctx.settings.resolved_data_dir)
    base = resolve_model(spec["model"], ctx.settings.artifacts_dir)
    values = _config_values(spec, base.path, pairs, samples, ctx.run_dir)
    values.setdefault("device", ctx.settings.device)
    result = MetaRMTrainer(MetaRMConfig.from_dict(values), callback=ctx.callback).train()

    metrics = scalar_metrics(result.metrics)
    metadata = {
        "kind": "reward_model",
        "algorithm": ALGORITHM,
        "base_model": spec["model"],
        "parent_version": base.label if base.version is not None else None,
        "pairs_file": spec["pairs_file"],
        "samples_file": spec.get("samples_file"),
        "data_fingerprint": data_fingerprint([p for p in (pairs, samples) if p]),
        "metrics": metrics,
        "diagnostics": diagnostics(result.metrics),
        "params": spec["params"],
        "job_id": ctx.job_id,
        "steps": result.steps,
    }
    if "reward_mean" in metrics and "reward_std" in metrics:
        metadata["reward_stats"] = {"mean": metrics["reward_mean"], "std": metrics["reward_std"]}
    ctx.ensure_owner()
    version = ctx.registry.publish(name, result.model_dir, metadata)
    return _outcome(version, ctx.run_dir)
