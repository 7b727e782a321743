"""What the Bradley–Terry trainers return (torch-free: a result of a run launched over several
processes reaches the launching process as JSON, see ``training.launch``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RMTrainResult:
    model_dir: Path  # final RM (safetensors + tokenizer), loadable with RewardModel.from_pretrained
    metrics: dict[str, Any]  # eval_* (with eval_file), train_loss, reward_mean, reward_std, steps, ...
    steps: int


@dataclass
class StrengthResult:
    strength_file: Path  # the per-pair JSONL
    summary: dict[str, Any]  # the table (also in summary_json)
    summary_json: Path
    summary_markdown: Path
    summary_png: Path
    member_metrics: list[dict[str, Any]]
