"""Configs of the MetaRM trainer and of the MetaRM rounds of ``/adapt`` (torch-free: the API
validates job specs with them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from training.config import (
    MAX_BATCH,
    MAX_STEPS,
    MAX_TOKENS,
    ConfigError,
    Pooling,
    TrainerConfig,
    pooling_field,
)
from training.oodpl.config import AdaptConfig


class MetaRMConfig(TrainerConfig):
    """Everything a MetaRM run needs; every field has a default except the data."""

    renamed = {"pairs_path": "pairs_file", "samples_path": "samples_file", "lr": "learning_rate",
               "max_input_tokens": "max_length", "apply_at": "update"}
    # the old apply_at values, as update values: phi was the paper's first-order rule, and
    # phi_prime kept the ascent (alternating ascent on J and descent on L_BT)
    APPLY_AT: ClassVar[dict[str, str]] = {"phi": "first_order", "phi_prime": "alternating"}

    model: str = Field("minilm", description="RM to start from: short name (minilm), local "
                       "directory or hub id")
    pooling: Pooling = pooling_field()
    pairs_file: str | None = Field(None, description="source preference pairs (JSONL); X_t is "
                                   "drawn from them. Not needed when the pairs are passed in memory")
    samples_file: str | None = Field(None, description="shifted-distribution samples (JSONL of "
                                     "prompt + responses); X_s is drawn from them. Not needed "
                                     "when passed in memory, or when meta_lr = 0")
    output_dir: str = Field("runs/metarm", description="checkpoints/, model/ (the trained RM), "
                            "metrics.json")

    meta_lr: float = Field(1e-3, ge=0, le=1e3, description="η, the size of the ascent step on "
                           "J; 0 turns MetaRM into vanilla Bradley–Terry")
    responses_per_prompt: int = Field(4, ge=2, le=1024, description="k: responses per meta "
                                      "prompt (a random k when a prompt has more; all of them, "
                                      "if at least 2, when it has fewer)")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="preference pairs per step (|X_t|)")
    meta_batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="meta prompts per step "
                                 "(|X_s|); each brings k responses")
    epochs: float = Field(1.0, gt=0, le=10_000, description="passes over the preference pairs; "
                          "fractional values allowed")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="stop after this many "
                                  "steps even if the epochs are not done")
    update: Literal["first_order", "second_order", "alternating"] = Field(
        "first_order", description="first_order: the paper's rule, φ ← φ − lr·∇L_BT(φ') (the "
        "gradient at φ' = φ + η∇J(φ) applied to φ); second_order: the same rule differentiated "
        "through the ascent, (I + η∇²J)·∇L_BT(φ'); alternating: a different algorithm that "
        "keeps the ascent, φ ← φ' − lr·∇L_BT(φ')")
    standardize: bool = Field(True, description="J on rewards divided by their std on the "
                              "step's source pairs: the ascent cannot raise J by inflating the "
                              "reward scale")
    meta_max_grad_norm: float | None = Field(1.0, gt=0, description="clip of ∇J before the "
                                             "ascent step (an unbounded step can blow the "
                                             "scale up); null: no clip")
    learning_rate: float = Field(1e-5, gt=0, le=10, description="learning rate of the optimizer "
                                 "applying the BT gradient")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or plain sgd "
                                               "(no momentum)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the optimizer")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="linear learning-rate "
                              "warm-up, then constant")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip of the BT gradient (at φ') "
                                        "before it is applied; null disables clipping")
    disable_dropout: bool = Field(True, description="train without dropout (as TRL's "
                                  "RewardTrainer): the ascent and the BT loss see one function")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="RM input tokens per "
                            "(prompt, response)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype (auto: fp32 on CPU, bf16/fp16 on GPU)")
    bf16: bool = Field(True, description="bf16 autocast of fp32 weights where the hardware has "
                       "bf16 units (GPUs, CPUs with AMX)")
    seed: int = Field(0, ge=0, description="data order, k-subsets, head init")
    checkpoint_every: int = Field(100, ge=1, le=MAX_STEPS, description="steps between "
                                  "checkpoints (also written on cancel and at the end)")
    resume: bool = Field(True, description="continue from the newest complete checkpoint in "
                         "output_dir if there is one")
    max_diagnostic_pairs: int = Field(512, ge=1, le=1_000_000, description="source pairs used "
                                      "for the accuracy diagnostic (the first N)")
    max_diagnostic_prompts: int = Field(256, ge=1, le=1_000_000, description="shifted prompts "
                                        "used for the reward-difference diagnostics (the first N)")

    @model_validator(mode="before")
    @classmethod
    def _old_apply_at_values(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("apply_at", "update"):  # before or after the key's own renaming
                if values.get(key) in cls.APPLY_AT:
                    values = {**values, key: cls.APPLY_AT[values[key]]}
        return values

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.model:
            raise ValueError("model: must be a non-empty string")
        return self


# Set per round by the driver; a caller's value for them would be overwritten silently.
DRIVER_OWNED_METARM_KEYS = ("model", "output_dir", "samples_file")


class MetaRMRoundsConfig(TrainerConfig):
    """R rounds of (sample → MetaRM → adapt). ``adapt`` holds ``AdaptConfig`` fields, ``metarm``
    ``MetaRMConfig`` fields (minus model/output_dir/samples_file, which each round sets)."""

    rounds: int = Field(2, ge=1, le=100, description="R")
    adapt: dict[str, Any] = Field(default_factory=dict, description="AdaptConfig fields: domain, "
                                  "policy, reward_model (the starting RM), prompts/task, ...")
    metarm: dict[str, Any] = Field(default_factory=dict, description="MetaRMConfig fields: "
                                   "pairs_file (source preferences), meta_lr, learning_rate, "
                                   "epochs, ...; responses_per_prompt is also the number of "
                                   "policy samples per prompt for the meta set")
    max_meta_prompts: int | None = Field(None, ge=1, le=1_000_000, description="domain prompts "
                                         "sampled for the meta set per round (null: all)")
    output_dir: str = Field("runs/adapt-metarm", description="round-NN/ folders and metrics.json")

    @model_validator(mode="after")
    def _check(self) -> Self:
        renamed = {MetaRMConfig.renamed.get(k, k) for k in self.metarm}
        owned = sorted(renamed & set(DRIVER_OWNED_METARM_KEYS))
        if owned:
            raise ValueError(f"metarm keys set by each round, not by the caller: {', '.join(owned)}")
        # Fail on a bad key or value now, not after round 1's sampling.
        for build in (lambda: self.adapt_config(0), lambda: self.metarm_config(1, "rm", "s.json")):
            try:
                build()
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self

    @classmethod
    def from_adapt_params(
        cls, adapt: Mapping[str, Any], metarm: Mapping[str, Any], output_dir: str
    ) -> MetaRMRoundsConfig:
        """``/adapt`` params: the adapt fields, and ``params.metarm`` = MetaRM fields plus
        optional ``rounds`` and ``max_meta_prompts``."""
        metarm = dict(metarm)
        extra = {k: metarm.pop(k) for k in ("rounds", "max_meta_prompts") if k in metarm}
        return cls.from_dict({"adapt": dict(adapt), "metarm": metarm, "output_dir": output_dir,
                              **extra})

    def round_dir(self, round_index: int) -> Path:
        return Path(self.output_dir) / f"round-{round_index:02d}"

    def adapt_config(self, round_index: int, reward_model: str | None = None) -> AdaptConfig:
        values = dict(self.adapt)
        values["output_dir"] = str(self.round_dir(round_index) / "policy")
        if reward_model is not None:
            values["reward_model"] = reward_model
        if round_index < self.rounds:
            values["merge"] = False  # later rounds continue training the adapter
        return AdaptConfig.from_dict(values)

    def metarm_config(self, round_index: int, model: str, samples_file: str) -> MetaRMConfig:
        values = {"device": self.adapt.get("device", "auto"), "seed": self.adapt.get("seed", 0)}
        values.update(self.metarm)
        values.update(
            model=model,
            output_dir=str(self.round_dir(round_index) / "rm"),
            samples_file=samples_file,
        )
        return MetaRMConfig.from_dict(values)
