"""Job kind ``adapt``: OOD-PL meta-test (``POST /adapt``): adapt a policy to a new domain
from its prompts with a frozen RM; with ``params.metarm``, R MetaRM rounds that also adapt
the RM to the domain (issue 7).

Spec (what ``POST /adapt`` builds)::

    {"domain": "cooking",                   # the new domain (lineage; default registry name)
     "prompts": ["...", ...],               # the domain's prompts inline, or
     "dataset": "cooking.jsonl",            # a data-dir JSONL of {"prompt"[, "responses"]} rows
     "pairs": "cooking.pairs.jsonl",        # optional data-dir pairs: PL accuracy before/after
     "policy": "smollm2-135m",              # reference policy (any model reference)
     "reward_model": "rm:production",       # the frozen RM (POST /adapt: the served one)
     "name": "policy-cooking",              # registry name of the adapted policy
                                            # (default: policy-<domain>, sanitised)
     "rm_name": "rm-cooking",               # registry name of the domain-adapted RM (only
                                            # with params.metarm; default rm-<domain>)
     "params": {"steps": 50, "responses_per_prompt": 4, ...,   # AdaptConfig fields
                "metarm": {"pairs_path": "source.pairs.jsonl",  # data-dir source pairs
                           "rounds": 2, "max_meta_prompts": 32, # MetaRMRoundsConfig
                           "meta_lr": 1e-3, ...}}}              # MetaRMConfig fields

Publishes the adapted policy (kind ``policy``) with its lineage: base policy, the RM version
used, domain, job id, metrics (RM reward before/after, KL to the reference, PL accuracy with
pairs). With ``metarm`` it first publishes the domain-adapted RM (kind ``reward_model``,
algorithm ``metarm``, per-round diagnostics), and the policy's lineage names that version.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from training.registry import resolve_model
from worker.jobs.common import (
    check_model_reference,
    check_params,
    check_registry_name,
    check_samples_jsonl,
    config_errors_as_spec_errors,
    publish_as_owner,
    registry_version_label,
    reward_model_metadata,
    scalar_metrics,
    validation_output_dir,
)
from worker.specs import (
    JobContext,
    JobOutcome,
    SpecError,
    ValidationContext,
    check_preference_jsonl,
    data_fingerprint,
    resolve_data_path,
    spec_with_defaults,
)

KIND = "adapt"
SPEC_KEYS = ("domain", "prompts", "dataset", "pairs", "policy", "reward_model", "name",
             "rm_name", "params")
SET_BY_SPEC = ("domain", "policy", "reward_model", "prompts", "prompts_file", "pairs_file",
               "task", "bench_root", "split", "output_dir", "artifacts_dir")
DEFAULTS = {"policy": "smollm2-135m", "reward_model": "minilm", "params": {}}
MAX_PROMPTS = 10_000
MAX_NAME = 128
METARM_DIAGNOSTICS = ("shifted_diff_mean", "shifted_diff_var", "source_accuracy")


def registry_name(prefix: str, domain: str) -> str:
    """``{prefix}-{domain}`` made a valid registry name (letters, digits, ``_.-``; ≤ 128)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", domain).strip("-._")
    slug = re.sub(r"-{2,}", "-", slug)
    return f"{prefix}-{slug}"[:MAX_NAME].rstrip("-._") if slug else prefix


# ---------------------------------------------------------------------- validation
def _check_prompts(spec: dict[str, Any], data_dir: Path, *, given_responses: bool) -> None:
    """``given_responses`` (``params.use_given_responses``): the rows' responses are the draws
    from p, so every prompt needs at least two of them."""
    has_prompts, has_dataset = spec.get("prompts") is not None, spec.get("dataset") is not None
    if has_prompts == has_dataset:
        raise SpecError("prompts / dataset: give the domain's prompts either inline ('prompts': "
                        "[...]) or as 'dataset' (a JSONL under the data directory), "
                        + ("not both" if has_prompts else "one of them is required"))
    if has_prompts:
        prompts = spec["prompts"]
        if not isinstance(prompts, list) or not prompts:
            raise SpecError("prompts: must be a non-empty list of strings")
        if len(prompts) > MAX_PROMPTS:
            raise SpecError(f"prompts: at most {MAX_PROMPTS} inline; use 'dataset' for more")
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise SpecError("prompts: every prompt must be a non-empty string")
        if given_responses:
            raise SpecError("params.use_given_responses: inline prompts carry no responses; give "
                            "'dataset' rows {\"prompt\", \"responses\": [>= 2 strings]} or drop it")
    else:
        path = resolve_data_path(spec["dataset"], "dataset", data_dir)
        rows = check_samples_jsonl(path, "dataset", need_responses=given_responses)
        short = next((n for n, r in enumerate(rows, 1) if len(r.get("responses") or []) < 2), None)
        if given_responses and short is not None:
            raise SpecError(f"params.use_given_responses: row {short} of {path.name} has fewer "
                            "than 2 responses; every prompt needs >= 2 to weight them")


