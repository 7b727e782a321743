"""MetaRM: keep a reward model discriminative on a shifted distribution (arXiv 2405.00438).

One step (DESIGN §7, first order):

1. meta batch X_s: prompts with k responses each from the shifted distribution (the current
   policy's samples, or a new domain's); the difference objective
   ``J(φ) = 2/k² · Σ_{i<j} σ(|r_φ(x,s_i) − r_φ(x,s_j)|)``, averaged over the meta prompts;
2. ascent ``φ' = φ + η ∇J(φ)``;
3. Bradley–Terry loss on the preference batch X_t evaluated at φ'; its gradient ``∇_φ' L_BT``
   is handed to the optimizer at φ (the parameters are restored before the step).

The update is exact: the parameters are snapshotted before the ascent and copied back before
``optimizer.step()``, so the optimizer (and its state) only ever sees φ. With ``meta_lr = 0``
the trainer is plain Bradley–Terry training (the "vanilla" baseline), diagnostics included.

Diagnostics, before and after training: on the shifted samples, the mean |r(x,s_i) − r(x,s_j)|
and the variance of r(x,s_i) − r(x,s_j) over the responses to the same prompt (the quantity
that collapses when an RM stops telling a drifted policy's responses apart); on the source
pairs, the accuracy P(r_chosen > r_rejected).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.atomic import replace_dir, write_json_atomic
from training.callbacks import NullCallback, TrainerCallback, TrainingCancelled
from training.checkpoint import FINAL_MODEL_DIR, load_latest, restore_checkpoint, save_checkpoint
from training.data import PreferencePair, as_pair, load_pairs, load_samples
from training.evaluate import score_pairs
from training.losses import bradley_terry_loss
from training.metarm.config import MetaRMConfig
from training.models import resolve_pretrained
from training.precision import mixed_precision
from training.reward_model import RewardModel


@dataclass
class MetaRMResult:
    model_dir: Path
    """``output_dir/model``: loadable with ``RewardModel.from_pretrained``."""
    metrics: dict[str, Any]
    """Flat: ``*_before`` / ``*_after`` diagnostics, ``steps``, last-step losses, reward stats."""
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-step ``bt_loss`` and ``meta_objective`` of this process's steps (not resumed ones)."""


# ---------------------------------------------------------------------------- data rows
def sample_groups(samples: Sequence[Any]) -> list[tuple[str, list[str]]]:
    """(prompt, responses) of :class:`~training.data.PromptSamples` (or mappings with the same
    fields); prompts with < 2 responses are dropped (no difference to take)."""
    groups = []
    for row in samples:
        prompt = row["prompt"] if isinstance(row, dict) else row.prompt
        responses = row["responses"] if isinstance(row, dict) else row.responses
        if not all(isinstance(r, str) for r in responses):
            raise ValueError("a sampled response must be a string")
        if len(responses) >= 2:
            groups.append((prompt, list(responses)))
    return groups


