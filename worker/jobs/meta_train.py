"""Job kind ``meta_train``: OOD-PL bilevel meta-training of a reward model (DESIGN §7),
published as a new registry RM version.

Spec::

    {"reward_model": "minilm",              # φ to start from: short name, local dir, hub id
                                            # or a registry reference (rm:production)
     "policy": "smollm2-135m",              # π_θ of the inner loop (any causal LM reference)
     "samples_file": "src.samples.jsonl",   # D_xy: {"prompt", "responses", "domain"} rows  } data-dir
     "pairs_file": "src.pairs.jsonl",       # D_PL: {"prompt", "chosen", "rejected", "domain"} } paths
     # or, instead of the two files:
     "task": "csg",                         # the bundled benchmark (bench/data/{csg,ka})
     "name": "rm",                          # registry model to publish to
     "params": {"outer_steps": 100, ...}}   # any MetaTrainConfig field but those set above

The published version's ``generalrm.json`` records the algorithm (``ood-pl-meta-train``),
the base RM and its registry version when it came from the registry, the policy, the source
domains, a fingerprint of the data, the metrics (outer PL accuracy before/after, RM
accuracy) and reward statistics (for ``/score``'s ``normalize``), and the job id.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from training.registry import resolve_model
from worker.jobs.common import (
    check_model_reference,
    check_params,
    check_registry_name,
    check_samples_jsonl,
    config_errors_as_spec_errors,
    registry_version_label,
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
    check_preference_jsonl,
    jsonl_objects,
    resolve_data_path,
    spec_with_defaults,
)

KIND = "meta_train"
ALGORITHM = "ood-pl-meta-train"
TASKS = ("csg", "ka")
SPEC_KEYS = ("reward_model", "policy", "samples_file", "pairs_file", "task", "name", "params")
SET_BY_SPEC = ("reward_model", "policy", "samples_file", "pairs_file", "task", "bench_root",
               "output_dir", "artifacts_dir")
DEFAULTS = {"reward_model": "minilm", "policy": "smollm2-135m", "name": "rm", "params": {}}
REWARD_STATS_PAIRS = 256  # source pairs scored for the published reward statistics


# ---------------------------------------------------------------------- the benchmark
def _domains(path: Path, key: str) -> set[str]:
    return {row["domain"] for _, row in jsonl_objects(path, key) if isinstance(row.get("domain"), str)}


def bench_root() -> Path:
    """The bundled benchmark (``bench/data``) of this installation, never a client's path."""
    spec = importlib.util.find_spec("bench.data")
    for location in (spec.submodule_search_locations or []) if spec else []:
        return Path(location)
    return Path(__file__).resolve().parents[2] / "bench" / "data"


def task_splits(task: Any) -> dict[str, Any]:
    if task not in TASKS:
        raise SpecError(f"task: must be one of {list(TASKS)} (the bundled benchmark), not {task!r}")
    path = bench_root() / task / "splits.json"
    if not path.is_file():
        raise SpecError(f"task: the benchmark {task!r} is not built on this server "
                        "(python -m bench.data build)")
    return json.loads(path.read_text(encoding="utf-8"))


def task_files(task: str) -> list[Path]:
    root = bench_root() / task
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))


