"""The processes one training run spans, as a trainer sees them: one (the default), or N that
``accelerate launch`` started (``training.launch``), synchronised with DDP or FSDP through
accelerate.

A trainer takes a :class:`Processes` and has one code path: with one process every method is
an identity or a no-op, and nothing about a single-process run changes. The invariants the
trainers build on:

- ``shard(batch)`` is this rank's share of a *global* micro-batch. The trainer scales its loss
  by its share (``share_weight``), so the gradient DDP averages is the gradient of the same
  global batch in one process: the loss curve of N processes is the one-process curve, up to
  float rounding (and dropout, whose masks each process draws for itself).
- ``main_decides(flag)`` gives every rank rank 0's value. Rank 0 alone reads the callback (the
  job's cancel key, the worker's shutdown), so all ranks stop at the same step boundary.
- Every collective times out after ``timeout_seconds`` (the process group's timeout): a rank
  that died or hangs makes the others raise instead of waiting for ever.
- ``trainable_state`` and ``optimizer_state`` are full (never shards) on rank 0, and the
  optimizer state is keyed by parameter index exactly as ``optimizer.state_dict()`` in one
  process: a checkpoint loads on any number of processes, under either strategy.
- Rank 0 alone writes files; the others compute the same metrics from gathered scores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from training.checkpoint import trainable_state as module_trainable_state
from training.launch import FSDP_NEEDS_GPUS

Strategy = Literal["ddp", "fsdp"]
T = TypeVar("T")

# Added to the seed of rank r > 0 after the model is built: dropout masks differ between ranks
# (rank 0 keeps the one-process stream).
RANK_SEED_STRIDE = 1_000_003
# What a failed collective says (gloo raises RuntimeError, not DistError): a peer that died,
# hung past the timeout or became unreachable, not this rank's own mistake.
COLLECTIVE_ERROR_MARKERS = ("gloo", "nccl", "connection closed", "connection reset",
                            "broken pipe", "timed out", "timeout")


def is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the process group failing (a peer lost) rather than this rank's work."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in COLLECTIVE_ERROR_MARKERS)


def trainable_names(module: torch.nn.Module) -> list[str]:
    """Names of the parameters that train, in the order an optimizer built from
    ``[p for p in module.parameters() if p.requires_grad]`` holds them."""
    return [name for name, param in module.named_parameters() if param.requires_grad]


def index_keyed(state: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (torch's distributed-checkpoint form) keyed by
    parameter index instead, as ``optimizer.state_dict()`` in one process."""
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in state["param_groups"]],
    }


