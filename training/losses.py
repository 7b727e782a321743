"""Reward-model losses: Bradley–Terry with the Secrets of RLHF II options (DESIGN §7).

``L = −E[(1−α)·log σ(Δ − m) + α·log σ(−(Δ − m))] + c·E[(r_c + r_r)²] + β_cl·L_SimCSE``

Each term is its own function so that tests can check it against hand-computed numbers and
other trainers (MetaRM, OOD-PL) can reuse the Bradley–Terry part alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

ContrastiveRepresentation = Literal["pair", "difference"]


def bradley_terry_loss(
    delta: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    label_smoothing: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Mean of ``−[(1−α)·log σ(Δ − m) + α·log σ(−(Δ − m))]`` over the batch.

    ``delta`` is r(chosen) − r(rejected); ``margin`` is a scalar or one value per pair (a
    positive margin asks the chosen reward to exceed the rejected one by at least m);
    ``label_smoothing`` α likewise: the paper's soft label smooths only the pairs whose
    preference strength says their label is doubtful (per-pair α), a global α all of them.
    """
    alpha = torch.as_tensor(label_smoothing, dtype=delta.dtype, device=delta.device)
    if bool((alpha < 0).any()) or bool((alpha >= 1).any()):
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    shifted = delta if margin is None else delta - margin
    loss = -F.logsigmoid(shifted)
    if bool((alpha > 0).any()):
        loss = (1.0 - alpha) * loss - alpha * F.logsigmoid(-shifted)
    return loss.mean()


def centering_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``E[(r_c + r_r)²]``: keeps rewards centred at zero without touching their differences."""
    return ((chosen + rejected) ** 2).mean()


def contrastive_views(
    chosen: torch.Tensor, rejected: torch.Tensor, representation: ContrastiveRepresentation
) -> torch.Tensor:
    """Instances the contrastive loss sees for one dropout view, from pooled features (B, H).

    ``pair``: every response is an instance (2B, H); ``difference``: the paper's preference-
    difference set {f_c − f_r, f_r − f_c}, both signs of every pair's difference (2B, H).
    """
    if representation == "pair":
        return torch.cat([chosen, rejected], dim=0)
    if representation == "difference":
        return torch.cat([chosen - rejected, rejected - chosen], dim=0)
    raise ValueError(f"representation must be 'pair' or 'difference', got {representation!r}")


def simcse_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Unsupervised SimCSE InfoNCE between two dropout views of the same N instances.

    ``sim[i, j] = cos(a_i, b_j) / τ``; row i's positive is column i, every other column of
    the batch a negative: ``−mean_i log softmax(sim[i])[i]`` (one direction, as in SimCSE).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    a = F.normalize(view_a.float(), dim=-1)
    b = F.normalize(view_b.float(), dim=-1)
    logits = a @ b.T / temperature
    targets = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, targets)


@dataclass(frozen=True)
class LossWeights:
    """Which optional terms are on and how strongly (the knobs of ``RMTrainConfig``)."""

    label_smoothing: float = 0.0
    center_coef: float = 0.0
    simcse_weight: float = 0.0
    simcse_temperature: float = 0.05
    simcse_representation: ContrastiveRepresentation = "difference"


def reward_model_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    weights: LossWeights,
    margin: torch.Tensor | float | None = None,
    smoothing: torch.Tensor | float | None = None,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
    features_second_view: tuple[torch.Tensor, torch.Tensor] | None = None,
    rewards_second_view: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging).

    ``smoothing``: per-pair α (default: ``weights.label_smoothing`` for every pair).
    ``features`` / ``features_second_view`` are (chosen, rejected) pooled features from two
    forward passes with dropout active, needed only when ``weights.simcse_weight > 0``; the
    Bradley–Terry term then covers both views (``rewards_second_view``), as in the paper.
    """
    alpha = weights.label_smoothing if smoothing is None else smoothing
    delta = chosen - rejected
    bt = bradley_terry_loss(delta, margin=margin, label_smoothing=alpha)
    if rewards_second_view is not None:
        second = rewards_second_view[0] - rewards_second_view[1]
        bt = 0.5 * (bt + bradley_terry_loss(second, margin=margin, label_smoothing=alpha))
    total = bt
    parts = {"bt_loss": float(bt.detach())}
    if weights.center_coef:
        center = centering_loss(chosen, rejected)
        total = total + weights.center_coef * center
        parts["center_loss"] = float(center.detach())
    if weights.simcse_weight:
        if features is None or features_second_view is None:
            raise ValueError("simcse_weight > 0 needs pooled features from two dropout views")
        rep = weights.simcse_representation
        contrastive = simcse_loss(
            contrastive_views(*features, rep),
            contrastive_views(*features_second_view, rep),
            weights.simcse_temperature,
        )
        total = total + weights.simcse_weight * contrastive
        parts["simcse_loss"] = float(contrastive.detach())
    parts["loss"] = float(total.detach())
    parts["batch_accuracy"] = float((delta.detach() > 0).float().mean())
    return total, parts
