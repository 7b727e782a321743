"""What the OOD-PL meta-trainer and the DPO baseline return (torch-free: a result of a run
launched over several processes reaches the launching process as JSON, see
``training.launch``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class MetaTrainResult:
    output_dir: str
    rm_dir: str  # the meta-trained RM, loadable with RewardModel.from_pretrained
    steps: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)  # for the registry (generalrm.json)


@dataclass
class DPOResult:
    output_dir: str
    policy_dir: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
