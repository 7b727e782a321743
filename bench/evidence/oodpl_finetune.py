"""OOD-PL on the fine-tune track: the full MiniLM RM meta-trained by ``MetaTrainer.train`` (the
repo's trainer, as ``python -m training meta-train`` runs it), as the paper trains its RM.

Rows ``ft_oodpl_meta`` (meta term + the BT term at the weight picked on source val for the
fast-track rows, ``oodpl.picked_bt_weight``) and ``ft_oodpl_meta_only`` (the paper's objective
alone, no BT term), each against ``ft_oodpl_bt``: the same trainer, steps, batches and BT weight
with every coefficient 0, so the meta-gradient is the only difference. MetaTrainer is not
RMTrainer (constant learning rate, no warmup, a gradient clip of 1, a random source domain per
step): ``ft_oodpl_bt`` against ``ft_bt`` shows what the trainer alone does. Common to all three:

- the same tasks as the fast-track rows (``oodpl.meta_tasks``: every source domain, its
  training pairs and the candidates of ``oodpl_prompts_per_domain`` prompts), α = 1e-3 and the
  precomputed hypergradient;
- the coefficient table is the fast-track rows' (``oodpl.coefficients``: ``MetaTrainer.precompute``
  at seed 0, cached), read by ``precompute`` instead of recomputed per seed (~200 s each): the
  same tasks, policy and precompute settings give the same numbers;
- as many outer steps of 16 pairs as ``ft_bt``'s one epoch over its (capped) source pairs takes,
  at its learning rate and input length: equal pair visits, drawn from the tasks' pairs;
- the trained RM is loaded with ``RewardModel.from_pretrained`` (serving's loader) and scores
  the eval candidates once (``finetune.scored_once``; cached, the model deleted).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from bench.evidence.finetune import FINETUNE_SEEDS, TRAINER_OPTIONS, scored_once, source_pairs
from bench.evidence.methods import Fitted, Method, TaskContext, register
from bench.evidence.oodpl import coefficients, meta_config, meta_tasks, picked_bt_weight
from training.oodpl.config import MetaTrainConfig
from training.oodpl.meta_train import MetaTask, MetaTrainer
from training.reward_model import RewardModel

OUTER_BATCH_PAIRS = TRAINER_OPTIONS["batch_size"]


class TabledMetaTrainer(MetaTrainer):
    """``MetaTrainer`` whose ``precompute`` reads a coefficient table computed before."""

    def __init__(self, config: MetaTrainConfig, tasks: list[MetaTask], table: dict[str, list[list[Any]]]):
        super().__init__(config, tasks=tasks)
        self._table = table

    def precompute(self) -> None:
        self._coefficients = {name: {(p, r): d for p, r, d in rows} for name, rows in self._table.items()}


def finetune_meta(ctx: TaskContext, seed: int, *, bt_weight: float, meta: bool = True) -> Fitted:
    """``meta`` False: every coefficient 0 (the meta-gradient is exactly 0), BT alone."""
    table = coefficients(ctx)["table"]
    if not meta:
        table = {name: [[p, r, 0.0] for p, r, _ in rows] for name, rows in table.items()}
    tasks = [t for t in meta_tasks(ctx) if t.name in table]
    steps = max(1, math.ceil(TRAINER_OPTIONS["epochs"] * len(source_pairs(ctx)) / OUTER_BATCH_PAIRS))
    base = meta_config(ctx, seed).to_dict()

    def train_and_score(work: Path, items: list[tuple[str, str]]) -> dict[str, Any]:
        config = MetaTrainConfig.from_dict({
            **base, "output_dir": str(work / "run"), "outer_steps": steps, "outer_batch_pairs": OUTER_BATCH_PAIRS,
            "outer_lr": TRAINER_OPTIONS["learning_rate"], "rm_max_tokens": TRAINER_OPTIONS["max_length"],
            "bt_weight": bt_weight, "checkpoint_every": 0, "hypergradient_checks": 0, "eval_pairs": 4})
        result = TabledMetaTrainer(config, tasks, table).train()
        rm = RewardModel.from_pretrained(result.rm_dir, device="cpu", max_input_tokens=config.rm_max_tokens)
        with torch.inference_mode():
            values = rm.score([{"prompt": p, "response": r} for p, r in items], batch_size=64)
        return {"rewards": values, "train_seconds": result.metrics.get("wall_time_s"), "outer_steps": steps,
                "bt_weight": bt_weight, "inner_lr": config.inner_lr}

    key = [ctx.settings.encoder, TRAINER_OPTIONS, base, bt_weight, steps,
           [(t.name, sorted(table[t.name], key=str)) for t in tasks]]
    label = f"{ctx.task}-oodpl-bt{bt_weight:g}" + ("" if meta else "-nometa")
    return scored_once(ctx, "finetune", label, key, seed, [], train_and_score,
                       ("train_seconds", "outer_steps", "bt_weight", "inner_lr"))


register(Method("ft_oodpl_bt", "—", "BT alone through MetaTrainer (every coefficient 0): the meta rows' "
                "baseline; against ft_bt, what the trainer does",
                lambda ctx, seed: finetune_meta(ctx, seed, bt_weight=picked_bt_weight(ctx), meta=False),
                baseline="ft_bt", role="baseline", seeds=FINETUNE_SEEDS, default=False))
register(Method("ft_oodpl_meta", "OOD-PL", "the full RM meta-trained (+ BT term at the source-val weight) "
                "beats the same trainer without the meta-gradient (fine-tune track)",
                lambda ctx, seed: finetune_meta(ctx, seed, bt_weight=picked_bt_weight(ctx)),
                baseline="ft_oodpl_bt", seeds=FINETUNE_SEEDS, default=False))
register(Method("ft_oodpl_meta_only", "OOD-PL", "the full RM meta-trained on the paper's objective alone "
                "(no BT term) beats the same trainer with BT instead (fine-tune track)",
                lambda ctx, seed: finetune_meta(ctx, seed, bt_weight=0.0),
                baseline="ft_oodpl_bt", seeds=FINETUNE_SEEDS, default=False))

FINETUNE_OODPL_ROWS = ("ft_oodpl_bt", "ft_oodpl_meta", "ft_oodpl_meta_only")
