"""Run a trainer over several processes with ``accelerate launch``, from a process that keeps
the trainer's callback: the worker's job process, the only one that talks to Redis.

**The launching side**, :func:`launch`: writes what to run into a channel directory, starts
``accelerate launch`` (torchrun underneath: one process per GPU, or CPU processes over gloo) in
a session of its own, and until it exits relays rank 0's progress to the callback and the
callback's stop to rank 0. It returns the trainer's result, or raises

- :class:`~training.callbacks.TrainingCancelled`: the callback asked to stop; every rank
  stopped at the same step boundary and rank 0 wrote a checkpoint;
- :class:`RankFailed`: a rank raised an error of its own (bad data, a bug): deterministic, it
  would only fail again;
- :class:`RanksLost`: a rank died (killed, out of memory) or the process group broke (a peer
  unreachable or hung past the collective timeout): what a dead worker is to a one-process job,
  worth another attempt from the last checkpoint.

It never waits for ever: after a stop request the ranks have ``stop_grace_seconds`` to exit
before the launcher is terminated, and nothing outlives the launching process (the launcher and
every rank die with their parent: ``PR_SET_PDEATHSIG``, Linux).

**The rank side**, ``python -m training.launch rank CHANNEL`` (what ``accelerate launch`` runs):
joins the process group (``training.distributed.Processes``), runs the trainer with a callback
that reads the channel (rank 0) and writes its outcome.

The channel, small files in a directory of the run (on the shared artifacts volume)::

    launch.json       what to run: trainer, config, strategy, device, collective timeout
    accelerate.yaml   the launch's own accelerate config (no user default config applies)
    launch.log        the launcher's and the ranks' output
    rank-{r}.json     rank r is running: rank, host, pid (what the job record shows)
    progress.json     rank 0's latest progress
    stop              present: stop at the next step boundary (the launching side writes it)
    result.json       rank 0's outcome: finished (the result, as JSON) or cancelled
    error-{r}.json    rank r raised: type, message, and whether the process group failed

Torch-free to import: the launching side needs no torch; the rank side imports the trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from training.atomic import write_json_atomic, write_text_atomic
from training.callbacks import NullCallback, TrainerCallback, TrainingCancelled
from training.config import TrainerConfig

log = logging.getLogger(__name__)

# The trainers that run over several processes: config, trainer, result ("module:name").
TRAINERS: dict[str, tuple[str, str, str]] = {
    "train-rm": ("training.bt.config:RMTrainConfig", "training.bt.trainer:RMTrainer",
                 "training.bt.results:RMTrainResult"),
    "strength": ("training.bt.config:StrengthConfig", "training.bt.strength:StrengthTrainer",
                 "training.bt.results:StrengthResult"),
    "meta-train": ("training.oodpl.config:MetaTrainConfig",
                   "training.oodpl.meta_train:MetaTrainer",
                   "training.oodpl.results:MetaTrainResult"),
    "dpo": ("training.oodpl.config:DPOConfig", "training.oodpl.dpo:DPOTrainer",
            "training.oodpl.results:DPOResult"),
}
POLL_SECONDS = 0.2
PROGRESS_WRITE_SECONDS = 0.25
TERMINATE_SECONDS = 40.0  # torchrun gives its ranks 30 s after a SIGTERM, then kills them
AGENT_PID_ENV = "GENERALRM_LAUNCH_AGENT_PID"
LOG_TAIL_LINES = 30
STRATEGIES = ("ddp", "fsdp")
FSDP_NEEDS_GPUS = (
    "strategy fsdp needs GPUs: accelerate shards a model with FSDP only over GPU-class backends "
    "(NCCL), not over CPU processes (gloo), where it would silently fall back to DDP; use "
    "strategy ddp on CPU")


class RankFailed(RuntimeError):
    """A rank raised an error of its own: deterministic, another attempt would fail again."""


class RanksLost(RuntimeError):
    """A rank died or the process group broke: retry from the last checkpoint, as for a dead
    worker."""


@dataclass(frozen=True)
class LaunchPlan:
    """How to launch: ``processes`` on this host, ``strategy`` ddp or fsdp, ``device`` (cpu:
    gloo; otherwise one GPU per process), the collective timeout, and how long ranks asked to
    stop may take before they are terminated (default: the collective timeout + a minute)."""

    processes: int
    strategy: str = "ddp"
    device: str = "auto"
    collective_timeout_seconds: float = 1800.0
    stop_grace_seconds: float | None = None

    @property
    def grace(self) -> float:
        if self.stop_grace_seconds is not None:
            return self.stop_grace_seconds
        return self.collective_timeout_seconds + 60.0


def _load(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def trainer_class(trainer: str) -> type:
    """The trainer class of a :data:`TRAINERS` key (imports it, and so torch)."""
    return _load(TRAINERS[trainer][1])


def result_to_json(result: Any) -> dict[str, Any]:
    """A trainer's result dataclass as JSON (paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(result), default=str))


