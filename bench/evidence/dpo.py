"""OOD-PL's DPO baseline on the evidence benchmark: DPO's implicit reward as an RM.

DPO (``training.oodpl.dpo.DPOTrainer``, the repo's own trainer: SmolLM2-135M + LoRA, bf16
autocast where the CPU has bf16 units) trains the policy on pooled source pairs; its implicit
reward of a response is r(x, y) = β·(log π_θ(y|x) − log π_ref(y|x)) (Rafailov et al. 2023,
log-probabilities summed over response tokens), π_ref the same policy with the adapter
disabled (``Policy.logprobs_chunked(reference=True)``). That reward ranks each held-out
prompt's cached candidates like any other row, so M1 (β of the softmax matched by bisection,
so DPO's β does not matter) and M2 compare it with BT on the same prompts.

Cost is the policy's, not a head's: a DPO step is a forward and backward of 2 × 8 sequences
through SmolLM2, and scoring needs two policy passes (θ and ref) over every eval candidate
and source validation response. One epoch over the fine-tune track's 1,500 source pairs took
over 20 min per seed on a shared core, so the row trains on a fixed seeded sample of
``PAIRS_MAX`` of them (the same for every seed; one epoch, 64 steps of 8 pairs), is opt-in
(``--dpo``), and caches each seed's scores on disk (the adapter is deleted). It runs
``DPO_SEEDS`` = 1 seed: one seed of 512 pairs still took over 12 min beside the fine-tune track
on this 2-core machine, so its interval resamples prompts (within domains) but not seeds, and
its contrast pairs it with BT's seed 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bench.evidence.finetune import capped, scored_once, source_pairs
from bench.evidence.methods import Fitted, Method, TaskContext, as_preference_pairs, register
from training.oodpl.config import DPOConfig
from training.oodpl.dpo import DPOTrainer

DPO_NAME = "dpo"
PAIRS_MAX = 512
DPO_SEEDS = 1
TRAINER_OPTIONS = {"beta": 0.1, "batch_pairs": 8, "learning_rate": 5e-5, "lora_r": 8, "lora_alpha": 16,
                   "max_prompt_tokens": 64, "max_response_tokens": 64, "checkpoint_every": 0}


def fit_dpo(ctx: TaskContext, seed: int) -> Fitted:
    pairs = capped(source_pairs(ctx), PAIRS_MAX)
    options = {**TRAINER_OPTIONS, "steps": max(1, math.ceil(len(pairs) / TRAINER_OPTIONS["batch_pairs"]))}

    def train_and_score(work: Path, items: list[tuple[str, str]]) -> dict[str, Any]:
        config = DPOConfig.from_dict({"policy": ctx.settings.oodpl_policy, "seed": seed, "output_dir": str(work),
                                      "artifacts_dir": ctx.settings.artifacts_dir, **options})
        trainer = DPOTrainer(config, pairs=as_preference_pairs(pairs))
        result = trainer.train()
        policy = trainer.policy
        prompts, responses = [p for p, _ in items], [r for _, r in items]
        with torch.inference_mode():
            trained = policy.logprobs_chunked(prompts, responses, batch_size=32)
            reference = policy.logprobs_chunked(prompts, responses, batch_size=32, reference=True)
        return {"rewards": (config.beta * (trained - reference)).tolist(),
                "train_seconds": result.metrics.get("wall_time_s"), "steps": config.steps,
                "final_reward_accuracy": result.metrics.get("final_reward_accuracy")}

    return scored_once(ctx, "dpo", ctx.task, [ctx.settings.oodpl_policy, options], seed, pairs, train_and_score,
                       ("train_seconds", "steps", "final_reward_accuracy"))


register(Method(DPO_NAME, "OOD-PL (Jia)", "DPO on the pooled source pairs, its implicit reward "
                "β·log π_θ/π_ref as the RM (OOD-PL's baseline)", fit_dpo, seeds=DPO_SEEDS, default=False))
