"""What the model-training job kinds share: the checks of their specs' model references,
registry names, ``params`` and trainer configs, the rows of their data files, and the
exactly-once publication of what they train with its registry metadata.

Torch-free (the API validates specs with these at submission); trainers are imported by the
kinds inside their ``run``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from training.registry import (
    ModelNotFoundError,
    ModelVersion,
    Registry,
    RegistryError,
    ResolvedModel,
    check_name,
    resolve_model,
)
from training.settings import Settings
from worker.specs import (
    JobContext,
    JobOutcome,
    SpecError,
    check_preference_jsonl,
    data_fingerprint,
    jsonl_objects,
    resolve_data_path,
)


# ---------------------------------------------------------------------- spec checks
def check_model_reference(key: str, reference: Any, settings: Settings, *,
                          resolve_short_names: bool = True) -> None:
    """A model reference the worker can load: a short name (``minilm``), a local directory, a
    hub id or a registry reference (``rm@v3``, ``rm:production``); errors name ``key``.

    With ``resolve_short_names=False`` a packaged short name (``smollm2-135m``) that no
    registry model shadows is accepted as is: resolving it would convert the GGUF (seconds)
    inside the API's request.
    """
    if not isinstance(reference, str) or not reference:
        raise SpecError(f"{key}: give a short name (minilm), a local directory, a hub id or a "
                        "registry reference (name@v3, name:production)")
    if not resolve_short_names:
        from training.models import SHORT_NAMES

        if (reference in SHORT_NAMES
                and Registry.from_artifacts(settings.artifacts_dir).try_resolve(reference) is None):
            return
    try:
        resolved = resolve_model(reference, settings.artifacts_dir)
    except ModelNotFoundError as exc:
        raise SpecError(f"{key}: {exc}") from None
    looks_local = reference.startswith(("/", ".", "~"))
    if looks_local and not Path(resolved.path).expanduser().is_dir():
        raise SpecError(f"{key}: {reference!r} is not a directory on the worker's filesystem")


def check_registry_name(key: str, name: Any, settings: Settings, kind: str | None = None) -> None:
    """A valid registry name; with ``kind``, one that does not already hold models of another
    kind (a policy published under an RM's name, or the other way round)."""
    try:
        check_name(name, key)
    except (RegistryError, TypeError) as exc:
        raise SpecError(f"{key}: {exc}") from None
    if kind is None:
        return
    versions = Registry.from_artifacts(settings.artifacts_dir).versions(name)
    if versions and versions[-1].metadata.get("kind", "reward_model") != kind:
        other = versions[-1].metadata.get("kind", "reward_model")
        raise SpecError(f"{key}: {name!r} holds {other} versions; a {kind} needs a name of its own")


def check_params(spec: dict[str, Any], set_by_spec: Iterable[str], config_name: str) -> dict[str, Any]:
    """``spec["params"]``: an object of ``config_name`` fields, none of them ``set_by_spec``
    (the config fields the spec's top-level keys or the job itself set)."""
    params = spec["params"]
    if not isinstance(params, dict):
        raise SpecError(f"params: must be an object of {config_name} fields")
    inside = sorted(set(params) & set(set_by_spec))
    if inside:
        raise SpecError(f"params: {inside} are set by the spec itself (its top-level keys) or by "
                        "the job (output_dir: the job's directory, artifacts_dir), not inside "
                        "params")
    return params


@contextlib.contextmanager
def config_errors_as_spec_errors() -> Iterator[None]:
    """Builds a trainer's config (``XxxConfig.from_dict``: the trainer's own checks, by field
    name) with its ValueErrors reported as ``params: ...`` spec errors; SpecErrors pass."""
    try:
        yield
    except SpecError:
        raise
    except ValueError as exc:
        raise SpecError(f"params: {exc}") from None


def validation_output_dir(settings: Settings) -> Path:
    """The output_dir a config is validated with at submission (nothing is written there)."""
    return settings.artifacts_dir / "jobs" / "_validation"


def required_preference_file(spec: dict[str, Any], key: str, data_dir: Path,
                             what: str = "preference pairs") -> Path:
    """``spec[key]``: a required data-dir JSONL of preference pairs, checked; its path."""
    if spec.get(key) is None:
        raise SpecError(f"{key}: required, a JSONL of {what} under {data_dir}")
    path = resolve_data_path(spec[key], key, data_dir)
    check_preference_jsonl(path, key)
    return path


def check_samples_jsonl(path: Path, key: str, *, need_responses: bool = True) -> list[dict]:
    """Every row a ``{"prompt": str[, "responses": [str, ...]]}`` object; returns the rows."""
    rows = []
    for line_no, row in jsonl_objects(path, key):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SpecError(f"{key}: line {line_no} of {path.name} lacks a non-empty string "
                            "'prompt'")
        responses = row.get("responses")
        malformed = (not isinstance(responses, list) or not responses
                     or not all(isinstance(r, str) for r in responses))
        if (need_responses or responses is not None) and malformed:
            raise SpecError(f"{key}: line {line_no} of {path.name}: 'responses' must be a "
                            "non-empty list of strings")
        rows.append(row)
    if not rows:
        raise SpecError(f"{key}: {path.name} holds no prompts")
    return rows


# ---------------------------------------------------------------------- run: metadata
def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers and strings of a metrics dict (no lists, dicts, None or booleans)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, int | float | str) and not isinstance(v, bool)}


def registry_version_label(model: ResolvedModel) -> str | None:
    """``name@vN`` when a resolved model came from the registry, else None (lineage)."""
    return model.label if model.version is not None else None


def reward_stats(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """``{"mean", "std"}`` of the rewards (what ``/score``'s ``normalize`` divides by)."""
    if "reward_mean" in metrics and "reward_std" in metrics:
        return {"mean": metrics["reward_mean"], "std": metrics["reward_std"]}
    return None


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
        "parent_version": registry_version_label(base),
        **lineage,
        "data_fingerprint": data_fingerprint([p for p in data_files if p]),
        "metrics": metrics,
        "params": params,
        "job_id": job_id,
    }
    stats = reward_stats(metrics)
    if stats is not None:
        metadata["reward_stats"] = stats
    return metadata


# ---------------------------------------------------------------------- run: publication
def publish_as_owner(ctx: JobContext, name: str, model_dir: Path | str,
                     metadata: dict[str, Any]) -> ModelVersion:
    """Publish a new version of ``name``, after checking this worker still holds the job."""
    ctx.ensure_owner()
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
