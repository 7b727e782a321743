"""Job kind ``strength``: preference strength of every training pair from an RM ensemble.

Spec (``worker.specs.StrengthSpec``)::

    {"train_file": "prefs.train.jsonl",        # relative to the data directory (required)
     "output_file": "prefs.train.strength.jsonl",  # where to write it, inside the data dir
                                               # (default: next to train_file, which is where
                                               # train_rm's flip / adaptive margin look)
     "model": "minilm",                        # ensemble backbone
     "params": {"num_models": 5, ...}}         # any StrengthConfig field but the above

Writes the strength JSONL atomically and the summary (PNG, JSON, Markdown) into the job's
directory; publishes no model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from training.bt.config import StrengthConfig
from training.bt.strength_file import default_strength_path
from training.registry import resolve_model
from worker.jobs.checks import (
    check_model_reference,
    check_params,
    preference_file,
    trainer_config,
    validation_output_dir,
)
from worker.specs import JobContext, JobOutcome, SpecError, StrengthSpec, ValidationContext

KIND = StrengthSpec.kind
SET_BY_SPEC = ("train_file", "output_file", "output_dir", "model")


def _output_path(spec: StrengthSpec, train: Path, data_dir: Path) -> Path:
    if spec.output_file is None:
        target = default_strength_path(train)
    else:
        target = (data_dir / spec.output_file).resolve()
    if not target.is_relative_to(data_dir.resolve()):
        raise SpecError(f"output_file: {target} is outside the data directory {data_dir}")
    if not os.access(target.parent, os.W_OK):
        raise SpecError(
            f"output_file: {target.parent} is not writable (a read-only data mount?); give an "
            "output_file in a writable folder of the data directory"
        )
    return target


def _config(spec: StrengthSpec, data_dir: Path, output_dir: Path, model: str) -> StrengthConfig:
    params = check_params(spec.params, SET_BY_SPEC)
    train = preference_file(spec.train_file, "train_file", data_dir)
    output = _output_path(spec, train, data_dir)
    return trainer_config(StrengthConfig, {**params, "train_file": str(train),
                                           "output_file": str(output),
                                           "output_dir": str(output_dir), "model": model})


def validate(raw: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = StrengthSpec.parse(raw)
    _config(spec, ctx.settings.resolved_data_dir, validation_output_dir(ctx.settings), spec.model)
    check_model_reference("model", spec.model, ctx.settings)
    return spec.model_dump()


def run(ctx: JobContext) -> JobOutcome:
    # deferred: the trainer imports torch, which only the job's own process may load
    from training.bt.strength import StrengthTrainer

    spec = StrengthSpec.parse(ctx.spec)
    data_dir = ctx.settings.resolved_data_dir
    base = resolve_model(spec.model, ctx.settings.artifacts_dir)
    config = _config(spec, data_dir, ctx.run_dir, base.path)
    if "device" not in spec.params:
        config.device = ctx.settings.device
    result = StrengthTrainer(config, callback=ctx.callback).train()
    metrics = {k: v for k, v in result.summary.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    ctx.ensure_owner()
    return JobOutcome(
        metrics=metrics,
        artifacts={
            "strength_file": str(Path(config.resolved_output_file).relative_to(data_dir.resolve())),
            "summary_png": str(result.summary_png),
            "summary_markdown": str(result.summary_markdown),
            "summary_json": str(result.summary_json),
            "run_dir": str(ctx.run_dir),
        },
    )
