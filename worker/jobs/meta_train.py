"""Job kind ``meta_train``: OOD-PL bilevel meta-training of a reward model (DESIGN §7),
published as a new registry RM version.

Spec (``worker.specs.MetaTrainSpec``)::

    {"reward_model": "minilm",              # φ to start from: short name, local dir, hub id
                                            # or a registry reference (rm:production)
     "policy": "smollm2-135m",              # π_θ of the inner loop (any causal LM reference)
     "samples_file": "src.samples.jsonl",   # D_xy: {"prompt", "responses", "domain"} rows  } data-dir
     "pairs_file": "src.pairs.jsonl",       # D_PL: {"prompt", "chosen", "rejected", "domain"} } paths
     # or, instead of the two files:
     "task": "csg",                         # the bundled benchmark (benchdata/{csg,ka})
     "name": "rm",                          # registry model to publish to
     "resources": {"processes": 2},         # optional: ranks on the worker that claims it (ddp)
     "params": {"outer_steps": 100, ...}}   # any MetaTrainConfig field but those set above

With ``resources.processes`` > 1 the trainer runs over that many processes (``ddp``: the RM
and the policy replicated on each): the precompute of the ``precomputed`` hypergradient is
shared among them, each outer step's inner-batch prompts (and outer pairs) are shared, the
RM's gradient averaged; rank 0 writes the checkpoints and the RM, published once. The
hypergradient ``exact`` runs in one process only (refused at submission).

The published version's ``generalrm.json`` records the algorithm (``ood-pl-meta-train``),
the base RM and its registry version when it came from the registry, the policy, the source
domains, a fingerprint of the data, the metrics (outer PL accuracy before/after, RM
accuracy) and reward statistics (for ``/score``'s ``normalize``), and the job id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.data import default_bench_root
from training.oodpl.config import (
    EXACT_NEEDS_ONE_PROCESS,
    MetaTrainConfig,
    replicated_only,
    resolve_hypergradient,
)
from training.registry import resolve_verified
from worker.jobs.checks import (
    check_model_reference,
    check_params,
    check_preference_jsonl,
    check_registry_name,
    check_resources,
    check_samples_jsonl,
    domains_of,
    resolve_data_path,
    trainer_config,
    validation_output_dir,
)
from worker.jobs.processes import run_trainer
from worker.jobs.publish import reward_model_metadata, scalar_metrics, train_and_publish_once
from worker.specs import JobContext, JobOutcome, MetaTrainSpec, SpecError, ValidationContext

KIND = MetaTrainSpec.kind
ALGORITHM = "ood-pl-meta-train"
TASKS = ("csg", "ka")
SET_BY_SPEC = ("reward_model", "policy", "samples_file", "pairs_file", "task", "bench_root",
               "output_dir", "artifacts_dir")
REWARD_STATS_PAIRS = 256  # source pairs scored for the published reward statistics


# ---------------------------------------------------------------------- the benchmark
def task_splits(task: str) -> dict[str, Any]:
    if task not in TASKS:
        raise SpecError(f"task: must be one of {list(TASKS)} (the bundled benchmark), not {task!r}")
    path = default_bench_root() / task / "splits.json"
    if not path.is_file():
        raise SpecError(f"task: the benchmark {task!r} is not built on this server "
                        "(python -m bench.datagen build)")
    return json.loads(path.read_text(encoding="utf-8"))


def task_files(task: str) -> list[Path]:
    root = default_bench_root() / task
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))


# ---------------------------------------------------------------------- validation
def _data(spec: MetaTrainSpec, data_dir: Path) -> dict[str, Any]:
    """The data keys of the config: absolute data-dir paths, or the task."""
    if spec.task is not None:
        if spec.samples_file is not None or spec.pairs_file is not None:
            raise SpecError("task: give the benchmark task or samples_file + pairs_file, not both")
        task_splits(spec.task)
        return {"task": spec.task}
    if spec.samples_file is None or spec.pairs_file is None:
        raise SpecError("samples_file and pairs_file: both required (JSONL with a 'domain' field "
                        f"under the data directory), or give task: one of {list(TASKS)}")
    samples = resolve_data_path(spec.samples_file, "samples_file", data_dir)
    pairs = resolve_data_path(spec.pairs_file, "pairs_file", data_dir)
    return {"samples_file": str(samples), "pairs_file": str(pairs)}


def _check_data(spec: MetaTrainSpec, data: dict[str, Any]) -> None:
    wanted = spec.params.get("domains")
    if "task" in data:
        sources = task_splits(data["task"]).get("source_domains", [])
        if isinstance(wanted, list):
            unknown = sorted(set(map(str, wanted)) - set(sources))
            if unknown:
                raise SpecError(f"params.domains: {unknown} are not source domains of "
                                f"{data['task']!r}; they are {sources}")
        return
    samples, pairs = Path(data["samples_file"]), Path(data["pairs_file"])
    check_samples_jsonl(samples, "samples_file")
    check_preference_jsonl(pairs, "pairs_file")
    common = domains_of(samples, "samples_file") & domains_of(pairs, "pairs_file")
    if not common:
        raise SpecError("samples_file and pairs_file: no 'domain' value occurs in both files; "
                        "every row needs a 'domain' field naming its source distribution")
    if isinstance(wanted, list):
        unknown = sorted(set(map(str, wanted)) - common)
        if unknown:
            raise SpecError(f"params.domains: {unknown} have no rows in both data files")


def _config(spec: MetaTrainSpec, data: dict[str, Any], models: dict[str, str],
            output_dir: Path, artifacts_dir: Path) -> MetaTrainConfig:
    params = check_params(spec.params, SET_BY_SPEC)
    return trainer_config(MetaTrainConfig, {**params, **data, **models,
                                            "output_dir": str(output_dir),
                                            "artifacts_dir": str(artifacts_dir)})


def validate(raw: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = MetaTrainSpec.parse(raw)
    check_params(spec.params, SET_BY_SPEC)
    data = _data(spec, ctx.settings.resolved_data_dir)
    _check_data(spec, data)
    for key in ("reward_model", "policy"):
        check_model_reference(key, getattr(spec, key), ctx.settings, resolve_short_names=False)
    check_registry_name("name", spec.name, ctx.settings, "reward_model")
    config = _config(spec, data, {"reward_model": spec.reward_model, "policy": spec.policy},
                     validation_output_dir(ctx.settings), ctx.settings.artifacts_dir)
    hypergradient = resolve_hypergradient(config)
    shared = {"inner_batch_prompts": config.inner_batch_prompts}  # what the processes share
    if hypergradient == "first_order" or config.bt_weight > 0:
        shared["outer_batch_pairs"] = config.outer_batch_pairs
    check_resources(spec.resources, ctx.settings,
                    device=spec.params.get("device", ctx.settings.device), batches=shared,
                    replicated_reason=replicated_only("meta_train"),
                    single_process_reason=EXACT_NEEDS_ONE_PROCESS if hypergradient == "exact"
                    else None)
    return spec.model_dump()


# ---------------------------------------------------------------------- run
def _reward_stats(config: MetaTrainConfig, rm_dir: str) -> dict[str, float] | None:
    """Mean/std of the trained RM's rewards over source responses (``normalize: true``)."""
    from training.metarm.trainer import source_accuracy  # deferred: imports torch
    from training.oodpl.meta_train import load_tasks
    from training.reward_model import RewardModel

    pairs = [p for task in load_tasks(config) for p in task.pairs]
    if not pairs:
        return None
    rm = RewardModel.from_pretrained(rm_dir, device=config.device, dtype=config.dtype,
                                     max_input_tokens=config.rm_max_tokens, seed=config.seed)
    stats = source_accuracy(rm, pairs[:REWARD_STATS_PAIRS])
    if "reward_mean" not in stats or "reward_std" not in stats:
        return None
    return {"mean": stats["reward_mean"], "std": stats["reward_std"],
            "source_accuracy": stats.get("source_accuracy")}


