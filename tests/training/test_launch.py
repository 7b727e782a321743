"""``training.launch`` without the worker: a real ``accelerate launch`` over 2 CPU processes
(gloo), a callback that stops it, checkpoints that move between 1 and 2 processes, and how a
launch's end is read from its channel."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests import tiny
from tests.worker.harness import write_tiny_preferences
from training.bt.config import RMTrainConfig, StrengthConfig
from training.bt.results import RMTrainResult
from training.bt.strength import StrengthTrainer
from training.bt.strength_file import read_strength
from training.bt.trainer import LOSS_HISTORY_FILE, RMTrainer
from training.callbacks import TrainingCancelled
from training.checkpoint import complete_checkpoints
from training.launch import (
    Channel,
    LaunchPlan,
    RankFailed,
    RanksLost,
    launch,
    result_from_json,
    result_to_json,
)
from training.pooled_encoder import read_layout

CURVE_TOLERANCE = 1e-5  # fp32, as in tests/integration/test_distributed_jobs.py
# bf16 autocast (this CPU has AMX): rounding then depends on each rank's padded shapes;
# measured 4.6e-4 over 200 steps
BF16_CURVE_TOLERANCE = 5e-3
STRENGTH_TOLERANCE = 3e-2  # μ̂ and d_m scored in bf16: measured 2e-3 (in fp32 within 1e-4)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("launch")
    return {"model": tiny.build_encoder_rm(root / "model", dropout=0.0),
            "sentence_encoder": tiny.build_sentence_encoder(root / "sentence-encoder", dropout=0.0),
            "train": write_tiny_preferences(root / "train.jsonl", 48, seed=0),
            "eval": write_tiny_preferences(root / "eval.jsonl", 16, seed=1)}


def _config(data: dict[str, Path], output_dir: Path, **changes) -> RMTrainConfig:
    return RMTrainConfig.from_dict({
        "train_file": str(data["train"]), "eval_file": str(data["eval"]),
        "model": str(data["model"]), "output_dir": str(output_dir), "batch_size": 8,
        "max_length": 32, "learning_rate": 1e-3, "warmup_ratio": 0.0, "device": "cpu",
        "checkpoint_every": 0, "bf16": False, **changes})


class StopAt:
    """Asks to stop once a step at or past ``step`` was reported."""

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, 0

    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        self.seen = step

    def should_stop(self) -> bool:
        return self.seen >= self.step


@pytest.mark.parametrize(("bf16", "tolerance"), [(False, CURVE_TOLERANCE),
                                                 (True, BF16_CURVE_TOLERANCE)])
def test_a_checkpoint_moves_between_one_and_two_processes(data, tmp_path: Path, bf16: bool,
                                                         tolerance: float) -> None:
    """1 process stops at step 6; 2 processes resume it and stop when asked; 1 process
    finishes it: the loss curve is the uninterrupted one."""
    total = 200
    run = tmp_path / "run"
    with pytest.raises(TrainingCancelled):
        RMTrainer(_config(data, run, max_steps=total, bf16=bf16), StopAt(6)).train()
    ranks: list[list[dict]] = []
    with pytest.raises(TrainingCancelled) as stopped:
        launch("train-rm", _config(data, run, max_steps=total, bf16=bf16),
               LaunchPlan(processes=2, device="cpu", collective_timeout_seconds=60),
               run / "launch", callback=StopAt(12), on_ranks=ranks.append)
    step = stopped.value.step
    assert 12 <= step < total, "every rank stopped at one step boundary"
    assert Path(stopped.value.checkpoint) == complete_checkpoints(run)[-1]
    assert [r["rank"] for r in ranks[0]] == [0, 1]
    result = RMTrainer(_config(data, run, max_steps=total, bf16=bf16)).train()
    assert result.steps == total

    reference = RMTrainer(_config(data, tmp_path / "reference", max_steps=total, bf16=bf16)).train()
    curve = json.loads((run / LOSS_HISTORY_FILE).read_text())
    expected = json.loads((reference.model_dir.parent / LOSS_HISTORY_FILE).read_text())
    assert len(curve) == len(expected) == total
    assert max(abs(a - b) for a, b in zip(curve, expected, strict=True)) <= tolerance


def test_a_mean_pooled_bare_encoder_trains_over_two_processes(data, tmp_path: Path) -> None:
    """DDP refuses a parameter that gets no gradient (find_unused_parameters=False): the
    mean-pooled RM is built without the encoder's pooler, and 2 processes follow the
    one-process loss curve and save a mean-pooled RM."""
    changes = {"model": str(data["sentence_encoder"]), "max_steps": 8}
    together = launch("train-rm", _config(data, tmp_path / "two", **changes),
                      LaunchPlan(processes=2, device="cpu", collective_timeout_seconds=60),
                      tmp_path / "two" / "launch")
    alone = RMTrainer(_config(data, tmp_path / "one", **changes)).train()
    assert together.metrics["pooling"] == alone.metrics["pooling"] == "mean"
    curve = json.loads((tmp_path / "two" / LOSS_HISTORY_FILE).read_text())
    expected = json.loads((tmp_path / "one" / LOSS_HISTORY_FILE).read_text())
    assert len(curve) == len(expected) == 8
    assert max(abs(a - b) for a, b in zip(curve, expected, strict=True)) <= CURVE_TOLERANCE
    assert read_layout(str(together.model_dir)).reward_head


def test_strength_over_two_processes_is_the_one_process_estimate(data, tmp_path: Path) -> None:
    """Every member trains over both processes and each scores half the pairs; rank 0 alone
    writes the strength file and the summary."""

    def config(out: Path) -> StrengthConfig:
        return StrengthConfig.from_dict({
            "train_file": str(data["train"]), "output_file": str(out / "strength.jsonl"),
            "output_dir": str(out), "model": str(data["model"]), "num_models": 2,
            "max_steps": 12, "batch_size": 8, "max_length": 32, "device": "cpu",
            "trainer_options": {"learning_rate": 1e-3, "warmup_ratio": 0.0, "bf16": False}})

    alone = StrengthTrainer(config(tmp_path / "one")).train()
    together = launch("strength", config(tmp_path / "two"),
                      LaunchPlan(processes=2, device="cpu", collective_timeout_seconds=60),
                      tmp_path / "two" / "launch")
    assert together.summary_png.is_file() and together.summary["num_models"] == 2
    expected, got = read_strength(alone.strength_file), read_strength(together.strength_file)
    assert [r["id"] for r in got] == [r["id"] for r in expected] and len(got) == 48
    # the members train in fp32 (weights ~1e-7 apart), but score in bf16 on a CPU with AMX
    # (dtype auto): there such weights give rewards one bf16 ulp apart (4e-3 near 1, 1.6e-2
    # near 3), while sharding itself cannot move a score (bf16 scoring is batch-invariant)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine["mu"] == pytest.approx(theirs["mu"], abs=STRENGTH_TOLERANCE)
        assert mine["diffs"] == pytest.approx(theirs["diffs"], abs=STRENGTH_TOLERANCE)


def _write(channel: Channel, name: str, payload: dict) -> None:
    (channel.path / name).write_text(json.dumps(payload))


def _error(rank: int, kind: str, collective: bool, at: float) -> dict:
    return {"rank": rank, "type": kind, "message": f"{kind} in rank {rank}",
            "collective": collective, "time": at}


def test_how_a_launch_ended_is_read_from_its_channel(tmp_path: Path) -> None:
    channel = Channel(tmp_path)
    result = RMTrainResult(model_dir=tmp_path / "model", metrics={"loss": 0.5}, steps=3)
    _write(channel, "result.json", {"status": "finished", "result": result_to_json(result)})
    assert channel.outcome(0, 2, RMTrainResult) == result
    _write(channel, "result.json", {"status": "cancelled", "step": 7, "checkpoint": "c"})
    with pytest.raises(TrainingCancelled) as cancelled:
        channel.outcome(0, 2, RMTrainResult)
    assert (cancelled.value.step, cancelled.value.checkpoint) == (7, "c")
    (tmp_path / "result.json").unlink()

    # rank 1 died without a word; rank 0's collective failed because of it: a lost rank
    now = time.time()
    _write(channel, "error-0.json", _error(0, "RuntimeError", True, now))
    with pytest.raises(RanksLost, match=r"rank\(s\) \[1\] of 2 ended without"):
        channel.outcome(1, 2, RMTrainResult)
    # every rank's collective failed (a peer unreachable, a timeout): lost too
    _write(channel, "error-1.json", _error(1, "DistBackendError", True, now))
    with pytest.raises(RanksLost, match="the process group failed"):
        channel.outcome(1, 2, RMTrainResult)
    # a rank's own error is the job's error, however the others ended
    _write(channel, "error-1.json", _error(1, "DataError", False, now + 1))
    with pytest.raises(RankFailed, match="rank 1 of 2 raised DataError"):
        channel.outcome(1, 2, RMTrainResult)


def test_results_cross_the_process_boundary_as_json(tmp_path: Path) -> None:
    result = RMTrainResult(model_dir=tmp_path / "m", metrics={"a": 1.0, "n": 2}, steps=4)
    again = result_from_json(RMTrainResult, json.loads(json.dumps(result_to_json(result))))
    assert again == result and isinstance(again.model_dir, Path)
