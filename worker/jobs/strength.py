"""Job kind ``strength``: preference strength of every training pair from an RM ensemble.

Spec (``worker.specs.StrengthSpec``)::

    {"train_file": "prefs.train.jsonl",        # relative to the data directory (required)
     "output_file": "prefs.train.strength.jsonl",  # where to write it, inside the data dir
                                               # (default: next to train_file, which is where
                                               # train_rm's flip / adaptive margin look)
     "model": "minilm",                        # ensemble backbone
     "resources": {"processes": 2},            # optional: each member trains over them (ddp)
     "params": {"num_models": 5, ...}}         # any StrengthConfig field but the above

Writes the strength JSONL and the summary (PNG, JSON, Markdown) into the job's directory,
then copies the JSONL to ``output_file`` in the data directory. A job never writes over a file:
``output_file`` must not exist (checked at submission, and again atomically when written), so
an input, or a strength file another run made, cannot be destroyed. Publishes no model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from training.atomic import create_file_atomic
from training.bt.config import SIMCSE_NEEDS_ONE_PROCESS, StrengthConfig
from training.bt.strength_file import default_strength_path
from training.registry import resolve_verified
from worker.jobs.checks import (
    check_model_reference,
    check_params,
    check_resources,
    data_path,
    preference_file,
    relative,
    trainer_config,
    validation_output_dir,
)
from worker.jobs.processes import run_trainer
from worker.specs import JobContext, JobOutcome, SpecError, StrengthSpec, ValidationContext

KIND = StrengthSpec.kind
RUN_FILE = "strength.jsonl"  # the job's own copy, in its run directory
SET_BY_SPEC = ("train_file", "output_file", "output_dir", "model")
STRENGTH_REPLICATED = ("fsdp is for train_rm; the strength ensemble scores pairs with a whole "
                       "replica of each member on every process: use strategy ddp")


def _output_path(spec: StrengthSpec, train: Path, data_dir: Path) -> Path:
    """Where the strength file goes in the data directory: a new file, never an existing one."""
    if spec.output_file is None:
        target = default_strength_path(train)
    else:
        target = data_path(spec.output_file, "output_file", data_dir)
    name = relative(target, data_dir)
    if target.exists():
        raise SpecError(f"output_file: {name} already exists in the data directory; a job never "
                        "writes over a file: give a new output_file, or delete the old one")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise SpecError(
            f"output_file: the folder of {name} is missing or not writable (a read-only data "
            "mount?); give an output_file in a writable folder of the data directory")
    return target


def _config(spec: StrengthSpec, data_dir: Path, output_dir: Path, model: str) -> StrengthConfig:
    params = check_params(spec.params, SET_BY_SPEC)
    train = preference_file(spec.train_file, "train_file", data_dir)
    return trainer_config(StrengthConfig, {**params, "train_file": str(train),
                                           "output_file": str(output_dir / RUN_FILE),
                                           "output_dir": str(output_dir), "model": model})


def validate(raw: Any, ctx: ValidationContext) -> dict[str, Any]:
    spec = StrengthSpec.parse(raw)
    data_dir = ctx.settings.resolved_data_dir
    config = _config(spec, data_dir, validation_output_dir(ctx.settings), spec.model)
    member = config.member_config(0)
    check_resources(spec.resources, ctx.settings,
                    device=spec.params.get("device", ctx.settings.device),
                    batches={"batch_size": member.batch_size}, finetune=member.finetune,
                    replicated_reason=STRENGTH_REPLICATED,
                    single_process_reason=SIMCSE_NEEDS_ONE_PROCESS if member.simcse_weight else None)
    _output_path(spec, Path(config.train_file), data_dir)
    check_model_reference("model", spec.model, ctx.settings)
    return spec.model_dump()


def run(ctx: JobContext) -> JobOutcome:
    spec = StrengthSpec.parse(ctx.spec)
    data_dir = ctx.settings.resolved_data_dir
    base = resolve_verified(spec.model, ctx.settings.artifacts_dir)
    config = _config(spec, data_dir, ctx.run_dir, base.path)
    if "device" not in spec.params:
        config.device = ctx.settings.device
    target = default_strength_path(config.train_file) if spec.output_file is None else \
        data_path(spec.output_file, "output_file", data_dir)
    result = run_trainer("strength", config, spec.resources, ctx)
    metrics = {k: v for k, v in result.summary.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    ctx.before_publish()
    try:  # no-clobber: the same bytes again (a resumed job) are fine, anything else is refused
        create_file_atomic(target, Path(config.output_file).read_bytes())
    except FileExistsError:
        raise RuntimeError(f"output_file {relative(target, data_dir)} appeared in the data "
                           "directory after submission; the strength file is kept in the job's "
                           f"directory ({config.output_file}) and nothing was overwritten") from None
    return JobOutcome(
        metrics=metrics,
        artifacts={
            "strength_file": relative(target, data_dir),
            "summary_png": str(result.summary_png),
            "summary_markdown": str(result.summary_markdown),
            "summary_json": str(result.summary_json),
            "run_dir": str(ctx.run_dir),
        },
    )
