"""What every job kind shares: spec errors, dataset paths, and the contexts a kind gets.

Torch-free: the API validates specs with these at submission.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.callbacks import TrainerCallback
from training.registry import Registry
from training.settings import Settings


class SpecError(ValueError):
    """A job spec that cannot run; the message says what to fix (the API answers 422)."""


@dataclass(frozen=True)
class ValidationContext:
    """What a spec validator may look at: settings (data dir, artifacts) and the registry."""

    settings: Settings

    @property
    def registry(self) -> Registry:
        return Registry.from_artifacts(self.settings.artifacts_dir)


@dataclass
class JobOutcome:
    """What a finished job reports: metrics and artifact references for its record."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobContext:
    """What a kind's runner gets on the worker."""

    job_id: str
    spec: dict[str, Any]
    run_dir: Path  # artifacts/jobs/{id}/: outputs and checkpoints; survives restarts
    settings: Settings
    callback: TrainerCallback  # progress + cooperative cancel (and loss of the lease)
    attempt: int
    registry: Registry
    check_owner: Any = None  # () -> None; raises LeaseLost when another worker took the job

    def ensure_owner(self) -> None:
        """Call before anything visible outside the run dir (publishing a version)."""
        if self.check_owner is not None:
            self.check_owner()


def require_mapping(spec: Any, kind: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise SpecError(f"the spec of a {kind} job must be a JSON object, got {type(spec).__name__}")
    return spec


def reject_unknown_keys(spec: dict[str, Any], allowed: Iterable[str], kind: str) -> None:
    allowed = sorted(allowed)
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise SpecError(
            f"unknown spec key(s) {unknown} for a {kind} job; allowed keys: {allowed}"
        )


def spec_with_defaults(spec: Any, kind: str, defaults: dict[str, Any],
                       allowed: Iterable[str]) -> dict[str, Any]:
    """A kind's spec: a JSON object of ``allowed`` keys only, ``defaults`` filled in."""
    spec = {**defaults, **require_mapping(spec, kind)}
    reject_unknown_keys(spec, allowed, kind)
    return spec


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


def data_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the bytes of the data files (in order): the lineage of a trained model."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{Path(path).stat().st_size}:".encode())  # file boundaries count
        with open(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def latest_checkpoint_step(run_dir: Path) -> int:
    """Step of the newest complete checkpoint under ``run_dir/checkpoints`` (0 if none).

    Reads the manifests of ``training.checkpoint``'s layout without importing torch.
    """
    root = run_dir / "checkpoints"
    steps = []
    if root.is_dir():
        for path in root.iterdir():
            manifest = path / "MANIFEST.json"
            if path.is_dir() and not path.name.endswith(".tmp") and manifest.is_file():
                try:
                    steps.append(int(json.loads(manifest.read_text())["step"]))
                except (ValueError, KeyError, OSError):
                    continue
    return max(steps, default=0)
