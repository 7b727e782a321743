"""The evidence benchmark's metrics: what a reward model does on a prompt's cached candidates.

Notation: prompt p has candidates y_1..y_n with gold scores g_i and RM rewards r_i.

- **M1, π*-gold at matched KL.** w_i = softmax(r/β)_i over p's candidates (the optimum of
  KL-regularised reward maximisation over a uniform draw of the candidates, what the meta-test
  weighted-likelihood step converges to). ``KL(w‖U) = Σ_i w_i log w_i + log n``. β is chosen
  per RM by bisection so that the mean of KL(w‖U) over the evaluated prompts equals a target
  (1 nat; 2 nats reported too): RMs whose reward scales differ are compared at the same
  distance from the candidate distribution. Score: ``Σ_i w_i g_i`` per prompt; as a fraction
  of the oracle gain, ``(Σ_p Σ_i w_i g_i − Σ_p ḡ_p) / Σ_p (max_i g_i − ḡ_p)``.
- **M2, within-prompt pairwise accuracy.** Over the candidate pairs (i, j) of a prompt with
  |g_i − g_j| ≥ 0.1: 1 if sign(r_i − r_j) = sign(g_i − g_j), ½ on a reward tie, else 0;
  pooled over prompts as Σ correct / Σ pairs. On KA, pairs are also reported by kinds:
  policy–policy, gloss–gloss (true/sibling/hypernym glosses) and gloss–policy.
- **M3, shifted-set accuracy (MetaRM).** M2 restricted to the top 4 of a prompt's candidates
  under the previous round's RM (what a best-of-n policy with that RM produces), on prompts
  outside the meta set; plus ``Var(Δr)``: the mean over those prompts of the mean of
  (r̃_i − r̃_j)² over ordered pairs i ≠ j of the shifted set (the signed differences are
  symmetric, so this is their variance), with r̃ = r / s and s the std of the RM's rewards on
  the source pairs (both sides): a larger reward scale alone does not raise it.
- **Best-of-n gold**: g of argmax_i r_i among the first n candidates (n = 4 and all).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench.evidence.data import GLOSS_KINDS

M2_MIN_GAP = 0.1
KL_TARGETS = (1.0, 2.0)
SHIFTED_TOP = 4


# ---------------------------------------------------------------------- M1
def softmax_weights(rewards: np.ndarray, beta: float) -> np.ndarray:
    """w = softmax(r/β) of one prompt's rewards."""
    z = np.asarray(rewards, dtype=np.float64) / beta
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def kl_to_uniform(weights: np.ndarray) -> float:
    """KL(w‖U) = Σ w log w + log n (0 log 0 = 0)."""
    w = np.asarray(weights, dtype=np.float64)
    positive = w[w > 0]
    return float((positive * np.log(positive)).sum() + np.log(len(w)))


