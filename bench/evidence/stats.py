"""Paired hierarchical bootstrap and the pre-registered decision rule.

Every quantity is a ratio of sums over (seed, prompt) cells: M1 sums Σ w·g over prompts with
denominator 1 per prompt; M2 sums correct pairs over pair counts. A contrast between methods
A and B is ``Σ num_A / Σ den_A − Σ num_B / Σ den_B``, paired: both sides use the same seeds
(seed s of A against seed s of B) and the same prompts (shared candidates).

**Hierarchical bootstrap.** One replicate draws S seeds with replacement from the S seeds,
then, within each held-out domain, that domain's prompts with replacement; a cell's weight is
(times its seed was drawn) × (times its prompt was drawn). Percentile 95 % intervals, pooled
over domains and per domain (the per-domain interval uses the same replicates restricted to
the domain's prompts).

**Decision rule** (written before any run; ``decide``), per claim and task:

- *shown* when the pooled CI lower bound is > 0 on M1 and on M2, and both M1's and M2's
  point estimates are > 0 in ≥ 3 of the 4 held-out domains (the mirror image is *shown
  worse*);
- *refuted at this scale* when the pooled CI upper bound is below 25 % of the gap between the
  positive control and pooled BT, on M1 and on M2 (only when that gap is positive: a benchmark
  whose control fails refutes nothing);
- *inconclusive* otherwise, with what would decide it: the CI half-width needed and the
  factor of data (∝ half-width²) that would give it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
DOMAIN_MAJORITY = 0.75  # ≥ 3 of 4 held-out domains
REFUTE_SHARE = 0.25  # of the positive control's gap over BT


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return 0.5 * (self.high - self.low)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Cells:
    """One side of a contrast: ``num`` and ``den`` of shape (seeds, prompts)."""

    num: np.ndarray
    den: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray, den: np.ndarray | None = None) -> Cells:
        values = np.asarray(values, dtype=np.float64)
        return cls(values, np.ones_like(values) if den is None else np.broadcast_to(
            np.asarray(den, dtype=np.float64), values.shape).copy())


def _draws(seeds: int, domains: np.ndarray, reps: int, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap weights: seed counts (reps, S) and prompt counts (reps, P), the prompts drawn
    within their own domain."""
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=reps).astype(np.float64)
    prompt_counts = np.zeros((reps, len(domains)))
    for domain in np.unique(domains):
        columns = np.flatnonzero(domains == domain)
        draws = rng.multinomial(len(columns), np.full(len(columns), 1.0 / len(columns)), size=reps)
        prompt_counts[:, columns] = draws
    return seed_counts, prompt_counts


