from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from training.bt.config import RMTrainConfig
from training.bt.trainer import RMTrainer, apply_strength, lowest_strength_indices, pair_smoothing
from training.callbacks import TrainingCancelled
from training.config import ConfigError
from training.data import PreferencePair as Pair
from training.reward_model import RewardModel

POSITIVE = ["good", "great", "excellent", "wonderful", "happy", "love", "nice"]
NEGATIVE = ["bad", "awful", "terrible", "horrible", "sad", "hate", "poor"]
PROMPTS = ["what do you think of the fox?", "how are you today?", "what does this word mean?"]


def sentiment_pairs(n: int, flip_share: float = 0.0, seed: int = 0) -> list[dict[str, Any]]:
    """Learnable pairs: chosen uses positive words, rejected negative ones; some planted flips."""
    rng = random.Random(seed)
    flipped = set(rng.sample(range(n), int(round(flip_share * n))))
    rows = []
    for i in range(n):
        good = " ".join(rng.sample(POSITIVE, 3))
        bad = " ".join(rng.sample(NEGATIVE, 3))
        chosen, rejected = (bad, good) if i in flipped else (good, bad)
        rows.append({"id": f"p{i}", "prompt": rng.choice(PROMPTS), "chosen": chosen,
                     "rejected": rejected, "domain": "ab"[i % 2], "flipped": i in flipped})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared CPU: extra intra-op threads only contend (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Recorder:
    """Callback that records per-step losses and asks to stop after ``stop_after`` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.stop_after = stop_after
        self.total = None

    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        self.losses[step] = metrics["loss"]
        self.total = total

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.losses) >= self.stop_after


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(24, seed=1)),
        "eval": write_jsonl(tmp_path / "eval.jsonl", sentiment_pairs(12, seed=2)),
    }


def config(model: Path, data: dict[str, Path], out: Path, **overrides: Any) -> RMTrainConfig:
    values = {"model": str(model), "train_file": str(data["train"]), "eval_file": str(data["eval"]),
              "output_dir": str(out), "max_steps": 6, "batch_size": 4, "learning_rate": 1e-3,
              "warmup_ratio": 0.0, "seed": 3, "device": "cpu", "max_length": 64}
    values.update(overrides)
    return RMTrainConfig.from_dict(values)


def test_from_dict_names_bad_keys_and_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="learning_rat"):
        RMTrainConfig.from_dict({"train_file": "x.jsonl", "learning_rat": 1.0})
    with pytest.raises(ConfigError, match="margin"):
        RMTrainConfig.from_dict({"train_file": "x.jsonl", "margin": "huge"})
    with pytest.raises(ConfigError, match="batch_size"):
        RMTrainConfig.from_dict({"train_file": "x.jsonl", "batch_size": 0})
    with pytest.raises(ConfigError, match="flip_fraction"):
        RMTrainConfig.from_dict({"train_file": "x.jsonl", "flip": "fraction"})
    with pytest.raises(ConfigError, match="train_file"):
        RMTrainConfig.from_dict({})
    assert RMTrainConfig.from_dict({"train_file": "x", "learning_rate": 1}).learning_rate == 1.0


def test_short_run_changes_every_trainable_parameter(tiny_encoder_rm, data, tmp_path) -> None:
    before = {k: v.clone() for k, v in
              RewardModel.from_pretrained(tiny_encoder_rm, device="cpu", seed=3).model.named_parameters()}
    result = RMTrainer(config(tiny_encoder_rm, data, tmp_path / "run")).train()
    after = dict(RewardModel.from_pretrained(result.model_dir, device="cpu").model.named_parameters())
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    # the head's bias adds the same constant to both rewards of a pair: Bradley–Terry's
    # gradient on it is exactly 0 (in fp32 rounding noise, magnified by Adam, used to move it)
    assert unchanged in ([], ["classifier.bias"])
    assert result.steps == 6
    for key in ("eval_accuracy", "train_loss", "reward_mean", "reward_std", "steps"):
        assert key in result.metrics
    assert result.metrics["reward_std"] > 0
    assert {"eval_accuracy/a", "eval_accuracy/b", "eval_ece"} <= set(result.metrics)


def test_lora_trains_adapters_and_head_only(tiny_encoder_rm, data, tmp_path) -> None:
    base = {k: v.clone() for k, v in
            RewardModel.from_pretrained(tiny_encoder_rm, device="cpu", seed=3).model.named_parameters()}
    result = RMTrainer(config(tiny_encoder_rm, data, tmp_path / "lora", finetune="lora",
                              lora_dropout=0.0)).train()
    merged = dict(RewardModel.from_pretrained(result.model_dir, device="cpu").model.named_parameters())
    changed = {k for k, v in base.items() if not torch.equal(v, merged[k])}
    assert changed, "LoRA training changed nothing"
    # peft's BERT default targets query/value; the head is trained in full.
    assert all(("query" in k or "value" in k or "classifier" in k) for k in changed), changed
    assert any("classifier" in k for k in changed)
    assert sum("query" in k for k in changed) >= 2


def test_resume_continues_with_the_same_losses(tiny_encoder_rm, data, tmp_path) -> None:
    straight = Recorder()
    RMTrainer(config(tiny_encoder_rm, data, tmp_path / "a", checkpoint_every=2), straight).train()

    first = Recorder(stop_after=3)
    with pytest.raises(TrainingCancelled) as cancelled:
        RMTrainer(config(tiny_encoder_rm, data, tmp_path / "b", checkpoint_every=2), first).train()
    assert cancelled.value.step == 3 and Path(cancelled.value.checkpoint).is_dir()
    second = Recorder()
    result = RMTrainer(config(tiny_encoder_rm, data, tmp_path / "b", checkpoint_every=2), second).train()

    assert sorted(second.losses) == [4, 5, 6]
    for step in range(1, 7):
        resumed = first.losses.get(step, second.losses.get(step))
        assert resumed == pytest.approx(straight.losses[step], rel=1e-5, abs=1e-6)
    a = dict(RewardModel.from_pretrained(tmp_path / "a" / "model", device="cpu").model.named_parameters())
    b = dict(RewardModel.from_pretrained(result.model_dir, device="cpu").model.named_parameters())
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_accumulation_and_every_loss_option_run(tiny_encoder_rm, data, tmp_path) -> None:
    rows = [json.loads(line) for line in data["train"].read_text().splitlines()]
    strength = tmp_path / "strength.jsonl"
    write_jsonl(strength, [{"index": i, "id": r["id"], "diffs": [float(i % 5) - 1.0],
                            "mu": float(i % 5) - 1.0, "sigma": 0.0} for i, r in enumerate(rows)])
    recorder = Recorder()
    result = RMTrainer(config(
        tiny_encoder_rm, data, tmp_path / "all", max_steps=3, grad_accum_steps=2,
        label_smoothing=0.1, margin="adaptive", margin_scale=0.5, flip="negative",
        strength_file=str(strength), center_coef=0.01, simcse_weight=0.1,
        simcse_representation="pair"), recorder).train()
    assert result.metrics["flipped_pairs"] == sum(1 for i in range(len(rows)) if i % 5 == 0)
    assert all(torch.isfinite(torch.tensor(v)) for v in recorder.losses.values())


def test_adaptive_margin_without_strength_file_fails_clearly(tiny_encoder_rm, data, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="strength"):
        RMTrainer(config(tiny_encoder_rm, data, tmp_path / "x", margin="adaptive")).train()


def test_flip_selection_by_fraction_and_sign() -> None:
    mu = [0.5, -1.0, 2.0, -0.2, 0.1]
    assert lowest_strength_indices(mu, "fraction", 0.4) == [1, 3]
    assert lowest_strength_indices(mu, "negative", 0.0) == [1, 3]
    assert lowest_strength_indices(mu, "none", 0.5) == []
    pairs = [Pair(prompt="p", chosen=f"c{i}", rejected=f"r{i}") for i in range(5)]
    cfg = RMTrainConfig(train_file="x", flip="fraction", flip_fraction=0.2)
    flipped_pairs, new_mu, flipped = apply_strength(pairs, mu, cfg)
    assert flipped == [1]
    assert (flipped_pairs[1].chosen, flipped_pairs[1].rejected) == ("r1", "c1")
    assert new_mu[1] == 1.0 and new_mu[0] == 0.5
    assert flipped_pairs[0] == pairs[0]


def test_decoder_rm_with_lora_and_simcse_trains_and_saves_a_plain_model(
    tiny_decoder_rm, data, tmp_path
) -> None:
    recorder = Recorder()
    result = RMTrainer(config(tiny_decoder_rm, data, tmp_path / "dec", max_steps=3,
                              finetune="lora", simcse_weight=0.5,
                              simcse_representation="pair"), recorder).train()
    assert sorted(recorder.losses) == [1, 2, 3]
    rm = RewardModel.from_pretrained(result.model_dir, device="cpu")
    assert rm.is_decoder
    assert not any("lora" in name for name, _ in rm.model.named_parameters())
    assert result.metrics["eval_n_pairs"] == 12


def test_a_margin_column_is_the_margin_as_in_trl(tiny_encoder_rm, tmp_path) -> None:
    rows = [{**row, "margin": float(i % 3)} for i, row in enumerate(sentiment_pairs(8, seed=3))]
    train = write_jsonl(tmp_path / "margins.jsonl", rows)
    trainer = RMTrainer(config(tiny_encoder_rm, {"train": train, "eval": train}, tmp_path / "run",
                               eval_file=None))
    trainer._load_data()
    trainer._load_model()
    trainer.rm.model.eval()  # no dropout: the loss is a function of the weights alone
    batch = list(range(8))
    loss, _ = trainer._micro_step_loss(batch)
    with torch.no_grad():
        chosen = trainer.rm.rewards([trainer.pairs[i].chosen_item() for i in batch])
        rejected = trainer.rm.rewards([trainer.pairs[i].rejected_item() for i in batch])
    margins = torch.tensor([float(i % 3) for i in batch])
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - margins).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="margin"):  # two margins would silently add up
        RMTrainer(config(tiny_encoder_rm, {"train": train, "eval": train}, tmp_path / "r2",
                         eval_file=None, margin="fixed", margin_value=1.0))._load_data()


def test_conversational_pairs_train_on_the_rendering_that_serving_uses(tiny_decoder_rm, tmp_path) -> None:
    user = {"role": "user", "content": "how are you today?"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "good great"}],
             "rejected": [user, {"role": "assistant", "content": "bad awful"}]}] * 4
    train = write_jsonl(tmp_path / "conv.jsonl", rows)
    trainer = RMTrainer(config(tiny_decoder_rm, {"train": train, "eval": train}, tmp_path / "run",
                               eval_file=None))
    trainer._load_data()
    trainer._load_model()
    served = trainer.rm.encode({"messages": rows[0]["chosen"]})  # what /score encodes
    assert trainer.encoded[0][0] == served


def test_the_soft_label_smooths_the_doubtful_pairs_only(tmp_path) -> None:
    mu = [0.9, -0.2, 0.1, -0.5, 0.4]
    base = {"train_file": "t.jsonl", "label_smoothing": 0.2}
    negative = RMTrainConfig(**base)  # the paper's soft label: μ̂ < 0
    assert pair_smoothing(mu, negative) == [0.0, 0.2, 0.0, 0.2, 0.0] and negative.needs_strength
    lowest = RMTrainConfig(**base, smooth_pairs="fraction", smoothing_fraction=0.2)
    assert pair_smoothing(mu, lowest) == [0.0, 0.0, 0.0, 0.2, 0.0]
    everyone = RMTrainConfig(**base, smooth_pairs="all")  # the global form: no strength needed
    assert pair_smoothing(None, everyone) is None and not everyone.needs_strength


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_a_bare_mean_trained_encoder_trains_a_mean_pooled_rm_that_reloads_as_trained(
        tiny_sentence_encoder, data, tmp_path, finetune) -> None:
    """pooling auto on an encoder whose Pooling says mean: the RM trains on the mean, is saved
    with it (LoRA merged) and every later load (serving, evaluation) pools the same way."""
    base = {k: v.clone() for k, v in RewardModel.from_pretrained(
        tiny_sentence_encoder, device="cpu", seed=3).model.named_parameters()}
    result = RMTrainer(config(tiny_sentence_encoder, data, tmp_path / finetune, bf16=False,
                              finetune=finetune, lora_dropout=0.0)).train()
    assert result.metrics["pooling"] == "mean"
    rm = RewardModel.from_pretrained(result.model_dir, device="cpu", dtype="float32",
                                     allow_new_head=False)
    assert rm.pooling == "mean"
    trained = dict(rm.model.named_parameters())
    assert set(trained) == set(base), "a plain model: no adapters, no pooler"
    changed = {k for k, v in base.items() if not torch.equal(v, trained[k])}
    assert "classifier.weight" in changed
    if finetune == "lora":
        assert all(("query" in k or "value" in k or "classifier" in k) for k in changed), changed
    else:
        assert changed >= set(base) - {"classifier.bias"}
    pairs = [json.loads(line) for line in data["eval"].read_text().splitlines()]
    chosen = rm.score([{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs])
    rejected = rm.score([{"prompt": p["prompt"], "response": p["rejected"]} for p in pairs])
    accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    assert accuracy == pytest.approx(result.metrics["eval_accuracy"])
