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
used, domain, job id, metrics (RM reward before/after and KL to the reference on the prompts
``params.eval_holdout`` held out of training, the in-sample ones as ``train_*``; PL accuracy
and ``pl_margin_improved`` with pairs). With ``metarm`` it first publishes the domain-adapted RM (kind ``reward_model``,
algorithm ``metarm``, per-round diagnostics), and the policy's lineage names that version.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from training.atomic import write_text_atomic
from training.config import TrainerConfig
from training.metarm.config import MetaRMConfig, MetaRMRoundsConfig
from training.oodpl.config import AdaptConfig
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
from worker.jobs.publish import (
    data_fingerprint,
    publish_as_owner,
    reward_model_metadata,
    scalar_metrics,
)
from worker.specs import AdaptSpec, JobContext, JobOutcome, SpecError, ValidationContext

KIND = AdaptSpec.kind
SET_BY_SPEC = ("domain", "policy", "reward_model", "prompts", "prompts_file", "pairs_file",
               "task", "bench_root", "split", "output_dir", "artifacts_dir")
MAX_PROMPTS = 10_000
MAX_NAME = 128
METARM_DIAGNOSTICS = ("shifted_diff_mean", "shifted_diff_var", "source_accuracy")


def registry_name(prefix: str, domain: str) -> str:
    """``{prefix}-{domain}`` made a valid registry name (letters, digits, ``_.-``; ≤ 128)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", domain).strip("-._")
    slug = re.sub(r"-{2,}", "-", slug)
    return f"{prefix}-{slug}"[:MAX_NAME].rstrip("-._") if slug else prefix


# ---------------------------------------------------------------------- validation
def _check_prompts(spec: AdaptSpec, data_dir: Path, *, given_responses: bool) -> None:
    """``given_responses`` (``params.use_given_responses``): the rows' responses are the draws
    from p, so every prompt needs at least two of them."""
    has_prompts, has_dataset = spec.prompts is not None, spec.dataset is not None
    if has_prompts == has_dataset:
        raise SpecError("prompts / dataset: give the domain's prompts either inline ('prompts': "
                        "[...]) or as 'dataset' (a JSONL under the data directory), "
                        + ("not both" if has_prompts else "one of them is required"))
    if has_prompts:
        if not spec.prompts:
            raise SpecError("prompts: must be a non-empty list of strings")
        if len(spec.prompts) > MAX_PROMPTS:
            raise SpecError(f"prompts: at most {MAX_PROMPTS} inline; use 'dataset' for more")
        if not all(p.strip() for p in spec.prompts):
            raise SpecError("prompts: every prompt must be a non-empty string")
        if given_responses:
            raise SpecError("params.use_given_responses: inline prompts carry no responses; give "
                            "'dataset' rows {\"prompt\", \"responses\": [>= 2 strings]} or drop it")
    else:
        path = resolve_data_path(spec.dataset, "dataset", data_dir)
        rows = check_samples_jsonl(path, "dataset", need_responses=given_responses)
        short = next((n for n, r in enumerate(rows, 1) if len(r.get("responses") or []) < 2), None)
        if given_responses and short is not None:
            raise SpecError(f"params.use_given_responses: row {short} of {path.name} has fewer "
                            "than 2 responses; every prompt needs >= 2 to weight them")


def _metarm_values(metarm: Any, data_dir: Path) -> dict[str, Any]:
    """``params.metarm`` with ``pairs_file`` (or its old name ``pairs_path``) turned into an
    absolute data-dir path."""
    if not isinstance(metarm, dict):
        raise SpecError("params.metarm: must be an object of MetaRM fields (pairs_file, rounds, "
                        "meta_lr, ...)")
    key = "pairs_path" if "pairs_path" in metarm and "pairs_file" not in metarm else "pairs_file"
    if metarm.get(key) is None:
        raise SpecError("params.metarm.pairs_file: required, the source preference pairs (a "
                        "JSONL under the data directory) that MetaRM keeps the RM "
                        "accurate on")
    pairs = preference_file(metarm[key], f"params.metarm.{key}", data_dir)
    return {**metarm, key: str(pairs)}


def _adapt_values(spec: AdaptSpec, data_dir: Path, models: dict[str, str],
                  output_dir: Path, artifacts_dir: Path) -> dict[str, Any]:
    params = {k: v for k, v in check_params(spec.params, SET_BY_SPEC).items() if k != "metarm"}
    values = {**params, **models, "domain": spec.domain, "output_dir": str(output_dir),
              "artifacts_dir": str(artifacts_dir)}
    if spec.pairs is not None:
        values["pairs_file"] = str(resolve_data_path(spec.pairs, "pairs", data_dir))
    return values


def _config(spec: AdaptSpec, data_dir: Path, models: dict[str, str], output_dir: Path,
            artifacts_dir: Path) -> TrainerConfig:
    """The trainer's config (AdaptConfig, or MetaRMRoundsConfig with ``metarm``)."""
    adapt = _adapt_values(spec, data_dir, models, output_dir, artifacts_dir)
    if "metarm" not in spec.params:
        return trainer_config(AdaptConfig, adapt)
    metarm = _metarm_values(spec.params["metarm"], data_dir)
    metarm_params = {k: v for k, v in metarm.items() if k not in ("rounds", "max_meta_prompts")}
    values = {"adapt": adapt, "metarm": metarm_params, "output_dir": str(output_dir),
              **{k: metarm[k] for k in ("rounds", "max_meta_prompts") if k in metarm}}
    return trainer_config(MetaRMRoundsConfig, values, "params.metarm")


