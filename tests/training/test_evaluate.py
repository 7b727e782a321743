from __future__ import annotations

import math

import pytest

from tests.training.bt.test_trainer import one_torch_thread  # noqa: F401 (fixture)
from training.data import PreferencePair as Pair
from training.evaluate import (
    evaluate_pairs,
    expected_calibration_error,
    score_pairs,
    summarize_deltas,
)
from training.reward_model import RewardModel


def test_summary_of_known_differences() -> None:
    summary = summarize_deltas([2.0, -1.0, 0.5, 3.0], ["a", "a", "b", "b"])
    assert summary["n_pairs"] == 4
    assert summary["accuracy"] == 0.75
    assert summary["accuracy_by_domain"] == {"a": 0.5, "b": 1.0}
    assert summary["reward_diff_mean"] == pytest.approx(1.125)
    assert summary["reward_diff_var"] == pytest.approx(
        sum((d - 1.125) ** 2 for d in [2.0, -1.0, 0.5, 3.0]) / 4)


def test_ties_count_as_wrong_and_missing_domains_are_skipped() -> None:
    summary = summarize_deltas([0.0, 1.0], [None, None])
    assert summary["accuracy"] == 0.5
    assert summary["accuracy_by_domain"] == {}


def test_ece_by_hand() -> None:
    # σ(±ln 3) = 0.75 / 0.25: confidence 0.75 for both, one right, one wrong → |0.5 − 0.75|.
    assert expected_calibration_error([math.log(3), -math.log(3)]) == pytest.approx(0.25)
    # Confidence 0.75 and all right: |1 − 0.75| = 0.25 in one bin.
    assert expected_calibration_error([math.log(3)] * 3) == pytest.approx(0.25)
    # Two bins: conf 0.75 (right) and conf σ(ln 9) = 0.9 (wrong): ½·0.25 + ½·0.9.
    assert expected_calibration_error([math.log(3), -math.log(9)], n_bins=10) == pytest.approx(
        0.5 * 0.25 + 0.5 * 0.9)
    assert math.isnan(expected_calibration_error([]))


def test_evaluate_pairs_agrees_with_scoring_each_item(tiny_encoder_rm) -> None:
    rm = RewardModel.from_pretrained(tiny_encoder_rm, device="cpu")
    pairs = [Pair(prompt="how are you today?", chosen="good great", rejected="bad awful", domain="x"),
             Pair(prompt="what does this word mean?", chosen="a small animal that lives in the forest",
                  rejected="0 1 2", domain="y"),
             {"prompt": "hello", "chosen": "nice", "rejected": "sad hate poor", "domain": "y"}]
    chosen, rejected = score_pairs(rm, pairs, batch_size=2)
    one_by_one = [rm.score([{"prompt": p["prompt"] if isinstance(p, dict) else p.prompt,
                             "response": r}])[0]
                  for p, r in zip(pairs, ["good great", "a small animal that lives in the forest",
                                          "nice"], strict=True)]
    assert chosen == pytest.approx(one_by_one, abs=1e-5)
    metrics = evaluate_pairs(rm, pairs, batch_size=2)
    deltas = [c - r for c, r in zip(chosen, rejected, strict=True)]
    assert metrics["accuracy"] == pytest.approx(sum(d > 0 for d in deltas) / 3)
    assert set(metrics["accuracy_by_domain"]) == {"x", "y"}
    assert metrics["reward_diff_mean"] == pytest.approx(sum(deltas) / 3, abs=1e-5)
    assert 0.0 <= metrics["ece"] <= 1.0
    assert not rm.model.training
