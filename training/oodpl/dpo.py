"""Direct Preference Optimization (Rafailov et al. 2023) on pooled pairs: the baseline.

L = −E log σ(β·[(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))]),
log-probabilities summed over response tokens. π_ref is the initial policy; its
log-probabilities are computed once, before the first update, for exactly the pairs the
schedule will visit (so no second model is held in memory, LoRA or full).

Over several processes (``processes``: a :class:`~training.distributed.Processes` that
``accelerate launch`` started, see ``training.launch``) each rank takes its share of every
step's pairs and scales its mean loss by that share, so the gradient DDP averages (over the
LoRA adapter, or every weight) is the gradient of the whole batch: ``batch_pairs`` means the
same global batch whatever the number of processes. The reference log-probabilities are
computed once with each rank taking its share of the pairs, then shared. Rank 0 alone reads
the callback (every rank stops at the same step), writes checkpoints and saves the policy;
every rank resumes from the checkpoint rank 0 picked. The policy is replicated (``ddp``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training.atomic import replace_dir, write_json_atomic
from training.callbacks import NullCallback, TrainerCallback, TrainingCancelled
from training.checkpoint import (
    FINAL_MODEL_DIR,
    checkpoint_path,
    load_latest,
    restore_checkpoint,
    save_checkpoint,
)
from training.config import ConfigError
from training.data import load_benchmark, load_pairs
from training.distributed import Processes
from training.oodpl.config import DPOConfig, replicated_only
from training.oodpl.results import DPOResult
from training.policy import Policy, lora_from_fields
from training.precision import cast_frozen_linears, mixed_precision


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean DPO loss and the implicit reward margins β·(Δ_θ − Δ_ref), per pair."""
    margins = beta * ((policy_chosen - reference_chosen) - (policy_rejected - reference_rejected))
    return -F.logsigmoid(margins).mean(), margins.detach()


