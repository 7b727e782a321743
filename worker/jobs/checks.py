"""Every check of a job spec that needs more than its shape (``worker.specs``): data files
exist under the data directory and parse, model references resolve, registry names are free
for the kind, ``params`` build the trainer's own config.

Torch-free (the API runs these at submission); a failed check raises ``SpecError`` naming
the spec key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import try_to_load_from_cache

from training.config import ConfigError, TrainerConfig
from training.data import DataError, load_pairs
from training.launch import FSDP_NEEDS_GPUS
from training.models import SHORT_NAMES
from training.registry import ModelNotFoundError, Registry, RegistryError, check_name, resolve_model
from worker.settings import WorkerSettings
from worker.specs import Resources, SpecError

# ---------------------------------------------------------------------- data files
DATA_DIR = "the data directory (GENERALRM_DATA_DIR)"  # messages never show server paths


def data_path(value: Any, key: str, data_dir: Path) -> Path:
    """A path a spec names: relative to the data directory (or absolute inside it), resolved;
    it need not exist."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise SpecError(f"{key}: give a path relative to {DATA_DIR}")
    root = data_dir.resolve()
    path = (root / value).resolve()  # an absolute value replaces root; '..' is resolved away
    if not path.is_relative_to(root):
        raise SpecError(f"{key}: {value!r} is outside {DATA_DIR}; put the file under it and give "
                        "a path relative to it")
    return path


def resolve_data_path(value: Any, key: str, data_dir: Path) -> Path:
    """A dataset file of a spec, which must exist under the data directory."""
    path = data_path(value, key, data_dir)
    if not path.is_file():
        raise SpecError(f"{key}: {value!r} does not exist in {DATA_DIR}")
    return path


def relative(path: Path, data_dir: Path) -> str:
    """How a message names a data file: relative to the data directory."""
    try:
        return str(path.relative_to(data_dir.resolve()))
    except ValueError:
        return path.name


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
    """Every row parses as a preference pair the trainers read (``training.data``: strings,
    or TRL's conversational formats, explicit or implicit prompt, optional ``margin``)."""
    try:
        load_pairs(path)
    except DataError as exc:
        where = f"line {exc.line} of {path.name}" if exc.line is not None else path.name
        message = str(exc).split(": ", 1)[-1] if exc.line is not None else str(exc).rsplit(": ", 1)[-1]
        raise SpecError(f"{key}: {where}: {message}") from None


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
    """A model reference the worker can load and is allowed to: a packaged short name
    (``minilm``), a registry reference (``rm@v3``, ``rm:production``), a local directory under
    an allowed root (the artifacts and data directories, GENERALRM_MODEL_ROOTS), or a hub id
    (with HF_HUB_OFFLINE=1: one in the local Hugging Face cache). Errors name ``key``.

    With ``resolve_short_names=False`` a packaged short name (``smollm2-135m``) that no
    registry model shadows is accepted as is: resolving it would convert the GGUF (seconds)
    inside the API's request.
    """
    if "\x00" in reference:
        raise SpecError(f"{key}: a model reference cannot contain a NUL character")
    if (not resolve_short_names and reference in SHORT_NAMES
            and Registry.from_artifacts(settings.artifacts_dir).try_resolve(reference) is None):
        return
    try:
        resolved = resolve_model(reference, settings.artifacts_dir)
    except ModelNotFoundError as exc:
        raise SpecError(f"{key}: {exc}") from None
    if resolved.from_registry or reference in SHORT_NAMES:
        return
    local = Path(resolved.path).expanduser()
    if reference.startswith(("/", ".", "~")) or local.is_dir():
        if not local.is_dir():
            raise SpecError(f"{key}: {reference!r} is not a directory on the worker's filesystem")
        roots = settings.allowed_model_roots
        if not any(local.resolve().is_relative_to(root) for root in roots):
            raise SpecError(f"{key}: {reference!r} is outside the directories jobs may load models "
                            "from (the artifacts and data directories and GENERALRM_MODEL_ROOTS)")
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and not _in_hub_cache(reference):
        raise SpecError(f"{key}: {reference!r} is neither a registry model, a packaged short name "
                        f"({', '.join(SHORT_NAMES)}), a local directory, nor a hub model in the "
                        "local Hugging Face cache (HF_HUB_OFFLINE=1: nothing is downloaded)")


def _in_hub_cache(repo_id: str) -> bool:
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def check_device(params: dict[str, Any]) -> None:
    """A job runs on its worker's device: ``auto``, ``cpu`` or ``cuda`` (the worker's GPU).
    Pinning a GPU index is the worker's business (one worker per GPU, CUDA_VISIBLE_DEVICES)."""
    device = params.get("device")
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise SpecError(f"params.device: {device!r}; a job runs on its worker's device: auto, "
                        "cpu or cuda. Pin GPUs by starting one worker per GPU (CUDA_VISIBLE_DEVICES)")


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
    the job itself set), and no pinned device."""
    check_device(params)
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


# ---------------------------------------------------------------------- resources
def check_resources(resources: Resources, settings: WorkerSettings, *, device: str,
                    batches: dict[str, int], finetune: str = "full",
                    replicated_reason: str | None = None,
                    single_process_reason: str | None = None) -> None:
    """``resources`` this deployment can run for a trainer with these settings: at most
    GENERALRM_JOB_MAX_PROCESSES processes, no fewer items in each of ``batches`` (params key →
    size: what the processes share) than processes, FSDP only on GPUs, for full fine-tuning and
    unless the kind keeps whole replicas (``replicated_reason``: why);
    ``single_process_reason``: why this config needs one process, if it does."""
    processes = resources.processes
    if processes == 1:
        return
    if processes > settings.job_max_processes:
        raise SpecError(f"resources.processes: {processes} is more than this deployment runs for "
                        f"one job (GENERALRM_JOB_MAX_PROCESSES={settings.job_max_processes})")
    if single_process_reason:
        raise SpecError(f"resources.processes: {processes}, but {single_process_reason}")
    for key, size in batches.items():
        if size < processes:
            raise SpecError(f"resources.processes: {processes} processes each take a share of "
                            f"every batch, and params.{key} is {size}; give a {key} of at least "
                            "the number of processes")
    if resources.strategy == "fsdp":
        if device == "cpu":
            raise SpecError(f"resources.strategy: {FSDP_NEEDS_GPUS}")
        if replicated_reason:
            raise SpecError(f"resources.strategy: {replicated_reason}")
        if finetune != "full":
            raise SpecError("resources.strategy: fsdp shards full fine-tuning; LoRA adapters are "
                            "small enough to replicate: use strategy ddp with finetune lora")