def name_keyed(state: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The inverse of :func:`index_keyed`."""
    return {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                         for group in state["param_groups"]],
    }


class Processes:
    """This process's place among the processes of one run; see the module docstring.

    ``accelerator`` is set when the run spans several processes (``from_environment``); the
    process group is then initialised and every rank must call the collective methods
    (everything but ``shard``, ``no_sync`` and the properties) at the same points.
    """

    def __init__(self, accelerator: Any = None, strategy: Strategy = "ddp") -> None:
        self.accelerator = accelerator
        self.strategy: Strategy = strategy
        grouped = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if grouped else 0
        self.world_size = dist.get_world_size() if grouped else 1

    @classmethod
    def single(cls) -> Processes:
        return cls()

    @classmethod
    def from_environment(cls, *, strategy: Strategy = "ddp", device: str = "auto",
                         timeout_seconds: float = 1800.0) -> Processes:
        """Join the run's process group when a launcher started this process (``WORLD_SIZE``
        > 1 in the environment, as ``accelerate launch`` and ``torchrun`` set it); one process
        otherwise. ``device``: ``cpu`` (or no GPU) runs gloo over CPU processes, else one GPU
        per local rank over NCCL."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls.single()
        from accelerate import Accelerator
        from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

        cpu = device == "cpu" or not torch.cuda.is_available()
        if strategy == "fsdp" and cpu:
            raise ValueError(FSDP_NEEDS_GPUS)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not cpu and local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} has no GPU: this host sees {torch.cuda.device_count()} "
                f"GPU(s) and the run asks for {os.environ.get('LOCAL_WORLD_SIZE', world)} "
                "processes on it; run it on a worker that sees one GPU per process")
        handlers = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl",
                                           timeout=timedelta(seconds=timeout_seconds))]
        plugin = None
        if strategy == "fsdp":
            # FSDP2; every transformer block its own shard unit (the model's _no_split_modules)
            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
        # mixed precision stays the trainers' own (autocast); accelerate only distributes
        accelerator = Accelerator(cpu=cpu, mixed_precision="no", kwargs_handlers=handlers,
                                  fsdp_plugin=plugin)
        return cls(accelerator, strategy)

    # ------------------------------------------------------------------ where am I
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device of this rank (None with one process: the trainer's config decides)."""
        return self.accelerator.device if self.accelerator is not None else None

    def load_device(self, device: torch.device) -> str:
        """Where to build the model before :meth:`prepare`: on CPU under FSDP (sharding moves
        each process's shard to its GPU, so no GPU ever holds the whole model; the host needs
        RAM for one copy per process), else ``device``."""
        return "cpu" if self._sharded else str(device)

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (every rank's shares together are ``items``)."""
        return list(items)[self.rank :: self.world_size]

    def share_weight(self, mine: int, total: int) -> float:
        """What this rank's mean loss over ``mine`` of ``total`` items is scaled by, so that the
        gradient averaged over ranks is the gradient of the mean over all ``total`` items."""
        return mine * self.world_size / total

    def seed_rank(self, seed: int) -> None:
        """Give rank r > 0 its own random stream (dropout) once the model is built."""
        if self.rank > 0:
            torch.manual_seed(seed + RANK_SEED_STRIDE * self.rank)

    # ------------------------------------------------------------------ training
    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                optimizer_state: dict[str, Any] | None = None
                ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """(the module to run training steps through, the optimizer to step), with
        ``optimizer_state`` (a checkpoint's: full, index-keyed) loaded. Load the model's
        weights into ``model`` before: they are full on every rank then."""
        if not self.distributed or self.strategy == "ddp":
            if optimizer_state is not None:
                optimizer.load_state_dict(optimizer_state)
            if not self.distributed:
                return model, optimizer
            # DDP: the module is wrapped; the optimizer keeps the very same parameters
            return self.accelerator.prepare_model(model), optimizer
        # FSDP2 shards the module in place and points the optimizer at the shards
        sharded, optimizer = self.accelerator.prepare(model, optimizer)
        if sharded is not model:  # the trainer evaluates and saves through ``model`` itself
            raise RuntimeError("accelerate returned a new module for FSDP2; expected the model "
                               "sharded in place")
        if optimizer_state is not None:
            self.load_optimizer_state(model, optimizer, optimizer_state)
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def no_sync(self, module: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """With ``skip``: accumulate this micro-batch's gradient without synchronising it yet."""
        if self.distributed and skip:
            return self.accelerator.no_sync(module)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, parameters: list[torch.nn.Parameter], max_norm: float) -> float:
        if self.accelerator is None:
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        return float(self.accelerator.clip_grad_norm_(parameters, max_norm))

    # ------------------------------------------------------------------ collectives
    def main_decides(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([1 if (flag and self.is_main) else 0], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each key summed over ranks (every rank passes the same keys)."""
        if not self.distributed:
            return dict(values)
        keys = sorted(values)
        summed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(summed)
        return dict(zip(keys, summed.tolist(), strict=True))

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def unshard(self, mine: Sequence[T], total: int) -> list[T]:
        """The inverse of :meth:`shard`: every rank passes the values of its share of ``total``
        items (in order); every rank gets all ``total`` values in the items' order."""
        if not self.distributed:
            return list(mine)
        merged: list[Any] = [None] * total
        for rank, values in enumerate(self.gather(list(mine))):
            merged[rank :: self.world_size] = values
        return merged

    def sum_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Each tensor summed over ranks, in place (every rank passes the same shapes, in the
        same order): a sum of shares that no distributed wrapper synchronises."""
        if self.distributed:
            for tensor in tensors:
                dist.all_reduce(tensor)

    def from_main(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (what rank 0 alone may compute: which checkpoint)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # ------------------------------------------------------------------ full states
    @property
    def _sharded(self) -> bool:
        return self.distributed and self.strategy == "fsdp"

    def trainable_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trainable parameters, full, on CPU: on rank 0 (under FSDP gathered from the
        shards, which every rank must join; the other ranks get ``{}``)."""
        if not self._sharded:
            return module_trainable_state(module)
        full = self.full_model_state(module) or {}
        return {name: full[name] for name in trainable_names(module) if name in full}

    def full_model_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole state dict gathered on rank 0 under FSDP (every rank must join); None when
        the module itself holds it whole (one process, DDP)."""
        if not self._sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, module: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state, full and index-keyed (``optimizer.state_dict()``'s form), on
        rank 0; under FSDP gathered (every rank must join; the others get ``{}``)."""
        raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        if not self._sharded:
            return raw.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        by_name = get_optimizer_state_dict(
            module, raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return index_keyed(by_name, trainable_names(module)) if self.is_main else {}

    def load_optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        """Load a full, index-keyed optimizer state into a sharded (FSDP) module's optimizer."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        raw = getattr(optimizer, "optimizer", optimizer)
        set_optimizer_state_dict(module, raw, name_keyed(state, trainable_names(module)),
                                 options=StateDictOptions(full_state_dict=True))

    def end(self) -> None:
        """Leave the process group (the end of a launched run)."""
        if self.accelerator is not None:
            self.accelerator.end_training()


def exit_without_teardown(code: int = 0) -> None:
    """End a rank's process here, after it left the process group and its files are written:
    stdio and logging flushed, then ``os._exit`` without the interpreter's teardown.

    Why: with torch 2.13 a gloo rank that returned normally aborts in its C++ teardown
    ("terminate called without an active exception", SIGABRT, no Python frame) in about one
    exit in three (6 of 17 runs of 2 CPU ranks: DDP steps, all_reduce, barrier,
    ``destroy_process_group``, return). Nothing is lost by then, but torchrun reports the
    rank as failed and stops its peers, which may still be writing."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def joined(processes: Processes) -> Iterator[Processes]:
    """``processes`` for the length of a block, leaving the group however the block ends."""
    try:
        yield processes
    finally:
        processes.end()