class DPOTrainer:
    def __init__(
        self,
        config: DPOConfig,
        callback: TrainerCallback | None = None,
        *,
        pairs: Sequence[Any] | None = None,
        policy: Policy | None = None,
        processes: Processes | None = None,
    ) -> None:
        self.config = config
        self.callback = callback or NullCallback()
        self._pairs = list(pairs) if pairs is not None else None
        self.policy = policy
        self.processes = processes or Processes.single()
        if self.processes.distributed and self.processes.strategy != "ddp":
            raise ConfigError(replicated_only("DPO"))

    def _load_pairs(self) -> list[Any]:
        c = self.config
        if self._pairs is not None:
            return self._pairs
        if c.pairs_file is not None:
            pairs = load_pairs(c.pairs_file)
            return [p for p in pairs if c.domains is None or p.domain in c.domains]
        if c.task is not None:
            bench = load_benchmark(c.task, root=c.bench_root)
            return [p for d in (c.domains or bench.source_domains) for p in bench.pairs(d, c.split)]
        raise ConfigError("no pairs: set pairs_file or task, or pass pairs=")

    def _schedule(self, n: int) -> list[list[int]]:
        """Pair indices of every step: shuffled epochs, fixed by the seed (resume-safe)."""
        rng = random.Random(self.config.seed)
        order: list[int] = []
        steps = []
        for _ in range(self.config.steps):
            batch = []
            for _ in range(min(self.config.batch_pairs, n)):
                if not order:
                    order = rng.sample(range(n), n)
                batch.append(order.pop())
            steps.append(batch)
        return steps

    def _reference(self, policy: Policy, pairs: Sequence[Any],
                   schedule: list[list[int]]) -> dict[int, tuple[float, float]]:
        """(log π_ref(y_w|x), log π_ref(y_l|x)) of every pair the schedule visits, each rank
        scoring its share."""
        procs = self.processes
        used = sorted({i for batch in schedule for i in batch})
        mine = procs.shard(used)
        prompts = [pairs[i].prompt for i in mine]
        chosen = policy.logprobs_chunked(prompts, [pairs[i].chosen for i in mine]).tolist()
        rejected = policy.logprobs_chunked(prompts, [pairs[i].rejected for i in mine]).tolist()
        both = procs.unshard(list(zip(chosen, rejected, strict=True)), len(used))
        return {i: (float(a), float(b)) for i, (a, b) in zip(used, both, strict=True)}

    def _checkpoint(self, step: int, optimizer: torch.optim.Optimizer,
                    reference: dict[int, tuple[float, float]], history: list[dict[str, Any]]) -> Path:
        """Rank 0 writes (the replicas are whole and equal on every rank)."""
        c = self.config
        if not self.processes.is_main:
            return checkpoint_path(c.output_dir, step)
        return save_checkpoint(c.output_dir, step=step, model={"policy": self.policy.model},
                               optimizer=optimizer, config=c,
                               extra={"reference": reference, "history": history},
                               keep=c.keep_checkpoints)

    def train(self) -> DPOResult:
        c = self.config
        procs = self.processes
        started = time.monotonic()
        torch.manual_seed(c.seed)
        pairs = self._load_pairs()
        if not pairs:
            raise ConfigError("no preference pairs to train on")
        if self.policy is None:
            self.policy = Policy.from_pretrained(
                c.policy, device=str(procs.device or c.device), dtype=c.dtype,
                lora=lora_from_fields(c.lora_r, c.lora_alpha, c.lora_targets),
                max_prompt_tokens=c.max_prompt_tokens, max_response_tokens=c.max_response_tokens,
                artifacts_dir=c.artifacts_dir, seed=c.seed, chat_template=c.chat_template,
            )
        policy = self.policy
        policy.autocast_dtype = mixed_precision(policy.device, c.bf16, policy.dtype)
        if not c.merge:  # a merge must add the adapter to the fp32 base weights
            cast_frozen_linears(policy.model, policy.autocast_dtype)
        params = list(policy.trainable_parameters().values())
        optimizer = (torch.optim.SGD(params, lr=c.learning_rate) if c.optimizer == "sgd"
                     else torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=0.0))
        schedule = self._schedule(len(pairs))
        history: list[dict[str, Any]] = []
        latest = procs.from_main(load_latest(c.output_dir) if procs.is_main else None)
        if latest is not None:
            state = restore_checkpoint(latest, model={"policy": policy.model}, optimizer=optimizer)
            start, reference, history = state["step"], state["extra"]["reference"], state["extra"]["history"]
        else:
            start = 0
            reference = self._reference(policy, pairs, schedule)
        policy.model.eval()
        module, optimizer = procs.prepare(policy.model, optimizer)
        for step in range(start + 1, c.steps + 1):
            if procs.main_decides(self.callback.should_stop()):
                checkpoint = self._checkpoint(step - 1, optimizer, reference, history)
                raise TrainingCancelled(step - 1, str(checkpoint))
            ids = schedule[step - 1]
            mine = procs.shard(ids)
            weight, share = procs.share_weight(len(mine), len(ids)), len(mine) / len(ids)
            if not mine:  # fewer pairs than ranks: a weightless pair keeps DDP's reduction whole
                mine, weight = ids[:1], 0.0
            batch = [pairs[i] for i in mine]
            n = len(batch)
            logp = policy.sequence_logprobs([p.prompt for p in batch] * 2,
                                            [p.chosen for p in batch] + [p.rejected for p in batch],
                                            module=module)
            ref = torch.tensor([reference[i] for i in mine], dtype=logp.dtype, device=logp.device)
            loss, margins = dpo_loss(logp[:n], logp[n:], ref[:, 0], ref[:, 1], c.beta)
            optimizer.zero_grad(set_to_none=True)
            procs.backward(loss * weight)
            if c.max_grad_norm > 0:
                procs.clip_grad_norm_(params, c.max_grad_norm)
            optimizer.step()
            # the whole batch's means: each rank's share of them, summed over ranks
            metrics = procs.sum({"loss": float(loss.detach()) * share,
                                 "reward_accuracy": float((margins > 0).float().mean()) * share,
                                 "reward_margin": float(margins.mean()) * share})
            history.append({"step": step, **metrics})
            self.callback.on_progress(step, c.steps, metrics)
            if c.checkpoint_every and step % c.checkpoint_every == 0 and step < c.steps:
                self._checkpoint(step, optimizer, reference, history)
        tail = history[-max(1, len(history) // 10):]
        metrics = {
            "steps": c.steps,
            "num_pairs": len(pairs),
            "final_loss": sum(h["loss"] for h in tail) / len(tail),
            "final_reward_accuracy": sum(h["reward_accuracy"] for h in tail) / len(tail),
            "wall_time_s": time.monotonic() - started,
        }
        out = Path(c.output_dir)
        policy_dir = out / FINAL_MODEL_DIR
        if procs.is_main:
            metadata = {"kind": "policy", "algorithm": "dpo", "base_model": c.policy,
                        "metrics": metrics, "config": c.to_dict()}
            replace_dir(policy_dir, lambda directory: policy.save_pretrained(
                directory, merge=c.merge, metadata=metadata))
            write_json_atomic(out / "metrics.json", {"metrics": metrics, "history": history})
        procs.barrier()
        return DPOResult(str(out), str(policy_dir), metrics, history)
