"""Every check of a job spec that needs more than its shape (``worker.specs``): data files
exist under the data directory and parse, model references resolve, registry names are free
for the kind, ``params`` build the trainer's own config.

Torch-free (the API runs these at submission); a failed check raises ``SpecError`` naming
the spec key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from training.config import ConfigError, TrainerConfig
from training.models import SHORT_NAMES
from training.registry import ModelNotFoundError, Registry, RegistryError, check_name, resolve_model
from worker.settings import WorkerSettings
from worker.specs import SpecError


# ---------------------------------------------------------------------- data files
def resolve_data_path(value: Any, key: str, data_dir: Path) -> Path:
    """A dataset path of a spec: relative to the data directory (or absolute inside it)."""
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{key}: give a dataset path relative to the data directory {data_dir}")
    root = data_dir.resolve()
    path = (root / value).resolve()  # an absolute value replaces root; '..' is resolved away
    if not path.is_relative_to(root):
        raise SpecError(
            f"{key}: {value!r} is outside the data directory {root}; put the file under it "
            "(GENERALRM_DATA_DIR) and give a path relative to it"
        )
    if not path.is_file():
        raise SpecError(f"{key}: {value!r} does not exist in the data directory {root}")
    return path


def _json_lines(path: Path, key: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of the non-blank lines of a JSONL file; SpecError on bad JSON."""
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except ValueError as exc:
                raise SpecError(f"{key}: line {line_no} of {path.name} is not JSON ({exc})") from None


def jsonl_objects(path: Path, key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSONL file of objects; SpecError on bad JSON or a non-object."""
    for line_no, row in _json_lines(path, key):
        if not isinstance(row, dict):
            raise SpecError(f"{key}: line {line_no} of {path.name} is not a JSON object")
        yield line_no, row


def check_preference_jsonl(path: Path, key: str) -> None:
    """Cheap check of the first record: a JSONL of {"prompt","chosen","rejected"} objects."""
    for line_no, row in _json_lines(path, key):
        missing = [k for k in ("prompt", "chosen", "rejected")
                   if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise SpecError(
                f"{key}: line {line_no} of {path.name} lacks string field(s) {missing}; "
                'each line must be {"prompt": ..., "chosen": ..., "rejected": ...}'
            )
        return
    raise SpecError(f"{key}: {path.name} holds no preference pairs")


def preference_file(value: Any, key: str, data_dir: Path) -> Path:
    """A data-dir JSONL of preference pairs, checked; its absolute path."""
    path = resolve_data_path(value, key, data_dir)
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


def domains_of(path: Path, key: str) -> set[str]:
    return {row["domain"] for _, row in jsonl_objects(path, key) if isinstance(row.get("domain"), str)}


# ---------------------------------------------------------------------- models and names
def check_model_reference(key: str, reference: str, settings: WorkerSettings, *,
                          resolve_short_names: bool = True) -> None:
    """A model reference the worker can load: a short name (``minilm``), a local directory, a
    hub id or a registry reference (``rm@v3``, ``rm:production``); errors name ``key``.

    With ``resolve_short_names=False`` a packaged short name (``smollm2-135m``) that no
    registry model shadows is accepted as is: resolving it would convert the GGUF (seconds)
    inside the API's request.
    """
    if (not resolve_short_names and reference in SHORT_NAMES
            and Registry.from_artifacts(settings.artifacts_dir).try_resolve(reference) is None):
        return
    try:
        resolved = resolve_model(reference, settings.artifacts_dir)
    except ModelNotFoundError as exc:
        raise SpecError(f"{key}: {exc}") from None
    looks_local = reference.startswith(("/", ".", "~"))
    if looks_local and not Path(resolved.path).expanduser().is_dir():
        raise SpecError(f"{key}: {reference!r} is not a directory on the worker's filesystem")


def check_registry_name(key: str, name: str, settings: WorkerSettings,
                        kind: str | None = None) -> None:
    """A valid registry name; with ``kind``, one that does not already hold models of another
    kind (a policy published under an RM's name, or the other way round)."""
    try:
        check_name(name, key)
    except RegistryError as exc:
        raise SpecError(f"{key}: {exc}") from None
    if kind is None:
        return
    versions = Registry.from_artifacts(settings.artifacts_dir).versions(name)
    if versions and versions[-1].metadata.get("kind", "reward_model") != kind:
        other = versions[-1].metadata.get("kind", "reward_model")
        raise SpecError(f"{key}: {name!r} holds {other} versions; a {kind} needs a name of its own")


# ---------------------------------------------------------------------- params
def check_params(params: dict[str, Any], set_by_spec: Iterable[str]) -> dict[str, Any]:
    """``params`` hold none of ``set_by_spec`` (the config fields the spec's top-level keys or
    the job itself set)."""
    inside = sorted(set(params) & set(set_by_spec))
    if inside:
        raise SpecError(f"params: {inside} are set by the spec itself (its top-level keys) or by "
                        "the job (output_dir: the job's directory, artifacts_dir), not inside "
                        "params")
    return params


def trainer_config(config_cls: type[TrainerConfig], values: dict[str, Any],
                   where: str = "params") -> TrainerConfig:
    """The trainer's own config built from a spec (its checks, by field name); a bad value is
    a SpecError naming ``where``."""
    try:
        return config_cls.from_dict(values)
    except ConfigError as exc:
        raise SpecError(f"{where}: {exc}") from None


def validation_output_dir(settings: WorkerSettings) -> Path:
    """The output_dir a config is validated with at submission (nothing is written there)."""
    return settings.artifacts_dir / "jobs" / "_validation"