def _metarm_values(metarm: Any, data_dir: Path) -> dict[str, Any]:
    """``params.metarm`` with ``pairs_path`` turned into an absolute data-dir path."""
    if not isinstance(metarm, dict):
        raise SpecError("params.metarm: must be an object of MetaRM fields (pairs_path, rounds, "
                        "meta_lr, ...)")
    if metarm.get("pairs_path") is None:
        raise SpecError("params.metarm.pairs_path: required, the source preference pairs (a "
                        f"JSONL under the data directory {data_dir}) that MetaRM keeps the RM "
                        "accurate on")
    pairs = resolve_data_path(metarm["pairs_path"], "params.metarm.pairs_path", data_dir)
    check_preference_jsonl(pairs, "params.metarm.pairs_path")
    return {**metarm, "pairs_path": str(pairs)}


def _adapt_values(spec: dict[str, Any], data_dir: Path, models: dict[str, str],
                  output_dir: Path, artifacts_dir: Path) -> dict[str, Any]:
    params = {k: v for k, v in spec["params"].items() if k != "metarm"}
    values = {**params, **models, "domain": spec["domain"], "output_dir": str(output_dir),
              "artifacts_dir": str(artifacts_dir)}
    if spec.get("pairs") is not None:
        values["pairs_file"] = str(resolve_data_path(spec["pairs"], "pairs", data_dir))
    return values


def _configs(spec: dict[str, Any], data_dir: Path, models: dict[str, str], output_dir: Path,
             artifacts_dir: Path):
    """The trainer's config (AdaptConfig, or MetaRMRoundsConfig with ``metarm``)."""
    adapt = _adapt_values(spec, data_dir, models, output_dir, artifacts_dir)
    if "metarm" not in spec["params"]:
        from training.adapt import AdaptConfig

        return AdaptConfig.from_dict(adapt)
    from training.metarm_rounds import MetaRMRoundsConfig

    metarm = _metarm_values(spec["params"]["metarm"], data_dir)
    return MetaRMRoundsConfig.from_adapt_params(adapt, metarm, str(output_dir))


def validate(spec: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = spec_with_defaults(spec, KIND, DEFAULTS, SPEC_KEYS)
    data_dir = ctx.settings.resolved_data_dir
    domain = spec.get("domain")
    if not isinstance(domain, str) or not domain.strip():
        raise SpecError("domain: required, a non-empty string naming the new domain")
    params = check_params(spec, SET_BY_SPEC, "AdaptConfig (plus 'metarm')")
    _check_prompts(spec, data_dir, given_responses=params.get("use_given_responses") is True)
    if spec.get("pairs") is not None:
        check_preference_jsonl(resolve_data_path(spec["pairs"], "pairs", data_dir), "pairs")
    for key in ("policy", "reward_model"):
        check_model_reference(key, spec[key], ctx.settings, resolve_short_names=False)
    spec.setdefault("name", registry_name("policy", domain))
    check_registry_name("name", spec["name"], ctx.settings, "policy")
    if "metarm" in params:
        spec.setdefault("rm_name", registry_name("rm", domain))
        check_registry_name("rm_name", spec["rm_name"], ctx.settings, "reward_model")
        if spec["rm_name"] == spec["name"]:
            raise SpecError("rm_name: must differ from name (the policy's registry name)")
    elif spec.get("rm_name") is not None:
        raise SpecError("rm_name: only with params.metarm (no RM is published without it)")
    with config_errors_as_spec_errors():
        _configs(spec, data_dir, {"policy": spec["policy"], "reward_model": spec["reward_model"]},
                 validation_output_dir(ctx.settings), ctx.settings.artifacts_dir)
    return spec


# ---------------------------------------------------------------------- run
def _prompt_rows(spec: dict[str, Any], data_dir: Path, run_dir: Path) -> tuple[list, Path]:
    """The domain's prompts (strings or {"prompt", "responses"} rows) and the file they are in."""
    if spec.get("prompts") is not None:
        path = run_dir / "prompts.json"
        if not path.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(spec["prompts"], ensure_ascii=False))
            tmp.replace(path)
        return list(spec["prompts"]), path
    path = resolve_data_path(spec["dataset"], "dataset", data_dir)
    rows = [{"prompt": r["prompt"], "responses": list(r.get("responses") or [])}
            for r in check_samples_jsonl(path, "dataset", need_responses=False)]
    return rows, path


def _artifacts(run_dir: Path, policy, rm=None) -> dict[str, Any]:
    out = {"model": policy.reference, "model_path": str(policy.path), "policy": policy.reference,
           "run_dir": str(run_dir)}
    if rm is not None:
        out.update(reward_model=rm.reference, reward_model_path=str(rm.path))
    return out