def _weighted(cells: Cells, seed_counts: np.ndarray, prompt_counts: np.ndarray) -> np.ndarray:
    num = np.einsum("bs,sp,bp->b", seed_counts, cells.num, prompt_counts)
    den = np.einsum("bs,sp,bp->b", seed_counts, cells.den, prompt_counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


def _contrast(a: Cells, b: Cells | None, seed_counts: np.ndarray, prompt_counts: np.ndarray) -> np.ndarray:
    value = _weighted(a, seed_counts, prompt_counts)
    return value - _weighted(b, seed_counts, prompt_counts) if b is not None else value


def bootstrap(
    a: Cells, b: Cells | None, domains: np.ndarray | list[str], *, reps: int = 2000, seed: int = 0,
) -> dict[str, Interval]:
    """Intervals of ``ratio(a) − ratio(b)`` (or of ``ratio(a)`` alone when b is None), pooled
    (key ``"pooled"``) and per domain (keyed by domain name)."""
    domains = np.asarray(domains)
    seeds = a.num.shape[0]
    if a.num.shape[1] != len(domains) or (b is not None and b.num.shape != a.num.shape):
        raise ValueError("cells must be (seeds, prompts) with one domain per prompt, the same for both sides")
    rng = np.random.default_rng(seed)
    seed_counts, prompt_counts = _draws(seeds, domains, reps, rng)
    ones_s, ones_p = np.ones((1, seeds)), np.ones((1, len(domains)))
    out: dict[str, Interval] = {}
    alpha = (1.0 - CONFIDENCE) / 2.0
    for name in ["pooled", *sorted(set(domains.tolist()))]:
        keep = np.ones(len(domains)) if name == "pooled" else (domains == name).astype(np.float64)

        estimate = float(_contrast(a, b, ones_s, ones_p * keep)[0])
        draws = _contrast(a, b, seed_counts, prompt_counts * keep)
        draws = draws[np.isfinite(draws)]
        low, high = (np.quantile(draws, [alpha, 1.0 - alpha]) if len(draws) else (math.nan, math.nan))
        out[name] = Interval(estimate, float(low), float(high))
    return out


# ---------------------------------------------------------------------- the decision rule
@dataclass(frozen=True)
class Decision:
    verdict: str  # "shown", "shown worse", "refuted at this scale", "inconclusive"
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _domain_agreement(m1: dict[str, Interval], m2: dict[str, Interval], sign: float) -> tuple[int, int]:
    domains = [d for d in m1 if d != "pooled"]
    same = sum(1 for d in domains if sign * m1[d].estimate > 0 and sign * m2[d].estimate > 0)
    return same, len(domains)


def decide(
    m1: dict[str, Interval], m2: dict[str, Interval], control_gap: tuple[float, float] | None,
) -> Decision:
    """The pre-registered rule (module docstring). ``m1``/``m2``: contrast intervals, pooled
    and per domain; ``control_gap``: (M1, M2) point estimates of positive control − BT."""
    p1, p2 = m1["pooled"], m2["pooled"]
    for sign, verdict in ((1.0, "shown"), (-1.0, "shown worse")):
        bound_ok = (p1.low > 0 and p2.low > 0) if sign > 0 else (p1.high < 0 and p2.high < 0)
        same, total = _domain_agreement(m1, m2, sign)
        if bound_ok and same >= math.ceil(DOMAIN_MAJORITY * total):
            return Decision(verdict, f"pooled CIs exclude 0 on M1 and M2; same sign in {same} of {total} domains")
    if control_gap is not None and control_gap[0] > 0 and control_gap[1] > 0:
        limits = (REFUTE_SHARE * control_gap[0], REFUTE_SHARE * control_gap[1])
        if p1.high < limits[0] and p2.high < limits[1]:
            return Decision("refuted at this scale",
                            f"CI upper bounds (M1 {p1.high:+.4f}, M2 {p2.high:+.4f}) below 25% of the "
                            f"control gap ({limits[0]:+.4f}, {limits[1]:+.4f})")
    return Decision("inconclusive", _what_would_decide(p1, p2, control_gap))


def _what_would_decide(p1: Interval, p2: Interval, gap: tuple[float, float] | None) -> str:
    parts = []
    for name, interval, g in (("M1", p1, gap[0] if gap else None), ("M2", p2, gap[1] if gap else None)):
        needs = []
        if interval.estimate > 0:
            needs.append(interval.estimate)  # a half-width below the estimate would show it
        if g is not None and g > 0 and interval.estimate < REFUTE_SHARE * g:
            needs.append(REFUTE_SHARE * g - interval.estimate)  # ... or refute it
        if not needs or interval.half_width <= 0:
            parts.append(f"{name} {interval.estimate:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]")
            continue
        need = max(needs)
        factor = (interval.half_width / need) ** 2
        parts.append(f"{name} {interval.estimate:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]: "
                     f"a half-width ≤ {need:.4f} would decide it (≈{factor:.1f}× the data)")
    if gap is None or gap[0] <= 0 or gap[1] <= 0:
        parts.append("no positive control gap to refute against")
    return "; ".join(parts)
