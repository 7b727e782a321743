"""Job kind ``sleep_steps``: a torch-free job for exercising the job machinery itself.

Enabled only with ``GENERALRM_ENABLE_DIAGNOSTIC_JOBS=1``. It counts ``steps`` steps of
``step_seconds`` each, checkpointing the counter after every step in the same layout as
``training.checkpoint`` (``checkpoints/step-N/MANIFEST.json``, renamed into place), so a
restarted job resumes from the last completed step. ``crash_at_step`` makes its worker
process die (``os._exit``) on reaching that step, on every attempt: a poison job.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from training.callbacks import TrainingCancelled
from worker.specs import (
    JobContext,
    JobOutcome,
    SleepStepsSpec,
    ValidationContext,
    latest_checkpoint_step,
)

KIND = SleepStepsSpec.kind


def validate(raw: Any, ctx: ValidationContext) -> dict[str, Any]:
    return SleepStepsSpec.parse(raw).model_dump(exclude={"params"})


def _save_counter(run_dir: Path, step: int) -> None:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f"step-{step:09d}.tmp", root / f"step-{step:09d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "MANIFEST.json").write_text(json.dumps({"step": step, "created_at": time.time()}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.iterdir() if p.name < final.name and not p.name.endswith(".tmp")):
        shutil.rmtree(old, ignore_errors=True)


def run(ctx: JobContext) -> JobOutcome:
    spec = ctx.spec
    total = spec["steps"]
    start = latest_checkpoint_step(ctx.run_dir)
    for step in range(start + 1, total + 1):
        if ctx.callback.should_stop():
            raise TrainingCancelled(step - 1, str(ctx.run_dir / "checkpoints"))
        if spec["crash_at_step"] == step:
            os._exit(1)  # the whole worker process dies, like an OOM kill
        time.sleep(spec["step_seconds"])
        _save_counter(ctx.run_dir, step)
        ctx.callback.on_progress(step, total, {"counter": float(step)})
    return JobOutcome(metrics={"steps": total, "resumed_from_step": start},
                      artifacts={"run_dir": str(ctx.run_dir)})
