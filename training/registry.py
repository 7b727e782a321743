"""The model registry on a plain filesystem (DESIGN §6); no Redis, no torch.

Layout under ``{artifacts_dir}/models``::

    {name}/v1/                 weights (safetensors) + tokenizer + generalrm.json
    {name}/v2/ ...
    {name}/aliases/{alias}     a small text file holding a version ("v2")

A version directory appears atomically: it is written as ``.v?-{random}.tmp`` with
``generalrm.json`` last, then renamed to the next free ``vN``. A rename onto an existing
non-empty directory fails, so two concurrent publishers can never take the same number; the
loser simply tries the next one. A directory without ``generalrm.json`` (a manual copy gone
wrong, a half-deleted version) is never listed nor resolved.

References: ``name`` (alias ``production`` if set, else ``latest``, else the newest
version), ``name@v3`` (or ``name@3``), ``name:alias``.

Integrity: ``generalrm.json`` records the sha256 of every file of the version (``files``) when
it is published; :func:`verify_files` checks them before a version is loaded, so a version
whose weights were damaged after publication (zero-filled, truncated) is never served.
``{name}/.last-served`` names the version a server last loaded: where a served alias falls back
when its target cannot load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.atomic import utc_now, write_text_atomic
from training.models import ModelNotFoundError as _PretrainedNotFoundError
from training.models import resolve_pretrained

METADATA_FILE = "generalrm.json"
ALIASES_DIR = "aliases"
DEFAULT_ALIASES = ("production", "latest")  # what a bare name resolves to, in this order
KINDS = ("reward_model", "policy")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_VERSION = re.compile(r"^v([1-9][0-9]*)$")


class RegistryError(Exception):
    """A registry operation was asked something it cannot do (bad name, bad metadata...)."""


class ModelNotFoundError(RegistryError, _PretrainedNotFoundError):
    """A registry reference names no complete version (also a ``training.models`` one)."""


class IntegrityError(RegistryError):
    """A version's files differ from the digests recorded when it was published."""


LAST_SERVED_FILE = ".last-served"


def file_digests(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of a model directory but its metadata."""
    digests = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative == METADATA_FILE:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(block)
        digests[relative] = digest.hexdigest()
    return digests


def verify_files(directory: Path | str, metadata: dict[str, Any], label: str) -> None:
    """Raise :class:`IntegrityError` when a file recorded in ``metadata["files"]`` is missing
    or differs (versions published before digests were recorded are not checked)."""
    recorded = metadata.get("files")
    if not isinstance(recorded, dict):
        return
    found = file_digests(Path(directory))
    damaged = sorted(name for name, digest in recorded.items() if found.get(name) != digest)
    if damaged:
        raise IntegrityError(
            f"{label}: {', '.join(damaged)} differ from the digests recorded when it was "
            "published (damaged or changed on disk); it is not loaded")


def check_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(
            f"{what} {name!r} must be 1-128 characters of letters, digits, '_', '.', '-' "
            "starting with a letter or digit"
        )
    return name


def normalize_version(version: str | int) -> str:
    """``3``, ``"3"`` and ``"v3"`` all mean ``"v3"``."""
    text = str(version)
    if text.isdigit():
        text = f"v{text}"
    if not _VERSION.match(text):
        raise RegistryError(f"version {version!r} is not of the form v1, v2, ...")
    return text


def _version_number(version: str) -> int:
    match = _VERSION.match(version)
    return int(match.group(1)) if match else 0


def is_registry_reference(reference: str) -> bool:
    """True when ``reference`` has the registry's ``name@version`` / ``name:alias`` shape."""
    for separator in ("@", ":"):
        if separator in reference:
            name, _, rest = reference.partition(separator)
            return bool(_NAME.match(name) and _NAME.match(rest))
    return False


def reward_stats(metadata: dict[str, Any]) -> dict[str, float] | None:
    """``{"mean", "std"}`` recorded at training time (what ``normalize: true`` uses), or None
    when a version has none or a zero spread that nothing could be divided by."""
    stats = metadata.get("reward_stats")
    if isinstance(stats, dict) and "mean" in stats and stats.get("std"):
        return {"mean": float(stats["mean"]), "std": float(stats["std"])}
    return None


def reward_stats_entry(metrics: dict[str, Any]) -> dict[str, float] | None:
    """The ``reward_stats`` entry of a new version's metadata, from a trainer's metrics
    (``reward_mean``/``reward_std``), or None when the trainer measured none."""
    if "reward_mean" in metrics and "reward_std" in metrics:
        return {"mean": metrics["reward_mean"], "std": metrics["reward_std"]}
    return None


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """``name@version``: what a response names as the model that produced it."""
        return f"{self.name}@{self.version}"

    @property
    def reward_stats(self) -> dict[str, float] | None:
        return reward_stats(self.metadata)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "reference": self.reference,
            "path": str(self.path),
            "metadata": self.metadata,
        }


