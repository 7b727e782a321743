"""The filesystem model registry: atomic versions, aliases, references, broken versions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from training import models
from training.registry import (
    METADATA_FILE,
    ModelNotFoundError,
    Registry,
    RegistryError,
    is_registry_reference,
    resolve_model,
)


def _weights(tmp_path: Path, content: str = "weights") -> Path:
    source = tmp_path / f"src-{content}"
    source.mkdir()
    (source / "model.safetensors").write_text(content)
    (source / "tokenizer.json").write_text("{}")
    return source


def _meta(**extra) -> dict:
    return {"kind": "reward_model", "base_model": "minilm", "algorithm": "bradley_terry",
            "metrics": {"eval_accuracy": 0.75}, **extra}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def test_publish_numbers_versions_and_moves_latest(registry: Registry, tmp_path: Path) -> None:
    first = registry.publish("rm", _weights(tmp_path, "a"), _meta())
    second = registry.publish("rm", _weights(tmp_path, "b"), _meta())
    assert (first.version, second.version) == ("v1", "v2")
    assert (second.path / "model.safetensors").read_text() == "b"
    stored = json.loads((second.path / METADATA_FILE).read_text())
    assert stored["name"] == "rm" and stored["version"] == "v2" and stored["created_at"]
    assert registry.alias_target("rm", "latest") == "v2"
    assert registry.resolve("rm").version == "v2"
    # no temporary directory is left behind next to the versions
    assert sorted(p.name for p in (registry.root / "rm").iterdir()) == ["aliases", "v1", "v2"]


def test_publish_keeps_the_source_directory(registry: Registry, tmp_path: Path) -> None:
    source = _weights(tmp_path)
    registry.publish("rm", source, _meta())
    assert (source / "model.safetensors").is_file()


def test_references_name_version_and_alias(registry: Registry, tmp_path: Path) -> None:
    registry.publish("rm", _weights(tmp_path, "a"), _meta())
    registry.publish("rm", _weights(tmp_path, "b"), _meta())
    assert registry.resolve("rm@v1").version == "v1"
    assert registry.resolve("rm@1").version == "v1"
    assert registry.resolve("rm:latest").version == "v2"
    registry.set_alias("rm", "production", "v1")
    assert registry.resolve("rm").version == "v1", "a bare name prefers production over latest"
    assert registry.resolve("rm:production").reference == "rm@v1"
    registry.set_alias("rm", "production", "v2")  # promote
    assert registry.resolve("rm").version == "v2"
    assert registry.aliases("rm") == {"latest": "v2", "production": "v2"}


def test_unknown_references_raise_model_not_found(registry: Registry, tmp_path: Path) -> None:
    registry.publish("rm", _weights(tmp_path), _meta())
    for reference in ("other", "rm@v9", "rm:staging", "rm@x1", "bad name"):
        with pytest.raises(ModelNotFoundError):
            registry.resolve(reference)
    # also catchable as the loader's "model not found"
    with pytest.raises(models.ModelNotFoundError):
        registry.resolve("rm@v9")
    with pytest.raises(ModelNotFoundError):
        registry.set_alias("rm", "production", "v7")
    with pytest.raises(RegistryError):
        registry.publish("../escape", _weights(tmp_path, "x"), _meta())
    with pytest.raises(RegistryError):
        registry.publish("rm", _weights(tmp_path, "y"), _meta(kind="tokenizer"))


def test_broken_version_is_never_listed_or_resolved(registry: Registry, tmp_path: Path) -> None:
    registry.publish("rm", _weights(tmp_path, "a"), _meta())
    broken = registry.root / "rm" / "v2"  # e.g. a copy that died before generalrm.json
    broken.mkdir()
    (broken / "model.safetensors").write_text("half")
    (registry.root / "rm" / "aliases" / "production").write_text("v2\n")
    assert [v.version for v in registry.versions("rm")] == ["v1"]
    with pytest.raises(ModelNotFoundError):
        registry.resolve("rm@v2")
    assert registry.alias_target("rm", "production") is None
    assert registry.resolve("rm").version == "v1", "falls back to latest"
    listed = registry.list_models()
    assert [v["version"] for v in listed[0]["versions"]] == ["v1"]
    assert listed[0]["aliases"] == {"latest": "v1"}
    # the next publish does not reuse the number of the broken directory
    assert registry.publish("rm", _weights(tmp_path, "b"), _meta()).version == "v3"


def test_list_models_reports_kind_metadata_and_aliases(registry: Registry, tmp_path: Path) -> None:
    registry.publish("rm", _weights(tmp_path, "a"), _meta(job_id="j1"))
    registry.publish("policy-x", _weights(tmp_path, "p"), _meta(kind="policy"))
    (registry.root / "empty").mkdir()  # a name without a complete version is not a model
    listed = {m["name"]: m for m in registry.list_models()}
    assert set(listed) == {"rm", "policy-x"}
    assert listed["policy-x"]["kind"] == "policy"
    version = listed["rm"]["versions"][0]
    assert version["reference"] == "rm@v1"
    assert version["metadata"]["metrics"]["eval_accuracy"] == 0.75
    assert version["metadata"]["job_id"] == "j1"


def test_publish_is_idempotent_per_job(registry: Registry, tmp_path: Path) -> None:
    first = registry.publish("rm", _weights(tmp_path, "a"), _meta(job_id="job-1"))
    again = registry.publish("rm", _weights(tmp_path, "b"), _meta(job_id="job-1"))
    assert again.version == first.version
    assert [v.version for v in registry.versions("rm")] == ["v1"]
    assert registry.version_for_job("rm", "job-1").version == "v1"


def test_concurrent_publishers_never_share_a_version(registry: Registry, tmp_path: Path) -> None:
    sources = [_weights(tmp_path, f"w{i}") for i in range(8)]
    published = []
    threads = [threading.Thread(target=lambda s=s: published.append(
        registry.publish("rm", s, _meta()))) for s in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(v.version for v in published) == sorted(f"v{i}" for i in range(1, 9))
    contents = {(v.path / "model.safetensors").read_text() for v in published}
    assert contents == {f"w{i}" for i in range(8)}


def test_reward_stats_and_reference_helpers(registry: Registry, tmp_path: Path) -> None:
    version = registry.publish("rm", _weights(tmp_path), _meta(reward_stats={"mean": 0.5, "std": 2}))
    assert registry.resolve("rm").reward_stats == {"mean": 0.5, "std": 2.0}
    assert registry.publish("rm", _weights(tmp_path, "n"), _meta()).reward_stats is None
    assert is_registry_reference("rm@v1") and is_registry_reference("rm:production")
    assert not is_registry_reference("org/model") and not is_registry_reference("minilm")
    resolved = resolve_model("rm@v1", tmp_path)
    assert resolved.path == str(version.path) and resolved.label == "rm@v1"
    assert resolved.from_registry and resolved.registry_label == "rm@v1"
    local = tmp_path / "some-dir"
    local.mkdir()
    outside = resolve_model(str(local), tmp_path)
    assert outside.path == str(local) and outside.label == "some-dir@pretrained"
    assert not outside.from_registry and outside.registry_label is None
    hub = resolve_model("org/hub-model", tmp_path)
    assert hub.path == "org/hub-model" and hub.label == "org/hub-model@hub"
