from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import free_port
from tests.training.bt.test_trainer import (  # noqa: F401 (fixture)
    one_torch_thread,
    sentiment_pairs,
    write_jsonl,
)
from training.__main__ import app
from training.bt.config import RMTrainConfig, StrengthConfig
from training.config import ConfigError, load_config, parse_overrides
from training.reward_model import RewardModel

runner = CliRunner()


def test_overrides_are_yaml_typed_and_nest() -> None:
    assert parse_overrides(["max_steps=3", "learning_rate=1e-4", "eval_file=null",
                            "trainer_options.warmup_ratio=0.0", "model=minilm"]) == {
        "max_steps": 3, "learning_rate": 1e-4, "eval_file": None,
        "trainer_options": {"warmup_ratio": 0.0}, "model": "minilm"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])


def test_config_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train_file": "t.jsonl", "learning_rate": "5e-5",
                                    "trainer_options": {"warmup_ratio": 0.2}}))
    cfg = load_config(StrengthConfig, path, ["trainer_options.lora_r=4", "num_models=3"])
    assert cfg.learning_rate == 5e-5 and cfg.num_models == 3
    assert cfg.trainer_options == {"warmup_ratio": 0.2, "lora_r": 4}


def test_examples_are_valid_configs() -> None:
    root = Path(__file__).resolve().parents[2] / "examples" / "configs"
    assert RMTrainConfig.from_dict(yaml.safe_load((root / "train_rm.yaml").read_text()))
    assert StrengthConfig.from_dict(yaml.safe_load((root / "strength.yaml").read_text()))


def test_train_rm_command_trains_and_prints_metrics(tiny_encoder_rm, tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(8))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_encoder_rm), "train_file": str(train),
                                      "output_dir": str(tmp_path / "run"), "device": "cpu",
                                      "max_length": 64, "max_steps": 50}))
    result = runner.invoke(app, ["train-rm", "--config", str(config), "--set", "max_steps=2",
                                 "--set", "batch_size=4"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert payload["steps"] == 2 and payload["metrics"]["steps"] == 2
    RewardModel.from_pretrained(payload["model_dir"], device="cpu")


def test_bad_key_exits_with_its_name(tmp_path) -> None:
    result = runner.invoke(app, ["train-rm", "--set", "train_file=x.jsonl", "--set", "lr=1"])
    assert result.exit_code == 2
    assert "lr" in result.output and "unknown" in result.output


def test_dry_run_prints_the_resolved_config_and_help_lists_defaults() -> None:
    result = runner.invoke(app, ["strength", "--set", "train_file=x.jsonl", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_models"] == 5
    helped = runner.invoke(app, ["train-rm", "--help"])
    assert "label_smoothing" in helped.output and "simcse_temperature" in helped.output


def test_strength_command(tiny_encoder_rm, tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(8))
    result = runner.invoke(app, [
        "strength", "--set", f"train_file={train}", "--set", f"model={tiny_encoder_rm}",
        "--set", f"output_dir={tmp_path / 'ens'}", "--set", "num_models=2",
        "--set", "max_steps=1", "--set", "device=cpu", "--set", "max_length=64"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "train.strength.jsonl").is_file()
    assert (tmp_path / "ens" / "strength_summary.png").is_file()


@pytest.mark.parametrize(
    ("command", "assignment", "field"),
    [
        ("train-rm", "learning_rate=-1", "learning_rate"),
        ("strength", "num_models=1", "num_models"),
        ("meta-train", "inner_lr=-1", "inner_lr"),
        ("adapt", "steps=0", "steps"),
        ("metarm", "lr=-1", "learning_rate"),  # lr: MetaRM's old name of learning_rate
        ("dpo", "beta=-1", "beta"),
        ("metarm", "max_steps=1e18", "max_steps"),
        ("train-rm", "epochs=.nan", "epochs"),
    ],
)
def test_every_trainer_refuses_a_bad_value_in_one_error_line(command, assignment, field) -> None:
    result = runner.invoke(app, [command, "--set", "train_file=x.jsonl", "--set", assignment]
                           if command in ("train-rm", "strength") else [command, "--set", assignment])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], result.output


def test_python_m_training_prints_no_traceback_for_a_bad_value() -> None:
    done = subprocess.run([sys.executable, "-m", "training", "metarm", "--set", "lr=-1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: learning_rate") and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_train_rm_under_accelerate_launch_runs_over_both_processes(tiny_encoder_rm, tmp_path) -> None:
    """The hand-off to an existing launcher (what spans several hosts): every process runs the
    command, rank 0 alone prints and writes; the checkpoint and the model are whole."""
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(8))
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "training", "train-rm",
         "--set", f"model={tiny_encoder_rm}", "--set", f"train_file={train}",
         "--set", f"output_dir={run}", "--set", "device=cpu", "--set", "max_steps=4",
         "--set", "batch_size=4", "--set", "checkpoint_every=2", "--collective-timeout", "60"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"model_dir"') == 1, "rank 0 alone prints the result"
    payload = json.loads(done.stdout[done.stdout.index("{"):])
    assert payload["steps"] == 4
    assert (run / "checkpoints" / "step-000000002" / "MANIFEST.json").is_file()
    RewardModel.from_pretrained(payload["model_dir"], device="cpu")
    refused = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "training", "train-rm",
         "--set", f"model={tiny_encoder_rm}", "--set", f"train_file={train}",
         "--set", f"output_dir={tmp_path / 'fsdp'}", "--set", "device=cpu", "--strategy", "fsdp"],
        capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "fsdp needs GPUs" in refused.stderr


def _under_accelerate_launch(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "training", *command,
         "--collective-timeout", "60"],
        capture_output=True, text=True, timeout=300)


def test_dpo_and_meta_train_join_the_process_group_under_a_launcher(tiny_policy, tmp_path) -> None:
    """DPO over both processes: rank 0 alone prints and saves; meta-training with the exact
    hypergradient refuses to run over several processes, saying why."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", sentiment_pairs(6))
    run = tmp_path / "dpo"
    done = _under_accelerate_launch(
        ["dpo", "--set", f"policy={tiny_policy}", "--set", f"pairs_file={pairs}",
         "--set", f"output_dir={run}", "--set", "device=cpu", "--set", "steps=4",
         "--set", "batch_pairs=3", "--set", "lora_r=4", "--set", "checkpoint_every=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"policy_dir"') == 1, "rank 0 alone prints the result"
    payload = json.loads(done.stdout[done.stdout.index("{"):])
    assert [h["step"] for h in payload["history"]] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step-000000002" / "MANIFEST.json").is_file()
    assert (Path(payload["policy_dir"]) / "adapter_config.json").is_file()
    refused = _under_accelerate_launch(["meta-train", "--set", "hypergradient=exact",
                                        "--set", f"output_dir={tmp_path / 'meta'}"])
    assert refused.returncode != 0 and "error: hypergradient exact" in refused.stderr