class Registry:
    """Versions and aliases of named models under ``root`` (``{artifacts_dir}/models``)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @classmethod
    def from_artifacts(cls, artifacts_dir: Path | str) -> Registry:
        return cls(Path(artifacts_dir) / "models")

    # ------------------------------------------------------------------ reading
    def _model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    def _load(self, name: str, version: str) -> ModelVersion | None:
        path = self._model_dir(name) / version
        try:
            metadata = json.loads((path / METADATA_FILE).read_text())
        except (OSError, ValueError):
            return None  # no or unreadable generalrm.json: a broken version, invisible
        if not isinstance(metadata, dict):
            return None
        return ModelVersion(name, version, path, metadata)

    def versions(self, name: str) -> list[ModelVersion]:
        """Complete versions of ``name``, oldest first."""
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        names = sorted(
            (p.name for p in model_dir.iterdir() if p.is_dir() and _VERSION.match(p.name)),
            key=_version_number,
        )
        return [v for v in (self._load(name, n) for n in names) if v is not None]

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def aliases(self, name: str) -> dict[str, str]:
        """``{alias: version}`` for the aliases of ``name`` that point at a complete version."""
        alias_dir = self._model_dir(name) / ALIASES_DIR
        if not alias_dir.is_dir():
            return {}
        found = {}
        for path in sorted(alias_dir.iterdir()):
            if path.name.startswith(".") or not _NAME.match(path.name):
                continue
            target = self.alias_target(name, path.name)
            if target is not None:
                found[path.name] = target
        return found

    def alias_target(self, name: str, alias: str) -> str | None:
        """The version ``alias`` points at, or None (unset, or pointing at a broken version)."""
        check_name(alias, "alias")
        try:
            version = (self._model_dir(name) / ALIASES_DIR / alias).read_text().strip()
        except OSError:
            return None
        if not _VERSION.match(version) or self._load(name, version) is None:
            return None
        return version

    def list_models(self) -> list[dict[str, Any]]:
        """Every model with a complete version: name, kind, versions (with metadata), aliases."""
        out = []
        for name in self.model_names():
            versions = self.versions(name)
            if not versions:
                continue
            out.append(
                {
                    "name": name,
                    "kind": versions[-1].metadata.get("kind", "reward_model"),
                    "versions": [
                        {"version": v.version, "reference": v.reference, "path": str(v.path),
                         "metadata": v.metadata}
                        for v in versions
                    ],
                    "aliases": self.aliases(name),
                }
            )
        return out

    def get(self, name: str, version: str | int) -> ModelVersion:
        found = self._load(name, normalize_version(version))
        if found is None:
            known = ", ".join(v.version for v in self.versions(name)) or "none"
            raise ModelNotFoundError(
                f"model {name!r} has no version {normalize_version(version)!r} (versions: {known})"
            )
        return found

    def resolve(self, reference: str) -> ModelVersion:
        """``name``, ``name@v3`` or ``name:alias`` → a complete version, or ModelNotFoundError."""
        if "@" in reference:
            name, _, version = reference.partition("@")
            try:
                return self.get(name, version)
            except RegistryError as exc:
                raise ModelNotFoundError(f"{reference!r}: {exc}") from exc
        if ":" in reference:
            name, _, alias = reference.partition(":")
            try:
                target = self.alias_target(name, alias)
            except RegistryError as exc:
                raise ModelNotFoundError(f"{reference!r}: {exc}") from exc
            if target is None:
                raise ModelNotFoundError(
                    f"model {name!r} has no alias {alias!r} "
                    f"(aliases: {', '.join(self.aliases(name)) or 'none'})"
                )
            return self.get(name, target)
        try:
            name = check_name(reference)
        except RegistryError as exc:
            raise ModelNotFoundError(str(exc)) from exc
        for alias in DEFAULT_ALIASES:
            target = self.alias_target(name, alias)
            if target is not None:
                return self.get(name, target)
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"no model {name!r} in the registry")
        return versions[-1]

    def try_resolve(self, reference: str) -> ModelVersion | None:
        """Like :meth:`resolve` but None when the reference is not a registry model."""
        try:
            return self.resolve(reference)
        except ModelNotFoundError:
            return None

    def version_for_job(self, name: str, job_id: str) -> ModelVersion | None:
        """The version a job already published under ``name`` (idempotent publish)."""
        for version in self.versions(name):
            if version.metadata.get("job_id") == job_id:
                return version
        return None

    # ------------------------------------------------------------------ writing
    def publish(
        self,
        name: str,
        source_dir: Path | str,
        metadata: dict[str, Any],
        *,
        version: str | int | None = None,
        aliases: tuple[str, ...] = ("latest",),
    ) -> ModelVersion:
        """Copy ``source_dir`` in as a new complete version; set ``aliases`` on it.

        ``metadata`` is stored as ``generalrm.json`` with ``name``, ``version`` and
        ``created_at`` filled in. When it has a ``job_id`` that already published a version
        of ``name``, that version is returned unchanged: publishing is idempotent per job.
        """
        check_name(name)
        source = Path(source_dir)
        if not source.is_dir():
            raise RegistryError(f"cannot publish {source}: not a directory")
        kind = metadata.get("kind", "reward_model")
        if kind not in KINDS:
            raise RegistryError(f"metadata kind must be one of {KINDS}, not {kind!r}")
        job_id = metadata.get("job_id")
        if job_id:
            existing = self.version_for_job(name, job_id)
            if existing is not None:
                return existing
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f".publish-{uuid.uuid4().hex}.tmp"
        try:
            # a copy, not a move: a crash here must leave the job's output for its resume
            shutil.copytree(source, tmp)
            (tmp / METADATA_FILE).unlink(missing_ok=True)
            metadata = {**metadata, "files": file_digests(tmp)}
            published = self._rename_into_place(name, tmp, metadata, kind, version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for alias in aliases:
            self.set_alias(name, alias, published.version)
        return published

    def _rename_into_place(
        self, name: str, tmp: Path, metadata: dict[str, Any], kind: str, version: str | int | None
    ) -> ModelVersion:
        model_dir = self._model_dir(name)
        wanted = normalize_version(version) if version is not None else None
        while True:
            if wanted is not None:
                target = wanted
            else:
                taken = [_version_number(p.name) for p in model_dir.iterdir() if p.is_dir()]
                target = f"v{max(taken, default=0) + 1}"
            record = {
                **metadata,
                "kind": kind,
                "name": name,
                "version": target,
                "created_at": metadata.get("created_at") or utc_now(),
            }
            # generalrm.json is written last: it is what makes a version complete
            write_text_atomic(tmp / METADATA_FILE, json.dumps(record, indent=2, sort_keys=True, default=str))
            try:
                os.rename(tmp, model_dir / target)
            except OSError as exc:
                if not (model_dir / target).exists():
                    raise
                if wanted is not None:
                    raise RegistryError(f"{name}@{target} already exists") from exc
                continue  # another publisher took this number first: take the next one
            return ModelVersion(name, target, model_dir / target, record)

    @contextlib.contextmanager
    def _metadata_lock(self, path: Path) -> Iterator[None]:
        """One writer at a time of a version's ``generalrm.json`` (processes on this host;
        across hosts on a shared volume the last of two simultaneous writers wins)."""
        with open(path / ".generalrm.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def add_evaluation(self, name: str, version: str | int,
                       evaluation: dict[str, Any]) -> ModelVersion:
        """Append ``evaluation`` to the ``evaluations`` list of a version's metadata, written
        atomically. An entry with the same ``job_id`` is replaced, so a job that runs twice
        records once. Everything else in the metadata is left as it was."""
        found = self.get(name, version)
        with self._metadata_lock(found.path):
            current = self.get(name, version).metadata  # re-read under the lock
            job_id = evaluation.get("job_id")
            kept = [e for e in current.get("evaluations", [])
                    if not (job_id and isinstance(e, dict) and e.get("job_id") == job_id)]
            record = {**current, "evaluations": [*kept, {"created_at": utc_now(), **evaluation}]}
            write_text_atomic(found.path / METADATA_FILE,
                              json.dumps(record, indent=2, sort_keys=True, default=str))
        return ModelVersion(found.name, found.version, found.path, record)

    def set_alias(self, name: str, alias: str, version: str | int) -> ModelVersion:
        """Point ``alias`` at ``version`` (atomically); the version must be complete."""
        check_name(alias, "alias")
        target = self.get(name, version)
        write_text_atomic(self._model_dir(name) / ALIASES_DIR / alias, target.version + "\n")
        return target

    def record_served(self, name: str, version: str) -> None:
        """Remember the version a server loaded and served (the fallback of a broken alias)."""
        write_text_atomic(self._model_dir(name) / LAST_SERVED_FILE, version + "\n")

    def last_served(self, name: str) -> ModelVersion | None:
        try:
            version = (self._model_dir(name) / LAST_SERVED_FILE).read_text().strip()
        except OSError:
            return None
        return self._load(name, version) if _VERSION.match(version) else None

    def resolve_if(self, reference: str, name: str, alias: str, version: str) -> ModelVersion:
        """What ``reference`` would resolve to if ``name:alias`` pointed at ``version``
        (a promotion is checked before the alias moves)."""
        ref_name = reference.partition("@")[0].partition(":")[0]
        follows = (ref_name == name and "@" not in reference
                   and (reference == f"{name}:{alias}" or ":" not in reference))
        if not follows:
            return self.resolve(reference)
        if ":" in reference:
            return self.get(name, version)
        # a bare name: production if set, else latest, else the newest version
        for candidate in DEFAULT_ALIASES:
            target = version if candidate == alias else self.alias_target(name, candidate)
            if target is not None:
                return self.get(name, target)
        return self.resolve(reference)

    def delete_alias(self, name: str, alias: str) -> None:
        check_name(alias, "alias")
        (self._model_dir(name) / ALIASES_DIR / alias).unlink(missing_ok=True)


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made loadable: ``path`` is what ``from_pretrained`` takes.

    ``name@version`` (``label``) is what a response names as the model that produced it:
    a registry version (``rm@v3``), a local directory (``<dir name>@pretrained``, or the
    short name: ``minilm@pretrained``), or a hub id (``org/model@hub``).
    """

    reference: str  # what was asked for
    path: str
    name: str
    version: str  # vN from the registry, "pretrained" (a local directory) or "hub"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def from_registry(self) -> bool:
        return _VERSION.match(self.version) is not None

    @property
    def registry_label(self) -> str | None:
        """``name@vN`` when the model came from the registry, else None (lineage)."""
        return self.label if self.from_registry else None

    @property
    def reward_stats(self) -> dict[str, float] | None:
        return reward_stats(self.metadata)


