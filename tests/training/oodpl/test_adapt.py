"""Meta-test adaptation end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.callbacks import TrainingCancelled
from training.checkpoint import load_latest
from training.config import ConfigError
from training.data import PreferencePair as Pair
from training.oodpl.adapt import Adapter, holdout_split, training_responses
from training.oodpl.config import AdaptConfig
from training.policy import LoraSpec, Policy, Sample, kl_estimate

PROMPTS = ["how are you today?", "what does this word mean?", "tell me about the fox",
           "the quick brown fox", "a small animal that lives in the forest"]


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
    adapter = Adapter(config(tiny_policy, tiny_encoder_rm, tmp_path / "run", eval_holdout=0.4),
                      pairs=PAIRS, gold_fn=lambda row, response: float(len(response)))
    result = adapter.train()
    m = result.metrics
    for key in ("reward_before", "reward_after", "reward_gain", "kl_to_reference",
                "pl_accuracy_before", "pl_accuracy_after", "gold_before", "gold_after",
                "train_reward_before", "train_reward_after", "train_reward_gain",
                "train_kl_to_reference", "train_gold_before", "train_gold_after",
                "pl_margin_improved"):
        assert key in m and m[key] == m[key], key  # present and not NaN
    assert abs(m["kl_to_reference"]) < float("inf")
    assert 0.0 <= m["pl_margin_improved"] <= 1.0
    assert (m["num_prompts"], m["heldout_prompts"], m["train_prompts"]) == (5, 2, 3)
    # the held-out prompts were neither sampled for training nor trained on; they are what
    # the un-prefixed numbers measure, the training prompts what the train_ ones measure
    heldout = {PROMPTS[i] for i in holdout_split(len(PROMPTS), 0.4, 0)}
    assert len(heldout) == 2
    data = torch.load(load_latest(tmp_path / "run") / "state.pt", weights_only=False)["extra"]["data"]
    assert set(data["prompts"]) == set(PROMPTS) - heldout
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {s["prompt"] for s in report["samples_after"]} == heldout
    assert {s["prompt"] for s in report["train_samples_before"]} <= set(PROMPTS) - heldout
    # the KL is measured on the adapted policy's samples as sampled (ids), not their text
    ordered = [PROMPTS[i] for i in holdout_split(len(PROMPTS), 0.4, 0)]
    groups = adapter.policy.sample_responses(ordered, 2, max_new_tokens=6, seed=104729)
    prompts = [p for p, g in zip(ordered, groups, strict=True) for _ in g]
    samples = [y for g in groups for y in g]
    assert m["kl_to_reference"] == pytest.approx(kl_estimate(adapter.policy, prompts, samples), abs=1e-6)
    assert m["kl_to_reference"] != pytest.approx(
        kl_estimate(adapter.policy, prompts, [y.text for y in samples]), abs=1e-4)
    info = json.loads((Path(result.policy_dir) / "generalrm.json").read_text())
    assert info["kind"] == "policy" and info["domain"] == "fox"
    assert info["base_model"] == str(tiny_policy) and info["reward_model"] == str(tiny_encoder_rm)
    reloaded = Policy.from_pretrained(result.policy_dir, device="cpu")
    reloaded.autocast_dtype = adapter.policy.autocast_dtype  # the same precision, the same numbers
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
                             responses_per_prompt=2, steps=6, beta=0.002, eval_prompts=0, lora_r=0,
                             eval_holdout=0),
                      prompts=rows)
    adapter.setup()
    data = adapter.build_training_set()
    assert "response_ids" not in data  # given text: nothing was sampled, the text is trained on
    assert training_responses(data) == data["responses"]
    n = len(PROMPTS)
    assert all(max(data["weights"][2 * i: 2 * i + 2]) > 0.9 for i in range(n))
    preferred = [data["responses"][2 * i + (0 if data["weights"][2 * i] > 0.5 else 1)] for i in range(n)]
    other = [data["responses"][2 * i + (1 if data["weights"][2 * i] > 0.5 else 0)] for i in range(n)]
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
    saved = torch.load(load_latest(tmp_path / "run") / "state.pt", weights_only=False)["extra"]["data"]
    seen = []
    resumed = Adapter(cfg, callback=type("R", (), {
        "on_progress": lambda self, s, t, m: seen.append(s), "should_stop": lambda self: False})())
    result = resumed.train()
    assert seen == [3, 4]
    assert resumed.heldout == saved["heldout"] and result.metrics["heldout_prompts"] == 1
    reloaded = Policy.from_pretrained(result.policy_dir, device="cpu")
    assert not reloaded.is_lora


def _stop_after(step: int):
    class Stop:
        last = 0

        def on_progress(self, s, total, metrics):
            Stop.last = s

        def should_stop(self):
            return Stop.last >= step

    return Stop()


def test_training_uses_the_sampled_ids(tiny_policy, tiny_encoder_rm, tmp_path):
    """The draws are trained on as sampled: the checkpoint holds their ids, and one SGD step
    over every training prompt moves θ by the gradient of the weighted log-likelihood of the
    ids, not of their decoded text (which a random tiny LM's samples re-tokenize otherwise)."""
    lr = 0.5
    # fp32 (no bf16 autocast) so that the test's own computations below are the same ones
    cfg = config(tiny_policy, tiny_encoder_rm, tmp_path / "run", steps=1, eval_prompts=0,
                 bf16=False, optimizer="sgd", max_grad_norm=0, batch_prompts=4, learning_rate=lr)
    adapter = Adapter(cfg)
    adapter.train()
    data = torch.load(load_latest(tmp_path / "run") / "state.pt", weights_only=False)["extra"]["data"]
    assert len(data["groups"]) == 4  # one of the 5 prompts held out: one step sees every other
    responses = training_responses(data)
    assert all(isinstance(r, Sample) for r in responses)
    assert [list(r.token_ids) for r in responses] == data["response_ids"]
    assert [r.text for r in responses] == data["responses"]  # what the RM scored
    # the ids are the reference policy's draws with the run's seed
    reference = Policy.from_pretrained(tiny_policy, device="cpu")
    train_prompts = list(dict.fromkeys(data["prompts"]))
    again = [s for g in reference.sample_responses(train_prompts, 3, max_new_tokens=6, seed=0) for s in g]
    assert [list(s.token_ids) for s in again] == data["response_ids"]
    assert data["finished"] == [s.finished for s in again]
    assert any(reference.response_ids(r.text) != list(r.token_ids) for r in responses)

    def stepped(draws) -> dict[str, torch.Tensor]:
        fresh = Policy.from_pretrained(tiny_policy, device="cpu", lora=LoraSpec(r=4, alpha=16), seed=0)
        theta = fresh.trainable_parameters()
        logp = fresh.sequence_logprobs(data["prompts"], draws)
        loss = -(torch.tensor(data["weights"]) * logp).sum() / 4
        grads = torch.autograd.grad(loss, list(theta.values()))
        return {n: (p - lr * g).detach() for (n, p), g in zip(theta.items(), grads, strict=True)}

    trained = adapter.policy.trainable_parameters()
    on_ids, on_text = stepped(responses), stepped(data["responses"])
    assert all(torch.allclose(trained[n], on_ids[n], atol=1e-5) for n in trained)
    assert not all(torch.allclose(trained[n], on_text[n], atol=1e-5) for n in trained)


def test_resuming_a_checkpoint_from_before_ids_and_held_out_prompts(tiny_policy, tiny_encoder_rm,
                                                                     tmp_path):
    """An older checkpoint has text draws over every prompt and in-sample ``before`` numbers
    under the plain names: the resume trains on the text and reports those numbers as train_*."""
    cfg = config(tiny_policy, tiny_encoder_rm, tmp_path / "run", steps=3, eval_prompts=2)
    with pytest.raises(TrainingCancelled):
        Adapter(cfg, callback=_stop_after(1)).train()
    state_file = load_latest(tmp_path / "run") / "state.pt"
    state = torch.load(state_file, weights_only=False)
    data, before = state["extra"]["data"], state["extra"]["before"]
    for key in ("response_ids", "finished", "heldout"):
        del data[key]
    state["extra"]["before"] = {"reward": before["train_reward"], "samples": before["train_samples"]}
    torch.save(state, state_file)

    assert training_responses(data) == data["responses"]  # the fallback: re-encoded text
    seen = []
    resumed = Adapter(cfg, callback=type("R", (), {
        "on_progress": lambda self, s, t, m: seen.append(s), "should_stop": lambda self: False})())
    m = resumed.train().metrics
    assert seen == [2, 3]
    assert m["heldout_prompts"] == 0 and m["train_prompts"] == len(data["groups"])
    assert m["train_reward_before"] == before["train_reward"] and "train_reward_after" in m
    assert not any(k in m for k in ("reward_before", "reward_after", "kl_to_reference"))


def test_config_validation():
    with pytest.raises(ConfigError, match="stepz"):
        AdaptConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="responses_per_prompt"):
        AdaptConfig.from_dict({"responses_per_prompt": 1})
    with pytest.raises(ValueError, match="prompts"):
        AdaptConfig.from_dict({"prompts": ["ok", "  "]})
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="eval_holdout"):
            AdaptConfig.from_dict({"eval_holdout": bad})


def test_holdout_split():
    assert holdout_split(10, 0.2, 0) == holdout_split(10, 0.2, 0)
    assert len(holdout_split(10, 0.2, 0)) == 2 and holdout_split(10, 0.2, 0) != holdout_split(10, 0.2, 1)
    assert len(holdout_split(2, 0.01, 0)) == 1  # at least one when it can
    assert len(holdout_split(3, 0.99, 0)) == 2  # never every prompt
    assert holdout_split(1, 0.5, 0) == [] and holdout_split(10, 0.0, 0) == []
    assert all(0 <= i < 10 for i in holdout_split(10, 0.5, 3))
