"""Preference-pair evaluation shared by every trainer and job.

``evaluate_pairs`` reports accuracy (overall and per domain), the expected calibration
error of the Bradley–Terry probability σ(Δ), and the mean and variance of the reward
differences Δ = r(chosen) − r(rejected). ``Evaluator`` scores a whole preference file
(``python -m training evaluate``, job kind ``evaluate``): accuracy per subset and overall,
with RewardBench's section weighting when the subsets are RewardBench's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.atomic import write_json_atomic, write_jsonl_atomic
from training.callbacks import NullCallback, TrainerCallback, TrainingCancelled
from training.data import PreferencePair, as_pair, load_pairs
from training.eval_config import EvalConfig
from training.models import resolve_pretrained
from training.reward_model import RewardModel
from training.rewardbench import is_rewardbench, rewardbench_summary

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


# ---------------------------------------------------------------------- a preference file
@dataclass
class EvalResult:
    """What :class:`Evaluator` returns: its metrics and where it wrote them."""

    metrics: dict[str, Any]
    output_dir: Path
    steps: int


def _subset_of(pair: PreferencePair, field: str) -> str | None:
    value = pair.domain if field == "domain" else pair.meta.get(field)
    if value is None:
        value = pair.domain
    return None if value is None else str(value)


def accuracy_report(chosen: Sequence[float], rejected: Sequence[float],
                    subsets: Sequence[str | None]) -> dict[str, Any]:
    """Accuracy overall and per subset (a tie counts as wrong), the ties, and RewardBench's
    section scores when every subset is one of RewardBench's."""
    correct = [c > r for c, r in zip(chosen, rejected, strict=True)]
    by_subset: dict[str, list[bool]] = defaultdict(list)
    for ok, subset in zip(correct, subsets, strict=True):
        if subset is not None:
            by_subset[subset].append(ok)
    n = len(correct)
    report: dict[str, Any] = {
        "n_pairs": n,
        "accuracy": sum(correct) / n if n else float("nan"),
        "ties": sum(c == r for c, r in zip(chosen, rejected, strict=True)),
        "accuracy_by_subset": {s: sum(v) / len(v) for s, v in sorted(by_subset.items())},
        "pairs_by_subset": {s: len(v) for s, v in sorted(by_subset.items())},
    }
    if is_rewardbench(by_subset):
        summary = rewardbench_summary(report["accuracy_by_subset"])
        report["rewardbench_sections"] = summary["sections"]
        report["rewardbench_score"] = summary["score"]
        report["rewardbench_missing_sections"] = summary["missing_sections"]
    return report


class Evaluator:
    """Scores every pair of ``config.eval_file`` with ``config.model`` and reports accuracy
    per subset and overall (``accuracy_report``); writes ``metrics.json`` and
    ``scores.jsonl`` to ``output_dir``. Items are rendered exactly as in training and
    serving (``RewardModel.encode``). Progress goes to the callback per chunk of pairs; a
    stop request raises :class:`TrainingCancelled` (there is nothing to checkpoint)."""

    PAIRS_PER_STEP = 256

    def __init__(self, config: EvalConfig, callback: TrainerCallback | None = None) -> None:
        self.config = config
        self.callback = callback or NullCallback()

    def train(self) -> EvalResult:
        """Run the evaluation (named ``train`` like every trainer's entry point)."""
        cfg = self.config
        pairs = load_pairs(cfg.eval_file)
        rm = RewardModel.from_pretrained(resolve_pretrained(cfg.model), device=cfg.device,
                                         max_input_tokens=cfg.max_length)
        chosen: list[float] = []
        rejected: list[float] = []
        total = math.ceil(len(pairs) / self.PAIRS_PER_STEP)
        for step in range(total):
            if self.callback.should_stop():
                raise TrainingCancelled(step)
            chunk = pairs[step * self.PAIRS_PER_STEP:(step + 1) * self.PAIRS_PER_STEP]
            c, r = score_pairs(rm, chunk, batch_size=cfg.batch_size)
            chosen += c
            rejected += r
            done = sum(a > b for a, b in zip(chosen, rejected, strict=True))
            self.callback.on_progress(step + 1, total, {"accuracy": done / len(chosen)})
        if any(math.isnan(v) for v in chosen + rejected):
            raise ValueError("the reward model produced NaN rewards")
        subsets = [_subset_of(p, cfg.subset_field) for p in pairs]
        metrics = accuracy_report(chosen, rejected, subsets)
        output_dir = Path(cfg.output_dir)
        write_jsonl_atomic(output_dir / "scores.jsonl", (
            {"index": i, "id": p.id, "subset": s, "chosen_reward": c, "rejected_reward": r,
             "correct": c > r}
            for i, (p, s, c, r) in enumerate(zip(pairs, subsets, chosen, rejected, strict=True))))
        write_json_atomic(output_dir / "metrics.json", metrics)
        return EvalResult(metrics=metrics, output_dir=output_dir, steps=total)
