"""DPO and OOD-PL meta-training over 2 CPU processes (gloo), launched with ``accelerate launch``
through ``training.launch``, against the same run in one process.

Tiny models from ``tests/tiny.py`` in fp32 (``bf16: false``, ``dtype: float32``); the policy
and the RM have no dropout where they run (DPO's policy and meta-training's RM run in eval
mode), so a run is a function of its data and the curves compare value by value. What differs
is float rounding: each rank pads its share to its own length, and shares are summed over two
ranks (DDP for the trained model, an all-reduce for meta-training's θ-gradients). Training
amplifies it: Adam moves parameters whose true gradient is zero (the RM head's bias: w and the
Bradley–Terry loss see reward differences only) by rounding noise, so the trained RM's
rewards are compared as differences; and with ``carry`` θ integrates every inner step's
rounding (measured: 3e-7 relative at the first outer step, 8e-6 by the fourth).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests import tiny
from tests.training.test_launch import StopAt
from tests.worker.harness import write_tiny_preferences
from training.callbacks import TrainingCancelled
from training.checkpoint import complete_checkpoints
from training.launch import LaunchPlan, launch
from training.oodpl.config import DPOConfig, MetaTrainConfig
from training.oodpl.dpo import DPOTrainer
from training.oodpl.meta_train import MetaTrainer
from training.policy import Policy
from training.reward_model import RewardModel

# fp32, 2 processes against 1. DPO, 150 steps: loss within 1.5e-6, reward margin within 5.8e-6
# (its log-probabilities are sums over tokens of order 30, less a reference computed in other
# chunks). Meta-training, per outer step (hypergradient norm, outer and BT loss): within 1.4e-6
# relative (precomputed), 8e-6 (first_order, D = 2, carry); the trained RM's reward differences
# within 6e-6.
DPO_TOLERANCE = 5e-5
META_TOLERANCE = 1e-4  # relative, per step; absolute for reward differences
GOOD = ["good great excellent", "happy love nice", "wonderful good love", "great nice happy"]
BAD = ["bad awful terrible", "sad hate poor", "horrible bad hate", "awful poor sad"]
PROMPTS = ["how are you today?", "what does this word mean?", "hello, how are you?",
           "tell me about the fox", "the quick brown fox", "a reward model scores"]


def _plan() -> LaunchPlan:
    return LaunchPlan(processes=2, device="cpu", collective_timeout_seconds=60)


def _largest_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------- DPO
@pytest.fixture(scope="module")
def dpo_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_preferences(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", 24, seed=0)


def _dpo_config(policy: Path, pairs: Path, output_dir: Path, **changes) -> DPOConfig:
    return DPOConfig.from_dict({
        "policy": str(policy), "pairs_file": str(pairs), "output_dir": str(output_dir),
        "lora_r": 4, "lora_alpha": 8, "steps": 150, "batch_pairs": 5, "beta": 0.5,
        "learning_rate": 1e-3, "device": "cpu", "dtype": "float32", "bf16": False,
        "checkpoint_every": 0, **changes})


def test_dpo_over_two_processes_stops_resumes_and_trains_the_one_process_curve(
    tiny_policy: Path, dpo_pairs: Path, tmp_path: Path
) -> None:
    """Every rank stops at one step boundary when asked (rank 0 checkpoints), both resume from
    that checkpoint, and the whole curve is the one-process curve; 5 pairs a step: shares of 3
    and 2."""
    alone = DPOTrainer(_dpo_config(tiny_policy, dpo_pairs, tmp_path / "one")).train()
    run = tmp_path / "two"
    with pytest.raises(TrainingCancelled) as stopped:
        launch("dpo", _dpo_config(tiny_policy, dpo_pairs, run), _plan(), run / "launch",
               callback=StopAt(10))
    step = stopped.value.step
    assert 10 <= step < 150 and Path(stopped.value.checkpoint) == complete_checkpoints(run)[-1]
    together = launch("dpo", _dpo_config(tiny_policy, dpo_pairs, run), _plan(), run / "launch")

    assert [h["step"] for h in together.history] == list(range(1, 151))
    assert alone.history[0]["loss"] == pytest.approx(0.6931, abs=1e-4)  # π_θ = π_ref
    assert alone.history[-1]["loss"] < alone.history[0]["loss"] - 0.1, "it learned something"
    for key in ("loss", "reward_margin"):
        assert _largest_difference([h[key] for h in together.history],
                                   [h[key] for h in alone.history]) <= DPO_TOLERANCE, key
    # rank 0 saved the adapter once, and it is the one-process adapter
    saved = json.loads((Path(together.policy_dir) / "generalrm.json").read_text())
    assert saved["algorithm"] == "dpo"
    pairs = [json.loads(line) for line in dpo_pairs.read_text().splitlines()]
    prompts, chosen = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    torch.testing.assert_close(
        Policy.from_pretrained(together.policy_dir, device="cpu").logprobs_chunked(prompts, chosen),
        Policy.from_pretrained(alone.policy_dir, device="cpu").logprobs_chunked(prompts, chosen),
        rtol=0, atol=1e-4)


def test_dpo_full_fine_tuning_over_two_processes(tiny_policy: Path, dpo_pairs: Path,
                                                 tmp_path: Path) -> None:
    """Every policy weight under DDP (no adapter); 3 pairs a step over 2 processes."""
    changes = {"lora_r": 0, "steps": 8, "batch_pairs": 3, "learning_rate": 3e-3}
    alone = DPOTrainer(_dpo_config(tiny_policy, dpo_pairs, tmp_path / "one", **changes)).train()
    together = launch("dpo", _dpo_config(tiny_policy, dpo_pairs, tmp_path / "two", **changes),
                      _plan(), tmp_path / "two" / "launch")
    assert alone.history[-1]["loss"] < alone.history[0]["loss"]
    assert _largest_difference([h["loss"] for h in together.history],
                               [h["loss"] for h in alone.history]) <= DPO_TOLERANCE


# ---------------------------------------------------------------------- meta-training
@pytest.fixture(scope="module")
def meta_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two domains whose right reward is known (positive words beat negative ones)."""
    root = tmp_path_factory.mktemp("meta")
    samples, pairs = [], []
    for domain, prompts in (("a", PROMPTS[:3]), ("b", PROMPTS[3:])):
        for i, prompt in enumerate(prompts):
            responses = [GOOD[i], GOOD[i + 1], BAD[i], BAD[i + 1]]
            samples.append({"prompt": prompt, "responses": responses, "domain": domain})
            pairs += [{"prompt": prompt, "chosen": good, "rejected": bad, "domain": domain}
                      for good in responses[:2] for bad in responses[2:]]
    for name, rows in (("samples", samples), ("pairs", pairs)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"samples": root / "samples.jsonl", "pairs": root / "pairs.jsonl",
            "policy": tiny.build_policy(root / "policy", seed=1),
            "rm": tiny.build_encoder_rm(root / "rm", seed=2, dropout=0.0)}