def result_from_json(result_cls: type, payload: dict[str, Any]) -> Any:
    """The inverse of :func:`result_to_json` for ``result_cls``."""
    hints = get_type_hints(result_cls)
    return result_cls(**{key: Path(value) if hints.get(key) is Path else value
                         for key, value in payload.items()})


def free_port() -> int:
    """A TCP port free right now (the rendezvous port of one launch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- the channel
class Channel:
    """The files through which the launching process and the ranks talk (module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def log_file(self) -> Path:
        return self.path / "launch.log"

    @property
    def accelerate_config(self) -> Path:
        return self.path / "accelerate.yaml"

    def _read(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):  # not there yet (files appear whole: atomic writes)
            return None

    # the launching side
    def prepare(self, request: dict[str, Any], processes: int, port: int) -> None:
        """A fresh channel for one launch (an earlier attempt's files removed)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.iterdir():
            if stale.is_file() and stale.name != self.log_file.name:
                stale.unlink()
        write_json_atomic(self.path / "launch.json", request)
        write_text_atomic(self.accelerate_config, yaml.safe_dump({
            "compute_environment": "LOCAL_MACHINE",
            # torchrun; the ranks pick gloo themselves when they run on CPU
            "distributed_type": "MULTI_GPU",
            "num_processes": processes, "num_machines": 1, "machine_rank": 0,
            "main_process_ip": "127.0.0.1", "main_process_port": port,
            "rdzv_backend": "static", "same_network": True, "gpu_ids": "all",
            "mixed_precision": "no", "use_cpu": False,
        }))

    def request_stop(self) -> None:
        write_text_atomic(self.path / "stop", "stop\n")

    def progress(self) -> dict[str, Any] | None:
        return self._read("progress.json")

    def ranks(self) -> list[dict[str, Any]]:
        found = [self._read(p.name) for p in sorted(self.path.glob("rank-*.json"))]
        return sorted((r for r in found if r), key=lambda r: r["rank"])

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        return ""

    def outcome(self, returncode: int | None, processes: int, result_cls: type) -> Any:
        """The trainer's result, or the exception that says how the launch ended."""
        result = self._read("result.json")
        if result is not None and result["status"] == "finished":
            return result_from_json(result_cls, result["result"])
        if result is not None and result["status"] == "cancelled":
            raise TrainingCancelled(result["step"], result["checkpoint"])
        errors = [self._read(p.name) for p in sorted(self.path.glob("error-*.json"))]
        errors = [e for e in errors if e]
        own = sorted((e for e in errors if not e["collective"]), key=lambda e: e["time"])
        if own:
            first = own[0]
            raise RankFailed(f"rank {first['rank']} of {processes} raised {first['type']}: "
                             f"{first['message']}")
        silent = sorted(set(range(processes)) - {e["rank"] for e in errors})
        broken = "; ".join(f"rank {e['rank']}: {e['type']}: {e['message'][:300]}" for e in errors)
        parts = []
        if silent:
            parts.append(f"rank(s) {silent} of {processes} ended without a result or an error "
                         "(killed, out of memory, or crashed)")
        if broken:
            parts.append(f"the process group failed ({broken})")
        raise RanksLost("; ".join(parts or ["the launch ended without a result"])
                        + f"; the launcher exited with code {returncode}")

    # the rank side
    def request(self) -> dict[str, Any]:
        return json.loads((self.path / "launch.json").read_text())

    def stop_requested(self) -> bool:
        return (self.path / "stop").exists()

    def write_rank(self, rank: int, info: dict[str, Any]) -> None:
        write_json_atomic(self.path / f"rank-{rank}.json", info)

    def write_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        shown = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)}
        write_json_atomic(self.path / "progress.json",
                          {"step": step, "total": total, "metrics": shown})

    def write_result(self, outcome: dict[str, Any]) -> None:
        write_json_atomic(self.path / "result.json", outcome)

    def write_error(self, rank: int, exc: BaseException, collective: bool) -> None:
        write_json_atomic(self.path / f"error-{rank}.json", {
            "rank": rank, "type": type(exc).__name__, "message": str(exc),
            "collective": collective, "time": time.time()})


