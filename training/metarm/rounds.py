"""Iterative MetaRM rounds for ``POST /adapt`` with ``params.metarm`` (issue 7).

Round r = 1..R:

1. sample k responses per domain prompt from the *current* policy (round 1: the reference
   policy; later: the policy adapted in round r−1) — the shifted distribution; the prompts
   the Adapter holds out (``eval_holdout``) are left out, so its held-out numbers stay so;
2. MetaRM update of the RM (round 1: the given RM; later: round r−1's) on the source
   preference data, with those samples as the meta set;
3. adapt the policy to the domain with the updated, frozen RM (``training.adapt.Adapter``,
   warm-started from the current policy).

Layout under ``output_dir``: ``round-01/meta_samples.json``, ``round-01/rm/`` (a MetaRM run;
``rm/model`` is the RM), ``round-01/policy/`` (an adapt run; ``policy/model`` the policy),
``round-01/round.json`` (written last: the round is complete), ``metrics.json``.
A re-run skips complete rounds and resumes the interrupted one from its checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.atomic import write_json_atomic
from training.callbacks import NullCallback, TrainerCallback
from training.data import load_benchmark, load_samples
from training.metarm.config import MetaRMRoundsConfig
from training.metarm.trainer import MetaRMTrainer
from training.models import resolve_pretrained
from training.oodpl.adapt import Adapter, holdout_split
from training.oodpl.config import AdaptConfig
from training.policy import Policy, lora_from_fields
from training.precision import mixed_precision


@dataclass
class MetaRMRoundsResult:
    output_dir: Path
    reward_model_dir: Path
    """The domain-adapted RM of the last round (RewardModel.from_pretrained)."""
    policy_dir: Path
    """The adapted policy of the last round (Policy.from_pretrained)."""
    metrics: dict[str, Any]
    """``rounds``: per-round diagnostics; flat ``*_after`` keys of the last round."""
    reward_model_metadata: dict[str, Any] = field(default_factory=dict)
    policy_metadata: dict[str, Any] = field(default_factory=dict)


class _PhaseCallback:
    """Forwards progress tagged with the round and the phase (``metarm`` / ``adapt``)."""

    def __init__(self, inner: TrainerCallback, round_index: int, rounds: int, phase: str) -> None:
        self.inner, self.round_index, self.rounds, self.phase = inner, round_index, rounds, phase

    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        tagged = {**metrics, "round": self.round_index, "rounds": self.rounds, "phase": self.phase}
        self.inner.on_progress(step, total, tagged)

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def _prompt_texts(items: Sequence[Any]) -> list[str]:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(item["prompt"])
        else:
            out.append(item.prompt)
    return out


class MetaRMRounds:
    """Run the rounds; ``train()`` returns a :class:`MetaRMRoundsResult`.

    ``prompts`` (the domain's prompts; else the adapt config's prompts/prompts_file/task),
    ``pairs`` (the domain's pairs for PL accuracy), ``gold_fn`` go to the Adapter;
    ``source_pairs`` are the MetaRM preference data (else ``metarm.pairs_path``, else the
    benchmark task's source-domain training pairs).
    """

    def __init__(
        self,
        config: MetaRMRoundsConfig,
        callback: TrainerCallback | None = None,
        *,
        prompts: Sequence[Any] | None = None,
        pairs: Sequence[Any] | None = None,
        source_pairs: Sequence[Any] | None = None,
        gold_fn: Any = None,
    ) -> None:
        self.config = config
        self.callback = callback or NullCallback()
        self._prompts = prompts
        self._pairs = pairs
        self._source_pairs = source_pairs
        self.gold_fn = gold_fn

    # ------------------------------------------------------------------ data
    def _domain_prompts(self, adapt_config: Any) -> list[str]:
        if self._prompts is not None:
            return _prompt_texts(self._prompts)
        if adapt_config.prompts is not None:
            return list(adapt_config.prompts)
        if adapt_config.prompts_file is not None:
            return _prompt_texts(load_samples(adapt_config.prompts_file))
        if adapt_config.task is not None:
            bench = load_benchmark(adapt_config.task, root=adapt_config.bench_root)
            return _prompt_texts(bench.samples(adapt_config.domain, adapt_config.split))
        raise ValueError(
            "no domain prompts: set adapt.prompts, prompts_file or task, or pass prompts="
        )

    def _load_source_pairs(self, adapt_config: Any) -> list[Any] | None:
        if self._source_pairs is not None:
            return list(self._source_pairs)
        if self.config.metarm.get("pairs_file") or self.config.metarm.get("pairs_path"):
            return None  # MetaRMTrainer reads it
        if adapt_config.task is not None:
            bench = load_benchmark(adapt_config.task, root=adapt_config.bench_root)
            return [p for d in bench.source_domains for p in bench.pairs(d, "train")]
        raise ValueError("MetaRM rounds need source preference pairs: set metarm.pairs_file")

    # ------------------------------------------------------------------ policy
    def _load_policy(self, adapt_config: AdaptConfig, previous_policy_dir: Path | None) -> Policy:
        common = dict(
            device=adapt_config.device,
            dtype=adapt_config.dtype,
            max_prompt_tokens=adapt_config.max_prompt_tokens,
            max_response_tokens=adapt_config.max_response_tokens,
            artifacts_dir=adapt_config.artifacts_dir,
            seed=adapt_config.seed,
            # render prompts exactly as the Adapter of each round does
            chat_template=adapt_config.chat_template,
        )
        if previous_policy_dir is not None:  # resuming after a complete round
            policy = Policy.from_pretrained(previous_policy_dir, **common)
        else:
            lora = lora_from_fields(
                adapt_config.lora_r, adapt_config.lora_alpha, adapt_config.lora_targets
            )
            policy = Policy.from_pretrained(adapt_config.policy, lora=lora, **common)
        policy.autocast_dtype = mixed_precision(policy.device, adapt_config.bf16, policy.dtype)
        return policy

    def _sample_meta_set(
        self, policy: Any, prompts: list[str], round_index: int, k: int, path: Path
    ) -> None:
        """k samples per prompt from the current policy, saved so that a resume reuses them."""
        if path.is_file():
            return
        a = self.config.adapt_config(round_index)
        chosen = (
            prompts[: self.config.max_meta_prompts] if self.config.max_meta_prompts else prompts
        )
        responses = policy.sample(
            chosen,
            k,
            max_new_tokens=a.max_new_tokens,
            temperature=a.temperature,
            top_p=a.top_p,
            seed=a.seed + 7919 * round_index,
            batch_size=a.sample_batch_size,
        )
        rows = [{"prompt": p, "responses": r} for p, r in zip(chosen, responses, strict=True)]
        write_json_atomic(path, rows)

    # ------------------------------------------------------------------ run
    def train(self) -> MetaRMRoundsResult:
        cfg = self.config
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        first = cfg.adapt_config(1)
        # the Adapter's held-out prompts (the same split every round: same config and seed)
        # stay out of the meta set too, so that nothing is fitted on them
        read = self._domain_prompts(first)[: first.max_prompts]
        heldout = set(holdout_split(len(read), first.eval_holdout, first.seed))
        prompts = [p for i, p in enumerate(read) if i not in heldout]
        source_pairs = self._load_source_pairs(first)
        reward_model = resolve_pretrained(first.reward_model, first.artifacts_dir)
        policy = None
        policy_dir: Path | None = None
        records: list[dict[str, Any]] = []
        adapt_result = metarm_result = None
        for r in range(1, cfg.rounds + 1):
            round_dir = cfg.round_dir(r)
            round_dir.mkdir(parents=True, exist_ok=True)
            done = round_dir / "round.json"
            if done.is_file():  # complete before a restart: take its outputs and move on
                record = json.loads(done.read_text())
                records.append(record)
                reward_model, policy_dir, policy = (
                    record["reward_model_dir"],
                    Path(record["policy_dir"]),
                    None,
                )
                continue
            if policy is None:
                policy = self._load_policy(cfg.adapt_config(r), policy_dir)

            samples_path = round_dir / "meta_samples.json"
            metarm_config = cfg.metarm_config(r, str(reward_model), str(samples_path))
            k = metarm_config.responses_per_prompt
            self._sample_meta_set(policy, prompts, r, k, samples_path)
            samples = json.loads(samples_path.read_text())
            metarm_result = MetaRMTrainer(
                metarm_config,
                _PhaseCallback(self.callback, r, cfg.rounds, "metarm"),
                pairs=source_pairs,
                samples=samples,
            ).train()
            reward_model = str(metarm_result.model_dir)

            adapter = Adapter(
                cfg.adapt_config(r, reward_model=reward_model),
                _PhaseCallback(self.callback, r, cfg.rounds, "adapt"),
                prompts=self._prompts,
                pairs=self._pairs,
                gold_fn=self.gold_fn,
                policy=policy,
            )
            adapt_result = adapter.train()
            policy_dir = Path(adapt_result.policy_dir)
            record = {
                "round": r,
                "reward_model_dir": reward_model,
                "policy_dir": str(policy_dir),
                "metarm": metarm_result.metrics,
                "adapt": adapt_result.metrics,
            }
            write_json_atomic(done, record)
            records.append(record)

        last = records[-1]
        metrics: dict[str, Any] = {"rounds": cfg.rounds, "by_round": records}
        for key in ("shifted_diff_mean", "shifted_diff_var", "source_accuracy"):
            for when in ("before", "after"):
                if f"{key}_{when}" in last["metarm"]:
                    metrics[f"rm_{key}_{when}"] = last["metarm"][f"{key}_{when}"]
        for key in ("reward_after", "gold_after", "pl_accuracy_after", "pl_margin_improved",
                    "kl_to_reference"):
            if key in last["adapt"]:
                metrics[f"policy_{key}"] = last["adapt"][key]
        # Per round, on that round's policy samples: the incoming RM, then the updated one.
        for when in ("before", "after"):
            metrics[f"rm_shifted_diff_var_{when}_by_round"] = [
                rec["metarm"].get(f"shifted_diff_var_{when}") for rec in records
            ]
        write_json_atomic(out / "metrics.json", metrics)

        domain = first.domain
        rm_metadata = {
            "kind": "reward_model",
            "algorithm": "metarm",
            "base_model": first.reward_model,
            "domain": domain,
            "rounds": cfg.rounds,
            "metrics": dict(last["metarm"]),
            "metrics_by_round": [rec["metarm"] for rec in records],
            "config": dict(cfg.metarm),
        }
        policy_metadata = dict(adapt_result.metadata) if adapt_result is not None else {}
        policy_metadata.update(
            {"algorithm": "ood-pl-adapt+metarm", "reward_model": last["reward_model_dir"]}
        )
        return MetaRMRoundsResult(
            output_dir=out,
            reward_model_dir=Path(last["reward_model_dir"]),
            policy_dir=Path(last["policy_dir"]),
            metrics=metrics,
            reward_model_metadata=rm_metadata,
            policy_metadata=policy_metadata,
        )
