"""The weighted-likelihood objective that OOD-PL's inner loop and meta-test share (DESIGN §7).

The optimum of KL(·‖p)-regularised reward maximisation is π* ∝ p·exp(r_φ/β). With k draws
per prompt from p, it is fitted by maximising (1/n) Σ_j w_j log π_θ(ỹ_j|x̃_j), where w_j is
the softmax of r_φ/β over the draws of the same prompt and n counts prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def group_softmax(rewards: torch.Tensor, groups: Sequence[int], beta: float) -> torch.Tensor:
    """w_j = exp(r_j/β) normalised over the responses of the same prompt."""
    return torch.cat([torch.softmax(chunk / beta, dim=0) for chunk in rewards.split(list(groups))])


def weighted_log_likelihood(logp: torch.Tensor, weights: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """(1/n) Σ_j w_j log π(ỹ_j|x̃_j): what the policy ascends."""
    return (weights.to(logp.device, logp.dtype) * logp).sum() / num_prompts
