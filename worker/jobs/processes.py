"""How a job's trainer runs: in the job's own process, or over ``resources.processes``
processes on this worker's host (``training.launch``: ``accelerate launch``; progress and
cancel are relayed through files by this process, which alone talks to Redis).

A launch that loses a rank raises ``training.launch.RanksLost``, which the job's execution
treats as it treats a dead worker (another attempt from the last checkpoint, up to the cap);
a rank's own error fails the job at once, as in one process.
"""

from __future__ import annotations

from typing import Any

from training.config import TrainerConfig
from training.launch import LaunchPlan, launch, trainer_class
from worker.specs import JobContext, Resources

LAUNCH_DIR = "launch"  # the channel, under the job's run directory


def run_trainer(trainer: str, config: TrainerConfig, resources: Resources,
                ctx: JobContext) -> Any:
    """``trainer`` (a ``training.launch.TRAINERS`` key) on ``config``: its result."""
    if resources.processes == 1:
        return trainer_class(trainer)(config, callback=ctx.callback).train()
    plan = LaunchPlan(processes=resources.processes, strategy=resources.strategy,
                      device=getattr(config, "device", "auto"),
                      collective_timeout_seconds=ctx.settings.job_collective_timeout_seconds)
    return launch(trainer, config, plan, ctx.run_dir / LAUNCH_DIR, callback=ctx.callback,
                  on_ranks=ctx.record_ranks)