class ChannelCallback:
    """Rank 0's callback: progress into the channel (at most every 0.25 s, and the last step),
    stop when the launching side asked."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._last_write = 0.0

    def on_progress(self, step: int, total: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if step < total and now - self._last_write < PROGRESS_WRITE_SECONDS:
            return
        self._last_write = now
        self.channel.write_progress(step, total, metrics)

    def should_stop(self) -> bool:
        return self.channel.stop_requested()


# ---------------------------------------------------------------------- the launching side
def launch(trainer: str, config: TrainerConfig, plan: LaunchPlan, channel_dir: Path | str, *,
           callback: TrainerCallback | None = None,
           on_ranks: Callable[[list[dict[str, Any]]], None] | None = None) -> Any:
    """Run ``trainer`` (a key of :data:`TRAINERS`) with ``config`` over ``plan.processes``
    processes on this host; see the module docstring for what it returns and raises.
    ``on_ranks(ranks)`` is called once every rank runs (their hosts and pids)."""
    if trainer not in TRAINERS:
        raise ValueError(f"{trainer!r} does not run over several processes; those that do: "
                         f"{sorted(TRAINERS)}")
    if plan.processes < 2:
        raise ValueError("a launch runs 2 or more processes; run one in this process")
    callback = callback or NullCallback()
    result_cls = _load(TRAINERS[trainer][2])
    channel = Channel(channel_dir)
    channel.prepare({"trainer": trainer, "config": config.to_dict(), "strategy": plan.strategy,
                     "device": plan.device,
                     "collective_timeout_seconds": plan.collective_timeout_seconds},
                    plan.processes, free_port())
    command = [sys.executable, "-m", "training.launch", "agent", "--parent", str(os.getpid()),
               "--", "--config_file", str(channel.accelerate_config), "--max_restarts", "0",
               "--monitor_interval", "0.5", "--module", "training.launch", "rank",
               str(channel.path)]
    started = time.monotonic()
    with open(channel.log_file, "ab") as output:
        # a session of its own: a Ctrl-C meant for the worker reaches the job through the
        # worker's shutdown (a checkpoint), not straight to the ranks
        launcher = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        last_step = _relay(launcher, channel, plan, callback, on_ranks)
    finally:
        if launcher.poll() is None:
            _terminate(launcher)
    log.info("launch of %s over %d processes ended with code %s after %.1fs", trainer,
             plan.processes, launcher.returncode, time.monotonic() - started)
    if last_step is None:  # the watchdog ended it: stopped, but without a fresh checkpoint
        raise TrainingCancelled((channel.progress() or {}).get("step", 0), None)
    try:
        return channel.outcome(launcher.returncode, plan.processes, result_cls)
    except (RankFailed, RanksLost):
        log.error("launch failed; the end of %s:\n%s", channel.log_file, channel.log_tail())
        raise


def _relay(launcher: subprocess.Popen, channel: Channel, plan: LaunchPlan,
           callback: TrainerCallback, on_ranks: Callable | None) -> int | None:
    """Relay progress and stop until the launcher exits; the last step seen, or None when the
    ranks did not stop within the grace period after a stop request (then terminated)."""
    seen: dict[str, Any] | None = None
    ranks_told = on_ranks is None
    stop_asked_at: float | None = None
    while True:
        exited = launcher.poll() is not None  # before reading: the files are then final
        progress = channel.progress()
        if progress is not None and progress != seen:
            seen = progress
            callback.on_progress(progress["step"], progress["total"], progress["metrics"])
        if not ranks_told:
            ranks = channel.ranks()
            if len(ranks) == plan.processes:
                on_ranks(ranks)
                ranks_told = True
        if exited:
            return seen["step"] if seen else 0
        if stop_asked_at is None:
            if callback.should_stop():
                channel.request_stop()
                stop_asked_at = time.monotonic()
        elif time.monotonic() - stop_asked_at > plan.grace:
            log.error("the ranks did not stop within %.0fs of the stop request; terminating "
                      "the launch", plan.grace)
            _terminate(launcher)
            return None
        time.sleep(POLL_SECONDS)


def _terminate(launcher: subprocess.Popen) -> None:
    """SIGTERM the launcher (torchrun then stops its ranks), SIGKILL it if it lingers (the
    ranks then die with it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launcher.pid, signal.SIGTERM)
    try:
        launcher.wait(timeout=TERMINATE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)