# ---------------------------------------------------------------------------- objectives
def pair_loss(rm: RewardModel, pairs: Sequence[PreferencePair],
              params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The Bradley–Terry loss of ``pairs``, chosen and rejected in one padded forward pass
    (``params``: the RM's parameters substituted for this call, e.g. φ')."""
    rewards = rm.rewards([p.chosen_item() for p in pairs] + [p.rejected_item() for p in pairs],
                         params=params)
    return bradley_terry_loss(rewards[: len(pairs)] - rewards[len(pairs) :])


def difference_objective(rm: RewardModel, groups: Sequence[tuple[str, list[str]]],
                         scale: torch.Tensor | float = 1.0,
                         params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """J = mean over prompts of ``2/k² · Σ_{i<j} σ(|r_i − r_j| / s)`` (k = that prompt's count);
    ``scale`` s standardizes the rewards (their std on source pairs), so that J measures how
    far apart the RM puts a prompt's responses relative to how far it puts anything apart."""
    items = [{"prompt": p, "response": s} for p, responses in groups for s in responses]
    rewards = rm.rewards(items, params=params) / scale
    per_prompt = []
    start = 0
    for _, responses in groups:
        k = len(responses)
        r = rewards[start : start + k]
        start += k
        i, j = torch.triu_indices(k, k, offset=1, device=r.device)
        per_prompt.append(2.0 / k**2 * torch.sigmoid((r[i] - r[j]).abs()).sum())
    return torch.stack(per_prompt).mean()


def source_scale(rm: RewardModel, pairs: Sequence[PreferencePair],
                 params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The std of the rewards of a batch of source pairs (both sides), differentiable: what J's
    rewards are divided by."""
    rewards = rm.rewards([p.chosen_item() for p in pairs] + [p.rejected_item() for p in pairs],
                         params=params)
    return rewards.std(unbiased=False).clamp(min=1e-6)


# ---------------------------------------------------------------------------- diagnostics
def source_accuracy(rm: RewardModel, pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Accuracy P(r_c > r_r), mean margin, and the reward mean/std over all responses."""
    if not pairs:
        return {}
    chosen, rejected = score_pairs(rm, pairs)
    rewards = torch.tensor(chosen + rejected, dtype=torch.float64)
    margin = rewards[: len(pairs)] - rewards[len(pairs) :]
    return {
        "source_accuracy": float((margin > 0).double().mean()),
        "source_margin": float(margin.mean()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
    }


def reward_difference_stats(rm: RewardModel, groups: Sequence[tuple[str, list[str]]],
                            scale: float = 1.0) -> dict[str, float]:
    """Reward differences among responses to the same prompt, over every ordered pair i ≠ j,
    on rewards divided by ``scale`` (their std on source pairs: a larger reward scale alone
    does not make an RM more discriminative, so the diagnostics must not reward it).

    The signed differences are symmetric (mean 0), so their variance is E[d²]; ``mean`` is
    E|d|, ``objective`` is J at these samples.
    """
    if not groups:
        return {}
    items = [{"prompt": p, "response": s} for p, responses in groups for s in responses]
    rewards = torch.tensor(rm.score(items), dtype=torch.float64) / scale
    diffs, objectives = [], []
    start = 0
    for _, responses in groups:
        k = len(responses)
        r = rewards[start : start + k]
        start += k
        d = r[:, None] - r[None, :]
        off_diagonal = ~torch.eye(k, dtype=torch.bool)
        diffs.append(d[off_diagonal])
        objectives.append(float(torch.sigmoid(d.abs()).triu(1).sum()) * 2.0 / k**2)
    all_diffs = torch.cat(diffs)
    return {
        "shifted_diff_mean": float(all_diffs.abs().mean()),
        "shifted_diff_var": float(all_diffs.pow(2).mean()),
        "shifted_objective": sum(objectives) / len(objectives),
    }


# ---------------------------------------------------------------------------- trainer
class MetaRMTrainer:
    """Train a reward model with MetaRM; ``train()`` returns a :class:`MetaRMResult`.

    ``pairs`` / ``samples`` may be given in memory (PreferencePair / PromptSamples objects or
    mappings with the same fields); otherwise they are read from the config's paths.
    """

    def __init__(
        self,
        config: MetaRMConfig,
        callback: TrainerCallback | None = None,
        *,
        pairs: Sequence[Any] | None = None,
        samples: Sequence[Any] | None = None,
    ) -> None:
        self.config = config
        self.callback = callback or NullCallback()
        self._pairs_given = pairs
        self._samples_given = samples
        self.reward_model: RewardModel | None = None  # the RM being trained, set by train()

    # ------------------------------------------------------------------ data
    def _load_data(self) -> tuple[list[PreferencePair], list[tuple[str, list[str]]]]:
        cfg = self.config
        given = self._pairs_given
        if given is None:
            if not cfg.pairs_file:
                raise ValueError("MetaRM needs source preference pairs: set pairs_file")
            given = load_pairs(cfg.pairs_file)
        samples: Sequence[Any] | None = self._samples_given
        if samples is None and cfg.samples_file:
            samples = load_samples(cfg.samples_file)
        pairs = [as_pair(p) for p in given]
        groups = sample_groups(samples or [])
        if not pairs:
            raise ValueError("MetaRM needs at least one source preference pair")
        if cfg.meta_lr > 0 and not groups:
            raise ValueError(
                "MetaRM with meta_lr > 0 needs shifted samples with at least 2 responses per "
                "prompt: set samples_file (or meta_lr = 0 for vanilla Bradley–Terry)"
            )
        return pairs, groups

    def total_steps(self, n_pairs: int) -> int:
        per_epoch = math.ceil(n_pairs / self.config.batch_size)
        total = max(1, math.ceil(per_epoch * self.config.epochs))
        return min(total, self.config.max_steps) if self.config.max_steps else total

    def _generator(self, *salt: int) -> torch.Generator:
        # Every random choice is a pure function of (seed, step/epoch): resume replays exactly.
        seed = self.config.seed
        for value in salt:
            seed = (seed * 1_000_003 + value + 1) % (1 << 62)
        return torch.Generator().manual_seed(seed)

    def _pair_batch(self, pairs: list[PreferencePair], step: int) -> list[PreferencePair]:
        size = self.config.batch_size
        per_epoch = math.ceil(len(pairs) / size)
        epoch, offset = divmod(step, per_epoch)
        order = torch.randperm(len(pairs), generator=self._generator(1, epoch)).tolist()
        return [pairs[i] for i in order[offset * size : (offset + 1) * size]]

    def _meta_batch(self, groups: list, step: int) -> list[tuple[str, list[str]]]:
        size = min(self.config.meta_batch_size, len(groups))
        per_cycle = math.ceil(len(groups) / size)
        cycle, offset = divmod(step, per_cycle)
        order = torch.randperm(len(groups), generator=self._generator(2, cycle)).tolist()
        chosen = [groups[i] for i in order[offset * size : (offset + 1) * size]]
        k = self.config.responses_per_prompt
        gen = self._generator(3, step)
        batch = []
        for prompt, responses in chosen:
            if len(responses) > k:
                keep = sorted(torch.randperm(len(responses), generator=gen)[:k].tolist())
                responses = [responses[i] for i in keep]
            batch.append((prompt, responses))
        return batch

    # ------------------------------------------------------------------ pieces
    def _load_model(self) -> RewardModel:
        cfg = self.config
        rm = RewardModel.from_pretrained(
            resolve_pretrained(cfg.model),
            device=cfg.device,
            dtype=cfg.dtype,
            max_input_tokens=cfg.max_length,
            seed=cfg.seed,
            pooling=cfg.pooling,
            # double backward (the second-order rule) is implemented for eager attention only
            **({"attn_implementation": "eager"} if cfg.update == "second_order" else {}),
        )
        rm.autocast_dtype = mixed_precision(rm.device, cfg.bf16, rm.precision.weights)
        rm.model.train(not cfg.disable_dropout)
        for param in rm.model.parameters():
            param.requires_grad_(True)
        return rm

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def _diagnostics(self, rm: RewardModel, pairs: list[PreferencePair],
                     groups: list) -> dict[str, float]:
        was_training = rm.model.training
        rm.model.eval()
        try:
            stats = source_accuracy(rm, pairs[: self.config.max_diagnostic_pairs])
            groups = groups[: self.config.max_diagnostic_prompts]
            # standardized by the source rewards' std (what J sees), and raw
            stats.update(reward_difference_stats(rm, groups, stats["reward_std"] or 1.0))
            stats.update({f"{k}_raw": v for k, v in reward_difference_stats(rm, groups).items()})
        finally:
            rm.model.train(was_training)
        return stats

    def meta_step(
        self,
        rm: RewardModel,
        params: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        pair_batch: Sequence[PreferencePair],
        meta_batch: Sequence[tuple[str, list[str]]],
    ) -> dict[str, float]:
        """One MetaRM update of ``params`` (all of r_φ's trainable parameters).

        With the ascent φ' = φ + η·ĝ, ĝ = ∇J(φ) clipped to ``meta_max_grad_norm``:
        ``first_order`` applies ∇L_BT(φ') to φ; ``second_order`` applies the gradient of
        L_BT(φ'(φ)) with respect to φ, autograd through the ascent, (I + η∇ĝ)·∇L_BT(φ');
        ``alternating`` applies ∇L_BT(φ') to φ' (the ascent is kept).
        """
        cfg = self.config
        stats: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        if cfg.meta_lr == 0:
            loss = pair_loss(rm, pair_batch)
            loss.backward()
        else:
            second_order = cfg.update == "second_order"
            scale = source_scale(rm, pair_batch) if cfg.standardize else 1.0
            objective = difference_objective(rm, meta_batch, scale)
            ascent = torch.autograd.grad(objective, params, allow_unused=True,
                                         create_graph=second_order)
            ascent = [torch.zeros_like(p) if g is None else g for g, p in zip(ascent, params, strict=True)]
            norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in ascent))
            clip = 1.0
            if cfg.meta_max_grad_norm is not None and float(norm) > cfg.meta_max_grad_norm:
                clip = cfg.meta_max_grad_norm / float(norm)  # a constant: the step's length
            step = cfg.meta_lr * clip
            stats.update(meta_objective=float(objective.detach()), meta_grad_norm=float(norm),
                         source_scale=float(scale.detach()) if cfg.standardize else 1.0)
            if second_order:
                names = [name for name, p in rm.model.named_parameters() if p.requires_grad]
                shifted = {name: p + step * g for name, p, g in zip(names, params, ascent, strict=True)}
                loss = pair_loss(rm, pair_batch, params=shifted)  # L_BT(φ'(φ))
                loss.backward()
            else:
                snapshot = [p.detach().clone() for p in params]
                with torch.no_grad():
                    for p, g in zip(params, ascent, strict=True):
                        p.add_(g, alpha=step)  # φ' = φ + η ĝ
                loss = pair_loss(rm, pair_batch)  # at φ'
                loss.backward()
                if cfg.update == "first_order":
                    with torch.no_grad():
                        for p, saved in zip(params, snapshot, strict=True):
                            p.copy_(saved)  # back to φ; .grad keeps ∇_φ' L_BT
        if cfg.max_grad_norm is not None:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        stats["bt_loss"] = float(loss.detach())
        return stats

    # ------------------------------------------------------------------ run
    def train(self) -> MetaRMResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        pairs, groups = self._load_data()
        total = self.total_steps(len(pairs))

        rm = self._load_model()
        self.reward_model = rm
        params = [p for p in rm.model.parameters() if p.requires_grad]
        optimizer = self._optimizer(params)
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )

        start = 0
        before: dict[str, float] | None = None
        checkpoint = load_latest(out) if cfg.resume else None
        if checkpoint is not None:
            state = restore_checkpoint(
                checkpoint, model=rm.model, optimizer=optimizer, scheduler=scheduler
            )
            start = int(state["step"])
            before = state["extra"].get("before")
        if before is None:
            before = self._diagnostics(rm, pairs, groups)

        def save(step: int) -> Path:
            return save_checkpoint(
                out,
                step=step,
                model=rm.model,
                optimizer=optimizer,
                scheduler=scheduler,
                config=cfg,
                extra={"before": before},
            )

        history: list[dict[str, float]] = []
        last: dict[str, float] = {}
        for step in range(start, total):
            if self.callback.should_stop():
                raise TrainingCancelled(step, str(save(step)))
            meta_batch = self._meta_batch(groups, step) if cfg.meta_lr > 0 else []
            last = self.meta_step(
                rm, params, optimizer, self._pair_batch(pairs, step), meta_batch
            )
            scheduler.step()
            last["lr"] = scheduler.get_last_lr()[0]
            history.append(last)
            self.callback.on_progress(step + 1, total, last)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                save(step + 1)
        if start < total:
            save(total)  # a re-run of a finished job resumes here and trains no further

        after = self._diagnostics(rm, pairs, groups)
        metrics: dict[str, Any] = {"steps": total, "meta_lr": cfg.meta_lr}
        metrics.update({f"{k}_before": v for k, v in before.items()})
        metrics.update({f"{k}_after": v for k, v in after.items()})
        metrics.update({f"last_{k}": v for k, v in last.items()})
        # The statistics /score's normalize option needs, measured on the source responses.
        for key in ("reward_mean", "reward_std"):
            if key in after:
                metrics[key] = after[key]

        model_dir = replace_dir(out / FINAL_MODEL_DIR, rm.save_pretrained)
        write_json_atomic(out / "metrics.json", metrics)
        return MetaRMResult(model_dir=model_dir, metrics=metrics, steps=total, history=history)
