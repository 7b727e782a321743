"""Meta-test adaptation end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.callbacks import TrainingCancelled
from training.config import ConfigError
from training.data import PreferencePair as Pair
from training.oodpl.adapt import Adapter
from training.oodpl.config import AdaptConfig
from training.policy import Policy

PROMPTS = ["how are you today?", "what does this word mean?", "tell me about the fox"]


PAIRS = [Pair(p, "good great excellent", "bad awful terrible") for p in PROMPTS]


def config(tiny_policy: Path, tiny_encoder_rm: Path, out: Path, **overrides) -> AdaptConfig:
    values = {"policy": str(tiny_policy), "reward_model": str(tiny_encoder_rm), "domain": "fox",
              "prompts": PROMPTS, "device": "cpu", "responses_per_prompt": 3, "max_new_tokens": 6,
              "steps": 4, "batch_prompts": 2, "learning_rate": 5e-3, "lora_r": 4,
              "eval_prompts": 2, "eval_responses_per_prompt": 2, "output_dir": str(out),
              "checkpoint_every": 0, "beta": 0.2}
    values.update(overrides)
    return AdaptConfig.from_dict(values)


def test_adapter_end_to_end_saves_a_reloadable_policy(tiny_policy, tiny_encoder_rm, tmp_path):
    adapter = Adapter(config(tiny_policy, tiny_encoder_rm, tmp_path / "run"), pairs=PAIRS,
                      gold_fn=lambda row, response: float(len(response)))
    result = adapter.train()
    m = result.metrics
    for key in ("reward_before", "reward_after", "reward_gain", "kl_to_reference",
                "pl_accuracy_before", "pl_accuracy_after", "gold_before", "gold_after"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert abs(m["kl_to_reference"]) < float("inf")
    assert m["num_prompts"] == len(PROMPTS)
    info = json.loads((Path(result.policy_dir) / "generalrm.json").read_text())
    assert info["kind"] == "policy" and info["domain"] == "fox"
    assert info["base_model"] == str(tiny_policy) and info["reward_model"] == str(tiny_encoder_rm)
    reloaded = Policy.from_pretrained(result.policy_dir, device="cpu")
    assert reloaded.is_lora
    prompts, responses = [p.prompt for p in PAIRS], [p.chosen for p in PAIRS]
    adapted = adapter.policy.logprobs_chunked(prompts, responses)
    assert torch.allclose(reloaded.logprobs_chunked(prompts, responses), adapted, atol=1e-4)
    # adaptation moved the policy away from the reference
    base = Policy.from_pretrained(tiny_policy, device="cpu").logprobs_chunked(prompts, responses)
    assert not torch.allclose(base, adapted, atol=1e-4)


def test_weights_raise_likelihood_of_high_reward_responses(tiny_policy, tiny_encoder_rm, tmp_path):
    """With given responses, the one the RM prefers gains log-likelihood relative to the other."""
    rows = [{"prompt": p, "responses": ["good great excellent", "bad awful terrible"]} for p in PROMPTS]
    # the tiny random RM's two rewards differ by ~0.01: a small β makes its preference clear
    adapter = Adapter(config(tiny_policy, tiny_encoder_rm, tmp_path / "run", use_given_responses=True,
                             responses_per_prompt=2, steps=6, beta=0.002, eval_prompts=0, lora_r=0),
                      prompts=rows)
    adapter.setup()
    data = adapter.build_training_set()
    assert all(max(data["weights"][2 * i: 2 * i + 2]) > 0.9 for i in range(3))
    preferred = [data["responses"][2 * i + (0 if data["weights"][2 * i] > 0.5 else 1)] for i in range(3)]
    other = [data["responses"][2 * i + (1 if data["weights"][2 * i] > 0.5 else 0)] for i in range(3)]
    before = (adapter.policy.logprobs_chunked(PROMPTS, preferred)
              - adapter.policy.logprobs_chunked(PROMPTS, other))
    adapter.train()
    after = (adapter.policy.logprobs_chunked(PROMPTS, preferred)
             - adapter.policy.logprobs_chunked(PROMPTS, other))
    assert (after - before).mean() > 0


def test_merged_save_and_cancel_resume(tiny_policy, tiny_encoder_rm, tmp_path):
    class StopAt:
        def __init__(self):
            self.step = 0

        def on_progress(self, step, total, metrics):
            self.step = step

        def should_stop(self):
            return self.step >= 2

    cfg = config(tiny_policy, tiny_encoder_rm, tmp_path / "run", merge=True, eval_prompts=1)
    with pytest.raises(TrainingCancelled) as cancelled:
        Adapter(cfg, callback=StopAt()).train()
    assert cancelled.value.step == 2
    seen = []
    resumed = Adapter(cfg, callback=type("R", (), {
        "on_progress": lambda self, s, t, m: seen.append(s), "should_stop": lambda self: False})())
    result = resumed.train()
    assert seen == [3, 4]
    reloaded = Policy.from_pretrained(result.policy_dir, device="cpu")
    assert not reloaded.is_lora


def test_config_validation():
    with pytest.raises(ConfigError, match="stepz"):
        AdaptConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="responses_per_prompt"):
        AdaptConfig.from_dict({"responses_per_prompt": 1})
    with pytest.raises(ValueError, match="prompts"):
        AdaptConfig.from_dict({"prompts": ["ok", "  "]})
