"""DPO baseline: the loss is right at the start and training moves the right way."""

from __future__ import annotations

import math

import pytest
import torch

from training.data import PreferencePair as Pair
from training.oodpl.config import DPOConfig
from training.oodpl.dpo import DPOTrainer, dpo_loss
from training.policy import Policy

PAIRS = [Pair(p, c, r) for p in ("how are you today?", "tell me about the fox")
         for c, r in (("good great excellent", "bad awful terrible"), ("happy love nice", "sad hate poor"))]


def test_dpo_loss_matches_the_formula():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.5))
    loss, margins = dpo_loss(pc, pr, rc, rr, beta=0.5)
    expected_margin = 0.5 * ((-3.0 + 4.0) - (-5.0 + 4.5))
    assert margins.item() == pytest.approx(expected_margin)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-expected_margin)))


@pytest.mark.parametrize("lora_r", [0, 4])
def test_dpo_starts_at_log2_and_learns_the_preferences(tiny_policy, tmp_path, lora_r):
    config = DPOConfig.from_dict({
        "policy": str(tiny_policy), "lora_r": lora_r, "steps": 12, "batch_pairs": 4, "beta": 0.5,
        "learning_rate": 1e-2 if lora_r else 3e-3, "device": "cpu", "output_dir": str(tmp_path),
        "checkpoint_every": 0})
    result = DPOTrainer(config, pairs=PAIRS).train()
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # π_θ = π_ref at step 1
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    base = Policy.from_pretrained(tiny_policy, device="cpu")
    trained = Policy.from_pretrained(result.policy_dir, device="cpu")

    def margin(policy):
        prompts = [p.prompt for p in PAIRS]
        return (policy.logprobs_chunked(prompts, [p.chosen for p in PAIRS])
                - policy.logprobs_chunked(prompts, [p.rejected for p in PAIRS]))

    assert (margin(trained) - margin(base)).mean() > 0
