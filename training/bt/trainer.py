"""Bradley–Terry reward-model training with the Secrets of RLHF II options (DESIGN §7).

``RMTrainer(RMTrainConfig.from_dict({...}), callback=cb).train()`` trains an RM on a JSONL of
preference pairs and writes the final model (safetensors + tokenizer) to
``output_dir/model``. Options: label smoothing, margin (none / fixed / adaptive λ·μ̂ from
preference strength), flipping the lowest-strength pairs (a fraction, or μ̂ < 0), reward
centering, a SimCSE term on dropout views, LoRA or full fine-tuning, gradient accumulation,
bf16 autocast where the hardware has bf16 units (GPUs, CPUs with AMX). Checkpoints every ``checkpoint_every`` steps (and on cancel); a new
trainer with the same ``output_dir`` resumes from the latest complete one and continues
exactly as an uninterrupted run would (data order is a function of seed and step; RNG,
optimizer and scheduler are restored).

Over several processes (``processes``: a :class:`~training.distributed.Processes` that
``accelerate launch`` started, see ``training.launch``) every rank takes its share of each
global micro-batch, so ``batch_size`` and ``grad_accum_steps`` mean the same global batch
whatever the number of processes, and gradients are synchronised by DDP (or FSDP). Rank 0
alone reads the callback and decides when to stop, logs the loss averaged over all ranks, and
writes checkpoints (full, loadable on any number of processes) and the final model; every
rank resumes from the checkpoint rank 0 picked. The SimCSE term draws its negatives from the
batch, so it runs in one process only.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import get_scheduler

from training.atomic import replace_dir, write_json_atomic
from training.bt.config import SIMCSE_NEEDS_ONE_PROCESS, FlipMode, RMTrainConfig
from training.bt.results import RMTrainResult
from training.bt.strength_file import strength_for_pairs
from training.callbacks import NullCallback, TrainerCallback, TrainingCancelled
from training.checkpoint import (
    FINAL_MODEL_DIR,
    checkpoint_path,
    load_latest,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.data import PreferencePair, load_pairs
from training.distributed import Processes
from training.evaluate import evaluate_pairs, score_pairs
from training.losses import LossWeights, reward_model_loss
from training.models import resolve_pretrained
from training.precision import mixed_precision, pick_device
from training.reward_model import RewardModel

log = logging.getLogger(__name__)

LOSS_HISTORY_FILE = "loss_history.json"  # the per-step training loss of the whole run


# ---------------------------------------------------------------------- data
def set_dropout(model: torch.nn.Module, probability: float) -> None:
    """Every dropout layer of ``model`` at ``probability`` (SimCSE's views differ by dropout
    alone; the paper's best setting used 0.05)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = probability


def lowest_strength_indices(mu: list[float], mode: FlipMode, fraction: float) -> list[int]:
    """Indices of the pairs to flip: the ``fraction`` lowest μ̂, or every μ̂ < 0."""
    if mode == "none":
        return []
    if mode == "negative":
        return [i for i, m in enumerate(mu) if m < 0]
    count = int(round(fraction * len(mu)))
    return sorted(sorted(range(len(mu)), key=lambda i: (mu[i], i))[:count])


def apply_strength(
    pairs: list[PreferencePair], mu: list[float], config: RMTrainConfig
) -> tuple[list[PreferencePair], list[float], list[int]]:
    """Flip the lowest-strength pairs; returns (pairs, strength after flipping, flipped indices).

    A flipped pair swaps chosen and rejected, so its strength changes sign.
    """
    flipped = lowest_strength_indices(mu, config.flip, config.flip_fraction)
    pairs, mu = list(pairs), list(mu)
    for i in flipped:
        pairs[i] = pairs[i].swapped()
        mu[i] = -mu[i]
    return pairs, mu, flipped


def pair_smoothing(mu: list[float] | None, config: RMTrainConfig) -> list[float] | None:
    """The per-pair α of the paper's soft label: α on the pairs whose strength says their label
    is doubtful (μ̂ < 0, or the ``smoothing_fraction`` lowest μ̂), 0 on the others. None when
    every pair gets the same α (``smooth_pairs: all``, or no smoothing)."""
    if config.label_smoothing == 0 or config.smooth_pairs == "all":
        return None
    assert mu is not None  # needs_strength
    mode = "negative" if config.smooth_pairs == "negative" else "fraction"
    chosen = set(lowest_strength_indices(mu, mode, config.smoothing_fraction))
    return [config.label_smoothing if i in chosen else 0.0 for i in range(len(mu))]


def data_margins(pairs: list[PreferencePair], config: RMTrainConfig) -> list[float] | None:
    """TRL's per-pair ``margin`` column, used as the margin m when the data has one (pairs
    without a value get 0); None when no pair carries one."""
    if all(p.margin is None for p in pairs):
        return None
    if config.margin != "none":
        raise ValueError(
            f"the training pairs carry a 'margin' column and the config sets margin="
            f"{config.margin!r}; use one: margin: none (the data's margins, as TRL does), or "
            "drop the column")
    return [p.margin or 0.0 for p in pairs]


# ---------------------------------------------------------------------- trainer
class RMTrainer:
    """Trains one reward model; see the module docstring."""

    def __init__(self, config: RMTrainConfig, callback: TrainerCallback | None = None,
                 processes: Processes | None = None) -> None:
        self.config = config
        self.callback = callback or NullCallback()
        self.processes = processes or Processes.single()
        if self.processes.distributed and config.simcse_weight > 0:
            raise ValueError(SIMCSE_NEEDS_ONE_PROCESS)
        self.output_dir = Path(config.output_dir)
        self.device = self.processes.device or pick_device(config.device)
        self.train_module: torch.nn.Module | None = None  # what training steps run through
        self.weights = LossWeights(
            label_smoothing=config.label_smoothing,
            center_coef=config.center_coef,
            simcse_weight=config.simcse_weight,
            simcse_temperature=config.simcse_temperature,
            simcse_representation=config.simcse_representation,
        )

    # ------------------------------------------------------------ setup
    def _load_data(self) -> None:
        cfg = self.config
        pairs = load_pairs(cfg.train_file)
        self.flipped: list[int] = []
        self.strength: list[float] | None = None
        if cfg.needs_strength:
            mu = strength_for_pairs(cfg.resolved_strength_file, pairs)
            pairs, mu, self.flipped = apply_strength(pairs, mu, cfg)
            self.strength = mu
        self.smoothing = pair_smoothing(self.strength, cfg)
        self.data_margins = data_margins(pairs, cfg)
        self.pairs = pairs
        self.eval_pairs = load_pairs(cfg.eval_file) if cfg.eval_file else []

    def _load_model(self) -> None:
        cfg = self.config
        source = resolve_pretrained(cfg.model)
        # fp32 master weights; bf16 only through autocast.
        self.rm = RewardModel.from_pretrained(
            source, device=self.processes.load_device(self.device), dtype="float32",
            max_input_tokens=cfg.max_length, seed=cfg.seed, pooling=cfg.pooling,
        )
        self.rm.autocast_dtype = mixed_precision(self.device, cfg.bf16)
        if cfg.simcse_weight > 0 and cfg.simcse_dropout is not None:
            set_dropout(self.rm.model, cfg.simcse_dropout)
        if cfg.finetune == "lora":
            lora = LoraConfig(
                task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                self.rm.model = get_peft_model(self.rm.model, lora)
        self.rm.model.train()
        # Encode once: tokenization dominates small-model steps otherwise.
        chosen = self.rm.encode_many([p.chosen_item() for p in self.pairs])
        rejected = self.rm.encode_many([p.rejected_item() for p in self.pairs])
        self.encoded = list(zip(chosen, rejected, strict=True))

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.pairs) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        return max(1, math.ceil(cfg.epochs * self.micro_batches_per_epoch / cfg.grad_accum_steps))

    def _build_optimizer(self) -> None:
        cfg = self.config
        params = [p for p in self.rm.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
        self.scheduler = get_scheduler(
            name, self.optimizer,
            num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )

    def micro_batch(self, index: int) -> list[int]:
        """Pair indices of the ``index``-th micro-batch: a pure function of data seed and index.

        Each epoch is its own permutation, so a resumed run sees exactly the batches the
        uninterrupted run would have.
        """
        cfg = self.config
        epoch, position = divmod(index, self.micro_batches_per_epoch)
        seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.pairs), generator=generator).tolist()
        return order[position * cfg.batch_size : (position + 1) * cfg.batch_size]

    # ------------------------------------------------------------ one step
    def _micro_step_loss(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        n = len(indices)
        inputs = self.rm.pad([self.encoded[i][0] for i in indices] + [self.encoded[i][1] for i in indices])
        want_features = cfg.simcse_weight > 0
        module = self.train_module
        out = self.rm.forward(inputs, return_features=want_features, module=module)
        second = (self.rm.forward(inputs, return_features=True, module=module)
                  if want_features else None)
        rewards, features = out if want_features else (out, None)
        rewards = rewards.float()
        margin = None
        if self.data_margins is not None:
            margin = torch.tensor([self.data_margins[i] for i in indices], device=rewards.device)
        elif cfg.margin == "fixed":
            margin = cfg.margin_value
        elif cfg.margin == "adaptive":
            assert self.strength is not None
            mu = torch.tensor([self.strength[i] for i in indices], device=rewards.device)
            margin = cfg.margin_scale * mu
        smoothing = None
        if self.smoothing is not None:
            smoothing = torch.tensor([self.smoothing[i] for i in indices], device=rewards.device)
        second_rewards = second[0].float() if second is not None else None
        return reward_model_loss(
            rewards[:n], rewards[n:], weights=self.weights, margin=margin, smoothing=smoothing,
            features=(features[:n], features[n:]) if features is not None else None,
            features_second_view=(second[1][:n], second[1][n:]) if second is not None else None,
            rewards_second_view=(second_rewards[:n], second_rewards[n:])
            if second_rewards is not None else None,
        )

    def _optimizer_step(self, step: int) -> dict[str, float]:
        """Optimizer step number ``step`` (1-based): accumulate its micro-batches, then update.

        Over several processes each rank takes its share of every micro-batch and scales its
        loss by that share: DDP's average of the ranks' gradients is then the gradient of the
        whole micro-batch, and the logged parts (summed over ranks) its means.
        """
        cfg = self.config
        procs = self.processes
        totals: dict[str, float] = {}
        first = (step - 1) * cfg.grad_accum_steps
        for k in range(first, first + cfg.grad_accum_steps):
            batch = self.micro_batch(k)
            mine = procs.shard(batch)
            weight, share = procs.share_weight(len(mine), len(batch)), len(mine) / len(batch)
            if not mine:  # fewer pairs than ranks: a weightless pair keeps DDP's reduction whole
                mine, weight = batch[:1], 0.0
            last = k == first + cfg.grad_accum_steps - 1
            with procs.no_sync(self.train_module, skip=not last):
                loss, parts = self._micro_step_loss(mine)
                procs.backward(loss * weight / cfg.grad_accum_steps)
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value * share / cfg.grad_accum_steps
        totals = procs.sum(totals)
        params = [p for p in self.rm.model.parameters() if p.requires_grad]
        if cfg.max_grad_norm:
            totals["grad_norm"] = procs.clip_grad_norm_(params, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return totals

    # ------------------------------------------------------------ the run
    def _checkpoint(self, step: int, history: list[float]) -> Path:
        """Every rank joins (the states are gathered, each rank's RNG too); rank 0 writes."""
        procs = self.processes
        model_state = procs.trainable_state(self.rm.model)
        optimizer_state = procs.optimizer_state(self.rm.model, self.optimizer)
        extra: dict[str, Any] = {"loss_history": history}
        if procs.distributed:
            extra["rng_by_rank"] = procs.gather(rng_state())
        if not procs.is_main:
            return checkpoint_path(self.output_dir, step)
        return save_checkpoint(
            self.output_dir, step=step, model_state={"model": model_state},
            optimizer_state=optimizer_state, scheduler=self.scheduler, config=self.config,
            extra=extra, keep=self.config.keep_checkpoints,
        )

    def _resume(self) -> tuple[int, list[float], dict[str, Any] | None]:
        """(step, loss history, optimizer state) of the newest complete checkpoint — the one
        rank 0 finds, on every rank — with the model weights and RNG loaded; (0, [], None)."""
        procs = self.processes
        latest = procs.from_main(load_latest(self.output_dir) if procs.is_main else None)
        if latest is None:
            procs.seed_rank(self.config.seed)
            return 0, [], None
        state = restore_checkpoint(latest, model=self.rm.model, optimizer=None,
                                   scheduler=self.scheduler)
        by_rank = state["extra"].get("rng_by_rank")
        if by_rank is not None and len(by_rank) == procs.world_size:
            set_rng_state(by_rank[procs.rank])
        else:  # saved by another number of processes: ranks > 0 start a stream of their own
            procs.seed_rank(self.config.seed + state["step"])
        log.info("resumed %s from step %d", self.output_dir, state["step"])
        return state["step"], list(state["extra"].get("loss_history", [])), state["optimizer_state"]

    def evaluate(self) -> dict[str, Any]:
        if not self.eval_pairs:
            return {}
        metrics = evaluate_pairs(self.rm, self.eval_pairs, batch_size=self.config.eval_batch_size,
                                 processes=self.processes)
        flat = {f"eval_{k}": v for k, v in metrics.items() if k != "accuracy_by_domain"}
        # Scalars only, so that per-domain accuracy survives into registry metadata.
        flat.update({f"eval_accuracy/{d}": v for d, v in metrics["accuracy_by_domain"].items()})
        return flat

    def train(self) -> RMTrainResult:
        cfg = self.config
        started = time.monotonic()
        self._seed_everything()
        self._load_data()
        self._load_model()
        self._build_optimizer()
        if self.processes.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        step, history, optimizer_state = self._resume()
        self.train_module, self.optimizer = self.processes.prepare(
            self.rm.model, self.optimizer, optimizer_state)
        total = self.total_steps
        self.rm.model.train()
        while step < total:
            if self.processes.main_decides(self.callback.should_stop()):
                checkpoint = self._checkpoint(step, history)
                raise TrainingCancelled(step, str(checkpoint))
            metrics = self._optimizer_step(step + 1)
            step += 1
            history.append(metrics["loss"])
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                metrics.update(self._scalar(self.evaluate()))
                self.rm.model.train()
            self.callback.on_progress(step, total, metrics)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                self._checkpoint(step, history)
        return self._finish(step, history, time.monotonic() - started)

    def _finish(self, step: int, history: list[float], seconds: float) -> RMTrainResult:
        """Every rank evaluates its share and gets the same metrics; rank 0 writes."""
        self.rm.model.eval()
        metrics: dict[str, Any] = {"steps": step, "train_pairs": len(self.pairs),
                                   "flipped_pairs": len(self.flipped), "pooling": self.rm.pooling}
        window = history[-50:]
        metrics["train_loss"] = sum(window) / len(window) if window else float("nan")
        metrics.update(self.evaluate())
        metrics.update(self._reward_stats())
        metrics["train_seconds"] = seconds
        model_dir = self._save_final_model()
        if self.processes.is_main:
            if self.flipped:  # which labels this run overrode, for audits
                write_json_atomic(self.output_dir / "flipped_pairs.json",
                                  [{"index": i, "id": self.pairs[i].id} for i in self.flipped])
            write_json_atomic(self.output_dir / LOSS_HISTORY_FILE, history)
            write_json_atomic(self.output_dir / "metrics.json", metrics)
        return RMTrainResult(model_dir=model_dir, metrics=metrics, steps=step)

    def _reward_stats(self) -> dict[str, float]:
        """Mean and std of rewards over training responses (what /score normalize divides by)."""
        cfg = self.config
        pairs = self.pairs
        limit = max(1, cfg.reward_stats_max_items // 2)
        if len(pairs) > limit:
            pairs = random.Random(cfg.seed).sample(pairs, limit)
        chosen, rejected = score_pairs(self.rm, pairs, batch_size=cfg.eval_batch_size,
                                       processes=self.processes)
        rewards = torch.tensor(chosen + rejected, dtype=torch.float64)
        return {"reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std(unbiased=False)),
                "train_accuracy": sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)}

    def _save_final_model(self) -> Path:
        """Ordinary safetensors of the whole model, written by rank 0 (under FSDP from the
        state every rank helps gather); every rank returns once it is in place."""
        if self.config.finetune == "lora":
            # a plain HF model: servable without peft
            self.rm.model = self.rm.model.merge_and_unload()
        full_state = self.processes.full_model_state(self.rm.model)
        final = self.output_dir / FINAL_MODEL_DIR
        if self.processes.is_main:
            replace_dir(final, lambda d: self.rm.save_pretrained(d, state_dict=full_state))
        self.processes.barrier()
        return final

    def _seed_everything(self) -> None:
        seed = self.config.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @staticmethod
    def _scalar(metrics: dict[str, Any]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if isinstance(v, int | float)}
