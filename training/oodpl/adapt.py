"""OOD-PL meta-test (``POST /adapt``): adapt a policy to a new domain from its prompts alone.

With the reward model r_φ frozen: draw k responses per prompt from the reference policy
(the domain's sampling distribution p; or take the responses the domain ships), weight them
w = softmax over each prompt's responses of r_φ/β — the fit of π* ∝ p·exp(r_φ/β), the
optimum of KL(·‖p)-regularised reward maximisation — and maximise the weighted likelihood
(1/n) Σ_j w_j log π_θ(ỹ_j|x̃_j) for N optimizer steps (LoRA or full fine-tuning). The
draws are trained on as the token ids they were sampled as (:class:`training.policy.Sample`);
the RM scores their decoded text, as serving does.

A seeded share of the domain's prompts (``eval_holdout``) is held out of training. Reported
on those held-out prompts: RM reward of fresh samples before and after (same sampling seed),
a Monte-Carlo KL(π_θ‖π_ref) on the after-samples, and the gold reward of the fresh samples
when the caller passes a ``gold_fn``; the same measured on the training prompts carries a
``train_`` prefix (in-sample). With the domain's pairs: PL accuracy (share of pairs with
A = log π(y_w|x) − log π(y_l|x) > 0) before and after, and ``pl_margin_improved``, the share
of pairs whose reference-normalized margin A(θ) − A(θ_ref) is > 0 (0 for every pair at
θ_ref; it does not saturate as σ(A) does and has no length bias).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
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
from training.policy import Policy, Response, Sample, kl_estimate, lora_from_fields
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


def holdout_split(count: int, share: float, seed: int) -> list[int]:
    """Sorted indices of the held-out prompts among ``count``: round(share·count) of them,
    at least one when ``share > 0`` and ``count >= 2``, and never all (something must be
    trained on); a seeded choice, the same for the same (count, share, seed)."""
    if share <= 0 or count < 2:
        return []
    size = min(count - 1, max(1, round(share * count)))
    return sorted(random.Random(f"eval_holdout:{seed}").sample(range(count), size))


def pl_margins(policy: Policy, pairs: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """A = log π(y_w|x) − log π(y_l|x) per pair."""
    prompts = [p.prompt for p in pairs]
    chosen = policy.logprobs_chunked(prompts, [p.chosen for p in pairs], batch_size=batch_size)
    rejected = policy.logprobs_chunked(prompts, [p.rejected for p in pairs], batch_size=batch_size)
    return chosen - rejected


def pl_accuracy(policy: Policy, pairs: Sequence[Any], batch_size: int = 16) -> float | None:
    """Share of pairs with log π(y_w|x) > log π(y_l|x); None without pairs."""
    if not pairs:
        return None
    return float((pl_margins(policy, pairs, batch_size) > 0).float().mean())


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
        self.heldout: list[int] = []  # indices into self.rows of the prompts not trained on

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
            rows = rows[: c.max_prompts]  # before the held-out split: it draws from these
        if not rows:
            raise ConfigError("no prompts to adapt on")
        if c.use_given_responses and any(len(r.responses) < 2 for r in rows):
            raise ConfigError("use_given_responses: every prompt needs >= 2 responses")
        return rows, pairs[: c.eval_pairs] if c.eval_pairs else []

    def setup(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        self.rows, self.pairs = self._load_data()
        self.heldout = holdout_split(len(self.rows), c.eval_holdout, c.seed)
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
    @property
    def train_rows(self) -> list[PromptRow]:
        held = set(self.heldout)
        return [r for i, r in enumerate(self.rows) if i not in held]

    @property
    def heldout_rows(self) -> list[PromptRow]:
        return [self.rows[i] for i in self.heldout]

    @contextlib.contextmanager
    def _reference(self) -> Iterator[Policy]:
        """π_ref: the separate reference (full fine-tuning) or the policy with its LoRA
        adapter disabled."""
        if self.reference is None and self.policy.is_lora:
            with self.policy.reference_mode():
                yield self.policy
        else:
            yield self.reference or self.policy

    def _sample(self, policy: Policy, prompts: Sequence[str], k: int, seed: int) -> list[list[Sample]]:
        c = self.config
        return policy.sample_responses(prompts, k, max_new_tokens=c.max_new_tokens,
                                       temperature=c.temperature, top_p=c.top_p, seed=seed,
                                       batch_size=c.sample_batch_size)

    def build_training_set(self) -> dict[str, Any]:
        """Draws from p for every training prompt and their weights under the frozen RM.

        Sampled draws keep their token ids (``response_ids``, ``finished``): training
        raises the likelihood of what was sampled; the RM scores the decoded text."""
        c = self.config
        rows = self.train_rows
        data: dict[str, Any] = {"heldout": list(self.heldout)}
        if c.use_given_responses:  # text from the caller: nothing was sampled, text is all there is
            rng = random.Random(c.seed)
            draws = [r.responses if len(r.responses) <= c.responses_per_prompt
                     else rng.sample(r.responses, c.responses_per_prompt) for r in rows]
            responses = [y for d in draws for y in d]
        else:
            with self._reference() as reference:
                draws = self._sample(reference, [r.prompt for r in rows], c.responses_per_prompt, c.seed)
            samples = [y for d in draws for y in d]
            responses = [y.text for y in samples]
            data["response_ids"] = [list(y.token_ids) for y in samples]
            data["finished"] = [y.finished for y in samples]
        groups = [len(d) for d in draws]
        prompts = [r.prompt for r, d in zip(rows, draws, strict=True) for _ in d]
        rewards = torch.tensor(score_rm(self.rm, prompts, responses), dtype=torch.float64)
        weights = group_softmax(rewards, groups, c.beta)
        return {**data, "prompts": prompts, "responses": responses, "groups": groups,
                "weights": weights.tolist(), "rewards": rewards.tolist()}

    def evaluate(self, *, adapted: bool) -> dict[str, Any]:
        """On fresh samples of the held-out prompts (``reward``, ``gold``, ``kl_to_reference``)
        and of the training prompts (the same with a ``train_`` prefix): RM (and gold)
        reward, and for the adapted policy the KL to the reference; with pairs, PL accuracy
        and, for the adapted policy, ``pl_margin_improved``. ``adapted=False`` measures π_ref."""
        if not adapted:
            with self._reference() as reference:
                return self._evaluate(reference, adapted=False)
        out = self._evaluate(self.policy, adapted=True)
        if self.pairs:
            margins = pl_margins(self.policy, self.pairs)
            with self._reference() as reference:
                reference_margins = pl_margins(reference, self.pairs)
            out["pl_margin_improved"] = float((margins - reference_margins > 0).float().mean())
        return out

    def _evaluate(self, policy: Policy, *, adapted: bool) -> dict[str, Any]:
        c = self.config
        out: dict[str, Any] = {}
        for prefix, rows in (("", self.heldout_rows), ("train_", self.train_rows)):
            out.update(self._measure(policy, rows[: c.eval_prompts], prefix, adapted=adapted))
        accuracy = pl_accuracy(policy, self.pairs)
        if accuracy is not None:
            out["pl_accuracy"] = accuracy
        return out

    def _measure(self, policy: Policy, rows: list[PromptRow], prefix: str, *,
                 adapted: bool) -> dict[str, Any]:
        if not rows:
            return {}
        c = self.config
        seed = c.seed + 104729  # fresh: not the training draws, the same before and after
        groups = self._sample(policy, [r.prompt for r in rows], c.eval_responses_per_prompt, seed)
        flat_rows = [r for r, g in zip(rows, groups, strict=True) for _ in g]
        prompts = [r.prompt for r in flat_rows]
        samples = [y for g in groups for y in g]
        texts = [y.text for y in samples]
        rewards = score_rm(self.rm, prompts, texts)
        out: dict[str, Any] = {f"{prefix}reward": sum(rewards) / len(rewards)}
        if self.gold_fn is not None:
            golds = [self.gold_fn(r.source, y) for r, y in zip(flat_rows, texts, strict=True)]
            out[f"{prefix}gold"] = sum(golds) / len(golds)
        if adapted:
            out[f"{prefix}kl_to_reference"] = kl_estimate(policy, prompts, samples, self.reference)
        out[f"{prefix}samples"] = [{"prompt": p, "response": y}
                                   for p, y in zip(prompts, texts, strict=True)][:8]
        return out

    # ------------------------------------------------------------------ run
    def _checkpoint(self, step: int, extra: dict[str, Any]) -> Path:
        c = self.config
        return save_checkpoint(
            c.output_dir, step=step, model={"policy": self.policy.model}, optimizer=self.optimizer,
            config=c, extra=extra, keep=c.keep_checkpoints,
        )

    def _resumed(self, data: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
        """Adopt a checkpoint's split; a checkpoint from before held-out prompts existed
        trained on every prompt, so its numbers are in-sample: nothing is held out and its
        ``before`` measurements become the ``train_`` ones."""
        if "heldout" in data:
            self.heldout = list(data["heldout"])
            return before
        log.warning("checkpoint without a held-out split: every prompt was trained on, "
                    "only in-sample (train_*) numbers are reported")
        self.heldout = data["heldout"] = []  # the checkpoint re-saved says so from now on
        moved = ("reward", "gold", "samples")
        return {(f"train_{k}" if k in moved else k): v for k, v in before.items()}

    def train(self) -> AdaptResult:
        c = self.config
        started = time.monotonic()
        self.setup()
        latest = load_latest(c.output_dir)
        if latest is not None:
            state = restore_checkpoint(latest, model={"policy": self.policy.model}, optimizer=self.optimizer)
            start, extra = int(state["step"]), state["extra"]
            data = extra["data"]
            before = self._resumed(data, extra["before"])
            log.info("resumed adaptation from %s (step %d)", latest, start)
        else:
            start = 0
            before = self.evaluate(adapted=False) if c.eval_before else {}
            data = self.build_training_set()
        extra = {"data": data, "before": before}
        responses = training_responses(data)
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
                [data["prompts"][j] for j in rows], [responses[j] for j in rows])
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
                                   "num_prompts": len(self.rows),
                                   "train_prompts": len(data["groups"]),
                                   "heldout_prompts": len(self.heldout),
                                   "final_loss": losses[-1] if losses else None}
        for key in ("reward", "gold", "train_reward", "train_gold", "pl_accuracy"):
            if key in before:
                metrics[f"{key}_before"] = before[key]
            if key in after:
                metrics[f"{key}_after"] = after[key]
        for prefix in ("", "train_"):
            if f"{prefix}reward" in before and f"{prefix}reward" in after:
                metrics[f"{prefix}reward_gain"] = after[f"{prefix}reward"] - before[f"{prefix}reward"]
            if f"{prefix}kl_to_reference" in after:
                metrics[f"{prefix}kl_to_reference"] = after[f"{prefix}kl_to_reference"]
        if "pl_margin_improved" in after:
            metrics["pl_margin_improved"] = after["pl_margin_improved"]
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
        write_json_atomic(out / "metrics.json", {
            "metrics": metrics,
            **{f"{prefix}samples_{when}": measured.get(f"{prefix}samples", [])
               for prefix in ("", "train_") for when, measured in (("before", before), ("after", after))},
        })
        self._checkpoint(c.steps, {"data": data, "before": before})  # a re-run just re-saves
        return AdaptResult(str(out), str(policy_dir), metrics, metadata)


def training_responses(data: dict[str, Any]) -> list[Response]:
    """The draws as the policy is trained on them: the sampled ids when the data hold them;
    text (re-tokenized) for given responses and for checkpoints written before ids were kept."""
    if "response_ids" not in data:
        return list(data["responses"])
    return [Sample(text, tuple(ids), finished) for text, ids, finished
            in zip(data["responses"], data["response_ids"], data["finished"], strict=True)]
