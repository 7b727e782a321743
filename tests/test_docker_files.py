"""docker-compose.yml and docker/Dockerfile, checked without a Docker daemon: the Compose
Specification's JSON schema and hadolint (both offline, installed from PyPI), the structure
the README promises, and the health checks run against a real API and a real worker."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.cli import GRACEFUL_SHUTDOWN_SECONDS

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE_FILES = [REPO / "docker-compose.yml", REPO / "docker" / "compose.api-gpu.yml"]
TORCH_2_13_CUDA = {"cu126", "cu129", "cu130", "cu132"}  # PyTorch's wheel indexes for 2.13


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `make install` installs the dev dependencies")
    return found


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _workers() -> dict[str, dict]:
    return {name: s for name, s in _compose()["services"].items() if name.startswith("worker")}


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration))


def _healthcheck_command(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1].replace("$$", "$")]
    return [sys.executable if arg == "python" else arg for arg in test[1:]]


# ---------------------------------------------------------------------- linters
def test_compose_files_match_the_compose_specification():
    result = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             *map(str, COMPOSE_FILES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_has_teeth(tmp_path):
    broken = tmp_path / "compose.yml"
    broken.write_text("name: x\nservces:\n  a:\n    image: redis\n")
    result = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(broken)], capture_output=True, text=True)
    assert result.returncode == 1 and "servces" in result.stdout + result.stderr


def test_hadolint_finds_nothing():
    result = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------- compose
def test_redis_keeps_an_append_only_file_on_a_volume():
    redis = _compose()["services"]["redis"]
    assert "--appendonly yes" in " ".join(redis["command"])
    assert any(v.endswith(":/data") and not v.startswith(".") for v in redis["volumes"])
    assert "healthcheck" in redis


def test_api_is_ready_checked_and_outlives_uvicorns_graceful_shutdown():
    api = _compose()["services"]["api"]
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert "/ready" in " ".join(api["healthcheck"]["test"])
    assert api["build"]["dockerfile"] == "docker/Dockerfile" and api["build"]["target"] == "api"
    assert api["build"]["args"]["DEVICE"] == "cpu"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert _seconds(api["stop_grace_period"]) > GRACEFUL_SHUTDOWN_SECONDS


def test_one_worker_per_gpu_each_with_its_own_device_and_name():
    workers = _workers()
    assert {"worker-0", "worker-1"} <= set(workers)
    devices, names = [], []
    for worker in workers.values():
        (reservation,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]
        assert "count" not in reservation and len(reservation["device_ids"]) == 1
        devices += reservation["device_ids"]
        names.append(worker["environment"]["GENERALRM_WORKER_NAME"])
        assert worker["build"]["target"] == "worker" and worker["build"]["args"]["DEVICE"] == "cuda"
        cuda = re.fullmatch(r"\$\{TORCH_CUDA:-(\w+)\}", worker["build"]["args"]["TORCH_CUDA"])
        assert cuda and cuda.group(1) in TORCH_2_13_CUDA
        assert _seconds(worker["stop_grace_period"]) >= 60
        assert worker["command"][:3] == ["python", "-m", "worker"]
        assert "inspect ping" in worker["healthcheck"]["test"][1]
    assert len(set(devices)) == len(devices) and len(set(names)) == len(names)
    assert workers["worker-1"]["profiles"] == ["gpu2"]  # a one-GPU host runs worker-0 only


def test_api_and_workers_share_artifacts_data_hf_cache_redis_and_settings():
    compose = _compose()
    services = compose["services"]
    for name in ("api", *_workers()):
        env = services[name]["environment"]
        assert env["GENERALRM_REDIS_URL"] == "redis://redis:6379/0"
        assert env["GENERALRM_ARTIFACTS_DIR"] == "/artifacts" and env["GENERALRM_DATA_DIR"] == "/data"
        assert env["HF_HOME"] == "/hf-cache"
        mounts = {v.split(":")[-2] if v.endswith(":ro") else v.split(":")[-1]: v
                  for v in services[name]["volumes"]}
        assert mounts["/artifacts"] == "artifacts:/artifacts" and mounts["/hf-cache"] == "hf-cache:/hf-cache"
        assert not mounts["/data"].endswith(":ro")  # jobs write (strength files) next to the data
        assert all(key.startswith(("GENERALRM_", "HF_")) for key in env)
    assert {"artifacts", "redis-data", "hf-cache"} <= set(compose["volumes"])


def test_the_api_gpu_override_builds_cuda_and_reserves_a_gpu():
    override = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]["api"]
    assert override["build"]["args"]["DEVICE"] == "cuda"
    assert override["environment"]["GENERALRM_DEVICE"] == "cuda"
    assert override["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]


# ---------------------------------------------------------------------- Dockerfile
def test_dockerfile_one_python_one_cuda_argument_and_cached_layers():
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                     if not line.startswith("#"))  # instructions, not comments
    assert len(re.findall(r"^FROM \$\{PYTHON_IMAGE\}", text, re.M)) == 1
    assert "apt-get" not in text and "nvidia/cuda" not in text  # one Python: the base image's
    assert "NVIDIA_VISIBLE_DEVICES" not in text
    (default,) = re.findall(r"^ARG TORCH_CUDA=(\w+)$", text, re.M)
    assert default in TORCH_2_13_CUDA
    assert text.count("whl/${TORCH_CUDA}") == 1 and "whl/cpu" in text
    assert text.count('"torch==2.13.0"') == 2
    installs = re.findall(r"^RUN (?:.*\\\n)*.*pip install (?!--no-cache-dir --no-deps \.).*$",
                          text, re.M)
    assert len(installs) == 3  # torch (cpu), torch (cuda), the dependencies
    for run in installs:
        assert "--mount=type=cache,target=/root/.cache/pip" in run, run
    # the dependency layer comes before the source: a source change reuses it
    assert text.index("pip install -r /tmp/requirements.txt") < text.index("COPY --from=source")
    assert re.search(r"^FROM torch-\$\{DEVICE\} AS deps$", text, re.M)
    for target, command in (("api", '"service"'), ("worker", '"worker"')):
        stage = text.split(f" AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
        assert re.search(rf'^CMD \["python", "-m", {command}', stage, re.M), target
        assert "HEALTHCHECK" in stage
    assert "USER 1000" in text and "/ready" in text and "inspect ping" in text


def test_images_carry_the_product_and_no_benchmark_harness():
    text = DOCKERFILE.read_text()
    source = text.split(" AS source\n", 1)[1].split("\nFROM ", 1)[0]
    copied = re.findall(r"^COPY\s+(\S+)", source, re.M)
    for package in ("generalrm", "service", "worker", "training", "benchdata"):
        assert package in copied
    assert "bench" not in copied and "bench/" not in copied and "tests" not in copied
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in ("runs/", "tests/", ".ci/", "*.egg-info/", "bench/", "artifacts/", ".venv/"):
        assert entry in ignored, entry


# ---------------------------------------------------------------------- health checks, run
@pytest.mark.integration
def test_the_worker_health_check_pings_that_worker_itself(tmp_path, redis_server):
    from tests.worker.harness import JobHarness

    jobs = JobHarness(tmp_path, redis_server.url)
    try:
        worker = jobs.start_worker()
        command = _healthcheck_command(_workers()["worker-0"])
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        base = {**jobs.env, "PATH": path}
        alive = subprocess.run(command, env={**base, "GENERALRM_WORKER_NAME": worker.name},
                               capture_output=True, text=True, timeout=60)
        assert alive.returncode == 0, alive.stdout + alive.stderr
        other = subprocess.run(command, env={**base, "GENERALRM_WORKER_NAME": "generalrm@nobody"},
                               capture_output=True, text=True, timeout=60)
        assert other.returncode != 0
    finally:
        jobs.close()


def test_the_api_health_check_asks_ready_with_the_key(tiny_encoder_rm):
    from tests.service.conftest import live_server

    command = _healthcheck_command(_compose()["services"]["api"])
    with live_server(model=str(tiny_encoder_rm), api_key="k") as server:
        command = [arg.replace("http://127.0.0.1:8000", server.url) for arg in command]
        env = {**os.environ, "GENERALRM_API_KEY": "k"}
        assert subprocess.run(command, env=env, capture_output=True, timeout=60).returncode == 0
        env["GENERALRM_API_KEY"] = "wrong"
        assert subprocess.run(command, env=env, capture_output=True, timeout=60).returncode != 0