def validate(raw: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = AdaptSpec.parse(raw)
    data_dir = ctx.settings.resolved_data_dir
    if not spec.domain.strip():
        raise SpecError("domain: required, a non-empty string naming the new domain")
    check_params(spec.params, SET_BY_SPEC)
    _check_prompts(spec, data_dir, given_responses=spec.params.get("use_given_responses") is True)
    if spec.pairs is not None:
        preference_file(spec.pairs, "pairs", data_dir)
    for key in ("policy", "reward_model"):
        check_model_reference(key, getattr(spec, key), ctx.settings, resolve_short_names=False)
    if spec.name is None:
        spec.name = registry_name("policy", spec.domain)
    check_registry_name("name", spec.name, ctx.settings, "policy")
    if "metarm" in spec.params:
        if spec.rm_name is None:
            spec.rm_name = registry_name("rm", spec.domain)
        check_registry_name("rm_name", spec.rm_name, ctx.settings, "reward_model")
        if spec.rm_name == spec.name:
            raise SpecError("rm_name: must differ from name (the policy's registry name)")
    elif spec.rm_name is not None:
        raise SpecError("rm_name: only with params.metarm (no RM is published without it)")
    _config(spec, data_dir, {"policy": spec.policy, "reward_model": spec.reward_model},
            validation_output_dir(ctx.settings), ctx.settings.artifacts_dir)
    return spec.model_dump()


def deprecated_keys(raw: Any) -> list[str]:
    """Messages for the renamed keys an ``/adapt`` body still uses (echoed with the 202)."""
    metarm = raw.get("params", {}).get("metarm") if isinstance(raw, dict) else None
    return MetaRMConfig.deprecated_keys(metarm) if isinstance(metarm, dict) else []


# ---------------------------------------------------------------------- run
def _prompt_rows(spec: AdaptSpec, data_dir: Path, run_dir: Path) -> tuple[list, Path]:
    """The domain's prompts (strings or {"prompt", "responses"} rows) and the file they are in."""
    if spec.prompts is not None:
        path = run_dir / "prompts.json"
        if not path.is_file():
            write_text_atomic(path, json.dumps(spec.prompts, ensure_ascii=False))
        return list(spec.prompts), path
    path = resolve_data_path(spec.dataset, "dataset", data_dir)
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
    spec = AdaptSpec.parse(ctx.spec)
    metarm = "metarm" in spec.params
    # exactly-once: nothing is trained again once everything this job publishes is published
    policy_done = ctx.registry.version_for_job(spec.name, ctx.job_id)
    rm_done = ctx.registry.version_for_job(spec.rm_name, ctx.job_id) if metarm else None
    if policy_done is not None and (rm_done is not None or not metarm):
        return JobOutcome(dict(policy_done.metadata.get("metrics", {})),
                          _artifacts(ctx.run_dir, policy_done, rm_done))

    data_dir = ctx.settings.resolved_data_dir
    policy = resolve_verified(spec.policy, ctx.settings.artifacts_dir)
    rm = resolve_verified(spec.reward_model, ctx.settings.artifacts_dir)
    prompts, prompts_path = _prompt_rows(spec, data_dir, ctx.run_dir)
    pairs_path = resolve_data_path(spec.pairs, "pairs", data_dir) if spec.pairs else None
    models = {"policy": policy.path, "reward_model": rm.path}
    with_device = spec.model_copy(update={"params": {"device": ctx.settings.device, **spec.params}})
    config = _config(with_device, data_dir, models, ctx.run_dir, ctx.settings.artifacts_dir)
    fingerprint_files = [p for p in (prompts_path, pairs_path) if p]
    lineage = {
        "base_model": spec.policy,
        "parent_version": policy.registry_label,
        "domain": spec.domain,
        "dataset": spec.dataset,
        "pairs": spec.pairs,
        "num_prompts": len(prompts),
        "job_id": ctx.job_id,
    }

    if not metarm:
        from training.oodpl.adapt import Adapter  # deferred: imports torch (the job's process)

        result = Adapter(config, ctx.callback, prompts=prompts).train()
        metrics = scalar_metrics(result.metrics)
        metadata = {
            **lineage,
            "kind": "policy",
            "algorithm": result.metadata.get("algorithm", "ood-pl-adapt"),
            "reward_model": rm.registry_label or spec.reward_model,
            "reward_model_base": spec.reward_model,
            "data_fingerprint": data_fingerprint(fingerprint_files),
            "metrics": metrics,
            "params": spec.params,
        }
        published = publish_as_owner(ctx, spec.name, result.policy_dir, metadata)
        return JobOutcome(metrics, _artifacts(ctx.run_dir, published))

    from training.metarm.rounds import MetaRMRounds  # deferred: imports torch (the job's process)

    result = MetaRMRounds(config, ctx.callback, prompts=prompts).train()
    records = result.metrics.get("by_round", [])
    last = records[-1] if records else {}
    metrics = {**scalar_metrics(last.get("adapt", {})), **scalar_metrics(result.metrics)}
    for key, value in result.metrics.items():  # the per-round diagnostic series
        if key.endswith("_by_round") and isinstance(value, list):
            metrics[key] = value
    metrics["by_round"] = _by_round(records)
    metarm_params = spec.params["metarm"]
    source_pairs = config.metarm_config(1, "rm", "samples.json").pairs_file
    rm_metadata = reward_model_metadata(
        algorithm="metarm", base_model=spec.reward_model, base=rm,
        data_files=[Path(source_pairs), prompts_path],
        metrics=scalar_metrics(last.get("metarm", {})),
        params=metarm_params, job_id=ctx.job_id,
        domain=spec.domain, rounds=result.metrics.get("rounds"),
        pairs_file=metarm_params.get("pairs_file", metarm_params.get("pairs_path")),
        diagnostics_by_round=[
            {"round": rec["round"],
             **{f"{k}_{w}": rec.get("metarm", {}).get(f"{k}_{w}")
                for k in METARM_DIAGNOSTICS for w in ("before", "after")}}
            for rec in records],
    )
    if rm_done is None:
        rm_done = publish_as_owner(ctx, spec.rm_name, result.reward_model_dir, rm_metadata)
    metadata = {
        **lineage,
        "kind": "policy",
        "algorithm": "ood-pl-adapt+metarm",
        "reward_model": rm_done.reference,
        "reward_model_base": spec.reward_model,
        "reward_model_base_version": rm.registry_label,
        "data_fingerprint": data_fingerprint(fingerprint_files),
        "metrics": metrics,
        "params": spec.params,
    }
    if policy_done is None:
        policy_done = publish_as_owner(ctx, spec.name, result.policy_dir, metadata)
    return JobOutcome(metrics, _artifacts(ctx.run_dir, policy_done, rm_done))
