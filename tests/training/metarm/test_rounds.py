"""MetaRM rounds for /adapt on tiny models: outputs, diagnostics per round, cancel/resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.callbacks import TrainingCancelled
from training.metarm.config import MetaRMRoundsConfig
from training.metarm.rounds import MetaRMRounds
from training.oodpl.adapt import holdout_split
from training.policy import Policy
from training.reward_model import RewardModel

PROMPTS = ["how are you today?", "what does this word mean?", "tell me about the fox"]
SOURCE_PAIRS = [
    {"prompt": p, "chosen": "good great excellent", "rejected": "bad awful terrible"}
    for p in ["hello", "how was the day?", "is the dog lazy?", "what do you love?"]
]


def rounds_config(policy: Path, rm: Path, out: Path, **overrides) -> MetaRMRoundsConfig:
    adapt = {
        "policy": str(policy),
        "reward_model": str(rm),
        "domain": "fox",
        "prompts": PROMPTS,
        "device": "cpu",
        "responses_per_prompt": 2,
        "max_new_tokens": 5,
        "steps": 2,
        "batch_prompts": 2,
        "learning_rate": 5e-3,
        "lora_r": 4,
        "eval_prompts": 1,
        "eval_responses_per_prompt": 2,
        "checkpoint_every": 0,
    }
    metarm = {
        "meta_lr": 0.1,
        "learning_rate": 1e-3,
        "batch_size": 2,
        "meta_batch_size": 2,
        "responses_per_prompt": 3,
        "max_steps": 2,
    }
    values = {"rounds": 2, "adapt": adapt, "metarm": metarm, "output_dir": str(out)}
    values.update(overrides)
    return MetaRMRoundsConfig.from_dict(values)


def test_rounds_publish_an_rm_and_a_policy_with_per_round_diagnostics(
    tiny_policy, tiny_encoder_rm, tmp_path
):
    seen = []

    class Record:
        def on_progress(self, step, total, metrics):
            seen.append((metrics["round"], metrics["phase"]))

        def should_stop(self):
            return False

    config = rounds_config(tiny_policy, tiny_encoder_rm, tmp_path / "run")
    result = MetaRMRounds(config, Record(), source_pairs=SOURCE_PAIRS).train()

    assert [r for r, _ in seen] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [p for _, p in seen] == ["metarm", "metarm", "adapt", "adapt"] * 2
    by_round = result.metrics["by_round"]
    assert [rec["round"] for rec in by_round] == [1, 2]
    for rec in by_round:
        for key in ("shifted_diff_var_before", "shifted_diff_var_after", "source_accuracy_after"):
            assert key in rec["metarm"]
        assert "reward_after" in rec["adapt"]
    # round 2's RM starts from round 1's and its meta set came from the adapted policy
    assert by_round[1]["metarm"]["source_accuracy_before"] == pytest.approx(
        source_accuracy_of(by_round[0]["reward_model_dir"])
    )
    samples_1 = json.loads((config.round_dir(1) / "meta_samples.json").read_text())
    samples_2 = json.loads((config.round_dir(2) / "meta_samples.json").read_text())
    assert all(len(row["responses"]) == 3 for row in samples_1 + samples_2)
    # the prompts the Adapter holds out (default eval_holdout) are not in the meta set either
    heldout = {PROMPTS[i] for i in holdout_split(len(PROMPTS), 0.2, 0)}
    assert len(heldout) == 1 and by_round[1]["adapt"]["heldout_prompts"] == 1
    assert {row["prompt"] for row in samples_1 + samples_2} == set(PROMPTS) - heldout
    assert samples_1 != samples_2
    # round 2's meta set is exactly what round 1's adapted policy samples with round 2's seed
    driver = MetaRMRounds(config, source_pairs=SOURCE_PAIRS)
    adapted = driver._load_policy(config.adapt_config(2), Path(by_round[0]["policy_dir"]))
    again = tmp_path / "round-2-again.json"
    driver._sample_meta_set(adapted, [row["prompt"] for row in samples_2], 2, 3, again)
    assert json.loads(again.read_text()) == samples_2
    # and the check can tell: the reference policy samples something else with that seed
    reference = driver._load_policy(config.adapt_config(2), None)
    driver._sample_meta_set(reference, [row["prompt"] for row in samples_2], 2, 3,
                            tmp_path / "round-2-reference.json")
    assert json.loads((tmp_path / "round-2-reference.json").read_text()) != samples_2

    assert result.reward_model_dir == Path(by_round[1]["reward_model_dir"])
    RewardModel.from_pretrained(result.reward_model_dir, device="cpu")
    assert Policy.from_pretrained(result.policy_dir, device="cpu").is_lora
    assert result.reward_model_metadata["kind"] == "reward_model"
    assert result.reward_model_metadata["algorithm"] == "metarm"
    assert len(result.metrics["rm_shifted_diff_var_before_by_round"]) == 2


def source_accuracy_of(directory: str) -> float:
    rm = RewardModel.from_pretrained(directory, device="cpu")
    chosen = rm.score([{"prompt": p["prompt"], "response": p["chosen"]} for p in SOURCE_PAIRS])
    rejected = rm.score([{"prompt": p["prompt"], "response": p["rejected"]} for p in SOURCE_PAIRS])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(SOURCE_PAIRS)


def test_cancel_in_round_two_then_resume_skips_round_one(tiny_policy, tiny_encoder_rm, tmp_path):
    class StopInRoundTwo:
        def __init__(self):
            self.round = 0

        def on_progress(self, step, total, metrics):
            self.round = metrics["round"]

        def should_stop(self):
            return self.round == 2

    config = rounds_config(tiny_policy, tiny_encoder_rm, tmp_path / "run")
    with pytest.raises(TrainingCancelled):
        MetaRMRounds(config, StopInRoundTwo(), source_pairs=SOURCE_PAIRS).train()
    assert (config.round_dir(1) / "round.json").is_file()
    assert not (config.round_dir(2) / "round.json").is_file()
    round_one = (config.round_dir(1) / "round.json").read_text()

    calls = []

    class Count:
        def on_progress(self, step, total, metrics):
            calls.append(metrics["round"])

        def should_stop(self):
            return False

    result = MetaRMRounds(config, Count(), source_pairs=SOURCE_PAIRS).train()
    assert set(calls) == {2}
    assert (config.round_dir(1) / "round.json").read_text() == round_one
    assert [rec["round"] for rec in result.metrics["by_round"]] == [1, 2]


def test_config_rejects_keys_the_rounds_own_and_bad_values(tiny_policy, tiny_encoder_rm, tmp_path):
    with pytest.raises(ValueError, match="output_dir"):
        rounds_config(tiny_policy, tiny_encoder_rm, tmp_path, metarm={"output_dir": "x"})
    with pytest.raises(ValueError, match="rounds"):
        rounds_config(tiny_policy, tiny_encoder_rm, tmp_path, rounds=0)
    with pytest.raises(ValueError, match="meta_lr"):
        rounds_config(tiny_policy, tiny_encoder_rm, tmp_path, metarm={"meta_lr": -1.0})
    with pytest.raises(ValueError, match="nonsense"):
        rounds_config(tiny_policy, tiny_encoder_rm, tmp_path, nonsense=1)
    built = MetaRMRoundsConfig.from_adapt_params(
        {"policy": str(tiny_policy), "prompts": PROMPTS}, {"rounds": 3, "meta_lr": 0.2}, "out"
    )
    assert built.rounds == 3 and built.metarm == {"meta_lr": 0.2}
