"""Atomic training checkpoints: model, optimizer, scheduler, step, config and RNG.

Layout under a run directory (every trainer's ``output_dir``)::

    checkpoints/step-000120/   state.pt, trainable.safetensors, config.json, MANIFEST.json
    checkpoints/LATEST         name of the newest complete checkpoint
    model/                     the finished model (FINAL_MODEL_DIR), written atomically
    metrics.json

A checkpoint is written into ``step-XXXXXX.tmp`` and renamed into place once complete, the
manifest written last; a crash mid-write leaves a ``.tmp`` directory that is ignored and
removed. Resume = :func:`load_latest`, which only ever returns complete checkpoints.

A checkpoint holds full tensors, never shards, and the optimizer state in
``optimizer.state_dict()``'s form (keyed by parameter index): a run over several processes
(``training.distributed``) gathers both onto rank 0 and passes them as ``model_state`` and
``optimizer_state``, so its checkpoints load on any number of processes.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training.atomic import fsync_dir, write_json_atomic, write_text_atomic

MANIFEST = "MANIFEST.json"
FINAL_MODEL_DIR = "model"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (all of them, or the LoRA ones): small checkpoints."""
    return {
        name: param.detach().to("cpu").contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def checkpoint_path(run_dir: Path | str, step: int) -> Path:
    """Where the checkpoint of ``step`` is (complete once its manifest is there)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:09d}"


def save_checkpoint(
    run_dir: Path | str,
    *,
    step: int,
    model: torch.nn.Module | dict[str, torch.nn.Module] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    config: Any = None,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
    model_state: dict[str, dict[str, torch.Tensor]] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically and return its directory.

    ``model_state`` ({model name: trainable tensors}) and ``optimizer_state`` stand in for
    ``model`` and ``optimizer`` when the caller gathered them from several processes.
    """
    final = checkpoint_path(run_dir, step)
    root, name = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if model_state is None:
        if model is None:
            raise ValueError("save_checkpoint needs a model or its model_state")
        models = model if isinstance(model, dict) else {"model": model}
        model_state = {key: trainable_state(module) for key, module in models.items()}
    for key, tensors in model_state.items():
        save_file(tensors, str(tmp / f"{key}.safetensors"))
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    torch.save(
        {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
        },
        tmp / "state.pt",
    )
    if config is not None:
        write_json_atomic(tmp / "config.json", config.to_dict() if hasattr(config, "to_dict") else config)
    write_json_atomic(
        tmp / MANIFEST,
        {"step": step, "models": sorted(model_state), "created_at": time.time()},
    )
    if final.exists():  # a re-run of the same step after a crash: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / "LATEST", name)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path | str) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.endswith(".tmp") and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def load_latest(run_dir: Path | str) -> Path | None:
    """The newest complete checkpoint of a run, or None; stale ``.tmp`` dirs are removed."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for stale in root.glob("*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def restore_checkpoint(
    checkpoint: Path | str,
    *,
    model: torch.nn.Module | dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into live objects; returns ``{"step", "extra"}``, and with
    ``optimizer=None`` the saved optimizer state as ``"optimizer_state"`` (to load once the
    optimizer exists, e.g. after a distributed wrapper was built around it)."""
    checkpoint = Path(checkpoint)
    models = model if isinstance(model, dict) else {"model": model}
    for key, module in models.items():
        tensors = load_file(str(checkpoint / f"{key}.safetensors"))
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    restored = {"step": state["step"], "extra": state["extra"]}
    if optimizer is None:
        restored["optimizer_state"] = state["optimizer"]
    return restored
