"""The hierarchical bootstrap against cases with a known answer, and the decision rule."""

from __future__ import annotations

import numpy as np
import pytest

from bench.evidence.stats import Cells, Interval, bootstrap, decide


def test_a_constant_paired_difference_has_a_zero_width_interval():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(5, 40))
    out = bootstrap(Cells.of(b + 0.3), Cells.of(b), ["x"] * 20 + ["y"] * 20, reps=300)
    for interval in out.values():
        assert interval.estimate == pytest.approx(0.3)
        assert interval.low == pytest.approx(0.3) and interval.high == pytest.approx(0.3)
    assert set(out) == {"pooled", "x", "y"}


def test_prompt_level_noise_gives_the_textbook_interval():
    rng = np.random.default_rng(1)
    n = 4000
    values = rng.normal(0.5, 1.0, size=(1, n))
    interval = bootstrap(Cells.of(values), None, ["d"] * n, reps=2000)["pooled"]
    expected = 1.96 * values.std() / np.sqrt(n)
    assert interval.contains(0.5)
    assert interval.half_width == pytest.approx(expected, rel=0.15)


def test_seed_level_noise_is_resampled_over_seeds():
    rng = np.random.default_rng(2)
    seeds = 200
    offsets = rng.normal(0.0, 1.0, size=(seeds, 1))
    values = np.repeat(offsets, 30, axis=1)  # every prompt of a seed shares its offset
    interval = bootstrap(Cells.of(values), None, ["d"] * 30, reps=2000)["pooled"]
    assert interval.half_width == pytest.approx(1.96 * offsets.std() / np.sqrt(seeds), rel=0.15)


def test_prompts_are_resampled_within_their_domain():
    # domain x: +1 everywhere, domain y: −1, equally many prompts: the pooled mean is 0 in
    # every replicate only if each replicate keeps each domain's number of prompts
    values = np.array([[1.0] * 10 + [-1.0] * 10] * 3)
    out = bootstrap(Cells.of(values), None, ["x"] * 10 + ["y"] * 10, reps=500)
    assert out["pooled"].low == pytest.approx(0.0) and out["pooled"].high == pytest.approx(0.0)
    assert out["x"].estimate == 1.0 and out["y"].estimate == -1.0


def test_ratio_metrics_pool_counts():
    # prompt 1: 1 of 1 right; prompt 2: 0 of 3 right → 1/4, not the mean of ratios (1/2)
    interval = bootstrap(Cells(np.array([[1.0, 0.0]]), np.array([[1.0, 3.0]])), None, ["d", "d"], reps=100)
    assert interval["pooled"].estimate == pytest.approx(0.25)


def _intervals(pooled: tuple[float, float, float], domains: list[float]) -> dict[str, Interval]:
    out = {"pooled": Interval(*pooled)}
    out.update({f"d{i}": Interval(v, v - 1, v + 1) for i, v in enumerate(domains)})
    return out


def test_decision_rule():
    up = _intervals((0.05, 0.01, 0.09), [0.1, 0.1, 0.1, -0.1])
    assert decide(up, up, (0.2, 0.2)).verdict == "shown"
    two_of_four = _intervals((0.05, 0.01, 0.09), [0.1, 0.1, -0.1, -0.1])
    assert decide(two_of_four, two_of_four, (0.2, 0.2)).verdict == "inconclusive"
    down = _intervals((-0.05, -0.09, -0.01), [-0.1, -0.1, -0.1, 0.1])
    assert decide(down, down, (0.2, 0.2)).verdict == "shown worse"
    null = _intervals((0.0, -0.02, 0.04), [0.0, 0.01, -0.01, 0.0])
    assert decide(null, null, (0.2, 0.2)).verdict == "refuted at this scale"  # 0.04 < 0.25 × 0.2
    assert decide(null, null, (0.1, 0.1)).verdict == "inconclusive"  # 0.04 > 0.025
    failed_control = decide(null, null, (-0.1, 0.1))
    assert failed_control.verdict == "inconclusive" and "no positive control gap" in failed_control.reason
    wide = _intervals((0.01, -0.2, 0.22), [0.1, 0.1, 0.1, 0.1])
    assert "× the data" in decide(wide, wide, (0.2, 0.2)).reason