def _train(ctx: JobContext) -> tuple[str, dict[str, Any]]:
    spec = MetaTrainSpec.parse(ctx.spec)
    data = _data(spec, ctx.settings.resolved_data_dir)
    rm = resolve_verified(spec.reward_model, ctx.settings.artifacts_dir)
    policy = resolve_verified(spec.policy, ctx.settings.artifacts_dir)
    config = _config(spec, data, {"reward_model": rm.path, "policy": policy.path},
                     ctx.run_dir, ctx.settings.artifacts_dir)
    if "device" not in spec.params:
        config.device = ctx.settings.device
    result = run_trainer("meta-train", config, spec.resources, ctx)

    metrics = scalar_metrics(result.metrics)
    stats = _reward_stats(config, result.rm_dir)
    if stats is not None:  # in the metrics, they become the version's reward_stats
        metrics["reward_mean"], metrics["reward_std"] = stats["mean"], stats["std"]
        if stats.get("source_accuracy") is not None:
            metrics["source_accuracy"] = stats["source_accuracy"]
    files = ([Path(data["samples_file"]), Path(data["pairs_file"])] if "samples_file" in data
             else task_files(data["task"]))
    metadata = reward_model_metadata(
        algorithm=ALGORITHM, base_model=spec.reward_model, base=rm, data_files=files,
        metrics=metrics, params=spec.params, job_id=ctx.job_id,
        policy=spec.policy, policy_version=policy.registry_label,
        domains=result.metadata.get("domains"), task=spec.task,
        samples_file=spec.samples_file, pairs_file=spec.pairs_file,
        per_task=result.metrics.get("per_task"), steps=result.steps,
        resources=spec.resources.model_dump(),
    )
    return result.rm_dir, metadata


def run(ctx: JobContext) -> JobOutcome:
    return train_and_publish_once(ctx, ctx.spec["name"], lambda: _train(ctx))
