"""Configs of the Bradley–Terry trainer and of the strength estimation (torch-free: the API
validates job specs with them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from training.bt.strength_file import default_strength_path
from training.config import (
    MAX_BATCH,
    MAX_STEPS,
    MAX_TOKENS,
    ConfigError,
    Pooling,
    StrList,
    TrainerConfig,
    pooling_field,
)

MarginMode = Literal["none", "fixed", "adaptive"]
FlipMode = Literal["none", "fraction", "negative"]
SIMCSE_NEEDS_ONE_PROCESS = (
    "simcse_weight > 0 contrasts each pair with the other pairs of its batch, so over several "
    "processes each rank would see only its share of the negatives (a different loss); run "
    "SimCSE in one process")


class RMTrainConfig(TrainerConfig):
    """Everything an RM training run needs; every field has a default but ``train_file``."""

    # --- data and model
    train_file: str = Field(description="JSONL of pairs {id?, prompt, chosen, rejected, domain?} "
                            "(TRL's conversational formats too); required")
    eval_file: str | None = Field(None, description="JSONL of held-out pairs: eval_accuracy, "
                                  "per domain, ECE, reward-difference stats")
    model: str = Field("minilm", description="short name, local directory or hub id of the "
                       "backbone or RM (a bare encoder gets a fresh scalar head)")
    pooling: Pooling = pooling_field()
    output_dir: str = Field("runs/train_rm", description="checkpoints/, model/ (the final RM), "
                            "metrics.json")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="tokens per (prompt, "
                            "response); the prompt's start is truncated first")
    # --- optimisation
    epochs: float = Field(1.0, gt=0, le=10_000, description="passes over the training pairs "
                          "(ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="optimizer steps; "
                                  "overrides epochs")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="pairs per micro-batch")
    grad_accum_steps: int = Field(1, ge=1, le=4096, description="micro-batches per optimizer step")
    learning_rate: float = Field(5e-5, gt=0, le=10, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="learning-rate schedule after the warm-up")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps warming up")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 disables it)")
    seed: int = Field(0, ge=0, description="model init (new head, LoRA) and dropout")
    data_seed: int | None = Field(None, ge=0, description="data order; null = seed")
    # --- fine-tuning mode
    finetune: Literal["full", "lora"] = Field("full", description="full fine-tuning, or LoRA "
                                              "merged into a plain model when saved")
    lora_r: int = Field(8, ge=1, le=4096, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    lora_target_modules: StrList | None = Field(
        None, description="LoRA target modules; null = peft's default for the architecture")
    # --- Secrets of RLHF II
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="α of the smoothed BT loss "
                                   "(α ≥ 0.5 would reward preferring the rejected response)")
    smooth_pairs: Literal["negative", "fraction", "all"] = Field(
        "negative", description="which pairs get α: the paper's soft label smooths the pairs "
        "whose strength is negative (negative) or the smoothing_fraction lowest (fraction), "
        "from the strength file; all: every pair (a global α, no strength needed)")
    smoothing_fraction: float = Field(0.1, gt=0, lt=1, description="share of pairs (lowest μ̂) "
                                      "smoothed when smooth_pairs = fraction")
    margin: MarginMode = Field("none", description="none, fixed (margin_value) or adaptive "
                               "(margin_scale × μ̂ from the strength file)")
    margin_value: float = Field(0.0, description="m when margin = fixed")
    margin_scale: float = Field(1.0, description="λ when margin = adaptive: m = λ·μ̂")
    flip: FlipMode = Field("none", description="flip the labels of the lowest-strength pairs: "
                           "fraction (flip_fraction of them) or negative (every μ̂ < 0)")
    flip_fraction: float = Field(0.0, ge=0, lt=1, description="share of pairs (lowest μ̂) to "
                                 "flip when flip = fraction")
    strength_file: str | None = Field(None, description="strength JSONL; null = "
                                      "<train_file stem>.strength.jsonl")
    center_coef: float = Field(0.0, ge=0, description="c of the reward-centering term "
                               "c·E[(r_c + r_r)²]")
    simcse_weight: float = Field(0.0, ge=0, description="β_cl; > 0 adds a second dropout "
                                 "forward pass and the SimCSE term")
    simcse_temperature: float = Field(0.05, gt=0, description="τ of the SimCSE term")
    simcse_representation: Literal["pair", "difference"] = Field(
        "difference", description="SimCSE instances: the paper's difference set "
        "{f_c − f_r, f_r − f_c}, or every response (pair)")
    simcse_dropout: float | None = Field(0.05, ge=0, lt=1, description="dropout of the model's "
                                         "layers while SimCSE trains (the paper's best: 0.05); "
                                         "null: the model's own")
    # --- bookkeeping
    checkpoint_every: int = Field(100, ge=0, le=MAX_STEPS, description="steps between "
                                  "checkpoints (0: only on cancel)")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="complete checkpoints kept")
    eval_every: int = Field(0, ge=0, le=MAX_STEPS, description="steps between evaluations on "
                            "eval_file (0: only at the end)")
    eval_batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="scoring batch")
    reward_stats_max_items: int = Field(4096, ge=1, le=10_000_000, description="training "
                                        "responses scored for reward_mean/reward_std")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    bf16: bool = Field(True, description="bf16 autocast (fp32 master weights) where the "
                       "hardware has bf16 units: GPUs, CPUs with AMX/avx512_bf16")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.train_file:
            raise ValueError("train_file: required (a JSONL of preference pairs)")
        if self.flip == "fraction" and not 0.0 < self.flip_fraction < 1.0:
            raise ValueError(
                f"flip_fraction: must be in (0, 1) when flip='fraction', got {self.flip_fraction}")
        return self

    @property
    def resolved_strength_file(self) -> Path:
        return Path(self.strength_file) if self.strength_file else default_strength_path(self.train_file)

    @property
    def needs_strength(self) -> bool:
        smoothing_by_strength = self.label_smoothing > 0 and self.smooth_pairs != "all"
        return self.margin == "adaptive" or self.flip != "none" or smoothing_by_strength


# Set by the estimation itself for each member; a trainer_options value would be overwritten.
MEMBER_OWNED_KEYS = ("train_file", "output_dir", "seed", "data_seed", "eval_file", "margin", "flip")


class StrengthConfig(TrainerConfig):
    """An ensemble strength estimation; the training knobs are those of ``RMTrainConfig``."""

    train_file: str = Field(description="JSONL of pairs to measure (the ensemble trains on "
                            "these too); required")
    output_file: str | None = Field(None, description="strength JSONL; null = "
                                    "<train_file stem>.strength.jsonl")
    output_dir: str = Field("runs/strength", description="ensemble runs (member-m/) and the "
                            "summary (PNG, JSON, Markdown)")
    num_models: int = Field(5, ge=2, le=100, description="M, the ensemble size (σ̂ needs ≥ 2)")
    seed: int = Field(0, ge=0, description="member m trains with seed + m and data order seed + m")
    model: str = Field("minilm", description="backbone of every member (as train-rm's model)")
    epochs: float = Field(1.0, gt=0, le=10_000, description="member training: passes over the pairs")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="member training: steps")
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="member training: pairs per batch")
    learning_rate: float = Field(5e-5, gt=0, le=10, description="member training: AdamW lr")
    finetune: Literal["full", "lora"] = Field("full", description="member training: full or LoRA")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="tokens per (prompt, response)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    trainer_options: dict[str, Any] = Field(default_factory=dict, description="any other "
                                            "train-rm key for the members")
    score_batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="scoring batch")
    histogram_bins: int = Field(40, ge=1, le=10_000, description="bins of the μ̂ histogram")
    sigma_bins: int = Field(10, ge=1, le=10_000, description="equal-count μ̂ bins of the σ̂ table")
    keep_models: bool = Field(False, description="keep each member's final model (its scores "
                              "are always kept)")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.train_file:
            raise ValueError("train_file: required (a JSONL of preference pairs)")
        clash = sorted(set(MEMBER_OWNED_KEYS) & set(self.trainer_options))
        if clash:
            raise ValueError(f"trainer_options: {clash} are set by the strength job itself")
        self.member_config(0)  # fail now, not after M runs, on a bad trainer option
        return self

    @property
    def resolved_output_file(self) -> Path:
        return Path(self.output_file) if self.output_file else default_strength_path(self.train_file)

    def member_config(self, member: int) -> RMTrainConfig:
        values = {
            "train_file": self.train_file, "model": self.model, "epochs": self.epochs,
            "max_steps": self.max_steps, "batch_size": self.batch_size,
            "learning_rate": self.learning_rate, "finetune": self.finetune,
            "max_length": self.max_length, "device": self.device,
            **self.trainer_options,
            "output_dir": str(Path(self.output_dir) / f"member-{member}"),
            "seed": self.seed + member, "data_seed": self.seed + member,
        }
        try:
            return RMTrainConfig.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"trainer_options: {exc}") from None
