"""What a run of the OOD benchmark does: its methods and every size and knob (``Settings``)."""

from __future__ import annotations

from dataclasses import dataclass

from bench.metarm_rows import VARIANTS as METARM_VARIANTS

METHODS = ("base", "dpo", "bt", "meta", *METARM_VARIANTS)
# The OOD-PL table (issue 6). The MetaRM rows (issue 7) are opt-in through --methods: each
# costs R rounds of sampling, RM updates and adaptation per held-out domain.
DEFAULT_METHODS = ("base", "dpo", "bt", "meta")


@dataclass
class Settings:
    tasks: tuple[str, ...] = ("csg", "ka")
    seeds: tuple[int, ...] = (0, 1, 2)
    policy: str = "smollm2-135m"
    reward_model: str = "minilm"
    bench_root: str | None = None  # None: the installed benchmark (benchdata)
    work_dir: str = "artifacts/bench/ood"
    source_domains: int = 6  # how many source domains (first N of the task's list)
    heldout_domains: int = 4  # how many held-out domains
    # meta-training (and the same budget for BT and DPO). Sized for an hour for the OOD-PL
    # table on 2 cores: measured 60 min with --jobs 2 (a KA seed takes ~23 min and a CSG seed
    # ~14.5 min on one core, README)
    outer_steps: int = 16
    inner_steps: int = 1
    # α = 0.1 with per-token-mean margins in ℓ_PL: with summed log-probs (DESIGN's A) the
    # margins are tens of nats apart and meta-training leaves the outer loss flat (README)
    inner_lr: float = 1e-1
    pl_length_normalized: bool = True
    outer_lr: float = 3e-4  # AdamW lr of φ, for BT and meta alike
    beta: float = 0.1  # MiniLM rewards move by O(0.1) in short runs: β = 1 leaves w ≈ uniform
    responses_per_prompt: int = 4
    inner_batch_prompts: int = 2
    outer_batch_pairs: int = 8
    directional: str = "fd"  # two forward passes; jvp costs ~3-6x more on CPU
    dpo_beta: float = 0.1
    dpo_lr: float = 5e-4
    lora_r: int = 8
    # adaptation
    adapt_prompts: int = 8
    adapt_steps: int = 12
    adapt_lr: float = 5e-4
    adapt_batch_prompts: int = 4
    # evaluation
    eval_prompts: int = 6
    eval_responses: int = 2
    eval_pairs: int = 32
    # MetaRM rows (issue 7)
    metarm_rounds: int = 2
    metarm_steps: int = 6  # RM steps per round (MetaRM and vanilla alike)
    metarm_meta_lr: float = 0.1  # η (the README's toy value)
    metarm_meta_prompts: int = 8  # domain prompts sampled per round (k responses each)
    metarm_meta_batch: int = 2  # meta prompts per step
    metarm_diag_pairs: int = 128  # source pairs for the accuracy diagnostic

    @classmethod
    def quick(cls) -> Settings:
        return cls(seeds=(0,), source_domains=4, heldout_domains=2, outer_steps=16,
                   outer_batch_pairs=4, adapt_prompts=8, adapt_steps=12, adapt_batch_prompts=2,
                   eval_prompts=4, eval_responses=2, eval_pairs=16, metarm_rounds=2, metarm_steps=4,
                   metarm_meta_prompts=4, metarm_diag_pairs=32)