def _by_round(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"round": rec["round"],
             **{f"rm_{k}": v for k, v in scalar_metrics(rec.get("metarm", {})).items()},
             **{f"policy_{k}": v for k, v in scalar_metrics(rec.get("adapt", {})).items()
                if k != "domain"}}
            for rec in records]


def run(ctx: JobContext) -> JobOutcome:
    spec = ctx.spec
    name, rm_name = spec["name"], spec.get("rm_name")
    metarm = "metarm" in spec["params"]
    # exactly-once: nothing is trained again once everything this job publishes is published
    policy_done = ctx.registry.version_for_job(name, ctx.job_id)
    rm_done = ctx.registry.version_for_job(rm_name, ctx.job_id) if metarm else None
    if policy_done is not None and (rm_done is not None or not metarm):
        return JobOutcome(dict(policy_done.metadata.get("metrics", {})),
                          _artifacts(ctx.run_dir, policy_done, rm_done))

    data_dir = ctx.settings.resolved_data_dir
    policy = resolve_model(spec["policy"], ctx.settings.artifacts_dir)
    rm = resolve_model(spec["reward_model"], ctx.settings.artifacts_dir)
    prompts, prompts_path = _prompt_rows(spec, data_dir, ctx.run_dir)
    pairs_path = resolve_data_path(spec["pairs"], "pairs", data_dir) if spec.get("pairs") else None
    models = {"policy": policy.path, "reward_model": rm.path}
    with_device = {**spec, "params": {"device": ctx.settings.device, **spec["params"]}}
    config = _configs(with_device, data_dir, models, ctx.run_dir, ctx.settings.artifacts_dir)
    fingerprint_files = [p for p in (prompts_path, pairs_path) if p]
    lineage = {
        "base_model": spec["policy"],
        "parent_version": registry_version_label(policy),
        "domain": spec["domain"],
        "dataset": spec.get("dataset"),
        "pairs": spec.get("pairs"),
        "num_prompts": len(prompts),
        "job_id": ctx.job_id,
    }

    if not metarm:
        from training.adapt import Adapter

        result = Adapter(config, ctx.callback, prompts=prompts).train()
        metrics = scalar_metrics(result.metrics)
        metadata = {
            **lineage,
            "kind": "policy",
            "algorithm": result.metadata.get("algorithm", "ood-pl-adapt"),
            "reward_model": rm.label,
            "reward_model_base": spec["reward_model"],
            "data_fingerprint": data_fingerprint(fingerprint_files),
            "metrics": metrics,
            "params": spec["params"],
        }
        published = publish_as_owner(ctx, name, result.policy_dir, metadata)
        return JobOutcome(metrics, _artifacts(ctx.run_dir, published))

    from training.metarm_rounds import MetaRMRounds

    result = MetaRMRounds(config, ctx.callback, prompts=prompts).train()
    records = result.metrics.get("by_round", [])
    last = records[-1] if records else {}
    metrics = {**scalar_metrics(last.get("adapt", {})), **scalar_metrics(result.metrics)}
    for key, value in result.metrics.items():  # the per-round diagnostic series
        if key.endswith("_by_round") and isinstance(value, list):
            metrics[key] = value
    metrics["by_round"] = _by_round(records)
    metarm_params = spec["params"]["metarm"]
    source_pairs = resolve_data_path(metarm_params["pairs_path"], "params.metarm.pairs_path",
                                     data_dir)
    rm_metadata = reward_model_metadata(
        algorithm="metarm", base_model=spec["reward_model"], base=rm,
        data_files=[source_pairs, prompts_path], metrics=scalar_metrics(last.get("metarm", {})),
        params=metarm_params, job_id=ctx.job_id,
        domain=spec["domain"], rounds=result.metrics.get("rounds"),
        pairs_path=metarm_params["pairs_path"],
        diagnostics_by_round=[
            {"round": rec["round"],
             **{f"{k}_{w}": rec.get("metarm", {}).get(f"{k}_{w}")
                for k in METARM_DIAGNOSTICS for w in ("before", "after")}}
            for rec in records],
    )
    if rm_done is None:
        rm_done = publish_as_owner(ctx, rm_name, result.reward_model_dir, rm_metadata)
    metadata = {
        **lineage,
        "kind": "policy",
        "algorithm": "ood-pl-adapt+metarm",
        "reward_model": rm_done.reference,
        "reward_model_base": spec["reward_model"],
        "reward_model_base_version": registry_version_label(rm),
        "data_fingerprint": data_fingerprint(fingerprint_files),
        "metrics": metrics,
        "params": spec["params"],
    }
    if policy_done is None:
        policy_done = publish_as_owner(ctx, name, result.policy_dir, metadata)
    return JobOutcome(metrics, _artifacts(ctx.run_dir, policy_done, rm_done))