def _padded(rewards: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rewards as one (prompts, max n) array and its mask (prompts may have different n)."""
    width = max(len(r) for r in rewards)
    values = np.zeros((len(rewards), width))
    mask = np.zeros((len(rewards), width), dtype=bool)
    for row, r in enumerate(rewards):
        values[row, : len(r)] = np.asarray(r, dtype=np.float64)
        mask[row, : len(r)] = True
    return values, mask


def _mean_kl_padded(values: np.ndarray, mask: np.ndarray, beta: float) -> float:
    z = np.where(mask, values / beta, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    log_w = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    w = np.exp(log_w)
    plogp = np.where(mask & (w > 0), w * np.where(mask, log_w, 0.0), 0.0)
    return float(np.mean(plogp.sum(axis=1) + np.log(mask.sum(axis=1))))


def mean_kl(rewards: Sequence[np.ndarray], beta: float) -> float:
    """mean over prompts of KL(softmax(r_p/β) ‖ U)."""
    return _mean_kl_padded(*_padded(rewards), beta)


def max_mean_kl(rewards: Sequence[np.ndarray]) -> float:
    """The mean KL as β → 0: log(n / number of tied maxima) per prompt."""
    values = []
    for r in rewards:
        r = np.asarray(r, dtype=np.float64)
        values.append(np.log(len(r) / np.sum(r == r.max())))
    return float(np.mean(values))


def matched_beta(rewards: Sequence[np.ndarray], target: float, *, iterations: int = 80) -> float:
    """β with mean_p KL(softmax(r_p/β) ‖ U) = ``target``, by bisection on log β.

    The mean KL decreases monotonically in β (from ``max_mean_kl`` at β → 0 to 0 at β → ∞).
    A target at or above the β → 0 limit cannot be reached; the smallest β tried is returned.
    """
    if target <= 0:
        raise ValueError(f"target KL must be positive, got {target}")
    values, mask = _padded(rewards)
    spread = max(float(np.ptp(np.asarray(r, dtype=np.float64))) for r in rewards)
    if spread == 0:
        return float("inf")  # every reward equal: w is uniform at any β
    lo, hi = np.log(spread) - 30.0, np.log(spread) + 30.0  # KL(lo) ≈ max, KL(hi) ≈ 0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if _mean_kl_padded(values, mask, float(np.exp(mid))) > target:
            lo = mid  # too peaked: raise β
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def pi_star_gold(rewards: np.ndarray, gold: np.ndarray, beta: float) -> float:
    """Σ_i softmax(r/β)_i g_i (uniform weights when β is infinite)."""
    gold = np.asarray(gold, dtype=np.float64)
    if not np.isfinite(beta):
        return float(gold.mean())
    return float(softmax_weights(rewards, beta) @ gold)


def oracle_fraction(values: Sequence[float], golds: Sequence[np.ndarray]) -> float:
    """(Σ_p v_p − Σ_p ḡ_p) / Σ_p (max g_p − ḡ_p): the share of the oracle reranker's gain."""
    means = np.array([np.mean(g) for g in golds])
    gains = np.array([np.max(g) for g in golds]) - means
    return float((np.sum(values) - means.sum()) / gains.sum())


# ---------------------------------------------------------------------- M2 / M3
def kind_class(kind: str) -> str:
    return "gloss" if kind in GLOSS_KINDS else "policy"


def pair_class(kind_a: str, kind_b: str) -> str:
    """policy-policy, gloss-gloss or gloss-policy."""
    classes = sorted((kind_class(kind_a), kind_class(kind_b)))
    return "-".join(classes)


def pairwise_counts(
    rewards: np.ndarray, gold: np.ndarray, *, min_gap: float = M2_MIN_GAP,
    kinds: Sequence[str] | None = None, only: str | None = None,
    subset: Sequence[int] | None = None,
) -> tuple[float, int]:
    """(correct, pairs) of one prompt: pairs i < j with |g_i − g_j| ≥ ``min_gap`` (restricted
    to candidates ``subset``, and to the pair class ``only`` when given); a reward tie is ½."""
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(gold, dtype=np.float64)
    index = np.arange(len(r)) if subset is None else np.asarray(subset)
    correct, count = 0.0, 0
    for a in range(len(index)):
        for b in range(a + 1, len(index)):
            i, j = index[a], index[b]
            dg = g[i] - g[j]
            if abs(dg) < min_gap:
                continue
            if only is not None and (kinds is None or pair_class(kinds[i], kinds[j]) != only):
                continue
            dr = r[i] - r[j]
            count += 1
            correct += 0.5 if dr == 0 else float(np.sign(dr) == np.sign(dg))
    return correct, count


def top_k(rewards: np.ndarray, k: int = SHIFTED_TOP) -> list[int]:
    """Indices of the k highest rewards (ties broken by index, so it is deterministic)."""
    r = np.asarray(rewards, dtype=np.float64)
    return sorted(sorted(range(len(r)), key=lambda i: (-r[i], i))[:k])


def standardized_difference_variance(rewards: np.ndarray, subset: Sequence[int], scale: float) -> float:
    """mean over ordered pairs i ≠ j in ``subset`` of ((r_i − r_j)/s)²."""
    r = np.asarray(rewards, dtype=np.float64)[list(subset)] / scale
    d = r[:, None] - r[None, :]
    k = len(r)
    return float((d**2).sum() / (k * (k - 1)))


# ---------------------------------------------------------------------- secondary
def best_of_n_gold(rewards: np.ndarray, gold: np.ndarray, n: int | None = None) -> float:
    """g of the highest-reward candidate among the first n (all when None; ties: first)."""
    r = np.asarray(rewards, dtype=np.float64)[:n]
    return float(np.asarray(gold, dtype=np.float64)[int(np.argmax(r))])
