from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    LossWeights,
    bradley_terry_loss,
    centering_loss,
    contrastive_views,
    reward_model_loss,
    simcse_loss,
)


def softplus(x: float) -> float:
    """−log σ(x), by hand."""
    return math.log1p(math.exp(-x))


def test_bradley_terry_is_mean_negative_log_sigmoid() -> None:
    loss = bradley_terry_loss(torch.tensor([1.0, -0.5]))
    assert float(loss) == pytest.approx((softplus(1.0) + softplus(-0.5)) / 2)


def test_label_smoothing_mixes_in_the_flipped_label() -> None:
    loss = bradley_terry_loss(torch.tensor([2.0]), label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.9 * softplus(2.0) + 0.1 * softplus(-2.0))
    # 0.9·0.126928 + 0.1·2.126928
    assert float(loss) == pytest.approx(0.326928, abs=1e-6)
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.tensor([0.0]), label_smoothing=1.0)


def test_margin_is_subtracted_from_the_difference() -> None:
    delta = torch.tensor([1.0, 1.0])
    loss = bradley_terry_loss(delta, margin=torch.tensor([0.5, -0.5]))
    assert float(loss) == pytest.approx((softplus(0.5) + softplus(1.5)) / 2)
    # A positive margin demands more: the loss of the same Δ goes up.
    assert float(bradley_terry_loss(delta, margin=0.5)) > float(bradley_terry_loss(delta))
    assert float(bradley_terry_loss(delta, margin=0.5)) == pytest.approx(0.474077, abs=1e-6)


def test_smoothing_and_margin_combine_on_the_shifted_difference() -> None:
    loss = bradley_terry_loss(torch.tensor([1.0]), margin=2.0, label_smoothing=0.2)
    assert float(loss) == pytest.approx(0.8 * softplus(-1.0) + 0.2 * softplus(1.0))


def test_centering_penalizes_the_sum_of_rewards() -> None:
    loss = centering_loss(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5]))
    assert float(loss) == pytest.approx((0.0**2 + 2.5**2) / 2)


def test_simcse_with_known_vectors() -> None:
    eye = torch.eye(2)
    # cos = 1 on the diagonal, 0 off it: −log(e^{1/τ} / (e^{1/τ} + 1)).
    assert float(simcse_loss(eye, eye, temperature=1.0)) == pytest.approx(softplus(1.0))
    assert float(simcse_loss(eye, eye, temperature=0.5)) == pytest.approx(softplus(2.0))
    # Cosine similarity: vector lengths do not matter.
    scaled = torch.tensor([[3.0, 0.0], [0.0, 0.2]])
    assert float(simcse_loss(eye, scaled, 1.0)) == pytest.approx(softplus(1.0))
    # Row 1 of a is equally close (cos 1/√2) to both columns: its loss is log 2.
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert float(simcse_loss(a, eye, 1.0)) == pytest.approx((softplus(1.0) + math.log(2)) / 2)


def test_contrastive_representations() -> None:
    chosen = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    rejected = torch.tensor([[0.5, 0.5], [1.0, 1.0]])
    assert torch.equal(contrastive_views(chosen, rejected, "pair"), torch.cat([chosen, rejected]))
    # the paper's preference-difference set: both signs of every pair's difference
    assert torch.equal(contrastive_views(chosen, rejected, "difference"),
                       torch.tensor([[0.5, 1.5], [2.0, 3.0], [-0.5, -1.5], [-2.0, -3.0]]))
    with pytest.raises(ValueError):
        contrastive_views(chosen, rejected, "sum")


def test_total_loss_is_the_weighted_sum_of_its_terms() -> None:
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    f1 = (torch.eye(2), torch.zeros(2, 2))
    f2 = (torch.eye(2), torch.zeros(2, 2))
    weights = LossWeights(label_smoothing=0.1, center_coef=0.5, simcse_weight=0.3,
                          simcse_temperature=1.0, simcse_representation="difference")
    total, parts = reward_model_loss(chosen, rejected, weights=weights, margin=0.2,
                                     features=f1, features_second_view=f2)
    bt = sum(0.9 * softplus(d - 0.2) + 0.1 * softplus(-(d - 0.2)) for d in (1.0, -0.5)) / 2
    center = (1.0**2 + 0.5**2) / 2
    # instances {e1, e2, −e1, −e2} in both views: each row's positive has cos 1, its opposite
    # −1 and the two others 0, so every row's loss is log(e + 2 + 1/e) − 1
    contrastive = math.log(math.e + 2 + 1 / math.e) - 1
    expected = bt + 0.5 * center + 0.3 * contrastive
    assert float(total) == pytest.approx(expected)
    assert parts["bt_loss"] == pytest.approx(bt)
    assert parts["center_loss"] == pytest.approx(center)
    assert parts["simcse_loss"] == pytest.approx(contrastive)
    assert parts["batch_accuracy"] == 0.5
    with pytest.raises(ValueError, match="dropout views"):
        reward_model_loss(chosen, rejected, weights=weights)


def test_total_loss_is_differentiable_in_rewards_and_features() -> None:
    chosen = torch.tensor([0.3, -0.2], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    feats = torch.randn(2, 2, 3, requires_grad=True)
    weights = LossWeights(center_coef=0.1, simcse_weight=1.0, simcse_representation="pair")
    total, _ = reward_model_loss(chosen, rejected, weights=weights,
                                 features=(feats[0], feats[1]),
                                 features_second_view=(feats[0] * 1.1, feats[1] * 0.9 + 0.1))
    total.backward()
    assert chosen.grad is not None and feats.grad is not None and feats.grad.abs().sum() > 0


def test_per_pair_smoothing_smooths_only_the_pairs_given_an_alpha() -> None:
    delta = torch.tensor([2.0, 2.0])
    loss = bradley_terry_loss(delta, label_smoothing=torch.tensor([0.0, 0.2]))
    expected = (softplus(2.0) + 0.8 * softplus(2.0) + 0.2 * softplus(-2.0)) / 2
    assert float(loss) == pytest.approx(expected)
    with pytest.raises(ValueError):
        bradley_terry_loss(delta, label_smoothing=torch.tensor([0.0, 1.0]))


def test_with_simcse_the_bradley_terry_term_covers_both_dropout_views() -> None:
    weights = LossWeights(simcse_weight=1.0, simcse_temperature=1.0)
    features = (torch.eye(2), torch.zeros(2, 2))
    _, parts = reward_model_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), weights=weights,
                                 features=features, features_second_view=features,
                                 rewards_second_view=(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 0.0])))
    first = (softplus(1.0) + softplus(0.0)) / 2
    second = (softplus(3.0) + softplus(0.0)) / 2
    assert parts["bt_loss"] == pytest.approx((first + second) / 2)
