"""Training CLI: ``python -m training <command> --config FILE.yaml [--set key=value ...]``.

Every command is a trainer registered with one line::

    register_trainer("train-rm", RMTrainConfig, RMTrainer, "Train a Bradley–Terry reward model.")

and gets the same options: ``--config`` (YAML mapping of the config dataclass's fields),
``--set key=value`` (repeatable; values parsed as YAML, ``a.b=v`` sets a key of a mapping
field), ``--dry-run`` (print the resolved config and exit). ``--help`` lists every field
with its default. Ctrl-C asks the trainer to checkpoint and stop; the same command resumes.
The final metrics are printed as JSON on stdout.

``train-rm``, ``strength``, ``meta-train`` and ``dpo`` also run over several processes when a
launcher started them (``accelerate launch``, ``torchrun``, on one host or several: the
environment says ``WORLD_SIZE`` > 1): every process runs the command, ``--strategy`` says ddp
or fsdp (train-rm only), rank 0 shows progress, writes and prints. Under a launcher Ctrl-C reaches the launcher, which terminates the
processes: the last periodic checkpoint resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import typer

from training.bt.strength import StrengthConfig, StrengthTrainer
from training.bt.trainer import RMTrainConfig, RMTrainer
from training.callbacks import NullCallback, TqdmCallback, TrainingCancelled
from training.config import ConfigError, TrainerConfig, load_config
from training.data import DataError
from training.distributed import Processes
from training.eval_config import EvalConfig
from training.evaluate import Evaluator
from training.metarm.trainer import MetaRMConfig, MetaRMTrainer
from training.oodpl.adapt import AdaptConfig, Adapter
from training.oodpl.dpo import DPOConfig, DPOTrainer
from training.oodpl.meta_train import MetaTrainConfig, MetaTrainer

app = typer.Typer(
    help="generalrm training: every algorithm from its config file, without the service.",
    no_args_is_help=True,
    add_completion=False,
)


class InterruptibleProgress(TqdmCallback):
    """Progress bar; the first Ctrl-C asks the trainer to checkpoint and stop."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self.stop_requested = False
        self._previous: Any = None

    def __enter__(self) -> InterruptibleProgress:
        self._previous = signal.signal(signal.SIGINT, self._request_stop)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _request_stop(self, _signum: int, _frame: Any) -> None:
        if self.stop_requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)",
              file=sys.stderr)

    def should_stop(self) -> bool:
        return self.stop_requested


def _launched_processes(name: str, distributed: bool, strategy: str, device: str,
                        timeout: float) -> Processes | None:
    """The process group when a launcher started this command over several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not distributed:
        raise ConfigError(f"{name} runs in one process; under a launcher (WORLD_SIZE > 1) only "
                          f"{', '.join(DISTRIBUTED)} run")
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"--strategy: ddp or fsdp, got {strategy!r}")
    try:
        return Processes.from_environment(strategy=strategy, device=device,
                                          timeout_seconds=timeout)
    except ValueError as exc:  # fsdp on CPU, more processes than GPUs
        raise ConfigError(str(exc)) from None


DISTRIBUTED: list[str] = []  # the commands that run under a launcher


def register_trainer(name: str, config_cls: type[TrainerConfig], trainer_cls: type,
                     help_text: str, distributed: bool = False) -> None:
    """Add ``python -m training <name>`` running ``trainer_cls(config_cls(...)).train()``;
    ``distributed``: the trainer takes ``processes`` and runs under a launcher."""
    if distributed:
        DISTRIBUTED.append(name)

    def command(
        config: Path = typer.Option(None, "--config", "-c", help="YAML file of config keys."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Override: key=value (repeatable)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
        strategy: str = typer.Option("ddp", "--strategy", help="Under a launcher: ddp, or "
                                     "fsdp (train-rm, GPUs only)."),
        collective_timeout: float = typer.Option(
            1800.0, "--collective-timeout", help="Under a launcher: seconds a collective waits "
            "for a peer before failing."),
    ) -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DeprecationWarning)
                resolved = load_config(config_cls, config, set_)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        for warning in caught:
            typer.echo(f"warning: {warning.message}", err=True)
        if dry_run:
            typer.echo(json.dumps(resolved.to_dict(), indent=2))
            return
        try:
            processes = _launched_processes(name, distributed, strategy,
                                            getattr(resolved, "device", "auto"), collective_timeout)
            main = processes is None or processes.is_main
            extra = {"processes": processes} if processes is not None else {}
            with (InterruptibleProgress(name) if main
                  else contextlib.nullcontext(NullCallback())) as progress:
                result = trainer_cls(resolved, callback=progress, **extra).train()
        except (ConfigError, DataError, FileNotFoundError) as exc:  # bad data, found on loading
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except TrainingCancelled as exc:
            if main:
                typer.echo(f"cancelled at step {exc.step}; checkpoint {exc.checkpoint}. "
                           "Run the same command again to resume.", err=True)
            raise typer.Exit(130) from None
        if processes is not None:
            processes.end()
        if not main:
            return
        payload = {k: str(v) if isinstance(v, Path) else v
                   for k, v in vars(result).items() if k != "summary"}
        typer.echo(json.dumps(payload, indent=2, default=str))

    app.command(name, help=f"{help_text}\n\n{config_cls.describe()}")(command)


register_trainer("train-rm", RMTrainConfig, RMTrainer,
                 "Train a Bradley–Terry reward model (Secrets of RLHF II options).",
                 distributed=True)
register_trainer("strength", StrengthConfig, StrengthTrainer,
                 "Estimate preference strength (μ̂, σ̂) of training pairs with an RM ensemble.",
                 distributed=True)
register_trainer("meta-train", MetaTrainConfig, MetaTrainer,
                 "OOD-PL bilevel meta-training of a reward model.", distributed=True)
register_trainer("adapt", AdaptConfig, Adapter,
                 "OOD-PL meta-test: adapt a policy to a new domain's prompts.")
register_trainer("metarm", MetaRMConfig, MetaRMTrainer,
                 "MetaRM: keep an RM discriminative on shifted samples.")
register_trainer("dpo", DPOConfig, DPOTrainer, "DPO on preference pairs (baseline).",
                 distributed=True)
register_trainer("evaluate", EvalConfig, Evaluator,
                 "Accuracy of a reward model on a preference file (TRL or RewardBench format), "
                 "per subset and overall, with RewardBench's section weighting.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
