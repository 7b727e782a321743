"""Preference-pair evaluation shared by every trainer and job.

``evaluate_pairs`` reports accuracy (overall and per domain), the expected calibration
error of the Bradley–Terry probability σ(Δ), and the mean and variance of the reward
differences Δ = r(chosen) − r(rejected).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from training.data import as_pair
from training.reward_model import RewardModel

if TYPE_CHECKING:
    from training.distributed import Processes


def score_pairs(
    rm: RewardModel, pairs: Sequence[Any], *, batch_size: int = 32,
    processes: Processes | None = None,
) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and of the rejected response of every pair, in order.

    Pairs are :class:`~training.data.PreferencePair` objects or mappings with the same
    fields. The model is scored in eval mode (no dropout) and left in the mode it was in.
    With ``processes`` spanning several ranks (every rank calls this), each rank scores its
    share and every rank gets all the scores; every rank runs the same number of forward
    passes, since under FSDP a forward pass is itself a collective.
    """
    pairs = [as_pair(p) for p in pairs]
    was_training = rm.model.training
    rm.model.eval()
    try:
        items = [p.chosen_item() for p in pairs] + [p.rejected_item() for p in pairs]
        # Sorting by length keeps padding (and so CPU time) low; scores don't depend on batching.
        encoded = rm.encode_many(items)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        ranks = processes.world_size if processes is not None else 1
        mine = processes.shard(order) if processes is not None else order
        batches = math.ceil(math.ceil(len(order) / ranks) / batch_size)
        scored: list[tuple[int, float]] = []
        for b in range(batches):
            chunk = mine[b * batch_size : (b + 1) * batch_size]
            if not chunk:  # this rank's share ran out: it still joins the others' forward pass
                rm.score_ids([encoded[order[0]]])
                continue
            scored.extend(zip(chunk, rm.score_ids([encoded[i] for i in chunk]), strict=True))
        if ranks > 1:
            scored = [entry for share in processes.gather(scored) for entry in share]
        scores = [0.0] * len(encoded)
        for index, value in scored:
            scores[index] = value
    finally:
        rm.model.train(was_training)
    return scores[: len(pairs)], scores[len(pairs) :]


def expected_calibration_error(deltas: Sequence[float], n_bins: int = 10) -> float:
    """ECE of the predicted preference σ(Δ) against the label "chosen is preferred".

    Confidence is max(σ(Δ), 1 − σ(Δ)) and a prediction is correct when Δ > 0; bins are equal
    width on [0.5, 1]; ECE = Σ_b (n_b / n)·|accuracy_b − confidence_b|.
    """
    if not deltas:
        return float("nan")
    delta = torch.tensor(deltas, dtype=torch.float64)
    p = torch.sigmoid(delta)
    confidence = torch.maximum(p, 1 - p)
    correct = (delta > 0).double()
    edges = torch.linspace(0.5, 1.0, n_bins + 1, dtype=torch.float64)
    bins = torch.bucketize(confidence, edges[1:-1], right=True)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            gap = (correct[mask].mean() - confidence[mask].mean()).abs()
            ece += float(mask.double().mean() * gap)
    return ece


def summarize_deltas(
    deltas: Sequence[float], domains: Sequence[str | None] | None = None, *, n_bins: int = 10
) -> dict[str, Any]:
    """Metrics from reward differences alone (no model needed)."""
    n = len(deltas)
    if n == 0:
        return {"n_pairs": 0, "accuracy": float("nan"), "accuracy_by_domain": {},
                "ece": float("nan"), "reward_diff_mean": float("nan"),
                "reward_diff_var": float("nan")}
    correct = [d > 0 for d in deltas]
    mean = sum(deltas) / n
    by_domain: dict[str, list[bool]] = defaultdict(list)
    for ok, domain in zip(correct, domains or [None] * n, strict=True):
        if domain is not None:
            by_domain[str(domain)].append(ok)
    return {
        "n_pairs": n,
        "accuracy": sum(correct) / n,
        "accuracy_by_domain": {d: sum(v) / len(v) for d, v in sorted(by_domain.items())},
        "ece": expected_calibration_error(deltas, n_bins),
        "reward_diff_mean": mean,
        # Population variance: a description of these pairs, not an estimate.
        "reward_diff_var": sum((d - mean) ** 2 for d in deltas) / n,
    }


def evaluate_pairs(
    rm: RewardModel, pairs: Sequence[Any], batch_size: int = 32, *, n_bins: int = 10,
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Accuracy (overall, per domain), ECE of σ(Δ), mean and variance of Δ on ``pairs``.

    Returns ``{"n_pairs", "accuracy", "accuracy_by_domain", "ece", "reward_diff_mean",
    "reward_diff_var"}``; a tie (Δ = 0) counts as wrong. ``processes``: as in
    :func:`score_pairs` (every rank gets the metrics).
    """
    pairs = [as_pair(p) for p in pairs]
    chosen, rejected = score_pairs(rm, pairs, batch_size=batch_size, processes=processes)
    deltas = [c - r for c, r in zip(chosen, rejected, strict=True)]
    if any(math.isnan(d) for d in deltas):
        raise ValueError("the reward model produced NaN rewards")
    return summarize_deltas(deltas, [p.domain for p in pairs], n_bins=n_bins)
