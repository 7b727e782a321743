"""Job kind ``strength``: preference strength of every training pair from an RM ensemble.

Spec::

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

from training.registry import resolve_model
from worker.jobs.common import (
    check_model_reference,
    check_params,
    config_errors_as_spec_errors,
    required_preference_file,
    validation_output_dir,
)
from worker.specs import (
    JobContext,
    JobOutcome,
    SpecError,
    ValidationContext,
    resolve_data_path,
    spec_with_defaults,
)

KIND = "strength"
SPEC_KEYS = ("train_file", "output_file", "model", "params")
SET_BY_SPEC = ("train_file", "output_file", "output_dir", "model")
DEFAULTS = {"model": "minilm", "params": {}, "output_file": None}


def _output_path(spec: dict[str, Any], train: Path, data_dir: Path) -> Path:
    from training.strength import default_strength_path

    if spec["output_file"] is None:
        target = default_strength_path(train)
    else:
        if not isinstance(spec["output_file"], str) or not spec["output_file"].strip():
            raise SpecError("output_file: give a path relative to the data directory")
        target = (data_dir / spec["output_file"]).resolve()
    if not target.is_relative_to(data_dir.resolve()):
        raise SpecError(f"output_file: {target} is outside the data directory {data_dir}")
    if not os.access(target.parent, os.W_OK):
        raise SpecError(
            f"output_file: {target.parent} is not writable (a read-only data mount?); give an "
            "output_file in a writable folder of the data directory"
        )
    return target


def _config_values(spec: dict[str, Any], train: Path, output: Path, run_dir: Path, model: str) -> dict:
    return {**spec["params"], "train_file": str(train), "output_file": str(output),
            "output_dir": str(run_dir), "model": model}


def validate(spec: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = spec_with_defaults(spec, KIND, DEFAULTS, SPEC_KEYS)
    data_dir = ctx.settings.resolved_data_dir
    train = required_preference_file(spec, "train_file", data_dir)
    output = _output_path(spec, train, data_dir)
    check_model_reference("model", spec["model"], ctx.settings)
    check_params(spec, SET_BY_SPEC, "StrengthConfig")
    from training.strength import StrengthConfig

    with config_errors_as_spec_errors():
        StrengthConfig.from_dict(_config_values(
            spec, train, output, validation_output_dir(ctx.settings), spec["model"]))
    return spec


def run(ctx: JobContext) -> JobOutcome:
    from training.strength import StrengthConfig, StrengthTrainer

    spec = ctx.spec
    data_dir = ctx.settings.resolved_data_dir
    train = resolve_data_path(spec["train_file"], "train_file", data_dir)
    output = _output_path(spec, train, data_dir)
    base = resolve_model(spec["model"], ctx.settings.artifacts_dir)
    values = _config_values(spec, train, output, ctx.run_dir, base.path)
    values.setdefault("device", ctx.settings.device)
    result = StrengthTrainer(StrengthConfig.from_dict(values), callback=ctx.callback).train()
    summary = result.summary
    metrics = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    ctx.ensure_owner()
    return JobOutcome(
        metrics=metrics,
        artifacts={
            "strength_file": str(output.relative_to(data_dir.resolve())),
            "summary_png": str(result.summary_png),
            "summary_markdown": str(result.summary_markdown),
            "summary_json": str(result.summary_json),
            "run_dir": str(ctx.run_dir),
        },
    )
