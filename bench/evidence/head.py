"""The fast-track reward model: a head trained on cached frozen-encoder features.

``RewardHead`` is the shape of BERT's sequence-classification head on a pooled feature
(dropout → dense → tanh → linear to one reward); its tanh layer is the "pooled feature" the
SimCSE term contrasts. ``train_head`` is one Bradley–Terry run: the loss is
``training.losses.reward_model_loss`` itself (margins, per-pair smoothing, SimCSE over two
dropout views), with the optimiser and schedule of ``training.bt.trainer.RMTrainer`` (AdamW,
linear warm-up and decay, gradient clipping, a data order that is a function of the seed).
``FeatureRewardModel`` gives a head the interface of ``training.reward_model.RewardModel``
that ``training.metarm.trainer`` uses (``rewards(items, params=...)`` and ``.model``), so the
MetaRM trainer's own step runs on it unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import get_scheduler

from training.losses import LossWeights, reward_model_loss


@dataclass(frozen=True)
class HeadSettings:
    """Training knobs of every fast-track head (picked on the source validation split)."""

    hidden: int = 256
    dropout: float = 0.1
    learning_rate: float = 1e-3
    epochs: float = 4.0
    batch_size: int = 64
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0


class RewardHead(torch.nn.Module):
    """r(x) = w·tanh(W·dropout(x) + b) + c on a pooled feature x."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.dropout = torch.nn.Dropout(dropout)
        self.dense = torch.nn.Linear(dim, hidden)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h = torch.tanh(self.dense(self.dropout(x)))
        r = self.out(h).squeeze(-1)
        return (r, h) if return_features else r


def new_head(dim: int, settings: HeadSettings, seed: int) -> RewardHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RewardHead(dim, settings.hidden, settings.dropout)


@dataclass
class PairRows:
    """Training pairs as feature rows, with the Secrets-II per-pair terms."""

    chosen: torch.Tensor  # (N,) long
    rejected: torch.Tensor
    margin: torch.Tensor | None = None  # (N,) or None
    smoothing: torch.Tensor | None = None  # (N,) per-pair α or None

    def __len__(self) -> int:
        return len(self.chosen)

    @staticmethod
    def concat(parts: Sequence[PairRows]) -> PairRows:
        return PairRows(torch.cat([p.chosen for p in parts]), torch.cat([p.rejected for p in parts]))


def train_head(
    features: torch.Tensor, pairs: PairRows, settings: HeadSettings, seed: int, *,
    weights: LossWeights | None = None, head: RewardHead | None = None,
) -> RewardHead:
    """One Bradley–Terry (+ Secrets-II terms) run of a head on ``features[pairs]``."""
    weights = weights or LossWeights()
    head = head if head is not None else new_head(features.shape[1], settings, seed)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    per_epoch = math.ceil(len(pairs) / settings.batch_size)
    total = max(1, math.ceil(settings.epochs * per_epoch))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(settings.warmup_ratio * total),
                              num_training_steps=total)
    simcse = weights.simcse_weight > 0
    head.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        for step in range(total):
            epoch, position = divmod(step, per_epoch)
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            batch = order[position * settings.batch_size : (position + 1) * settings.batch_size]
            n = len(batch)
            x = features[torch.cat([pairs.chosen[batch], pairs.rejected[batch]])]
            rewards, feats = head(x, return_features=True)
            second = head(x, return_features=True) if simcse else None
            loss, _ = reward_model_loss(
                rewards[:n], rewards[n:], weights=weights,
                margin=pairs.margin[batch] if pairs.margin is not None else None,
                smoothing=pairs.smoothing[batch] if pairs.smoothing is not None else None,
                features=(feats[:n], feats[n:]) if simcse else None,
                features_second_view=(second[1][:n], second[1][n:]) if second else None,
                rewards_second_view=(second[0][:n], second[0][n:]) if second else None,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
    head.eval()
    return head


@torch.no_grad()
def score(heads: Sequence[RewardHead], features: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """Rewards of ``rows``: the mean over ``heads`` (one head: its own reward), eval mode."""
    x = features[rows]
    total = torch.zeros(len(rows))
    for head in heads:
        was = head.training
        head.eval()
        total += head(x).float()
        head.train(was)
    return (total / len(heads)).numpy().astype(np.float64)


class FeatureRewardModel:
    """A head with the part of ``RewardModel``'s interface the MetaRM trainer calls:
    ``.model`` (the trainable module) and differentiable ``rewards(items, params=...)``, with
    items looked up in the feature cache by (prompt, response)."""

    def __init__(self, head: RewardHead, features: torch.Tensor, rows: Mapping[tuple[str, str], int]) -> None:
        self.model = head
        self.features = features
        self.row = rows

    def rewards(self, items: Sequence[Mapping[str, Any]], *, truncate: bool = True,
                params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        x = self.features[torch.tensor([self.row[(i["prompt"], i["response"])] for i in items])]
        if params is None:
            return self.model(x)
        return torch.func.functional_call(self.model, dict(params), (x,))


def frozen_copy(head: RewardHead) -> RewardHead:
    clone = copy.deepcopy(head)
    clone.eval()
    return clone
