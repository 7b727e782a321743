"""The benchmark's controls, and whether they behave.

- **Positive control**: BT on the source pairs *plus* labelled pairs from the held-out
  domains' control part (every candidate pair of a control prompt with |Δgold| ≥ the
  builder's pair gap). It sees the held-out distributions, so it must beat pooled BT with a
  pooled CI > 0 on M1 and on M2; if it cannot, the benchmark has no power to show a method
  that generalises better than BT, and nothing in it is refuted.
- **Negative control**: BT with another seed against BT (seed s + 10000 against seed s). It
  must be null (pooled CIs containing 0 on M1 and M2); if not, the intervals are too narrow.

The control part's prompts are never evaluated: M1–M3 use the eval part only.
"""

from __future__ import annotations

from typing import Any

from bench.evidence.data import SourcePair, TaskData, candidate_pairs
from bench.evidence.head import PairRows, train_head
from bench.evidence.methods import Fitted, Method, TaskContext, fit_bt, register
from bench.evidence.stats import Interval

POSITIVE = "positive_control"
NEGATIVE = "negative_control"


def control_pairs(data: TaskData) -> list[SourcePair]:
    """Labelled pairs of the held-out control part (the positive control's extra data)."""
    return candidate_pairs(data.heldout_part("control"), data.pair_gap)


def fit_positive_control(ctx: TaskContext, seed: int) -> Fitted:
    pairs: PairRows = ctx.pair_rows([*ctx.train_pairs, *ctx.control_pairs])
    return Fitted([train_head(ctx.features, pairs, ctx.settings.head, seed)])


def fit_negative_control(ctx: TaskContext, seed: int) -> Fitted:
    return fit_bt(ctx, seed + 10_000)


register(Method(NEGATIVE, "—", "BT with another seed is no different from BT (must be null)",
                fit_negative_control, role="control"))
register(Method(POSITIVE, "—", "an RM trained with held-out-domain pairs beats pooled BT (the "
                "benchmark has power)", fit_positive_control, role="control"))


FINETUNE_POSITIVE = "ft_positive_control"


def control_targets(task: str, contrasts: dict[str, dict[str, dict[str, Interval]]]) -> list[dict[str, Any]]:
    """The control targets of a task from the contrasts against BT (metric → intervals): four
    on the fast track, and two more when the fine-tune track ran (its positive control against
    fine-tuned BT; the track has 3 seeds, too few for a negative control of its own)."""
    targets = []
    positive, negative = contrasts[POSITIVE], contrasts[NEGATIVE]
    for metric in ("M1", "M2"):
        pooled = positive[metric]["pooled"]
        targets.append({"name": f"{task}: positive control beats pooled BT on {metric} (pooled CI lower bound)",
                        "measured": pooled.low, "threshold": 0.0, "met": pooled.low > 0,
                        "interval": pooled.as_dict()})
    for metric in ("M1", "M2"):
        pooled = negative[metric]["pooled"]
        largest = max(abs(pooled.low), abs(pooled.high))
        targets.append({"name": f"{task}: negative control (BT seed vs BT seed) is null on {metric} "
                        "(pooled CI contains 0)", "measured": pooled.estimate, "threshold": 0.0,
                        "met": pooled.contains(0.0), "interval": pooled.as_dict(), "largest_bound": largest})
    for metric, intervals in contrasts.get(FINETUNE_POSITIVE, {}).items():
        if metric not in ("M1", "M2"):
            continue
        pooled = intervals["pooled"]
        targets.append({"name": f"{task}: positive control beats pooled BT on {metric}, fine-tune track "
                        "(pooled CI lower bound)", "measured": pooled.low, "threshold": 0.0,
                        "met": pooled.low > 0, "interval": pooled.as_dict()})
    return targets