# ---------------------------------------------------------------------- the launched side
def die_with_parent(expected_parent: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so that no launcher or rank
    outlives the process that owns the job (a worker killed with -9 leaves nothing behind)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died before we asked


def run_agent(parent: int, accelerate_args: list[str]) -> None:
    """``accelerate launch`` in this process (torchrun's agent), dying with ``parent``."""
    die_with_parent(parent)
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # the ranks die with this process
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(accelerate_args))


def run_rank(channel_dir: Path) -> None:
    """One rank: join the process group, run the trainer, write the outcome (rank 0) or the
    error (any rank that raised)."""
    agent = os.environ.get(AGENT_PID_ENV)
    die_with_parent(int(agent) if agent else None)
    channel = Channel(channel_dir)
    rank = int(os.environ.get("RANK", "0"))
    channel.write_rank(rank, {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                              "local_rank": int(os.environ.get("LOCAL_RANK", "0"))})
    from training.distributed import Processes, exit_without_teardown, is_collective_error

    try:
        request = channel.request()
        config = _load(TRAINERS[request["trainer"]][0]).from_dict(request["config"])
        processes = Processes.from_environment(
            strategy=request["strategy"], device=request["device"],
            timeout_seconds=request["collective_timeout_seconds"])
        callback = ChannelCallback(channel) if processes.is_main else NullCallback()
        try:
            trainer = trainer_class(request["trainer"])
            result = trainer(config, callback=callback, processes=processes).train()
        except TrainingCancelled as exc:
            if processes.is_main:
                channel.write_result({"status": "cancelled", "step": exc.step,
                                      "checkpoint": exc.checkpoint})
        else:
            if processes.is_main:
                channel.write_result({"status": "finished", "result": result_to_json(result)})
    except BaseException as exc:
        channel.write_error(rank, exc, collective=is_collective_error(exc))
        raise  # the rank exits non-zero; torchrun stops the others
    processes.end()
    exit_without_teardown(0)  # gloo's C++ teardown aborts a finished rank one exit in three


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.launch",
                                     description="The launched side of training.launch.launch")
    sub = parser.add_subparsers(dest="role", required=True)
    agent = sub.add_parser("agent", help="run accelerate launch, dying with --parent")
    agent.add_argument("--parent", type=int, required=True)
    agent.add_argument("accelerate_args", nargs=argparse.REMAINDER)
    rank = sub.add_parser("rank", help="one rank of a launch")
    rank.add_argument("channel", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.role == "agent":
        forwarded = args.accelerate_args
        run_agent(args.parent, forwarded[1:] if forwarded[:1] == ["--"] else forwarded)
    else:
        run_rank(args.channel)


if __name__ == "__main__":
    main()
