"""Configs of OOD-PL meta-training, meta-test adaptation and the DPO baseline (torch-free:
the API validates job specs with them)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Self

from pydantic import Field, model_validator

from training.config import MAX_BATCH, MAX_STEPS, MAX_TOKENS, StrList, TrainerConfig

Hypergradient = Literal["auto", "precomputed", "first_order", "exact"]
OuterMargin = Literal["reference", "sum", "per_token"]
Directional = Literal["jvp", "fd"]
Dtype = Literal["auto", "float32", "float64", "bfloat16", "float16"]

# Over several processes (a job's resources.processes > 1, or the CLI under a launcher)
EXACT_NEEDS_ONE_PROCESS = (
    "hypergradient exact differentiates through the unrolled inner loop, whose every step "
    "needs the gradient of the whole inner batch inside the autograd graph; it is for small "
    "models and gradient checks: run it in one process, or use precomputed (D = 1) or "
    "first_order over several")


def replicated_only(what: str) -> str:
    """Why ``what`` refuses strategy fsdp: it keeps a whole replica of its models on every
    process."""
    return (f"{what} keeps a whole replica of its models on every process (DDP): use strategy "
            "ddp (fsdp shards train_rm's full fine-tuning only)")


class MetaTrainConfig(TrainerConfig):
    """OOD-PL meta-training. Every field has a default; data come from ``task`` (benchmark),
    ``samples_file`` + ``pairs_file`` (JSONL with a ``domain`` field), or in-memory tasks."""

    renamed = {"pl_length_normalized": "outer_margin"}
    # the old boolean's values as outer_margin values
    LENGTH_NORMALIZED: ClassVar[dict[bool, str]] = {True: "per_token", False: "sum"}

    # --- models
    reward_model: str = Field("minilm", description="φ: short name, directory or hub id of "
                              "any reward model")
    policy: str = Field("smollm2-135m", description="π_θ: any causal LM")
    policy_lora_r: int = Field(8, ge=0, le=4096, description="LoRA rank of θ; 0 = θ is every "
                               "policy parameter (full fine-tuning)")
    policy_lora_alpha: int = Field(16, ge=1, description="LoRA alpha of θ")
    policy_lora_targets: StrList | None = Field(None, description="LoRA target modules; null = "
                                                "peft's default for the architecture")
    chat_template: bool | None = Field(None, description="render prompts with the policy's chat "
                                       "template; null = if it has one")
    # --- data
    task: str | None = Field(None, description="benchmark task (csg, ka) under bench_root")
    bench_root: str | None = Field(None, description="benchmark root; null = the installed "
                                   "benchmark (benchdata)")
    domains: StrList | None = Field(None, description="source domains to use; null = all the "
                                    "task's source domains")
    samples_file: str | None = Field(None, description="instead of task: JSONL of D_xy rows "
                                     "{prompt, responses, domain}")
    pairs_file: str | None = Field(None, description="instead of task: JSONL of D_PL pairs "
                                   "{prompt, chosen, rejected, domain}")
    split: Literal["train", "test"] = Field("train", description="benchmark part for D_xy and D_PL")
    # --- bilevel schedule
    outer_steps: int = Field(100, ge=1, le=MAX_STEPS, description="K")
    inner_steps: int = Field(1, ge=1, le=1000, description="D")
    inner_lr: float = Field(1e-3, gt=0, le=1e3, description="α (plain SGD on the weighted "
                            "log-likelihood)")
    outer_lr: float = Field(1e-5, gt=0, le=10, description="AdamW learning rate of φ")
    beta: float = Field(1.0, gt=0, le=1e6, description="β in w ∝ exp(r_φ/β)")
    responses_per_prompt: int = Field(4, ge=1, le=1024, description="responses of one prompt "
                                      "in an inner batch")
    inner_batch_prompts: int = Field(4, ge=1, le=MAX_BATCH, description="prompts per inner step")
    outer_batch_pairs: int = Field(8, ge=1, le=MAX_BATCH, description="pairs per outer loss")
    carry: bool = Field(False, description="keep θ_D as the next θ_0 instead of resetting")
    task_sampling: Literal["random", "round_robin"] = Field(
        "random", description="how an outer step picks its source task")
    # --- hypergradient
    hypergradient: Hypergradient = Field(
        "auto", description="precomputed: per source domain G_i = ∇θ ℓ_PL,i(θ_0) once and each "
        "sample's coefficient once, a meta step then costs about a BT step (D = 1 without "
        "carry only); first_order: the coefficients from g at θ_D every step; exact: "
        "unrolled (small models and gradient checks); auto: precomputed where defined, else "
        "first_order")
    precompute_pairs: int = Field(256, ge=1, le=1_000_000, description="pairs of each source "
                                  "domain in G_i (precomputed; a seeded sample)")
    hypergradient_checks: int = Field(2, ge=0, le=1000, description="precomputed: outer steps on "
                                      "which the shortcut is compared with the exact "
                                      "hypergradient at the end of training (cosine, reported)")
    directional: Directional = Field("jvp", description="⟨∇θ log π, g⟩ by forward-mode AD "
                                     "(jvp) or central finite difference (fd)")
    fd_eps: float = Field(1e-3, gt=0, le=1, description="norm of the finite-difference step along g")
    bt_weight: float = Field(0.0, ge=0, description="> 0 adds bt_weight × a Bradley–Terry loss "
                             "of r_φ on the outer pairs")
    outer_margin: OuterMargin = Field(
        "reference", description="the margin in ℓ_PL = −log σ(margin): reference = A(θ) − "
        "A(θ_0), as in DPO (0 at θ_0, no saturation, no length bias); sum = A from summed "
        "log-probs (real responses are tens of nats apart and saturate σ); per_token = A from "
        "per-token means (favours short responses)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay of φ")
    max_grad_norm: float = Field(1.0, ge=0, description="clip of φ's hypergradient; 0 disables")
    # --- lengths
    rm_max_tokens: int = Field(256, ge=8, le=MAX_TOKENS, description="RM input length (the "
                               "prompt's start truncated first)")
    max_prompt_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="policy prompt length")
    max_response_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="policy response length")
    # --- bookkeeping
    output_dir: str = Field("runs/meta_train", description="checkpoints/, model/ (the trained "
                            "RM), metrics.json")
    artifacts_dir: str = Field("artifacts", description="where short model names are cached")
    checkpoint_every: int = Field(50, ge=0, le=MAX_STEPS, description="outer steps between "
                                  "checkpoints (0: only on cancel and at the end)")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="complete checkpoints kept")
    eval_every: int = Field(0, ge=0, le=MAX_STEPS, description="outer steps between evaluations "
                            "(0: before and after only)")
    eval_pairs: int = Field(32, ge=1, le=1_000_000, description="pairs per task in an evaluation")
    seed: int = Field(0, ge=0, description="seed of every random choice")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype: auto = fp32 on CPU; float64 for gradient checks")
    bf16: bool = Field(True, description="bf16 autocast of fp32 weights where the hardware has "
                       "bf16 units (GPUs, CPUs with AMX); the finite-difference directional "
                       "derivative stays fp32")

    @model_validator(mode="before")
    @classmethod
    def _old_length_normalized_values(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for key in ("pl_length_normalized", "outer_margin"):  # before or after renaming
                if isinstance(values.get(key), bool):
                    values = {**values, key: cls.LENGTH_NORMALIZED[values[key]]}
        return values

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.hypergradient == "precomputed" and (self.inner_steps != 1 or self.carry):
            raise ValueError("hypergradient: precomputed needs inner_steps = 1 and carry off "
                             "(the coefficients depend on θ_0 only there); use first_order")
        if (self.samples_file is None) != (self.pairs_file is None):
            raise ValueError("samples_file and pairs_file: give both or neither")
        if self.task is not None and self.samples_file is not None:
            raise ValueError("task: give a benchmark task or samples_file/pairs_file, not both")
        return self


def resolve_hypergradient(config: MetaTrainConfig) -> str:
    """``auto`` → precomputed where it is defined (D = 1, θ reset to θ_0), else first_order."""
    if config.hypergradient != "auto":
        return config.hypergradient
    return "precomputed" if config.inner_steps == 1 and not config.carry else "first_order"


class AdaptConfig(TrainerConfig):
    """Meta-test adaptation. Prompts come from ``prompts``, ``prompts_file`` (JSONL rows with
    ``prompt``, optionally ``responses``), the benchmark (``task`` + ``domain``), or the
    ``Adapter(prompts=...)`` argument."""

    domain: str = Field("custom", description="the new domain's name (lineage; the benchmark "
                        "domain when task is set)")
    # --- models
    policy: str = Field("smollm2-135m", description="the reference policy π_ref")
    reward_model: str = Field("minilm", description="r_φ, frozen")
    lora_r: int = Field(8, ge=0, le=4096, description="LoRA rank; 0 = full fine-tuning")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha")
    lora_targets: StrList | None = Field(None, description="LoRA target modules; null = peft's "
                                         "default for the architecture")
    chat_template: bool | None = Field(None, description="render prompts with the policy's chat "
                                       "template; null = if it has one")
    merge: bool = Field(False, description="save a merged full model instead of the LoRA adapter")
    # --- data
    prompts: list[str] | None = Field(None, description="the domain's prompts, inline")
    prompts_file: str | None = Field(None, description="JSONL of {prompt[, responses]} rows")
    pairs_file: str | None = Field(None, description="the domain's preference pairs (PL accuracy)")
    task: str | None = Field(None, description="benchmark task; prompts from samples(domain, split)")
    bench_root: str | None = Field(None, description="benchmark root; null = the installed "
                                   "benchmark (benchdata)")
    split: Literal["train", "test"] = Field("train", description="benchmark part for the "
                                            "prompts; pairs always from test")
    max_prompts: int | None = Field(None, ge=1, le=10_000_000, description="cap on the domain's "
                                    "prompts read (training and held-out)")
    use_given_responses: bool = Field(False, description="use the data's responses as the draws "
                                      "from p (no sampling)")
    # --- sampling from the reference policy
    responses_per_prompt: int = Field(4, ge=1, le=1024, description="k")
    max_new_tokens: int = Field(48, ge=1, le=MAX_TOKENS, description="sampling length")
    temperature: float = Field(1.0, ge=0, le=100, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    sample_batch_size: int = Field(16, ge=1, le=MAX_BATCH, description="sequences per "
                                   "generate() call")
    # --- optimisation
    beta: float = Field(1.0, gt=0, le=1e6, description="β in w ∝ exp(r_φ/β)")
    steps: int = Field(50, ge=1, le=MAX_STEPS, description="N optimizer steps")
    learning_rate: float = Field(1e-4, gt=0, le=10, description="optimizer learning rate")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd")
    batch_prompts: int = Field(4, ge=1, le=MAX_BATCH, description="prompts (each with its k "
                               "responses) per step")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clip; 0 disables it")
    # --- evaluation
    eval_holdout: float = Field(0.2, ge=0, lt=1, description="share of the domain's prompts held "
                                "out of training (seeded; at least one when there are >= 2 "
                                "prompts and the share is > 0); reward, gold and KL are reported "
                                "on them, the in-sample numbers as train_*")
    eval_prompts: int = Field(16, ge=0, le=1_000_000, description="held-out prompts, and training "
                              "prompts, for the before/after reward and KL (fresh samples)")
    eval_responses_per_prompt: int = Field(2, ge=1, le=1024, description="fresh samples per "
                                           "evaluation prompt")
    eval_pairs: int = Field(64, ge=0, le=1_000_000, description="pairs for PL accuracy")
    eval_before: bool = Field(True, description="also evaluate the reference (*_before metrics)")
    # --- lengths
    rm_max_tokens: int = Field(256, ge=8, le=MAX_TOKENS, description="RM input length")
    max_prompt_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="policy prompt length")
    max_response_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="policy response length")
    # --- bookkeeping
    output_dir: str = Field("runs/adapt", description="checkpoints/, model/ (the adapted "
                            "policy), metrics.json")
    artifacts_dir: str = Field("artifacts", description="where short model names are cached")
    checkpoint_every: int = Field(25, ge=0, le=MAX_STEPS, description="steps between "
                                  "checkpoints (0: only on cancel); draws and weights are "
                                  "checkpointed, so a resume never samples again")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="complete checkpoints kept")
    seed: int = Field(0, ge=0, description="sampling and data order")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype")
    bf16: bool = Field(True, description="bf16 autocast of fp32 weights where the hardware has "
                       "bf16 units (GPUs, CPUs with AMX)")

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.prompts is not None and not all(p.strip() for p in self.prompts):
            raise ValueError("prompts: every prompt must be a non-empty string")
        if self.responses_per_prompt < 2 and not self.use_given_responses:
            # one response per prompt makes every weight 1: plain SFT on the policy's own samples
            raise ValueError("responses_per_prompt: must be >= 2 for the weights to mean anything")
        return self


class DPOConfig(TrainerConfig):
    """DPO on preference pairs from ``pairs_file``, a benchmark ``task``'s source domains,
    or the ``DPOTrainer(pairs=...)`` argument."""

    policy: str = Field("smollm2-135m", description="the policy (also π_ref, its initial state)")
    lora_r: int = Field(8, ge=0, le=4096, description="LoRA rank; 0 = full fine-tuning")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha")
    lora_targets: StrList | None = Field(None, description="LoRA target modules; null = peft's "
                                         "default")
    chat_template: bool | None = Field(None, description="render prompts with the policy's chat "
                                       "template; null = if it has one")
    merge: bool = Field(False, description="save a merged full model instead of the adapter")
    pairs_file: str | None = Field(None, description="JSONL of preference pairs")
    task: str | None = Field(None, description="benchmark task: pooled pairs of its source domains")
    bench_root: str | None = Field(None, description="benchmark root; null = the installed "
                                   "benchmark (benchdata)")
    domains: StrList | None = Field(None, description="subset of the source domains")
    split: Literal["train", "test"] = Field("train", description="benchmark part")
    beta: float = Field(0.1, gt=0, le=1e6, description="β of the DPO loss")
    steps: int = Field(100, ge=1, le=MAX_STEPS, description="optimizer steps")
    batch_pairs: int = Field(8, ge=1, le=MAX_BATCH, description="pairs per step")
    learning_rate: float = Field(5e-5, gt=0, le=10, description="optimizer learning rate")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw or sgd")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clip; 0 disables it")
    max_prompt_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="policy prompt length")
    max_response_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="policy response length")
    output_dir: str = Field("runs/dpo", description="checkpoints/, model/, metrics.json")
    artifacts_dir: str = Field("artifacts", description="where short model names are cached")
    checkpoint_every: int = Field(50, ge=0, le=MAX_STEPS, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="complete checkpoints kept")
    seed: int = Field(0, ge=0, description="data order, LoRA init")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype")
    bf16: bool = Field(True, description="bf16 autocast of fp32 weights where the hardware has "
                       "bf16 units (GPUs, CPUs with AMX)")