def _from_version(reference: str, found: ModelVersion) -> ResolvedModel:
    return ResolvedModel(reference, str(found.path), found.name, found.version, dict(found.metadata))


def resolve_model(reference: str, artifacts_dir: Path | str) -> ResolvedModel:
    """Any model reference of DESIGN §6: ``name[@version|:alias]`` from the registry, a
    packaged short name (``minilm``), a local directory, or a hub id (passed through).

    A bare name is looked up in the registry first, so a registered model may shadow a short
    name. Raises :class:`ModelNotFoundError` for a registry-shaped reference that names no
    complete version.
    """
    registry = Registry.from_artifacts(artifacts_dir)
    if is_registry_reference(reference):
        return _from_version(reference, registry.resolve(reference))
    if _NAME.match(reference):
        found = registry.try_resolve(reference)
        if found is not None:
            return _from_version(reference, found)
    path = resolve_pretrained(reference, artifacts_dir)
    local = Path(path)
    if local.is_dir():
        metadata_file = local / METADATA_FILE
        try:
            metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
        except (OSError, ValueError):
            metadata = {}
        name = reference if reference != path else local.name
        return ResolvedModel(reference, path, name, "pretrained",
                             metadata if isinstance(metadata, dict) else {})
    return ResolvedModel(reference, path, reference, "hub", {})


def resolve_verified(reference: str, artifacts_dir: Path | str) -> ResolvedModel:
    """:func:`resolve_model`, and a registry version's files checked against their digests:
    what a worker or the server calls right before loading a model."""
    resolved = resolve_model(reference, artifacts_dir)
    if resolved.from_registry:
        verify_files(resolved.path, resolved.metadata, resolved.label)
    return resolved
