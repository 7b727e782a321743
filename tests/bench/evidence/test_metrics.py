"""Metric formulas against numbers computed by hand (bench/evidence/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.evidence.metrics import (
    best_of_n_gold,
    kl_to_uniform,
    matched_beta,
    max_mean_kl,
    mean_kl,
    oracle_fraction,
    pairwise_counts,
    pi_star_gold,
    softmax_weights,
    standardized_difference_variance,
    top_k,
)


def test_pi_star_gold_and_kl_by_hand():
    rewards, gold = np.array([0.0, math.log(3.0)]), np.array([0.0, 1.0])
    # β = 1: w = (1, 3)/4
    assert softmax_weights(rewards, 1.0) == pytest.approx([0.25, 0.75])
    assert pi_star_gold(rewards, gold, 1.0) == pytest.approx(0.75)
    by_hand = 0.25 * math.log(0.25) + 0.75 * math.log(0.75) + math.log(2)
    assert kl_to_uniform(np.array([0.25, 0.75])) == pytest.approx(by_hand)
    assert mean_kl([rewards], 1.0) == pytest.approx(by_hand)
    assert pi_star_gold(rewards, gold, float("inf")) == pytest.approx(0.5)  # uniform


def test_oracle_fraction_by_hand():
    # prompt 1: mean 0.5, max 1, value 0.75; prompt 2: mean 0, max 1 (gold −1, 1), value 0
    assert oracle_fraction([0.75, 0.0], [np.array([0.0, 1.0]), np.array([-1.0, 1.0])]) == pytest.approx(0.25 / 1.5)


@pytest.mark.parametrize("target", [1.0, 2.0])
def test_matched_beta_hits_its_kl_target(target):
    rng = np.random.default_rng(0)
    rewards = [rng.normal(size=16) for _ in range(50)]
    beta = matched_beta(rewards, target)
    assert mean_kl(rewards, beta) == pytest.approx(target, abs=1e-6)
    # β is in reward units: scaling every reward scales β and leaves the weights alone
    assert matched_beta([3.0 * r for r in rewards], target) == pytest.approx(3.0 * beta, rel=1e-6)


def test_matched_beta_unreachable_target_and_constant_rewards():
    rewards = [np.array([0.0, 1.0]), np.array([2.0, -1.0])]
    assert max_mean_kl(rewards) == pytest.approx(math.log(2))
    beta = matched_beta(rewards, 1.0)  # above log 2: the β → 0 limit
    assert mean_kl(rewards, beta) == pytest.approx(math.log(2), abs=1e-6)
    assert matched_beta([np.zeros(4)], 1.0) == float("inf")


def test_pairwise_counts_by_hand():
    # (0,1): Δg .9, r 3 > 1 right; (0,2): Δg .85 right; (1,2): |Δg| .05 < .1 skipped
    assert pairwise_counts(np.array([3.0, 1.0, 2.0]), np.array([0.9, 0.0, 0.05])) == (2.0, 2)
    # (0,1): reward tie ½; (0,2): right; (1,2): Δg −.5 but r_1 > r_2: wrong
    assert pairwise_counts(np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.5])) == (1.5, 3)
    kinds = ["gloss", "policy", "sibling"]
    r, g = np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.5])
    assert pairwise_counts(r, g, kinds=kinds, only="gloss-gloss") == (1.0, 1)  # (0,2) only
    assert pairwise_counts(r, g, kinds=kinds, only="gloss-policy") == (0.5, 2)
    assert pairwise_counts(r, g, kinds=kinds, only="policy-policy") == (0.0, 0)
    assert pairwise_counts(r, g, subset=[1, 2]) == (0.0, 1)


def test_shifted_set_and_standardized_variance_by_hand():
    assert top_k(np.array([1.0, 5.0, 5.0, 0.0, 2.0]), 2) == [1, 2]
    # r/s = (.5, 1.5): ordered differences ±1, mean square 1
    assert standardized_difference_variance(np.array([1.0, 3.0, 9.0]), [0, 1], 2.0) == pytest.approx(1.0)
    # three values 0, 1, 2: ordered squared differences 1,4,1 twice → 12/6 = 2
    assert standardized_difference_variance(np.array([0.0, 1.0, 2.0]), [0, 1, 2], 1.0) == pytest.approx(2.0)


def test_best_of_n_by_hand():
    r, g = np.array([0.0, 5.0, 1.0, 9.0, 2.0]), np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert best_of_n_gold(r, g, 2) == pytest.approx(0.2)
    assert best_of_n_gold(r, g, 4) == pytest.approx(0.4)
    assert best_of_n_gold(-r, g) == pytest.approx(0.1)