# ---------------------------------------------------------------------- validation
def _data(spec: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """The data keys of the config: absolute data-dir paths, or the task and bench root."""
    if spec.get("task") is not None:
        if spec.get("samples_file") is not None or spec.get("pairs_file") is not None:
            raise SpecError("task: give the benchmark task or samples_file + pairs_file, not both")
        task_splits(spec["task"])
        return {"task": spec["task"], "bench_root": str(bench_root())}
    if spec.get("samples_file") is None or spec.get("pairs_file") is None:
        raise SpecError("samples_file and pairs_file: both required (JSONL with a 'domain' field "
                        f"under {data_dir}), or give task: one of {list(TASKS)}")
    samples = resolve_data_path(spec["samples_file"], "samples_file", data_dir)
    pairs = resolve_data_path(spec["pairs_file"], "pairs_file", data_dir)
    return {"samples_file": str(samples), "pairs_file": str(pairs)}


def _check_data(spec: dict[str, Any], data: dict[str, Any]) -> None:
    wanted = spec["params"].get("domains")
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
    common = _domains(samples, "samples_file") & _domains(pairs, "pairs_file")
    if not common:
        raise SpecError("samples_file and pairs_file: no 'domain' value occurs in both files; "
                        "every row needs a 'domain' field naming its source distribution")
    if isinstance(wanted, list):
        unknown = sorted(set(map(str, wanted)) - common)
        if unknown:
            raise SpecError(f"params.domains: {unknown} have no rows in both data files")


def _config_values(spec: dict[str, Any], data: dict[str, Any], models: dict[str, str],
                   output_dir: Path, artifacts_dir: Path) -> dict[str, Any]:
    return {**spec["params"], **data, **models, "output_dir": str(output_dir),
            "artifacts_dir": str(artifacts_dir)}


def validate(spec: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = spec_with_defaults(spec, KIND, DEFAULTS, SPEC_KEYS)
    data_dir = ctx.settings.resolved_data_dir
    check_params(spec, SET_BY_SPEC, "MetaTrainConfig")
    data = _data(spec, data_dir)
    _check_data(spec, data)
    for key in ("reward_model", "policy"):
        check_model_reference(key, spec[key], ctx.settings, resolve_short_names=False)
    check_registry_name("name", spec["name"], ctx.settings, "reward_model")
    from training.meta_train import MetaTrainConfig  # the trainer's own checks, by field name

    with config_errors_as_spec_errors():
        MetaTrainConfig.from_dict(_config_values(
            spec, data, {"reward_model": spec["reward_model"], "policy": spec["policy"]},
            validation_output_dir(ctx.settings), ctx.settings.artifacts_dir))
    return spec


# ---------------------------------------------------------------------- run
def _reward_stats(config, rm_dir: str) -> dict[str, float] | None:
    """Mean/std of the trained RM's rewards over source responses (``normalize: true``)."""
    import torch

    from training import data as data_module
    from training.metarm import pair_triples, source_accuracy
    from training.reward_model import RewardModel

    if config.task is not None:
        bench = data_module.load_benchmark(config.task, root=config.bench_root)
        names = config.domains or list(bench.source_domains)
        pairs = [p for name in names for p in bench.pairs(name, config.split)]
    else:
        pairs = data_module.load_pairs(config.pairs_file)
    if not pairs:
        return None
    rm = RewardModel.from_pretrained(rm_dir, device=config.device, dtype=config.dtype,
                                     max_input_tokens=config.rm_max_tokens, seed=config.seed)
    rm.model.eval()
    with torch.no_grad():
        stats = source_accuracy(rm, pair_triples(pairs[:REWARD_STATS_PAIRS]))
    if "reward_mean" not in stats or "reward_std" not in stats:
        return None
    return {"mean": stats["reward_mean"], "std": stats["reward_std"],
            "source_accuracy": stats.get("source_accuracy")}


def _train(ctx: JobContext) -> tuple[str, dict[str, Any]]:
    from training.meta_train import MetaTrainConfig, MetaTrainer

    spec = ctx.spec
    data = _data(spec, ctx.settings.resolved_data_dir)
    rm = resolve_model(spec["reward_model"], ctx.settings.artifacts_dir)
    policy = resolve_model(spec["policy"], ctx.settings.artifacts_dir)
    values = _config_values(spec, data, {"reward_model": rm.path, "policy": policy.path},
                            ctx.run_dir, ctx.settings.artifacts_dir)
    values.setdefault("device", ctx.settings.device)
    config = MetaTrainConfig.from_dict(values)
    result = MetaTrainer(config, callback=ctx.callback).train()

    metrics = scalar_metrics(result.metrics)
    stats = _reward_stats(config, result.rm_dir)
    if stats is not None:  # in the metrics, they become the version's reward_stats
        metrics["reward_mean"], metrics["reward_std"] = stats["mean"], stats["std"]
        if stats.get("source_accuracy") is not None:
            metrics["source_accuracy"] = stats["source_accuracy"]
    files = ([Path(data["samples_file"]), Path(data["pairs_file"])] if "samples_file" in data
             else task_files(data["task"]))
    metadata = reward_model_metadata(
        algorithm=ALGORITHM, base_model=spec["reward_model"], base=rm, data_files=files,
        metrics=metrics, params=spec["params"], job_id=ctx.job_id,
        policy=spec["policy"], policy_version=registry_version_label(policy),
        domains=result.metadata.get("domains"), task=spec.get("task"),
        samples_file=spec.get("samples_file"), pairs_file=spec.get("pairs_file"),
        per_task=result.metrics.get("per_task"), steps=result.steps,
    )
    return result.rm_dir, metadata


def run(ctx: JobContext) -> JobOutcome:
    return train_and_publish_once(ctx, ctx.spec["name"], lambda: _train(ctx))