def _meta_config(data: dict[str, Path], output_dir: Path, **changes) -> MetaTrainConfig:
    return MetaTrainConfig.from_dict({
        "policy": str(data["policy"]), "reward_model": str(data["rm"]),
        "samples_file": str(data["samples"]), "pairs_file": str(data["pairs"]),
        "output_dir": str(output_dir), "device": "cpu", "dtype": "float32", "bf16": False,
        "policy_lora_r": 4, "policy_lora_alpha": 8, "inner_batch_prompts": 3,
        "responses_per_prompt": 3, "outer_batch_pairs": 5, "inner_lr": 0.1, "beta": 0.5,
        "outer_lr": 1e-3, "bt_weight": 0.5, "outer_steps": 8, "eval_pairs": 6,
        "precompute_pairs": 7, "hypergradient_checks": 1, "checkpoint_every": 0, "seed": 3,
        **changes})


def _reward_differences(rm_dir: str, data: dict[str, Path]) -> list[float]:
    pairs = [json.loads(line) for line in data["pairs"].read_text().splitlines()]
    items = [{"prompt": p["prompt"], "response": r} for p in pairs for r in (p["chosen"], p["rejected"])]
    scores = RewardModel.from_pretrained(rm_dir, device="cpu", dtype="float32").score(items)
    return [chosen - rejected for chosen, rejected in zip(scores[::2], scores[1::2], strict=True)]


def _same_run(alone, together, data: dict[str, Path]) -> None:
    """The history, the final evaluation and the trained RM of two runs agree."""
    assert [h["step"] for h in together.history] == [h["step"] for h in alone.history]
    assert [h.get("task") for h in together.history] == [h.get("task") for h in alone.history]
    for key in ("hypergrad_norm", "bt_loss", "outer_loss"):
        theirs = [h[key] for h in alone.history if key in h]
        assert [h[key] for h in together.history if key in h] == pytest.approx(
            theirs, rel=META_TOLERANCE), key
    for key in ("outer_loss", "initial_outer_loss"):
        assert together.metrics[key] == pytest.approx(alone.metrics[key], rel=META_TOLERANCE)
    assert together.metrics["per_task"].keys() == alone.metrics["per_task"].keys()
    theirs = _reward_differences(alone.rm_dir, data)
    assert sum(theirs) > 0, "the RM learned the preferences on the whole"
    assert _largest_difference(_reward_differences(together.rm_dir, data), theirs) <= META_TOLERANCE


def test_precomputed_meta_training_over_two_processes_is_the_one_process_run(
    meta_data: dict[str, Path], tmp_path: Path
) -> None:
    """The precompute sharded over the ranks (G_i's pairs, the d_j rows), each outer step's 3
    prompts shared 2 + 1 through the RM's DDP wrapper, the BT term's 5 pairs 3 + 2; and a
    checkpoint one process wrote (step 3) resumes on two."""
    alone = MetaTrainer(_meta_config(meta_data, tmp_path / "one")).train()
    assert alone.metrics["hypergradient"] == "precomputed"
    first = tmp_path / "two"
    with pytest.raises(TrainingCancelled):
        MetaTrainer(_meta_config(meta_data, first), StopAt(3)).train()
    together = launch("meta-train", _meta_config(meta_data, first), _plan(), first / "launch")
    _same_run(alone, together, meta_data)
    assert len(alone.history) == 9 and all(h["hypergrad_norm"] > 0 for h in alone.history[1:])
    # rank 0 ran the end's hypergradient check and reported it
    assert together.metrics["hypergradient_check"]["cosines"] == pytest.approx(
        alone.metrics["hypergradient_check"]["cosines"], rel=META_TOLERANCE)


def test_first_order_meta_training_over_two_processes_is_the_one_process_run(
    meta_data: dict[str, Path], tmp_path: Path
) -> None:
    """D = 2 inner steps with θ carried: θ's inner and outer gradients summed over the ranks
    (θ_D the same on both: the next step starts from it), the surrogates through DDP."""
    changes = {"hypergradient": "first_order", "inner_steps": 2, "carry": True,
               "outer_steps": 4, "inner_lr": 0.05}
    alone = MetaTrainer(_meta_config(meta_data, tmp_path / "one", **changes)).train()
    together = launch("meta-train", _meta_config(meta_data, tmp_path / "two", **changes),
                      _plan(), tmp_path / "two" / "launch")
    _same_run(alone, together, meta_data)
