"""OOD-PL meta-test (``POST /adapt``): adapt a policy to a new domain from its prompts alone.

With the reward model r_φ frozen: draw k responses per prompt from the reference policy
(the domain's sampling distribution p; or take the responses the domain ships), weight them
w = softmax over each prompt's responses of r_φ/β — the fit of π* ∝ p·exp(r_φ/β), the
optimum of KL(·‖p)-regularised reward maximisation — and maximise the weighted likelihood
(1/n) Σ_j w_j log π_θ(ỹ_j|x̃_j) for N optimizer steps (LoRA or full fine-tuning).

Reported: RM reward of fresh samples before and after (same prompts, same sampling seed),
a Monte-Carlo KL(π_θ‖π_ref) on the after-samples, PL accuracy (share of the domain's pairs
with log π(y_w|x) > log π(y_l|x)) before and after when pairs are given, and the gold reward
of the fresh samples when the caller passes a ``gold_fn``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.atomic import replace_dir, write_json_atomic
from training.callbacks import NullCallback, TrainerCallback, TrainingCancelled
from training.checkpoint import FINAL_MODEL_DIR, load_latest, restore_checkpoint, save_checkpoint
from training.config import ConfigError
from training.data import load_benchmark, load_pairs, load_samples
from training.models import resolve_pretrained
from training.oodpl.config import AdaptConfig
from training.oodpl.objective import group_softmax, weighted_log_likelihood
from training.policy import Policy, kl_estimate, lora_from_fields
from training.precision import cast_frozen_linears, mixed_precision
from training.reward_model import RewardModel

log = logging.getLogger(__name__)

GoldFn = Callable[[Any, str], float]  # (the prompt's sample/row or prompt text, response) -> gold


@dataclass
class PromptRow:
    """A training prompt and, optionally, responses given with it (draws from p)."""

    prompt: str
    responses: list[str] = field(default_factory=list)
    source: Any = None  # the original row (handed to gold_fn)


@dataclass
class AdaptResult:
    output_dir: str
    policy_dir: str  # the adapted policy, loadable with Policy.from_pretrained
    metrics: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)  # for the registry (generalrm.json)


def _as_rows(items: Sequence[Any]) -> list[PromptRow]:
    rows = []
    for item in items:
        if isinstance(item, str):
            rows.append(PromptRow(item, source=item))
        elif isinstance(item, dict):
            rows.append(PromptRow(item["prompt"], list(item.get("responses") or []), item))
        else:
            rows.append(PromptRow(item.prompt, list(getattr(item, "responses", None) or []), item))
    return rows


def pl_accuracy(policy: Policy, pairs: Sequence[Any], batch_size: int = 16) -> float | None:
    """Share of pairs with log π(y_w|x) > log π(y_l|x); None without pairs."""
    if not pairs:
        return None
    prompts = [p.prompt for p in pairs]
    chosen = policy.logprobs_chunked(prompts, [p.chosen for p in pairs], batch_size=batch_size)
    rejected = policy.logprobs_chunked(prompts, [p.rejected for p in pairs], batch_size=batch_size)
    return float((chosen > rejected).float().mean())


@torch.no_grad()
def score_rm(rm: RewardModel, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    return rm.score([{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)])


class Adapter:
    """Weighted-likelihood adaptation of a policy to a new domain with a frozen RM."""

    def __init__(
        self,
        config: AdaptConfig,
        callback: TrainerCallback | None = None,
        *,
        prompts: Sequence[Any] | None = None,
        pairs: Sequence[Any] | None = None,
        gold_fn: GoldFn | None = None,
        reward_model: RewardModel | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.callback = callback or NullCallback()
        self._prompts = prompts
        self._pairs = pairs
        self.gold_fn = gold_fn
        self.rm = reward_model
        self.policy = policy
        self.reference: Policy | None = None  # only for full fine-tuning (LoRA disables itself)

    # ------------------------------------------------------------------ setup
    def _load_data(self) -> tuple[list[PromptRow], list[Any]]:
        c = self.config
        pairs: list[Any] = list(self._pairs or [])
        if self._prompts is not None:
            rows = _as_rows(self._prompts)
        elif c.prompts is not None:
            rows = _as_rows(c.prompts)
        elif c.prompts_file is not None:
            rows = _as_rows(load_samples(c.prompts_file))
        elif c.task is not None:
            bench = load_benchmark(c.task, root=c.bench_root)
            rows = _as_rows(bench.samples(c.domain, c.split))
            if not pairs:
                pairs = list(bench.pairs(c.domain, "test"))
        else:
            raise ConfigError("no prompts: set prompts, prompts_file or task, or pass prompts=")
        if c.pairs_file is not None and not pairs:
            pairs = list(load_pairs(c.pairs_file))
        if c.max_prompts is not None:
            rows = rows[: c.max_prompts]
        if not rows:
            raise ConfigError("no prompts to adapt on")
        if c.use_given_responses and any(len(r.responses) < 2 for r in rows):
            raise ConfigError("use_given_responses: every prompt needs >= 2 responses")
        return rows, pairs[: c.eval_pairs] if c.eval_pairs else []

    def setup(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.rows, self.pairs = self._load_data()
        if self.rm is None:
            self.rm = RewardModel.from_pretrained(
                resolve_pretrained(c.reward_model, c.artifacts_dir), device=c.device,
                dtype=c.dtype, max_input_tokens=c.rm_max_tokens, name=c.reward_model, seed=c.seed,
            )
        self.rm.model.eval().requires_grad_(False)
        lora = lora_from_fields(c.lora_r, c.lora_alpha, c.lora_targets)
        common = dict(
            device=c.device, dtype=c.dtype, max_prompt_tokens=c.max_prompt_tokens,
            max_response_tokens=c.max_response_tokens, artifacts_dir=c.artifacts_dir, seed=c.seed,
            chat_template=c.chat_template,
        )
        if self.policy is None:
            self.policy = Policy.from_pretrained(c.policy, lora=lora, **common)
        if not self.policy.is_lora:
            self.reference = Policy.from_pretrained(c.policy, trainable=False, **common)
        for policy in (self.policy, self.reference):
            if policy is not None:
                policy.autocast_dtype = mixed_precision(policy.device, c.bf16, policy.dtype)
                if not c.merge:  # a merge must add the adapter to the fp32 base weights
                    cast_frozen_linears(policy.model, policy.autocast_dtype)
        self.rm.autocast_dtype = mixed_precision(self.rm.device, c.bf16, self.rm.precision.weights)
        cast_frozen_linears(self.rm.model, self.rm.autocast_dtype)
        params = list(self.policy.trainable_parameters().values())
        if c.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=c.learning_rate)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=0.0)

    # ------------------------------------------------------------------ pieces
    def _sample_reference(self, prompts: Sequence[str], k: int, seed: int) -> list[list[str]]:
        c = self.config
        sampler = self.reference or self.policy
        kwargs = dict(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                      seed=seed, batch_size=c.sample_batch_size)
        if self.reference is None and self.policy.is_lora:
            with self.policy.reference_mode():
                return sampler.sample(prompts, k, **kwargs)
        return sampler.sample(prompts, k, **kwargs)

    def build_training_set(self) -> dict[str, Any]:
        """Draws from p for every prompt and their weights under the frozen RM."""
        c = self.config
        if c.use_given_responses:
            rng = random.Random(c.seed)
            draws = [r.responses if len(r.responses) <= c.responses_per_prompt
                     else rng.sample(r.responses, c.responses_per_prompt) for r in self.rows]
        else:
            draws = self._sample_reference([r.prompt for r in self.rows], c.responses_per_prompt, c.seed)
        groups = [len(d) for d in draws]
        prompts = [r.prompt for r, d in zip(self.rows, draws, strict=True) for _ in d]
        responses = [y for d in draws for y in d]
        rewards = torch.tensor(score_rm(self.rm, prompts, responses), dtype=torch.float64)
        weights = group_softmax(rewards, groups, c.beta)
        return {"prompts": prompts, "responses": responses, "groups": groups,
                "weights": weights.tolist(), "rewards": rewards.tolist()}

    def evaluate(self, *, adapted: bool) -> dict[str, Any]:
        """RM (and gold) reward of fresh samples, KL to the reference, PL accuracy."""
        c = self.config
        eval_rows = self.rows[: c.eval_prompts]
        out: dict[str, Any] = {}
        if eval_rows:
            prompts = [r.prompt for r in eval_rows]
            seed = c.seed + 104729  # fresh: not the training draws, the same before and after
            if adapted:
                samples = self.policy.sample(
                    prompts, c.eval_responses_per_prompt, max_new_tokens=c.max_new_tokens,
                    temperature=c.temperature, top_p=c.top_p, seed=seed,
                    batch_size=c.sample_batch_size)
            else:
                samples = self._sample_reference(prompts, c.eval_responses_per_prompt, seed)
            flat_rows = [r for r, s in zip(eval_rows, samples, strict=True) for _ in s]
            flat_prompts = [r.prompt for r in flat_rows]
            flat = [y for s in samples for y in s]
            rewards = score_rm(self.rm, flat_prompts, flat)
            out["reward"] = sum(rewards) / len(rewards)
            if self.gold_fn is not None:
                golds = [self.gold_fn(r.source, y) for r, y in zip(flat_rows, flat, strict=True)]
                out["gold"] = sum(golds) / len(golds)
            if adapted:
                out["kl_to_reference"] = kl_estimate(self.policy, flat_prompts, flat, self.reference)
            out["samples"] = [{"prompt": p, "response": y} for p, y in zip(flat_prompts, flat, strict=True)][:8]
        accuracy = pl_accuracy(self.policy if adapted else (self.reference or self.policy), self.pairs)
        if accuracy is not None:
            out["pl_accuracy"] = accuracy
        return out

    def _evaluate_reference(self) -> dict[str, Any]:
        if self.reference is None and self.policy.is_lora:
            with self.policy.reference_mode():
                return self.evaluate(adapted=False)
        return self.evaluate(adapted=False)

    # ------------------------------------------------------------------ run
    def _checkpoint(self, step: int, extra: dict[str, Any]) -> Path:
        c = self.config
        return save_checkpoint(
            c.output_dir, step=step, model={"policy": self.policy.model}, optimizer=self.optimizer,
            config=c, extra=extra, keep=c.keep_checkpoints,
        )

    def train(self) -> AdaptResult:
        c = self.config
        started = time.monotonic()
        self.setup()
        latest = load_latest(c.output_dir)
        if latest is not None:
            state = restore_checkpoint(latest, model={"policy": self.policy.model}, optimizer=self.optimizer)
            start, extra = int(state["step"]), state["extra"]
            data, before = extra["data"], extra["before"]
            log.info("resumed adaptation from %s (step %d)", latest, start)
        else:
            start = 0
            before = self._evaluate_reference() if c.eval_before else {}
            data = self.build_training_set()
        extra = {"data": data, "before": before}
        weights = torch.tensor(data["weights"], dtype=self.policy.dtype, device=self.policy.device)
        offsets = [0]
        for size in data["groups"]:
            offsets.append(offsets[-1] + size)
        order_rng = random.Random(c.seed + 1)
        order: list[int] = []
        losses = []
        for _ in range(start * c.batch_prompts):  # replay the prompt order up to the resume point
            if not order:
                order = order_rng.sample(range(len(data["groups"])), len(data["groups"]))
            order.pop()
        params = list(self.policy.trainable_parameters().values())
        self.policy.model.eval()  # no dropout: the objective is the same function every step
        for step in range(start + 1, c.steps + 1):
            if self.callback.should_stop():
                checkpoint = self._checkpoint(step - 1, extra)
                raise TrainingCancelled(step - 1, str(checkpoint))
            picked = []
            for _ in range(min(c.batch_prompts, len(data["groups"]))):
                if not order:
                    order = order_rng.sample(range(len(data["groups"])), len(data["groups"]))
                picked.append(order.pop())
            rows = [j for i in picked for j in range(offsets[i], offsets[i + 1])]
            logp = self.policy.sequence_logprobs(
                [data["prompts"][j] for j in rows], [data["responses"][j] for j in rows])
            loss = -weighted_log_likelihood(logp, weights[rows], len(picked))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            self.optimizer.step()
            losses.append(float(loss.detach()))
            self.callback.on_progress(step, c.steps, {"loss": losses[-1]})
            if c.checkpoint_every and step % c.checkpoint_every == 0 and step < c.steps:
                self._checkpoint(step, extra)
        after = self.evaluate(adapted=True)
        metrics: dict[str, Any] = {"domain": c.domain, "steps": c.steps,
                                   "num_prompts": len(data["groups"]),
                                   "final_loss": losses[-1] if losses else None}
        for key in ("reward", "gold", "pl_accuracy"):
            if key in before:
                metrics[f"{key}_before"] = before[key]
            if key in after:
                metrics[f"{key}_after"] = after[key]
        if "reward" in before and "reward" in after:
            metrics["reward_gain"] = after["reward"] - before["reward"]
        if "kl_to_reference" in after:
            metrics["kl_to_reference"] = after["kl_to_reference"]
        metrics["wall_time_s"] = time.monotonic() - started
        return self._save(metrics, data, before, after)

    def _save(self, metrics: dict[str, Any], data: dict, before: dict, after: dict) -> AdaptResult:
        c = self.config
        out = Path(c.output_dir)
        metadata = {
            "kind": "policy",
            "algorithm": "ood-pl-adapt",
            "base_model": c.policy,
            "reward_model": c.reward_model,
            "domain": c.domain,
            "metrics": metrics,
            "config": {k: v for k, v in c.to_dict().items() if k != "prompts"},
        }
        policy_dir = replace_dir(out / FINAL_MODEL_DIR, lambda directory: self.policy.save_pretrained(
            directory, merge=c.merge, metadata=metadata))
        write_json_atomic(out / "metrics.json", {"metrics": metrics,
                                                 "samples_before": before.get("samples", []),
                                                 "samples_after": after.get("samples", [])})
        self._checkpoint(c.steps, {"data": data, "before": before})  # a re-run just re-saves
        return AdaptResult(str(out), str(policy_dir), metrics, metadata)
