"""What a job publishes and how: registry metadata (lineage, data fingerprint, metrics, reward
statistics) and the exactly-once publication of a trained model.

A job may die between publishing a version and recording its success; its message then comes
back and the job runs again. Publication is keyed by the job id, so the second run finds the
version it already published and returns it instead of training again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from training.registry import ModelVersion, ResolvedModel, reward_stats_entry
from worker.specs import JobContext, JobOutcome


def data_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the bytes of the data files (in order): the lineage of a trained model."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).stat().st_size}:".encode())  # file boundaries count
        with open(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers and strings of a metrics dict (no lists, dicts, None or booleans)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, int | float | str) and not isinstance(v, bool)}


def reward_model_metadata(*, algorithm: str, base_model: str, base: ResolvedModel,
                          data_files: Iterable[Path | None], metrics: dict[str, Any],
                          params: dict[str, Any], job_id: str,
                          **lineage: Any) -> dict[str, Any]:
    """The registry metadata of a trained reward model: algorithm, the model it started from
    (and its registry version), a fingerprint of the data files (Nones skipped), metrics,
    reward statistics when the metrics have them, params, the job, and ``lineage`` (the
    kind's own keys: data file names, steps, diagnostics, ...)."""
    metadata = {
        "kind": "reward_model",
        "algorithm": algorithm,
        "base_model": base_model,
        "parent_version": base.registry_label,
        **lineage,
        "data_fingerprint": data_fingerprint([p for p in data_files if p]),
        "metrics": metrics,
        "params": params,
        "job_id": job_id,
    }
    stats = reward_stats_entry(metrics)
    if stats is not None:
        metadata["reward_stats"] = stats
    return metadata


def publish_as_owner(ctx: JobContext, name: str, model_dir: Path | str,
                     metadata: dict[str, Any]) -> ModelVersion:
    """Publish a new version of ``name``, after checking this worker still holds the job and
    no cancel has come (:meth:`JobContext.before_publish`)."""
    ctx.before_publish()
    return ctx.registry.publish(name, model_dir, metadata)


def published_model_outcome(version: ModelVersion, run_dir: Path) -> JobOutcome:
    """A job that published one model: its metadata's metrics and where the model is."""
    return JobOutcome(
        metrics=dict(version.metadata.get("metrics", {})),
        artifacts={"model": version.reference, "model_path": str(version.path),
                   "run_dir": str(run_dir)},
    )


def train_and_publish_once(ctx: JobContext, name: str,
                           train: Callable[[], tuple[Path | str, dict[str, Any]]]) -> JobOutcome:
    """Exactly-once publication under ``name``: a job that died between publishing and
    recording its success returns what it published instead of training again; otherwise
    ``train()`` gives the model directory and its metadata, published as a new version."""
    version = ctx.registry.version_for_job(name, ctx.job_id)
    if version is None:
        model_dir, metadata = train()
        version = publish_as_owner(ctx, name, model_dir, metadata)
    return published_model_outcome(version, ctx.run_dir)
