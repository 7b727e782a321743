"""Config of the preference-file evaluation (``python -m training evaluate``, job kind
``evaluate``); torch-free, as the API validates job specs with it."""

from __future__ import annotations

from pydantic import Field

from training.config import MAX_BATCH, MAX_TOKENS, TrainerConfig


class EvalConfig(TrainerConfig):
    """Score every pair of a preference file with one reward model and report accuracy."""

    eval_file: str = Field(description="JSONL (or JSON list) of pairs {prompt, chosen, rejected, "
                           "subset?, id?}: RewardBench rows, or TRL's formats; required")
    model: str = Field("minilm", description="short name, local directory or hub id of the RM")
    output_dir: str = Field("runs/evaluate", description="metrics.json and scores.jsonl (the "
                            "two rewards of every pair)")
    subset_field: str = Field("subset", description="row field that groups pairs; rows without "
                              "it fall back to 'domain'")
    max_length: int = Field(512, ge=8, le=MAX_TOKENS, description="tokens per (prompt, "
                            "response); the prompt's start is truncated first")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH, description="scoring batch")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
