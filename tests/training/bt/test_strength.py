from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.training.bt.test_trainer import (  # noqa: F401 (fixture)
    Recorder,
    one_torch_thread,
    sentiment_pairs,
    write_jsonl,
)
from training.bt.config import RMTrainConfig, StrengthConfig
from training.bt.strength import StrengthTrainer, planted_recall, summarize_strength
from training.bt.strength_file import default_strength_path, strength_for_pairs, strength_rows
from training.bt.trainer import RMTrainer
from training.callbacks import TrainingCancelled
from training.config import ConfigError
from training.data import PreferencePair as Pair


def strength_config(model: Path, train: Path, out: Path, **overrides) -> StrengthConfig:
    values = {"train_file": str(train), "output_dir": str(out), "model": str(model),
              "num_models": 3, "epochs": 3.0, "batch_size": 8, "learning_rate": 2e-3,
              "max_length": 64, "device": "cpu",
              "trainer_options": {"warmup_ratio": 0.0, "checkpoint_every": 0}}
    values.update(overrides)
    return StrengthConfig.from_dict(values)


def test_ensemble_strength_ranks_planted_flips_lowest(tiny_encoder_rm, tmp_path) -> None:
    rows = sentiment_pairs(80, flip_share=0.2, seed=7)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    result = StrengthTrainer(strength_config(tiny_encoder_rm, train, tmp_path / "ens")).train()

    assert result.strength_file == default_strength_path(train) == tmp_path / "train.strength.jsonl"
    written = [json.loads(line) for line in result.strength_file.read_text().splitlines()]
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    for r in written:
        assert len(r["diffs"]) == 3
        assert r["mu"] == pytest.approx(sum(r["diffs"]) / 3)
        assert r["sigma"] == pytest.approx(
            math.sqrt(sum((d - r["mu"]) ** 2 for d in r["diffs"]) / 3))
    # Different seeds / data orders give different members.
    assert any(r["sigma"] > 0 for r in written)

    planted = [r["flipped"] for r in rows]
    recall = planted_recall([r["mu"] for r in written], planted)
    assert recall >= 0.75, f"only {recall:.0%} of planted flips in the lowest-strength slice"
    assert result.summary["planted_recall_in_lowest_mu"] == pytest.approx(recall)
    assert result.summary_png.stat().st_size > 0
    assert "μ̂ < 0" in result.summary_markdown.read_text()
    assert json.loads(result.summary_json.read_text())["n_pairs"] == 80

    # The trainer consumes the file: flipping μ̂ < 0 corrects mostly planted flips.
    trainer_cfg = RMTrainConfig.from_dict({
        "train_file": str(train), "model": str(tiny_encoder_rm), "output_dir": str(tmp_path / "rm"),
        "flip": "negative", "margin": "adaptive", "max_steps": 2, "device": "cpu",
        "max_length": 64})
    trainer = RMTrainer(trainer_cfg)
    trainer._load_data()
    assert trainer.flipped, "no pair has μ̂ < 0"
    assert sum(planted[i] for i in trainer.flipped) / len(trainer.flipped) > 0.5
    assert all(m >= 0 for i, m in enumerate(trainer.strength) if i in set(trainer.flipped))


def test_cancelled_estimation_resumes_member_by_member(tiny_encoder_rm, tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(16, seed=3))
    cfg = strength_config(tiny_encoder_rm, train, tmp_path / "ens", num_models=2,
                          max_steps=4, trainer_options={"checkpoint_every": 1})
    stopper = Recorder(stop_after=6)  # member 0 finishes (4 steps), member 1 stops at its step 2
    with pytest.raises(TrainingCancelled):
        StrengthTrainer(cfg, stopper).train()
    assert (tmp_path / "ens" / "member-0" / "diffs.json").is_file()
    resumed = Recorder()
    result = StrengthTrainer(cfg, resumed).train()
    assert sorted(resumed.losses) == [7, 8]  # only member 1's remaining steps ran
    assert resumed.total == 8
    assert len(json.loads(result.strength_file.read_text().splitlines()[0])["diffs"]) == 2


def test_summary_bins_and_shares() -> None:
    pairs = [Pair(prompt="p", chosen="c", rejected="r", id=str(i)) for i in range(4)]
    rows = strength_rows(pairs, [[-2.0, 1.0, 3.0, 5.0], [0.0, 1.0, 1.0, 7.0]])
    assert [r["mu"] for r in rows] == [-1.0, 1.0, 2.0, 6.0]
    assert [r["sigma"] for r in rows] == [1.0, 0.0, 1.0, 1.0]
    summary = summarize_strength(rows, [True, False, False, False], sigma_bins=2)
    assert summary["share_mu_negative"] == 0.25
    assert summary["planted_recall_in_lowest_mu"] == 1.0
    assert [b["sigma_mean"] for b in summary["sigma_by_mu_bin"]] == [0.5, 1.0]
    assert [b["planted_share"] for b in summary["sigma_by_mu_bin"]] == [0.5, 0.0]


def test_strength_matched_by_id_and_stale_files_rejected(tmp_path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"index": 0, "id": "b", "mu": 2.0},
                                             {"index": 1, "id": "a", "mu": -1.0}])
    pairs = [Pair(prompt="p", chosen="c", rejected="r", id=i) for i in ("a", "b")]
    assert strength_for_pairs(path, pairs) == [-1.0, 2.0]
    with pytest.raises(ValueError, match="stale"):
        strength_for_pairs(path, [*pairs, Pair(prompt="p", chosen="c", rejected="r", id="z")])


def test_config_rejects_bad_trainer_options() -> None:
    with pytest.raises(ConfigError, match="learning_rat"):
        StrengthConfig.from_dict({"train_file": "x.jsonl", "trainer_options": {"learning_rat": 1}})
    with pytest.raises(ConfigError, match="seed"):
        StrengthConfig.from_dict({"train_file": "x.jsonl", "trainer_options": {"seed": 1}})
    with pytest.raises(ConfigError, match="num_models"):
        StrengthConfig.from_dict({"train_file": "x.jsonl", "num_models": 1})
    assert StrengthConfig.from_dict({"train_file": "x.jsonl"}).num_models == 5
