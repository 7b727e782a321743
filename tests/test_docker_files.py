"""docker-compose.yml and the Dockerfiles, checked by reading them (no Docker daemon here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = _compose()["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(v.endswith(":/data") and not v.startswith(".") for v in redis["volumes"])
    assert "healthcheck" in redis


def test_api_serves_on_8000_with_a_health_check() -> None:
    api = _compose()["services"]["api"]
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert api["build"]["dockerfile"] == "docker/api.Dockerfile"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_reserves_a_gpu_and_has_time_to_checkpoint() -> None:
    worker = _compose()["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert _seconds(worker["stop_grace_period"]) >= 60
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert "healthcheck" in worker
    assert worker["command"][:3] == ["python", "-m", "worker"]


def test_api_and_worker_share_artifacts_redis_and_settings() -> None:
    compose = _compose()
    services = compose["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["GENERALRM_REDIS_URL"] == "redis://redis:6379/0"
        assert env["GENERALRM_ARTIFACTS_DIR"] == "/artifacts"
        assert "artifacts:/artifacts" in services[name]["volumes"]
        assert all(key.startswith(("GENERALRM_", "HF_")) for key in env)
    assert {"artifacts", "redis-data"} <= set(compose["volumes"])


def test_dockerfiles_build_the_right_images() -> None:
    api = (REPO / "docker" / "api.Dockerfile").read_text()
    worker = (REPO / "docker" / "worker.Dockerfile").read_text()
    assert re.search(r"ARG BASE_IMAGE=python:3\.\d+", api), "API image is CPU by default"
    assert "ARG TORCH_INDEX_URL" in api, "and CUDA through a build argument"
    assert re.search(r"ARG BASE_IMAGE=nvidia/cuda:", worker), "worker image is CUDA"
    for text, command in ((api, '"service"'), (worker, '"worker"')):
        assert "torch==2.13.0" in text
        assert re.search(rf'^CMD \["python", "-m", {command}', text, re.M)
        assert "HEALTHCHECK" in text and "USER 1000" in text
        for directory in ("service", "worker", "training"):
            assert f"COPY {directory} ./{directory}" in text


def test_images_carry_the_product_and_no_benchmark_harness() -> None:
    for dockerfile in ("api.Dockerfile", "worker.Dockerfile"):
        copied = re.findall(r"^COPY\s+(\S+)", (REPO / "docker" / dockerfile).read_text(), re.M)
        assert "benchdata" in copied, dockerfile  # the data the meta_train job kind reads
        assert "bench" not in copied and "bench/" not in copied, dockerfile
